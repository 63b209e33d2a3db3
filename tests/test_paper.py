"""The paper builds from generated files, and the numbers of the generated tables appear in the PDF.

Cells are synthetic test inputs (tests/test_report.py's writer), aggregated, rendered to tables, macros
and figures by the library, then the real paper sources are compiled with latexmk in a scratch copy.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from kvstream.study import aggregate as study_aggregate
from kvstream.study import figures, macros, tables
from kvstream.study.latex import write_text
from test_report import LABELS, ROLES, ZOO, make_experiment, speed_of
from test_report import PAPER as PAPER_BLOCK  # the config's paper: block (PAPER here is the paper folder)

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "paper"

needs_tex = pytest.mark.skipif(
    not (shutil.which("latexmk") and shutil.which("pdflatex") and shutil.which("pdftotext")),
    reason="latexmk/pdflatex/pdftotext not installed (scripts/setup.sh installs them)",
)

EXPERIMENTS = {
    "table1": ["recompute", "mit_streaming", "ours_eager", "ours_best", "ours_softlite", "window"],
    "table2": ["recompute", "abl_s0_dnull", "abl_s4_dnull", "abl_s0_d8", "ours_softlite"],
    "sweep_compress_every": ["recompute", "ours_eager", "sweep_r2", "ours_softlite", "ours_best"],
}


def generate(root: Path, experiments: dict[str, list[str]]) -> Path:
    """A scratch paper/ with generated/ filled as the pipeline would; returns the paper directory."""
    policies = sorted({p for pols in experiments.values() for p in pols})
    cells = make_experiment(root, policies, n_samples=3, n_tokens=96)
    aggs = {}
    for name, pols in experiments.items():
        agg = study_aggregate.aggregate([c for c in cells if c.parent.name in pols], experiment=name, policies=pols,
                                        n_boot=500, speed=speed_of(root), labels=LABELS, **ROLES[name])
        study_aggregate.write_aggregate(agg, root / "results" / "aggregate" / f"{name}.json")
        aggs[name] = study_aggregate.read_aggregate(root / "results" / "aggregate" / f"{name}.json")
    paper = root / "paper"
    shutil.copytree(PAPER, paper, ignore=shutil.ignore_patterns("generated", "*.pdf", "*.aux", "*.log", "*.bbl",
                                                                 "*.blg", "*.fls", "*.fdb_latexmk", "*.out"))
    gen = paper / "generated"
    config = {"title": "Test paper", "authors": [{"name": "Ann Author", "affiliation": "Test Lab",
                                                  "email": "ann@example.org"},
                                                 {"name": "Bob Writer", "affiliation": "Other Lab", "email": ""}],
              "model": {"name": "tiny", "source": "test", "dtype": "float32"},
              "datasets": {"toy": {"source": "txt", "n_samples": 3, "tokens_per_sample": 96}},
              "eval": {"cap": 16, "warmup": 2, "positions": "relative"},
              "experiments": {name: ROLES[name] for name in experiments}, "paper": PAPER_BLOCK}
    tables.write_tables(aggs, gen / "tables", config)
    write_text(gen / "macros.tex", macros.macros_tex(aggs, config))
    figures.all_figures(aggs, cells, gen / "figures", paper=PAPER_BLOCK)
    return paper


def build(paper: Path, doc: str) -> str:
    proc = subprocess.run(["latexmk", "-pdf", "-interaction=nonstopmode", "-halt-on-error", f"{doc}.tex"],
                          cwd=paper, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + (paper / f"{doc}.log").read_text()[-4000:]
    text = subprocess.run(["pdftotext", f"{doc}.pdf", "-"], cwd=paper, text=True, check=True,
                          stdout=subprocess.PIPE).stdout
    return text


def _norm(s: str) -> str:
    return s.replace("\u2212", "-").replace("\\textminus{}", "-")


def table_numbers(tex: str) -> set[str]:
    body = tex[tex.index(r"\begin{tabular}"):]
    return set(re.findall(r"[-+]?\d+\.\d+", _norm(body)))


@needs_tex
def test_compressed_paper_shows_the_generated_numbers(tmp_path):
    paper = generate(tmp_path, EXPERIMENTS)
    text = _norm(build(paper, "neurips_2025_compressed"))
    flat = re.sub(r"\s+", " ", text)
    for name in ("table1", "table2", "sweep_compress_every", "reproduction"):
        nums = table_numbers((paper / "generated" / "tables" / f"{name}.tex").read_text())
        assert nums, name
        missing = sorted(n for n in nums if n not in flat)
        assert not missing, f"{name}: numbers of the generated table not in the PDF: {missing}"
    # a number quoted in the prose through a macro, and the author block from the config
    macros = (paper / "generated" / "macros.tex").read_text()
    speed = re.search(r"\\newcommand\{\\SpeedupMit\}\{([^}]*)\}", macros).group(1)
    assert f"{speed}×" in flat or f"{speed} ×" in flat or speed in flat
    assert "Ann Author" in flat and "ann@example.org" in flat and "Bob Writer" in flat
    assert "??" not in flat  # no undefined reference or missing macro value
    assert "Which tokens to evict" not in flat  # no zoo experiment: no zoo section
    pages = subprocess.run(["pdfinfo", str(paper / "neurips_2025_compressed.pdf")], text=True,
                           stdout=subprocess.PIPE).stdout
    assert int(re.search(r"Pages:\s+(\d+)", pages).group(1)) >= 4


@needs_tex
def test_long_paper_builds_with_only_the_main_experiment(tmp_path):
    paper = generate(tmp_path, {"table1": EXPERIMENTS["table1"]})
    text = _norm(build(paper, "neurips_2025"))
    flat = re.sub(r"\s+", " ", text)
    nums = table_numbers((paper / "generated" / "tables" / "table1.tex").read_text())
    assert all(n in flat for n in nums)
    assert "??" not in flat
    assert "Slack and max-drop (Table" not in flat  # the ablation section is left out when it did not run
    assert "Which tokens to evict" not in flat  # so is the zoo's


@needs_tex
def test_long_paper_builds_with_a_zoo(tmp_path):
    """The zoo section, its table and both figures appear when a zoo aggregate exists (role zoo)."""
    paper = generate(tmp_path, {"table1": EXPERIMENTS["table1"], "zoo": list(ZOO)})
    assert (paper / "generated" / "figures" / "zoo_ppl.pdf").exists()
    text = _norm(build(paper, "neurips_2025"))
    flat = re.sub(r"\s+", " ", text)
    assert "Which tokens to evict: score-based eviction at decode time" in flat
    nums = table_numbers((paper / "generated" / "tables" / "zoo.tex").read_text())
    missing = sorted(n for n in nums if n not in flat)
    assert nums and not missing, f"zoo: numbers of the generated table not in the PDF: {missing}"
    assert "H2O has a" in flat and "PPL increase" in flat  # a sentence whose direction comes from the data
    assert "??" not in flat
