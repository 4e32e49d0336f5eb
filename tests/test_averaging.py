"""EMA/SWA and snapshot ensembles of the trainable parameters (ftlab/averaging.py,
ftlab/snapshots.py)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from ftlab.averaging import WeightAverage
from ftlab.run import run
from ftlab.snapshots import SnapshotEnsemble
from ftlab.store import load_tensors
from ftlab.tasks.base import TaskOutput
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


def _fit(make_cfg, sentiment_dir, callbacks: list[L.Callback],
         **trainer_kw) -> L.LightningModule:
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
                        callbacks=callbacks, default_root_dir=cfg.paths.output_dir,
                        **trainer_kw)
    trainer.fit(module, dm)
    return module, trainer, dm


def test_ema_weights_differ_from_raw_and_are_used_for_evaluation(make_cfg, sentiment_dir):
    ema = WeightAverage(decay=0.9)
    probe = Probe(ema)
    module, _, _ = _fit(make_cfg, sentiment_dir, [ema, probe])
    assert probe.checked > 0  # validation ran on EMA weights, which differ from the raw ones
    params = {n: p for n, p in module.model.named_parameters() if p.requires_grad}
    assert all(torch.equal(p, ema.shadow[n]) for n, p in params.items())  # fit ends averaged


class Tiny(L.LightningModule):
    """A linear model under ``.model`` (where the callbacks look), plain SGD on random data."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = torch.nn.Linear(4, 2)
        self.model.bias.requires_grad_(False)  # frozen: never averaged

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.model(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2)


class Recorder(L.Callback):
    """The raw trainable weights after every optimiser step."""

    def __init__(self) -> None:
        self.steps: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.steps.append(pl_module.model.weight.detach().clone())


def _fit_tiny(average: WeightAverage, steps: int = 8) -> tuple[Tiny, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(4 * steps, 4, generator=g),
                                          torch.randn(4 * steps, 2, generator=g))
    module, recorder = Tiny(), Recorder()
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, callbacks=[average, recorder])
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))
    assert len(recorder.steps) == steps
    return module, recorder.steps


def test_swa_is_the_running_mean_of_the_weights_after_each_step():
    swa = WeightAverage(decay=None)
    module, steps = _fit_tiny(swa)
    expected = sum(steps) / len(steps)
    assert set(swa.shadow) == {"weight"}  # only the trainable tensor is averaged
    torch.testing.assert_close(swa.shadow["weight"], expected)
    assert not torch.allclose(expected, steps[-1])  # the mean is not just the last weights
    torch.testing.assert_close(module.model.weight.detach(), expected)  # fit ends averaged


def test_swa_start_averages_only_the_later_steps():
    swa = WeightAverage(decay=None, start=0.5)
    module, steps = _fit_tiny(swa)
    later = steps[3:]  # the weights after steps 4..8: global_step >= 0.5 * 8
    torch.testing.assert_close(swa.shadow["weight"], sum(later) / len(later))
    torch.testing.assert_close(module.model.weight.detach(), sum(later) / len(later))


def test_ema_follows_its_recurrence():
    ema = WeightAverage(decay=0.7)
    init = Tiny().model.weight.detach().clone()
    module, steps = _fit_tiny(ema)
    expected = init
    for w in steps:
        expected = 0.7 * expected + 0.3 * w
    torch.testing.assert_close(ema.shadow["weight"], expected)
    torch.testing.assert_close(module.model.weight.detach(), expected)


def test_ema_warmup_lowers_the_decay_of_the_first_updates():
    """warmup: the n-th update (from 0) decays by min(decay, (1 + n) / (10 + n))."""
    ema = WeightAverage(decay=0.95, warmup=True)
    expected = Tiny().model.weight.detach().clone()
    module, steps = _fit_tiny(ema)
    for n, w in enumerate(steps):
        d = min(0.95, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * w
    torch.testing.assert_close(ema.shadow["weight"], expected)


def _fit_accumulating(callback: L.Callback, steps: int, root=None) -> list[torch.Tensor]:
    """Fit ``Tiny`` for ``steps`` optimiser steps of 2 accumulated batches each; the weights
    after each optimiser step."""
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(8 * steps, 4, generator=g),
                                          torch.randn(8 * steps, 2, generator=g))
    recorder = Recorder()
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, accumulate_grad_batches=2,
                        default_root_dir=root, callbacks=[callback, recorder])
    trainer.fit(Tiny(), torch.utils.data.DataLoader(data, batch_size=4))
    after = recorder.steps[1::2]
    assert trainer.global_step == len(after) == steps
    return after


