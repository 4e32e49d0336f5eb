"""The contract every conf/peft/*.yaml method keeps, on a tiny BERT classifier (no downloads):
only the declared parameters get gradients and change (the rest stays bit-identical), outputs
stay finite, and the trained state saves to a small safetensors artefact that reproduces the
predictions on a freshly built model. New YAML files are picked up with no test edits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoConfig, AutoModelForSequenceClassification

from ftlab.cli import CONFIG_DIR
from ftlab.config import instantiate_checked
from ftlab.peft.base import Penalized, count_parameters
from ftlab.pipeline import split_peft
from ftlab.store import load_tensors, save_tensors

METHODS = sorted(p.stem for p in (Path(CONFIG_DIR) / "peft").glob("*.yaml"))
#: methods whose artefact is not meant to be small (they change every weight)
LARGE = {"full", "movement_pruning"}
#: methods that train every backbone weight (no frozen original parameter)
DENSE = {"full", "movement_pruning"}


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model("bert", vocab_size=2000, hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=2, intermediate_size=64, num_labels=2,
                               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return AutoModelForSequenceClassification.from_config(cfg)


def fresh_model() -> torch.nn.Module:
    """The same 'pre-trained' backbone with a differently initialised head."""
    model = tiny_model(0)
    torch.manual_seed(123)
    with torch.no_grad():
        for p in model.classifier.parameters():
            p.normal_(0, 0.5)
    return model


def method(name: str, **extra):
    node = OmegaConf.load(Path(CONFIG_DIR) / "peft" / f"{name}.yaml")
    return instantiate_checked(split_peft(OmegaConf.merge(node, extra))[0], f"peft={name}")


def batch(seed: int = 0, n: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(5, 2000, (n, 12), generator=g),
            "attention_mask": torch.ones(n, 12, dtype=torch.long),
            "labels": torch.randint(0, 2, (n,), generator=g)}


def train_steps(model: torch.nn.Module, steps: int = 4, lr: float = 1e-2) -> set[int]:
    """A few AdamW steps (no weight decay) on random batches, adding any extra loss.

    Returns the ids of the parameters that received a gradient.
    """
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    got_grad: set[int] = set()
    for step in range(steps):
        out = model(**batch(step))
        loss = out.loss + (model.extra_loss() if isinstance(model, Penalized) else 0.0)
        assert torch.isfinite(loss)
        loss.backward()
        got_grad |= {id(p) for p in model.parameters() if p.grad is not None}
        opt.step()
        opt.zero_grad()
    return got_grad


def logits(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        b = batch(99)
        return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits


@pytest.mark.parametrize("name", METHODS)
def test_method_contract(name: str, tmp_path: Path) -> None:
    peft = method(name)
    base = tiny_model()
    original = {n: p for n, p in base.named_parameters()}
    before = {n: p.detach().clone() for n, p in original.items()}
    model = peft.apply(base)
    counts = count_parameters(model)
    print(f"{name}: {counts['params_trainable']:,} trainable of {counts['params_total']:,} "
          f"({counts['params_trainable_pct']:.2f}%)")
    assert 0 < counts["params_trainable"] <= counts["params_total"]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable, f"{name} trains nothing"

    got_grad = train_steps(model)
    assert got_grad == {id(p) for p in trainable}, f"{name}: gradients reach undeclared params"
    # frozen original parameters are bit-identical; trained ones moved
    for n, p in original.items():
        if p.requires_grad:
            assert not torch.equal(p.detach(), before[n]), f"{name}: {n} did not train"
        else:
            assert torch.equal(p.detach(), before[n]), f"{name}: frozen {n} changed"
    if name not in DENSE:
        assert counts["params_trainable_pct"] < 100.0
        frozen = [n for n, p in original.items() if not p.requires_grad]
        assert frozen, f"{name} froze nothing"
    new = [p for p in trainable if not any(p is q for q in original.values())]
    for p in new:
        assert p.detach().abs().sum() > 0, f"{name}: a new parameter stayed at zero"

    state = peft.trainable_state(model)
    peft.load_trainable_state(model, state)  # as the stage does after fit (KeepBest.restore)
    expected = logits(model)
    assert torch.isfinite(expected).all()
    path = save_tensors(tmp_path / "trainable.safetensors", state)
    if name not in LARGE:
        total = sum(p.numel() for p in tiny_model().parameters())
        assert sum(v.numel() for v in state.values()) < 0.5 * total, f"{name}: large artefact"
    again = method(name)
    other = again.apply(fresh_model())
    assert not torch.allclose(logits(other), expected)  # the head alone differs already
    again.load_trainable_state(other, load_tensors(path))
    torch.testing.assert_close(logits(other), expected)
