"""Diff pruning's two phases and movement pruning's cubic schedule, driven by a real Lightning
``Trainer`` (the stage's optimiser steps reach the model through ``FollowsSteps.at_step``)."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch

from ftlab.errors import FtlabError
from ftlab.module import FineTuneModule
from ftlab.optim import OptimSpec
from ftlab.peft.movement_pruning import cubic_sparsity
from ftlab.regularizers.none import NoRegularizer
from ftlab.tasks.classify import Classify
from tests import test_resume
from tests.test_peft_contract import batch, logits, method, tiny_model, train_steps
from tests.test_resume import killed_and_resumed

pytestmark = pytest.mark.filterwarnings("ignore:You defined a `validation_step`")
tiny_run = test_resume.tiny_run  # the resume tests' fixture: a 12-step run with checkpoints


class Record(L.Callback):
    """Calls ``look(model, step)`` after each forward (the step's ``at_step`` has run)."""

    def __init__(self, look) -> None:
        self.look, self.losses = look, []

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self.look(pl_module.model, trainer.global_step)
        self.losses.append((trainer.global_step, loss.item()))


def fit(model: torch.nn.Module, steps: int, look, lr: float = 1e-2,
        same_batch: bool = False) -> Record:
    """``steps`` optimiser steps of AdamW (no warmup, no decay) on random or one fixed batch."""
    task = Classify()
    task.labels = ["neg", "pos"]
    module = FineTuneModule(model, task, NoRegularizer(),
                            OptimSpec(lr=lr, warmup_ratio=0.0, weight_decay=0.0))
    batches = [batch(0 if same_batch else i) for i in range(steps)]
    record = Record(look)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[record])
    trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None))
    assert trainer.global_step == steps
    return record


def test_diff_pruning_fixed_mask_phase():
    steps, keep, start = 30, 0.01, 15
    peft = method("diff_pruning", keep=keep, fixed_mask_fraction=0.5)  # the boundary: step 15
    model = peft.apply(tiny_model())
    size = sum(d.numel() for d in model.delta)
    k = math.ceil(keep * size)
    seen: dict[int, dict] = {}

    def look(m, step):
        eff = torch.cat([d.detach().flatten() for d in m.effective_delta()])
        raw = torch.cat([d.detach().flatten() for d in m.delta])
        seen[step] = {"phase2": m.phase2, "mask": m.mask.clone(), "nonzero": int((eff != 0).sum()),
                      "raw_out": raw[~m.mask].abs().max().item() if m.phase2 else None,
                      "raw": raw.clone(), "alpha": m.log_alpha[0].detach().clone()}

    record = fit(model, steps, look, same_batch=True)
    assert [seen[s]["phase2"] for s in range(steps)] == [False] * start + [True] * start
    assert seen[start - 1]["nonzero"] > k  # phase 1: a dense (gated) delta
    first = seen[start]["mask"]
    assert int(first.sum()) == k
    for s in range(start, steps):
        assert seen[s]["nonzero"] == k  # exactly keep x size non-zero, every step
        assert torch.equal(seen[s]["mask"], first)  # the mask stays fixed
        assert seen[s]["raw_out"] == 0.0  # entries outside the mask never move off zero
    inside = seen[steps - 1]["raw"][first] - seen[start]["raw"][first]
    assert (inside != 0).float().mean() > 0.5  # the kept entries re-tune
    assert torch.equal(seen[start]["alpha"], seen[steps - 1]["alpha"])  # gates off in phase 2
    losses = [loss for step, loss in record.losses if step >= start]  # no L0 term: task loss
    assert sum(losses[-3:]) / 3 < 0.8 * losses[0]  # phase 2 recovers from the projection
    assert float(model.extra_loss()) == 0.0
    state = peft.trainable_state(model)  # the artefact: exactly the masked-in entries
    idx = [v for n, v in state.items() if n.endswith(".delta_idx")]
    assert sum(v.numel() for v in idx) == k
    again = method("diff_pruning", keep=keep)
    fresh = again.apply(tiny_model())
    again.load_trainable_state(fresh, state)
    assert torch.equal(fresh.mask, model.mask)
    for a, b in zip(fresh.effective_delta(), model.effective_delta(), strict=True):
        assert torch.equal(a, b)


