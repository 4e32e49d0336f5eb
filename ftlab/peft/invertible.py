"""MAD-X invertible adapters (Pfeiffer et al. 2020): a NICE coupling block (Dinh et al. 2015)
on the input embeddings, its inverse before the output (MLM) embedding projection.

The embedding output ``x`` is split in halves ``(x1, x2)``;
``y1 = x1 + F(x2)``, ``y2 = x2 + G(y1)``; the inverse is ``x2 = y2 - G(y1)``,
``x1 = y1 - F(x2)``, exact for any ``F``/``G``. ``F``/``G`` are small bottlenecks
(``Linear -> ReLU -> Linear``, width ``half // reduction_factor``; MAD-X: 2; AdapterHub's
``NICECouplingBlock``, whose ``init_bert_weights`` draws both layers from N(0, 0.02^2): here the
output layers start at N(0, init_std^2), nearer the identity), so the block adds
token-level capacity to the embeddings while the MLM head still reads the original embedding
space. The blocks live in an ``invertible_adapters`` ModuleDict on the backbone root, run in
order (frozen ``stack0``... from ``stack_on`` artefacts first, then the trainable ``adapter``);
the inverses run in reverse order. A classification model has no output embeddings: only the
forward direction runs (as in MAD-X's task stage).
"""

from __future__ import annotations

import torch
from torch import nn

from ftlab.errors import FtlabError
from ftlab.model.arch import backbone, embedding_modules, tied_embeddings, unwrap

MODULES = "invertible_adapters"


def _subnet(width_in: int, width_out: int, size: int, init_std: float) -> nn.Sequential:
    net = nn.Sequential(nn.Linear(width_in, size), nn.ReLU(), nn.Linear(size, width_out))
    nn.init.normal_(net[0].weight, std=0.02)
    nn.init.normal_(net[2].weight, std=init_std)  # near zero: the block starts near identity
    nn.init.zeros_(net[0].bias)
    nn.init.zeros_(net[2].bias)
    return net


class NiceCoupling(nn.Module):
    """Additive (NICE) coupling on the last dimension; ``inverse(forward(x)) == x``.

    Args:
        width: the embedding width.
        size: bottleneck width of ``F`` and ``G`` (MAD-X: half the width / 2).
        init_std: std of their output layers at init (near zero: near identity).
    """

    def __init__(self, width: int, size: int, init_std: float = 1e-3) -> None:
        super().__init__()
        self.split = width // 2
        rest = width - self.split
        self.F = _subnet(rest, self.split, size, init_std)
        self.G = _subnet(self.split, rest, size, init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x[..., : self.split], x[..., self.split:]
        y1 = x1 + self.F(x2)
        return torch.cat([y1, x2 + self.G(y1)], dim=-1)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        y1, y2 = y[..., : self.split], y[..., self.split:]
        x2 = y2 - self.G(y1)
        return torch.cat([y1 - self.F(x2), x2], dim=-1)


def embedding_width(model: nn.Module) -> int:
    """Width of the input embeddings (ELECTRA/ALBERT: ``embedding_size``, else hidden)."""
    return unwrap(model).get_input_embeddings().weight.shape[1]


def _blocks(model: nn.Module) -> nn.ModuleDict:
    """The backbone's ``invertible_adapters``; made, with its two hooks, on first use."""
    root = backbone(model)
    if hasattr(root, MODULES):
        return getattr(root, MODULES)
    blocks = nn.ModuleDict()
    root.add_module(MODULES, blocks)

    def forward_hook(_module: nn.Module, _inputs: tuple, out: torch.Tensor) -> torch.Tensor:
        for block in blocks.values():
            out = block(out)
        return out

    def inverse_hook(_module: nn.Module, args: tuple) -> tuple:
        hidden = args[0]
        for block in reversed(list(blocks.values())):
            hidden = block.inverse(hidden)
        return (hidden, *args[1:])

    for emb in tied_embeddings(model, embedding_modules(model)[0]):  # T5: those forward calls
        emb.register_forward_hook(forward_hook)
    output = unwrap(model).get_output_embeddings()
    if output is not None:  # a masked/causal LM: the inverse before the vocabulary projection
        output.register_forward_pre_hook(inverse_hook)
    return blocks


def add_invertible(model: nn.Module, name: str, reduction_factor: int = 2,
                   init_std: float = 1e-3, size: int | None = None) -> NiceCoupling:
    """Put a new coupling block called ``name`` on the model's embeddings (trainable)."""
    width = embedding_width(model)
    size = size or (width // 2) // reduction_factor
    if size < 1:
        raise FtlabError(f"Invertible adapter invertible_reduction={reduction_factor} leaves "
                         f"no bottleneck unit for half an embedding width of {width // 2}.",
                         f"use peft.invertible_reduction <= {width // 2} (MAD-X: 2).")
    like = unwrap(model).get_input_embeddings().weight
    block = NiceCoupling(width, size, init_std).to(like.device)
    _blocks(model)[name] = block
    return block


def stack_invertible(model: nn.Module, state: dict[str, torch.Tensor], trained: str,
                     name: str) -> int:
    """Load the block called ``trained`` from artefact tensors ``state`` as a frozen block
    ``name`` (its size from the tensors). Returns 1 if the artefact had one, else 0."""
    marker = f"{MODULES}.{trained}."
    own = {k[k.index(marker) + len(marker):]: v for k, v in state.items() if marker in k}
    if not own:
        return 0
    width = own["F.2.weight"].shape[0] + own["G.2.weight"].shape[0]
    if width != embedding_width(model):
        raise FtlabError(f"The artefact's invertible adapter is {width} wide; this model's "
                         f"embeddings are {embedding_width(model)}.",
                         "stack artefacts trained on the same model family and size.")
    block = add_invertible(model, name, size=own["F.0.weight"].shape[0])
    block.load_state_dict(own)
    block.requires_grad_(False)
    return 1
