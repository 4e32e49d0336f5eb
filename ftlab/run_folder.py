"""Reading a finished run folder without building anything: its stages in pipeline order, a
stage's card (spec and labels) with a clear error where there is none to load, its record."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ftlab.errors import FtlabError, choices_text, closest


def stage_names(run_dir: Path) -> list[str]:
    """The run's stages in pipeline order (``metrics.json``), else every folder with a card,
    each after the stages it started from, learnt from or stacked on (``card_order``)."""
    names = recorded_pipeline(run_dir)
    return names if names is not None else card_order(run_dir)[0]


def recorded_pipeline(run_dir: Path) -> list[str] | None:
    """The stages in pipeline order as ``metrics.json`` lists them (None: no readable list)."""
    from ftlab.store import SAFE_NAME

    names = run_record(run_dir).get("pipeline")  # {} for a metrics.json cut short or not JSON
    if isinstance(names, list) and names and all(  # names become paths: never '..' or '/'
            isinstance(n, str) and SAFE_NAME.fullmatch(n) and ".." not in n for n in names):
        return names
    return None


def card_order(run_dir: Path) -> tuple[list[str], list[str]]:
    """(the folders with a card, each after the stages its card names as its ``init_from``,
    ``teachers`` or ``peft.stack_on`` folder, else by name; the ones no other stage names: a
    pipeline's last stage, where there is one) without ``metrics.json``: sorted by name alone,
    PET's p1, p2, p3 and distill put p3 last."""
    from ftlab.artefact import CARD
    from ftlab.store import read_json

    names = sorted(p.parent.name for p in run_dir.glob(f"*/{CARD}"))
    needs: dict[str, set[str]] = {}
    for name in names:
        try:
            stage = read_json(run_dir / name / CARD)["stage"]
            peft = stage.get("peft") or {}
            named = {stage.get("init_from"), *(stage.get("teachers") or ()),
                     *(Path(str(p)).parent.name for p in peft.get("stack_on") or ())}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):  # damaged: said later
            named = set()
        needs[name] = {n for n in named if n in names and n != name}
    order: list[str] = []
    while len(order) < len(names):  # the first (by name) whose stages are all placed; a cycle
        ready = [n for n in names if n not in order and needs[n] <= set(order)] or [
            n for n in names if n not in order]  # (a damaged card) keeps the name order
        order.append(ready[0])
    named_by_others = set().union(*needs.values()) if needs else set()
    return order, [n for n in order if n not in named_by_others]


def labelled_stages(run_dir: Path, but: str) -> list[str]:
    """The run's stages other than ``but`` that have a label set (they predict)."""
    from ftlab.artefact import CARD, read_stage_card

    return [n for n in stage_names(run_dir) if n != but and (run_dir / n / CARD).is_file()
            and read_stage_card(run_dir / n)[1]]


def stage_card(run_dir: Path, stage: str | None) -> tuple[str, Any, list[str] | None]:
    """(name, stage spec, labels) of the run's ``stage`` (default: its last), read from its card
    without building anything; a clear error where there is none to load."""
    from ftlab.artefact import CARD, read_stage_card

    if not run_dir.is_dir():
        raise FtlabError(f"There is no run folder {run_dir}.",
                         "pass a folder ftlab wrote, e.g. outputs/runs/<time>.")
    names = recorded_pipeline(run_dir)  # as stage_names, keeping the candidates for last
    names, last = (names, None) if names is not None else card_order(run_dir)
    if not names and (run_dir / CARD).is_file():  # a stage's folder, not its run's
        raise FtlabError(f"{run_dir} is the folder of stage '{run_dir.name}', not a run folder.",
                         f"pass the run folder that holds it: {run_dir.parent} (with --stage "
                         f"{run_dir.name}; ftlab.load(run_dir, stage='{run_dir.name}')).")
    if not names:
        raise FtlabError(f"{run_dir} holds no trained stage (no */card.json).",
                         "pass the folder of a finished run (a job folder of a sweep).")
    if stage is None and last is not None and len(last) > 1:
        raise FtlabError(f"{run_dir} has no readable metrics.json, which names the run's last "
                         f"stage, and its stages {choices_text(last)} each "
                         "could be it.", "name the stage: --stage NAME (ftlab.load(run_dir, "
                         "stage=NAME)).")
    name = stage or names[-1]
    if name not in names:
        raise FtlabError(f"The run has no stage '{name}'.{closest(name, names)}",
                         f"use --stage with one of: {choices_text(names)}.")
    if not (run_dir / name / CARD).is_file():  # e.g. the run stopped before the stage trained
        _why_no_card(run_dir, name, names)
    _say_if_stopped_early(run_dir, name)
    spec, labels = read_stage_card(run_dir / name)
    if not labels and spec.subtasks:  # a multi-task stage: its heads need its sub-tasks' data
        labelled = labelled_stages(run_dir, name)
        raise FtlabError(f"Stage '{name}' has no labels of its own (a multi-task stage).",
                         f"load a single-task stage: ftlab.load(run_dir, stage=...) or --stage "
                         f"with one of: {choices_text(labelled)}." if labelled else
                         "load a run that trained a classifier.")
    return name, spec, labels


