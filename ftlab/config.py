"""Binding config nodes to schemas and constructors, with errors that name the fix."""

from __future__ import annotations

import inspect
from typing import Any, TypeVar

from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from ftlab.errors import FtlabError, choices_text, closest
from ftlab.rules import check_args, check_schema
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
        raise FtlabError(f"Invalid value in {where}{at}: {str(err).splitlines()[0]}",
                         f"give {f'{key!r}' if key else 'each key'} under {where} a value of "
                         "the type its default has (see the YAML file).") from None
    check_schema(obj, where, set_as=set_as)
    return obj  # type: ignore[return-value]


def instantiate_checked(node: DictConfig | dict, where: str, **extra: Any) -> Any:
    """``hydra.utils.instantiate`` after checking the keys bind to the constructor."""
    node = check_binds(node, where, **extra)
    # extras (objects, whole configs) are passed as is, never instantiated recursively
    return instantiate(node, _partial_=True, _convert_="all")(**extra)


def load_target(target: str, where: str) -> Any:
    """Import an allowed ``_target_`` (``ftlab.targets``) and return the object."""
    user = check_target(target, where)
    try:
        obj = get_object(target)
    except Exception:
        raise FtlabError(f"{where}._target_ '{target}' cannot be imported.",
                         "check the module path and class name in the YAML file.") from None
    check_object(target, obj, where, user)
    return obj


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
                f"{closest(bad[0], params)}", f"use: {choices_text(params)}.") from None
        raise FtlabError(f"{where} cannot build {cls.__name__}: missing required "
                         "settings.", f"{cls.__name__} takes: {choices_text(params)}.") from None
    return node
