"""callbacks=early_discard: the rule, tiny runs that stop or go on, the report, the ledger."""

from __future__ import annotations

import json
import math
import multiprocessing as mp
from pathlib import Path

import pytest

from ftlab.discard import LEDGER, goes_on, read_ledger, record
from ftlab.report import summarize, write_report
from ftlab.run import run
from tests.conftest import tiny_overrides


@pytest.mark.parametrize(("earlier", "score", "keep", "k", "mode", "expected"), [
    ([], 0.1, "top_k", 2, "max", True),               # the first k jobs always go on
    ([0.9], 0.1, "top_k", 2, "max", True),
    ([0.9, 0.8], 0.1, "top_k", 2, "max", False),      # two earlier jobs beat it: k=2 are kept
    ([0.9, 0.5], 0.7, "top_k", 2, "max", True),       # only one beats it
    ([0.9, 0.7], 0.7, "top_k", 2, "max", True),       # a tie goes on
    ([0.9, 0.8], 0.1, "top_k", 2, "min", True),       # lower wins (val/loss)
    ([0.1, 0.2], 0.9, "top_k", 2, "min", False),
    ([0.5, 0.6, 0.7], 0.55, "above_median", 1, "max", False),  # median 0.6
    ([0.5, 0.6, 0.7], 0.6, "above_median", 1, "max", True),
    ([0.5, 0.6, 0.7], 0.55, "above_median", 1, "min", True),
    ([0.5, 0.6], float("nan"), "above_median", 1, "max", False),  # NaN is the worst score
    ([0.5, 0.6], 0.1, "above_median", 3, "max", True),            # still among the first k
])
def test_the_discard_rule(earlier, score, keep, k, mode, expected):
    assert goes_on(earlier, score, keep, k, mode) is expected


def _multirun_cfg(make_cfg, sentiment_dir, sweep: Path, extra=()):
    return make_cfg(tiny_overrides(sentiment_dir) + [
        "callbacks=early_discard", "callbacks.early_discard.k=2", "hydra.mode=MULTIRUN",
        f"hydra.sweep.dir={sweep}", *extra])


def _ledger(sweep: Path, scores: list[float]) -> None:
    sweep.mkdir(parents=True, exist_ok=True)
    (sweep / LEDGER).write_text("".join(
        json.dumps({"job": str(i), "stage": "classify", "score": s}) + "\n"
        for i, s in enumerate(scores)))


@pytest.mark.parametrize(("earlier", "discarded"), [([2.0, 2.0], True), ([0.0, 0.0], False)])
def test_a_job_among_the_least_promising_stops_and_is_recorded_as_discarded(
        earlier, discarded, make_cfg, sentiment_dir, tmp_path):
    sweep = tmp_path / "sweep"
    _ledger(sweep, earlier)  # two earlier jobs at val/acc 2.0 (unbeatable) or 0.0
    cfg = _multirun_cfg(make_cfg, sentiment_dir, sweep)
    rec = run(cfg)
    steps = rec["stages"]["classify"]["global_steps"]
    total = 16  # 256 rows / batch 16, one epoch
    mine = read_ledger(sweep / LEDGER)[-1]
    assert mine["job"] == "run" and mine["step"] == math.ceil(0.25 * total)
    assert mine["metric"] == "val/acc" and 0.0 <= mine["score"] <= 1.0
    on_disk = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert on_disk["status"] == rec["status"]
    if discarded:
        assert rec["status"] == "discarded" and rec["failed"] is False
        assert mine["decision"] == "discard" and steps == mine["step"] < total
        assert rec["discarded"]["steps"] == steps and rec["discarded"]["planned_steps"] == total
        assert "val/acc" in rec["final"] and "test/acc" in rec["final"]  # metrics so far kept
    else:
        assert rec["status"] == "ok" and "discarded" not in rec
        assert mine["decision"] == "go_on" and steps == total


