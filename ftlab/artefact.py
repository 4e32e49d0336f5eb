"""What a stage writes beside its artefact so that it can be used later without the run's
config or data: ``<stage>/card.json`` (the resolved stage: model spec, task, PEFT and
regulariser nodes, data spec, seed; the label set in id order, and a multi-task stage's
sub-tasks' label sets, which its heads are built from) and ``<stage>/tokenizer/``
(``save_pretrained``). ``read_stage_card`` turns the JSON back into a ``ResolvedStage``.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from ftlab.errors import FtlabError
from ftlab.pipeline import ResolvedStage
from ftlab.store import read_json, write_json

#: bump when the card's layout changes
CARD_FORMAT = 1
CARD = "card.json"
TOKENIZER = "tokenizer"
#: the card's key for the run folder the stage was trained in
RUN_DIR = "run_dir"
#: the card's key for a multi-task stage's label sets, by sub-task
SUBTASK_LABELS = "subtask_labels"


def write_stage_card(stage_dir: Path, stage: ResolvedStage, task: Any, tokenizer: Any,
                     data_transforms: list[dict[str, Any]] | None = None) -> Path:
    """Write ``card.json`` and ``tokenizer/`` into ``stage_dir``; returns the card's path.
    ``task``: the stage's bound task (its label set; a multi-task one's, each sub-task's);
    ``data_transforms``: what each of ``data.transforms`` did to the training rows."""
    from ftlab.tasks.base import HasSubtasks

    tokenizer.save_pretrained(str(stage_dir / TOKENIZER))
    card = {"format": CARD_FORMAT, "stage": asdict(stage), "labels": _labels(task),
            RUN_DIR: str(stage_dir.parent.resolve())}  # where its in-run paths point (moved_here)
    if isinstance(task, HasSubtasks):  # loading builds every head: its label set, not its data
        card[SUBTASK_LABELS] = {name: _labels(part.task) for name, part in task.parts.items()}
    if data_transforms:
        card["data_transforms"] = data_transforms
    return write_json(stage_dir / CARD, card)


def _labels(task: Any) -> list[str] | None:
    labels = getattr(task, "labels", None)
    return list(labels) if labels else None


def read_subtask_labels(stage_dir: Path,
                        stage: ResolvedStage) -> dict[str, list[str] | None] | None:
    """A multi-task ``stage``'s label sets by sub-task, from its card (None: a card written
    before they were in it, whose heads are built from the sub-tasks' data)."""
    path = stage_dir / CARD
    try:
        saved = read_json(path).get(SUBTASK_LABELS)
    except (OSError, ValueError, AttributeError):  # read_stage_card read it already
        return None
    names = [sub.name for sub in stage.subtasks]
    if saved is None:
        return None
    if not (isinstance(saved, dict) and sorted(saved) == sorted(names) and all(
            v is None or (isinstance(v, list) and all(isinstance(x, str) for x in v))
            for v in saved.values())):
        raise _damaged(path, f"its {SUBTASK_LABELS} {saved!r} are not a list of names for "
                       f"each of its sub-tasks {names}")
    return saved


def read_stage_card(stage_dir: Path) -> tuple[ResolvedStage, list[str] | None]:
    """(the resolved stage, its labels in id order) from ``stage_dir/card.json``."""
    from ftlab.data.spec import DataSpec
    from ftlab.model.backbone import ModelSpec
    from ftlab.optim import OptimSpec
    from ftlab.runtime import RuntimeSpec

    path = stage_dir / CARD
    if not path.is_file():
        raise FtlabError(f"{stage_dir} has no {CARD} (written by ftlab since predict/export "
                         "came in; save_artefact: false writes none).",
                         "re-run the stage with this version and save_artefact: true.")
    try:
        card = read_json(path)
    except (OSError, ValueError) as err:  # cut short (a partial copy), not JSON
        raise _damaged(path, f"not readable JSON: {err}") from None
    if not isinstance(card, dict):
        raise _damaged(path, f"a JSON {type(card).__name__}, not an object")
    if card.get("format") != CARD_FORMAT:
        raise FtlabError(f"{path} has format {card.get('format')}; this ftlab reads "
                         f"{CARD_FORMAT}.", "use the ftlab version that wrote the run.")
    from ftlab.pipeline import SubTask

    try:
        s = dict(card["stage"])
        s |= {"model": ModelSpec(**s["model"]), "data": DataSpec(**s["data"]),
              "optim": OptimSpec(**s["optim"]), "teachers": tuple(s.get("teachers", ())),
              "runtime": RuntimeSpec(**s.get("runtime", {})),
              "subtasks": tuple(SubTask(**(t | {"data": DataSpec(**t["data"])}))
                                for t in s.get("subtasks") or ())}
        stage = ResolvedStage(**s)
    except (KeyError, TypeError, ValueError) as err:  # a key missing, renamed or of a wrong type
        raise _damaged(path, f"its stage does not read as one ({type(err).__name__}: {err})") \
            from None
    labels = card.get("labels")
    if labels is not None and not (isinstance(labels, list)
                                   and all(isinstance(x, str) for x in labels)):
        raise _damaged(path, f"its labels {labels!r} are not a list of names")
    return stage, labels


