"""The config check, torch-free: `check_config` merges the chosen `scale`, validates against the schema
(workflow/schemas/config.schema.yaml), fills in its defaults and checks what a schema cannot say (every
policy through `kvstream.schedule.Policy`, knobs a kind does not use, experiments, sample lengths, the
paper block, the retrieval grid). The first bad field stops the run with a ConfigError naming it, before any job runs."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

from kvstream.cells import check_sample_length, decode_steps
from kvstream.errors import KVStreamError
from kvstream.schedule import Policy, unused_knob


class ConfigError(KVStreamError):
    """A config problem, as one message naming the field ("config error: policies.x.n_sink: ...")."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"config error: {field}: {problem}")


# ------------------------------------------------------------------------------------------- config
def merge(base: dict, over: dict) -> dict:
    """A deep copy of base with over merged in (nested dicts merged, everything else replaced)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def check_config(cfg: dict, schema: dict) -> dict:
    """The config, `scale` merged and the schema's defaults filled in; ConfigError naming the first bad field."""
    cfg = copy.deepcopy(dict(cfg))
    if cfg.get("scale") is not None:
        scales = cfg.get("scales") or {}
        if cfg["scale"] not in scales:
            raise ConfigError("scale", f"'{cfg['scale']}' is not one of the config's scales ({', '.join(scales) or 'none defined'})")
        cfg = merge(cfg, scales[cfg["scale"]])
    _check_schema(cfg, schema)
    _check_policies(cfg)
    _check_experiments(cfg)
    _check_factorial_experiments(cfg)
    _check_defect_experiments(cfg)
    _check_longstream_experiments(cfg)
    _check_samples(cfg)
    _check_paper(cfg)
    _check_retrieval(cfg)
    _check_kvpress_results(cfg)
    return cfg


def _field(path) -> str:
    return ".".join(str(p) for p in path) or "(top level)"


def _check_schema(cfg: dict, schema: dict) -> None:
    """Validate against the schema, then fill in its defaults (in place)."""
    import jsonschema

    errors = list(jsonschema.Draft202012Validator(schema).iter_errors(cfg))
    if errors:
        err = jsonschema.exceptions.best_match(errors)
        path = list(err.absolute_path)
        if err.validator == "required" and isinstance(err.instance, dict):
            missing = [k for k in err.validator_value if k not in err.instance]
            field, problem = _field(path + missing[:1]), "missing (required field)"
        elif err.validator == "additionalProperties" and isinstance(err.instance, dict):
            allowed = set((err.schema.get("properties") or {}).keys())
            extra = [k for k in err.instance if k not in allowed]
            field = _field(path + extra[:1])
            problem = "unknown field" + (f" (allowed: {', '.join(sorted(allowed))})" if allowed else "")
        else:
            field, problem = _field(path), err.message
        if len(errors) > 1:
            problem += f"  ({len(errors) - 1} more problem(s) after this one is fixed)"
        raise ConfigError(field, problem)
    _fill_defaults(cfg, schema)


def _fill_defaults(cfg: dict, schema: dict) -> None:
    """Each property's `default` where it is absent (jsonschema's FAQ recipe, as snakemake.utils.validate)."""
    import jsonschema

    base = jsonschema.Draft202012Validator
    check_properties = base.VALIDATORS["properties"]

    def properties(validator, props, instance, subschema):
        if isinstance(instance, dict):
            for name, sub in props.items():
                if "default" in sub:
                    instance.setdefault(name, copy.deepcopy(sub["default"]))
        yield from check_properties(validator, props, instance, subschema)

    jsonschema.validators.extend(base, {"properties": properties})(schema).validate(cfg)


def policy_fields_from_config(entry: dict, eval_cfg: dict) -> dict:
    """A config policy entry with what the eval section gives it: eval.cap (the recompute window and
    prefill of recompute/dense, the peak length of budget_mode cap), eval.positions (evicting kinds)."""
    fields = dict(entry)
    evicts = Policy(entry["type"]).evicts
    if not evicts or entry.get("budget_mode") == "cap":
        fields["cap"] = eval_cfg["cap"]
    if evicts:
        fields.setdefault("positions", eval_cfg["positions"])
    return fields


def _check_policies(cfg: dict) -> None:
    for name, entry in cfg["policies"].items():
        field = f"policies.{name}"
        if entry.get("budget_mode") == "cap":
            if not Policy(entry["type"]).evicts:
                raise ConfigError(f"{field}.budget_mode", "only the kinds that evict (window, sink and the scored kinds) have a budget")
            if "window_size" in entry:
                raise ConfigError(f"{field}.window_size", "budget_mode cap derives the window from eval.cap; "
                                  "remove window_size or use budget_mode fixed")
        try:
            policy = Policy.from_dict(policy_fields_from_config(entry, cfg["eval"]))
        except KVStreamError as exc:
            if entry.get("budget_mode") == "cap" and entry["type"] == "sink":
                raise ConfigError(field, f"budget_mode cap leaves no window with eval.cap: {exc}") from None
            raise ConfigError(field, str(exc)) from None
        unused = unused_knob(entry, policy)  # refused, not silently dropped
        if unused:
            raise ConfigError(f"{field}.{unused[0]}", f"{unused[1]}: leave it out")


