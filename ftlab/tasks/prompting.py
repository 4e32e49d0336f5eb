"""Patterns and verbalisers: a row rendered as a cloze question, label words as token ids.

A pattern is a Python format string over the data's text columns plus ``{mask}``, the slot the
model fills: ``"{text} It was {mask}."`` (Schick & Schuetze 2021, PET). A verbaliser maps each
label to one or more words (``{fresh: great, rotten: [terrible, awful]}``).

Token ids of a verbaliser word depend on what precedes it: byte-level BPE (GPT-2, RoBERTa,
SmolLM2) has separate tokens for "great" and " great". Words are therefore tokenised in the
context the pattern gives them (after the pattern's text before ``{mask}``, with its space).
"""

from __future__ import annotations

import string
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ftlab.errors import FtlabError

MASK = "mask"


@dataclass(frozen=True)
class Pattern:
    """A cloze pattern: literal text, ``{column}`` fields and exactly one ``{mask}``."""

    template: str

    def __post_init__(self) -> None:
        try:
            names = [f for _, f, _, _ in string.Formatter().parse(self.template) if f is not None]
        except ValueError as err:
            raise FtlabError(f"The pattern {self.template!r} is not a valid template ({err}).",
                             "write fields as {column} and the slot as {mask}, e.g. "
                             "'{text} It was {mask}.'; double braces {{ }} for literal ones."
                             ) from None
        if names.count(MASK) != 1:
            raise FtlabError(f"The pattern {self.template!r} has {names.count(MASK)} {{mask}} "
                             "slots; a cloze pattern has exactly one.",
                             "e.g. stage.task.pattern='{text} It was {mask}.'")
        if any(not n.isidentifier() for n in names):
            raise FtlabError(f"The pattern {self.template!r} has a field that is not a column "
                             f"name: {[n for n in names if not n.isidentifier()]}.",
                             "use plain {column} fields (no indexing or format specs).")

    @property
    def fields(self) -> list[str]:
        return [f for _, f, _, _ in string.Formatter().parse(self.template)
                if f is not None and f != MASK]

    @property
    def before_mask(self) -> str:
        """The template up to the slot, as written (fields unfilled)."""
        return self.template.split("{" + MASK + "}", 1)[0]

    def render(self, texts: Mapping[str, str], mask: str) -> str:
        return self.template.format_map({**texts, MASK: mask})

    def prefix(self, texts: Mapping[str, str]) -> str:
        """The rendered text before the slot, without trailing space (a causal LM continues it;
        the space belongs to the verbaliser word's token)."""
        return self.before_mask.format_map(dict(texts)).rstrip()


def check_fields(pattern: Pattern, columns: Sequence[str]) -> None:
    missing = [f for f in pattern.fields if f not in columns]
    if missing:
        raise FtlabError(f"The pattern {pattern.template!r} uses {missing}, which the data does "
                         f"not have as text columns (it has {list(columns)}).",
                         "name the data's text columns in the pattern, or set "
                         "data.text_columns to include them.")


def word_ids(tokenizer: Any, pattern: Pattern, word: str) -> list[int]:
    """Token ids of ``word`` where the pattern's slot is: after the pattern's text before
    ``{mask}``, separated by its whitespace (if any)."""
    before = pattern.before_mask
    gap = before[len(before.rstrip()):]  # the whitespace before the slot
    context = before.rstrip().format_map(_Blank()) or "."
    return continuation_ids(tokenizer, context, gap[:1] + word)


def continuation_ids(tokenizer: Any, context: str, text: str) -> list[int]:
    """Token ids of ``text`` as it is tokenised right after ``context`` (byte-level BPE gives
    " great" other ids than "great"); ``text`` alone where the context's ids are no prefix."""
    head = tokenizer(context, add_special_tokens=False)["input_ids"]
    both = tokenizer(context + text, add_special_tokens=False)["input_ids"]
    if both[: len(head)] == head and len(both) > len(head):
        return both[len(head):]
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _as_words(value: Any) -> list[Any]:
    """A verbaliser entry (a word or a list of words) as a list; a number is a word as written
    (YAML reads ``{pos: 5}``'s 5 as one); None and other values stay, for the caller to refuse."""
    items = list(value) if isinstance(value, Iterable) and not isinstance(value, str) \
        else [value]
    return [str(w) if isinstance(w, int | float) and not isinstance(w, bool) else w
            for w in items]


class _Blank(dict):
    def __missing__(self, key: str) -> str:
        return "x"


