"""Methods from Hugging Face ``peft`` (LoRA, prefix tuning, prompt tuning, IA3...).

The YAML's ``config`` node is a ``peft`` config (``_target_: peft.LoraConfig``), so any method
``peft`` offers is one YAML file away. With ``task_type: SEQ_CLS`` the classifier head is in
``modules_to_save`` and trains. The artefact is written twice: ftlab's
``trainable.safetensors`` and ``<stage>/peft/`` via ``save_pretrained``, which loads with
``peft.PeftModel.from_pretrained(base_model, "<stage>/peft")``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ftlab.errors import FtlabError
from ftlab.peft.base import RequiresGradState
from ftlab.peft.layers import top_layer_ops, unfreeze


class HfPeft(RequiresGradState):
    """Args:
        config: a ``peft.PeftConfig`` (built by Hydra from the YAML's ``config`` node).
    """

    def __init__(self, config: Any, drop_top: int = 0, reinit_top: int = 0) -> None:
        self.config = config
        self.name = str(getattr(config.peft_type, "value", config.peft_type)).lower()
        self.drop_top, self.reinit_top = drop_top, reinit_top

    def apply(self, model: nn.Module) -> nn.Module:
        from peft import get_peft_model

        fresh = top_layer_ops(model, self.drop_top, self.reinit_top)
        try:
            wrapped = get_peft_model(model, self.config)
        except (ValueError, TypeError, AttributeError) as err:
            kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
            raise FtlabError(f"peft cannot apply {self.name} to a '{kind}' model: {err}",
                             "set peft.config.target_modules to this model's module names "
                             "(e.g. [query, value] for BERT).") from None
        unfreeze(fresh)
        return wrapped

    def save(self, model: nn.Module, directory: str | Path) -> Path:
        """``save_pretrained`` into ``directory/peft`` (for ``PeftModel.from_pretrained``)."""
        out = Path(directory) / "peft"
        model.save_pretrained(str(out))
        return out
