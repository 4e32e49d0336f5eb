"""Movement pruning (Sanh et al. 2020): fine-tune every weight while learning importance
scores for the linear weights of every transformer layer; a straight-through top-k mask keeps the
highest-scoring ``1 - sparsity`` of each matrix. Sparsity rises on a cubic schedule over
``schedule_steps`` optimiser steps (0: the target from the start). The artefact is the pruned
model (masked weights; zeros where pruned)."""

from __future__ import annotations

import torch
from torch import nn

from ftlab.model.arch import layer_stacks
from ftlab.peft.base import load_by_name
from ftlab.peft.functional import Reparametrized, dense_state
from ftlab.peft.layers import top_layer_ops


class TopKMask(torch.autograd.Function):
    """Forward: a 0/1 mask of the top ``keep`` fraction of scores; backward: straight through."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, keep: float) -> torch.Tensor:
        k = max(1, int(round(keep * scores.numel())))
        mask = torch.zeros_like(scores).flatten()
        mask[torch.topk(scores.flatten(), k).indices] = 1.0
        return mask.view_as(scores)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class MovementModel(Reparametrized):
    def __init__(self, model: nn.Module, names: list[str], sparsity: float,
                 schedule_steps: int) -> None:
        super().__init__(model, names)
        self.sparsity, self.schedule_steps = sparsity, schedule_steps
        self.scores = nn.ParameterList([nn.Parameter(torch.zeros_like(w))
                                        for w in self.originals()])
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        # one backward = one step of the ramp, however many forwards fed it (an auxiliary
        # loss runs the model twice per step); gradient accumulation counts each backward
        if len(self.scores):
            self.scores[0].register_post_accumulate_grad_hook(self._count_step)

    def _count_step(self, _param: torch.Tensor) -> None:
        self.step += 1

    def current_sparsity(self) -> float:
        if self.schedule_steps <= 0:
            return self.sparsity
        t = min(1.0, self.step.item() / self.schedule_steps)
        return self.sparsity * (1 - (1 - t) ** 3)

    def masks(self) -> list[torch.Tensor]:
        keep = 1.0 - self.current_sparsity()
        return [TopKMask.apply(s, keep) for s in self.scores]

    def weights(self) -> dict[str, torch.Tensor]:
        return {n: w * m for n, w, m in zip(self.names, self.originals(), self.masks(),
                                            strict=True)}


class MovementPruning:
    """Args:
        sparsity: final fraction of each layer linear weight set to zero.
        schedule_steps: steps of the cubic sparsity ramp (0 = fixed sparsity from the start).
    """

    name = "movement_pruning"

    def __init__(self, sparsity: float = 0.5, schedule_steps: int = 0, drop_top: int = 0,
                 reinit_top: int = 0) -> None:
        self.sparsity, self.schedule_steps = sparsity, schedule_steps
        self.drop_top, self.reinit_top = drop_top, reinit_top

    def apply(self, model: nn.Module) -> nn.Module:
        top_layer_ops(model, self.drop_top, self.reinit_top)
        model.requires_grad_(True)
        linear = {id(m.weight) for stack in layer_stacks(model) for m in stack.modules()
                  if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"}  # GPT-2: Conv1D
        names = [n for n, p in model.named_parameters() if id(p) in linear]
        return MovementModel(model, names, self.sparsity, self.schedule_steps)

    def trainable_state(self, model: MovementModel) -> dict[str, torch.Tensor]:
        state = dense_state(model, ("scores.",))
        with torch.no_grad():
            for name, mask in zip(model.names, model.masks(), strict=True):
                state[f"model.{name}"] = state[f"model.{name}"] * mask
        return state

    def load_trainable_state(self, model: MovementModel, state: dict[str, torch.Tensor]) -> None:
        load_by_name(model, state)
        with torch.no_grad():  # the kept (non-zero) weights define the mask
            for w, s in zip(model.originals(), model.scores, strict=True):
                s.copy_((w != 0).to(s.dtype))
            model.step.fill_(max(model.schedule_steps, 0))

    def merged(self, model: nn.Module) -> nn.Module:
        """The frozen model with the trained weights materialised into it."""
        from ftlab.peft.functional import materialize

        return materialize(model)