def test_diff_pruning_phase_lengths():
    model = method("diff_pruning", fixed_mask_steps=3).apply(tiny_model())
    assert model.boundary(10) == 7
    with pytest.raises(FtlabError, match="leaves no gated phase"):
        model.boundary(3)
    assert method("diff_pruning", fixed_mask_fraction=0.0).apply(tiny_model()).boundary(10) is None
    with pytest.raises(FtlabError, match="fixed_mask_fraction"):
        method("diff_pruning", fixed_mask_fraction=1.0)


def test_cubic_schedule_matches_the_paper():
    # 100 steps, warm-up 10, cool-down 20: the ramp runs over steps 10..80
    s = [cubic_sparsity(i, 100, 0.9, 0.1, 0.2) for i in range(101)]
    assert s[:11] == [0.0] * 11 and s[81:] == [0.9] * 20
    for step, t in ((20, 1 / 7), (45, 0.5), (70, 6 / 7)):
        assert s[step] == pytest.approx(0.9 * (1 - (1 - t) ** 3))
    assert s[45] == pytest.approx(0.7875)  # 0.9 * (1 - 0.5^3), by hand
    assert all(a <= b for a, b in zip(s, s[1:], strict=False))


def test_movement_pruning_schedule_in_training():
    steps, final = 20, 0.5  # warm-up 2 steps, cool-down 4: the ramp over steps 2..16
    model = method("movement_pruning", sparsity=final).apply(tiny_model())
    assert model.current_sparsity() == 0.0  # nothing pruned at step 0 by default
    assert all(bool((m == 1).all()) for m in model.masks())
    seen: dict[int, tuple[float, float, bool]] = {}

    def look(m, step):
        masks = m.masks()
        pruned = sum(float((x == 0).sum()) for x in masks) / sum(x.numel() for x in masks)
        untied = True
        if m.current_sparsity() > 0:  # the top-k border is never a tie among scores
            for sc in m.scores:
                k = int(round((1 - m.current_sparsity()) * sc.numel()))
                top = torch.sort(sc.detach().flatten(), descending=True).values
                untied &= bool(top[k - 1] > top[k])
        seen[step] = (m.current_sparsity(), pruned, untied)

    fit(model, steps, look, lr=1e-3)
    assert [seen[i][0] for i in range(3)] == [0.0, 0.0, 0.0]
    for step, t in ((5, 3 / 14), (9, 0.5), (13, 11 / 14)):
        assert seen[step][0] == pytest.approx(final * (1 - (1 - t) ** 3))
    assert [seen[i][0] for i in range(16, steps)] == [final] * 4
    for step, (target, pruned, untied) in seen.items():
        assert pruned == pytest.approx(target, abs=0.01), step  # the masks follow the schedule
        assert untied, step
    state = method("movement_pruning", sparsity=final).trainable_state(model)
    for name, score in zip(model.names, model.scores, strict=True):
        kept = int((state[f"model.{name}"] != 0).sum())
        assert kept == round((1 - final) * score.numel())  # exactly the target at the end


def test_movement_scores_train_at_the_stage_lr_without_weight_decay():
    """The reference gives the scores a group of their own with no weight decay; the weights
    keep the stage's decay. One AdamW step with zero gradients moves only what decay moves."""
    from ftlab.optim import build_optimizer

    model = method("movement_pruning").apply(tiny_model())
    with torch.no_grad():
        for score in model.scores:
            score.fill_(1.0)
    spec = OptimSpec(lr=0.5, weight_decay=0.5, warmup_ratio=0.0)
    opt, _ = build_optimizer(model, spec, total_steps=10)
    for p in model.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    weight = model.originals()[0]
    before = weight.detach().clone()
    opt.step()
    assert all(bool((s == 1.0).all()) for s in model.scores), "the scores were decayed"
    torch.testing.assert_close(weight.detach(), before * (1 - 0.5 * 0.5))  # weights decay
    lrs = {group["lr"] for group in opt.param_groups}
    assert lrs == {0.5}, lrs  # the scores' group trains at the stage's LR


