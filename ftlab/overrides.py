"""Which keys the user set on purpose, and how they reach every stage of a pipeline.

A Hydra config does not say where a value came from, so the job runner collects the keys given
explicitly (the command line's ``key=value`` overrides and the leaves of the chosen
``experiment=`` bundle) and the pipeline applies them:

- ``trainer.<key>`` given explicitly wins over a stage's own ``trainer`` node in every stage,
  unless that stage's own key was given explicitly too (``pipeline.stages.<name>.trainer.<key>``).
- ``stage.<key>`` given explicitly with ``pipeline=`` applies to every stage of the pipeline
  (``stage.task.<key>`` to every stage whose task takes it), unless the stage's own key was
  given explicitly.
- an explicit ``peft``/``regularizer``/``data`` key that no stage would read (every stage has
  its own node) stops the run with the key to set instead; so does ``stage=`` with a pipeline.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ftlab.config import plain
from ftlab.errors import FtlabError, choices_text

log = logging.getLogger(__name__)

#: stage keys that cannot mean the same thing for every stage of a pipeline
PER_STAGE = ("name", "init_from", "carry")


@dataclass(frozen=True)
class Explicit:
    """Dotted keys set on purpose (``trainer.max_steps``), and group options chosen (``peft``)."""

    keys: frozenset[str] = frozenset()
    groups: frozenset[str] = frozenset()

    def has(self, key: str) -> bool:
        return key in self.keys

    def under(self, prefix: str) -> list[str]:
        """Explicit keys below ``prefix.``, without the prefix, in a stable order."""
        n = len(prefix) + 1
        return sorted(k[n:] for k in self.keys if k.startswith(prefix + "."))


def explicit_keys(overrides: Iterable[str], experiment: str | None = None,
                  config_dir: str | None = None) -> Explicit:
    """``Explicit`` from Hydra's task overrides (``a.b=1``, ``+a.b=1``, ``peft=lora``) and the
    leaves of the ``experiment`` YAML (``# @package _global_``) found in ``config_dir``."""
    keys, groups = set(), set()
    for item in overrides:
        if "=" not in item:
            continue
        key = item.split("=", 1)[0].lstrip("+~")
        (keys if "." in key else groups).add(key)
    if experiment and config_dir:
        path = Path(config_dir) / "experiment" / f"{experiment}.yaml"
        if path.is_file():
            node = OmegaConf.to_container(OmegaConf.load(path))
            node.pop("defaults", None)
            keys |= set(_leaves(node))
    return Explicit(frozenset(keys), frozenset(groups))


def _leaves(node: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k, v in node.items():
        key = f"{prefix}{k}"
        out += _leaves(v, key + ".") if isinstance(v, dict) and v else [key]
    return out



def _set(node: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        child = node.get(p)
        if not isinstance(child, dict):
            child = node[p] = {}
        node = child
    node[leaf] = value


def stage_nodes(cfg: DictConfig, explicit: Explicit
                ) -> tuple[dict[str, dict[str, Any]], Callable[[str], str]]:
    """(stage name -> its node as a plain dict, with explicit ``stage.*`` keys applied; a
    function giving a stage's explicit-key prefix)."""
    pipeline = cfg.get("pipeline")
    stages = pipeline.get("stages") if pipeline else None
    if not stages:
        node = plain(cfg.stage)
        node["name"] = node.get("name") or "classify"
        return {node["name"]: node}, lambda _name: "stage"
    if "stage" in explicit.groups:
        raise FtlabError("stage= picks the single stage of a run, but pipeline= is set, so it "
                         "would do nothing.", "drop stage=..., or change a pipeline stage with "
                         f"pipeline.stages.<name>.<key>=... (stages: {choices_text(stages)}).")
    nodes = {}
    for name, node in stages.items():
        node = plain(node)
        if explicit.has(f"pipeline.stages.{name}.name") and node.get("name") != name:
            raise FtlabError(f"pipeline.stages.{name}.name={node.get('name')} would do nothing: "
                             "a pipeline stage is named by its key under pipeline.stages.",
                             "rename the key in the pipeline's YAML (and every init_from and "
                             "teachers that refer to it), or drop the override.")
        node["name"] = name
        nodes[name] = node
    _apply_stage_keys(cfg, nodes, explicit)
    _check_run_groups(nodes, explicit)
    return nodes, lambda name: f"pipeline.stages.{name}"


def _apply_stage_keys(cfg: DictConfig, nodes: dict[str, dict], explicit: Explicit) -> None:
    for key in explicit.under("stage"):
        head = key.split(".")[0]
        if head in PER_STAGE:
            raise FtlabError(f"stage.{key} cannot apply to every stage of a pipeline.",
                             f"set it per stage: pipeline.stages.<name>.{key}=... "
                             f"(stages: {choices_text(nodes)}).")
        value = plain(OmegaConf.select(cfg, f"stage.{key}"))
        took = []
        for name, node in nodes.items():
            if explicit.has(f"pipeline.stages.{name}.{key}"):
                continue  # the stage's own explicit value wins
            if head == "task" and not _takes(node.get("task"), key.split(".")[1]):
                continue
            _set(node, key, value)
            took.append(name)
        if not took and head == "task":
            raise FtlabError(f"stage.{key}: no stage of the pipeline has a task that takes "
                             f"'{key.split('.')[1]}'.",
                             f"set it on one stage: pipeline.stages.<name>.{key}=... "
                             f"(stages: {choices_text(nodes)}).")


def _takes(task: Any, name: str) -> bool:
    from ftlab.config import load_target

    try:  # an allow-listed target only: nothing else is imported
        params = inspect.signature(load_target(task["_target_"], "stage.task")).parameters
    except Exception:  # an unimportable or refused target is reported by validation
        return True
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _check_run_groups(nodes: dict[str, dict], explicit: Explicit) -> None:
    """An explicit run-level ``peft``/``regularizer``/``data`` choice or key that no stage
    reads (each has its own node) would vanish: stop with the key to set instead."""
    for group in ("peft", "regularizer", "data"):
        given = [group] if group in explicit.groups else []
        given += [f"{group}.{k}" for k in explicit.under(group)]
        if given and all(node.get(group) is not None for node in nodes.values()):
            raise FtlabError(
                f"{given[0]} does nothing here: every stage of the pipeline has its own "
                f"{group} node.", f"set it on a stage instead: pipeline.stages.<name>.{group}"
                f"... (stages: {choices_text(nodes)}).")


def trainer_node(cfg: DictConfig, own: dict[str, Any], explicit: Explicit,
                 prefix: str) -> dict[str, Any]:
    """The stage's Trainer node: the run's ``trainer`` group, the stage's own keys on top, then
    run-level keys given explicitly (unless ``<prefix>.trainer.<key>`` was explicit too). A
    null in the stage's node means "not set": the run's value applies.

    A plain merge: a stage may set any Trainer argument, not only the YAML's.
    """
    own = {k: v for k, v in (own or {}).items() if v is not None}  # null: not set by the stage
    node = plain(OmegaConf.merge(plain(cfg.trainer), own))
    for key in explicit.under("trainer"):
        if not explicit.has(f"{prefix}.trainer.{key}"):
            _set(node, key, plain(OmegaConf.select(cfg, f"trainer.{key}")))
    return node


def model_node(cfg: DictConfig, explicit: Explicit) -> dict[str, Any]:
    """``cfg.model``, without a from-scratch model's architecture when you point
    ``model.name_or_path`` at a pre-trained model: ``model=tiny_bert model.name_or_path=X``
    loads X with X's own config and tokenizer; the YAML's ``config`` (it has a ``model_type``)
    and ``tokenizer`` are dropped with a warning. Keys you give yourself
    (``model.config.hidden_dropout_prob=0.2``, ``model.tokenizer=...``) stay."""
    node = plain(cfg.model)
    config = node.get("config") or {}
    if not (isinstance(node, dict) and explicit.has("model.name_or_path")
            and node.get("name_or_path") and "model_type" in config
            and not explicit.has("model.config.model_type")):
        return node
    node["config"] = {k: v for k, v in config.items() if explicit.has(f"model.config.{k}")}
    dropped = [f"config.{k}" for k in config if k not in node["config"]]
    if node.get("tokenizer") and not explicit.has("model.tokenizer"):
        dropped.append(f"tokenizer ({node['tokenizer']})")
        node["tokenizer"] = None
    log.warning("model.name_or_path=%s replaces the chosen model YAML's from-scratch model: its "
                "%s are dropped (%s's own config and tokenizer apply). Set them on the command "
                "line to keep them.", node["name_or_path"], ", ".join(dropped),
                node["name_or_path"])
    return node
