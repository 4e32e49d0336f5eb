"""What software trained a stage: ftlab's own source, the source of the user's modules a job allows
as ``_target_`` (``allow_targets``: a custom task or PEFT method) and the versions of the libraries
that shape training. The stage cache files a stage under it, so a stage trained by other code (an
upgrade, an edited checkout or task module) is retrained rather than reused."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from ftlab.targets import allowed

#: libraries whose version can change the weights a stage learns
LIBRARIES = ("torch", "transformers", "peft", "lightning")


def source_hash(root: Path | None = None) -> str:
    """A hash of the package's Python source (every ``*.py`` under ``root``, by relative path)."""
    root = Path(__file__).parent if root is None else root
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def software(extra: tuple[str, ...] | None = None) -> dict[str, str]:
    """ftlab's source hash, the installed versions of ``LIBRARIES`` and a source hash of each
    module in ``extra`` (default: the job's ``allow_targets``; a package counts whole)."""
    tops = {name.split(".")[0] for name in (allowed() if extra is None else extra)}
    return _software(tuple(sorted(tops - {"ftlab", *LIBRARIES})))


@functools.cache
def _software(user: tuple[str, ...]) -> dict[str, str]:  # read once a process
    out = {"ftlab-source": source_hash()}
    for lib in LIBRARIES:
        try:
            out[lib] = version(lib)
        except PackageNotFoundError:
            out[lib] = "absent"
    return out | {f"source:{top}": _module_hash(top) for top in user}


def _module_hash(top: str) -> str:
    """A top-level module's source hash (a package: every ``*.py`` under it), found without
    importing it; "absent" where it is not installed."""
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        return "absent"
    if spec.submodule_search_locations:  # a package (namespace packages: every folder)
        return "+".join(source_hash(Path(p)) for p in sorted(spec.submodule_search_locations))
    origin = Path(spec.origin or "")
    return hashlib.sha256(origin.read_bytes()).hexdigest()[:16] if origin.is_file() else "absent"


def software_tag(described: dict[str, str] | None = None) -> str:
    """A short tag for ``software()`` (or ``described``): part of a stage-cache entry's name."""
    text = json.dumps(software() if described is None else described, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:8]
