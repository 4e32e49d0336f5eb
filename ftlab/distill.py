"""Stages that learn from other stages' predictions: teachers label the text, a student learns
the averaged soft labels (PET's final step, Schick & Schuetze 2021; knowledge distillation,
Hinton et al. 2015).

A stage's ``teachers`` are earlier stages of the same pipeline (by name) or finished runs (a
run or sweep-job folder, optionally ``folder#stage``). Each teacher scores the student's
training rows with its own task (a cloze teacher through its pattern and verbaliser), the
scores (logits) are averaged over teachers and softened with ``teacher_temperature``,
``softmax(mean_t s_t / T)`` (PET: T = 2; its ``merge_logits`` with the uniform ``mean``
reduction, not the ``wmean`` that weights each model by its accuracy before training), and
the rows' labels become those probability vectors; the student's classification task then
trains with soft-target cross-entropy. Rows come from the data's ``unlabelled`` split when it
has one (``data.transforms=[few_shot]`` keeps the rest of the training split there), else from
its training split (gold labels are then only used to report the teachers' accuracy).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ftlab.data.sources import RawData
from ftlab.errors import FtlabError
from ftlab.pipeline import ResolvedStage

if TYPE_CHECKING:
    from ftlab.build import StageBuilder
    from ftlab.inference import Predictor

log = logging.getLogger(__name__)

#: the split a distillation stage labels when the data has it (few-shot's leftover rows)
UNLABELLED = "unlabelled"


def is_run_dir(teacher: str) -> bool:
    """A teacher given as a folder (it has a path separator), not a stage name."""
    return "/" in teacher or teacher.startswith(("~", "."))


def split_ref(teacher: str) -> tuple[Path, str | None]:
    path, _, stage = teacher.partition("#")
    return Path(path).expanduser(), stage or None


def teacher_fingerprint(teacher: str) -> list[Any]:
    """What identifies a finished-run teacher in the student's cache key: its artefact's size
    and modification time (a retrained teacher is a new key)."""
    from ftlab.rebuild import TRAINABLE
    from ftlab.run_folder import stage_names

    path, stage = split_ref(teacher)
    if not path.is_dir():
        return [teacher, None]
    names = stage_names(path)
    name = stage or (names[-1] if names else "")
    art = path / name / TRAINABLE
    return [str(path.resolve()), name, *([art.stat().st_size, art.stat().st_mtime_ns]
                                         if art.is_file() else [None])]


def teachers_of(stage: ResolvedStage, builder: StageBuilder,
                upstream: dict[str, Any]) -> list[Predictor]:
    """A predictor per teacher: an earlier pipeline stage (its trained model and bound task) or
    a finished run (``ftlab.load``)."""
    from ftlab.inference import Predictor, load

    out = []
    for teacher in stage.teachers:
        if is_run_dir(teacher):
            path, name = split_ref(teacher)
            out.append(load(path, name))
            continue
        if teacher not in upstream:
            raise FtlabError(f"{stage.where}: teacher '{teacher}' has not run before it.",
                             "name earlier stages of the pipeline, or finished run folders.")
        model, task, spec = builder.trained(teacher, upstream[teacher].model)
        out.append(Predictor(model.eval(), task.tokenizer, list(task.labels), spec, None, task))
    return out


def label_with_teachers(raw: RawData, stage: ResolvedStage, teachers: list[Predictor],
                        columns: list[str]) -> tuple[RawData, dict[str, Any]]:
    """``raw`` with the rows to learn from labelled by the teachers' averaged soft predictions
    (train split := those rows), and what to record about it."""
    if raw.labels is None:
        raise FtlabError(f"{stage.where}: distillation needs the label set (data.labels or a "
                         "labelled split) to match the teachers' classes.",
                         "set data.labels to the teachers' labels in their order.")
    for t in teachers:
        if list(t.labels) != list(raw.labels):
            raise FtlabError(f"{stage.where}: a teacher predicts {t.labels}, but the data's labels"
                             f" are {raw.labels} (names and order must match).",
                             "use teachers trained on the same labels, or set data.labels to "
                             "their order.")
    if stage.teacher_rows is not None:
        return _add_teacher_rows(raw, stage, teachers, columns)
    source = UNLABELLED if UNLABELLED in raw.splits else "train"
    rows = raw.splits[source]
    texts = [{c: rows[c][i] for c in columns} for i in range(len(rows))]
    probs = ensemble_predictions(teachers, texts, stage.teacher_temperature)
    info: dict[str, Any] = {"teachers": list(stage.teachers), "distilled_rows": len(rows),
                            "distilled_from": source,
                            "teacher_temperature": stage.teacher_temperature}
    if source == "train" and "label" in rows.column_names:
        gold = torch.as_tensor(rows["label"])
        if not gold.is_floating_point():
            info["teacher_train_acc"] = (probs.argmax(-1) == gold).float().mean().item()
    labelled = rows.remove_columns("label") if "label" in rows.column_names else rows
    labelled = labelled.add_column("label", probs.tolist())
    from datasets import DatasetDict

    splits = DatasetDict(dict(raw.splits))
    splits["train"] = labelled
    if UNLABELLED in splits:
        del splits[UNLABELLED]
    log.info("%s: %d rows labelled by %d teachers (T=%g)", stage.where, len(rows),
             len(teachers), stage.teacher_temperature)
    return RawData(splits, raw.labels), info


def check_teacher_rows(stage: ResolvedStage, labels: list[str] | None) -> None:
    """iPET draws each class its share of ``teacher_rows``: fewer rows than classes leave a
    class none even when the gold rows are balanced."""
    if stage.teacher_rows is not None and labels and stage.teacher_rows < len(labels):
        raise FtlabError(f"{stage.where}: teacher_rows={stage.teacher_rows} adds fewer "
                         f"teacher-labelled rows than there are classes ({len(labels)}).",
                         f"set teacher_rows to at least {len(labels)} (the number of classes"
                         "; PET: d = 5 times the labelled rows).")


def _add_teacher_rows(raw: RawData, stage: ResolvedStage, teachers: list[Predictor],
                      columns: list[str]) -> tuple[RawData, dict[str, Any]]:
    """iPET (Schick & Schuetze 2021): the gold training rows plus ``teacher_rows`` rows of the
    unlabelled split with the teachers' (hard) labels, each class in its share of the gold
    rows (PET: the training set's label distribution), drawn with
    probability proportional to the teachers' confidence (seeded)."""
    from datasets import DatasetDict, concatenate_datasets

    from ftlab.tasks.classify import label_counts

    if UNLABELLED not in raw.splits:
        raise FtlabError(f"{stage.where}: teacher_rows adds teacher-labelled rows from the "
                         "data's unlabelled split, and the data has none.",
                         "give the data an unlabelled split (data.transforms=[few_shot] keeps "
                         "the rest of the training split as one), or teacher_rows: null to "
                         "distil on the training split.")
    check_teacher_rows(stage, raw.labels)
    pool = raw.splits[UNLABELLED]
    texts = [{c: pool[c][i] for c in columns} for i in range(len(pool))]
    probs = ensemble_predictions(teachers, texts, stage.teacher_temperature)
    keep = [*columns, "label"]
    gold = raw.splits["train"].select_columns(keep)
    counts = label_counts(gold["label"], len(raw.labels)) if len(gold) else None
    pick = balanced_confident(probs, stage.teacher_rows, stage.seed, counts)
    added = pool.select(pick).select_columns(columns).add_column(
        "label", probs[pick].argmax(-1).tolist())
    added = added.cast(gold.features)
    splits = DatasetDict({k: v for k, v in raw.splits.items() if k != UNLABELLED})
    splits["train"] = concatenate_datasets([gold, added])
    counts = torch.bincount(probs[pick].argmax(-1), minlength=len(raw.labels)).tolist()
    log.info("%s: %d gold rows + %d teacher-labelled rows %s", stage.where, len(gold), len(pick),
             counts)
    return RawData(splits, raw.labels), {
        "teachers": list(stage.teachers), "teacher_rows_added": len(pick),
        "teacher_rows_per_class": dict(zip(raw.labels, counts, strict=True)),
        "teacher_temperature": stage.teacher_temperature}


def balanced_confident(probs: torch.Tensor, n: int, seed: int,
                       gold: torch.Tensor | None = None) -> list[int]:
    """About ``n`` row indices, per predicted class its share of the gold rows (``gold``: rows
    per class; PET's iPET keeps the gold rows' label distribution; ``n / classes`` each
    without gold) or all of a class when it has fewer, each drawn without replacement with
    probability proportional to its confidence."""
    gen = torch.Generator().manual_seed(seed)
    best, conf = probs.argmax(-1), probs.max(-1).values
    classes = probs.shape[-1]
    quota = ([n // classes] * classes if gold is None else
             [int(k * n / int(gold.sum())) for k in gold.tolist()])
    picked: list[int] = []
    for c in range(classes):
        idx = (best == c).nonzero().flatten()
        per_class = quota[c]
        if per_class == 0:  # a class rare among the gold rows gets no share of a small n
            continue
        if len(idx) <= per_class:
            picked += idx.tolist()
            continue
        draw = torch.multinomial(conf[idx], per_class, replacement=False, generator=gen)
        picked += idx[draw].tolist()
    return sorted(picked)


def ensemble_predictions(teachers: list[Predictor], texts: list[dict[str, Any]],
                         temperature: float) -> torch.Tensor:
    """PET's soft labels ``[rows, classes]``: ``softmax(mean_t scores_t / T)``, the teachers'
    scores (logits) averaged first (PET's ``merge_logits``), not their probabilities."""
    scores = torch.stack([teacher_logits(t, texts) for t in teachers]).mean(0)
    return (scores / temperature).softmax(-1)


def teacher_logits(teacher: Predictor, texts: list[dict[str, Any]]) -> torch.Tensor:
    """A teacher's scores; for a task whose probabilities are not their softmax (a calibrated
    cloze task: p / p_cf) the log of those, so the soft labels carry what the teacher predicts
    and its ``acc_cal`` scored (a log-softmax shifts each row by a constant, which the
    average and softmax ignore)."""
    from ftlab.tasks.base import ProbabilitiesFromScores

    scores = teacher.scores(texts)
    task = getattr(teacher, "task", None)
    if isinstance(task, ProbabilitiesFromScores):
        return task.probabilities(teacher.model, scores).clamp_min(1e-12).log()
    return scores

