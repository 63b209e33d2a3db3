"""Issue 14, the pipeline and report side: a change to the code that computes the cells reruns them and
cells of different code versions are not pooled unless asked for (case 1); the aggregate checks every cell
against its .nll.npy, its policy and the other cells (case 3, and case 6's strings and nulls in a cell); a
run of another config keeps its results apart and does not replace another model's paper (case 8).

Cells here are synthetic (tests/test_report.py's writer) except in the test that runs `kvstream eval` on
the tiny model; the Snakemake tests are dry runs on a copy of the repository with every output faked."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest

from kvstream.codeversion import CELL_ENTRY, SPEED_ENTRY, code_modules, code_version
from kvstream.errors import KVStreamError
from kvstream.io import sha256_file
from kvstream.paper_owner import check_paper_owner
from kvstream.config import check_config
from kvstream.pipeline import Plan
from kvstream.study import aggregate as study_aggregate
from kvstream.study import tables
from kvstream.study.verify import CELL_POLICY_KEYS
from pipeline_helpers import REPO, copy_repo, fake_complete, load_config, planned_jobs, snakemake
from test_report import aggregate, make_experiment

TINY = "config/tiny.yaml"
POLICIES = ["recompute", "mit_streaming", "ours_best"]


# ------------------------------------------------------------------------------------------------
# case 1: the code version


def test_code_version_changes_with_the_code_not_with_comments_or_docstrings(tmp_path):
    pkg = shutil.copytree(REPO / "src" / "kvstream", tmp_path / "kvstream",
                          ignore=shutil.ignore_patterns("__pycache__"))
    before = code_version(CELL_ENTRY, pkg)
    assert {"kvstream.schedule", "kvstream.cache", "kvstream.evaluate", "kvstream.models"} <= set(code_modules(CELL_ENTRY, pkg))
    schedule = pkg / "schedule.py"
    text = schedule.read_text()

    schedule.write_text(text.replace('"""', '"""A docstring edit. ', 1) + "\n# a comment\n\n")
    assert code_version(CELL_ENTRY, pkg) == before
    (pkg / "study" / "tables.py").write_text((pkg / "study" / "tables.py").read_text() + "\nX = 1\n")
    (pkg / "io.py").write_text((pkg / "io.py").read_text() + "\nX = 1\n")  # never part of a number
    assert code_version(CELL_ENTRY, pkg) == before

    schedule.write_text(text + "\nX = 1\n")
    assert code_version(CELL_ENTRY, pkg) != before
    assert code_version(SPEED_ENTRY, pkg) != code_version(CELL_ENTRY, pkg)


@pytest.fixture(scope="module")
def completed(tmp_path_factory):
    workdir = copy_repo(tmp_path_factory.mktemp("trust"))
    fake_complete(workdir, TINY)
    assert "Nothing to be done" in snakemake(workdir, "--configfile", TINY, "--dry-run", "--cores", "1").stdout
    return workdir


def test_a_library_change_reruns_every_cell_and_a_comment_none(completed):
    schedule = completed / "src/kvstream/schedule.py"
    original = schedule.read_text()
    cfg = check_config(load_config(completed / TINY), _schema())
    plan = Plan(cfg, use_cuda=False)
    evaluated = sorted(plan.cell_path(ds, p, i) for ds in plan.datasets for p in plan.dataset_policies(ds)
                       if plan.reused_from(ds, p) is None for i in range(plan.n_samples(ds)))
    try:
        schedule.write_text(original + "\n# only a comment\n")
        proc = snakemake(completed, "--configfile", TINY, "--dry-run", "--cores", "1")
        assert "Nothing to be done" in proc.stdout, proc.stdout[-3000:]

        schedule.write_text(original + "\n_A_REAL_CHANGE = 1\n")
        proc = snakemake(completed, "--configfile", TINY, "--dry-run", "--cores", "1", "--printshellcmds")
        jobs = planned_jobs(proc.stdout)
        cells = sorted(o for rule, outs in jobs if rule.startswith("eval_") for o in outs if o.endswith(".json"))
        assert cells == evaluated
        assert [rule for rule, _ in jobs if rule == "speed"] == ["speed"]
        version = code_version(CELL_ENTRY, completed / "src/kvstream")
        assert f"--label code_version={version}" in proc.stdout  # each cell records it
    finally:
        schedule.write_text(original)


def _schema() -> dict:
    import yaml

    return yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())


def _label(path: Path, **labels) -> None:
    cell = json.loads(path.read_text())
    cell["cell"].update(labels)
    path.write_text(json.dumps(cell))


def test_cells_of_different_code_versions_are_refused_unless_allowed(tmp_path):
    paths = make_experiment(tmp_path, POLICIES, n_samples=3)
    for p in paths:
        _label(p, code_version="aaaa000000000000")
    stale = [p for p in paths if p.parent.name == "ours_best" and p.name == "s2.json"][0]
    _label(stale, code_version="bbbb000000000000")
    with pytest.raises(KVStreamError) as info:
        aggregate(tmp_path, paths, experiment="table1", policies=POLICIES)
    message = str(info.value)
    assert "aaaa000000000000" in message and "bbbb000000000000" in message
    assert "ours_best (s2)" in message and "eval.allow_mixed_code" in message

    agg = aggregate(tmp_path, paths, experiment="table1", policies=POLICIES, allow_mixed_code=True)
    assert agg["code_versions"] == ["aaaa000000000000", "bbbb000000000000"]
    assert "ours_best (s2)" in agg["code_note"]
    aggs = {"table1": agg}
    config = {"eval": {"cap": 16}}
    for text in (tables.experiment_table(agg, "table1"), tables.reproduction_table(aggs, config),
                 tables.setup_table(aggs, config)):
        assert "Mixed code" in text and "bbbb000000000000" in text

    for p in paths:  # one version: pooled, nothing to say
        _label(p, code_version="aaaa000000000000")
    agg = aggregate(tmp_path, paths, experiment="table1", policies=POLICIES)
    assert agg["code_versions"] == ["aaaa000000000000"] and agg["code_note"] is None
    assert "Mixed code" not in tables.experiment_table(agg, "table1")


# ------------------------------------------------------------------------------------------------
# case 3 (and case 6's cell values): the aggregate checks every cell


def _cell(paths, policy: str, sample: int) -> Path:
    return next(p for p in paths if p.parent.name == policy and p.name == f"s{sample}.json")


def _edit(path: Path, fn) -> None:
    cell = json.loads(path.read_text())
    fn(cell)
    path.write_text(json.dumps(cell))


def _configured(paths) -> dict:
    """The pipeline's params for these cells: each policy's block and the run's facts."""
    blocks = {}
    for p in paths:
        block = json.loads(p.read_text())["policy"]
        blocks[p.parent.name] = {k: v for k, v in block.items() if k not in CELL_POLICY_KEYS}
    return {"policy_blocks": blocks, "run_facts": {"model": "tiny", "dataset": "toy", "n_tokens": 64, "dtype": "float32"}}


