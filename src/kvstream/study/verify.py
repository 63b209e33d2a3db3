"""What the aggregate checks before it pools an experiment's cells (docs/INTERFACES.md, cell JSON). Any
mismatch stops it with a KVStreamError naming the cell and the field.

- Each cell: every number the aggregate reads is a finite number (a string, null, NaN or a missing key is
  refused); its .nll.npy is the file the JSON was written with (`nll_sha256`, when the JSON has one) and
  gives the JSON's sums: nll_sum and n_targets over the scored targets, decode_nll_sum and n_decode_targets
  over those after the prefill (NaN targets left out, as `kvstream eval` counts them), and N - 1 targets for
  a sample of N tokens.
- Each policy: all its cells carry one policy block, and it is the block the config resolves for that
  policy (`policy_blocks`, when the caller knows the config: the workflow does).
- The experiment: one model, dataset and dtype, each sample the same token count in every policy, and what
  the config says (`run_facts`); with the config known, every policy has every sample and no cell names a
  policy the experiment does not run.
- Code versions (`cell.code_version`, kvstream.codeversion): cells of different versions are refused unless
  the caller allows them; the aggregate then says which cells came from which version.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from kvstream.cells import check_nll_sha256
from kvstream.errors import KVStreamError
from kvstream.study.inputs import cell_nll, sample_order

# section -> (field, integer?) of every number the aggregate reads from a cell
REQUIRED_NUMBERS = {
    "streaming": (("nll_sum", False), ("n_targets", True), ("decode_nll_sum", False), ("n_decode_targets", True),
                  ("runtime_sec", False), ("decode_time_sec", False), ("decode_tokens", True)),
    "memory": (("peak_memory_mb", False), ("kv_cache_bytes", True)),
    "policy": (("prefill_len", True),),
    "provenance": (("n_tokens", True),),
}
OPTIONAL_NUMBERS = {"streaming": (("prefill_time_sec", False), ("n_targets_total", True))}
# per-cell keys of a policy block, not part of the configured policy
CELL_POLICY_KEYS = ("prefill_len", "recompute_every")
FACTS = ("model", "dataset", "n_tokens", "dtype")


def _number(cell: Mapping, section: str, key: str, integer: bool, required: bool = True):
    block = cell.get(section)
    field = f"{section}.{key}"
    if not isinstance(block, Mapping):
        raise KVStreamError(f"cell {cell['_path']}: '{section}' is {'missing' if block is None else repr(block)}, "
                            "not an object (docs/INTERFACES.md)")
    if key not in block:
        if not required:
            return None
        raise KVStreamError(f"cell {cell['_path']}: {field} is missing")
    value = block[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise KVStreamError(f"cell {cell['_path']}: {field} is {value!r}, not a finite number")
    if integer and value != int(value):
        raise KVStreamError(f"cell {cell['_path']}: {field} is {value!r}, not a whole number")
    return value


def check_numbers(cell: Mapping) -> None:
    """Every number the aggregate reads is there and is a finite number."""
    for numbers, required in ((REQUIRED_NUMBERS, True), (OPTIONAL_NUMBERS, False)):
        for section, fields in numbers.items():
            for key, integer in fields:
                _number(cell, section, key, integer, required)


def _differs(cell: Mapping, field: str, recorded, from_nll) -> None:
    source = (cell.get("reused_from") or {}).get("cell")
    raise KVStreamError(f"cell {cell['_path']}: {field} is {recorded!r} but its .nll.npy gives {from_nll!r}: the JSON "
                        "or the NLL file was changed after the run; rerun the cell"
                        + (f" (a copy of {source}, an identical schedule's: check and rerun that one)" if source else ""))


def check_against_nll(cell: dict) -> None:
    """The cell's .nll.npy is its own (nll_sha256) and gives the JSON's sums and target counts."""
    check_nll_sha256(cell["_path"], cell)
    try:
        nll = cell_nll(cell)
    except (OSError, ValueError) as exc:
        raise KVStreamError(f"cell {cell['_path']}: cannot read its per-target NLL file ({exc})") from None
    if nll.ndim != 1:
        raise KVStreamError(f"cell {cell['_path']}: its .nll.npy has shape {nll.shape}, not one value per target")
    s, prefill = cell["streaming"], int(cell["policy"]["prefill_len"])
    scored, decode = nll[np.isfinite(nll)], nll[prefill:]
    decode = decode[np.isfinite(decode)]
    for key, recorded, computed in (("n_targets", s["n_targets"], scored.size),
                                    ("n_decode_targets", s["n_decode_targets"], decode.size)):
        if int(recorded) != computed:
            _differs(cell, f"streaming.{key}", recorded, computed)
    for key, recorded, computed in (("nll_sum", s["nll_sum"], float(scored.sum())),
                                    ("decode_nll_sum", s["decode_nll_sum"], float(decode.sum()))):
        if not math.isclose(recorded, computed, rel_tol=1e-9, abs_tol=1e-9):
            _differs(cell, f"streaming.{key}", recorded, computed)
    if s.get("n_targets_total") is not None and int(s["n_targets_total"]) != nll.size:
        _differs(cell, "streaming.n_targets_total", s["n_targets_total"], nll.size)
    n_tokens = int(cell["provenance"]["n_tokens"])
    if nll.size != n_tokens - 1:
        raise KVStreamError(f"cell {cell['_path']}: its .nll.npy has {nll.size} targets but provenance.n_tokens is "
                            f"{n_tokens} (a sample of N tokens has N - 1 targets)")


def cell_facts(cell: Mapping) -> dict:
    """What every cell of an experiment shares: model (label, else provenance), dataset, tokens, dtype."""
    labels, prov = cell.get("cell") or {}, cell.get("provenance") or {}
    return {"model": labels.get("model", prov.get("model")), "dataset": labels.get("dataset"),
            "n_tokens": prov.get("n_tokens"), "dtype": prov.get("dtype")}


def _first_difference(a: Mapping, b: Mapping) -> str | None:
    return next((k for k in sorted(set(a) | set(b)) if a.get(k, KeyError) != b.get(k, KeyError)), None)


def _show(block: Mapping, key: str) -> str:
    return repr(block[key]) if key in block else "missing"


def check_policy(name: str, cells: Mapping[str, dict], configured: Mapping | None) -> None:
    """All cells of a policy carry one policy block, the configured one when given."""
    samples = sample_order(cells)
    first = cells[samples[0]]
    for s in samples[1:]:
        key = _first_difference(first["policy"], cells[s]["policy"])
        if key is not None:
            raise KVStreamError(f"cell {cells[s]['_path']}: policy.{key} is {_show(cells[s]['policy'], key)} but "
                                f"{_show(first['policy'], key)} in {first['_path']}: the cells of policy {name} come "
                                "from different policies")
    if configured is not None:
        block = {k: v for k, v in first["policy"].items() if k not in CELL_POLICY_KEYS}
        key = _first_difference(block, configured)
        if key is not None:
            raise KVStreamError(f"cell {first['_path']}: policy.{key} is {_show(block, key)} but the config's policy "
                                f"{name} has {_show(configured, key)}: the cell is not this policy's (rerun it)")


def check_experiment(by_policy: Mapping[str, Mapping[str, dict]], policies: Sequence[str], *,
                     policy_blocks: Mapping[str, Mapping] | None = None, run_facts: Mapping | None = None) -> None:
    """Every check of the module docstring but the code versions, over the cells of `policies`."""
    if policy_blocks is not None:
        for pol, cells in by_policy.items():
            if pol not in policy_blocks:
                some = next(iter(cells.values()))["_path"]
                raise KVStreamError(f"cell {some}: cell.policy is {pol!r}, not one of the experiment's policies "
                                    f"({', '.join(policy_blocks)})")
    first: dict | None = None
    tokens: dict[str, dict] = {}  # sample -> the first cell of it
    for pol in policies:
        for s in sample_order(by_policy[pol]):
            cell = by_policy[pol][s]
            check_numbers(cell)
            check_against_nll(cell)
            facts = cell_facts(cell)
            for key, value in (run_facts or {}).items():
                if facts.get(key) != value:
                    raise KVStreamError(f"cell {cell['_path']}: its {key} is {facts.get(key)!r} but the config's run has "
                                        f"{value!r}")
            first = first or cell
            for key in ("model", "dataset", "dtype"):
                if facts[key] != cell_facts(first)[key]:
                    raise KVStreamError(f"cell {cell['_path']}: its {key} is {facts[key]!r} but {cell_facts(first)[key]!r} "
                                        f"in {first['_path']}: one experiment pools cells of one {key}")
            other = tokens.setdefault(s, cell)
            if facts["n_tokens"] != cell_facts(other)["n_tokens"]:
                raise KVStreamError(f"cell {cell['_path']}: provenance.n_tokens is {facts['n_tokens']} but "
                                    f"{cell_facts(other)['n_tokens']} in {other['_path']} (sample {s})")
        check_policy(pol, by_policy[pol], policy_blocks.get(pol) if policy_blocks is not None else None)
    if policy_blocks is not None:
        every = set().union(*(by_policy[p] for p in policies))
        for pol in policies:
            missing = sample_order(every - set(by_policy[pol]))
            if missing:
                raise KVStreamError(f"policy {pol}: no cell for sample(s) {', '.join(missing)}, which other policies "
                                    "of the experiment have (a cell relabelled or removed?)")


def _samples_text(samples: Sequence[str]) -> str:
    return ", ".join(sample_order(samples))


def code_versions(by_policy: Mapping[str, Mapping[str, dict]], policies: Sequence[str], *, experiment: str,
                  allow_mixed: bool = False) -> tuple[list[str], str | None]:
    """(the code versions of the cells, a note saying which cells came from which when there are several).
    Several versions are refused unless allow_mixed; cells without a version count as one "unrecorded" version.
    A cell's version is the one its eval command computed with (provenance.code_version); it must equal the
    workflow's label (cell.code_version) where both are recorded."""
    where: dict[str, dict[str, list[str]]] = {}  # version -> policy -> samples
    for pol in policies:
        for s, cell in by_policy[pol].items():
            label = (cell.get("cell") or {}).get("code_version")  # what the workflow expected
            ran = (cell.get("provenance") or {}).get("code_version")  # what the eval command computed with
            if label and ran and label != ran:
                raise KVStreamError(
                    f"experiment {experiment}: cell {pol}/{s} was computed by code version {ran} "
                    f"(provenance.code_version) but the workflow expected {label} (cell.code_version): the eval "
                    "job ran another copy of kvstream than the workflow's src/; run it from this checkout")
            version = ran or label or "unrecorded"
            where.setdefault(str(version), {}).setdefault(pol, []).append(s)
    versions = sorted(v for v in where if v != "unrecorded")
    if len(where) < 2:
        return versions, None
    which = "; ".join(f"version {v}: " + ", ".join(f"{pol} ({_samples_text(ss)})" for pol, ss in pols.items())
                      for v, pols in sorted(where.items()))
    if not allow_mixed:
        raise KVStreamError(
            f"experiment {experiment}: its cells come from {len(where)} code versions (cell.code_version); {which}. "
            "Rerun the stale cells (Snakemake reruns a cell whose code version changed, unless --rerun-triggers "
            "leaves out params), or pool them anyway with eval.allow_mixed_code: true in the config "
            "(`kvstream aggregate --allow-mixed-code`): every table then says so")
    return versions, f"cells of {len(where)} code versions pooled (eval.allow_mixed_code); {which}"
