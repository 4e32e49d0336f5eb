"""GPU-facing settings, checked on the CPU: padded widths, loader options, the finite-loss check
without a per-step host sync, LR scaling, trainer=gpu's composition and batch_size=auto."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from ftlab.data.batching import PadCollator
from ftlab.pipeline import build_pipeline
from ftlab.run import run
from tests.conftest import tiny_overrides

FAST = ["trainer.max_steps=4", "cache.stages=off", "stage.eval_batch_size=64"]


def test_pad_to_multiple_of_rounds_every_width_up(make_cfg, sentiment_dir):
    from ftlab.build import StageBuilder
    from ftlab.data.datamodule import TextDataModule

    stage = build_pipeline(make_cfg([*tiny_overrides(sentiment_dir),
                                     "trainer.pad_to_multiple_of=16"]))[0]
    builder = StageBuilder()
    task, raw = builder.task(stage), builder.raw(stage)
    rt = stage.runtime
    dm = TextDataModule(raw.splits, task, 0, batch_size=8, seed=1,
                        pad_to_multiple_of=rt.pad_to_multiple_of)
    widths = {b["input_ids"].shape[1] for b in dm.train_dataloader()}
    longest = {int(b["attention_mask"].sum(1).max()) for b in dm.train_dataloader()}
    assert widths and all(w % 16 == 0 for w in widths)
    assert len(widths) < len(longest)  # fewer distinct shapes than distinct longest rows
    plain = TextDataModule(raw.splits, task, 0, batch_size=8, seed=1)
    assert any(b["input_ids"].shape[1] % 16 for b in plain.train_dataloader())


def test_collator_pads_masks_and_labels_to_the_multiple():
    rows = [{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "label": 1},
            {"input_ids": [5], "attention_mask": [1], "label": 0}]
    batch = PadCollator(pad_id=0, multiple_of=8)(rows)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (2, 8)
    assert batch["attention_mask"].sum().item() == 4 and batch["label"].tolist() == [1, 0]


def test_loader_options_reach_the_dataloaders(make_cfg, sentiment_dir):
    from ftlab.build import StageBuilder
    from ftlab.data.datamodule import TextDataModule

    stage = build_pipeline(make_cfg(tiny_overrides(sentiment_dir)))[0]
    builder = StageBuilder()
    task, raw = builder.task(stage), builder.raw(stage)
    dm = TextDataModule(raw.splits, task, 0, batch_size=8, num_workers=2, pin_memory=True,
                        persistent_workers=True)
    loader = dm.train_dataloader()
    assert (loader.num_workers, loader.pin_memory, loader.persistent_workers) == (2, True, True)
    off = TextDataModule(raw.splits, task, 0, batch_size=8, persistent_workers=True)
    assert off.val_dataloader().persistent_workers is False  # needs workers to mean anything


def test_trainer_gpu_sets_hardware_keys_batch_and_lr_rule_and_lightning_never_sees_them(
        make_cfg, sentiment_dir):
    cfg = make_cfg(["trainer=gpu"])
    stage = build_pipeline(cfg)[0]
    assert stage.trainer["precision"] == "bf16-mixed" and stage.trainer["accelerator"] == "gpu"
    assert "num_workers" not in stage.trainer and "pad_to_multiple_of" not in stage.trainer
    assert stage.runtime.num_workers > 0 and stage.runtime.pin_memory
    assert stage.runtime.pad_to_multiple_of in (8, 16)
    assert stage.runtime.check_finite_every_n_steps > 1
    assert stage.batch_size > 32 and stage.optim.lr_scaling == "sqrt"
    ddp = build_pipeline(make_cfg(["trainer=ddp", "stage.batch_size=64"]))[0]
    assert ddp.trainer["strategy"] == "ddp" and ddp.batch_size == 64
    assert build_pipeline(make_cfg([]))[0].runtime.num_workers == 0  # the CPU default


def test_runtime_keys_do_not_change_the_stage_cache_key(make_cfg, sentiment_dir):
    from ftlab.stage_keys import stage_key

    base = build_pipeline(make_cfg(tiny_overrides(sentiment_dir)))[0]
    other = build_pipeline(make_cfg([*tiny_overrides(sentiment_dir), "trainer.num_workers=2",
                                     "trainer.pad_to_multiple_of=8"]))[0]
    assert stage_key(base, None) == stage_key(other, None)


@pytest.mark.parametrize("rule, expected", [("none", 1e-4), ("linear", 4e-4), ("sqrt", 2e-4)])
def test_lr_scaling_rules(rule, expected):
    from ftlab.runtime import scaled_lr

    assert math.isclose(scaled_lr(1e-4, rule, 128, 32), expected)
    assert math.isclose(scaled_lr(1e-4, rule, 32, 32), 1e-4)  # the reference batch: unchanged


def test_a_run_records_the_scaled_lr_batch_and_throughput(make_cfg, sentiment_dir):
    cfg = make_cfg([*tiny_overrides(sentiment_dir), *FAST, "stage.optim.lr=1e-3",
                    "stage.optim.lr_scaling=linear", "stage.optim.reference_batch=8"])
    record = run(cfg)
    info = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())[
        "stages"]["classify"]
    assert record["status"] == "ok"
    assert math.isclose(info["lr"], 2e-3) and info["batch_size"] == 16  # 1e-3 x 16 / 8
    assert info["train_samples_per_s"] > 0 and info["train_tokens_per_s"] > info[
        "train_samples_per_s"]


def _nan_at(step: int, monkeypatch) -> None:
    from ftlab.regularizers.none import NoRegularizer

    real = NoRegularizer.training_loss

    def fake(self, model, batch, task):
        out = real(self, model, batch, task)
        if fake.calls == step:
            out.loss = out.loss * float("nan")
        fake.calls += 1
        return out

    fake.calls = 0
    monkeypatch.setattr(NoRegularizer, "training_loss", fake)


def test_finite_check_every_n_steps_reports_the_exact_step_without_a_sync_per_step(
        make_cfg, sentiment_dir, monkeypatch):
    """The loss turns NaN at step 2; checked every 50 steps, the run still stops (at the
    epoch's end at the latest) naming step 2, and reads the device only at the checks."""
    from ftlab.module import FineTuneModule

    reads = []
    real = FineTuneModule.raise_if_diverged
    monkeypatch.setattr(FineTuneModule, "raise_if_diverged",
                        lambda self: (reads.append(self.global_step), real(self))[1])
    _nan_at(2, monkeypatch)
    cfg = make_cfg([*tiny_overrides(sentiment_dir), "trainer.max_steps=6", "cache.stages=off",
                    "trainer.check_finite_every_n_steps=50"])
    with pytest.raises(Exception, match=r"training loss became nan at step 2"):
        _fit_only(cfg)
    assert len(reads) <= 2  # epoch/train end only, not one per step


def _fit_only(cfg):
    from ftlab.build import StageBuilder
    from ftlab.stage import RunContext, run_stage

    stage = build_pipeline(cfg)[0]
    return run_stage(stage, StageBuilder(), RunContext(Path(cfg.paths.output_dir)), {})


def test_finite_check_every_step_stops_at_once(make_cfg, sentiment_dir, monkeypatch):
    from ftlab.module import FineTuneModule

    steps = []
    real = FineTuneModule.training_step
    monkeypatch.setattr(FineTuneModule, "training_step",
                        lambda self, b, i: (steps.append(i), real(self, b, i))[1])
    _nan_at(1, monkeypatch)
    cfg = make_cfg([*tiny_overrides(sentiment_dir), "trainer.max_steps=6", "cache.stages=off",
                    "trainer.check_finite_every_n_steps=1"])
    with pytest.raises(Exception, match=r"training loss became nan at step 1"):
        _fit_only(cfg)
    assert len(steps) == 2


def test_batch_size_auto_searches_and_records_the_batch(make_cfg, sentiment_dir):
    cfg = make_cfg([*tiny_overrides(sentiment_dir), *FAST, "stage.batch_size=auto",
                    "trainer.auto_batch_init=4", "trainer.auto_batch_max_trials=3"])
    record = run(cfg)
    info = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())[
        "stages"]["classify"]
    assert record["status"] == "ok", record.get("error")
    # no memory limit on the CPU: 4 doubled while trials remain (4 -> 8 -> 16)
    assert info["batch_size_auto"] is True and info["batch_size"] == 16
    assert info["global_steps"] == 4


