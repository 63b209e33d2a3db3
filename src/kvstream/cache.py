"""A streaming KV cache for transformers 5.x: attention sinks, lazy pruning, slack and max-drop.

Design (docs/method.md, "Positions"):

* One preallocated tensor holds every layer's keys, another the values: [layers, batch, kv_heads,
  slots, head_dim]. Layer i attends over the first L slots of its slice. Slots are not kept in
  arrival order: an evicted token's slot is refilled by moving one of the newest tokens into it
  ("hole filling"), so eviction copies O(evicted) rows, never the whole cache. Single-query decode
  attention does not depend on key order; a multi-token chunk is appended in order at the end,
  which keeps the causal mask right.
* Maintenance (eviction, sink re-rotation, rebasing) is planned once per forward, on the host, from
  plain integers, and applied to all layers at once when layer 0 receives the next tokens.
* Positions ("relative", StreamingLLM): every query-key pair must see its cache-relative distance.
  The window is always a contiguous run of the most recent tokens, so window keys kept at their own
  positions already have the right distance to the query. Only the S sink keys must move: they are
  re-rotated at each event from copies saved when they arrived (one rotation, never accumulated).
  Positions grow with the stream, so when they pass `rebase_at` the window is rotated back to start
  at S (every key is rebased at most about once while it lives; O(cache) work every
  `rebase_at - max_forward_len` steps). Rebasing needs the caller to take positions from the cache
  (`cache.get_seq_length()`, which models do when given no position_ids); `model.generate`
  computes absolute positions itself, so rebasing is off unless asked for.
* "absolute": keys keep the positions they arrived with and the query sits at its absolute index;
  sinks are never moved (a control that shows why cache-relative positions matter).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from kvstream import defects
from kvstream.errors import KVStreamError
from kvstream.eviction import EVICTION_RULES
from kvstream.rope import Rotary
from kvstream.schedule import Policy, eviction_size
from kvstream.slots import SlotPlan, SlotTable


@dataclass
class _Plan:
    """Maintenance to apply before the next tokens are appended (same for every layer)."""

    n_evict: int = 0
    slots: SlotPlan | None = None  # the event's moves (host side)
    src: torch.Tensor | None = None  # slots whose tokens move ...
    dst: torch.Tensor | None = None  # ... into these freed slots
    rebase: int = 0  # rotate window keys by -rebase
    sink_delta: int | None = None  # re-rotate sinks to original + sink_delta (None: unchanged)
    length: int = 0  # tokens held once the plan is applied
    next_pos: int = 0  # position of the next token once the plan is applied


class StreamingCacheLayer(CacheLayerMixin):
    """One layer's view of the shared buffers of a StreamingCache."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, parent: "StreamingCache", layer_idx: int):
        super().__init__()
        self.parent = parent
        self.layer_idx = layer_idx

    def lazy_initialization(self, key_states, value_states) -> None:
        self.parent._allocate(key_states, value_states)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        return self.parent._update(self.layer_idx, key_states, value_states)

    def get_seq_length(self) -> int:
        return self.parent._pending_plan().next_pos

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        plan = self.parent._pending_plan()
        # Key slot j is given mask index kv_offset + j: the held tokens come before the query
        # position and the new chunk sits at its own positions, so the causal mask is right.
        return plan.length + query_length, plan.next_pos - plan.length

    def get_max_length(self) -> int:
        return self.parent.capacity

    @property
    def keys(self):
        p = self.parent
        return None if p.key_buffer is None else p.key_buffer[self.layer_idx, :, :, : p.length]

    @keys.setter
    def keys(self, value):  # the base class assigns None at construction
        pass

    @property
    def values(self):
        p = self.parent
        return None if p.value_buffer is None else p.value_buffer[self.layer_idx, :, :, : p.length]

    @values.setter
    def values(self, value):
        pass

    def reset(self) -> None:
        self.parent.reset()


