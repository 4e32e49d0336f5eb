"""Mixout (Lee et al. 2020, "Mixout: Effective Regularization to Finetune Large-scale
Pretrained Language Models").

Replaces dropout in the backbone with mixout: in training, each *input unit* of a trainable
linear layer (a column of its weight, all the weights leaving that unit) is swapped for its
pre-trained value with probability ``p`` and the result is rescaled so its expectation is the
current weight, ``W_mix = (M * W + (1 - M) * U - p * U) / (1 - p)``, ``M ~ Bernoulli(1 - p)``
drawn once per input unit and forward, as the reference ``mixout`` (bloodwass/mixout: one
Bernoulli row repeated over the output rows, so that with ``U = 0`` it is dropout on the
layer's input, the paper's "mixout(u, p)" on neurons). In eval mode the layer is the plain
linear layer with the current weights.

Deliberate deviation: the gradient is the exact one, ``M / (1 - p)``; the reference's
hand-written backward returns ``grad * M`` (it dropped PyTorch dropout's ``1 / (1 - p)`` from
the noise but kept its backward), i.e. its updates of mixed weights are ``1 - p`` times
smaller (10x at p = 0.9), like a lower LR.

Which layers: every ``nn.Linear`` (and GPT-2's ``Conv1D``) under the backbone
(``ftlab/model/arch.py``) whose weight trains, mixed toward its value when the regulariser is
applied — the pre-trained weight for ``peft=full``; for a PEFT method its own new linears
(LoRA's A/B, adapters' projections) toward their initial values. The backbone's dropout
modules are set to 0 (as the reference does); the task head keeps its own dropout. The layers
keep their names and parameters (only their class changes), so every PEFT wrapper, artefact
and hook sees the same model. Mixout needs no logits: it works with every task.
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from torch import nn

from ftlab.errors import FtlabError
from ftlab.model.arch import backbone_modules
from ftlab.rules import between
from ftlab.tasks.base import Task, TaskOutput


def mix(weight: torch.Tensor, target: torch.Tensor, p: float, in_dim: int = 1) -> torch.Tensor:
    """A draw of ``(M W + (1 - M) U - p U) / (1 - p)``, M ~ Bernoulli(1 - p) per input unit:
    one draw per index of ``weight``'s dimension ``in_dim`` (``nn.Linear``: 1, its columns;
    GPT-2's ``Conv1D``: 0, its rows), shared by every output unit."""
    if p == 0:
        return weight
    shape = [1] * weight.dim()
    shape[in_dim] = weight.shape[in_dim]
    keep = weight.new_empty(shape).bernoulli_(1 - p)
    target = target.to(weight.dtype)
    return (keep * weight + (1 - keep) * target - p * target) / (1 - p)


class MixLinear(nn.Linear):
    """An ``nn.Linear`` whose training forward uses a mixout draw of its weight."""

    mixout_p: float
    mixout_target: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        return F.linear(x, mix(self.weight, self.mixout_target, self.mixout_p), self.bias)


def _conv1d() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return None
    return Conv1D


def _mix_conv1d_class(base: type) -> type:
    class MixConv1D(base):
        """GPT-2's ``Conv1D`` (``x @ W + b``, W is [in, out]) with mixout in training."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not self.training:
                return super().forward(x)
            w = mix(self.weight, self.mixout_target, self.mixout_p, in_dim=0)
            out = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), w)
            return out.view(*x.shape[:-1], w.shape[-1])

    return MixConv1D


class Mixout:
    """Args:
        p: probability of swapping a weight element for its pre-trained value.
    """

    name = "mixout"

    def __init__(self, p: Annotated[float, between(0, 1, hi_open=True, example="0.9")] = 0.9
                 ) -> None:  # Lee et al.: 0.7-0.9
        self.p = p

    def apply(self, model: nn.Module) -> nn.Module:
        from ftlab.peft.functional import Reparametrized

        if isinstance(model, Reparametrized):  # movement pruning: w * mask in every forward
            raise FtlabError(
                "regularizer=mixout mixes a linear layer's weight toward its pre-trained value, "
                "and this PEFT method re-parametrises the weights (computes them in every "
                "forward: movement pruning's w x mask, diff pruning's w + delta, intrinsic's "
                "projection): in training the units mixout swaps (p of them) would use the "
                "pre-trained weight instead of the method's (movement pruning: unpruned), so "
                "the method would learn on a model that evaluation never sees.",
                "use mixout with peft=full or a method that trains linear layers (lora, "
                "adapter_houlsby, adapter_pfeiffer, last_layer with top_k > 0), or another "
                "regularizer (r3f, smart, freelb) with this method.")
        conv1d = _conv1d()
        classes = {nn.Linear: MixLinear}
        if conv1d is not None:
            classes[conv1d] = _mix_conv1d_class(conv1d)
        mixed = 0
        for root in backbone_modules(model):
            for module in root.modules():
                if isinstance(module, nn.Dropout):
                    module.p = 0.0
                new = classes.get(type(module))
                if new is None or not module.weight.requires_grad:
                    continue
                module.__class__ = new
                module.mixout_p = self.p
                module.register_buffer("mixout_target", module.weight.detach().clone(),
                                       persistent=False)
                mixed += 1
        if mixed == 0:
            raise FtlabError(
                "regularizer=mixout found no trainable linear weight in the backbone to mix "
                "(the PEFT method trains none).",
                "use it with peft=full or a method that trains linear layers (lora, "
                "adapter_houlsby, adapter_pfeiffer, last_layer with top_k > 0).")
        return model

    def training_loss(self, model: nn.Module, batch: dict[str, torch.Tensor],
                      task: Task) -> TaskOutput:
        return task.forward(model, batch)
