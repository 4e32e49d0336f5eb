"""Your own config folders in the contract tests: ``FTLAB_CONTRACT_CONF=/path/to/myconf pytest
tests/test_peft_contract.py tests/test_regularizer_contract.py tests/test_transforms.py``
(several folders: separated by ``os.pathsep``) runs the contracts on the ``peft/``,
``regularizer/`` and ``transform/`` YAMLs there as on ftlab's own, with the packages their
``_target_``s name allowed (README, "Extending ftlab"). Your package must be importable
(``PYTHONPATH``)."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from ftlab.cli import CONFIG_DIR

#: the folders named by FTLAB_CONTRACT_CONF (none: ftlab's conf/ alone)
YOURS = tuple(Path(d).resolve() for d in os.environ.get("FTLAB_CONTRACT_CONF", "").split(
    os.pathsep) if d)
GROUPS = ("peft", "regularizer", "transform")


def options(group: str) -> list[str]:
    """The options of ``group`` in ftlab's conf/ and in your folders."""
    return sorted({p.stem for d in (Path(CONFIG_DIR), *YOURS) for p in (d / group).glob("*.yaml")})


def conf_file(group: str, name: str) -> Path:
    """The YAML of option ``name`` (yours where both have it, as Hydra's search path picks)."""
    for d in (*YOURS, Path(CONFIG_DIR)):
        if (d / group / f"{name}.yaml").is_file():
            return d / group / f"{name}.yaml"
    raise FileNotFoundError(f"no {group}/{name}.yaml in {CONFIG_DIR} or {YOURS}")


def packages() -> list[str]:
    """The top-level packages your folders' ``_target_``s name (to allow), e.g. ``['mypkg']``."""
    found = set()
    for d in YOURS:
        for group in GROUPS:
            for path in (d / group).glob("*.yaml"):
                target = (yaml.safe_load(path.read_text()) or {}).get("_target_", "")
                if target and not target.startswith("ftlab."):
                    found.add(target.split(".")[0])
    return sorted(found)


def overrides() -> list[str]:
    """What a composed test config adds for your folders: the search path and allow_targets."""
    if not YOURS:
        return []
    allow = ",".join(f"{p}." for p in packages())
    return [f"hydra.searchpath=[{','.join(f'file://{d}' for d in YOURS)}]",
            f"allow_targets=[{allow}]"]