class StreamingCache(Cache):
    """KV cache implementing the `dense`, `window` and `sink` policies of docs/method.md.

    Args:
        model: the transformers model (its config and rotary embedding are read; nothing is changed).
        policy: a `Policy` (type dense, window or sink).
        rebase_at: rotate the window back to start at position S once the next position would reach
            this value (None: never; see the module docstring). `"auto"` picks 2 x max forward length.
        reserve: slots to allocate up front (a dense cache of known length never reallocates).
    """

    def __init__(self, model, policy: Policy, rebase_at: int | str | None = None, reserve: int | None = None):
        policy = policy.resolved()
        if policy.type == "recompute":
            raise KVStreamError("policy type recompute uses no cache: run a fresh forward per step instead")
        config = model.config
        n_layers = config.num_hidden_layers
        self.policy = policy
        self.rule = EVICTION_RULES[policy.type](policy) if policy.evicts else None
        self.rotary = Rotary.from_model(model)
        self.n_layers = n_layers
        self.n_sink = policy.n_sink if policy.evicts else 0
        self.relative = policy.positions == "relative" and policy.evicts
        if rebase_at == "auto":
            rebase_at = 2 * policy.max_forward_len if policy.evicts else None
        if rebase_at is not None and self.relative and rebase_at < policy.max_forward_len + 1:
            raise KVStreamError(f"rebase_at={rebase_at} must exceed the largest forward ({policy.max_forward_len})")
        self.rebase_at = rebase_at if self.relative else None
        # DEFECT switches (kvstream.defects); both are 0 / None on the clean path
        self.offset = (defects.trained_offset(getattr(config, "max_position_embeddings", None), policy.budget)
                       if defects.has(policy, "positions_past_trained") else 0)
        self.rebase_work = torch.float16 if defects.has(policy, "fp16_rerotation") else None
        super().__init__(layers=[StreamingCacheLayer(self, i) for i in range(n_layers)])
        self.key_buffer: torch.Tensor | None = None
        self.value_buffer: torch.Tensor | None = None
        self.sink_keys: torch.Tensor | None = None  # sinks as they arrived, at positions 0..S-1
        self.capacity = 0
        self.slots = SlotTable()
        self.reserve = reserve or 0
        self.static = False
        self._reset_state()

    # --- bookkeeping (host side, plain integers) ----------------------------------------------------
    def _reset_state(self) -> None:
        self.length = 0  # tokens held (sinks + window) after the last forward
        self.n_seen = 0  # tokens ever appended; token u is the u-th token of the stream
        self.first_window = 0  # absolute index of the oldest window token
        self.shift = -self.offset  # frame position of token u is u - shift (relative mode, after rebases)
        self.sink_delta = 0  # current rotation of the sinks from their arrival positions
        self.events = 0
        self.rebases = 0
        self._plan: _Plan | None = None
        self._current: _Plan | None = None

    def reset(self) -> None:
        self._reset_state()
        self.slots.clear()

    def next_forward_length(self, q_len: int = 1) -> int:
        """Tokens the next forward of q_len tokens will attend over (after pending maintenance)."""
        return self._pending_plan().length + q_len

    def next_position(self) -> int:
        """Position the next token must be given (what `get_seq_length()` returns)."""
        return self._pending_plan().next_pos

    @property
    def kv_cache_bytes(self) -> int:
        """Bytes of the key and value buffers (allocated capacity, all layers)."""
        if self.key_buffer is None:
            return 0
        return (self.key_buffer.numel() + self.value_buffer.numel()) * self.key_buffer.element_size() + (
            0 if self.sink_keys is None else self.sink_keys.numel() * self.sink_keys.element_size()
        )

    def _pending_plan(self) -> _Plan:
        if self._plan is None:
            self._plan = self._make_plan()
        return self._plan

    def _make_plan(self) -> _Plan:
        policy = self.policy
        plan = _Plan(length=self.length, next_pos=self.n_seen - self.shift)
        if not policy.evicts or self.key_buffer is None:
            return plan
        n = eviction_size(self.length, policy.budget, policy.compress_every, policy.cache_slack, policy.max_drop)
        first_window = self.first_window
        if n:
            plan.slots = self.slots.plan(self.rule.select(self, n), self.length)
            plan.n_evict = n
            plan.length = plan.slots.length
            if len(plan.slots.holes):
                plan.src = self._to_device(plan.slots.movers)
                plan.dst = self._to_device(plan.slots.holes)
            first_window += n
        if self.relative:
            shift, offset = self.shift, self.offset
            window_start = first_window - shift  # frame position of the oldest window token
            due = self.rebase_at is not None and plan.next_pos - offset >= self.rebase_at
            if self.rebase_work is not None:  # DEFECT fp16_rerotation: the window rotated back at every event
                due = n > 0
            if due and window_start > self.n_sink + offset:
                plan.rebase = window_start - self.n_sink - offset
                shift += plan.rebase
                plan.next_pos -= plan.rebase
            # sinks just before the window (DEFECT positions_past_trained: offset before it; they arrived at +offset)
            sink_delta = first_window - shift - self.n_sink - 2 * offset
            if sink_delta != self.sink_delta and self.n_sink:
                plan.sink_delta = sink_delta
        return plan

    def _to_device(self, index: np.ndarray) -> torch.Tensor:
        device = self.key_buffer.device
        if device.type == "cuda":  # pinned + non_blocking: no host sync inside a decode step
            return torch.from_numpy(index).pin_memory().to(device, non_blocking=True)
        return torch.from_numpy(index)

    def _commit(self, plan: _Plan, q_len: int) -> None:
        """Advance the host state past `plan` and the q_len appended tokens."""
        if plan.n_evict:
            self.events += 1
            self.slots.commit(plan.slots)
            self.first_window += plan.n_evict
        if plan.rebase:
            self.rebases += 1
            self.shift += plan.rebase
        if plan.sink_delta is not None:
            self.sink_delta = plan.sink_delta
        self.slots.append(plan.length, self.n_seen, q_len)
        self.length = plan.length + q_len
        self.n_seen += q_len
        if self.first_window < self.n_sink:
            self.first_window = min(self.n_seen, self.n_sink)

    # --- device side --------------------------------------------------------------------------------
    def _allocate(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if self.key_buffer is not None:
            return
        batch, kv_heads, q_len, head_dim = key_states.shape
        if head_dim != self.rotary.head_dim:
            raise KVStreamError(f"attention head_dim {head_dim} differs from the config's {self.rotary.head_dim}")
        capacity = max(self.policy.max_forward_len if self.policy.evicts else 0, self.reserve)
        self.rotary = self.rotary.to(key_states.device)
        self._grow(max(capacity, q_len), key_states, value_states)
        if self.n_sink:
            self.sink_keys = key_states.new_zeros((self.n_layers, batch, kv_heads, self.n_sink, head_dim))

    def _grow(self, needed: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Make room for `needed` slots (dense caches, or a long chunk), doubling to keep appends O(1)."""
        if needed <= self.capacity:
            return
        capacity = max(needed, 2 * self.capacity)
        batch, kv_heads, _, head_dim = key_states.shape
        shape = (self.n_layers, batch, kv_heads, capacity, head_dim)
        keys = key_states.new_zeros(shape)
        values = value_states.new_zeros(shape[:4] + (value_states.shape[-1],))
        if self.key_buffer is not None:
            keys[..., : self.capacity, :] = self.key_buffer
            values[..., : self.capacity, :] = self.value_buffer
        self.key_buffer, self.value_buffer = keys, values
        self.slots.grow(capacity)
        self.capacity = capacity

    def _apply(self, plan: _Plan) -> None:
        keys, values = self.key_buffer, self.value_buffer
        if plan.src is not None:
            keys.index_copy_(3, plan.dst, keys.index_select(3, plan.src))
            values.index_copy_(3, plan.dst, values.index_select(3, plan.src))
        if plan.rebase:  # layer by layer, in place: the temporaries are one layer's window, not the cache's
            for layer in range(self.n_layers):
                window = keys[layer, :, :, self.n_sink : plan.length]
                if self.rebase_work is None:
                    self.rotary.rotate_(window, -plan.rebase)
                else:  # DEFECT fp16_rerotation: the rotation's arithmetic in float16
                    self.rotary.rotate_(window, -plan.rebase, self.rebase_work)
        if plan.sink_delta is not None:
            keys[:, :, :, : self.n_sink] = self.rotary.rotate(self.sink_keys, plan.sink_delta)

    # --- static shapes (CUDA graphs) -----------------------------------------------------------
    def enable_static(self) -> None:
        """Switch to fixed-shape single-token decoding (after the prefill), for CUDA-graph capture.

        Every forward then attends over all `capacity` slots with `static_mask` (0 for held slots,
        the dtype's minimum for free ones) and writes its token at a slot held in a device tensor.
        Call `begin_static_step()` before each forward: it runs the maintenance outside the graph and
        sets the slot, the position (`static_position`) and the mask in place.
        """
        if self.key_buffer is None:
            raise RuntimeError("enable_static() needs the prefill to have run")
        if not self.policy.evicts and self.capacity < self.reserve:
            raise RuntimeError("a dense cache needs reserve= its final length for static shapes")
        device, dtype = self.key_buffer.device, self.key_buffer.dtype
        self.static = True
        self._slot_index = torch.zeros(1, dtype=torch.long, device=device)
        self._length_t = torch.zeros((), dtype=torch.long, device=device)
        self._arange = torch.arange(self.capacity, device=device)
        self._masked = torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=device)
        self._zero = torch.zeros((), dtype=dtype, device=device)
        self.static_position = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.static_mask = torch.zeros(1, 1, 1, self.capacity, dtype=dtype, device=device)

    def begin_static_step(self) -> int:
        """Maintenance, then slot/position/mask for the next single-token forward; returns its length."""
        plan = self._pending_plan()
        self._apply(plan)
        self._current = plan
        self._plan = None
        self._commit(plan, 1)
        self._first_new_token = self.n_seen - 1
        self._slot_index.fill_(plan.length)
        self.static_position.fill_(plan.next_pos)
        self._length_t.fill_(plan.length + 1)
        torch.where(self._arange < self._length_t, self._zero, self._masked, out=self.static_mask.view(-1))
        return plan.length + 1

    def _update(self, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor):
        q_len = key_states.shape[-2]
        if self.static:
            if q_len != 1:
                raise RuntimeError("static mode decodes one token per forward")
            self.key_buffer[layer_idx].index_copy_(2, self._slot_index, key_states)
            self.value_buffer[layer_idx].index_copy_(2, self._slot_index, value_states)
            return self.key_buffer[layer_idx], self.value_buffer[layer_idx]
        if layer_idx == 0:
            plan = self._pending_plan()
            if plan.length + q_len > self.capacity:
                self._grow(plan.length + q_len, key_states, value_states)
            self._apply(plan)
            self._current = plan
            self._plan = None
            self._commit(plan, q_len)
            self._first_new_token = self.n_seen - q_len
        plan = self._current
        start = plan.length
        self.key_buffer[layer_idx, :, :, start : start + q_len] = key_states
        self.value_buffer[layer_idx, :, :, start : start + q_len] = value_states
        first = self._first_new_token
        if self.sink_keys is not None and first < self.n_sink:
            n = min(self.n_sink - first, q_len)
            self.sink_keys[layer_idx, :, :, first : first + n] = key_states[:, :, :n]
        end = start + q_len
        return self.key_buffer[layer_idx, :, :, :end], self.value_buffer[layer_idx, :, :, :end]

    # --- transformers Cache API -----------------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._pending_plan().next_pos

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.layers[0].get_mask_sizes(query_length)

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.capacity if self.policy.evicts else -1

    def reorder_cache(self, beam_idx: torch.LongTensor):
        for name in ("key_buffer", "value_buffer", "sink_keys"):
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, tensor.index_select(1, beam_idx.to(tensor.device)))

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("StreamingCache cannot be cropped (evicted tokens are gone): disable assisted decoding")

    def forget_newest(self) -> None:
        """Drop the token appended last from the host bookkeeping (its slot is overwritten by the next
        token), so that a cache that never evicts stays at one length: the dense floor that `kvstream
        speed` and `kvstream bench` time."""
        if self.policy.evicts:
            raise RuntimeError("forget_newest() is for a cache that never evicts")
        self.length -= 1
        self.n_seen -= 1
        self.slots.release(self.length)
        self._plan = None

    def held_tokens(self) -> list[int]:
        """Absolute indices of the held tokens, in cache order (sinks, then window by arrival)."""
        return self.slots.held_tokens(self.length)
