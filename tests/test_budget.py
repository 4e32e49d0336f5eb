"""The adaptive training budget (ftlab/budget.py), class weights and the automatic monitor
(ftlab/tasks/classify.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset, DatasetDict

from ftlab.budget import BudgetSpec, epochs_for, plan, steps_per_epoch
from ftlab.data.sources import RawData
from ftlab.overrides import explicit_keys
from ftlab.pipeline import build_pipeline
from ftlab.run import run
from ftlab.tasks.classify import Classify, balanced_weights, label_counts
from tests.conftest import NO_BUDGET, tiny_overrides


class _Tok:
    model_input_names = ["input_ids", "attention_mask"]

    def num_special_tokens_to_add(self, pair: bool = False) -> int:  # [CLS] x [SEP] (y [SEP])
        return 3 if pair else 2


def bound(labels: list[int], **kw) -> Classify:
    task = Classify(**kw)
    train = Dataset.from_dict({"text": ["x"] * len(labels), "label": labels})
    task.bind(RawData(DatasetDict(train=train), ["a", "b", "c"]), _Tok(), ["text"])
    return task


def test_balanced_weights_on_hand_labels():
    counts = label_counts([0, 0, 0, 1, 0, 1], 3)
    assert counts.tolist() == [4, 2, 0]
    # 6 rows over 2 present classes: 6 / (2 * 4), 6 / (2 * 2); the absent class weighs 0
    assert balanced_weights(counts).tolist() == pytest.approx([0.75, 1.5, 0.0])
    soft = label_counts([[0.9, 0.1, 0.0], [0.2, 0.3, 0.5]], 3)  # argmax of probabilities
    assert soft.tolist() == [1, 0, 1]


def test_weighted_loss_equals_torch_weighted_cross_entropy():
    task = bound([0, 0, 0, 1, 0, 1], class_weights="balanced")
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, 0.3], [-1.0, 3.0, 0.0]])
    labels = torch.tensor([0, 1, 1])
    expected = torch.nn.CrossEntropyLoss(weight=torch.tensor([0.75, 1.5, 0.0]))(logits, labels)
    model = lambda **kw: SimpleNamespace(logits=logits)  # noqa: E731 (a head that returns these)
    out = task.forward(model, {"input_ids": torch.zeros(3, 2), "labels": labels})
    assert out.loss.item() == pytest.approx(expected.item())
    plain = torch.nn.functional.cross_entropy(logits, labels)
    assert out.loss.item() != pytest.approx(plain.item())  # the weights changed it
    assert bound([0, 1], class_weights="none").weight is None


def test_auto_monitor_picks_f1_when_imbalanced_and_acc_when_balanced():
    assert bound([0] * 5 + [1], monitor="auto").monitor == "f1"
    assert bound([0, 1, 2] * 4, monitor="auto").monitor == "acc"
    assert bound([0] * 3 + [1] * 2, monitor="auto").monitor == "acc"  # 1.5x: not beyond
    assert bound([0] * 5 + [1], monitor="acc").monitor == "acc"  # a set monitor stays


@pytest.mark.parametrize(("rows", "batch", "base", "epochs"), [
    (1000, 32, 1, 19),     # 32 steps/epoch: ceil(600 / 32)
    (10080, 32, 1, 2),     # full Rotten Tomatoes: 315 steps/epoch
    (40000, 32, 1, 1),     # 1,250 steps: one epoch is enough
    (100, 32, 1, 20),      # 4 steps/epoch: capped at budget.max_epochs
    (40000, 32, 3, 3),     # the trainer's max_epochs is a floor
])
def test_min_steps_rule_gives_the_expected_epochs(rows, batch, base, epochs):
    budget = BudgetSpec(min_steps=600, max_epochs=20)
    assert epochs_for(budget, base, steps_per_epoch({}, rows, batch)) == epochs


def test_plan_counts_accumulation_and_validates_within_long_epochs():
    budget = BudgetSpec(min_steps=600, val_every_steps=500)
    assert steps_per_epoch({"accumulate_grad_batches": 2}, 1000, 32) == 16
    node, info = plan(budget, {"max_epochs": 1, "val_check_interval": 1.0}, 64000, 32)
    assert info["steps_per_epoch"] == 2000 and node["max_epochs"] == 1
    assert node["val_check_interval"] == 500  # 4 validations per epoch
    node, _ = plan(budget, {"max_epochs": 1, "val_check_interval": 0.5}, 64000, 32)
    assert node["val_check_interval"] == 0.5  # yours stays


@pytest.mark.parametrize(("given", "adaptive"), [
    ([], True),
    (["trainer.max_steps=50"], False),             # you set the length: it wins
    (["trainer.max_epochs=2"], False),
    (["stage.trainer.max_epochs=2"], False),
    (["trainer.budget.min_steps=0"], False),       # switched off
])
def test_explicit_length_wins_over_the_budget(make_cfg, sentiment_dir, given, adaptive):
    base = [o for o in tiny_overrides(sentiment_dir) if o != NO_BUDGET]
    overrides = [*base, "trainer.budget.patience=2", *given]
    stage = build_pipeline(make_cfg(overrides), explicit_keys(overrides))[0]
    assert (stage.budget is not None) == adaptive
    assert "budget" not in stage.trainer  # ftlab's key never reaches Lightning
    if given == ["trainer.max_steps=50"]:
        assert stage.trainer["max_steps"] == 50


def test_a_stage_yaml_length_is_fixed_and_other_stages_adapt(make_cfg, sentiment_dir):
    base = [o for o in tiny_overrides(sentiment_dir) if o != NO_BUDGET]
    overrides = [*base, "pipeline=tapt_task", "trainer.budget.patience=2"]
    stages = build_pipeline(make_cfg(overrides), explicit_keys(overrides))
    budgets = {s.name: s.budget for s in stages}
    assert budgets["tapt"] is None and budgets["task"] is not None  # tapt: max_epochs 3


def test_budget_adds_epochs_on_small_data(make_cfg, sentiment_dir):
    # 256 rows at batch 16: 16 steps/epoch; min_steps 40 -> 3 epochs (no early stop: patience 0)
    base = [o for o in tiny_overrides(sentiment_dir) if o != NO_BUDGET]
    record = run(make_cfg([*base, "trainer.budget.min_steps=40", "trainer.budget.patience=0",
                           "stage.optim.lr=3e-3"]))
    info = record["stages"]["classify"]
    assert info["budget"]["max_epochs"] == 3 and info["budget"]["steps_per_epoch"] == 16
    assert info["global_steps"] == 48
    assert record["monitor"]["metric"] == "val/acc"  # auto on balanced labels


def test_early_stopping_ends_a_long_budget(make_cfg, sentiment_dir):
    base = [o for o in tiny_overrides(sentiment_dir) if o != NO_BUDGET]
    record = run(make_cfg([*base, "trainer.budget.min_steps=10000", "trainer.budget.patience=1",
                           "stage.optim.lr=3e-3"]))
    info = record["stages"]["classify"]
    assert info["budget"]["max_epochs"] == 20
    # 20 epochs would be 320 steps: accuracy stopped improving long before
    assert info["budget"]["stopped_early"] and info["global_steps"] < 320


def test_auto_monitor_is_the_same_for_every_seed_of_a_capped_training_split(tmp_path):
    """With data.max_train_samples each seed trains on its own subset; the automatic monitor
    must not follow the subset (one seed on val/f1, the next on val/acc made an Optuna trial
    average f1 with acc and save_artefact=best compare them)."""
    import json

    from ftlab.data.sources import load_raw
    from ftlab.data.spec import DataSpec

    rows = [{"text": f"row {i}", "label": "a" if i % 7 < 4 else "b"} for i in range(140)]
    files = {}
    for split in ("train", "validation", "test"):
        files[split] = str(tmp_path / f"{split}.jsonl")
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = DataSpec(path="json", files=files, text_columns=["text"], label_column="label",
                    max_train_samples=10)
    subset_rules, monitors = set(), set()
    for seed in range(12):
        raw = load_raw(spec, seed)
        task = Classify(monitor="auto")
        task.bind(raw, _Tok(), ["text"])
        monitors.add(task.monitor)
        own = label_counts(raw.splits["train"]["label"], 2)
        subset_rules.add("f1" if own.max() > 1.5 * own[own > 0].min() else "acc")
    assert subset_rules == {"acc", "f1"}  # the subsets alone would disagree
    assert monitors == {"acc"}  # the whole split is 4:3, so every seed monitors accuracy


@pytest.mark.parametrize("trainer", [{"devices": 2}, {"devices": "2"}, {"devices": [0, 1]},
                                     {"devices": "0,1"}, {"devices": 1, "num_nodes": 2}])
def test_an_epoch_is_shared_by_every_process_however_devices_are_written(trainer):
    """Each process reads its share of the rows: ``devices=[0,1]`` (or "0,1", "2", two nodes)
    was read as one device, so the budget planned twice the steps an epoch has (and passed a
    val_check_interval that Lightning then refused when fit started)."""
    from ftlab.budget import check_val_interval
    from ftlab.errors import FtlabError

    assert steps_per_epoch({"accelerator": "cpu", **trainer}, 1000, 10) == 50
    with pytest.raises(FtlabError, match="is more than one epoch"):
        check_val_interval({"accelerator": "cpu", "val_check_interval": 60, **trainer}, 1000,
                           10, "stage")
