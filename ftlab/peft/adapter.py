"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020) and MAD-X-style stacking.

An adapter is ``x + up(act(down(x)))`` applied by a forward hook to the output of a layer's
attention block and/or FFN block: its output projection, after the dropout on it where the
family has one, i.e. before that block's residual add, as in the papers' code (Houlsby et al.'s
``adapter-bert`` and AdapterHub run the adapter on the dropped-out projection). The places
come from the architecture table (``ftlab/model/arch.py``): BERT's ``attention.output.dense``
/ ``output.dense`` (their ``dropout``), GPT-2's ``attn.c_proj`` / ``mlp.c_proj`` (``attn.
resid_dropout`` / ``mlp.dropout``), Llama's ``self_attn.o_proj`` / ``mlp.down_proj`` (no
dropout), T5's ``SelfAttention.o`` / ``DenseReluDense.wo`` (their sub-layer's ``dropout``;
encoder and decoder), DistilBERT's ``attention.out_lin`` / ``ffn.lin2`` (``ffn.dropout``).
Adapters live in an ``adapters`` ModuleDict on the projection's parent module
(BERT: ``attention.output``, ``output``), run in order: frozen adapters loaded from
``stack_on`` artefacts first (``stack0``, ``stack1``...), then the trainable ``adapter``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ftlab.errors import FtlabError
from ftlab.model.arch import arch_of, block_modules, block_outputs, unwrap
from ftlab.peft.base import RequiresGradState
from ftlab.peft.invertible import add_invertible, stack_invertible
from ftlab.peft.layers import freeze, head_parameters, top_layer_ops, unfreeze
from ftlab.peft.stacking import load_block_norms
from ftlab.store import load_tensors

PLACEMENTS = {"houlsby": ("attention", "ffn"), "pfeiffer": ("ffn",)}
TRAINABLE = "adapter"
INITS = ("houlsby", "bert")


class Bottleneck(nn.Module):
    """``x + up(relu(down(x)))``, started near identity.

    ``init``: ``houlsby`` draws both projections from N(0, init_std^2) truncated at two standard
    deviations (Houlsby et al. 2019, sec. 3.6; AdapterHub's ``init_weights="houlsby"``);
    ``bert`` draws ``down`` from BERT's N(0, 0.02^2) and ``up`` from N(0, init_std^2), untruncated.
    Biases start at zero.
    """

    def __init__(self, hidden: int, size: int, init_std: float = 1e-3, init: str = "bert") -> None:
        super().__init__()
        self.down, self.up = nn.Linear(hidden, size), nn.Linear(size, hidden)
        if init == "houlsby":
            for proj in (self.down, self.up):
                nn.init.trunc_normal_(proj.weight, std=init_std, a=-2 * init_std, b=2 * init_std)
        else:
            nn.init.normal_(self.down.weight, std=0.02)
            nn.init.normal_(self.up.weight, std=init_std)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(torch.relu(self.down(x)))


def _run_adapters(site: nn.Module):
    def hook(_module: nn.Module, _inputs: tuple, out: torch.Tensor) -> torch.Tensor:
        for adapter in site.adapters.values():
            out = adapter(out)
        return out
    return hook


def _width(proj: nn.Module) -> int:
    """Output width of a ``Linear`` or GPT-2's ``Conv1D`` (``nf``)."""
    return getattr(proj, "out_features", None) or getattr(proj, "nf", None) or proj.weight.shape[0]


Site = tuple[str, nn.Module, nn.Module, nn.Module]


def adapter_sites(model: nn.Module) -> dict[str, list[Site]]:
    """``{"attention": [...], "ffn": [...]}`` of ``(holder name, holder, output projection,
    the module the adapters run after)`` in every layer; the holder (the projection's parent)
    keeps the ``adapters``."""
    names = {id(m): n for n, m in unwrap(model).named_modules()}
    sites: dict[str, list[Site]] = {}
    for kind, block in (("attention", "attn"), ("ffn", "ffn")):
        sites[kind] = []
        for proj, after in block_outputs(model, block):
            holder_name = names[id(proj)].rpartition(".")[0]
            sites[kind].append((holder_name, unwrap(model).get_submodule(holder_name), proj,
                                after))
    if not sites["ffn"]:
        raise FtlabError(f"Found no FFN output projections ({arch_of(model).ffn_out}) in a "
                         f"'{type(unwrap(model)).__name__}' to put adapters in.",
                         "check ftlab/model/arch.py's entry for this family.")
    return sites


def _ensure_site(holder: nn.Module, after: nn.Module) -> nn.ModuleDict:
    if not hasattr(holder, "adapters"):
        holder.adapters = nn.ModuleDict()
        after.register_forward_hook(_run_adapters(holder))
    return holder.adapters


