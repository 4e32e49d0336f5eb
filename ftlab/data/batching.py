"""Length-grouped batches and dynamic padding: short texts are never padded to max length."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch.utils.data import Sampler

from ftlab.errors import FtlabError


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Batches of similar length, in random order.

    Shuffle all indices, cut them into mega-batches of ``batch_size * group``, sort each
    mega-batch by length, cut it into batches and shuffle the batches. This keeps SGD noise
    (random batch composition) while padding little. With ``shuffle=False`` (evaluation) the
    whole split is sorted by length. Call ``set_epoch`` for a new order each epoch.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        shuffle: bool = True,
        group: int = 50,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        self.lengths = torch.as_tensor(lengths)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.group = group
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[torch.Tensor]:
        """Index tensors (views; no Python int per row: 1M rows stay a few MB)."""
        n, bs = len(self.lengths), self.batch_size
        if not self.shuffle:
            order = torch.argsort(self.lengths, descending=True, stable=True)
            return list(torch.split(order, bs))
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(n, generator=gen)
        mega = bs * self.group
        batches: list[torch.Tensor] = []
        for start in range(0, n, mega):
            chunk = perm[start : start + mega]
            chunk = chunk[torch.argsort(self.lengths[chunk], descending=True, stable=True)]
            batches += torch.split(chunk, bs)
        if self.drop_last:
            batches = [b for b in batches if len(b) == bs]
        order = torch.randperm(len(batches), generator=gen).tolist()
        return [batches[i] for i in order]

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self._batches():
            yield batch.tolist()
        self.epoch += 1  # a fresh order next time even if nobody calls set_epoch

    def __len__(self) -> int:
        """The number of batches, computed without building them."""
        n, bs = len(self.lengths), self.batch_size
        if not self.shuffle:
            return -(-n // bs)
        full, rest = divmod(n, bs * self.group)
        if self.drop_last:
            return full * self.group + rest // bs
        return full * self.group + -(-rest // bs)


#: pad values of the sequence features every task shares (``input_ids`` pads with the pad id)
PAD_VALUES: dict[str, int | float] = {"attention_mask": 0, "token_type_ids": 0, "labels": -100,
                                      "special_tokens_mask": 1}


class PadCollator:
    """Rows of features -> a batch of tensors, padded to the longest ``input_ids`` in the batch.

    A list-valued (token-aligned) feature is padded with its pad value: ``input_ids`` with
    ``pad_id``, masks with 0, token ``labels`` with -100, any other from ``pad_values`` (a
    task's own). Int features become long tensors, float features float32; a float feature
    whose rows all have the same length (a probability vector per row: soft labels, teacher
    scores) is stacked as is, unpadded. A scalar feature (a class id) is one value per row.

    ``pad_to`` (optional) pads every batch to a fixed length instead — only for benchmarks.
    """

    def __init__(self, pad_id: int, pad_to: int | None = None, multiple_of: int = 1,
                 pad_values: Mapping[str, int | float] | None = None) -> None:
        self.pad_id = pad_id
        self.pad_to = pad_to
        self.multiple_of = multiple_of
        self.pad_values = {**PAD_VALUES, "input_ids": pad_id, **(pad_values or {})}

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(r["input_ids"]) for r in rows)
        width = self.pad_to or -(-longest // self.multiple_of) * self.multiple_of
        batch: dict[str, torch.Tensor] = {}
        for key, first in rows[0].items():
            if key == "length":
                continue
            if not isinstance(first, list | tuple):
                batch[key] = torch.as_tensor([r[key] for r in rows])
            elif not _is_float(rows, key):
                batch[key] = self._pad(rows, key, width, torch.long)
            elif len({len(r[key]) for r in rows}) == 1:
                batch[key] = torch.tensor([r[key] for r in rows], dtype=torch.float32)
            else:
                batch[key] = self._pad(rows, key, width, torch.float32)
        return batch

    def _pad(self, rows: list[dict], key: str, width: int, dtype: torch.dtype) -> torch.Tensor:
        if key not in self.pad_values:
            raise FtlabError(f"The sequence feature '{key}' has no pad value.",
                             f"declare it in the task's pad_values, e.g. {{'{key}': 0}}.")
        out = torch.full((len(rows), width), self.pad_values[key], dtype=dtype)
        for i, r in enumerate(rows):
            seq = r[key][:width]
            out[i, : len(seq)] = torch.as_tensor(seq, dtype=dtype)
        return out


def _is_float(rows: list[dict], key: str) -> bool:
    """Whether the sequence feature ``key`` holds floats (judged by its first value)."""
    for r in rows:
        if len(r[key]):
            return isinstance(r[key][0], float)
    return False
