"""`kvstream aggregate`, `kvstream tables`, `kvstream macros`, `kvstream figures`: the study commands.

aggregate pools one experiment's cells (kvstream.study.aggregate); tables, macros and figures render the
aggregates (kvstream.study.tables, .macros, .figures). --config is the pipeline's config YAML: its
`experiments` roles and `paper:` block say which experiment and policy play which part (kvstream.study.roles).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from kvstream.errors import KVStreamError
from kvstream.study import aggregate as agg_mod
from kvstream.study import figures, macros, tables
from kvstream.study.bootstrap import DEFAULT_N_BOOT, DEFAULT_SEED
from kvstream.study.latex import write_text
from kvstream.study.roles import ROLES, SWEEPABLE


def _load_config(path: str | None) -> dict:
    if not path:
        return {}
    import yaml  # only the commands that read a config need PyYAML

    return yaml.safe_load(Path(path).read_text()) or {}


def _labels(pairs: list[str] | None) -> dict[str, str]:
    out = {}
    for pair in pairs or []:
        pol, sep, label = pair.partition("=")
        if not sep or not pol:
            raise KVStreamError(f"--label {pair!r}: expected POLICY=DISPLAY NAME")
        out[pol] = label
    return out


def _cmd_aggregate(args: argparse.Namespace) -> int:
    agg = agg_mod.aggregate(args.cells, experiment=args.experiment, policies=args.policies, reference=args.reference,
                            n_boot=args.n_boot, seed=args.seed, speed=args.speed, role=args.role, knob=args.knob,
                            labels=_labels(args.label), allow_mixed_code=args.allow_mixed_code)
    agg_mod.write_aggregate(agg, args.json, args.csv)
    return 0


def _cmd_tables(args: argparse.Namespace) -> int:
    tables.write_tables(agg_mod.load_aggregates(args.aggregates), args.out_dir, _load_config(args.config))
    return 0


def _cmd_macros(args: argparse.Namespace) -> int:
    write_text(args.out, macros.macros_tex(agg_mod.load_aggregates(args.aggregates), _load_config(args.config)))
    return 0


def _cmd_figures(args: argparse.Namespace) -> int:
    paper = _load_config(args.config).get("paper")
    figures.all_figures(agg_mod.load_aggregates(args.aggregates), args.cells, args.out_dir, paper=paper)
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("aggregate", help="pool the cells of one experiment (CSV + JSON)")
    p.add_argument("cells", nargs="+", help="cell JSON files (their .nll.npy beside them)")
    p.add_argument("--experiment", required=True)
    p.add_argument("--policies", nargs="*", help="policy order (default: all found, sorted)")
    p.add_argument("--reference", default="recompute")
    p.add_argument("--n-boot", type=int, default=DEFAULT_N_BOOT)
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--speed", help="the dataset's `kvstream speed` JSON (TPOT and speedup come from it)")
    p.add_argument("--role", choices=ROLES, default="other", help="the experiment's role in the paper")
    p.add_argument("--knob", choices=SWEEPABLE, help="the policy field a sweep varies")
    p.add_argument("--label", action="append", metavar="POLICY=NAME",
                   help="display name of a policy (repeatable; default: the policy's name)")
    p.add_argument("--allow-mixed-code", action="store_true",
                   help="pool cells of different code versions (cell.code_version; the tables then say so)")
    p.add_argument("--json", required=True)
    p.add_argument("--csv")
    p.set_defaults(func=_cmd_aggregate)

    p = subparsers.add_parser("tables", help="LaTeX tables (booktabs) from aggregate JSONs")
    p.add_argument("aggregates", nargs="+")
    p.add_argument("--config")
    p.add_argument("--out-dir", required=True)
    p.set_defaults(func=_cmd_tables)

    p = subparsers.add_parser("macros", help="paper/generated/macros.tex from aggregate JSONs")
    p.add_argument("aggregates", nargs="+")
    p.add_argument("--config")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_cmd_macros)

    p = subparsers.add_parser("figures", help="figures (PDF + PNG) from aggregates and cells")
    p.add_argument("--aggregates", nargs="+", required=True)
    p.add_argument("--cells", nargs="*", default=[])
    p.add_argument("--config", help="config YAML whose `paper:` block labels the points")
    p.add_argument("--out-dir", required=True)
    p.set_defaults(func=_cmd_figures)
