"""ftlab's training-step overhead vs a hand-written PyTorch loop, and length bucketing vs
padding every batch to 128 tokens, on MiniLM + Rotten Tomatoes.

    python benchmarks/overhead.py [--rounds 5] [--threads 1] [--steps 40] [--json FILE]
    python -m benchmarks.overhead ...

Measured the way a shared, noisy machine allows (see the stack notes): CPU time per optimiser
step (``time.process_time``) at a fixed torch thread count, variants run interleaved in one
process (each round runs every variant once; odd rounds run them in reverse order), on the
same batches every round. It prints each round's ratios, their median and range, and one JSON
line with every figure (also written to ``--json FILE``).

- overhead = ftlab CPU-s/step / hand-written CPU-s/step on the same length-bucketed batches
  (target <= 1.05).
- bucketing = pad-to-128 CPU-s/example / length-bucketed CPU-s/example, both through ftlab
  (target >= 2).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import lightning as L
import torch

try:
    from benchmarks._common import rotten_setup
except ImportError:  # run as `python benchmarks/overhead.py` without the repo on sys.path
    from _common import rotten_setup
from ftlab.module import FineTuneModule
from ftlab.optim import OptimSpec, build_optimizer
from ftlab.regularizers.none import NoRegularizer


# The only two places that touch ftlab's module/task APIs (adapt them here if those change).
def ftlab_module(model: torch.nn.Module, task) -> L.LightningModule:
    """ftlab's LightningModule for plain full fine-tuning."""
    return FineTuneModule(model, task, NoRegularizer(), OptimSpec())


def task_loss(task, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The task's training loss for a batch (what the hand-written loop back-propagates)."""
    return task.forward(model, batch).loss


class CpuStepTimer(L.Callback):
    """Process CPU time over optimiser steps ``warmup + 1 .. warmup + steps``."""

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.steps = warmup, steps

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.warmup:
            self.start = time.process_time()
        elif trainer.global_step == self.warmup + self.steps:
            self.seconds = time.process_time() - self.start


def ftlab_cpu_per_step(task, loader, spec, steps: int, warmup: int, precision: str) -> float:
    """CPU seconds per optimiser step with ftlab's module and Lightning."""
    torch.manual_seed(0)
    module = ftlab_module(task.build_model(spec), task)
    timer = CpuStepTimer(warmup, steps)
    trainer = L.Trainer(accelerator="cpu", max_steps=steps + warmup, precision=precision,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[timer],
                        gradient_clip_val=1.0, num_sanity_val_steps=0)
    trainer.fit(module, train_dataloaders=loader)
    return timer.seconds / steps


def plain_cpu_per_step(task, loader, spec, steps: int, warmup: int, precision: str) -> float:
    """CPU seconds per step of the same work in a hand-written loop."""
    torch.manual_seed(0)
    model = task.build_model(spec).train()
    opt, sched = build_optimizer(model, OptimSpec(), steps + warmup)
    autocast = precision == "bf16-mixed"
    it = iter(loader)
    for i in range(steps + warmup):
        if i == warmup:
            start = time.process_time()
        batch = next(it)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = task_loss(task, model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched["scheduler"].step()
        opt.zero_grad(set_to_none=True)
    return (time.process_time() - start) / steps


def spread(ratios: list[float]) -> dict:
    return {"ratios": [round(r, 4) for r in ratios], "median": round(statistics.median(ratios), 4),
            "min": round(min(ratios), 4), "max": round(max(ratios), 4)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--steps", type=int, default=40, help="timed steps, bucketed batches")
    parser.add_argument("--pad-steps", type=int, default=10, help="timed steps, pad-to-128")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    parser.add_argument("--json", metavar="FILE", help="also write the JSON figures here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch "
          f"{args.batch_size}, {args.steps} (+{args.warmup}) timed steps bucketed, "
          f"{args.pad_steps} pad-128, {args.rounds} rounds, precision {args.precision}, "
          f"load {os.getloadavg()[0]:.2f}", flush=True)

    task, dm, spec = rotten_setup(args.batch_size)
    lengths = torch.tensor(list(dm.splits["train"]["length"]), dtype=torch.float)
    print(f"Rotten Tomatoes train: {len(lengths)} rows, tokens/row mean {lengths.mean():.1f}, "
          f"p95 {lengths.quantile(0.95):.0f}, max {lengths.max():.0f}", flush=True)
    _, padded_dm, _ = rotten_setup(args.batch_size, pad_to=128)

    def padded_loader():  # random batches, each padded to 128 tokens (run_glue's default)
        return torch.utils.data.DataLoader(
            padded_dm.splits["train"], batch_size=args.batch_size, shuffle=True,
            collate_fn=padded_dm.collate, generator=torch.Generator().manual_seed(0))

    run = {  # the same batches every round: a fresh loader with the same seed
        "plain": lambda: plain_cpu_per_step(task, dm.train_dataloader(), spec, args.steps,
                                            args.warmup, args.precision),
        "ftlab": lambda: ftlab_cpu_per_step(task, dm.train_dataloader(), spec, args.steps,
                                            args.warmup, args.precision),
        "pad128": lambda: ftlab_cpu_per_step(task, padded_loader(), spec, args.pad_steps,
                                             args.warmup, args.precision),
    }
    order = ["plain", "ftlab", "pad128"]  # ftlab sits next to both variants it is compared with
    cpu: dict[str, list[float]] = {k: [] for k in order}
    overhead, bucketing = [], []
    for r in range(args.rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            cpu[name].append(run[name]())
        overhead.append(cpu["ftlab"][-1] / cpu["plain"][-1])
        bucketing.append(cpu["pad128"][-1] / cpu["ftlab"][-1])
        print(f"round {r + 1}/{args.rounds} ({'ABC' if r % 2 == 0 else 'CBA'}): CPU-s/step "
              f"plain {cpu['plain'][-1]:.3f}  ftlab {cpu['ftlab'][-1]:.3f}  pad-128 "
              f"{cpu['pad128'][-1]:.3f}   overhead {overhead[-1]:.3f}  bucketing "
              f"{bucketing[-1]:.2f}x   load {os.getloadavg()[0]:.2f}", flush=True)

    result = {
        "benchmark": "overhead", "torch": torch.__version__, "threads": args.threads,
        "rounds": args.rounds, "steps": args.steps, "pad_steps": args.pad_steps,
        "warmup": args.warmup, "batch_size": args.batch_size, "precision": args.precision,
        "load_avg": [round(x, 2) for x in os.getloadavg()],
        "cpu_s_per_step": {k: [round(x, 4) for x in v] for k, v in cpu.items()},
        "overhead_ftlab_vs_plain": spread(overhead),
        "bucketing_speedup_vs_pad128": spread(bucketing),
    }
    o, b = result["overhead_ftlab_vs_plain"], result["bucketing_speedup_vs_pad128"]
    print(f"overhead ftlab/plain CPU per step: median {o['median']:.3f} (range {o['min']:.3f}-"
          f"{o['max']:.3f}, {args.rounds} rounds; target <= 1.05)")
    print(f"bucketing vs pad-to-128, CPU per example: median {b['median']:.2f}x (range "
          f"{b['min']:.2f}-{b['max']:.2f}x; target >= 2x)")
    line = json.dumps(result)
    print(line)
    if args.json:
        with open(args.json, "w") as f:
            f.write(line + "\n")
    return result


if __name__ == "__main__":
    main()
