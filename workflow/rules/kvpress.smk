# kvpress's decode-time StreamingLLM beside ours (issue 15): results measured by benchmarks/kvpress/run.sh in
# kvpress's own environment (it needs transformers < 5.3) and committed under benchmarks/kvpress/, named by the
# config's bench.kvpress_results; this rule only reads them (kvstream.study.kvpress):
#   paper/generated/kvpress_macros.tex   \ifhaveKvpress, the numbers and sentences the section quotes, and the
#                                        table as the macro \KvpressTable
# With no file named the macros file still gets written, with the switch off, so no earlier run's section shows.

KVPRESS_MACROS = "paper/generated/kvpress_macros.tex"


localrules:
    kvpress_paper,


rule kvpress_paper:
    input:
        results=config["bench"]["kvpress_results"],
        owner=PAPER_OWNER,
    output:
        KVPRESS_MACROS,
    log:
        "results/logs/kvpress/paper.log",
    threads: 1
    resources:
        **PLAN.rule_resources("report"),
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/kvpress_paper.py"


ALL_TARGETS.append(KVPRESS_MACROS)
PAPER_TABLES.append(KVPRESS_MACROS)
