"""Stages and the pipeline: a run is an ordered list of stages (often just one), each resolved
once into a frozen ``ResolvedStage``. Training, validation and the stage cache take only that.

Precedence of a stage's settings, lowest first (README, "Which value wins"):
the run's groups (``trainer``, ``data``, ``peft``...) < the stage's own YAML node < keys given
explicitly at run level (command line or ``experiment=``) < keys given explicitly for that stage
(``pipeline.stages.<name>.<key>=``, or ``stage.<key>=`` for a single stage).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Annotated, Any

from omegaconf import DictConfig

from ftlab.budget import BudgetSpec, split_budget
from ftlab.config import bind_schema, plain
from ftlab.data.spec import DataSpec, resolve_data
from ftlab.errors import FtlabError, choices_text
from ftlab.model.backbone import ModelSpec
from ftlab.optim import DEFAULT_LR, OptimSpec
from ftlab.overrides import Explicit, model_node, stage_nodes, trainer_node
from ftlab.pipeline_checks import check_head_warmup, check_pipeline
from ftlab.rules import Rule, at_least, between, check_field, one_of
from ftlab.runtime import RuntimeSpec, split_trainer
from ftlab.store import check_name

log = logging.getLogger(__name__)

#: what a stage takes from its init_from stage
CARRY = ("model", "encoder")


#: the largest seed numpy and Lightning take (2^32 - 1)
MAX_SEED = 2**32 - 1


@dataclass
class StageSpec:
    """One adaptation stage as written in YAML (``conf/stage/*.yaml``, ``pipeline.stages``).

    Attributes:
        name: the stage's name: its output folder, W&B job_type, what ``init_from`` refers to.
        task: the objective, a ``_target_`` node (``ftlab.tasks.classify.Classify``...).
        init_from: ``pretrained`` or the name of an earlier stage in the pipeline.
        carry: what is taken from ``init_from``: ``model`` (everything that fits) or
            ``encoder`` (the backbone only; the head starts fresh).
        batch_size / eval_batch_size: rows per training / evaluation batch (per device);
            ``batch_size: auto`` finds the largest that fits in memory before training.
        optim: optimiser settings.
        trainer: this stage's own Trainer settings, on top of the run's ``trainer`` group.
        seed: this stage's seed; null uses the run's ``seed``.
        data / peft / regularizer: this stage's own nodes; null uses the run's groups.
        save_artefact: write the trained parameters as safetensors.
        data_overrides: keys merged onto this stage's data (e.g. ``{max_train_samples: null}``
            so TAPT reads all of the task's text while the classifier gets 500 labels).
        aux_mlm_weight: > 0 adds that times a masked-LM loss on the task's own text to the
            training loss (joint adaptive + task training, Chronopoulou et al. 2019).
        teachers: earlier stages (names) or finished runs (folders, ``folder#stage``) whose
            averaged soft predictions become this stage's training labels (``ftlab/distill.py``).
        teacher_temperature: the teachers' scores are divided by it before the softmax (PET: 2).
        student_temperature: the student's scores are divided by it in its soft-label loss,
            times its square (PET's and Hinton et al.'s distillation loss); None: the teachers'.
        teacher_rows: null: the teachers label every row to learn from (distillation); a
            number: iPET, that many teacher-labelled rows of the unlabelled split are added to
            the gold training rows.
        tasks: sub-tasks by name (``stage=multitask``): each a :class:`SubTaskSpec` node; the
            stage's ``task`` is then the multi-task node (``ftlab.tasks.multitask.MultiTask``)
            and every sub-task trains one shared encoder with a head of its own.
        head_warmup_steps: LP-FT (Kumar et al. 2022): the first this many optimiser steps train
            only the task's head (``ftlab.model.arch.head_parameters``: classification/token
            head, a fresh MLM head's transform and bias but not its tied decoder), everything
            else frozen; then the PEFT method's trainable set. One LR schedule spans all steps.
            0: off; a whole number >= 1: steps, which must be below the stage's total steps;
            below 1: that share of the total steps (``ftlab.callbacks.HeadWarmup``).
    """

    name: str = "classify"
    task: Any = None
    init_from: str = "pretrained"
    carry: Annotated[str, one_of(*CARRY)] = "model"
    batch_size: Annotated[int | str, at_least(1, also=("auto",), example="32")] = 32  # or "auto"
    eval_batch_size: Annotated[int, at_least(1, example="128")] = 128
    optim: OptimSpec = field(default_factory=OptimSpec)
    trainer: dict[str, Any] = field(default_factory=dict)
    seed: Annotated[int | None, between(0, MAX_SEED, example="1")] = None
    data: Any = None
    peft: Any = None
    regularizer: Any = None
    save_artefact: bool = True
    data_overrides: dict[str, Any] = field(default_factory=dict)
    aux_mlm_weight: Annotated[float, at_least(0, example="0.1")] = 0.0
    teachers: list[str] = field(default_factory=list)
    teacher_temperature: Annotated[float, Rule(gt=0, example="2.0")] = 2.0
    student_temperature: Annotated[float | None, Rule(gt=0, example="2.0")] = None
    teacher_rows: Annotated[int | None, at_least(1, example="1000")] = None
    tasks: dict[str, Any] = field(default_factory=dict)
    head_warmup_steps: Annotated[float, at_least(0, example="100")] = 0


@dataclass
class SubTaskSpec:
    """One sub-task of a multi-task stage (``stage.tasks.<name>``).

    Attributes:
        task: its objective, a ``_target_`` node (any ftlab Task: ``Classify``...).
        data: null (the run's data group), a data group name (``vitaminc``: conf/data/
            vitaminc.yaml) or an inline data node.
        data_overrides: keys merged onto that data (e.g. ``{max_train_samples: 500}``).
        weight: its loss is multiplied by this.
    """

    task: Any = None
    data: Any = None
    data_overrides: dict[str, Any] = field(default_factory=dict)
    weight: Annotated[float, at_least(0, example="1.0")] = 1.0


@dataclass(frozen=True)
class SubTask:
    """A resolved sub-task: name, ``_target_`` node, data and loss weight."""

    name: str
    task: dict[str, Any]
    data: DataSpec
    weight: float = 1.0


@dataclass(frozen=True)
class ResolvedStage:
    """Everything that shapes one stage, worked out once by ``build_pipeline``.

    ``task``/``peft``/``regularizer`` are ``_target_`` nodes (plain dicts; the PEFT node
    without its ``lr``), ``trainer`` the Lightning ``Trainer`` node (run group + stage + explicit
    overrides, without ftlab's own keys: ``runtime``, ``budget``), ``optim.lr`` the peak LR at
    ``optim.reference_batch`` rows. ``batch_size`` is an int or ``"auto"``. Treat the dicts
    as read-only.
    """

    name: str
    task: dict[str, Any]
    init_from: str
    carry: str
    batch_size: int | str
    eval_batch_size: int
    seed: int
    model: ModelSpec
    data: DataSpec
    peft: dict[str, Any]
    regularizer: dict[str, Any]
    optim: OptimSpec
    trainer: dict[str, Any]
    aux_mlm_weight: float = 0.0
    save_artefact: bool = True
    teachers: tuple[str, ...] = ()
    teacher_temperature: float = 2.0
    student_temperature: float = 2.0
    teacher_rows: int | None = None
    runtime: RuntimeSpec = field(default_factory=RuntimeSpec)
    subtasks: tuple[SubTask, ...] = ()  # a multi-task stage's sub-tasks (``data``: the first's)
    head_warmup_steps: float = 0  # LP-FT: optimiser steps that train only the head first
    budget: BudgetSpec | None = None  # the adaptive length (ftlab/budget.py); None: fixed by you
    # where its data's keys are set, for messages: "" -> the data node's key (pipeline.stages.
    # <name>.data), a data_overrides key -> that key; empty: the run's data group (data.<key>)
    data_keys: dict[str, str] = field(default_factory=dict)
    key: str = "stage"  # where its settings are set, for messages (pipeline.stages.<name>)

    @property
    def where(self) -> str:
        return f"stage '{self.name}'"

    def data_error(self, err: FtlabError) -> FtlabError:
        """``err`` from loading the stage's data with its ``data.<key>`` names replaced by the
        keys that set them for this stage (``pipeline.stages.inter.data.text_columns``)."""
        if not self.data_keys:
            return err
        import re

        def sub(text: str) -> str:
            return re.sub(r"(?<![\w.$/])data\.(\w+)", lambda m: self.data_keys.get(
                m.group(1), f"{self.data_keys.get('', 'data')}.{m.group(1)}"), text)

        return FtlabError(f"{self.where} data: {sub(err.problem)}",
                          sub(err.fix) if err.fix else None)

    @property
    def datasets(self) -> list[DataSpec]:
        """Every dataset the stage trains on: its sub-tasks' or its own."""
        return [t.data for t in self.subtasks] or [self.data]


def split_peft(node: Any) -> tuple[Any, float | None]:
    """(the PEFT node without ``lr``, that ``lr``): the method's suggested peak LR is read by
    the stage, not passed to the method."""
    node = plain(node)
    if node is None or "lr" not in node:
        return node, None
    lr = node["lr"]
    return {k: v for k, v in node.items() if k != "lr"}, None if lr is None else float(lr)


def run_seed(cfg: DictConfig) -> int:
    seed = cfg.get("seed")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise FtlabError(f"seed must be an integer, got {seed!r}.",
                         "e.g. seed=1 (sweep: -m seed=1,2,3).")
    if not 0 <= seed <= MAX_SEED:  # numpy's generators refuse it mid-run; Lightning resets it
        raise FtlabError(f"seed={seed} is out of range: it must be in [0, {MAX_SEED}].",
                         "e.g. seed=1 (sweep: -m seed=1,2,3).")
    return seed


def build_pipeline(cfg: DictConfig, explicit: Explicit | None = None) -> list[ResolvedStage]:
    """The run's stages, resolved: ``cfg.pipeline.stages`` if set, else the single ``cfg.stage``.

    ``explicit`` holds the keys the user set on purpose (``overrides.explicit_keys``); without
    it only the YAML's own precedence applies (the run's group < the stage's node).
    """
    explicit = explicit or Explicit()
    nodes, prefix = stage_nodes(cfg, explicit)
    specs = [bind_schema(StageSpec, node, f"stage '{key}'", prefix(key))
             for key, node in nodes.items()]
    check_pipeline(specs)
    for key, node in nodes.items():  # conf/stage/distill.yaml's teachers: [] left as it is
        if "teachers" in node and not node["teachers"]:
            raise FtlabError(f"Stage '{key}' is a distillation stage with no teachers: it would "
                             "train on the gold labels and distil nothing.",
                             f"list them: {prefix(key)}.teachers=[<earlier stage>, ...] or run "
                             "folders ['outputs/runs/<time>', ...]; for a classifier on the gold "
                             "labels use stage=classify.")
    for s in specs:
        check_head_warmup(s, prefix(s.name))
    model = bind_schema(ModelSpec, model_node(cfg, explicit), "model", "model")
    seed = run_seed(cfg)
    return [_resolve(s, cfg, model, seed, explicit, prefix(s.name)) for s in specs]


def _resolve(spec: StageSpec, cfg: DictConfig, model: ModelSpec, seed: int,
             explicit: Explicit, prefix: str) -> ResolvedStage:
    where = f"stage '{spec.name}'"
    subtasks = tuple(_subtask(name, node, cfg, where, prefix)
                     for name, node in spec.tasks.items())
    if subtasks and spec.teachers:
        raise FtlabError(f"{where} is a multi-task stage with teachers; teachers label one "
                         "dataset.", "drop the teachers, or distil in a single-task stage.")
    if subtasks and (spec.data is not None or spec.data_overrides):  # were silently unused
        raise FtlabError(f"{where} is a multi-task stage: its own data / data_overrides would "
                         "not reach any sub-task (each reads its own data).",
                         f"set them per sub-task: {prefix}.tasks.<name>.data or "
                         f"+{prefix}.tasks.<name>.data_overrides.<key>=... (its sub-tasks: "
                         f"{choices_text(spec.tasks)}).")
    data_key = f"{prefix}.data" if spec.data is not None else "data"
    data_spec = subtasks[0].data if subtasks else resolve_data(
        spec.data, spec.data_overrides, cfg, f"{where} data", data_key,
        f"{prefix}.data_overrides")
    data_keys = {} if subtasks or not (spec.data is not None or spec.data_overrides) else {
        "": data_key, **{k: f"{prefix}.data_overrides.{k}" for k in spec.data_overrides}}
    raw_peft = plain(spec.peft or cfg.peft)
    peft, peft_lr = split_peft(raw_peft)
    if isinstance(raw_peft, dict) and "lr" not in raw_peft:  # inline node: its group's lr
        from ftlab.cli import CONFIG_DIR
        from ftlab.peft.group_lr import group_lr
        peft_lr = group_lr(raw_peft, CONFIG_DIR, where)
    if peft_lr is not None and spec.optim.lr is None:  # the method's LR applies: its rule too
        check_field(OptimSpec, "lr", peft_lr, where,
                    f"{prefix}.peft.lr" if spec.peft else "peft.lr")
    optim = spec.optim if spec.optim.lr is not None else replace(
        spec.optim, lr=peft_lr if peft_lr is not None else DEFAULT_LR)
    trainer, runtime = split_trainer(trainer_node(cfg, spec.trainer, explicit, prefix), where)
    trainer, budget = split_budget(trainer, spec.trainer, explicit, prefix, where)
    return ResolvedStage(
        name=spec.name, task=plain(spec.task), init_from=spec.init_from, carry=spec.carry,
        batch_size=spec.batch_size, eval_batch_size=spec.eval_batch_size,
        seed=spec.seed if spec.seed is not None else seed, model=model, data=data_spec,
        peft=peft, regularizer=plain(spec.regularizer or cfg.regularizer), optim=optim,
        trainer=trainer, runtime=runtime, budget=budget,
        aux_mlm_weight=spec.aux_mlm_weight, save_artefact=spec.save_artefact,
        teachers=tuple(spec.teachers), teacher_temperature=spec.teacher_temperature,
        student_temperature=(spec.student_temperature if spec.student_temperature is not None
                             else spec.teacher_temperature),
        teacher_rows=spec.teacher_rows, subtasks=subtasks,
        head_warmup_steps=spec.head_warmup_steps, data_keys=data_keys, key=prefix)


def _subtask(name: str, node: Any, cfg: DictConfig, where: str, prefix: str) -> SubTask:
    spec = bind_schema(SubTaskSpec, node, f"{where} tasks.{name}")
    check_name(name, "Sub-task name", f"rename {where}'s sub-task (e.g. to '{{name}}').")
    if "." in name:  # names prefix metric keys (<task>/acc), where a dot means nesting
        raise FtlabError(f"{where}: sub-task name '{name}' has a dot.",
                         f"rename it, e.g. to '{name.replace('.', '_')}'.")
    if name == "mean":  # mean/<metric> are the sub-tasks' means: its metrics would be lost
        raise FtlabError(f"{where}: a sub-task cannot be named 'mean' (val/mean and "
                         "val/mean/<metric> are the sub-tasks' averages).",
                         "rename it, e.g. stage.tasks.mean_task.")
    if not isinstance(spec.task, dict) or "_target_" not in spec.task:
        raise FtlabError(f"{where}: sub-task '{name}' has no task.",
                         "give it a task node with a _target_, e.g. "
                         "{_target_: ftlab.tasks.classify.Classify}.")
    data = resolve_data(spec.data, spec.data_overrides, cfg, f"{where} tasks.{name}.data",
                      f"{prefix}.tasks.{name}.data")
    return SubTask(name, plain(spec.task), data, float(spec.weight))
