"""Single-task batches for a multi-task stage: each sub-task's split is featurised and batched
by length on its own (``TextDataModule``); a task sampler decides which sub-task gives each
training batch.

An *epoch* is as many batches as one pass over every sub-task's training split gives (the sum
of the per-task batch counts). With ``proportional`` sampling each sub-task then gives about
one pass; with ``temperature``/``uniform`` small sub-tasks repeat and large ones give less.
A sub-task whose batches run out starts a new pass (a new shuffle); one that is not used up
carries on where it stopped in the next epoch, so every row is seen in turn (a resumed run
replays the draws before its checkpoint to get back there). The draws come
from ``seed + epoch``: the same on every rank, and each rank takes its share of each sub-task's
batch (tested); but the stage is refused on several devices for now
(``ftlab.device_checks.check_strategy``): a 2-process DDP run did not reproduce one process.
Validation and test run every sub-task's batches in turn.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ftlab.data.batching import LengthGroupedBatchSampler
from ftlab.data.datamodule import ResumableLoader, SplitLoaders, TextDataModule, replicas
from ftlab.errors import FtlabError, choices_text

SAMPLING = ("proportional", "temperature", "uniform")


def sampling_probabilities(sizes: Sequence[int], sampling: str, temperature: float = 2.0,
                           size_cap: int | None = None) -> list[float]:
    """Per-task probabilities of drawing a batch: ``proportional`` p_i ~ n_i, ``temperature``
    p_i ~ n_i^(1/T) (T=1: proportional, T -> inf: uniform), ``uniform`` p_i = 1/k. ``size_cap``
    (Raffel et al.'s K) counts a task as at most that many rows first."""
    if sampling not in SAMPLING:
        raise FtlabError(f"sampling '{sampling}' is not known.",
                         f"use one of: {choices_text(SAMPLING)}.")
    if sampling == "temperature" and not temperature > 0:
        raise FtlabError(f"temperature must be > 0, got {temperature}.",
                         "e.g. 2 (Raffel et al. 2020's best temperature).")
    if size_cap is not None and size_cap < 1:  # 0 was read as no cap, < 0 as negative sizes
        raise FtlabError(f"size_cap (a sub-task counts as at most that many rows) must be >= 1 "
                         f"or null, got {size_cap}.", "set stage.task.size_cap to e.g. 2097152 "
                         "(Raffel et al.'s K = 2^21), or null for no cap.")
    n = torch.tensor([min(s, size_cap) if size_cap else s for s in sizes], dtype=torch.float64)
    if sampling == "uniform":
        n = torch.ones_like(n)
    elif sampling == "temperature":
        n = n ** (1.0 / temperature)
    return (n / n.sum()).tolist()


class TaskSampler(Sampler[list[int]]):
    """Batches of one sub-task each, as indices into the sub-tasks' splits laid end to end.

    Args:
        samplers: each sub-task's batch sampler.
        probabilities: chance that a training batch comes from each sub-task; None: every
            sub-task's batches in turn (evaluation).
        seed: seeds the draws (with the epoch).
    """

    def __init__(self, samplers: Sequence[LengthGroupedBatchSampler],
                 probabilities: Sequence[float] | None = None, seed: int = 0) -> None:
        self.samplers = list(samplers)
        self.offsets = torch.tensor([0, *(len(s.lengths) for s in self.samplers)]).cumsum(0)
        self.probabilities = probabilities
        self.seed, self.epoch = seed, 0
        self._iters: dict[int, Iterator[list[int]]] = {}
        self._skip: tuple[int, int] | None = None

    def resume(self, epoch: int, batches: int) -> None:
        """Continue epoch ``epoch`` after its first ``batches`` batches (a resumed run). The
        sub-tasks' passes carry over from epoch to epoch, so the draws before that point are
        replayed (indices only, nothing is read) to put each sub-task where it was."""
        self.epoch, self._skip = epoch, (epoch, batches)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def sampler(self) -> TaskSampler:
        """Lightning calls ``set_epoch`` on ``loader.batch_sampler.sampler`` (never on the batch
        sampler itself) and stops fetching before ``__iter__`` ends: without this, every epoch
        drew the first epoch's sub-task sequence again."""
        return self

    def __len__(self) -> int:
        return sum(len(s) for s in self.samplers)

    def tasks(self) -> list[int]:
        """The sub-task of each training batch of this epoch (the same on every rank)."""
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        probs = torch.tensor(self.probabilities, dtype=torch.float64)
        return torch.multinomial(probs, len(self), replacement=True, generator=gen).tolist()

    def _next(self, task: int) -> list[int]:
        batch = next(self._iters.get(task) or iter(()), None)
        if batch is None:  # used up (or not started): a new pass over that sub-task
            self._iters[task] = iter(self.samplers[task])
            batch = next(self._iters[task])
        return batch

    def __iter__(self) -> Iterator[list[int]]:
        offsets = self.offsets.tolist()
        if self.probabilities is None:
            for task, sampler in enumerate(self.samplers):
                for batch in sampler:
                    yield [i + offsets[task] for i in batch]
        else:
            tasks = self.tasks()
            if self._skip is not None and self._skip[0] == self.epoch:
                tasks = tasks[self._replay(self._skip[1]):]
            self._skip = None
            for task in tasks:
                yield [i + offsets[task] for i in self._next(task)]
        self.epoch += 1

    def _replay(self, batches: int) -> int:
        """Serve (and drop) every batch before batch ``batches`` of this epoch, from a fresh
        start of every sub-task's sampler, as the interrupted run served them."""
        epoch, self._iters = self.epoch, {}
        for sampler in self.samplers:
            sampler.set_epoch(0)
        for past in range(epoch):
            self.epoch = past
            for task in self.tasks():
                self._next(task)
        self.epoch = epoch
        for task in self.tasks()[:batches]:
            self._next(task)
        return batches


class TaskRows(Dataset):
    """The sub-tasks' featurised splits end to end; an item is (sub-task number, row)."""

    def __init__(self, datasets: Sequence[Any]) -> None:
        self.datasets = list(datasets)
        self.offsets = [0]
        for ds in self.datasets:
            self.offsets.append(self.offsets[-1] + len(ds))

    def __len__(self) -> int:
        return self.offsets[-1]

    def _task(self, index: int) -> int:
        return next(t for t in range(len(self.datasets)) if index < self.offsets[t + 1])

    def __getitem__(self, index: int) -> tuple[int, dict]:
        task = self._task(index)
        return task, self.datasets[task][index - self.offsets[task]]

    def __getitems__(self, indices: list[int]) -> list[tuple[int, dict]]:
        """A batch's rows in one read (a batch is one sub-task's)."""
        task = self._task(indices[0])
        cols = self.datasets[task][[i - self.offsets[task] for i in indices]]
        return [(task, dict(zip(cols, values, strict=True)))
                for values in zip(*cols.values(), strict=True)]


class TaskCollator:
    """Pads a batch with its sub-task's collator and names the sub-task (``batch["task"]``)."""

    def __init__(self, names: Sequence[str], collators: Sequence[Any]) -> None:
        self.names, self.collators = list(names), list(collators)

    def __call__(self, items: list[tuple[int, dict]]) -> dict[str, Any]:
        task = items[0][0]
        batch = self.collators[task]([row for _, row in items])
        batch["task"] = self.names[task]
        return batch


class MultiTaskDataModule(SplitLoaders):
    """The sub-tasks' data (one ``TextDataModule`` each) served as single-task batches.

    Args:
        parts: sub-task name -> (its raw splits, its bound Task).
        probabilities: sub-task name -> chance of drawing a training batch from it.
        pad_id / batch_size / eval_batch_size / seed / num_workers: as ``TextDataModule``
            (every sub-task batches at the stage's sizes).
    """

    def __init__(self, parts: Mapping[str, tuple[Any, Any]], probabilities: Mapping[str, float],
                 pad_id: int, batch_size: int = 32, eval_batch_size: int = 128, seed: int = 0,
                 num_workers: int = 0) -> None:
        super().__init__()
        self.names = list(parts)
        self.parts = [TextDataModule(splits, task, pad_id, batch_size=batch_size,
                                     eval_batch_size=eval_batch_size, seed=seed + i,
                                     num_workers=0)
                      for i, (splits, task) in enumerate(parts.values())]
        self.probabilities = [probabilities[n] for n in self.names]
        self.seed, self.num_workers, self.batch_size = seed, num_workers, batch_size
        self.splits = {s: [i for i, p in enumerate(self.parts) if s in p.splits]
                       for s in ("train", "validation", "test")}
        self.splits = {s: ids for s, ids in self.splits.items() if ids}
        self._resume: dict[str, int] | None = None

    def _loader(self, split: str, train: bool) -> DataLoader:
        ids = self.splits[split]
        world, rank = replicas(self.trainer)
        samplers = [self.parts[i].batch_sampler(split, train, world, rank) for i in ids]
        probs = [self.probabilities[i] for i in ids] if train else None
        sampler = TaskSampler(samplers, probs, self.seed)
        options = dict(batch_sampler=sampler,
                       collate_fn=TaskCollator([self.names[i] for i in ids],
                                               [self.parts[i].collate for i in ids]),
                       num_workers=self.num_workers,  # own generator: the global stream
                       generator=torch.Generator().manual_seed(self.seed))  # stays as is
        rows = TaskRows([self.parts[i].splits[split] for i in ids])
        if not train:
            return DataLoader(rows, **options)
        if self._resume is not None:
            sampler.resume(**self._resume)
            self._resume = None
        return ResumableLoader(rows, position=self.state_dict, epoch=self.training_epoch, **options)

    # the training position in checkpoints, read and restored as a single-task stage's
    state_dict = TextDataModule.state_dict
    load_state_dict = TextDataModule.load_state_dict
    training_epoch = TextDataModule.training_epoch

