"""The cache for score-based kinds (h2o, tova, knorm, random): the sink schedule, any tokens removed.

Same schedule, buffers and Cache API as `StreamingCache` (docs/method.md, "The cache"); what differs
is that an event may remove tokens from anywhere behind the sinks, chosen per batch row by the
policy's `EvictionRule` (kvstream.eviction). One decision per row serves every layer and kv-head
(scores are summed over layers and averaged over heads), so the held tokens of a row are one set of
token ids: buffers stay rectangular, and a slow reference can rebuild the cache from those ids.

Positions ("relative"): the held tokens sit at 0 .. L-1 in arrival order, the query at L. An event
changes the rank of every token behind a removed one; exactly those keys are re-rotated, each from
its stored original (the key as it arrived) by one rotation, so nothing drifts. "absolute": keys keep
their arrival positions and the query sits at its index in the stream; nothing is re-rotated.

Attention scores (h2o, tova) come from the decode query and the cached keys: while a `scoring(cache)`
context is active the model's attention runs through `kvstream_scored` (SDPA, then one extra q.K^T
over the cache for the last query; for H2O's prefill the column sums of the causal prefill attention,
in chunks of queries). Eager execution only (no CUDA graphs).
"""

from __future__ import annotations

import contextlib
import contextvars

import numpy as np
import torch
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from kvstream.cache import StreamingCache, _Plan
from kvstream.errors import KVStreamError
from kvstream.schedule import Policy, eviction_size
from kvstream.slots import SlotTable

ATTENTION = "kvstream_scored"
_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("kvstream_scored_cache", default=None)
PREFILL_CHUNK = 64  # prefill queries per q.K^T block (H2O's column sums)


