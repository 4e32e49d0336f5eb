"""Torch threads per job: the cores this process may use / the jobs running beside it.

Torch starts one intra-op thread per core, so N sweep jobs run side by side on one machine (a
parallel launcher: ``hydra/launcher=joblib`` or ``submitit_local``) would each take every core.
ftlab's sweepers (``hydra_plugins/ftlab_sweeper``) put the size of the batch they launch in the
environment (:func:`launching`), which the launchers' worker processes inherit; each job then
divides the cores by the jobs that run at once (:func:`jobs_at_once`) times the processes each
job starts on the machine (:func:`processes_per_machine`: one per device under DDP/FSDP, CPU
DDP included). ``OMP_NUM_THREADS`` set by the user wins (joblib's workers get one from joblib
itself: the launching process's value is what counts), and so does
``hydra.launcher.cpus_per_task`` under ``submitit_local``. A job of several processes exports
its count as ``OMP_NUM_THREADS``: Lightning's DDP launcher keeps it (unset, it would divide the
cores by the devices alone, or, set by joblib, not divide them at all), and the ranks it starts
inherit it; it is put back as it was when the job ends (:func:`job_environment`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

#: the number of jobs a sweeper launches together (read by each job)
JOBS_AT_ONCE = "FTLAB_JOBS_AT_ONCE"
#: the launching process's OMP_NUM_THREADS ('' = unset): joblib sets its own in its workers
LAUNCHER_OMP = "FTLAB_LAUNCHER_OMP_NUM_THREADS"
_SUBMITIT_LOCAL = "hydra_submitit_launcher.submitit_launcher.LocalLauncher"


@contextlib.contextmanager
def restored(*names: str) -> Iterator[None]:
    """The environment variables ``names`` put back as they were (set or unset) on leaving."""
    saved = {k: os.environ.get(k) for k in names}
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def launching(n_jobs: int) -> Iterator[None]:
    """While a sweeper launches ``n_jobs`` jobs together: tell their processes (environment)."""
    with restored(JOBS_AT_ONCE, LAUNCHER_OMP):
        os.environ[JOBS_AT_ONCE] = str(n_jobs)
        os.environ[LAUNCHER_OMP] = os.environ.get("OMP_NUM_THREADS", "")
        yield


def job_environment() -> contextlib.AbstractContextManager[None]:
    """While one job runs: ``OMP_NUM_THREADS`` is put back as it was when the job ends. A job
    of several processes exports its count (:func:`set_threads`), and Lightning's DDP launcher
    sets one where none is; left behind, the next job in the process (a sweep's next batch
    under Hydra's basic launcher or the Optuna sweeper, a script's next ``run``) read it as the
    user's setting and kept this job's count (half the cores for a one-process job)."""
    return restored("OMP_NUM_THREADS")


def cores() -> int:
    """The cores this process may run on (its CPU affinity: a SLURM allocation, taskset)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def jobs_at_once(launcher: Mapping[str, Any] | None) -> int:
    """How many jobs of the sweep run at once on this machine, this one included.

    ``launcher`` is the job's ``hydra.launcher`` (None: a single run). joblib runs
    ``min(n_jobs, batch)`` (``n_jobs`` < 1: one per core); ``submitit_local`` starts a whole
    batch at once; other launchers (Hydra's basic one: one job after the other; SLURM: a job per
    allocation) run one job per process's cores.
    """
    if not launcher:
        return 1
    batch = int(os.environ.get(JOBS_AT_ONCE) or 0) or None
    target = str(launcher.get("_target_") or "")
    if "n_jobs" in launcher:  # joblib
        n_jobs = int(launcher.get("n_jobs") or 1)
        parallel = cores() if n_jobs < 1 else n_jobs
        return min(parallel, batch) if batch else parallel
    if target.endswith(_SUBMITIT_LOCAL):
        return (batch or 1) * int(launcher.get("tasks_per_node") or 1)
    return 1


def processes_per_machine(trainer: Mapping[str, Any] | None) -> int:
    """The processes a job with this ``trainer`` node starts on each machine: one per device
    (DDP, FSDP; ``trainer.accelerator=cpu trainer.devices=2`` is two), 1 for one device.

    ``devices`` is read as Lightning reads it: a count (``2``, ``"2"``), device ids (``[0, 1]``,
    ``"0,1"``; ``"1,"`` is GPU 1 alone), or every GPU (``-1``, ``"-1"``, ``"auto"`` off the
    CPU). On the CPU ``-1`` and ``"auto"`` are one process (Lightning refuses ``-1`` there). The
    one parser of ``devices``: the pre-checks' ``device_checks.several_devices`` asks it too."""
    devices = (trainer or {}).get("devices")
    if isinstance(devices, str) and "," in devices:  # GPU ids
        devices = [d for d in devices.split(",") if d.strip()]
    elif isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    elif isinstance(devices, str) and devices.strip() == "auto":
        devices = -1
    if isinstance(devices, bool | str) or not isinstance(devices, int | Sequence):
        return 1  # unset, or a value Lightning refuses itself (a list: a ListConfig too)
    if isinstance(devices, int) and devices != -1:
        return max(1, devices)
    if isinstance(devices, int):
        import torch  # every GPU

        cpu = str((trainer or {}).get("accelerator")) == "cpu"
        return 1 if cpu or not torch.cuda.is_available() else max(1, torch.cuda.device_count())
    return max(1, len(devices))  # a list of device ids


def user_threads(launcher: Mapping[str, Any] | None) -> int | None:
    """Threads the user asked for: ``OMP_NUM_THREADS`` where the sweep (or run) was started
    (torch has read it: its count is kept, with any ``torch.set_num_threads`` since), or
    ``hydra.launcher.cpus_per_task`` under ``submitit_local`` (None: neither)."""
    import torch

    if os.environ.get(LAUNCHER_OMP, os.environ.get("OMP_NUM_THREADS", "")).strip():
        return torch.get_num_threads()
    if launcher and str(launcher.get("_target_") or "").endswith(_SUBMITIT_LOCAL):
        cpus = launcher.get("cpus_per_task")
        return int(cpus) if cpus else None
    return None


def set_threads(launcher: Mapping[str, Any] | None = None,
                trainer: Mapping[str, Any] | None = None) -> int:
    """Set torch's intra-op threads for this job and return them: the user's setting
    (:func:`user_threads`), else cores / (:func:`jobs_at_once` x
    :func:`processes_per_machine` of the run's ``trainer`` node), at least one."""
    import torch

    processes = processes_per_machine(trainer)
    parallel = min(jobs_at_once(launcher) * processes, cores())
    own = user_threads(launcher)
    threads = own or max(1, cores() // max(1, parallel))
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    if processes > 1 and not own:  # the DDP launcher and the ranks it starts keep it
        os.environ["OMP_NUM_THREADS"] = str(threads)
    return threads
