"""Issue 15: the long stream past the model's trained context. The config check (each error names its field),
the Plan (no speed run for a dataset only the long stream uses, the recompute override per dataset, the
default run's jobs unchanged by the block), the rise criterion on made-up curves, and the report on real cells
that `kvstream eval` writes with the tiny Llama streamed past its own trained context."""

from __future__ import annotations

import copy
import json
import re

import numpy as np
import pytest
import yaml

from kvstream.config import ConfigError, check_config
from kvstream.pipeline import Plan
from kvstream.study import longstream
from kvstream.study.longstream_figure import longstream_figure
from pipeline_helpers import REPO, copy_repo, edited, load_config, planned_jobs, snakemake, write_config

SCHEMA = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())
DEFAULT = load_config(REPO / "config.yaml")
POLICIES = ["recompute", "dense", "window", "mit_streaming", "ours_best"]
LONG = {"datasets.kjv_long": {"source": "kjv", "n_samples": 2, "tokens_per_sample": 9000, "recompute_every": 256},
        "experiments.long_stream": {"role": "longstream", "dataset": "kjv_long", "reference": "recompute",
                                    "policies": POLICIES}}


def with_long(**changes) -> dict:
    return edited(edited(DEFAULT, **copy.deepcopy(LONG)), **changes)  # LONG's dicts stay untouched


# ------------------------------------------------------------------------------------------------
# the config check


@pytest.mark.parametrize("changes, message", [
    ({"experiments.again": {"role": "longstream", "dataset": "kjv_long", "reference": "recompute", "policies": POLICIES}},
     "config error: experiments.again.role: experiments.long_stream is already the long stream"),
    ({"experiments.long_stream.reference": "dense"},
     "config error: experiments.long_stream.reference: policy dense is a dense policy"),
    ({"datasets.extra": {"source": "kjv", "n_samples": 1, "tokens_per_sample": 600, "recompute_every": 4}},
     "config error: datasets.extra.recompute_every: no experiment runs a recompute policy on this dataset"),
    ({"datasets.kjv_long.recompute_every": 0}, "config error: datasets.kjv_long.recompute_every: 0 is less than the minimum"),
    ({"experiments.long_stream.role": "long-stream"}, "config error: experiments.long_stream.role: 'long-stream' is not one of"),
], ids=["two-long-streams", "reference-not-recompute", "override-acts-on-nothing", "override-zero", "role-typo"])
def test_config_errors_name_the_field(changes, message):
    with pytest.raises(ConfigError) as exc:
        check_config(with_long(**changes), SCHEMA)
    assert str(exc.value).startswith(message), str(exc.value)


def test_the_long_stream_overlay_adds_it_to_the_default_and_to_the_extended_run():
    # Snakemake merges config.yaml and the overlays, mapping by mapping; YAML keeps only the last of two equal
    # keys, so a second `experiments:` in an overlay would drop an experiment without a word
    long = yaml.safe_load((REPO / "config/longstream.yaml").read_text())
    extended = yaml.safe_load((REPO / "config/extended.yaml").read_text())
    assert "long_stream" not in extended["experiments"]
    both = Plan(check_config(_merge(_merge(DEFAULT, extended), long), SCHEMA), use_cuda=False)
    assert both.longstream_experiment == "long_stream"
    assert set(extended["experiments"]) < set(both.experiments)
    merged = check_config(_merge(DEFAULT, long), SCHEMA)
    plan = Plan(merged, use_cuda=False)
    assert plan.longstream_experiment == "long_stream"
    ds = plan.experiment_dataset("long_stream")
    assert merged["datasets"][ds]["tokens_per_sample"] > 8192  # past SmolLM2's trained context
    assert plan.experiment_policies("long_stream") == POLICIES


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# ------------------------------------------------------------------------------------------------
# the Plan


def test_the_long_dataset_has_no_speed_run_and_its_own_recompute_every():
    plan = Plan(check_config(with_long(), SCHEMA), use_cuda=False)
    assert plan.speed_datasets == ["kjv"]
    assert plan.pooled_experiments == [e for e in DEFAULT["experiments"]]
    assert plan.recompute_every("recompute", "kjv_long") == 256
    assert plan.recompute_every("recompute", "kjv") == DEFAULT["eval"]["recompute_every"] != 256
    assert plan.recompute_every("dense", "kjv_long") == 1
    cells = plan.used_cells()
    assert "results/cells/smollm2-135m/kjv_long/dense/s1.json" in cells
    # a dataset the long stream shares with a pooled experiment keeps its speed run
    shared = Plan(check_config(with_long(**{"experiments.long_stream.dataset": "kjv",
                                            "datasets.kjv_long": {"source": "kjv", "n_samples": 1, "tokens_per_sample": 600}}),
                               SCHEMA), use_cuda=False)
    assert shared.speed_datasets == ["kjv"]
    assert Plan(check_config(DEFAULT, SCHEMA), use_cuda=False).longstream_experiment is None


