"""SWA (ftlab/averaging.py SWA, conf/callbacks/swa.yaml): SWALR's constant LR from ``start``,
an equal-weight average of snapshots at the chosen cadence, used for evaluation and saved."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from ftlab.averaging import SWA
from ftlab.checkpoint import NAME, SafetensorsCheckpointIO
from ftlab.errors import FtlabError
from ftlab.run import run
from ftlab.store import load_tensors
from tests.conftest import tiny_overrides
from tests.test_averaging import _fit

PEAK = 0.2


class Tiny(L.LightningModule):
    """A linear model under ``.model``, SGD with a per-step linear decay (like ftlab's)."""

    def __init__(self, total: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model, self.total = torch.nn.Linear(4, 2), total
        self.model.bias.requires_grad_(False)  # frozen: never averaged

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.model(x), y)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=PEAK)
        decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / self.total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": decay, "interval": "step"}}


class Recorder(L.Callback):
    """The LR each optimiser step ran with and the raw weights after it (keyed by step)."""

    def __init__(self) -> None:
        self.lrs: list[float] = []
        self.weights: dict[int, torch.Tensor] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.lrs.append(optimizer.param_groups[0]["lr"])

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.weights[trainer.global_step] = pl_module.model.weight.detach().clone()


def _fit_tiny(swa: SWA, steps: int = 8, epochs: int = 1) -> tuple[Tiny, Recorder]:
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(4 * steps, 4, generator=g),
                                          torch.randn(4 * steps, 2, generator=g))
    module, rec = Tiny(steps * epochs), Recorder()
    trainer = L.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, callbacks=[swa, rec])
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))
    assert len(rec.lrs) == steps * epochs
    return module, rec


def test_swa_lr_after_start_and_mean_of_step_snapshots():
    swa = SWA(swa_lr=0.05, start=0.5, every_n_steps=2)
    module, rec = _fit_tiny(swa)
    # steps 1-4 follow the stage's decay, steps 5-8 run at the constant SWA LR
    assert rec.lrs[:4] == pytest.approx([PEAK * (1 - s / 8) for s in range(4)])
    assert rec.lrs[4:] == pytest.approx([0.05] * 4)
    snaps = [rec.weights[6], rec.weights[8]]  # every 2 steps after step 4
    expected = sum(snaps) / len(snaps)
    assert swa.count == 2 and swa.names == ["weight"]  # only the trainable tensor
    torch.testing.assert_close(swa.averaged()["weight"], expected)
    assert not torch.allclose(expected, rec.weights[8])  # not just the last weights
    assert not torch.allclose(expected, sum(rec.weights[s] for s in (5, 6, 7, 8)) / 4)
    torch.testing.assert_close(module.model.weight.detach(), expected)  # fit ends averaged


def test_swa_epoch_cadence_and_lr_ratio():
    swa = SWA(lr_ratio=0.25, start=0.3, every_n_steps=None)  # 3 epochs x 4 steps: start at 3
    module, rec = _fit_tiny(swa, steps=4, epochs=3)
    assert rec.lrs[3:] == pytest.approx([0.25 * PEAK] * 9)  # SWA LR = ratio x peak LR
    assert rec.lrs[2] == pytest.approx(PEAK * (1 - 2 / 12))
    snaps = [rec.weights[4], rec.weights[8], rec.weights[12]]  # each epoch's end after start
    torch.testing.assert_close(module.model.weight.detach(), sum(snaps) / 3)
    assert swa.count == 3


@pytest.mark.parametrize("start,every,snaps", [(0.5, None, 2), (0.75, None, 1), (0.5, 2, 3),
                                               (0.5, 4, 1)])
def test_swa_warns_only_when_fewer_than_2_snapshots_will_be_taken(start, every, snaps, caplog):
    """3 epochs x 4 steps: from step 6, epoch ends 8 and 12 give 2 snapshots (the warning
    counted (12 - 6) / 4 = 1.5 and warned); from step 9 only 12."""
    swa = SWA(swa_lr=0.05, start=start, every_n_steps=every)
    with caplog.at_level("WARNING", logger="ftlab.averaging"):
        _fit_tiny(swa, steps=4, epochs=3)
    assert swa.count == snaps
    assert ("SWA will average" in caplog.text) == (snaps < 2)


def test_swa_annealing_reaches_swa_lr():
    _, rec = _fit_tiny(SWA(swa_lr=0.05, start=0.25, every_n_steps=1, anneal_steps=4,
                           anneal_strategy="linear"))
    at_start = PEAK * (1 - 2 / 8)  # the decay's LR when SWA begins (after step 2)
    ramp = [at_start + (0.05 - at_start) * t / 4 for t in range(5)]
    assert rec.lrs[2:] == pytest.approx(ramp + [0.05])


