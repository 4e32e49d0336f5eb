"""A Lightning callback that kills chosen jobs of a sweep midway (tests of resuming)."""

from __future__ import annotations

import os

import lightning as L


class CrashAt(L.Callback):
    """Raise at the end of optimiser step ``step`` when the job's seed is listed in the
    environment variable ``FTLAB_TEST_CRASH_SEEDS`` (e.g. ``3,4``); otherwise do nothing."""

    def __init__(self, step: int = 6) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        seeds = os.environ.get("FTLAB_TEST_CRASH_SEEDS", "").split(",")
        if trainer.global_step == self.step and os.environ.get("PL_GLOBAL_SEED") in seeds:
            raise RuntimeError(f"killed at step {self.step}")


class InterruptAt(L.Callback):
    """Send this process SIGINT (Ctrl+C) at the end of optimiser step ``step`` when the job's
    seed is listed in ``FTLAB_TEST_INTERRUPT_SEEDS``; otherwise do nothing."""

    def __init__(self, step: int = 6) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        import signal

        seeds = os.environ.get("FTLAB_TEST_INTERRUPT_SEEDS", "").split(",")
        if trainer.global_step == self.step and os.environ.get("PL_GLOBAL_SEED") in seeds:
            os.kill(os.getpid(), signal.SIGINT)


def sigkill_main() -> None:
    """``python -c 'from tests.crash import sigkill_main; sigkill_main()' <ftlab overrides>``:
    the ``ftlab`` command, SIGKILLed (as the OOM killer or ``kill -9`` would) at the point
    ``FTLAB_TEST_SIGKILL_AT`` names: ``pipeline`` or ``reuse`` (after ``metrics.json`` says
    running, before any stage starts; a sweep builds its pipelines once before its first job,
    so ``reuse`` there) or ``stage`` (as the first stage starts)."""
    import signal
    import sys

    import ftlab.cache
    import ftlab.pipeline
    import ftlab.resume
    from ftlab.cli import main

    def die(*args: object, **kwargs: object) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    where = os.environ["FTLAB_TEST_SIGKILL_AT"]
    module, name = {"pipeline": (ftlab.pipeline, "build_pipeline"),
                    "reuse": (ftlab.resume, "finished_record"),
                    "stage": (ftlab.cache, "run_or_reuse")}[where]
    setattr(module, name, die)
    sys.argv = ["ftlab", *sys.argv[1:]]
    main()
