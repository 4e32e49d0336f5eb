"""The training loops that benchmarks/overhead.py times against each other, on the same batches:
``run_plain`` (a hand-written PyTorch loop), ``run_ftlab`` (ftlab's LightningModule under
Lightning's Trainer, as trainer=gpu runs it) and ``run_module`` (ftlab's module driven by the
plain loop), with the clock they share and the untimed warm-up through each loop."""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import SingleDeviceStrategy

from ftlab.compiling import CUDAGRAPH_MODES
from ftlab.flops import FlopRule
from ftlab.module import FineTuneModule
from ftlab.optim import OptimSpec, build_optimizer, fuses
from ftlab.regularizers.none import NoRegularizer

try:
    from benchmarks._common import MINILM
except ImportError:  # run as `python benchmarks/overhead.py` without the repo on sys.path
    from _common import MINILM

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"
SIZES = {"tiny": "tiny_bert.yaml", "base": "bert_base_random.yaml"}


def model_spec(size: str):
    """The ``ModelSpec`` of ``--model-size`` (a conf/model YAML for tiny and base)."""
    from omegaconf import OmegaConf

    from ftlab.config import bind_schema
    from ftlab.model.backbone import ModelSpec

    if size == "minilm":
        return MINILM
    return bind_schema(ModelSpec, OmegaConf.load(CONF / SIZES[size]), "model")


# The only two places that touch ftlab's module/task APIs (adapt them here if those change).
def ftlab_module(model: torch.nn.Module, task, mode: str | None = None) -> L.LightningModule:
    """ftlab's LightningModule for plain full fine-tuning, as trainer=gpu runs it."""
    return FineTuneModule(model, task, NoRegularizer(), OptimSpec(), check_finite_every=50,
                          cudagraphs=mode in CUDAGRAPH_MODES)


def mark_step(mode: str | None) -> None:
    """A new CUDA-graph iteration (as ftlab's module marks each step under such a mode)."""
    if mode in CUDAGRAPH_MODES:
        torch.compiler.cudagraph_mark_step_begin()


def task_loss(task, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The task's training loss for a batch (what the hand-written loop back-propagates)."""
    return task.forward(model, batch).loss


class Clock:
    """Seconds over steps ``warmup + 1 .. warmup + steps`` and the rows, tokens and model
    FLOPs (``ftlab.flops``) they took."""

    def __init__(self, device: torch.device, warmup: int, steps: int,
                 rule: FlopRule | None = None) -> None:
        if warmup < 1:  # the window starts when the last untimed step ends
            raise ValueError(f"Clock needs at least one untimed step, got warmup={warmup}")
        self.device, self.warmup, self.steps, self.rule = device, warmup, steps, rule
        self.rows = self.tokens = 0
        self.flops = 0.0
        self.seconds = float("nan")

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return time.perf_counter()
        return time.process_time()

    def after_step(self, done: int, batch: dict[str, torch.Tensor]) -> None:
        """Call after optimiser step ``done`` (1-based) on ``batch``."""
        if done == self.warmup:
            self.start = self.now()
        elif self.warmup < done <= self.warmup + self.steps:
            self.rows += batch["input_ids"].shape[0]
            self.tokens += batch["input_ids"].numel()
            if self.rule is not None:
                self.flops += self.rule.per_batch(*batch["input_ids"].shape)
            if done == self.warmup + self.steps:
                self.seconds = self.now() - self.start


class StepClock(L.Callback):
    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.clock.after_step(trainer.global_step, batch)


class KeepOnDevice(SingleDeviceStrategy):
    """Lightning's one-device strategy without the end of a fit's move of the model to the CPU
    (``Strategy.teardown``): moved back for the next fit, every parameter gets a new address,
    and CUDA graph trees record every graph again (static input data pointer changed) inside
    the next round's timed steps. The plain loops' models never leave the GPU; with this, each
    loop is timed in its steady state. (ftlab's own stages keep Lightning's strategy: a stage
    is one fit, so it records each graph once per fit, as a warm-up.)"""

    def teardown(self) -> None:
        module, self._lightning_module = self._lightning_module, None
        try:
            super().teardown()
        finally:
            self._lightning_module = module


def run_ftlab(task, model, loader, clock: Clock, precision: str,
              mode: str | None = None) -> Clock:
    module = ftlab_module(model, task, mode)
    device = clock.device
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    trainer = L.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1,
                        strategy=KeepOnDevice(device=device),
                        max_steps=clock.warmup + clock.steps, precision=precision,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0,
                        callbacks=[StepClock(clock)], gradient_clip_val=1.0,
                        num_sanity_val_steps=0)
    trainer.fit(module, train_dataloaders=loader)
    return clock