@pytest.fixture
def cells(tmp_path):
    return make_experiment(tmp_path, POLICIES, n_samples=3, n_tokens=64)


def _refused(tmp_path, paths, *words, configured=True):
    kwargs = _configured(paths) if configured else {}
    with pytest.raises(KVStreamError) as info:
        aggregate(tmp_path, paths, experiment="table1", policies=POLICIES, **kwargs)
    for word in words:
        assert word in str(info.value), str(info.value)
    return str(info.value)


def test_untouched_cells_pass_every_check(tmp_path, cells):
    configured = _configured(cells)
    agg = aggregate(tmp_path, cells, experiment="table1", policies=POLICIES, **configured)
    assert agg["policies"]["ours_best"]["n_samples"] == 3


@pytest.mark.parametrize("configured", [True, False], ids=["pipeline", "cli"])
def test_a_halved_nll_sum_is_refused(tmp_path, cells, configured):
    cell = _cell(cells, "ours_best", 1)
    _edit(cell, lambda c: c["streaming"].update(nll_sum=c["streaming"]["nll_sum"] / 2))
    _refused(tmp_path, cells, str(cell), "streaming.nll_sum", ".nll.npy", configured=configured)


@pytest.mark.parametrize("section, key", [("streaming", "decode_nll_sum"), ("streaming", "n_targets"),
                                          ("memory", "peak_memory_mb"), ("policy", "prefill_len")])
def test_a_deleted_key_is_refused(tmp_path, cells, section, key):
    cell = _cell(cells, "mit_streaming", 0)
    _edit(cell, lambda c: c[section].pop(key))
    _refused(tmp_path, cells, str(cell), f"{section}.{key} is missing", configured=False)


