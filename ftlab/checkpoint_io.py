"""Lightning's checkpoint dict as a folder: ``tensors.safetensors`` (every tensor, under its
flattened path) + ``state.json`` (everything else, with the stage key), written beside its
target and renamed into place (atomic: the folder it replaces is moved aside first and deleted
after, so a kill at any moment leaves one complete checkpoint); and which checkpoint of a
stage to resume (never a damaged one, nor one of a changed stage). A writer holds the folder's
``.state.ckpt.lock`` while it writes, so the temp folders a killed write left are told from a
live writer's and removed when a stage starts (``clear_stale_writes``). ``ftlab.checkpoint``
decides when checkpoints are written."""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock, Timeout
from lightning.fabric.plugins.io import CheckpointIO
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

#: the checkpoint folder's name inside ``<stage>/checkpoints``
NAME = "state.ckpt"
TENSORS, STATE = "tensors.safetensors", "state.json"


# ---- the checkpoint dict <-> safetensors + JSON ------------------------------------------

def split(obj: Any, tensors: dict[str, torch.Tensor], path: str = "") -> Any:
    """``obj`` as JSON-able data, each tensor replaced by ``{"__tensor__": key}`` (the tensor
    goes into ``tensors[key]``). Tuples and dicts with non-string keys are tagged so that
    ``join`` gives them back as they were."""
    if isinstance(obj, torch.Tensor):
        key = path or "/"
        while key in tensors:
            key += "'"
        tensors[key] = obj
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": split(torch.from_numpy(obj.copy()), tensors, path)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: split(v, tensors, f"{path}/{k}") for k, v in obj.items()}
        return {"__items__": [[k, split(v, tensors, f"{path}/{k}")] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [split(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [split(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, str | int | float | bool):
        return obj
    if isinstance(obj, torch.dtype | torch.device):
        return {"__torch__": str(obj)}
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint ({path})")


def join(data: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of ``split``."""
    if isinstance(data, list):
        return [join(v, tensors) for v in data]
    if not isinstance(data, dict):
        return data
    if "__tensor__" in data:
        return tensors.get(data["__tensor__"])  # None: not read (``skip``)
    if "__ndarray__" in data:
        array = join(data["__ndarray__"], tensors)
        return None if array is None else array.numpy()
    if "__tuple__" in data:
        return tuple(join(v, tensors) for v in data["__tuple__"])
    if "__items__" in data:
        return {k: join(v, tensors) for k, v in data["__items__"]}
    if "__torch__" in data:
        text = data["__torch__"]
        return getattr(torch, text.removeprefix("torch.")) if text.startswith("torch.") \
            else torch.device(text)
    return {k: join(v, tensors) for k, v in data.items()}


class SafetensorsCheckpointIO(CheckpointIO):
    """Lightning checkpoints as ``<path>/{tensors.safetensors, state.json}``, written atomically.

    Args:
        meta: recorded in ``state.json`` under ``ftlab`` (the stage key).
    """

    def __init__(self, meta: dict[str, Any] | None = None) -> None:
        self.meta = meta or {}

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any,
                        storage_options: Any = None) -> None:
        from ftlab.store import is_rank_zero

        if not is_rank_zero():  # Lightning calls it on rank zero only; this makes sure
            return
        path = Path(path)
        tensors: dict[str, torch.Tensor] = {}
        tree = split(checkpoint, tensors)
        flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
        tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(_lock_path(path))):  # a live write: clear_stale_writes leaves it
            self._write(flat, tree, path, tmp)

    def _write(self, flat: dict[str, torch.Tensor], tree: Any, path: Path, tmp: Path) -> None:
        try:
            tmp.mkdir()
            save_file(flat, str(tmp / TENSORS))
            (tmp / STATE).write_text(json.dumps({"ftlab": self.meta, "checkpoint": tree}))
            old = None
            if path.exists():
                old = path.parent / f".{path.name}.old-{os.getpid()}-{uuid.uuid4().hex[:6]}"
                os.replace(path, old)
            os.replace(tmp, path)
            for stale in path.parent.glob(f".{path.name}.old-*"):  # ours, and any a write
                shutil.rmtree(stale, ignore_errors=True)  # killed before it removed its own
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def load_checkpoint(self, path: Any, map_location: Any = None,
                        weights_only: bool | None = None,
                        skip: Callable[[str], bool] | None = None) -> dict[str, Any]:
        """The checkpoint dict at ``path``; the tensors whose key (their path in the dict, e.g.
        ``/state_dict/encoder.weight``) ``skip`` picks are not read: None stands in for them."""
        from safetensors import safe_open

        path = Path(path)
        data = json.loads((path / STATE).read_text())
        if skip is None:
            return join(data["checkpoint"], load_file(str(path / TENSORS)))
        with safe_open(str(path / TENSORS), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys() if not skip(k)}
        return join(data["checkpoint"], tensors)

    def remove_checkpoint(self, path: Any) -> None:
        shutil.rmtree(path, ignore_errors=True)


def latest_checkpoint(folder: Path, key: str | None) -> Path | None:
    """The complete checkpoint in ``folder`` written for stage ``key`` (a checkpoint moved aside
    by a save that was killed midway counts), or None."""
    if not folder.is_dir():
        return None
    for path in _written(folder):
        try:
            meta = json.loads((path / STATE).read_text()).get("ftlab", {})
        except (OSError, ValueError):
            continue
        if not (path / TENSORS).is_file():
            continue
        if not _readable(path / TENSORS):  # truncated (a partial copy, a bad disk)
            log.warning("Not resuming from %s: %s is damaged (truncated or not safetensors).",
                        path, TENSORS)
            continue
        if key is not None and meta.get("stage_key") != key:
            log.warning("Not resuming from %s: it was written for stage %s, this is %s "
                        "(the stage's settings changed). Training the stage from the start.",
                        path, meta.get("stage_key"), key)
            return None
        return path
    return None


def checkpoint_elsewhere(folders: list[Path], key: str) -> Path | None:
    """The complete checkpoint written for stage ``key`` with the most steps in ``folders``
    (other job folders' ``<stage>/checkpoints``: a job re-launched into a new folder resumes
    the one its errored run left), or None; one of another stage is passed over quietly."""
    best, most = None, -1
    for folder in folders:
        for path in _written(folder):
            try:
                data = json.loads((path / STATE).read_text())
                step = int(data["checkpoint"]["global_step"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if data.get("ftlab", {}).get("stage_key") == key and step > most \
                    and _readable(path / TENSORS):
                best, most = path, step
    return best


def _written(folder: Path) -> list[Path]:
    """Where checkpoints lie in ``folder``: ``state.ckpt``, then any a save killed midway had
    moved aside (``.state.ckpt.old-*``)."""
    return [folder / NAME, *sorted(folder.glob(f".{NAME}.old-*"))]


def _lock_path(path: Path) -> Path:
    """The lock a writer of checkpoint ``path`` holds while it writes."""
    return path.parent / f".{path.name}.lock"


def clear_stale_writes(folder: Path) -> None:
    """Remove the temp folders (``.state.ckpt.tmp-<pid>-<hex>``) of checkpoint writes killed
    midway in ``folder``; each would stay until the stage ends (with ``checkpoint.keep``, for
    good). Only when no live writer holds the folder's lock: its temp folder is left alone."""
    if not folder.is_dir():
        return
    lock = FileLock(str(_lock_path(folder / NAME)))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("A checkpoint is being written in %s by another process; its temp folders "
                 "are left as they are.", folder)
        return
    try:
        for stale in folder.glob(f".{NAME}.tmp-*"):
            log.info("Removing %s, left by a checkpoint write that was killed.", stale)
            shutil.rmtree(stale, ignore_errors=True)
    finally:
        lock.release()


def _readable(path: Path) -> bool:
    """Whether safetensors can open ``path`` (it checks the header covers the whole file)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt"):
            return True
    except Exception:  # SafetensorError, OSError
        return False


# ---- callbacks -----------------------------------------------------------------------------