def moved_here(stage: ResolvedStage, stage_dir: Path) -> ResolvedStage:
    """``stage`` with the paths it was trained with read from where the run is now.

    Its ``peft.stack_on`` artefacts (MAD-X: the task adapter stacks on the language stage's
    ``<run>/lang/trainable.safetensors``, an absolute path) that lay in the run folder it was
    trained in point into the run folder it is in now: the run was moved or copied, or the
    stage came from the stage cache (its card names the run that trained it). Without the
    card's ``run_dir`` (an older card) an entry that is gone is looked for in this run's stage
    of its folder's name. A relative local model (``model.name_or_path=my_models/bert``) or
    sub-task data file is read from the folder the run was started in (Hydra's record of it)
    where it is there, else from here."""
    from dataclasses import replace

    run_dir = stage_dir.parent
    model = replace(stage.model, **{k: _from_start(getattr(stage.model, k), run_dir)
                                    for k in ("name_or_path", "tokenizer")})
    stage = replace(stage, model=model) if model != stage.model else stage
    if stage.subtasks:  # a multi-task stage is rebuilt from its sub-tasks' data files

        def here(data: Any) -> Any:
            return replace(data, files={k: _from_start(v, run_dir)
                                        for k, v in (data.files or {}).items()} or data.files)

        stage = replace(stage, data=here(stage.data), subtasks=tuple(
            replace(sub, data=here(sub.data)) for sub in stage.subtasks))
    entries = list(stage.peft.get("stack_on") or []) if isinstance(stage.peft, dict) else []
    if not entries:
        return stage
    try:
        trained_in = read_json(stage_dir / CARD).get(RUN_DIR)
    except (OSError, ValueError, AttributeError):  # read_stage_card read it already
        trained_in = None
    moved = []
    for entry in entries:
        path = Path(str(entry)).expanduser()
        here = run_dir / path.parent.name / path.name
        was_ours = (Path(path.parent.parent).resolve() == Path(trained_in).resolve()
                    if isinstance(trained_in, str) else not path.is_file())
        moved.append(str(here) if was_ours and here.is_file() else entry)
    return replace(stage, peft={**stage.peft, "stack_on": moved})


def _from_start(source: Any, run_dir: Path) -> Any:
    """``source`` (a model, tokenizer or data file: hub name, URI or path) as a path from the
    folder the run was started in, where it is a relative path that is there: what the run
    read, before a namesake in the folder it is loaded from (another model, or none)."""
    if not isinstance(source, str) or "://" in source or Path(source).expanduser().is_absolute():
        return source
    from omegaconf import OmegaConf

    try:  # a run's and a sweep job's own folder hold Hydra's record of the command
        start = Path(str(OmegaConf.load(run_dir / ".hydra" / "hydra.yaml").hydra.runtime.cwd))
    except Exception:  # noqa: BLE001 - no record (a run made in Python), or not readable
        return source
    return str(start / source) if (start / source).exists() else source


#: the fix for a stage file that is missing or damaged (a run folder copied in part)
DAMAGED_FIX = "copy the run folder again from where it was made (whole), or run the stage again."


def _damaged(path: Path, why: str) -> FtlabError:
    return FtlabError(f"The stage card {path} is damaged ({why}).", DAMAGED_FIX)


#: the run-level ``save_artefact``: which jobs keep full-size artefacts (PEFT ones always stay)
POLICIES = ("best", "all", "none")


def keep_best_full_artefacts(records: list[dict[str, Any]], sweep_dir: Path) -> str | None:
    """``save_artefact: best`` at the end of a sweep: delete the full-size artefacts
    (``trainable.safetensors`` of stages that trained over half the weights) of every job but
    the one with the best objective, and note it in their ``metrics.json``. Returns the kept
    job's folder name (None: no finished job)."""
    import math

    done = [r for r in records if r.get("status") == "ok" and "job" in r]
    if not done:
        return None
    mode = (done[0].get("monitor") or {}).get("mode", "max")
    sign = 1 if mode == "max" else -1

    def score(r: dict[str, Any]) -> float:
        value = r.get("objective")
        return sign * value if isinstance(value, int | float) and math.isfinite(value) \
            else -math.inf

    from ftlab.record import finished_of

    best = max(done, key=score)["job"]
    for rec in records:
        if rec.get("job") == best or rec.get("job") is None:
            continue
        changed = False
        for stage in (rec.get("stages") or {}).values():
            path = stage.get("artefact")
            if stage.get("full_size_artefact") and path and Path(path).is_file() \
                    and Path(path).resolve().is_relative_to((sweep_dir / rec["job"]).resolve()):
                Path(path).unlink()
                stage["artefact"] = None  # as save_artefact=none records it: no path to a file
                stage["artefact_dropped"] = f"save_artefact=best: job {best} kept its"
                changed = True
        if changed:
            disk = read_json(sweep_dir / rec["job"] / "metrics.json")
            # a killed re-run's record: the finished one it keeps (``finished_before``)
            (finished_of(disk) or disk)["stages"] = rec["stages"]
            write_json(sweep_dir / rec["job"] / "metrics.json", disk)
    return best
