"""The ``ftlab`` command: a Hydra app over conf/ (``python -m ftlab`` too)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

_HERE = Path(__file__).resolve().parent
#: conf/ sits beside the package in a checkout and inside it in a built wheel
CONFIG_DIR = str(_HERE / "conf" if (_HERE / "conf").is_dir() else _HERE.parent / "conf")
#: the project root: the folder holding conf/ (``${ftlab_project:}`` in conf/paths), so a shipped
#: config finds ../shared/data whichever folder ftlab runs from
OmegaConf.register_new_resolver("ftlab_project", lambda: str(Path(CONFIG_DIR).parent),
                                replace=True)


def quiet() -> None:
    """Silence library chatter that says nothing a user of ftlab can act on. Imports the
    libraries it quiets, so it runs when a job starts, not for ``--help``."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("WANDB_SILENT", "true")  # e.g. "logging in anonymously" offline
    for message in (".*isinstance\\(treespec, LeafSpec\\).*", ".*does not have many workers.*",
                    ".*`tensorboardX` has been removed.*", ".*smaller than the logging interval.*",
                    ".*`is_gradient_checkpointing` is deprecated.*"):  # peft 0.21 asks for it
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
    from ftlab.errors import FtlabError
    from ftlab.resume import resume_argv, resume_cwd

    try:  # resume=<run or sweep dir>: the command that made it, into the same folder
        cwd = resume_cwd(sys.argv[1:])
        sys.argv[1:] = replace_files(resume_argv(sys.argv[1:]))
    except FtlabError as err:
        print(f"\nftlab: {err}\n", file=sys.stderr)
        sys.exit(2)
    if cwd is not None:  # where the run was started: its relative paths are from there
        print(f"ftlab: resuming in {cwd}, the folder the run was started from (relative "
              "paths, yours too, are read from there).", file=sys.stderr)
        os.chdir(cwd)
    sys.argv[1:] = config_flags_first(sys.argv[1:])
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
            if outcome.get("degenerate"):  # finished, but no better than a trivial predictor
                if "sweep_dir" in outcome:  # a single run printed its own FAILED line
                    print(f"ftlab: FAILED: {outcome['degenerate']} of {outcome['jobs']} job(s) "
                          "ended at or below a trivial baseline; see "
                          f"{outcome['sweep_dir']}/summary.md", file=sys.stderr)
                sys.exit(3)  # ftlab.status.DEGENERATE_EXIT (not imported: --help stays light)


def replace_files(argv: list[str]) -> list[str]:
    """``data.files={all: x.jsonl}`` replaces the data config's files, as the README says:
    Hydra merges a dict value into the existing one (train/validation/test stay, and the
    struct config refuses the new key 'all'), so it becomes ``~data.files +data.files={...}``;
    the same for a stage's own data (``pipeline.stages.inter.data.files={...}``)."""
    out = []
    for arg in argv:
        key, _, value = arg.partition("=")
        if value.startswith("{") and (key == "data.files" or key.endswith(".data.files")):
            out += [f"~{key}", f"+{arg}"]
        else:
            out.append(arg)
    return out


#: environment variable naming the file the sweep report writes the sweep's outcome to
SWEEP_STATUS = "FTLAB_SWEEP_STATUS"


