"""Text-to-text classification (Raffel et al. 2020, T5): inputs and targets are both text.

A source template renders each row (``"sst2 sentence: {text}"``) and the target is the label's
target string (the label's name, or ``targets: {fresh: positive, ...}``).

- Seq2seq models (T5, BART): the encoder reads the source, the decoder is trained on the target.
- Decoder-only models (GPT-2, SmolLM2): the row is source + target; the loss is on the target
  tokens only (prompt tokens masked with -100).

Evaluation, both ways: **rank classification** (score every label's target string by its summed
log-probability given the source, pick the best: ``acc``, ``f1``) and **generation** (greedy
decoding of up to ``max_target_length`` tokens: ``em``, exact match with the row's target).
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from ftlab.data.sources import RawData
from ftlab.errors import FtlabError
from ftlab.model.backbone import ModelSpec, load_config, load_model
from ftlab.rules import at_least
from ftlab.tasks.base import TaskOutput, as_text
from ftlab.tasks.classify import Classify
from ftlab.tasks.generation import ExactMatch, GreedyGeneration
from ftlab.tasks.prompting import (
    continuation_ids,
    continuation_logprob,
    cut_rows,
    fit_template,
    input_logits,
)


class TextToText(GreedyGeneration, Classify):
    """Labels as text; trained with the LM loss on the target, evaluated by ranking and
    generating.

    Args:
        source: template over the data's text columns, e.g. ``"sst2 sentence: {text}"``.
        targets: label -> target string; None: the label names.
        max_length: source tokens (the source is cut to fit); decoder-only: source, longest
            target and EOS, so every row's source has the same room whatever its label.
        max_target_length: generated tokens at most.
        generate: also decode greedily at evaluation (``em``); off saves time.
        monitor: validation metric that picks the best epoch (``acc``: rank classification).
    """

    row_logits = False  # training scores target tokens; label scores exist at evaluation only

    def __init__(self, source: str = "{text}", targets: Mapping[str, str] | None = None,
                 max_length: Annotated[int, at_least(1, example="128")] = 128,
                 max_target_length: Annotated[int, at_least(1, example="8")] = 8,
                 generate: bool = True,
                 monitor: str = "acc") -> None:
        super().__init__(max_length=max_length, monitor=monitor)
        self.source, self.generate = source, generate
        if targets is not None and not isinstance(targets, Mapping):  # a list, one string
            raise FtlabError(f"stage.task.targets maps each label to its target string; got "
                             f"{targets!r}.", "write it as label: text, e.g. \"stage.task."
                             "targets={fresh: positive, rotten: negative}\", or null for the "
                             "label names.")
        # keys as the label names are (text): Hydra reads `{0: negative}`'s key as a number
        self.target_map = {str(k): v for k, v in targets.items()} if targets is not None \
            else None
        self.max_target_length = max_target_length
        self.seq2seq: bool | None = None
        self.eos: int | None = None

    def bind(self, raw: RawData, tokenizer: Any, text_columns: list[str]) -> None:
        super().bind(raw, tokenizer, text_columns)
        self.targets = [str((self.target_map or {}).get(label, label)) for label in self.labels]
        if self.target_map is not None and set(self.target_map) != set(self.labels):
            raise FtlabError(f"stage.task.targets names {sorted(self.target_map)}, but the "
                             f"data's labels are {list(self.labels)}.",
                             "give every label one target string, or targets: null for the "
                             "label names.")
        empty = {label: target for label, target in (self.target_map or {}).items()
                 if target is None or not str(target).strip()}
        if empty:  # None read as 'None'; '' scored as no tokens (a decoder crashed on it)
            raise FtlabError(f"stage.task.targets gives label(s) {sorted(empty)} no target "
                             f"text ({empty}).",
                             "give each label a non-empty target string, e.g. stage.task."
                             f"targets='{{{', '.join(f'{k}: <text>' for k in self.labels[:3])}}}'.")
        self._decoded: dict[int, str] = {}  # label -> its target as the tokenizer writes it
        # equal token ids (e.g. "Good"/"good" for an uncased tokenizer) mean equal rank scores
        # and equal generations: the labels cannot be told apart
        as_ids = [tuple(tokenizer(t, add_special_tokens=False)["input_ids"])
                  for t in self.targets]
        twice = sorted({t for t, i in zip(self.targets, as_ids, strict=True)
                        if as_ids.count(i) > 1})
        if twice:
            raise FtlabError(f"stage.task.targets gives several labels the same target "
                             f"{twice[0]!r} (as the tokenizer reads it: "
                             f"{dict(zip(self.labels, self.targets, strict=True))}).",
                             "give each label its own target string.")
        try:
            self.source.format_map({c: "" for c in self.text_columns})
            # the text columns the source uses: plain {column} fields only
            self.fields = [f for _, f, _, _ in string.Formatter().parse(self.source)
                           if f is not None]
            odd = [f for f in self.fields if f not in self.text_columns]
            if odd:
                raise ValueError(f"{odd[0]!r} is not a column name")
        except (KeyError, ValueError, IndexError, AttributeError) as err:
            raise FtlabError(f"The source template {self.source!r} does not fit the data's text "
                             f"columns {self.text_columns} ({err!r}).",
                             "use {column} fields of data.text_columns, e.g. "
                             f"stage.task.source='{_example(self.text_columns)}'.") from None
        self.features = ("input_ids", "attention_mask", "labels", "class_id")

    def featurize(self, batch: dict[str, list]) -> dict[str, list]:
        n = len(batch[self.text_columns[0]])
        out: dict[str, list] = {"input_ids": [], "labels": [], "class_id": []}
        room = self.source_room() if n and not self.seq2seq else None
        for i in range(n):
            texts = {c: as_text(batch[c][i]) for c in self.fields}
            label = batch["label"][i]
            if isinstance(label, list):  # a soft label would be cut to its argmax, silently
                raise FtlabError("stage=text2text learns one target string per row, but these "
                                 "rows have soft labels (a distillation stage's teachers' "
                                 "probabilities).",
                                 "distil into stage=classify or stage=cloze (they learn soft "
                                 "labels), or give the stage teacher_rows: N (iPET: the gold "
                                 "rows plus N rows with the teachers' hard labels).")
            cid = int(label)
            ids, labels = self.encode(texts, self.targets[cid], room)
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["class_id"].append(cid)
        out["attention_mask"] = [[1] * len(x) for x in out["input_ids"]]
        out["length"] = [len(x) for x in out["input_ids"]]
        return out

    def encode(self, texts: dict[str, str], target: str,
               room: int | None = None) -> tuple[list[int], list[int]]:
        """(input ids, label ids): seq2seq: source / target; decoder-only: source (within
        ``room`` tokens, :meth:`source_room`) + target / -100 over the source, then the
        target's ids. A long source loses tokens from its longest text field, never the
        template's own words (its instruction, or the cue after the text)."""
        src, cut = self._fit(texts, room)
        if self.seq2seq:
            return src, self.tokenizer(target)["input_ids"]
        tgt = self.target_ids(self.source.format_map(cut), target)
        tgt += [self.eos] if self.eos is not None else []
        return src + tgt, [-100] * len(src) + tgt

    def _fit(self, texts: dict[str, str],
             room: int | None = None) -> tuple[list[int], dict[str, str]]:
        """The source's ids within its room, and ``texts`` as cut to fit it (``fit_template``)."""
        limit = self.max_length if self.seq2seq else room or self.source_room()
        said = None if self.seq2seq else f"the {limit} tokens max_length={self.max_length} " \
                                          "leaves after the longest target and EOS"
        return fit_template(self.tokenizer, self.source.format_map, texts, limit,
                            f"source template {self.source!r}", "stage.task.source", said)

    def cut_to_fit(self, columns: Mapping[str, list]) -> list[bool]:
        room = None if self.seq2seq else self.source_room()  # the same for every row
        return cut_rows(lambda texts: self._fit(texts, room), columns, self.fields)

    def source_room(self) -> int:
        """Decoder-only: the source's tokens, ``max_length`` less the longest target and its
        EOS. The same for every row: cut to fit its own target, a long row's prompt would
        tell its label at evaluation (and differ from the prompt predict scores, label 0's)."""
        eos = int(self.eos is not None)
        longest = max(self.targets, key=lambda t: len(self.target_ids("", t)))
        room = self.max_length - len(self.target_ids("", longest)) - eos
        if room < 1:
            raise FtlabError(f"stage.task.max_length={self.max_length} leaves no token for the "
                             f"source: a decoder-only row is the source, then the target "
                             f"{'and EOS ' if eos else ''}within max_length, and the target "
                             f"{longest!r} alone takes {self.max_length - room - eos} tokens.",
                             f"raise stage.task.max_length above {self.max_length - room} "
                             "(the source gets the rest), or shorten stage.task.targets.")
        return room

    def target_ids(self, source: str, target: str) -> list[int]:
        """A decoder-only target's ids as they follow the source (after a space)."""
        return continuation_ids(self.tokenizer, source, " " + target)

    def see_model(self, config: Any) -> None:
        """Seq2seq or decoder-only, from the model's config (before featurising)."""
        from transformers.models.auto import modeling_auto as auto

        # the end of a target: the tokenizer's EOS, else the model's (a WordPiece tokenizer
        # on a decoder has none of its own)
        eos = config.eos_token_id if self.tokenizer.eos_token_id is None else \
            self.tokenizer.eos_token_id
        self.eos = eos[0] if isinstance(eos, list) else eos
        if getattr(config, "is_encoder_decoder", False):
            self.seq2seq = True
        elif config.model_type in auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and \
                config.model_type not in auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES:
            self.seq2seq = False
        else:
            raise FtlabError(f"stage=text2text needs a seq2seq (T5, BART) or decoder-only "
                             f"(GPT-2, SmolLM2) model; '{config.model_type}' is an encoder.",
                             "use stage=cloze (masked LMs) or stage=classify for encoders.")

    def positions_past_max_length(self) -> tuple[int, str, str | None]:
        """(positions, why, key) a decoder-only evaluation adds after a row of ``max_length``:
        each label's target in turn (rank), then ``max_target_length`` generated tokens."""
        if self.seq2seq is not False:
            return 0, "", None  # seq2seq: the source alone goes through the encoder's positions
        longest = max((len(self.target_ids("", t)) for t in getattr(self, "targets", [])),
                      default=0)
        if self.generate and self.max_target_length >= longest:
            return self.max_target_length, f"{self.max_target_length} generated tokens " \
                                           "(task.max_target_length)", "max_target_length"
        return longest, f"the longest target's {longest} tokens (task.targets, ranked)", None

    def build_model(self, spec: ModelSpec) -> nn.Module:
        from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

        config = load_config(spec)
        self.see_model(config)
        auto_class = AutoModelForSeq2SeqLM if self.seq2seq else AutoModelForCausalLM
        return load_model(spec, auto_class, config=config)

    # --- forward ----------------------------------------------------------------------------
    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> TaskOutput:
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        if self.seq2seq:
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        else:  # the loss on target tokens only (labels hold -100 over the prompt)
            logits = input_logits(model(input_ids=ids, attention_mask=mask).logits,
                                  ids.shape[1])[:, :-1].float()
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        if model.training:
            return TaskOutput(loss)
        scores = self.rank(model, batch)
        extras = {"em": self.exact_match(model, batch)} if self.generate else {}
        return TaskOutput(loss, scores, extras)

    def _prompt(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Decoder-only: (ids, mask, index of each prompt's last token) of the prompts alone."""
        prompt_len = (batch["labels"] == -100).logical_and(batch["attention_mask"] == 1).sum(-1)
        width = batch["input_ids"].shape[1]
        keep = torch.arange(width, device=prompt_len.device)[None] < prompt_len[:, None]
        pad = self.tokenizer.pad_token_id or 0
        return batch["input_ids"].masked_fill(~keep, pad), keep.long(), prompt_len - 1

    def scores(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.rank(model, batch)

    def rank(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Rank classification: each label's target scored by its summed log-probability."""
        with torch.no_grad():
            if self.seq2seq:
                return torch.stack([self._seq2seq_score(model, batch, t) for t in self.targets],
                                   -1)
            ids, mask, last = self._prompt(batch)
            pad = self.tokenizer.pad_token_id or 0
            words = [self.target_ids("", t) for t in self.targets]
            return torch.stack([continuation_logprob(model, ids, mask, last, w, pad)
                                for w in words], -1)

    def _seq2seq_score(self, model: nn.Module, batch: dict[str, torch.Tensor],
                       target: str) -> torch.Tensor:
        tgt = torch.tensor(self.tokenizer(target)["input_ids"], device=batch["input_ids"].device)
        labels = tgt.expand(batch["input_ids"].shape[0], -1).contiguous()
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       labels=labels).logits.float()
        return F.log_softmax(logits, -1).gather(2, labels[..., None]).squeeze(-1).sum(-1)

    # --- metrics ----------------------------------------------------------------------------
    def metrics(self) -> MetricCollection:
        n = len(self.labels)
        metrics: dict[str, Any] = {"acc": MulticlassAccuracy(num_classes=n, average="micro"),
                                   "f1": MulticlassF1Score(num_classes=n, average="macro")}
        if self.generate:
            metrics["em"] = ExactMatch()
        return MetricCollection(metrics, compute_groups=False)

    def update(self, metrics: MetricCollection, out: TaskOutput,
               batch: dict[str, torch.Tensor]) -> None:
        em = out.extras.get("em")
        metrics.update(preds=out.logits.argmax(-1), target=batch["class_id"],
                       em=em if em is not None else torch.zeros(0))


def _example(columns: list[str]) -> str:
    """A source template over the data's own text columns (for an error's fix)."""
    if len(columns) == 1:
        return f"sst2 sentence: {{{columns[0]}}}"
    return " ".join(f"{c}: {{{c}}}" for c in columns)
