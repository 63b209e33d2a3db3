"""Retrieval through each policy (config `retrieval`, `kvstream retrieval`; docs/method.md, "Retrieval"): the
jobs' result JSONs checked and reduced to one row per (task, policy, length, depth), the run's summary (CSV
and a Markdown accuracy table), the paper's table, and the macros and sentences its section quotes, each
read from the results. Torch-free: it reads files only (the heatmap is `retrieval_figures`).

A row counts exact matches (greedy answer), the prompts whose key was wholly held at the question (every
token of both mentions in the cache the last prompt forward attended over: `key_in_cache`) and the mean
teacher-forced log-probability of the correct answer. Policies that attend over the whole prompt at the
question (dense; recompute with cap >= length: `whole_prompt`) are the reference; the others have a bounded
context, and the sentences ask whether they answered only while they still held the key."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Mapping, Sequence

from kvstream.errors import KVStreamError
from kvstream.io import atomic_write_text
from kvstream.study.latex import fmt, tex_escape
from kvstream.study.wording import and_list, dataset_name, plural
from kvstream.study.zoo import kind_name

TABLE_LABEL = "tab:retrieval"
TASK_NAMES = {"passkey": "pass-key retrieval", "needle": "needle retrieval"}
PROMPT_FIELDS = ("length", "depth", "exact", "answer_logprob", "key_in_cache", "key_tokens_held")
SUMMARY_FIELDS = ("task", "policy", "label", "type", "peak", "whole", "length", "depth", "prompts", "exact", "held",
                  "accuracy", "mean_answer_logprob")
MACROS = ("RetrievalTableRef", "RetrievalTasks", "RetrievalLengths", "RetrievalDepths", "RetrievalCellPrompts",
          "RetrievalPolicyPrompts", "RetrievalNPrompts", "RetrievalPolicies", "RetrievalPeaks", "RetrievalFiller",
          "RetrievalReferenceSentence", "RetrievalDepthSentence", "RetrievalHeldSentence", "RetrievalLogprobSentence",
          "RetrievalRecomputeSentence")


# ------------------------------------------------------------------------------------- loading
def _fail(path, problem: str) -> KVStreamError:
    return KVStreamError(f"retrieval result {path}: {problem}")


def load_results(paths: Sequence[str | os.PathLike], policy_blocks: Mapping[str, Mapping] | None = None) -> list[dict]:
    """Each job's JSON, in the given order, checked before any number is read: the fields the rows need, the
    task and policy it was run for (its `run` labels), the policy block the config resolves (policy_blocks:
    a result of an edited policy is refused), the code version it ran with against the one the workflow
    expected, and one code version and one (task, policy) per result across all of them."""
    out, seen, versions = [], {}, {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        for key in ("run", "policy", "task", "prompts", "provenance"):
            if not isinstance(data.get(key), (dict, list)):
                raise _fail(path, f"no '{key}' block: not a `kvstream retrieval` result")
        run, task = data["run"], data["task"].get("task")
        policy = run.get("policy")
        if not policy or run.get("task", task) != task:
            raise _fail(path, f"its labels (run.task={run.get('task')}, run.policy={policy}) do not name the task "
                              f"it ran ({task}) and a policy")
        if (task, policy) in seen:
            raise _fail(path, f"a second result of task {task}, policy {policy} (the first: {seen[(task, policy)]})")
        seen[(task, policy)] = path
        if policy_blocks is not None and policy in policy_blocks and dict(data["policy"]) != dict(policy_blocks[policy]):
            raise _fail(path, f"policy {policy} ran as {data['policy']}, but the config resolves it to "
                              f"{dict(policy_blocks[policy])}: rerun it")
        ran, expected = data["provenance"].get("code_version"), run.get("code_version")
        if ran and expected and ran != expected:
            raise _fail(path, f"computed with code version {ran} (provenance.code_version), but the workflow "
                              f"expected {expected} (run.code_version): rerun it")
        versions.setdefault(ran or expected, []).append(str(path))
        if not data["prompts"]:
            raise _fail(path, "no prompts")
        for i, p in enumerate(data["prompts"]):
            for key in PROMPT_FIELDS:
                value = p.get(key)
                ok = isinstance(value, bool) if key in ("exact", "key_in_cache") else \
                    isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                if not ok:
                    raise _fail(path, f"prompts[{i}].{key} is {value!r}")
        out.append({"path": str(path), "task": task, "policy": policy, "block": dict(data["policy"]),
                    "prompts": data["prompts"], "code_version": ran or expected})
    if len(versions) > 1:
        which = "; ".join(f"{v}: {', '.join(p)}" for v, p in versions.items())
        raise KVStreamError(f"retrieval results of {len(versions)} code versions ({which}): rerun the stale ones")
    return out


# ------------------------------------------------------------------------------------------ rows
def policy_label(name: str, block: Mapping, labels: Mapping[str, str] | None = None) -> str:
    """The configured display name (paper.labels), else the kind's with its pruning interval R."""
    if labels and name in labels:
        return labels[name]
    text = kind_name(block)
    if block.get("type") not in ("dense", "recompute", "window"):
        text += f" R={block.get('compress_every')}"  # no comma: labels go into comma-separated lists
    return text


