"""The pure schedule function and policy validation."""

import pytest
from hypothesis import given, settings, strategies as st

from kvstream.errors import KVStreamError
from kvstream.schedule import Policy, cache_lengths, eviction_events, eviction_size


def test_mit_streaming_is_eager_and_flat():
    policy = Policy("sink", n_sink=4, window_size=2044, compress_every=1)
    lengths = cache_lengths(policy, 5000)
    assert len(lengths) == 5000 - 1 - 2048
    assert set(lengths) == {2049}  # C + 1 every step: one token in, one out


def test_lazy_pruning_sawtooth():
    policy = Policy("sink", n_sink=4, window_size=12, compress_every=4)
    # prefill 16 = C; then 17, 18, 19, 20 (overflow 4 >= R: event back to C) 17, ...
    assert cache_lengths(policy, 30)[:6] == [17, 18, 19, 20, 17, 18]


def test_slack_and_max_drop_spread_a_drop():
    # C = 16, R = 8, sigma = 4, delta = 2: at overflow 8 an event removes max(min(8, 2), 24 - 20) = 4
    assert eviction_size(24, 16, 8, 4, 2) == 4
    # without slack delta changes nothing: max(min(8, 2), 8) = 8
    assert eviction_size(24, 16, 8, 0, 2) == 8
    assert eviction_size(23, 16, 8, 4, 2) == 0  # overflow 7 < R


def test_eager_with_slack_ignores_slack():
    # R = 1: every event sees overflow 1 and removes min(1, delta) = 1 token (method.md: "Ours (Eager)")
    eager = Policy("sink", n_sink=32, window_size=2016, compress_every=1, cache_slack=16, max_drop=32)
    assert set(cache_lengths(eager, 4000)) == {2049}


def test_budget_mode_cap_matches_peak():
    policy = Policy("sink", n_sink=32, compress_every=64, cache_slack=16, max_drop=32, budget_mode="cap", cap=2048).resolved()
    assert policy.window_size == 2048 - 32 - 64
    assert max(cache_lengths(policy, 6000)) == 2048


def test_recompute_and_dense_lengths():
    assert cache_lengths(Policy("recompute", cap=8), 12) == [8, 8, 8]
    assert cache_lengths(Policy("dense", cap=8), 12) == [9, 10, 11]


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(type="sink", n_sink=-1, window_size=8), "n_sink"),
        (dict(type="sink", n_sink=4, window_size=0), "window_size"),
        (dict(type="sink", n_sink=4, window_size=8, compress_every=0), "compress_every"),
        (dict(type="sink", n_sink=4, window_size=8, cache_slack=-2), "cache_slack"),
        (dict(type="sink", n_sink=4, window_size=8, max_drop=-1), "max_drop"),
        (dict(type="sink", n_sink=4, budget_mode="cap", cap=8, compress_every=4), "cap"),
        (dict(type="sink", n_sink=4, budget_mode="cap"), "cap"),
        (dict(type="recompute"), "cap"),
        (dict(type="lru", window_size=8), "policy type"),
        (dict(type="sink", n_sink=4, window_size=8, positions="rotated"), "positions"),
        (dict(type="sink", n_sink=4, window_size=8, budget_mode="peak"), "budget_mode"),
        (dict(type="sink", n_sink=4, window_size=8.5), "window_size"),
    ],
)
def test_bad_parameters_name_the_field(kwargs, field):
    with pytest.raises(KVStreamError, match=field):
        Policy(**kwargs).resolved()


policies = st.builds(
    lambda s, w, r, sigma, delta: Policy("sink", n_sink=s, window_size=w, compress_every=r, cache_slack=sigma, max_drop=delta),
    st.integers(0, 8), st.integers(1, 24), st.integers(1, 12), st.integers(0, 10), st.one_of(st.none(), st.integers(0, 12)),
)


@settings(max_examples=300, deadline=None)
@given(policy=policies, n_tokens=st.integers(2, 200))
def test_schedule_invariants(policy, n_tokens):
    budget = policy.budget
    lengths = cache_lengths(policy, n_tokens)
    assert len(lengths) == max(n_tokens - 1 - policy.prefill_len(n_tokens), 0)
    assert all(length <= policy.max_forward_len for length in lengths)
    previous = policy.prefill_len(n_tokens)
    for step, length in enumerate(lengths):
        removed = previous + 1 - length
        if removed:
            after_event = previous - removed
            assert budget <= after_event <= budget + policy.cache_slack
            assert previous - budget >= policy.compress_every  # only when overflow >= R
        previous = length
    assert [s for s, _ in eviction_events(policy, n_tokens)] == [
        i for i, length in enumerate(lengths) if length <= (lengths[i - 1] if i else policy.prefill_len(n_tokens))
    ]