def preflight(argv: list[str]) -> None:
    """Compose the overrides once before Hydra runs, so a typo fails with a helpful message.

    Hydra alone says "Key 'max_epoch' is not in struct"; this says which key was meant. Sweep
    values are checked one by one for group options, otherwise with their first value.
    """
    from ftlab.errors import FtlabError
    from ftlab.preflight import check_overrides

    argv, dirs, name = _config_flags(argv)
    if any(a.startswith(SKIP_FLAGS) for a in argv):
        return
    overrides = _overrides(argv)
    primary = CONFIG_DIR
    if dirs:  # --config-dir adds a folder to the search path: the same as hydra.searchpath
        if any(o.startswith("hydra.searchpath") for o in overrides):
            return
        # a primary config (-cn) found there is composed from there, with conf/ searched too
        primary = next((d for d in dirs if name and Path(d, f"{name}.yaml").is_file()),
                       CONFIG_DIR)
        search = [d for d in (CONFIG_DIR, *dirs) if d != primary]
        overrides.append(f"hydra.searchpath=[{','.join(f'file://{d}' for d in search)}]")
    try:
        check_overrides(overrides, primary, name or "config", own_dir=CONFIG_DIR)
    except FtlabError as err:
        print(f"\nftlab: {err}\n", file=sys.stderr)
        sys.exit(2)
    except Exception:  # noqa: BLE001 - a check that cannot decide leaves it to Hydra
        return


#: Hydra's flags that name the config (``--config-dir x``, ``--config-dir=x``, ``-cd x``,
#: ``-cd=x``: argparse takes each form) -> what they name
CONFIG_FLAGS = {"--config-dir": "dir", "-cd": "dir", "--config-name": "name", "-cn": "name"}


def _split_config_flags(argv: list[str]) -> tuple[list[tuple[str, str, list[str]]], list[str]]:
    """(``(what, value, its arguments)`` for each config flag in ``argv``, the other
    arguments); ``what`` is ``dir`` or ``name``."""
    flags: list[tuple[str, str, list[str]]] = []
    rest: list[str] = []
    waiting: str | None = None  # the flag whose value is the next argument
    for arg in argv:
        flag, eq, value = arg.partition("=")
        if waiting is not None:
            flags.append((CONFIG_FLAGS[waiting], arg, [waiting, arg]))
            waiting = None
        elif arg in CONFIG_FLAGS:
            waiting = arg
        elif eq and flag in CONFIG_FLAGS:
            flags.append((CONFIG_FLAGS[flag], value, [arg]))
        else:
            rest.append(arg)
    if waiting is not None:  # a flag without its value: Hydra says so
        rest.append(waiting)
    return flags, rest


def _config_flags(argv: list[str]) -> tuple[list[str], list[str], str | None]:
    """(``argv`` without ``--config-dir``/``-cd`` and ``--config-name``/``-cn`` and their
    values, those folders made absolute, that config name)."""
    flags, rest = _split_config_flags(argv)
    dirs = [os.path.abspath(value) for what, value, _ in flags if what == "dir" and value]
    names = [value for what, value, _ in flags if what == "name" and value]
    return rest, dirs, (names[-1] if names else None)


def config_flags_first(argv: list[str]) -> list[str]:
    """``argv`` with ``--config-dir``/``-cd`` and ``--config-name``/``-cn`` (and their values)
    moved to the front: Hydra's parser takes no flag after the overrides (``ftlab peft=mine
    --config-dir myconf`` stopped with "unrecognized arguments")."""
    flags, rest = _split_config_flags(argv)
    return [a for _, _, args in flags for a in args] + rest


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
              "--config-path", "-cp",
              "--experimental-rerun")


def run_parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """The command line ``ftlab-predict`` and ``ftlab-export`` share: the run folder,
    ``--stage`` and ``--allow-targets`` (``load``'s arguments)."""
    parser = argparse.ArgumentParser(prog=prog, description=doc)
    parser.add_argument("run_dir", type=Path, help="a run folder, e.g. outputs/runs/<time>")
    parser.add_argument("--stage", help="which stage (default: the run's last)")
    parser.add_argument("--allow-targets", action="append", metavar="MODULE",
                        help="a module of your own code the run's config names (as the run's "
                             "allow_targets, e.g. mypkg.); only for runs you trust")
    return parser


def quiet_loading() -> None:
    """ftlab's quiet logging, and no Transformers "Loading weights" progress bars."""
    import transformers

    quiet()
    transformers.utils.logging.disable_progress_bar()
