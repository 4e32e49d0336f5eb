"""Recipe presets (experiment=mosbach, experiment=reinit) resolve into every stage and run."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from ftlab.build import StageBuilder
from ftlab.model.arch import top_stack
from ftlab.run import run
from tests.conftest import tiny_overrides
from tests.test_resolved import resolve


def test_mosbach_sets_the_papers_optimiser_and_budget_in_every_stage(make_cfg, sentiment_dir):
    stages = resolve(make_cfg, tiny_overrides(sentiment_dir) + ["experiment=mosbach",
                                                                "pipeline=tiny"])
    for stage in stages.values():  # the tiny pipeline's TAPT stage has its own lr 1e-3: beaten
        assert stage.optim.lr == pytest.approx(2e-5) and stage.optim.warmup_ratio == 0.1
        assert stage.trainer["max_epochs"] == 20 and stage.batch_size == 16


def test_reinit_re_initialises_the_top_layers_and_nothing_below(make_cfg, sentiment_dir):
    base = tiny_overrides(sentiment_dir)
    reinit = resolve(make_cfg, [*base, "experiment=reinit", "peft.reinit_top=1"])["classify"]
    plain = resolve(make_cfg, base)["classify"]
    assert reinit.peft["reinit_top"] == 1
    built = {}
    for name, stage in (("plain", plain), ("reinit", reinit)):
        L.seed_everything(stage.seed, verbose=False)  # the same "pre-trained" tiny weights
        built[name] = StageBuilder().model(stage)[0]
    top = [dict(layer.named_parameters()) for layer in top_stack(built["plain"])]
    new = [dict(layer.named_parameters()) for layer in top_stack(built["reinit"])]
    assert all(torch.equal(p, new[0][k]) for k, p in top[0].items())  # the lower layer kept
    changed = [k for k, p in top[-1].items() if not torch.equal(p, new[-1][k])]
    assert any(k.endswith("weight") and "LayerNorm" not in k for k in changed), changed


def test_a_tiny_run_with_reinit_trains_and_records_it(make_cfg, sentiment_dir):
    cfg = make_cfg(tiny_overrides(sentiment_dir) + ["experiment=reinit", "trainer.max_steps=3"])
    record = run(cfg)
    assert record["status"] == "ok" and record["stages"]["classify"]["global_steps"] == 3
    card = (Path(cfg.paths.output_dir) / "classify" / "card.json").read_text()
    assert '"reinit_top": 2' in json.dumps(json.loads(card))  # the preset's K reached the stage