class ScoredCache(StreamingCache):
    """`StreamingCache` for the scored kinds: per-row slot tables, per-slot scores, rank positions."""

    def __init__(self, model, policy: Policy, rebase_at=None, reserve: int | None = None):
        policy = policy.resolved()
        if not policy.scored:
            raise KVStreamError(f"ScoredCache is for the scored kinds, not {policy.type}")
        super().__init__(model, policy, rebase_at=None, reserve=reserve)
        self.rebase_at = None  # rank positions never grow past the largest forward
        self.needs_attention = self.rule.needs_attention
        self.row_slots: list[SlotTable] = []
        self.scores: torch.Tensor | None = None  # [batch, capacity] float64, in slot order
        self.arrival_pos: np.ndarray | None = None  # [batch, capacity] position each key was rotated to on arrival
        self.current_pos: np.ndarray | None = None  # [batch, capacity] position it is rotated to now
        self.orig_keys: torch.Tensor | None = None  # relative: keys as they arrived

    # --- allocation ---------------------------------------------------------------------------------
    def _allocate(self, key_states, value_states) -> None:
        if self.key_buffer is not None:
            return
        super()._allocate(key_states, value_states)
        self.sink_keys = None  # sinks are re-rotated from orig_keys like every other key
        batch = key_states.shape[0]
        self.row_slots = [SlotTable(self.capacity) for _ in range(batch)]
        self.scores = torch.zeros(batch, self.capacity, dtype=torch.float64, device=key_states.device)
        self.arrival_pos = np.zeros((batch, self.capacity), dtype=np.int64)
        self.current_pos = np.zeros((batch, self.capacity), dtype=np.int64)
        if self.relative:
            self.orig_keys = torch.zeros_like(self.key_buffer)

    def _grow(self, needed, key_states, value_states) -> None:
        if self.key_buffer is not None and needed > self.capacity:
            raise KVStreamError("a scored cache does not grow: its capacity is the largest forward")
        super()._grow(needed, key_states, value_states)

    @property
    def kv_cache_bytes(self) -> int:
        extra = 0 if self.orig_keys is None else self.orig_keys.numel() * self.orig_keys.element_size()
        return super().kv_cache_bytes + extra

    # --- planning (host) ----------------------------------------------------------------------------
    def _make_plan(self) -> _Plan:
        policy = self.policy
        plan = _Plan(length=self.length, next_pos=self.length if self.relative else self.n_seen)
        if self.key_buffer is None:
            return plan
        n = eviction_size(self.length, policy.budget, policy.compress_every, policy.cache_slack, policy.max_drop)
        if not n:
            return plan
        plan.n_evict, plan.length = n, self.length - n
        plan.next_pos = plan.length if self.relative else self.n_seen
        plan.slots = [self._row_plan(b, n) for b in range(len(self.row_slots))]
        return plan

    def _row_plan(self, b: int, n: int) -> dict:
        """One row's moves, and (relative) the keys whose rank changes with the rotation each needs."""
        table, length = self.row_slots[b], self.length
        moves = table.plan(self.rule.select_row(self, b, n), length)
        after = []
        for values in (table.slot_token, self.arrival_pos[b], self.current_pos[b]):
            v = values[:length].copy()
            v[moves.holes] = v[moves.movers]
            after.append(v[: moves.length])
        tokens, arrival, current = after
        rotate = np.zeros(0, dtype=np.int64)
        deltas = np.zeros(0, dtype=np.int64)
        if self.relative:
            rank = np.empty_like(tokens)
            rank[np.argsort(tokens, kind="stable")] = np.arange(len(tokens))
            rotate = np.nonzero(rank != current)[0]
            deltas = rank[rotate] - arrival[rotate]
            current = rank
        return {"moves": moves, "arrival": arrival, "current": current, "rotate": rotate, "deltas": deltas}

    def _commit(self, plan: _Plan, q_len: int) -> None:
        if plan.n_evict:
            self.events += 1
            for b, row in enumerate(plan.slots):
                self.row_slots[b].commit(row["moves"])
                self.arrival_pos[b, : plan.length] = row["arrival"]
                self.current_pos[b, : plan.length] = row["current"]
        for table in self.row_slots:
            table.append(plan.length, self.n_seen, q_len)
        new = np.arange(plan.length, plan.length + q_len)
        self.arrival_pos[:, new] = self.current_pos[:, new] = plan.next_pos + np.arange(q_len)
        self.length = plan.length + q_len
        self.n_seen += q_len
        self.first_window = min(self.n_seen, self.n_sink)

    # --- device side ----------------------------------------------------------------------------------
    def _apply(self, plan: _Plan) -> None:
        if not plan.n_evict:
            return
        tensors = [self.key_buffer, self.value_buffer] + ([self.orig_keys] if self.orig_keys is not None else [])
        for b, row in enumerate(plan.slots):
            moves = row["moves"]
            if len(moves.holes):
                src, dst = self._to_device(moves.movers), self._to_device(moves.holes)
                for t in tensors:
                    view = t[:, b]  # [layers, heads, slots, dim]
                    view.index_copy_(2, dst, view.index_select(2, src))
                self.scores[b].index_copy_(0, dst, self.scores[b].index_select(0, src))
            if len(row["rotate"]):  # one rotation from the key as it arrived: no drift
                idx = self._to_device(row["rotate"])
                rotated = self.rotary.rotate_each(self.orig_keys[:, b].index_select(2, idx), torch.from_numpy(row["deltas"]))
                self.key_buffer[:, b].index_copy_(2, idx, rotated)

    def _update(self, layer_idx, key_states, value_states):
        keys, values = super()._update(layer_idx, key_states, value_states)
        start = self._current.length
        q_len = key_states.shape[-2]
        if layer_idx == 0:
            self.scores[:, start : start + q_len] = 0.0
            if self.rule.resets_scores:  # tova: the newest query's attention only
                self.scores[:, : start + q_len] = 0.0
        if self.orig_keys is not None:
            self.orig_keys[layer_idx, :, :, start : start + q_len] = key_states
        return keys, values

    def held_tokens(self, row: int = 0) -> list[int]:
        return self.row_slots[row].held_tokens(self.length)

    def forget_newest(self) -> None:
        raise RuntimeError("forget_newest() is for a cache that never evicts")

    def enable_static(self) -> None:
        raise KVStreamError(f"policy {self.policy.type} runs eagerly only (no fixed-shape / CUDA-graph steps)")

    # --- scores from attention ------------------------------------------------------------------------
    def observe(self, module, query: torch.Tensor, key: torch.Tensor, attention_mask, scaling: float) -> None:
        """Add the attention the held tokens received from this forward's queries (mean over heads)."""
        key = repeat_kv(key, query.shape[1] // key.shape[1]).to(torch.float64)
        q_len, k_len = query.shape[-2], key.shape[-2]
        rows = range(q_len - 1, q_len) if not self.rule.prefill_column_sums or q_len == 1 else range(q_len)
        total = torch.zeros(query.shape[0], k_len, dtype=torch.float64, device=query.device)
        first = rows.start
        for lo in range(first, q_len, PREFILL_CHUNK):
            hi = min(lo + PREFILL_CHUNK, q_len)
            logits = query[:, :, lo:hi].to(torch.float64) @ key.transpose(-1, -2) * scaling
            # causal: query i (at key index k_len - q_len + i) sees keys up to its own
            visible = torch.arange(k_len, device=query.device)[None, :] <= (k_len - q_len + torch.arange(lo, hi, device=query.device))[:, None]
            if attention_mask is not None and attention_mask.dtype == torch.bool:
                visible = visible & attention_mask[:, :, lo:hi, :k_len]
            logits = logits.masked_fill(~visible, float("-inf"))
            total += logits.softmax(dim=-1).mean(dim=1).sum(dim=1)
        self.scores[:, :k_len] += total


def _scored_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    output = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    cache = _ACTIVE.get()
    if cache is not None and cache.needs_attention:
        cache.observe(module, query, key, attention_mask, scaling if scaling is not None else query.shape[-1] ** -0.5)
    return output


ALL_ATTENTION_FUNCTIONS.register(ATTENTION, _scored_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)


@contextlib.contextmanager
def scoring(model, cache):
    """Run the model's forwards inside with attention scores going to `cache` (if its rule needs them)."""
    if not isinstance(cache, ScoredCache) or not cache.needs_attention:
        yield
        return
    config = model.config
    if config._attn_implementation not in ("sdpa", ATTENTION):
        raise KVStreamError(f"policy {cache.policy.type} scores tokens by attention: load the model with "
                            f"attn_implementation='sdpa' (it has {config._attn_implementation!r})")
    before, config._attn_implementation = config._attn_implementation, ATTENTION
    token = _ACTIVE.set(cache)
    try:
        yield
    finally:
        _ACTIVE.reset(token)
        config._attn_implementation = before
