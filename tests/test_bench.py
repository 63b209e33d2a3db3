"""`kvstream bench` runs every row and reports what it measured (timing targets live in benchmarks/, not here)."""

import json

import pytest

from kvstream.cli import main as cli_main


def test_bench_table_and_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    with pytest.raises(SystemExit) as exc:
        cli_main(["bench", "--shape", "tiny-llama", "--budget", "96", "--steps", "70", "--warmup", "2",
                  "--repeats", "1", "--threads", "1", "--graphs", "on", "--out", str(out)])
    assert exc.value.code == 0
    [result] = json.loads(out.read_text())
    rows = {r["row"]: r for r in result["rows"]}
    assert list(rows) == ["dense@C (floor)", "sink R=1", "sink R=32", "sink R=64", "recompute", "naive R=1", "naive R=64",
                          "dense@C (floor) graph", "sink R=1 graph", "sink R=32 graph", "sink R=64 graph"]
    assert rows["dense@C (floor)"]["ratio_to_floor"] == rows["dense@C (floor) graph"]["ratio_to_floor"] == 1.0
    # every row's forwards stay within C; R=1 and the floor see exactly C every step
    assert rows["sink R=1"]["mean_forward_len"] == rows["dense@C (floor)"]["mean_forward_len"] == 96
    assert rows["sink R=1 graph"]["mean_forward_len"] == rows["dense@C (floor) graph"]["mean_forward_len"] == 96
    assert all(r["mean_forward_len"] <= 96 for r in result["rows"])
    assert all(r["timed_steps"] == 70 and r["tpot_ms_median"] > 0 for r in result["rows"])
    assert "| sink R=64 |" in capsys.readouterr().out
    assert (tmp_path / "bench.md").read_text().count("| naive R=") == 2


def test_bench_rejects_small_budget(capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["bench", "--shape", "tiny-llama", "--budget", "20"])
    assert exc.value.code == 2 and "--budget 20 is too small" in capsys.readouterr().err


def test_paper_table_and_macros_from_committed_gpu_run():
    from pathlib import Path

    from kvstream.bench import latex_macros, latex_table, load_results

    [gpu] = load_results(Path(__file__).parents[1] / "benchmarks" / "h100" / "run4-final-gpu-check.json")
    table, macros = latex_table([gpu], "caption"), latex_macros([gpu])
    rows = {r["row"]: r for r in gpu["rows"]}
    assert f"{rows['sink R=1 graph']['tpot_ms_median']:.2f}" in table and r"\toprule" in table
    assert rf"\newcommand{{\BenchGpuSinkROneGraph}}{{{rows['sink R=1 graph']['ratio_to_floor']:.2f}}}" in macros
    assert r"\BenchGpuBandwidthX" in macros and r"\BenchCpu" not in macros
