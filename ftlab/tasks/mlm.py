"""Masked-LM adaptive fine-tuning (DAPT/TAPT); ``ftlab.tasks.aux_mlm`` adds its loss to other
tasks.

Vocabulary logits are computed only at masked positions (encoder -> gather -> head), which
roughly halves the step time on a CPU compared with logits for every position.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric, MetricCollection

from ftlab.data.sources import RawData
from ftlab.errors import FtlabError
from ftlab.model.arch import arch_for, backbone, head_parameters, mlm_head, no_mlm_head
from ftlab.model.backbone import ModelSpec, load_model
from ftlab.peft.layers import mark_fresh_named
from ftlab.resolve import resolve
from ftlab.rules import at_least, between
from ftlab.tasks.base import TaskDefaults, TaskOutput, as_text, check_room

log = logging.getLogger(__name__)


class Perplexity(Metric):
    """exp(mean negative log-likelihood per masked token), accumulated over batches."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("nll", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, nll_sum: torch.Tensor, count: torch.Tensor) -> None:
        self.nll += nll_sum.double()
        self.count += count.double()

    def compute(self) -> torch.Tensor:
        return torch.exp(self.nll / self.count.clamp(min=1)).float()


def split_mlm(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(encoder, MLM head) of a ``*ForMaskedLM`` model (per ``ftlab/model/arch.py``); None
    when the layout is unknown or the model is re-parametrised (it must run whole)."""
    from transformers import PreTrainedModel

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not isinstance(inner, PreTrainedModel):
        return None
    try:
        return backbone(inner), mlm_head(inner)
    except FtlabError:
        return None


class MaskedLM(TaskDefaults):
    """The masked-LM objective on unlabelled text (labels, if any, are ignored).

    Its output has no logits (vocabulary logits exist only at masked positions); ``extras``
    holds ``nll_sum`` and ``count`` (masked tokens) for perplexity.

    Args:
        max_length: tokens per row (with ``pack``: per block).
        mask_prob: share of (non-special) tokens predicted; BERT used 0.15. Of those, 80% become
            [MASK], 10% a random token, 10% stay unchanged.
        whole_word: mask all word pieces of a chosen word together (WordPiece ``##`` pieces,
            byte-level BPE ``Ġ`` and SentencePiece ``▁`` word starts; others are refused).
        pack: concatenate short texts into full ``max_length`` blocks (no padding waste).
        sparse_logits: vocabulary logits only at masked positions (same loss, ~2x faster).
        monitor: validation metric that picks the best epoch (``loss``: lowest wins).
    """

    features = ("input_ids", "attention_mask")  # labels are drawn per batch (``mask``)
    row_logits = False  # vocabulary logits at masked positions only, drawn anew each forward
    token_loss = True  # val/loss weights each batch by its predicted tokens (extras["count"])

    def __init__(self, max_length: Annotated[int, at_least(2, example="128")] = 128,
                 mask_prob: Annotated[float, between(0, 1, lo_open=True, hi_open=True,
                                                     example="0.15")] = 0.15,
                 whole_word: bool = False, pack: bool = True, sparse_logits: bool = True,
                 monitor: str = "loss") -> None:
        self.max_length, self.mask_prob, self.whole_word = max_length, mask_prob, whole_word
        self.pack, self.sparse_logits = pack, sparse_logits
        self.monitor, self.mode = monitor, "min"
        self.info: dict[str, Any] = {}

    def bind(self, raw: RawData | None, tokenizer: Any, text_columns: list[str]) -> None:
        if tokenizer.mask_token_id is None:
            raise FtlabError("The tokenizer has no [MASK] token, so it cannot train a masked LM.",
                             "use an encoder model (BERT, RoBERTa...) for stage=mlm.")
        check_room(self.max_length, tokenizer)
        self.tokenizer, self.text_columns = tokenizer, list(text_columns)
        self.special = torch.tensor(sorted(set(tokenizer.all_special_ids)))
        vocab = [str(t) for t in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))]
        self.continues = continuation_pieces(vocab, set(tokenizer.all_special_ids))
        if self.whole_word and not self.continues.any():
            raise FtlabError("stage.task.whole_word=true needs a tokenizer that marks word "
                             "pieces (WordPiece '##x', or 'Ġ'/'▁' word starts), and this one "
                             "marks none, so every piece would be masked on its own.",
                             "set stage.task.whole_word=false, or use the model's own "
                             "WordPiece, byte-level BPE or SentencePiece tokenizer.")

    def featurize(self, batch: dict[str, list]) -> dict[str, list]:
        cols = [[as_text(t) for t in batch[c]] for c in self.text_columns]
        texts = [" ".join(parts) for parts in zip(*cols, strict=True)]
        if not self.pack:
            enc = self.tokenizer(texts, truncation=True, max_length=self.max_length)
            special = set(self.special.tolist())  # a row of specials only has nothing to predict
            ids = [x for x in enc["input_ids"] if any(t not in special for t in x)]
        else:
            tok = self.tokenizer
            head = [tok.cls_token_id] if tok.cls_token_id is not None else []
            tail = [tok.sep_token_id] if tok.sep_token_id is not None else []
            body = self.max_length - len(head) - len(tail)
            stream: list[int] = []
            for piece in self.tokenizer(texts, add_special_tokens=False)["input_ids"]:
                if piece:
                    stream += [*piece, *tail]  # texts separated by [SEP]
            blocks = [stream[i : i + body] for i in range(0, len(stream), body)]
            ids = [[*head, *b, *tail] for b in blocks if len(b) >= min(8, body)]
        return {"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids],
                "length": [len(x) for x in ids]}

    def build_model(self, spec: ModelSpec) -> nn.Module:
        from transformers import AutoModelForMaskedLM

        model_type = spec.config.get("model_type")
        if model_type and not arch_for(model_type).mlm_head:
            raise no_mlm_head(arch_for(model_type))
        model = load_model(spec, AutoModelForMaskedLM)
        fresh = fresh_head(model, spec)
        mark_fresh_named(model, fresh)  # trained by every PEFT method
        self.info = {"mlm_head_fresh": fresh}
        return model

    def mask(self, batch: dict[str, torch.Tensor], train: bool) -> tuple[torch.Tensor, ...]:
        """(masked input ids, labels: the original id at predicted positions, else -100).

        Evaluation masks deterministically (a generator seeded from the batch's ids), so
        validation losses are comparable across epochs and runs.
        """
        ids = batch["input_ids"]
        gen = None
        if not train:
            gen = torch.Generator().manual_seed(int(ids[:, :16].sum()) % (2**31))
        rand = torch.rand(ids.shape, generator=gen).to(ids.device) if gen else torch.rand(
            ids.shape, device=ids.device)
        special = torch.isin(ids, self.special.to(ids.device))
        if "attention_mask" in batch:
            special |= batch["attention_mask"] == 0
        if self.whole_word:  # each piece takes the draw of its word's first piece
            starts = ~self.continues.to(ids.device)[ids.clamp(max=len(self.continues) - 1)]
            pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
            first = torch.where(starts, pos, torch.zeros_like(pos)).cummax(dim=1).values
            rand = rand.gather(1, first)
        chosen = (rand < self.mask_prob) & ~special
        if not chosen.any() and not special.all():  # a tiny batch may draw nothing: predict one
            chosen.view(-1)[(~special).view(-1).nonzero()[0]] = True
        labels = torch.where(chosen, ids, torch.full_like(ids, -100))
        how = torch.rand(ids.shape, generator=gen).to(ids.device) if gen else torch.rand(
            ids.shape, device=ids.device)
        masked = torch.where(chosen & (how < 0.8), self.tokenizer.mask_token_id, ids)
        swap = chosen & (how >= 0.8) & (how < 0.9)
        noise = (torch.randint(len(self.tokenizer), ids.shape, generator=gen) if gen else
                 torch.randint(len(self.tokenizer), ids.shape)).to(ids.device)
        return torch.where(swap, noise, masked), labels

    def masked_loss(self, model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor,
                    batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean loss over masked tokens, their count); logits only where labels != -100."""
        kwargs = {k: batch[k] for k in ("attention_mask", "token_type_ids") if k in batch}
        parts = split_mlm(model)
        n = (labels != -100).sum()
        if parts is None or not self.sparse_logits:
            out = model(input_ids=inputs, labels=labels, **kwargs)
            # no masked token (a batch of empty rows): loss 0, not the NaN of an empty mean
            return (out.loss if n > 0 else out.logits.sum() * 0), n
        hidden = parts[0](input_ids=inputs, **kwargs)[0]
        where = labels != -100
        logits = parts[1](hidden[where])
        total = F.cross_entropy(logits.float(), labels[where], reduction="sum")
        return total / n.clamp(min=1), n

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> TaskOutput:
        inputs, labels = self.mask(batch, train=model.training)
        loss, n = self.masked_loss(model, inputs, labels, batch)
        return TaskOutput(loss, extras={"nll_sum": loss.detach() * n, "count": n})

    def metrics(self) -> MetricCollection:
        return MetricCollection({"ppl": Perplexity()})

    def update(self, metrics: MetricCollection, out: TaskOutput,
               batch: dict[str, torch.Tensor]) -> None:
        metrics.update(out.extras["nll_sum"], out.extras["count"])


def continuation_pieces(vocab: list[str], special: set[int]) -> torch.Tensor:
    """Per vocabulary id: whether the piece continues the previous word (whole-word masking).

    WordPiece marks continuations (``##x``); byte-level BPE (RoBERTa, GPT-2: ``Ġx``) and
    SentencePiece (``▁x``) mark word starts, so there a piece without the mark continues its
    word (fairseq's whole-word mask); special tokens never do.
    """
    if any(t.startswith("##") for t in vocab):
        return torch.tensor([t.startswith("##") for t in vocab])
    for start in ("Ġ", "▁"):
        if any(t.startswith(start) for t in vocab):
            return torch.tensor([not t.startswith(start) and i not in special
                                 for i, t in enumerate(vocab)])
    return torch.zeros(len(vocab), dtype=torch.bool)


def fresh_head(model: nn.Module, spec: ModelSpec, say: bool = True) -> list[str]:
    """Names of MLM-head parameters the checkpoint lacks (created fresh), logged clearly
    (``say``)."""
    outside = {id(p) for p in head_parameters(model)}
    head = [n for n, p in model.named_parameters() if id(p) in outside]
    if spec.name_or_path is None:
        return head  # built from a config: everything is random anyway
    folder = Path(resolve(spec.name_or_path))
    files = list(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        return []  # a hub name: transformers itself reports missing weights
    from safetensors import safe_open

    keys: set[str] = set()
    for f in files:
        with safe_open(str(f), "pt") as st:
            keys |= set(st.keys())
    fresh = [n for n in head if n not in keys]
    if fresh and say:
        log.warning("The checkpoint %s has no MLM head: %d tensors created fresh and trained "
                    "(%s); the decoder is tied to the word embeddings.", spec.name_or_path,
                    len(fresh), ", ".join(fresh))
    return fresh
