"""Bottleneck adapters as Houlsby et al. (2019) built them, on the tiny BERT: the paper's
initialisation, the adapter between each block's output projection and its residual add +
LayerNorm, and every adapter and LayerNorm learning."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from ftlab.errors import FtlabError
from tests.test_peft_contract import batch, method, tiny_model


def _adapters(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if n.endswith(".adapters.adapter")}


def test_houlsby_init_is_the_papers_truncated_normal_on_both_projections():
    peft = method("adapter_houlsby")
    std = peft.init_std
    adapters = _adapters(peft.apply(tiny_model()))
    assert len(adapters) == 4  # 2 layers x (attention, FFN)
    for proj in ("down", "up"):
        weights = torch.cat([a.get_submodule(proj).weight.flatten() for a in adapters.values()])
        assert weights.abs().max() <= 2 * std  # truncated at two standard deviations
        # a normal truncated at +-2 std has std 0.88 std; 256 draws estimate it within ~10 %
        assert 0.7 * std < weights.std() < 1.05 * std
        for a in adapters.values():
            assert not a.get_submodule(proj).bias.any()


def test_adapter_init_name_is_checked():
    with pytest.raises(FtlabError, match="init 'xavier'"):
        method("adapter_houlsby", init="xavier")


@pytest.mark.parametrize("name", ["adapter_houlsby", "adapter_pfeiffer"])
def test_every_adapter_and_both_layernorms_learn(name):
    model = method(name).apply(tiny_model())
    model.train()
    model(**batch(0)).loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapters = {n for n in trainable if ".adapters.adapter." in n}
    sites = 2 if name == "adapter_houlsby" else 1
    assert len(adapters) == 2 * sites * 4  # layers x sites x (down, up) x (weight, bias)
    norms = {f"bert.encoder.layer.{i}.{block}LayerNorm.{w}" for i in range(2)
             for block in ("attention.output.", "output.") for w in ("weight", "bias")}
    assert trainable == adapters | norms | {"classifier.weight", "classifier.bias"}
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, n


@pytest.mark.parametrize("site", ["attention.output", "output"])
def test_houlsby_adapter_runs_between_projection_and_residual_layernorm(site):
    model = method("adapter_houlsby").apply(tiny_model()).eval()
    holder = model.get_submodule(f"bert.encoder.layer.1.{site}")
    adapter = holder.adapters.adapter
    with torch.no_grad():  # a clearly non-identity adapter
        adapter.up.bias.copy_(torch.linspace(-1, 1, adapter.up.bias.numel()))
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        holder.register_forward_pre_hook(lambda m, a: seen.update(residual=a[1])),
        holder.dense.register_forward_hook(lambda m, a, o: seen.update(x=a[0])),
        holder.dropout.register_forward_hook(lambda m, a, o: seen.update(adapted=o)),
        holder.LayerNorm.register_forward_pre_hook(lambda m, a: seen.update(norm_in=a[0])),
    ]
    with torch.no_grad():
        model(input_ids=batch(1)["input_ids"])
        raw = F.linear(seen["x"], holder.dense.weight, holder.dense.bias)
        expected = raw + adapter.up(torch.relu(adapter.down(raw)))
    for h in hooks:
        h.remove()
    torch.testing.assert_close(seen["adapted"], expected)  # applied once, to the projection
    torch.testing.assert_close(seen["norm_in"], expected + seen["residual"])  # then add + LN


@pytest.mark.parametrize("family", ["bert", "distilbert", "gpt2", "t5", "llama"])
def test_houlsby_adapters_run_on_the_dropped_out_projection(family):
    """Houlsby et al.'s adapter-bert and AdapterHub apply dropout to the block's projection
    first, then the adapter (whose output is not dropped): in training the adapter's input
    holds the dropout's zeros (the block then adds the adapter's output to its residual: the
    test above). Llama has no dropout there: its adapter runs on the projection."""
    model = method("adapter_houlsby").apply(tiny_model(0, family)).train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.5
    inputs: list[torch.Tensor] = []

    def record(_m: torch.nn.Module, args: tuple, _out: torch.Tensor) -> None:
        inputs.append(args[0])

    hooks = [adapter.register_forward_hook(record) for adapter in _adapters(model).values()]
    torch.manual_seed(0)
    with torch.no_grad():
        model(**{k: v for k, v in batch(0).items() if k != "token_type_ids" or
                 family == "bert"})
    for h in hooks:
        h.remove()
    assert inputs, "no adapter ran"
    zeros = [float((x == 0).float().mean()) for x in inputs]
    if family == "llama":
        assert max(zeros) == 0.0, zeros
        return
    has_drop = 2 if family != "distilbert" else 1  # DistilBERT: no dropout after out_lin
    dropped = sorted(zeros, reverse=True)[: has_drop * len(inputs) // 2]
    assert min(dropped) > 0.3, zeros  # ~p = 0.5 of the adapter's input was dropped first
