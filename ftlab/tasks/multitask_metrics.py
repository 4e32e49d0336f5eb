"""The metrics of a multi-task stage (``ftlab.tasks.multitask``): every sub-task's own metrics
under ``<task>/<name>`` keys in one collection, their means, and the view through which one
sub-task updates its own."""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import MetricCollection


class TaskMetrics(MetricCollection):
    """The sub-tasks' metrics under ``<task>/<name>`` keys; ``compute`` adds their means and
    leaves out sub-tasks that saw no batch (e.g. no test split)."""

    def __init__(self, metrics: dict[str, Any], monitors: dict[str, str]) -> None:
        super().__init__(metrics, compute_groups=False)
        self.monitors = monitors

    def compute(self) -> dict[str, Any]:
        pre = self.prefix or ""
        out = {f"{pre}{k}": m.compute() for k, m in self.items(keep_base=True, copy_state=False)
               if m.update_count}
        ranked = [out[f"{pre}{t}/{m}"] for t, m in self.monitors.items()
                  if f"{pre}{t}/{m}" in out]
        if ranked:
            out[f"{pre}mean"] = torch.stack([v.float() for v in ranked]).mean()
        names = [{k.split("/", 1)[1] for k in self.keys(keep_base=True) if k.startswith(f"{t}/")}
                 for t in self.monitors]
        for name in sorted(set.intersection(*names)) if names else []:
            vals = [out[f"{pre}{t}/{name}"] for t in self.monitors if f"{pre}{t}/{name}" in out]
            if vals and all(v.numel() == 1 for v in vals):
                out[f"{pre}mean/{name}"] = torch.stack([v.float() for v in vals]).mean()
        return out


class TaskView:
    """One sub-task's metrics inside a :class:`TaskMetrics`, as its ``update`` expects them."""

    def __init__(self, metrics: MetricCollection, task: str) -> None:
        self.metrics, self.task = metrics, task

    def __getitem__(self, name: str) -> Any:
        return self.metrics[f"{self.task}/{name}"]

    def update(self, *args: Any, **kwargs: Any) -> None:
        for key, metric in self.metrics.items(keep_base=True, copy_state=False):
            if key.startswith(f"{self.task}/"):  # each metric its own kwargs, as a collection
                metric.update(*args, **metric._filter_kwargs(**kwargs))
