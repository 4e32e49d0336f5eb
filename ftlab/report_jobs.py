"""A sweep folder's jobs as records: found at any depth, read as they stand (a killed job as
interrupted), one per job identity (``ftlab.resume.job_identity``). What ``ftlab.report``
summarises and ``ftlab.resume`` searches for finished jobs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ftlab.record import recovered
from ftlab.resume import hydra_overrides
from ftlab.status import effective

#: statuses of jobs stopped on purpose (early discard, a search's pruner): neither ok nor errored
STOPPED = ("discarded", "pruned")


def collect(sweep_dir: Path, ended: bool = True, unique: bool = True) -> list[dict[str, Any]]:
    """One record per job folder; a job that died without writing results shows as 'missing'.
    ``ended``: the sweep is over (its report), so a job still recorded as ``running`` (on
    another host, where its process cannot be looked up) was killed; otherwise (``ftlab-report``
    during a sweep) it is still running. ``unique``: one record per job (:func:`dedupe`)."""
    records = []
    for job in job_folders(sweep_dir):
        rec = job_record(job / "metrics.json")
        if rec.get("status") == "ok" and not isinstance(rec.get("final"), dict):
            rec = rec | {"status": "missing", "failed": True, "error": (
                f"{job / 'metrics.json'} says ok but holds no final metrics (edited or written "
                "by other code).\nFix: re-launch the sweep (ftlab -m resume=<sweep>): it runs "
                "that job again.")}
        if ended and rec.get("status") == "running" and not elsewhere(rec):
            rec = recovered(rec | {"status": "interrupted", "failed": True, "error": (
                "The job still read 'running' when its sweep ended: it was killed without "
                "recording an outcome.\nFix: re-launch the sweep (ftlab -m resume=<sweep>).")})
        rec.setdefault("overrides", hydra_overrides(job) or [])
        if "seed" not in rec:  # an unreadable record: the seed its command line gave
            seeds = [o.split("=", 1)[1] for o in rec["overrides"] if o.startswith("seed=")]
            if seeds and seeds[-1].isdigit():
                rec["seed"] = int(seeds[-1])
        rec["job"] = job.relative_to(sweep_dir).as_posix()
        records.append(rec)
    return dedupe(records) if unique else records


def elsewhere(record: dict[str, Any]) -> bool:
    """A job still running in another live process on this machine (another sweep launched
    into the same folder): still running when this sweep ends, not killed."""
    import os

    from ftlab.status import is_alive

    process = record.get("process")
    return isinstance(process, dict) and process.get("pid") != os.getpid() and \
        is_alive(process) is True


def job_folders(sweep_dir: Path) -> list[Path]:
    """The sweep's job folders, Hydra's job numbers first (0, 1, 2... 10). Found at any depth:
    a ``hydra.sweep.subdir`` of ``${hydra.job.override_dirname}`` nests a job whose values hold
    a ``/`` (a data file's path) in folders of its own. Hidden folders (``.submitit``) and the
    folders inside a job are not searched."""
    found, todo = [], [p for p in sweep_dir.iterdir() if p.is_dir()]
    while todo:
        folder = todo.pop()
        if folder.name.startswith("."):
            continue
        if is_job(folder):
            found.append(folder)
        else:
            todo += [p for p in folder.iterdir() if p.is_dir()]
    return sorted(found, key=lambda p: (not p.name.isdigit() or p.parent != sweep_dir,
                                        int(p.name) if p.name.isdigit() else 0,
                                        p.relative_to(sweep_dir).as_posix()))


def is_job(folder: Path) -> bool:
    """A job folder of a sweep: Hydra's ``.hydra/`` in it, or (``hydra.output_subdir=null``)
    the ``metrics.json`` of its job."""
    return folder.is_dir() and ((folder / ".hydra").is_dir() or (folder / "metrics.json").is_file())


def job_record(path: Path) -> dict[str, Any]:
    """The record in a job's ``metrics.json`` as it stands (``ftlab.status.effective``); status
    'missing' when there is no readable record."""
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return {"status": "missing", "failed": True, "error": f"no readable {path.name}"}
    if not isinstance(rec, dict):
        return {"status": "missing", "failed": True, "error": (
            f"{path} holds a JSON {type(rec).__name__}, not a job's record (edited or written by "
            "other code).\nFix: re-launch the sweep or re-run the job: it runs that job again.")}
    return effective(rec)


def dedupe(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per job identity (``ftlab.resume.job_identity``). A re-launch with other
    overrides (``ftlab -m resume=<sweep> checkpoint.keep=true``) places its jobs in new
    folders: a finished job is then there twice (the later one reused the earlier; the later,
    with the latest command's overrides, is kept, so the sweep reads as one configuration),
    and a job that errored or was killed before has finished since in another folder (it is
    no longer an error)."""
    latest = {tuple(r["job_identity"]): i for i, r in enumerate(records)
              if r.get("job_identity") and r.get("status") in ("ok", *STOPPED)}
    return [r for i, r in enumerate(records)
            if latest.get(tuple(r.get("job_identity") or ()), i) == i]
