"""Stages and the pipeline: a run is an ordered list of stages (often just one), each resolved
once into a frozen ``ResolvedStage``. Training, validation and the stage cache take only that.

Precedence of a stage's settings, lowest first (README, "Which value wins"):
the run's groups (``trainer``, ``data``, ``peft``...) < the stage's own YAML node < keys given
explicitly at run level (command line or ``experiment=``) < keys given explicitly for that stage
(``pipeline.stages.<name>.<key>=``, or ``stage.<key>=`` for a single stage).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from omegaconf import DictConfig

from ftlab.config import bind_schema, plain
from ftlab.data.spec import DataSpec
from ftlab.data.transforms.nodes import resolve_nodes
from ftlab.errors import FtlabError, choices_text
from ftlab.model.backbone import ModelSpec
from ftlab.optim import DEFAULT_LR, OptimSpec
from ftlab.overrides import Explicit, stage_nodes, trainer_node
from ftlab.runtime import RuntimeSpec, split_trainer
from ftlab.store import check_name


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
        teacher_rows: null: the teachers label every row to learn from (distillation); a
            number: iPET, that many teacher-labelled rows of the unlabelled split are added to
            the gold training rows.
        tasks: sub-tasks by name (``stage=multitask``): each a :class:`SubTaskSpec` node; the
            stage's ``task`` is then the multi-task node (``ftlab.tasks.multitask.MultiTask``)
            and every sub-task trains one shared encoder with a head of its own.
    """

    name: str = "classify"
    task: Any = None
    init_from: str = "pretrained"
    carry: str = "model"
    batch_size: Any = 32  # an int, or "auto"
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
    teachers: list[str] = field(default_factory=list)
    teacher_temperature: float = 2.0
    teacher_rows: int | None = None
    tasks: dict[str, Any] = field(default_factory=dict)


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
    weight: float = 1.0


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
    overrides, without ftlab's own keys, which are in ``runtime``), ``optim.lr`` the peak LR
    at ``optim.reference_batch`` rows. ``batch_size`` is an int or ``"auto"``. Treat the dicts
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
    teacher_rows: int | None = None
    runtime: RuntimeSpec = field(default_factory=RuntimeSpec)
    subtasks: tuple[SubTask, ...] = ()  # a multi-task stage's sub-tasks (``data``: the first's)

    @property
    def where(self) -> str:
        return f"stage '{self.name}'"

    @property
    def datasets(self) -> list[DataSpec]:
        """Every dataset the stage trains on: its sub-tasks' or its own."""
        return [t.data for t in self.subtasks] or [self.data]


CARRY = ("model", "encoder")



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
    return seed


def build_pipeline(cfg: DictConfig, explicit: Explicit | None = None) -> list[ResolvedStage]:
    """The run's stages, resolved: ``cfg.pipeline.stages`` if set, else the single ``cfg.stage``.

    ``explicit`` holds the keys the user set on purpose (``overrides.explicit_keys``); without
    it only the YAML's own precedence applies (the run's group < the stage's node).
    """
    explicit = explicit or Explicit()
    nodes, prefix = stage_nodes(cfg, explicit)
    specs = [bind_schema(StageSpec, node, f"stage '{key}'") for key, node in nodes.items()]
    check_pipeline(specs)
    model = bind_schema(ModelSpec, cfg.model, "model")
    seed = run_seed(cfg)
    return [_resolve(s, cfg, model, seed, explicit, prefix(s.name)) for s in specs]


def _resolve(spec: StageSpec, cfg: DictConfig, model: ModelSpec, seed: int,
             explicit: Explicit, prefix: str) -> ResolvedStage:
    where = f"stage '{spec.name}'"
    subtasks = tuple(_subtask(name, node, cfg, where) for name, node in spec.tasks.items())
    if subtasks and spec.teachers:
        raise FtlabError(f"{where} is a multi-task stage with teachers; teachers label one "
                         "dataset.", "drop the teachers, or distil in a single-task stage.")
    data_spec = subtasks[0].data if subtasks else _data_spec(
        spec.data, spec.data_overrides, cfg, f"{where} data")
    peft, peft_lr = split_peft(spec.peft or cfg.peft)
    optim = spec.optim if spec.optim.lr is not None else replace(
        spec.optim, lr=peft_lr if peft_lr is not None else DEFAULT_LR)
    trainer, runtime = split_trainer(trainer_node(cfg, spec.trainer, explicit, prefix), where)
    return ResolvedStage(
        name=spec.name, task=plain(spec.task), init_from=spec.init_from, carry=spec.carry,
        batch_size=spec.batch_size, eval_batch_size=spec.eval_batch_size,
        seed=spec.seed if spec.seed is not None else seed, model=model, data=data_spec,
        peft=peft, regularizer=plain(spec.regularizer or cfg.regularizer), optim=optim,
        trainer=trainer, runtime=runtime,
        aux_mlm_weight=spec.aux_mlm_weight, save_artefact=spec.save_artefact,
        teachers=tuple(spec.teachers), teacher_temperature=spec.teacher_temperature,
        teacher_rows=spec.teacher_rows, subtasks=subtasks)


