"""Generation for text-to-text classification: greedy decoding at evaluation and its exact
match (``em``), and the pre-flight check that ``max_target_length`` lets every target be written
whole. A mixin of ``ftlab.tasks.text2text.TextToText``, which gives it ``tokenizer``,
``seq2seq``, ``eos``, ``targets``, ``labels``, ``generate``, ``max_target_length``,
``target_ids`` and ``_prompt``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchmetrics import MeanMetric

from ftlab.errors import FtlabError
from ftlab.tasks.prompting import input_logits


class GreedyGeneration:
    """Greedy decoding of up to ``max_target_length`` tokens and its exact match."""

    tokenizer: Any
    seq2seq: bool | None
    eos: int | None
    targets: list[str]
    labels: list[str]
    generate: bool
    max_target_length: int
    _decoded: dict[int, str]

    def check_settings(self) -> None:
        """Generation stops after ``max_target_length`` tokens: a target longer than that could
        never be written whole, so its rows' exact match would be 0 however good the model."""
        if not self.generate:
            return
        written = [len(self._written(t)) for t in self.targets]
        for label, target, n in zip(self.labels, self.targets, written, strict=True):
            if n > self.max_target_length:
                raise FtlabError(f"stage.task.max_target_length={self.max_target_length} stops "
                                 f"generation before the end of label '{label}'s target "
                                 f"{target!r} ({n} tokens): exact match (em) could never count "
                                 "its rows.",
                                 "set stage.task.max_target_length to at least "
                                 f"{max(written)}, or stage.task.generate=false (rank "
                                 "classification only).")

    def _written(self, target: str) -> list[int]:
        """The tokens a model writes for ``target`` before it stops: a decoder the target's own
        (then EOS); a seq2seq model its label ids up to their EOS."""
        if not self.seq2seq:
            return self.target_ids("", target)
        ids = self.tokenizer(target)["input_ids"]
        return ids[:-1] if ids and ids[-1] == self.eos else ids

    def exact_match(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Greedy decoding (no cache: works through every PEFT wrapper) vs the row's target."""
        eos = self.eos
        rows = batch["input_ids"].shape[0]
        with torch.no_grad():
            if self.seq2seq:
                start = getattr(getattr(model, "config", None), "decoder_start_token_id", None)
                dec = torch.full((rows, 1), start if start is not None else 0,
                                 device=batch["input_ids"].device)
                for _ in range(self.max_target_length):
                    logits = model(input_ids=batch["input_ids"],
                                   attention_mask=batch["attention_mask"],
                                   decoder_input_ids=dec).logits[:, -1]
                    dec = torch.cat([dec, logits.argmax(-1, keepdim=True)], 1)
                out = dec[:, 1:]
            else:
                ids, mask, last = self._prompt(batch)
                out = self._greedy(model, ids, mask, last)
        texts = [self._until_eos(row, eos) for row in out.tolist()]
        wanted = [self._as_decoded(c) for c in batch["class_id"].tolist()]
        return torch.tensor([t.strip() == w for t, w in zip(texts, wanted, strict=True)],
                            dtype=torch.float32)

    def _as_decoded(self, label: int) -> str:
        """A target as its own token ids decode: what a model that learned it perfectly writes.
        It differs from the target's text where the tokenizer does not round-trip (an uncased
        tokenizer lowercases, unknown characters become [UNK], spacing around punctuation)."""
        decoded = self._decoded
        if label not in decoded:
            target = self.targets[label]
            ids = self.tokenizer(target, add_special_tokens=False)["input_ids"] if self.seq2seq \
                else self.target_ids("", target)
            decoded[label] = self.tokenizer.decode(ids, skip_special_tokens=True).strip()
        return decoded[label]

    def _greedy(self, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor,
                last: torch.Tensor) -> torch.Tensor:
        n = self.max_target_length
        seq = torch.cat([ids, torch.full((ids.shape[0], n), self.tokenizer.pad_token_id or 0,
                                         dtype=ids.dtype, device=ids.device)], 1)
        att = torch.cat([mask, torch.zeros_like(seq[:, :n])], 1)
        rows = torch.arange(ids.shape[0], device=ids.device)
        for step in range(n):
            at = last + step
            logits = input_logits(model(input_ids=seq, attention_mask=att).logits, seq.shape[1])
            nxt = logits[rows, at].argmax(-1)
            seq[rows, at + 1], att[rows, at + 1] = nxt, 1
        gather = last[:, None] + 1 + torch.arange(n, device=ids.device)
        return seq.gather(1, gather)

    def _until_eos(self, ids: list[int], eos: int | None) -> str:
        if eos is not None and eos in ids:
            ids = ids[: ids.index(eos)]
        return self.tokenizer.decode(ids, skip_special_tokens=True)


class ExactMatch(MeanMetric):
    """Share of rows whose generated text equals their target as the tokenizer decodes it
    (after stripping spaces)."""

    def update(self, em: torch.Tensor) -> None:  # type: ignore[override]
        if em.numel():
            super().update(em)
