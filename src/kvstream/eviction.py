"""Policy kinds: which tokens an eviction event removes (docs/method.md, "The cache").

The cache (`kvstream.cache.StreamingCache`) is the mechanism: it owns the slots, buffers, positions
and the schedule (when an event happens and how many tokens it removes). A policy kind is a small
`EvictionRule` that makes the one remaining decision.
"""

from __future__ import annotations

import numpy as np

from kvstream.schedule import Policy


class EvictionRule:
    """Which tokens an event removes: the one decision a policy kind owns.

    The cache (the mechanism: slots, buffers, rotation, the schedule of docs/method.md) decides when
    an event happens and how many tokens it removes; `select` returns the slots of the tokens to
    remove, never a sink (the first n_sink tokens). A rule whose choice keeps the window a
    contiguous run of the most recent tokens sets `contiguous_window` (cache-relative positions then
    only need the sinks re-rotated).
    """

    contiguous_window = True

    def __init__(self, policy: Policy):
        self.policy = policy

    def select(self, cache, n: int) -> np.ndarray:
        """Slots (of cache.slots, among the first cache.length) of the n tokens to remove."""
        raise NotImplementedError


class OldestFirst(EvictionRule):
    """window and sink (StreamingLLM): the n oldest non-sink tokens."""

    def select(self, cache, n):
        return cache.slots.slots_of(cache.first_window, n, cache.length)


# policy type -> its rule (types without eviction have none)
EVICTION_RULES: dict[str, type[EvictionRule]] = {"window": OldestFirst, "sink": OldestFirst}