def test_the_block_adds_its_own_jobs_and_leaves_the_default_ones(tmp_path):
    work = copy_repo(tmp_path / "repo")
    write_config(work / "long.yaml", with_long())
    default = planned_jobs(snakemake(work, "--dry-run", "--cores", "1").stdout)
    extended = planned_jobs(snakemake(work, "--configfile", "long.yaml", "--dry-run", "--cores", "1").stdout)
    added = [j for j in extended if j not in default]
    removed = [j for j in default if j not in extended]
    assert removed == [("longstream_absent", ["paper/generated/longstream_macros.tex"])]
    rules = sorted(rule for rule, _ in added)
    assert rules == sorted(["fetch_text", "tokenize_kjv_long", *["eval_kjv_long_b0"] * 5, "longstream_summary",
                            "figure_longstream", "longstream_paper", "paper_figure_longstream"])
    assert not any("speed" in o or "aggregate" in o for _, outs in added for o in outs)


# ------------------------------------------------------------------------------------------------
# the rise criterion


def test_rise_from_finds_the_first_block_of_a_lasting_rise():
    rng = np.random.default_rng(0)
    nll = rng.normal(2.0, 0.05, size=(2, 4000))
    assert longstream.rise_from(nll, start=100, trained=2100, block=200) is None  # noise alone
    nll[:, 2600:] += 1.0  # a lasting rise, half of the block that starts at 2500
    assert longstream.rise_from(nll, start=100, trained=2100, block=200) == 2500
    nll[:, 3700:3900] -= 2.0  # it falls back below its level before the end: no lasting rise
    assert longstream.rise_from(nll, start=100, trained=2100, block=200) is None
    nll[:, 3700:3900] += 2.0
    nll[:, 2500:2600] -= 1.2  # the first half far lower: that block stays within reach of the range before
    assert longstream.rise_from(nll, start=100, trained=2100, block=200) == 2700


def test_moving_average_pools_rows_and_skips_unscored_targets():
    nll = np.array([[1.0, np.nan, 3.0, 5.0], [3.0, 4.0, np.nan, np.nan]])
    centres, means = longstream.moving_average(nll, 2)
    assert centres.tolist() == [0.5, 1.5, 2.5]
    assert means == pytest.approx([8.0 / 3.0, 3.5, 4.0])


# ------------------------------------------------------------------------------------------------
# the report on cells of `kvstream eval` (tiny Llama, streamed past its trained context)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from kvstream.cli import main as cli_main
    from kvstream.models import prepare_model

    root = tmp_path_factory.mktemp("longstream")
    model_dir = root / "tiny-llama"
    prepare_model("embedded:tiny-llama", model_dir)
    trained = longstream.trained_context(model_dir / "config.json")
    n = trained + 3 * longstream.SMOOTH_TOKENS + 1
    tiny = load_config(REPO / "config/tiny.yaml")
    cfg = edited(tiny, **{"datasets.long": {"source": "txt", "path": "tests/fixtures/text", "n_samples": 2,
                                             "tokens_per_sample": n, "recompute_every": 64},
                          "policies.dense": {"type": "dense"},
                          "experiments.stream": {"role": "longstream", "dataset": "long", "reference": "recompute",
                                                 "policies": ["recompute", "dense", "mit_streaming"]}})
    plan = Plan(check_config(cfg, SCHEMA), use_cuda=False)
    rng = np.random.default_rng(1)
    tokens = []
    for i in range(2):
        tokens.append(root / f"s{i}.npy")
        np.save(tokens[-1], rng.integers(0, 256, size=n))
    cells = []
    for pol in plan.experiment_policies("stream"):
        outs = [root / "cells" / pol / f"s{i}.json" for i in range(2)]
        argv = ["eval", "--model", str(model_dir), "--tokens", *map(str, tokens), "--threads", "1", "--warmup", "2",
                "--policy-json", json.dumps(plan.policy_fields(pol)),
                "--recompute-every", str(plan.recompute_every(pol, "long")), "--label", "model=tiny-llama",
                "--label", "dataset=long", "--label", f"policy={pol}", "--out", *map(str, outs)]
        with pytest.raises(SystemExit) as exc:
            cli_main(argv)
        assert exc.value.code == 0
        cells += outs
    summary = longstream.summarize_cells(
        cells, experiment="stream", policies=plan.experiment_policies("stream"), reference="recompute",
        trained=trained, labels=plan.experiment_labels("stream"), policy_blocks=plan.policy_blocks("stream"),
        run_facts={"model": "tiny-llama", "dataset": "long", "n_tokens": n, "dtype": "float32"})
    return root, summary, trained, n


