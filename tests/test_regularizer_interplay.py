"""Regularisers with other heads and settings than the sentence classifier of the contract test
(tests/test_regularizer_contract.py): per-token logits (stage=tokens)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

from ftlab.model.backbone import ModelSpec, load_model
from ftlab.regularizers.embedding import zeros_like_embeddings
from ftlab.tasks.base import TaskOutput
from tests.test_peft_contract import model_config
from tests.test_regularizer_contract import regularizer


class TinyTags:
    """Per-token tag logits ``[batch, tokens, tags]`` and their cross-entropy (as Tokens)."""

    row_logits = True

    def forward(self, model, batch):
        logits = model(input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"]).logits
        loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
        return TaskOutput(loss, logits)


def tagger() -> torch.nn.Module:
    torch.manual_seed(0)
    model = load_model(ModelSpec(config=model_config("bert")), AutoModelForTokenClassification,
                       num_labels=3)
    return model.eval()  # no dropout: the two batches' real tokens see the same network


def rows(width: int) -> dict[str, torch.Tensor]:
    """Four rows of 6 real tokens, padded to ``width``."""
    g = torch.Generator().manual_seed(0)
    ids = torch.zeros(4, width, dtype=torch.long)
    ids[:, :6] = torch.randint(5, 60, (4, 6), generator=g)
    mask = (ids != 0).long()
    labels = torch.where(mask.bool(), torch.randint(0, 3, (4, width), generator=g), -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize(("name", "term"), [("r3f", "r3f_kl"), ("smart", "smart_adv")])
def test_a_per_token_term_is_a_mean_over_real_tokens_not_padding(name, term, monkeypatch):
    """The same rows padded to 8 or to 24 tokens get the same term: padded positions' outputs
    (no loss or metric reads them) neither add to it nor dilute it."""
    reg = regularizer(name, eps=1e-2, **({"mu": 0} if name == "smart" else {}))
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(4, 6, 32, generator=g) * 1e-2  # the same noise on the real tokens

    def fixed(model, batch):
        delta = zeros_like_embeddings(model, batch)
        delta[:, :6] = noise
        return delta

    model = tagger()
    monkeypatch.setattr(torch.Tensor, "uniform_", lambda t, *a, **k: t)  # R3F: zeros + fixed
    monkeypatch.setattr(torch.Tensor, "normal_", lambda t, *a, **k: t)
    monkeypatch.setattr(f"ftlab.regularizers.{name}.zeros_like_embeddings", fixed)
    short, long = (float(reg.training_loss(model, rows(w), TinyTags()).extras[term])
                   for w in (8, 24))
    assert short > 0
    assert long == pytest.approx(short, rel=1e-4)


def test_smarts_teacher_of_bf16_weights_follows_them():
    """trainer.precision=bf16-true: a teacher kept in bf16 rounded each (1 - beta) step away
    and stayed the initial weights; the Bregman term then pulled toward those instead."""
    reg = regularizer("smart", beta=0.99)
    model = torch.nn.Linear(4, 4).to(torch.bfloat16)
    master = torch.ones(4, 4)
    with torch.no_grad():
        model.weight.copy_(master)
    reg.update_teacher(model)
    expected = master.clone()
    for _ in range(500):  # optimiser steps moving the weights 1e-3 (an fp32 master copy)
        master += 1e-3
        with torch.no_grad():
            model.weight.copy_(master)
        reg.update_teacher(model)
        expected = 0.99 * expected + 0.01 * model.weight.float()
    torch.testing.assert_close(reg.teacher["weight"].float(), expected, atol=1e-4, rtol=0)


def test_smart_on_regression_compares_the_predicted_numbers_by_their_squared_difference(
        monkeypatch):
    """The paper's l_s for regression, (f(x) - f(x + delta))^2 (a softmax of one number is
    always 1: the KL would be 0); the Bregman term likewise against the teacher's numbers."""
    from ftlab.regularizers.embedding import perturbed
    from ftlab.tasks.regression import Regression

    torch.manual_seed(0)
    model = load_model(ModelSpec(config=model_config("bert")),
                       AutoModelForSequenceClassification, num_labels=1).eval()
    b = rows(8) | {"labels": torch.rand(4) * 5}
    delta = torch.randn(4, 8, 32, generator=torch.Generator().manual_seed(2)) * 1e-2
    monkeypatch.setattr("ftlab.regularizers.smart.zeros_like_embeddings",
                        lambda m, batch: delta.clone())
    monkeypatch.setattr(torch.Tensor, "normal_", lambda t, *a, **k: t)
    reg = regularizer("smart", steps=0, mu=1.0, beta=0.5)  # steps 0: delta as drawn
    task = Regression()
    out = reg.training_loss(model, b, task)
    inputs = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
    with torch.no_grad(), perturbed(model, delta):
        noisy = model(**inputs).logits
    clean = model(**inputs).logits.detach()
    assert float(out.extras["smart_adv"]) == pytest.approx(float(((clean - noisy) ** 2).mean()),
                                                           rel=1e-4)
    assert float(out.extras["smart_adv"]) > 0
    assert float(out.extras["smart_bregman"]) == 0  # the teacher starts as the model
    with torch.no_grad():  # an optimiser step moves the output by 1; the teacher (beta 0.5) by
        model.classifier.bias += 1.0  # 0.5: the squared gap is 0.25 on every row
    bregman = float(reg.training_loss(model, b, task).extras["smart_bregman"])
    assert bregman == pytest.approx(0.25, rel=1e-4)