def _data_spec(node: Any, overrides: dict[str, Any], cfg: DictConfig, where: str) -> DataSpec:
    """A stage's (or sub-task's) data: null -> the run's data group; a group name -> that
    file of conf/data; a mapping -> itself. ``overrides`` are merged on top."""
    if isinstance(node, str):
        node = _data_group(node, cfg, where)
    data = plain(node if node is not None else cfg.data)
    if not isinstance(data, dict):
        raise FtlabError(f"{where} must be a mapping or a data group name.",
                         "see conf/data/*.yaml.")
    spec = bind_schema(DataSpec, {**data, **overrides}, where)
    spec.transforms = resolve_nodes(spec.transforms, f"{where}.transforms")
    return spec


def _data_group(name: str, cfg: DictConfig, where: str) -> DictConfig:
    """conf/data/<name>.yaml, its interpolations (``${paths.data_dir}``) read from ``cfg``."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from ftlab.cli import CONFIG_DIR

    folder = Path(CONFIG_DIR) / "data"
    options = sorted(p.stem for p in folder.glob("*.yaml"))
    if name not in options:
        raise FtlabError(f"{where} names the data group '{name}', which does not exist.",
                         f"use one of: {choices_text(options)}, or an inline data node.")
    root = OmegaConf.create({"paths": cfg.get("paths") or {}})
    root.data = OmegaConf.load(folder / f"{name}.yaml")
    return root.data


def _subtask(name: str, node: Any, cfg: DictConfig, where: str) -> SubTask:
    spec = bind_schema(SubTaskSpec, node, f"{where} tasks.{name}")
    check_name(name, "Sub-task name", f"rename {where}'s sub-task (e.g. to '{{name}}').")
    if "." in name:  # names prefix metric keys (<task>/acc), where a dot means nesting
        raise FtlabError(f"{where}: sub-task name '{name}' has a dot.",
                         f"rename it, e.g. to '{name.replace('.', '_')}'.")
    if not isinstance(spec.task, dict) or "_target_" not in spec.task:
        raise FtlabError(f"{where}: sub-task '{name}' has no task.",
                         "give it a task node with a _target_, e.g. "
                         "{_target_: ftlab.tasks.classify.Classify}.")
    data = _data_spec(spec.data, spec.data_overrides, cfg, f"{where} tasks.{name}.data")
    return SubTask(name, plain(spec.task), data, float(spec.weight))


def check_pipeline(stages: list[StageSpec]) -> None:
    for s in stages:  # names become folder names: checked before anything else
        check_name(s.name, "Stage name", "rename it: stage.name={name}, or in a pipeline "
                   "rename its key under pipeline.stages (e.g. to '{name}') and the init_from "
                   "that refer to it.")
    seen: list[str] = []
    for s in stages:
        if s.name in seen:
            raise FtlabError(f"Two stages are named '{s.name}'.", "give each stage its own name.")
        if s.init_from != "pretrained" and s.init_from not in seen:
            raise FtlabError(
                f"Stage '{s.name}' starts from '{s.init_from}', which is not an earlier stage.",
                f"use init_from: pretrained or one of: {choices_text(seen) or '(none yet)'}.")
        if s.batch_size != "auto" and (not isinstance(s.batch_size, int)
                                       or isinstance(s.batch_size, bool) or s.batch_size < 1):
            raise FtlabError(f"Invalid value in stage '{s.name}' for key 'batch_size': "
                             f"{s.batch_size!r}.",
                             "use a whole number of 1 or more (per device), or auto (the "
                             "largest that fits in memory; for GPUs).")
        if s.carry not in CARRY:
            raise FtlabError(f"Stage '{s.name}' has carry '{s.carry}'.",
                             f"use one of: {choices_text(CARRY)}.")
        if s.task is None or "_target_" not in s.task:
            raise FtlabError(f"Stage '{s.name}' has no task.",
                             "give it a task node with a _target_ (see conf/stage/*.yaml).")
        for node, what in ((s.peft, "peft"), (s.regularizer, "regularizer")):
            if node is not None and not (isinstance(node, dict) and "_target_" in node):
                raise FtlabError(f"Stage '{s.name}' has a {what} node without a _target_.",
                                 f"give it a mapping with a _target_ (see conf/{what}/*.yaml), "
                                 "or null for the run's group.")
        _check_teachers(s, seen)
        seen.append(s.name)


def _check_teachers(s: StageSpec, seen: list[str]) -> None:
    from ftlab.distill import is_run_dir, split_ref

    for teacher in s.teachers:
        if is_run_dir(teacher):
            if not split_ref(teacher)[0].is_dir():
                raise FtlabError(f"Stage '{s.name}' has teacher '{teacher}', which is no folder.",
                                 "give finished run folders (outputs/runs/<time>, a sweep's job "
                                 "folder), optionally folder#stage, or earlier stage names.")
        elif teacher not in seen:
            raise FtlabError(f"Stage '{s.name}' has teacher '{teacher}', which is not an earlier "
                             "stage.", f"use earlier stages ({choices_text(seen) or 'none yet'}) "
                             "or run folders (with a '/').")
    if s.teacher_rows is not None and (s.teacher_rows < 1 or not s.teachers):
        raise FtlabError(f"Stage '{s.name}' has teacher_rows {s.teacher_rows}"
                         f"{'' if s.teachers else ' but no teachers'}.",
                         "iPET: a positive number of teacher-labelled rows to add, with "
                         "teachers; null to distil on every row.")
    if s.teacher_temperature <= 0:
        raise FtlabError(f"Stage '{s.name}' has teacher_temperature {s.teacher_temperature}.",
                         "use a positive temperature (PET: 2; 1 keeps the teachers' scores).")
