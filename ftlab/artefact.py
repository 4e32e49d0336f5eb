"""What a stage writes beside its artefact so that it can be used later without the run's
config or data: ``<stage>/card.json`` (the resolved stage: model spec, task, PEFT and
regulariser nodes, data spec, seed; the label set in id order) and ``<stage>/tokenizer/``
(``save_pretrained``). ``read_stage_card`` turns the JSON back into a ``ResolvedStage``.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from ftlab.errors import FtlabError
from ftlab.pipeline import ResolvedStage
from ftlab.store import read_json, write_json

#: bump when the card's layout changes
CARD_FORMAT = 1
CARD = "card.json"
TOKENIZER = "tokenizer"


def write_stage_card(stage_dir: Path, stage: ResolvedStage, labels: list[str] | None,
                     tokenizer: Any, data_transforms: list[dict[str, Any]] | None = None) -> Path:
    """Write ``card.json`` and ``tokenizer/`` into ``stage_dir``; returns the card's path.
    ``data_transforms``: what each of ``data.transforms`` did to the training rows."""
    tokenizer.save_pretrained(str(stage_dir / TOKENIZER))
    card = {"format": CARD_FORMAT, "stage": asdict(stage),
            "labels": list(labels) if labels else None}
    if data_transforms:
        card["data_transforms"] = data_transforms
    return write_json(stage_dir / CARD, card)


def read_stage_card(stage_dir: Path) -> tuple[ResolvedStage, list[str] | None]:
    """(the resolved stage, its labels in id order) from ``stage_dir/card.json``."""
    from ftlab.data.spec import DataSpec
    from ftlab.model.backbone import ModelSpec
    from ftlab.optim import OptimSpec
    from ftlab.runtime import RuntimeSpec

    path = stage_dir / CARD
    if not path.is_file():
        raise FtlabError(f"{stage_dir} has no {CARD} (written by ftlab since predict/export "
                         "came in; save_artefact: false writes none).",
                         "re-run the stage with this version and save_artefact: true.")
    card = read_json(path)
    if card.get("format") != CARD_FORMAT:
        raise FtlabError(f"{path} has format {card.get('format')}; this ftlab reads "
                         f"{CARD_FORMAT}.", "use the ftlab version that wrote the run.")
    s = dict(card["stage"])
    s |= {"model": ModelSpec(**s["model"]), "data": DataSpec(**s["data"]),
          "optim": OptimSpec(**s["optim"]), "teachers": tuple(s.get("teachers", ())),
          "runtime": RuntimeSpec(**s.get("runtime", {}))}
    return ResolvedStage(**s), card.get("labels")