@pytest.mark.parametrize("kwargs", [{"start": 1.0}, {"every_n_steps": 0}, {"swa_lr": -1.0},
                                    {"anneal_strategy": "step"}])
def test_swa_rejects_bad_settings(kwargs):
    with pytest.raises(FtlabError):
        SWA(**kwargs)


class Probe(L.Callback):
    """Checks validation runs on SWA's average once there is one (the raw weights before)."""

    def __init__(self, swa: SWA) -> None:
        self.swa, self.seen = swa, []

    def on_validation_batch_start(self, trainer, pl_module, *args) -> None:
        if trainer.sanity_checking:
            return
        params = {n: p for n, p in pl_module.model.named_parameters() if p.requires_grad}
        average = self.swa.averaged()
        if average is None:
            assert self.swa.backup is None
        else:
            assert all(torch.equal(p, average[n]) for n, p in params.items())
            assert any(not torch.equal(p, self.swa.backup[n]) for n, p in params.items())
        self.seen.append(self.swa.count)


def test_swa_on_tiny_bert_lora_with_ftlab_schedule(make_cfg, sentiment_dir):
    swa, rec = SWA(swa_lr=1e-3, start=0.5, every_n_steps=2), Recorder()
    rec.on_train_batch_end = lambda *a: None  # LRs only (the model has no .weight)
    probe = Probe(swa)
    module, trainer, _ = _fit(make_cfg, sentiment_dir, [swa, probe, rec])
    half = len(rec.lrs) // 2  # 2 epochs x 8 steps; SWA from step 8
    assert rec.lrs[half:] == pytest.approx([1e-3] * half)
    assert rec.lrs[half - 1] != pytest.approx(1e-3)  # ftlab's warmup/decay before
    assert probe.seen[0] == 0 and probe.seen[-1] == 4  # epoch 1 raw, epoch 2 averaged (4)
    params = {n: p for n, p in module.model.named_parameters() if p.requires_grad}
    assert set(swa.names) == set(params) and any("lora" in n for n in params)
    assert all(torch.equal(p, swa.averaged()[n]) for n, p in params.items())


def test_swa_run_saves_the_average_as_artefact(make_cfg, sentiment_dir):
    overrides = [o for o in tiny_overrides(sentiment_dir) if not o.startswith("callbacks=")]
    record = run(make_cfg(overrides + ["callbacks=swa", "callbacks.progress=null",
                                       "callbacks.swa.every_n_steps=2", "peft=bitfit",
                                       "stage.trainer.max_epochs=2", "checkpoint.keep=true"]))
    assert record["status"] == "ok", record
    stage = record["stages"]["classify"]
    assert stage["best_epoch"] == 1  # epoch 0 validated the raw weights: not a candidate
    folder = Path(stage["artefact"]).parent
    ckpt = SafetensorsCheckpointIO().load_checkpoint(folder / "checkpoints" / NAME)
    state = next(v for k, v in ckpt["callbacks"].items() if k.startswith("SWA"))
    total = stage["global_steps"]
    assert state["started"] and state["average"]["n_averaged"] == (total - int(.75 * total)) // 2
    average = {n: state["average"][f"module.{i}"] for i, n in enumerate(state["names"])}
    saved = load_tensors(stage["artefact"])
    assert saved.keys() == average.keys()
    assert all(torch.equal(saved[n], average[n]) for n in saved)
    assert any(not torch.equal(saved[n], state["backup"][n]) for n in saved)  # not the raw


def test_keep_best_ignores_validations_before_the_first_snapshot():
    from types import SimpleNamespace

    from ftlab.callbacks import KeepBest

    swa, keep = SWA(), KeepBest(peft=None, monitor="val/acc")
    trainer = SimpleNamespace(sanity_checking=False, callback_metrics={"val/acc": 0.9},
                              callbacks=[swa, keep], state=SimpleNamespace(fn="fit"))
    keep.on_validation_end(trainer, None)
    assert keep.best is None  # raw weights, SWA not begun: not a candidate
    assert swa.selectable(SimpleNamespace(state=SimpleNamespace(fn="validate")))


SWA_STEPS = ["data.max_train_samples=112", "trainer.max_steps=12", "trainer.max_epochs=5",
             "stage.optim.lr=1e-3", "checkpoint.every_n_steps=4", "callbacks=swa",
             "callbacks.progress=null", "callbacks.swa.start=0.5",
             "callbacks.swa.every_n_steps=1", "callbacks.swa.swa_lr=5e-4"]


