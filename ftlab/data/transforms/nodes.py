"""``data.transforms`` entries -> full ``_target_`` nodes -> transform objects.

An entry is one of:

- a name: ``gender_swap`` reads ``conf/transform/gender_swap.yaml`` (or ``transform/<name>.yaml``
  in a ``--config-dir`` folder);
- a name with settings: ``{few_shot: {k: 8}}`` merges the settings onto that file;
- a full node: ``{_target_: ftlab.data.transforms.gender_swap.GenderSwap, mode: replace}``.

Names are resolved when the stage is resolved (``pipeline``), so the stage's ``DataSpec``, and
with it the stage-cache key and the card, hold every setting of every transform.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ftlab.errors import FtlabError, choices_text, closest

GROUP = "transform"


def config_dirs() -> list[Path]:
    """ftlab's ``conf/`` and the folders on Hydra's search path (``--config-dir``)."""
    from ftlab.cli import CONFIG_DIR

    dirs = [Path(CONFIG_DIR)]
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            for source in HydraConfig.get().runtime.config_sources:
                if source.schema == "file":
                    dirs.append(Path(source.path))
    except Exception:  # no Hydra run (tests, the API): ftlab's conf/ only
        pass
    return list(dict.fromkeys(dirs))


def available(dirs: list[Path] | None = None) -> list[str]:
    return sorted({p.stem for d in dirs or config_dirs() for p in (d / GROUP).glob("*.yaml")})


def load_named(name: str, where: str, dirs: list[Path] | None = None) -> dict[str, Any]:
    from omegaconf import OmegaConf

    for d in dirs or config_dirs():
        path = d / GROUP / f"{name}.yaml"
        if path.is_file():
            node = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
            if not isinstance(node, dict) or "_target_" not in node:
                raise FtlabError(f"{path} is not a transform node (no _target_).",
                                 "give it a _target_ (see conf/transform/*.yaml).")
            return node
    names = available(dirs)
    raise FtlabError(f"{where}: there is no transform named '{name}'.{closest(name, names)}",
                     f"use one of: {choices_text(names) or '(none)'} (conf/transform/), or a "
                     "node with a _target_.")


def resolve_nodes(entries: list[Any] | None, where: str = "data.transforms",
                  dirs: list[Path] | None = None) -> list[dict[str, Any]]:
    """Every entry as a full ``_target_`` node (a plain dict), in order."""
    out = []
    for i, entry in enumerate(entries or []):
        at = f"{where}[{i}]"
        if isinstance(entry, str):
            out.append(load_named(entry, at, dirs))
        elif isinstance(entry, dict) and "_target_" in entry:
            out.append(dict(entry))
        elif isinstance(entry, dict) and len(entry) == 1:
            (name, settings), = entry.items()
            if settings is not None and not isinstance(settings, dict):
                raise FtlabError(f"{at}: the settings of '{name}' must be a mapping, got "
                                 f"{settings!r}.", f"e.g. {{{name}: {{mode: replace}}}}.")
            out.append(load_named(str(name), at, dirs) | (settings or {}))
        else:
            raise FtlabError(f"{at} is {entry!r}: not a transform.",
                             "give a name (gender_swap), a name with settings "
                             "({few_shot: {k: 8}}) or a node with a _target_.")
    return out


def build(nodes: list[dict[str, Any]], where: str = "data.transforms") -> list[tuple[str, Any]]:
    """``(name, transform)`` for each node; every ``_target_`` passes the allow-list and its
    keys bind to the constructor (``config.instantiate_checked``)."""
    from ftlab.config import instantiate_checked, require_signature
    from ftlab.data.transforms.base import Transform

    out = []
    for i, node in enumerate(nodes):
        obj = instantiate_checked(node, f"{where}[{i}]")
        if not isinstance(obj, Transform):
            raise FtlabError(f"{where}[{i}]._target_ '{node['_target_']}' is not a transform "
                             "(it is not callable on Rows).",
                             "use a class from conf/transform/, or give your class a "
                             "__call__(self, rows) that returns an Applied "
                             "(ftlab.data.transforms.base; see ftlab/data/transforms/"
                             "gender_swap.py).")
        require_signature(obj, Transform, "__call__", f"{where}[{i}]")
        out.append((getattr(obj, "name", type(obj).__name__), obj))
    return out


def transform_raw(raw: Any, nodes: list[dict[str, Any]], text_columns: list[str], seed: int,
                  where: str = "data.transforms") -> Any:
    """``raw`` (a ``RawData``) after the transforms: new splits (with an ``unlabelled`` split
    when a transform set rows aside), the record of what each transform did. ``raw`` itself is
    left as it was."""
    from dataclasses import replace

    from datasets import DatasetDict

    from ftlab.data.sources import UNLABELLED
    from ftlab.data.transforms.base import apply_transforms

    if not nodes:
        return raw
    if "train" not in raw.splits:
        raise FtlabError(f"{where}: the data has no training split to transform.",
                         "give a training split, or remove the transforms.")
    out = apply_transforms(build(nodes, where), dict(raw.splits), text_columns, raw.labels,
                           seed, where)
    splits = dict(out.splits)
    if out.unlabelled is not None:
        splits[UNLABELLED] = out.unlabelled
    return replace(raw, splits=DatasetDict(splits), transforms=raw.transforms + out.report)