def _check_experiments(cfg: dict) -> None:
    main = None
    for name, e in cfg["experiments"].items():
        field = f"experiments.{name}"
        if e["dataset"] not in cfg["datasets"]:
            raise ConfigError(f"{field}.dataset", f"unknown dataset '{e['dataset']}' (datasets: {', '.join(cfg['datasets'])})")
        for i, p in enumerate(e["policies"]):
            if p not in cfg["policies"]:
                raise ConfigError(f"{field}.policies[{i}]", f"unknown policy '{p}' (policies: {', '.join(cfg['policies'])})")
        if e["reference"] not in e["policies"]:
            raise ConfigError(f"{field}.reference", f"'{e['reference']}' is not one of the experiment's policies; add it "
                              f"to {field}.policies (PPL increase and speedup are measured against it)")
        if e["role"] == "sweep" and "knob" not in e:
            raise ConfigError(f"{field}.knob", "missing: an experiment with role sweep names the policy field it varies "
                              "(n_sink, window_size, compress_every, cache_slack or max_drop)")
        if e["role"] == "main":
            if main is not None:
                raise ConfigError(f"{field}.role", f"experiments.{main} is already the main experiment: one has role main")
            main = name


def _check_defect_experiments(cfg: dict) -> None:
    """An experiment with role defects (kvstream.study.defects) measures each switch against the same policy
    without it: every policy with defect switches needs its clean twin (the same fields, no switches) there."""
    for name, e in cfg["experiments"].items():
        if e["role"] != "defects":
            continue
        resolved = {p: Policy.from_dict(policy_fields_from_config(cfg["policies"][p], cfg["eval"])) for p in e["policies"]}
        clean = {pol for pol in resolved.values() if not pol.defects}
        for i, (p, pol) in enumerate(resolved.items()):
            if pol.defects and dataclasses.replace(pol, defects=()) not in clean:
                raise ConfigError(f"experiments.{name}.policies[{i}]", f"policy {p} has defect switches, but the same "
                                  "policy without them is not in the experiment: add its clean twin to compare against")


def _check_factorial_experiments(cfg: dict) -> None:
    """An experiment with role factorial (kvstream.study.factorial) crosses slack and max-drop at one R: its
    sink policies share every knob but cache_slack and max_drop (so each cell differs only in r), and no
    (sigma, delta) pair appears twice."""
    shared = ("n_sink", "window_size", "compress_every", "budget_mode", "positions", "budget")
    for name, e in cfg["experiments"].items():
        if e["role"] != "factorial":
            continue
        first, pairs = None, {}
        for i, p in enumerate(e["policies"]):
            pol = Policy.from_dict(policy_fields_from_config(cfg["policies"][p], cfg["eval"]))
            if p == e["reference"]:
                continue
            field = f"experiments.{name}.policies[{i}]"
            if pol.type != "sink":
                raise ConfigError(field, f"policy {p} is a {pol.type} policy: a factorial crosses the slack and max-drop "
                                  "of sink policies (move it to another experiment)")
            first = first or (p, pol)
            differs = [k for k in shared if getattr(pol, k) != getattr(first[1], k)]
            if differs:
                raise ConfigError(field, f"policy {p} differs from {first[0]} in {', '.join(differs)}: the cells of a "
                                  "factorial share every knob but cache_slack and max_drop")
            pair = (pol.cache_slack, pol.max_drop)
            if pair in pairs:
                raise ConfigError(field, f"policy {p} repeats cache_slack={pair[0]}, max_drop={pair[1]} of {pairs[pair]}: "
                                  "list each (cache_slack, max_drop) cell once")
            pairs[pair] = p
        if first is None:
            raise ConfigError(f"experiments.{name}.policies", "a factorial needs sink policies besides the reference")


def recompute_every(cfg: dict, dataset: str) -> int:
    """The recompute reference's k on a dataset (docs/method.md, Metrics): datasets.<name>.recompute_every,
    else eval.recompute_every. The one place the override is resolved (kvstream.pipeline.Plan asks here)."""
    return int(cfg["datasets"][dataset].get("recompute_every", cfg["eval"]["recompute_every"]))


