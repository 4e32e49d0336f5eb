"""The study of ``hydra/sweeper=ftlab_optuna``: where it is stored (a journal file or a
database), the sampler and pruner built from the config (Optuna's own classes only), and who may
join an existing study (the same direction, space and fixed settings). The search loop itself:
``ftlab/search.py``."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ftlab.errors import FtlabError, choices_text, closest

#: the file in the sweep folder holding the study when ``storage`` is null
JOURNAL = "optuna.journal"
#: a database URL (``dialect[+driver]://...``, SQLAlchemy's form): RDBStorage; else a file path
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_OBJECT_PREFIX = {"sampler": "optuna.samplers.", "pruner": "optuna.pruners."}


def storage_url(storage: str | None, sweep_dir: str | Path) -> str:
    """The study's storage: a database URL as given, otherwise a journal file path (null: the
    sweep folder's ``optuna.journal``)."""
    if not storage:
        return str(Path(sweep_dir) / JOURNAL)
    return storage if _URL.match(storage) else str(Path(storage).expanduser())


def open_storage(url: str) -> Any:
    """An Optuna storage for ``url``: RDB for database URLs, else a journal file (a lock file
    beside it keeps several processes on one machine or a shared file system safe)."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    if _URL.match(url):
        return optuna.storages.RDBStorage(url)
    if Path(url).is_dir():  # (Optuna's own error comes later, from deep inside a read)
        raise IsADirectoryError(f"{url} is a folder, not a journal file")
    Path(url).parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(url))


def storage_error(url: str, err: BaseException) -> FtlabError:
    """What a storage that cannot be opened (a missing folder, no database driver, a server
    that does not answer, a folder given as the journal) tells the user, instead of the
    traceback from Optuna or SQLAlchemy."""
    first = (str(err).splitlines() or [""])[0] or type(err).__name__
    return FtlabError(
        f"Cannot open the Optuna study's storage hydra.sweeper.storage={url}: "
        f"{type(err).__name__}: {first}",
        "give a journal file in a folder you can write to (e.g. hydra.sweeper.storage="
        "/shared/lr.journal), sqlite:///<path>.db in a folder that exists, or a database URL "
        "whose server is reachable and whose driver is installed (postgresql: pip install "
        "psycopg2-binary); hydra.sweeper.storage=null keeps the study in the sweep folder's "
        f"{JOURNAL}.")


def build_object(node: Any, kind: str) -> Any:
    """A sampler/pruner from its ``_target_`` node; only Optuna's own classes are accepted."""
    from hydra.utils import instantiate
    from omegaconf import DictConfig, OmegaConf

    if node is None or not isinstance(node, dict | DictConfig):
        return node  # None, or already built
    node = OmegaConf.to_container(node) if isinstance(node, DictConfig) else dict(node)
    target = str(node.get("_target_", ""))
    prefix = _OBJECT_PREFIX[kind]
    if not target.startswith(prefix):
        example = "TPESampler" if kind == "sampler" else "MedianPruner"
        raise FtlabError(f"hydra.sweeper.{kind}._target_ is {target!r}; it must be one of "
                         f"Optuna's classes under {prefix} (e.g. {prefix}{example}).")
    try:
        return instantiate(node)
    except Exception as err:  # noqa: BLE001 - Hydra's InstantiationException, with its cause
        raise _not_built(err, kind, target) from None


