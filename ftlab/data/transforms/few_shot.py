"""Few-shot training sets (prompt-based fine-tuning, Schick & Schuetze 2021; "true few-shot"
learning, Perez et al. 2021): keep ``k`` labelled training rows per class (or ``k_total`` in
all), drawn from the seed; the other training rows become unlabelled text: the data's
``unlabelled`` split, which training does not tokenise (``TextDataModule.unlabelled``) and which
distillation and iPET stages label with their teachers (``ftlab.distill``).

``validation: full`` keeps the whole validation split (the usual, optimistic setting);
``validation: k_shot`` draws the same ``k`` per class (or ``k_total``) from it too, so model
selection sees no more labels than training does (Perez et al.). The test split is never
touched. The choice is recorded in the stage's record (``data_transforms``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from datasets import Dataset

from ftlab.data.conll import is_list_feature
from ftlab.data.transforms.base import LABEL, Applied, Rows
from ftlab.errors import FtlabError

VALIDATION = ("full", "k_shot")


class FewShot:
    """Keep ``k`` rows per class (or ``k_total`` rows) of the training split.

    Args:
        k: labelled rows per class.
        k_total: labelled rows in all, drawn uniformly (instead of ``k``; no class balance).
        validation: ``full`` or ``k_shot`` (subsample validation the same way).
        seed: null draws from the stage's seed (a new draw per seed); an int fixes the draw
            across training seeds.
        unlabelled: keep the rest of the training split as unlabelled text (true), none of it
            (false), or a seeded sample of that many rows (labelling them costs a teacher
            forward pass each).
    """

    name = "few_shot"

    def __init__(self, k: int | None = 16, k_total: int | None = None,
                 validation: str = "full", seed: int | None = None,
                 unlabelled: bool | int = True) -> None:
        if (k is None) == (k_total is None):
            raise FtlabError(f"few_shot takes k (per class) or k_total, not "
                             f"{'both' if k is not None else 'neither'} (k={k}, "
                             f"k_total={k_total}).",
                             "set one, e.g. {few_shot: {k: 16}} or {few_shot: {k: null, "
                             "k_total: 32}}.")
        n = k if k is not None else k_total
        if not isinstance(n, int) or n < 1:
            raise FtlabError(f"few_shot k/k_total={n!r} must be a whole number >= 1.",
                             "e.g. k=16 (Gao et al. 2021) or k_total=32 (Schick & Schuetze).")
        if validation not in VALIDATION:
            raise FtlabError(f"few_shot validation='{validation}'.",
                             f"use one of: {', '.join(VALIDATION)}.")
        if isinstance(unlabelled, int) and not isinstance(unlabelled, bool) and unlabelled < 1:
            raise FtlabError(f"few_shot unlabelled={unlabelled}.",
                             "true (all the other rows), false (none) or a number >= 1 of them.")
        self.k, self.k_total, self.validation = k, k_total, validation
        self.seed, self.keep_unlabelled = seed, unlabelled

    def __call__(self, rows: Rows) -> Applied:
        seed = rows.seed if self.seed is None else self.seed
        keep = self.draw(rows.train, rows.labels, np.random.default_rng([seed, 0]), "training")
        rest = np.setdiff1d(np.arange(len(rows.train)), keep)
        train = rows.train.select(keep)
        unlabelled = None
        if self.keep_unlabelled:
            if not isinstance(self.keep_unlabelled, bool) and len(rest) > self.keep_unlabelled:
                rest = np.sort(np.random.default_rng([seed, 2]).choice(
                    rest, self.keep_unlabelled, replace=False))
            pool = rows.train.select(rest)
            unlabelled = pool.remove_columns([c for c in (LABEL,) if c in pool.column_names])
        keep_val = None
        if self.validation == "k_shot" and rows.validation is not None:
            keep_val = self.draw(rows.validation, rows.labels,
                                 np.random.default_rng([seed, 1]), "validation").tolist()
        info: dict[str, Any] = {"k": self.k, "k_total": self.k_total,
                                "validation": self.validation, "draw_seed": seed}
        if rows.labels is not None and not is_list_feature(train.features[LABEL]):
            counts = np.bincount(train.with_format("arrow")[LABEL].to_numpy(),
                                 minlength=len(rows.labels))
            info["per_class"] = dict(zip(rows.labels, counts.tolist(), strict=True))
        return Applied(train, unlabelled=unlabelled, keep_validation=keep_val, info=info)

    def draw(self, ds: Dataset, labels: list[str] | None, rng: np.random.Generator,
             split: str) -> np.ndarray:
        """Positions of the rows kept, in their original order."""
        if self.k_total is not None:
            if len(ds) < self.k_total:
                raise FtlabError(f"few_shot k_total={self.k_total}, but the {split} split has "
                                 f"{len(ds)} rows.", f"use k_total <= {len(ds)}.")
            return np.sort(rng.choice(len(ds), self.k_total, replace=False))
        if labels is None or LABEL not in ds.column_names:
            why = "its labels are numbers (stage=regression), not classes" \
                if LABEL in ds.column_names else "it has no labels (data.label_column is null)"
            raise FtlabError(f"few_shot k per class needs class labels, but {why}.",
                             "use k_total (k rows in all), or leave this stage without the "
                             "transform: data_overrides: {transforms: []}.")
        if is_list_feature(ds.features[LABEL]):  # stage=tokens: a tag per word, no row class
            raise FtlabError(f"few_shot k={self.k} draws k rows per class, but the rows hold a "
                             "tag per word (token classification), not one class each.",
                             f"draw rows in all instead: {{few_shot: {{k: null, k_total: "
                             f"{self.k * len(labels)}}}}}.")
        y = ds.with_format("arrow")[LABEL].to_numpy()
        where = [np.flatnonzero(y == c) for c in range(len(labels))]
        short = {name: len(w) for name, w in zip(labels, where, strict=True) if len(w) < self.k}
        if short:
            said = ", ".join(f"class '{name}' has only {n} row(s)" for name, n in short.items())
            least = min(short.values())  # 0: a class the split lacks; no k fits it
            raise FtlabError(f"few_shot k={self.k}: {said} in the {split} split.",
                             (f"use k <= {least}, or k_total" if least else "use k_total")
                             + (", or validation: full" if split == "validation" else "")
                             + (", or remove the class from data.labels (no training row has "
                                "it; a Hub dataset's own class: data.drop_labels)." if not least
                                and split != "validation" else
                                ", or drop the class (data.drop_labels)."))
        picked = [rng.choice(w, self.k, replace=False) for w in where]
        return np.sort(np.concatenate(picked))
