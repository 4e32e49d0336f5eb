"""Distillation from teachers (PET's final step): soft labels, pipelines and run folders."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from ftlab.data.sources import RawData
from ftlab.distill import label_with_teachers
from ftlab.errors import FtlabError
from ftlab.run import run
from ftlab.tasks.classify import Classify
from tests.conftest import tiny_overrides


def test_soft_target_loss_equals_cross_entropy_on_hand_computed_values():
    task = Classify()
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    target = torch.tensor([[0.75, 0.25], [0.5, 0.5]])
    model = lambda **kw: SimpleNamespace(logits=logits)  # noqa: E731
    loss = task.forward(model, {"input_ids": torch.zeros(2, 3, dtype=torch.long),
                                "labels": target}).loss
    import math

    def lsm(a, b):  # log softmax of a pair, by hand
        z = math.log(math.exp(a) + math.exp(b))
        return a - z, b - z

    r0, r1 = lsm(2.0, 0.0), lsm(0.0, 1.0)
    hand = -((0.75 * r0[0] + 0.25 * r0[1]) + (0.5 * r1[0] + 0.5 * r1[1])) / 2
    assert loss.item() == pytest.approx(hand, abs=1e-6)


def test_soft_labels_at_a_temperature_are_pets_distillation_loss():
    """PET's ``distillation_loss``: KL(q || softmax(pred / T)) x T^2, with ``q`` already at the
    teachers' T; ftlab's T^2 x CE(pred / T, q) is that plus the constant T^2 x H(q), computed
    here from PET's formula written out, so the two have the same gradient."""
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]], requires_grad=True)
    target = torch.tensor([[0.75, 0.25], [0.5, 0.5]])
    model = lambda **kw: SimpleNamespace(logits=logits)  # noqa: E731
    task = Classify()
    task.soft_temperature = 2.0
    ours = task.forward(model, {"input_ids": torch.zeros(2, 3, dtype=torch.long),
                                "labels": target}).loss
    entropy = -(target * target.log()).sum() / 2
    pet = torch.nn.functional.kl_div((logits / 2).log_softmax(1), target,
                                     reduction="sum") * 4 / 2
    assert ours.item() == pytest.approx(pet.item() + 4 * entropy.item(), abs=1e-6)
    (g_ours,) = torch.autograd.grad(ours, logits)
    (g_pet,) = torch.autograd.grad(
        torch.nn.functional.kl_div((logits / 2).log_softmax(1), target, reduction="sum") * 2,
        logits)
    torch.testing.assert_close(g_ours, g_pet)
    task.soft_temperature = 1.0  # plain soft cross-entropy, as the test above
    plain = task.forward(model, {"input_ids": torch.zeros(2, 3, dtype=torch.long),
                                 "labels": target}).loss
    assert plain.item() == pytest.approx(
        torch.nn.functional.cross_entropy(logits, target).item(), abs=1e-6)


def _raw(rows, labels=("neg", "pos")):
    from datasets import Dataset, DatasetDict

    return RawData(DatasetDict({"train": Dataset.from_list(rows),
                                "validation": Dataset.from_list(rows)}), list(labels))


def test_teachers_average_their_scores_then_soften_them_as_pet_merges_logits():
    """PET's ``merge_logits`` (reduction ``mean``): softmax(mean_t s_t / T), the logits
    averaged first, not the teachers' probabilities."""
    rows = [{"text": "a", "label": 0}, {"text": "b", "label": 1}]
    t1 = SimpleNamespace(labels=["neg", "pos"],
                         scores=lambda texts: torch.tensor([[4.0, 0.0], [0.0, 2.0]]))
    t2 = SimpleNamespace(labels=["neg", "pos"],
                         scores=lambda texts: torch.tensor([[0.0, 0.0], [2.0, 0.0]]))
    stage = SimpleNamespace(teachers=("t1", "t2"), teacher_temperature=2.0, teacher_rows=None,
                            where="stage 'd'")
    raw, info = label_with_teachers(_raw(rows), stage, [t1, t2], ["text"])
    soft = torch.tensor(raw.splits["train"]["label"])
    mean = torch.tensor([[2.0, 0.0], [1.0, 1.0]])  # (t1 + t2) / 2
    expected = (mean / 2.0).softmax(-1)
    torch.testing.assert_close(soft, expected)
    # the mean of the softened probabilities would give row 0 [0.69, 0.31], not [0.73, 0.27]
    assert soft[0, 0].item() == pytest.approx(1 / (1 + math.exp(-1.0)), abs=1e-6)
    assert raw.splits["validation"]["label"] == [0, 1]  # gold labels stay for evaluation
    assert info["teacher_train_acc"] == 0.5 and info["distilled_rows"] == 2


