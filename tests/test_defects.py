"""The defect switches (kvstream.defects): each reproduces one defect of the original implementation and nothing
else, bad names and switches that cannot act are refused naming the field, and a policy with switches is never
taken for its clean twin."""

import dataclasses

import numpy as np
import pytest
import torch

from conftest import tiny_model
from kvstream import defects
from kvstream.cache import StreamingCache
from kvstream.decode import Decoder
from kvstream.errors import KVStreamError
from kvstream.evaluate import run_cells
from kvstream.schedule import Policy, cache_lengths, eviction_events
from test_cache import SyntheticStream, _cache_logits, _cache_relative_logits, rotate_exact

SINK = dict(type="sink", n_sink=4, window_size=28, compress_every=1, cache_slack=0, max_drop=None)


def _with(base: dict, *switches, **fields) -> Policy:
    return Policy.from_dict({**base, **fields, "defects": list(switches)}, strict=True)


def _logit_error(policy: Policy, steps: int) -> float:
    """Relative error of the cache's attention logits against freshly rotated float64 keys at cache-relative
    positions, after `steps` single-token steps (tiny llama, synthetic keys)."""
    stream = SyntheticStream(tiny_model("llama"), policy)
    stream.feed(policy.budget)
    for _ in range(steps):
        stream.feed(1)
    query = stream.raw[-1]
    ref = _cache_relative_logits(stream, query)
    return ((_cache_logits(stream, query).double() - ref).abs().max() / ref.abs().max()).item()


# --------------------------------------------------------------------------------------------- the field
def test_bad_names_and_switches_that_cannot_act_are_refused_naming_the_field():
    with pytest.raises(KVStreamError, match=r"defects: unknown switch 'fp32'.*fp16_rerotation, boundary_twice"):
        _with(SINK, "fp32")
    with pytest.raises(KVStreamError, match="defects must be a list"):
        Policy.from_dict({**SINK, "defects": "boundary_twice"})
    with pytest.raises(KVStreamError, match="defects: 'slack_window' does not apply.*cache_slack"):
        _with(SINK, "slack_window")  # sigma = 0: the switch would change nothing
    with pytest.raises(KVStreamError, match="defects: 'boundary_twice' does not apply.*recompute"):
        Policy.from_dict({"type": "recompute", "cap": 16, "defects": ["boundary_twice"]})
    with pytest.raises(KVStreamError, match="defects: 'fp16_rerotation' does not apply.*relative"):
        _with(SINK, "fp16_rerotation", positions="absolute")
    with pytest.raises(KVStreamError, match="defects: 'positions_past_trained' does not apply.*n_sink=0"):
        _with(SINK, "positions_past_trained", n_sink=0)


def test_policy_block_round_trips_and_a_clean_block_is_unchanged():
    clean = Policy.from_dict(SINK)
    assert "defects" not in clean.as_dict()  # cells written before the switches existed stay valid
    dirty = _with(SINK, "positions_past_trained", "boundary_twice")  # any order: stored in registry order
    assert dirty.as_dict()["defects"] == ["boundary_twice", "positions_past_trained"]
    assert Policy.from_dict(dirty.as_dict(), strict=True) == dirty
    assert dirty != clean and dataclasses.replace(dirty, defects=()) == clean


def test_config_refuses_an_unknown_switch_and_a_missing_clean_twin():
    from kvstream.config import ConfigError, _check_defect_experiments, _check_policies

    cfg = {"eval": {"cap": 32, "positions": "relative"},
           "policies": {"recompute": {"type": "recompute"}, "s": dict(SINK), "s_b": dict(SINK, defects=["boundary_twice"])},
           "experiments": {"d": {"role": "defects", "dataset": "x", "reference": "recompute",
                                 "policies": ["recompute", "s_b"]}}}
    with pytest.raises(ConfigError, match=r"experiments\.d\.policies\[1\]: policy s_b has defect switches"):
        _check_defect_experiments(cfg)
    cfg["experiments"]["d"]["policies"].insert(1, "s")
    _check_defect_experiments(cfg)
    cfg["policies"]["s_b"]["defects"] = ["boundary"]
    with pytest.raises(ConfigError, match=r"policies\.s_b: defects: unknown switch 'boundary'"):
        _check_policies(cfg)


def test_a_policy_with_switches_never_reuses_its_clean_twins_cells():
    from kvstream.pipeline import Plan

    config = {"model": {"name": "m", "device": "cpu"}, "eval": {"cap": 32, "positions": "relative"},
              "datasets": {"d": {"n_samples": 1, "tokens_per_sample": 64}},
              "policies": {"recompute": {"type": "recompute"}, "s": dict(SINK),
                           "s_fp16": dict(SINK, defects=["fp16_rerotation"]), "s_fp16_again": dict(SINK, defects=["fp16_rerotation"])},
              "experiments": {"d": {"dataset": "d", "role": "defects", "reference": "recompute",
                                    "policies": ["recompute", "s", "s_fp16", "s_fp16_again"]}},
              "speed": {"noise_probe": True}}
    plan = Plan(config, use_cuda=False)
    # the same trace, so only the switch tells them apart
    assert cache_lengths(plan.policy("s"), 64) == cache_lengths(plan.policy("s_fp16"), 64)
    assert plan.reused_from("d", "s_fp16") is None
    assert plan.reused_from("d", "s_fp16_again") == "s_fp16"
    assert plan.speed_policies("d") == ["recompute", "s"]  # the switches are about quality: not timed


