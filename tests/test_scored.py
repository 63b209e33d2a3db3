"""Score-based kinds (h2o, tova, knorm, random) against a slow, obviously-correct reference.

The reference keeps every token's key and value as they arrived (the streaming semantics), rebuilds a
plain DynamicCache from the held tokens at every step (keys rotated from their originals to their
rank, or kept at their arrival position), takes attention weights from eager attention
(output_attentions) and chooses what to remove from scratch with plain Python sorting.
"""

import copy

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from conftest import tiny_model
from kvstream.evaluate import run_cells
from kvstream.rope import Rotary
from kvstream.schedule import Policy, cache_lengths, eviction_size

N = 120


@pytest.fixture(params=["llama", "gpt_neox"])
def tiny(request):
    model = tiny_model(request.param)
    model.set_attn_implementation("sdpa")  # the scored kinds read attention through an SDPA wrapper
    return model


def _stream(seed: int, vocab: int = 128) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, N).astype(np.int64)


def reference_nll(model, ids: np.ndarray, policy: Policy) -> tuple[np.ndarray, list[int]]:
    """Per-target NLL and cache lengths of one sample, the slow way."""
    policy = policy.resolved()
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    rotary = Rotary.from_model(model)
    layers = model.config.num_hidden_layers
    prefill = policy.prefill_len(len(ids))
    relative = policy.positions == "relative"
    orig, arrival, score = {}, {}, {}  # token -> [(k, v) per layer], its arrival position, its score
    nll, lengths = [], []
    rng = np.random.default_rng([policy.seed, 0])

    def forward(tokens_in, held, positions):
        cache = DynamicCache(config=model.config)
        for layer in range(layers):
            if held:
                ks = [rotary.rotate(orig[u][layer][0], (rank if relative else arrival[u]) - arrival[u])
                      for rank, u in enumerate(held)]
                cache.update(torch.cat(ks, dim=-2), torch.cat([orig[u][layer][1] for u in held], dim=-2), layer)
        out = eager(torch.as_tensor(ids[tokens_in])[None], cache=cache, position_ids=torch.tensor([positions]),
                    output_attentions=True, use_cache=True)
        start = len(held)
        for i, u in enumerate(tokens_in):
            orig[u] = [(cache.layers[layer].keys[:, :, start + i : start + i + 1].clone(),
                        cache.layers[layer].values[:, :, start + i : start + i + 1].clone()) for layer in range(layers)]
            arrival[u] = positions[i]
        # [queries, keys]: summed over layers, averaged over heads
        weights = sum(a[0].double().mean(dim=0) for a in out.attentions)
        return out.logits[0].float(), weights

    with torch.inference_mode():
        held = []
        logits, weights = forward(list(range(prefill)), held, list(range(prefill)))
        nll += torch.nn.functional.cross_entropy(logits, torch.as_tensor(ids[1 : prefill + 1]), reduction="none").tolist()
        held = list(range(prefill))
        for u in held:
            score[u] = float(weights[:, u].sum()) if policy.type == "h2o" else float(weights[-1, u])
        for t in range(prefill, len(ids) - 1):
            n = eviction_size(len(held), policy.budget, policy.compress_every, policy.cache_slack, policy.max_drop)
            if n:
                candidates = [u for u in held if policy.n_sink <= u < t - policy.recent]
                if policy.type == "random":
                    drop = {candidates[i] for i in rng.choice(len(candidates), size=n, replace=False)}
                else:
                    if policy.type == "knorm":  # largest norm first: keys as they arrived
                        key = {u: -sum(float(orig[u][layer][0].double().norm(dim=-1).mean()) for layer in range(layers))
                               for u in candidates}
                    else:
                        key = {u: score[u] for u in candidates}
                    drop = set(sorted(candidates, key=lambda u: (key[u], u))[:n])
                held = [u for u in held if u not in drop]
            position = len(held) if relative else t
            logits, weights = forward([t], held, [position])
            held.append(t)
            lengths.append(len(held))
            if policy.type == "tova":
                score = {}
            for i, u in enumerate(held):
                score[u] = score.get(u, 0.0) + float(weights[-1, i])
            nll.append(float(torch.nn.functional.cross_entropy(logits[-1:], torch.as_tensor(ids[t + 1 : t + 2]))))
    return np.asarray(nll, dtype=np.float64), lengths


POLICIES = [
    dict(type="h2o", n_sink=4, window_size=20, compress_every=1, recent=4),
    dict(type="h2o", n_sink=2, window_size=22, compress_every=8, cache_slack=2, max_drop=4, recent=6),
    dict(type="tova", n_sink=4, window_size=20, compress_every=1),
    dict(type="tova", n_sink=0, window_size=24, compress_every=6, recent=2),
    dict(type="knorm", n_sink=4, window_size=20, compress_every=4),
    dict(type="random", n_sink=4, window_size=20, compress_every=5, seed=3),
]


@pytest.mark.parametrize("positions", ["relative", "absolute"])
@pytest.mark.parametrize("spec", POLICIES, ids=lambda d: f"{d['type']}-R{d['compress_every']}")
def test_scored_kind_matches_its_slow_reference(tiny, spec, positions):
    policy = Policy.from_dict({**spec, "positions": positions})
    samples = [_stream(0), _stream(1)]
    fast = run_cells(tiny, samples, policy, warmup=0)
    for row, ids in enumerate(samples[:1] if policy.type == "random" else samples):  # random: row 0's stream
        ref, lengths = reference_nll(tiny, ids, policy)
        assert fast[row].cache_len == lengths == cache_lengths(policy, N)
        assert max(fast[row].cache_len) <= policy.max_forward_len
        assert np.abs(fast[row].nll.astype(np.float64) - ref).max() <= 1e-4


def test_scored_kinds_evict_differently(tiny):
    """The rule is what differs: same schedule, different tokens held, different NLL."""
    ids = [_stream(2)]
    nlls = {}
    for kind in ("h2o", "tova", "knorm", "random", "sink"):
        policy = Policy.from_dict(dict(type=kind, n_sink=4, window_size=20, compress_every=4))
        nlls[kind] = run_cells(tiny, ids, policy, warmup=0)[0].nll
    kinds = list(nlls)
    for i, a in enumerate(kinds):
        for b in kinds[i + 1 :]:
            assert not np.array_equal(nlls[a], nlls[b]), (a, b)


def test_recent_must_fit_the_window():
    with pytest.raises(Exception, match="recent=30 exceeds window_size=20"):
        Policy.from_dict(dict(type="h2o", n_sink=4, window_size=20, recent=30))
