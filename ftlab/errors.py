"""One error type for everything a user can fix: a problem and the fix, no traceback wall."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any


class FtlabError(Exception):
    """A user-fixable problem. ``str()`` is the whole message shown on the command line."""

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(problem if fix is None else f"{problem}\nFix: {fix}")

    def __reduce__(self) -> tuple[Any, ...]:  # pickled (a launcher's job, a process pool):
        return type(self), (self.problem, self.fix)  # problem and fix stay apart


class Diverged(FtlabError):
    """The training loss became non-finite: the run stops and counts as failed (diverged)."""


class ConfigError(FtlabError):
    """The config (the command line) is wrong, found by the config-level checks before any data
    or model is loaded: exit status 2, in a single run as in a sweep's pre-check."""


@contextmanager
def config_checks() -> Iterator[None]:
    """Within the block an ``FtlabError`` is a ``ConfigError`` (the same message)."""
    try:
        yield
    except ConfigError:
        raise
    except FtlabError as err:
        raise ConfigError(err.problem, err.fix) from None


def closest(name: str, choices: Iterable[str]) -> str:
    """'Did you mean ...?' text for ``name`` among ``choices`` (empty when nothing is close)."""
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" Did you mean '{match[0]}'?" if match else ""


def with_article(word: str) -> str:
    """``word`` with its indefinite article: "an int", "a float", "an integer"."""
    return f"{'an' if word[:1].lower() in 'aeiou' else 'a'} {word}"


def choices_text(choices: Iterable[str]) -> str:
    return ", ".join(sorted(str(c) for c in choices))


def separator_hint(found: list[str], wanted: list[str], fix: str) -> str:
    """A hint (" The header looks ';'-separated: ...") where the one column read is the wanted
    columns joined by another separator (a European-locale csv), else ""."""
    found = [c for c in found if not c.startswith("__index_level_")]  # a row with more fields
    if len(found) != 1:
        return ""
    for sep in (";", "|", "\t", ","):
        parts = [p.strip().strip('"') for p in found[0].split(sep)]
        if len(parts) > 1 and all(w in parts for w in wanted):
            if fix.startswith("set "):  # a Hydra override: quoted whole, so that pasted into a
                # shell the value keeps its quotes (data.delimiter=; does not parse)
                return f' The header looks {sep!r}-separated: set "{fix[4:]}={sep!r}".'
            return f" The header looks {sep!r}-separated: {fix}={sep!r}."
    return ""
