"""ftlab's training-step overhead vs a hand-written PyTorch loop, and length bucketing vs
padding every batch to 128 tokens. Prints figures; run on an otherwise idle machine.

    python benchmarks/overhead.py [--steps 40] [--batch-size 32] [--precision 32-true]

Targets: overhead ratio <= 1.05; bucketing >= 2x the examples/s of pad-to-128.
"""

from __future__ import annotations

import argparse
import time

import lightning as L
import torch

from benchmarks._common import rotten_setup
from ftlab.module import FineTuneModule
from ftlab.optim import OptimSpec, build_optimizer
from ftlab.regularizers.none import NoRegularizer


class StepTimer(L.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.times = warmup, []

    def on_train_batch_start(self, trainer, *args) -> None:
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()

    def on_train_end(self, trainer, *args) -> None:
        self.seconds = time.perf_counter() - self.start
        self.steps = trainer.global_step - self.warmup


def ftlab_steps(task, dm, spec, steps, warmup, precision) -> float:
    """Seconds per optimiser step with ftlab's module and Lightning."""
    torch.manual_seed(0)
    model = task.build_model(spec)
    module = FineTuneModule(model, task, NoRegularizer(), OptimSpec())
    timer = StepTimer(warmup)
    trainer = L.Trainer(accelerator="cpu", max_steps=steps + warmup, precision=precision,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[timer],
                        gradient_clip_val=1.0, num_sanity_val_steps=0)
    trainer.fit(module, train_dataloaders=dm.train_dataloader())
    return timer.seconds / timer.steps


def plain_steps(task, dm, spec, steps, warmup, precision) -> float:
    """Seconds per step of the same work in a hand-written loop."""
    torch.manual_seed(0)
    model = task.build_model(spec).train()
    opt, sched = build_optimizer(model, OptimSpec(), steps + warmup)
    autocast = precision == "bf16-mixed"
    it = iter(dm.train_dataloader())
    for i in range(steps + warmup):
        if i == warmup:
            start = time.perf_counter()
        batch = next(it)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = task.forward(model, batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched["scheduler"].step()
        opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"batch {args.batch_size}, {args.steps} timed steps, precision {args.precision}")

    task, dm, spec = rotten_setup(args.batch_size)
    lengths = torch.tensor(list(dm.splits["train"]["length"]), dtype=torch.float)
    print(f"Rotten Tomatoes train: {len(lengths)} rows, tokens/row mean {lengths.mean():.1f}, "
          f"p95 {lengths.quantile(0.95):.0f}, max {lengths.max():.0f}")
    rounds = []
    for _ in range(2):  # interleave to be fair to both under machine noise
        rounds.append((plain_steps(task, dm, spec, args.steps, args.warmup, args.precision),
                       ftlab_steps(task, dm, spec, args.steps, args.warmup, args.precision)))
    plain = min(r[0] for r in rounds)
    ours = min(r[1] for r in rounds)
    print(f"step time  hand-written: {plain * 1000:.1f} ms   ftlab: {ours * 1000:.1f} ms   "
          f"overhead ratio {ours / plain:.3f} (target <= 1.05)")

    _, padded_dm, _ = rotten_setup(args.batch_size, pad_to=128)
    padded_dm.train_dataloader = lambda: torch.utils.data.DataLoader(  # random batches
        padded_dm.splits["train"], batch_size=args.batch_size, shuffle=True,
        collate_fn=padded_dm.collate)
    pad = ftlab_steps(task, padded_dm, spec, max(10, args.steps // 2), args.warmup,
                      args.precision)
    bucketed = args.batch_size / ours
    print(f"examples/s  length-bucketed dynamic padding: {bucketed:.1f}   "
          f"pad-to-128: {args.batch_size / pad:.1f}   speed-up {pad / ours:.2f}x (target >= 2x)")


if __name__ == "__main__":
    main()
