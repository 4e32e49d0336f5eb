"""Resuming runs and sweeps (README, "Resuming runs and sweeps").

- ``ftlab resume=<run dir> [overrides]`` re-runs the command that made the run, in its folder;
  ``ftlab -m resume=<sweep dir>`` re-launches the sweep into its folder (``resume_argv``).
- A job whose folder or sweep already holds a finished record for the same stages (compared by
  their stage keys, the hashes of the resolved stages, and the run's result-changing callbacks:
  not by job number or time) is not run
  again: its record is reused (``finished_record``). An interrupted stage continues from its
  checkpoint (``ftlab.checkpoint``); finished upstream stages come back from the stage cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ftlab.errors import FtlabError

#: a job whose record has one of these statuses is finished (an error or a kill is not)
FINISHED = ("ok", "discarded", "pruned")


def job_identity(stage_keys: list[str], callbacks: dict[str, Any] | None) -> list[str]:
    """What identifies a job: its stage keys, plus a hash of the run's callbacks that change
    results (EMA/SWA, snapshots, early discard; progress bars do not count), which live
    outside the stages."""
    import hashlib
    import json

    nodes = {k: v for k, v in (callbacks or {}).items()
             if v is not None and "ProgressBar" not in str(v.get("_target_", ""))}
    text = json.dumps(nodes, sort_keys=True, default=str)
    return [*stage_keys, f"callbacks-{hashlib.sha256(text.encode()).hexdigest()[:16]}"]


def read_record(path: Path) -> dict[str, Any] | None:
    """The record in ``path`` (``metrics.json``) as it stands (``ftlab.status.effective``: a
    killed job reads as interrupted, a re-run killed before it trained as the finished results
    it replaced), or None if there is no readable one."""
    from ftlab.status import effective
    from ftlab.store import read_json  # (torch: not for `ftlab --help`)

    try:
        record = read_json(path)
    except (OSError, ValueError):
        return None
    return effective(record) if isinstance(record, dict) else None  # (a killed job: as it is)


def finished_record(run_dir: Path, identity: list[str], sweep_dir: Path | None = None,
                    own: dict[str, Any] | None = None) -> tuple[dict[str, Any], Path] | None:
    """(the record, its job folder) of a finished job with this ``identity`` (``job_identity``):
    this job's own folder first (``own``: what its ``metrics.json`` held when the job started),
    then the other job folders of ``sweep_dir``; None if there is none."""
    folders = [run_dir]
    if sweep_dir is not None and sweep_dir.is_dir():
        from ftlab.report_jobs import job_folders

        folders += [p for p in job_folders(sweep_dir) if p != run_dir]
    from ftlab.record import finished_of

    for folder in folders:  # (a re-run that did not finish: the finished job it kept)
        record = finished_of(own if folder == run_dir else read_record(folder / "metrics.json"),
                             reusable=True)
        if record is None:
            continue
        if record.get("job_identity") == identity:
            return record, folder
    return None


def other_checkpoints(sweep_dir: Path, run_dir: Path, stage: str) -> list[Path]:
    """``<job>/<stage>/checkpoints`` of the sweep's other jobs that do not run now (an errored
    or killed job's checkpoint, for this job re-launched into a new folder: an extra override
    changes its overrides, so its folder)."""
    from ftlab.report_jobs import job_folders

    found = [p / stage / "checkpoints" for p in job_folders(sweep_dir) if p != run_dir]
    return [f for f in found if f.is_dir() and (read_record(f.parent.parent / "metrics.json")
                                                or {}).get("status") != "running"]


def resume_argv(argv: list[str]) -> list[str]:
    """``argv`` with ``resume=<dir>`` replaced by the overrides that made ``<dir>`` and its
    folder (``hydra.run.dir``, or ``hydra.sweep.dir`` and ``-m`` for a sweep); later overrides
    on the command line win. Unchanged when there is no ``resume=``."""
    found = [a for a in argv if a.startswith("resume=")]
    if not found:
        return argv
    folder = Path(found[-1].split("=", 1)[1]).expanduser().absolute()  # (resume_cwd: cd)
    # Hydra's argparse takes the overrides as one positional list: flags (``-m``,
    # ``--config-dir DIR``) go before every override, or argparse refuses the ones after them
    opts, rest = _split_options([a for a in argv if not a.startswith("resume=")])
    fix = "pass the folder of a run (outputs/runs/<time>) or a sweep (outputs/multirun/<time>)."
    if (folder / "multirun.yaml").is_file():
        hydra = _hydra_node(folder / "multirun.yaml")
        flags = [] if {"-m", "--multirun"} & set(opts) else ["-m"]
        return [*flags, *opts, *_config_flags(hydra, opts), *_own(hydra), *rest,
                f"hydra.sweep.dir={folder}"]
    if (folder / ".hydra" / "hydra.yaml").is_file():
        if {"-m", "--multirun"} & set(opts):
            raise FtlabError(f"{folder} is a single run, not a sweep.",
                             f"drop -m: ftlab resume={folder}")
        hydra = _hydra_node(folder / ".hydra" / "hydra.yaml")
        return [*opts, *_config_flags(hydra, opts), *_own(hydra), *rest,
                f"hydra.run.dir={folder}"]
    raise FtlabError(f"resume={folder}: no ftlab run or sweep there (no .hydra/ or "
                     "multirun.yaml).", fix)


def resume_cwd(argv: list[str]) -> Path | None:
    """The folder the run or sweep named by ``resume=`` was started from (Hydra's
    ``hydra.runtime.cwd``) when it exists and is not the current folder, else None. Relative
    paths in its overrides (data files, ``outputs/``, the stage cache) are from there, so
    ``ftlab`` resumes in it: from anywhere else they would miss, and every job would end in
    an error."""
    from omegaconf import OmegaConf

    found = [a for a in argv if a.startswith("resume=")]
    if not found:
        return None
    folder = Path(found[-1].split("=", 1)[1]).expanduser()
    path = folder / "multirun.yaml"
    path = path if path.is_file() else folder / ".hydra" / "hydra.yaml"
    try:
        cwd = Path(str(OmegaConf.load(path).hydra.runtime.cwd))
    except Exception:  # no such file or key: resume_argv says what is wrong, if anything
        return None
    return cwd if cwd.is_dir() and cwd.resolve() != Path.cwd().resolve() else None


#: Hydra's flags that take a value (``--config-dir DIR``; ``--config-dir=DIR`` is one token)
_VALUED = {"-c", "--cfg", "-p", "--package", "-cp", "--config-path", "-cn", "--config-name",
           "-cd", "--config-dir", "--experimental-rerun", "-i", "--info"}


def _split_options(argv: list[str]) -> tuple[list[str], list[str]]:
    """(Hydra's flags with their values, the overrides), each in command-line order."""
    opts: list[str] = []
    overrides: list[str] = []
    take_value = False
    for arg in argv:
        if take_value and not (arg.startswith(("-", "~", "+")) or "=" in arg):
            opts.append(arg)
        elif arg.startswith("-"):
            opts.append(arg)
            take_value = arg in _VALUED
            continue
        else:
            overrides.append(arg)
        take_value = False
    return opts, overrides


def _hydra_node(path: Path) -> Any:
    """The ``hydra`` node of a run's ``hydra.yaml`` / a sweep's ``multirun.yaml``; a damaged
    file (a half-written folder, an edit) stops with the fix."""
    from omegaconf import OmegaConf

    try:
        hydra = OmegaConf.load(path).hydra
        hydra.overrides.task  # noqa: B018 (what _own reads)
    except Exception as err:  # YAML syntax, a missing key
        sweep = path.name == "multirun.yaml"
        folder, key = (path.parent, "hydra.sweep.dir") if sweep else \
            (path.parent.parent, "hydra.run.dir")
        raise FtlabError(f"resume: cannot read the command from {path} ({type(err).__name__}: "
                         f"{(str(err).splitlines() or [''])[0]}).",
                         f"run the original command again with {key}={folder}.") from None
    return hydra


def _config_flags(hydra: Any, opts: list[str]) -> list[str]:
    """The run's ``--config-dir`` folders and ``--config-name`` (Hydra records them under
    ``hydra.runtime`` / ``hydra.job``, not among the overrides), unless ``opts`` give them."""
    def given(*names: str) -> bool:
        return any(o == n or o.startswith(f"{n}=") for o in opts for n in names)

    from ftlab.cli import CONFIG_DIR

    out: list[str] = []
    sources = hydra.get("runtime", {}).get("config_sources", None) or []
    if not given("-cd", "--config-dir"):
        for source in sources:
            if source.get("provider") == "command-line" and source.get("path"):
                out += ["--config-dir", str(source.path)]
    dirs = list(dict.fromkeys([CONFIG_DIR, *(str(s.path) for s in sources
                                             if s.get("schema") == "file")]))
    other = any(s.get("schema") == "pkg" and s.get("provider") != "hydra" for s in sources)
    name = hydra.get("job", {}).get("config_name", None)
    if name and name != "config" and not given("-cn", "--config-name"):
        out += ["--config-name", str(name)]
        file = f"{str(name).removesuffix('.yaml')}.yaml"
        if not (other or given("-cd", "--config-dir")
                or any(Path(d, file).is_file() for d in dirs)):  # Hydra: "Cannot find
            raise FtlabError(  # primary config", and a fix that does not help
                f"resume: the run was made with --config-name {name}, and {file} is in "
                f"none of {', '.join(dirs)} (a folder that moved, or not an ftlab run).",
                "give the config's folder: ftlab --config-dir <folder> resume=... (or "
                "--config-name <name>).")
    return out


def _own(hydra: Any) -> list[str]:
    """The overrides the user gave (task and Hydra ones), without the output folder's."""
    drop = ("hydra.run.dir", "hydra.sweep.dir", "hydra.mode")  # (and .subdir: placed jobs)
    given = [str(o) for o in hydra.overrides.get("hydra", [])]
    return [o for o in given if not o.startswith(drop)] + [str(o) for o in hydra.overrides.task]


def hydra_overrides(folder: Path) -> list[str] | None:
    """The task overrides Hydra wrote for the job in ``folder`` (``.hydra/overrides.yaml``);
    None when there is no readable list."""
    import yaml

    try:
        overrides = yaml.safe_load((folder / ".hydra" / "overrides.yaml").read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return [str(o) for o in overrides] if isinstance(overrides, list) else None


def recorded_overrides(folder: Path) -> tuple[str, ...] | None:
    """The task overrides of the job that ran in ``folder`` (its ``metrics.json``, else Hydra's
    ``.hydra/overrides.yaml``), sorted; None when it holds no readable job."""
    record = read_record(folder / "metrics.json")
    overrides = record.get("overrides") if record else None
    if not isinstance(overrides, list):
        overrides = hydra_overrides(folder)
    if overrides is None:  # placed, then stopped before Hydra wrote anything: its claim
        import json

        try:
            overrides = json.loads((folder / CLAIM).read_text())
        except (OSError, ValueError):
            return None
    return tuple(sorted(map(str, overrides))) if overrides is not None else None


def place_jobs(sweep_dir: Path, batch: list[list[str]], start: int) -> list[int]:
    """The job folder number for each job of ``batch`` (Hydra numbers them ``start``, ``start``
    + 1, ...): a job goes back to the folder of an earlier job with the same overrides (to be
    skipped, or to resume its checkpoint), else to its own number if that folder holds no
    other job, else to a new number after the sweep's last folder. A re-launch with other
    values (``ftlab -m resume=<sweep> seed=4,5``) so never writes over finished jobs."""
    existing: dict[int, tuple[str, ...] | None] = {}
    if sweep_dir.is_dir():
        for p in sweep_dir.iterdir():
            if p.is_dir() and p.name.isdigit() and any(p.iterdir()):
                existing[int(p.name)] = recorded_overrides(p)
    used: set[int] = set()
    fresh = max([*existing, start + len(batch) - 1], default=-1) + 1
    out = []
    for i, job in enumerate(batch):
        want = tuple(sorted(map(str, job)))
        same = sorted(n for n, ov in existing.items() if ov == want and n not in used)
        if same:
            n = same[0]
        else:
            n = start + i if start + i not in existing and start + i not in used else fresh
            while not claim(sweep_dir / str(n), job):  # another sweep took it since
                n = max(n + 1, fresh)
            fresh = max(fresh, n + 1)
        used.add(n)
        out.append(n)
    return out


#: a new job folder's first file: its overrides, written before the job starts
CLAIM = ".ftlab-job"


def claim(folder: Path, job: list[str]) -> bool:
    """Take ``folder`` for ``job`` (create it with :data:`CLAIM` in it), atomically: False
    when it already holds anything. Two sweeps launched into one folder at once (or in the
    same second: the same ``outputs/multirun/<time>``) so never place two jobs in one folder."""
    import json
    import os

    folder.mkdir(parents=True, exist_ok=True)
    if any(p.name != CLAIM for p in folder.iterdir()):
        return False
    try:
        fd = os.open(folder / CLAIM, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(list(map(str, job)), f)
    return True
