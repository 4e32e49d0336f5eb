"""Intrinsic-dimension fine-tuning (Aghajanyan et al. 2021; Li et al. 2018).

Only a ``d``-dimensional vector ``theta`` trains (plus the head); each backbone tensor moves by
a Fastfood projection of it: ``w = w0 + (H G Pi H B pad(theta))[:numel] / (|G| sqrt(numel))``
with ``L`` the next power of 2 (the padded length), ``H`` a Walsh-Hadamard transform and
``B, Pi, G`` random (±1 signs, a permutation, Gaussians) regenerated from ``seed``. The divisor
is Li et al.'s (their ``fastfood_torched``: ``sqrt(L |G|^2) sqrt(numel / L)``): each of the
``d`` directions is a step of norm ~1 in every tensor, whatever its size. The artefact is
``theta``, the seed and the head. SAID (structure-aware, the paper's best variant) spends ``m``
of the ``d`` numbers on one scale per projected tensor: ``w = w0 + lambda_i * P_i(theta)`` with
``d - m`` in ``theta``.
"""

from __future__ import annotations

import torch
from torch import nn

from ftlab.errors import FtlabError
from ftlab.model.arch import backbone_parameters, embedding_modules
from ftlab.peft.base import load_by_name
from ftlab.peft.functional import Reparametrized, dense_state
from ftlab.peft.layers import freeze, head_parameters, top_layer_ops, unfreeze

THETA, SEED, SCALE = "intrinsic.theta", "intrinsic.seed", "intrinsic.scale"


def _hadamard(m: int, like: torch.Tensor) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=like.dtype, device=like.device)
    while h.shape[0] < m:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h


def fwht(x: torch.Tensor, block_bits: int = 6) -> torch.Tensor:
    """Unnormalised Walsh-Hadamard transform of a vector of length 2^k.

    ``H_(2^k)`` is a Kronecker product of small Hadamard matrices, so it is applied as a few
    (2^6 x 2^6) matmuls along the axes of a reshaped vector: ~k/6 memory passes, not k.
    """
    n = x.numel()
    k = n.bit_length() - 1
    y, done = x, 0
    while done < k:
        bits = min(block_bits, k - done)
        m, right = 1 << bits, 1 << done
        y = y.reshape(-1, m, right).transpose(1, 2)  # one big GEMM along the m axis
        y = (y.reshape(-1, m) @ _hadamard(m, x)).reshape(-1, right, m).transpose(1, 2)
        done += bits
    return y.reshape(n)


class Fastfood(nn.Module):
    """A fixed random ``d -> numel`` Fastfood map, regenerated from ``seed``."""

    def __init__(self, d: int, numel: int, seed: int) -> None:
        super().__init__()
        size = 1 << max(d, numel - 1).bit_length()
        g = torch.Generator().manual_seed(seed)
        self.numel, self.size = numel, size
        self.register_buffer("b", torch.randint(0, 2, (size,), generator=g).float() * 2 - 1,
                             persistent=False)
        self.register_buffer("perm", torch.randperm(size, generator=g), persistent=False)
        gauss = torch.randn(size, generator=g)
        # Li et al.'s scale: the truncated (numel-long) columns of the map have unit norm
        self.register_buffer("g", gauss / (gauss.norm() * numel ** 0.5), persistent=False)

    def forward(self, theta: torch.Tensor) -> torch.Tensor:
        x = torch.zeros(self.size, dtype=theta.dtype, device=theta.device)
        x = torch.cat((theta, x[theta.numel():])) * self.b
        return fwht(fwht(x)[self.perm] * self.g)[: self.numel]


