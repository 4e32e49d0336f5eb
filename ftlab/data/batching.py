"""Length-grouped batches and dynamic padding: short texts are never padded to max length."""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Sampler

from ftlab.errors import FtlabError


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Batches of similar length, in random order; distribution-aware.

    Shuffle all indices, cut them into mega-batches of ``batch_size * num_replicas * group``,
    sort each mega-batch by length, cut it into *global* batches of ``batch_size *
    num_replicas`` rows and shuffle the global batches. Rank ``r`` takes the ``r``-th of
    ``num_replicas`` contiguous slices of every global batch, so each rank gets its own share
    of every length bucket, every rank gets the same number of batches, and the ranks' batches
    of a step together are exactly the batch one process with ``batch_size * num_replicas``
    would take (same seed): DDP with 2 x 8 rows trains on the same rows as 1 x 16.

    With ``shuffle=False`` (evaluation) the whole split is sorted by length. A last global
    batch with fewer rows than ranks is merged into the one before it, so every row is served
    exactly once per epoch on some rank (no padding duplicates); only a split with fewer rows
    than ranks repeats rows (each rank needs one). ``drop_last`` drops an incomplete last global
    batch. Call ``set_epoch`` (Lightning does) for a new order each epoch; every rank must use
    the same ``seed``.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        shuffle: bool = True,
        group: int = 50,
        seed: int = 0,
        drop_last: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside [0, {num_replicas})")
        self.lengths = torch.as_tensor(lengths)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.group = group
        self.seed = seed
        self.drop_last = drop_last
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0
        self._skip: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def sampler(self) -> LengthGroupedBatchSampler:
        """Lightning calls ``set_epoch`` on ``loader.batch_sampler.sampler`` each epoch (never
        on the batch sampler itself, and it stops fetching before the order is exhausted): so
        that each epoch gets its own order, that is this object."""
        return self

    def resume(self, epoch: int, batches: int) -> None:
        """Continue epoch ``epoch`` after its first ``batches`` batches (a resumed run): the
        next iteration serves the rest of that epoch's order, then epochs go on as usual."""
        self.epoch, self._skip = epoch, (epoch, batches)

    def _global_batches(self) -> list[torch.Tensor]:
        """Global batches (every rank's rows of a step) as index tensors (views; no Python int
        per row: 1M rows stay a few MB)."""
        n, world = len(self.lengths), self.num_replicas
        bs = self.batch_size * world
        if not self.shuffle:
            order = torch.argsort(self.lengths, descending=True, stable=True)
            return self._merge_tail(list(torch.split(order, bs)))
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(n, generator=gen)
        mega = bs * self.group
        batches: list[torch.Tensor] = []
        for start in range(0, n, mega):
            chunk = perm[start : start + mega]
            chunk = chunk[torch.argsort(self.lengths[chunk], descending=True, stable=True)]
            batches += torch.split(chunk, bs)
        batches = ([b for b in batches if len(b) == bs] if self.drop_last
                   else self._merge_tail(batches))
        order = torch.randperm(len(batches), generator=gen).tolist()
        return [batches[i] for i in order]

    def _merge_tail(self, batches: list[torch.Tensor]) -> list[torch.Tensor]:
        """Merge a last batch too small to give every rank a row into the one before it."""
        if len(batches) > 1 and len(batches[-1]) < self.num_replicas:
            batches[-2:] = [torch.cat(batches[-2:])]
        return batches

    def _share(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous slice of a global batch (rows repeat only if it has fewer
        rows than there are ranks)."""
        if len(batch) < self.num_replicas:
            batch = batch.repeat(-(-self.num_replicas // len(batch)))[: self.num_replicas]
        return torch.tensor_split(batch, self.num_replicas)[self.rank]

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._global_batches()
        if self._skip is not None and self._skip[0] == self.epoch:
            batches = batches[self._skip[1]:]  # the same order, without the batches served
        self._skip = None
        for batch in batches:
            yield self._share(batch).tolist()
        self.epoch += 1  # a fresh order next time even if nobody calls set_epoch

    def __len__(self) -> int:
        """The number of batches (per rank), computed without building them."""
        n, world = len(self.lengths), self.num_replicas
        bs = self.batch_size * world
        if not self.shuffle:
            count, last = -(-n // bs), n % bs
        else:
            full, rest = divmod(n, bs * self.group)
            if self.drop_last:
                return full * self.group + rest // bs
            count = full * self.group + -(-rest // bs)
            last = (rest or n) % bs
        return count - (count > 1 and 0 < last < world)


#: pad values of the sequence features every task shares (``input_ids`` pads with the pad id)
PAD_VALUES: dict[str, int | float] = {"attention_mask": 0, "token_type_ids": 0, "labels": -100,
                                      "special_tokens_mask": 1}


class PadCollator:
    """Rows of features -> a batch of tensors, padded to the longest ``input_ids`` in the batch.

    A list-valued feature is padded with its pad value: ``input_ids`` with
    ``pad_id``, masks with 0, token ``labels`` with -100, any other from ``pad_values`` (a
    task's own). Int features become long tensors, float features float32; a float feature
    whose rows all have the same length (a probability vector per row: soft labels, teacher
    scores) is stacked as is, unpadded. A scalar feature (a class id) is one value per row.
    A sequence feature longer than the batch's ``input_ids`` (a seq2seq target: decoder
    labels) is padded to its own longest row, never cut to the source's width.

    ``buckets`` (optional) pads each batch to the smallest of these widths that holds its
    longest row, so a run meets only that many shapes (CUDA graphs, ``torch.compile``'s
    ``reduce-overhead``); a batch longer than the largest bucket is rounded up to
    ``multiple_of`` instead. ``pad_to`` (optional) pads every batch to a fixed length instead
    — only for benchmarks.
    """

    def __init__(self, pad_id: int, pad_to: int | None = None, multiple_of: int = 1,
                 pad_values: Mapping[str, int | float] | None = None,
                 buckets: Sequence[int] | None = None) -> None:
        self.pad_id = pad_id
        self.pad_to = pad_to
        self.multiple_of = multiple_of
        self.buckets = sorted(set(buckets or ()))
        self.pad_values = {**PAD_VALUES, "input_ids": pad_id, **(pad_values or {})}

    def width(self, longest: int) -> int:
        """The padded width of a batch whose longest row has ``longest`` tokens."""
        if self.pad_to:
            return self.pad_to
        fits = bisect.bisect_left(self.buckets, longest)
        if fits < len(self.buckets):
            return self.buckets[fits]
        return -(-longest // self.multiple_of) * self.multiple_of

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        width = self.width(max(len(r["input_ids"]) for r in rows))
        batch: dict[str, torch.Tensor] = {}
        for key, first in rows[0].items():
            if key == "length":
                continue
            if not isinstance(first, list | tuple):
                batch[key] = torch.as_tensor([r[key] for r in rows])
            elif not _is_float(rows, key):
                batch[key] = self._pad(rows, key, self._own_width(rows, key, width), torch.long)
            elif len({len(r[key]) for r in rows}) == 1:
                batch[key] = torch.tensor([r[key] for r in rows], dtype=torch.float32)
            else:
                batch[key] = self._pad(rows, key, width, torch.float32)
        return batch

    def _own_width(self, rows: list[dict], key: str, width: int) -> int:
        """``width``, or more for a feature whose rows are longer (a seq2seq target)."""
        longest = max(len(r[key]) for r in rows)
        return width if longest <= width or self.pad_to else self.width(longest)

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


def require_one_batch(rows: int, batch_size: int, where: str = "",
                      transforms: list[dict[str, Any]] | None = None) -> None:
    """Stop when the training split cannot fill one batch (``where``: e.g. "stage 'task': ";
    ``transforms``: the records of ``data.transforms``, named when they cut the rows)."""
    if rows >= batch_size:
        return
    cut = [t for t in transforms or () if t.get("train_rows_after", rows) < t.get(
        "train_rows_before", 0)]
    said = "; ".join(f"{t['transform']}: {t['train_rows_before']} -> {t['train_rows_after']}"
                     for t in cut)
    raise FtlabError(
        f"{where}the training split has {rows} rows"
        f"{f' after data.transforms ({said})' if cut else ''}, fewer than one batch "
        f"(batch_size={batch_size}).",
        f"lower the stage's batch_size (stage.batch_size) to at most {rows}, or "
        + ("let the transforms keep more rows (few_shot: a larger k or k_total)." if cut
           else "add data."))


def no_token_rows(lengths: Sequence[int]) -> tuple[int, str]:
    """How many rows have no tokens (an empty text under a tokenizer that adds no special tokens,
    GPT-2's), and the first five as 1-based numbers ("4, 5, 6, 7, 8, ..."): training and
    predict refuse such rows (a batch of only them crashes the model)."""
    empty = [n for n, length in enumerate(lengths, 1) if length == 0]
    return len(empty), ", ".join(map(str, empty[:5])) + (", ..." if len(empty) > 5 else "")
