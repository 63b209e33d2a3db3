"""Which token each cache slot holds, and how an eviction keeps the held tokens packed (no torch).

A cache of length L keeps its tokens in slots 0 .. L-1, not in arrival order. An event that removes
n tokens leaves holes; the slots at or above the new length L - n that still hold kept tokens
("movers") are moved into the holes below it, lowest hole first. So an event copies at most n key
and value rows, never the whole cache (docs/method.md, "The cache"). Single-query attention does
not depend on key order; a multi-token chunk is appended in order at the end, which keeps its
causal mask right.

`SlotTable` owns this bookkeeping as plain integers; the cache applies a `SlotPlan` to its device
buffers (index_copy of movers into holes) and then commits it here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SlotPlan:
    """One event's moves: the kept tokens in slots `movers` go to slots `holes` (same order)."""

    evicted: np.ndarray  # slots whose tokens are removed, ascending
    holes: np.ndarray  # evicted slots below the new length, ascending
    movers: np.ndarray  # slots at or above the new length that hold kept tokens, ascending
    length: int  # tokens held after the event


class SlotTable:
    """slot -> absolute token index (-1: free) for one cache; all layers and rows share it."""

    def __init__(self, capacity: int = 1):
        self.slot_token = np.full(max(capacity, 1), -1, dtype=np.int64)

    @property
    def capacity(self) -> int:
        return len(self.slot_token)

    def grow(self, capacity: int) -> None:
        if capacity > self.capacity:
            grown = np.full(capacity, -1, dtype=np.int64)
            grown[: self.capacity] = self.slot_token
            self.slot_token = grown

    def clear(self) -> None:
        self.slot_token[:] = -1

    def plan(self, evicted: np.ndarray, length: int) -> SlotPlan:
        """The moves that remove the tokens in slots `evicted` from a cache holding `length` tokens."""
        evicted = np.sort(np.asarray(evicted, dtype=np.int64))
        new_length = length - len(evicted)
        keep = np.ones(length, dtype=bool)
        keep[evicted] = False
        tail = np.arange(new_length, length)
        return SlotPlan(evicted=evicted, holes=evicted[evicted < new_length], movers=tail[keep[tail]], length=new_length)

    def commit(self, plan: SlotPlan) -> None:
        """Record plan's moves (after the device buffers were moved the same way)."""
        self.slot_token[plan.holes] = self.slot_token[plan.movers]
        self.slot_token[plan.length :] = -1  # each of these tokens moved down or was evicted

    def append(self, length: int, first_token: int, count: int) -> None:
        """Tokens first_token .. first_token + count - 1 go to slots length .. length + count - 1."""
        self.slot_token[length : length + count] = np.arange(first_token, first_token + count)

    def release(self, slot: int) -> None:
        self.slot_token[slot] = -1

    def slots_of(self, first_token: int, count: int, length: int) -> np.ndarray:
        """Slots (among the first `length`) holding tokens first_token .. first_token + count - 1."""
        held = self.slot_token[:length]
        return np.nonzero((held >= first_token) & (held < first_token + count))[0]

    def held_tokens(self, length: int) -> list[int]:
        """Absolute indices of the held tokens, in arrival order."""
        return sorted(int(t) for t in self.slot_token[:length] if t >= 0)
