"""LP-FT head warm-up (``stage.head_warmup_steps``, ``ftlab.callbacks.HeadWarmup``) on a tiny
BERT: the first N optimiser steps move only the head, later steps the PEFT method's set."""

from __future__ import annotations

import pytest
import torch
from omegaconf import open_dict

import ftlab.callbacks
from ftlab.callbacks import HeadWarmup
from ftlab.errors import FtlabError
from ftlab.model.arch import head_parameters
from ftlab.pipeline import build_pipeline
from ftlab.run import run
from ftlab.store import read_json
from ftlab.validate import check_configs
from tests.conftest import masked_lm_folder, tiny_overrides


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def spy_steps(monkeypatch) -> list[tuple[int, dict, set[str]]]:
    """Record (global step, weights, head names) after every optimiser step of a run."""
    seen: list = []

    def after(self, trainer, pl_module, outputs, batch, batch_idx):
        model = pl_module.model
        head = {id(p) for p in head_parameters(model)}
        heads = {n for n, p in model.named_parameters() if id(p) in head}
        seen.append((trainer.global_step, snapshot(model), heads))

    monkeypatch.setattr(HeadWarmup, "on_train_batch_end", after, raising=False)
    return seen


def changed(before: dict, after: dict) -> set[str]:
    return {n for n in after if not torch.equal(before[n], after[n])}


def run_cfg(make_cfg, sentiment_dir, tmp_path, folder: str, *extra: str):
    cfg = make_cfg(tiny_overrides(sentiment_dir) + [
        "data.max_train_samples=96", "stage.optim.lr=1e-3", "stage.optim.warmup_ratio=0",
        f"cache.dir={tmp_path / 'cache'}", *extra])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / folder)
    return cfg


def test_warmup_moves_only_the_head_then_the_backbone(make_cfg, sentiment_dir, tmp_path,
                                                      monkeypatch):
    seen = spy_steps(monkeypatch)
    record = run(run_cfg(make_cfg, sentiment_dir, tmp_path, "full", "trainer.max_steps=5",
                         "stage.head_warmup_steps=3"))
    assert record["status"] == "ok", record
    assert [s for s, _, _ in seen] == [1, 2, 3, 4, 5]
    heads = seen[0][2]
    assert heads and all(n.startswith("classifier.") for n in heads)
    for (_, before, _), (step, after, _) in zip(seen, seen[1:], strict=False):
        moved = changed(before, after)
        if step <= 3:  # steps 2 and 3: still warming up (step 1: no snapshot before it)
            assert moved == heads, step  # the backbone bit-identical, the head learning
        else:
            assert moved - heads, step  # the backbone learns after the warm-up
    # the artefact is still the full trainable set (gradients dropped, requires_grad kept)
    assert record["stages"]["classify"]["params_trainable_pct"] == 100.0


def test_lora_warmup_trains_the_head_first_then_the_lora_weights(make_cfg, sentiment_dir,
                                                                 tmp_path, monkeypatch):
    seen = spy_steps(monkeypatch)
    record = run(run_cfg(make_cfg, sentiment_dir, tmp_path, "lora", "peft=lora",
                         "trainer.max_steps=4", "stage.head_warmup_steps=2"))
    assert record["status"] == "ok", record
    (_, w1, heads), (_, w2, _), (_, w3, _), (_, w4, _) = seen
    assert changed(w1, w2) and changed(w1, w2) <= heads  # step 2: the head only
    later = changed(w2, w3) | changed(w3, w4)
    assert any("lora_" in n for n in later)  # steps 3-4: LoRA weights too
    assert not {n for n in later if "lora_" not in n} - heads  # frozen base stays frozen


def test_mlm_warmup_trains_the_head_transform_not_the_tied_embeddings(
        make_cfg, sentiment_dir, tmp_path, monkeypatch):
    seen = spy_steps(monkeypatch)
    record = run(run_cfg(make_cfg, sentiment_dir, tmp_path, "mlm", "stage=mlm",
                         "stage.task.max_length=32", "trainer.max_steps=4",
                         "stage.head_warmup_steps=3"))
    assert record["status"] == "ok", record
    (_, w1, heads), (_, w2, _), (_, w3, _), (_, w4, _) = seen
    words = "bert.embeddings.word_embeddings.weight"
    assert any("transform" in n for n in heads) and words not in heads
    assert any(n.endswith("predictions.bias") for n in heads)
    for before, after in ((w1, w2), (w2, w3)):
        assert changed(before, after) and changed(before, after) <= heads
    assert words in changed(w3, w4)  # after the warm-up the (tied) embeddings learn


def test_a_warmup_share_scales_with_the_stage(make_cfg, sentiment_dir, tmp_path, monkeypatch):
    seen = spy_steps(monkeypatch)
    record = run(run_cfg(make_cfg, sentiment_dir, tmp_path, "share", "trainer.max_steps=6",
                         "stage.head_warmup_steps=0.5"))  # 3 of 6 steps
    assert record["status"] == "ok", record
    moved = [changed(a, b) - seen[0][2] for (_, a, _), (_, b, _) in zip(seen, seen[1:],
                                                                         strict=False)]
    assert [bool(m) for m in moved] == [False, False, True, True, True]