def _not_built(err: Exception, kind: str, target: str) -> FtlabError:
    """Why ``hydra.sweeper.<kind>`` could not be built, and the fix: a class Optuna does not
    have, a key its class does not take (the YAML's keys are TPESampler's and MedianPruner's:
    another class needs them dropped, as a dict on the command line merges into them), or a
    value it refuses."""
    import importlib

    module, _, name = target.rpartition(".")
    try:
        have = [n for n in dir(importlib.import_module(module)) if n[:1].isupper()]
    except ImportError:
        have = []
    if name not in have:
        return FtlabError(f"hydra.sweeper.{kind}._target_={target}: {module} has no "
                          f"{name}.{closest(name, have)}", f"use one of: {choices_text(have)}.")
    cause = err.__cause__ or err
    first = (str(cause).splitlines() or [""])[0]
    key = re.search(r"unexpected keyword argument '(\w+)'", first)
    fix = (f"drop it: ~hydra.sweeper.{kind}.{key.group(1)} (conf/hydra/sweeper/ftlab_optuna.yaml "
           f"sets the keys of its default {kind}, which {name} does not take)." if key else
           f"give hydra.sweeper.{kind}.* values {name} accepts (Optuna's documentation of "
           f"{target}).")
    return FtlabError(f"hydra.sweeper.{kind} ({name}) could not be built: "
                      f"{type(cause).__name__}: {first}", fix)


#: settings that change how a job is kept, logged or allowed, not what it scores: a search
#: may join its study with others (``ftlab -m resume=<search> checkpoint.keep=true``, README)
NOT_THE_RECIPE = ("checkpoint", "logger", "allow_targets", "cache", "save_artefact")


def check_settings(study: Any, fixed: list[str], where: str) -> None:
    """The overrides every trial shares (``peft=lora``, the data, the trainer) are the study's:
    kept on a new study, and a search joining it must run with the same ones. Otherwise its
    trials were compared with trials of another recipe (``peft=full``), and the best trial's
    ``best_params.yaml`` was read with this search's settings though it ran with others.
    The :data:`NOT_THE_RECIPE` settings are not compared."""
    def recipe(overrides: list[str]) -> list[str]:
        return sorted(o for o in overrides
                      if re.split(r"[.=@]", o.lstrip("+~"), maxsplit=1)[0] not in NOT_THE_RECIPE)

    mine = recipe(fixed)
    theirs = study.user_attrs.get("fixed")
    if theirs is None:
        if not study.trials:  # (a study made before ftlab kept them: nothing to compare)
            study.set_user_attr("fixed", mine)
        return
    theirs = recipe(theirs)
    if theirs != mine:
        only = [o for o in mine if o not in theirs]
        gone = [o for o in theirs if o not in mine]
        differ = "; ".join([*([f"this search adds {' '.join(only)}"] if only else []),
                            *([f"it lacks {' '.join(gone)}"] if gone else [])])
        raise FtlabError(f"Study {study.study_name!r} in {where} ran its trials with other "
                         f"fixed settings ({differ}): their trials are not comparable, and its "
                         "best trial's parameters would be read with settings it did not run "
                         "with.", "run with the study's settings, or give this search its own "
                         "study: hydra.sweeper.study_name=<a new name>.")


def check_joinable(study: Any, space: dict[str, Any], direction: str, where: str) -> None:
    """A study that exists already (another worker's, or from an earlier search with the same
    ``study_name`` and storage) is joined only with the same direction and a space its trials
    fit: Optuna loads it with its stored direction whatever this search asks (a maximising
    search then minimised accuracies, its best trial compared with losses), and refuses a
    changed ``choice()`` with a bare ValueError."""
    from optuna.distributions import check_distribution_compatibility

    fix = ("give this search its own study: hydra.sweeper.study_name=<a new name> (or another "
           "hydra.sweeper.storage).")
    stored = study.direction.name.lower()
    if stored != direction:
        raise FtlabError(f"Study {study.study_name!r} in {where} exists and was made to {stored} "
                         f"its objective; this search would {direction} (its task's monitored "
                         "metric): their trials are not comparable.", fix)
    for trial in study.get_trials(deepcopy=False):
        for name, dist in space.items():
            if name in trial.distributions:
                try:
                    check_distribution_compatibility(trial.distributions[name], dist)
                except ValueError as err:
                    raise FtlabError(f"{name}: this search's space ({dist}) does not fit study "
                                     f"{study.study_name!r} in {where}, whose trial "
                                     f"{trial.number} sampled it from "
                                     f"{trial.distributions[name]} ({err}).", fix) from None
