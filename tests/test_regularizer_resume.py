"""Regularisers across a kill and resume: a stage killed midway ends where an uninterrupted run
ends, with the regulariser's own state (SMART's momentum teacher) carried in the checkpoint."""

from __future__ import annotations

import pytest

from tests.test_resume import killed_and_resumed, run_maker, same_last_weights

#: as tests/test_resume.py: checkpoints at steps 4, 7 (epoch end), 8; killed at 10; resumed
STEPS = ["data.max_train_samples=112", "trainer.max_steps=12", "trainer.max_epochs=5",
         "stage.optim.lr=1e-3", "checkpoint.every_n_steps=4"]


@pytest.fixture
def tiny_run(make_cfg, sentiment_dir, tmp_path):
    return run_maker(make_cfg, sentiment_dir, tmp_path, STEPS)


@pytest.mark.slow
def test_smart_resumes_with_its_teacher_and_ends_like_an_uninterrupted_run(
        tiny_run, monkeypatch, tmp_path):
    # beta 0.9, mu 50: the teacher lags the weights and pulls hard, so a teacher restarted
    # from the resumed weights (not the one saved) changes the Bregman term and the weights
    smart = ["regularizer=smart", "regularizer.beta=0.9", "regularizer.mu=50",
             "regularizer.lambda_s=0",
             "checkpoint.keep=true"]
    killed_and_resumed(tiny_run, monkeypatch, *smart)
    same_last_weights(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("peft", ["full", "lora"])
def test_mixout_resumes_with_its_targets_and_ends_like_an_uninterrupted_run(
        tiny_run, monkeypatch, tmp_path, peft):
    # the targets are not saved: a resumed stage rebuilds them (the pre-trained weights; LoRA's
    # seeded initial A/B) before the checkpoint's weights are loaded
    mixout = ["regularizer=mixout", "regularizer.p=0.5", f"peft={peft}", "checkpoint.keep=true"]
    killed_and_resumed(tiny_run, monkeypatch, *mixout)
    same_last_weights(tmp_path)