@pytest.mark.parametrize("value", ["3.5", None, float("nan"), True])
def test_a_string_or_null_value_names_the_cell_and_field(tmp_path, cells, value):
    cell = _cell(cells, "recompute", 2)
    _edit(cell, lambda c: c["streaming"].update(runtime_sec=value))
    _refused(tmp_path, cells, str(cell), "streaming.runtime_sec", "not a finite number", configured=False)


def test_an_edited_policy_label_is_refused(tmp_path, cells):
    cell = _cell(cells, "ours_best", 1)
    _label(cell, policy="mit_streaming")  # now two cells say mit_streaming s1
    _refused(tmp_path, cells, str(cell), "both say", "mit_streaming", configured=False)
    _label(cell, policy="no_such_policy")
    _refused(tmp_path, cells, str(cell), "no_such_policy", "not one of the experiment's policies")


def test_a_cell_copied_from_another_policy_is_refused(tmp_path, cells):
    src, dest = _cell(cells, "ours_best", 0), _cell(cells, "mit_streaming", 0)
    configured = _configured(cells)
    shutil.copyfile(src, dest)
    shutil.copyfile(src.with_suffix("").with_suffix(".nll.npy"), dest.with_suffix("").with_suffix(".nll.npy"))
    _refused(tmp_path, cells, str(dest), "both say", configured=False)
    _label(dest, policy="mit_streaming")  # the label edited too: its policy block gives it away
    _refused(tmp_path, cells, str(dest), "policy.", "from different policies", configured=False)
    with pytest.raises(KVStreamError, match="the config's policy mit_streaming"):
        aggregate(tmp_path, [c for c in cells if c.parent.name != "mit_streaming" or c == dest], experiment="t",
                  policies=POLICIES, **{**configured, "run_facts": None})


def test_the_policy_the_config_resolves_and_its_run_are_checked(tmp_path, cells):
    configured = _configured(cells)
    configured["policy_blocks"]["ours_best"]["compress_every"] = 99  # the config changed, the cells did not
    with pytest.raises(KVStreamError, match=r"policy\.compress_every is 8 but the config's policy ours_best has 99"):
        aggregate(tmp_path, cells, experiment="t", policies=POLICIES, **configured)
    configured = _configured(cells)
    configured["run_facts"]["dtype"] = "float16"
    with pytest.raises(KVStreamError, match="dtype is 'float32' but the config's run has 'float16'"):
        aggregate(tmp_path, cells, experiment="t", policies=POLICIES, **configured)


def test_a_cell_of_another_dtype_or_token_count_is_refused(tmp_path, cells):
    cell = _cell(cells, "ours_best", 2)
    _edit(cell, lambda c: c["provenance"].update(dtype="bfloat16"))
    _refused(tmp_path, cells, str(cell), "dtype", "one experiment pools cells of one dtype", configured=False)


def test_the_nll_file_must_be_the_cells_own(tmp_path, cells):
    cell = _cell(cells, "mit_streaming", 1)
    nll = cell.with_suffix("").with_suffix(".nll.npy")
    _edit(cell, lambda c: c.update(nll_sha256=sha256_file(nll)))
    aggregate(tmp_path, cells, experiment="t", policies=POLICIES)  # the checksum agrees
    x = np.load(nll)
    x[5] += 1.0
    np.save(nll, x)
    _refused(tmp_path, cells, str(cell), "nll_sha256", configured=False)
    _edit(cell, lambda c: c.pop("nll_sha256"))  # a cell from before the checksum: the sums give it away
    _refused(tmp_path, cells, str(cell), "streaming.nll_sum", configured=False)


