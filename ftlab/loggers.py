"""Experiment loggers: CSV always, W&B when asked (offline when there is no key/network)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ftlab.config import instantiate_checked

log = logging.getLogger(__name__)

#: the stage's W&B run id, beside W&B's own files (``<stage>/wandb/``), for a resumed attempt
RUN_ID_FILE = "ftlab-run-id"


def build_loggers(nodes: DictConfig | None, **context: Any) -> list:
    """Instantiate every logger node; ``context`` (stage name, group, tags, config) is passed
    to those whose constructor takes it."""
    import inspect

    from ftlab.config import check_binds, load_target

    loggers = []
    for key, node in (nodes or {}).items():
        if node is None:
            continue
        check_binds(node, f"logger.{key}", partial=True)  # the allow-list before any import
        params = inspect.signature(load_target(node["_target_"], f"logger.{key}")).parameters
        extra = {k: v for k, v in context.items() if k in params and k not in node}
        logger = instantiate_checked(node, f"logger.{key}", **extra)
        if logger is not None:  # None: an optional logger that could not start (W&B)
            loggers.append(logger)
    return loggers


def wandb_logger(
    project: str = "ftlab",
    save_dir: str = ".",
    name: str | None = None,
    group: str | None = None,
    job_type: str | None = None,
    tags: list[str] | None = None,
    config: dict | None = None,
    entity: str | None = None,
    mode: str = "auto",
    resuming: bool = False,
):
    """A Lightning ``WandbLogger`` that never hangs without a network.

    ``mode``: ``online``, ``offline`` or ``auto`` (online only when an API key is configured
    and the W&B server answers within 3 s; offline runs sync later with
    ``wandb sync <save_dir>/wandb/offline-run-*``).

    ``resuming``: the stage continues from its checkpoint, so it continues the W&B run the
    interrupted attempt started (its id is kept in ``<save_dir>/wandb/ftlab-run-id``) instead
    of starting a second run of the same stage. A stage that starts over gets a new run.

    W&B is extra to the CSV logs: when it cannot start (not installed, ``wandb.init`` fails)
    the stage trains without it, with a warning, and this returns None.
    """
    from lightning.pytorch.loggers import WandbLogger
    from lightning.pytorch.loggers.logger import DummyExperiment

    mode = resolve_mode(mode)
    try:
        # Lightning's WandbLogger attaches to a run already active in the process (the
        # previous stage's) instead of starting its own: finish it, so each stage is its own
        finish_wandb()
        if mode == "offline":
            log.info("W&B is offline; sync later with `wandb sync %s/wandb/offline-run-*`",
                     save_dir)
        os.makedirs(save_dir, exist_ok=True)
        id_file = Path(save_dir) / "wandb" / RUN_ID_FILE
        earlier = id_file.read_text().strip() if resuming and id_file.is_file() else None
        logger = WandbLogger(project=project, save_dir=save_dir, name=name, group=group,
                             job_type=job_type, tags=tags, entity=entity, id=earlier or None,
                             offline=mode == "offline", reinit="finish_previous")
        # Lightning 2.6 always passes anonymous=None, which wandb >= 0.19 warns about
        logger._wandb_init.pop("anonymous", None)
        # starts the run now (wandb.init), so a failure shows here and not mid-training; under
        # DDP the other ranks get Lightning's no-op stand-in, which has no config to update
        experiment = logger.experiment
        if not isinstance(experiment, DummyExperiment):
            experiment.config.update(config or {}, allow_val_change=True)
            try:  # a resumed attempt continues this run (without the file: a new run)
                id_file.parent.mkdir(parents=True, exist_ok=True)
                id_file.write_text(experiment.id)
            except OSError as err:
                log.warning("W&B: could not keep the run id in %s (%s); a resumed stage "
                            "will start a new W&B run.", id_file, err.strerror or err)
    except Exception as err:  # noqa: BLE001 - W&B is extra: the CSV logs and metrics.json stay
        log.warning("W&B could not start (%s: %s); stage %s trains without W&B logging (CSV logs "
                    "and metrics.json are written as usual). Fix: `pip install wandb`, check "
                    "the key and network, or use logger.wandb.mode=offline (or logger=csv).",
                    type(err).__name__, str(err).splitlines()[0] if str(err) else "",
                    job_type or name)
        return None
    return logger


#: what W&B refuses in a project name (``wandb.sdk.wandb_settings``): these characters, and
#: more than 128 characters
PROJECT_REFUSED = "/\\#?%:"


def check_wandb_node(node: Any, where: str) -> None:
    """A W&B project name that ``wandb.init`` would refuse, refused before any job trains:
    otherwise every stage trained without W&B (one warning each, with the wrong fix) and the
    sweep's summary runs were not logged."""
    from ftlab.errors import FtlabError

    project = node.get("project") if node.get("_target_") == f"{__name__}.wandb_logger" \
        else None
    if project is None:
        return
    bad = sorted({c for c in str(project) if c in PROJECT_REFUSED})
    if bad or len(str(project)) > 128:
        why = f"it holds {' '.join(repr(c) for c in bad)}" if bad else \
            f"it is {len(str(project))} characters long"
        raise FtlabError(f"{where}.project={str(project)!r} is not a name W&B accepts ({why}; "
                         f"W&B refuses {' '.join(PROJECT_REFUSED)} and more than 128 "
                         "characters).", f"name the project with letters, digits, '-', '_' "
                         f"or '.', e.g. {where}.project=ftlab-sentiment.")


def resolve_mode(mode: str) -> str:
    """``auto`` -> ``online`` only when an API key is configured and the W&B server answers
    within 3 s, else ``offline`` (which also sets ``WANDB_MODE``: no analytics calls at exit)."""
    if mode == "auto":
        mode = "online" if _has_api_key() and _reachable("api.wandb.ai") else "offline"
    if mode == "offline":
        os.environ["WANDB_MODE"] = "offline"
    return mode


def _reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    """Can we open a TCP connection to ``host`` (so online logging will not hang)?"""
    import socket

    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = os.path.expanduser("~/.netrc")
    return os.path.exists(netrc) and "api.wandb.ai" in open(netrc).read()


def finish_wandb(failed: bool = False) -> None:
    """End the active W&B run, if any, so the next job in the process gets its own."""
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None:
        if wandb.run is not None:
            wandb.finish(exit_code=1 if failed else 0)
