"""The ``ftlab`` command: a Hydra app over conf/ (``python -m ftlab`` too)."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import warnings
from pathlib import Path

import hydra
from omegaconf import DictConfig

_HERE = Path(__file__).resolve().parent
#: conf/ sits beside the package in a checkout and inside it in a built wheel
CONFIG_DIR = str(_HERE / "conf" if (_HERE / "conf").is_dir() else _HERE.parent / "conf")


def quiet() -> None:
    """Silence library chatter that says nothing a user of ftlab can act on. Imports the
    libraries it quiets, so it runs when a job starts, not for ``--help``."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("WANDB_SILENT", "true")  # e.g. "logging in anonymously" offline
    for message in (".*isinstance\\(treespec, LeafSpec\\).*", ".*does not have many workers.*",
                    ".*`tensorboardX` has been removed.*", ".*smaller than the logging interval.*"):
        warnings.filterwarnings("ignore", message=message)
    import logging

    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def _app(cfg: DictConfig) -> float:
    """One job. Returns ``val/<monitor>`` of the last stage for optimising sweepers (Optuna),
    or the worst value for its mode (-inf when higher is better) when the job failed."""
    quiet()
    from ftlab.run import run

    return run(cfg)["objective"]


def main() -> None:
    preflight(sys.argv[1:])
    with tempfile.TemporaryDirectory(prefix="ftlab-") as tmp:
        # the sweep report (a Hydra callback in this process) writes the sweep's outcome here,
        # counted from the job folders: true under every launcher
        status = Path(tmp) / "sweep.json"
        os.environ[SWEEP_STATUS] = str(status)
        _app()
        if status.is_file():
            outcome = json.loads(status.read_text())
            if outcome["errored"]:
                print(f"ftlab: {outcome['errored']} of {outcome['jobs']} job(s) ended in an "
                      f"error; see {outcome['sweep_dir']}/summary.md", file=sys.stderr)
                sys.exit(1)


#: environment variable naming the file the sweep report writes the sweep's outcome to
SWEEP_STATUS = "FTLAB_SWEEP_STATUS"


def preflight(argv: list[str]) -> None:
    """Compose the overrides once before Hydra runs, so a typo fails with a helpful message.

    Hydra alone says "Key 'max_epoch' is not in struct"; this says which key was meant. Sweep
    values are checked one by one for group options, otherwise with their first value.
    """
    from ftlab.errors import FtlabError
    from ftlab.preflight import check_overrides

    argv, dirs = _config_dirs(argv)
    if any(a.startswith(SKIP_FLAGS) for a in argv):
        return
    overrides = _overrides(argv)
    if dirs:  # --config-dir adds a folder to the search path: the same as hydra.searchpath
        if any(o.startswith("hydra.searchpath") for o in overrides):
            return
        overrides.append(f"hydra.searchpath=[{','.join(f'file://{d}' for d in dirs)}]")
    try:
        check_overrides(overrides, CONFIG_DIR)
    except FtlabError as err:
        print(f"\nftlab: {err}\n", file=sys.stderr)
        sys.exit(2)
    except Exception:  # noqa: BLE001 - a check that cannot decide leaves it to Hydra
        return


def _config_dirs(argv: list[str]) -> tuple[list[str], list[str]]:
    """(``argv`` without ``--config-dir DIR`` / ``-cd DIR``, those folders made absolute)."""
    rest, dirs, take = [], [], False
    for arg in argv:
        if take:
            dirs.append(os.path.abspath(arg))
            take = False
        elif arg in ("--config-dir", "-cd"):
            take = True
        elif arg.startswith("--config-dir="):
            dirs.append(os.path.abspath(arg.split("=", 1)[1]))
        else:
            rest.append(arg)
    return rest, dirs


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
              "--config-path", "-cp", "--config-name", "-cn",
              "--experimental-rerun")
