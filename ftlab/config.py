"""Binding config nodes to schemas and constructors, with errors that name the fix."""

from __future__ import annotations

import inspect
import re
from typing import Any, TypeVar

from hydra._internal.utils import _locate  # get_object without its ERROR log line
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from ftlab.errors import FtlabError, choices_text, closest
from ftlab.rules import allowed_text, check_args, check_schema
from ftlab.targets import check_object, check_target, check_tree, targets_in

T = TypeVar("T")


def plain(node: Any) -> Any:
    """``node`` as plain dicts/lists (interpolations resolved) if it is a ``DictConfig``."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def bind_schema(schema: type[T], node: Any, where: str, set_as: str | None = None) -> T:
    """Merge ``node`` onto the dataclass ``schema`` and return the object.

    A misspelt key fails here with the valid keys and the closest match; a value outside its
    field's rule (``ftlab.rules``) with the allowed range. ``set_as``: the override prefix
    that sets the node's keys (``stage``, ``data``), named in the fix.
    """
    base = OmegaConf.structured(schema)
    try:
        node = plain(node)  # resolve while still attached to the root config
        merged = OmegaConf.merge(base, node if node is not None else {})
        obj = OmegaConf.to_object(merged)

    except ConfigKeyError as err:
        key = str(getattr(err, "key", "")) or str(err).split("'")[1]
        valid = list(base.keys())
        raise FtlabError(f"Unknown key '{key}' in {where}.{closest(key, valid)}",
                         f"use one of: {choices_text(valid)}.") from None
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        at = f" for key '{key}'" if key else ""
        shown = f"{set_as}.{key}" if set_as else str(key)
        allowed = allowed_text(schema, str(key), shown) if key else None
        given = _at(node, str(key)) if key else None
        if "ListConfig" in str(err) and isinstance(given, (str, int, float)):
            raise FtlabError(f"{shown}={given} is one value, but '{key}' under {where} takes a "
                             "list.", f"write it as a list: '{shown}=[{given}]' (quoted, "
                             "for the shell).") from None
        raise FtlabError(f"Invalid value in {where}{at}: {str(err).splitlines()[0]}",
                         f"set {shown} to {allowed}." if allowed else
                         f"give {f'{key!r}' if key else 'each key'} under {where} a value of "
                         "the type its default has (see the YAML file).") from None
    check_schema(obj, where, set_as=set_as)
    return obj  # type: ignore[return-value]


def _at(node: Any, key: str) -> Any:
    """The plain value at the dotted ``key`` of ``node`` (None where there is none)."""
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def instantiate_checked(node: DictConfig | dict, where: str, **extra: Any) -> Any:
    """``hydra.utils.instantiate`` after checking the keys bind to the constructor."""
    node = check_binds(node, where, **extra)
    # extras (objects, whole configs) are passed as is, never instantiated recursively
    try:
        built = instantiate(node, _partial_=True, _convert_="all")
    except InstantiationException as err:  # a nested node's constructor refused a value
        cause, found = err.__cause__, re.search(r"full_key: (\S+)", str(err))
        key = found.group(1) if found else "config"
        if isinstance(cause, FtlabError):
            raise cause from None
        if not isinstance(cause, (ValueError, TypeError)):
            raise
        shown = where.split()[-1] if " " in where else where
        raise FtlabError(f"{where}.{key} cannot be built: {str(cause).splitlines()[0]}",
                         f"correct that value under {shown}.{key} (the YAML file of the "
                         f"{shown} group says what each key takes).") from None
    return built(**extra)


def load_target(target: str, where: str) -> Any:
    """Import an allowed ``_target_`` (``ftlab.targets``) and return the object."""
    user = check_target(target, where)
    try:
        obj = _locate(target)
    except Exception:
        raise _import_error(target, where) from None
    check_object(target, obj, where, user)
    return obj


def _import_error(target: str, where: str) -> FtlabError:
    """Why ``target`` cannot be had: its package is not on the path, its module raised while
    importing (the contributor's own bug: named with its file and line), or the module lacks
    the name."""
    import importlib
    import traceback

    head = f"{where}._target_ '{target}' cannot be imported"
    module, _, name = target.rpartition(".")
    while module:
        try:
            found = importlib.import_module(module)
        except ModuleNotFoundError as err:
            missing = err.name or ""
            if not target.startswith(missing + "."):  # the module imports something missing
                return FtlabError(f"{head}: importing {module} raised ModuleNotFoundError: "
                                  f"{err}.",
                                  f"install '{missing.split('.')[0]}', or fix that import.")
            if "." in missing:  # its package is there; this module is not
                module, _, name = module.rpartition(".")
                continue
            return _not_on_path(head, missing)
        except Exception as err:  # noqa: BLE001 - the module's own code failed
            frame = traceback.extract_tb(err.__traceback__)[-1]
            first = str(err).splitlines()[0] if str(err) else ""
            return FtlabError(f"{head}: importing {module} raised {type(err).__name__}: "
                              f"{first} ({frame.filename}, line {frame.lineno}).",
                              "fix that error in the module.")
        names = [n for n in vars(found) if not n.startswith("_")]
        if hasattr(found, "__path__"):  # a package: its modules not imported yet count too
            import pkgutil

            names += [m.name for m in pkgutil.iter_modules(found.__path__)]
        return FtlabError(f"{head}: module {module} has no '{name}'.{closest(name, names)}",
                          "check the module path and class name in the YAML file.")
    return FtlabError(f"{head}.", "check the module path and class name in the YAML file.")


def _not_on_path(head: str, package: str) -> FtlabError:
    """No top-level ``package`` to import: say where it must be. The ``ftlab`` command (a
    console script) does not look in the current folder, as ``python -m ftlab`` does."""
    from pathlib import Path

    here = Path.cwd()
    # a package (a namespace one too: a folder of modules without __init__.py), or a module
    if any((here / package).glob("*.py")) or (here / f"{package}.py").is_file():
        return FtlabError(f"{head}: '{package}' is in the current folder ({here}), but the "
                          "`ftlab` command does not look for modules there.",
                          f"put the folder on the path: PYTHONPATH={here} ftlab ... (or run "
                          "`python -m ftlab ...` from it, or `pip install -e` the package).")
    return FtlabError(f"{head}: there is no module '{package}' on the Python path.",
                      "check the module path in the YAML file; for your own package, put the "
                      "folder that holds it on PYTHONPATH (PYTHONPATH=/path/to/folder ftlab "
                      "...), or `pip install -e` it.")


def check_binds(node: DictConfig | dict, where: str, partial: bool = False,
                **extra: Any) -> dict[str, Any]:
    """Check ``node``'s keys (plus ``extra``) bind to its ``_target_``; return it as a dict.

    Every ``_target_`` in the node (nested ones too) must be on the allow-list
    (``ftlab.targets``), checked before anything is imported. ``partial=True`` only rejects
    unknown keys (required ones may come at run time).
    """
    node = dict(plain(node))
    target = node.get("_target_")
    if not target:
        raise FtlabError(f"{where} has no _target_.", f"add `_target_: module.Class` to {where}.")
    check_tree(node, where)  # this one and nested ones (peft.config._target_), nothing imported
    for nested, at in targets_in({k: v for k, v in node.items() if k != "_target_"}, where):
        load_target(nested, at)  # a nested function (not a class) is refused too
    cls = load_target(target, where)
    kwargs = {k: v for k, v in node.items() if not k.startswith("_")} | extra
    check_args(cls, {k: v for k, v in kwargs.items() if k not in extra}, where)
    try:
        sig = inspect.signature(cls)
        (sig.bind_partial if partial else sig.bind)(**kwargs)
    except TypeError:
        params = inspect.signature(cls).parameters
        takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
        bad = [k for k in kwargs if k not in params]
        if bad and not takes_any:
            raise FtlabError(
                f"{where} has key(s) {bad} that {cls.__name__} does not take."
                f"{closest(bad[0], params)}", f"use: {choices_text(params)}." if params else
                f"remove them ({cls.__name__}.__init__ takes no settings), or add them to "
                "its signature.") from None
        raise FtlabError(f"{where} cannot build {cls.__name__}: missing required "
                         "settings.", f"{cls.__name__} takes: {choices_text(params)}.") from None
    return node


def protocol_members(protocol: type) -> list[str]:
    """The attributes and methods a ``typing.Protocol`` declares (its own and its bases')."""
    names: set[str] = set()
    for cls in protocol.__mro__:
        if getattr(cls, "_is_protocol", False) and cls.__module__ != "typing":
            names |= {n for n in vars(cls) if not n.startswith("_")}
            names |= {n for n in getattr(cls, "__annotations__", {}) if not n.startswith("_")}
    return sorted(names)


def require_protocol(obj: Any, protocol: type, where: str, hint: str) -> Any:
    """``obj`` (a built ``_target_``) as ``protocol``: every member it declares must be there,
    else an ``FtlabError`` naming the missing ones (before anything trains, not an
    ``AttributeError`` mid-run). ``hint``: how to get the common ones (a base class)."""
    missing = [n for n in protocol_members(protocol) if not hasattr(obj, n)]
    if missing:
        raise FtlabError(
            f"{where}: {type(obj).__module__}.{type(obj).__qualname__} is not a "
            f"{protocol.__module__}.{protocol.__qualname__}: it lacks {', '.join(missing)}.",
            f"add {'it' if len(missing) == 1 else 'them'} to the class ({hint}).")
    for name in protocol_members(protocol):
        require_signature(obj, protocol, name, where)
    return obj


def require_signature(obj: Any, protocol: type, name: str, where: str) -> None:
    """``obj.<name>`` takes the positional arguments the protocol's method passes (``apply(self,
    model)``), else an ``FtlabError`` with the signature to give it, before anything trains
    (not a ``TypeError`` mid-run). Attributes and objects without a signature pass."""
    wanted = getattr(protocol, name, None)
    if not inspect.isfunction(wanted):
        return
    try:
        given = inspect.signature(getattr(obj, name))
    except (TypeError, ValueError):  # a builtin or C method: nothing to read
        return
    args = [p.name for p in list(inspect.signature(wanted).parameters.values())[1:]]
    try:
        given.bind(*args)
    except TypeError as err:
        cls = f"{type(obj).__module__}.{type(obj).__qualname__}"
        raise FtlabError(
            f"{where}: {cls}.{name}{given} cannot be called as "
            f"{protocol.__qualname__}.{name} is: {name}({', '.join(args)}) ({err}).",
            f"give it that signature: def {name}(self, {', '.join(args)}) "
            f"({protocol.__module__}.{protocol.__qualname__}).") from None