def test_batch_size_auto_leaves_the_random_streams_as_it_found_them(make_cfg, sentiment_dir,
                                                                   monkeypatch, tmp_path):
    """The search's trial steps draw random numbers (dropout); they are put back, so the stage
    trains as a run given the found batch size directly (val/loss was 1.2e-5 off before)."""
    import random

    import numpy as np
    from omegaconf import open_dict

    import ftlab.autobatch

    def states():
        return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()

    seen = []
    search = ftlab.autobatch.find_batch_size

    def watched(*args, **kwargs):
        before = states()
        found = search(*args, **kwargs)
        seen.append((before, states()))
        return found

    def train(batch_size: str) -> dict:
        # checkpointing off: with it the tuner's restore of its own checkpoint happens to set
        # the states back through RngState at train start
        cfg = make_cfg([*tiny_overrides(sentiment_dir), *FAST, "trainer.auto_batch_init=4",
                        "trainer.auto_batch_max_trials=3", f"stage.batch_size={batch_size}",
                        "checkpoint.enabled=false"])
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / batch_size)
        return run(cfg)

    monkeypatch.setattr(ftlab.autobatch, "find_batch_size", watched)
    auto = train("auto")  # finds 16 (4 -> 8 -> 16)
    (before, after), = seen
    assert torch.equal(before[0], after[0]) and (before[1] == after[1]).all()
    assert before[2] == after[2]
    direct = train("16")
    assert auto["stages"]["classify"]["batch_size"] == 16
    for key, value in direct["final"].items():
        assert auto["final"][key] == pytest.approx(value, abs=1e-6), key


