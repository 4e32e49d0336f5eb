"""A job's record (``metrics.json``): saving it, what an earlier run left there, the score an
optimising sweeper reads, and how a failure is written down."""

from __future__ import annotations

import logging
import math
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from ftlab.errors import ConfigError, Diverged, FtlabError

log = logging.getLogger("ftlab")


def save_record(out: Path, record: dict[str, Any]) -> None:
    """Write ``metrics.json``; if the disk refuses, say so (the last good copy stays)."""
    from ftlab.store import environment_error, write_json

    try:
        write_json(out, record)
    except (FtlabError, OSError) as err:
        problem = err if isinstance(err, FtlabError) else environment_error(err) or err
        print(f"\nftlab: could not update {out}: {problem}\n", file=sys.stderr)


def busy(earlier: dict[str, Any] | None, run_dir: Path) -> FtlabError | None:
    """The error for a run started in ``run_dir`` while another ``ftlab`` process on this host
    still writes it (its ``metrics.json`` says running and that process lives): two runs in
    one folder write over each other's checkpoints and results. None when there is none (or
    it runs on another host, where it cannot be looked up: ``previous_run`` warns)."""
    from ftlab.status import is_alive

    process = (earlier or {}).get("process")
    if (earlier or {}).get("status") != "running" or not isinstance(process, dict) \
            or process.get("pid") == os.getpid() or is_alive(process) is not True:
        return None
    return FtlabError(
        f"another ftlab run (pid {process['pid']}, started {process.get('started')}) is still "
        f"writing {run_dir}; a second run there would write over its checkpoints and results.",
        f"wait for it to end (or stop it: kill {process['pid']}) and run this again, or give "
        "this run another folder (hydra.run.dir=...).")


def previous_run(earlier: dict[str, Any] | None, out: Path) -> dict[str, Any] | None:
    """What an earlier run in this folder left in ``metrics.json`` (``earlier``, as
    ``ftlab.resume.read_record`` reads it: a killed one reads as interrupted), with a warning
    when it did not finish."""
    if earlier is None:  # none, or a damaged or edited file: this run writes a new one
        return None
    status = earlier.get("status")
    if status == "interrupted":
        log.warning("The previous run in %s was interrupted%s; this run goes on from its last "
                    "checkpoint, or from the start where none was written.", out.parent,
                    _where(earlier.get("interrupted")))
    elif status == "running":
        process = earlier.get("process")
        log.warning("%s says another run (pid %s) is still writing this folder.", out,
                    process.get("pid") if isinstance(process, dict) else process)
    return {k: earlier[k] for k in ("status", "interrupted", "process", "error") if k in earlier}


def finished_of(record: Any, reusable: bool = False) -> dict[str, Any] | None:
    """The finished record a folder's ``metrics.json`` holds: ``record`` itself when it
    finished, else the one a re-run that has not finished (running, killed, failed) keeps in
    ``finished_before``; None when there is none. ``reusable``: only if the folder's
    artefacts are still that job's (the re-run finished none of its stages)."""
    from ftlab.resume import FINISHED

    if not isinstance(record, dict):
        return None
    if record.get("status") in FINISHED:
        return record
    if reusable and record.get("stages"):  # the re-run wrote its own stage artefacts
        return None
    kept = record.get("finished_before")
    if not isinstance(kept, dict) or kept.get("status") not in FINISHED:
        return None
    return None if reusable and kept.get("artefacts_replaced") else kept


def kept_finished(earlier: Any) -> dict[str, Any] | None:
    """What a run keeps in ``finished_before`` from the ``earlier`` record of its folder: its
    finished record, marked ``artefacts_replaced`` when a re-run since finished a stage of its
    own there (the finished metrics stay, but no longer describe the folder's artefacts)."""
    finished = finished_of(earlier)
    if finished is None:
        return None
    kept = {k: v for k, v in finished.items() if k not in ("rerun_error", "finished_before")}
    return kept if finished_of(earlier, reusable=True) else kept | {"artefacts_replaced": True}


def began(record: dict[str, Any]) -> bool:
    """Whether a stage of the job in ``record`` started (a stage is running or has finished)."""
    return "current_stage" in record or bool(record.get("stages"))


def _restored(finished: dict[str, Any], rerun: dict[str, Any]) -> dict[str, Any]:
    keep = ("status", "error", "overrides", "interrupted")
    return finished | {"rerun_error": {k: rerun[k] for k in keep if k in rerun}}


