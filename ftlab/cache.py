"""The stage cache: a finished stage is stored under a key derived from everything that shaped it
(its resolved spec, model, data, seed and the keys of the stages it started from), so re-runs
and sweeps reuse unchanged earlier stages instead of retraining them.

Layout: ``<dir>/<key>-<software>/{model.safetensors, trainable.safetensors (when the stage wrote
one), stage.json}``. A stage is written into a temporary folder and renamed into place when complete
(atomic), so an interrupted stage never counts as finished; a lock per key makes concurrent jobs
train a stage once (the others wait, then reuse). ``stage.json`` holds the sha256 of each weight
file: an entry that fails the check (truncated or changed file, unreadable JSON, a file missing)
is moved aside to ``<key>.corrupt-<time>`` with a warning and the stage is retrained.
``<software>`` tags ftlab's source, the user's ``allow_targets`` modules' source and the training
libraries' versions (``ftlab.software``): a stage trained by other code is retrained, not reused;
its entry stays until deleted.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import torch
from filelock import FileLock, Timeout

from ftlab.build import StageBuilder
from ftlab.pipeline import ResolvedStage
from ftlab.rules import one_of
from ftlab.software import software, software_tag
from ftlab.stage import RunContext, StageResult, run_stage
from ftlab.stage_keys import FORMAT, stacked_stages
from ftlab.store import (
    check_name,
    inside,
    is_rank_zero,
    load_tensors,
    read_json,
    save_tensors,
    wait_for_all_ranks,
    write_json,
)

log = logging.getLogger(__name__)

#: the weight files of an entry whose sha256 stage.json records
WEIGHTS = ("model.safetensors", "trainable.safetensors")
MODES = ("upstream", "all", "off")


@dataclass
class CacheSpec:
    """The ``cache`` config node.

    Attributes:
        dir: where finished stages are stored (shared by all runs and sweeps).
        stages: ``upstream`` caches stages a later stage starts from (DAPT/TAPT), learns from
            or stacks (MAD-X's language adapter); ``all`` also the last stage; ``off`` never
            caches.
    """

    dir: str = "outputs/stage_cache"
    stages: Annotated[str, one_of(*MODES)] = "upstream"


def cached_stages(stages: list[ResolvedStage], mode: str,
                  run_dir: Path | None = None) -> set[str]:
    """Names of the stages to cache under ``mode`` (one of ``MODES``: ``CacheSpec`` checks);
    ``upstream``: the stages a later one starts from, learns from (teachers) or stacks the
    adapters of (``peft.stack_on`` into ``run_dir``: MAD-X's language stage)."""
    if mode == "off":
        return set()
    if mode == "all":
        return {s.name for s in stages}
    names = {s.name for s in stages}
    stacked = {n for s in stages
               for n in stacked_stages(s, dict.fromkeys(names, ""), run_dir).values()}
    return {s.init_from for s in stages if s.init_from != "pretrained"} | {
        t for s in stages for t in s.teachers if t in names} | stacked  # reused by sweeps


class StageCache:
    """Finished stages by key, safe under concurrent jobs."""

    def __init__(self, root: str | Path, software: str | None = None) -> None:
        self.root = Path(root)
        self.software = software_tag() if software is None else software

    def entry(self, key: str) -> Path:
        """The key's folder for this software: a safe name, inside the cache folder."""
        check_name(key, "Stage-cache key", "use plain stage names (e.g. '{name}').")
        return inside(self.root, f"{key}-{self.software}")

    def lookup(self, key: str, repair: bool = False) -> dict[str, Any] | None:
        """The stored record of a complete, intact stage, or None. A damaged entry counts as
        absent; with ``repair`` (hold the key's lock) it is also moved aside, with a warning."""
        entry = self.entry(key)
        if not entry.exists() and not entry.is_symlink():
            return None
        record, damage = self.check(key)
        if damage is not None and repair:
            self.set_aside(key, damage)
        return record

    def check(self, key: str) -> tuple[dict[str, Any] | None, str | None]:
        """(the entry's record, None) if it is intact, else (None, what is wrong)."""
        entry = self.entry(key)
        if not entry.is_dir():
            return None, "it is not a folder"
        try:
            record = read_json(entry / "stage.json")
        except FileNotFoundError:
            return None, "stage.json is missing"
        except (OSError, ValueError) as err:
            return None, f"stage.json is unreadable ({type(err).__name__})"
        sums = record.get("checksums") if isinstance(record, dict) else None
        if not isinstance(sums, dict) or "model.safetensors" not in sums:
            return None, "stage.json has no checksums"
        for name, digest in sums.items():
            path = entry / name
            if not path.is_file():
                return None, f"{name} is missing"
            if sha256(path) != digest:
                return None, f"{name} does not match its checksum (truncated or changed)"
        return record, None

    def set_aside(self, key: str, damage: str) -> Path:
        """Move a damaged entry to ``<key>.corrupt-<time>`` (kept for a look, never read)."""
        entry = self.entry(key)
        dest = self.root / f"{entry.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        os.replace(entry, dest)
        log.warning("The stage cache entry %s is damaged: %s. Moved it aside to %s; the stage "
                    "is retrained. (Delete that folder when you no longer need it.)",
                    entry, damage, dest)
        return dest

    @contextmanager
    def claim(self, key: str) -> Iterator[None]:
        """Hold the key's lock (waiting for a job that is training it); clear stale temp dirs."""
        name = self.entry(key).name  # a safe key inside the cache folder
        self.root.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.root / f".{name}.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            log.info("Another job is training stage %s; waiting to reuse it.", key)
            lock.acquire()
        try:
            for stale in self.root.glob(f".{name}.tmp-*"):  # left by an interrupted job
                shutil.rmtree(stale, ignore_errors=True)
            yield
        finally:
            lock.release()

    def store(self, key: str, state: dict[str, torch.Tensor], record: dict[str, Any]) -> Path:
        """Write the weights and record into a temp folder, then rename it into place."""
        name = self.entry(key).name  # a safe key inside the cache folder
        tmp = self.root / f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        try:
            tmp.mkdir(parents=True)
            save_tensors(tmp / "model.safetensors", dedupe(state),
                         metadata={"key": key, "stage": str(record.get("name"))})
            artefact = Path(str(record.get("info", {}).get("artefact", "")))
            if artefact.is_file():  # the stage's own artefact (PEFT state), for reuse as is
                shutil.copyfile(artefact, tmp / "trainable.safetensors")
                _copy_card(artefact.parent, tmp)  # and its card: labels, tokenizer, stage
            sums = {name: sha256(tmp / name) for name in WEIGHTS if (tmp / name).is_file()}
            write_json(tmp / "stage.json", record | {"key": key, "format": FORMAT,
                                                     "checksums": sums,
                                                     "software": software()})
            entry = self.entry(key)
            if entry.exists() and (not (tmp / "trainable.safetensors").is_file()
                                   or (entry / "trainable.safetensors").is_file()):
                shutil.rmtree(tmp)  # only a complete entry can exist (rename is atomic)
            else:
                if entry.exists():  # stored without the artefact this stage wrote: replaced
                    old = tmp.with_name(tmp.name + "-old")
                    os.replace(entry, old)
                    shutil.rmtree(old, ignore_errors=True)
                os.replace(tmp, entry)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return self.entry(key)

    def load_state(self, key: str) -> dict[str, torch.Tensor]:
        return load_tensors(self.entry(key) / "model.safetensors")


def sha256(path: Path) -> str:
    """The file's sha256, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def dedupe(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop tensors that share storage with an earlier one (tied decoder/embeddings)."""
    seen: set[tuple[int, tuple[int, ...]]] = set()
    out = {}
    for name, t in state.items():
        ident = (t.data_ptr(), tuple(t.shape))
        if ident not in seen:
            seen.add(ident)
            out[name] = t
    return out


def run_or_reuse(stage: ResolvedStage, builder: StageBuilder, run: RunContext,
                 upstream: dict[str, StageResult], key: str,
                 cache: StageCache | None) -> StageResult:
    """Reuse the stage from ``cache`` when it holds ``key``; else train it (storing it when
    ``cache`` is given). Returns a ``StageResult``; ``info`` says ``cache_hit``."""
    run_dir = run.run_dir
    usable = cache is not None and not stage.trainer.get("fast_dev_run")
    hit = cache.lookup(key) if usable else None
    if hit is not None and _lacks_artefact(stage, run, hit, cache.entry(key)):
        log.info("Stage %s is cached without its artefact (stored by a run that wrote none); "
                 "retrained to write it.", stage.name)
        hit = None
    # DDP/FSDP: rank zero holds the key's lock and stores the stage; the other ranks train in
    # step with it (waiting on its lock would deadlock: rank zero's fit waits for them)
    if hit is None and not (usable and is_rank_zero()):
        result = run_stage(stage, builder, run, upstream, key)
        result.info |= {"cache_key": key, "cache_hit": False, "cached": False}
        return result
    if hit is None:
        with cache.claim(key):
            # another job may have finished it while we waited; a damaged entry is set aside
            hit = cache.lookup(key, repair=True)
            if hit is not None and _lacks_artefact(stage, run, hit, cache.entry(key)):
                hit = None
            if hit is None:
                result = run_stage(stage, builder, run, upstream, key)
                if result.info.get("discarded"):  # stopped early: never reused as complete
                    result.info |= {"cache_key": key, "cache_hit": False, "cached": False}
                    return result
                model = result.model
                state = model.state_dict() if isinstance(model, torch.nn.Module) else model
                path = cache.store(key, state, {"name": stage.name, "metrics": result.metrics,
                                                "info": result.info})
                log.info("Stage %s stored in the cache: %s", stage.name, path)
                result.info |= {"cache_key": key, "cache_hit": False, "cached": True,
                                "cache_path": str(path)}
                return result
    log.info("Stage %s reused from the cache (%s); not retrained.", stage.name, key)
    stage_dir = inside(run_dir, stage.name)
    if is_rank_zero():  # DDP: one writer; the other ranks wait until the files are complete
        write_json(stage_dir / "cache_hit.json", {"key": key, "path": str(cache.entry(key))})
        if (cache.entry(key) / "trainable.safetensors").is_file():  # later stages may read it
            shutil.copyfile(cache.entry(key) / "trainable.safetensors",
                            stage_dir / "trainable.safetensors")
            _copy_card(cache.entry(key), stage_dir)
    wait_for_all_ranks()
    info = hit["info"] | {"cache_key": key, "cache_hit": True, "cached": True,
                          "cache_path": str(cache.entry(key))}
    return StageResult(stage.name, hit["metrics"], cache.load_state(key), info)


def _lacks_artefact(stage: ResolvedStage, run: RunContext, hit: dict[str, Any],
                    entry: Path) -> bool:
    """The entry has no ``trainable.safetensors`` but this stage would write one (stored by a
    run with ``save_artefact: false``, or the policy ``none`` for a full-size artefact)."""
    full_size = (hit.get("info") or {}).get("full_size_artefact")
    return (stage.save_artefact and not (entry / "trainable.safetensors").is_file()
            and not (full_size and run.save_artefact == "none"))


def _copy_card(src: Path, dst: Path) -> None:
    """Copy a stage's card (``stage.json``, ``tokenizer/``) from ``src`` to ``dst``, if any."""
    from ftlab.artefact import CARD, TOKENIZER

    if (src / CARD).is_file():
        shutil.copyfile(src / CARD, dst / CARD)
    if (src / TOKENIZER).is_dir():
        shutil.copytree(src / TOKENIZER, dst / TOKENIZER, dirs_exist_ok=True)
