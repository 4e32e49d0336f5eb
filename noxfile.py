"""nox sessions: `nox -s tests`, `nox -s lint`, `nox -s demo`, `nox -s bench`,
`nox -s pythons` (`pythons-3.12`: one Python)."""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "tests"]
# the tested torch; which build pip installs depends on the index, not on a GPU (README, Quick
# start: PIP_INDEX_URL=https://download.pytorch.org/whl/cpu for the CPU-only build)
TORCH = "torch==2.13.0"
#: the Pythons ftlab is tested on (pyproject's classifiers); CI (.ci/run) runs 3.11
PYTHONS = ["3.10", "3.11", "3.12", "3.13"]


@nox.session
def tests(session: nox.Session) -> None:
    """The full default suite (unit + integration); `-- -m slow` for the slow ones."""
    session.install(TORCH, "-e", ".[dev]")
    session.run("pytest", "-n", "2", *session.posargs)


@nox.session(python=PYTHONS)
def pythons(session: nox.Session) -> None:
    """The default suite on each supported Python (`nox -s pythons-3.12`: one of them).

    pip is upgraded first: Python 3.10's venv ships pip 23.0, too old to build seqeval's sdist."""
    session.install("-U", "pip")
    session.install(TORCH, "-e", ".[dev]")
    session.run("pytest", "-n", "2", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", "ftlab", "tests", "benchmarks", "noxfile.py")


@nox.session
def demo(session: nox.Session) -> None:
    """The embedded default, then a 3-seed sweep of the quick experiment with its report."""
    session.install(TORCH, "-e", ".")
    session.run("ftlab", *session.posargs)
    # 7 steps per job check the setup, not the recipe: the jobs usually end at the majority
    # class, which ftlab reports as failed with exit status 3 (README, "Errors"); 1 (an error)
    # and 2 (a bad command line) still fail the session
    session.run("ftlab", "-m", "experiment=quick", "seed=1,2,3", success_codes=[0, 3])


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks that print figures (minutes on a 2-core CPU)."""
    session.install(TORCH, "-e", ".")
    session.run("python", "benchmarks/overhead.py", *session.posargs)
