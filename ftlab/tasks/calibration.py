"""Contextual calibration (Zhao et al., 2021) of a cloze stage's label probabilities:
``calibrate`` divides by the content-free input's probabilities (``Cloze.content_free_probs``)
and renormalises; ``acc_cal``/``f1_cal`` score the calibrated predictions beside the plain
ones (``stage.task.calibrate: true``)."""

from __future__ import annotations

import torch
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score


def calibrate(probs: torch.Tensor, p_cf: torch.Tensor) -> torch.Tensor:
    """Zhao et al. (2021): W = diag(p_cf)^-1, b = 0, then renormalise each row."""
    q = probs / p_cf.clamp(min=1e-12)
    return q / q.sum(-1, keepdim=True)


class CalibratedAccuracy(MulticlassAccuracy):
    """Accuracy of the calibrated predictions (``calibrated``), beside the plain one."""

    def update(self, calibrated: torch.Tensor, target: torch.Tensor) -> None:
        super().update(calibrated, target)


class CalibratedF1(MulticlassF1Score):
    """Macro F1 of the calibrated predictions (``calibrated``), beside the plain one."""

    def update(self, calibrated: torch.Tensor, target: torch.Tensor) -> None:
        super().update(calibrated, target)
