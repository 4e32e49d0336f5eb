"""The data schema: where the data is and which columns mean what."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from omegaconf import DictConfig, OmegaConf

from ftlab.config import bind_schema, plain
from ftlab.data.transforms.nodes import resolve_nodes
from ftlab.errors import FtlabError, choices_text
from ftlab.rules import at_least, between


@dataclass
class DataSpec:
    """A labelled (or unlabelled) text dataset.

    Attributes:
        path: a Hugging Face dataset name (``glue``), or with ``files`` the format (``csv``,
            ``json``, ``parquet``, ``conll``, ``text``: one text per line); null with
            ``files``: taken from the files' extension.
        name: the dataset's configuration name (``sst2``), if any.
        files: local files by split; ``pypi://`` URIs allowed. A single ``all`` entry is split
            deterministically into train/validation/test (see ``split_by``).
        text_columns: one column (single text) or two (sentence pair).
        label_column: the label column; null for unlabelled text.
        labels: the label set in id order; null infers it (sorted) from the training split.
        label_names: the data's labels (their string forms, as ``labels`` lists them: ``0``,
            ``True``, a Hub dataset's class names) -> the names reports, predictions and
            verbalizers use (``{0: negative, 1: positive}``); every label named, ids kept.
        drop_labels: rows with these label values are removed (e.g. unlabelled synopses).
        splits: our split name -> the dataset's split name, optionally a slice of it in the
            Hugging Face syntax (``validation[:50%]``, ``train[1000:]``; by row order, so
            deterministic); null for a split drops it (``data.splits.test=null``). A node that
            gives ``splits`` gives all of them (unlisted ones are not added back); null (the
            default): train, validation and test.
        delimiter: a csv file's field separator (one character, e.g. ``;``); null follows the
            extension: ``,`` for ``.csv``, a tab for ``.tsv``.
        split_by: a column whose values never straddle two splits (e.g. movie), for ``all``.
        split_fractions: train/validation/test fractions used with ``all``.
        max_train_samples / max_eval_samples: cap each split (after a seeded shuffle of train).
        transforms: training-row transforms applied in order after the split and the caps
            (``ftlab.data.transforms``): names of ``conf/transform/*.yaml`` (``gender_swap``),
            a name with settings (``{few_shot: {k: 8}}``) or ``_target_`` nodes. A resolved
            stage holds full ``_target_`` nodes (``pipeline``), so they enter the cache key.
    """

    path: str | None = None
    name: str | None = None
    files: dict[str, str] | None = None
    text_columns: list[str] = field(default_factory=lambda: ["text"])
    label_column: str | None = "label"
    labels: list[str] | None = None
    label_names: dict[Any, str] | None = None
    drop_labels: list[str] = field(default_factory=list)
    splits: dict[str, str | None] | None = None
    delimiter: str | None = None
    split_by: str | None = None
    split_fractions: Annotated[list[float], between(0, 1, each=True)] = field(
        default_factory=lambda: [0.8, 0.1, 0.1])
    max_train_samples: Annotated[int | None, at_least(1, example="500")] = None
    max_eval_samples: Annotated[int | None, at_least(1, example="500")] = None
    revision: str | None = None
    transforms: list[Any] = field(default_factory=list)


def resolve_data(node: Any, overrides: dict[str, Any], cfg: DictConfig, where: str,
                 key: str, overrides_key: str | None = None) -> DataSpec:
    """A stage's (or sub-task's) data: null -> the run's data group; a group name -> that
    file of conf/data; a mapping -> itself. ``overrides`` are merged on top (checked first on
    their own, so a bad one is named at ``overrides_key``)."""
    if overrides:
        bind_schema(DataSpec, overrides, where, overrides_key or f"{key}_overrides")
    if isinstance(node, str):
        node = data_group(node, cfg, where)
    data = plain(node if node is not None else cfg.data)
    if not isinstance(data, dict):
        raise FtlabError(f"{where} must be a mapping or a data group name.",
                         "see conf/data/*.yaml.")
    spec = bind_schema(DataSpec, {**data, **overrides}, where, key)
    spec.transforms = resolve_nodes(spec.transforms, f"{where}.transforms")
    if spec.label_names:  # by the labels' string forms, as they are matched: keys of mixed
        named: dict[str, str] = {}  # types ({0: a, "1": b}) stopped the stage key and the card
        for label, name in spec.label_names.items():  # with a bare TypeError (unsortable)
            if str(label) in named:
                raise FtlabError(f"{where}: data.label_names names the label '{label}' twice.",
                                 "name each label once.")
            named[str(label)] = name
        spec.label_names = named
    return spec


def data_group(name: str, cfg: DictConfig, where: str) -> DictConfig:
    """conf/data/<name>.yaml, its interpolations (``${paths.data_dir}``) read from ``cfg``."""
    from ftlab.cli import CONFIG_DIR

    folder = Path(CONFIG_DIR) / "data"
    options = sorted(p.stem for p in folder.glob("*.yaml"))
    if name not in options:
        raise FtlabError(f"{where} names the data group '{name}', which does not exist.",
                         f"use one of: {choices_text(options)}, or an inline data node.")
    root = OmegaConf.create({"paths": cfg.get("paths") or {}})
    root.data = OmegaConf.load(folder / f"{name}.yaml")
    return root.data
