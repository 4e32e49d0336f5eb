"""Where a training step's host time goes on a GPU (``overhead.py --trace``): for one short run
of a variant, the kernel launches and CUDA graph replays per step (torch.profiler), the CUDA
graph trees' own account of what they did (recorded, re-recorded and why, warm-up and eager
runs: their debug log), dynamo's and inductor's counters over the run (recompilations, CUDA
graph skips) and the host operations that took the most time.

Under ``compile: reduce-overhead`` a step that replays its graphs shows ~2 graph launches (the
forward's and the backward's) and few kernel launches (optimiser, clipping); a step that runs
the compiled kernels one by one, or records its graphs again, shows hundreds.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable

import torch

#: the CUDA graph trees' logger (torch._inductor.cudagraph_trees); its debug lines name each
#: recording, re-recording (with the reason), warm-up and eager run
TREES_LOG = "torch._inductor.cudagraph_trees"
LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _kind(line: str) -> str:
    """A log line without its ids and inputs: 'Re-recording function=..., reason=...'."""
    line = re.sub(r"^\[[^\]]*\]\s*", "", line)
    line = re.sub(r", inputs: .*", "", line)
    return re.sub(r"\b\d+\b", "#", line)[:300]


def trace(run: Callable[[], object], steps: int, rows: int = 15) -> dict:
    """Profile ``run()`` (``steps`` optimiser steps): launches per step, the CUDA graph trees'
    log lines by kind (with counts), and the top host operations by their own time."""
    from torch._dynamo.utils import counters
    from torch.profiler import ProfilerActivity, profile

    before = {k: Counter(v) for k, v in counters.items()}
    logger, lines = logging.getLogger(TREES_LOG), _Lines()
    level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(lines)
    try:
        activities = [ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(ProfilerActivity.CUDA)
        with profile(activities=activities) as prof:
            run()
    finally:
        logger.removeHandler(lines)
        logger.setLevel(level)
    events = prof.key_averages()
    count = Counter({e.key: e.count for e in events})
    per_step = max(1, steps)
    # dynamo's and inductor's counters over the run (compilations, cudagraph_skips, ...)
    delta = {f"{group}.{key}": n - before.get(group, Counter())[key]
             for group, values in counters.items() for key, n in values.items()
             if n != before.get(group, Counter())[key]}
    return {
        "steps": steps,
        "graph_launches_per_step": round(sum(c for k, c in count.items()
                                             if k.startswith("cudaGraphLaunch")) / per_step, 1),
        "kernel_launches_per_step": round(sum(count[k] for k in LAUNCHES) / per_step, 1),
        "cudagraph_trees": Counter(_kind(ln) for ln in lines.lines).most_common(12),
        "counters": delta,
        "top_host_ops": events.table(sort_by="self_cpu_time_total", row_limit=rows),
    }
