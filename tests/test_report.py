"""Aggregation math, tables and macros on small hand-made cells (docs/INTERFACES.md format).

The cells here are synthetic test inputs written by the test; they are not results.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from kvstream.errors import KVStreamError
from kvstream.study import aggregate as study_aggregate
from kvstream.study import latex, macros, tables
from kvstream.study.bootstrap import contrast

# ------------------------------------------------------------------------------ synthetic cells
PRESETS = {
    "recompute": {"type": "recompute"},
    "window": {"type": "window", "window_size": 16},
    "mit_streaming": {"type": "sink", "n_sink": 4, "window_size": 12, "compress_every": 1, "cache_slack": 0,
                      "max_drop": None},
    "ours_eager": {"type": "sink", "n_sink": 8, "window_size": 8, "compress_every": 1, "cache_slack": 4,
                   "max_drop": 8},
    "ours_best": {"type": "sink", "n_sink": 8, "window_size": 8, "compress_every": 8, "cache_slack": 4,
                  "max_drop": 8},
    "ours_softlite": {"type": "sink", "n_sink": 8, "window_size": 8, "compress_every": 4, "cache_slack": 4,
                      "max_drop": 8},
    "abl_s0_dnull": {"type": "sink", "n_sink": 8, "window_size": 8, "compress_every": 4, "cache_slack": 0,
                     "max_drop": None},
    "abl_s4_dnull": {"type": "sink", "n_sink": 8, "window_size": 8, "compress_every": 4, "cache_slack": 4,
                     "max_drop": None},
    "abl_s0_d8": {"type": "sink", "n_sink": 8, "window_size": 8, "compress_every": 4, "cache_slack": 0,
                  "max_drop": 8},
    "sweep_r2": {"type": "sink", "n_sink": 8, "window_size": 8, "compress_every": 2, "cache_slack": 4,
                 "max_drop": 8},
}
# The policy zoo: every kind at peak lengths 16 and 32 (W = peak - S - R), R in {1, 4}; the window at R = 1.
ZOO = {"recompute": "recompute"}
for _peak in (16, 32):
    for _r in (1, 4):
        for _kind in ("sink", "h2o", "tova", "knorm", "random"):
            ZOO[f"zoo_{_kind}_p{_peak}_r{_r}"] = _kind
            PRESETS[f"zoo_{_kind}_p{_peak}_r{_r}"] = {"type": _kind, "n_sink": 4, "window_size": _peak - 4 - _r,
                                                      "compress_every": _r, "cache_slack": 0, "max_drop": None}
    ZOO[f"zoo_window_p{_peak}"] = "window"
    PRESETS[f"zoo_window_p{_peak}"] = {"type": "window", "window_size": _peak - 1, "compress_every": 1, "cache_slack": 0}


# The config's `paper:` block for these policies (display names and macro stems of the presets).
LABELS = {"recompute": "Full recomputation", "dense": "Dense (no eviction)", "window": "Window (no sinks)",
          "mit_streaming": "StreamingLLM", "ours_eager": "Lazy (Eager)", "ours_best": "Lazy (Best)",
          "ours_softlite": "Lazy (Softlite)"}
PAPER = {"baseline": "mit_streaming", "eager": "ours_eager", "presets": ["ours_best", "ours_softlite"],
         "labels": LABELS,
         "stems": {"recompute": "Recompute", "dense": "Dense", "window": "WindowOnly", "mit_streaming": "Mit",
                   "ours_eager": "Eager", "ours_best": "Best", "ours_softlite": "Softlite"}}
# Roles (and knobs) of the experiments these tests build, as config `experiments.<name>`.
ROLES = {"table1": {"role": "main"}, "table2": {"role": "ablation"},
         "sweep_compress_every": {"role": "sweep", "knob": "compress_every"}, "zoo": {"role": "zoo"}}

_SPEED: dict[str, dict[str, list[float]]] = {}


def speed_of(root: Path) -> Path:
    """A `kvstream speed` result for the cells made under root: each cell's tpot_ms becomes one round
    of its policy (synthetic, like the cells)."""
    rounds = _SPEED.get(str(root), {})
    n = max(len(v) for v in rounds.values())
    policies = {}
    for pol, ms in rounds.items():
        ms = (ms * n)[:n]
        policies[pol] = {"mean_ms": float(np.mean(ms)), "median_ms": float(np.median(ms)), "p10_ms": min(ms),
                         "p90_ms": max(ms), "round_mean_ms": ms, "steps": 64 * n, "events": 2 * n,
                         "ratio_to_floor": {"estimate": 1.0, "ci95": [1.0, 1.0]}}
    path = root / "speed.json"
    path.write_text(json.dumps({"kind": "kvstream-speed", "execution": "eager", "rounds": n, "threads": 1,
                                "policies": policies}))
    return path


def aggregate(root: Path, paths, **kwargs) -> dict:
    """Aggregate as the pipeline does: the speed run of root, the configured labels, and the role and
    knob of a known experiment name."""
    kwargs.setdefault("labels", LABELS)
    for key, value in ROLES.get(kwargs.get("experiment"), {}).items():
        kwargs.setdefault(key, value)
    return study_aggregate.aggregate(paths, speed=speed_of(root), **kwargs)


def make_cell(root: Path, policy: str, sample: int, nll: np.ndarray, tpot_ms: float, *,
              params: dict | None = None, prefill: int = 16, trace: list[int] | None = None,
              peak_mb: float = 100.0, model: str = "tiny", dataset: str = "toy") -> Path:
    """Write results/cells/{model}/{dataset}/{policy}/s{i}.json and .nll.npy as `kvstream eval` does;
    tpot_ms goes to the speed run of root (speed_of), one round per cell."""
    _SPEED.setdefault(str(root), {}).setdefault(policy, []).append(float(tpot_ms))
    params = dict(params or PRESETS[policy])
    d = root / "results" / "cells" / model / dataset / policy
    d.mkdir(parents=True, exist_ok=True)
    nll = np.asarray(nll, dtype=np.float32)
    n = nll.size
    dec = nll[prefill:]  # decode targets: after the P prefill targets (as kvstream eval)
    evicts = params["type"] in ("sink", "h2o", "tova", "knorm", "random")
    budget = (params.get("n_sink") or 0) + (params.get("window_size") or 0) if evicts else \
        params.get("window_size") or 16
    steps = n + 1 - prefill
    if trace is None:
        trace = [budget + 1] * steps
    # the schedule's largest forward C + max(R, sigma + 1), as the policy block carries it (cap: recompute)
    peak_len = budget + max(params.get("compress_every") or 1, (params.get("cache_slack") or 0) + 1) if evicts \
        else budget + 1 if params["type"] == "window" else max(trace)
    step_ms = [tpot_ms] * steps
    cell = {
        "cell": {"model": model, "dataset": dataset, "policy": policy, "sample": str(sample)},
        "policy": {"type": params["type"], "n_sink": params.get("n_sink"), "window_size": params.get("window_size"),
                   "compress_every": params.get("compress_every"), "cache_slack": params.get("cache_slack"),
                   "max_drop": params.get("max_drop"), "budget_mode": params.get("budget_mode", "fixed"), "cap": 16,
                   "positions": "relative", "budget": budget, "max_forward_len": peak_len,
                   "prefill_len": prefill},
        "metrics": {"speedup": None, "tpot_ms": None, "ppl_increase_percent": None,
                    "peak_memory_mb": peak_mb},
        "streaming": {"perplexity": float(np.exp(nll.astype(np.float64).mean())),
                      "decode_perplexity": float(np.exp(dec.astype(np.float64).mean())) if dec.size else None,
                      "runtime_sec": steps * tpot_ms / 1000 + 0.1, "prefill_time_sec": 0.1,
                      "decode_time_sec": steps * tpot_ms / 1000, "decode_tokens": steps,
                      # over the scored targets (NaN: not scored), as kvstream eval counts them
                      "n_targets": int(np.isfinite(nll).sum()), "nll_sum": float(np.nansum(nll.astype(np.float64))),
                      "n_decode_targets": int(np.isfinite(dec).sum()),
                      "decode_nll_sum": float(np.nansum(dec.astype(np.float64)))},
        "timing": {"diagnostic_step_ms_median": tpot_ms, "warmup_steps": 2, "step_ms": step_ms},
        "memory": {"peak_memory_mb": peak_mb, "kv_cache_bytes": 4096 * budget,
                   "memory_kind": "process_peak_rss"},
        "trace": {"cache_len": list(map(int, trace))},
        "provenance": {"git_commit": "0123456789abcdef", "git_dirty": False, "torch": "2.13.0",
                       "transformers": "5.24.0", "python": "3.11.2", "device": "cpu", "device_name": "TestCPU",
                       "dtype": "float32", "threads": 1, "config_hash": "x", "seed": 0, "model": model,
                       "tokens_file": f"s{sample}.npy", "n_tokens": n + 1, "hostname": "h",
                       "started_at": "2026-01-01T00:00:00"},
    }
    path = d / f"s{sample}.json"
    path.write_text(json.dumps(cell))
    np.save(d / f"s{sample}.nll.npy", nll)
    return path


def make_experiment(root: Path, policies: list[str], n_samples: int = 3, n_tokens: int = 64,
                    seed: int = 1) -> list[Path]:
    """Cells for every policy; NLL and TPOT differ by policy in a known way."""
    rng = np.random.default_rng(seed)
    base = [rng.uniform(1.0, 4.0, size=n_tokens - 1) for _ in range(n_samples)]
    paths = []
    for k, pol in enumerate(policies):
        for i in range(n_samples):
            shift = 0.0 if pol == "recompute" else 0.01 * (k + 1) + 0.005 * i
            tpot = 100.0 if pol == "recompute" else 10.0 + k + i
            paths.append(make_cell(root, pol, i, base[i] + shift, tpot))
    return paths


# ------------------------------------------------------------------------------------- tests
def test_pooled_ppl_increase_and_speed_run_speedup(tmp_path):
    a0 = np.array([1.0, 2.0, 3.0])
    a1 = np.array([2.0, 2.0])
    b0 = a0 + 0.5
    b1 = a1 + 0.1
    paths = [make_cell(tmp_path, "recompute", 0, a0, 100.0, prefill=2),
             make_cell(tmp_path, "recompute", 1, a1, 90.0, prefill=2),
             make_cell(tmp_path, "mit_streaming", 0, b0, 10.0, prefill=2),
             make_cell(tmp_path, "mit_streaming", 1, b1, 20.0, prefill=2)]
    agg = aggregate(tmp_path, paths, experiment="t", policies=["recompute", "mit_streaming"], n_boot=200)
    rec, mit = agg["policies"]["recompute"], agg["policies"]["mit_streaming"]
    ref_ppl = math.exp((6.0 + 4.0) / 5)
    ppl = math.exp((6.0 + 1.5 + 4.0 + 0.2) / 5)  # pooled: total nll / total targets, not mean of PPLs
    assert rec["ppl"] == pytest.approx(ref_ppl, rel=1e-6)
    assert mit["ppl"] == pytest.approx(ppl, rel=1e-6)
    assert mit["ppl_increase_percent"] == pytest.approx(100 * (ppl / ref_ppl - 1), rel=1e-6)
    # decode targets: after the prefill targets (prefill=2 -> from index 2; sample 1 has none)
    dref = math.exp(3 / 1)
    dmit = math.exp(3.5 / 1)
    assert mit["decode_ppl_increase_percent"] == pytest.approx(100 * (dmit / dref - 1), rel=1e-5)
    # speed from the speed run: reference mean / policy mean (rounds 100, 90 and 10, 20)
    assert mit["speedup"] == pytest.approx(95 / 15, rel=1e-9)
    assert mit["metrics"]["speedup"] == mit["speedup"]
    assert mit["metrics"]["ppl_increase_percent"] == mit["ppl_increase_percent"]
    assert rec["speedup"] == 1.0 and rec["ppl_increase_percent"] == 0.0
    assert mit["tpot_ms"] == pytest.approx(15.0)


def test_bootstrap_interval_contains_point(tmp_path):
    paths = make_experiment(tmp_path, ["recompute", "mit_streaming", "ours_best"], n_samples=5)
    agg = aggregate(tmp_path, paths, experiment="t", policies=["recompute", "mit_streaming", "ours_best"])
    for pol in ("mit_streaming", "ours_best"):
        r = agg["policies"][pol]
        for name in ("ppl", "ppl_increase_percent", "speedup", "tpot_ms", "decode_ppl"):
            assert r[f"{name}_lo"] <= r[name] <= r[f"{name}_hi"], (pol, name)
            assert r[f"{name}_lo"] < r[f"{name}_hi"], (pol, name)
    # seeded: the same inputs give the same intervals
    again = aggregate(tmp_path, paths, experiment="t", policies=["recompute", "mit_streaming", "ours_best"])
    assert again["policies"]["ours_best"]["speedup_lo"] == agg["policies"]["ours_best"]["speedup_lo"]


def test_single_sample_interval_is_degenerate(tmp_path):
    paths = make_experiment(tmp_path, ["recompute", "mit_streaming"], n_samples=1)
    agg = aggregate(tmp_path, paths, experiment="t", policies=["recompute", "mit_streaming"])
    r = agg["policies"]["mit_streaming"]
    assert math.isfinite(r["ppl_increase_percent"])
    assert math.isnan(r["ppl_increase_percent_lo"]) and math.isnan(r["speedup_hi"])
    assert "single sample" in r["ci_note"] and agg["n_boot"] == 0
    study_aggregate.write_aggregate(agg, tmp_path / "a.json", tmp_path / "a.csv")
    back = study_aggregate.read_aggregate(tmp_path / "a.json")
    assert math.isnan(back["policies"]["mit_streaming"]["speedup_lo"])
    table = tables.experiment_table(back, "table1")
    assert r"\ci{" not in table  # no fake interval printed
    assert "1 sample of 64 tokens" in table and "1 sample: no interval" in table


def test_only_shared_samples_are_used(tmp_path):
    paths = make_experiment(tmp_path, ["recompute", "mit_streaming"], n_samples=3)
    extra = make_cell(tmp_path, "recompute", 7, np.ones(63), 100.0)
    agg = aggregate(tmp_path, paths + [extra], experiment="t", policies=["recompute", "mit_streaming"])
    assert agg["samples"] == ["s0", "s1", "s2"]


def test_missing_policy_is_an_error(tmp_path):
    paths = make_experiment(tmp_path, ["recompute"], n_samples=2)
    with pytest.raises(KVStreamError, match="ours_best"):
        aggregate(tmp_path, paths, experiment="t", policies=["recompute", "ours_best"])


def test_csv_json_outputs(tmp_path):
    paths = make_experiment(tmp_path, ["recompute", "mit_streaming"], n_samples=2)
    agg = aggregate(tmp_path, paths, experiment="table1", policies=["recompute", "mit_streaming"])
    study_aggregate.write_aggregate(agg, tmp_path / "agg.json", tmp_path / "agg.csv")
    data = json.loads((tmp_path / "agg.json").read_text())
    assert data["policies"]["mit_streaming"]["metrics"]["speedup"] == pytest.approx(agg["policies"]["mit_streaming"]["speedup"])
    import pandas as pd

    df = pd.read_csv(tmp_path / "agg.csv")
    assert list(df["policy"]) == ["recompute", "mit_streaming"]
    assert df.loc[1, "ppl_increase_percent"] == pytest.approx(agg["policies"]["mit_streaming"]["ppl_increase_percent"])


def _all_aggs(root: Path) -> dict:
    t1 = ["recompute", "mit_streaming", "ours_eager", "ours_best", "ours_softlite", "window"]
    t2 = ["recompute", "abl_s0_dnull", "abl_s4_dnull", "abl_s0_d8", "ours_softlite"]
    sw = ["recompute", "ours_eager", "sweep_r2", "ours_softlite", "ours_best"]
    paths = make_experiment(root, sorted(set(t1 + t2 + sw)), n_samples=3)
    out = {}
    for name, pols in (("table1", t1), ("table2", t2), ("sweep_compress_every", sw)):
        cells = [p for p in paths if p.parent.name in pols]
        out[name] = aggregate(root, cells, experiment=name, policies=pols)
    return out


def test_tables_and_macros(tmp_path):
    aggs = _all_aggs(tmp_path)
    files = tables.write_tables(aggs, tmp_path / "tables", config={"eval": {"cap": 16}, "paper": PAPER})
    names = sorted(p.name for p in files)
    assert names == ["presets.tex", "reproduction.tex", "setup.tex", "sweep_compress_every.tex", "table1.tex",
                     "table2.tex"]
    t1 = (tmp_path / "tables" / "table1.tex").read_text()
    assert r"\toprule" in t1 and r"\bottomrule" in t1
    best = aggs["table1"]["policies"]["ours_best"]
    assert latex.fmt(best["speedup"]) in t1 and latex.fmt(best["ppl_increase_percent"], 2, True) in t1
    assert latex.fmt_ci(best, "decode_ppl_increase_percent", 2, True) in t1  # the primary figure, with its interval
    assert "Lazy (Best, R=8)" in t1  # the label takes R from the data
    assert "Peak mem" not in t1  # a CPU process's peak RSS says nothing about the cache
    sweep = (tmp_path / "tables" / "sweep_compress_every.tex").read_text()
    assert sweep.index("sweep\\_r2") if "sweep\\_r2" in sweep else True
    # the sweep is sorted by R
    rs = [line.split("&")[0].strip() for line in sweep.splitlines() if line.strip()[:1].isdigit()]
    assert rs == ["1", "2", "4", "8"]
    t2 = (tmp_path / "tables" / "table2.tex").read_text()
    assert r"$\infty$" in t2
    repro = (tmp_path / "tables" / "reproduction.tex").read_text()
    assert "published" in repro and "6.86" in repro  # the original's reported value, shown as such

    cfg = {"title": "A & B", "authors": [{"name": "Ann", "affiliation": "Uni", "email": "a@b.c"},
                                         {"name": "Bo", "affiliation": "Lab", "email": ""}],
           "eval": {"cap": 16, "warmup": 2, "positions": "relative"}, "model": {"name": "tiny"},
           "experiments": ROLES, "paper": PAPER}
    tex = macros.macros_tex(aggs, cfg)
    assert r"\newcommand{\SpeedupBest}{" + latex.fmt(best["speedup"]) + "}" in tex
    assert r"\newcommand{\KvTitle}{A \& B}" in tex
    assert r"Ann \\ Uni \\ \texttt{a@b.c} \And Bo \\ Lab" in tex
    assert r"\haveTableOnetrue" in tex and r"\haveWikitextfalse" in tex
    assert r"\newcommand{\InteractionSentence}" in tex
    assert r"\newcommand{\CapTokens}{16}" in tex
    # every \newcommand name is unique and letters-only
    import re

    names = re.findall(r"\\newcommand\{\\([^}]*)\}", tex)
    assert len(names) == len(set(names)) and all(n.isalpha() for n in names)


def test_delta_at_sigma_zero_identical_nll_detected(tmp_path):
    # sigma = 0: delta cannot matter; identical NLL files must be reported as identical
    nll = np.linspace(1, 2, 40)
    paths = []
    for i in range(2):
        paths.append(make_cell(tmp_path, "recompute", i, nll, 100.0))
        for pol in ("abl_s0_dnull", "abl_s0_d8"):
            paths.append(make_cell(tmp_path, pol, i, nll + 0.1, 10.0))
        for pol in ("abl_s4_dnull", "ours_softlite"):
            paths.append(make_cell(tmp_path, pol, i, nll + 0.05 * (i + 1), 10.0))
    agg = aggregate(tmp_path, paths, experiment="table2",
                           policies=["recompute", "abl_s0_dnull", "abl_s4_dnull", "abl_s0_d8", "ours_softlite"])
    tex = macros.macros_tex({"table2": agg}, {})
    assert "bit-identical" in tex
    c = contrast(agg, {"ours_softlite": 1, "abl_s4_dnull": -1, "abl_s0_d8": -1, "abl_s0_dnull": 1})
    assert c["value"] == pytest.approx(0.0, abs=1e-9)


def test_macro_stem():
    assert latex.macro_stem("ours_best", PAPER["stems"]) == "Best"  # the configured stem
    assert latex.macro_stem("ours_best") == "OursBest"  # else the CamelCase name
    assert latex.macro_stem("abl_s16_d32") == "AblSOneSixDThreeTwo"
    assert latex.macro_stem("table1") == "TableOne"
    assert latex.macro_stem("sweep_compress_every") == "SweepCompressEvery"


def test_fmt():
    assert latex.fmt(float("nan")) == "--"
    assert latex.fmt(-1.234) == r"\textminus{}1.23"
    assert latex.fmt(2.5, 1, signed=True) == "+2.5"
    assert latex.fmt(-0.001) == "0.00"


def test_cli_aggregate_tables_macros(tmp_path):
    from kvstream import cli

    paths = make_experiment(tmp_path, ["recompute", "mit_streaming"], n_samples=2)
    out = tmp_path / "agg" / "table1.json"
    with pytest.raises(SystemExit) as exc:
        cli.main(["aggregate", *map(str, paths), "--experiment", "table1", "--policies", "recompute", "mit_streaming",
                  "--speed", str(speed_of(tmp_path)), "--json", str(out), "--csv", str(tmp_path / "agg" / "table1.csv"),
                  "--role", "main", "--label", "mit_streaming=StreamingLLM"])
    assert exc.value.code == 0
    data = json.loads(out.read_text())
    assert data["policies"]["mit_streaming"]["metrics"]["speedup"] > 1 and data["role"] == "main"
    assert data["policies"]["mit_streaming"]["label"] == "StreamingLLM (S=4, R=1)"
    with pytest.raises(SystemExit):
        cli.main(["tables", str(out), "--out-dir", str(tmp_path / "tables")])
    with pytest.raises(SystemExit):
        cli.main(["macros", str(out), "--out", str(tmp_path / "macros.tex")])
    assert (tmp_path / "tables" / "table1.tex").exists() and (tmp_path / "macros.tex").exists()


def test_setup_table_reads_provenance(tmp_path):
    aggs = _all_aggs(tmp_path)
    tex = tables.setup_table(aggs, {"eval": {"cap": 16, "positions": "relative", "warmup": 2},
                                    "model": {"name": "tiny", "source": "embedded:tiny-llama"}})
    for value in ("TestCPU", "2.13.0", "5.24.0", "0123456789ab", "float32", "a tiny random Llama"):
        assert value in tex, value


def test_figures_written_as_pdf_and_png(tmp_path):
    from kvstream.study import figures

    aggs = _all_aggs(tmp_path)
    cells = sorted((tmp_path / "results" / "cells").rglob("s*.json"))
    out = figures.all_figures(aggs, cells, tmp_path / "fig", extra_dirs=[tmp_path / "paperfig"], paper=PAPER)
    names = {p.name for p in out}
    for stem in ("tradeoff", "sweep_compress_every", "cache_trace", "nll_along"):
        assert f"{stem}.pdf" in names and f"{stem}.png" in names
        assert (tmp_path / "fig" / f"{stem}.pdf").read_bytes()[:4] == b"%PDF"
        assert (tmp_path / "paperfig" / f"{stem}.pdf").stat().st_size > 1000


def test_cache_trace_plots_the_measured_trace(tmp_path):
    """The figure must take its data from trace.cache_len of the cells, not from the schedule."""
    from kvstream.study import figures
    import matplotlib

    matplotlib.use("Agg")
    weird = [17, 18, 19, 5, 17, 18]  # not what any schedule produces: only a measured trace would look like this
    p = make_cell(tmp_path, "ours_best", 0, np.ones(20), 10.0, trace=weird, prefill=15)
    captured = {}
    import matplotlib.axes

    orig = matplotlib.axes.Axes.step

    def spy(self, x, y, *a, **k):
        captured.setdefault("y", []).append(list(y))
        return orig(self, x, y, *a, **k)

    matplotlib.axes.Axes.step = spy
    try:
        figures.cache_trace([p], tmp_path / "fig")
    finally:
        matplotlib.axes.Axes.step = orig
    assert captured["y"] == [weird]


def test_paired_subsample_of_a_sparse_reference(tmp_path):
    """recompute_every k: the reference scores every k-th decode target (NaN elsewhere); the increase is
    computed on the paired targets only, and the interval also resamples those targets."""
    rng = np.random.default_rng(5)
    k, prefill, n = 4, 16, 80
    paths, ref_all, pol_all = [], [], []
    for i in range(4):
        ref = rng.uniform(1, 3, n)
        pol = ref + rng.normal(0.05, 0.2, n)
        sparse = ref.copy()
        decode = np.arange(n) >= prefill
        sparse[decode & ((np.arange(n) - prefill) % k != 0)] = np.nan
        p = make_cell(tmp_path, "recompute", i, sparse, 100.0, prefill=prefill)
        cell = json.loads(p.read_text())
        cell["policy"]["recompute_every"] = k  # make_cell sums the scored targets only, as kvstream eval
        p.write_text(json.dumps(cell))
        paths += [p, make_cell(tmp_path, "mit_streaming", i, pol, 10.0, prefill=prefill)]
        ref_all.append(sparse)
        pol_all.append(pol.astype(np.float32).astype(float))
    agg = aggregate(tmp_path, paths, experiment="t", policies=["recompute", "mit_streaming"], n_boot=500)
    mit = agg["policies"]["mit_streaming"]
    d = np.concatenate([(p - r.astype(np.float32))[np.isfinite(r)] for p, r in zip(pol_all, ref_all)])
    assert mit["ppl_increase_percent"] == pytest.approx(100 * (math.exp(d.mean()) - 1), rel=1e-5)
    assert mit["paired_targets"] == 4 * len(range(0, n - prefill, k))
    assert mit["ppl_increase_percent_lo"] < mit["ppl_increase_percent"] < mit["ppl_increase_percent_hi"]
    assert agg["recompute_every"] == k and "every 4-th" in agg["pairing_note"]
    # the reference's own PPL is over the targets it scored, and every row's PPL is shown on those (paired)
    # targets, each policy's all-target PPL kept beside it
    assert agg["policies"]["recompute"]["n_targets"] == sum(int(np.isfinite(r).sum()) for r in ref_all)
    on_pairs = np.concatenate([p[np.isfinite(r)] for p, r in zip(pol_all, ref_all)])
    assert mit["ppl"] == pytest.approx(math.exp(on_pairs.mean()), rel=1e-6)
    assert mit["ppl_all_scored"] == pytest.approx(math.exp(np.concatenate(pol_all).mean()), rel=1e-6)


def test_reused_cells_keep_their_own_policy_block(tmp_path):
    from kvstream.cells import reuse_cells
    from kvstream.schedule import Policy, cache_lengths

    a = dict(type="sink", n_sink=8, window_size=8, compress_every=4, cache_slack=0, max_drop=None)
    b = dict(a, cache_slack=4, max_drop=4)  # sigma cannot act when delta >= R: the same schedule
    n = 40
    trace = cache_lengths(Policy(**a), n)
    assert trace == cache_lengths(Policy(**b), n)
    src = make_cell(tmp_path, "abl_s0_dnull", 0, np.linspace(1, 2, n - 1), 10.0, params=a, trace=trace)
    out = tmp_path / "reused" / "s0.json"
    reuse_cells([src], [out], b, "ours_softlite", "abl_s0_dnull")
    cell = json.loads(out.read_text())
    assert cell["policy"]["cache_slack"] == 4 and cell["policy"]["max_drop"] == 4
    assert cell["cell"]["policy"] == "ours_softlite" and cell["reused_from"]["policy"] == "abl_s0_dnull"
    assert np.load(tmp_path / "reused" / "s0.nll.npy").tobytes() == np.load(src.with_suffix("").with_suffix(".nll.npy")).tobytes()
    with pytest.raises(KVStreamError, match="another cache-length trace"):
        reuse_cells([src], [tmp_path / "bad.json"], dict(a, compress_every=2), "x", "abl_s0_dnull")


def _renamed_aggs(root: Path, exp_names: dict[str, str], pol_names: dict[str, str]) -> dict:
    """_all_aggs with experiments and policies renamed (same cells, same roles)."""
    t1 = ["recompute", "mit_streaming", "ours_eager", "ours_best", "ours_softlite", "window"]
    t2 = ["recompute", "abl_s0_dnull", "abl_s4_dnull", "abl_s0_d8", "ours_softlite"]
    sw = ["recompute", "ours_eager", "sweep_r2", "ours_softlite", "ours_best"]
    for old, new in pol_names.items():
        PRESETS.setdefault(new, PRESETS[old])
    rn = [pol_names.get(p, p) for p in sorted(set(t1 + t2 + sw))]  # same order: same synthetic values
    paths = make_experiment(root, rn, n_samples=3)
    labels = {pol_names.get(p, p): v for p, v in LABELS.items()}
    out = {}
    for name, pols in (("table1", t1), ("table2", t2), ("sweep_compress_every", sw)):
        pols = [pol_names.get(p, p) for p in pols]
        out[exp_names.get(name, name)] = aggregate(
            root, [p for p in paths if p.parent.name in pols], experiment=exp_names.get(name, name), policies=pols,
            labels=labels, **ROLES[name])
    return out


def _newcommands(tex: str) -> dict[str, str]:
    import re

    return dict(re.findall(r"^\\newcommand\{\\([A-Za-z]+)\}\{(.*)\}$", tex, flags=re.M))


def test_roles_not_names_drive_tables_and_macros(tmp_path):
    """Renaming the experiments and the paper's policies, with the same roles and paper block, gives the
    same table bodies and macro values (macros named after an experiment follow its new name)."""
    exp_names = {"table1": "main_results", "table2": "slack_drop", "sweep_compress_every": "r_sweep"}
    pol_names = {"mit_streaming": "streaming", "ours_eager": "eager", "ours_best": "best",
                 "ours_softlite": "softlite", "window": "sliding"}

    def config(rename):
        p, e = (pol_names, exp_names) if rename else ({}, {})
        paper = {"baseline": p.get("mit_streaming", "mit_streaming"), "eager": p.get("ours_eager", "ours_eager"),
                 "presets": [p.get(x, x) for x in PAPER["presets"]],
                 "labels": {p.get(k, k): v for k, v in LABELS.items()},
                 "stems": {p.get(k, k): v for k, v in PAPER["stems"].items()}}
        return {"eval": {"cap": 16}, "paper": paper, "experiments": {e.get(k, k): v for k, v in ROLES.items()}}

    before = _all_aggs(tmp_path / "a")
    after = _renamed_aggs(tmp_path / "b", exp_names, pol_names)
    for old, new in exp_names.items():
        a, b = tables.experiment_table(before[old], old), tables.experiment_table(after[new], new)
        assert a[a.index(r"\begin{tabular}"):] == b[b.index(r"\begin{tabular}"):], old
    assert tables.reproduction_table(before, config(False)) == tables.reproduction_table(after, config(True))
    mit_row = next(line for line in tables.reproduction_table(after, config(True)).splitlines()
                   if line.startswith("StreamingLLM (S=4, R=1)"))  # the original's row, under our label
    assert latex.fmt(after["main_results"]["policies"]["streaming"]["speedup"]) in mit_row  # matched by its stem
    old_macros = _newcommands(macros.macros_tex(before, config(False)))
    new_macros = _newcommands(macros.macros_tex(after, config(True)))
    for old, new in exp_names.items():
        old_stem, new_stem = latex.macro_stem(old), latex.macro_stem(new)
        old_macros = {k.replace(old_stem, new_stem) if k.endswith(old_stem) else k: v for k, v in old_macros.items()}
    assert old_macros == new_macros
    assert new_macros["BestVsMitPplDiff"] != "n/a" and new_macros["SweepRHigh"] == "8"


def test_aggregates_and_configs_without_roles_still_render(tmp_path):
    """Aggregates written before roles existed and configs without a paper block: names stand in."""
    paths = make_experiment(tmp_path, ["recompute", "mit_streaming", "ours_best"], n_samples=2)
    agg = study_aggregate.aggregate(paths, experiment="table1", policies=["recompute", "mit_streaming", "ours_best"],
                                    speed=speed_of(tmp_path))
    assert agg["role"] == "other" and agg["knob"] is None
    assert agg["policies"]["ours_best"]["label"] == "ours_best"
    del agg["role"], agg["knob"]
    table = tables.experiment_table(agg, "table1")
    assert "Further policies" in table and r"ours\_best" in table
    tex = macros.macros_tex({"table1": agg}, {})
    assert r"\newcommand{\SpeedupOursBest}{" in tex and r"\haveTableOnetrue" in tex
    repro = tables.reproduction_table({"table1": agg})  # no main role, no stems: nothing matched
    assert r"``MIT StreamingLLM'' & 6.86 & -- & 14.6 & --" in repro


def test_policy_label_takes_knobs_from_the_parameters():
    from kvstream.study.roles import policy_label

    sink = dict(type="sink", n_sink=4, compress_every=1, cache_slack=0, max_drop=None, budget_mode="fixed")
    assert policy_label("mit", sink, "StreamingLLM") == "StreamingLLM (S=4, R=1)"
    lazy = dict(sink, n_sink=8, compress_every=8, cache_slack=4, max_drop=8)
    assert policy_label("best", lazy, "Lazy (Best)") == "Lazy (Best, R=8)"
    assert policy_label("best_cap", dict(lazy, budget_mode="cap"), "Lazy (Best)") == "Lazy (Best, R=8, cap)"
    assert policy_label("w", {"type": "window", "window_size": 16}, "Window (no sinks)") == "Window (no sinks, W=16)"
    assert policy_label("recompute", {"type": "recompute"}, "Full recomputation") == "Full recomputation"
    assert policy_label("abl_s0", lazy) == "abl_s0"  # no label: the name


# ------------------------------------------------------------------- what the tables and prose may claim
def test_sweep_and_ablation_tables_show_the_reference_once(tmp_path):
    aggs = _all_aggs(tmp_path)
    for name in ("table2", "sweep_compress_every"):
        tex = tables.experiment_table(aggs[name], name)
        body = tex[tex.index(r"\begin{tabular}"):]
        assert "Full recomputation" not in body  # no row repeating the reference
        assert tex.count("Reference: Full recomputation") == 1  # named once, in the caption
        head = next(line for line in body.splitlines() if "band" in line)
        assert "Dec.\\ inc." in head and "All inc." in head and head.count("&") <= 5


def test_peak_memory_is_shown_only_where_it_resolves_the_cache(tmp_path):
    agg = _all_aggs(tmp_path)["table1"]
    assert "Peak mem" not in tables.experiment_table(agg, "table1")  # a CPU process's peak RSS
    for i, r in enumerate(agg["policies"].values()):
        r["memory_kind"], r["peak_memory_mb"] = "cuda_max_allocated", 1000.0 + 10 * i
    assert "Peak mem" in tables.experiment_table(agg, "table1")


def test_presets_table_lists_every_knob_of_the_main_policies(tmp_path):
    tex = tables.presets_table(_all_aggs(tmp_path), {"paper": PAPER})
    assert r"\label{tab:presets}" in tex
    best = next(line for line in tex.splitlines() if line.startswith("Lazy (Best"))
    # S, W, C, R, sigma, delta, mode, and r: the band [C + r, C + R] (r = min(sigma, max(R - delta, 0)) = 0)
    assert best.split(" & ")[2:9] == ["8", "8", "16", "8", "4", "8", "fixed"] and best.endswith(r"0: [16, 24] \\")
    window = next(line for line in tex.splitlines() if line.startswith("Window"))
    assert window.split(" & ")[2:4] == ["--", "16"]  # a knob the kind does not use is not shown


def test_a_sweep_whose_cells_agree_is_described_by_one_value(tmp_path):
    PRESETS.setdefault("sweep_sigma8", dict(PRESETS["ours_softlite"], cache_slack=8))
    pols = ["recompute", "abl_s0_d8", "ours_softlite", "sweep_sigma8"]
    nll = [np.linspace(1.0, 2.0, 63) + 0.1 * i for i in range(3)]
    paths = [make_cell(tmp_path, pol, i, nll[i] + (0.0 if pol == "recompute" else 0.05), 100.0 if pol == "recompute"
                       else 10.0) for pol in pols for i in range(3)]
    agg = aggregate(tmp_path, paths, experiment="sweep_cache_slack", policies=pols, role="sweep", knob="cache_slack")
    text = macros.sweep_summary(agg, None)
    assert r"is +" in text and r"at every $\sigma$" in text and "the speedup is" in text
    assert "ranges from" not in text and "lowest" not in text and "highest" not in text


def test_a_speed_difference_inside_the_measured_timing_noise_is_no_ordering(tmp_path):
    from kvstream.study import claims

    rounds = {"recompute": [100.0] * 4, "mit_streaming": [10.0] * 4, "ours_best": [9.0, 9.1, 8.9, 9.0],
              "ours_softlite": [10.0] * 4, "abl_s0_dnull": [12.0, 12.5, 11.5, 12.0]}
    shift = {"recompute": 0.0, "mit_streaming": 0.05, "ours_best": 0.04}
    nll = [np.linspace(1.0, 2.0, 63) + 0.1 * i for i in range(4)]
    paths = []
    for pol, ms in rounds.items():
        for i in range(4):
            path = make_cell(tmp_path, pol, i, nll[i] + shift.get(pol, 0.06), ms[i])
            if pol == "abl_s0_dnull":  # the noise probe: ours_softlite's computation (same schedule), timed again
                cell = json.loads(path.read_text())
                cell["reused_from"] = {"policy": "ours_softlite"}
                path.write_text(json.dumps(cell))
            paths.append(path)
    agg = aggregate(tmp_path, paths, experiment="table1", policies=list(rounds))
    m = _newcommands(macros.macros_tex({"table1": agg}, {"experiments": ROLES, "paper": PAPER}))
    assert float(m["TimingNoiseFactor"]) > 1.15 and "timed one computation twice" in m["TimingNoiseSentence"]
    ratio = claims.speed_ratio(agg["policies"]["mit_streaming"], agg["policies"]["ours_best"])
    assert ratio["lo"] > 1 and claims.speed_order(ratio, None) == "faster than"  # the interval alone would order
    assert m["BestVsMitSpeedWord"] == "not distinguishable in speed from"  # the measured noise does not
    assert "abl" not in m["IdenticalAllSentence"] and r"$\sigma=0,\ \delta=\infty$" in m["IdenticalAllSentence"]


def test_an_interval_over_few_samples_is_not_evidence():
    from kvstream.study import wording

    c = {"value": 1.0, "lo": 0.5, "hi": 1.5}
    assert wording.resolved(c, wording.MIN_SAMPLES_FOR_EVIDENCE) is True
    assert wording.resolved(c, 2) is None and "not evidence" in wording.support(c, 2)
    assert wording.support(dict(c, lo=-0.5), 20) == "the interval includes zero"
    assert wording.support({"value": 1.0, "lo": float("nan"), "hi": float("nan")}, 1).startswith("with one sample")


# ----------------------------------------------------------------------------------- policy zoo
def _zoo_agg(root: Path, policies: list[str] | None = None, n_samples: int = 3) -> dict:
    """A zoo aggregate (role zoo) over the synthetic cells; NLL and TPOT grow with the position in `policies`."""
    policies = policies or list(ZOO)
    return aggregate(root, make_experiment(root, policies, n_samples=n_samples), experiment="zoo", policies=policies)


def test_policy_label_names_scored_kinds():
    from kvstream.study.roles import policy_label

    h2o = dict(type="h2o", n_sink=4, compress_every=32, cache_slack=0, max_drop=None, budget_mode="fixed")
    assert policy_label("zoo_h2o", h2o) == "H2O (R=32)"  # no label: the kind's name and R
    assert policy_label("zoo_knorm", dict(h2o, type="knorm", budget_mode="cap")) == "Key-norm (R=32, cap)"
    assert policy_label("zoo_tova", dict(h2o, type="tova"), "Mine") == "Mine (R=32)"
    assert policy_label("zoo_sink", dict(h2o, type="sink")) == "zoo_sink"  # other kinds keep their name


def test_zoo_table_one_block_per_peak_and_r(tmp_path):
    from kvstream.study import zoo

    agg = _zoo_agg(tmp_path)
    assert agg["role"] == "zoo"
    table = tables.experiment_table(agg, "zoo")
    assert r"\label{tab:zoo}" in table and "Which tokens to evict" in table
    assert "over the 3 samples" in table and "(16 and 32 tokens)" in table  # interval and equal peak lengths
    body = table[table.index(r"\begin{tabular}"):]
    rows = [line for line in body.splitlines() if line.endswith(r"\\") and "&" in line][1:]  # after the head
    assert rows[0].startswith("Full recomputation (reference)")
    first = [r.split(" & ")[:3] for r in rows[1:7]]  # peak 16, R = 1: sink first, then the kinds in order
    assert first == [["Sink (StreamingLLM)", "1", "16"], ["Window (no sinks)", "1", "16"], ["H2O", "1", "16"],
                     ["TOVA", "1", "16"], ["Key-norm", "1", "16"], ["Random", "1", "16"]]
    h2o = agg["policies"]["zoo_h2o_p16_r1"]
    line = next(r for r in rows if r.startswith("H2O & 1 & 16"))
    assert latex.fmt_ci(h2o, "decode_ppl_increase_percent", 2, signed=True) in line
    assert latex.fmt_ci(h2o, "tpot_ms", 1) in line and latex.fmt_ci(h2o, "speedup") in line
    assert body.count(r"\midrule") == 1 + len(zoo.blocks(agg))  # head, then one rule per block
    assert [k[:2] for k in zoo.blocks(agg)] == [(16, 1), (16, 4), (32, 1), (32, 4)]
    agg["policies"]["zoo_h2o_p16_r1"]["recent"] = 4  # where the aggregate has H2O's recent window, it is shown
    assert "H2O (recent 4) & 1 & 16" in tables.experiment_table(agg, "zoo")


def _zoo_macros(agg) -> dict[str, str]:
    return _newcommands(macros.macros_tex({"zoo": agg}, {"experiments": {"zoo": {"role": "zoo"}}}))


def test_zoo_sentences_take_their_direction_from_the_data(tmp_path):
    # h2o before sink in the list: a smaller NLL shift, so a lower PPL increase; knorm after: higher
    pols = ["recompute", "zoo_h2o_p16_r1", "zoo_sink_p16_r1", "zoo_knorm_p16_r1"]
    agg = _zoo_agg(tmp_path / "eight", pols, n_samples=8)
    tex = macros.macros_tex({"zoo": agg}, {"experiments": {"zoo": {"role": "zoo"}}})
    assert r"\haveZootrue" in tex
    m = _newcommands(tex)
    quality = m["ZooQualitySentence"]
    assert "paired over the 8 samples" in quality
    assert "H2O has a lower PPL increase" in quality and "Key-norm has a higher PPL increase" in quality
    assert "the interval excludes zero" in quality
    diff = contrast(agg, {"zoo_h2o_p16_r1": 1, "zoo_sink_p16_r1": -1}, metric="decode_ppl_increase_percent")
    assert diff["hi"] < 0 and latex.fmt(diff["value"], 2, True) in quality
    assert m["ZooPeaks"] == "16" and m["ZooRValues"] == "1" and m["ZooNSamples"] == "8"
    assert m["ZooTableRef"] == r"Table~\ref{tab:zoo}" and m["KvZooTable"] == r"\input{generated/tables/zoo.tex}"
    assert "one $R$ only" in m["ZooLazySentence"]
    assert "no forward measured" in m["ZooSetupSentence"]
    # the same direction over 3 samples: an interval that cannot be evidence, and says so
    few = _newcommands(macros.macros_tex({"zoo": _zoo_agg(tmp_path / "three", pols)},
                                         {"experiments": {"zoo": {"role": "zoo"}}}))
    assert "H2O has a nominally lower PPL increase" in few["ZooQualitySentence"]
    assert "with only 3 samples these intervals are descriptive ranges" in few["ZooQualitySentence"]
    assert "excludes zero" not in few["ZooQualitySentence"]
    assert "H2O 0.92$\\times$" in few["ZooSpeedSentence"] and "faster" in few["ZooSpeedSentence"]  # 11 vs 12 ms


def test_zoo_similar_when_the_interval_includes_zero(tmp_path):
    base = [np.linspace(1.0, 3.0, 47) + 0.1 * i for i in range(8)]
    noise = [0.02, -0.02, 0.01, -0.01, 0.015, -0.015, 0.02, -0.02]  # tova vs sink: both signs across samples
    paths = []
    for i in range(8):
        paths.append(make_cell(tmp_path, "recompute", i, base[i], 100.0))
        paths.append(make_cell(tmp_path, "zoo_sink_p16_r1", i, base[i] + 0.1, 10.0))
        paths.append(make_cell(tmp_path, "zoo_tova_p16_r1", i, base[i] + 0.1 + noise[i], 10.0))
    agg = aggregate(tmp_path, paths, experiment="zoo", policies=["recompute", "zoo_sink_p16_r1", "zoo_tova_p16_r1"])
    quality = _zoo_macros(agg)["ZooQualitySentence"]
    assert "TOVA has a similar PPL increase" in quality and "the interval includes zero" in quality


def test_zoo_macros_without_a_zoo_are_placeholders(tmp_path):
    aggs = _all_aggs(tmp_path)
    tex = macros.macros_tex(aggs, {"experiments": ROLES, "paper": PAPER})
    assert r"\haveZoofalse" in tex and r"\haveZootrue" not in tex
    assert _newcommands(tex)["ZooQualitySentence"] == "n/a"


def test_zoo_figures_with_one_and_several_budgets(tmp_path):
    from kvstream.study import figures, zoo_figures

    agg = _zoo_agg(tmp_path / "full")
    out = figures.all_figures({"zoo": agg}, [], tmp_path / "fig", extra_dirs=[tmp_path / "paperfig"])
    names = {p.name for p in out}
    for stem in zoo_figures.ZOO_FIGURES:
        assert {f"{stem}.pdf", f"{stem}.png"} <= names
        assert (tmp_path / "paperfig" / f"{stem}.pdf").read_bytes()[:4] == b"%PDF"
    one = _zoo_agg(tmp_path / "one", ["recompute", "zoo_sink_p16_r4", "zoo_h2o_p16_r4", "zoo_knorm_p16_r4"], 2)
    out = zoo_figures.zoo_figures(one, tmp_path / "fig_one")  # one budget, one R: points
    assert sorted(p.name for p in out) == ["zoo_ppl.pdf", "zoo_ppl.png", "zoo_speed.pdf", "zoo_speed.png"]
    with pytest.raises(ValueError, match="unknown zoo figure"):
        zoo_figures.zoo_figure(one, "zoo_other", tmp_path / "fig_one")
