"""Movement pruning (Sanh et al. 2020): fine-tune every weight while learning importance
scores for the linear weights of every transformer layer; a straight-through top-k mask keeps the
highest-scoring ``1 - sparsity`` of each matrix. The sparsity follows the paper's cubic schedule:
0 for the first ``initial_warmup`` of the steps (the scores learn, so no ties pick the first mask),
then ``s_f * (1 - (1 - t)^3)``, then ``s_f`` held for the last ``final_warmup``. The artefact is the
pruned model (masked weights; zeros where pruned). ``criterion="magnitude"`` keeps the largest
``|w|`` instead, on the same schedule (the reference's ``--pruning_method magnitude``, the
paper's baseline)."""

from __future__ import annotations

import torch
from torch import nn

from ftlab.errors import FtlabError
from ftlab.model.arch import layer_stacks
from ftlab.peft.base import load_by_name
from ftlab.peft.functional import Reparametrized, dense_state
from ftlab.peft.layers import top_layer_ops


class TopKMask(torch.autograd.Function):
    """Forward: a 0/1 mask of the top ``keep`` fraction of scores; backward: straight through."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, keep: float) -> torch.Tensor:
        k = max(1, int(round(keep * scores.numel())))
        if k >= scores.numel():
            return torch.ones_like(scores)
        mask = torch.zeros_like(scores).flatten()
        mask[torch.topk(scores.flatten(), k).indices] = 1.0
        return mask.view_as(scores)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def cubic_sparsity(step: int, total: int, final: float, initial_warmup: float,
                   final_warmup: float) -> float:
    """Sanh et al.'s schedule (their ``schedule_threshold``, as sparsity): 0 up to
    ``initial_warmup * total`` steps, ``final`` after ``total - final_warmup * total``, and
    ``final * (1 - (1 - t)^3)`` in between, ``t`` the fraction of the ramp done."""
    start = initial_warmup * total
    end = min(total - final_warmup * total, total - 1)  # the last step is at ``final``
    if step <= start:
        return 0.0
    if step > end:
        return final
    t = (step - start) / (end - start)
    return final * (1 - (1 - t) ** 3)


class MovementModel(Reparametrized):
    def __init__(self, model: nn.Module, names: list[str], sparsity: float,
                 initial_warmup: float, final_warmup: float,
                 schedule_steps: int | None = None, criterion: str = "movement") -> None:
        super().__init__(model, names)
        self.sparsity, self.schedule_steps, self.criterion = sparsity, schedule_steps, criterion
        self.initial_warmup, self.final_warmup = initial_warmup, final_warmup
        # the reference's ``--mask_init constant --mask_scale 0.``: every score starts at 0; the
        # warm-up (sparsity 0) lets the scores learn -w * dL/dw before any weight is pruned
        self.scores = nn.ParameterList([nn.Parameter(torch.zeros_like(w))
                                        for w in self.originals()])
        self.scores.requires_grad_(criterion == "movement")  # magnitude: no scores to learn
        self.step = self.total = 0  # optimiser steps done, of the stage's (told by ``at_step``)
        self.fixed = False  # after loading an artefact: the mask is its non-zero weights

    def at_step(self, step: int, total: int) -> None:
        self.step, self.total = step, total

    def own_groups(self) -> dict[str, tuple[float | None, float]]:
        """The scores train at the stage's LR without weight decay (``OwnGroups``), as in the
        reference (their group sets no decay; its AdamW's default is 0)."""
        if self.criterion != "movement":
            return {}
        return {n: (None, 0.0) for n, _ in self.scores.named_parameters(prefix="scores")}

    def settled(self) -> bool:
        """At the final sparsity (the artefact's), or holding a loaded mask."""
        return self.fixed or self.current_sparsity() >= self.sparsity

    def current_sparsity(self) -> float:
        horizon = self.schedule_steps or self.total
        if horizon <= 0:  # never told the stage's length (no trainer): not pruning yet
            return 0.0
        return cubic_sparsity(self.step, horizon, self.sparsity, self.initial_warmup,
                              self.final_warmup)

    def masks(self) -> list[torch.Tensor]:
        if self.fixed:
            return [(s > 0).to(s.dtype) for s in self.scores]
        keep = 1.0 - self.current_sparsity()
        if self.criterion == "magnitude":  # the mask is a constant of |w| (no gradient to it)
            return [TopKMask.apply(w.detach().abs(), keep) for w in self.originals()]
        return [TopKMask.apply(s, keep) for s in self.scores]

    def weights(self) -> dict[str, torch.Tensor]:
        return {n: w * m for n, w, m in zip(self.names, self.originals(), self.masks(),
                                            strict=True)}


class MovementPruning:
    """Args:
        sparsity: final fraction of each layer linear weight set to zero.
        initial_warmup: fraction of the steps before pruning starts (sparsity 0).
        final_warmup: fraction of the steps at the end with the final sparsity held.
        schedule_steps: the steps the schedule spans; None = the stage's optimiser steps.
        criterion: ``movement`` (learnt scores) or ``magnitude`` (the largest ``|w|``).
    """

    name = "movement_pruning"

    def __init__(self, sparsity: float = 0.5, initial_warmup: float = 0.1,
                 final_warmup: float = 0.2, schedule_steps: int | None = None,
                 criterion: str = "movement", drop_top: int = 0, reinit_top: int = 0) -> None:
        if not (0 <= initial_warmup and 0 <= final_warmup and initial_warmup + final_warmup < 1):
            raise FtlabError(f"movement pruning's initial_warmup={initial_warmup} and "
                             f"final_warmup={final_warmup} leave no steps to prune in.",
                             "use fractions >= 0 that sum to less than 1 (the paper: 0.1, 0.2).")
        if not 0 <= sparsity < 1:
            raise FtlabError(f"movement pruning's sparsity={sparsity} is not a fraction in "
                             "[0, 1): it is the share of each matrix's weights removed.",
                             "use e.g. peft.sparsity=0.5 (the paper: 0.9-0.97).")
        if schedule_steps is not None and schedule_steps <= 0:
            raise FtlabError(f"movement pruning's schedule_steps={schedule_steps} is not "
                             "positive.", "use a step count > 0, or null for the stage's steps.")
        if criterion not in ("movement", "magnitude"):
            raise FtlabError(f"movement pruning's criterion='{criterion}' is not known.",
                             "use peft.criterion=movement (learnt scores) or magnitude (|w|).")
        self.sparsity, self.schedule_steps = sparsity, schedule_steps
        self.initial_warmup, self.final_warmup = initial_warmup, final_warmup
        self.criterion = criterion
        self.drop_top, self.reinit_top = drop_top, reinit_top

    def apply(self, model: nn.Module) -> nn.Module:
        top_layer_ops(model, self.drop_top, self.reinit_top)
        model.requires_grad_(True)
        linear = {id(m.weight) for stack in layer_stacks(model) for m in stack.modules()
                  if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"}  # GPT-2: Conv1D
        names = [n for n, p in model.named_parameters() if id(p) in linear]
        return MovementModel(model, names, self.sparsity, self.initial_warmup,
                             self.final_warmup, self.schedule_steps, self.criterion)

    def trainable_state(self, model: MovementModel) -> dict[str, torch.Tensor]:
        state = dense_state(model, ("scores.",))
        with torch.no_grad():
            for name, mask in zip(model.names, model.masks(), strict=True):
                state[f"model.{name}"] = state[f"model.{name}"] * mask
        return state

    def load_trainable_state(self, model: MovementModel, state: dict[str, torch.Tensor]) -> None:
        load_by_name(model, state)
        with torch.no_grad():  # the kept (non-zero) weights are the mask, as saved
            for w, s in zip(model.originals(), model.scores, strict=True):
                s.copy_((w != 0).to(s.dtype))
        model.fixed = True

    @torch.no_grad()
    def report(self, model: MovementModel) -> dict[str, float]:
        """The share of the prunable weights the artefact holds as zeros (its masks now)."""
        masks = model.masks()
        total = sum(m.numel() for m in masks)
        kept = sum(int(m.count_nonzero()) for m in masks)
        return {"sparsity": round(1 - kept / total, 6), "target_sparsity": self.sparsity,
                "prunable_weights": total, "weights_kept": kept}

    def merged(self, model: nn.Module) -> nn.Module:
        """The frozen model with the trained weights materialised into it."""
        from ftlab.peft.functional import materialize

        return materialize(model)
