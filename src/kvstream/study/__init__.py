"""The study: every number, table, macro and figure of the paper, from eval cells and speed runs.

Modules by job (no module imports one that imports it back):
- `inputs`: eval cells grouped by policy and sample, the speed run;
- `bootstrap`: pooled perplexity, paired per-target increase, percentile-bootstrap intervals, contrasts;
- `aggregate`: one experiment's cells -> one row per policy (JSON + CSV);
- `roles`: which experiment and policy play which part (config `experiments.<name>.role`, `paper:`);
- `published`: the original study's published numbers (`published.json`);
- `latex`: escaping and number formatting, macro stems, the macro file;
- `tables`: experiment tables, `setup_tables`: presets, reproduction and setup; `claims`, `identical` and
  `macros`: macros.tex; `wording`: the prose's words (no pipeline identifier; when an interval is evidence);
- `zoo`: the policy zoo (role zoo): its table rows, numbers and data-driven sentences;
- `plotting`: the figures' shared style and writing; `figures`: the trade-off, sweeps, cache trace and NLL
  figures; `zoo_figures`: the zoo's PPL-against-budget and speed-against-R figures;
- `bench_table`: the decode-step benchmark's table and macros.
Command line: `kvstream aggregate|tables|macros|figures` (kvstream.cli.study).
"""
