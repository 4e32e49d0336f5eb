"""Diff pruning (Guo et al. 2021): learn a sparse task delta on frozen pre-trained weights.

Each backbone weight becomes ``w0 + z * delta`` with a hard-concrete gate ``z`` (Louizos et
al. 2018) and an expected-L0 penalty on the gates (``extra_loss``). The artefact is the
delta projected by magnitude to ``keep`` (e.g. 0.5%) non-zero entries: indices + values only.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ftlab.model.arch import backbone_parameters
from ftlab.peft.base import load_by_name
from ftlab.peft.functional import Reparametrized, dense_state
from ftlab.peft.layers import freeze, head_parameters, top_layer_ops, unfreeze

IDX, VAL = ".delta_idx", ".delta_val"


class DiffPrunedModel(Reparametrized):
    def __init__(self, model: nn.Module, names: list[str], init_log_alpha: float,
                 l0_penalty: float, beta: float = 2 / 3, lo: float = -1.5,
                 hi: float = 1.5) -> None:
        super().__init__(model, names)
        self.delta = nn.ParameterList([nn.Parameter(torch.zeros_like(p))
                                       for p in self.originals()])
        self.log_alpha = nn.ParameterList([nn.Parameter(torch.full_like(p, init_log_alpha))
                                           for p in self.originals()])
        self.l0_penalty, self.beta, self.lo, self.hi = l0_penalty, beta, lo, hi
        self.projected = False  # after loading a projected delta: no gates, delta as is

    def gate(self, log_alpha: torch.Tensor) -> torch.Tensor:
        lo, hi = self.lo, self.hi  # the gate's stretch interval (Guo et al.: -1.5, 1.5)
        if self.training:
            u = torch.rand_like(log_alpha).clamp(1e-6, 1 - 1e-6)
            s = torch.sigmoid((u.log() - (1 - u).log() + log_alpha) / self.beta)
        else:
            s = torch.sigmoid(log_alpha)
        return (s * (hi - lo) + lo).clamp(0, 1)

    def effective_delta(self) -> list[torch.Tensor]:
        if self.projected:
            return list(self.delta)
        return [self.gate(a) * d for a, d in zip(self.log_alpha, self.delta, strict=True)]

    def weights(self) -> dict[str, torch.Tensor]:
        return {n: w + d for n, w, d in zip(self.names, self.originals(), self.effective_delta(),
                                            strict=True)}

    def extra_loss(self) -> torch.Tensor:
        """Expected fraction of open gates, times ``l0_penalty``."""
        if self.projected:
            return torch.zeros(())
        shift = self.beta * math.log(-self.lo / self.hi)
        total = sum(torch.sigmoid(a - shift).sum() for a in self.log_alpha)
        return self.l0_penalty * total / sum(a.numel() for a in self.log_alpha)


class DiffPruning:
    """Args:
        keep: fraction of delta entries kept non-zero by the final magnitude projection.
        l0_penalty: weight of the expected-L0 term (the fraction of open gates).
        init_log_alpha: initial gate logit (high = gates start open).
    """

    name = "diff_pruning"

    def __init__(self, keep: float = 0.005, l0_penalty: float = 0.5,
                 init_log_alpha: float = 3.0, drop_top: int = 0, reinit_top: int = 0) -> None:
        self.keep, self.l0_penalty, self.init_log_alpha = keep, l0_penalty, init_log_alpha
        self.drop_top, self.reinit_top = drop_top, reinit_top

    def apply(self, model: nn.Module) -> nn.Module:
        fresh = top_layer_ops(model, self.drop_top, self.reinit_top)
        freeze(model)
        backbone = {id(p) for p in backbone_parameters(model)} - {id(p) for p in fresh}
        names = [n for n, p in model.named_parameters() if id(p) in backbone]
        unfreeze(head_parameters(model))
        unfreeze(fresh)
        return DiffPrunedModel(model, names, self.init_log_alpha, self.l0_penalty)

    def trainable_state(self, model: DiffPrunedModel) -> dict[str, torch.Tensor]:
        deltas = [d.detach() for d in model.effective_delta()]
        flat = torch.cat([d.flatten().abs() for d in deltas])
        k = max(1, math.ceil(self.keep * flat.numel()))
        threshold = torch.topk(flat, k).values[-1]
        state = dense_state(model, ("delta.", "log_alpha."))
        budget = k
        for name, d in zip(model.names, deltas, strict=True):
            idx = torch.nonzero(d.flatten().abs() >= threshold).flatten()[:budget]
            idx = idx[d.flatten()[idx] != 0] if threshold == 0 else idx
            budget -= idx.numel()
            state[name + IDX] = idx
            state[name + VAL] = d.flatten()[idx]
        return state

    def load_trainable_state(self, model: DiffPrunedModel, state: dict[str, torch.Tensor]) -> None:
        sparse = {k for k in state if k.endswith((IDX, VAL))}
        load_by_name(model, {k: v for k, v in state.items() if k not in sparse})
        with torch.no_grad():
            for name, delta in zip(model.names, model.delta, strict=True):
                flat = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)
                if name + IDX in state:
                    flat[state[name + IDX].long()] = state[name + VAL].to(flat)
                delta.copy_(flat.view_as(delta))
        model.projected = True

    def merged(self, model: nn.Module) -> nn.Module:
        """The frozen model with the trained weights materialised into it."""
        from ftlab.peft.functional import materialize

        return materialize(model)
