"""The two sides of benchmarks/kvpress/compare.py: kvstream's sink cache (main env, transformers 5.24) and
kvpress 0.5.5's decode-time StreamingLLM (.venv-kvpress, transformers 5.2). Each side is driven the same way:
a prefill of C tokens, then one token per step at its absolute position, recording per-target NLL and which
original token positions every forward attended over (`held`), or timing steps against its own dense floor.

kvpress is imported only inside the kvpress functions: the main env does not have it.
"""

from __future__ import annotations

import contextlib

import torch


def nll_of(logits: torch.Tensor, targets: torch.Tensor) -> list[float]:
    """Per-target NLL (nats) of logits [n, V] for targets [n]."""
    return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none").tolist()


# --- ours ------------------------------------------------------------------------------------------


class OursRun:
    """kvstream: `sink` (S = 4, W = C - 4, compress_every R, no slack or max-drop, absolute positions), `dense`
    for the run without eviction, or the floor (dense held at `floor_len` tokens, rolled back each step)."""

    def __init__(self, model, ids: torch.Tensor, budget: int, rate: int | None, floor_len: int | None = None):
        from kvstream.decode import Decoder
        from kvstream.schedule import Policy

        if floor_len is not None:
            policy = Policy("dense", cap=floor_len)
        elif rate is None:
            policy = Policy("dense", cap=ids.shape[-1])
        else:
            policy = Policy("sink", n_sink=4, window_size=budget - 4, compress_every=rate, positions="absolute")
        self.decoder = Decoder(model, policy, ids[None], reserve=floor_len, hold=floor_len is not None)
        self.ids, self.events = ids, 0

    def prefill(self, length: int) -> list[float]:
        logits = self.decoder.prefill(length)[0]
        return nll_of(logits[:-1], self.ids[1:length])

    def step(self, clock=None) -> torch.Tensor:
        return self.decoder.step(clock)[0]

    def held(self) -> list[int]:
        return sorted(self.decoder.cache.held_tokens())

    def event_count(self) -> int:
        return self.decoder.counters()[0]

    def session(self):
        return contextlib.nullcontext()

    @property
    def position(self) -> int:
        return self.decoder.t


# --- kvpress ---------------------------------------------------------------------------------------


class KeptTracker:
    """Which original token position each slot of every layer's cache holds, through kvpress's compressions.

    Wraps the press's `compress` (the method its forward hook calls) without changing it: before, the slots
    hold the tracked positions plus the tokens appended since, in order; after, each output key row is found
    among the input rows (bitwise: a gather copies), which gives the kept positions in their new slot order."""

    def __init__(self, press, run: "KvpressRun"):
        self.run, self.slots, self.calls = run, {}, []
        inner = press.compress

        def compress(module, hidden_states, keys, values, attentions, kwargs):
            layer = module.layer_idx
            before = self.slots.get(layer, list(range(self.run.prefilled)))
            appended = keys.shape[2] - len(before)
            before = before + list(range(self.run.next_position - appended, self.run.next_position))
            out_keys, out_values = inner(module, hidden_states, keys, values, attentions, kwargs)
            rows = {keys[0, :, i].numpy().tobytes(): i for i in range(keys.shape[2])}
            after = [before[rows[out_keys[0, :, j].numpy().tobytes()]] for j in range(out_keys.shape[2])]
            if len(set(after)) != len(after):
                raise RuntimeError(f"layer {layer}: a kept key matched two input rows; cannot track positions")
            self.slots[layer] = after
            self.calls.append((layer, self.run.next_position - 1, before, after))
            return out_keys, out_values

        press.compress = compress  # the instance attribute shadows the method the hook calls


