"""R3F (Aghajanyan et al. 2021, "Better Fine-Tuning by Reducing Representational Collapse").

The task loss plus ``r3f_lambda`` times the symmetric KL divergence between the model's
predictions on the clean input and on the input with noise added to its word embeddings
(uniform in [-eps, eps] or normal with std eps), as fairseq's ``sentence_prediction_r3f``
criterion: one extra forward per step; gradients flow through both predictions, but (as
fairseq, which perturbs ``token_embeddings.detach()``) the noisy forward sends none to the
word-embedding table: the table learns from the clean forward only.
"""

from __future__ import annotations

from typing import Annotated

import torch
from torch import nn

from ftlab.regularizers.embedding import (
    logits_of,
    needs_logits,
    perturbed,
    real_positions,
    symmetric_kl,
    zeros_like_embeddings,
)
from ftlab.rules import at_least, one_of
from ftlab.tasks.base import Task, TaskOutput

NOISE = ("uniform", "normal")


class R3F:
    """Args:
        eps: noise scale (uniform: half-width; normal: std).
        r3f_lambda: weight of the symmetric KL term.
        noise: ``uniform`` or ``normal``.
    """

    name = "r3f"

    def __init__(self, eps: Annotated[float, at_least(0, example="1e-5")] = 1e-5,
                 r3f_lambda: Annotated[float, at_least(0, example="1.0")] = 1.0,
                 noise: Annotated[str, one_of(*NOISE)] = "uniform") -> None:
        self.eps, self.r3f_lambda, self.noise = eps, r3f_lambda, noise

    def apply(self, model: nn.Module) -> nn.Module:
        return model

    def check_task(self, task: Task) -> None:
        needs_logits(self.name, task)

    def sample(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        delta = zeros_like_embeddings(model, batch)
        if self.noise == "uniform":
            return delta.uniform_(-self.eps, self.eps)
        return delta.normal_(0.0, self.eps)

    def training_loss(self, model: nn.Module, batch: dict[str, torch.Tensor],
                      task: Task) -> TaskOutput:
        out = task.forward(model, batch)
        clean = logits_of(self.name, task, out)
        if self.r3f_lambda == 0:
            return out
        with perturbed(model, self.sample(model, batch), detach=True):
            noisy = logits_of(self.name, task, task.forward(model, batch))
        term = symmetric_kl(noisy, clean, real_positions(batch, clean))
        return TaskOutput(out.loss + self.r3f_lambda * term, clean,
                          {**out.extras, "r3f_kl": term.detach()})
