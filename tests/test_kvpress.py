"""kvpress beside ours (benchmarks/kvpress/, kvstream.study.kvpress): combining the two sides, reading the
committed result (a malformed one refused, naming the field), the paper's table and macros from the file, and
kvpress kept out of the main environment."""

import ast
import copy
import importlib.util
import json
from pathlib import Path

import pytest

from kvstream.errors import KVStreamError
from kvstream.study import kvpress as kp

REPO = Path(__file__).resolve().parents[1]
C, STEPS = 8, 6


def _run(variant, rate, decode_nll, evicted, slot_order=(), events=0):
    return {"variant": variant, "rate": rate, "prefill_nll": [1.0] * (C - 1), "decode_nll": list(decode_nll),
            "evicted": [{"step": k, "positions": p} for k, p in evicted], "attended_len": [C + 1] * STEPS,
            "events": events, "slot_order": list(slot_order), "layers_agree": True if rate else None}


def _side(name, quality, floor_rounds, r1_rounds):
    return {"side": name, "budget": C, "n_sink": 4, "steps": STEPS, "rates": [1], "positions": "absolute",
            "dtype": "float32", "threads": 1, "model": "/x/results/models/smollm2-135m",
            "model_source": "embedded:smollm2",
            "tokens": {"document": "kjv-01-genesis", "n_tokens": 15, "sha256": "ab" * 32},
            "versions": {"python": "3.11", "torch": "2.13.0", "transformers": "5.24.0" if name == "ours" else "5.2.0",
                         **({"kvpress": "0.5.5"} if name == "kvpress" else {})},
            "git_commit": "c0ffee", "git_dirty": False, "cpu": "a CPU", "cpu_count": 2,
            "started_at": "t0", "finished_at": "t1", "seconds": 1.0, "quality": quality,
            "timing": {"rounds": 2, "round_steps": 4, "warmup_steps": 2, "floor_len": C + 1, "load_1min": [2.0, 3.5],
                       "entries": {"floor": {"mean_ms": sum(floor_rounds) / 2, "round_mean_ms": floor_rounds},
                                   "R=1": {"mean_ms": sum(r1_rounds) / 2, "round_mean_ms": r1_rounds}}}}


def sides():
    """Ours evicts the oldest non-sink token at every step from step 1 on; kvpress the same at step 1, then at
    step 2 a sink (position 2), as its unsorted slots make it do; kvpress with sorted indices matches ours."""
    oldest = [(k, [3 + k]) for k in range(1, STEPS)]
    ours_nll = [2.0, 2.1, 2.2, 2.3, 2.4, 2.5]
    kv_nll = [2.0, 2.1, 3.2, 3.3, 3.4, 3.5]
    ours = _side("ours", [_run("ours", None, ours_nll, []), _run("ours", 1, ours_nll, oldest, events=5)],
                 [10.0, 10.0], [9.8, 9.6])
    kv_evicted = [(1, [4]), (2, [2]), (3, [5]), (4, [6]), (5, [7])]
    slots = [{"step": 0, "slots": [5, 1, 2, 3, 0], "ascending": False}]
    kvpress = _side("kvpress", [_run("kvpress", None, [x + 1e-6 for x in ours_nll], []),
                                _run("kvpress", 1, kv_nll, kv_evicted, slots, events=6),
                                _run("kvpress_sorted", 1, ours_nll, oldest, events=6)],
                    [10.0, 12.0], [15.0, 18.0])
    return ours, kvpress


@pytest.fixture
def result():
    ours, kvpress = sides()
    return kp.combine_sides(ours, kvpress, uptime={"before": "load average: 1.0", "after": "load average: 2.0"},
                            hostname="box")


def test_combine_finds_where_the_held_sets_and_the_nll_part(result):
    (row,) = result["rates"]
    assert row["first_held_difference_step"] == 2 and row["first_nll_difference_step"] == 2
    assert row["first_differing_event"] == {"step": 2, "ours": [5], "kvpress": [2]}
    assert row["sinks_held_at_end"] == {"ours": 4, "kvpress": 3}
    assert row["first_step_without_all_sinks"] == {"ours": None, "kvpress": 2}
    assert row["sorted_held_identical"] and row["sorted_max_abs_dnll"] == 0.0
    assert row["nll"]["kvpress"] == pytest.approx(sum([2.0, 2.1, 3.2, 3.3, 3.4, 3.5]) / 6)
    assert row["ratio_to_floor"]["ours"]["estimate"] == pytest.approx(9.7 / 10.0)
    assert row["ratio_to_floor"]["kvpress"]["estimate"] == pytest.approx(16.5 / 11.0)
    assert result["no_eviction"]["max_abs_dnll"] == pytest.approx(1e-6, abs=1e-9)
    assert result["provenance"]["load_1min_max"] == 3.5 and result["provenance"]["uptime_after"].endswith("2.0")


def test_held_sets_rebuild_each_step_from_the_evictions():
    run = _run("ours", 1, [0.0] * 3, [(1, [4]), (2, [5])])
    held = kp.held_sets(run, C)
    assert held[0] == set(range(C + 1))
    assert held[2] == set(range(C + 3)) - {4, 5}


