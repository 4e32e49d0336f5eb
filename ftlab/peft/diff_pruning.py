"""Diff pruning (Guo et al. 2021): learn a sparse task delta on frozen pre-trained weights.

Phase 1: each backbone weight becomes ``w0 + z * delta`` with a hard-concrete gate ``z``
(Louizos et al. 2018) and an expected-L0 penalty on the gates (``extra_loss``): as Guo et al.'s
eq. 5 and ``concrete_stretched`` in their code, ``z = clamp(s (r - l) + l, 0, 1)`` with
``s = sigmoid(log u - log(1 - u) + log_alpha)`` (no temperature, i.e. 1; Louizos et al. used
2/3), ``(l, r) = (-1.5, 1.5)``, the penalty ``sigmoid(log_alpha - log(-l / r))`` (here its
mean, times ``l0_penalty``), and the gate logits in their own AdamW group (``alpha_lr``, as the
reference's separate optimiser at 0.1). At the phase boundary the diff ``z * delta`` is
projected by magnitude to ``keep`` (e.g. 0.5%) non-zero entries, one global threshold (the
reference's ``run_glue_mag.py``; with the deterministic test-time gate, where it takes the
last sampled one). Phase 2 (the paper's fixed-mask fine-tuning, the last
``fixed_mask_fraction`` of the stage's optimiser steps): gates and L0 off, the mask fixed, only
the kept entries (and the head) learn. The artefact is the kept entries: indices + values only.
Without a phase 2 (``fixed_mask_fraction=0``) evaluation computes with the projection of the
current diff, as the artefact will hold it (training samples the gates over the dense delta).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ftlab.errors import FtlabError
from ftlab.model.arch import backbone_parameters
from ftlab.peft.base import load_by_name
from ftlab.peft.functional import Reparametrized, dense_state
from ftlab.peft.layers import freeze, head_parameters, top_layer_ops, unfreeze

IDX, VAL = ".delta_idx", ".delta_val"


def magnitude_mask(deltas: list[torch.Tensor], keep: float) -> torch.Tensor:
    """A flat 0/1 mask over all of ``deltas``: the ``ceil(keep * size)`` largest |entries|
    (one global top-k; entries that are exactly zero never count as kept)."""
    flat = torch.cat([d.detach().flatten().abs() for d in deltas])
    k = max(1, math.ceil(keep * flat.numel()))
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[torch.topk(flat, k).indices] = True
    return mask & (flat > 0)


class DiffPrunedModel(Reparametrized):
    def __init__(self, model: nn.Module, names: list[str], init_log_alpha: float,
                 l0_penalty: float, keep: float = 0.005, fixed_mask_fraction: float = 0.0,
                 fixed_mask_steps: int | None = None, beta: float = 1.0, lo: float = -1.5,
                 hi: float = 1.5, alpha_lr: float | None = 0.1) -> None:
        super().__init__(model, names)
        originals = self.originals()
        self.delta = nn.ParameterList([nn.Parameter(torch.zeros_like(p)) for p in originals])
        self.log_alpha = nn.ParameterList([nn.Parameter(torch.full_like(p, init_log_alpha))
                                           for p in originals])
        self.l0_penalty, self.beta, self.lo, self.hi = l0_penalty, beta, lo, hi
        self.keep, self.fixed_mask_fraction = keep, fixed_mask_fraction
        self.fixed_mask_steps, self.alpha_lr = fixed_mask_steps, alpha_lr
        device = originals[0].device if originals else None
        # phase 2's mask over all deltas, flat; buffers so a resumed checkpoint keeps them
        self.register_buffer("mask", torch.ones(sum(p.numel() for p in originals),
                                                dtype=torch.bool, device=device))
        self.register_buffer("fixed", torch.zeros((), dtype=torch.bool, device=device))
        self.phase2 = False  # ``fixed`` as a Python bool: no host sync per forward
        self.register_load_state_dict_post_hook(DiffPrunedModel._sync_phase)
        self._projection: tuple[tuple, list[torch.Tensor]] | None = None  # see ``projected``

    def own_groups(self) -> dict[str, tuple[float, float]]:
        """The gate logits' own group (``OwnGroups``): ``alpha_lr``, no weight decay, as the
        reference's separate AdamW; None: they share the stage's group."""
        if self.alpha_lr is None:
            return {}
        return {n: (self.alpha_lr, 0.0) for n, _ in self.log_alpha.named_parameters(
            prefix="log_alpha")}

    @staticmethod
    def _sync_phase(module: DiffPrunedModel, _incompatible) -> None:  # a resumed checkpoint
        module.phase2 = bool(module.fixed)

    def gate(self, log_alpha: torch.Tensor, sample: bool) -> torch.Tensor:
        # the stretch interval and temperature: Guo et al.'s -1.5, 1.5 and 1 (their code has none)
        lo, hi = self.lo, self.hi
        if sample:
            u = torch.rand_like(log_alpha).clamp(1e-6, 1 - 1e-6)
            s = torch.sigmoid((u.log() - (1 - u).log() + log_alpha) / self.beta)
        else:
            s = torch.sigmoid(log_alpha)
        return (s * (hi - lo) + lo).clamp(0, 1)

    def masks(self) -> list[torch.Tensor]:
        """Phase 2's per-tensor masks (views of the flat ``mask``)."""
        sizes = [d.numel() for d in self.delta]
        return [m.view_as(d) for m, d in zip(self.mask.split(sizes), self.delta, strict=True)]

    def effective_delta(self, sample: bool | None = None) -> list[torch.Tensor]:
        """Phase 1: gate * delta (gates sampled in training); phase 2: delta * fixed mask.
        Evaluated without a phase 2 (``fixed_mask_fraction=0``): the projection the artefact
        will hold, so validation (and the best-epoch choice) scores the artefact's model."""
        if self.phase2:
            return [d * m for d, m in zip(self.delta, self.masks(), strict=True)]
        if sample is None and not self.training and self.settled():
            return self.projected()
        sample = self.training if sample is None else sample
        return [self.gate(a, sample) * d for a, d in zip(self.log_alpha, self.delta, strict=True)]

    @torch.no_grad()
    def projected(self) -> list[torch.Tensor]:
        """The deterministic diff projected to ``keep``, computed once per evaluation (every
        ``train``/``eval`` drops it) and again if a delta or gate logit changed meanwhile (their
        storage and version counter; fused AdamW's step bumps no counter, a mode switch shows
        it: Lightning's loops call ``train()``/``eval()`` around every validation and test)."""
        tensors = [*self.delta, *self.log_alpha]
        key = tuple((t.data_ptr(), t._version) for t in tensors)
        if self._projection is None or self._projection[0] != key:
            deltas = self.effective_delta(sample=False)
            mask = magnitude_mask(deltas, self.keep).split([d.numel() for d in deltas])
            self._projection = (key, [d * m.view_as(d) for d, m in zip(deltas, mask,
                                                                        strict=True)])
        return self._projection[1]

    def train(self, mode: bool = True) -> DiffPrunedModel:
        self._projection = None  # computed afresh in the next evaluation
        return super().train(mode)

    def weights(self) -> dict[str, torch.Tensor]:
        return {n: w + d for n, w, d in zip(self.names, self.originals(), self.effective_delta(),
                                            strict=True)}

    def extra_loss(self) -> torch.Tensor:
        """Expected fraction of open gates, times ``l0_penalty`` (0 in phase 2)."""
        if self.phase2:
            return torch.zeros(())
        shift = self.beta * math.log(-self.lo / self.hi)
        total = sum(torch.sigmoid(a - shift).sum() for a in self.log_alpha)
        return self.l0_penalty * total / sum(a.numel() for a in self.log_alpha)

    def boundary(self, total: int) -> int | None:
        """The optimiser step at which phase 2 starts (None: no phase 2)."""
        steps = (self.fixed_mask_steps if self.fixed_mask_steps is not None
                 else math.floor(self.fixed_mask_fraction * total))
        if steps <= 0:
            return None
        if steps >= total:
            raise FtlabError(f"diff pruning's fixed_mask_steps={steps} leaves no gated phase in "
                             f"a stage of {total} optimiser steps.",
                             "lower peft.fixed_mask_steps, or use peft.fixed_mask_fraction "
                             "(0.5 = the paper's 3 + 3 epochs).")
        return total - steps

    def at_step(self, step: int, total: int) -> None:
        """Project and fix the mask at the phase boundary; in phase 2 hold the entries outside
        it at exactly zero (AdamW's momentum from phase 1 would move them otherwise)."""
        start = self.boundary(total)
        if start is not None and step >= start and not self.phase2:
            self.fix_mask()
        if self.phase2:
            with torch.no_grad():
                for d, m in zip(self.delta, self.masks(), strict=True):
                    d.mul_(m)

    def settled(self) -> bool:
        """In phase 2 (or with none): the model computes with what the artefact will hold."""
        return self.phase2 or (self.fixed_mask_steps == 0 if self.fixed_mask_steps is not None
                               else self.fixed_mask_fraction == 0)

    @torch.no_grad()
    def fix_mask(self) -> None:
        """Magnitude projection of the diff (deterministic gates) to ``keep``; phase 2 on."""
        deltas = self.effective_delta(sample=False)
        self.mask.copy_(magnitude_mask(deltas, self.keep))
        for d, value, m in zip(self.delta, deltas, self.masks(), strict=True):
            d.copy_(value * m)
        self.fixed.fill_(True)
        self.phase2 = True  # the gates drop out of the forward: no gradient reaches them