def test_batch_size_auto_on_several_devices_is_refused_before_any_stage_trains(
        make_cfg, sentiment_dir):
    """Only the pipeline's second stage searches: the up-front check refuses it, not
    ftlab.autobatch after the first stage has trained."""
    from ftlab.errors import FtlabError
    from ftlab.validate import check_configs

    stages = build_pipeline(make_cfg([
        *tiny_overrides(sentiment_dir), "pipeline=tiny", "trainer=ddp",
        "trainer.accelerator=cpu", "trainer.devices=2", "pipeline.stages.task.batch_size=auto"]))
    with pytest.raises(FtlabError, match=r"stage 'task': batch_size=auto searches on one device"):
        check_configs(stages)


@pytest.mark.parametrize("value", ["0", "big", "-3"])
def test_a_bad_batch_size_names_the_fix(make_cfg, sentiment_dir, value):
    from ftlab.errors import FtlabError

    with pytest.raises(FtlabError, match=re.escape("or auto")):
        build_pipeline(make_cfg([*tiny_overrides(sentiment_dir), f"stage.batch_size={value}"]))


def test_fsdp_clips_the_norm_of_the_whole_model_through_its_root(tmp_path):
    """Lightning's FSDP precision plugin refuses norm clipping; ftlab's module clips through
    the sharded root's own clip_grad_norm_ (one process, gloo, on the CPU)."""
    from types import SimpleNamespace

    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel

    from ftlab.module import FineTuneModule

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0,
                            world_size=1)
    try:
        torch.manual_seed(0)
        root = FullyShardedDataParallel(torch.nn.Linear(16, 16), device_id=torch.device("cpu"))
        (root(torch.randn(4, 16)) * 1000).sum().backward()
        norm = lambda: torch.linalg.vector_norm(  # noqa: E731
            torch.stack([p.grad.norm() for p in root.parameters()]))
        assert norm() > 10
        stub = SimpleNamespace(_trainer=object(), trainer=SimpleNamespace(model=root),
                               _fsdp_root=None)  # the module looks the root up once per fit
        FineTuneModule.configure_gradient_clipping(stub, None, gradient_clip_val=1.0,
                                                   gradient_clip_algorithm="norm")
        assert norm() == pytest.approx(1.0, rel=1e-4)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("mode, marks", [("reduce-overhead", True), ("max-autotune", True),
                                         ("default", False), (False, False)])