def cycle(loader):
    while True:
        yield from loader


def plain_loop(model, loader, clock: Clock, loss_of, precision: str) -> Clock:
    """The hand-written loop: ``loss_of(batch, index)`` gives each step's loss, then backward,
    norm clipping at 1.0, AdamW (fused where ftlab fuses it) and the LR schedule as ftlab
    builds them."""
    device = clock.device
    model = model.to(device).train()
    total = clock.warmup + clock.steps
    opt, sched = build_optimizer(model, OptimSpec(), total, fused=fuses(precision, device.type))
    it = cycle(loader)
    for step in range(1, total + 1):
        batch = {k: v.to(device, non_blocking=True) for k, v in next(it).items()}
        loss_of(batch, step - 1).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched["scheduler"].step()
        opt.zero_grad(set_to_none=True)
        clock.after_step(step, batch)
    return clock


def run_plain(task, model, loader, clock: Clock, precision: str,
              mode: str | None = None) -> Clock:
    def loss_of(batch: dict[str, torch.Tensor], index: int) -> torch.Tensor:
        mark_step(mode)
        with torch.autocast(clock.device.type, dtype=torch.bfloat16,
                            enabled=precision == "bf16-mixed"):
            return task_loss(task, model, batch)

    return plain_loop(model, loader, clock, loss_of, precision)


def epoch_batches(loader) -> tuple[dict[tuple, dict], float]:
    """One batch per distinct shape of an epoch, and the share of its tokens that are real
    (not padding)."""
    seen: dict[tuple, dict] = {}
    real = padded = 0
    for batch in loader:
        seen.setdefault(tuple(batch["input_ids"].shape), batch)
        real, padded = real + int(batch["attention_mask"].sum()), padded + batch[
            "input_ids"].numel()
    return seen, real / max(1, padded)


def run_module(task, model, loader, clock: Clock, precision: str,
               mode: str | None = None) -> Clock:
    """ftlab's LightningModule driven by the plain loop (``--module``): its step hook and
    training_step under Lightning's autocast (cast cache off), without Lightning's loop. Tells
    the module's per-step cost from the Trainer's."""
    module = ftlab_module(model.to(clock.device), task, mode)

    def loss_of(batch: dict[str, torch.Tensor], index: int) -> torch.Tensor:
        module.on_train_batch_start(batch, index)
        with torch.autocast(clock.device.type, dtype=torch.bfloat16, cache_enabled=False,
                            enabled=precision == "bf16-mixed"):
            return module.training_step(batch, index)

    return plain_loop(model, loader, clock, loss_of, precision)


def warm(run, task, model, batches: dict[tuple, dict], device: torch.device, precision: str,
         mode: str | None = None) -> None:
    """Every batch shape of an epoch through the variant's own loop (``run``), untimed: kernel
    planning and compilation are paid here, not in whichever step meets the shape first. Its
    own loop, since what is compiled depends on it (Lightning's autocast disables the cast
    cache, which torch.compile guards on). Under CUDA-graph modes each shape runs three times
    (CUDA graph trees run a new graph once eagerly, record it on the next call, replay it from
    the third). The weights change; bench_batch puts them back."""
    if device.type != "cuda" and not mode:
        return
    steps = [b for _ in range(3 if mode in CUDAGRAPH_MODES else 1) for b in batches.values()]
    loader = torch.utils.data.DataLoader(steps, batch_size=None)  # these batches, in order
    run(task, model, loader, Clock(device, len(steps), 0), precision, mode)  # its clock
    # synchronises the device after the last step (where its empty window opens)
