"""A job's status must not lie: SIGINT/SIGTERM become a recorded ``interrupted`` (with the stage
and step), a job killed outright (SIGKILL, out of memory) is recognised afterwards from the pid
and host that ``metrics.json`` records while it runs, and a run that ends at the majority
baseline says so in its exit status.

Exit statuses of the ``ftlab`` command (one run or a sweep): 0 every job finished above its
majority baseline; 1 a job ended in an error; 2 the command line is wrong; 3 every job finished
but at least one ended at or below the majority baseline (``failed``); 128 + the signal number
(130 SIGINT, 143 SIGTERM) when stopped.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger("ftlab")

#: exit status of a run (or sweep) whose job(s) ended at or below the majority baseline
DEGENERATE_EXIT = 3
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(BaseException):
    """Raised in the main thread by SIGINT/SIGTERM while a job runs. A ``BaseException`` (so
    ``except Exception`` does not swallow it) and not a ``KeyboardInterrupt`` (which Lightning
    turns into ``sys.exit(1)`` inside ``fit``, before ftlab could record anything).

    ``step`` is set by ``ftlab.callbacks.NoteStep`` when the signal arrives inside a Trainer.
    """

    def __init__(self, signum: int) -> None:
        self.signum, self.step = signum, None
        super().__init__(f"stopped by {self.signal}")

    @property
    def signal(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


def catch_signals() -> Callable[[], None]:
    """Turn SIGINT and SIGTERM into ``Stopped`` until the returned function restores the
    previous handlers. A second signal while the job records its stop is ignored. Outside the
    main thread (where Python cannot set handlers) this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    fired: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        if fired:  # already stopping: let the first stop finish its records
            return
        fired.append(signum)
        raise Stopped(signum)

    previous = {s: signal.signal(s, handler) for s in SIGNALS}

    def restore() -> None:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)

    return restore


@contextmanager
def stops_reported(sweep_dir: Path) -> Iterator[None]:
    """Around a sweeper's launch: when the launcher fails because jobs were stopped by a signal
    (Ctrl-C reaches ``submitit_local``'s job processes, which record ``interrupted`` and exit
    130 without a result: submitit's ``UncompletedJobError``), exit as a stopped single run
    does (128 + the signal, one paragraph), not with the launcher's traceback."""
    import sys

    began = time.time()
    try:
        yield
    except Exception:
        signal_name = _stopped_since(sweep_dir, began)
        if signal_name is None:
            raise
        print(f"\nftlab: Stopped by {signal_name}: the sweep's running jobs recorded status "
              "'interrupted' (metrics.json) with the stage and step.\nFix: `ftlab -m "
              f"resume={sweep_dir}` continues them from their last checkpoints (finished jobs "
              "are not run again).\n", file=sys.stderr)
        sys.exit(128 + signal.Signals[signal_name].value)


def _stopped_since(sweep_dir: Path, since: float) -> str | None:
    """The signal that stopped a job of ``sweep_dir`` whose record changed since ``since``."""
    from ftlab.report_jobs import job_folders, job_record

    for job in job_folders(sweep_dir) if sweep_dir.is_dir() else []:
        try:
            if (job / "metrics.json").stat().st_mtime < since:
                continue
        except OSError:
            continue
        record = job_record(job / "metrics.json")
        stop = record.get("interrupted")
        if record.get("status") == "interrupted" and isinstance(stop, dict) and \
                stop.get("signal") in signal.Signals.__members__:
            return stop["signal"]
    return None


def _start_ticks(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot; Linux), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def process_identity() -> dict[str, Any]:
    """What a later look needs to tell whether this process still runs."""
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "pid_start": _start_ticks(pid),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def is_alive(process: dict[str, Any]) -> bool | None:
    """Whether the recorded process still runs; None when it ran on another host."""
    if process.get("host") != socket.gethostname() or not isinstance(process.get("pid"), int):
        return None
    pid = process["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process with that pid
        pass
    recorded, now = process.get("pid_start"), _start_ticks(pid)
    return recorded is None or now is None or recorded == now  # else the pid was reused


def effective(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` as it stands: a ``running`` record whose process is gone (same host) was
    killed without a chance to say so (SIGKILL, out of memory, a power cut), so it reads as
    ``interrupted``, with the stage it was in; a re-run in the folder of a finished job killed
    before any stage ran reads as that job's finished results (``ftlab.record.recovered``)."""
    from ftlab.record import recovered

    process = record.get("process")
    if record.get("status") != "running" or not isinstance(process, dict) \
            or is_alive(process) is not False:
        return record
    stage = record.get("current_stage")
    where = f" in stage '{stage}'" if stage else ""
    return recovered(record | {
        "status": "interrupted", "failed": True,
        "interrupted": {"stage": stage, "step": None, "signal": None, "detected": "afterwards"},
        "error": f"The job (pid {process['pid']} on {process['host']}) ended{where} without "
                 "recording an outcome: it was killed (SIGKILL, out of memory) or the machine "
                 "stopped.\nFix: re-run it (finished upstream stages are reused from the stage "
                 "cache)."})


def stop_message(err: Stopped, stage: str | None, resume: str = "ftlab resume=RUN_DIR") -> str:
    """One paragraph for a job stopped by a signal; ``resume`` is the command that continues it
    (the same command again would start a new, empty run folder)."""
    where = f" in stage '{stage}'" if stage else ""
    at = f" at step {err.step}" if err.step is not None else ""
    return (f"Stopped by {err.signal}{where}{at}; metrics.json records status 'interrupted' "
            f"and the stages finished before.\nFix: `{resume}` continues it from its last "
            "checkpoint (finished upstream stages are reused from the stage cache).")


def degenerate_line(record: dict[str, Any]) -> str:
    """The last line of a single run that ended at or below a trivial predictor (the task's
    failure rule, ``ftlab.seedstats.failure``: the majority class, or macro-F1 at chance)."""
    reason = record.get("failure") or "validation score at or below the majority baseline"
    metric = reason.split(" ", 1)[0].rsplit("/", 1)[-1]  # "val/pearson 0.0 <= ..." -> pearson
    trivial = ("a constant prediction, whose correlation is 0" if metric in CORRELATIONS
               else "the majority class, or macro-F1 at chance")
    return (f"FAILED: {reason} (no better than a trivial predictor: {trivial}); exit status 3. "
            "Try a lower stage.optim.lr, more steps or another seed.")


#: metrics whose trivial baseline is a constant prediction (stage=regression)
CORRELATIONS = ("pearson", "spearman")
