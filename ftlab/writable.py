"""Before Hydra creates a job's folder: is the output folder writable? A read-only, full or
permission-denied folder would otherwise end in a Hydra traceback; here it is one paragraph
with the fix (``conf/hydra/default.yaml`` registers the callback)."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

#: room left in a run folder's path for what a run writes inside it
#: (<stage>/checkpoints/state.ckpt.tmp/tensors.safetensors, csv/version_0/metrics.csv...)
INSIDE = 256
#: bytes the probe writes: a folder with less free space is as good as full
PROBE_BYTES = 256 * 1024


#: the fix for a folder name or path too long for the file system
LONG_NAMES_FIX = ("keep long values out of folder names: Hydra's default hydra.run.dir (the "
                  "time) and hydra.sweep.subdir (${hydra.job.num}) hold none; with "
                  "${hydra.job.override_dirname} in the folder, leave the long keys out "
                  "(hydra.job.config.override_dirname.exclude_keys=[seed,KEY]).")


def check_names(folder: str | Path, what: str = "The output folder") -> None:
    """Raise ``FtlabError`` when a name in ``folder``'s path is longer than its file system
    allows (255 bytes on most): Hydra's ``${hydra.job.override_dirname}`` in a run or job
    folder puts every override value in one name."""
    from ftlab.errors import FtlabError

    path = Path(folder).absolute()
    name_max, path_max = 255, 4096  # the limits of the deepest folder that exists
    for parent in reversed(path.parents):  # from the root down: no stat of a too-long name
        try:
            name_max = os.pathconf(parent, "PC_NAME_MAX")
            path_max = os.pathconf(parent, "PC_PATH_MAX")
        except (OSError, ValueError):
            break
    if len(os.fsencode(str(path))) + INSIDE > path_max:
        raise FtlabError(
            f"{what} {str(path)[:80]}... is {len(os.fsencode(str(path)))} bytes long; with the "
            f"files a run writes inside it (~{INSIDE} bytes more) it passes the file system's "
            f"{path_max}.", LONG_NAMES_FIX)
    for part in path.parts:
        if len(os.fsencode(part)) > name_max:
            raise FtlabError(
                f"{what} {str(path)[:80]}... has a name of {len(os.fsencode(part))} bytes "
                f"('{part[:40]}...'); the file system allows {name_max}.", LONG_NAMES_FIX)


def check_writable(folder: str | Path) -> None:
    """Create ``folder`` (and parents) and write, flush and fsync a small probe file in it;
    raise ``FtlabError`` (with the fix) when the file system refuses."""
    check_names(folder)
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".ftlab-probe-") as probe:
            # room for Hydra's own files (.hydra/*.yaml, ~15 KB) and the job's first results;
            # an empty file could still fit on a full disk
            probe.write(b"\0" * PROBE_BYTES)
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as err:
        from ftlab.store import environment_error

        problem = environment_error(err, folder, started=False)
        if problem is None:
            raise
        raise problem from None


class OutputFolderCheck(Callback):
    """Hydra callback: check the run (or sweep) folder before Hydra writes into it."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _check_or_exit(config.hydra.run.dir)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _check_or_exit(config.hydra.sweep.dir)


def _check_or_exit(folder: str) -> None:
    from ftlab.errors import FtlabError

    try:
        check_writable(folder)
    except FtlabError as err:  # SystemExit passes Hydra without a traceback
        print(f"\nftlab: {err}\n", file=sys.stderr)
        sys.exit(1)


def check_output(folder: str | Path, flag: str = "--output") -> None:
    """Before a command (``ftlab-predict``, ``ftlab-export``) does its work: can a file be
    created in ``folder``, where its ``flag`` output goes? Probed in the nearest folder that
    exists (nothing is created), so an unwritable output stops at once with the fix, not in a
    traceback after minutes of work."""
    from ftlab.errors import FtlabError

    folder = Path(folder).absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise FtlabError(f"{flag} cannot go into {folder}: {existing} is a file, not a folder.",
                         f"name a {flag} path under a folder (or move that file away).")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".ftlab-probe-"):
            pass
    except OSError as err:
        raise FtlabError(f"{flag} cannot go into {folder}: {existing} refuses new files "
                         f"({err.strerror or err}).", f"name a {flag} in a folder you can "
                         "write, or make that folder writable (chmod u+w / chown).") from None