class BottleneckAdapter(RequiresGradState):
    """Args:
        placement: ``houlsby`` (after attention and after FFN) or ``pfeiffer`` (after FFN).
        reduction_factor: hidden size / bottleneck size.
        train_layernorm: also train the LayerNorms (both papers did).
        init_std, init: the adapters' initialisation (``Bottleneck``: ``houlsby`` or ``bert``).
        stack_on: artefacts of earlier adapter stages, frozen beneath the new adapter (with
            their invertible adapters; their LayerNorms are loaded as the starting point).
        invertible: also train a MAD-X invertible adapter on the embeddings
            (``ftlab/peft/invertible.py``); ``invertible_reduction`` its reduction factor.
    """

    def __init__(self, placement: str = "pfeiffer", reduction_factor: int = 16,
                 train_layernorm: bool = True, init_std: float = 1e-3, init: str = "bert",
                 stack_on: list[str] | None = None, drop_top: int = 0,
                 reinit_top: int = 0, invertible: bool = False,
                 invertible_reduction: int = 2) -> None:
        if placement not in PLACEMENTS:
            raise FtlabError(f"Unknown adapter placement '{placement}'.",
                             f"use one of: {', '.join(PLACEMENTS)}.")
        self.name = f"adapter_{placement}"
        self.placement, self.reduction_factor = placement, reduction_factor
        if init not in INITS:
            raise FtlabError(f"Unknown adapter init '{init}'.", f"use one of: {', '.join(INITS)}.")
        for key, value in (("reduction_factor", reduction_factor),
                           ("invertible_reduction", invertible_reduction)):
            if not value >= 1:
                raise FtlabError(f"Adapter {key}={value} is not a reduction factor (width "
                                 "/ bottleneck width, >= 1).", f"use peft.{key} >= 1 (task "
                                 "adapters: 16; MAD-X language and invertible adapters: 2).")
        if not init_std >= 0:
            raise FtlabError(f"Adapter init_std={init_std} is negative.",
                             "use a small standard deviation, e.g. peft.init_std=1e-3.")
        self.train_layernorm, self.init_std, self.init = train_layernorm, init_std, init
        self.stack_on = list(stack_on or [])
        self.drop_top, self.reinit_top = drop_top, reinit_top
        self.invertible, self.invertible_reduction = invertible, invertible_reduction

    def apply(self, model: nn.Module) -> nn.Module:
        fresh = top_layer_ops(model, self.drop_top, self.reinit_top)
        freeze(model)
        # the up-front check (ftlab/validate.py) applies methods on the meta device, before an
        # earlier stage of the same pipeline has written the artefact to stack on
        meta = next(model.parameters()).is_meta
        for i, path in enumerate(self.stack_on):
            if not (meta and not Path(path).is_file()):
                stack_adapter(model, path, f"stack{i}")
        sites = adapter_sites(model)
        for kind in PLACEMENTS[self.placement]:
            for _name, holder, proj, after in sites[kind]:
                hidden = _width(proj)
                size = hidden // self.reduction_factor
                if size < 1:
                    raise FtlabError(f"Adapter reduction_factor={self.reduction_factor} leaves "
                                     f"no bottleneck unit for a hidden size of {hidden}.",
                                     f"use peft.reduction_factor <= {hidden}.")
                adapters = _ensure_site(holder, after)
                adapters[TRAINABLE] = Bottleneck(hidden, size, self.init_std, self.init).to(
                    proj.weight.device)
        if self.invertible:
            add_invertible(model, TRAINABLE, self.invertible_reduction, self.init_std)
        if self.train_layernorm:  # the norms of both blocks (LayerNorm or RMSNorm), per family
            for block in ("attn", "ffn"):
                for _proj, norm in block_modules(model, block):
                    if norm is not None:
                        unfreeze(norm)
        unfreeze(head_parameters(model))
        unfreeze(fresh)
        return model


def stack_adapter(model: nn.Module, path: str | Path, name: str) -> int:
    """Load the trained adapters of artefact ``path`` as frozen adapters called ``name``.

    Its ``adapters.adapter.*`` tensors become frozen adapters, its invertible adapter (if any)
    a frozen one on the embeddings, and its block LayerNorms (``train_layernorm``) are copied
    into the model, so the stacked adapter runs under the norms it was trained with; its head
    is not taken. Sizes come from the tensors, so the stacked adapter may have another
    placement or reduction factor. Returns how many adapter modules were added.
    """
    if not Path(path).is_file():
        raise FtlabError(f"peft.stack_on: no artefact at '{path}'.",
                         "point it at an earlier run's <stage>/trainable.safetensors.")
    marker = f".adapters.{TRAINABLE}."
    tensors = load_tensors(path)
    state = {k: v for k, v in tensors.items() if marker in k}
    if not state:
        raise FtlabError(f"'{path}' holds no adapters.",
                         "stack only artefacts of peft=adapter_houlsby/adapter_pfeiffer stages.")
    holders = {n: (h, p, a) for kind in adapter_sites(model).values() for n, h, p, a in kind}
    added = 0
    for key in sorted(k for k in state if k.endswith(".down.weight")):
        prefix = key[: key.index(marker)]
        if prefix not in holders:
            raise FtlabError(f"'{path}' has an adapter at {prefix}, which this model lacks.",
                             "stack adapters trained on the same model family and size.")
        holder, proj, after = holders[prefix]
        size, hidden = state[key].shape
        adapter = Bottleneck(hidden, size).to(proj.weight.device)
        own = key[: -len("down.weight")]
        adapter.load_state_dict({k[len(own):]: v for k, v in state.items() if k.startswith(own)})
        adapter.requires_grad_(False)
        _ensure_site(holder, after)[name] = adapter
        added += 1
    load_block_norms(model, tensors)
    return added + stack_invertible(model, tensors, TRAINABLE, name)