def test_teachers_must_predict_the_same_labels():
    t = SimpleNamespace(labels=["pos", "neg"], scores=lambda texts: torch.zeros(1, 2))
    stage = SimpleNamespace(teachers=("t",), teacher_temperature=2.0, teacher_rows=None,
                            where="stage 'd'")
    with pytest.raises(FtlabError, match="names and order must match"):
        label_with_teachers(_raw([{"text": "a", "label": 0}]), stage, [t], ["text"])


PIPE = ["+pipeline.stages.t1={name: t1, task: {_target_: ftlab.tasks.cloze.Cloze, "
        "pattern: '{text} It was {mask}.', verbalizer: {pos: great, neg: bad}}, "
        "trainer: {max_steps: 3}}",
        "+pipeline.stages.t2={name: t2, task: {_target_: ftlab.tasks.cloze.Cloze, "
        "pattern: 'Just {mask}! {text}', verbalizer: {pos: great, neg: bad}}, "
        "trainer: {max_steps: 3}}"]


def test_a_pipeline_stage_distils_from_earlier_stages(make_cfg, sentiment_dir):
    cfg = make_cfg(tiny_overrides(sentiment_dir) + PIPE + [
        "+pipeline.stages.student={name: student, task: {_target_: "
        "ftlab.tasks.classify.Classify}, teachers: [t1, t2], trainer: {max_steps: 3}}"])
    seen: list[float] = []
    loss = Classify.loss

    def spy(self, logits, labels):  # the temperature each soft-label batch trains at
        if labels.is_floating_point():
            seen.append(self.soft_temperature)
        return loss(self, logits, labels)

    Classify.loss = spy
    try:
        record = run(cfg)
    finally:
        Classify.loss = loss
    assert record["status"] == "ok", record.get("error")
    student = record["stages"]["student"]
    assert student["teachers"] == ["t1", "t2"] and student["distilled_rows"] == 256
    # PET: the student learns at the teachers' temperature (student_temperature null)
    assert student["student_temperature"] == student["teacher_temperature"] == 2.0
    assert seen and set(seen) == {2.0}, seen
    assert 0.0 <= student["teacher_train_acc"] <= 1.0
    # the student's key includes its teachers' keys: another teacher, another student
    keys = {line["stage"]: line["key"] for line in record["lineage"]}
    from ftlab.pipeline import build_pipeline
    from ftlab.stage_keys import pipeline_keys

    stages = build_pipeline(cfg)
    import dataclasses

    changed = [dataclasses.replace(s, task={**s.task, "pattern": "{text} So {mask}."})
               if s.name == "t2" else s for s in stages]
    assert pipeline_keys(changed)["student"] != keys["student"]


def test_a_stage_distils_from_finished_runs(make_cfg, sentiment_dir, tmp_path):
    teacher = make_cfg(tiny_overrides(sentiment_dir) + [
        "stage=cloze", "stage.task.verbalizer={pos: great, neg: bad}", "trainer.max_steps=3"])
    assert run(teacher)["status"] == "ok"
    done = tmp_path / "teacher_run"
    (tmp_path / "run").rename(done)
    cfg = make_cfg(tiny_overrides(sentiment_dir) + [
        "stage=distill", f"stage.teachers=['{done}','{done}#cloze']", "trainer.max_steps=3"])
    record = run(cfg)
    assert record["status"] == "ok", record.get("error")
    assert record["stages"]["distill"]["teachers"] == [str(done), f"{done}#cloze"]
    assert json.loads((done / "metrics.json").read_text())["status"] == "ok"


