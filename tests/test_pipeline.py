"""The Snakemake pipeline on config/tiny.yaml, in a copy of the repository.

- An edit reruns only what it affects (dry runs on fake-completed outputs): one policy's parameters ->
  that policy's cells and the aggregates/tables/figures/paper that read them; a paper .tex -> the PDF.
- End to end (marked slow; CI runs it, it is the proof the DAG works): the whole DAG, PDF included,
  then checks that the outputs exist and hold the numbers of the cells.
"""

from __future__ import annotations

import csv
import json
import math
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from pipeline_helpers import copy_repo, edited, fake_complete, load_config, planned_jobs, snakemake, write_config

TINY = "config/tiny.yaml"
DATA_RULES = re.compile(r"^(fetch_text|prepare_model|tokenize_\w+)$")


@pytest.fixture(scope="module")
def completed(tmp_path_factory):
    workdir = copy_repo(tmp_path_factory.mktemp("touched"))
    fake_complete(workdir, TINY)
    proc = snakemake(workdir, "--configfile", TINY, "--dry-run", "--cores", "1")
    assert "Nothing to be done" in proc.stdout, proc.stdout[-3000:]
    return workdir


def _plan(workdir: Path, configfile: str = TINY) -> list[tuple[str, list[str]]]:
    return planned_jobs(snakemake(workdir, "--configfile", configfile, "--dry-run", "--cores", "1").stdout)


def test_editing_one_policy_reruns_only_its_cells_and_their_readers(completed):
    cfg = load_config(completed / TINY)
    policy = "ours_best"
    cfg = edited(cfg, **{f"policies.{policy}.compress_every": 12})  # a schedule no other policy has
    write_config(completed / "edited.yaml", cfg)
    jobs = _plan(completed, "edited.yaml")

    model, dataset = cfg["model"]["name"], "fixture"
    n = cfg["datasets"][dataset]["n_samples"]
    cells = sorted(o for rule, outs in jobs if rule.startswith(("eval_", "reuse_")) for o in outs if o.endswith(".json"))
    assert cells == sorted(f"results/cells/{model}/{dataset}/{policy}/s{i}.json" for i in range(n))
    assert not [rule for rule, _ in jobs if DATA_RULES.match(rule)]
    # the dataset's speed run times every policy interleaved: it reruns, and with it every aggregate of the
    # dataset (their TPOT columns come from it); nothing else upstream
    assert [outs[0] for rule, outs in jobs if rule == "speed"] == [f"results/speed/{model}/{dataset}/speed.json"]
    aggregates = sorted(outs[0] for rule, outs in jobs if rule == "aggregate")
    assert aggregates == sorted(f"results/aggregate/{model}/{e}.csv" for e, x in cfg["experiments"].items() if x["dataset"] == dataset)
    assert not [rule for rule, _ in jobs if rule == "bench"]
    pdfs = {o for _, outs in jobs for o in outs if o.endswith(".pdf") and o.startswith("paper/neurips")}
    assert pdfs == {"paper/neurips_2025.pdf", "paper/neurips_2025_compressed.pdf"}


@pytest.mark.parametrize(
    "tex, pdfs",
    [
        ("paper/neurips_2025_compressed.tex", ["paper/neurips_2025_compressed.pdf"]),
        ("paper/neurips_2025.tex", ["paper/neurips_2025.pdf"]),
    ],
)
def test_editing_paper_tex_reruns_only_the_pdf(completed, tex, pdfs):
    path = completed / tex
    original = path.read_text()
    try:
        path.write_text(original + "\n% an edit\n")
        jobs = _plan(completed)
    finally:
        path.write_text(original)
    assert sorted(o for _, outs in jobs for o in outs) == pdfs, jobs


def test_unreachable_hub_model_fails_with_the_message_on_the_terminal_and_in_the_log(tmp_path):
    workdir = copy_repo(tmp_path / "repo")
    cfg = edited(load_config(workdir / TINY), **{"model.name": "nowhere", "model.source": "kvstream-tests/no-such-model"})
    write_config(workdir / "hub.yaml", cfg)
    proc = snakemake(workdir, "--configfile", "hub.yaml", "--cores", "1", "results/models/nowhere", check=False)
    assert proc.returncode != 0
    log = workdir / "results/logs/prepare_model/nowhere.log"
    assert "Hugging Face Hub" in log.read_text()
    assert "--- last lines of results/logs/prepare_model/nowhere.log" in proc.stdout
    assert "Hugging Face Hub" in proc.stdout.split("--- last lines of")[1]


# ------------------------------------------------------------------------------------- end to end
def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _pdf_text(path: Path) -> str:
    return subprocess.run(["pdftotext", "-layout", str(path), "-"], capture_output=True, text=True, check=True).stdout