def _check_longstream_experiments(cfg: dict) -> None:
    """An experiment with role longstream (kvstream.study.longstream): one per config (the paper has one such
    figure), its reference a recompute policy (increases are paired with its scored targets). A dataset's
    recompute_every acts only on a recompute policy run there."""
    longstream = [name for name, e in cfg["experiments"].items() if e["role"] == "longstream"]
    if len(longstream) > 1:
        raise ConfigError(f"experiments.{longstream[1]}.role", f"experiments.{longstream[0]} is already the long "
                          "stream: one experiment has role longstream")
    for name in longstream:
        e = cfg["experiments"][name]
        if cfg["policies"][e["reference"]]["type"] != "recompute":
            raise ConfigError(f"experiments.{name}.reference", f"policy {e['reference']} is a "
                              f"{cfg['policies'][e['reference']]['type']} policy: the long stream compares every policy "
                              "with a recompute policy on its scored targets; name one")
    for ds, entry in cfg["datasets"].items():
        runs = {p for e in cfg["experiments"].values() if e["dataset"] == ds for p in e["policies"]}
        if "recompute_every" in entry and not any(cfg["policies"][p]["type"] == "recompute" for p in runs):
            raise ConfigError(f"datasets.{ds}.recompute_every", "no experiment runs a recompute policy on this "
                              "dataset, and the field acts on nothing else: remove it")


def _check_samples(cfg: dict) -> None:
    """Each dataset's samples are long enough for every policy run on them (kvstream.cells.check_sample_length)
    and leave decode steps after eval.warmup: what `kvstream eval` checks, here before any job."""
    for e, experiment in cfg["experiments"].items():
        ds = experiment["dataset"]
        n = int(cfg["datasets"][ds]["tokens_per_sample"])
        for name in experiment["policies"]:
            policy = Policy.from_dict(policy_fields_from_config(cfg["policies"][name], cfg["eval"]))  # as the jobs get it
            field = f"datasets.{ds}.tokens_per_sample"
            try:
                check_sample_length(policy, n)
            except KVStreamError as exc:
                raise ConfigError(field, f"policy {name} (experiment {e}): {exc}") from None
            steps = decode_steps(policy, n)
            if cfg["eval"]["warmup"] >= steps:
                raise ConfigError("eval.warmup", f"{cfg['eval']['warmup']} warm-up steps leave none to time: policy {name} "
                                  f"has {steps} decode step(s) on dataset {ds} ({n} tokens a sample)")


def _check_paper(cfg: dict) -> None:
    paper, policies = cfg["paper"], cfg["policies"]
    named = [(f"paper.{key}", paper[key]) for key in ("baseline", "eager") if paper[key] is not None]
    named += [(f"paper.presets[{i}]", p) for i, p in enumerate(paper["presets"])]
    named += [(f"paper.{key}.{p}", p) for key in ("labels", "stems") for p in paper[key]]
    for field, name in named:
        if name not in policies:
            raise ConfigError(field, f"unknown policy '{name}' (policies: {', '.join(policies)})")


def _check_retrieval(cfg: dict) -> None:
    """The retrieval grid (`kvstream retrieval`, workflow/rules/retrieval.smk): known policies, depths in
    [0, 1], a needle dataset that exists, and every length long enough for each evicting policy (its prefill,
    a decode step and its largest forward: kvstream.cells.check_sample_length). Dense and recompute take a
    prompt no longer than their cap in one prefill, which computes the same attention."""
    r = cfg["retrieval"]
    if not r["enabled"]:
        return
    for i, name in enumerate(r["policies"]):
        if name not in cfg["policies"]:
            raise ConfigError(f"retrieval.policies[{i}]", f"unknown policy '{name}' (policies: {', '.join(cfg['policies'])})")
    for i, depth in enumerate(r["depths"]):
        if not 0 <= depth <= 1:
            raise ConfigError(f"retrieval.depths[{i}]", f"{depth} is outside [0, 1] (0: the needle right after the "
                              "instruction, 1: right before the question)")
    if "needle" in r["tasks"]:
        dataset = r.get("needle_dataset")
        if dataset is None:
            raise ConfigError("retrieval.needle_dataset", "missing: the needle task takes its filler from a dataset's "
                              f"documents (datasets: {', '.join(cfg['datasets'])})")
        if dataset not in cfg["datasets"]:
            raise ConfigError("retrieval.needle_dataset", f"unknown dataset '{dataset}' (datasets: {', '.join(cfg['datasets'])})")
    for name in r["policies"]:
        policy = Policy.from_dict(policy_fields_from_config(cfg["policies"][name], cfg["eval"]))
        if not policy.evicts:
            continue
        for i, n in enumerate(r["lengths"]):
            try:
                check_sample_length(policy, n)
            except KVStreamError as exc:
                raise ConfigError(f"retrieval.lengths[{i}]", f"policy {name}: {exc}") from None


def _check_kvpress_results(cfg: dict) -> None:
    """bench.kvpress_results: committed files (benchmarks/kvpress/run.sh writes them), read by the paper's rule."""
    repo = Path(__file__).resolve().parents[2]  # a test may check the shipped config from another folder
    for i, path in enumerate(cfg["bench"]["kvpress_results"]):
        if not (Path(path).is_file() or (repo / path).is_file()):
            raise ConfigError(f"bench.kvpress_results[{i}]", f"{path} does not exist: name a file written by "
                              "benchmarks/kvpress/run.sh (relative to the repository root), or remove the entry")