def test_cells_that_kvstream_eval_writes_pass_with_the_pipelines_params(tmp_path):
    """The policy blocks and run facts the workflow hands the aggregate are what `kvstream eval` records."""
    from kvstream import models
    from kvstream.cli import main as cli_main

    cfg = check_config(load_config(REPO / TINY), _schema())
    plan = Plan(cfg, use_cuda=False)
    model_dir = tmp_path / "models" / plan.model
    models.prepare_model("embedded:tiny-llama", model_dir)
    n = cfg["datasets"]["fixture"]["tokens_per_sample"]
    rng = np.random.default_rng(0)
    tokens = []
    for i in range(2):
        tokens.append(tmp_path / f"s{i}.npy")
        np.save(tokens[-1], rng.integers(0, 250, n).astype(np.int64))
    policies = ["recompute", "ours_best", "zoo_h2o_r4"]
    paths = []
    for pol in policies:
        outs = [tmp_path / "cells" / pol / f"s{i}.json" for i in range(2)]
        argv = ["eval", "--model", str(model_dir), "--tokens", *map(str, tokens), "--threads", "1",
                "--policy-json", shlex.split(plan.policy_json(pol))[0], "--recompute-every", str(plan.recompute_every(pol)),
                "--warmup", "2", "--label", f"model={plan.model}", "--label", "dataset=fixture", "--label", f"policy={pol}",
                "--label", f"code_version={plan.cell_code_version}", "--out", *map(str, outs)]
        with pytest.raises(SystemExit) as info:
            cli_main(argv)
        assert info.value.code == 0
        paths += outs
    blocks = {**plan.policy_blocks("zoo"), **plan.policy_blocks("table1")}
    agg = study_aggregate.aggregate(paths, experiment="table1", policies=policies, run_facts=plan.run_facts("table1"),
                                    policy_blocks={p: blocks[p] for p in policies})
    assert agg["code_versions"] == [plan.cell_code_version]
    # the eval command records the version it computed with; it must be the one the workflow expected
    assert {json.loads(p.read_text())["provenance"]["code_version"] for p in paths} == {plan.cell_code_version}
    _edit(paths[0], lambda c: c["provenance"].update(code_version="cccc000000000000"))
    with pytest.raises(KVStreamError) as info:
        study_aggregate.aggregate(paths, experiment="table1", policies=policies)
    assert "cccc000000000000" in str(info.value) and "recompute/s0" in str(info.value)
    assert "another copy of kvstream" in str(info.value)


# ------------------------------------------------------------------------------------------------
# case 8: results keyed by model, one owner of paper/


def test_results_are_keyed_by_the_model():
    tiny = Plan(check_config(load_config(REPO / TINY), _schema()), use_cuda=False)
    default = Plan(check_config(load_config(REPO / "config.yaml"), _schema()), use_cuda=False)
    assert tiny.aggregate_path("table1", "json") == "results/aggregate/tiny-llama/table1.json"
    assert default.aggregate_path("table1", "json") != tiny.aggregate_path("table1", "json")
    assert tiny.figure_path("tradeoff", "png") == "results/figures/tiny-llama/tradeoff.png"


def test_paper_owner_stamp(tmp_path):
    stamp = tmp_path / "owner.json"
    check_paper_owner("a", stamp)  # no stamp: nobody owns paper/ yet
    stamp.write_text("")
    check_paper_owner("a", stamp)  # an empty one (outputs faked with --touch) neither
    stamp.write_text(json.dumps({"model": "a"}))
    check_paper_owner("a", stamp)
    with pytest.raises(KVStreamError, match="model 'a'.*model 'b'.*overwrite_paper=True"):
        check_paper_owner("b", stamp)
    check_paper_owner("b", stamp, overwrite=True)


def test_another_config_keeps_its_results_apart_and_leaves_the_paper_alone(completed):
    # the tiny run owns paper/; the default config (another model) must not replace it
    proc = snakemake(completed, "--dry-run", "--cores", "1", check=False)
    assert proc.returncode != 0
    assert "model 'tiny-llama'" in proc.stdout and "overwrite_paper=True" in proc.stdout, proc.stdout[-3000:]

    # its results alone: keyed by its model, nothing under paper/, the tiny run's results untouched
    jobs = planned_jobs(snakemake(completed, "--dry-run", "--cores", "1", "results").stdout)
    outputs = [o for _, outs in jobs for o in outs]
    assert not [o for o in outputs if o.startswith("paper/") or "tiny-llama" in o]
    assert "results/aggregate/smollm2-135m/table1.csv" in outputs
    assert "results/figures/smollm2-135m/tradeoff.pdf" in outputs

    # asked for explicitly, it takes paper/ over
    jobs = planned_jobs(snakemake(completed, "--dry-run", "--cores", "1", "--config", "overwrite_paper=True").stdout)
    outputs = [o for _, outs in jobs for o in outs]
    assert {"paper/generated/owner.json", "paper/neurips_2025_compressed.pdf"} <= set(outputs)

    # the owner's own config still finds everything done
    assert "Nothing to be done" in snakemake(completed, "--configfile", TINY, "--dry-run", "--cores", "1").stdout
