"""Early discard with weight averaging (EMA, SWA) and snapshot ensembles: a job is judged by
the weights its stage evaluates (the average, once there is one), at the decision step."""

from __future__ import annotations

import lightning as L
import pytest
import torch

import ftlab.discard
from ftlab.averaging import SWA, SwapsInAverage, WeightAverage, trainable
from ftlab.discard import LEDGER, EarlyDiscard, read_ledger
from ftlab.snapshots import SnapshotEnsemble
from tests.test_averaging import _fit

DECISION = 4  # at=0.25 of 2 epochs x 8 steps (256 rows, batch 32)


class AtDecision(L.Callback):
    """Listed after the averaging callback: at the decision step, the raw weights, the average
    (this step's update taken) and the val/acc of the stage's own validation at that step."""

    def __init__(self, average: L.Callback | None) -> None:
        self.average = average
        self.raw = self.averaged = self.val_acc = None

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if trainer.global_step == DECISION and self.raw is None:
            self.raw = {n: p.detach().clone() for n, p in trainable(pl_module).items()}
            if isinstance(self.average, SwapsInAverage):
                self.averaged = {n: t.detach().clone()
                                 for n, t in self.average.averaged().items()}

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking and trainer.global_step == DECISION:
            self.val_acc = float(trainer.callback_metrics["val/acc"])


@torch.no_grad()
def _accuracy(module, loader, weights: dict[str, torch.Tensor]) -> float:
    """Validation accuracy of ``weights`` by hand (argmax of the logits against the labels)."""
    for n, p in trainable(module).items():
        p.copy_(weights[n])
    module.model.eval()
    correct = seen = 0
    for batch in loader:
        correct += int((module.model(**batch).logits.argmax(-1) == batch["labels"]).sum())
        seen += len(batch["labels"])
    return correct / seen


def _judged(monkeypatch, tmp_path, make_cfg, sentiment_dir, average):
    """A fit with early discard listed *before* the averaging callback (its hook runs first),
    a validation at the decision step; returns the ledger entry, the weights scored, the probe
    and the fitted module and datamodule."""
    monkeypatch.setattr(ftlab.discard, "sweep_dir", lambda: tmp_path / "sweep")
    scored: list[dict[str, torch.Tensor]] = []
    real = ftlab.discard.validation_score

    def spy(trainer, pl_module):
        scored.append({n: p.detach().clone() for n, p in trainable(pl_module).items()})
        return real(trainer, pl_module)

    monkeypatch.setattr(ftlab.discard, "validation_score", spy)
    probe = AtDecision(average)
    callbacks = [EarlyDiscard(at=0.25, k=2), *([average] if average else []), probe]
    module, trainer, dm = _fit(make_cfg, sentiment_dir, callbacks, val_check_interval=DECISION)
    (entry,) = read_ledger(tmp_path / "sweep" / LEDGER)
    assert entry["step"] == DECISION and len(scored) == 1
    return entry, scored[0], probe, module, dm


@pytest.mark.parametrize("average", [
    WeightAverage(decay=0.9),  # no warm-up: the average lags the raw weights well behind
    SWA(swa_lr=5e-3, start=0.1, every_n_steps=1),  # snapshots at steps 2, 3, 4
], ids=["ema", "swa"])
def test_early_discard_judges_the_averaged_weights_at_the_decision_step(
        average, monkeypatch, tmp_path, make_cfg, sentiment_dir):
    entry, scored, probe, module, dm = _judged(monkeypatch, tmp_path, make_cfg,
                                               sentiment_dir, average)
    # the weights scored are the average with the decision step's own update in it
    assert all(torch.equal(scored[n], probe.averaged[n]) for n in scored)
    assert any(not torch.equal(scored[n], probe.raw[n]) for n in scored)
    # the score is the one the stage's validation reports at that step, and by hand
    assert entry["score"] == pytest.approx(probe.val_acc, abs=1e-6)
    by_hand = _accuracy(module, dm.val_dataloader(), probe.averaged)
    assert entry["score"] == pytest.approx(by_hand, abs=1e-6)


def test_early_discard_with_snapshot_ensembles_judges_the_weights_validation_scores(
        monkeypatch, tmp_path, make_cfg, sentiment_dir):
    """Snapshot runs validate (and keep the best epoch of) the raw weights; the ensemble is
    scored at test only. Four cycles: the decision step is the first cycle's end."""
    snapshots = SnapshotEnsemble(cycles=4)
    entry, scored, probe, module, dm = _judged(monkeypatch, tmp_path, make_cfg,
                                               sentiment_dir, snapshots)
    assert all(torch.equal(scored[n], probe.raw[n]) for n in scored)
    assert all(torch.equal(scored[n], snapshots.snapshots[0][n]) for n in scored)
    assert entry["score"] == pytest.approx(probe.val_acc, abs=1e-6)
    assert entry["score"] == pytest.approx(_accuracy(module, dm.val_dataloader(), probe.raw),
                                           abs=1e-6)


@pytest.mark.parametrize("choice", ["[early_discard,ema]", "[ema,early_discard]"])
def test_a_discarded_ema_job_was_judged_by_the_score_it_reports(choice, make_cfg,
                                                                sentiment_dir, tmp_path):
    """In a multirun, a job discarded at step 4 of 16 reports the val/loss of its weights as
    they stand (the EMA: fit ends on it): the ledger's score is that same number, in either
    order (val/loss, a continuous score: the raw weights' would differ)."""
    from ftlab.run import run
    from tests.conftest import tiny_overrides
    from tests.test_discard import _ledger

    sweep = tmp_path / "sweep"
    _ledger(sweep, [0.0, 0.0])  # two unbeatable earlier jobs: this one is discarded
    overrides = [o for o in tiny_overrides(sentiment_dir) if not o.startswith("callbacks=")]
    rec = run(make_cfg(overrides + [
        f"callbacks={choice}", "callbacks.progress=null", "stage.task.monitor=loss",
        "callbacks.early_discard.k=2", "callbacks.ema.decay=0.9", "callbacks.ema.warmup=false",
        "hydra.mode=MULTIRUN", f"hydra.sweep.dir={sweep}"]))
    assert rec["status"] == "discarded", rec
    mine = read_ledger(sweep / LEDGER)[-1]
    assert mine["decision"] == "discard" and mine["step"] == DECISION
    assert rec["stages"]["classify"]["global_steps"] == DECISION
    assert mine["metric"] == "val/loss"
    assert mine["score"] == pytest.approx(rec["final"]["val/loss"], rel=1e-5)
