"""The streaming cache: parity, schedule, positions, equivalence with StreamingLLM, memory, errors."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from conftest import tiny_model
from kvstream.cache import StreamingCache
from kvstream.errors import KVStreamError
from kvstream.schedule import Policy, cache_lengths


def rotate_like_model(raw: torch.Tensor, positions: torch.Tensor, inv_freq32: torch.Tensor, rotary_ndims: int):
    """What transformers does: float32 angles, rotate_half over the first rotary_ndims dims."""
    angles = positions.float()[:, None] * inv_freq32[None, :]
    emb = torch.cat([angles, angles], dim=-1)
    cos, sin = emb.cos(), emb.sin()
    return _rotate(raw, cos, sin, rotary_ndims)


def rotate_exact(raw: torch.Tensor, positions: torch.Tensor, inv_freq32: torch.Tensor, rotary_ndims: int):
    """Reference rotation in float64."""
    angles = positions.double()[:, None] * inv_freq32.double()[None, :]
    emb = torch.cat([angles, angles], dim=-1)
    return _rotate(raw.double(), emb.cos(), emb.sin(), rotary_ndims)


def _rotate(x, cos, sin, rd):
    xr = x[..., :rd]
    half = rd // 2
    rot = torch.cat([-xr[..., half:], xr[..., :half]], dim=-1)
    return torch.cat([xr * cos + rot * sin, x[..., rd:]], dim=-1)


class SyntheticStream:
    """Feeds a StreamingCache the way a model would, one token at a time, remembering raw keys."""

    def __init__(self, model, policy, rebase_at="auto", seed=0):
        self.cache = StreamingCache(model, policy, rebase_at=rebase_at)
        self.rotary = self.cache.rotary
        self.inv_freq32 = self.rotary.inv_freq.float()
        config = model.config
        self.n_layers = config.num_hidden_layers
        self.kv_heads = getattr(config, "num_key_value_heads", config.num_attention_heads)
        self.head_dim = self.rotary.head_dim
        self.gen = torch.Generator().manual_seed(seed)
        self.raw = []  # raw (unrotated) key of each token, [layers, heads, dim]
        self.forward_lengths = []

    def feed(self, n=1):
        pos = self.cache.next_position()
        positions = torch.arange(pos, pos + n)
        raw = torch.randn(self.n_layers, 1, self.kv_heads, n, self.head_dim, generator=self.gen)
        out = None
        for layer in range(self.n_layers):
            k = torch.stack([rotate_like_model(raw[layer, 0, h], positions, self.inv_freq32, self.rotary.rotary_ndims)
                             for h in range(self.kv_heads)])[None]
            v = raw[layer] + 1.0
            keys, _ = self.cache.update(k, v, layer)
            out = keys.shape[-2]
        for i in range(n):
            self.raw.append(raw[:, 0, :, i])
        self.forward_lengths.append(out)
        return positions


def test_parity_with_dense_and_teacher_forcing(model):
    ids = torch.randint(0, 128, (1, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits
        from transformers import DynamicCache
        dyn = DynamicCache(config=model.config)
        ours = StreamingCache(model, Policy("sink", n_sink=4, window_size=60, compress_every=4, cache_slack=2, max_drop=3))
        outs_dyn, outs_ours = [model(ids[:, :16], cache=dyn).logits], [model(ids[:, :16], cache=ours).logits]
        for t in range(16, 48):
            outs_dyn.append(model(ids[:, t : t + 1], cache=dyn).logits)
            outs_ours.append(model(ids[:, t : t + 1], cache=ours).logits)
    ours_all, dyn_all = torch.cat(outs_ours, 1), torch.cat(outs_dyn, 1)
    assert (ours_all - full).abs().max().item() <= 1e-5
    assert (ours_all - dyn_all).abs().max().item() <= 1e-5
    assert ours.events == 0


@settings(max_examples=60, deadline=None)
@given(
    s=st.integers(0, 6), w=st.integers(1, 20), r=st.integers(1, 10), sigma=st.integers(0, 8),
    delta=st.one_of(st.none(), st.integers(0, 10)), n=st.integers(2, 120), rebase=st.booleans(),
)
def test_real_cache_follows_schedule(s, w, r, sigma, delta, n, rebase):
    model = _llama()
    policy = Policy("sink", n_sink=s, window_size=w, compress_every=r, cache_slack=sigma, max_drop=delta)
    stream = SyntheticStream(model, policy, rebase_at="auto" if rebase else None)
    cache = stream.cache
    prefill = policy.prefill_len(n)
    stream.feed(prefill)
    held_before = set(cache.held_tokens())
    for _ in range(n - 1 - prefill):
        plan = cache._pending_plan()
        stream.feed(1)
        held = cache.held_tokens()
        if plan.n_evict:
            evicted = sorted(held_before - set(held))
            window = sorted(t for t in held_before if t >= s)
            assert evicted == window[: plan.n_evict]  # the oldest non-sink tokens
            assert policy.budget <= plan.length <= policy.budget + sigma
        assert set(range(min(s, cache.n_seen))) <= set(held)  # sinks never evicted
        held_before = set(held)
    assert stream.forward_lengths[1:] == cache_lengths(policy, n)
    assert max(stream.forward_lengths[1:], default=0) <= policy.max_forward_len


_LLAMA = {}


def _llama():
    if "m" not in _LLAMA:
        _LLAMA["m"] = tiny_model("llama")
    return _LLAMA["m"]


def _cache_relative_logits(stream, query_raw):
    """float64 logits of a fresh query against freshly rotated keys at cache-relative positions."""
    cache = stream.cache
    held = cache.held_tokens()  # sinks, then window, by arrival
    rel = {token: i for i, token in enumerate(held)}
    slots = [int(t) for t in cache.slots.slot_token[: cache.length]]
    positions = torch.tensor([rel[t] for t in slots])
    q_pos = torch.tensor([len(held) - 1])
    out = []
    for layer in range(stream.n_layers):
        keys = torch.stack([stream.raw[t][layer] for t in slots], dim=1)  # [heads, L, dim]
        k = torch.stack([rotate_exact(keys[h], positions, stream.inv_freq32, stream.rotary.rotary_ndims) for h in range(keys.shape[0])])
        q = torch.stack([rotate_exact(query_raw[layer, h][None], q_pos, stream.inv_freq32, stream.rotary.rotary_ndims) for h in range(keys.shape[0])])
        out.append(torch.einsum("hqd,hkd->hqk", q, k))
    return torch.stack(out)


def _cache_logits(stream, query_raw):
    cache = stream.cache
    pos = torch.tensor([cache.n_seen - 1 - cache.shift])  # the query is the token just appended
    out = []
    for layer in range(stream.n_layers):
        k = cache.key_buffer[layer, 0, :, : cache.length]
        q = torch.stack([rotate_like_model(query_raw[layer, h][None], pos, stream.inv_freq32, stream.rotary.rotary_ndims) for h in range(k.shape[0])])
        out.append(torch.einsum("hqd,hkd->hqk", q, k))
    return torch.stack(out)


@pytest.mark.parametrize("family_name", ["llama", "gpt_neox"])
@pytest.mark.parametrize("compress_every", [1, 7])
def test_positions_exact_after_thousands_of_evictions(family_name, compress_every):
    model = tiny_model(family_name)
    policy = Policy("sink", n_sink=4, window_size=28, compress_every=compress_every, cache_slack=3, max_drop=5)
    stream = SyntheticStream(model, policy)
    stream.feed(32)
    for _ in range(3000):
        stream.feed(1)
    assert stream.cache.events >= 3000 // max(compress_every, 1) - 2 and stream.cache.rebases > 10
    query_raw = stream.raw[-1]  # the last token is the query: its key is also in the cache
    got = _cache_logits(stream, query_raw).double()
    ref = _cache_relative_logits(stream, query_raw)
    rel_err = ((got - ref).abs().max() / ref.abs().max()).item()
    assert rel_err <= 1e-5, rel_err


def test_absolute_positions_differ_from_relative():
    model = tiny_model("llama")
    relative = SyntheticStream(model, Policy("sink", n_sink=4, window_size=28), seed=3)
    absolute = SyntheticStream(model, Policy("sink", n_sink=4, window_size=28, positions="absolute"), seed=3)
    for stream in (relative, absolute):
        stream.feed(32)
        for _ in range(200):
            stream.feed(1)
    q = relative.raw[-1]
    ref = _cache_relative_logits(relative, q)
    rel = _cache_logits(relative, q).double()
    assert ((rel - ref).abs().max() / ref.abs().max()).item() <= 1e-5
    # absolute: the window is still right (same distances), the sinks are far away, not adjacent
    absolute_logits = _cache_logits(absolute, q).double()
    sink_slots = [i for i, t in enumerate(absolute.cache.slots.slot_token[: absolute.cache.length]) if t < 4]
    window_slots = [i for i, t in enumerate(absolute.cache.slots.slot_token[: absolute.cache.length]) if t >= 4]
    ref_abs = _cache_relative_logits(absolute, q)
    assert torch.allclose(absolute_logits[..., window_slots], ref_abs[..., window_slots], rtol=1e-5, atol=1e-5)
    assert (absolute_logits[..., sink_slots] - ref_abs[..., sink_slots]).abs().max() > 1e-2


class StreamingLLMReference:
    """Obviously-correct StreamingLLM: unrotated keys in arrival order, whole cache rotated in float64 every step."""

    def __init__(self, model, n_sink, window):
        self.model, self.n_sink, self.window = model, n_sink, window
        rot = [m for m in model.modules() if hasattr(m, "inv_freq")][0]
        self.inv_freq = rot.inv_freq.double()
        self.rd = 2 * self.inv_freq.numel()

    def nll(self, ids):
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        ref = self

        class RefLayer(DynamicLayer):
            def update(self, key_states, value_states, *args, **kwargs):
                if not self.is_initialized:
                    self.lazy_initialization(key_states, value_states)
                    self.raw_keys = key_states.new_zeros(key_states.shape[:2] + (0, key_states.shape[-1])).double()
                # un-rotate the new keys from the positions they were given (cache-relative, see below)
                L = self.raw_keys.shape[-2]
                pos = torch.arange(L, L + key_states.shape[-2])
                raw = ref.rotate(key_states.double(), -pos)
                self.raw_keys = torch.cat([self.raw_keys, raw], dim=-2)
                self.values = torch.cat([self.values, value_states], dim=-2) if self.values.numel() else value_states
                full = self.raw_keys.shape[-2]
                rotated = ref.rotate(self.raw_keys, torch.arange(full)).to(key_states.dtype)
                self.keys = rotated
                return rotated, self.values

            def evict(self, budget):
                if self.raw_keys.shape[-2] > budget:
                    keep = list(range(ref.n_sink)) + list(range(self.raw_keys.shape[-2] - ref.window, self.raw_keys.shape[-2]))
                    self.raw_keys = self.raw_keys[:, :, keep]
                    self.values = self.values[:, :, keep]
                    self.keys = self.keys[:, :, keep]

        n_layers = self.model.config.num_hidden_layers
        cache = DynamicCache(config=self.model.config)
        cache.layers = [RefLayer() for _ in range(n_layers)]
        budget = self.n_sink + self.window
        prefill = min(budget, ids.shape[1])
        nlls = []
        with torch.no_grad():
            logits = self.model(ids[:, :prefill], cache=cache, position_ids=torch.arange(prefill)[None]).logits[0]
            nlls.append(torch.nn.functional.cross_entropy(logits.double(), ids[0, 1 : prefill + 1], reduction="none"))
            for t in range(prefill, ids.shape[1] - 1):
                for layer in cache.layers:
                    layer.evict(budget)
                L = cache.layers[0].raw_keys.shape[-2]
                logits = self.model(ids[:, t : t + 1], cache=cache, position_ids=torch.tensor([[L]])).logits[0]
                nlls.append(torch.nn.functional.cross_entropy(logits.double(), ids[0, t + 1 : t + 2], reduction="none"))
        return torch.cat(nlls)

    def rotate(self, x, positions):
        angles = positions.double()[:, None] * self.inv_freq[None, :]
        emb = torch.cat([angles, angles], dim=-1)
        return _rotate(x, emb.cos(), emb.sin(), self.rd)


def _stream_nll(model, policy, ids, rebase_at="auto"):
    cache = StreamingCache(model, policy, rebase_at=rebase_at)
    prefill = policy.prefill_len(ids.shape[1])
    nlls = []
    with torch.no_grad():
        logits = model(ids[:, :prefill], cache=cache).logits[0]
        nlls.append(torch.nn.functional.cross_entropy(logits.double(), ids[0, 1 : prefill + 1], reduction="none"))
        for t in range(prefill, ids.shape[1] - 1):
            logits = model(ids[:, t : t + 1], cache=cache).logits[0]
            nlls.append(torch.nn.functional.cross_entropy(logits.double(), ids[0, t + 1 : t + 2], reduction="none"))
    return torch.cat(nlls), cache


def test_sink_equals_streamingllm_reference(model):
    ids = torch.randint(0, 128, (1, 260), generator=torch.Generator().manual_seed(2))
    policy = Policy("sink", n_sink=4, window_size=28, compress_every=1)
    ours, cache = _stream_nll(model, policy, ids)
    ref = StreamingLLMReference(model, n_sink=4, window=28).nll(ids)
    assert cache.events > 200 and cache.rebases > 0
    assert ours.shape == ref.shape == (259,)
    assert (ours - ref).abs().max().item() <= 1e-4


def test_kv_bytes_constant_for_20000_tokens():
    model = tiny_model("llama", num_hidden_layers=1, hidden_size=32, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1)
    policy = Policy("sink", n_sink=4, window_size=60, compress_every=8, cache_slack=4, max_drop=4)
    cache = StreamingCache(model, policy, rebase_at="auto")
    ids = torch.randint(0, 128, (1, 20000), generator=torch.Generator().manual_seed(0))
    sizes = set()
    with torch.no_grad():
        model(ids[:, :64], cache=cache)
        first = cache.kv_cache_bytes
        buffer_ptr = cache.key_buffer.data_ptr()
        for t in range(64, 20000):
            model(ids[:, t : t + 1], cache=cache)
            sizes.add(cache.kv_cache_bytes)
    assert sizes == {first}
    assert cache.key_buffer.data_ptr() == buffer_ptr  # never reallocated
    assert cache.length <= policy.max_forward_len and cache.n_seen == 20000


def test_generate_with_streaming_cache(model):
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(5))
    policy = Policy("sink", n_sink=2, window_size=14)
    cache = StreamingCache(model, policy)
    out = model.generate(ids, cache=cache, max_new_tokens=30, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 42)
    assert cache.length <= policy.max_forward_len and cache.events > 0
    # with a budget covering everything, greedy output equals the default cache's
    big = StreamingCache(model, Policy("sink", n_sink=2, window_size=100))
    a = model.generate(ids, cache=big, max_new_tokens=20, do_sample=False, pad_token_id=0)
    b = model.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert torch.equal(a, b)


def test_unsupported_models_are_rejected_before_work():
    from transformers import GPT2Config, AutoModelForCausalLM

    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(KVStreamError, match="model_type 'gpt2'"):
        StreamingCache(gpt2, Policy("sink", n_sink=4, window_size=8))
    with pytest.raises(KVStreamError, match="recompute"):
        StreamingCache(_llama(), Policy("recompute", cap=8))
    with pytest.raises(KVStreamError, match="window_size"):
        StreamingCache(_llama(), Policy("sink", n_sink=4, window_size=0))


@pytest.mark.parametrize("positions", ["relative", "absolute"])
def test_static_shapes_give_the_same_logits(model, positions):
    """The fixed-shape path (CUDA graphs on a GPU; eager here) equals the dynamic one."""
    from kvstream.graphs import StaticDecoder

    ids = torch.randint(0, 128, (300,), generator=torch.Generator().manual_seed(4))
    policy = Policy("sink", n_sink=4, window_size=28, compress_every=5, cache_slack=3, max_drop=2, positions=positions)
    dynamic, static = StreamingCache(model, policy, rebase_at="auto"), StreamingCache(model, policy, rebase_at="auto")
    with torch.no_grad():
        model(ids[None, :32], cache=dynamic)
        model(ids[None, :32], cache=static)
        decoder = StaticDecoder(model, static)
        for t in range(32, 299):
            expected = model(ids[None, t : t + 1], cache=dynamic).logits[0, -1]
            assert (decoder.step(ids[t]) - expected).abs().max().item() <= 1e-5
    assert static.events == dynamic.events > 100 and static.held_tokens() == dynamic.held_tokens()


def test_rebase_works_layer_by_layer_in_place(monkeypatch):
    """A rebase rotates one layer's window at a time in the key buffer itself (issue: it used to rotate
    every layer at once through a full copy, +1.7x the KV cache at peak), with the same numbers."""
    from kvstream.rope import Rotary

    model = tiny_model("llama")
    ids = torch.randint(0, 128, (1, 400), generator=torch.Generator().manual_seed(0))
    policy = Policy("sink", n_sink=4, window_size=28, compress_every=1)
    seen = []
    original = Rotary.rotate_

    def recording(self, keys, delta):
        seen.append((keys.data_ptr(), keys.numel()))
        return original(self, keys, delta)

    monkeypatch.setattr(Rotary, "rotate_", recording)
    cache = StreamingCache(model, policy, rebase_at="auto")
    with torch.inference_mode():
        model(ids[:, :32], cache=cache)
        for t in range(32, 400):
            model(ids[:, t : t + 1], cache=cache)
    assert cache.rebases >= 2
    layers = model.config.num_hidden_layers
    per_layer = cache.key_buffer[0].numel()
    assert len(seen) == cache.rebases * layers and all(n <= per_layer for _, n in seen)
    inside = cache.key_buffer.data_ptr(), cache.key_buffer.data_ptr() + cache.key_buffer.numel() * 4
    assert all(inside[0] <= ptr < inside[1] for ptr, _ in seen)  # views of the buffer: rotated in place
