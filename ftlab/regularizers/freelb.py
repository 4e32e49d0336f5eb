"""FreeLB (Zhu et al. 2020): "free" large-batch adversarial training on the word embeddings.

``steps`` (K) forwards on x + delta_k, delta_0 random (``init_mag``), each next delta one
normalised gradient-ascent step (``adv_lr``) on the task loss, optionally projected onto a
``max_norm`` ball; the parameters are updated with the gradient of the task loss *averaged
over the K perturbations* (1/K sum_k grad_theta L(x + delta_k)), as the reference code
accumulates it with K ``backward`` calls. All K forwards use the *same dropout masks* (the
paper's sec. 3.2, "When adversarial training meets dropout"; the reference passes its
``dp_masks`` from the first forward to the next): the random-number state is saved before the
first forward and restored before each of the others (CPU and the batch's CUDA device), so
the ascent sees one network, not K different sub-networks. The same restore makes every
other draw of the forward the same K times (stage=mlm's masked positions), so FreeLB needs only
the task's loss and works with every task: classification, tagging, regression, masked and
causal LM, text-to-text (the encoder's input embeddings).

The seam: this is an ordinary :class:`~ftlab.regularizers.base.Regularizer`. Its
``training_loss`` returns ``(1/K) sum_k L(x + delta_k)`` with every delta_k a constant, whose
gradient w.r.t. the parameters *is* FreeLB's accumulated gradient; the ascent direction for
delta comes from ``torch.autograd.grad`` w.r.t. delta alone (retaining the graph). Lightning
then runs the one backward pass of the step itself. Calling ``backward`` inside the training
step instead would be wrong under Lightning's automatic optimisation, which zeroes the
gradients *after* ``training_step`` and before its own backward (the K-1 inner gradients
would be lost at every step that starts an accumulation window), and manual optimisation
would take gradient clipping, ``accumulate_grad_batches``, mixed-precision scaling and the LR
scheduler out of the Trainer's hands for every stage that uses it. Here all of those stay
right, and methods that count backward passes (movement pruning's sparsity ramp) see one per
step. The price: the K graphs are kept until that backward (activation memory x K) and the
ascent runs K-1 extra backward passes w.r.t. delta only.
"""

from __future__ import annotations

import torch
from torch import nn

from ftlab.errors import FtlabError
from ftlab.regularizers.embedding import perturbed, token_mask, zeros_like_embeddings
from ftlab.tasks.base import Task, TaskOutput

NORMS = ("l2", "linf")


def rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The generators dropout draws from: the CPU one and, on CUDA, the device's."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)
class FreeLB:
    """Args:
        steps: K, forwards (adversarial steps) per training step.
        adv_lr: ascent step size on the normalised gradient.
        init_mag: magnitude of the random initial perturbation (0: start from zero).
        max_norm: radius the perturbation is projected onto (0: unbounded).
        norm: ``l2`` (per row, over tokens x dims) or ``linf``.
    """

    name = "freelb"

    def __init__(self, steps: int = 3, adv_lr: float = 0.1, init_mag: float = 0.1,
                 max_norm: float = 0.0, norm: str = "l2") -> None:
        if norm not in NORMS or steps < 1 or min(adv_lr, init_mag, max_norm) < 0:
            raise FtlabError(
                f"regularizer=freelb got steps={steps}, adv_lr={adv_lr}, init_mag={init_mag}, "
                f"max_norm={max_norm}, norm={norm!r}.",
                f"steps >= 1, sizes >= 0, norm one of {', '.join(NORMS)} (FreeLB's GLUE runs: "
                "3, 0.1, 0.1, 0, l2).")
        self.steps, self.adv_lr, self.init_mag = steps, adv_lr, init_mag
        self.max_norm, self.norm = max_norm, norm

    def apply(self, model: nn.Module) -> nn.Module:
        return model

    def init_delta(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        delta = zeros_like_embeddings(model, batch)
        mask = token_mask(batch, delta)
        if self.init_mag == 0:
            return delta
        if self.norm == "linf":
            return delta.uniform_(-self.init_mag, self.init_mag) * mask
        dims = mask.sum((1, 2)) * delta.shape[-1]  # real tokens x embedding size, per row
        scale = self.init_mag / dims.clamp(min=1).sqrt()
        return delta.uniform_(-1, 1) * mask * scale.view(-1, *[1] * (delta.dim() - 1))

    def ascend(self, delta: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        rows = grad.reshape(grad.shape[0], -1)
        shape = (-1, *[1] * (grad.dim() - 1))
        p = 2 if self.norm == "l2" else float("inf")
        delta = delta + self.adv_lr * grad / rows.norm(p=p, dim=1).clamp(min=1e-8).view(shape)
        if self.max_norm > 0:
            if self.norm == "linf":
                return delta.clamp(-self.max_norm, self.max_norm)
            norms = delta.reshape(delta.shape[0], -1).norm(dim=1).view(shape)
            delta = delta * (self.max_norm / norms).clamp(max=1.0)
        return delta

    def training_loss(self, model: nn.Module, batch: dict[str, torch.Tensor],
                      task: Task) -> TaskOutput:
        delta = self.init_delta(model, batch)
        total, first = None, None
        masks = rng_state(delta.device)  # the K forwards draw the same dropout (and MLM) masks
        for k in range(self.steps):
            delta.requires_grad_()
            if k:
                set_rng_state(masks, delta.device)
            with perturbed(model, delta):
                out = task.forward(model, batch)
            if first is None:
                first = out
            part = out.loss / self.steps
            total = part if total is None else total + part
            if k == self.steps - 1:
                break
            (grad,) = torch.autograd.grad(part, delta, retain_graph=True)
            delta = self.ascend(delta.detach(), grad).detach()
        return TaskOutput(total, first.logits, {**first.extras, "freelb_first_loss":
                                                first.loss.detach()})
