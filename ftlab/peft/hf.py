"""Methods from Hugging Face ``peft`` (LoRA, prefix tuning, prompt tuning, IA3...).

The YAML's ``config`` node is a ``peft`` config (``_target_: peft.LoraConfig``), so any method
``peft`` offers is one YAML file away. What the YAML leaves null comes from the model
(``ftlab/model/arch.py``): ``task_type`` from the task model's class (``*ForSequence
Classification`` -> ``SEQ_CLS``, ``*ForCausalLM`` -> ``CAUSAL_LM``, ``*ForTokenClassification``
-> ``TOKEN_CLS``, T5's ``*ForConditionalGeneration`` -> ``SEQ_2_SEQ_LM``, a masked LM -> none),
``target_modules`` / ``feedforward_modules`` from the family's entry. For classification the
whole head (``classifier``, ``score``, T5's ``classification_head``, DistilBERT's
``pre_classifier``, DeBERTa's ``pooler``...) goes into ``modules_to_save`` and trains. The
artefact is written twice: ftlab's ``trainable.safetensors`` and ``<stage>/peft/`` via
``save_pretrained``, which loads with ``peft.PeftModel.from_pretrained(base_model, ...)``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from torch import nn

from ftlab.errors import FtlabError, with_article
from ftlab.model.arch import (
    arch_of,
    backbone,
    head_modules,
    peft_task_type,
    unwrap,
)
from ftlab.peft.base import RequiresGradState
from ftlab.peft.layers import fresh_parameters, top_layer_ops, unfreeze
from ftlab.peft.pooling import needs_pooling_fix, pool_last_real_token

#: task types whose head is new and must train (LM heads are pre-trained: they stay frozen)
_FRESH_HEAD = {"SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS"}


def _value(x: Any) -> Any:
    return getattr(x, "value", x)


def fit_config(config: Any, model: nn.Module) -> Any:
    """A copy of the ``peft`` ``config`` with the model-dependent fields filled in."""
    arch, task = arch_of(model), peft_task_type(model)
    fields = {f.name for f in dataclasses.fields(config)}
    change: dict[str, Any] = {}
    if config.task_type is None and task is not None:
        change["task_type"] = task
    if "target_modules" in fields and config.target_modules is None:
        ia3 = _value(config.peft_type) == "IA3"
        change["target_modules"] = list(arch.ia3 if ia3 else arch.lora)
    if "feedforward_modules" in fields and config.feedforward_modules is None:
        change["feedforward_modules"] = list(arch.ia3_ff)
    if _value(change.get("task_type", config.task_type)) in _FRESH_HEAD:
        keep = list(config.modules_to_save or [])
        change["modules_to_save"] = keep + [m for m in head_modules(model) if m not in keep]
    if getattr(config, "is_prompt_learning", False):
        change |= _prompt_fields(config, model, change.get("task_type", config.task_type))
    return dataclasses.replace(config, **change) if change else config


def _prompt_fields(config: Any, model: nn.Module, task: Any) -> dict[str, Any]:
    """Check that prompt learning fits the model; fill the sizes peft cannot find itself."""
    import inspect

    arch, model_config = arch_of(model), unwrap(model).config
    name = str(_value(config.peft_type)).lower()
    if task is None:
        raise FtlabError(f"peft's {name} needs a task type, and "
                         f"{with_article(type(unwrap(model)).__name__)} (masked LM) has none in "
                         "peft.", "use peft=lora, ia3 or adapters for masked-LM stages "
                         "(stage=mlm, stage=cloze on an encoder).")
    if model_config.is_encoder_decoder and _value(task) != "SEQ_2_SEQ_LM":
        raise FtlabError(f"peft's {name} on {arch.family} works only for a seq2seq LM "
                         f"(SEQ_2_SEQ_LM); {with_article(type(unwrap(model)).__name__)} takes "
                         "no prompt embeddings or prefixes.", f"use peft=lora, ia3 or adapters for "
                         f"{arch.family} classification.")
    if _value(config.peft_type) == "PREFIX_TUNING":
        takes = [m for m in (unwrap(model), backbone(model))
                 if "past_key_values" in inspect.signature(m.forward).parameters]
        if not takes:
            raise FtlabError(f"Prefix tuning feeds key/value prefixes as past_key_values, which "
                             f"a {arch.family} model does not take.", "use a family that does "
                             "(BERT, RoBERTa, ELECTRA, GPT-2, Llama), or peft=prompt_tuning/lora.")
    if model_config.is_encoder_decoder:
        return {}
    out = {}  # attribute maps know DistilBERT's n_layers/n_heads, which peft reads by key
    for key, attr in (("num_layers", "num_hidden_layers"),
                      ("num_attention_heads", "num_attention_heads")):
        if getattr(config, key) is None and getattr(model_config, attr, None) is not None:
            out[key] = getattr(model_config, attr)
    if config.token_dim is None:  # prompts are input embeddings (ELECTRA's are narrower)
        prefix = _value(config.peft_type) == "PREFIX_TUNING"
        out["token_dim"] = (model_config.hidden_size if prefix
                            else unwrap(model).get_input_embeddings().embedding_dim)
    return out


def _check_types(config: Any, name: str) -> None:
    """A ``peft`` config key typed int, float or bool given a value of another kind (``r=abc``,
    ``lora_dropout=high``) stops here, named; peft itself fails later on a comparison."""
    import typing

    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        want, value = hints.get(field.name), getattr(config, field.name)
        if want not in (int, float, bool) or value is None:
            continue
        ok = (isinstance(value, bool) if want is bool else  # peft takes lora_alpha=16.0 too
              isinstance(value, (int, float)) and not isinstance(value, bool))
        if not ok:
            kind = {int: "an integer", float: "a number", bool: "true or false"}[want]
            got = with_article(type(value).__name__)
            raise FtlabError(f"peft.config.{field.name}={value!r} is {got}, "
                             f"but {name}'s {field.name} takes {kind}.",
                             f"set peft.config.{field.name} to {kind} (conf/peft/{name}.yaml "
                             "has the default).")


class HfPeft(RequiresGradState):
    """Args:
        config: a ``peft.PeftConfig`` (built by Hydra from the YAML's ``config`` node).
    """

    def __init__(self, config: Any, drop_top: int = 0, reinit_top: int = 0) -> None:
        self.config = config
        self.name = str(_value(config.peft_type)).lower()
        self.drop_top, self.reinit_top = drop_top, reinit_top

    def apply(self, model: nn.Module) -> nn.Module:
        from peft import get_peft_model

        fresh = top_layer_ops(model, self.drop_top, self.reinit_top)
        # unfrozen after peft froze all: heads created fresh, the auxiliary MLM head's own
        fresh = [*fresh, *fresh_parameters(model)]
        arch = arch_of(model)
        _check_types(self.config, self.name)
        config = fit_config(self.config, model)
        try:
            wrapped = get_peft_model(model, config)
        except (ValueError, TypeError, AttributeError, KeyError) as err:
            kind = unwrap(model).config.model_type
            fix = ("set peft.config.target_modules to this model's module names (its LoRA "
                   f"default: {list(arch.lora)}), or use another method."
                   if "target" in str(err).lower() else
                   f"correct that value under peft.config (conf/peft/{self.name}.yaml says what "
                   "each key means).")
            raise FtlabError(f"peft cannot apply {self.name} to a '{kind}' model ({arch.family}, "
                             f"{type(model).__name__}): {str(err).splitlines()[0]}",
                             fix) from None
        unfreeze(fresh)
        if needs_pooling_fix(model, config):
            pool_last_real_token(model)
        return wrapped

    def save(self, model: nn.Module, directory: str | Path) -> Path:
        """``save_pretrained`` into ``directory/peft`` (for ``PeftModel.from_pretrained``)."""
        out = Path(directory) / "peft"
        model.save_pretrained(str(out))
        return out

    def merged(self, model: nn.Module) -> nn.Module:
        """LoRA/IA3 folded into the weights (``merge_and_unload``); prompt and prefix tuning
        add inputs, not weights, and cannot fold."""
        from ftlab.peft.base import NotMergeable

        if getattr(self.config, "is_prompt_learning", False):
            raise NotMergeable(f"peft={self.name} learns extra inputs (virtual tokens or key/value "
                               "prefixes), which a plain Transformers model cannot hold.",
                               "load the PEFT folder onto the model it goes on, which ftlab-export "
                               "writes beside it (DIR/peft, DIR/base), or use ftlab.load / "
                               "ftlab-predict on the run.")
        from peft.utils import ModulesToSaveWrapper

        # trained heads first: IA3's unload copies `.weight` from whatever it replaces, and a
        # head that is a container (T5ClassificationHead) has none (AttributeError)
        for name, module in list(model.named_modules()):
            if isinstance(module, ModulesToSaveWrapper):
                parent, _, child = name.rpartition(".")
                head = module.unload_and_optionally_merge_module(
                    merge=True, safe_merge=False, adapter_names=None)
                setattr(model.get_submodule(parent), child, head)
        return model.merge_and_unload()