def peak(block: Mapping) -> int | None:
    """The largest forward the policy allows: its schedule's bound, recompute's window; None (all) for dense."""
    if block.get("type") == "recompute":
        return block.get("cap")
    return block.get("max_forward_len")


def whole_prompt(block: Mapping, length: int) -> bool:
    """Whether the question attends over the whole prompt: a dense cache, or recompute with cap >= length."""
    return block.get("type") == "dense" or (block.get("type") == "recompute" and (block.get("cap") or 0) >= length)


def cell_rows(results: Sequence[Mapping], labels: Mapping[str, str] | None = None) -> list[dict]:
    """One row per (task, policy, length, depth), results' order, then length, then depth."""
    rows = []
    for res in results:
        cells: dict[tuple, list] = {}
        for p in res["prompts"]:
            cells.setdefault((p["length"], p["depth"]), []).append(p)
        for (length, depth), ps in sorted(cells.items()):
            n, exact, held = len(ps), sum(p["exact"] for p in ps), sum(p["key_in_cache"] for p in ps)
            rows.append({
                "task": res["task"], "policy": res["policy"], "label": policy_label(res["policy"], res["block"], labels),
                "type": res["block"]["type"], "peak": peak(res["block"]), "length": int(length), "depth": float(depth),
                "whole": whole_prompt(res["block"], length),
                "prompts": n, "exact": int(exact), "held": int(held), "accuracy": exact / n,
                "mean_answer_logprob": sum(p["answer_logprob"] for p in ps) / n,
                "logprob_sum": sum(p["answer_logprob"] for p in ps),
                "held_logprob_sum": sum(p["answer_logprob"] for p in ps if p["key_in_cache"]),
                "exact_held": sum(p["exact"] and p["key_in_cache"] for p in ps),
                # exact without the whole key, but with some of its tokens (the other mention, say) still held
                "exact_partial": sum(p["exact"] and not p["key_in_cache"] and p["key_tokens_held"] > 0 for p in ps),
            })
    return rows


def _grid(rows: Sequence[Mapping], field: str) -> list:
    return sorted({r[field] for r in rows})


def _depth(d: float) -> str:
    return f"{d:g}"


def _blocks(rows: Sequence[Mapping]) -> dict[str, dict[str, list[dict]]]:
    """task -> policy -> its rows (results' order)."""
    out: dict[str, dict[str, list[dict]]] = {}
    for r in rows:
        out.setdefault(r["task"], {}).setdefault(r["policy"], []).append(r)
    return out


def _sum(rows, field) -> int:
    return sum(r[field] for r in rows)