def test_magnitude_criterion_keeps_the_largest_weights_on_the_same_schedule():
    """``criterion=magnitude`` (the reference's ``--pruning_method magnitude``): every step's
    mask keeps exactly the largest |w| of each matrix at the scheduled sparsity; no scores
    train, and the artefact holds the final magnitude mask."""
    steps, final = 20, 0.5
    peft = method("movement_pruning", sparsity=final, criterion="magnitude")
    model = peft.apply(tiny_model())
    seen: dict[int, float] = {}

    def look(m, step):
        masks = m.masks()
        for w, mask in zip(m.originals(), masks, strict=True):
            if bool((mask == 0).any()):  # every pruned |w| is below every kept one
                a = w.detach().abs()
                assert a[mask == 0].max() <= a[mask == 1].min(), step
        seen[step] = sum(float((x == 0).sum()) for x in masks) / sum(x.numel() for x in masks)

    fit(model, steps, look, lr=1e-3)
    for step in range(steps):
        model.at_step(step, steps)
        assert seen[step] == pytest.approx(model.current_sparsity(), abs=0.01), step
    assert seen[steps - 1] == pytest.approx(final, abs=0.01)
    assert all(not s.requires_grad and bool((s == 0).all()) for s in model.scores)
    state = peft.trainable_state(model)
    assert not any(k.startswith("scores.") for k in state)
    for name, w in zip(model.names, model.originals(), strict=True):
        saved = state[f"model.{name}"]
        assert int((saved != 0).sum()) == round((1 - final) * w.numel())
        kept = w.detach().abs()[saved != 0]
        assert kept.min() >= w.detach().abs()[saved == 0].max()  # the largest |w| survive
    with pytest.raises(FtlabError, match="criterion"):
        method("movement_pruning", criterion="random")


def test_movement_pruning_absolute_steps_and_bad_fractions():
    model = method("movement_pruning", sparsity=0.8, schedule_steps=10).apply(tiny_model())
    model.at_step(1, 1000)  # the stage is longer: the schedule spans 10 steps, then holds
    assert model.current_sparsity() == 0.0
    model.at_step(5, 1000)
    assert model.current_sparsity() == pytest.approx(0.8 * (1 - (1 - 4 / 7) ** 3))  # ramp 1..8
    model.at_step(9, 1000)
    assert model.current_sparsity() == 0.8
    with pytest.raises(FtlabError, match="leave no steps"):
        method("movement_pruning", initial_warmup=0.5, final_warmup=0.5)


@pytest.mark.parametrize("criterion", ["movement", "magnitude"])
def test_a_stage_keeps_only_validations_of_the_settled_model(make_cfg, sentiment_dir, criterion):
    """End to end: the stage's best epoch is one at the final sparsity, and its artefact holds
    exactly the target sparsity in every pruned matrix (``KeepBest`` skips earlier epochs)."""
    from ftlab.run import run
    from ftlab.store import load_tensors
    from tests.conftest import tiny_overrides

    final = 0.6
    cfg = make_cfg([*tiny_overrides(sentiment_dir), "peft=movement_pruning",
                    f"peft.criterion={criterion}", f"peft.sparsity={final}",
                    "stage.optim.lr=2e-3", "trainer.max_epochs=5"])
    record = run(cfg)
    assert record["status"] == "ok", record.get("error")
    state = load_tensors(next(Path(cfg.paths.output_dir).rglob("trainable.safetensors")))
    model = method("movement_pruning").apply(tiny_model())
    for name in model.names:
        w = state[f"model.{name}"]
        assert int((w != 0).sum()) == round((1 - final) * w.numel()), name
    kept = sum(int((state[f"model.{n}"] != 0).sum()) for n in model.names)
    total = sum(state[f"model.{n}"].numel() for n in model.names)
    reported = record["stages"]["classify"]["peft"]  # metrics.json: what the artefact holds
    assert reported == {"sparsity": pytest.approx(1 - kept / total, abs=1e-6),
                        "target_sparsity": final, "prunable_weights": total,
                        "weights_kept": kept}
    assert reported["sparsity"] == pytest.approx(final, abs=0.01)


