"""EMA/SWA and snapshot ensembles of the trainable parameters (ftlab/averaging.py)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from ftlab.averaging import SnapshotEnsemble, WeightAverage
from ftlab.run import run
from tests.conftest import tiny_overrides


class Probe(L.Callback):
    """Records the weights validation actually runs on."""

    def __init__(self, ema: WeightAverage) -> None:
        self.ema, self.checked = ema, 0

    def on_validation_batch_start(self, trainer, pl_module, *args) -> None:
        if trainer.sanity_checking:
            return
        params = {n: p for n, p in pl_module.model.named_parameters() if p.requires_grad}
        assert all(torch.equal(p, self.ema.shadow[n]) for n, p in params.items())
        assert any(not torch.equal(p, self.ema.backup[n]) for n, p in params.items())
        self.checked += 1


def _fit(make_cfg, sentiment_dir, callbacks: list[L.Callback]) -> L.LightningModule:
    from ftlab.config import bind_schema, instantiate_checked
    from ftlab.data.datamodule import TextDataModule
    from ftlab.data.sources import load_raw
    from ftlab.data.spec import DataSpec
    from ftlab.model.backbone import ModelSpec, load_tokenizer
    from ftlab.module import FineTuneModule
    from ftlab.optim import OptimSpec
    from ftlab.pipeline import split_peft
    from ftlab.regularizers.none import NoRegularizer

    cfg = make_cfg(tiny_overrides(sentiment_dir) + ["peft=lora"])
    spec, mspec = bind_schema(DataSpec, cfg.data, "data"), bind_schema(ModelSpec, cfg.model, "m")
    raw, tok = load_raw(spec, 0), load_tokenizer(mspec)
    task = instantiate_checked(cfg.stage.task, "task")
    task.bind(raw, tok, spec.text_columns)
    dm = TextDataModule(raw.splits, task, tok.pad_token_id, batch_size=32, seed=0)
    model = instantiate_checked(split_peft(cfg.peft)[0], "peft").apply(task.build_model(mspec))
    module = FineTuneModule(model, task, NoRegularizer(), OptimSpec(lr=1e-2))
    trainer = L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=callbacks, default_root_dir=cfg.paths.output_dir)
    trainer.fit(module, dm)
    return module, trainer, dm


def test_ema_weights_differ_from_raw_and_are_used_for_evaluation(make_cfg, sentiment_dir):
    ema = WeightAverage(decay=0.9)
    probe = Probe(ema)
    module, _, _ = _fit(make_cfg, sentiment_dir, [ema, probe])
    assert probe.checked > 0  # validation ran on EMA weights, which differ from the raw ones
    params = {n: p for n, p in module.model.named_parameters() if p.requires_grad}
    assert all(torch.equal(p, ema.shadow[n]) for n, p in params.items())  # fit ends averaged


def test_swa_is_the_running_mean():
    swa = WeightAverage(decay=None)
    swa.shadow = {"w": torch.zeros(2)}
    for value in (1.0, 2.0, 6.0):
        swa.count += 1
        swa.shadow["w"].lerp_(torch.full((2,), value), 1.0 / swa.count)
    torch.testing.assert_close(swa.shadow["w"], torch.full((2,), 3.0))


def test_snapshot_ensemble_saves_cycles_and_scores_the_ensemble(make_cfg, sentiment_dir):
    snaps = SnapshotEnsemble(cycles=2)
    module, trainer, dm = _fit(make_cfg, sentiment_dir, [snaps])
    assert len(snaps.snapshots) == 2
    a, b = snaps.snapshots
    assert any(not torch.equal(a[n], b[n]) for n in a)
    files = sorted(Path(trainer.default_root_dir).glob("snapshots/cycle*.safetensors"))
    assert [f.name for f in files] == ["cycle1.safetensors", "cycle2.safetensors"]
    assert sum(f.stat().st_size for f in files) < 200_000  # LoRA snapshots are small
    result = trainer.test(module, dm, verbose=False)[0]
    assert 0.0 <= result["test/ensemble_acc"] <= 1.0


def test_callbacks_option_in_a_run(make_cfg, sentiment_dir):
    overrides = [o for o in tiny_overrides(sentiment_dir) if not o.startswith("callbacks=")]
    record = run(make_cfg(overrides + ["callbacks=snapshots", "peft=bitfit",
                                       "stage.trainer.max_epochs=2"]))
    assert "test/ensemble_acc" in record["final"]
