"""Token classification (named-entity recognition): a tag per word, BIO scheme.

Rows hold a list of words (``data.text_columns[0]``) and a list of tags (``data.label_column``;
ids in ``labels`` order: ``O`` first, then sorted, see ``ftlab/data/conll.py``). Words are
tokenised with the fast tokenizer's ``is_split_into_words``; the first sub-token of each word
carries the word's tag, later sub-tokens, special tokens and padding are -100 (skipped by the
loss and the metrics). Metrics: entity-level precision/recall/F1 (``seqeval``'s CoNLL entity
rules, micro-averaged) over whole sentences, and token accuracy over the words within
``max_length``. A row's words past ``max_length`` are cut; its gold entities not wholly inside
the kept words still count, as missed (``CUT`` features), so the F1 is the sentence's with the
cut words tagged ``O`` (what ``predict_rows`` gives them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from ftlab.data.conll import BIO
from ftlab.data.sources import RawData
from ftlab.errors import FtlabError
from ftlab.model.backbone import ModelSpec, load_model
from ftlab.tasks.base import TaskDefaults, TaskOutput, check_room
from ftlab.tasks.tagging import IGNORE, EntityScore, align, entities, words_tokenizer

#: per-row features for the entity scores, not model inputs: the row's gold entities not wholly
#: inside the words ``max_length`` keeps (missed), and whether one of them starts inside
#: (1; its visible part is no gold entity)
CUT = ("entities_cut", "entity_crossing")


class Tokens(TaskDefaults):
    """Cross-entropy per word (first sub-token) over the tag set; logits ``[batch, tokens,
    tags]`` (what R3F/SMART compare, position by position).

    Args:
        max_length: sub-tokens per row; words past it are cut (and not scored).
        monitor: validation metric that picks the best epoch (``f1``: entity-level F1).
    """

    def __init__(self, max_length: int = 128, monitor: str = "f1") -> None:
        self.max_length, self.monitor = max_length, monitor
        self.mode = "min" if monitor == "loss" else "max"
        self.labels: list[str] = []
        self.features: tuple[str, ...] = ("input_ids", "attention_mask", "labels")

    def bind(self, raw: RawData, tokenizer: Any, text_columns: list[str]) -> None:
        if raw.labels is None:
            raise FtlabError("stage=tokens needs tagged data, but data.label_column is null.",
                             "set data.label_column to the column of tag lists (data=wnut16 "
                             "and CoNLL files: tags).")
        if len(text_columns) != 1:
            raise FtlabError(f"stage=tokens reads one column of word lists, got "
                             f"data.text_columns={list(text_columns)}.",
                             "set data.text_columns=[tokens] (CoNLL files: tokens).")
        train = raw.splits.get("train") if len(raw.splits) else None
        first = train[0][text_columns[0]] if train is not None and len(train) else []
        if not isinstance(first, list):
            raise FtlabError(f"stage=tokens needs a list of words per row in column "
                             f"'{text_columns[0]}', got {type(first).__name__}.",
                             "use CoNLL files (word<TAB>tag lines) or jsonl rows with tokens "
                             "and tags lists; data.text_columns=[tokens] data.label_column=tags.")
        bad = [t for t in raw.labels if not BIO.match(t)]
        if bad:
            raise FtlabError(f"The tag set has non-BIO tags {bad[:5]}; stage=tokens scores "
                             "BIO entities (O, B-<type>, I-<type>).", "convert the tags to BIO.")
        check_room(self.max_length, tokenizer)
        self.labels = list(raw.labels)
        self.column = text_columns[0]
        self.tokenizer = words_tokenizer(tokenizer)
        self.features = (*tokenizer.model_input_names, "labels", *CUT)

    def featurize(self, batch: dict[str, list]) -> dict[str, list]:
        words = [_words(row) for row in batch[self.column]]
        enc = self._encode(words)
        tags = batch.get("label") or [None] * len(words)
        enc["labels"] = [align(enc.word_ids(i), t if isinstance(t, list) else None)
                         for i, t in enumerate(tags)]
        cut = [self._cut(enc.word_ids(i), t if isinstance(t, list) else None)
               for i, t in enumerate(tags)]
        enc[CUT[0]], enc[CUT[1]] = [c[0] for c in cut], [c[1] for c in cut]
        enc["length"] = [len(ids) for ids in enc["input_ids"]]
        return dict(enc)

    def _encode(self, words: list[list[str]]) -> Any:
        """The rows' sub-tokens within ``max_length``. A word the tokenizer turns into no
        sub-token (a control or zero-width character, an accent alone, '') is read as the
        unknown token, so it is tagged and scored like any word (without, its gold tag fell out
        of the sentence: an entity on it was neither found nor missed)."""
        enc = self.tokenizer(words, is_split_into_words=True, truncation=True,
                             max_length=self.max_length)
        unk = self.tokenizer.unk_token
        if unk is None:
            return enc
        fixed = None
        for i, row in enumerate(words):
            seen = {w for w in enc.word_ids(i) if w is not None}
            # the words kept: all of a row shorter than max_length; of a full one, those up
            # to its last word with a sub-token (the rest may have been cut)
            kept = len(row) if len(enc["input_ids"][i]) < self.max_length else max(seen,
                                                                                 default=-1)
            lost = set(range(kept)) - seen
            if lost:
                fixed = fixed or [list(r) for r in words]
                fixed[i] = [unk if j in lost else w for j, w in enumerate(row)]
        return enc if fixed is None else self.tokenizer(
            fixed, is_split_into_words=True, truncation=True, max_length=self.max_length)

    def _cut(self, word_ids: Sequence[int | None], tags: Sequence[int] | None) -> tuple[int, int]:
        """(gold entities not wholly inside the kept words, whether one starts inside them)."""
        kept = max((w for w in word_ids if w is not None), default=-1) + 1
        if tags is None or kept >= len(tags):
            return 0, 0
        spans = entities([self.labels[t] for t in tags])
        out = [s for s in spans if s[2] >= kept]
        return len(out), int(any(s[1] < kept for s in out))

    def build_model(self, spec: ModelSpec) -> nn.Module:
        from transformers import AutoModelForTokenClassification

        return load_model(spec, AutoModelForTokenClassification, num_labels=len(self.labels),
                          id2label=dict(enumerate(self.labels)),
                          label2id={name: i for i, name in enumerate(self.labels)})

    def scores(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Tag logits ``[batch, tokens, tags]``, one per input position (prompt tuning's
        prepended virtual tokens are dropped)."""
        logits = model(**{k: v for k, v in batch.items() if k not in ("labels", *CUT)}).logits
        return logits[:, -batch["input_ids"].shape[1]:]

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> TaskOutput:
        logits = self.scores(model, batch)
        labels = batch["labels"].flatten()
        total = nn.functional.cross_entropy(logits.float().flatten(0, 1), labels,
                                            ignore_index=IGNORE, reduction="sum")
        # the mean over scored words; a batch with none (rows without words: `"tokens": []`)
        # has loss 0, not the NaN of an empty mean (which stopped the run as diverged)
        words = (labels != IGNORE).sum()
        return TaskOutput(total / words.clamp(min=1), logits, {"count": words})

    def predict_rows(self, model: nn.Module, rows: list[Any],
                     batch_size: int = 64) -> list[dict[str, Any]]:
        """Per row ``{"tokens": [word, ...], "tags": [tag, ...], "scores": [p, ...]}``: each
        word's tag is the first sub-token's most likely one (``p`` its probability). A row is
        a list of words, a string (split on whitespace), a dict holding the words column, or
        a 1-tuple of either (what ``ftlab-predict`` passes).
        Words cut by ``max_length`` are tagged ``O`` with score null."""
        from ftlab.data.batching import PadCollator

        words = [_words(r[self.column] if isinstance(r, dict) else r) for r in rows]
        enc = self._encode(words)
        keep = [k for k in self.features if k not in ("labels", *CUT)]
        collate = PadCollator(self.tokenizer.pad_token_id)
        device = next(model.parameters()).device
        out = [{"tokens": w, "tags": [], "scores": []} for w in words]  # a row without words
        tagged = [i for i, w in enumerate(words) if w]  # (none: a GPT-2 tokenizer gives it no
        with torch.inference_mode():                     # token, which crashed the model)
            for lo in range(0, len(tagged), batch_size):
                idx = tagged[lo:lo + batch_size]
                batch = collate([{k: enc[k][i] for k in keep} for i in idx])
                batch = {k: v.to(device) for k, v in batch.items()}
                probs = self.scores(model, batch).float().softmax(-1).cpu()
                for j, i in enumerate(idx):
                    tags, scores = ["O"] * len(words[i]), [None] * len(words[i])
                    starts = align(enc.word_ids(i), range(len(words[i])))
                    for pos, w in enumerate(starts):
                        if w != IGNORE:
                            best = int(probs[j, pos].argmax())
                            tags[w], scores[w] = self.labels[best], float(probs[j, pos, best])
                    out[i] = {"tokens": words[i], "tags": tags, "scores": scores}
        return out

    def metrics(self) -> MetricCollection:
        return MetricCollection({
            "f1": EntityScore(self.labels, "f1"),
            "precision": EntityScore(self.labels, "precision"),
            "recall": EntityScore(self.labels, "recall"),
            "acc": MulticlassAccuracy(num_classes=len(self.labels), average="micro",
                                      ignore_index=IGNORE),
        }, compute_groups=False)

    def update(self, metrics: MetricCollection, out: TaskOutput,
               batch: dict[str, torch.Tensor]) -> None:
        metrics.update(out.logits.argmax(-1), batch["labels"], cut=batch.get(CUT[0]),
                       crossing=batch.get(CUT[1]))

    #: a run fails at entity F1 0 (no entity found); the all-``O`` token accuracy is only
    #: reported: with rare entities it is high, and a tagger that finds entities while
    #: over-tagging some words falls below it without having learnt nothing
    failed_by = ("f1",)
    token_loss = True  # val/loss is the mean over the split's scored words (extras["count"])

    def baseline(self, labels: Sequence[Any]) -> dict[str, float] | None:
        """Tagging every word ``O``: token accuracy is the share of ``O`` words; no entity is
        found, so entity F1 is 0."""
        if "O" not in self.labels:
            return None
        o = self.labels.index("O")
        words = [t for row in labels for t in row]
        return {"acc": sum(t == o for t in words) / max(len(words), 1), "f1": 0.0}


def _words(row: Any) -> list[str]:
    """A row to predict as its words: a list of words, or a string split on whitespace."""
    if isinstance(row, tuple) and len(row) == 1:  # one text column, as ftlab-predict passes it
        row = row[0]
    return row.split() if isinstance(row, str) else [str(w) for w in row]