def sorted_streaming_press(n_sink: int):
    """kvpress's StreamingLLMPress with one change, for the diagnosis only: the kept indices are sorted before
    the gather, so kept tokens stay in arrival order (kvpress's ScorerPress.compress otherwise, line for line)."""
    from kvpress import StreamingLLMPress
    from kvpress.utils import compute_n_kept

    class SortedStreamingLLMPress(StreamingLLMPress):
        def compress(self, module, hidden_states, keys, values, attentions, kwargs):
            if self.compression_ratio == 0:
                return keys, values
            scores = self.score(module, hidden_states, keys, values, attentions, kwargs)
            n_kept = compute_n_kept(keys.shape[2], self.compression_ratio)
            indices = scores.topk(n_kept, dim=-1).indices.sort(dim=-1).values  # the one change
            indices = indices.unsqueeze(-1).expand(-1, -1, -1, module.head_dim)
            return keys.gather(2, indices).contiguous(), values.gather(2, indices).contiguous()

    return SortedStreamingLLMPress(n_sink=n_sink)


class KvpressRun:
    """kvpress: `DecodingPress(StreamingLLMPress(n_sink=4), compression_interval=R, target_size=C)` on a
    transformers DynamicCache, positions given absolutely (position_ids, as kvpress's own pipeline does);
    rate None: the same loop without a press; floor_len: a DynamicCache cropped back after each step."""

    def __init__(self, model, ids: torch.Tensor, budget: int, rate: int | None, floor_len: int | None = None,
                 sorted_keep: bool = False, track: bool = False):
        from transformers import DynamicCache

        self.model, self.ids, self.floor_len = model, ids, floor_len
        self.cache = DynamicCache()
        self.press = self.tracker = None
        self.prefilled = self.next_position = 0
        if rate is not None and floor_len is None:
            from kvpress import DecodingPress, StreamingLLMPress

            base = sorted_streaming_press(4) if sorted_keep else StreamingLLMPress(n_sink=4)
            self.press = DecodingPress(base, compression_interval=rate, target_size=budget)
            if track:
                self.tracker = KeptTracker(self.press, self)

    def session(self):
        """The press's hooks for a stretch of steps. Leaving resets the press's step counters, so a stretch must
        end right after a compression (checked)."""
        if self.press is None:
            return contextlib.nullcontext()
        return _press_session(self.press, self.model)

    def prefill(self, length: int) -> list[float]:
        ids = self.ids[None, :length]
        logits = self.model(input_ids=ids, past_key_values=self.cache,
                            position_ids=torch.arange(length)[None]).logits[0]
        self.prefilled = self.next_position = length
        return nll_of(logits[:-1], self.ids[1:length])

    def step(self, clock=None) -> torch.Tensor:
        t = self.next_position
        started = clock.start() if clock is not None else None
        self.next_position = t + 1  # read by the tracker inside the forward
        logits = self.model(input_ids=self.ids[None, t : t + 1], past_key_values=self.cache,
                            position_ids=torch.tensor([[t]])).logits[0, -1]
        if self.floor_len is not None:
            self.cache.crop(self.floor_len - 1)
        if clock is not None:
            clock.stop(started)
        return logits

    def held(self) -> list[int]:
        """Positions layer 0 attended over at the last step (its slots before the compression, if one ran)."""
        if self.tracker is not None and self.tracker.calls:
            layer, at, before, _ = next(c for c in reversed(self.tracker.calls) if c[0] == 0)
            if at == self.next_position - 1:
                return sorted(before)
        kept = self.tracker.slots.get(0) if self.tracker is not None else None
        if kept is None:
            return list(range(self.next_position))
        return sorted(kept + list(range(self.next_position - (self.cache.get_seq_length(0) - len(kept)),
                                        self.next_position)))

    def event_count(self) -> int:
        return 0 if self.tracker is None else sum(1 for c in self.tracker.calls if c[0] == 0)

    @property
    def position(self) -> int:
        return self.next_position


@contextlib.contextmanager
def _press_session(press, model):
    with press(model):
        yield
        pending = {layer: n for layer, n in press.layer_step_counts.items() if n}
        if pending:
            raise RuntimeError(f"a timed stretch ended between compressions (steps pending per layer: {pending}); "
                               "make it a whole number of compression intervals")
