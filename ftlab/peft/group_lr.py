"""A PEFT node written inline (a pipeline stage's ``peft: {_target_: ...}``) without ``lr``
takes the suggested LR of the ``conf/peft`` file it is a variant of, not ``DEFAULT_LR``.

The file is the one with the same ``_target_`` that shares the most of the node's settings
(nested ones too: HfPeft's ``config._target_`` tells LoRA from IA3). When the best matches
disagree on ``lr``, none is taken (a warning names them).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(node, dict):
        return {prefix: node}
    out: dict[str, Any] = {}
    for key, value in node.items():
        out |= _flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {
            f"{prefix}{key}": value}
    return out


def group_lr(node: dict[str, Any], config_dir: str | Path, where: str = "a stage"
             ) -> float | None:
    """The ``lr`` of the ``conf/peft`` file that PEFT node ``node`` (without ``lr``) is a
    variant of; None when no file with its ``_target_`` gives one unambiguously."""
    flat = _flat({k: v for k, v in node.items() if k != "_target_"})
    scored: list[tuple[int, str, float]] = []
    for path in sorted((Path(config_dir) / "peft").glob("*.yaml")):
        group = yaml.safe_load(path.read_text()) or {}
        if group.get("_target_") != node.get("_target_") or group.get("lr") is None:
            continue
        theirs = _flat(group)
        scored.append((sum(k in theirs and theirs[k] == v for k, v in flat.items()),
                       path.stem, float(group["lr"])))
    if not scored:
        return None
    best = max(s for s, _, _ in scored)
    tied = [(name, lr) for s, name, lr in scored if s == best]
    if len({lr for _, lr in tied}) > 1:
        log.warning("%s: its peft node (%s) has no lr and matches peft=%s equally, which "
                    "suggest different LRs; set its lr (or the stage's optim.lr).", where,
                    node.get("_target_"), "/".join(name for name, _ in tied))
        return None
    log.info("%s: its peft node has no lr; peft=%s's lr %g applies.", where, *tied[0])
    return tied[0][1]
