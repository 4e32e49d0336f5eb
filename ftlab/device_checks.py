"""Where a stage may run: the checks of its trainer's devices and strategy before any stage
trains (a multi-task stage and ``batch_size: auto`` run on one device), and what a trainer node
says about its devices (also asked by the sweep's pre-check)."""

from __future__ import annotations

from typing import Any

from ftlab.errors import FtlabError
from ftlab.pipeline import ResolvedStage


def check_strategy(stage: ResolvedStage) -> None:
    """A multi-task stage trains on one device: its sampler shards each sub-task's batches over
    ranks (every rank draws the same sub-task), but a 2-process DDP run on the CPU did not
    reproduce the 1-process weights (unexplained, see README), and FSDP's flattened parameters
    would give unused heads zero gradients. ``batch_size: auto`` searches on one device:
    refused here when the trainer names several, before any stage trains (``ftlab.autobatch``
    checks the world size it gets, e.g. ``devices=-1``)."""
    t = stage.trainer
    devices = t.get("devices")
    if stage.batch_size == "auto" and named_devices(t):
        raise FtlabError(f"{stage.where}: batch_size=auto searches on one device; the trainer "
                         f"asks for devices={devices}, num_nodes={t.get('num_nodes') or 1}.",
                         "find it with trainer=gpu on one GPU, then set that number as "
                         "stage.batch_size for the multi-device run.")
    if not stage.subtasks:
        return
    name = strategy_name(t)
    if several_devices(t):
        raise FtlabError(f"{stage.where} is a multi-task stage, which trains on one device "
                         f"(trainer strategy={name or None}, devices={devices}).",
                         "use one device for stage=multitask: trainer=cpu, or trainer=gpu "
                         "trainer.devices=1.")


def strategy_name(trainer: dict[str, Any]) -> str:
    strategy = trainer.get("strategy")
    return strategy.get("_target_", "") if isinstance(strategy, dict) else str(strategy or "")


def several_devices(trainer: dict[str, Any]) -> bool:
    """Whether the trainer node may run on several devices (processes): a multi-device
    strategy, every GPU (``devices`` -1 or auto off the CPU, whatever this machine has), or
    several named (:func:`named_devices`)."""
    every = str(trainer.get("devices")).strip() in ("-1", "auto") and str(
        trainer.get("accelerator")) != "cpu"
    return (any(k in strategy_name(trainer).lower() for k in ("ddp", "fsdp", "deepspeed"))
            or every or named_devices(trainer))


def named_devices(trainer: dict[str, Any]) -> bool:
    """Whether the trainer node asks for several devices on this machine (as
    ``threads.processes_per_machine`` reads ``devices``), or several nodes."""
    from ftlab.threads import processes_per_machine

    return processes_per_machine(trainer) > 1 or int(trainer.get("num_nodes") or 1) > 1
