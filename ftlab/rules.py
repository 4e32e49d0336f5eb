"""Allowed values of config fields, declared once beside the field and checked before training.

A field's rule rides on its type: ``batch_size: Annotated[int, at_least(1)] = 32`` in a schema
dataclass (``StageSpec``, ``OptimSpec``, ``DataSpec``, ``CacheSpec``) or in a ``_target_``
constructor's signature (``Classify(max_length: Annotated[int, at_least(1)])``). OmegaConf
reads the type as usual and ignores the rule; ``check_schema`` (every ``bind_schema``) and
``check_args`` (every ``check_binds``) read the rule. Lightning's ``Trainer`` is not ours, so
its keys have their rules in one table here (``TRAINER``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any

from ftlab.errors import FtlabError, choices_text, with_article


@dataclass(frozen=True)
class Rule:
    """What a value may be: a range (``ge``/``gt``/``le``/``lt``), a set (``choices``), plus
    ``also`` (extra allowed values, e.g. -1 for "no limit"). ``each``: applies to each item of
    a list/tuple. ``None`` always passes (the type says whether null is allowed)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[Any, ...] | None = None
    also: tuple[Any, ...] = ()
    each: bool = False
    example: str | None = None

    def ok(self, value: Any) -> bool:
        if value is None:
            return True
        if self.each and isinstance(value, list | tuple):
            return all(self._one(v) for v in value)
        return self._one(value)

    def _one(self, value: Any) -> bool:
        if value in self.also and not isinstance(value, bool):
            return True
        if self.choices is not None:
            return str(value) in {str(c) for c in self.choices}
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False  # typed fields are numbers by now (OmegaConf, check_args); a field
            # of two kinds (batch_size: a number or "auto") names the other kind in ``also``
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))

    def allowed(self) -> str:
        if self.choices is not None:
            text = f"one of: {choices_text(self.choices)}"
        else:
            lo = f"[{_num(self.ge)}" if self.ge is not None else (
                f"({_num(self.gt)}" if self.gt is not None else None)
            hi = f"{_num(self.le)}]" if self.le is not None else (
                f"{_num(self.lt)})" if self.lt is not None else None)
            if lo and hi:
                text = f"in {lo}, {hi}"
            elif lo:
                text = f"{_num(self.ge)} or more" if self.ge is not None else \
                    f"more than {_num(self.gt)}"
            else:
                text = f"at most {_num(self.le)}" if self.le is not None else \
                    f"less than {_num(self.lt)}"
        if self.also:
            text += f", or {' or '.join(str(a) for a in self.also)}"
        return ("each " if self.each else "") + text


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def at_least(n: float, **kw: Any) -> Rule:
    return Rule(ge=n, **kw)


def between(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False,
            **kw: Any) -> Rule:
    """A range; ``*_open`` excludes that end: ``between(0, 1, hi_open=True)`` is [0, 1)."""
    return Rule(ge=None if lo_open else lo, gt=lo if lo_open else None,
                le=None if hi_open else hi, lt=hi if hi_open else None, **kw)


def one_of(*choices: Any, **kw: Any) -> Rule:
    return Rule(choices=choices, **kw)


#: Lightning ``Trainer`` keys (the ``trainer`` group and every stage's ``trainer`` node)
TRAINER: dict[str, Rule] = {
    "max_epochs": at_least(1, also=(-1,), example="1"),
    "min_epochs": at_least(0),
    "max_steps": at_least(0, also=(-1,), example="100"),  # 0: evaluate only (zero-shot)
    "min_steps": at_least(0),
    "val_check_interval": Rule(gt=0, example="1.0"),
    "check_val_every_n_epoch": at_least(1),
    "accumulate_grad_batches": at_least(1, example="1"),
    "gradient_clip_val": at_least(0),
    "gradient_clip_algorithm": one_of("norm", "value"),
    "log_every_n_steps": at_least(1),
    "num_sanity_val_steps": at_least(0, also=(-1,)),
    "limit_train_batches": Rule(gt=0), "limit_val_batches": at_least(0),
    "limit_test_batches": at_least(0), "limit_predict_batches": at_least(0),
    "num_nodes": at_least(1),
    "precision": one_of("64-true", "32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true",
                        "transformer-engine", "transformer-engine-float16", "64", "32", "16",
                        "bf16"),
    "accelerator": one_of("auto", "cpu", "gpu", "cuda", "mps", "tpu", "hpu"),
}


def _split(hint: Any) -> tuple[Any, list[Rule]]:
    """(the type without ``Annotated``, the rules it carried)."""
    if typing.get_origin(hint) is Annotated:
        base, *meta = typing.get_args(hint)
        return base, [m for m in meta if isinstance(m, Rule)]
    return hint, []


def _hints(obj: Any) -> dict[str, Any]:
    try:
        return typing.get_type_hints(obj, include_extras=True)
    except Exception:  # a forward reference that cannot be resolved: no rules to read
        return {}


