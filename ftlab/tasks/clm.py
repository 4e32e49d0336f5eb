"""Causal-LM adaptive fine-tuning for decoder models (DAPT/TAPT for GPT-2, Llama, SmolLM2).

Next-token prediction on unlabelled text (labels, if any, are ignored). Texts end with the
tokenizer's EOS; with ``pack`` they are concatenated into full ``max_length`` blocks (EOS between
texts, as GPT-2 was pre-trained), otherwise each text is one row, truncated. The loss and the
perplexity count real tokens only: targets at padded positions are -100 (found from
``attention_mask``, since the pad token is often EOS itself).
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
from torch import nn
from torchmetrics import MetricCollection

from ftlab.data.sources import RawData
from ftlab.errors import FtlabError
from ftlab.model.backbone import ModelSpec, load_config, load_model
from ftlab.rules import at_least
from ftlab.tasks.base import TaskDefaults, TaskOutput, as_text
from ftlab.tasks.mlm import Perplexity


def check_decoder(config: Any) -> None:
    """Refuse models that are not decoder-only causal LMs (BERT-style encoders, T5...)."""
    from transformers.models.auto import modeling_auto as auto

    CAUSAL, MASKED = auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES

    kind = config.model_type
    why = ("is an encoder-decoder" if getattr(config, "is_encoder_decoder", False) else
           "was pre-trained as a masked LM (an encoder)" if kind in MASKED else
           "has no causal-LM head in transformers" if kind not in CAUSAL else None)
    if why:
        raise FtlabError(f"stage=clm needs a decoder-only language model, but '{kind}' {why}.",
                         "use a decoder (model=smollm2, GPT-2, Llama...) for stage=clm, or "
                         "stage=mlm for encoder models.")


class CausalLM(TaskDefaults):
    """Next-token cross-entropy on unlabelled text; metrics: perplexity.

    Args:
        max_length: tokens per row (with ``pack``: per block).
        pack: concatenate texts (each followed by EOS) into full ``max_length`` blocks.
        monitor: validation metric that picks the best epoch (``loss``: lowest wins).
    """

    features = ("input_ids", "attention_mask")  # targets are the inputs, shifted by the model
    row_logits = False  # next-token logits per position, no per-row class scores
    token_loss = True  # val/loss weights each batch by its predicted tokens (extras["count"])

    def __init__(self, max_length: Annotated[int, at_least(2, example="128")] = 128,
                 pack: bool = True, monitor: str = "loss") -> None:
        self.max_length, self.pack = max_length, pack
        self.monitor, self.mode = monitor, "min"
        self.info: dict[str, Any] = {}

    def bind(self, raw: RawData | None, tokenizer: Any, text_columns: list[str]) -> None:
        # EOS ends a text; a WordPiece vocabulary (the tiny test models) ends texts with [SEP]
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else (
            tokenizer.sep_token_id)
        if eos is None:
            raise FtlabError("The tokenizer has no end-of-text (EOS) token, so texts cannot be "
                             "separated for causal-LM training.",
                             "use a decoder's own tokenizer (model.tokenizer=null), or one "
                             "with an eos_token.")
        self.tokenizer, self.text_columns, self.eos = tokenizer, list(text_columns), eos
        self.info = {"eos_token": tokenizer.convert_ids_to_tokens(eos)}

    def featurize(self, batch: dict[str, list]) -> dict[str, list]:
        """Only ``input_ids``/``attention_mask``: a causal LM takes no ``token_type_ids``."""
        cols = [[as_text(t) for t in batch[c]] for c in self.text_columns]
        texts = [" ".join(parts) for parts in zip(*cols, strict=True)]
        pieces = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        if not self.pack:
            ids = [[*p[: self.max_length - 1], self.eos] for p in pieces if p]
        else:
            stream = [t for p in pieces if p for t in (*p, self.eos)]
            size = self.max_length
            blocks = [stream[i : i + size] for i in range(0, len(stream), size)]
            ids = [b for b in blocks if len(b) >= min(8, size)]  # drop a tiny remnant
        return {"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids],
                "length": [len(x) for x in ids]}

    def build_model(self, spec: ModelSpec) -> nn.Module:
        from transformers import AutoModelForCausalLM

        config = load_config(spec)
        check_decoder(config)
        return load_model(spec, AutoModelForCausalLM, config=config)

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> TaskOutput:
        """Mean NLL per predicted token; extras: summed NLL and predicted tokens."""
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        labels = ids if mask is None else ids.masked_fill(mask == 0, -100)
        out = model(input_ids=ids, attention_mask=mask, labels=labels)  # shifts internally
        n = (labels[:, 1:] != -100).sum()
        return TaskOutput(out.loss, logits=out.logits,
                          extras={"nll_sum": out.loss.detach() * n, "count": n})

    def metrics(self) -> MetricCollection:
        return MetricCollection({"ppl": Perplexity()})

    def update(self, metrics: MetricCollection, out: TaskOutput,
               batch: dict[str, torch.Tensor]) -> None:
        metrics.update(out.extras["nll_sum"], out.extras["count"])