def test_unknown_teachers_fail_before_training(make_cfg, sentiment_dir, tmp_path):
    for teacher, why in (("nosuch", "not an earlier stage"), (f"{tmp_path}/absent", "no folder")):
        cfg = make_cfg(tiny_overrides(sentiment_dir) + ["stage=distill",
                                                         f"stage.teachers=[{teacher}]"])
        with pytest.raises(SystemExit):
            run(cfg)
        record = json.loads((tmp_path / "run" / "metrics.json").read_text())
        assert why in record["error"] and record["stages"] == {}


def test_the_shipped_pet_pipeline_resolves(make_cfg, sentiment_dir):
    from ftlab.pipeline import build_pipeline

    stages = build_pipeline(make_cfg(tiny_overrides(sentiment_dir) + ["pipeline=pet"]))
    assert [s.name for s in stages] == ["p1", "p2", "p3", "distill"]
    assert stages[-1].teachers == ("p1", "p2", "p3") and stages[-1].teacher_temperature == 2.0
    assert len({s.task["pattern"] for s in stages[:3]}) == 3


def test_ipet_adds_class_balanced_confident_teacher_rows_to_the_gold_rows():
    from ftlab.distill import balanced_confident

    # 30 unlabelled rows the teacher calls neg, 10 pos
    out, info = _ipet([i % 2 for i in range(4)], [[3.0, 0.0]] * 30 + [[0.0, 3.0]] * 10, 8)
    train = out.splits["train"]
    assert len(train) == 4 + 8 and train["text"][:4] == ["g0", "g1", "g2", "g3"]
    added = dict(zip(train["text"][4:], train["label"][4:], strict=True))
    assert sorted(added.values()) == [0, 0, 0, 0, 1, 1, 1, 1]  # class-balanced, hard labels
    assert all(int(k[1:]) < 30 if v == 0 else int(k[1:]) >= 30 for k, v in added.items())
    assert "unlabelled" not in out.splits and info["teacher_rows_added"] == 8
    # confidence-weighted: confident rows are drawn far more often
    probs = torch.tensor([[0.98, 0.01, 0.01]] * 5 + [[0.34, 0.33, 0.33]] * 95)
    hits = sum(sum(i < 5 for i in balanced_confident(probs, 3, seed)) for seed in range(300))
    # one pick of class 0 per draw: uniform gives 5/100; confidence-weighted 4.9/(4.9+32.3)
    assert hits / 300 > 0.09


def test_ipet_teacher_rows_keep_the_gold_rows_label_distribution():
    """PET's iPET adds each class in its share of the gold rows (generate_ipet_train_sets:
    examples_per_label from the training set's counts); an even split gave a 3:1 gold set
    1:1 added rows."""
    scores = [[3.0, 0.0]] * 20 + [[0.0, 3.0]] * 20
    out, info = _ipet([int(i == 3) for i in range(4)], scores, 8)  # 3 neg, 1 pos
    assert sorted(out.splits["train"]["label"][4:]) == [0] * 6 + [1] * 2
    assert info["teacher_rows_per_class"] == {"neg": 6, "pos": 2}
    # a class whose share of a small teacher_rows rounds to 0 gets no row (torch's draw of
    # 0 rows raised a RuntimeError)
    out, info = _ipet([int(i == 3) for i in range(4)], scores, 3)
    assert info["teacher_rows_per_class"] == {"neg": 2, "pos": 0}


def _ipet(gold: list[int], scores: list[list[float]], teacher_rows: int) -> tuple[Any, Any]:
    """label_with_teachers on gold rows g0.. with those labels and one unlabelled row u0.. per
    teacher score row (iPET: teacher_rows added rows, seed 3)."""
    from datasets import Dataset, DatasetDict

    rows = [{"text": f"g{i}", "label": label} for i, label in enumerate(gold)]
    t = SimpleNamespace(labels=["neg", "pos"], scores=lambda texts: torch.tensor(scores))
    raw = RawData(DatasetDict({"train": Dataset.from_list(rows),
                               "unlabelled": Dataset.from_list([{"text": f"u{i}"} for i in
                                                                range(len(scores))]),
                               "validation": Dataset.from_list(rows)}), ["neg", "pos"])
    stage = SimpleNamespace(teachers=("t",), teacher_temperature=1.0, teacher_rows=teacher_rows,
                            seed=3, where="stage 'g1'")
    return label_with_teachers(raw, stage, [t], ["text"])


