"""Per-step host work and fixed batch shapes, checked on the CPU: logging only on the steps
Lightning writes leaves the weights and the logged rows as they were, length buckets bound the
batch widths without changing the rows, and trainer.compile takes a mode."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from ftlab.data.batching import PadCollator
from ftlab.pipeline import build_pipeline
from ftlab.run import run
from ftlab.store import load_tensors
from tests.conftest import tiny_overrides


def _train(make_cfg, sentiment_dir, name: str, *extra: str) -> tuple[dict, dict[int, float]]:
    """(trained weights, {step: train/loss} from the CSV log) of a deterministic tiny run."""
    from omegaconf import open_dict

    overrides = [o for o in tiny_overrides(sentiment_dir) if o != "logger=none"]
    cfg = make_cfg([*overrides, "logger=csv", "trainer.max_steps=24", "trainer.max_epochs=3",
                    "cache.stages=off", "trainer.deterministic=true", "seed=4",
                    "stage.optim.lr=3e-3", *extra])
    with open_dict(cfg):
        cfg.paths.output_dir = f"{cfg.paths.output_dir}_{name}"
    run(cfg)
    stage_dir = Path(cfg.paths.output_dir) / "classify"
    rows = csv.DictReader((next(stage_dir.glob("csv/*/metrics.csv"))).open())
    losses = {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}
    return load_tensors(stage_dir / "trainable.safetensors"), losses


def test_logging_every_n_steps_keeps_weights_and_logged_losses_bit_identical(
        make_cfg, sentiment_dir, monkeypatch):
    """Logged every step (progress-bar path) against logged on Lightning's write steps only:
    the same weights bit for bit, and each written row holds that step's loss exactly."""
    from ftlab.module import FineTuneModule

    every, every_losses = _train(make_cfg, sentiment_dir, "every", "trainer.log_every_n_steps=1",
                                 "trainer.check_finite_every_n_steps=1")
    calls = []
    real = FineTuneModule.log
    monkeypatch.setattr(FineTuneModule, "log",
                        lambda self, name, *a, **k: (calls.append(name), real(self, name, *a,
                                                                             **k))[1])
    sparse, sparse_losses = _train(make_cfg, sentiment_dir, "sparse",
                                   "trainer.log_every_n_steps=5",
                                   "trainer.check_finite_every_n_steps=7")
    assert set(every) == set(sparse)
    assert all(torch.equal(every[k], sparse[k]) for k in every)
    assert len(every_losses) == 24 and sparse_losses  # steps 0..23; every 5th written
    assert sparse_losses == {s: every_losses[s] for s in sparse_losses}
    # self.log ran on the written steps only (plus validation/test), not on all 24
    assert calls.count("train/loss") == len(sparse_losses) < 24


def test_buckets_bound_the_widths_and_change_only_the_padding(make_cfg, sentiment_dir):
    from ftlab.build import StageBuilder
    from ftlab.data.datamodule import TextDataModule

    buckets = [16, 24, 48]
    stage = build_pipeline(make_cfg([*tiny_overrides(sentiment_dir),
                                     f"trainer.pad_to_buckets=[{','.join(map(str, buckets))}]"]
                                    ))[0]
    assert stage.runtime.pad_to_buckets == buckets
    builder = StageBuilder()
    task, raw = builder.task(stage), builder.raw(stage)
    dm = TextDataModule(raw.splits, task, 0, batch_size=8, seed=1,
                        pad_to_buckets=stage.runtime.pad_to_buckets)
    plain = TextDataModule(raw.splits, task, 0, batch_size=8, seed=1)
    assert max(dm.splits["train"]["length"]) <= max(buckets)  # the data fits the buckets
    pad = {"input_ids": 0, "attention_mask": 0, "token_type_ids": 0}
    widths = set()
    for got, ref in zip(dm.train_dataloader(), plain.train_dataloader(), strict=True):
        width, own = got["input_ids"].shape[1], ref["input_ids"].shape[1]
        widths.add(width)
        assert width == min(b for b in buckets if b >= own)  # the smallest bucket that holds it
        assert got.keys() == ref.keys()
        for key, value in got.items():
            if value.ndim == 1:  # labels
                assert torch.equal(value, ref[key])
                continue
            assert torch.equal(value[:, :own], ref[key])  # the same rows, padded further
            assert (value[:, own:] == pad[key]).all()
    assert widths <= set(buckets) and len(widths) > 1


def test_a_batch_longer_than_every_bucket_falls_back_to_the_multiple():
    rows = [{"input_ids": [5] * 21, "attention_mask": [1] * 21, "label": 1}]
    collate = PadCollator(pad_id=0, multiple_of=8, buckets=[16, 8])
    assert collate(rows)["input_ids"].shape == (1, 24)
    assert collate([{**rows[0], "input_ids": [5] * 9}])["input_ids"].shape == (1, 16)
    assert collate([{**rows[0], "input_ids": [5] * 8}])["input_ids"].shape == (1, 8)


