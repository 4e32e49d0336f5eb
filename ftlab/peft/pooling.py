"""Last-token pooling that survives prompt tuning on decoder-only classifiers.

A decoder-only ``*ForSequenceClassification`` (GPT-2, Llama) classifies at the last non-pad
token, which it finds from ``input_ids``. Prompt tuning (and p-tuning) prepend soft prompts, so
``peft`` calls the model with ``inputs_embeds`` instead; Transformers then cannot see the pads
and reads the last position, a pad for every shorter row of a right-padded batch, so a row's
prediction would depend on the longest row it was batched with.

:func:`pool_last_real_token` adds a forward hook on the backbone that, for ``inputs_embeds``
calls, copies the hidden state of each row's last attended position (from the attention mask,
which ``peft`` extends over the virtual tokens) into the last position, the one Transformers
then reads. Calls with ``input_ids`` (Transformers pools them itself) are left alone.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ftlab.model.arch import arch_of, backbone, peft_task_type


def _last_real(module: nn.Module, args: tuple, kwargs: dict[str, Any], out: Any) -> Any:
    mask = kwargs.get("attention_mask")
    if kwargs.get("inputs_embeds") is None or mask is None or mask.dim() != 2:
        return out
    hidden = out.last_hidden_state
    positions = torch.arange(mask.shape[-1], device=hidden.device)
    last = (positions * mask.to(hidden.device, torch.long)).argmax(-1)  # left or right padding
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    out.last_hidden_state = torch.cat([hidden[:, :-1], hidden[rows, last].unsqueeze(1)], dim=1)
    return out


def needs_pooling_fix(model: nn.Module, config: Any) -> bool:
    """Prompt learning that feeds ``inputs_embeds`` (not prefix tuning, which keeps
    ``input_ids``) to a decoder-only sequence classifier."""
    peft_type = str(getattr(config.peft_type, "value", config.peft_type))
    return (getattr(config, "is_prompt_learning", False) and peft_type != "PREFIX_TUNING"
            and peft_task_type(model) == "SEQ_CLS" and arch_of(model).last_token_pooling)


def pool_last_real_token(model: nn.Module) -> None:
    """Hook ``model``'s backbone (see the module docstring); call it once per model."""
    backbone(model).register_forward_hook(_last_real, with_kwargs=True)
