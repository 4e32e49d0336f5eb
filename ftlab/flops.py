"""Model FLOPs of a training step, for model-FLOPs utilisation (MFU).

PaLM's definition (Chowdhery et al. 2022, appendix B): a token costs 6 x N FLOPs forward and
backward, N the parameters that multiply (``nn.Embedding`` tables are looked up, not multiplied, so
they are left out, except a table tied to the output layer, which multiplies there), plus
12 x layers x hidden x width for the attention scores and their weighted sum over a row of
``width`` tokens. Padded tokens count (they are computed). It is the full-fine-tuning count: a
frozen weight still multiplies forward and passes gradients back but gets no weight gradient,
so PEFT runs do about a third less than this says. For encoder-decoders the encoder's tokens
are counted through all layers (an approximation).

MFU = model FLOPs per second / the device's peak (an H100 SXM's dense bf16: 989e12).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class FlopRule:
    """What one token costs in a model: ``matmul_params`` (N), ``layers``, ``hidden``."""

    matmul_params: int
    layers: int
    hidden: int

    def per_batch(self, rows: int, width: int) -> float:
        """Model FLOPs of one training step (forward + backward) on ``rows`` x ``width``."""
        per_token = 6 * self.matmul_params + 12 * self.layers * self.hidden * width
        return float(rows * width * per_token)


def flop_rule(model: nn.Module) -> FlopRule | None:
    """The model's ``FlopRule`` (None where the architecture table does not know it)."""
    from ftlab.errors import FtlabError
    from ftlab.model.arch import layer_stacks

    tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    try:
        layers = sum(len(stack) for stack in layer_stacks(model))
    except (FtlabError, KeyError, AttributeError):
        return None
    config = getattr(model, "config", None)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "d_model", None)
    if not hidden:
        return None
    # parameters() yields a tied tensor once
    matmul = sum(p.numel() for p in model.parameters() if id(p) not in tables)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if weight is not None and id(weight) in tables:  # an LM head tied to the input table
        matmul += weight.numel()
    return FlopRule(matmul, layers, int(hidden))