def _fail(where: str, key: str, value: Any, rule: Rule, set_as: str | None) -> FtlabError:
    set_as = set_as or f"{key} (in {where})"
    example = f" (e.g. {set_as.split(' ')[0]}={rule.example})" if rule.example else ""
    fix = f"set {set_as} to {_value(rule.allowed())}{example}."
    if rule.choices is None and (isinstance(value, bool) or not isinstance(value, int | float
                                                                           | list | tuple)):
        return FtlabError(f"Invalid value in {where} for key '{key}': {value!r} (it must be "
                          f"{rule.allowed()}).", fix)  # a word where a number belongs
    what = "is not allowed" if rule.choices is not None else "is out of range"
    return FtlabError(f"{where}: {key}={value!r} {what}: it must be {rule.allowed()}.", fix)


def check_schema(obj: Any, where: str, prefix: str = "", set_as: str | None = None) -> None:
    """Check every field of the dataclass ``obj`` (nested dataclasses too) against its rule.

    ``set_as``: the override that sets ``obj``'s fields (``stage``), for the fix."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            check_schema(value, where, key + ".", set_as)
            continue
        for rule in _split(hints.get(f.name))[1]:
            if not rule.ok(value):
                raise _fail(where, key, value, rule, f"{set_as}.{key}" if set_as else None)


def allowed_text(schema: type, key: str, shown: str | None = None) -> str | None:
    """What the rules of ``schema``'s field ``key`` (dotted: ``optim.lr``) allow, with an
    example setting ``shown`` (default: ``key``), for a fix (None: no rule)."""
    base, rules = _split(_hints(_owner(schema, key)).get(key.rsplit(".", 1)[-1]))
    if not rules:
        return None
    whole = "a whole number, " if int in (_types(base) or []) and rules[0].choices is None \
        else ""
    example = f" (e.g. {shown or key}={rules[0].example})" if rules[0].example else ""
    return whole + _value(rules[0].allowed()) + example


def _value(allowed: str) -> str:
    """``allowed()`` after "set X to": "in [0, 1)" reads "a value in [0, 1)"."""
    if allowed.startswith("each in "):
        return f"values each {allowed.removeprefix('each ')}"
    return f"a value {allowed}" if allowed.startswith("in ") else allowed


def _owner(schema: type, key: str) -> Any:
    """The dataclass that holds the last part of the dotted ``key``."""
    for part in key.split(".")[:-1]:
        schema = _split(_hints(schema).get(part))[0]
    return schema


def check_field(schema: type, name: str, value: Any, where: str, set_as: str) -> None:
    """Check ``value`` against the rule of ``schema``'s field ``name`` (a value that reaches
    the field from elsewhere, e.g. a PEFT method's suggested ``lr``)."""
    for rule in _split(_hints(schema).get(name))[1]:
        if not rule.ok(value):
            raise _fail(where, name, value, rule, set_as)


def check_table(node: Mapping[str, Any], rules: Mapping[str, Rule], where: str,
                set_as: str | None = None) -> None:
    """Check a plain node's keys against a rule table (``TRAINER``)."""
    for key, rule in rules.items():
        if key in node and not rule.ok(node[key]):
            raise _fail(where, key, node[key], rule, f"{set_as}.{key}" if set_as else None)


#: simple types a constructor argument is checked against (others are left to the code)
SIMPLE = (bool, int, float, str, list, tuple, dict)


def check_args(fn: Any, kwargs: Mapping[str, Any], where: str) -> None:
    """Each argument in ``kwargs`` has the type ``fn``'s signature gives it (simple types:
    bool, int, float, str, list, tuple, dict, optionally ``| None``) and meets its rule."""
    hints = _hints(fn.__init__ if isinstance(fn, type) else fn)
    for key, value in kwargs.items():
        if key not in hints:
            continue
        base, rules = _split(hints[key])
        if not _type_ok(base, value):
            got = with_article(type(value).__name__)
            raise FtlabError(f"{where}: {key}={value!r} is {got}, but "
                             f"{_type_name(base)} is expected.",
                             f"give {key} (in {where}) {with_article(_type_name(base))} value.")
        for rule in rules:
            if not rule.ok(value):
                raise _fail(where, key, value, rule, None)


def _types(hint: Any) -> list[Any] | None:
    """The plain types a hint allows (``int | None`` -> [int, None]), or None (not simple)."""
    if hint is None or hint is type(None):
        return [None]
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        out = []
        for arg in typing.get_args(hint):
            got = _types(_split(arg)[0])
            if got is None:
                return None
            out += got
        return out
    plain = origin or hint
    return [plain] if plain in SIMPLE else None


def _type_ok(hint: Any, value: Any) -> bool:
    allowed = _types(hint)
    if allowed is None:
        return True
    if value is None:
        return None in allowed
    for t in allowed:
        if t is None:
            continue
        if t is bool and isinstance(value, bool):
            return True
        if t in (int, float) and isinstance(value, int) and not isinstance(value, bool):
            return True  # an int is a fine float too
        if t is float and isinstance(value, float):
            return True
        if t in (list, tuple) and isinstance(value, list | tuple):
            return True
        if t in (str, dict) and isinstance(value, t):
            return True
    return False


def _type_name(hint: Any) -> str:
    names = [("null" if t is None else t.__name__) for t in _types(hint) or []]
    return " or ".join(names) or str(hint)