def _where(interrupted: Any) -> str:
    """Where a record's ``interrupted`` entry says the run stopped: " in stage 'task' at step
    40 (SIGTERM)"."""
    if not isinstance(interrupted, dict):
        return ""
    stage, step, signal = (interrupted.get(k) for k in ("stage", "step", "signal"))
    return (f" in stage '{stage}'" if stage else "") + (f" at step {step}" if step else "") + (
        f" ({signal})" if signal else " (killed)" if interrupted.get("detected") else "")


def kept_record(record: dict[str, Any], earlier: dict[str, Any] | None,
                started: bool) -> dict[str, Any]:
    """What ``metrics.json`` keeps when a single run failed: its own error ``record``, except
    for a re-run in the folder of a finished job that failed before any stage ran (a bad override
    after ``resume=``, a data file not found): that run's finished results stay, with the
    re-run's error beside them as ``rerun_error``. (A re-run that failed in a stage keeps the
    finished results in ``finished_before``.)"""
    finished = finished_of(earlier, reusable=True)
    if started or finished is None:
        return record
    log.warning("This re-run stopped before any stage ran: metrics.json keeps the results of "
                "the run that finished in this folder.")
    return _restored(finished, record)


def recovered(record: dict[str, Any]) -> dict[str, Any]:
    """A reader's view of the ``record`` of a job that was killed (``ftlab.status.effective``
    reads it as interrupted): a re-run killed before any of its stages ran (SIGKILL, out of
    memory) reads as the finished results it kept in ``finished_before``, with its own outcome
    as ``rerun_error``: what ``kept_record`` writes when the re-run can still write it."""
    finished = finished_of(record, reusable=True)
    if finished is None or finished is record or record.get("status") == "running" \
            or began(record):
        return record
    return _restored(finished, record)


def report_degenerate(record: dict[str, Any]) -> None:
    """A single run at the majority baseline: a final FAILED line, and exit status 3 from the
    ``ftlab`` command (told through the file it names in ``FTLAB_SWEEP_STATUS``)."""
    from ftlab.status import degenerate_line
    from ftlab.store import write_json

    print(f"\nftlab: {degenerate_line(record)}\n", file=sys.stderr)
    status = os.environ.get("FTLAB_SWEEP_STATUS")
    if status:
        write_json(status, {"jobs": 1, "errored": 0, "degenerate": 1})


def objective(record: dict[str, Any]) -> float:
    """The job's score for optimising sweepers: the last stage's monitored validation metric
    (also for a job that failed by the baseline rule); for a job not ``ok`` (errored, diverged,
    interrupted, discarded, pruned) or a missing/non-finite metric the worst value for its
    mode."""
    monitor = record.get("monitor") or {"metric": "val/acc", "mode": "max"}
    worst = -math.inf if monitor["mode"] == "max" else math.inf
    value = (record.get("final") or {}).get(monitor["metric"]) if record["status"] == "ok" \
        else None
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else worst


def process_rank() -> int:
    """This process's global rank (Lightning's, set before a DDP/FSDP rank starts); 0 alone."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0) or 0)


def record_error(record: dict[str, Any], err: BaseException, run_dir: Path,
                  primary: bool = True, sweep_dir: Path | None = None) -> None:
    from ftlab.status import Stopped, stop_message

    stopped = isinstance(err, KeyboardInterrupt | Stopped)
    record["status"] = "interrupted" if stopped else "error"
    record["failed"] = True
    record["failure"] = ("diverged" if isinstance(err, Diverged) else
                         "config" if isinstance(err, ConfigError) else record["status"])
    record["error"] = str(err) if isinstance(err, FtlabError) else f"{type(err).__name__}: {err}"
    if isinstance(err, Stopped):
        stage = record.pop("current_stage", None)
        record["interrupted"] = {"stage": stage, "step": err.step, "signal": err.signal}
        resume = f"ftlab -m resume={sweep_dir}" if sweep_dir else f"ftlab resume={run_dir}"
        record["error"] = stop_message(err, stage, resume)
    if not (stopped or isinstance(err, FtlabError)):
        # a crash on another DDP rank keeps its traceback too, in a file of its own
        log = run_dir / ("error.log" if primary else f"error.rank{process_rank()}.log")
        try:
            log.write_text(traceback.format_exc())
            record["error"] += f" (traceback in {log})"
        except OSError:  # the disk that failed the job may fail this too
            pass
    print(f"\nftlab: {record['error']}\n", file=sys.stderr)