def test_outside_a_multirun_the_callback_does_nothing(make_cfg, sentiment_dir, tmp_path):
    cfg = make_cfg(tiny_overrides(sentiment_dir) + ["callbacks=early_discard",
                                                    f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    rec = run(cfg)
    assert rec["status"] == "ok" and rec["stages"]["classify"]["global_steps"] == 16
    assert not (tmp_path / "sweep").exists()


def _job(sweep: Path, name: str, rec: dict) -> None:
    (sweep / name / ".hydra").mkdir(parents=True)
    (sweep / name / "metrics.json").write_text(json.dumps(rec))


def test_the_report_counts_discarded_jobs_apart_from_errored_and_failed(tmp_path):
    final = {"val/acc": 0.8, "test/acc": 0.7}
    _job(tmp_path, "0", {"status": "ok", "failed": False, "seed": 1, "final": final,
                         "overrides": ["seed=1"]})
    _job(tmp_path, "1", {"status": "discarded", "failed": False, "seed": 2,
                         "final": {"val/acc": 0.1, "test/acc": 0.1}, "overrides": ["seed=2"],
                         "discarded": {"steps": 4, "planned_steps": 16}})
    _job(tmp_path, "2", {"status": "discarded", "failed": False, "seed": 3, "final": final,
                         "overrides": ["seed=3"], "discarded": {"steps": 5, "planned_steps": 20}})
    s = write_report(tmp_path)["default"]
    assert (s["runs"], s["errored"], s["failed"], s["discarded"]) == (3, 0, 0, 2)
    assert s["discarded_steps"] == {"trained": 9, "planned": 36}
    assert s["metrics"]["test/acc"]["n"] == 1  # partial runs stay out of the statistics
    assert "discarded early: 2" in (tmp_path / "summary.md").read_text()
    _job(tmp_path, "3", {"status": "error", "failed": True, "seed": 4, "error": "boom",
                         "overrides": ["seed=4"]})
    from ftlab.report import collect

    s = summarize(collect(tmp_path))["default"]
    assert (s["errored"], s["failed"], s["discarded"]) == (1, 1, 2)
    assert list(s["errors"]) == ["4"]


def _writer(ledger: str, who: str, n: int) -> None:
    import time

    import ftlab.discard

    real = ftlab.discard.read_ledger

    def slow_read(path: Path) -> list[dict]:  # widen the read-then-append window
        entries = real(path)
        time.sleep(0.005)
        return entries

    ftlab.discard.read_ledger = slow_read
    for i in range(n):
        record(Path(ledger), {"job": f"{who}{i}", "stage": "classify", "score": i / n},
               "above_median", 1, "max")


def test_the_ledger_stays_valid_under_two_concurrent_writers(tmp_path):
    ledger = tmp_path / LEDGER
    # fork: the writers start at once with ftlab.discard already imported (spawn re-imported
    # torch and Lightning in each child: ~15 s of a 2-core machine before the first write)
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(ledger), who, 40)) for who in "ab"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    entries = read_ledger(ledger)  # every line parses
    assert len(entries) == 80 and len({e["job"] for e in entries}) == 80
    # each decision saw exactly the entries before it: read and append were one step
    assert [e["earlier"] for e in entries] == list(range(80))


def test_a_discarded_pipeline_stage_skips_the_later_stages_and_the_cache(
        make_cfg, sentiment_dir, tmp_path):
    sweep, cache = tmp_path / "sweep", tmp_path / "cache"
    sweep.mkdir()
    (sweep / LEDGER).write_text("".join(  # two earlier TAPT runs with an unbeatable val/loss
        json.dumps({"job": str(i), "stage": "tapt", "score": 0.0}) + "\n" for i in range(2)))
    cfg = _multirun_cfg(make_cfg, sentiment_dir, sweep,
                        ["pipeline=tiny", f"cache.dir={cache}"])
    rec = run(cfg)
    assert rec["status"] == "discarded" and list(rec["stages"]) == ["tapt"]
    assert rec["discarded"]["stage"] == "tapt" and rec["discarded"]["metric"] == "val/loss"
    planned = rec["discarded"]["planned_steps"]  # one epoch of TAPT blocks, capped at 12
    assert rec["discarded"]["steps"] == math.ceil(0.25 * planned) < planned
    assert rec["stages"]["tapt"]["cached"] is False
    assert not any(p.is_dir() and not p.name.startswith(".") for p in cache.glob("*")
                   if (p / "stage.json").is_file())


