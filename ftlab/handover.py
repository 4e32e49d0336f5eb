"""Hand trained weights from one stage to the next (whole model or encoder only)."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import nn

from ftlab.errors import FtlabError

log = logging.getLogger(__name__)


def hand_over(source: nn.Module | Mapping[str, torch.Tensor], target: nn.Module,
              carry: str) -> dict[str, int]:
    """Copy ``source``'s weights (a model, or a state dict from the stage cache) into
    ``target`` where names and shapes match.

    ``carry="encoder"`` copies only the backbone (``target.base_model_prefix``); heads start
    fresh. Returns counts of copied and skipped tensors.
    """
    src = source.state_dict() if isinstance(source, nn.Module) else dict(source)
    dst = target.state_dict()
    prefix = getattr(target, "base_model_prefix", "") + "."
    wanted = {k: v for k, v in src.items() if k in dst and dst[k].shape == v.shape
              and (carry == "model" or k.startswith(prefix))}
    if not any(k.startswith(prefix) for k in wanted):
        raise FtlabError("The earlier stage's model shares no encoder weights with this one.",
                         "chain stages on the same model (model=...) for init_from.")
    target.load_state_dict(wanted, strict=False)
    skipped = len(dst) - len(wanted)
    log.info("Handed over %d tensors (%s); %d start fresh.", len(wanted), carry, skipped)
    return {"copied": len(wanted), "fresh": skipped}
