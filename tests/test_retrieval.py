"""Retrieval: the prompt generator (determinism, exact length, depth) and the answer's scoring.

Tiny random models cannot find a pass key; these tests check the mechanics: the prompt, the exact-match
rule, the answer's log-probability against a plain full forward, batching, and the command's JSON.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kvstream.cli import main as cli_main
from kvstream.errors import KVStreamError
from kvstream.retrieval import answer_batch, run_retrieval
from kvstream.retrieval_tasks import TASKS, exact_match, make_prompt, split_sentences
from kvstream.schedule import Policy
from kvstream.texts import write_documents
from kvstream.tiny import build_tiny_model, byte_tokenizer

SMOLLM2 = Path(__file__).resolve().parents[1] / "results" / "models" / "smollm2-135m"
N = 260  # the passkey prompt needs ~240 byte tokens without filler


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def documents(tmp_path_factory):
    path = tmp_path_factory.mktemp("docs") / "documents.jsonl"
    text = "Chapter 1\n\n" + " ".join(f"Sentence number {i} says little of note." for i in range(60))
    write_documents([{"id": "a", "title": "A", "text": text},
                     {"id": "b", "title": "B", "text": "Heading\n\nThe rain falls. The wind blows! Does it?\n\n"}], path)
    return path


def tokenizers():
    out = [byte_tokenizer()]
    if (SMOLLM2 / "tokenizer.json").is_file():  # the pipeline's real model, when prepared here
        from transformers import AutoTokenizer

        out.append(AutoTokenizer.from_pretrained(SMOLLM2))
    return out


# --------------------------------------------------------------------------------------------------
# the generator


@pytest.mark.parametrize("task", ["passkey", "needle"])
def test_prompt_is_deterministic_and_seeded(tokenizer, documents, task):
    a = make_prompt(tokenizer, task, 400, 0.5, seed=3, documents=documents)
    b = make_prompt(tokenizer, task, 400, 0.5, seed=3, documents=documents)
    c = make_prompt(tokenizer, task, 400, 0.5, seed=4, documents=documents)
    assert a.input_ids == b.input_ids and a.answer == b.answer
    assert a.input_ids != c.input_ids and a.answer != c.answer
    assert len(a.answer) == 5 and a.answer.isdigit()
    # the seed alone decides the key: another length and depth ask for the same one
    assert make_prompt(tokenizer, task, 500, 0.2, seed=3, documents=documents).answer == a.answer


@pytest.mark.parametrize("tok", tokenizers(), ids=lambda t: type(t).__name__)
@pytest.mark.parametrize("length", [300, 517, 1024])
def test_prompt_length_and_depth(tok, length):
    for depth in (0.0, 0.1, 0.5, 0.9, 1.0):
        p = make_prompt(tok, "passkey", length, depth, seed=1)
        assert len(p.input_ids) == length  # exactly: prompts of one length form a batch
        start, end = p.key_span
        text = tok.decode(p.input_ids[start:end])
        assert text.strip() == f"The pass key is {p.answer}. Remember it. {p.answer} is the pass key."
        assert tok.decode([p.input_ids[i] for i in p.key_positions]).replace(" ", "") == p.answer * 2
        assert tok.decode(p.input_ids).endswith("What is the pass key? The pass key is")
        # the needle sits at the filler's sentence boundary nearest the depth: within half a sentence
        longest = max(len(tok(" " + s, add_special_tokens=False)["input_ids"]) for s in TASKS["passkey"].filler)
        assert abs(p.key_depth - depth) * p.filler_tokens <= longest / 2, (depth, p.key_depth)
        assert tok.decode(p.answer_ids).strip() == p.answer


def test_needle_prompt(tokenizer, documents):
    p = make_prompt(tokenizer, "needle", 600, 0.5, seed=0, documents=documents)
    assert len(p.input_ids) == 600
    text = tokenizer.decode(p.input_ids)
    assert f"The special magic number is {p.answer}." in text and "Sentence number" in text
    assert "Chapter 1" not in text and "Heading" not in text  # headings are not filler
    assert text.endswith("What is the special magic number? The special magic number is")
    # the seed moves where the natural filler starts
    starts = {tuple(make_prompt(tokenizer, "needle", 600, 0.5, seed=s, documents=documents).input_ids[:40]) for s in range(4)}
    assert len(starts) > 1
    with pytest.raises(KVStreamError, match="--documents"):
        make_prompt(tokenizer, "needle", 600, 0.5, seed=0)


def test_prompt_errors(tokenizer):
    with pytest.raises(KVStreamError, match="at least"):
        make_prompt(tokenizer, "passkey", 100, 0.5, seed=0)
    with pytest.raises(KVStreamError, match="outside"):
        make_prompt(tokenizer, "passkey", 400, 1.5, seed=0)
    with pytest.raises(KVStreamError, match="passkey"):
        make_prompt(tokenizer, "haystack", 400, 0.5, seed=0)


def test_split_sentences():
    assert split_sentences("Genesis\n\nChapter 1\n\nIn the beginning. And then\nmore: yes! Why?") == [
        "In the beginning.", "And then more: yes!", "Why?"]


def test_exact_match():
    assert exact_match(" 12345. Remember", "12345")
    assert exact_match("12345", "12345")
    assert exact_match("\n 12345 is", "12345")
    assert not exact_match(" 123456", "12345")  # a longer number is another number
    assert not exact_match(" 1234", "12345")
    assert not exact_match(" The pass key is 12345", "12345")


# --------------------------------------------------------------------------------------------------
# the evaluation


@pytest.fixture(scope="module", params=["llama", "gpt_neox"])
def tiny(request):
    model, tok = build_tiny_model(request.param)
    return model, tok


def full_forward_logprob(model, prompt) -> float:
    ids = torch.tensor(prompt.input_ids + prompt.answer_ids)[None]
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    n = len(prompt.input_ids)
    return sum(logp[n - 1 + j, a].item() for j, a in enumerate(prompt.answer_ids))


@pytest.mark.parametrize("policy", [{"type": "dense", "cap": 512}, {"type": "dense", "cap": 64},
                                    {"type": "recompute", "cap": N + 16}])
def test_answer_logprob_is_a_full_forward(tiny, policy):
    model, tok = tiny
    prompts = [make_prompt(tok, "passkey", N, d, seed=s) for d, s in ((0.2, 0), (0.8, 1))]
    results = answer_batch(model, tok, prompts, Policy.from_dict(policy))
    for p, r in zip(prompts, results):
        assert r.answer_logprob == pytest.approx(full_forward_logprob(model, p), abs=1e-4)
        # greedy: each generated token is the argmax of a full forward over the prompt and what came before
        ids = torch.tensor(p.input_ids + r.generated_ids)[None]
        with torch.no_grad():
            best = model(ids).logits[0, N - 1 : -1].argmax(-1).tolist()
        assert r.generated_ids == best
        assert r.as_dict()["key_in_cache"] and r.prefill_len == min(policy["cap"], N)


SCORED = [{"type": t, "n_sink": 4, "window_size": 40} for t in ("h2o", "tova", "knorm", "random")]


@pytest.mark.parametrize("policy", [{"type": "sink", "n_sink": 4, "window_size": 40},
                                    {"type": "window", "window_size": 44, "budget_mode": "cap", "cap": 45},
                                    {"type": "recompute", "cap": 44}] + SCORED,
                         ids=lambda p: p["type"])
def test_every_policy_streams_and_answers(tiny, policy):
    model, tok = tiny
    prompts = [make_prompt(tok, "passkey", N, d, seed=0) for d in (0.0, 1.0)]
    policy = Policy.from_dict(policy)
    batched = answer_batch(model, tok, prompts, policy, new_tokens=3)
    for r in batched:
        assert len(r.generated_ids) == 3 and np.isfinite(r.answer_logprob) and r.answer_logprob < 0
        assert len(r.held_at_question) <= policy.max_forward_len
        assert r.prefill_len == policy.prefill_len(N)
    # the needle at depth 0 left the window long before the question
    if policy.type in ("sink", "window", "recompute"):
        assert batched[0].as_dict()["key_tokens_held"] == 0
    # a batch row is a one-prompt run (the schedule does not depend on content; scored kinds choose per row)
    if policy.type != "random":  # random draws from (seed, batch row): another row, other draws
        alone = answer_batch(model, tok, prompts[1:], policy, new_tokens=3)[0]
        assert alone.answer_logprob == pytest.approx(batched[1].answer_logprob, abs=1e-4)
        assert alone.held_at_question == batched[1].held_at_question


def test_run_retrieval_groups_by_length(tiny):
    model, tok = tiny
    prompts = [make_prompt(tok, "passkey", n, 0.5, seed=s) for n, s in ((N, 0), (N + 8, 0), (N, 1))]
    lines = []
    results = run_retrieval(model, tok, prompts, Policy.from_dict({"type": "dense", "cap": 512}), max_batch=1,
                            log=lines.append)
    assert [r.prompt for r in results] == prompts and len(lines) == 3
    with pytest.raises(KVStreamError, match="one token length"):
        answer_batch(model, tok, prompts[:2], Policy.from_dict({"type": "dense", "cap": 512}))


# --------------------------------------------------------------------------------------------------
# the command


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from kvstream.models import prepare_model

    out = tmp_path_factory.mktemp("models") / "tiny-llama"
    prepare_model("embedded:tiny-llama", out)
    return out


def run(argv):
    with pytest.raises(SystemExit) as exc:
        cli_main(argv)
    return exc.value.code


def test_command_writes_json(model_dir, documents, tmp_path):
    out = tmp_path / "r" / "passkey.json"
    policy = '{"type": "sink", "n_sink": 4, "window_size": 60}'
    argv = ["retrieval", "--model", str(model_dir), "--policy-json", policy, "--lengths", str(N), "--depths", "0.1", "0.9",
            "--prompts-per-cell", "2", "--threads", "1", "--label", "policy=sink", "--out", str(out)]
    assert run(argv) == 0
    record = json.loads(out.read_text())
    assert record["policy"]["type"] == "sink" and record["policy"]["budget"] == 64
    assert record["run"] == {"policy": "sink"} and record["task"]["seeds"] == [0, 1]
    assert len(record["prompts"]) == 4 and len(record["summary"]) == 2
    row = record["prompts"][0]
    for key in ("exact", "answer_logprob", "generated", "key_span", "key_in_cache", "length", "depth", "seed"):
        assert key in row
    assert record["provenance"]["config_hash"] and record["provenance"]["model"] == str(model_dir)
    assert not list(out.parent.glob(".*.tmp"))  # written atomically

    needle = tmp_path / "needle.json"
    assert run(["retrieval", "--model", str(model_dir), "--policy-json", '{"type": "dense", "cap": 512}', "--task",
                "needle", "--documents", str(documents), "--lengths", "200", "--depths", "0.5", "--threads", "1",
                "--out", str(needle)]) == 0
    assert json.loads(needle.read_text())["task"]["documents_sha256"]
    # needle without its filler: refused before the model loads
    assert run(["retrieval", "--model", str(model_dir), "--policy-json", '{"type": "dense", "cap": 512}', "--task",
                "needle", "--lengths", "200", "--depths", "0.5", "--out", str(needle)]) == 2