# ------------------------------------------------------------------------------------------- the switches
def test_fp16_rerotation_keys_drift_with_the_number_of_events():
    eager = _with(SINK, "fp16_rerotation")
    few, many = _logit_error(eager, 2), _logit_error(eager, 30)
    assert few > 1e-4  # float16 rounding, where the clean cache stays within 1e-5 (tests/test_cache.py)
    assert many > 2 * few  # each event rounds every window key once more
    assert _logit_error(_with(SINK, "fp16_rerotation", compress_every=8), 30) < many  # fewer events: less drift


def test_fp16_rerotation_keeps_the_window_at_its_cache_relative_positions():
    stream = SyntheticStream(tiny_model("llama"), _with(SINK, "fp16_rerotation"))
    stream.feed(32)
    for _ in range(10):
        stream.feed(1)
    cache = stream.cache
    assert cache.events == cache.rebases == 9  # the window rotated back at every event (the first step fills C + 1)
    plan = cache._pending_plan()
    assert plan.rebase == 1 and plan.next_pos == plan.length  # the next forward: keys at 0 .. L-1, the query at L


def test_boundary_token_sits_in_the_cache_twice_and_shifts_the_trace():
    model = tiny_model("llama")
    ids = (torch.arange(80) * 7 % 128)[None]  # neighbours differ
    base = dict(SINK, compress_every=8)
    policy = _with(base, "boundary_twice")
    decoder = Decoder(model, policy, ids)
    with torch.no_grad():
        decoder.prefill(policy.budget)
    cache, p = decoder.cache, policy.budget
    assert cache.length == p + 1 and decoder.t == p  # the next token fed is still x_P
    values = cache.value_buffer[0, 0]  # layer 0 values depend on the token alone, not on its position
    assert torch.allclose(values[:, p - 1], values[:, p], atol=1e-6)  # one token, twice (prefill vs step rounding)
    assert not torch.allclose(values[:, p - 2], values[:, p - 1], atol=1e-3)
    clean = cache_lengths(Policy.from_dict(base), 80)
    shifted = cache_lengths(policy, 80)
    assert len(shifted) == len(clean) and shifted[:6] == [n + 1 for n in clean[:6]]  # one more held, until an event
    first_event = eviction_events(Policy.from_dict(base), 80)[0][0]
    assert eviction_events(policy, 80)[0][0] == first_event - 1  # the duplicate overflows the budget one step earlier
    samples = [ids[0].numpy()]
    dirty = run_cells(model, samples, policy, warmup=0)[0]  # checks the measured trace against cache_lengths
    assert dirty.cache_len == shifted
    clean_cell = run_cells(model, samples, Policy.from_dict(base), warmup=0)[0]
    assert np.array_equal(dirty.nll[:p], clean_cell.nll[:p]) and not np.allclose(dirty.nll[p:], clean_cell.nll[p:])


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_positions_past_trained_offsets_the_window_and_the_query(family):
    model = tiny_model(family, max_position_embeddings=64)
    policy = _with(SINK, "positions_past_trained", compress_every=4)
    offset = 64 - policy.budget
    stream = SyntheticStream(model, policy)
    stream.feed(policy.budget)
    assert stream.cache.next_position() == policy.budget + offset == 64  # the next token: past the trained 64
    for _ in range(41):
        stream.feed(1)
    cache = stream.cache
    assert cache.events > 5 and cache.length > policy.budget
    held = cache.held_tokens()
    # reference: sinks at 0 .. S-1, everything after them (and the query) offset by M - C
    rank = {token: i if i < policy.n_sink else i + offset for i, token in enumerate(held)}
    slots = [int(t) for t in cache.slots.slot_token[: cache.length]]
    positions = torch.tensor([rank[t] for t in slots])
    query = stream.raw[-1]
    assert cache.n_seen - 1 - cache.shift == rank[held[-1]] >= 64  # the query sits past the trained length
    ref = []
    for layer in range(stream.n_layers):
        keys = torch.stack([stream.raw[t][layer] for t in slots], dim=1)
        q_pos = torch.tensor([rank[held[-1]]])
        k = torch.stack([rotate_exact(keys[h], positions, stream.inv_freq32, stream.rotary.rotary_ndims) for h in range(keys.shape[0])])
        q = torch.stack([rotate_exact(query[layer, h][None], q_pos, stream.inv_freq32, stream.rotary.rotary_ndims) for h in range(keys.shape[0])])
        ref.append(torch.einsum("hqd,hkd->hqk", q, k))
    ref = torch.stack(ref)
    got = _cache_logits(stream, query).double()
    assert ((got - ref).abs().max() / ref.abs().max()).item() <= 1e-5
    assert ((_cache_relative_logits(stream, query) - ref).abs().max() / ref.abs().max()).item() > 1e-3  # not clean