def test_the_summary_splits_decode_targets_at_the_trained_context(tiny_run):
    root, s, trained, n = tiny_run
    assert (s["trained_context"], s["n_tokens"], s["n_samples"], s["recompute_every"]) == (trained, n, 2, 64)
    nll = {p: np.stack([np.load(root / "cells" / p / f"s{i}.nll.npy") for i in range(2)]).astype(np.float64)
           for p in ("recompute", "dense", "mit_streaming")}
    dense, sink, ref = s["policies"]["dense"], s["policies"]["mit_streaming"], s["policies"]["recompute"]
    prefill = dense["prefill_len"]
    assert dense["ppl_before"] == pytest.approx(np.exp(nll["dense"][:, prefill:trained].mean()))
    assert dense["ppl_after"] == pytest.approx(np.exp(nll["dense"][:, trained:].mean()))
    assert dense["n_after"] == 2 * (n - 1 - trained)
    # the reference scored every 64th decode target: the increase is paired on exactly those
    scored = np.isfinite(nll["recompute"][:, trained:])
    assert ref["n_after"] == sink["n_paired_after"] == scored.sum() < sink["n_after"]
    diff = (nll["mit_streaming"][:, trained:] - nll["recompute"][:, trained:])[scored]
    assert sink["increase_after"] == pytest.approx(100 * (np.exp(diff.mean()) - 1))
    assert ref["window"] == 16 * 64 and dense["window"] == longstream.SMOOTH_TOKENS
    assert dense["x"][0] == pytest.approx(prefill + (longstream.SMOOTH_TOKENS - 1) / 2)
    assert dense["y"][0] == pytest.approx(nll["dense"][:, prefill:prefill + longstream.SMOOTH_TOKENS].mean(), abs=1e-5)


def test_the_table_macros_and_figure_show_the_summary(tiny_run, tmp_path):
    root, s, trained, n = tiny_run
    table = longstream.longstream_table(s)
    dense = s["policies"]["dense"]
    row = next(line for line in table.splitlines() if line.startswith(dense["label"] + " &"))
    assert f"{dense['ppl_before']:.2f} & {dense['ppl_after']:.2f}" in row
    assert f"{n:d} tokens" in table and "2 samples" in table
    macros = longstream.longstream_macros(s, source="txt")
    assert r"\haveLongstreamtrue" in macros and rf"\newcommand{{\LongstreamTrained}}{{{trained}}}" in macros
    assert rf"\newcommand{{\LongstreamPast}}{{{n - 1 - trained}}}" in macros
    assert "Dense" not in longstream.absent_macros() and r"\haveLongstreamfalse" in longstream.absent_macros()
    files = longstream_figure(s, tmp_path, name="longstream")
    assert sorted(p.name for p in files) == ["longstream.pdf", "longstream.png"]
    assert all(p.stat().st_size > 1000 for p in files)
    longstream.write_summary(s, tmp_path / "summary.json", tmp_path / "summary.md")
    assert longstream.load_summary(tmp_path / "summary.json")["policies"]["dense"]["ppl_after"] == dense["ppl_after"]
    md = (tmp_path / "summary.md").read_text()
    assert re.search(rf"^\| {re.escape(dense['label'])} \| {dense['ppl_before']:.3f} \| {dense['ppl_after']:.3f} \|", md, re.M)


def test_samples_within_the_trained_context_are_refused(tiny_run):
    root, s, trained, n = tiny_run
    cells = sorted((root / "cells").glob("*/s*.json"))
    with pytest.raises(Exception, match=r"tokens_per_sample above"):
        longstream.summarize_cells(cells, experiment="stream", policies=["recompute", "dense", "mit_streaming"],
                                   reference="recompute", trained=n)


def test_the_section_reads_as_prose_and_cites_its_floats(tiny_run, tmp_path):
    from test_paper_text import expand, first_citation, floats, follow_conditionals, identifier_problems, newcommands, \
        strip_comments, switches

    root, s, trained, n = tiny_run
    gen = tmp_path / "generated"
    (gen / "tables").mkdir(parents=True)
    macros = longstream.longstream_macros(s, source="txt")
    (gen / "tables" / "longstream.tex").write_text(longstream.longstream_table(s))
    defs = {**newcommands(macros), "ModelName": "a tiny random Llama"}
    tex = strip_comments((REPO / "paper/sections/longstream.tex").read_text())
    tex = tex.replace(r"\input{generated/tables/longstream.tex}", (gen / "tables" / "longstream.tex").read_text())
    text = follow_conditionals(expand(tex, defs), switches(macros), set(defs), gen)
    assert r"\section{Streaming past the trained context}" in text and "LongstreamDense" not in text
    assert f"{trained} tokens" in text and "Dense" not in longstream.caches_sentence(s)
    assert not identifier_problems(text), identifier_problems(text)
    found = floats(text)
    assert sorted(label for _, label, *_ in found) == ["fig:longstream", "tab:longstream"]
    for env, label, start, end in found:
        cited = first_citation(text, label, (start, end))
        assert cited is not None and cited < start, f"{label} is not cited before it appears"
    off = follow_conditionals(tex, switches(longstream.absent_macros()), set(), gen)
    assert r"\section" not in off
