"""Issue 13, phase 2: retrieval in the pipeline. The config check (every error names its field, before any
job), the report from hand-made result JSONs (rows, summary, table, macros, heatmap: exact values), the DAG
(one job per (task, policy), a library change reruns them and a comment does not, the switch off without
`retrieval.enabled`), and the rule's command on the tiny model writing a result the report reads."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from kvstream.codeversion import RETRIEVAL_ENTRY, code_version
from kvstream.config import ConfigError, check_config
from kvstream.errors import KVStreamError
from kvstream.pipeline import Plan
from kvstream.study import retrieval
from kvstream.study.retrieval_figures import retrieval_heatmap
from pipeline_helpers import DELETE, REPO, copy_repo, fake_complete, edited, load_config, planned_jobs, snakemake, write_config

SCHEMA = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())
DEFAULT = load_config(REPO / "config.yaml")
TINY = "config/tiny.yaml"


def checked(cfg: dict) -> dict:
    return check_config(cfg, SCHEMA)


# ------------------------------------------------------------------------------------------------
# the config check


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"retrieval.policies": ["dense", "h2o"]}, "config error: retrieval.policies[1]: unknown policy 'h2o'"),
        ({"retrieval.depths": [0.1, 1.5]}, "config error: retrieval.depths[1]: 1.5 is outside [0, 1]"),
        ({"retrieval.depths": [-0.1]}, "config error: retrieval.depths[0]: -0.1 is outside [0, 1]"),
        ({"retrieval.tasks": ["passkey", "needle"]}, "config error: retrieval.needle_dataset: missing"),
        ({"retrieval.tasks": ["needle"], "retrieval.needle_dataset": "pg19"},
         "config error: retrieval.needle_dataset: unknown dataset 'pg19' (datasets: kjv)"),
        ({"retrieval.lengths": [512, 256]}, "config error: retrieval.lengths[1]: policy window: too few tokens for the "
                                            "prefill: N=256 tokens but the prefill takes P=256"),
        ({"retrieval.lengths": [512, 250], "retrieval.policies": ["dense", "zoo_sink_r32"]},
         "config error: retrieval.lengths[1]: policy zoo_sink_r32: too few tokens for compress_every=32"),
        ({"retrieval.lengths": DELETE}, "config error: retrieval.lengths: missing (required field)"),
        ({"retrieval.tasks": ["passkey", "qa"]}, "config error: retrieval.tasks.1: 'qa' is not one of"),
        ({"retrieval.depth": [0.5]}, "config error: retrieval.depth: unknown field"),
        ({"retrieval.prompts_per_cell": 0}, "config error: retrieval.prompts_per_cell: 0 is less than the minimum of 1"),
    ],
    ids=["unknown-policy", "depth-above-1", "negative-depth", "needle-without-dataset", "needle-unknown-dataset",
         "length-within-prefill", "length-within-peak", "missing-lengths", "unknown-task", "unknown-key", "no-prompts"],
)
def test_config_errors_name_the_field(changes, message):
    with pytest.raises(ConfigError) as exc:
        checked(edited(DEFAULT, **changes))
    assert str(exc.value).startswith(message), str(exc.value)


def test_dense_and_recompute_may_take_a_prompt_in_one_prefill():
    # no eviction to exercise: a prompt within their cap is one prefill over every token, which is allowed
    cfg = checked(edited(DEFAULT, **{"retrieval.lengths": [200, 512], "retrieval.policies": ["dense", "recompute"]}))
    assert cfg["retrieval"]["lengths"] == [200, 512]


def test_without_the_section_retrieval_is_off_and_its_content_unchecked():
    cfg = checked(edited(DEFAULT, retrieval=DELETE))
    assert cfg["retrieval"] == {"enabled": False, "prompts_per_cell": 1}
    plan = Plan(cfg, use_cuda=False)
    assert plan.retrieval_results() == [] and not plan.retrieval_enabled
    off = checked(edited(DEFAULT, **{"retrieval.enabled": False, "retrieval.policies": ["nope"]}))
    assert Plan(off, use_cuda=False).retrieval_results() == []


def test_a_bad_retrieval_section_stops_snakemake_before_any_job(tmp_path):
    workdir = copy_repo(tmp_path / "repo")
    bad = write_config(workdir / "bad.yaml", edited(DEFAULT, **{"retrieval.depths": [0.5, 2]}))
    proc = snakemake(workdir, "--dry-run", "--cores", "1", "--configfile", str(bad), check=False)
    errors = [line for line in proc.stdout.splitlines() if line.startswith("config error:")]
    assert proc.returncode != 0 and errors == ["config error: retrieval.depths[1]: 2 is outside [0, 1] (0: the needle "
                                               "right after the instruction, 1: right before the question)"]
    assert "Job stats" not in proc.stdout


def test_the_plan_gives_the_jobs_their_grid_policy_and_code_version():
    plan = Plan(checked(DEFAULT), use_cuda=False)
    assert plan.retrieval_results() == [f"results/retrieval/smollm2-135m/passkey/{p}.json"
                                        for p in DEFAULT["retrieval"]["policies"]]
    grid = DEFAULT["retrieval"]
    assert shlex.split(plan.retrieval_grid_args()) == ["--lengths", *map(str, grid["lengths"]), "--depths",
                                                       *map(str, grid["depths"]), "--prompts-per-cell",
                                                       str(grid["prompts_per_cell"])]
    with_batch = Plan(checked(edited(DEFAULT, **{"retrieval.max_batch": 2})), use_cuda=False)
    assert shlex.split(with_batch.retrieval_grid_args())[-2:] == ["--max-batch", "2"]
    assert plan.retrieval_documents("passkey") == []
    assert plan.retrieval_labels() == {"dense": "Dense (no eviction)", "window": "Window (no sinks)"}
    assert plan.retrieval_policy_blocks()["zoo_h2o_r32"]["max_forward_len"] == 256
    assert plan.retrieval_code_version == code_version(RETRIEVAL_ENTRY)
    tiny = Plan(checked(load_config(REPO / TINY)), use_cuda=False)
    assert tiny.retrieval_documents("needle") == ["results/data/fixture/documents.jsonl"]


# ------------------------------------------------------------------------------------------------
# the report, from hand-made results

SINK = {"type": "sink", "n_sink": 4, "window_size": 220, "compress_every": 32, "cache_slack": 0, "max_drop": None,
        "budget_mode": "cap", "cap": 256, "positions": "relative", "budget": 224, "max_forward_len": 256}
H2O = dict(SINK, type="h2o", recent=64, seed=0)
DENSE = {"type": "dense", "n_sink": 0, "window_size": None, "compress_every": 1, "cache_slack": 0, "max_drop": None,
         "budget_mode": "fixed", "cap": 256, "positions": "relative", "budget": None, "max_forward_len": None}
VERSION = "abcd000000000000"


def prompt(length, depth, exact, held, logprob, tokens_held=None):
    return {"length": length, "depth": depth, "seed": 0, "answer": "12345", "exact": exact, "answer_logprob": logprob,
            "key_in_cache": held, "key_tokens_held": (12 if held else 0) if tokens_held is None else tokens_held,
            "generated": " 12345"}


def write_result(path: Path, policy: str, block: dict, prompts: list, task: str = "passkey", version: str = VERSION):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "run": {"model": "m", "task": task, "policy": policy, "code_version": version},
        "policy": block, "task": {"task": task, "documents": None}, "summary": [], "prompts": prompts,
        "provenance": {"code_version": version}}))
    return path


@pytest.fixture
def results(tmp_path):
    """Dense retrieves everywhere; the sink cache only where it held the key; H2O once without it."""
    dense = write_result(tmp_path / "dense.json", "dense", DENSE, [
        prompt(512, 0.1, True, True, -0.5), prompt(512, 0.1, True, True, -0.25),
        prompt(512, 0.9, True, True, -0.25), prompt(512, 0.9, True, True, -0.5)])
    sink = write_result(tmp_path / "sink.json", "zoo_sink_r32", SINK, [
        prompt(512, 0.1, False, False, -20.0), prompt(512, 0.1, False, False, -18.0),
        prompt(512, 0.9, True, True, -1.0), prompt(512, 0.9, False, True, -3.0)])
    h2o = write_result(tmp_path / "h2o.json", "zoo_h2o_r32", H2O, [
        prompt(512, 0.1, True, False, -4.0, tokens_held=6), prompt(512, 0.1, False, False, -16.0),
        prompt(512, 0.9, True, True, -2.0), prompt(512, 0.9, True, True, -2.0)])
    return [dense, sink, h2o]


LABELS = {"dense": "Dense (no eviction)"}
BLOCKS = {"dense": DENSE, "zoo_sink_r32": SINK, "zoo_h2o_r32": H2O}


def test_rows_count_exact_matches_held_keys_and_log_probabilities(results):
    rows = retrieval.cell_rows(retrieval.load_results(results, BLOCKS), LABELS)
    assert [(r["policy"], r["depth"]) for r in rows] == [("dense", 0.1), ("dense", 0.9), ("zoo_sink_r32", 0.1),
                                                         ("zoo_sink_r32", 0.9), ("zoo_h2o_r32", 0.1), ("zoo_h2o_r32", 0.9)]
    sink_deep = rows[3]
    assert (sink_deep["prompts"], sink_deep["exact"], sink_deep["held"], sink_deep["accuracy"]) == (2, 1, 2, 0.5)
    assert sink_deep["mean_answer_logprob"] == -2.0 and sink_deep["peak"] == 256
    assert [r["label"] for r in rows[::2]] == ["Dense (no eviction)", "Sink (StreamingLLM) R=32",
                                               "H2O (recent 64) R=32"]
    assert rows[0]["peak"] is None

    md = retrieval.summary_markdown(rows)
    assert "| Dense (no eviction) | 2/2 (2) | 2/2 (2) | -0.38 |" in md
    assert "| Sink (StreamingLLM) R=32 | 0/2 (0) | 1/2 (2) | -10.50 |" in md
    assert "| H2O (recent 64) R=32 | 1/2 (0) | 2/2 (2) | -6.00 |" in md
    csv_lines = retrieval.summary_csv(rows).splitlines()
    assert csv_lines[0] == ",".join(retrieval.SUMMARY_FIELDS)
    assert csv_lines[3] == "passkey,zoo_sink_r32,Sink (StreamingLLM) R=32,sink,256,False,512,0.1,2,0,0,0.0,-19.0"


def test_table_and_macros_print_the_counts(results):
    rows = retrieval.cell_rows(retrieval.load_results(results, BLOCKS), LABELS)
    table = retrieval.retrieval_table(rows)
    assert r"\label{tab:retrieval}" in table and r"\emph{Pass-key retrieval}" in table
    assert r"Dense (no eviction) & all & 512 & 2/2 (2) & 2/2 (2) & \textminus{}0.38 \\" in table
    assert r"Sink (StreamingLLM) R=32 & 256 & 512 & 0/2 (0) & 1/2 (2) & \textminus{}10.50 \\" in table
    assert r"Policy & Peak $L$ & Prompt $L$ & 0.1 & 0.9 & $\log p$ \\" in table

    text = retrieval.retrieval_macros(rows, {})
    macros = dict(re.findall(r"\\newcommand\{\\(\w+)\}\{(.*)\}$", text, flags=re.M))
    assert set(macros) == set(retrieval.MACROS)
    assert text.startswith(r"\newif\ifhaveRetrieval\haveRetrievaltrue")
    assert macros["RetrievalCellPrompts"] == "2 prompts" and macros["RetrievalPolicyPrompts"] == "4 prompts"
    assert macros["RetrievalNPrompts"] == "12" and macros["RetrievalDepths"] == "0.1 and 0.9"
    assert macros["RetrievalPeaks"] == "256" and macros["RetrievalTasks"] == "pass-key retrieval"
    assert macros["RetrievalReferenceSentence"] == ("Attending over the whole prompt: Dense (no eviction) answered "
                                                    "4/4 prompts exactly.")
    assert macros["RetrievalDepthSentence"] == ("With a bounded context, exact matches by depth: "
                                                "Sink (StreamingLLM) R=32 0/2 at 0.1 and 1/2 at 0.9; H2O (recent 64) "
                                                "R=32 1/2 at 0.1 and 2/2 at 0.9.")
    assert macros["RetrievalHeldSentence"] == (
        "Of the 8 prompts with a bounded context, 4 still held the whole key at the question and 3 of these were answered exactly; of the "
        "4 that no longer held it, 1 was answered exactly all the same (1 of them with some of the key's tokens still held). Prompts with the key "
        "held, by policy: Sink (StreamingLLM) R=32 2/4 and H2O (recent 64) R=32 2/4.")
    assert macros["RetrievalLogprobSentence"] == (
        r"The correct answer's mean log-probability (nats, summed over its tokens) was \textminus{}0.38 over the whole "
        r"prompt (4 prompts), \textminus{}2.00 with a bounded context that held the key (4 prompts) and "
        r"\textminus{}14.50 with one that no longer held it (4 prompts).")
    assert macros["RetrievalRecomputeSentence"].startswith("Full recomputation is not in this run's grid")
    assert "zoo_" not in text and "_r32" not in table  # no pipeline identifier in what the paper prints

    needle = retrieval.retrieval_macros(rows + [dict(rows[0], task="needle")],
                                        {"needle_dataset": "kjv", "needle_source": "kjv"})
    assert (r"\newcommand{\RetrievalFiller}{the repeated sentences of the standard pass-key prompt (pass key) and "
            r"sentences of the King James Bible (needle)}") in needle
    assert retrieval.absent_macros().endswith("\\newif\\ifhaveRetrieval\\haveRetrievalfalse\n")


def test_recompute_is_the_reference_only_when_its_window_covers_the_prompt(tmp_path):
    recompute = dict(DENSE, type="recompute", cap=1024)
    path = write_result(tmp_path / "recompute.json", "recompute", recompute, [
        prompt(512, 0.5, True, True, -0.5), prompt(2048, 0.5, False, False, -9.0)])
    rows = retrieval.cell_rows(retrieval.load_results([path]), {"recompute": "Full recomputation"})
    assert [(r["length"], r["whole"], r["peak"]) for r in rows] == [(512, True, 1024), (2048, False, 1024)]
    assert retrieval.reference_sentence(rows) == "Attending over the whole prompt: Full recomputation answered 1/1 prompts exactly."
    assert retrieval.recompute_sentence(rows) == (
        "Full recomputation's window of 1024 tokens is shorter than the prompts of 2048 tokens: there it attends "
        "over part of the prompt, like the caches, and is counted with them.")
    assert retrieval.held_sentence(rows).startswith("Of the 1 prompt with a bounded context, 0 still held the whole key")


def test_heatmap_is_written(results, tmp_path):
    rows = retrieval.cell_rows(retrieval.load_results(results, BLOCKS), LABELS)
    out = retrieval_heatmap(rows, tmp_path / "fig", name="retrieval")
    assert [p.name for p in out] == ["retrieval.pdf", "retrieval.png"]
    assert all(p.stat().st_size > 0 for p in out) and out[0].read_bytes().startswith(b"%PDF")


def test_stale_or_mixed_results_are_refused(results, tmp_path):
    with pytest.raises(KVStreamError, match="policy zoo_sink_r32 ran as .* rerun it"):
        retrieval.load_results(results, dict(BLOCKS, zoo_sink_r32=dict(SINK, compress_every=16)))
    other = write_result(tmp_path / "x" / "sink.json", "zoo_sink_r32", SINK, [prompt(512, 0.1, True, True, -1.0)],
                         task="needle", version="ffff000000000000")
    with pytest.raises(KVStreamError, match="2 code versions"):
        retrieval.load_results(results + [other], BLOCKS)
    with pytest.raises(KVStreamError, match="a second result of task passkey, policy dense"):
        retrieval.load_results(results + results[:1], BLOCKS)
    data = json.loads(results[1].read_text())
    data["provenance"]["code_version"] = "eeee000000000000"
    results[1].write_text(json.dumps(data))
    with pytest.raises(KVStreamError, match=r"computed with code version eeee000000000000 .* expected abcd"):
        retrieval.load_results(results, BLOCKS)
    data["provenance"]["code_version"] = VERSION
    data["prompts"][0]["answer_logprob"] = None
    results[1].write_text(json.dumps(data))
    with pytest.raises(KVStreamError, match=r"sink.json: prompts\[0\].answer_logprob is None"):
        retrieval.load_results(results, BLOCKS)


# ------------------------------------------------------------------------------------------------
# the DAG


@pytest.fixture(scope="module")
def completed(tmp_path_factory):
    workdir = copy_repo(tmp_path_factory.mktemp("retrieval"))
    fake_complete(workdir, TINY)
    assert "Nothing to be done" in snakemake(workdir, "--configfile", TINY, "--dry-run", "--cores", "1").stdout
    return workdir


def _retrieval_jobs(jobs) -> list[str]:
    return sorted(o for rule, outs in jobs if rule == "retrieval" for o in outs)


def test_one_job_per_task_and_policy_and_a_library_change_reruns_them(completed):
    cfg = load_config(completed / TINY)
    wanted = sorted(f"results/retrieval/tiny-llama/{t}/{p}.json"
                    for t in cfg["retrieval"]["tasks"] for p in cfg["retrieval"]["policies"])
    module = completed / "src/kvstream/retrieval.py"
    original = module.read_text()
    try:
        module.write_text(original + "\n# only a comment\n")
        assert "Nothing to be done" in snakemake(completed, "--configfile", TINY, "--dry-run", "--cores", "1").stdout

        module.write_text(original + "\n_A_REAL_CHANGE = 1\n")
        proc = snakemake(completed, "--configfile", TINY, "--dry-run", "--cores", "1", "--printshellcmds")
        jobs = planned_jobs(proc.stdout)
        assert _retrieval_jobs(jobs) == wanted
        assert not [rule for rule, _ in jobs if rule.startswith(("eval_", "speed"))]  # cells do not import it
        assert {rule for rule, _ in jobs} >= {"retrieval_summary", "figure_retrieval", "retrieval_paper", "paper"}
        version = code_version(RETRIEVAL_ENTRY, completed / "src/kvstream")
        assert proc.stdout.count(f"--label code_version={version}") == len(wanted)  # each result records it
    finally:
        module.write_text(original)


def test_editing_a_retrieval_policy_reruns_its_jobs_only(completed):
    cfg = edited(load_config(completed / TINY), **{"policies.zoo_h2o_r4.recent": 8})
    write_config(completed / "edited.yaml", cfg)
    jobs = planned_jobs(snakemake(completed, "--configfile", "edited.yaml", "--dry-run", "--cores", "1").stdout)
    assert _retrieval_jobs(jobs) == [f"results/retrieval/tiny-llama/{t}/zoo_h2o_r4.json" for t in ("needle", "passkey")]


def test_without_retrieval_the_section_is_switched_off(completed):
    cfg = edited(load_config(completed / TINY), **{"retrieval.enabled": False})
    write_config(completed / "off.yaml", cfg)
    jobs = planned_jobs(snakemake(completed, "--configfile", "off.yaml", "--dry-run", "--cores", "1").stdout)
    rules = {rule for rule, _ in jobs}
    assert "retrieval_absent" in rules and not rules & {"retrieval", "retrieval_paper", "figure_retrieval"}
    assert ["paper/generated/retrieval_macros.tex"] in [outs for rule, outs in jobs if rule == "retrieval_absent"]


# ------------------------------------------------------------------------------------------------
# the rule's command on the tiny model


def test_the_rules_command_writes_a_result_the_report_reads(tmp_path):
    from kvstream.cli import main as cli_main
    from kvstream.models import prepare_model

    model_dir = tmp_path / "tiny-llama"
    prepare_model("embedded:tiny-llama", model_dir)
    plan = Plan(checked(load_config(REPO / TINY)), use_cuda=False)
    policy, out = "zoo_sink_r4", tmp_path / "passkey" / "zoo_sink_r4.json"
    argv = ["retrieval", "--model", str(model_dir), "--policy-json", json.dumps(plan.policy_fields(policy)),
            "--task", "passkey", *shlex.split(plan.retrieval_grid_args()), "--threads", "1",
            "--label", "task=passkey", "--label", f"policy={policy}",
            "--label", f"code_version={plan.retrieval_code_version}", "--out", str(out)]
    with pytest.raises(SystemExit) as exc:
        cli_main(argv)
    assert exc.value.code == 0
    assert json.loads(out.read_text())["provenance"]["code_version"] == plan.retrieval_code_version
    results = retrieval.load_results([out], plan.retrieval_policy_blocks())
    rows = retrieval.cell_rows(results, plan.retrieval_labels())
    assert [(r["length"], r["depth"], r["prompts"]) for r in rows] == [(288, 0.1, 1), (288, 0.9, 1)]
    assert all(r["peak"] == 64 and r["label"] == "Sink (StreamingLLM) R=4" for r in rows)
    prompts = results[0]["prompts"]
    assert [r["exact"] for r in rows] == [int(p["exact"]) for p in prompts]
    assert [r["held"] for r in rows] == [int(p["key_in_cache"]) for p in prompts]
    assert not prompts[0]["key_in_cache"]  # the oldest go: a 64-token cache has lost a key at depth 0.1 of 288
    cells = " & ".join(f"{r['exact']}/1 ({r['held']})" for r in rows)
    assert f"Sink (StreamingLLM) R=4 & 64 & 288 & {cells} & " in retrieval.retrieval_table(rows)
