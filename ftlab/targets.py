"""Which code a config may call: every ``_target_`` is checked against an allow-list.

Configs travel (shared repos, papers' supplementary material), and Hydra's ``_target_`` can
name any importable callable: ``shutil.copyfile``, ``pandas.read_pickle``, ``os.system``. So a
config may only choose ftlab's building blocks:

- a *class* defined in ``ftlab``, ``peft``, ``torch.optim`` or the parts of
  ``lightning.pytorch`` a Trainer is built from (``MODULES``). Functions and methods there
  (``ftlab.store.write_json``, ``peft.PeftModel.from_pretrained``) can read or write files,
  so only the factories in ``FUNCTIONS`` are allowed; and the class must be *defined* there, not
  reached through a module's imports (``ftlab.resolve.subprocess.Popen``);
- anything in a module named in the run's ``allow_targets`` setting (``allow_targets:
  [mypkg.]``), which only you can set: on the command line or in ftlab's own
  ``conf/config.yaml``, never in an experiment or a config folder (``settings_from_you``).

The module prefix is checked on the string, before anything is imported (importing a module
runs its code); the class/function check follows the import. ``hydra.*`` nodes (Hydra's
callbacks and launchers) are Hydra's own business and not checked here.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from ftlab.errors import FtlabError

log = logging.getLogger(__name__)

#: modules whose classes any config may name (what conf/ uses, and a Trainer's parts)
MODULES = ("ftlab", "peft", "torch.optim", "lightning.pytorch.Trainer",
           *(f"lightning.pytorch.{m}" for m in ("trainer", "callbacks", "loggers", "strategies",
                                                "plugins", "profilers", "accelerators")))
#: the same, as the messages say it
MODULES_TEXT = ("ftlab, peft, torch.optim and lightning.pytorch's Trainer, callbacks, loggers, "
                "strategies, plugins, profilers and accelerators")
#: functions (not classes) in those modules that a config may name
FUNCTIONS = ("ftlab.loggers.wandb_logger",)
#: the setting that adds modules, and the settings that only the user may widen (their safe
#: values, when ftlab's own conf/config.yaml does not give one)
SETTING = "allow_targets"
WIDENING = {SETTING: [], "model.trust_remote_code": False}

_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_extra: ContextVar[tuple[str, ...]] = ContextVar(SETTING, default=())
#: how to allow modules where the refusal happens (``how_to_allow``: ``{entries}`` lists them
#: as ``a.,b.``, ``{quoted}`` as ``'a.', 'b.'``, ``{flags}`` as ``--allow-targets a. ...``)
_how: ContextVar[str] = ContextVar("how", default=f"on the command line: {SETTING}=[{{entries}}]")


def how_to_allow(modules: list[str]) -> str:
    """The fix's words for allowing ``modules`` where the refusal happens: one setting that
    lists them all (a second ``allow_targets=`` override would replace the first)."""
    entries = [f"{m}." for m in modules]
    return _how.get().format(entries=",".join(entries),
                             quoted=", ".join(f"'{e}'" for e in entries),
                             flags=" ".join(f"--allow-targets {e}" for e in entries))


def _under(target: str, module: str) -> bool:
    return target == module or target.startswith(module + ".")


def modules(entries: Iterable[Any] | None) -> tuple[str, ...]:
    """``allow_targets`` entries as module names (``mypkg.`` and ``mypkg`` are the same)."""
    out = []
    for entry in entries or []:
        name = str(entry).rstrip(".")
        if not _DOTTED.fullmatch(name):
            raise FtlabError(f"{SETTING} entry {entry!r} is not a module name.",
                             f"list dotted module names, e.g. {SETTING}=[mypkg.] (everything "
                             "under mypkg may then be a _target_).")
        out.append(name)
    return tuple(out)


@contextmanager
def allowing(entries: Iterable[Any] | None, warn: bool = True,
             how: str | None = None) -> Iterator[tuple[str, ...]]:
    """Allow ``entries`` (module names) as well while the block runs (one job). ``how``: how a
    refusal's fix tells the user to allow modules here (its fields: ``how_to_allow``); default:
    the command line's ``allow_targets``."""
    extra = modules(entries)
    if extra and warn:
        log.warning("%s=%s: configs may call any code in %s. Use it only with configs you "
                    "trust.", SETTING, list(extra), ", ".join(extra))
    token = _extra.set(extra)
    told = _how.set(how) if how else None
    try:
        yield extra
    finally:
        _extra.reset(token)
        if told is not None:
            _how.reset(told)


def allowed() -> tuple[str, ...]:
    """The modules ``allowing`` adds where this runs (a job's ``allow_targets``)."""
    return _extra.get()


class Refused(FtlabError):
    """A ``_target_`` outside the allow-list; ``module``: the one to allow for it."""

    def __init__(self, problem: str, fix: str, target: str, where: str, module: str) -> None:
        super().__init__(problem, fix)
        self.target, self.where, self.module = target, where, module

    def __reduce__(self) -> tuple[Any, ...]:  # its own arguments: unpickled as it was made
        return type(self), (self.problem, self.fix, self.target, self.where, self.module)