def test_resumed_run_past_the_warmup_does_not_freeze_again(make_cfg, sentiment_dir, tmp_path,
                                                           monkeypatch):
    base = ("trainer.max_steps=8", "stage.head_warmup_steps=3", "checkpoint.every_n_steps=4",
            "trainer.max_epochs=5")
    whole = run(run_cfg(make_cfg, sentiment_dir, tmp_path, "whole", *base))

    def crash(self, trainer, *args):
        if trainer.global_step == 6:
            raise RuntimeError("killed at step 6")

    monkeypatch.setattr(ftlab.callbacks.KeepBest, "on_train_batch_end", crash, raising=False)
    with pytest.raises(SystemExit):
        run(run_cfg(make_cfg, sentiment_dir, tmp_path, "killed", *base))
    monkeypatch.undo()
    seen = spy_steps(monkeypatch)
    resumed = run(run_cfg(make_cfg, sentiment_dir, tmp_path, "killed", *base))
    assert resumed["status"] == "ok", resumed
    assert resumed["stages"]["classify"]["resumed_from_step"] == 4
    (s5, w5, heads), (_, w6, _) = seen[:2]
    assert s5 == 5 and changed(w5, w6) - heads  # step 6 trains the backbone: no new warm-up
    for k, v in whole["final"].items():  # and ends where the uninterrupted run ends
        assert resumed["final"][k] == pytest.approx(v, abs=1e-6), k


def test_warmup_as_long_as_the_stage_is_refused(make_cfg, sentiment_dir, tmp_path, capsys):
    cfg = run_cfg(make_cfg, sentiment_dir, tmp_path, "r", "trainer.max_steps=5",
                  "stage.head_warmup_steps=5")
    with pytest.raises(FtlabError, match=r"head_warmup_steps=5 is not below.*max_steps=5"):
        check_configs(build_pipeline(cfg))
    # an epoch budget: refused once the steps are known (96 rows / 16 = 6 steps), before any
    cfg = run_cfg(make_cfg, sentiment_dir, tmp_path, "e", "stage.head_warmup_steps=6")
    with pytest.raises(SystemExit):
        run(cfg)
    assert "head_warmup_steps=6 is not below its 6 optimiser steps" in capsys.readouterr().err
    with pytest.raises(FtlabError, match="whole number"):
        build_pipeline(run_cfg(make_cfg, sentiment_dir, tmp_path, "f",
                               "stage.head_warmup_steps=2.5"))


@pytest.mark.parametrize(("extra", "key"), [
    (["stage=mlm", "stage.task.max_length=32", "stage.head_warmup_steps=2"], "stage"),
    # the shape of `pipeline=tapt_task peft=lora` (TAPT warms up the MLM head)
    (["pipeline=tiny", "pipeline.stages.tapt.head_warmup_steps=0.5"], "pipeline.stages.tapt")])
def test_a_frozen_head_cannot_warm_up(extra, key, make_cfg, sentiment_dir, tmp_path, capsys):
    """LoRA on a masked LM keeps a checkpoint's own MLM head frozen (a head created fresh, as
    MiniLM's, trains): refused while checking the run (it was refused only as the stage
    started, after its data and model had loaded)."""
    saved = masked_lm_folder(tmp_path / "bert_mlm", make_cfg(tiny_overrides(sentiment_dir)).model)
    with pytest.raises(SystemExit):
        run(run_cfg(make_cfg, sentiment_dir, tmp_path, "lora_mlm", "peft=lora",
                    "trainer.max_steps=4", *saved, *extra))
    err = capsys.readouterr().err
    assert "no trainable head" in err and f"set {key}.head_warmup_steps=0" in err, err
    record = read_json(tmp_path / "lora_mlm" / "metrics.json")
    assert "current_stage" not in record  # no stage began


def test_shipped_pipelines_warm_up_fresh_heads_only(make_cfg, sentiment_dir):
    stages = {s.name: s for s in build_pipeline(make_cfg(
        tiny_overrides(sentiment_dir) + ["pipeline=dapt_tapt_task"]))}
    assert stages["dapt"].head_warmup_steps > 0  # MiniLM's MLM head is created fresh
    assert stages["tapt"].head_warmup_steps == 0  # carries DAPT's trained MLM head
    assert stages["task"].carry == "encoder" and stages["task"].head_warmup_steps > 0


def test_warmup_enters_the_stage_key_only_when_on(make_cfg, sentiment_dir):
    from ftlab.stage_keys import stage_key

    def key(*extra: str) -> str:
        (stage,) = build_pipeline(make_cfg(tiny_overrides(sentiment_dir) + list(extra)))
        return stage_key(stage, None)

    off = key()
    assert key("stage.head_warmup_steps=0") == off  # off: the key of a run before the field
    assert key("stage.head_warmup_steps=3") not in (off, key("stage.head_warmup_steps=0.1"))