def test_diff_pruning_records_the_entries_its_artefact_keeps(make_cfg, sentiment_dir):
    """metrics.json says how much of the backbone the diff changes (the parameter counts show
    the dense delta and gates: 2/3 of the wrapped model), equal to the artefact's indices."""
    from ftlab.run import run
    from ftlab.store import load_tensors
    from tests.conftest import tiny_overrides

    cfg = make_cfg([*tiny_overrides(sentiment_dir), "peft=diff_pruning", "peft.keep=0.02",
                    "trainer.max_steps=4"])
    record = run(cfg)
    assert record["status"] == "ok", record.get("error")
    state = load_tensors(next(Path(cfg.paths.output_dir).rglob("trainable.safetensors")))
    saved = sum(v.numel() for k, v in state.items() if k.endswith(".delta_idx"))
    stage = record["stages"]["classify"]
    assert stage["params_trainable_pct"] > 50  # the dense delta: not what is kept
    assert stage["peft"]["diff_kept"] == saved > 0
    assert stage["peft"]["diff_kept_pct"] == pytest.approx(2.0, abs=0.05)


def test_diff_pruning_phase_survives_a_checkpoint():
    """A resumed stage loads the module's state dict: phase 2 and its mask come back."""
    model = method("diff_pruning", keep=0.01).apply(tiny_model())
    with torch.no_grad():
        for d in model.delta:
            d.normal_()
    model.at_step(5, 10)  # the boundary of a 10-step stage at fraction 0.5
    assert model.phase2
    other = method("diff_pruning", keep=0.01).apply(tiny_model())
    assert not other.phase2
    other.load_state_dict(model.state_dict())
    assert other.phase2 and torch.equal(other.mask, model.mask)
    other.at_step(6, 10)  # no second projection (it would fold the gates in again)
    for a, b in zip(other.delta, model.delta, strict=True):
        assert torch.equal(a, b)


def test_diff_pruning_resumed_in_phase_2_ends_like_an_uninterrupted_run(tiny_run, monkeypatch,
                                                                         tmp_path):
    """12 steps: phase 2 from step 6; killed at 10, resumed from the step-8 checkpoint."""
    from ftlab.checkpoint import NAME, SafetensorsCheckpointIO
    from ftlab.store import load_tensors

    extra = ["peft=diff_pruning", "peft.keep=0.01", "checkpoint.keep=true"]
    killed_and_resumed(tiny_run, monkeypatch, *extra)
    a, b = (load_tensors(tmp_path / n / "classify" / "trainable.safetensors")
            for n in ("whole", "killed"))
    assert a.keys() == b.keys()
    for k in a:
        if k.endswith(".delta_idx"):
            assert torch.equal(a[k], b[k]), k  # the same mask: no second projection
        else:
            torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    # the artefact is the best epoch's (it may be step 7's, before the kill): the last step's
    # model, mask included, shows the resumed steps kept the mask and trained the same
    io = SafetensorsCheckpointIO()
    a, b = (io.load_checkpoint(tmp_path / n / "classify" / "checkpoints" / NAME)["state_dict"]
            for n in ("whole", "killed"))
    assert a.keys() == b.keys() and any(k.endswith("mask") for k in a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0, msg=k)


