"""The (r, R) band and the factorial (issue 15): Policy.band against the simulated trace, sigma and delta acting
only through r, the factorial's config check and identical-schedule reuse, its table and sentences, the
attended-length figure, and recomputation over the whole sample scoring what the dense cache scores."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path

import numpy as np
import pytest
import yaml

from kvstream.config import ConfigError, check_config, merge
from kvstream.pipeline import Plan
from kvstream.schedule import Policy, cache_lengths
from kvstream.study import factorial
from kvstream.study.setup_tables import band_cell, row_band

REPO = Path(__file__).resolve().parents[1]
SCHEMA = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())
GRID = list(itertools.product([0, 4, 32], [8, 50], [1, 2, 5, 16, 64], [0, 1, 3, 16, 70], [None, 0, 1, 4, 16, 64, 100]))


# ------------------------------------------------------------------------------------------ the band
@pytest.mark.parametrize("kind", ["sink", "h2o"])
def test_band_is_the_steady_state_of_the_simulated_trace(kind):
    """After the transient the forwards attend over C + r + 1 .. C + R tokens (the event leaves C + r)."""
    for s, w, r_, sigma, delta in GRID:
        p = Policy(kind, n_sink=s, window_size=w, compress_every=r_, cache_slack=sigma, max_drop=delta).resolved()
        trace = cache_lengths(p, p.budget + 1 + 6 * (p.max_forward_len + 2))
        tail = trace[-3 * (p.max_forward_len + 1):]
        assert (min(tail) - 1, max(tail)) == p.band, (s, w, r_, sigma, delta)
        assert p.band[0] == p.budget + p.kept_overflow


def test_r_is_the_formula_of_method_md_except_where_an_event_removes_nothing():
    for _, _, r_, sigma, delta in GRID:
        p = Policy("sink", n_sink=4, window_size=50, compress_every=r_, cache_slack=sigma, max_drop=delta).resolved()
        if delta == 0 and sigma >= r_:  # an event at overflow R removes nothing: the cache holds at C + sigma + 1
            assert p.band == (p.budget + sigma, p.budget + sigma + 1)
        else:
            assert p.kept_overflow == (0 if delta is None else min(sigma, max(r_ - delta, 0)))
    window = Policy("window", window_size=16).resolved()
    assert window.band == (16, 17) and Policy("dense", cap=8).band is None and Policy("recompute", cap=8).band is None


def test_sigma_and_delta_act_only_through_r():
    """Policies with the same S, W, R: the same r gives the same whole trace, another r another one."""
    traces: dict[tuple, set] = {}
    for s, w, r_, sigma, delta in GRID:
        p = Policy("sink", n_sink=s, window_size=w, compress_every=r_, cache_slack=sigma, max_drop=delta).resolved()
        traces.setdefault((s, w, r_, p.band), set()).add(tuple(cache_lengths(p, p.budget + 200)))
    assert all(len(t) == 1 for t in traces.values())
    per_knobs: dict[tuple, list] = {}
    for (s, w, r_, band), t in traces.items():
        per_knobs.setdefault((s, w, r_), []).append(next(iter(t)))
    assert all(len(set(ts)) == len(ts) for ts in per_knobs.values())  # another band, another trace


# ------------------------------------------------------------------------------ config and the plan
def _extended() -> dict:
    base = yaml.safe_load((REPO / "config.yaml").read_text())
    return merge(base, yaml.safe_load((REPO / "config/extended.yaml").read_text()) or {})


def test_the_extended_factorial_is_three_schedules_two_of_them_evaluated():
    cfg = check_config(_extended(), SCHEMA)
    plan = Plan(cfg, use_cuda=False)
    pols = [p for p in plan.experiment_policies("factorial") if p != "recompute"]
    assert {plan.policy(p).kept_overflow for p in pols} == {0, 16, 32}
    evaluated = [p for p in pols if plan.reused_from("kjv", p) is None]
    assert evaluated == ["fac_s0_d0", "fac_s32_d0"]
    assert plan.reused_from("kjv", "fac_s16_d0") == "ours_best"  # r = 16: Lazy (Best)'s schedule
    assert plan.reused_from("kjv", "fac_s16_dnull") == "fac_s0_d0"  # no cap: r = 0 whatever sigma
    assert "results/aggregate/smollm2-135m/factorial.json" in plan.main_dataset_aggregates()
    assert plan.factorial_experiments == ["factorial"]


@pytest.mark.parametrize("change, field, words", [
    (lambda c: c["policies"]["fac_s0_d16"].update(compress_every=32), "experiments.factorial.policies[2]",
     "differs from fac_s0_d0 in compress_every"),
    (lambda c: c["policies"]["fac_s0_d16"].update(max_drop=0), "experiments.factorial.policies[2]",
     "repeats cache_slack=0, max_drop=0"),
    (lambda c: c["experiments"]["factorial"]["policies"].append("dense"), "experiments.factorial.policies[10]",
     "a dense policy"),
    (lambda c: c["experiments"]["factorial"].update(policies=["recompute"]), "experiments.factorial.policies",
     "needs sink policies"),
])
def test_a_bad_factorial_is_refused_naming_the_field(change, field, words):
    cfg = copy.deepcopy(_extended())
    change(cfg)
    with pytest.raises(ConfigError) as exc:
        check_config(cfg, SCHEMA)
    assert field in str(exc.value) and words in str(exc.value)


# ------------------------------------------------------------------------------- table and sentences
def _row(policy, sigma, delta, inc, length, r_, n=8, **extra):
    return dict({"policy": policy, "label": policy, "type": "sink", "n_sink": 32, "window_size": 224, "budget": 256,
                 "compress_every": 64, "cache_slack": sigma, "max_drop": delta, "budget_mode": "fixed",
                 factorial.METRIC: inc, f"{factorial.METRIC}_lo": inc - 0.5, f"{factorial.METRIC}_hi": inc + 0.5,
                 "trace_mean": length, "trace_min": 257.0, "trace_max": 320.0, "paired_targets": 8 * n,
                 "per_sample": {"trace_sha256": [f"t{r_}"] * n}}, **extra)


def _factorial_agg(incs=None, n=8) -> dict:
    incs = incs or {0: 3.0, 16: 2.0, 32: 1.0}
    rows = {}
    for sigma, delta in itertools.product((0, 16, 32), (0, 16, None)):
        r_ = Policy("sink", n_sink=32, window_size=224, compress_every=64, cache_slack=sigma, max_drop=delta).kept_overflow
        name = f"s{sigma}_d{delta}"
        rows[name] = _row(name, sigma, delta, incs[r_], 288.5 + r_ / 2, r_, n)
    rows["ref"] = {"policy": "ref", "label": "Full recomputation", "type": "recompute", "is_reference": True,
                   "trace_mean": 256.0, factorial.METRIC: 0.0, "max_forward_len": 256}
    return {"experiment": "fac", "role": "factorial", "dataset": "kjv", "reference": "ref", "n_samples": n,
            "n_boot": 2000, "recompute_every": 32, "policies_order": list(rows), "policies": rows,
            "provenance": {"n_tokens": [513]}}


def test_factorial_table_marks_the_cells_that_share_a_schedule():
    tex = factorial.factorial_table(_factorial_agg(), "fac")
    assert tex.count("$r=0$") == 5 and tex.count("$r=16$") == 2 and tex.count("$r=32$") == 2
    assert tex.count("(a)") == 5 and tex.count("(b)") == 2 and tex.count("(c)") == 2  # letters in order of r
    assert r"\label{tab:factorial-grid}" in tex and "8 samples" in tex
    assert r"$\delta=\infty$" in tex and tex.index(r"$\delta=0$") < tex.index(r"$\delta=\infty$")


def test_factorial_sentence_reads_the_ends_of_r_from_their_intervals():
    apart = factorial.factorial_sentence(_factorial_agg())
    assert "3 values of $r$ (0, 16 and 32)" in apart and "do not overlap" in apart and "lowers" in apart
    close = factorial.factorial_sentence(_factorial_agg({0: 1.2, 16: 1.1, 32: 1.0}))
    assert "overlap: over the 8 samples this run does not resolve" in close
    few = factorial.factorial_sentence(_factorial_agg(n=3))
    assert "descriptive ranges" in few and "lowers" not in few


def test_macros_switch_the_grid_on_only_with_a_factorial():
    main = _factorial_agg()
    main.update(role="main", experiment="main")
    on = factorial.factorial_macros({"main": main, "fac": _factorial_agg()})
    assert r"\haveFactorialGridtrue" in on and r"\haveAttendedtrue" in on
    off = factorial.factorial_macros({"main": main})
    assert r"\haveFactorialGridfalse" in off and r"\newcommand{\FactorialSentence}{n/a}" in off


def test_attended_sentence_says_whether_the_sink_caches_lie_on_one_curve(tmp_path):
    rows = [_row(f"p{i}", 0, None, 5.0 - i, 260.0 + 10 * i, i) for i in range(5)]
    rows.append({"policy": "dense", "label": "Dense (no eviction)", "type": "dense", "trace_mean": 384.0,
                 "trace_min": 257.0, "trace_max": 511.0, factorial.METRIC: -2.0, f"{factorial.METRIC}_lo": -2.5,
                 f"{factorial.METRIC}_hi": -1.5})
    rows.append({"policy": "ref", "label": "Full recomputation", "type": "recompute", "is_reference": True,
                 "trace_mean": 256.0, factorial.METRIC: 0.0})
    assert factorial.curve_stats(rows) == {"n": 5, "rho": pytest.approx(-1.0), "pairs": 10, "against": 0}
    assert "lie on one curve" in factorial.attended_sentence(rows, 8)
    rows[0] = _row("p0", 0, None, 9.0, 300.0, 0)  # longer context than p1..p2, higher increase beyond both intervals
    st = factorial.curve_stats(rows)
    assert st["against"] >= 1
    assert "do not lie on one curve" in factorial.attended_sentence(rows, 8)
    dense = factorial.dense_sentence(rows, 8)
    assert "384.0 tokens on average (from 257 to 511" in dense and "over 256 (its window)" in dense
    assert "the interval excludes zero" in dense

    from kvstream.study.factorial_figures import attended_length

    out = attended_length(rows, 8, tmp_path)
    assert sorted(p.name for p in out) == ["attended_length.pdf", "attended_length.png"]


def test_band_cell_of_each_kind():
    assert row_band(_row("x", 16, 32, 1.0, 290.0, 16)) == (16, 272, 320)
    assert band_cell(_row("x", 16, 32, 1.0, 290.0, 16)) == "16: [272, 320]"
    assert band_cell({"type": "window", "budget": 256}) == "0: [256, 257]"
    assert band_cell({"type": "recompute", "max_forward_len": 256}) == "256 (window)"
    assert band_cell({"type": "dense", "trace_min": 257.0, "trace_max": 511.0}) == "[257, 511] (grows)"


# ------------------------------------------------------------------------- dense against recompute
@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_recompute_over_the_whole_sample_scores_what_dense_scores(family):
    """A recompute window as long as every target's context is one causal forward: the dense cache's per-target
    NLL (prefill, then decode through the cache) equals it; a shorter window does not."""
    from conftest import tiny_model

    from kvstream.evaluate import run_cell

    model = tiny_model(family)
    n = 72
    ids = np.random.default_rng(5).integers(0, 128, n).astype(np.int64)
    dense = run_cell(model, ids, Policy("dense", cap=16), warmup=2).nll
    whole = run_cell(model, ids, Policy("recompute", cap=n - 2), warmup=0).nll  # the longest cap a sample allows
    # every target but the last sees its whole context within cap = N - 2 tokens
    np.testing.assert_allclose(dense[: n - 2], whole[: n - 2], rtol=0, atol=2e-5)
    short = run_cell(model, ids, Policy("recompute", cap=16), warmup=2).nll
    assert np.abs(short[16:] - dense[16:]).max() > 1e-3


def test_the_section_and_its_generated_text_name_no_pipeline_identifier(tmp_path):
    """paper/sections/factorial.tex with the macros and grid of a run whose policies carry config names."""
    from test_paper_text import expand, identifier_problems, newcommands, strip_comments

    fac = _factorial_agg()
    fac["policies"] = {f"fac_{k}": dict(r, policy=f"fac_{k}", label=f"fac_{k}") for k, r in fac["policies"].items()}
    fac["policies_order"] = list(fac["policies"])
    main = copy.deepcopy(fac)
    main.update(role="main", experiment="table1")
    macros_tex = factorial.factorial_macros({"table1": main, "factorial": fac})
    section = strip_comments((REPO / "paper/sections/factorial.tex").read_text())
    text = expand(section.replace(r"\input{generated/tables/factorial_grid.tex}",
                                  factorial.factorial_table(fac, "factorial")), newcommands(macros_tex))
    assert r"\AttendedSentence" not in text and "Spearman" in text
    assert identifier_problems(text) == []
    assert text.index(r"\ref{fig:attended-length}") < text.index(r"\begin{figure}")
    assert text.index(r"\ref{tab:factorial-grid}") < text.index(r"\begin{table}")
