"""The ``ftlab`` command: a Hydra app over conf/ (``python -m ftlab`` too)."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import hydra
from omegaconf import DictConfig

_HERE = Path(__file__).resolve().parent
#: conf/ sits beside the package in a checkout and inside it in a built wheel
CONFIG_DIR = str(_HERE / "conf" if (_HERE / "conf").is_dir() else _HERE.parent / "conf")


def quiet() -> None:
    """Silence library chatter that says nothing to a user of ftlab."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*`tensorboardX` has been removed.*")
    import logging

    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def _app(cfg: DictConfig) -> float | None:
    from ftlab.run import run

    record = run(cfg)
    final = record.get("final") or {}
    return final.get("val/acc")  # Hydra sweepers (e.g. Optuna) read the return value


def main() -> None:
    quiet()
    _app()
    from ftlab.run import ERRORED

    if ERRORED:
        print(f"ftlab: {len(ERRORED)} job(s) ended in an error; see metrics.json in: "
              + ", ".join(ERRORED), file=sys.stderr)
        sys.exit(1)
