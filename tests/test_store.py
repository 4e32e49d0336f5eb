"""Atomic writes: an interrupted write never leaves a half-written file that later code trusts."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

import ftlab.store
from ftlab.errors import FtlabError
from ftlab.store import atomic_write, load_tensors, read_json, save_tensors, write_json


def _leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.endswith(".tmp") or ".tmp-" in p.name]


def test_crash_mid_write_keeps_the_old_file_and_no_temp(tmp_path):
    path = write_json(tmp_path / "metrics.json", {"status": "ok", "stages": {"a": 1}})

    def crash(tmp: Path) -> None:
        tmp.write_text('{"status": "runn')  # half the new content is on disk...
        raise KeyboardInterrupt  # ...when the job is killed

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, crash)
    assert read_json(path) == {"status": "ok", "stages": {"a": 1}}
    assert not _leftovers(tmp_path)


def test_crash_between_write_and_rename(tmp_path, monkeypatch):
    path = write_json(tmp_path / "metrics.json", {"v": 1})
    monkeypatch.setattr(ftlab.store.os, "replace", lambda *a: (_ for _ in ()).throw(
        OSError(errno.EIO, "I/O error")))
    with pytest.raises(OSError, match="I/O error") as err:  # the rename's error, unchanged
        write_json(path, {"v": 2})
    assert err.value.errno == errno.EIO
    assert read_json(path) == {"v": 1}
    assert not _leftovers(tmp_path)


def test_disk_full_says_what_to_do_and_keeps_the_old_artefact(tmp_path, monkeypatch):
    path = save_tensors(tmp_path / "trainable.safetensors", {"w": torch.ones(3)})

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x00" * 10)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ftlab.store, "save_file", full)
    with pytest.raises(FtlabError, match=r"(?s)disk is full.*intact.*Fix: free disk space"):
        save_tensors(path, {"w": torch.zeros(3)})
    assert torch.equal(load_tensors(path)["w"], torch.ones(3))
    assert not _leftovers(tmp_path)


def test_stage_cache_never_marks_an_incomplete_stage_done(tmp_path, monkeypatch):
    """A crash while storing a stage leaves no entry (lookup misses) and no temp folder."""
    from ftlab.cache import StageCache

    cache = StageCache(tmp_path / "cache")
    real = ftlab.store.save_file

    def crash(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        raise KeyboardInterrupt  # killed after the weights, before stage.json

    monkeypatch.setattr(ftlab.store, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        cache.store("tapt-0123", {"w": torch.ones(2)}, {"name": "tapt", "metrics": {}})
    assert cache.lookup("tapt-0123") is None
    assert not cache.entry("tapt-0123").exists()
    assert not [p for p in (tmp_path / "cache").iterdir() if ".tmp" in p.name]
    monkeypatch.setattr(ftlab.store, "save_file", real)
    cache.store("tapt-0123", {"w": torch.ones(2)}, {"name": "tapt", "metrics": {}})
    assert cache.lookup("tapt-0123")["name"] == "tapt"
    assert torch.equal(cache.load_state("tapt-0123")["w"], torch.ones(2))


def test_written_files_are_complete(tmp_path):
    path = save_tensors(tmp_path / "a.safetensors", {"x": torch.arange(6.0).view(2, 3)},
                        metadata={"peft": "full"})
    assert torch.equal(load_tensors(path)["x"], torch.arange(6.0).view(2, 3))
    assert os.listdir(tmp_path) == ["a.safetensors"]


def test_artefacts_get_the_usual_file_mode(tmp_path):
    """safetensors writes its own 0600 temp file; the artefact reads like any other file."""
    umask = os.umask(0o022)
    try:
        for path in (save_tensors(tmp_path / "a.safetensors", {"w": torch.ones(2)}),
                     write_json(tmp_path / "m.json", {"a": 1})):
            assert path.stat().st_mode & 0o777 == 0o644, path
    finally:
        os.umask(umask)