def test_combine_refuses_sides_that_saw_different_inputs():
    ours, kvpress = sides()
    kvpress["tokens"]["sha256"] = "cd" * 32
    with pytest.raises(KVStreamError, match="tokens.sha256"):
        kp.combine_sides(ours, kvpress, uptime={}, hostname="box")
    ours, kvpress = sides()
    kvpress["budget"] = 16
    with pytest.raises(KVStreamError, match="budget"):
        kp.combine_sides(ours, kvpress, uptime={}, hostname="box")


@pytest.mark.parametrize("field", ["rates", "versions", "timing", "no_eviction"])
def test_the_reader_refuses_a_result_missing_a_field(tmp_path, result, field):
    bad = copy.deepcopy(result)
    del bad[field]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(KVStreamError, match=f"'{field}' is missing"):
        kp.load_result(path)


def test_the_reader_names_a_bad_field_inside_a_rate(tmp_path, result):
    bad = copy.deepcopy(result)
    bad["rates"][0]["first_held_difference_step"] = "two"
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(KVStreamError, match=r"rates\[0\].*first_held_difference_step"):
        kp.load_result(path)
    bad = copy.deepcopy(result)
    bad["rates"][0]["ratio_to_floor"]["kvpress"] = {"estimate": 1.5}
    path.write_text(json.dumps(bad))
    with pytest.raises(KVStreamError, match="ratio_to_floor.kvpress"):
        kp.load_result(path)
    path.write_text("{not json")
    with pytest.raises(KVStreamError, match="cannot read"):
        kp.load_result(path)


def test_table_and_macros_come_from_the_file(tmp_path, result):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(result))
    loaded = kp.load_result(path)
    macros, table = kp.latex_macros(loaded), kp.latex_table(loaded)
    assert r"\haveKvpresstrue" in macros
    assert r"\newcommand{\KvpressVersion}{0.5.5}" in macros
    assert r"\newcommand{\KvpressModel}{SmolLM2-135M-Instruct}" in macros
    assert r"\newcommand{\KvpressNoEvictionMaxDiff}{1.0\times 10^{-6}}" in macros
    assert r"\newcommand{\KvpressLoad}{2.0--3.5}" in macros
    assert "at decode step 2" in macros and "after its 2nd compression" in macros and "3 of the 4 sinks" in macros
    assert "exactly our tokens" in macros  # the sorted variant matched ours
    assert "16.5" not in macros and "1.50" in macros  # ratios, not times, in the prose
    assert r"\label{tab:kvpress}" in table and r"\newcommand{\KvpressTable}" in table
    row = loaded["rates"][0]
    assert kp.fmt(row["nll"]["kvpress"], 3) in table and kp.fmt(row["nll"]["ours"], 3) in table


def test_timing_words_follow_the_intervals(result):
    row = copy.deepcopy(result["rates"][0])
    row["ratio_to_floor"] = {"ours": {"estimate": 0.97, "ci95": [0.9, 1.05]},
                             "kvpress": {"estimate": 1.5, "ci95": [1.3, 1.7]}}
    assert "kvpress's maintenance costs more" in kp.timing_sentence(row)
    row["ratio_to_floor"]["kvpress"]["ci95"] = [1.0, 2.0]
    assert "cannot tell" in kp.timing_sentence(row)


def test_a_run_without_a_result_switches_the_section_off():
    assert r"\haveKvpressfalse" in kp.switch_off()


def test_sci():
    assert kp.sci(0.0) == "0"
    assert kp.sci(3.1e-6) == r"3.1\times 10^{-6}"


def test_kvpress_stays_out_of_the_main_environment():
    assert importlib.util.find_spec("kvpress") is None, "kvpress belongs in .venv-kvpress (benchmarks/kvpress)"
    offenders = []
    for path in sorted((REPO / "src").rglob("*.py")):
        names = {a.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ImportFrom) and n.module}
        if any(name.split(".")[0] == "kvpress" for name in names):
            offenders.append(str(path))
    assert not offenders, offenders
    # the benchmark imports kvpress only inside the functions that run in kvpress's environment
    sides = ast.parse((REPO / "benchmarks/kvpress/sides.py").read_text())
    top = {a.name for n in sides.body if isinstance(n, ast.Import) for a in n.names}
    top |= {n.module for n in sides.body if isinstance(n, ast.ImportFrom)}
    assert "kvpress" not in top


def test_the_committed_requirements_pin_everything():
    lines = [line for line in (REPO / "benchmarks/kvpress/requirements.txt").read_text().splitlines()
             if line and not line.startswith("#")]
    assert all("==" in line for line in lines), [line for line in lines if "==" not in line]
    pins = dict(line.split("==") for line in lines)
    assert pins["kvpress"] == "0.5.5" and pins["torch"] == "2.13.0" and pins["transformers"] < "5.3"


def test_the_config_refuses_a_kvpress_result_that_does_not_exist():
    import yaml

    from kvstream.config import ConfigError, check_config

    schema = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())
    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    cfg.setdefault("bench", {})["kvpress_results"] = ["benchmarks/kvpress/no-such-run.json"]
    with pytest.raises(ConfigError, match=r"bench\.kvpress_results\[0\]"):
        check_config(cfg, schema)
    cfg["bench"]["kvpress_results"] = []
    assert check_config(cfg, schema)["bench"]["kvpress_results"] == []
