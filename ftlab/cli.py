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
    preflight(sys.argv[1:])
    _app()
    from ftlab.run import ERRORED

    if ERRORED:
        print(f"ftlab: {len(ERRORED)} job(s) ended in an error; see metrics.json in: "
              + ", ".join(ERRORED), file=sys.stderr)
        sys.exit(1)


def preflight(argv: list[str]) -> None:
    """Compose the overrides once before Hydra runs, so a typo fails with a helpful message.

    Hydra alone says "Key 'max_epoch' is not in struct"; this says which key was meant. Sweep
    values are checked one by one for group options, otherwise with their first value.
    """
    from ftlab.errors import FtlabError
    from ftlab.preflight import check_overrides

    if any(a.startswith(SKIP_FLAGS) for a in argv):
        return
    try:
        check_overrides(_overrides(argv), CONFIG_DIR)
    except FtlabError as err:
        print(f"\nftlab: {err}\n", file=sys.stderr)
        sys.exit(2)
    except Exception:  # noqa: BLE001 - a check that cannot decide leaves it to Hydra
        return


def _overrides(argv: list[str]) -> list[str]:
    """The override arguments of a command line (flags and their values dropped)."""
    out, skip = [], False
    for arg in argv:
        if skip or arg.startswith("-"):
            skip = arg in ("--cfg", "-c", "--package", "-p")
            continue
        out.append(arg)
    return out


#: flags that change what Hydra does with the arguments: leave those to Hydra
SKIP_FLAGS = ("--help", "-h", "--hydra-help", "--info", "-i", "--shell-completion", "-sc",
              "--config-dir", "-cd", "--config-path", "-cp", "--config-name", "-cn",
              "--experimental-rerun")
