"""Policy kinds: which tokens an eviction event removes (docs/method.md, "The cache").

The cache (`kvstream.cache.StreamingCache`) is the mechanism: it owns the slots, buffers, positions
and the schedule (when an event happens and how many tokens it removes). A policy kind is a small
`EvictionRule` that makes the one remaining decision.
"""

from __future__ import annotations

import numpy as np
import torch

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


class ScoreRule(EvictionRule):
    """Scored kinds (kvstream.scored.ScoredCache): per batch row, remove the n candidates that score
    lowest, ties to the older token; candidates are the held tokens that are neither sinks nor among
    the `recent` newest. Scores live per slot in cache.scores ([batch, capacity])."""

    contiguous_window = False
    needs_attention = False  # scores from attention (kvstream.scored.scoring)
    resets_scores = False  # each forward's attention replaces the scores (TOVA) instead of adding (H2O)
    prefill_column_sums = False  # the prefill adds every query's attention (H2O), not the last query's

    def candidates(self, cache, row: int) -> np.ndarray:
        tokens = cache.row_slots[row].slot_token[: cache.length]
        return np.nonzero((tokens >= cache.n_sink) & (tokens < cache.n_seen - self.policy.recent))[0]

    def row_scores(self, cache, row: int, slots: np.ndarray) -> np.ndarray:
        return cache.scores[row, : cache.length].cpu().numpy()[slots]

    def select_row(self, cache, row: int, n: int) -> np.ndarray:
        slots = self.candidates(cache, row)
        scores = self.row_scores(cache, row, slots)
        tokens = cache.row_slots[row].slot_token[slots]
        return slots[np.lexsort((tokens, scores))[:n]]


class H2O(ScoreRule):
    """H2O (Zhang et al. 2023): the attention each token has received since it arrived, prefill included."""

    needs_attention = True
    prefill_column_sums = True


class TOVA(ScoreRule):
    """TOVA (Oren et al. 2024): the attention of the newest query, averaged over heads (and layers)."""

    needs_attention = True
    resets_scores = True


class KeyNorm(ScoreRule):
    """Key-norm (Devoto et al. 2024): remove the keys with the largest L2 norm (summed over layers and
    heads; rotation does not change a norm, so the stored keys serve as they are)."""

    def row_scores(self, cache, row, slots):
        keys = cache.key_buffer[:, row, :, : cache.length].to(torch.float64)  # [layers, heads, L, dim]
        return -keys.norm(dim=-1).mean(dim=1).sum(dim=0).cpu().numpy()[slots]


class RandomChoice(ScoreRule):
    """The control: n candidates uniformly at random (drawn by their arrival order), from a generator
    seeded by (seed, row)."""

    def __init__(self, policy):
        super().__init__(policy)
        self.generators: dict[int, np.random.Generator] = {}  # one rule per cache: a fresh stream per run

    def select_row(self, cache, row, n):
        rng = self.generators.setdefault(row, np.random.default_rng([self.policy.seed, row]))
        slots = self.candidates(cache, row)
        slots = slots[np.argsort(cache.row_slots[row].slot_token[slots])]  # arrival order: layout-independent
        return np.sort(slots[rng.choice(len(slots), size=n, replace=False)])


# policy type -> its rule (types without eviction have none)
EVICTION_RULES: dict[str, type[EvictionRule]] = {"window": OldestFirst, "sink": OldestFirst, "h2o": H2O,
                                                 "tova": TOVA, "knorm": KeyNorm, "random": RandomChoice}