@pytest.mark.parametrize(("at", "kill", "resumed_from"), [
    (0.25, 10, 8),  # decided at step 3, checkpointed after it
    (0.4, 6, 4),    # checkpointed at 4, decided at 5, killed at 6: step 5 is trained again
])
def test_a_resumed_job_is_judged_once(at, kill, resumed_from, make_cfg, sentiment_dir,
                                      tmp_path, monkeypatch):
    """A job killed after its early-discard point and resumed keeps its one ledger entry and
    its decision: judging it again would add a second score for the same job (and could
    discard a job that went on)."""
    from tests.test_resume import STEPS, crash_at

    sweep = tmp_path / "sweep"
    steps = [s for s in STEPS if not s.startswith("callbacks")]
    cfg = _multirun_cfg(make_cfg, sentiment_dir, sweep, [
        *steps, "callbacks.progress=null", f"callbacks.early_discard.at={at}"])
    crash_at(monkeypatch, kill)
    assert run(cfg)["status"] == "error"  # (in a multirun the job records it and returns)
    monkeypatch.undo()
    assert len(read_ledger(sweep / LEDGER)) == 1
    rec = run(cfg)
    assert rec["status"] == "ok" and rec["stages"]["classify"]["resumed_from_step"] == \
        resumed_from
    entries = read_ledger(sweep / LEDGER)
    assert [(e["job"], e["decision"]) for e in entries] == [("run", "go_on")]


def test_a_discarded_job_killed_while_testing_resumes_discarded(make_cfg, sentiment_dir,
                                                                tmp_path, monkeypatch):
    """The stop and the decision are in the checkpoint: resumed, the job trained on from it
    (Lightning keeps no should_stop) and lost its discard, or went on without its outcome."""
    from tests.test_resume import crash_at

    sweep = tmp_path / "sweep"
    _ledger(sweep, [2.0, 2.0])  # unbeatable: discarded at step 4 of 16
    cfg = _multirun_cfg(make_cfg, sentiment_dir, sweep)
    crash_at(monkeypatch, 4, hook="on_test_batch_end")
    assert run(cfg)["status"] == "error"  # (in a multirun the job records it and returns)
    monkeypatch.undo()
    rec = run(cfg)
    assert rec["status"] == "discarded" and rec["stages"]["classify"]["resumed_from_step"] == 4
    assert rec["stages"]["classify"]["global_steps"] == rec["discarded"]["steps"] == 4
    assert len(read_ledger(sweep / LEDGER)) == 3  # judged once


def test_jobs_compete_only_with_seeds_of_their_own_configuration(tmp_path):
    """Two earlier jobs of another configuration (peft=full) scored 0.9: a bitfit job at 0.6 is
    among its own configuration's first k and goes on; a third full seed at 0.6 is discarded."""
    ledger = tmp_path / LEDGER
    for seed in (1, 2):
        record(ledger, {"stage": "classify", "config": "peft=full", "score": 0.9, "job": str(seed)},
               "top_k", 2, "max")
    bitfit = {"stage": "classify", "config": "peft=bitfit", "score": 0.6, "job": "3"}
    assert record(ledger, bitfit, "top_k", 1, "max")
    full = {"stage": "classify", "config": "peft=full", "score": 0.6, "job": "4"}
    assert not record(ledger, full, "top_k", 1, "max")


def test_a_job_judged_again_counts_once(tmp_path):
    """A job that went on, errored after its decision and was run again from the start (no
    checkpoint to resume) by a re-launch is judged again: it compared with its own earlier
    entry (and was discarded: no longer among the first k = 2), and later jobs counted its
    score twice (a job at 0.6 went on, above the median of [0.9, 0.5, 0.5])."""
    ledger = tmp_path / LEDGER
    for job, score in (("0", 0.9), ("1", 0.5), ("1", 0.5)):  # job 1: judged, then again
        entry = {"stage": "classify", "config": "c", "score": score, "job": job}
        assert record(ledger, entry, "above_median", 2, "max")  # the first k = 2 jobs go on
    assert read_ledger(ledger)[-1]["earlier"] == 1  # job 0 only, not its own first entry
    assert not record(ledger, {"stage": "classify", "config": "c", "score": 0.6, "job": "2"},
                      "above_median", 2, "max")  # below the median of [0.9, 0.5]
    assert read_ledger(ledger)[-1]["earlier"] == 2
