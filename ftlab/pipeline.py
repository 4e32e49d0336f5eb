"""Stage specs and the pipeline: a run is an ordered list of stages (often just one)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ftlab.config import bind_schema
from ftlab.errors import FtlabError, choices_text
from ftlab.optim import DEFAULT_LR, OptimSpec


@dataclass
class StageSpec:
    """One adaptation stage.

    Attributes:
        name: the stage's name: its output folder, W&B job_type, what ``init_from`` refers to.
        task: the objective, a ``_target_`` node (``ftlab.tasks.classify.Classify``...).
        init_from: ``pretrained`` or the name of an earlier stage in the pipeline.
        carry: what is taken from ``init_from``: ``model`` (everything that fits) or
            ``encoder`` (the backbone only; the head starts fresh).
        batch_size / eval_batch_size: rows per training / evaluation batch.
        optim: optimiser settings.
        trainer: overrides of the trainer group for this stage (``max_epochs``...).
        seed: this stage's seed; null uses the run's ``seed``.
        data / peft / regularizer: this stage's own nodes; null uses the run's groups.
        save_artefact: write the trained parameters as safetensors.
        data_overrides: keys merged onto this stage's data (e.g. ``{max_train_samples: null}``
            so TAPT reads all of the task's text while the classifier gets 500 labels).
        aux_mlm_weight: > 0 adds that times a masked-LM loss on the task's own text to the
            training loss (joint adaptive + task training, Chronopoulou et al. 2019).
    """

    name: str = "classify"
    task: Any = None
    init_from: str = "pretrained"
    carry: str = "model"
    batch_size: int = 32
    eval_batch_size: int = 128
    optim: OptimSpec = field(default_factory=OptimSpec)
    trainer: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None
    data: Any = None
    peft: Any = None
    regularizer: Any = None
    save_artefact: bool = True
    data_overrides: dict[str, Any] = field(default_factory=dict)
    aux_mlm_weight: float = 0.0


CARRY = ("model", "encoder")


def stage_data(stage: StageSpec, cfg: DictConfig) -> dict[str, Any]:
    """The stage's resolved data node: its own (or the run's) plus ``data_overrides``."""
    node = stage.data if stage.data is not None else cfg.data
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    return {**node, **stage.data_overrides}


def stage_seed(stage: StageSpec, cfg: DictConfig) -> int:
    """The stage's own seed, or the run's."""
    return stage.seed if stage.seed is not None else cfg.seed


def stage_node(stage: StageSpec, cfg: DictConfig, group: str) -> Any:
    """The stage's own ``peft``/``regularizer`` node, or the run's group, as its constructor
    takes it (a PEFT node's ``lr`` is the stage's business: see ``stage_optim``)."""
    node = _own_or_run(stage, cfg, group)
    return split_peft(node)[0] if group == "peft" else node


def _own_or_run(stage: StageSpec, cfg: DictConfig, group: str) -> Any:
    return getattr(stage, group) or cfg[group]


def split_peft(node: Any) -> tuple[Any, float | None]:
    """(the PEFT node without ``lr``, that ``lr``): the method's suggested peak LR is read by
    the stage, not passed to the method."""
    if node is None or "lr" not in node:
        return node, None
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    lr = node["lr"]
    return {k: v for k, v in node.items() if k != "lr"}, None if lr is None else float(lr)


def stage_optim(stage: StageSpec, cfg: DictConfig) -> OptimSpec:
    """The stage's optimiser settings with the peak LR resolved: the stage's ``optim.lr`` if
    set, else the PEFT method's ``lr`` (e.g. 1e-3 for adapters), else ``DEFAULT_LR``."""
    if stage.optim.lr is not None:
        return stage.optim
    lr = split_peft(_own_or_run(stage, cfg, "peft"))[1]
    return replace(stage.optim, lr=lr if lr is not None else DEFAULT_LR)


def build_pipeline(cfg: DictConfig) -> list[StageSpec]:
    """The stages of a run: ``cfg.pipeline.stages`` if set, else the single ``cfg.stage``."""
    pipeline = cfg.get("pipeline")
    nodes = (pipeline.get("stages") if pipeline else None) or {cfg.stage.name: cfg.stage}
    stages = []
    for key, node in nodes.items():  # in a pipeline the mapping key is the stage's name
        node = OmegaConf.merge(node, {"name": key if len(nodes) > 1 or pipeline else
                                      node.get("name") or key})
        stages.append(bind_schema(StageSpec, node, f"stage '{key}'"))
    for data in (s.data for s in stages):  # resolved later, but fail early on a bad type
        if data is not None and not isinstance(data, dict):
            raise FtlabError("A stage's data must be a mapping.", "see conf/data/*.yaml.")
    check_pipeline(stages)
    return stages


def check_pipeline(stages: list[StageSpec]) -> None:
    seen: list[str] = []
    for s in stages:
        if s.name in seen:
            raise FtlabError(f"Two stages are named '{s.name}'.", "give each stage its own name.")
        if s.init_from != "pretrained" and s.init_from not in seen:
            raise FtlabError(
                f"Stage '{s.name}' starts from '{s.init_from}', which is not an earlier stage.",
                f"use init_from: pretrained or one of: {choices_text(seen) or '(none yet)'}.")
        if s.carry not in CARRY:
            raise FtlabError(f"Stage '{s.name}' has carry '{s.carry}'.",
                             f"use one of: {choices_text(CARRY)}.")
        if s.task is None or "_target_" not in s.task:
            raise FtlabError(f"Stage '{s.name}' has no task.",
                             "give it a task node with a _target_ (see conf/stage/*.yaml).")
        seen.append(s.name)


def stage_trainer(cfg: DictConfig, stage: StageSpec) -> DictConfig:
    """The run's trainer group with the stage's overrides on top.

    A plain (non-struct) merge: a stage may set any Trainer argument, not only the YAML's.
    """
    return OmegaConf.merge(OmegaConf.to_container(cfg.trainer, resolve=True), stage.trainer)