def test_the_shipped_ipet_pipeline_resolves(make_cfg, sentiment_dir):
    from ftlab.pipeline import build_pipeline

    stages = build_pipeline(make_cfg(tiny_overrides(sentiment_dir) + ["pipeline=ipet"]))
    by = {s.name: s for s in stages}
    assert list(by) == ["p1", "p2", "p3", "g1p1", "g1p2", "g1p3", "distill"]
    assert by["g1p2"].teachers == ("p1", "p3")
    # PET's generation sizes: |T| d^g rows, the gold ones included (its num_new_examples =
    # |T| d^(g+1) - |T|); few-shot k = 16 of 2 classes gives |T| = 32, d = 5
    gold = 16 * 2
    assert all(by[g].teacher_rows + gold == gold * 5 for g in ("g1p1", "g1p2", "g1p3"))
    assert by["g1p2"].task["pattern"] == by["p2"].task["pattern"]
    assert by["distill"].teachers == ("g1p1", "g1p2", "g1p3")
    # PET labels iPET rows with softmax(mean logits), T = 1; the final distillation uses T = 2
    assert all(by[g].teacher_temperature == 1.0 for g in ("g1p1", "g1p2", "g1p3"))
    assert by["distill"].teacher_temperature == 2.0


def test_a_student_of_cached_teachers_trains_as_with_fresh_ones(make_cfg, sentiment_dir,
                                                                tmp_path):
    """Teachers from the stage cache are rebuilt (a model drawn, then their state loaded):
    that must not shift the random numbers the student's initialisation and data order use."""
    from omegaconf import open_dict

    def cfg(folder):
        made = make_cfg(tiny_overrides(sentiment_dir) + PIPE + [
            f"cache.dir={tmp_path / 'cache'}", "+pipeline.stages.student={name: student, task: "
            "{_target_: ftlab.tasks.classify.Classify}, teachers: [t1, t2], trainer: "
            "{max_steps: 3}}"])
        with open_dict(made):
            made.paths.output_dir = str(tmp_path / folder)
        return made

    fresh, cached = run(cfg("a")), run(cfg("b"))
    assert [line["cache_hit"] for line in cached["lineage"]] == [True, True, False]
    assert cached["stages"]["student"]["metrics"] == fresh["stages"]["student"]["metrics"]


def test_ipet_teacher_rows_below_the_classes_are_refused_before_training(make_cfg,
                                                                       sentiment_dir):
    """teacher_rows // classes rows of each class: 1 row for 2 classes drew none, a torch
    RuntimeError after the teachers had trained."""
    from ftlab.build import StageBuilder
    from ftlab.pipeline import build_pipeline
    from ftlab.validate import validate

    verbalize = [o for i in (1, 2, 3) for o in (
        f"~pipeline.stages.p{i}.task.verbalizer",
        f"+pipeline.stages.p{i}.task.verbalizer={{pos: great, neg: bad}}")]
    stages = build_pipeline(make_cfg(tiny_overrides(sentiment_dir) + [
        "pipeline=ipet", *verbalize, "pipeline.stages.g1p2.teacher_rows=1"]))
    with pytest.raises(FtlabError, match=r"stage 'g1p2'(?s:.*)teacher_rows=1 adds(?s:.*)"
                                         r"at least 2"):
        validate(stages, StageBuilder())


def test_a_distillation_stage_without_teachers_is_refused(make_cfg, sentiment_dir):
    """stage=distill as shipped (teachers: []) trained a classifier on the gold labels and
    reported it as the distilled one."""
    from ftlab.pipeline import build_pipeline

    with pytest.raises(FtlabError, match=r"Stage 'distill' is a distillation stage with no "
                                         r"teachers(?s:.*)stage.teachers=\[<earlier stage>"):
        build_pipeline(make_cfg(tiny_overrides(sentiment_dir) + ["stage=distill"]))
    with pytest.raises(FtlabError, match="Stage 'distill' is a distillation stage"):
        build_pipeline(make_cfg(tiny_overrides(sentiment_dir) + [
            "pipeline=pet", "pipeline.stages.distill.teachers=[]"]))


