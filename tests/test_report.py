"""Cross-seed statistics and the report files."""

from __future__ import annotations

import json
import statistics

import pytest

from ftlab.report import main, summarize, write_report


def rec(seed, acc, key="peft=full", status="ok", failed=False):
    r = {"seed": seed, "overrides": [key, f"seed={seed}", "model=tiny_bert"], "status": status,
         "failed": failed}
    if status == "ok":
        r["final"] = {"test/acc": acc, "val/acc": acc - 0.01}
    else:
        r["error"] = "boom"
    return r


def test_summary_groups_by_config_without_seed_and_counts_failures():
    accs = [0.8, 0.82, 0.9]
    records = [rec(s, a) for s, a in zip((1, 2, 3), accs, strict=True)]
    records += [rec(4, 0, status="error", failed=True), rec(5, 0.5, failed=True)]
    records += [rec(1, 0.7, key="peft=bitfit")]
    s = summarize(records)
    full = s["peft=full"]
    assert full["runs"] == 5 and full["errored"] == 1 and full["failed"] == 2
    m = full["metrics"]["test/acc"]
    vals = accs + [0.5]
    assert m["n"] == 4
    assert m["mean"] == pytest.approx(statistics.fmean(vals))
    assert m["std"] == pytest.approx(statistics.stdev(vals))
    assert m["median"] == pytest.approx(statistics.median(vals))
    assert (m["min"], m["max"]) == (0.5, 0.9)
    assert s["peft=bitfit"]["metrics"]["test/acc"]["std"] == 0.0


def test_report_files_from_a_multirun_folder(tmp_path, capsys):
    for i, (seed, acc) in enumerate([(1, 0.8), (2, 0.84)]):
        job = tmp_path / str(i)
        (job / ".hydra").mkdir(parents=True)
        (job / "metrics.json").write_text(json.dumps(rec(seed, acc)))
    dead = tmp_path / "2"
    (dead / ".hydra").mkdir(parents=True)
    (dead / ".hydra" / "overrides.yaml").write_text("- peft=full\n- seed=3\n- model=tiny_bert\n")
    write_report(tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    # nothing but the seed varies: one configuration
    assert summary["default"]["metrics"]["test/acc"]["n"] == 2
    assert summary["default"]["errored"] == 1  # the job that wrote nothing is counted
    assert (tmp_path / "summary.png").read_bytes()[:4] == b"\x89PNG"
    assert "| test/acc | 2 | 0.8200 |" in (tmp_path / "summary.md").read_text()
    main([str(tmp_path)])
    assert "Cross-seed summary" in capsys.readouterr().out


def test_report_cli_rejects_a_non_sweep_folder(tmp_path):
    with pytest.raises(SystemExit, match="not a multirun folder"):
        main([str(tmp_path)])
