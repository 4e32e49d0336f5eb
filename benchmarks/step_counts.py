"""Host work per training step that does not depend on the machine's load: Python function
calls (cProfile) and ATen ops dispatched (on a GPU, about one kernel launch each), for ftlab's
training step against the hand-written loop of benchmarks/overhead.py (tiny_bert, CPU, the same
Rotten Tomatoes batches). Where the CPU is shared, CPU-time ratios scatter by +-10%; these
counts are exact.

    python benchmarks/step_counts.py              # ftlab as overhead.py runs it, and plain
    python benchmarks/step_counts.py --user       # also trainer=cpu + rich bar + CSV logger
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import json
import pstats
import tempfile

import lightning as L
import torch
from torch.utils._python_dispatch import TorchDispatchMode

try:
    from benchmarks._common import rotten_setup
    from benchmarks.loops import Clock, ftlab_module, model_spec, run_plain
except ImportError:  # run as `python benchmarks/step_counts.py`
    from _common import rotten_setup
    from loops import Clock, ftlab_module, model_spec, run_plain

WARM, STEPS = 5, 40


class Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.n: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n[str(func)] += 1
        return func(*args, **(kwargs or {}))


class Window:
    """Counts over steps WARM+1 .. WARM+STEPS."""

    def __init__(self) -> None:
        self.prof, self.ops = cProfile.Profile(), Ops()

    def at(self, step: int) -> None:
        if step == WARM:
            self.ops.__enter__()
            self.prof.enable()
        elif step == WARM + STEPS:
            self.prof.disable()
            self.ops.__exit__(None, None, None)

    def result(self) -> tuple[float, float]:
        calls = pstats.Stats(self.prof).total_calls / STEPS
        return calls, sum(self.ops.n.values()) / STEPS


def count(variant: str, task, spec, dm) -> tuple[float, float]:
    torch.manual_seed(0)
    model, win = task.build_model(spec), Window()
    if variant == "plain":
        class Clocked(Clock):
            def after_step(self, done, batch):
                win.at(done)
        run_plain(task, model, dm.train_dataloader(), Clocked(torch.device("cpu"), WARM, STEPS),
                  "32-true")
        return win.result()

    class Hook(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            win.at(trainer.global_step)

    callbacks, logger, bar = [Hook()], False, False
    module = ftlab_module(model, task)
    if variant == "user":  # trainer=cpu (loss checked and shown every step), bar, CSV
        from lightning.pytorch.loggers import CSVLogger

        from ftlab.callbacks import Throughput
        from ftlab.progress import ProgressBar

        module.check_finite_every = 1
        callbacks += [ProgressBar(leave=False), Throughput()]
        logger, bar = CSVLogger(tempfile.mkdtemp(), name="csv"), True
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=WARM + STEPS + 1, logger=logger,
                        enable_checkpointing=False, enable_progress_bar=bar,
                        enable_model_summary=False, limit_val_batches=0, callbacks=callbacks,
                        gradient_clip_val=1.0, num_sanity_val_steps=0, log_every_n_steps=20)
    trainer.fit(module, train_dataloaders=dm.train_dataloader())
    return win.result()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--user", action="store_true", help="also the trainer=cpu user setup")
    args = parser.parse_args()
    torch.set_num_threads(1)
    spec = model_spec("tiny")
    task, dm, _ = rotten_setup(32, max_train=3000, model=spec)
    rows = {v: count(v, task, spec, dm) for v in ["plain", "ftlab", *(["user"] * args.user)]}
    base = rows["plain"]
    print("| variant | Python calls/step | ATen ops/step | beyond plain (calls, ops) |\n"
          "|---|---|---|---|")
    for name, (calls, ops) in rows.items():
        print(f"| {name} | {calls:.0f} | {ops:.1f} | {calls - base[0]:+.0f}, "
              f"{ops - base[1]:+.1f} |")
    print(json.dumps({"benchmark": "step_counts", "per_step": {
        name: {"python_calls": calls, "aten_ops": ops} for name, (calls, ops) in rows.items()}}))


if __name__ == "__main__":
    main()
