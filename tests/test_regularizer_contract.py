"""The contract every conf/regularizer/*.yaml keeps (tiny BERT from a config, no downloads).

For every regulariser (new YAML files are picked up with no test edits): it composes with
``peft=full``, ``lora`` and ``adapter_pfeiffer``, its training loss reaches exactly the
trainable parameters, evaluation is the plain model, it is applied on the meta device as the
stage's validation does, a task without logits gets a clear error or works, and a tiny
end-to-end run learns and records its metrics. Then each known regulariser's own term is
checked against its definition (R3F/SMART: a non-negative KL term, zero without noise or
weight, linear in its weight; SMART's teacher; FreeLB: the parameter gradient is the mean over
its K perturbations; Mixout: unbiased in training, exact in evaluation).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ftlab.cli import CONFIG_DIR
from ftlab.config import instantiate_checked
from ftlab.errors import FtlabError
from ftlab.model.backbone import ModelSpec, load_model
from ftlab.run import run
from ftlab.tasks.base import TaskOutput
from ftlab.tasks.classify import Classify
from tests.conftest import tiny_overrides
from tests.test_peft_contract import batch, logits, method, model_config, tiny_model

REGULARIZERS = sorted(p.stem for p in (Path(CONFIG_DIR) / "regularizer").glob("*.yaml"))
PEFTS = ("full", "lora", "adapter_pfeiffer")
#: scaled to the tiny model in the end-to-end run: its random embeddings have std 0.02 and
#: FreeLB's BERT-scale steps (0.1, even 0.01) keep it at the majority class for 96 steps; a
#: random "pre-trained" backbone is what mixout holds the weights to (at p=0.9 it barely moves)
TINY_RUN = {"freelb": ["regularizer.adv_lr=1e-3", "regularizer.init_mag=1e-3"],
            "mixout": ["regularizer.p=0.5"]}


def regularizer(name: str, **extra):
    node = OmegaConf.merge(OmegaConf.load(Path(CONFIG_DIR) / "regularizer" / f"{name}.yaml"),
                           extra)
    return instantiate_checked(node, f"regularizer={name}")


class TinyClassify(Classify):
    """Classification over the tiny batches' two labels (no data to bind)."""

    def __init__(self) -> None:
        super().__init__()
        self.labels = ["neg", "pos"]


class NoLogits(TinyClassify):
    """A task whose output has a loss but no logits (as masked LM)."""

    def forward(self, model, batch):
        return TaskOutput(super().forward(model, batch).loss)


TASK = TinyClassify()


def prepared(name: str, peft: str = "full", seed: int = 0, **extra):
    reg = regularizer(name, **extra)
    return reg, reg.apply(method(peft).apply(tiny_model(seed)))


def trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


# -- every regulariser -------------------------------------------------------------------------

@pytest.mark.parametrize("peft", PEFTS)
@pytest.mark.parametrize("name", REGULARIZERS)
def test_training_loss_reaches_exactly_the_trainable_parameters(name, peft):
    reg, model = prepared(name, peft)
    model.train()
    torch.manual_seed(0)
    out = reg.training_loss(model, batch(0), TASK)
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert out.logits is not None and out.logits.shape == (8, 2)
    out.loss.backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    assert got == set(trainable(model)), f"{name} with {peft}: gradients reach {got ^ set(trainable(model))}"
    assert all(torch.isfinite(p.grad).all() for p in trainable(model).values())


@pytest.mark.parametrize("peft", PEFTS)
@pytest.mark.parametrize("name", REGULARIZERS)
def test_evaluation_is_the_plain_model(name, peft):
    plain = method(peft).apply(tiny_model(0))
    _, model = prepared(name, peft)
    torch.testing.assert_close(logits(model), logits(plain), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", REGULARIZERS)
def test_applies_on_the_meta_device(name):
    """As the stage's validation does: a weightless model, the PEFT method, then this."""
    with torch.device("meta"):
        model = method("full").apply(tiny_model(0))
        regularizer(name).apply(model)


@pytest.mark.parametrize("name", REGULARIZERS)
def test_a_task_without_logits_gets_a_clear_error_or_works(name):
    """Apply on a masked-LM model and a training step of a logit-less task agree: both stop
    with an error naming the tasks it supports, or both work."""
    from transformers import AutoModelForMaskedLM

    mlm = load_model(ModelSpec(config=model_config("bert")), AutoModelForMaskedLM)
    reg = regularizer(name)
    try:
        reg.apply(mlm)
        refused = None
    except FtlabError as err:
        refused = err
    _, model = prepared(name)
    model.train()
    if refused is None:
        assert torch.isfinite(reg.training_loss(model, batch(0), NoLogits()).loss)
        return
    assert "logits" in refused.problem and "stage=classify" in refused.fix
    with pytest.raises(FtlabError, match="logits") as err:
        reg.training_loss(model, batch(0), NoLogits())
    assert "stage=classify" in err.value.fix


def train_losses(run_dir: Path) -> list[float]:
    (path,) = (run_dir / "classify" / "csv").rglob("metrics.csv")
    return [float(r["train/loss"]) for r in csv.DictReader(path.open()) if r.get("train/loss")]


@pytest.mark.parametrize("name", REGULARIZERS)
def test_a_tiny_run_learns_and_records_its_metrics(name, make_cfg, sentiment_dir):
    cfg = make_cfg([*tiny_overrides(sentiment_dir), f"regularizer={name}", "logger=csv",
                    "trainer.log_every_n_steps=1", "stage.trainer.max_epochs=6",
                    "stage.optim.lr=3e-3", "seed=3", *TINY_RUN.get(name, [])])
    record = run(cfg)
    assert record["status"] == "ok", record
    final = record["final"]
    assert final["val/acc"] > final["val/baseline_acc"] + 0.1, final
    assert {"test/acc", "test/f1", "test/loss"} <= set(final)
    run_dir = Path(cfg.paths.output_dir)
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved["final"] == final
    assert OmegaConf.load(run_dir / "config.yaml").regularizer._target_ == cfg.regularizer._target_
    losses = train_losses(run_dir)
    assert len(losses) >= 90
    assert sum(losses[-8:]) / 8 < sum(losses[:8]) / 8 - 0.1, losses