def test_a_calibrated_cloze_teacher_labels_with_its_calibrated_probabilities(make_cfg,
                                                                            sentiment_dir,
                                                                            tmp_path):
    """A cloze teacher with calibrate: true predicts p / p_cf (what its acc_cal scored), but
    distillation and iPET read its raw verbaliser scores: the content-free bias calibration
    removes came back in the soft labels."""
    from ftlab.inference import load

    teacher = make_cfg(tiny_overrides(sentiment_dir) + [
        "stage=cloze", "stage.task.verbalizer={pos: great, neg: bad}",
        "stage.task.calibrate=true", "trainer.max_steps=3"])
    assert run(teacher)["status"] == "ok"
    t = load(tmp_path / "run")
    rows = [{"text": "a great film", "label": 1}, {"text": "a dull mess", "label": 0},
            {"text": "the plot", "label": 0}]
    stage = SimpleNamespace(teachers=("t",), teacher_temperature=1.0, teacher_rows=None,
                            where="stage 'd'")
    raw, _ = label_with_teachers(_raw(rows), stage, [t], ["text"])
    predicted = torch.tensor([[p["probs"][c] for c in ("neg", "pos")]
                              for p in t.predict([r["text"] for r in rows])])
    assert not torch.allclose(predicted, t.scores([r["text"] for r in rows]).softmax(-1))
    torch.testing.assert_close(torch.tensor(raw.splits["train"]["label"]), predicted)


def test_a_text2text_student_of_soft_labels_is_refused(make_cfg, sentiment_dir, tmp_path):
    """stage=text2text learns one target per row: the teachers' soft labels were cut to their
    argmax, silently (the run recorded teacher_temperature as if it had been used)."""
    cfg = make_cfg(tiny_overrides(sentiment_dir) + [
        "model=tiny_gpt2", PIPE[0], "+pipeline.stages.student={name: student, task: {_target_: "
        "ftlab.tasks.text2text.TextToText}, teachers: [t1], trainer: {max_steps: 3}}"])
    with pytest.raises(SystemExit):
        run(cfg)
    error = json.loads((tmp_path / "run" / "metrics.json").read_text())["error"]
    assert "stage=text2text learns one target string per row, but these rows have soft " \
           "labels" in error and "teacher_rows: N" in error, error


def test_balanced_class_weights_count_the_labels_the_student_learns(make_cfg, sentiment_dir,
                                                                    monkeypatch):
    """``class_weights: balanced`` on a distillation stage weighed classes by the gold training
    labels, counted in bind before the teachers relabelled the rows; the student learns the
    teachers' labels (here 3 rows in 4 'neg'), so those are what the weights count."""
    import ftlab.distill
    from ftlab.tasks.classify import balanced_weights, label_counts

    def fixed(teachers, texts, temperature):  # 3 in 4 rows lean to the first class
        return torch.tensor([[0.1, 0.9] if i % 4 == 3 else [0.9, 0.1]
                             for i in range(len(texts))])

    monkeypatch.setattr(ftlab.distill, "ensemble_predictions", fixed)
    seen: list[torch.Tensor] = []
    loss = Classify.loss

    def spy(self, logits, labels):
        if labels.is_floating_point():
            seen.append(self.weight.double())
        return loss(self, logits, labels)

    monkeypatch.setattr(Classify, "loss", spy)
    record = run(make_cfg(tiny_overrides(sentiment_dir) + PIPE + [
        "+pipeline.stages.student={name: student, task: {_target_: "
        "ftlab.tasks.classify.Classify, class_weights: balanced}, teachers: [t1, t2], "
        "trainer: {max_steps: 3}}"]))
    assert "student" in record["stages"], record.get("error")  # trained (3 steps: ~chance)
    gold = [json.loads(line)["label"] for line in
            (sentiment_dir / "train.jsonl").read_text().splitlines()]
    assert len(set(gold)) == 2 and abs(gold.count(gold[0]) - 128) < 40  # about even
    want = torch.tensor([256 / (2 * 192), 256 / (2 * 64)], dtype=torch.float64)
    assert seen and all(torch.allclose(w, want) for w in seen), (seen, want)
    assert not torch.allclose(want, balanced_weights(label_counts(
        [0 if g == gold[0] else 1 for g in gold], 2)).double(), atol=0.1)
