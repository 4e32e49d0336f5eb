"""What software trained a stage: ftlab's own source and the versions of the libraries that shape
training. The stage cache files a stage under it, so a stage trained by other code (an upgrade, an
edited checkout) is retrained rather than reused (``cache.match_software``)."""

from __future__ import annotations

import functools
import hashlib
import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

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


@functools.cache
def software() -> dict[str, str]:
    """ftlab's source hash and the installed versions of ``LIBRARIES`` (read once a process)."""
    out = {"ftlab-source": source_hash()}
    for lib in LIBRARIES:
        try:
            out[lib] = version(lib)
        except PackageNotFoundError:
            out[lib] = "absent"
    return out


def software_tag(described: dict[str, str] | None = None) -> str:
    """A short tag for ``software()`` (or ``described``): part of a stage-cache entry's name."""
    text = json.dumps(software() if described is None else described, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:8]
