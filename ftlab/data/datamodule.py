"""Tokenised splits served in length-grouped, dynamically padded batches."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from datasets import Dataset, DatasetDict
from torch.utils.data import DataLoader

from ftlab.data.batching import (
    LengthGroupedBatchSampler,
    PadCollator,
    no_token_rows,
    require_one_batch,
)
from ftlab.data.sources import UNLABELLED
from ftlab.errors import FtlabError

if TYPE_CHECKING:
    from ftlab.tasks.base import Task


class SplitLoaders(L.LightningDataModule):
    """The three Lightning loader hooks from one ``_loader(split, train)`` method; a split the
    data lacks gives no loader."""

    splits: Any

    def _loader(self, split: str, train: bool) -> DataLoader:
        raise NotImplementedError

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", train=False) if "validation" in self.splits else []

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False) if "test" in self.splits else []


class TextDataModule(SplitLoaders):
    """Featurise each split once with the task's ``featurize`` (a batched map), keep the
    features the task declares (``task.features`` + ``length``), then batch by length.

    Args:
        splits: raw splits (``train`` required; ``validation``/``test`` optional).
        task: a bound task; its ``featurize`` must emit every name in ``task.features`` and
            ``length``; its ``pad_values`` reach the collator.
        pad_id: the tokenizer's pad token id.
        batch_size / eval_batch_size: rows per batch for training / evaluation.
        seed: seeds the batch order (the same on every rank).
        num_workers / pin_memory / persistent_workers: passed to every ``DataLoader``.
        pad_to_multiple_of: round each batch's width up to a multiple of this (few shapes).
        pad_to_buckets: pad each batch to the smallest of these widths that holds it (fixed
            shapes for CUDA graphs); longer batches fall back to ``pad_to_multiple_of``.
        pad_to: pad every batch to this length (benchmarks only; null = dynamic).

    An ``unlabelled`` split (training rows a transform set aside without labels: ``few_shot``)
    is not tokenised: it is kept raw as ``self.unlabelled`` (None when there is none) for
    semi-supervised use.
    """

    def __init__(self, splits: DatasetDict, task: Task, pad_id: int, batch_size: int = 32,
                 eval_batch_size: int = 128, seed: int = 0, num_workers: int = 0,
                 pin_memory: bool = False, persistent_workers: bool = False,
                 pad_to_multiple_of: int | None = None, pad_to: int | None = None,
                 pad_to_buckets: Sequence[int] | None = None) -> None:
        super().__init__()
        require_one_batch(len(splits["train"]), batch_size)
        self.unlabelled: Dataset | None = splits.get(UNLABELLED)
        splits = DatasetDict({k: v for k, v in splits.items() if k != UNLABELLED})
        drop = [c for c in splits["train"].column_names]
        self.splits = splits.map(task.featurize, batched=True, remove_columns=drop,
                                 desc="Tokenising")
        keep = {*task.features, "length"}
        for name, ds in self.splits.items():
            missing = sorted(keep - set(ds.column_names))
            if missing:
                raise FtlabError(
                    f"{type(task).__name__}.featurize did not emit the declared feature(s) "
                    f"{missing} in split '{name}' (it emitted {ds.column_names}).",
                    "emit them in featurize, or leave them out of the task's features.")
            ds.set_format(columns=[c for c in ds.column_names if c in keep])
            check_tokens(ds, name)
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.seed = seed
        self.loader_options = {"num_workers": num_workers, "pin_memory": pin_memory,
                               "persistent_workers": persistent_workers and num_workers > 0}
        self.collate = PadCollator(pad_id, pad_to=pad_to, multiple_of=pad_to_multiple_of or 1,
                                   pad_values=task.pad_values, buckets=pad_to_buckets)
        self._resume: dict[str, int] | None = None

    def batch_sampler(self, split: str, train: bool, world: int = 1,
                      rank: int = 0) -> LengthGroupedBatchSampler:
        """The split's length-grouped batches (this rank's share of them)."""
        lengths = self.splits[split].with_format("arrow")["length"].to_numpy().copy()
        return LengthGroupedBatchSampler(
            lengths, self.batch_size if train else self.eval_batch_size,
            shuffle=train, seed=self.seed, num_replicas=world, rank=rank)

    def _loader(self, split: str, train: bool) -> DataLoader:
        ds = self.splits[split]
        sampler = self.batch_sampler(split, train, *replicas(self.trainer))
        # its own generator: creating a loader's iterator draws a seed from it, which would
        # otherwise shift the global random stream (dropout) when a run resumes
        gen = torch.Generator().manual_seed(self.seed)
        if not train:
            return DataLoader(ds, batch_sampler=sampler, collate_fn=self.collate,
                              generator=gen, **self.loader_options)
        if self._resume is not None:
            sampler.resume(**self._resume)
            self._resume = None
        return ResumableLoader(ds, batch_sampler=sampler, collate_fn=self.collate,
                               generator=gen, position=self.state_dict, epoch=self.training_epoch,
                               **self.loader_options)

    def training_epoch(self) -> int:
        """The training epoch whose order the next pass over the training data serves."""
        return self.trainer.current_epoch if self.trainer is not None else 0

    def state_dict(self) -> dict[str, Any]:
        """The training data's position (saved in checkpoints, also during a validation
        within training): the epoch and the batches of it already trained on; after an
        epoch's last batch, the start of the next epoch."""
        trainer = self.trainer
        if trainer is None or trainer.state.fn != "fit":
            return {}
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        epoch = trainer.current_epoch
        if done >= trainer.num_training_batches:
            return {"epoch": epoch + 1, "batches": 0}
        return {"epoch": epoch, "batches": done}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume the training batches where the checkpoint left them (same order)."""
        if state_dict:
            self._resume = {"epoch": int(state_dict["epoch"]),
                            "batches": int(state_dict["batches"])}

def check_tokens(ds: Dataset, split: str) -> None:
    """Refuse rows that tokenise to nothing: an empty text under a tokenizer that adds no special
    tokens (GPT-2's, Llama-style ones without a BOS). A batch of only such rows (the length-
    grouped sampler puts them together) crashes the model mid-training; one among others is
    read as padding."""
    import pyarrow.compute as pc

    lengths = ds.with_format("arrow")["length"]
    if pc.any(pc.equal(lengths, 0)).as_py():  # in Arrow: no Python list of every row's length
        empty, rows = no_token_rows(lengths.to_pylist())
        raise FtlabError(
            f"{empty} of {len(ds)} rows of the {split} split have no tokens (rows {rows} of the "
            "split; 1 = the first): an empty text, and the tokenizer "
            "adds no special tokens (as GPT-2's), so the model has nothing to read; a batch of "
            "them would stop training midway.",
            "remove those rows from the data (the warning above names their column), or give "
            "them text.")


def replicas(trainer: L.Trainer | None) -> tuple[int, int]:
    """(world size, this rank) of the attached Trainer: the sampler shards the batches
    itself, so the Trainer runs with ``use_distributed_sampler=False``."""
    if trainer is None:
        return 1, 0
    return trainer.world_size, trainer.global_rank


class ResumableLoader(DataLoader):
    """The training loader, stateful for Lightning (``state_dict``/``load_state_dict``): its
    state is the data module's position, and loading it moves the batch sampler there.

    Each pass takes its order from the Trainer's ``current_epoch`` (``epoch``), not from the
    number Lightning passes to ``set_epoch`` (its count of processed epochs): resumed from a
    checkpoint written in ``on_train_epoch_end`` (``ftlab.checkpoint.StageCheckpoint`` when
    training stops within an epoch; every epoch end before), Lightning runs that epoch's end
    again and counts it twice, so every later epoch would get the next epoch's order."""

    def __init__(self, *args: Any, position: Any, epoch: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._position, self._epoch = position, epoch

    def __iter__(self) -> Any:
        if self._epoch is not None:
            self.batch_sampler.set_epoch(self._epoch())
        return super().__iter__()

    def state_dict(self) -> dict[str, Any]:
        return self._position()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            self.batch_sampler.resume(int(state_dict["epoch"]), int(state_dict["batches"]))
