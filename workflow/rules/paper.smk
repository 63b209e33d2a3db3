# The paper: paper/{neurips_2025_compressed,neurips_2025}.pdf with latexmk (pdflatex + bibtex).
# Inputs: the hand-written sources in paper/ and what report.smk generates under paper/generated/.
# A change to paper/*.tex reruns only the PDFs; a change to a result reruns the generated files first.

PAPER_SOURCES = sorted(
    str(p.relative_to(REPO)) for p in (REPO / "paper").rglob("*") if p.suffix in (".tex", ".sty", ".bib")
    and "generated" not in p.parts and p.name not in ("neurips_2025.tex", "neurips_2025_compressed.tex")
)


rule paper:
    input:
        tex="paper/{doc}.tex",
        sources=PAPER_SOURCES,
        macros=PAPER_MACROS,
        tables=PAPER_TABLES,
        figures=PAPER_FIGURES,
        owner=PAPER_OWNER,
    output:
        report("paper/{doc}.pdf", caption="../report/paper.rst", category="Paper", labels={"document": "{doc}"}),
    wildcard_constraints:
        doc="neurips_2025|neurips_2025_compressed",
    log:
        "results/logs/paper/{doc}.log",
    threads: 1
    resources:
        **PLAN.rule_resources("paper"),
    conda:
        "../../envs/latex.yaml"
    shell:
        logged("latexmk -pdf -g -interaction=nonstopmode -halt-on-error -cd {input.tex}", tail=40)