def test_cuda_graph_modes_mark_every_train_and_eval_step(mode, marks, monkeypatch):
    """Under CUDA graphs each step is marked as a new iteration of the graph trees (evaluation
    steps have no backward that would end one). The mark does not keep outputs alive: the
    GPU check's "overwritten by a subsequent run" was gradient accumulation (ftlab/compiling.py)."""
    import lightning as L

    from ftlab.module import FineTuneModule
    from ftlab.optim import OptimSpec
    from ftlab.regularizers.none import NoRegularizer
    from ftlab.runtime import RuntimeSpec
    from ftlab.tasks.classify import Classify
    from tests.test_peft_contract import batch, tiny_model

    calls = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: calls.append(1))
    rt = RuntimeSpec(compile=mode)
    assert rt.cudagraphs() is marks
    task = Classify()
    task.labels = ["neg", "pos"]
    module = FineTuneModule(tiny_model(), task, NoRegularizer(), OptimSpec(lr=1e-3),
                            cudagraphs=rt.cudagraphs())
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, limit_val_batches=2,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0)
    loader = torch.utils.data.DataLoader([batch(i) for i in range(3)], batch_size=None)
    trainer.fit(module, loader, loader)
    assert len(calls) == (3 + 2 if marks else 0)  # 3 training steps, 2 validation batches



@pytest.mark.parametrize(("trainer", "processes", "several"), [
    ({"devices": "0,"}, 1, False),  # Lightning: GPU 0 alone
    ({"devices": "2"}, 2, True),
    ({"devices": [0]}, 1, False),
    ({"devices": "0,1"}, 2, True),
    ({"devices": 1, "num_nodes": 2}, 1, True),
    ({"devices": "-1", "accelerator": "cpu"}, 1, False),  # Lightning refuses -1 on the CPU
    ({"devices": "-1", "accelerator": "gpu"}, None, True),  # every GPU this machine has
    ({"devices": "auto", "accelerator": "gpu"}, None, True),
    ({"devices": "auto", "accelerator": "cpu"}, 1, False),
    ({"devices": 1, "strategy": "ddp"}, 1, True),
])
def test_the_pre_checks_and_the_thread_count_read_devices_alike(trainer, processes, several):
    """One parser of trainer.devices: the processes a job starts (threads) and whether the
    pre-checks see several devices agree, as Lightning reads the value."""
    from ftlab.device_checks import several_devices
    from ftlab.threads import processes_per_machine

    if processes is not None:
        assert processes_per_machine(trainer) == processes
    assert several_devices(trainer) is several


def test_devices_listed_in_the_job_config_count_as_listed():
    """``set_threads`` gets the job's ``cfg.trainer`` (a DictConfig): ``trainer.devices=[0,1]``
    is a ListConfig there, which was read as one process (every rank then took all cores)."""
    from omegaconf import OmegaConf

    from ftlab.device_checks import several_devices
    from ftlab.threads import processes_per_machine

    trainer = OmegaConf.create({"devices": [0, 1], "accelerator": "gpu"})
    assert processes_per_machine(trainer) == 2
    assert several_devices(trainer)