@pytest.mark.parametrize("value, mode", [("reduce-overhead", "reduce-overhead"),
                                         ("true", "default"), ("max-autotune", "max-autotune")])
def test_compile_takes_a_mode(make_cfg, sentiment_dir, monkeypatch, value, mode):
    seen = []
    monkeypatch.setattr(torch.nn.Module, "compile",
                        lambda self, *a, **k: seen.append(k.get("mode")))
    cfg = make_cfg([*tiny_overrides(sentiment_dir), "trainer.max_steps=1", "cache.stages=off",
                    f"trainer.compile={value}", "stage.save_artefact=false"])
    assert run(cfg)["status"] == "ok"
    assert seen == [mode]


def test_an_unknown_compile_mode_names_the_choices(make_cfg, sentiment_dir):
    from ftlab.errors import FtlabError

    cfg = make_cfg([*tiny_overrides(sentiment_dir), "trainer.compile=fastest"])
    with pytest.raises(FtlabError, match="reduce-overhead"):
        build_pipeline(cfg)


def _bar_updates(make_cfg, sentiment_dir, monkeypatch, name: str, interval: float):
    """{bar: [(epoch, batch count shown), ...]} of a tiny 2-epoch run under the default bar."""
    from lightning.pytorch.callbacks import RichProgressBar
    from omegaconf import open_dict

    shown: dict[str, list[tuple[int, int]]] = {}
    real = RichProgressBar._update

    def spy(self, bar_id, current, *a, **k):
        bar = self.trainer.state.stage.value  # train | validate | test
        shown.setdefault(bar, []).append((self.trainer.current_epoch, current))
        return real(self, bar_id, current, *a, **k)

    overrides = [o for o in tiny_overrides(sentiment_dir)
                 if o not in ("callbacks=none", "trainer.enable_progress_bar=false")]
    cfg = make_cfg([*overrides, "callbacks=default", f"callbacks.progress.interval={interval}",
                    "trainer.max_epochs=2", "cache.stages=off", "stage.save_artefact=false",
                    "trainer.num_sanity_val_steps=0", "stage.batch_size=8",
                    "stage.eval_batch_size=8"])
    with open_dict(cfg):
        cfg.paths.output_dir = f"{cfg.paths.output_dir}_{name}"
    with monkeypatch.context() as patch:
        patch.setattr(RichProgressBar, "_update", spy)
        run(cfg)  # (whether the tiny model beats its baseline does not matter here)
    return shown


def test_the_progress_bar_redraws_at_most_every_interval_and_ends_at_each_total(
        make_cfg, sentiment_dir, monkeypatch):
    """Lightning's rich bar redraws after every batch (host time per step); ftlab's draws at
    most every `interval` seconds, and always the last batch of each loop."""
    every = _bar_updates(make_cfg, sentiment_dir, monkeypatch, "every", 0.0)
    rare = _bar_updates(make_cfg, sentiment_dir, monkeypatch, "rare", 3600.0)
    for bar in ("train", "validate", "test"):
        epochs = sorted({e for e, _ in every[bar]})
        for epoch in epochs:
            counts = [c for e, c in every[bar] if e == epoch]
            assert counts == list(range(1, len(counts) + 1)) and len(counts) > 2, bar
            # an hour's interval: only each loop's last batch (the bar ends full), and the
            # run's very first
            first = [1] if bar == "train" and epoch == 0 else []
            assert [c for e, c in rare[bar] if e == epoch] == [*first, counts[-1]], bar


def test_a_disabled_progress_bar_lets_validation_run(make_cfg, sentiment_dir, monkeypatch):
    """Lightning disables the bar on every rank but zero; the throttled evaluation hooks read
    the disabled bar's batch count, which asserts, so rank 1 of the README's CPU check
    (`ftlab trainer=ddp trainer.accelerator=cpu trainer.devices=2 ...`) died in its first
    validation and took the run with it."""
    from ftlab.progress import ProgressBar

    setup = ProgressBar.setup

    def as_rank_one(self, trainer, pl_module, stage):
        setup(self, trainer, pl_module, stage)
        self.disable()  # what Lightning's setup does where trainer.is_global_zero is False

    monkeypatch.setattr(ProgressBar, "setup", as_rank_one)
    overrides = [o for o in tiny_overrides(sentiment_dir)
                 if o not in ("callbacks=none", "trainer.enable_progress_bar=false")]
    record = run(make_cfg([*overrides, "callbacks=default", "trainer.max_steps=3",
                           "stage.batch_size=8", "cache.stages=off"]))
    assert record["status"] == "ok", record.get("error")
    assert "val/acc" in record["final"] and "test/acc" in record["final"]
