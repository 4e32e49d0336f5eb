"""AuxMLM answers the optional task Protocols as the task it wraps, on every Python: 3.12+
finds a runtime Protocol's members with ``inspect.getattr_static``, which never calls the
wrapper's ``__getattr__``, so the members must be visible on the wrapper's class."""

from __future__ import annotations

import copy
import inspect
import pickle
from pathlib import Path

import pytest
from datasets.fingerprint import Hasher
from omegaconf import OmegaConf

from ftlab.cli import CONFIG_DIR
from ftlab.run import run
from ftlab.tasks import base
from ftlab.tasks.aux_mlm import AuxMLM
from ftlab.tasks.base import HasSubtasks, ModelAware, PredictsNumbers, ScoresWithLMHead
from ftlab.tasks.multitask import MultiTask
from ftlab.tasks.nodes import instantiate_task
from tests.conftest import tiny_overrides
from tests.test_regression import csv_overrides

STAGES = sorted(p.stem for p in (Path(CONFIG_DIR) / "stage").glob("*.yaml"))
PROTOCOLS = [v for v in vars(base).values()
             if isinstance(v, type) and getattr(v, "_is_runtime_protocol", False)]


def members(protocol: type) -> set[str]:
    return {n for n in [*vars(protocol), *inspect.get_annotations(protocol)]
            if not n.startswith("_")}


def stage_task(stage: str):
    node = OmegaConf.load(Path(CONFIG_DIR) / "stage" / f"{stage}.yaml").task
    return instantiate_task(node, f"stage={stage}.task")


def test_every_optional_protocol_is_checked():
    assert {p.__name__ for p in PROTOCOLS} >= {
        "HasSubtasks", "SeesPrepared", "ScoresWithLMHead", "ModelAware", "PredictsRows",
        "ProbabilitiesFromScores", "PredictsNumbers"}


@pytest.mark.parametrize("stage", STAGES)
def test_wrapper_has_exactly_the_protocol_members_of_its_task(stage):
    task = stage_task(stage)
    aux = AuxMLM(task, 0.5)
    for protocol in PROTOCOLS:
        for name in members(protocol):
            has = inspect.getattr_static(task, name, None) is not None
            assert (inspect.getattr_static(aux, name, None) is not None) == has, (protocol, name)
            if has:
                assert getattr(aux, name) == getattr(task, name)
        assert isinstance(aux, protocol) == isinstance(task, protocol), protocol


@pytest.mark.parametrize(("stage", "protocols"), [
    ("multitask", [HasSubtasks]), ("regression", [PredictsNumbers]),
    ("cloze", [ScoresWithLMHead, ModelAware])])
def test_wrapped_tasks_keep_their_optional_hooks(stage, protocols):
    aux = AuxMLM(stage_task(stage), 0.5)
    assert all(isinstance(aux, p) for p in protocols)
    assert not isinstance(AuxMLM(stage_task("classify"), 0.5), tuple(protocols))


def test_forwarded_members_are_read_live_from_the_task():
    task = MultiTask()
    aux = AuxMLM(task, 0.5)
    task.parts, task.probabilities = {"a": 1}, {"a": 1.0}  # as bind_tasks does, after wrapping
    assert aux.parts == {"a": 1} and aux.probabilities == {"a": 1.0}
    aux.parts = {"b": 2}  # a write reaches the task, not a copy on the wrapper
    assert task.parts == {"b": 2} and "parts" not in vars(aux)
    assert type(AuxMLM(MultiTask(), 0.1)) is type(aux)  # one subclass per task class


def test_wrapper_pickles_copies_and_fingerprints_stably():
    aux = AuxMLM(stage_task("regression"), 0.5)
    for twin in (pickle.loads(pickle.dumps(aux)), copy.deepcopy(aux)):
        assert type(twin) is type(aux) and isinstance(twin, PredictsNumbers)
        assert twin.weight == 0.5 and type(twin.task) is type(aux.task)
    # datasets fingerprints the featurize function with dill: the same for an equal wrapper
    assert Hasher.hash(aux.featurize) == Hasher.hash(AuxMLM(stage_task("regression"),
                                                            0.5).featurize)


@pytest.mark.parametrize("stage", ["regression", "cloze", "multitask"])
def test_a_stage_with_aux_mlm_keeps_its_tasks_hooks(stage, make_cfg, sentiment_dir, scores_dir):
    """A run, not just isinstance: regression's constant baseline (PredictsNumbers), cloze's
    model kind (ModelAware: featurising fails without it), multitask's sub-tasks (HasSubtasks:
    the builder refuses a stage with sub-tasks but no HasSubtasks task)."""
    aux = ["stage.aux_mlm_weight=0.5", "trainer.max_steps=2"]
    if stage == "cloze":
        over = [*tiny_overrides(sentiment_dir), "stage=cloze",
                "stage.task.verbalizer={pos: great, neg: bad}", *aux]
    elif stage == "regression":
        over = csv_overrides(scores_dir, *aux)
    else:  # a regression sub-task beside a classifier
        over = csv_overrides(
            scores_dir, "stage=multitask", *aux,
            "stage.tasks.task.task._target_=ftlab.tasks.regression.Regression",
            f"stage.tasks.vitaminc.data.files={{train: {sentiment_dir}/train.jsonl, "
            f"validation: {sentiment_dir}/validation.jsonl}}",
            "stage.tasks.vitaminc.data.text_columns=[text]",
            "stage.tasks.vitaminc.data.labels=[neg,pos]",
            "stage.tasks.vitaminc.data.splits={train: train, validation: validation}")
    record = run(make_cfg(over))
    assert record["status"] == "ok", record.get("error")
    final = record["final"]
    assert {"regression": "val/baseline_pearson", "cloze": "val/acc",
            "multitask": "val/baseline_task/pearson"}[stage] in final