@pytest.mark.slow
def test_whole_dag_on_tiny_config(tmp_path):
    workdir = copy_repo(tmp_path / "repo")
    snakemake(workdir, "--configfile", TINY, "--cores", "2", timeout=1800)
    cfg = load_config(workdir / TINY)
    model = cfg["model"]["name"]

    # every cell: the labels of its path, the device it ran on, its NLL file
    for exp, x in cfg["experiments"].items():
        ds = x["dataset"]
        for policy in x["policies"]:
            for i in range(cfg["datasets"][ds]["n_samples"]):
                cell = workdir / f"results/cells/{model}/{ds}/{policy}/s{i}.json"
                data = json.loads(cell.read_text())
                labels = dict(data["cell"])
                assert re.fullmatch(r"[0-9a-f]{16}", labels.pop("code_version"))  # kvstream.codeversion
                assert labels == {"model": model, "dataset": ds, "policy": policy, "sample": f"s{i}"}
                assert data["provenance"]["device"] == "cpu"
                nll = np.load(cell.with_name(f"s{i}.nll.npy"))
                assert nll.shape == (cfg["datasets"][ds]["tokens_per_sample"] - 1,)
                log = "reuse" if data.get("reused_from") else "eval"
                batch = i // cfg["eval"].get("batch_size", 1)
                assert (workdir / f"results/logs/{log}/{model}/{ds}/{policy}/b{batch}.log").exists()

    # aggregates hold the pooled numbers of the cells
    for exp, x in cfg["experiments"].items():
        ds, ref = x["dataset"], x.get("reference", "recompute")
        rows = {r["policy"]: r for r in _read_csv(workdir / f"results/aggregate/{model}/{exp}.csv")}
        assert list(rows) == x["policies"]
        assert (workdir / f"results/aggregate/{model}/{exp}.json").exists()

        def nlls(policy):
            return [np.load(workdir / f"results/cells/{model}/{ds}/{policy}/s{i}.nll.npy").astype(np.float64)
                    for i in range(cfg["datasets"][ds]["n_samples"])]

        def pooled(policy):
            cells = [json.loads((workdir / f"results/cells/{model}/{ds}/{policy}/s{i}.json").read_text())
                     for i in range(cfg["datasets"][ds]["n_samples"])]
            total = sum(c["streaming"]["nll_sum"] for c in cells)
            count = sum(c["streaming"]["n_targets"] for c in cells)
            nll = np.concatenate(nlls(policy))  # NaN: a target the cell did not score (sparse recompute)
            assert math.isclose(math.exp(total / count), math.exp(float(np.nanmean(nll))), rel_tol=1e-4)
            return math.exp(total / count)

        def paired_increase(policy):
            d = [(x - r)[np.isfinite(x) & np.isfinite(r)] for x, r in zip(nlls(policy), nlls(ref))]
            return 100 * (math.exp(float(np.concatenate(d).mean())) - 1)

        # the tiny config's reference scores every k-th decode target only: the increase is paired
        assert cfg["eval"]["recompute_every"] > 1 and np.isnan(np.concatenate(nlls(ref))).any()
        def paired_ppl(policy):
            x = [(p, r) for p, r in zip(nlls(policy), nlls(ref))]
            return math.exp(float(np.concatenate([p[np.isfinite(p) & np.isfinite(r)] for p, r in x]).mean()))

        for policy, row in rows.items():
            # each policy's own PPL over the targets it scored; the table's PPL on the paired targets
            assert math.isclose(float(row["ppl_all_scored"]), pooled(policy), rel_tol=1e-6), (exp, policy)
            assert math.isclose(float(row["ppl"]), paired_ppl(policy), rel_tol=1e-5), (exp, policy)
            increase = 0.0 if policy == ref else paired_increase(policy)
            assert math.isclose(float(row["ppl_increase_percent"]), increase, rel_tol=1e-5, abs_tol=1e-9), (exp, policy)
        # speed comes from the dataset's speed run
        speed = json.loads((workdir / f"results/speed/{model}/{ds}/speed.json").read_text())
        for policy, row in rows.items():
            timed = speed["policies"].get(policy)
            if timed is not None:
                assert math.isclose(float(row["tpot_ms"]), timed["mean_ms"], rel_tol=1e-9), (exp, policy)

    # figures, tables, the paper; the PDF prints the numbers of the aggregate
    for name in ("tradeoff", "cache_trace", "nll_along", "sweep_compress_every"):
        assert (workdir / f"results/figures/{model}/{name}.pdf").stat().st_size > 0
        assert (workdir / f"results/figures/{model}/{name}.png").stat().st_size > 0
    for pdf in ("paper/neurips_2025_compressed.pdf", "paper/neurips_2025.pdf"):
        assert (workdir / pdf).read_bytes().startswith(b"%PDF")
    text = _pdf_text(workdir / "paper/neurips_2025_compressed.pdf")
    table1 = {r["policy"]: r for r in _read_csv(workdir / f"results/aggregate/{model}/table1.csv")}
    for policy in ("recompute", "ours_best"):  # decode-target PPL: the paper's primary quality figure
        assert f"{float(table1[policy]['decode_ppl']):.2f}" in text, policy
    # retrieval (config retrieval): one result per (task, policy), the summary, the paper's table
    for task in cfg["retrieval"]["tasks"]:
        for policy in cfg["retrieval"]["policies"]:
            result = json.loads((workdir / f"results/retrieval/{model}/{task}/{policy}.json").read_text())
            assert len(result["prompts"]) == len(cfg["retrieval"]["lengths"]) * len(cfg["retrieval"]["depths"]) \
                * cfg["retrieval"]["prompts_per_cell"]
    assert (workdir / f"results/retrieval/{model}/summary.csv").stat().st_size > 0
    assert "Retrieval" in text and (workdir / "paper/generated/tables/retrieval.tex").exists()

    # nothing left to do; `snakemake --report` gives an HTML report with the figures
    proc = snakemake(workdir, "--configfile", TINY, "--dry-run", "--cores", "1")
    assert "Nothing to be done" in proc.stdout
    snakemake(workdir, "--configfile", TINY, "--report", "report.html", timeout=600)
    html = (workdir / "report.html").read_text(errors="replace")
    assert "tradeoff.png" in html and "cache_trace.png" in html