def verbaliser_ids(tokenizer: Any, pattern: Pattern, verbaliser: Mapping[str, Any],
                   labels: Sequence[str]) -> list[list[list[int]]]:
    """Per label (in the task's label order), per word, its token ids."""
    words = {str(k): _as_words(v) for k, v in verbaliser.items()}
    missing = [label for label in labels if label not in words]
    extra = [k for k in words if k not in labels]
    if missing or extra:
        raise FtlabError(f"The verbaliser's labels {sorted(words)} do not match the data's "
                         f"labels {list(labels)} (missing: {missing}, unknown: {extra}).",
                         "give every label of the data one or more words, e.g. "
                         f"\"stage.task.verbalizer={{{_example(labels, words)}}}\".")
    out = []
    for label in labels:
        if not words[label] or not all(isinstance(w, str) and w.strip() for w in words[label]):
            raise FtlabError(f"The verbaliser gives label '{label}' no word ({words[label]}).",
                             "give each label at least one non-empty word.")
        out.append([word_ids(tokenizer, pattern, w.strip()) for w in words[label]])
        unk = getattr(tokenizer, "unk_token_id", None)
        unknown = [w for w, ids in zip(words[label], out[-1], strict=True)
                   if unk is not None and unk in ids]
        if unknown:  # its score would be the unknown token's, whatever the word
            raise FtlabError(f"The verbaliser word(s) {unknown} of label '{label}' are not in the "
                             f"tokenizer's vocabulary: they read as {tokenizer.unk_token!r}, "
                             "so the label would be scored by the unknown token.",
                             "choose words the tokenizer knows (stage.task.verbalizer).")
    owner: dict[tuple[int, ...], str] = {}  # a word's ids -> the first label that has it
    for label, ids in zip(labels, out, strict=True):
        for word, w in zip(words[label], ids, strict=True):
            other = owner.setdefault(tuple(w), label)
            if other != label:  # the same score for both labels: they cannot be told apart
                raise FtlabError(f"The verbaliser word {word.strip()!r} of label '{label}' is "
                                 f"tokenised as a word of label '{other}' "
                                 f"({tokenizer.convert_ids_to_tokens(w)}): the two labels "
                                 "would get the same score.",
                                 "give each label its own words (an uncased tokenizer reads "
                                 "'Good' as 'good').")
    # a word twice in one label ('great' and 'Great', uncased) counts once: the log-sum-exp
    # would add log 2 to its label's score
    return [[list(w) for w in dict.fromkeys(tuple(w) for w in ws)] for ws in out]


def _example(labels: Sequence[str], words: Mapping[str, list]) -> str:
    """A verbaliser for the data's labels, as a user would write it: their words where the
    verbaliser gave some, ``<word>`` for the rest."""
    return ", ".join(f"{label}: {words[label][0] if words.get(label) else '<word>'}"
                     for label in labels)


def fit_texts(tokenizer: Any, pattern: Pattern, texts: dict[str, str], mask: str,
              max_length: int, prefix_only: bool = False) -> tuple[list[int], dict[str, str]]:
    """Token ids of the rendered pattern within ``max_length``, and the text fields as cut to
    fit: the longest text field is cut (at a token boundary) until it fits, never the
    pattern's own words or the slot."""
    return fit_template(tokenizer, pattern.prefix if prefix_only else
                        (lambda t: pattern.render(t, mask)), texts, max_length,
                        f"pattern {pattern.template!r}", "stage.task.pattern")


def fit_template(tokenizer: Any, render: Callable[[dict[str, str]], str],
                 texts: dict[str, str], max_length: int, what: str, key: str,
                 limit: str | None = None) -> tuple[list[int], dict[str, str]]:
    """Token ids of ``render(texts)`` within ``max_length``, and ``texts`` as cut to fit: the
    longest text is cut (at a token boundary) until it fits, never the template's own words
    (``what``, set by ``key``, names the template in errors; ``limit`` the length)."""
    texts = dict(texts)
    limit = limit or f"max_length={max_length} tokens"
    for _ in range(8):
        ids = tokenizer(render(texts))["input_ids"]
        over = len(ids) - max_length
        if over <= 0:
            return ids, texts
        name = max(texts, key=lambda k: len(texts[k]), default=None)
        if name is None or not texts[name]:
            raise FtlabError(f"The {what} alone is longer than {limit}.",
                             f"raise stage.task.max_length or shorten {key}.")
        enc = tokenizer(texts[name], add_special_tokens=False, return_offsets_mapping=True)
        keep = max(0, len(enc["input_ids"]) - over)  # its first `keep` tokens
        texts[name] = texts[name][: enc["offset_mapping"][keep][0]] if keep else ""
    raise FtlabError(f"Could not fit a row into {limit} with the {what}.",
                     "raise stage.task.max_length.")


def cut_rows(fit: Callable[[dict[str, str]], tuple[list[int], dict[str, str]]],
             columns: Mapping[str, list], fields: Sequence[str]) -> list[bool]:
    """Per row of ``columns``: whether ``fit`` (a task's ``fit_template``) cut its texts to fit
    the room that the template's own tokens leave them."""
    from ftlab.tasks.base import as_text

    rows = [{f: as_text(columns[f][i]) for f in fields}
            for i in range(len(next(iter(columns.values()), [])))]
    return [fit(texts)[1] != texts for texts in rows]


def continuation_logprob(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor,
                         last: torch.Tensor, word: Sequence[int], pad_id: int) -> torch.Tensor:
    """Summed log-probability under a causal LM of ``word``'s tokens right after each row's
    prompt (right-padded ``ids``; ``last``: index of each prompt's last token)."""
    n, width = len(word), ids.shape[1] + len(word)
    seq = torch.full((ids.shape[0], width), pad_id, dtype=ids.dtype, device=ids.device)
    att = torch.zeros_like(seq)
    seq[:, : ids.shape[1]], att[:, : ids.shape[1]] = ids, mask
    pos = last[:, None] + 1 + torch.arange(n, device=ids.device)  # where the word goes
    seq.scatter_(1, pos, torch.tensor(list(word), device=ids.device).expand(ids.shape[0], n))
    att.scatter_(1, pos, 1)
    logits = input_logits(model(input_ids=seq, attention_mask=att).logits, width)
    before = logits.gather(1, (pos - 1)[..., None].expand(-1, -1, logits.shape[-1])).float()
    logp = F.log_softmax(before, dim=-1)
    return logp.gather(2, seq.gather(1, pos)[..., None]).squeeze(-1).sum(-1)


def input_logits(logits: torch.Tensor, width: int) -> torch.Tensor:
    """The logits at the ``width`` input positions: prompt tuning (peft) prepends its virtual
    tokens' positions to a causal LM's output, which would shift every index by their count."""
    return logits[:, -width:]
