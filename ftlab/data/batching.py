"""Length-grouped batches and dynamic padding: short texts are never padded to max length."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


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


class PadCollator:
    """Pad ``input_ids``/``attention_mask``/``token_type_ids`` to the longest in the batch.

    ``pad_to`` (optional) pads every batch to a fixed length instead — only for benchmarks.
    """

    def __init__(self, pad_id: int, pad_to: int | None = None, multiple_of: int = 1) -> None:
        self.pad_id = pad_id
        self.pad_to = pad_to
        self.multiple_of = multiple_of

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(r["input_ids"]) for r in rows)
        width = self.pad_to or -(-longest // self.multiple_of) * self.multiple_of
        batch: dict[str, torch.Tensor] = {}
        pad_values = {"input_ids": self.pad_id, "attention_mask": 0, "token_type_ids": 0,
                      "labels": -100, "special_tokens_mask": 1}
        for key, pad in pad_values.items():
            if key in rows[0] and isinstance(rows[0][key], list | tuple):
                out = torch.full((len(rows), width), pad, dtype=torch.long)
                for i, r in enumerate(rows):
                    seq = r[key][:width]
                    out[i, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
                batch[key] = out
        for key in rows[0]:
            if key not in batch and key not in ("length",):
                batch[key] = torch.as_tensor([r[key] for r in rows])
        return batch
