"""``ftlab-report <run or sweep folder>``: (re)write a sweep's cross-seed report, or print one
run's status, and exit with the status ``ftlab`` would have (README: exit statuses)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ftlab.record import finished_of
from ftlab.report import is_search, outcome, write_report
from ftlab.report_jobs import STOPPED, job_folders, job_record
from ftlab.status import DEGENERATE_EXIT


def exit_status(counts: dict[str, int]) -> int:
    """1 when a job errored, 3 when one finished no better than a trivial predictor, else 0."""
    return 1 if counts["errored"] else DEGENERATE_EXIT if counts["degenerate"] else 0


def _was_search(sweep_dir: Path) -> bool:
    """From the sweep's ``multirun.yaml`` (Hydra writes it); no file: not a search."""
    from omegaconf import OmegaConf

    try:
        return is_search(OmegaConf.load(sweep_dir / "multirun.yaml"))
    except Exception:  # noqa: BLE001 - missing or unreadable: count failures as a sweep does
        return False


def main(argv: list[str] | None = None) -> None:
    """``ftlab-report FOLDER``: (re)write the cross-seed report of a sweep folder, or print one
    run folder's status; exits with the status ``ftlab`` would have (0 ok, 1 an error, 2 a
    wrong config, 3 no better than a trivial baseline)."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("sweep_dir", type=Path, metavar="FOLDER",
                        help="a sweep folder (outputs/multirun/<time>) or one run's folder "
                             "(outputs/runs/<time>)")
    args = parser.parse_args(argv)
    if args.sweep_dir.name == "metrics.json" and args.sweep_dir.is_file():  # its run's folder
        args.sweep_dir = args.sweep_dir.parent
    if (args.sweep_dir / "metrics.json").is_file():  # one run's folder: its status
        sys.exit(_one_run(args.sweep_dir / "metrics.json"))
    if not args.sweep_dir.exists():
        sys.exit(f"ftlab-report: {args.sweep_dir} does not exist.\nFix: pass a folder that "
                 "ftlab wrote (outputs/multirun/<time> or outputs/runs/<time>).")
    if not args.sweep_dir.is_dir() or not job_folders(args.sweep_dir):
        sys.exit(f"ftlab-report: {args.sweep_dir} is not a multirun folder (no job folder "
                 "inside: */.hydra or */metrics.json).\n"
                 "Fix: pass the folder a `ftlab -m ...` sweep wrote, under outputs/multirun/, or "
                 "one run's folder (it holds metrics.json).")
    summary = write_report(args.sweep_dir, ended=False)  # jobs may still be running
    print((args.sweep_dir / "summary.md").read_text())
    counts = outcome(summary, _was_search(args.sweep_dir))
    running = sum(s.get("running", 0) for s in summary.values())
    if running:
        print(f"ftlab-report: {running} job(s) still running; run it again when they end.",
              file=sys.stderr)
    if counts["errored"] or counts["degenerate"]:
        print(f"ftlab-report: {counts['errored']} of {counts['jobs']} job(s) ended in an error, "
              f"{counts['degenerate']} at or below a trivial baseline.", file=sys.stderr)
    sys.exit(exit_status(counts))


def _one_run(path: Path) -> int:
    """Print one run's status (a killed one reads as interrupted); the ``ftlab`` exit status
    it stands for."""
    rec = job_record(path)
    status = rec.get("status")
    if status == "missing":
        problem = rec["error"] if "\n" in rec["error"] else (  # cut short, damaged, absent
            f"{path}: {rec['error']} (cut short, damaged or never written).\nFix: run the job "
            f"again: ftlab resume={path.parent} (a sweep's job: ftlab -m resume=<sweep>).")
        print(f"ftlab-report: {problem}", file=sys.stderr)
        return 1
    where = rec.get("interrupted") or {}
    print(f"{path.parent}: {status}"
          + (f" in stage {where.get('stage')}" if where.get("stage") else "")
          + (f" at step {where['step']}" if where.get("step") is not None else ""))
    if rec.get("error"):
        print(rec["error"])
    if isinstance(rec.get("rerun_error"), dict):  # a re-run stopped before it trained
        print(f"(the results of the run that finished here; a later re-run ended before it "
              f"trained: {rec['rerun_error'].get('status')})")
    elif isinstance(rec.get("finished_before"), dict):  # a changed re-run that did not finish
        print("metrics.json also keeps the results of the run that finished here before "
              "(finished_before): " + ("its own command reuses them without training."
                                       if finished_of(rec, reusable=True) else
                                       "a re-run has since replaced its stage artefacts, so its "
                                       "own command trains again."))
    if status == "ok" and rec.get("failed"):  # finished, but no better than a trivial predictor
        print(f"FAILED: {rec.get('failure') or 'no better than a trivial baseline'}")
    if status == "ok":
        return DEGENERATE_EXIT if rec.get("failed") else 0
    if status == "error" and rec.get("failure") == "config":  # the command line was wrong
        return 2
    return 0 if status in ("running", *STOPPED) else 1
