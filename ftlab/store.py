"""Where and how ftlab writes: names that are safe as folder names, paths kept inside their
folder, and atomic writes (a reader never sees a half-written results file or artefact)."""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ftlab.errors import FtlabError

#: a name that may become a folder name (stages, cache keys): no separators, no '..'
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def check_name(name: str, what: str, fix: str) -> str:
    """Return ``name`` if it is safe as a folder name (``SAFE_NAME``, no ``..``); else raise
    with ``fix``, in which ``{name}`` becomes a safe suggestion."""
    name = str(name)
    if SAFE_NAME.fullmatch(name) and ".." not in name:
        return name
    suggestion = re.sub(r"[^A-Za-z0-9_.-]+", "_", name.replace("..", "_")).strip("._-")[:64]
    raise FtlabError(
        f"{what} {name!r} cannot be used: names become folder names, so they are 1-64 letters, "
        "digits, '_', '.' or '-', start with a letter or digit, and never contain '..' or a "
        "slash.", fix.format(name=suggestion or "stage1"))


def inside(base: str | Path, *parts: str) -> Path:
    """``base / parts``, resolved (symlinks too) and checked to stay inside ``base``."""
    root = Path(base).resolve()
    path = root.joinpath(*parts).resolve()
    if not path.is_relative_to(root):
        raise FtlabError(f"Refusing to write {path}: it is outside {root}.",
                         "use plain names for stages (no '..', slashes or links out of the "
                         "run and cache folders).")
    return path


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` then rename onto ``path``; on failure nothing is left behind."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:  # a read-only or full folder: say so, with the fix
        problem = environment_error(err, path)
        if problem is not None:
            raise problem from None
        raise
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(Path(tmp))
        # mkstemp makes 0600 (and safetensors writes its own 0600 temp file over ``tmp``);
        # results should read like any file
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        problem = environment_error(err, path)
        if problem is not None:
            raise problem from None
        raise
    return path


#: errno values that mean the machine, not ftlab or the config, stopped a write
_FULL = (errno.ENOSPC, errno.EDQUOT)
_DENIED = (errno.EACCES, errno.EPERM, errno.EROFS)
_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how safetensors' Rust I/O errors say it


def os_errno(err: BaseException) -> int | None:
    """The errno of an ``OSError``, or of a safetensors ``SafetensorError`` (which reports
    I/O failures as text: "Error while serializing: I/O error: No space left on device (os
    error 28) at path ...")."""
    if isinstance(err, OSError):
        return err.errno
    if type(err).__name__ == "SafetensorError":
        match = _OS_ERROR.search(str(err))
        return int(match.group(1)) if match else None
    return None


def environment_error(err: BaseException, path: str | Path | None = None,
                      started: bool = True) -> FtlabError | None:
    """One paragraph with the fix for a full disk, a read-only folder or a permission error
    (``None`` for anything else). ``path``: what was being written, when the error's own
    filename is a temporary file; ``started``: whether a job had written anything yet."""
    code = os_errno(err)
    intact = "; results written earlier are intact" if started else ""
    where = path or getattr(err, "filename", None) or "the output folder"
    elsewhere = ("point the output elsewhere with paths.log_dir=/a/writable/folder (or "
                 "hydra.run.dir=..., hydra.sweep.dir=... for a sweep)")
    if code in _FULL:
        return FtlabError(
            f"The disk is full (or over quota) while writing {where}" + ("; nothing was half-"
            "written, and results written earlier (metrics.json, finished stages) are intact."
            if started else "."),
            f"free disk space or {elsewhere} on a larger disk, then re-run (finished upstream "
            "stages are reused from the stage cache).")
    if code in _DENIED:
        why = "is on a read-only file system" if code == errno.EROFS else \
            "cannot be written (permission denied)"
        return FtlabError(f"{where} {why}{intact}.",
                          f"{elsewhere}, or make the folder writable (chmod u+w / chown).")
    if code == errno.ENAMETOOLONG:
        return FtlabError(f"Cannot write {where}: a name in its path is longer than the file "
                          f"system allows{intact}.", "keep long override values out of folder "
                          "names (no ${hydra.job.override_dirname} in hydra.run.dir or "
                          "hydra.sweep.subdir, or leave the long keys out of it with "
                          "hydra.job.config.override_dirname.exclude_keys=[seed,KEY]).")
    if code == errno.ENOTDIR:
        return FtlabError(f"Cannot write {where}: a part of its path is a file, not a folder.",
                          f"{elsewhere}, or move that file away.")
    return None


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


def wait_for_all_ranks() -> None:
    """DDP/FSDP: wait until every rank arrives, so what rank zero wrote before is complete
    for the others (a later stage reads an earlier one's artefact); a no-op in one process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