def test_ema_decays_once_per_optimiser_step_under_gradient_accumulation():
    """``decay`` is per optimiser step: with accumulate_grad_batches=2 the average moves once
    per step (after every second batch), not once per micro-batch."""
    ema = WeightAverage(decay=0.7)
    init = Tiny().model.weight.detach().clone()
    steps = _fit_accumulating(ema, 4)
    expected = init
    for w in steps:
        expected = 0.7 * expected + 0.3 * w
    torch.testing.assert_close(ema.shadow["weight"], expected)
    assert ema.count == 4


def _ensemble_acc(module, loader, snapshots) -> float:
    """Accuracy of the snapshots' averaged softmax, by definition (each snapshot loaded in turn)."""
    params = {n: p for n, p in module.model.named_parameters() if p.requires_grad}
    current = {n: p.detach().clone() for n, p in params.items()}
    module.model.eval()
    correct = seen = 0
    with torch.no_grad():
        for batch in loader:
            probs = 0.0
            for snap in snapshots:
                for n, p in params.items():
                    p.copy_(snap[n])
                probs = probs + module.model(**batch).logits.softmax(-1)
            correct += int((probs.argmax(-1) == batch["labels"]).sum())
            seen += len(batch["labels"])
        for n, p in params.items():
            p.copy_(current[n])
    return correct / seen


def test_snapshot_ensemble_saves_cycles_and_scores_the_ensemble(make_cfg, sentiment_dir):
    snaps = SnapshotEnsemble(cycles=2)
    module, trainer, dm = _fit(make_cfg, sentiment_dir, [snaps])
    assert len(snaps.snapshots) == 2
    a, b = snaps.snapshots
    assert set(a) == {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert any(not torch.equal(a[n], b[n]) for n in a)
    # the last cycle ends with training: its snapshot is the final trained state
    assert all(torch.equal(b[n], p) for n, p in module.model.named_parameters() if n in b)
    files = sorted(Path(trainer.default_root_dir).glob("snapshots/cycle*.safetensors"))
    assert [f.name for f in files] == ["cycle1.safetensors", "cycle2.safetensors"]
    for f, snap in zip(files, snaps.snapshots, strict=True):
        saved = load_tensors(f)
        assert saved.keys() == snap.keys() and all(torch.equal(saved[n], snap[n]) for n in snap)
    assert sum(f.stat().st_size for f in files) < 200_000  # LoRA snapshots are small
    result = trainer.test(module, dm, verbose=False)[0]
    expected = _ensemble_acc(module, dm.test_dataloader(), snaps.snapshots)
    assert result["test/ensemble_acc"] == pytest.approx(expected, abs=1e-6)


def test_snapshots_are_taken_at_cycle_ends_under_gradient_accumulation(tmp_path):
    """Cycles count optimiser steps: with accumulate_grad_batches=2 the two snapshots of an
    8-step run are the weights after steps 4 and 8 (not the initial weights at step 0, nor
    one cycle's end twice)."""
    snaps = SnapshotEnsemble(cycles=2)
    steps = _fit_accumulating(snaps, 8, tmp_path)
    assert len(snaps.snapshots) == 2
    torch.testing.assert_close(snaps.snapshots[0]["weight"], steps[3])
    torch.testing.assert_close(snaps.snapshots[1]["weight"], steps[7])


def test_snapshot_training_ends_on_the_last_snapshot_when_cycles_do_not_divide_the_steps(
        tmp_path):
    """10 steps in 3 cycles of 3: the step left over after the third snapshot must not restart
    at the peak LR (the model would leave training off its last snapshot)."""
    snaps = SnapshotEnsemble(cycles=3)
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(40, 4, generator=g),
                                          torch.randn(40, 2, generator=g))
    module = Tiny()
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, default_root_dir=tmp_path, callbacks=[snaps])
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))
    assert trainer.global_step == 10 and len(snaps.snapshots) == 3
    torch.testing.assert_close(module.model.weight.detach(), snaps.snapshots[-1]["weight"])


class LinearTask:
    """The slice of the Task protocol SnapshotEnsemble uses: ``forward`` -> (loss, logits),
    and the task's accuracy (``metrics``, ``update``) to score the ensemble with."""

    def forward(self, model, batch):
        logits = model(batch["x"])
        return TaskOutput(loss=logits.sum() * 0, logits=logits)

    def metrics(self):
        from torchmetrics import MetricCollection
        from torchmetrics.classification import MulticlassAccuracy

        return MetricCollection({"acc": MulticlassAccuracy(num_classes=3, average="micro")})

    def update(self, metrics, out, batch):
        metrics.update(out.logits.argmax(-1), batch["labels"])


