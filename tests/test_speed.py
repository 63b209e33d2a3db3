"""`kvstream speed`: schedule periods and timed windows, the CLI end to end, and its input errors."""

import json

import numpy as np
import pytest

from kvstream.cli import main as cli_main
from kvstream.errors import KVStreamError
from kvstream.schedule import Policy, cache_lengths, eviction_events
from kvstream.schedule import steady_schedule, timed_window
from kvstream.stats import ratio_ci as ratio

policy_from_dict = Policy.from_dict


def sink(r, sigma=0, delta=None, s=32, w=224):
    return Policy("sink", n_sink=s, window_size=w, compress_every=r, cache_slack=sigma, max_drop=delta).resolved()


def run(argv):
    with pytest.raises(SystemExit) as exc:
        cli_main(argv)
    return exc.value.code


# ------------------------------------------------------------------------------------------------
# period and window, against the pure schedule


@pytest.mark.parametrize("policy, period, transient", [
    (sink(1), 1, 1),  # the first step (from the prefill at C) has no event
    (sink(1, 16, 32), 1, 1),
    (sink(16, 16, 32), 16, 1),
    (sink(32, 16, 32), 32, 1),
    (sink(64, 16, 32), 48, 17),  # the event leaves sigma = 16 over budget: 48 steps to the next one
    (sink(128, 16, 32), 112, 17),
    (sink(8), 8, 1),  # delta = None
    (sink(8, 6, 2, s=4, w=36), 2, 7),  # the drop cap binds: two tokens per event, every other step
    (sink(5, 3, None, s=4, w=36), 5, 1),
    (Policy("window", window_size=40).resolved(), 1, 1),
    (Policy("sink", n_sink=4, compress_every=16, cache_slack=8, max_drop=4, budget_mode="cap", cap=48).resolved(), None, None),
])
@pytest.mark.parametrize("min_steps, min_events", [(64, 2), (1, 1), (100, 7)])
def test_period_and_window_follow_the_schedule(policy, period, transient, min_steps, min_events):
    s = steady_schedule(policy)
    if period is not None:
        assert (s.period, s.transient) == (period, transient)
    n_steps = s.transient + 20 * s.period + 50
    seq = [policy.budget] + cache_lengths(policy, policy.budget + 1 + n_steps)  # after prefill, after each step
    tail = seq[s.transient:]
    # periodic with p from the transient on, with no smaller period, and no shorter transient
    assert all(tail[i] == tail[i + s.period] for i in range(len(tail) - s.period))
    assert not any(all(tail[i] == tail[i + q] for i in range(len(tail) - q)) for q in range(1, s.period))
    assert s.transient == 0 or seq[s.transient - 1] != seq[s.transient - 1 + s.period]
    assert list(s.lengths) == seq[s.transient + 1 : s.transient + 1 + s.period]
    events = [step for step, _ in eviction_events(policy, policy.budget + 1 + n_steps)]
    assert s.events_per_period == sum(s.transient <= e < s.transient + s.period for e in events) >= 1

    w = timed_window(s, min_steps, min_events)
    in_window = sum(s.transient <= e < s.transient + w for e in events)
    assert w % s.period == 0 and w >= min_steps and in_window >= min_events
    smaller = w - s.period  # the smallest such multiple
    assert smaller < min_steps or sum(s.transient <= e < s.transient + smaller for e in events) < min_events


def test_policies_without_eviction_use_min_steps():
    for policy in (Policy("dense", cap=48), Policy("recompute", cap=48)):
        s = steady_schedule(policy)
        assert (s.period, s.transient, s.events_per_period, s.lengths) == (1, 0, 0, (48,))
        assert timed_window(s, 37, 5) == 37


def test_policy_from_dict_round_trip_and_errors():
    p = Policy("sink", n_sink=4, compress_every=16, cache_slack=8, max_drop=4, budget_mode="cap", cap=48).resolved()
    assert policy_from_dict(p.as_dict()) == p
    with pytest.raises(KVStreamError, match="unknown key 'windw'"):
        policy_from_dict({"type": "window", "windw": 3})
    with pytest.raises(KVStreamError, match="budget=41 differs"):
        policy_from_dict({"type": "window", "window_size": 40, "budget": 41})
    with pytest.raises(KVStreamError, match="max_forward_len=47 differs"):
        policy_from_dict({"type": "recompute", "cap": 48, "max_forward_len": 47})


def test_ratio_interval():
    assert ratio([2.0, 2.0], [1.0, 1.0]) == {"estimate": 2.0, "ci95": [2.0, 2.0]}
    r = ratio([2.0, 4.0], [1.0, 1.0])
    half = 12.706 * np.std(np.log([2, 4]), ddof=1) / np.sqrt(2)
    assert r["estimate"] == 3.0 and r["ci95"] == pytest.approx([np.sqrt(8) * np.exp(-half), np.sqrt(8) * np.exp(half)])


# ------------------------------------------------------------------------------------------------
# the command


POLICIES = {
    "recompute": {"type": "recompute", "cap": 48, "budget": 48, "max_forward_len": 48},  # as the pipeline writes it
    "dense": {"type": "dense", "cap": 48},
    "window": {"type": "window", "window_size": 40},
    "sink A": {"type": "sink", "n_sink": 4, "window_size": 36, "compress_every": 8, "cache_slack": 4, "max_drop": 2,
               "budget": 40},
    "sink B": {"type": "sink", "n_sink": 4, "compress_every": 16, "cache_slack": 8, "max_drop": 4,
               "budget_mode": "cap", "cap": 48, "max_forward_len": 48},
}
ENTRY_KEYS = {"policy", "period", "window_steps", "steps", "events", "mean_forward_len", "mean_ms", "median_ms",
              "p10_ms", "p90_ms", "round_mean_ms", "ratio_to_reference", "ratio_to_floor"}


