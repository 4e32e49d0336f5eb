"""SMART (Jiang et al. 2020): smoothness-inducing adversarial regularisation plus Bregman
proximal point optimisation.

Training loss = task loss
  + ``lambda_s`` * l_s(f(x), f(x + delta)) (l_s: the symmetric KL; for regression, as the
    paper, the squared loss (f(x) - f(x + delta))^2), where delta starts as N(0, noise_std^2)
    noise on the word embeddings and takes ``steps`` projected gradient-ascent steps on l_s:
    g = grad_delta of l_s (KL: both directions, the clean prediction held constant),
    delta <- clip(delta + step_size * g / ||g||_inf, -eps, eps), the norm per token (the
    paper's Algorithm 1; mt-dnn's ``SmartPerturbation`` ascends one-sided ``stable_kl`` and
    rescales ``delta + step_size * g`` to unit L-inf norm per token instead of clipping);
  + ``mu`` * l_s(f(x; theta), f(x; theta_tilde)): the Bregman proximal point term
    against a momentum teacher theta_tilde = beta * theta_tilde + (1 - beta) * theta, tracked
    for the *trainable* tensors only (the frozen rest is shared) and run with
    ``torch.func.functional_call`` on the same model, under ``no_grad``.

The teacher starts as the model and is updated once per optimiser step (detected by the
trainable tensors' version counters, so gradient accumulation does not advance it); it is saved
in the stage's checkpoint (``state_dict``), so a resumed stage goes on with the same teacher.
The ascent's gradients come from ``torch.autograd.grad`` w.r.t. delta only: parameter
gradients are left to the one backward pass Lightning runs on the returned loss.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ftlab.averaging import wide
from ftlab.errors import FtlabError
from ftlab.regularizers.embedding import (
    logits_of,
    needs_logits,
    perturbed,
    real_positions,
    symmetric_kl,
    symmetric_kl_fixed_targets,
    zeros_like_embeddings,
)
from ftlab.tasks.base import PredictsNumbers, Task, TaskOutput


class _WithWeights:
    """``model`` called with ``weights`` swapped in (the teacher); other attributes pass."""

    def __init__(self, model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
        self.model, self.weights = model, weights

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return functional_call(self.model, self.weights, args, kwargs, strict=False)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


class Smart:
    """Args:
        lambda_s: weight of the adversarial smoothness term.
        mu: weight of the Bregman proximal point term (0: off, no teacher kept).
        beta: momentum of the teacher.
        eps: the perturbation's L-inf radius (per element).
        step_size: ascent step size (on the L-inf-normalised gradient).
        noise_std: std of the initial perturbation.
        steps: ascent steps.
    """

    name = "smart"

    def __init__(self, lambda_s: float = 1.0, mu: float = 1.0, beta: float = 0.99,
                 eps: float = 1e-5, step_size: float = 1e-3, noise_std: float = 1e-5,
                 steps: int = 1) -> None:
        if min(lambda_s, mu, eps, step_size, noise_std) < 0 or steps < 0 or not 0 <= beta < 1:
            raise FtlabError(
                f"regularizer=smart got lambda_s={lambda_s}, mu={mu}, beta={beta}, eps={eps}, "
                f"step_size={step_size}, noise_std={noise_std}, steps={steps}.",
                "weights, sizes and steps must be >= 0 and 0 <= beta < 1 (paper: 1, 1, 0.99, "
                "1e-5, 1e-3, 1e-5, 1).")
        self.lambda_s, self.mu, self.beta = lambda_s, mu, beta
        self.eps, self.step_size, self.noise_std, self.steps = eps, step_size, noise_std, steps
        self.teacher: dict[str, torch.Tensor] = {}
        self._version = -1

    def apply(self, model: nn.Module) -> nn.Module:
        return model

    def check_task(self, task: Task) -> None:
        needs_logits(self.name, task, distribution=False)  # regression: the squared loss

    @staticmethod
    def divergence(task: Task, a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None,
                   fixed: bool = True) -> torch.Tensor:
        """The paper's l_s: for one number per row (stage=regression, or a regression
        sub-task's batch in stage=multitask; a classifier has 2+ classes) the squared loss
        (a - b)^2, mean over rows; otherwise the symmetric KL (``fixed``: each direction's
        target held constant, mt-dnn's)."""
        if isinstance(task, PredictsNumbers) or a.shape[-1] == 1:
            return F.mse_loss(a.float(), b.float())
        return (symmetric_kl_fixed_targets if fixed else symmetric_kl)(a, b, mask)

    def training_loss(self, model: nn.Module, batch: dict[str, torch.Tensor],
                      task: Task) -> TaskOutput:
        out = task.forward(model, batch)
        clean = logits_of(self.name, task, out)
        loss, extras = out.loss, dict(out.extras)
        if self.lambda_s > 0:
            adv = self.adversarial(model, batch, task, clean)
            loss, extras["smart_adv"] = loss + self.lambda_s * adv, adv.detach()
        if self.mu > 0:
            breg = self.bregman(model, batch, task, clean)
            loss, extras["smart_bregman"] = loss + self.mu * breg, breg.detach()
        return TaskOutput(loss, clean, extras)

    def adversarial(self, model: nn.Module, batch: dict[str, torch.Tensor], task: Task,
                    clean: torch.Tensor) -> torch.Tensor:
        delta = zeros_like_embeddings(model, batch).normal_(0.0, self.noise_std)
        mask = real_positions(batch, clean)
        for _ in range(self.steps):
            delta.requires_grad_()
            with perturbed(model, delta):
                noisy = logits_of(self.name, task, task.forward(model, batch))
            div = self.divergence(task, noisy, clean.detach(), mask, fixed=False)
            (grad,) = torch.autograd.grad(div, delta)
            if not torch.isfinite(grad).all():  # as mt-dnn: no adversarial term this step
                return clean.new_zeros((), dtype=torch.float32)
            step = grad / (grad.abs().amax(-1, keepdim=True) + 1e-6)
            delta = (delta + self.step_size * step).clamp(-self.eps, self.eps).detach()
        with perturbed(model, delta):
            noisy = logits_of(self.name, task, task.forward(model, batch))
        return self.divergence(task, clean, noisy, mask)

    def bregman(self, model: nn.Module, batch: dict[str, torch.Tensor], task: Task,
                clean: torch.Tensor) -> torch.Tensor:
        self.update_teacher(model)
        dtypes = {n: p.dtype for n, p in model.named_parameters() if n in self.teacher}
        weights = {n: t.to(dtypes[n]) for n, t in self.teacher.items()}  # fp32 -> bf16-true's
        with torch.no_grad():
            target = logits_of(self.name, task, task.forward(_WithWeights(model, weights), batch))
        return self.divergence(task, clean, target, real_positions(batch, clean))

    def state_dict(self) -> dict[str, Any]:
        return {"teacher": self.teacher}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The teacher of the checkpoint; the next step (after the checkpoint's optimiser step)
        moves it, as it would have without the kill."""
        self.teacher, self._version = dict(state.get("teacher") or {}), -1

    @torch.no_grad()
    def update_teacher(self, model: nn.Module) -> None:
        """theta_tilde <- beta theta_tilde + (1 - beta) theta, once per optimiser step; kept in
        at least float32 (bf16 weights would round each (1 - beta) step away: a frozen teacher)."""
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        version = sum(p._version for p in params.values())
        if not self.teacher or self.teacher.keys() != params.keys():
            self.teacher = {n: wide(p).clone() for n, p in params.items()}
        elif version != self._version:
            for n, p in params.items():
                if self.teacher[n].device != p.device:  # loaded from a checkpoint
                    self.teacher[n] = self.teacher[n].to(p.device)
                self.teacher[n].lerp_(p.detach().to(self.teacher[n].dtype), 1.0 - self.beta)
        self._version = version