class Scored(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model, self.task = torch.nn.Linear(4, 3), LinearTask()

    def test_step(self, batch, batch_idx) -> None:
        pass


def test_snapshot_ensemble_scores_the_averaged_softmax_of_its_snapshots():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(300, 4, generator=g), torch.randint(0, 3, (300,), generator=g)
    snaps = SnapshotEnsemble(cycles=3)
    snaps.snapshots = [{"weight": 3 * torch.randn(3, 4, generator=g),
                        "bias": torch.randn(3, generator=g)} for _ in range(3)]
    module = Scored()
    raw = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[snaps])
    loader = torch.utils.data.DataLoader([{"x": a, "labels": b} for a, b in zip(x, y, strict=True)],
                                         batch_size=64)
    result = trainer.test(module, loader, verbose=False)[0]

    logits = [x @ s["weight"].T + s["bias"] for s in snaps.snapshots]
    ensemble = (sum(lg.softmax(-1) for lg in logits).argmax(-1) == y).float().mean().item()
    singles = [(lg.argmax(-1) == y).float().mean().item() for lg in logits]
    mean_logits = (sum(logits).argmax(-1) == y).float().mean().item()
    assert ensemble not in [*singles, mean_logits]  # the data tells these apart
    assert result["test/ensemble_acc"] == pytest.approx(ensemble, abs=1e-6)
    # scoring leaves the model's own weights in place
    assert all(torch.equal(p, raw[n]) for n, p in module.model.named_parameters())


def test_snapshot_ensemble_scores_labelled_tokens_only():
    """Token tasks (stage=tokens) label some positions -100 (sub-words, padding): the
    ensemble's accuracy counts the labelled positions only, as the task's own test/acc does."""

    from ftlab.tasks.tokens import Tokens

    class TokenTask(Tokens):  # the real tagging metrics, on a linear "model"
        def forward(self, model, batch):
            logits = model(batch["x"])  # [rows, tokens, classes]
            return TaskOutput(loss=logits.sum() * 0, logits=logits)

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 6, 4, generator=g), torch.randint(0, 3, (40, 6), generator=g)
    y[:, 4:] = -100  # the last two positions carry no label
    snaps = SnapshotEnsemble(cycles=1)
    snaps.snapshots = [{"weight": torch.randn(3, 4, generator=g), "bias": torch.zeros(3)}]
    module = Scored()
    module.task = TokenTask()
    module.task.labels = ["O", "B-X", "I-X"]
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[snaps])
    loader = torch.utils.data.DataLoader([{"x": a, "labels": b} for a, b in zip(x, y, strict=True)],
                                         batch_size=16)
    result = trainer.test(module, loader, verbose=False)[0]
    pred = (x @ snaps.snapshots[0]["weight"].T).argmax(-1)
    known = y != -100
    expected = ((pred == y) & known).sum().item() / known.sum().item()
    assert result["test/ensemble_acc"] == pytest.approx(expected, abs=1e-6)


def test_snapshot_ensemble_with_a_causal_lm_stage_finishes(make_cfg, sentiment_dir):
    """stage=clm batches have no ``labels`` (the targets are the shifted inputs): nothing to
    ensemble, and the run must not fail at test time."""
    overrides = [o for o in tiny_overrides(sentiment_dir) if not o.startswith("callbacks=")]
    record = run(make_cfg(overrides + ["model=tiny_gpt2", "stage=clm", "callbacks=snapshots",
                                       "callbacks.progress=null", "stage.trainer.max_steps=4"]))
    assert record["status"] == "ok", record.get("error")
    assert "test/ppl" in record["final"] and "test/ensemble_acc" not in record["final"]


@pytest.mark.parametrize("model", ["tiny_t5", "tiny_gpt2"])
def test_snapshot_ensemble_of_a_text_to_text_stage_scores_its_class_ids(model, make_cfg,
                                                                         sentiment_dir):
    """stage=text2text scores ``[rows, classes]`` against ``class_id`` (its ``labels`` are
    target tokens): the ensemble is scored like the model, and a one-snapshot ensemble
    matches the model's own test/acc."""
    overrides = [o for o in tiny_overrides(sentiment_dir) if not o.startswith("callbacks=")]
    record = run(make_cfg(overrides + [f"model={model}", "stage=text2text",
                                       "callbacks=snapshots", "callbacks.progress=null",
                                       "callbacks.snapshots.cycles=1",
                                       "stage.trainer.max_steps=4"]))
    assert record["status"] == "ok", record.get("error")
    final = record["final"]
    assert final["test/ensemble_acc"] == pytest.approx(final["test/acc"], abs=1e-6)