def test_positions_past_trained_needs_a_budget_within_the_trained_length():
    with pytest.raises(KVStreamError, match="positions_past_trained needs budget C=32 <= the model's trained length 16"):
        StreamingCache(tiny_model("llama", max_position_embeddings=16), _with(SINK, "positions_past_trained"))


def test_slack_window_reduces_the_window_by_the_slack():
    base = dict(SINK, compress_every=8, cache_slack=3, max_drop=2)
    clean, dirty = Policy.from_dict(base), _with(base, "slack_window")
    assert dirty.window_size == clean.window_size == 28  # the configured W is kept in the block
    assert dirty.budget == clean.budget - 3 and dirty.max_forward_len == clean.max_forward_len - 3
    stream = SyntheticStream(tiny_model("llama"), dirty)
    stream.feed(dirty.prefill_len(90))
    for _ in range(90 - 1 - dirty.budget):
        stream.feed(1)
    assert stream.forward_lengths[1:] == cache_lengths(dirty, 90)
    assert min(stream.forward_lengths[1:]) == dirty.budget + 1 == 4 + 28 - 3 + 1


def test_clean_path_unchanged_and_every_switch_moves_the_nll():
    """Each switch alone changes the real decode's NLL; all four together run through one cache."""
    model = tiny_model("gpt_neox", max_position_embeddings=256)
    base = dict(SINK, compress_every=4, cache_slack=2, max_drop=3)
    samples = [np.random.default_rng(5).integers(0, 128, 96)]
    clean = run_cells(model, samples, Policy.from_dict(base), warmup=0)[0]
    again = run_cells(model, samples, Policy.from_dict(base), warmup=0)[0]
    assert np.array_equal(clean.nll, again.nll)
    for name in [*defects.NAMES, None]:
        switches = [name] if name else list(defects.NAMES)
        dirty = run_cells(model, samples, _with(base, *switches), warmup=0)[0]
        assert not np.array_equal(dirty.nll[clean.prefill_len:], clean.nll[clean.prefill_len:]), name


# ------------------------------------------------------------------------------------------- the table
def test_attribution_table_groups_variants_under_their_clean_preset_beside_the_published_number():
    from kvstream.study import defects as study

    mit = Policy.from_dict(dict(SINK, window_size=252))
    blocks = {"recompute": {"type": "recompute"}, "mit": mit.as_dict(),
              "mit_fp16": _with(dict(SINK, window_size=252), "fp16_rerotation").as_dict(),
              "mit_all": _with(dict(SINK, window_size=252), "fp16_rerotation", "boundary_twice").as_dict(),
              "mit_boundary": _with(dict(SINK, window_size=252), "boundary_twice").as_dict()}

    def row(pol, kind, inc):
        r = {"policy": pol, "type": kind, "n_samples": 8}
        for name, shift in (("decode_ppl_increase_percent", 1.0), ("ppl_increase_percent", 0.0)):
            r.update({name: inc + shift, name + "_lo": inc + shift - 1, name + "_hi": inc + shift + 1})
        return r

    agg = {"experiment": "d", "n_samples": 8, "n_boot": 2000,
           "policies": {"recompute": row("recompute", "recompute", 0.0), "mit": row("mit", "sink", 2.0),
                        "mit_fp16": row("mit_fp16", "sink", 2.5), "mit_boundary": row("mit_boundary", "sink", 1.0),
                        "mit_all": row("mit_all", "sink", 3.0)}}
    (group,) = study.groups(agg, blocks, {"mit": "StreamingLLM"}, {"mit": "Mit"})
    assert group["published"] == 2.33  # the original's MIT StreamingLLM row, matched by its stem
    assert [study.row_label(r) for r in group["rows"]] == ["clean", "keys re-rotated in fp16", "boundary token fed twice",
                                                            "all switches"]
    assert [r["ppl_increase_percent_shift"] for r in group["rows"][1:]] == [0.5, -1.0, 1.0]
    tex = study.table([group], 8, 2000)
    assert r"\label{tab:defects}" in tex and "published: +2.33" in tex and "+3.00" in tex
    macros = study.macros([group], 8)
    assert r"\haveDefectstrue" in macros and "8 samples" in macros
    assert r"the all-target increase by \textminus{}1.00 points (boundary token fed twice)" in macros
    del agg["policies"]["mit_all"]
    with pytest.raises(KVStreamError, match="no row for mit_all"):
        study.groups(agg, blocks)
    assert r"\haveDefectsfalse" in study.absent_macros()