class IntrinsicModel(Reparametrized):
    def __init__(self, model: nn.Module, names: list[str], d: int, seed: int,
                 said: bool = False) -> None:
        super().__init__(model, names)
        m = len(names) if said else 0
        if said and d <= m:
            raise FtlabError(f"SAID needs d larger than the {m} projected tensors (d={d}).",
                             f"set peft.d above {m} (e.g. {m + 500}) or peft.said=false.")
        size = sum(w.numel() for w in self.originals())
        if not 0 < d - m < size:
            raise FtlabError(f"Intrinsic dimension d={d} is not between 1 and the {size:,} "
                             "backbone weights it is projected onto.",
                             "use e.g. peft.d=500 (the paper's d90: ~200-2,000); for as many "
                             "numbers as weights use peft=full.")
        self.d = d - m  # projected numbers; SAID's m per-tensor scales are the rest
        self.theta = nn.Parameter(torch.zeros(self.d))
        # SAID's lambda: one scale per tensor, starting at 1 (plain intrinsic when untrained)
        self.scale = nn.Parameter(torch.ones(m)) if said else None
        self.project(seed)

    def project(self, seed: int) -> None:
        """(Re)build the projections from ``seed`` (one per tensor: seed + its index)."""
        self.seed = int(seed)
        device = self.theta.device
        self.maps = nn.ModuleList([Fastfood(self.d, w.numel(), self.seed + i).to(device)
                                   for i, w in enumerate(self.originals())])

    def weights(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, (n, w, m) in enumerate(zip(self.names, self.originals(), self.maps, strict=True)):
            step = m(self.theta) if self.scale is None else self.scale[i] * m(self.theta)
            out[n] = w + step.view_as(w).to(w.dtype)
        return out


class Intrinsic:
    """Args:
        d: the intrinsic dimension (trained numbers); the paper: ~200 (MRPC) to ~2,000.
        seed: seed of the random projection (saved in the artefact); None: drawn from torch's
            generator, which the run's seed sets, so each seed of a sweep gets its own
            projection (as it gets its own head initialisation).
        include_embeddings: project the embedding matrices too (the largest tensors; the
            paper does; off by default for speed, as conf/peft/intrinsic.yaml).
        said: structure-aware intrinsic dimension: ``d`` includes one learnt scale per tensor.
    """

    name = "intrinsic"

    def __init__(self, d: int = 500, seed: int | None = None, include_embeddings: bool = False,
                 said: bool = False, drop_top: int = 0, reinit_top: int = 0) -> None:
        self.d, self.seed, self.include_embeddings, self.said = d, seed, include_embeddings, said
        self.drop_top, self.reinit_top = drop_top, reinit_top

    def apply(self, model: nn.Module) -> nn.Module:
        fresh = {id(p) for p in top_layer_ops(model, self.drop_top, self.reinit_top)}
        freeze(model)
        backbone = {id(p) for p in backbone_parameters(model)}
        if not self.include_embeddings:
            backbone -= {id(p) for m in embedding_modules(model) for p in m.parameters()}
        names = [n for n, p in model.named_parameters() if id(p) in backbone
                 and id(p) not in fresh]
        unfreeze(head_parameters(model))
        unfreeze([p for p in model.parameters() if id(p) in fresh])
        seed = self.seed if self.seed is not None else int(torch.randint(2**31 - 1, ()))
        return IntrinsicModel(model, names, self.d, seed, self.said)

    def trainable_state(self, model: IntrinsicModel) -> dict[str, torch.Tensor]:
        state = dense_state(model, ("theta", "scale"))
        scale = {} if model.scale is None else {SCALE: model.scale.detach()}
        return state | scale | {THETA: model.theta.detach(), SEED: torch.tensor([model.seed])}

    def load_trainable_state(self, model: IntrinsicModel, state: dict[str, torch.Tensor]) -> None:
        state = dict(state)
        seed = int(state.pop(SEED).item())
        if seed != model.seed:
            model.project(seed)
        if (model.scale is None) != (SCALE not in state):
            raise FtlabError("The intrinsic artefact and the model disagree on SAID.",
                             "load it with the peft.said setting it was trained with.")
        if state[THETA].numel() != model.theta.numel():
            raise FtlabError(f"The intrinsic artefact has {state[THETA].numel()} numbers; this "
                             f"model projects {model.theta.numel()}.",
                             "load it with the peft.d it was trained with.")
        with torch.no_grad():
            model.theta.copy_(state.pop(THETA))
            if model.scale is not None:
                model.scale.copy_(state.pop(SCALE))
        load_by_name(model, state)

    def merged(self, model: nn.Module) -> nn.Module:
        """The frozen model with the trained weights materialised into it."""
        from ftlab.peft.functional import materialize

        return materialize(model)