@pytest.fixture
def inputs(tmp_path, model):
    model.save_pretrained(tmp_path / "model")
    np.save(tmp_path / "t.npy", np.random.default_rng(0).integers(0, 128, 100).astype(np.int64))
    (tmp_path / "policies.json").write_text(json.dumps(POLICIES))
    return tmp_path


def speed_args(d, *extra, model=None, policies=None):
    return ["speed", "--model", str(model or d / "model"), "--tokens", str(d / "t.npy"),
            "--policies", policies or str(d / "policies.json"), "--reference", "sink A",
            "--out", str(d / "out" / "speed.json"), "--threads", "1", *extra]


def test_speed_cli_end_to_end(inputs, family, capsys):
    rounds, min_steps, steady_steps = 2, 16, 6
    # one family reads the policies from a file, the other from a literal JSON string
    literal = json.dumps(POLICIES) if family == "gpt_neox" else None
    argv = speed_args(inputs, "--rounds", str(rounds), "--min-steps", str(min_steps), "--steady-steps", str(steady_steps),
                      policies=literal)
    assert run(argv) == 0
    result = json.loads((inputs / "out" / "speed.json").read_text())
    assert result["kind"] == "kvstream-speed" and result["execution"] == "eager" and result["rounds"] == rounds
    assert result["reference"] == "sink A" and result["floor_len"] == 48 and result["device"] == "cpu"
    for key in ("model", "tokens_file", "device_name", "dtype", "threads", "torch", "transformers", "git_commit",
                "started_at"):
        assert key in result
    from kvstream.codeversion import SPEED_ENTRY, code_version
    assert result["code_version"] == code_version(SPEED_ENTRY)  # what the workflow's speed rule keys on
    assert list(result["policies"]) == list(POLICIES)
    entries = {"floor": result["floor"], **result["policies"]}
    for name, e in entries.items():
        assert ENTRY_KEYS <= set(e), name
        policy = policy_from_dict(e["policy"])
        s = steady_schedule(policy)
        assert e["period"] == s.period and e["window_steps"] % s.period == 0
        assert e["steps"] == rounds * e["window_steps"] and len(e["round_mean_ms"]) == rounds
        assert 0 < e["p10_ms"] <= e["median_ms"] <= e["p90_ms"] and e["mean_ms"] > 0
        for key in ("ratio_to_reference", "ratio_to_floor"):
            lo, hi = e[key]["ci95"]
            assert lo <= hi and e[key]["estimate"] > 0
        if policy.evicts:  # the events the pure schedule predicts inside the timed windows (all rounds)
            start = s.transient + s.period  # after the transient and --warmup-periods 1
            n = policy.budget + 1 + start + e["steps"] + 1
            predicted = sum(start <= step < start + e["steps"] for step, _ in eviction_events(policy, n))
            assert e["events"] == predicted >= 2 * rounds and e["window_steps"] >= min_steps
            assert e["mean_forward_len"] == pytest.approx(np.mean(s.lengths))
        else:
            assert e["events"] == 0 and e["mean_forward_len"] == 48 and e["window_steps"] == steady_steps
    assert result["policies"]["sink A"]["ratio_to_reference"] == {"estimate": 1.0, "ci95": [1.0, 1.0]}
    assert result["floor"]["ratio_to_floor"] == {"estimate": 1.0, "ci95": [1.0, 1.0]}
    assert result["floor"]["policy"]["type"] == "dense" and result["floor"]["policy"]["cap"] == 48
    assert result["policies"]["window"]["events"] == result["policies"]["window"]["steps"]  # R = 1: every step
    table = (inputs / "out" / "speed.md").read_text()
    assert "| floor (dense@48) |" in table and all(f"| {name} |" in table for name in POLICIES)
    assert "| sink A |" in capsys.readouterr().out


@pytest.mark.parametrize("change, message", [
    (lambda p: p["window"].update(windw=3), "policy 'window': unknown key 'windw'"),
    (lambda p: p["sink A"].update(budget=99), "policy 'sink A': budget=99 differs"),
    (lambda p: p["dense"].pop("cap"), "policy 'dense': cap is required"),
    (lambda p: p.pop("sink A"), "--reference 'sink A' is not a policy name"),
])
def test_bad_policies_fail_before_the_model_loads(tmp_path, capsys, change, message):
    policies = json.loads(json.dumps(POLICIES))
    change(policies)
    np.save(tmp_path / "t.npy", np.arange(10))
    # a model path that does not exist: reaching the model load would give another error
    assert run(speed_args(tmp_path, model=tmp_path / "no-model", policies=json.dumps(policies))) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra, message", [
    (["--rounds", "1"], "--rounds must be >= 2, got 1"),
    (["--execution", "graph", "--device", "cpu"], "--execution graph needs CUDA"),
    (["--min-steps", "0"], "--min-steps must be >= 1"),
    (["--out", "speed.txt"], "must end in .json"),
    (["--tokens", "missing.npy"], "missing.npy: no such file"),
])
def test_bad_arguments_fail_before_the_model_loads(tmp_path, capsys, extra, message):
    np.save(tmp_path / "t.npy", np.arange(10))
    assert run(speed_args(tmp_path, *extra, model=tmp_path / "no-model", policies=json.dumps(POLICIES))) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_out_folder_must_be_writable(tmp_path, capsys):
    np.save(tmp_path / "t.npy", np.arange(10))
    out = tmp_path / "t.npy" / "speed.json"  # its "folder" is a file
    argv = speed_args(tmp_path, "--out", str(out), model=tmp_path / "no-model", policies=json.dumps(POLICIES))
    assert run(argv) == 2
    assert "is not writable" in capsys.readouterr().err