class DiffPruning:
    """Args:
        keep: fraction of delta entries kept non-zero by the magnitude projection.
        l0_penalty: weight of the expected-L0 term (the fraction of open gates).
        init_log_alpha: initial gate logit (high = gates start open).
        fixed_mask_fraction: fraction of the stage's optimiser steps spent in phase 2
            (fixed-mask fine-tuning of the kept entries); 0 = no phase 2 (project at the end).
        fixed_mask_steps: phase 2's length in optimiser steps (overrides the fraction).
        alpha_lr: peak LR of the gate logits, in their own group without weight decay (the
            reference: 0.1, a separate AdamW on the same schedule); None: the stage's LR.
    """

    name = "diff_pruning"

    def __init__(self, keep: float = 0.005, l0_penalty: float = 0.5,
                 init_log_alpha: float = 3.0, fixed_mask_fraction: float = 0.5,
                 fixed_mask_steps: int | None = None, alpha_lr: float | None = 0.1,
                 drop_top: int = 0, reinit_top: int = 0) -> None:
        if not 0 < keep <= 1:
            raise FtlabError(f"diff pruning's keep={keep} is not a fraction in (0, 1]: it is "
                             "the share of the delta's entries the projection keeps.",
                             "use e.g. peft.keep=0.005 (the paper's 0.5%).")
        if not l0_penalty >= 0:
            raise FtlabError(f"diff pruning's l0_penalty={l0_penalty} is negative: it would "
                             "reward open gates.", "use peft.l0_penalty >= 0 (e.g. 0.5; 0 = "
                             "no L0 term, the magnitude projection alone).")
        if alpha_lr is not None and not alpha_lr > 0:
            raise FtlabError(f"diff pruning's alpha_lr={alpha_lr} is not positive.",
                             "use e.g. peft.alpha_lr=0.1 (the reference), or null for the "
                             "stage's LR.")
        if not 0 <= fixed_mask_fraction < 1:
            raise FtlabError(f"diff pruning's fixed_mask_fraction={fixed_mask_fraction} is "
                             "outside [0, 1).", "use e.g. peft.fixed_mask_fraction=0.5 (the "
                             "paper: 3 epochs gated, then 3 with the mask fixed), or 0 for none.")
        if fixed_mask_steps is not None and fixed_mask_steps < 0:
            raise FtlabError(f"diff pruning's fixed_mask_steps={fixed_mask_steps} is negative.",
                             "use a step count >= 0, or null to use fixed_mask_fraction.")
        self.keep, self.l0_penalty, self.init_log_alpha = keep, l0_penalty, init_log_alpha
        self.fixed_mask_fraction, self.fixed_mask_steps = fixed_mask_fraction, fixed_mask_steps
        self.alpha_lr, self.drop_top, self.reinit_top = alpha_lr, drop_top, reinit_top

    def apply(self, model: nn.Module) -> nn.Module:
        fresh = top_layer_ops(model, self.drop_top, self.reinit_top)
        freeze(model)
        backbone = {id(p) for p in backbone_parameters(model)} - {id(p) for p in fresh}
        names = [n for n, p in model.named_parameters() if id(p) in backbone]
        unfreeze(head_parameters(model))
        unfreeze(fresh)
        return DiffPrunedModel(model, names, self.init_log_alpha, self.l0_penalty, self.keep,
                               self.fixed_mask_fraction, self.fixed_mask_steps,
                               alpha_lr=self.alpha_lr)

    def trainable_state(self, model: DiffPrunedModel) -> dict[str, torch.Tensor]:
        """Phase 2: the masked-in entries; before it: the diff projected to ``keep`` now."""
        deltas = [d.detach() for d in model.effective_delta(sample=False)]
        mask = model.mask if model.phase2 else magnitude_mask(deltas, self.keep)
        state = dense_state(model, ("delta.", "log_alpha."))
        sizes = [d.numel() for d in deltas]
        for name, d, m in zip(model.names, deltas, mask.split(sizes), strict=True):
            idx = torch.nonzero(m).flatten()
            state[name + IDX] = idx
            state[name + VAL] = d.flatten()[idx]
        return state

    def load_trainable_state(self, model: DiffPrunedModel, state: dict[str, torch.Tensor]) -> None:
        sparse = {k for k in state if k.endswith((IDX, VAL))}
        load_by_name(model, {k: v for k, v in state.items() if k not in sparse})
        with torch.no_grad():
            for name, delta, m in zip(model.names, model.delta, model.masks(), strict=True):
                flat = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)
                hit = torch.zeros(delta.numel(), dtype=torch.bool, device=delta.device)
                if name + IDX in state:
                    flat[state[name + IDX].long()] = state[name + VAL].to(flat)
                    hit[state[name + IDX].long()] = True
                delta.copy_(flat.view_as(delta))
                m.copy_(hit.view_as(m))
            model.fixed.fill_(True)  # the delta as loaded: no gates
        model.phase2 = True

    @torch.no_grad()
    def report(self, model: DiffPrunedModel) -> dict[str, float]:
        """The diff entries the artefact keeps, of the backbone's (the trainable count is the
        dense delta and its gates during training)."""
        deltas = model.effective_delta(sample=False)
        mask = model.mask if model.phase2 else magnitude_mask(deltas, self.keep)
        total = sum(d.numel() for d in deltas)
        kept = int(torch.count_nonzero(mask))
        return {"diff_kept": kept, "diff_kept_pct": round(100 * kept / total, 4),
                "backbone_params": total, "keep": self.keep}

    def merged(self, model: nn.Module) -> nn.Module:
        """The frozen model with the trained weights materialised into it."""
        from ftlab.peft.functional import materialize

        return materialize(model)