def _refuse(target: str, where: str, why: str, module: str | None = None) -> Refused:
    module = module or target.rpartition(".")[0] or target
    return Refused(
        f"{where}._target_ '{target}' is not allowed: {why}. A config may only name classes of "
        f"{MODULES_TEXT} (and modules listed in {SETTING}), so a shared config cannot run "
        "other code.",
        f"use a _target_ from conf/ (the registry); if you wrote '{target}' yourself and trust "
        f"it, allow its module {how_to_allow([module])}", target, where, module)


def check_target(target: Any, where: str) -> bool:
    """Refuse ``target`` unless it is under an allowed module (the string only: nothing is
    imported). Returns True when it came in through ``allow_targets`` (any callable there)."""
    if not isinstance(target, str) or not _DOTTED.fullmatch(target):
        raise FtlabError(f"{where}._target_ {target!r} is not a dotted name.",
                         "use module.Class, e.g. ftlab.tasks.classify.Classify.")
    if any(_under(target, m) for m in _extra.get()):
        return True
    if not any(_under(target, m) for m in MODULES):
        raise _refuse(target, where, "its module is not on the allow-list")
    return False


def check_object(target: str, obj: Any, where: str, user: bool) -> None:
    """After the import: ``obj`` must be defined in an allowed module (not reached through an
    import of one), and outside ``allow_targets`` be a class (or one of ``FUNCTIONS``)."""
    import inspect

    home = getattr(obj, "__module__", None) or ""
    if not any(_under(home, m) for m in (*MODULES, *_extra.get())):
        raise _refuse(target, where, f"it is defined in '{home or '?'}' and only reached "
                      "through an allowed module's imports", home or None)
    if not user and not inspect.isclass(obj) and target not in FUNCTIONS:
        raise _refuse(target, where, "it is a function or method, not a class")


def targets_in(node: Any, where: str) -> Iterator[tuple[Any, str]]:
    """Every ``(_target_, where)`` in ``node``, however deeply nested (``peft.config``)."""
    if isinstance(node, dict):
        if "_target_" in node:
            yield node["_target_"], where
        for key, value in node.items():
            if key != "_target_":
                yield from targets_in(value, f"{where}.{key}" if where else str(key))
    elif isinstance(node, list | tuple):
        for i, value in enumerate(node):
            yield from targets_in(value, f"{where}[{i}]")


def check_tree(node: Any, where: str) -> None:
    """``check_target`` on every ``_target_`` in ``node`` (nothing is imported)."""
    check_all(targets_in(node, where))


def check_all(targets: Iterable[tuple[Any, str]]) -> None:
    """``check_target`` on each ``(target, where)``, naming every refused one at once: your own
    method, regulariser and transform in one package are one fix (``allow_targets=[mypkg.]``),
    not three runs that each name the next module."""
    refused: list[Refused] = []
    for target, where in targets:
        try:
            check_target(target, where)
        except Refused as err:
            refused.append(err)
    if len(refused) == 1:
        raise refused[0]
    if refused:
        packages = sorted({r.module.split(".")[0] for r in refused})
        listed = "; ".join(f"{r.where}._target_ '{r.target}'" for r in refused)
        allow = packages[0] if len(packages) == 1 else None
        how = f"their package{'' if allow else 's'} {how_to_allow(packages)}"
        raise Refused(f"{len(refused)} _target_s are not allowed, their modules are not on the "
                      f"allow-list: {listed}. A config may only name classes of {MODULES_TEXT} "
                      f"(and modules listed in {SETTING}), so a shared config cannot run other "
                      "code.", "use _target_s from conf/ (the registry); if you wrote them "
                      f"yourself and trust them, allow {how}",
                      refused[0].target, refused[0].where, allow or refused[0].module)


def check_config(cfg: dict[str, Any], interpolated: bool = True) -> None:
    """Every ``_target_`` of a composed job config (a plain dict; ``hydra`` is skipped).
    ``interpolated=False`` skips targets that are still ``${...}`` (an unresolved config)."""
    check_all((target, where) for key, value in cfg.items() if key != "hydra"
              for target, where in targets_in(value, str(key))
              if interpolated or "${" not in str(target))


def settings_from_you(cfg: dict[str, Any], overrides: Iterable[str], config_dir: str) -> None:
    """Settings that widen what a config may run (``WIDENING``) must come from you: the command
    line or ftlab's own ``conf/config.yaml``. A value set by an experiment or a config folder
    is refused: a shared config cannot allow itself more."""
    from omegaconf import OmegaConf

    given = {o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o}
    root = Path(config_dir) / "config.yaml"
    own = OmegaConf.to_container(OmegaConf.load(root)) if root.is_file() else {}
    for key, safe in WIDENING.items():
        if key in given:
            continue
        value = OmegaConf.select(OmegaConf.create(cfg), key, default=safe)
        expected = OmegaConf.select(OmegaConf.create(own), key, default=safe)
        if value not in (safe, expected, None):
            raise FtlabError(
                f"{key}={value} is set by a config file (an experiment or a config folder), not "
                "by you; a shared config cannot widen what it may run.",
                f"if you trust that config, give {key}=... on the command line yourself.")
