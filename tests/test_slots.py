"""The slot planner alone (no torch): driven by the pure schedule, it keeps exactly the tokens the
policy must keep, packed into slots 0 .. L-1, and moves at most the evicted count per event."""

import numpy as np
import pytest

from kvstream.schedule import Policy, cache_lengths, eviction_size
from kvstream.slots import SlotTable

POLICIES = [
    Policy("sink", n_sink=4, window_size=28, compress_every=1),
    Policy("sink", n_sink=4, window_size=28, compress_every=8, cache_slack=2, max_drop=3),
    Policy("sink", n_sink=0, window_size=16, compress_every=5, cache_slack=7, max_drop=None),
    Policy("window", window_size=20),
]


def _simulate(policy: Policy, n_tokens: int):
    """Stream n_tokens through a SlotTable the way StreamingCache does (oldest non-sink tokens go)."""
    policy = policy.resolved()
    table = SlotTable(policy.max_forward_len)
    prefill = policy.prefill_len(n_tokens)
    table.append(0, 0, prefill)
    length, first_window, lengths, moves = prefill, min(prefill, policy.n_sink), [], []
    for token in range(prefill, n_tokens - 1):
        n = eviction_size(length, policy.budget, policy.compress_every, policy.cache_slack, policy.max_drop)
        if n:
            plan = table.plan(table.slots_of(first_window, n, length), length)
            assert len(plan.holes) == len(plan.movers) <= n
            table.commit(plan)
            length, first_window = plan.length, first_window + n
        table.append(length, token, 1)
        length += 1
        lengths.append(length)
        held = table.slot_token[:length]
        assert (held >= 0).all() and (table.slot_token[length:] == -1).all()  # packed
        expected = list(range(min(policy.n_sink, token + 1))) + list(range(first_window, token + 1))
        assert sorted(held.tolist()) == expected
    return lengths


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: f"{p.type}-R{p.compress_every}")
def test_slot_table_follows_the_schedule(policy):
    assert _simulate(policy, 300) == cache_lengths(policy, 300)


def test_plan_fills_lowest_holes_from_the_tail():
    table = SlotTable(8)
    table.append(0, 0, 8)
    plan = table.plan(np.array([5, 1, 2]), 8)
    assert plan.length == 5
    assert plan.holes.tolist() == [1, 2] and plan.movers.tolist() == [6, 7]
    table.commit(plan)
    assert table.slot_token.tolist() == [0, 6, 7, 3, 4, -1, -1, -1]
    assert table.held_tokens(5) == [0, 3, 4, 6, 7]
