"""A finished stage's model from its run folder: the stage card (``ftlab/artefact.py``) read
back, the task bound to its saved label sets and tokenizer, the model built with the builders
training used (an ``init_from`` stage rebuilt first and handed over), and the trained tensors
(``trainable.safetensors``) loaded by its PEFT method. ``ftlab.load`` (ftlab/inference.py)
wraps it in a ``Predictor``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ftlab.errors import FtlabError
from ftlab.run_folder import no_artefact

if TYPE_CHECKING:
    from torch import nn

#: a stage's trained tensors, in its folder
TRAINABLE = "trainable.safetensors"


def rebuild(run_dir: Path, name: str, builder: Any) -> tuple[nn.Module, Any, Any]:
    """(model with the stage's trained parameters, its PEFT method, its bound task); an
    ``init_from`` stage is rebuilt first and handed over as in training."""
    from transformers import AutoTokenizer

    from ftlab.artefact import DAMAGED_FIX, TOKENIZER, moved_here, read_stage_card
    from ftlab.artefact import read_subtask_labels as subtask_labels
    from ftlab.store import load_tensors

    stage_dir = run_dir / name
    spec, labels = read_stage_card(stage_dir)
    spec = moved_here(spec, stage_dir)  # MAD-X: the adapters it stacks, in this run folder
    if spec.name != name:  # a later stage finds its upstream by the card's name, not the folder's
        raise FtlabError(f"The folder {stage_dir} holds the card of stage '{spec.name}': it was "
                         "renamed, or copied from another stage.",
                         f"give it its stage's name ({spec.name}/) again; else {DAMAGED_FIX}")
    if not (stage_dir / TRAINABLE).is_file():
        raise no_artefact(run_dir, name, TRAINABLE)
    if not (stage_dir / TOKENIZER).is_dir():
        raise FtlabError(f"Stage '{name}' has no {TOKENIZER}/ folder ({stage_dir / TOKENIZER}).",
                         DAMAGED_FIX)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(stage_dir / TOKENIZER))
    except Exception as err:  # noqa: BLE001 - OSError, JSON and tokenizers' own errors
        said = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise FtlabError(f"Stage '{name}' has a damaged {TOKENIZER}/ folder ({said}).",
                         DAMAGED_FIX) from None
    if "model_type" in spec.model.config:  # as training's load_tokenizer (GPT-2: no segment ids)
        from ftlab.model.tokenizer_fit import configure_tokenizer

        configure_tokenizer(tokenizer, spec.model.config["model_type"])
    saved = subtask_labels(stage_dir, spec) if spec.subtasks else None
    if spec.subtasks and saved is None:  # a card without its sub-tasks' label sets (written
        try:  # before they were in it): its heads are built from their data, as in training
            task = builder.task(spec)
        except FtlabError as err:  # the data's own message speaks of training
            raise FtlabError(f"Stage '{name}' is multi-task and its card (an older ftlab's) has "
                             "no label sets of its sub-tasks: loading rebuilds its heads from "
                             f"their data, as training did, which failed: {err.problem}",
                             "make that data readable where the run read it (relative paths: "
                             f"from the folder the run was started in); {err.fix.rstrip('.')}; or "
                             "train the run again (its cards then hold them).") from None
    else:
        task = builder.saved_task(spec, labels, tokenizer, saved)
    upstream = None
    if spec.init_from != "pretrained":
        from ftlab.store import check_name

        check_name(spec.init_from, f"The card of stage '{name}' names the stage it started "
                   "from", f"the card is damaged or not ftlab's: {DAMAGED_FIX}")
        if not (run_dir / spec.init_from).is_dir():  # rebuilt first, as in training
            raise FtlabError(f"Stage '{name}' starts from stage '{spec.init_from}', whose folder "
                             f"{run_dir / spec.init_from} is missing: the run folder is "
                             "incomplete.", f"restore {spec.init_from}/ from the run (copy run "
                             "folders whole), or run the run again.")
        upstream, _, _ = rebuild(run_dir, spec.init_from, builder)
    with untrained_head_report_off():  # the trained head is loaded just below
        model, peft, _, _ = builder.model(spec, upstream)
    try:
        tensors = load_tensors(stage_dir / TRAINABLE)
    except Exception as err:  # noqa: BLE001 - SafetensorError (cut short, not safetensors), OSError
        why = str(err) or type(err).__name__
        raise FtlabError(f"Stage '{name}' has a damaged {TRAINABLE} ({why}): cut short or not "
                         "a safetensors file.", DAMAGED_FIX) from None
    peft.load_trainable_state(model, tensors)
    return model, peft, task


@contextmanager
def untrained_head_report_off() -> Iterator[None]:
    """Transformers' "newly initialized ... Consider training" report (and loading bar): true
    while the model is built, false once the run's weights are loaded."""
    from transformers.utils import logging as hf_logging

    level, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bar:
            hf_logging.enable_progress_bar()