def test_snapshot_learning_rate_restarts_each_cycle(make_cfg, sentiment_dir):
    class LrLog(L.Callback):
        def __init__(self) -> None:
            self.lrs: list[float] = []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            self.lrs.append(optimizer.param_groups[0]["lr"])

    log = LrLog()
    _fit(make_cfg, sentiment_dir, [SnapshotEnsemble(cycles=2), log])
    half = len(log.lrs) // 2  # 2 epochs x 8 batches = 16 steps, two cycles of 8
    first, second = log.lrs[:half], log.lrs[half:]
    assert first == pytest.approx(second)  # the second cycle restarts from the peak
    assert first[0] == pytest.approx(1e-2) and first[0] > first[half // 2] > first[-1]
    assert first[half // 2] == pytest.approx(0.5e-2)  # cosine: half the peak mid-cycle


def test_callbacks_option_in_a_run(make_cfg, sentiment_dir):
    overrides = [o for o in tiny_overrides(sentiment_dir) if not o.startswith("callbacks=")]
    record = run(make_cfg(overrides + ["callbacks=snapshots", "peft=bitfit",
                                       "stage.trainer.max_epochs=2"]))
    assert record["status"] == "ok", record
    assert 0.0 < record["final"]["test/ensemble_acc"] <= 1.0
    # conf/callbacks/snapshots.yaml: 3 cycles, each snapshot = bitfit's trainable tensors
    files = sorted((Path(record_dir(record)) / "snapshots").glob("cycle*.safetensors"))
    assert [f.name for f in files] == [f"cycle{i}.safetensors" for i in (1, 2, 3)]
    keys = set(load_tensors(files[0]))
    assert keys and all(k.endswith(".bias") or ".classifier." in f".{k}" for k in keys), keys


def record_dir(record: dict) -> str:
    return str(Path(record["stages"]["classify"]["artefact"]).parent)


def test_an_ema_run_scores_keeps_tests_and_saves_the_average(make_cfg, sentiment_dir):
    """callbacks=ema in a run: the artefact is the EMA (not the raw weights), and the recorded
    val/acc and test/acc are that artefact's accuracy, predicted by hand from the saved run."""
    import json

    import ftlab
    from ftlab.checkpoint import NAME, SafetensorsCheckpointIO

    overrides = [o for o in tiny_overrides(sentiment_dir) if not o.startswith("callbacks=")]
    record = run(make_cfg(overrides + [
        "callbacks=ema", "callbacks.progress=null", "callbacks.ema.decay=0.9",
        "callbacks.ema.warmup=false", "peft=bitfit", "checkpoint.keep=true"]))
    assert record["status"] == "ok", record
    folder = Path(record_dir(record))
    ckpt = SafetensorsCheckpointIO().load_checkpoint(folder / "checkpoints" / NAME)
    state = next(v for k, v in ckpt["callbacks"].items() if k.startswith("WeightAverage"))
    saved = load_tensors(folder / "trainable.safetensors")  # one epoch: its one validation
    assert saved.keys() == state["shadow"].keys()
    assert all(torch.equal(saved[n], state["shadow"][n]) for n in saved)
    assert any(not torch.equal(saved[n], state["backup"][n]) for n in saved)  # not the raw
    predictor = ftlab.load(folder.parent)
    for split, prefix in (("validation", "val"), ("test", "test")):
        rows = [json.loads(line) for line in (sentiment_dir / f"{split}.jsonl").open()]
        preds = predictor.predict([r["text"] for r in rows])
        acc = sum(p["label"] == r["label"] for p, r in zip(preds, rows, strict=True)) / len(rows)
        assert record["final"][f"{prefix}/acc"] == pytest.approx(acc, abs=1e-6), split


def test_ema_of_bf16_weights_follows_them():
    """trainer.precision=bf16-true: the weights are bf16; an average kept in bf16 rounded each
    step of decay 0.999 away and stayed at the initial weights (validated, saved) forever."""
    from types import SimpleNamespace

    model = torch.nn.Linear(4, 4).to(torch.bfloat16)
    pl_module, master = SimpleNamespace(model=model), torch.ones(4, 4)
    with torch.no_grad():
        model.weight.copy_(master)
    ema = WeightAverage(decay=0.999)
    ema.on_fit_start(None, pl_module)
    expected = master.clone()
    for step in range(1, 1001):  # the weights move 1e-3 a step (an fp32 master copy)
        master += 1e-3
        with torch.no_grad():
            model.weight.copy_(master)
        ema.catch_up(SimpleNamespace(global_step=step, estimated_stepping_batches=1000),
                     pl_module, step)
        expected = 0.999 * expected + 0.001 * model.weight.float()
    torch.testing.assert_close(ema.shadow["weight"].float(), expected, atol=1e-4, rtol=0)
    ema._swap_in(pl_module)  # evaluated: the average, in the weights' own dtype
    assert model.weight.dtype == torch.bfloat16
    torch.testing.assert_close(model.weight.float(), expected, atol=1e-2, rtol=0)