def _why_no_card(run_dir: Path, name: str, names: list[str]) -> None:
    """Raise what the run's record says about stage ``name`` having no card (a run still
    training, ended in an error, or discarded before the stage); else return (an older run:
    ``read_stage_card`` says so)."""
    from ftlab.artefact import CARD

    record = run_record(run_dir)
    status = record.get("status")
    done = [n for n in names if n != name and (run_dir / n / CARD).is_file()]
    pick = f"; a finished stage loads with --stage: {choices_text(done)}" if done else ""
    if status == "running":  # killed hard (SIGKILL, a lost node) leaves it so too
        raise FtlabError(f"Stage '{name}' of {run_dir} has no artefact yet: the run has not "
                         "finished (status 'running': still training, or killed).",
                         f"wait for it to finish, or resume a killed run (ftlab resume={run_dir})"
                         f"{pick}.")
    stopped = record.get("discarded")
    if status in ("discarded", "pruned") and isinstance(stopped, dict):
        at = _stopped_stage(record)
        partly = (f"; stage '{at}' loads, partly trained, with --stage {at}" if at in done
                  else "")
        raise FtlabError(f"Stage '{name}' of {run_dir} has no artefact: the job was "
                         f"{_stopped_text(record)}, so the stages after it did not run.",
                         "load a job of the sweep that finished (its summary.md lists them)"
                         f"{partly}.")
    if status not in (None, "ok", "discarded", "pruned"):
        why = str(record.get("error") or record.get("interrupted") or "").split("\n")[0]
        raise FtlabError(f"Stage '{name}' of {run_dir} has no artefact: the run ended with "
                         f"status '{status}'{f' ({why})' if why else ''}.",
                         f"fix what stopped it and run it again (ftlab resume=<run folder>){pick}.")


def _stopped_stage(record: dict[str, Any]) -> str | None:
    """The stage early discard (its record names it) or a search's pruner stopped."""
    stopped = record.get("discarded")
    if isinstance(stopped, dict) and isinstance(stopped.get("stage"), str):
        return stopped["stage"]
    stages = record.get("stages") if isinstance(record.get("stages"), dict) else {}
    return next((n for n, info in stages.items()
                 if isinstance(info, dict) and isinstance(info.get("discarded"), dict)), None)


def _stopped_text(record: dict[str, Any]) -> str:
    """'discarded by early discard in stage 'tapt' at step 3 of 12' (the record's words)."""
    stopped, stage = record["discarded"], _stopped_stage(record)
    how = ("pruned by the search's pruner" if record.get("status") == "pruned" else
           "discarded by early discard")
    where = f" in stage '{stage}'" if stage else ""
    steps, planned = stopped.get("steps", stopped.get("step")), stopped.get("planned_steps")
    at = f" at step {steps}" + (f" of {planned}" if planned else "") if steps is not None else ""
    return f"{how}{where}{at}"


def _say_if_stopped_early(run_dir: Path, name: str) -> None:
    """Warn that stage ``name`` was stopped early (a discarded or pruned job's last stage):
    its artefact holds partly trained weights."""
    import logging

    record = run_record(run_dir)
    if record.get("status") in ("discarded", "pruned") and isinstance(
            record.get("discarded"), dict) and _stopped_stage(record) == name:
        logging.getLogger(__name__).warning(
            "Stage '%s' of %s was stopped early (%s): its weights are partly trained.", name,
            run_dir, _stopped_text(record))


def run_record(run_dir: Path) -> dict[str, Any]:
    """The run's ``metrics.json`` ({} when there is no readable one)."""
    from ftlab.resume import read_record

    return read_record(run_dir / "metrics.json") or {}


def dropped_artefact(run_dir: Path, name: str) -> str | None:
    """Why the run-level ``save_artefact`` policy deleted the stage's artefact, if it did."""
    stage = (run_record(run_dir).get("stages") or {}).get(name)
    return stage.get("artefact_dropped") if isinstance(stage, dict) else None


def no_artefact(run_dir: Path, name: str, file: str) -> FtlabError:
    """Why stage ``name`` has no artefact ``file``, and the fix."""
    dropped = dropped_artefact(run_dir, name)
    if dropped == "save_artefact=none":  # never written
        return FtlabError(f"Stage '{name}' has no {file}: the run ran with save_artefact=none, "
                          "which writes no full-size artefact.",
                          "re-run it with save_artefact=all (or best, in a sweep).")
    if dropped:  # deleted when the sweep ended (it keeps only the best job's)
        return FtlabError(f"Stage '{name}' has no {file}: the run's save_artefact policy "
                          f"deleted it ({dropped} full-size artefact).",
                          "load the job that kept it, or re-run with save_artefact=all.")
    return FtlabError(f"Stage '{name}' has no {file} (save_artefact: false?).",
                      "re-run it with save_artefact: true.")
