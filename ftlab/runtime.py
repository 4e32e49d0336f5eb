"""How a stage runs on its hardware, as opposed to what it trains: data-loader processes, pinned
memory, padding shapes, how often the loss is checked, compilation. These are ftlab's own keys
in the ``trainer`` node (``conf/trainer/*.yaml``); they are taken out before the rest becomes
Lightning's ``Trainer``, and none of them changes the trained weights (not in the stage-cache
key)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Annotated, Any

from ftlab.config import bind_schema
from ftlab.errors import FtlabError
from ftlab.rules import at_least, one_of

#: ``trainer.compile`` values: off, on (torch's default mode), or a ``torch.compile`` mode
COMPILE_MODES = (False, True, "default", "reduce-overhead", "max-autotune",
                 "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class RuntimeSpec:
    """ftlab's keys in the ``trainer`` node.

    Attributes:
        num_workers: DataLoader worker processes (0: collate on the main thread).
        pin_memory: page-locked host batches, so copies to the GPU overlap compute.
        persistent_workers: keep the workers alive between epochs (with ``num_workers`` > 0).
        pad_to_multiple_of: round every batch's width up to a multiple of this (null: its own
            longest row). Few distinct shapes: each new one costs kernel planning on a GPU, and
            tensor cores want multiples of 8.
        pad_to_buckets: pad every batch to the smallest of these widths that holds its longest
            row (e.g. ``[32, 64, 128]``): a run meets at most this many shapes, which CUDA
            graphs (``compile: reduce-overhead``) need; a batch longer than the largest bucket
            falls back to ``pad_to_multiple_of``. Null: no buckets.
        check_finite_every_n_steps: test the training loss for NaN/inf every this many steps
            (and at each epoch's end) instead of every step, which would make the host wait for
            the GPU; the failing step is still reported exactly.
        compile: ``torch.compile`` the model before training (``false``/``null``: not):
            ``true`` (mode ``default``) or a mode, ``default | reduce-overhead | max-autotune |
            max-autotune-no-cudagraphs``
            (``reduce-overhead`` replays CUDA graphs: few host launches per step, one graph
            per batch shape, so use it with ``pad_to_buckets``; the CUDA-graph modes need a
            forward without graph breaks, else the first step stops with an FtlabError:
            ftlab/compiling.py).
        auto_batch_init / auto_batch_max_trials: ``stage.batch_size=auto`` starts at this batch
            and doubles at most this many times while a step fits in memory.
    """

    num_workers: Annotated[int, at_least(0, example="4")] = 0
    pin_memory: bool = False
    persistent_workers: bool = False
    pad_to_multiple_of: Annotated[int | None, at_least(1, example="16")] = None
    pad_to_buckets: Annotated[list[int] | None,
                              at_least(1, each=True, example="[32, 64, 128]")] = None
    check_finite_every_n_steps: Annotated[int, at_least(1, example="50")] = 50
    compile: Annotated[Any, one_of(*COMPILE_MODES, example="reduce-overhead")] = False
    auto_batch_init: Annotated[int, at_least(1, example="32")] = 32
    auto_batch_max_trials: Annotated[int, at_least(1, example="6")] = 6

    def cudagraphs(self) -> bool:
        """Whether the compile mode records CUDA graphs (each step must then be marked:
        ``torch.compiler.cudagraph_mark_step_begin``)."""
        from ftlab.compiling import CUDAGRAPH_MODES

        return self.compile_mode() in CUDAGRAPH_MODES

    def compile_mode(self) -> str | None:
        """The ``torch.compile`` mode of ``compile`` (None: not compiled; ``null`` is off)."""
        if self.compile is False or self.compile is None:
            return None
        return "default" if self.compile is True else str(self.compile)


#: the ``trainer`` keys that are ftlab's, not Lightning's
RUNTIME_KEYS = tuple(f.name for f in fields(RuntimeSpec))


def split_trainer(node: dict[str, Any], where: str) -> tuple[dict[str, Any], RuntimeSpec]:
    """(the Lightning ``Trainer`` node, ftlab's runtime settings) from a stage's trainer node."""
    own = {k: v for k, v in node.items() if k in RUNTIME_KEYS}
    spec = bind_schema(RuntimeSpec, own, f"{where} trainer", "trainer")  # ranges: ftlab.rules
    return {k: v for k, v in node.items() if k not in RUNTIME_KEYS}, spec


#: ``optim.lr_scaling`` rules: the peak LR for a global batch ``b`` from the LR at ``ref``
LR_RULES = {
    "none": lambda lr, b, ref: lr,
    # Goyal et al. 2017 ("Accurate, large minibatch SGD"): LR proportional to the batch
    "linear": lambda lr, b, ref: lr * b / ref,
    # Hoffer et al. 2017 ("Train longer, generalize better"); Krizhevsky 2014: the square root
    # keeps the gradient noise's scale; usual for Adam-type optimisers
    "sqrt": lambda lr, b, ref: lr * math.sqrt(b / ref),
}


def scaled_lr(lr: float, rule: str, batch: int, reference: int) -> float:
    """The peak LR for a global batch of ``batch`` rows under ``rule`` (``LR_RULES``)."""
    if rule not in LR_RULES:
        raise FtlabError(f"optim.lr_scaling is '{rule}'.",
                         f"use one of: {', '.join(LR_RULES)}.")
    return LR_RULES[rule](lr, batch, reference)
