"""Atomic writes: a reader never sees a half-written results file or artefact."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ftlab.errors import FtlabError


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` then rename onto ``path``; on failure nothing is left behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; results should read like any file
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise FtlabError(
                f"The disk is full (or over quota) while writing {path}; nothing was half-"
                "written, and results written earlier are intact.",
                "free disk space or point paths.log_dir at a larger disk, then re-run (finished "
                "upstream stages are reused from the stage cache).") from None
        raise
    return path


def write_json(path: str | Path, obj: Any) -> Path:
    text = json.dumps(obj, indent=2, sort_keys=True, default=str)
    return atomic_write(path, lambda p: p.write_text(text + "\n"))


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def save_tensors(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> Path:
    """Save tensors as safetensors (contiguous CPU copies; shared storage is split)."""
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    return atomic_write(path, lambda p: save_file(flat, str(p), metadata=metadata))


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def is_rank_zero() -> bool:
    """Whether this process writes results: rank zero of a multi-process (DDP/FSDP) run, whose
    launcher sets the rank in the environment before the process starts; always true on one."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0