def test_killed_swa_run_resumes_like_an_uninterrupted_one(make_cfg, sentiment_dir, tmp_path,
                                                          monkeypatch):
    """Killed at step 10, resumed from step 8: SWA (from step 6) had begun, so SWALR and the
    average come back from the checkpoint."""
    from omegaconf import open_dict

    from tests.test_resume import crash_at

    def cfg(folder: str, *extra: str):
        base = [o for o in tiny_overrides(sentiment_dir) if not o.startswith("callbacks=")]
        c = make_cfg(base + SWA_STEPS + [f"cache.dir={tmp_path / 'cache'}", *extra])
        with open_dict(c):
            c.paths.output_dir = str(tmp_path / folder)
        return c

    whole = run(cfg("whole", "checkpoint.keep=true"))
    assert whole["status"] == "ok", whole
    crash_at(monkeypatch, 10)
    with pytest.raises(SystemExit):
        run(cfg("killed"))
    monkeypatch.undo()
    resumed = run(cfg("killed", "checkpoint.keep=true"))
    assert resumed["status"] == "ok", resumed
    assert resumed["stages"]["classify"]["resumed_from_step"] == 8
    for k, v in whole["final"].items():
        assert resumed["final"][k] == pytest.approx(v, abs=1e-6), k
    io = SafetensorsCheckpointIO()
    a, b = (io.load_checkpoint(tmp_path / n / "classify" / "checkpoints" / NAME)
            for n in ("whole", "killed"))
    sa, sb = (next(v for k, v in c["callbacks"].items() if k.startswith("SWA")) for c in (a, b))
    assert sa["average"]["n_averaged"] == sb["average"]["n_averaged"] == 6  # steps 7..12
    assert a["lr_schedulers"][0]["_last_lr"] == b["lr_schedulers"][0]["_last_lr"] == [5e-4] * len(
        a["lr_schedulers"][0]["_last_lr"])
    for k in sa["average"]:
        assert (sa["average"][k] - sb["average"][k]).abs().max().item() <= 1e-6, k
    for name in ("whole", "killed"):
        saved = load_tensors(tmp_path / name / "classify" / "trainable.safetensors")
        assert saved.keys() == set(sa["names"])


@pytest.mark.parametrize(("choice", "refused"), [
    ("[ema,swa]", "both swap a weight average into the model"),
    ("[swa,snapshots]", "both set the learning rate"),
    ("[early_discard,swa]", None), ("[ema,early_discard]", None), ("[ema,snapshots]", None),
])
def test_callback_combinations_that_would_train_on_the_wrong_weights_are_refused(
        choice, refused, make_cfg, sentiment_dir):
    """EMA + SWA: each swaps its average in for validation and its own backup back after, so
    training went on from the EMA average; SWA + snapshots: the cyclic LR overwrote SWALR."""
    from ftlab.config import plain
    from ftlab.errors import FtlabError
    from ftlab.validate import check_configs

    overrides = [o for o in tiny_overrides(sentiment_dir) if not o.startswith("callbacks=")]
    callbacks = plain(make_cfg([*overrides, f"callbacks={choice}"]).callbacks)
    if refused is None:
        check_configs([], callbacks)
        return
    with pytest.raises(FtlabError, match=refused) as err:
        check_configs([], callbacks)
    assert "callbacks=" in str(err.value)  # the fix names the option to choose


def test_swa_of_bf16_weights_is_their_mean():
    """trainer.precision=bf16-true: an average kept in bf16 rounded each late snapshot's
    1/(n+1) share away and stayed near the first snapshot (1.0 where the mean was 1.5)."""
    from types import SimpleNamespace

    model = torch.nn.Linear(4, 4).to(torch.bfloat16)
    pl_module, master = SimpleNamespace(model=model), torch.ones(4, 4)
    trainer = SimpleNamespace(estimated_stepping_batches=1000, num_training_batches=1000,
                              accumulate_grad_batches=1, global_step=0)
    swa = SWA(swa_lr=0.1, start=0.0, every_n_steps=1)
    swa.on_fit_start(trainer, pl_module)
    seen = []
    for step in range(1, 1001):  # the weights move 1e-3 a step (an fp32 master copy)
        master += 1e-3
        with torch.no_grad():
            model.weight.copy_(master)
        seen.append(model.weight.float().clone())
        trainer.global_step = step
        swa.catch_up(trainer, pl_module, step)
    torch.testing.assert_close(swa.averaged()["weight"].float(), torch.stack(seen).mean(0),
                               atol=1e-4, rtol=0)
