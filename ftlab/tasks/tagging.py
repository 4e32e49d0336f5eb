"""Word-level tagging helpers: sub-word label alignment, a words-ready tokenizer, and
entity-level precision/recall/F1 (CoNLL evaluation via ``seqeval``'s entity extraction)."""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from typing import Any

import torch
from torchmetrics import Metric

from ftlab.errors import FtlabError

#: the label of positions the loss and metrics skip (later sub-tokens, specials, padding)
IGNORE = -100


def words_tokenizer(tokenizer: Any) -> Any:
    """A tokenizer that tokenises pre-split words as they appear inside a sentence.

    Byte-level BPE (RoBERTa, GPT-2, Llama 3, SmolLM2) marks a word's leading space in its first
    token (``Ġword``); fed words one by one without ``add_prefix_space`` it would tokenise each
    as a sentence start (``word``), tokens the model rarely saw. A copy whose byte-level
    pre-tokeniser adds the prefix space is returned; the original (shared with other stages)
    is unchanged. WordPiece and SentencePiece tokenizers are returned as they are.
    """
    if not getattr(tokenizer, "is_fast", False):
        name = type(tokenizer).__name__
        raise FtlabError(f"stage=tokens needs a fast tokenizer (word_ids); {name} is a slow one.",
                         "use a model whose tokenizer has a tokenizer.json (most do).")
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if not _prefix_space(spec.get("pre_tokenizer")):
        return tokenizer
    from tokenizers import Tokenizer

    words = copy.deepcopy(tokenizer)
    words.backend_tokenizer.pre_tokenizer = Tokenizer.from_str(json.dumps(spec)).pre_tokenizer
    if hasattr(words, "add_prefix_space"):
        words.add_prefix_space = True
    return words


def _prefix_space(node: Any) -> bool:
    """Set ``add_prefix_space`` on every byte-level pre-tokeniser in ``node`` (a pre-tokeniser's
    JSON); whether any was off."""
    changed = False
    if isinstance(node, dict):
        if node.get("type") == "ByteLevel" and not node.get("add_prefix_space", False):
            node["add_prefix_space"] = True
            changed = True
        for value in node.values():
            changed |= _prefix_space(value)
    elif isinstance(node, list):
        for value in node:
            changed |= _prefix_space(value)
    return changed


def align(word_ids: Sequence[int | None], word_labels: Sequence[int] | None) -> list[int]:
    """Per sub-token labels: the first sub-token of word ``w`` gets ``word_labels[w]``; later
    sub-tokens of the same word, special tokens (``None``) get :data:`IGNORE`."""
    out, previous = [], None
    for w in word_ids:
        if w is None or w == previous or word_labels is None:
            out.append(IGNORE)
        else:
            out.append(int(word_labels[w]))
        previous = w
    return out


def entities(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """The (type, start, end) spans in a BIO tag sequence, as CoNLL's conlleval reads them
    (an ``I-X`` after ``O`` or another type starts an entity): ``seqeval``'s default mode."""
    from seqeval.metrics.sequence_labeling import get_entities

    return set(get_entities(list(tags)))


class EntityScore(Metric):
    """Micro-averaged entity-level precision, recall or F1 over all sentences (exact span and
    type match), the figures ``seqeval.metrics`` reports; summed counts, so it syncs across
    ranks. ``update(preds, target)`` takes tag ids ``[batch, tokens]``; positions whose target
    is -100 (later sub-tokens, specials, padding) are skipped. ``cut`` (per row: gold entities
    past the row's cut, ``max_length``) adds missed gold entities, and ``crossing`` (per row:
    1 when one of them starts before the cut) drops the gold entity the kept words end in (only
    its start is visible): the scores are those of the whole sentences with the cut words
    predicted ``O``."""

    full_state_update = False

    def __init__(self, labels: Sequence[str], which: str = "f1") -> None:
        super().__init__()
        if which not in ("f1", "precision", "recall"):
            raise ValueError(f"which must be f1, precision or recall, got {which!r}")
        self.labels, self.which = list(labels), which
        for name in ("tp", "predicted", "gold"):
            self.add_state(name, torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor, cut: torch.Tensor | None = None,
               crossing: torch.Tensor | None = None) -> None:
        rows = len(target)
        cuts = cut.tolist() if cut is not None else [0] * rows
        crosses = crossing.tolist() if crossing is not None else [0] * rows
        for p, t, lost, cross in zip(preds.tolist(), target.tolist(), cuts, crosses, strict=True):
            keep = [i for i, x in enumerate(t) if x != IGNORE]
            gold = entities([self.labels[t[i]] for i in keep])
            if cross:  # the gold entity running past the cut: its visible part is no entity
                gold = {g for g in gold if g[2] != len(keep) - 1}
            pred = entities([self.labels[p[i]] for i in keep])
            self.gold += lost
            self.tp += len(gold & pred)
            self.predicted += len(pred)
            self.gold += len(gold)

    def compute(self) -> torch.Tensor:
        tp = self.tp.double()
        precision = tp / self.predicted if self.predicted > 0 else tp * 0
        recall = tp / self.gold if self.gold > 0 else tp * 0
        if self.which == "precision":
            return precision.float()
        if self.which == "recall":
            return recall.float()
        total = precision + recall
        return (2 * precision * recall / total if total > 0 else total * 0).float()
