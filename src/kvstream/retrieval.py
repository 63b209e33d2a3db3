"""Retrieval under a policy: stream a prompt through the cache, then answer greedily (docs/method.md, "Retrieval").

The prompt goes through `kvstream.decode.Decoder` as a quality cell's tokens do: a prefill of the
policy's prefill length, then one token per step, so eviction happens inside the context. At the end
of the prompt the decoder is forked (a deep copy of its cache): the copy is fed the correct answer's
tokens (teacher forcing: the answer's log-probability), the original its own greedy choices (exact
match). Both start from the same cache state. Prompts of one length run as one batch (the schedule
does not depend on content; the scored kinds choose per row).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import numpy as np
import torch

from kvstream.decode import Decoder
from kvstream.errors import KVStreamError
from kvstream.graphs import decode_context
from kvstream.retrieval_tasks import RetrievalPrompt, exact_match
from kvstream.schedule import Policy


@dataclass
class RetrievalResult:
    prompt: RetrievalPrompt
    generated_ids: list[int]
    generated: str
    exact: bool
    answer_logprob: float  # sum over the answer's tokens, teacher-forced
    held_at_question: list[int]  # prompt tokens the last prompt forward attended over
    prefill_len: int

    def as_dict(self) -> dict:
        p = self.prompt
        held = set(self.held_at_question)
        key_held = sum(k in held for k in p.key_positions)
        return {
            "length": p.length, "depth": p.depth, "seed": p.seed, "answer": p.answer,
            "exact": self.exact, "answer_logprob": self.answer_logprob,
            "answer_tokens": len(p.answer_ids), "generated": self.generated, "generated_ids": self.generated_ids,
            "key_span": list(p.key_span), "key_positions": p.key_positions, "key_depth": p.key_depth,
            "filler_tokens": p.filler_tokens,
            # the key's tokens that the question still attends to (the cache's held tokens, or recompute's window)
            "key_tokens_held": key_held, "key_in_cache": key_held == len(p.key_positions),
            "tokens_held_at_question": len(self.held_at_question), "prefill_len": self.prefill_len,
        }


def _fork(decoder: Decoder, ids: torch.Tensor) -> Decoder:
    """A second decoder over `ids` from the same state: the model shared, the cache copied."""
    twin = copy.copy(decoder)
    twin.ids = ids
    twin.cache = copy.deepcopy(decoder.cache)
    return twin


def _held(decoder: Decoder, row: int, n: int) -> list[int]:
    """Token indices the last forward attended over: the cache's held tokens, or recompute's window."""
    cache = decoder.cache
    if cache is None:
        return list(range(max(0, n - decoder.policy.cap), n))
    return sorted(cache.held_tokens(row) if decoder.policy.scored else cache.held_tokens())


def answer_batch(model, tokenizer, prompts: list[RetrievalPrompt], policy: Policy,
                 new_tokens: int | None = None) -> list[RetrievalResult]:
    """Evaluate equal-length prompts as one batch under `policy` (the model already on its device).

    new_tokens: greedy tokens generated (default: the longest answer's token count + 2)."""
    policy = policy.resolved()
    lengths = {p.length for p in prompts}
    if len(lengths) != 1 or any(len(p.input_ids) != p.length for p in prompts):
        raise KVStreamError(f"a retrieval batch needs prompts of one token length, got {sorted(lengths)}")
    n = lengths.pop()
    answer_len = max(len(p.answer_ids) for p in prompts)
    new_tokens = answer_len + 2 if new_tokens is None else new_tokens
    if new_tokens < 1:
        raise KVStreamError(f"new_tokens must be >= 1, got {new_tokens}")
    device = next(model.parameters()).device
    batch = len(prompts)
    ids = torch.zeros(batch, n + new_tokens, dtype=torch.long, device=device)
    ids[:, :n] = torch.tensor([p.input_ids for p in prompts], device=device)
    # the correct answers, padded with their last token (a padded row's later logits are not read)
    answers = torch.tensor([p.answer_ids + p.answer_ids[-1:] * (answer_len - len(p.answer_ids)) for p in prompts],
                           device=device)
    valid = torch.tensor([[j < len(p.answer_ids) for j in range(answer_len)] for p in prompts], device=device)
    prefill = policy.prefill_len(n)
    with torch.inference_mode(), decode_context(device):  # eager SDPA backends on CUDA, as the eval loop
        decoder = Decoder(model, policy, ids, reserve=n + new_tokens if policy.type == "dense" else None)
        logits = decoder.prefill(prefill)[:, -1].clone()  # not a view that keeps the [batch, P, V] logits alive
        for _ in range(prefill, n):
            logits = decoder.step()
        held = [_held(decoder, b, n) for b in range(batch)]

        forced = _fork(decoder, torch.cat([ids[:, :n], answers], dim=1))
        logprob = torch.zeros(batch, answer_len, dtype=torch.float64, device=device)
        step_logits = logits
        for j in range(answer_len):
            if j:
                step_logits = forced.step()
            logprob[:, j] = torch.log_softmax(step_logits.float(), dim=-1).gather(1, answers[:, j : j + 1])[:, 0]
        del forced
        answer_logprob = (logprob * valid).sum(dim=1).cpu().tolist()

        for i in range(new_tokens):
            ids[:, n + i] = logits.argmax(dim=-1)
            if i + 1 < new_tokens:
                logits = decoder.step()
    generated = ids[:, n:].cpu().tolist()
    results = []
    for b, p in enumerate(prompts):
        text = tokenizer.decode(generated[b], skip_special_tokens=True)
        results.append(RetrievalResult(prompt=p, generated_ids=generated[b], generated=text,
                                       exact=exact_match(text, p.answer), answer_logprob=float(answer_logprob[b]),
                                       held_at_question=held[b], prefill_len=prefill))
    return results


def run_retrieval(model, tokenizer, prompts: list[RetrievalPrompt], policy: Policy, *, new_tokens: int | None = None,
                  max_batch: int | None = None, log=None) -> list[RetrievalResult]:
    """Every prompt under `policy`, those of one length batched (at most max_batch rows), in input order."""
    if max_batch is not None and max_batch < 1:
        raise KVStreamError(f"--max-batch must be >= 1, got {max_batch}")
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(p.length, []).append(i)
    results: list[RetrievalResult | None] = [None] * len(prompts)
    for length, index in by_length.items():
        size = max_batch or len(index)
        for lo in range(0, len(index), size):
            chunk = index[lo : lo + size]
            t0 = time.perf_counter()
            for i, r in zip(chunk, answer_batch(model, tokenizer, [prompts[i] for i in chunk], policy, new_tokens)):
                results[i] = r
            if log is not None:
                hits = sum(results[i].exact for i in chunk)
                log(f"{policy.type} length {length}: {hits}/{len(chunk)} exact ({time.perf_counter() - t0:.1f} s)")
    return results


def summarize(results: list[RetrievalResult]) -> list[dict]:
    """Per (length, depth): prompts, accuracy (exact matches / prompts), mean answer log-probability,
    and the share of prompts whose key was wholly in the cache at the question."""
    cells: dict[tuple[int, float], list[RetrievalResult]] = {}
    for r in results:
        cells.setdefault((r.prompt.length, r.prompt.depth), []).append(r)
    rows = []
    for (length, depth), rs in sorted(cells.items()):
        rows.append({
            "length": length, "depth": depth, "prompts": len(rs),
            "accuracy": float(np.mean([r.exact for r in rs])),
            "mean_answer_logprob": float(np.mean([r.answer_logprob for r in rs])),
            "key_in_cache": float(np.mean([r.as_dict()["key_in_cache"] for r in rs])),
        })
    return rows
