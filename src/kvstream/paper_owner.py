"""Which run the paper's files hold: paper/generated/ (tables, macros, figures) and paper/*.pdf are one
per checkout, unlike a run's own results, which are keyed by its model (results/cells/{model}/,
results/aggregate/{model}/, results/figures/{model}/, ...). Standard library only: the DAG calls it.

The workflow writes a stamp, paper/generated/owner.json ({"model": ...}), that every rule writing under
paper/ takes as input. Before a run would rewrite those files for another model, `check_paper_owner`
stops it with a message naming the way on (`--config overwrite_paper=True`, or the run's results only).
Edits of one config keep its model, and with it the paper: they rerun what they change, as before.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from kvstream.errors import KVStreamError

STAMP = "paper/generated/owner.json"


def owner_record(model: str) -> dict:
    """What the stamp holds: the model whose results paper/ shows."""
    return {"model": model}


def recorded_owner(stamp: str | os.PathLike = STAMP) -> str | None:
    """The model the stamp names; None when there is no stamp (or an empty or unreadable one: nobody
    claimed paper/ yet, e.g. outputs made before stamps existed)."""
    try:
        model = json.loads(Path(stamp).read_text()).get("model")
    except (OSError, ValueError, AttributeError):
        return None
    return model if isinstance(model, str) else None


def check_paper_owner(model: str, stamp: str | os.PathLike = STAMP, overwrite: bool = False) -> None:
    """KVStreamError when paper/ holds another model's outputs and `overwrite` is not set."""
    owner = recorded_owner(stamp)
    if owner is None or owner == model or overwrite:
        return
    raise KVStreamError(
        f"paper/generated/ and paper/*.pdf hold the outputs of the run with model '{owner}' ({stamp}); this config "
        f"(model '{model}') would replace them. Its own results do not touch them: build those alone with the "
        f"target `results` (cells, speed runs, aggregates under results/aggregate/{model}/, figures under "
        f"results/figures/{model}/), or replace the paper with --config overwrite_paper=True, or run this config "
        "in another checkout."
    )