# --------------------------------------------------------------------------------- run summary
def summary_csv(rows: Sequence[Mapping]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=SUMMARY_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def summary_markdown(rows: Sequence[Mapping]) -> str:
    """Exact matches per (length, depth) cell, `k/n (h)` with h prompts holding the key, one table per task."""
    lines = []
    for task, by_policy in _blocks(rows).items():
        task_rows = [r for rs in by_policy.values() for r in rs]
        cols = [(n, d) for n in _grid(task_rows, "length") for d in _grid(task_rows, "depth")]
        lines += [f"### {TASK_NAMES.get(task, task)}: exact / prompts (key held at the question)", "",
                  "| policy | " + " | ".join(f"L={n} d={_depth(d)}" for n, d in cols) + " | mean log p |",
                  "|---|" + "---|" * (len(cols) + 1)]
        for rs in by_policy.values():
            cell = {(r["length"], r["depth"]): r for r in rs}
            text = [f"{cell[c]['exact']}/{cell[c]['prompts']} ({cell[c]['held']})" if c in cell else "--" for c in cols]
            mean = _sum(rs, "logprob_sum") / _sum(rs, "prompts")
            lines.append(f"| {rs[0]['label']} | " + " | ".join(text) + f" | {mean:.2f} |")
        lines.append("")
    return "\n".join(lines)


def write_summary(rows: Sequence[Mapping], csv_path, md_path) -> None:
    atomic_write_text(csv_path, summary_csv(rows))
    atomic_write_text(md_path, summary_markdown(rows))


# ------------------------------------------------------------------------------------------ table
def _peak_text(r: Mapping) -> str:
    return "all" if r["type"] == "dense" else fmt(r["peak"], 0)


def retrieval_table(rows: Sequence[Mapping]) -> str:
    """The `table` float: per task a block, per policy one row per prompt length; per depth `k/n (h)`."""
    depths = _grid(rows, "depth")
    n_cols = 4 + len(depths)
    lines = [
        r"\begin{table}", r"\centering\small",
        r"\caption{Retrieval through each policy: exact matches $k$ of the $n$ prompts of a (length, depth) cell "
        r"(greedy answer), and in parentheses $h$, the prompts whose key was still wholly held at the question "
        r"(every token of both its mentions in the cache the last prompt forward attended over). Depth: where the "
        r"needle sits in the filler (0: right after the instruction, 1: right before the question). Peak $L$: the "
        r"largest forward the policy allows (all: no eviction). $\log p$: the correct answer's log-probability "
        r"(teacher-forced, summed over its tokens), mean over the row's prompts.}",
        rf"\label{{{TABLE_LABEL}}}",
        r"\resizebox{\ifdim\width>\linewidth\linewidth\else\width\fi}{!}{%",
        r"\begin{tabular}{@{}lrr" + "c" * len(depths) + r"r@{}}",
        r"\toprule",
        r" & & & \multicolumn{" + str(len(depths)) + r"}{c}{exact $k/n$ ($h$) at depth} & \\",
        rf"\cmidrule(lr){{4-{3 + len(depths)}}}",
        r"Policy & Peak $L$ & Prompt $L$ & " + " & ".join(_depth(d) for d in depths) + r" & $\log p$ \\",
    ]
    for task, by_policy in _blocks(rows).items():
        name = TASK_NAMES.get(task, task).capitalize()
        lines += [r"\midrule", rf"\multicolumn{{{n_cols}}}{{@{{}}l}}{{\emph{{{name}}}}} \\"]
        for rs in by_policy.values():
            for i, length in enumerate(_grid(rs, "length")):
                at = {r["depth"]: r for r in rs if r["length"] == length}
                cells = [f"{at[d]['exact']}/{at[d]['prompts']} ({at[d]['held']})" if d in at else "--" for d in depths]
                mean = _sum(at.values(), "logprob_sum") / _sum(at.values(), "prompts")
                head = [tex_escape(rs[0]["label"]), _peak_text(rs[0])] if i == 0 else ["", ""]
                lines.append(" & ".join(head + [str(length)] + cells + [fmt(mean, 2)]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}}", r"\end{table}", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- sentences
def _frac(rows) -> str:
    return f"{_sum(rows, 'exact')}/{_sum(rows, 'prompts')}"


def _task_prefix(task: str, tasks: Sequence[str]) -> str:
    return f"{TASK_NAMES.get(task, task).capitalize()}: " if len(tasks) > 1 else ""


def _bounded(rows: Sequence[Mapping]) -> list[Mapping]:
    return [r for r in rows if not r["whole"]]


def reference_sentence(rows: Sequence[Mapping]) -> str:
    """How the policies that attend over the whole prompt did: exact matches over every length and depth."""
    blocks = _blocks([r for r in rows if r["whole"]])
    parts = [_task_prefix(task, list(_blocks(rows))) + and_list([
        rf"{tex_escape(rs[0]['label'])} answered {_frac(rs)} prompts exactly" for rs in by_policy.values()]) + "."
        for task, by_policy in blocks.items()]
    if not parts:
        return ("No policy in this run's grid attends over the whole prompt, so none shows what the model retrieves "
                "unevicted.")
    return "Attending over the whole prompt: " + " ".join(parts)


def depth_sentence(rows: Sequence[Mapping]) -> str:
    """For every policy with a bounded context, exact matches per depth, pooled over the prompt lengths."""
    blocks = _blocks(_bounded(rows))
    parts = []
    for task, by_policy in blocks.items():
        items = []
        for rs in by_policy.values():
            per_depth = [f"{_frac([r for r in rs if r['depth'] == d])} at {_depth(d)}" for d in _grid(rs, "depth")]
            items.append(rf"{tex_escape(rs[0]['label'])} {and_list(per_depth)}")
        parts.append(_task_prefix(task, list(_blocks(rows))) + "; ".join(items) + ".")
    if not parts:
        return "No policy in this run's grid attends over only part of the prompt."
    pooled = " over all prompt lengths" if len(_grid(rows, "length")) > 1 else ""
    return f"With a bounded context, exact matches by depth{pooled}: " + " ".join(parts)


def held_sentence(rows: Sequence[Mapping]) -> str:
    """Whether the policies with a bounded context answered only when the key was still held."""
    bounded = _bounded(rows)
    if not bounded:
        return ""
    n, held = _sum(bounded, "prompts"), _sum(bounded, "held")
    exact, exact_held = _sum(bounded, "exact"), _sum(bounded, "exact_held")
    exact_gone, partial = exact - exact_held, _sum(bounded, "exact_partial")
    text = (rf"Of the {plural(n, 'prompt')} with a bounded context, {held} still held the whole key at the question and {exact_held} of "
            rf"these were answered exactly; of the {n - held} that no longer held it, {exact_gone} "
            + ("was" if exact_gone == 1 else "were") + " answered exactly all the same"
            + (f" ({partial} of them with some of the key's tokens still held)." if exact_gone else "."))
    by_policy: dict[str, list] = {}
    for r in bounded:
        by_policy.setdefault(r["policy"], []).append(r)
    if len(by_policy) > 1:
        text += " Prompts with the key held, by policy: " + and_list([
            rf"{tex_escape(rs[0]['label'])} {_sum(rs, 'held')}/{_sum(rs, 'prompts')}" for rs in by_policy.values()]) + "."
    return text


def logprob_sentence(rows: Sequence[Mapping]) -> str:
    """The mean answer log-probability: over the whole prompt; bounded, with and without the key held."""
    whole, bounded = [r for r in rows if r["whole"]], _bounded(rows)
    parts = []
    if whole:
        parts.append(rf"{fmt(_sum(whole, 'logprob_sum') / _sum(whole, 'prompts'), 2)} over the whole prompt "
                     rf"({plural(_sum(whole, 'prompts'), 'prompt')})")
    held = _sum(bounded, "held")
    gone = _sum(bounded, "prompts") - held
    if held:
        parts.append(rf"{fmt(_sum(bounded, 'held_logprob_sum') / held, 2)} with a bounded context that held the key "
                     rf"({plural(held, 'prompt')})")
    if gone:
        lost = _sum(bounded, "logprob_sum") - _sum(bounded, "held_logprob_sum")
        parts.append(rf"{fmt(lost / gone, 2)} with one that no longer held it ({plural(gone, 'prompt')})")
    return "The correct answer's mean log-probability (nats, summed over its tokens) was " + and_list(parts) + "."


def recompute_sentence(rows: Sequence[Mapping]) -> str:
    """Why recomputation is or is not the reference of this grid."""
    recompute = [r for r in rows if r["type"] == "recompute"]
    if not recompute:
        return (r"Full recomputation is not in this run's grid: with a window at least as long as the prompt it "
                r"computes the same attention as the dense cache, and with a shorter window it recomputes a forward "
                r"over that window for every token streamed, too slow for a run on a CPU.")
    short = sorted({r["length"] for r in recompute if not r["whole"]})
    if not short:
        return ""
    return (rf"Full recomputation's window of {fmt(recompute[0]['peak'], 0)} tokens is shorter than the prompts of "
            rf"{and_list([str(n) for n in short])} tokens: there it attends over part of the prompt, like the "
            r"caches, and is counted with them.")


def _prompts(counts: Sequence[int]) -> str:
    """`2 prompts`, `1 prompt`, `1 and 2 prompts`."""
    return plural(counts[0], "prompt") if len(counts) == 1 else and_list([str(n) for n in counts]) + " prompts"


def retrieval_macros(rows: Sequence[Mapping], facts: Mapping | None = None) -> str:
    """paper/generated/retrieval_macros.tex: `\\ifhaveRetrieval` on and every number the section quotes."""
    facts = facts or {}
    lines = [r"\newif\ifhaveRetrieval\haveRetrievaltrue"]

    def add(name: str, value: str) -> None:
        lines.append(rf"\newcommand{{\{name}}}{{{value}}}")

    tasks = list(_blocks(rows))
    per_cell = sorted({r["prompts"] for r in rows})
    per_policy = sorted({sum(r["prompts"] for r in rs) for by in _blocks(rows).values() for rs in by.values()})
    peaks = sorted({r["peak"] for r in _bounded(rows) if r["peak"] is not None})
    add("RetrievalTableRef", rf"Table~\ref{{{TABLE_LABEL}}}")
    add("RetrievalTasks", and_list([TASK_NAMES.get(t, tex_escape(t)) for t in tasks]))
    add("RetrievalLengths", and_list([str(n) for n in _grid(rows, "length")]))
    add("RetrievalDepths", and_list([_depth(d) for d in _grid(rows, "depth")]))
    add("RetrievalCellPrompts", _prompts(per_cell))
    add("RetrievalPolicyPrompts", _prompts(per_policy))
    add("RetrievalNPrompts", str(_sum(rows, "prompts")))
    add("RetrievalPolicies", and_list(list(dict.fromkeys(tex_escape(r["label"]) for r in rows))))
    add("RetrievalPeaks", and_list([str(p) for p in peaks]))
    filler = []
    if "passkey" in tasks:
        filler.append("the repeated sentences of the standard pass-key prompt"
                      + (" (pass key)" if "needle" in tasks else ""))
    if "needle" in tasks:
        filler.append("sentences of " + dataset_name(facts.get("needle_source"), facts.get("needle_dataset"))
                      + (" (needle)" if "passkey" in tasks else ""))
    add("RetrievalFiller", and_list(filler))
    add("RetrievalReferenceSentence", reference_sentence(rows))
    add("RetrievalDepthSentence", depth_sentence(rows))
    add("RetrievalHeldSentence", held_sentence(rows))
    add("RetrievalLogprobSentence", logprob_sentence(rows))
    add("RetrievalRecomputeSentence", recompute_sentence(rows))
    return "\n".join(lines) + "\n"


def absent_macros() -> str:
    """The macros file of a run without retrieval: the section's switch off."""
    return "% retrieval is not enabled in this run's config\n\\newif\\ifhaveRetrieval\\haveRetrievalfalse\n"

