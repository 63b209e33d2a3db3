"""`kvstream bench` runs every row and reports what it measured (timing targets live in benchmarks/, not here)."""

import json

import pytest
import torch

from kvstream.cli import main as cli_main


def test_bench_table_and_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    with pytest.raises(SystemExit) as exc:
        cli_main(["bench", "--shape", "tiny-llama", "--budget", "96", "--steps", "70", "--warmup", "2",
                  "--repeats", "1", "--threads", "1", "--graphs", "on", "--out", str(out)])
    assert exc.value.code == 0
    [result] = json.loads(out.read_text())
    rows = {r["row"]: r for r in result["rows"]}
    scored = [f"{kind} R={r}" for kind in ("h2o", "tova", "knorm", "random") for r in (1, 64)]
    assert list(rows) == ["dense@C (floor)", "sink R=1", "sink R=32", "sink R=64", "recompute", *scored, "naive R=1",
                          "naive R=64", "dense@C (floor) graph", "sink R=1 graph", "sink R=32 graph", "sink R=64 graph"]
    for name in scored:  # the price of choosing: they follow the same schedule as the sink rows
        r = int(name.split("=")[1])
        assert rows[name]["mean_forward_len"] == rows[f"sink R={r}"]["mean_forward_len"]
        assert rows[name]["events"] == rows[f"sink R={r}"]["events"]
    assert rows["dense@C (floor)"]["ratio_to_floor"] == rows["dense@C (floor) graph"]["ratio_to_floor"] == 1.0
    # every row's forwards stay within C; R=1 and the floor see exactly C every step
    assert rows["sink R=1"]["mean_forward_len"] == rows["dense@C (floor)"]["mean_forward_len"] == 96
    assert rows["sink R=1 graph"]["mean_forward_len"] == rows["dense@C (floor) graph"]["mean_forward_len"] == 96
    assert all(r["mean_forward_len"] <= 96 for r in result["rows"])
    # whole eviction periods, >= 70 steps and >= 2 events: R=32 -> 3 periods, R=64 -> 2 periods
    for name, r in rows.items():
        steps = 96 if "R=32" in name else 128 if "R=64" in name else 70
        assert r["timed_steps"] == r["window_steps"] == steps and r["timed_steps"] % r["period"] == 0, name
        assert r["events"] == (0 if "floor" in name or name == "recompute" else steps // r["period"]), name
        assert r["tpot_ms_mean"] > 0 and r["tpot_ms_median"] > 0
    floor = rows["dense@C (floor)"]["tpot_ms_mean"]
    assert rows["sink R=64"]["ratio_to_floor"] == pytest.approx(rows["sink R=64"]["tpot_ms_mean"] / floor)
    out = capsys.readouterr().out
    assert "| sink R=64 |" in out and "TPOT mean ms" in out
    assert (tmp_path / "bench.md").read_text().count("| naive R=") == 2


def test_bench_rejects_small_budget(capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["bench", "--shape", "tiny-llama", "--budget", "20"])
    assert exc.value.code == 2 and "--budget 20 is too small" in capsys.readouterr().err


def test_paper_table_and_macros_from_committed_gpu_run():
    from pathlib import Path

    from kvstream.study.bench_table import latex_macros, latex_table, load_results

    [gpu] = load_results(Path(__file__).parents[1] / "benchmarks" / "h100" / "run4-final-gpu-check.json")
    table, macros = latex_table([gpu], "caption"), latex_macros([gpu])
    rows = {r["row"]: r for r in gpu["rows"]}
    assert f"{rows['sink R=1 graph']['tpot_ms_median']:.2f}" in table and r"\toprule" in table
    assert rf"\newcommand{{\BenchGpuSinkROneGraph}}{{{rows['sink R=1 graph']['ratio_to_floor']:.2f}}}" in macros
    assert r"\BenchGpuBandwidthX" in macros and r"\BenchCpu" not in macros
    assert "median of steps" in table  # an old-format result (medians only) says so


def test_paper_table_says_mean_for_new_results(tmp_path):
    from kvstream.bench import run_bench
    from kvstream.study.bench_table import latex_table, load_results

    result = run_bench("tiny-llama", 96, torch.device("cpu"), torch.float32, steps=4, warmup=1, repeats=1,
                       naive=False, graphs=False)
    (tmp_path / "b.json").write_text(json.dumps([result]))
    [loaded] = load_results(tmp_path / "b.json")
    table = latex_table([loaded], "caption")
    assert "mean ms" in table and "median of steps" not in table
    assert f"{loaded['rows'][1]['tpot_ms_mean']:.2f}" in table