def test_diff_pruning_without_phase_2_evaluates_the_projection_its_artefact_holds():
    """fixed_mask_fraction=0 is settled from the start, so KeepBest picks among its
    validations: they must score the projected (0.5%-dense) diff, not the dense gated one."""
    peft = method("diff_pruning", keep=0.01, fixed_mask_fraction=0)
    model = peft.apply(tiny_model())
    for steps in (4, 1):  # a later step changes the weights: the projection follows them
        train_steps(model, steps)
        loaded = peft.apply(tiny_model())
        peft.load_trainable_state(loaded, peft.trainable_state(model))
        torch.testing.assert_close(logits(model), logits(loaded), atol=1e-6, rtol=0)
    model.train()
    with torch.no_grad():  # a step that bumps no version counter (fused AdamW's): the mode
        for d in model.delta:  # switches around it still show it
            d.data.mul_(2)
    loaded = peft.apply(tiny_model())
    peft.load_trainable_state(loaded, peft.trainable_state(model))
    torch.testing.assert_close(logits(model), logits(loaded), atol=1e-6, rtol=0)
    assert not model.phase2 and model.training is False
    model.train()  # training still samples the gates over the dense delta
    dense = model.effective_delta()
    assert sum(int(torch.count_nonzero(d)) for d in dense) > 0.05 * sum(d.numel() for d in dense)


@pytest.mark.parametrize(("peft", "reached"), [
    (["peft=diff_pruning"], lambda stage: stage["global_steps"] >= 80),  # phase 2 from step 80
    (["peft=movement_pruning", "peft.criterion=magnitude"],
     lambda stage: stage["peft"]["sparsity"] == pytest.approx(0.5, abs=1e-6)),
])
def test_the_adaptive_budget_stops_early_only_once_the_pruning_model_is_settled(
        make_cfg, sentiment_dir, peft, reached):
    """Under the default adaptive budget (patience 1 here) early stopping used to end a stage
    mid-schedule: diff pruning before its fixed-mask phase (32 of 160 steps, no settled epoch
    to keep), movement pruning at 31% of a 50% target."""
    from ftlab.run import run
    from tests.conftest import tiny_overrides

    base = [o for o in tiny_overrides(sentiment_dir) if not o.startswith("trainer.budget.")]
    record = run(make_cfg([*base, *peft, "trainer.budget.min_steps=160",  # 10 epochs of 16
                           "trainer.budget.patience=1", "stage.optim.lr=3e-3"]))
    stage = record["stages"]["classify"]
    assert stage["budget"]["max_epochs"] == 10
    assert reached(stage), stage
    assert stage["best_epoch"] is not None  # a settled validation was kept


@pytest.mark.parametrize("extra", [
    ["peft=movement_pruning"],  # scores and the cubic schedule's step
    ["peft=diff_pruning", "peft.keep=0.01", "peft.fixed_mask_fraction=0.25"],  # gated at 8
    ["peft=intrinsic", "peft.said=true", "peft.d=300"],  # theta, SAID's scales, the seed
])
def test_a_method_with_extra_state_resumes_like_an_uninterrupted_run(tiny_run, monkeypatch,
                                                                     tmp_path, extra):
    """Killed at step 10 of 12, resumed from the step-8 checkpoint (under EMA): the same
    metrics, artefact and last-step model (scores, gate logits, theta) as a run never
    interrupted (the artefact alone may be step 7's best epoch, from before the kill)."""
    from ftlab.checkpoint import NAME, SafetensorsCheckpointIO
    from ftlab.store import load_tensors

    killed_and_resumed(tiny_run, monkeypatch, *extra, "checkpoint.keep=true")
    a, b = (load_tensors(tmp_path / n / "classify" / "trainable.safetensors")
            for n in ("whole", "killed"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    io = SafetensorsCheckpointIO()
    a, b = (io.load_checkpoint(tmp_path / n / "classify" / "checkpoints" / NAME)["state_dict"]
            for n in ("whole", "killed"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0, msg=k)
