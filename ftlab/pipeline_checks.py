"""Checks of a pipeline's stage list before anything trains: names, order of ``init_from``
and ``teachers``, task/peft/regulariser nodes, head warm-up counts."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ftlab.errors import FtlabError, choices_text
from ftlab.store import check_name

if TYPE_CHECKING:
    from ftlab.pipeline import StageSpec


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
        if s.task is None or "_target_" not in s.task:
            raise FtlabError(f"Stage '{s.name}' has no task.",
                             "give it a task node with a _target_ (see conf/stage/*.yaml).")
        for node, what in ((s.peft, "peft"), (s.regularizer, "regularizer")):
            if node is not None and not (isinstance(node, dict) and "_target_" in node):
                raise FtlabError(f"Stage '{s.name}' has a {what} node without a _target_.",
                                 f"give it a mapping with a _target_ (see conf/{what}/*.yaml), "
                                 "or null for the run's group.")
        _check_teachers(s, seen, {t.name for t in stages if t.tasks})
        seen.append(s.name)


def check_head_warmup(s: StageSpec, key: str) -> None:
    n = s.head_warmup_steps
    if n >= 1 and not float(n).is_integer():
        raise FtlabError(f"Stage '{s.name}' has head_warmup_steps={n}: a step count must be a "
                         "whole number.", f"{key}.head_warmup_steps={int(n)} (steps), or a "
                         "share of the stage's steps below 1 (e.g. 0.1).")


def _check_teachers(s: StageSpec, seen: list[str], multitask: set[str]) -> None:
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
        elif teacher in multitask:  # its model scores one sub-task; the label set is not one
            raise FtlabError(f"Stage '{s.name}' has teacher '{teacher}', a multi-task stage, "
                             "which has no one label set to teach.", "use single-task stages "
                             f"as teachers, e.g. one that starts from it (init_from: {teacher}, "
                             "carry: encoder) and learns the student's labels.")
    # (ranges of teacher_rows and teacher_temperature: their rules on StageSpec)
    if s.teacher_rows is not None and not s.teachers:
        raise FtlabError(f"Stage '{s.name}' has teacher_rows {s.teacher_rows} but no teachers.",
                         "iPET: a positive number of teacher-labelled rows to add, with "
                         "teachers; null to distil on every row.")
