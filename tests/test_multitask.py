"""stage=multitask: task sampling, single-task batches, one shared encoder, per-task metrics,
hand-over to a target stage, aux MLM, and the resolved stage's sub-task data."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from ftlab.build import StageBuilder
from ftlab.data.batching import LengthGroupedBatchSampler
from ftlab.data.multitask import TaskSampler, sampling_probabilities
from ftlab.errors import FtlabError
from ftlab.pipeline import build_pipeline
from ftlab.run import run
from ftlab.seedstats import failure
from ftlab.stage_keys import pipeline_keys
from ftlab.store import load_tensors
from ftlab.tasks.aux_mlm import AuxMLM
from ftlab.tasks.classify import Classify
from ftlab.tasks.multitask import MultiTask, Part
from ftlab.tasks.tokens import Tokens
from ftlab.validate import validate
from tests.conftest import tiny_overrides, write_jsonl

WORDS = ["the", "club", "film", "was", "founded", "in", "a", "city", "tall", "river"]


CUES = ["city", "club", "music"]  # in the tiny vocabulary: the claim's cue word is its label


def _pairs(path: Path, n: int, seed: int) -> Path:
    """A learnable 3-class sentence-pair task (its batches carry token_type_ids 1; single
    texts don't)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        claim = rng.choices(WORDS, k=rng.randint(2, 5))
        claim.insert(rng.randrange(len(claim) + 1), CUES[i % 3])
        rows.append({"evidence": " ".join(rng.choices(WORDS, k=rng.randint(5, 12))),
                     "claim": " ".join(claim), "label": ["True", "False", "Neither"][i % 3]})
    return write_jsonl(path, rows)


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pairs")
    _pairs(d / "train.jsonl", 64, 0)
    _pairs(d / "validation.jsonl", 24, 1)
    return d


def mt_overrides(sentiment_dir: Path, pairs_dir: Path, at: str = "stage") -> list[str]:
    """A tiny 2-task stage: VitaminC-shaped pairs (64 rows) + the run's sentiment data (256)."""
    return [*tiny_overrides(sentiment_dir),
            f"{at}.tasks.vitaminc.data.files.train={pairs_dir / 'train.jsonl'}",
            f"{at}.tasks.vitaminc.data.files.validation={pairs_dir / 'validation.jsonl'}"]


# --- task sampling ---

def _draws(sizes: list[int], probs: list[float], epochs: int) -> list[int]:
    """How many training batches each task gave over ``epochs`` epochs."""
    samplers = [LengthGroupedBatchSampler([5] * n, 4, seed=i) for i, n in enumerate(sizes)]
    sampler = TaskSampler(samplers, probs, seed=3)
    bounds = sampler.offsets.tolist()
    counts = [0] * len(sizes)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for batch in sampler:
            task = next(t for t in range(len(sizes)) if batch[0] < bounds[t + 1])
            assert all(bounds[task] <= i < bounds[task + 1] for i in batch)  # single-task
            counts[task] += 1
    return counts


def _chi2(counts: list[int], probs: list[float]) -> float:
    total = sum(counts)
    return sum((c - total * p) ** 2 / (total * p) for c, p in zip(counts, probs, strict=True))


CHI2_DF2_P001 = 13.82  # chi-square critical value, 2 degrees of freedom, p = 0.001


@pytest.mark.parametrize(("sampling", "expected"), [
    ("proportional", [3200 / 4200, 800 / 4200, 200 / 4200]),
    ("temperature", [s**0.5 / (3200**0.5 + 800**0.5 + 200**0.5) for s in (3200, 800, 200)]),
    ("uniform", [1 / 3, 1 / 3, 1 / 3]),
])
def test_sampler_draws_tasks_in_the_configured_proportions(sampling, expected):
    sizes = [3200, 800, 200]
    probs = sampling_probabilities(sizes, sampling, temperature=2.0)
    assert probs == pytest.approx(expected)
    counts = _draws(sizes, probs, epochs=8)  # 8 x 1,050 batches
    assert sum(counts) == 8 * (800 + 200 + 50)  # an epoch: the sum of the per-task batches
    assert _chi2(counts, expected) < CHI2_DF2_P001, counts
    others = [p for p in (
        [3200 / 4200, 800 / 4200, 200 / 4200], [1 / 3] * 3) if p != pytest.approx(expected)]
    assert all(_chi2(counts, p) > 100 for p in others)  # the test tells the modes apart


@pytest.mark.parametrize("size_cap", [0, -1])
def test_a_size_cap_below_one_row_is_refused(size_cap):
    """0 was taken as no cap (the setting ignored); -1 made negative probabilities, a torch
    RuntimeError from the sampler mid-run."""
    with pytest.raises(FtlabError, match=rf"size_cap .* must be >= 1 or null, got {size_cap}"):
        MultiTask(sampling="proportional", size_cap=size_cap)
    assert sampling_probabilities([300, 100], "proportional", size_cap=100) == [0.5, 0.5]


def test_sampler_is_deterministic_from_the_seed_and_fresh_each_epoch():
    def order(seed: int, epoch: int) -> list[int]:
        samplers = [LengthGroupedBatchSampler([5] * n, 4) for n in (40, 40)]
        sampler = TaskSampler(samplers, [0.5, 0.5], seed=seed)
        sampler.set_epoch(epoch)
        return sampler.tasks()

    assert order(1, 0) == order(1, 0)
    assert order(1, 0) != order(2, 0) and order(1, 0) != order(1, 1)


def test_every_rank_trains_the_same_task_on_its_share_of_the_batch():
    lengths = [[5 + i % 7 for i in range(n)] for n in (48, 96)]

    def batches(world: int, rank: int) -> list[list[int]]:
        samplers = [LengthGroupedBatchSampler(x, 4, seed=i, num_replicas=world, rank=rank)
                    for i, x in enumerate(lengths)]
        return list(TaskSampler(samplers, [0.3, 0.7], seed=5))

    ranks = [batches(2, r) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 48 // 8 + 96 // 8  # global batches of 2 x 4 rows
    for a, b in zip(*ranks, strict=True):
        task = int(a[0] >= 48)
        assert all(int(i >= 48) == task for i in a + b)  # the same sub-task on both ranks
        assert len(a) == len(b) == 4 and not set(a) & set(b)  # each its own share


def test_temperature_goes_from_proportional_to_uniform():
    sizes = [1000, 10]
    assert sampling_probabilities(sizes, "temperature", 1.0) == pytest.approx(
        sampling_probabilities(sizes, "proportional"))
    assert sampling_probabilities(sizes, "temperature", 1e6) == pytest.approx([0.5, 0.5], 1e-4)
    assert sampling_probabilities(sizes, "proportional", size_cap=10) == pytest.approx([0.5, 0.5])
    with pytest.raises(FtlabError, match="sampling 'mixed'"):
        sampling_probabilities(sizes, "mixed")


# --- the stage's parts ---

@pytest.fixture
def parts(make_cfg, sentiment_dir, pairs_dir):
    """(stage, builder, task, model, datamodule) of the tiny 2-task stage."""

    def _make(*extra: str):
        stage = build_pipeline(make_cfg([*mt_overrides(sentiment_dir, pairs_dir),
                                         "stage=multitask", *extra]))[0]
        builder = StageBuilder()
        task = builder.task(stage)
        model = builder.model(stage)[0]
        return stage, builder, task, model, builder.datamodule(stage)

    return _make


def test_batches_are_single_task_and_drawn_per_sampling(parts):
    stage, _, task, _, dm = parts("stage.task.sampling=uniform")
    assert task.probabilities == {"vitaminc": 0.5, "task": 0.5}
    batches = list(dm.train_dataloader())
    assert len(batches) == 64 // 16 + 256 // 16  # one pass's worth of batches of each task
    seen = {b["task"] for b in batches}
    assert seen == {"vitaminc", "task"}
    for b in batches:  # pairs carry segment ids of 1; single texts never do
        pair_rows = (b["token_type_ids"] == 1).any(-1)
        assert pair_rows.all() if b["task"] == "vitaminc" else not pair_rows.any(), b["task"]
        assert b["labels"].max() < (3 if b["task"] == "vitaminc" else 2)
    evaluation = list(dm.val_dataloader())  # every task's validation rows, in turn
    assert sum(len(b["labels"]) for b in evaluation) == 12 + 96  # vitaminc: validation[:50%]


def test_shared_encoder_is_one_module_trained_by_every_task(parts):
    from ftlab.model.arch import backbone

    _, _, task, model, dm = parts()
    other = task.model_for(model, "task")
    assert other is not model and backbone(other) is backbone(model)
    ids = {id(p) for p in model.parameters()}
    assert all(id(p) in ids for p in other.parameters())  # its head is registered on the model
    batches = {}
    for b in dm.train_dataloader():
        batches.setdefault(b["task"], b)
    model.eval()  # no dropout: outputs differ only if weights do
    with torch.no_grad():
        before = task.forward(model, batches["task"]).logits
    head = list(other.classifier.parameters())
    assert {id(p) for p in head} == {id(p) for p in model.mt__task__classifier.parameters()}
    head_before = [p.detach().clone() for p in head]
    loss = task.forward(model, batches["vitaminc"]).loss  # a gradient from the other task
    loss.backward()
    assert all(p.grad is None for p in head)
    with torch.no_grad():
        for p in backbone(model).parameters():
            if p.grad is not None:
                p -= 0.5 * p.grad
        after = task.forward(model, batches["task"]).logits
    assert not torch.allclose(before, after)  # the encoder that task uses changed
    assert all(torch.equal(a, b) for a, b in zip(head_before, head, strict=True))


def test_loss_scaling_and_weights_scale_each_tasks_loss(parts):
    _, _, task, model, dm = parts("stage.task.sampling=uniform", "stage.task.loss_scaling=size",
                                  "stage.tasks.vitaminc.weight=3")
    assert task.scales == pytest.approx({"vitaminc": 3 * (64 / 320) / 0.5,
                                         "task": (256 / 320) / 0.5})
    batch = next(b for b in dm.train_dataloader() if b["task"] == "vitaminc")
    rows = {k: v for k, v in batch.items() if k != "task"}
    with torch.no_grad():
        for training in (True, False):  # the same dropout masks from the same seed
            model.train(training)
            torch.manual_seed(0)
            plain = task.parts["vitaminc"].task.forward(model, rows).loss
            torch.manual_seed(0)
            scaled = task.forward(model, batch).loss
            # training: the objective's weighting; evaluation (val/loss): the plain loss
            assert scaled == pytest.approx(plain * (task.scales["vitaminc"] if training else 1))


def test_aux_mlm_works_on_every_task(parts):
    stage, _, task, model, dm = parts("stage.aux_mlm_weight=0.5")
    assert isinstance(task, AuxMLM) and hasattr(model, "aux_mlm_head")
    model.train()
    for name in ("vitaminc", "task"):
        batch = next(b for b in dm.train_dataloader() if b["task"] == name)
        out = task.forward(model, batch)
        aux = out.extras["aux_mlm_loss"]
        assert aux > 0 and out.loss.item() > 0.5 * aux.item()


@pytest.mark.parametrize("peft", ["diff_pruning", "prompt_tuning"])
def test_peft_that_trains_outside_the_model_is_refused(parts, peft):
    with pytest.raises(FtlabError, match="outside the model"):
        parts(f"peft={peft}")


@pytest.mark.parametrize("peft", ["lora", "bitfit"])
def test_in_place_peft_trains_every_tasks_head(parts, peft):
    _, _, task, model, dm = parts(f"peft={peft}")
    for name in ("vitaminc", "task"):
        head = [p for p in task.model_for(model, name).classifier.parameters() if p.requires_grad]
        assert head, name  # LoRA: the head's trainable copy in a ModulesToSaveWrapper
        batch = next(b for b in dm.train_dataloader() if b["task"] == name)
        model.zero_grad()
        task.forward(model, batch).loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head), name


# --- resolution, cache key, validation ---

def test_resolved_stage_carries_every_sub_tasks_data(make_cfg, sentiment_dir, pairs_dir,
                                                     tmp_path):
    def stage(*extra: str):
        return build_pipeline(make_cfg([*mt_overrides(sentiment_dir, pairs_dir),
                                        "stage=multitask", *extra]))[0]

    s = stage()
    assert [t.name for t in s.subtasks] == ["vitaminc", "task"]
    assert s.subtasks[0].data.text_columns == ["evidence", "claim"]
    assert s.subtasks[1].data.files["train"] == str(sentiment_dir / "train.jsonl")  # run's data
    key = pipeline_keys([s])[s.name]
    assert pipeline_keys([stage("+stage.tasks.task.data_overrides.max_train_samples=100")])[
        s.name] != key  # the second sub-task's data is in the key
    assert pipeline_keys([stage()])[s.name] == key
    named = stage("stage.tasks.task.data=vitaminc")  # a data group by name
    assert named.subtasks[1].data.text_columns == ["evidence", "claim"]
    with pytest.raises(FtlabError, match="data group 'nope'"):
        stage("stage.tasks.task.data=nope")
    missing = stage(f"stage.tasks.vitaminc.data.files.validation={tmp_path / 'absent.jsonl'}")
    with pytest.raises(FtlabError, match="absent.jsonl"):  # validation loads every sub-task
        validate([missing], StageBuilder())


def test_a_typo_in_a_sub_tasks_task_fails_validation(make_cfg, sentiment_dir, pairs_dir):
    stage = build_pipeline(make_cfg([*mt_overrides(sentiment_dir, pairs_dir), "stage=multitask",
                                     "+stage.tasks.task.task.max_lenght=64"]))[0]
    with pytest.raises(FtlabError, match="tasks.task.task"):
        validate([stage], StageBuilder())


@pytest.mark.parametrize(("override", "match"), [
    (["stage.task.monitor=task/nope"], r"task.monitor='task/nope'(?s:.*)mean/acc, mean/f1"),
    (["stage.task.monitor=nope"], "task.monitor='nope'"),
    (["+stage.tasks.task.task.monitor=nope"],
     r"sub-task 'task' monitors 'nope'(?s:.*)\+stage.tasks.task.task.monitor=<one of: acc, f1>"),
    (["+stage.tasks.task.task.monitor=loss", "stage.task.monitor=vitaminc/acc"],
     "sub-task 'task' monitors 'loss'"),  # no per-sub-task loss is logged
    (["stage.task.monitor=task/acc", "stage.task.mode=min"],  # kept the worst epoch
     r"mode 'min', but sub-task 'task' ranks its acc by 'max'(?s:.*)stage.task.mode=max"),
    (["stage.task.monitor=task/acc", "stage.task.mode=maximum"],  # ranked as min
     r"mode 'maximum' is not known(?s:.*)stage.task.mode to max"),
])
def test_a_monitor_that_cannot_pick_the_best_epoch_fails_validation(make_cfg, sentiment_dir,
                                                                     pairs_dir, override, match):
    """An unknown monitor picked no best epoch (objective -inf, status ok); an unknown sub-task
    monitor silently fell out of val/mean, which then averaged the other sub-tasks only; a
    mode against the monitored metric's (or an unknown one, ranked as min) kept the worst."""
    stage = build_pipeline(make_cfg([*mt_overrides(sentiment_dir, pairs_dir), "stage=multitask",
                                     *override]))[0]
    with pytest.raises(FtlabError, match=match):
        validate([stage], StageBuilder())


def test_a_multi_task_stage_as_a_teacher_is_refused_before_training(make_cfg):
    """It trained, then the student's teacher pass failed with an AttributeError."""
    with pytest.raises(FtlabError, match="teacher 'multi', a multi-task stage"):
        build_pipeline(make_cfg(["model=tiny_bert", "pipeline=multitask_task",
                                 "+pipeline.stages.task.teachers=[multi]"]))


@pytest.mark.parametrize("override", [
    "+pipeline.stages.multi.data_overrides.transforms=[]",  # README's way to drop transforms
    "+pipeline.stages.multi.data_overrides.max_train_samples=50",
    "pipeline.stages.multi.data=vitaminc"])
def test_a_multi_task_stages_own_data_keys_are_refused_not_ignored(make_cfg, override):
    """Each sub-task reads its own data: these keys changed nothing, without a word."""
    with pytest.raises(FtlabError, match=r"stage 'multi' is a multi-task stage: its own data"
                                         r"(?s:.*)pipeline.stages.multi.tasks.<name>.data"):
        build_pipeline(make_cfg(["model=tiny_bert", "pipeline=multitask_task", override]))


def test_multitask_pipeline_trains_on_the_target_stages_own_labelled_rows(make_cfg):
    multi, task = build_pipeline(make_cfg(["model=tiny_bert", "pipeline=multitask_task",
                                           "seed=3"]))
    assert (multi.name, task.init_from, task.carry) == ("multi", "multi", "encoder")
    vitaminc, target = multi.subtasks
    assert vitaminc.data.text_columns == ["evidence", "claim"]
    assert vitaminc.data.max_train_samples == 4000
    # the same data and seed: the builder draws the same 500 rows for both stages
    assert target.data == task.data and target.data.max_train_samples == 500
    assert multi.seed == task.seed == 3


# --- end to end ---

def test_two_task_run_logs_per_task_metrics_and_their_mean(make_cfg, sentiment_dir, pairs_dir):
    record = run(make_cfg([*mt_overrides(sentiment_dir, pairs_dir), "stage=multitask",
                           "stage.trainer.max_epochs=2", "stage.optim.lr=1e-3"]))
    assert record["status"] == "ok", record
    assert record["monitor"] == {"metric": "val/mean", "mode": "max", "failed_by": None}
    m = record["final"]
    assert m["val/mean"] == pytest.approx((m["val/vitaminc/acc"] + m["val/task/acc"]) / 2)
    assert {"val/vitaminc/f1", "val/task/f1", "test/task/acc", "val/baseline_task/acc",
            "test/baseline_task/acc"} <= set(m)
    info = record["stages"]["multitask"]
    assert info["global_steps"] == 2 * (64 // 16 + 256 // 16)
    assert info["train_rows"] == 64 + 256 and set(info["tasks"]) == {"vitaminc", "task"}
    from ftlab.artefact import read_stage_card

    card, _ = read_stage_card(Path(info["artefact"]).parent)  # the sub-tasks round-trip
    assert [(t.name, t.data.text_columns) for t in card.subtasks] == [
        ("vitaminc", ["evidence", "claim"]), ("task", ["text"])]


def test_a_sub_tasks_data_transforms_are_recorded_under_its_name(make_cfg, sentiment_dir,
                                                                   pairs_dir):
    """The record showed only the first sub-task's transforms (none here): the run's few-shot
    draw on sub-task 'task' was missing from metrics.json and the card."""
    record = run(make_cfg([*mt_overrides(sentiment_dir, pairs_dir), "stage=multitask",
                           "data.transforms=[{few_shot: {k: 8}}]", "stage.trainer.max_steps=2"]))
    assert record["status"] == "ok", record
    info = record["stages"]["multitask"]
    [entry] = info["data_transforms"]
    assert entry["sub_task"] == "task" and entry["transform"] == "few_shot"
    assert entry["per_class"] == {"neg": 8, "pos": 8} and info["tasks"]["task"]["train_rows"] == 16
    card = json.loads((Path(info["artefact"]).parent / "card.json").read_text())
    assert card["data_transforms"] == info["data_transforms"]


def test_each_epoch_of_a_run_draws_its_own_sub_task_sequence(make_cfg, sentiment_dir, pairs_dir,
                                                             monkeypatch):
    """Lightning sets the epoch on ``loader.batch_sampler.sampler`` only, and stops before the
    task sampler's iterator ends: every epoch drew epoch 0's sequence of sub-tasks again."""
    drawn: list[tuple[int, list[int]]] = []
    tasks = TaskSampler.tasks

    def record(self):
        drawn.append((self.epoch, out := tasks(self)))
        return out

    monkeypatch.setattr(TaskSampler, "tasks", record)
    run(make_cfg([*mt_overrides(sentiment_dir, pairs_dir), "stage=multitask",
                  "stage.trainer.max_epochs=3"]))
    assert [epoch for epoch, _ in drawn] == [0, 1, 2]
    assert len({tuple(seq) for _, seq in drawn}) == 3


def test_pipeline_hands_the_shared_encoder_to_the_target_stage(make_cfg, sentiment_dir,
                                                               pairs_dir, tmp_path):
    at = "pipeline.stages.multi"
    cfg = make_cfg([*mt_overrides(sentiment_dir, pairs_dir, at), "pipeline=multitask_task",
                    f"cache.dir={tmp_path / 'cache'}", f"{at}.trainer.max_steps=4",
                    f"{at}.tasks.task.data_overrides.max_train_samples=64",
                    "pipeline.stages.task.trainer.max_steps=2",
                    "pipeline.stages.task.optim.lr=0"])  # the target keeps what it was handed
    record = run(cfg)
    assert record["status"] == "ok", record
    multi, task = record["stages"]["multi"], record["stages"]["task"]
    assert "val/mean" in multi["metrics"] and multi["train_rows"] == 64 + 64
    assert task["handed_over"]["fresh"] == 2  # a fresh classifier weight + bias
    run_dir = Path(cfg.paths.output_dir)
    src = load_tensors(run_dir / "multi" / "trainable.safetensors")
    dst = load_tensors(run_dir / "task" / "trainable.safetensors")
    encoder = [k for k in dst if k.startswith("bert.")]
    assert len(encoder) == task["handed_over"]["copied"] > 0
    assert all(torch.equal(src[k], dst[k]) for k in encoder)
    assert "mt__task__classifier.weight" in src and not any(k.startswith("mt__") for k in dst)


def test_carrying_the_model_from_a_multi_task_stage_warns_when_its_labels_differ(
        make_cfg, sentiment_dir, tmp_path, caplog):
    """carry: model copies the primary sub-task's head: its classes (pos, neg) become the
    target's (neg, pos) row by row. A single-task source warned; a multi-task one did not."""
    import logging

    at = "pipeline.stages.multi"
    first = f"{at}.tasks.vitaminc.data"
    cfg = make_cfg([*tiny_overrides(sentiment_dir), "pipeline=multitask_task",
                    f"cache.dir={tmp_path / 'cache'}", f"{at}.trainer.max_steps=2",
                    f"data@{first}=local", f"{first}.path=json", f"{first}.labels=[pos,neg]",
                    *(f"{first}.files.{s}={sentiment_dir / f'{s}.jsonl'}"
                      for s in ("train", "validation", "test")),
                    "pipeline.stages.task.carry=model", "pipeline.stages.task.trainer.max_steps=2"])
    with caplog.at_level(logging.WARNING, logger="ftlab.handover"):
        record = run(cfg)
    assert record["stages"]["task"]["handed_over"]["fresh"] == 0  # the 2-way head fits
    assert ("carries the whole model from multi, whose labels ['pos', 'neg'] are not its own "
            "['neg', 'pos']") in caplog.text


def test_the_stage_after_a_multi_task_stage_loads_and_predicts_what_it_scored(
        make_cfg, sentiment_dir, pairs_dir):
    """ftlab.load rebuilds the multi-task upstream first (its heads from its sub-tasks' data);
    it stopped with "a multi-task stage cannot be used without its sub-tasks' data"."""
    import math

    import ftlab

    at = "pipeline.stages.multi"
    cfg = make_cfg([*mt_overrides(sentiment_dir, pairs_dir, at), "pipeline=multitask_task",
                    f"{at}.trainer.max_steps=4", "pipeline.stages.task.trainer.max_steps=4",
                    "stage.optim.lr=3e-3"])
    record = run(cfg)
    assert record["status"] == "ok", record
    test = [json.loads(line) for line in (sentiment_dir / "test.jsonl").read_text().splitlines()]
    preds = ftlab.load(cfg.paths.output_dir).predict([r["text"] for r in test])
    loss = -sum(math.log(p["probs"][r["label"]]) for p, r in zip(preds, test, strict=True))
    assert loss / len(test) == pytest.approx(record["final"]["test/loss"], abs=1e-5)


def test_smart_with_a_teacher_is_refused_with_the_fix(make_cfg, sentiment_dir, pairs_dir, capsys):
    with pytest.raises(SystemExit):
        run(make_cfg([*mt_overrides(sentiment_dir, pairs_dir), "stage=multitask",
                      "regularizer=smart", "stage.trainer.max_steps=10"]))
    assert "regularizer.mu=0" in capsys.readouterr().err


# --- several devices ---

@pytest.mark.parametrize("trainer", ["trainer=ddp", "trainer=fsdp", "trainer.devices=2"])
def test_several_devices_are_refused_with_the_fix(make_cfg, sentiment_dir, pairs_dir, trainer):
    stage = build_pipeline(make_cfg([*mt_overrides(sentiment_dir, pairs_dir), "stage=multitask",
                                     trainer]))[0]
    with pytest.raises(FtlabError, match="trains on one device"):
        validate([stage], StageBuilder())


def test_a_sub_task_named_mean_is_refused(make_cfg, sentiment_dir, pairs_dir):
    """A sub-task 'mean' logs val/mean/acc, which the sub-tasks' average overwrote."""
    cfg = make_cfg([*mt_overrides(sentiment_dir, pairs_dir), "stage=multitask",
                    "+stage.tasks.mean={task: {_target_: ftlab.tasks.classify.Classify}}"])
    with pytest.raises(FtlabError, match="cannot be named 'mean'"):
        build_pipeline(cfg)


def test_a_tagging_sub_task_fails_on_entity_f1_not_on_token_accuracy():
    """A NER sub-task below the all-O token accuracy that finds entities has learnt; one at
    entity F1 0 has not. The classification sub-task keeps every one of its baselines."""
    sentiment, ner = Classify(), Tokens()
    sentiment.labels, ner.labels = ["neg", "pos"], ["O", "B-PER", "I-PER"]
    task = MultiTask()
    task.parts = {"sst": Part(sentiment, None, ["text"]),  # type: ignore[arg-type]
                  "ner": Part(ner, None, ["tokens"])}  # type: ignore[arg-type]
    scores = {"val/baseline_sst/acc": 0.5, "val/sst/acc": 0.8,
              "val/baseline_sst/f1": 0.33, "val/sst/f1": 0.8,
              "val/baseline_ner/acc": 0.9, "val/ner/acc": 0.85,
              "val/baseline_ner/f1": 0.0, "val/ner/f1": 0.3}
    assert failure(scores, task.failed_by) is None
    assert failure(scores | {"val/ner/f1": 0.0}, task.failed_by) is not None
    assert failure(scores | {"val/sst/f1": 0.3}, task.failed_by) is not None
    assert MultiTask().failed_by is None  # unbound, or no sub-task narrows it: every baseline


def test_a_sub_task_past_the_positions_is_refused_before_training(parts):
    """Each sub-task's max_length is checked against the model's positions, not only the
    stage's (a sub-task at 600 tokens on a 512-position BERT crashed mid-training)."""
    with pytest.raises(FtlabError, match=r"stage 'multitask': tasks.task.task.max_length=600 is "
                                         r"more than the 512 positions(?s:.*)at most 512"):
        parts("stage.tasks.task.task.max_length=600")
    parts("stage.tasks.task.task.max_length=512")  # at the limit: fine


# epoch 0 (batch 10 of 20); epoch 1 (batch 6); epoch 1, resumed from the end of epoch 0
@pytest.mark.parametrize("crash", [10, 26, 22])
def test_a_killed_multi_task_run_resumes_to_the_same_weights(make_cfg, sentiment_dir, pairs_dir,
                                                             monkeypatch, tmp_path, crash):
    """Its loader was not resumable: a resumed stage replayed its epoch's batches from the
    start (Lightning warned) and ended up to 1e-3 away from the uninterrupted weights. Sub-task
    passes carry over between epochs, so a later epoch's resume replays the earlier draws."""
    from omegaconf import open_dict

    from ftlab.checkpoint import SafetensorsCheckpointIO
    from tests.test_resume import NAME, crash_at

    def cfg(folder: str):
        c = make_cfg([*mt_overrides(sentiment_dir, pairs_dir), "stage=multitask",
                      "trainer.max_steps=30", "trainer.max_epochs=5", "stage.optim.lr=1e-3",
                      "checkpoint.every_n_steps=4", "checkpoint.keep=true",
                      f"cache.dir={tmp_path / 'cache'}"])
        with open_dict(c):
            c.paths.output_dir = str(tmp_path / folder)
        return c

    whole = run(cfg("whole"))
    crash_at(monkeypatch, crash)
    with pytest.raises(SystemExit):
        run(cfg("killed"))
    monkeypatch.undo()
    resumed = run(cfg("killed"))
    assert resumed["stages"]["multitask"]["resumed_from_step"] == crash - crash % 4
    io = SafetensorsCheckpointIO()
    a, b = (io.load_checkpoint(tmp_path / name / "multitask" / "checkpoints" / NAME)
            for name in ("whole", "killed"))
    assert a["global_step"] == b["global_step"] == 30
    assert max((a["state_dict"][k] - b["state_dict"][k]).abs().max().item()
               for k in a["state_dict"]) <= 1e-6
    for k, v in whole["final"].items():
        assert resumed["final"][k] == pytest.approx(v, abs=1e-6), k


def test_snapshot_ensembles_score_each_sub_task(make_cfg, sentiment_dir, pairs_dir):
    """callbacks=snapshots on a multi-task stage scored no ensemble and said nothing (it looked
    for a plain ``acc``). One cycle of one epoch: the only snapshot is the trained weights the
    stage tests, so each sub-task's ensemble accuracy is its own test accuracy."""
    record = run(make_cfg([*mt_overrides(sentiment_dir, pairs_dir), "stage=multitask",
                           "callbacks=snapshots", "callbacks.snapshots.cycles=1",
                           "stage.trainer.max_epochs=1", "stage.optim.lr=1e-3"]))
    assert record["status"] == "ok", record
    m = record["final"]
    assert m["test/task/ensemble_acc"] == pytest.approx(m["test/task/acc"], abs=1e-6)
    assert "test/ensemble_acc" not in m  # no split-less name that looks like one task's


def test_the_stage_after_a_multi_task_stage_loads_without_the_sub_tasks_data(
        make_cfg, sentiment_dir, pairs_dir, tmp_path, capsys):
    """Loading rebuilt the multi-task upstream's heads from its sub-tasks' data (their label
    sets were in no card): with that data moved away ftlab.load, ftlab-predict and
    ftlab-export stopped ("loading rebuilds its heads from its sub-tasks' data")."""
    import shutil

    import ftlab
    from ftlab.export import main as export_main
    from ftlab.predict_cli import main as predict_main

    data = tmp_path / "data"
    shutil.copytree(sentiment_dir, data / "sentiment")
    shutil.copytree(pairs_dir, data / "pairs")
    at = "pipeline.stages.multi"
    cfg = make_cfg([*mt_overrides(data / "sentiment", data / "pairs", at),
                    "pipeline=multitask_task", f"cache.dir={tmp_path / 'cache'}",
                    f"{at}.trainer.max_steps=2", "pipeline.stages.task.trainer.max_steps=2",
                    "pipeline.stages.task.carry=model"])  # the primary head: handed over
    assert run(cfg)["status"] == "ok"
    texts = ["great superb film", "the plot was dull and the ending awful"]
    before = ftlab.load(cfg.paths.output_dir).predict(texts)
    shutil.move(data, tmp_path / "elsewhere")  # every sub-task's data (and the run's) gone
    assert ftlab.load(cfg.paths.output_dir).predict(texts) == before
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
    predict_main([cfg.paths.output_dir, "--input", str(tmp_path / "in.txt"), "--output",
                  str(tmp_path / "out.jsonl")])
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["label"] for r in out] == [p["label"] for p in before]
    export_main([cfg.paths.output_dir, "--to", "hf", "--output", str(tmp_path / "hf")])
    assert (tmp_path / "hf" / "config.json").is_file()
    card = json.loads((Path(cfg.paths.output_dir) / "multi" / "card.json").read_text())
    assert card["subtask_labels"] == {"vitaminc": ["True", "False", "Neither"],
                                      "task": ["neg", "pos"]}
    # an older card, without them: the heads come from the data, where it still is (without
    # it: tests/test_predict_inputs.py, the message)
    del card["subtask_labels"]
    (Path(cfg.paths.output_dir) / "multi" / "card.json").write_text(json.dumps(card))
    shutil.move(tmp_path / "elsewhere", data)
    assert ftlab.load(cfg.paths.output_dir).predict(texts) == before
