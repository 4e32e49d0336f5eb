"""Where each model family keeps its parts: one table, keyed by ``config.model_type``.

Everything that needs to find layers, embeddings, heads or projections (PEFT methods, hand-over
between stages, layer-wise LR decay, the MLM head) asks this module, so a new family is one
``Arch`` entry. Paths are relative to the *backbone root*: the model's ``base_model_prefix``
attribute (``model.bert``, ``model.transformer``) or, when it has none (``T5ForConditional
Generation``), the model itself. Block paths are relative to one transformer layer; a
component may be a negative index (``layer.-1``: T5's last sub-layer is the FFN in the encoder
and the decoder alike).

"Top" layers are those nearest the head: the last stack's top layers (for T5, the decoder's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from ftlab.errors import FtlabError

_BERT_BLOCKS = dict(attn_out="attention.output.dense", attn_norm="attention.output.LayerNorm",
                    ffn_out="output.dense", ffn_norm="output.LayerNorm",
                    attn_drop="attention.output.dropout", ffn_drop="output.dropout")


@dataclass(frozen=True)
class Arch:
    """One family's layout (see the module docstring for what paths are relative to).

    Attributes:
        family: the name shown in messages.
        stacks: the layer ``ModuleList``(s), bottom first (T5: encoder, then decoder).
        embeddings: embedding modules (layer depth 0).
        attn_out / ffn_out: output projections of the attention and FFN blocks (in a layer).
        attn_drop / ffn_drop: the dropout on that projection's output, where the family has
            one; bottleneck adapters run on its output (else the projection's), before the
            block's residual add, as Houlsby et al.'s and AdapterHub's code.
        attn_norm / ffn_norm: the LayerNorm (RMSNorm) of each block (trained with adapters).
        pooler: the pooler under the backbone root, re-initialised with ``reinit_top``.
        mlm_head: modules of the ``*ForMaskedLM`` model run in order on hidden states
            (empty: the family has no masked-LM head).
        lora: LoRA targets (the attention query/value projections; GPT-2's fused ``c_attn``).
        ia3 / ia3_ff: IA3 targets and which of them are feed-forward (scaled on the input).
        token_type_ids: the model's forward takes segment ids.
        biases: the pre-trained linears carry bias terms (BitFit needs them; it checks the
            model itself, so Qwen2's q/k/v biases count though its entry says False).
        eos_pooling: sequence classification reads the hidden state at the last EOS (T5).
        last_token_pooling: sequence classification reads the last non-pad token (decoder-only
            models; ``ftlab/peft/pooling.py`` keeps that true for prompt tuning).
        stems: parts of the backbone root that are backbone (empty: all of it).
    """

    family: str
    stacks: tuple[str, ...]
    embeddings: tuple[str, ...]
    attn_out: str
    attn_norm: str
    ffn_out: str
    ffn_norm: str
    lora: tuple[str, ...]
    ia3: tuple[str, ...]
    ia3_ff: tuple[str, ...]
    pooler: str | None = "pooler"
    mlm_head: tuple[str, ...] = ()
    token_type_ids: bool = False
    biases: bool = True
    eos_pooling: bool = False
    last_token_pooling: bool = False
    stems: tuple[str, ...] = ()
    attn_drop: str | None = None
    ffn_drop: str | None = None


BERT = Arch("BERT", ("encoder.layer",), ("embeddings",), **_BERT_BLOCKS, mlm_head=("cls",),
            lora=("query", "value"), ia3=("key", "value", "output.dense"),
            ia3_ff=("output.dense",), token_type_ids=True)
ROBERTA = Arch("RoBERTa", ("encoder.layer",), ("embeddings",), **_BERT_BLOCKS,
               mlm_head=("lm_head",), lora=("query", "value"),
               ia3=("key", "value", "output.dense"), ia3_ff=("output.dense",))
DEBERTA = Arch("DeBERTa-v2", ("encoder.layer",),  # + the relative-position embeddings
               ("embeddings", "encoder.rel_embeddings", "encoder.LayerNorm"), **_BERT_BLOCKS,
               mlm_head=("cls",), lora=("query_proj", "value_proj"),
               ia3=("key_proj", "value_proj", "output.dense"), ia3_ff=("output.dense",),
               token_type_ids=True)
ELECTRA = Arch("ELECTRA", ("encoder.layer",), ("embeddings", "embeddings_project"),
               **_BERT_BLOCKS, mlm_head=("generator_predictions", "generator_lm_head"),
               lora=("query", "value"), ia3=("key", "value", "output.dense"),
               ia3_ff=("output.dense",), token_type_ids=True)
DISTILBERT = Arch("DistilBERT", ("transformer.layer",), ("embeddings",),
                  attn_out="attention.out_lin", attn_norm="sa_layer_norm", ffn_out="ffn.lin2",
                  ffn_norm="output_layer_norm", ffn_drop="ffn.dropout", lora=("q_lin", "v_lin"),
                  ia3=("k_lin", "v_lin", "lin2"), ia3_ff=("lin2",),
                  mlm_head=("vocab_transform", "activation", "vocab_layer_norm",
                            "vocab_projector"))
GPT2 = Arch("GPT-2", ("h",), ("wte", "wpe"), attn_out="attn.c_proj", attn_norm="ln_1",
            ffn_out="mlp.c_proj", ffn_norm="ln_2", attn_drop="attn.resid_dropout",
            ffn_drop="mlp.dropout", lora=("c_attn",),
            ia3=("c_attn", "mlp.c_proj"), ia3_ff=("mlp.c_proj",), last_token_pooling=True)
LLAMA = Arch("Llama", ("layers",), ("embed_tokens",), attn_out="self_attn.o_proj",
             attn_norm="input_layernorm", ffn_out="mlp.down_proj",
             ffn_norm="post_attention_layernorm", lora=("q_proj", "v_proj"),
             ia3=("k_proj", "v_proj", "down_proj"), ia3_ff=("down_proj",), biases=False,
             last_token_pooling=True)
T5 = Arch("T5", ("encoder.block", "decoder.block"), ("shared",),
          attn_out="layer.0.SelfAttention.o", attn_norm="layer.0.layer_norm",
          ffn_out="layer.-1.DenseReluDense.wo", ffn_norm="layer.-1.layer_norm",
          attn_drop="layer.0.dropout", ffn_drop="layer.-1.dropout",
          lora=("q", "v"), ia3=("k", "v", "wo"), ia3_ff=("wo",), biases=False,
          eos_pooling=True, stems=("shared", "encoder", "decoder"))

#: ``config.model_type`` -> layout; Llama-style decoders with the same module names share one
ARCHS: dict[str, Arch] = {
    "bert": BERT, "roberta": ROBERTA, "xlm-roberta": ROBERTA, "deberta-v2": DEBERTA,
    "electra": ELECTRA, "distilbert": DISTILBERT, "gpt2": GPT2, "llama": LLAMA,
    "mistral": LLAMA, "qwen2": LLAMA, "qwen3": LLAMA, "t5": T5, "mt5": T5,
}


def supported() -> str:
    """``family (model_type, ...)`` for every family, for messages."""
    by_family: dict[str, list[str]] = {}
    for model_type, arch in ARCHS.items():
        by_family.setdefault(arch.family, []).append(model_type)
    return "; ".join(f"{fam} ({', '.join(types)})" for fam, types in by_family.items())


def arch_for(model_type: str) -> Arch:
    if model_type not in ARCHS:
        raise FtlabError(f"ftlab does not know where a '{model_type}' model keeps its layers.",
                         f"use a model of a supported family: {supported()}; or add an entry "
                         "to ftlab/model/arch.py's ARCHS.")
    return ARCHS[model_type]


def unwrap(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside PEFT wrappers (``PeftModel``, re-parametrisations)."""
    from transformers import PreTrainedModel

    for _ in range(8):
        if isinstance(model, PreTrainedModel):
            return model
        inner = model.get_base_model() if hasattr(model, "get_base_model") else getattr(
            model, "model", None)
        if not isinstance(inner, nn.Module):
            break
        model = inner
    raise FtlabError(f"Found no Hugging Face model inside a {type(model).__name__}.",
                     "pass a transformers model (or a PEFT wrapper of one).")


def arch_of(model: nn.Module) -> Arch:
    return arch_for(unwrap(model).config.model_type)


def backbone(model: nn.Module) -> nn.Module:
    """The backbone root: ``model.<base_model_prefix>``, or the model itself."""
    model = unwrap(model)
    prefix = getattr(model, "base_model_prefix", "")
    inner = getattr(model, prefix, None) if prefix else None
    return inner if isinstance(inner, nn.Module) else model


def _get(root: nn.Module, path: str) -> nn.Module | None:
    """``root``'s submodule at ``path`` (negative indices allowed); None when absent."""
    module: nn.Module | None = root
    for part in path.split("."):
        if isinstance(module, nn.ModuleList) and part.lstrip("-").isdigit():
            index = int(part)
            module = module[index] if -len(module) <= index < len(module) else None
        else:
            module = getattr(module, part, None)
        if not isinstance(module, nn.Module):
            return None
    return module


def backbone_modules(model: nn.Module) -> list[nn.Module]:
    root, arch = backbone(model), arch_of(model)
    if not arch.stems:
        return [root]
    return [m for s in arch.stems if (m := _get(root, s)) is not None]


def backbone_parameters(model: nn.Module) -> list[nn.Parameter]:
    seen: dict[int, nn.Parameter] = {}
    for module in backbone_modules(model):
        seen |= {id(p): p for p in module.parameters()}
    return list(seen.values())


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters outside the backbone (task head, LM head, DeBERTa's pooler), untied."""
    inside = {id(p) for p in backbone_parameters(model)}
    return [p for p in unwrap(model).parameters() if id(p) not in inside]


def head_modules(model: nn.Module) -> list[str]:
    """Names of the model's top-level modules that make up the head (own, untied weights)."""
    model = unwrap(model)
    inside = {id(p) for p in backbone_parameters(model)}
    roots = {id(m) for m in backbone_modules(model)} | {id(backbone(model))}
    return [name for name, child in model.named_children()
            if id(child) not in roots and any(True for _ in child.parameters())
            and not any(id(p) in inside for p in child.parameters())]


def layer_stacks(model: nn.Module) -> list[nn.ModuleList]:
    """The transformer layer stacks present, bottom first (T5: encoder, decoder)."""
    root, arch = backbone(model), arch_of(model)
    stacks = [s for path in arch.stacks if isinstance(s := _get(root, path), nn.ModuleList)]
    if not stacks:
        raise FtlabError(f"Found no layer stack ({', '.join(arch.stacks)}) in a "
                         f"{type(unwrap(model)).__name__}.",
                         f"use a supported family: {supported()}.")
    return stacks


def top_stack(model: nn.Module) -> nn.ModuleList:
    """The stack whose top layers are "the top layers": the last (T5: the decoder)."""
    return layer_stacks(model)[-1]


def position_limit(model: nn.Module) -> int | None:
    """Positions the model's learned position embeddings hold (BERT 512, GPT-2 1,024; RoBERTa's
    padding offset excluded): a longer row fails with an index error. None: relative or rotary
    positions (T5, Llama, DeBERTa-v3), no hard limit."""
    for path in ("embeddings.position_embeddings", "wpe"):
        emb = _get(backbone(model), path)
        if isinstance(emb, nn.Embedding):
            return emb.num_embeddings - (0 if emb.padding_idx is None else emb.padding_idx + 1)
    return None


def embedding_modules(model: nn.Module) -> list[nn.Module]:
    root = backbone(model)
    return [m for path in arch_of(model).embeddings if (m := _get(root, path)) is not None]


def tied_embeddings(model: nn.Module, emb: nn.Module) -> list[nn.Module]:
    """``emb`` and every embedding sharing its weight: where a hook must go to see the input
    (T5's forward calls ``encoder``/``decoder.embed_tokens``, tied to ``shared``, never it)."""
    weight = getattr(emb, "weight", None)  # None: a container (BERT's embeddings block)
    return [emb, *(m for m in unwrap(model).modules() if weight is not None and m is not emb
                   and isinstance(m, nn.Embedding) and m.weight is weight)]


def pooler(model: nn.Module) -> nn.Module | None:
    path = arch_of(model).pooler
    return _get(backbone(model), path) if path else None


def _beside_out(model: nn.Module, block: str, part: str) -> list[tuple[nn.Module, Any]]:
    """``(output projection, the block's norm or drop by ``part``, None where absent)`` of block
    ``attn`` or ``ffn`` in every layer that has the projection."""
    arch = arch_of(model)
    out, other = getattr(arch, f"{block}_out"), getattr(arch, f"{block}_{part}")
    found = [(_get(layer, out), _get(layer, other) if other else None)
             for stack in layer_stacks(model) for layer in stack]
    return [(o, x) for o, x in found if o is not None]


def block_modules(model: nn.Module, block: str) -> list[tuple[nn.Module, nn.Module]]:
    """``(output projection, its norm)`` of block ``attn`` or ``ffn`` in every layer."""
    return _beside_out(model, block, "norm")


def block_outputs(model: nn.Module, block: str) -> list[tuple[nn.Module, nn.Module]]:
    """``(output projection, the module whose output joins the residual)`` of block ``attn``
    or ``ffn`` in every layer: the dropout after the projection where the family has one, else
    the projection itself."""
    return [(o, d if d is not None else o) for o, d in _beside_out(model, block, "drop")]


def mlm_head(model: nn.Module) -> nn.Module:
    """The masked-LM head of a ``*ForMaskedLM`` model, as one module (hidden -> logits)."""
    arch, model = arch_of(model), unwrap(model)
    parts = [_get(model, path) for path in arch.mlm_head]
    if not parts or any(p is None for p in parts):
        raise no_mlm_head(arch, type(model).__name__)
    return parts[0] if len(parts) == 1 else nn.Sequential(*parts)


def no_mlm_head(arch: Arch, what: str = "") -> FtlabError:
    masked = sorted({a.family for a in ARCHS.values() if a.mlm_head})
    return FtlabError(f"A {arch.family} model{f' ({what})' if what else ''} has no masked-LM "
                      "head.", f"masked LM (stage=mlm, aux_mlm_weight) needs one of: "
                      f"{', '.join(masked)}; train decoder-only models with a causal LM.")


def peft_task_type(model: nn.Module) -> str | None:
    """HF ``peft`` task type of the task model (None for a masked LM or a bare backbone)."""
    name = type(unwrap(model)).__name__
    for suffix, task in (("ForSequenceClassification", "SEQ_CLS"), ("ForCausalLM", "CAUSAL_LM"),
                         ("LMHeadModel", "CAUSAL_LM"), ("ForTokenClassification", "TOKEN_CLS"),
                         ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
                         ("ForQuestionAnswering", "QUESTION_ANS")):
        if name.endswith(suffix):
            return task
    return None
