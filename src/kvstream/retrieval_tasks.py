"""Retrieval prompts: passkey and needle, seeded, offline, built to an exact token count (no torch).

docs/method.md, "Retrieval". A prompt is head + filler (with the needle inserted at a sentence boundary
at the requested depth) + question, assembled from separately tokenized pieces, so its length in the
model's tokens is exactly the target and the needle's token span is known by construction. The last
filler sentence is cut at a token to fill the target exactly, which lets prompts of one length (any
depth, any seed) run as one batch.

- `passkey`: the standard repeated filler ("The grass is green. The sky is blue. ..."), a 5-digit key
  said twice in the needle, then "What is the pass key? The pass key is".
- `needle`: natural sentences from a documents.jsonl (kvstream.texts), starting at a seeded sentence,
  and one sentence-level fact ("The special magic number is NNNNN.").

The seed alone decides the key (and the needle's filler start), so the prompts of one seed at several
lengths and depths ask for the same key.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import numpy as np

from kvstream.errors import KVStreamError
from kvstream.texts import read_documents

KEY = "{key}"


@dataclass(frozen=True)
class TaskText:
    """The words of a task: `needle` holds KEY where the key goes."""

    head: str
    needle: str
    question: str
    filler: tuple[str, ...] = ()  # repeated filler sentences (passkey); empty: natural filler from documents


TASKS = {
    "passkey": TaskText(
        head=("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
              "I will quiz you about the important information there."),
        filler=("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again."),
        needle=f"The pass key is {KEY}. Remember it. {KEY} is the pass key.",
        question="What is the pass key? The pass key is",
    ),
    "needle": TaskText(
        head="",
        needle=f"The special magic number is {KEY}.",
        question="What is the special magic number? The special magic number is",
    ),
}


@dataclass
class RetrievalPrompt:
    """One prompt: token ids, the answer, and where the key sits."""

    task: str
    length: int
    depth: float  # requested, in [0, 1] of the filler
    seed: int
    input_ids: list[int]
    answer: str  # the key's digits
    answer_ids: list[int]  # the tokens that continue the question with the key (" NNNNN")
    key_span: tuple[int, int]  # [start, end) of the inserted needle in input_ids
    key_positions: list[int]  # indices of the key's own tokens (every mention)
    key_depth: float  # where the needle landed: its offset in the filler / filler_tokens
    filler_tokens: int


def encode(tokenizer, text: str, special: bool = False) -> list[int]:
    """Token ids of `text` (a transformers tokenizer); special: with the tokens it adds to a sequence (BOS)."""
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def make_key(seed: int) -> str:
    """The 5-digit key of a seed."""
    return str(int(np.random.default_rng(seed).integers(10_000, 100_000)))


def split_sentences(text: str) -> list[str]:
    """Sentences of prose: paragraphs that end like a sentence (headings such as "Chapter 1" are left
    out), split after . ! or ? followed by whitespace; whitespace inside a sentence becomes one space."""
    sentences = []
    for paragraph in re.split(r"\n\s*\n", text):
        paragraph = " ".join(paragraph.split())
        if not paragraph or paragraph[-1] not in ".!?\"'":
            continue
        sentences += [s for s in re.split(r"(?<=[.!?])\s+", paragraph) if s]
    return sentences


_SENTENCES: dict[str, list[str]] = {}


def natural_sentences(documents: str | os.PathLike) -> list[str]:
    """Every sentence of a documents.jsonl, in file order (read once per process)."""
    key = os.path.abspath(documents)
    if key not in _SENTENCES:
        sentences = [s for doc in read_documents(documents) for s in split_sentences(doc["text"])]
        if not sentences:
            raise KVStreamError(f"--documents {documents}: no prose sentences to use as needle filler")
        _SENTENCES[key] = sentences
    return _SENTENCES[key]


def _needle_pieces(text: TaskText, key: str) -> list[tuple[str, bool]]:
    """The needle as (text, is_key) pieces, each tokenized on its own; a key after a space takes the space."""
    parts = text.needle.split(KEY)
    pieces: list[tuple[str, bool]] = []
    for i, part in enumerate(parts):
        if i:
            spaced = pieces and pieces[-1][0].endswith(" ")
            if spaced:
                pieces[-1] = (pieces[-1][0].rstrip(" "), False)
            pieces.append(((" " if spaced else "") + key, True))
        if part:
            pieces.append(((" " if i == 0 else "") + part, False))
    return [p for p in pieces if p[0]]


def make_prompt(tokenizer, task: str, length: int, depth: float, seed: int,
                documents: str | os.PathLike | None = None) -> RetrievalPrompt:
    """The prompt of (task, length in tokens, depth in [0, 1], seed), exactly `length` tokens long.

    The needle goes to the sentence boundary of the filler nearest to depth x (filler tokens); the
    filler is cut at the token that makes the total exactly `length`."""
    if task not in TASKS:
        raise KVStreamError(f"--task {task!r}: use one of {', '.join(TASKS)}")
    if not 0.0 <= depth <= 1.0:
        raise KVStreamError(f"--depths: {depth} is outside [0, 1]")
    if seed < 0:
        raise KVStreamError(f"seed must be >= 0, got {seed}")
    text = TASKS[task]
    key = make_key(seed)
    head = encode(tokenizer, "", special=True) + (encode(tokenizer, text.head) if text.head else [])
    needle: list[int] = []
    key_offsets: list[int] = []
    for piece, is_key in _needle_pieces(text, key):
        ids = encode(tokenizer, piece)
        if is_key:
            key_offsets += range(len(needle), len(needle) + len(ids))
        needle += ids
    question = encode(tokenizer, " " + text.question)
    room = length - len(head) - len(needle) - len(question)
    if room < 0:
        raise KVStreamError(f"--lengths {length}: the {task} prompt needs at least "
                            f"{length - room} tokens without filler")
    filler, bounds = _filler(tokenizer, text, room, seed, documents)
    at = min(bounds, key=lambda b: (abs(b - depth * room), b))  # ties to the earlier boundary
    ids = head + filler[:at] + needle + filler[at:] + question
    start = len(head) + at
    assert len(ids) == length
    return RetrievalPrompt(task=task, length=length, depth=float(depth), seed=seed, input_ids=ids, answer=key,
                           answer_ids=encode(tokenizer, " " + key), key_span=(start, start + len(needle)),
                           key_positions=[start + k for k in key_offsets],
                           key_depth=at / room if room else 0.0, filler_tokens=room)


def _filler(tokenizer, text: TaskText, room: int, seed: int, documents) -> tuple[list[int], list[int]]:
    """`room` filler tokens and the sentence boundaries inside them (offsets 0 .. room)."""
    if text.filler:
        sentences, start = list(text.filler), 0
    else:
        if documents is None:
            raise KVStreamError("the needle task takes its filler from a documents.jsonl: give --documents")
        sentences = natural_sentences(documents)
        start = int(np.random.default_rng([seed, 1]).integers(len(sentences)))
    encoded: dict[int, list[int]] = {}
    ids: list[int] = []
    bounds = [0]
    i = start
    while len(ids) < room:
        j = i % len(sentences)
        if j not in encoded:
            encoded[j] = encode(tokenizer, " " + sentences[j])
        ids += encoded[j]
        bounds.append(min(len(ids), room))
        i += 1
    return ids[:room], bounds


def exact_match(generated: str, answer: str) -> bool:
    """The generated text, stripped, starts with the answer's digits and no further digit follows
    ("123456" does not answer "12345")."""
    text = generated.strip()
    return text.startswith(answer) and not text[len(answer) : len(answer) + 1].isdigit()
