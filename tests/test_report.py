"""Cross-seed statistics and the report files."""

from __future__ import annotations

import json
import math
import statistics

import pytest

from ftlab.report import markdown, summarize, write_report
from ftlab.report_cli import main


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
    assert s["peft=bitfit"]["metrics"]["test/acc"]["std"] is None  # one run: no spread


def test_one_seed_gets_no_interval_and_no_std_not_a_zero_width_one(tmp_path):
    """A single seed has no spread to estimate: the report said 95% CI [0.375, 0.375] and
    std 0.0000, which reads as a perfectly stable recipe."""
    job = tmp_path / "0"
    (job / ".hydra").mkdir(parents=True)
    (job / "metrics.json").write_text(json.dumps(rec(1, 0.375)))
    summary = write_report(tmp_path)["default"]
    m = summary["metrics"]["test/acc"]
    assert (m["n"], m["mean"], m["ci95"], m["std"]) == (1, 0.375, None, None)
    assert json.loads((tmp_path / "summary.json").read_text())["default"]["metrics"][
        "test/acc"]["ci95"] is None
    text = (tmp_path / "summary.md").read_text()
    assert "| test/acc | 1 | 0.3750 | – (n=1) | – | 0.3750 |" in text
    assert "[0.3750, 0.3750]" not in text and "0.0000" not in text
    assert (tmp_path / "summary.png").read_bytes()[:4] == b"\x89PNG"


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
    # the dead job is job folder 2 but seed 3 (it read "seed 2", the folder's number)
    assert summary["default"]["errors"] == {"3": "no readable metrics.json"}
    assert "- seed 3: no readable metrics.json" in (tmp_path / "summary.md").read_text()
    with pytest.raises(SystemExit) as exit_:  # the dead job errored: status 1, as ftlab's
        main([str(tmp_path)])
    assert exit_.value.code == 1
    out = capsys.readouterr()
    assert "Cross-seed summary" in out.out and "1 of 3 job(s) ended in an error" in out.err


@pytest.mark.parametrize(("failed", "code"), [(False, 0), (True, 3)])
def test_report_cli_exits_as_the_sweep_would(tmp_path, failed, code):
    for seed in (1, 2):
        job = tmp_path / str(seed)
        (job / ".hydra").mkdir(parents=True)
        (job / "metrics.json").write_text(json.dumps(rec(seed, 0.8, failed=failed and seed == 2)))
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path)])
    assert exit_.value.code == code


def test_report_cli_on_a_run_stopped_by_its_config_exits_2_as_ftlab_did(make_cfg, sentiment_dir,
                                                                       tmp_path, capsys):
    """A single run refused by the config checks exits 2 (the command line is wrong, as a
    sweep's pre-check says); ``ftlab-report <its folder>`` gives the same status, and 1 for a
    job error after the checks (its data)."""
    from ftlab.run import run
    from tests.conftest import tiny_overrides

    for extra, code in ((["stage.optim.lr=-1"], 2), (["data.files.train=absent.jsonl"], 1)):
        cfg = make_cfg(tiny_overrides(sentiment_dir) + extra)
        with pytest.raises(SystemExit) as ran:
            run(cfg)
        with pytest.raises(SystemExit) as reported:
            main([cfg.paths.output_dir])
        assert ran.value.code == reported.value.code == code, extra
        assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("record", [{"status": "ok"}, {"status": "ok", "final": None}])
def test_an_ok_record_without_final_metrics_counts_as_an_error_not_a_crash(tmp_path, capsys,
                                                                          record):
    for seed, written in ((1, rec(1, 0.8)), (2, record)):
        (tmp_path / str(seed) / ".hydra").mkdir(parents=True)
        (tmp_path / str(seed) / "metrics.json").write_text(json.dumps(written))
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path)])
    assert exit_.value.code == 1
    assert "holds no final metrics" in capsys.readouterr().out
    assert "| test/acc | 1 | 0.8000 |" in (tmp_path / "summary.md").read_text()


@pytest.mark.parametrize("status", ["discarded", "pruned"])
def test_report_cli_on_a_stopped_jobs_folder_exits_as_its_sweep_did(tmp_path, status):
    """A job stopped on purpose (early discard, a search's pruner) is neither errored nor
    failed: its sweep exits 0, and so does ``ftlab-report <its folder>``."""
    job = tmp_path / "0"
    (job / ".hydra").mkdir(parents=True)
    record = rec(1, 0.8, status=status) | {"discarded": {"steps": 2, "planned_steps": 8}}
    (job / "metrics.json").write_text(json.dumps(record))
    for folder in (tmp_path, job):
        with pytest.raises(SystemExit) as exit_:
            main([str(folder)])
        assert exit_.value.code == 0, folder


def test_report_cli_rejects_a_non_sweep_folder(tmp_path):
    with pytest.raises(SystemExit, match="not a multirun folder"):
        main([str(tmp_path)])
    with pytest.raises(SystemExit, match="missing does not exist"):
        main([str(tmp_path / "missing")])


# --- statistics that answer "which recipe works" (issue: stability report) -------------------

def test_failure_is_defined_by_the_tasks_trivial_predictors():
    from ftlab.seedstats import failure

    base = {"val/baseline_acc": 0.6, "val/baseline_f1": 0.5}
    assert failure({"val/acc": 0.8, "val/f1": 0.78} | base) is None
    assert "val/acc" in failure({"val/acc": 0.6, "val/f1": 0.7} | base)
    # above the majority class in accuracy, but macro-F1 at chance: failed too
    assert "val/f1" in failure({"val/acc": 0.62, "val/f1": 0.49} | base)
    assert failure({"val/ppl": 12.0}) is None  # no baseline defined: no verdict


def test_a_run_without_a_validation_split_is_judged_on_its_test_split():
    from ftlab.seedstats import failure

    test = {"test/baseline_acc": 0.6, "test/baseline_f1": 0.5, "test/acc": 0.6, "test/f1": 0.38}
    assert failure(test) == "test/acc 0.6000 <= baseline 0.6000"
    assert failure(test | {"test/acc": 0.8, "test/f1": 0.78}) is None
    # with a validation split, validation alone judges (test is reported, not used)
    assert failure(test | {"val/baseline_acc": 0.6, "val/acc": 0.7}) is None


def test_a_majority_predictor_fails_although_its_float32_scores_round_up():
    """torchmetrics scores in float32: always predicting the majority class of 18/21 labels
    scores float32(18/21) = 0.85714287 and a macro-F1 above the float64 baselines (by ~1e-8);
    it learnt nothing and must count as failed."""
    import torch

    from ftlab.seedstats import failure
    from ftlab.tasks.classify import Classify

    task = Classify()
    task.labels = ["neg", "pos"]
    labels = torch.tensor([1] * 18 + [0] * 3)

    def final(preds: torch.Tensor) -> dict[str, float]:
        scores = task.metrics()(preds, labels)
        return ({f"val/{k}": float(v) for k, v in scores.items()}
                | {f"val/baseline_{k}": v for k, v in task.baseline(labels.tolist()).items()})

    majority = final(torch.ones(21, dtype=torch.long))
    assert majority["val/acc"] > majority["val/baseline_acc"]  # the rounding at issue
    assert majority["val/f1"] > majority["val/baseline_f1"]
    assert failure(majority) is not None
    one_more = torch.ones(21, dtype=torch.long)
    one_more[-1] = 0  # one minority row right as well: a real (if tiny) improvement
    assert failure(final(one_more)) is None


def test_classification_baselines_majority_accuracy_and_chance_macro_f1():
    from ftlab.tasks.classify import Classify

    task = Classify.__new__(Classify)
    task.labels = ["a", "b"]
    assert task.baseline([0, 1] * 50) == pytest.approx({"acc": 0.5, "f1": 0.5})
    # 90/10: always-majority gives F1 2*.9/1.9 on one class of two = 0.4737, better than
    # uniform guessing ((2*.9*.5/1.4 + 2*.1*.5/.6) / 2 = 0.4048)
    assert task.baseline([0] * 90 + [1] * 10) == pytest.approx({"acc": 0.9, "f1": 0.9 / 1.9})


def test_the_mean_interval_is_students_t_and_covers_the_mean_95_percent_at_3_seeds():
    """A percentile bootstrap's "95%" interval of 3 seeds cannot reach past the scores seen
    and covered the true mean 76% of the time here; the t interval covers it 95%."""
    import numpy as np

    from ftlab.seedstats import mean_ci, t_quantile

    assert t_quantile(0.975, 2) == pytest.approx(4.302652729749464, rel=1e-9)  # t tables
    assert t_quantile(0.975, 9) == pytest.approx(2.262157162798205, rel=1e-9)
    assert t_quantile(0.95, 1000) == pytest.approx(1.6463788172854639, rel=1e-9)
    few = [0.70, 0.80, 0.75]
    lo, hi = mean_ci(few)  # 0.75 +- 4.3027 * 0.05 / sqrt(3)
    assert (lo, hi) == pytest.approx((0.75 - 0.124207, 0.75 + 0.124207), abs=1e-6)
    assert lo < 0.70 and hi > 0.80  # wider than the scores seen, as it must be at n = 3
    assert all(math.isnan(v) for v in mean_ci([0.5]))  # one value: no interval
    assert all(math.isnan(v) for v in mean_ci([]))
    rng = np.random.default_rng(0)
    covered = [lo <= 0.85 <= hi for lo, hi in
               (mean_ci(rng.normal(0.85, 0.01, 3)) for _ in range(2000))]
    assert 0.935 <= np.mean(covered) <= 0.965


def test_permutation_test_paired_exact_and_unpaired():
    from ftlab.seedstats import permutation_test

    b = {str(s): 0.7 + 0.01 * s for s in range(5)}
    a = {s: v + 0.05 for s, v in b.items()}
    r = permutation_test(a, b)
    # every difference is +0.05: only the all-plus and all-minus sign patterns reach it
    assert r["test"] == "paired" and r["p"] == pytest.approx(2 / 32)
    assert r["diff"] == pytest.approx(0.05)
    assert permutation_test(b, b)["p"] == 1.0
    u = permutation_test({"1": 0.9, "2": 0.91, "3": 0.92}, {"7": 0.5, "8": 0.51, "9": 0.52})
    assert u["test"] == "unpaired" and u["p"] == pytest.approx(2 / 20)  # C(6,3) splits
    # the floor, whatever the scores: the two most extreme arrangements of all there are
    assert r["p_min"] == r["p"] and u["p_min"] == u["p"]
    assert permutation_test(b, b)["p_min"] == pytest.approx(2 / 32)


def test_the_ranking_says_when_too_few_seeds_can_show_no_difference():
    """3 paired seeds: 8 sign patterns, so p >= 2/8 however far apart the runs are; the
    report says so instead of leaving a reader to read p = 0.25 as "no difference"."""
    def runs(lr: str, accs: list[float]) -> list[dict]:
        return [{"status": "ok", "failed": False, "seed": seed, "final": {"test/acc": acc},
                 "overrides": [f"seed={seed}", f"stage.optim.lr={lr}"]}
                for seed, acc in enumerate(accs, 1)]

    few = markdown(summarize(runs("1e-4", [0.9, 0.91, 0.92]) + runs("1e-5", [0.5, 0.51, 0.52])))
    assert "| 0.250 | paired (n=3) |" in few
    assert "smallest p the test can give is 0.250 (paired, n=3)" in few
    six = [0.9, 0.91, 0.92, 0.93, 0.94, 0.95]
    many = markdown(summarize(runs("1e-4", six) + runs("1e-5", [a - 0.4 for a in six])))
    assert "| 0.031 | paired (n=6) |" in many and "smallest p" not in many


def test_a_configuration_without_a_test_score_does_not_break_the_ranking():
    """A configuration whose jobs have no test score (pruned by a search, or errored) is not
    ranked; the seed-floor note under the ranking skipped it (it raised KeyError: 'rank', so
    an Optuna search with pruned trials wrote no summary.md)."""
    def runs(lr: str, accs: list[float]) -> list[dict]:
        return [{"status": "ok", "failed": False, "seed": seed, "final": {"test/acc": acc},
                 "overrides": [f"seed={seed}", f"stage.optim.lr={lr}"]}
                for seed, acc in enumerate(accs, 1)]

    pruned = {"status": "pruned", "failed": False, "seed": 1, "final": {"test/acc": 0.5},
              "overrides": ["seed=1", "stage.optim.lr=1e-6"],
              "discarded": {"pruned": True, "steps": 4, "planned_steps": 96}}
    summary = summarize(runs("1e-4", [0.9, 0.91, 0.92]) + runs("1e-5", [0.5, 0.51, 0.52])
                        + [pruned])
    assert "rank" not in summary["stage.optim.lr=1e-6"]
    text = markdown(summary)
    assert "| 2 | stage.optim.lr=1e-5 |" in text and "stage.optim.lr=1e-6 |" not in text
    assert "smallest p the test can give is 0.250 (paired, n=3)" in text


def test_expected_validation_performance_dodge_et_al():
    from ftlab.seedstats import expected_max

    evp = expected_max([0.0, 1.0])
    assert evp == pytest.approx([0.5, 0.75])  # E[max of 2 draws] = 1 - P(both 0)
    vals = [0.6, 0.7, 0.9, 0.65]
    evp = expected_max(vals)
    assert evp[0] == pytest.approx(statistics.fmean(vals))
    assert all(x <= y for x, y in zip(evp, evp[1:], strict=False)) and evp[-1] < max(vals)
    assert expected_max([10.0, 20.0], larger_is_better=False) == pytest.approx([15.0, 12.5])


def _run(seed, acc, f1, key, base=0.55):
    final = {"test/acc": acc, "test/f1": f1, "val/acc": acc, "val/f1": f1,
             "test/baseline_acc": base, "test/baseline_f1": 0.5,
             "val/baseline_acc": base, "val/baseline_f1": 0.5}
    from ftlab.seedstats import failure

    reason = failure(final)
    return {"seed": seed, "overrides": [key, f"seed={seed}"], "status": "ok",
            "failed": reason is not None, "failure": reason, "final": final,
            "monitor": {"metric": "val/acc", "mode": "max"}}


def test_report_shows_baselines_deltas_failures_evp_and_a_ranking(tmp_path):
    good = [_run(s, 0.80 + 0.01 * s, 0.79, "stage.optim.lr=2e-5") for s in range(1, 5)]
    bad = [_run(s, 0.55, 0.36, "stage.optim.lr=1e-3") for s in range(1, 5)]
    mixed = [_run(s, a, f, "stage.optim.lr=1e-4")
             for s, a, f in ((1, 0.78, 0.77), (2, 0.55, 0.40), (3, 0.79, 0.78), (4, 0.8, 0.79))]
    s = summarize(good + bad + mixed)
    g, b, m = s["stage.optim.lr=2e-5"], s["stage.optim.lr=1e-3"], s["stage.optim.lr=1e-4"]
    assert g["baseline"]["test/acc"] == 0.55
    assert g["delta"]["test/acc"] == pytest.approx(0.825 - 0.55)
    assert (g["failed_rate"], m["failed_rate"], b["failed_rate"]) == (0.0, 0.25, 1.0)
    assert b["all_failed"] and not m["all_failed"] and m["failed_seeds"] == ["2"]
    assert g["metrics"]["test/acc"]["best"] == pytest.approx(0.84)
    assert len(g["expected_validation"]) == 4
    assert g["rank"]["rank"] == 1 and b["rank"]["rank"] == 3
    assert b["rank"]["vs_best"]["test"] == "paired" and b["rank"]["vs_best"]["p"] < 0.2
    text = markdown(s)
    assert "WARNING: every run of `stage.optim.lr=1e-3` failed" in text
    assert "## Ranking" in text and "Expected best val/acc of n runs" in text
    assert "| 2 | 0.5500 | 0.4000 |" in text  # per-seed table marks the failed run
    write_report_dir = tmp_path
    for i, r in enumerate(good + bad):
        job = write_report_dir / str(i)
        (job / ".hydra").mkdir(parents=True)
        (job / "metrics.json").write_text(json.dumps(r))
    write_report(write_report_dir)
    assert (write_report_dir / "summary.png").read_bytes()[:4] == b"\x89PNG"


def test_multitask_sub_task_metrics_get_their_baselines_and_deltas():
    """A multi-task stage records ``val/<task>/acc`` with ``val/baseline_<task>/acc`` (the
    key the failure rule reads, ``val/baseline_<metric>``): the report pairs them too."""
    runs = []
    for seed, acc in ((1, 0.8), (2, 0.7)):
        final = {"val/rt/acc": acc, "val/baseline_rt/acc": 0.6, "test/rt/acc": acc,
                 "test/baseline_rt/acc": 0.55}
        runs.append({"seed": seed, "overrides": [f"seed={seed}"], "status": "ok",
                     "failed": False, "final": final})
    [s] = summarize(runs).values()
    assert s["baseline"] == {"val/rt/acc": 0.6, "test/rt/acc": 0.55}
    assert s["delta"]["test/rt/acc"] == pytest.approx(0.75 - 0.55)
    assert "| test/rt/acc | 2 | 0.7500 | [0.1147, 1.3853] | 0.0707 | 0.8000 | 0.5500 |" in \
        markdown({"default": s})


def test_plot_axis_spans_the_baseline_and_every_run():
    from ftlab.report_plot import y_limits

    lo, hi = y_limits([0.80, 0.82], [0.55])  # not auto-zoomed onto the runs
    assert lo < 0.55 < 0.82 < hi and lo > 0.5
    lo, hi = y_limits([0.36, 0.80], [0.5])  # runs below the baseline stay visible
    assert lo < 0.36 and hi > 0.80


def test_plot_axis_shows_the_whole_interval_of_the_mean():
    """3 seeds at 0.70-0.80: the t interval reaches 0.626-0.874, past the scores; the panel's
    axis shows all of it rather than cutting the error bar off."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ftlab.report_plot import _panel

    scores = {"1": 0.70, "2": 0.80, "3": 0.75}
    summary = summarize([{"status": "ok", "failed": False, "seed": int(k),
                          "overrides": [f"seed={k}"], "final": {"test/acc": v}}
                         for k, v in scores.items()])
    (lo, hi), = [s["metrics"]["test/acc"]["ci95"] for s in summary.values()]
    fig, ax = plt.subplots()
    _panel(ax, summary, list(summary), "test/acc")
    bottom, top = ax.get_ylim()
    plt.close(fig)
    assert bottom <= lo < 0.70 and top >= hi > 0.80


def test_a_sampled_permutation_p_value_is_never_zero():
    """30 paired seeds (2^30 sign flips > RESAMPLES): sampled, and no sample is as extreme as
    a consistent difference (only all-plus and all-minus are); p = 1 / (RESAMPLES + 1), the
    observed arrangement counted (Phipson & Smyth 2010), not 0."""
    from ftlab.seedstats import RESAMPLES, permutation_test

    a = {str(s): 0.9 + 0.001 * s for s in range(30)}
    b = {str(s): 0.5 + 0.001 * s for s in range(30)}
    assert permutation_test(a, b)["p"] == pytest.approx(1 / (RESAMPLES + 1))
    assert permutation_test(a, a)["p"] == 1.0


def test_a_run_with_a_nan_validation_score_has_failed():
    from ftlab.seedstats import failure

    assert "val/f1 is nan" in failure({"val/acc": 0.9, "val/baseline_acc": 0.5,
                                       "val/f1": math.nan, "val/baseline_f1": 0.4})
    assert failure({"val/acc": 0.9, "val/baseline_acc": 0.5, "val/baseline_f1": 0.4}) is None


def test_only_the_optuna_sweeper_is_a_search():
    """A search forgives failing trials (exit 3 only when none learnt); ftlab's default basic
    sweeper, also under hydra_plugins.ftlab_sweeper, is not one."""
    from omegaconf import OmegaConf

    from ftlab.report import is_search

    def config(target):
        return OmegaConf.create({"hydra": {"sweeper": {"_target_": target}}})

    assert is_search(config("hydra_plugins.ftlab_sweeper.optuna_sweeper.FtlabOptunaSweeper"))
    assert not is_search(config("hydra_plugins.ftlab_sweeper.basic_sweeper.FtlabBasicSweeper"))


@pytest.mark.parametrize("rank", [0, 1])
def test_only_rank_zero_reports_a_sweep(tmp_path, monkeypatch, rank):
    """Under DDP Lightning starts rank 1 with the same ``ftlab -m`` command, so it runs the
    sweep and its end-of-sweep callback too: it must not write a second report (or a second
    set of W&B summary runs)."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only
    from omegaconf import OmegaConf

    from ftlab.report import SweepReport

    for i, (seed, acc) in enumerate([(1, 0.8), (2, 0.84)]):
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "metrics.json").write_text(json.dumps(rec(seed, acc)))
    monkeypatch.setattr(rank_zero_only, "rank", rank, raising=False)
    monkeypatch.delenv("FTLAB_SWEEP_STATUS", raising=False)
    SweepReport().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}},
                                                    "logger": None}))
    assert (tmp_path / "summary.json").is_file() == (rank == 0)


def test_jobs_are_collected_in_job_number_order_and_a_metrics_file_names_its_run(tmp_path):
    """Hydra numbers jobs 0, 1, ... 10: the report lists them in that order (as text, 10 came
    before 2); ``ftlab-report <run>/metrics.json`` reports that run, not "not a multirun
    folder"."""
    from ftlab.report import collect

    for i in (0, 1, 2, 10):
        job = tmp_path / str(i)
        (job / ".hydra").mkdir(parents=True)
        (job / "metrics.json").write_text(json.dumps(rec(i, 0.8)))
    assert [r["seed"] for r in collect(tmp_path)] == [0, 1, 2, 10]
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path / "2" / "metrics.json")])
    assert exit_.value.code == 0


def test_the_run_to_keep_is_chosen_by_validation_not_by_the_test_score():
    """Seed 2 has the best validation accuracy, seed 3 the best test accuracy: the report's
    chosen run is seed 2 with its own test score, and "best of n" stays the test maximum."""
    finals = {1: (0.80, 0.70), 2: (0.90, 0.72), 3: (0.85, 0.78)}
    runs = [{"status": "ok", "failed": False, "seed": seed, "overrides": [f"seed={seed}"],
             "monitor": {"metric": "val/acc", "mode": "max", "failed_by": None},
             "final": {"val/acc": val, "test/acc": test, "test/baseline_acc": 0.5}}
            for seed, (val, test) in finals.items()]
    [s] = summarize(runs).values()
    assert s["selected"] == {"seed": "2", "by": "val/acc", "value": 0.90,
                             "test": {"test/acc": 0.72}}
    assert s["metrics"]["test/acc"]["best"] == 0.78
    text = markdown({"default": s})
    assert "Chosen by val/acc (the run you would keep): seed 2 (0.9000), test/acc 0.7200" in text
    loss = [r | {"monitor": {"metric": "val/loss", "mode": "min", "failed_by": None},
                 "final": r["final"] | {"val/loss": 1 - r["final"]["val/acc"]}} for r in runs]
    [s] = summarize(loss).values()
    assert s["selected"]["seed"] == "2"  # the lowest loss


def minimised_runs(metric: str, lr: str, values: list[float]) -> list[dict]:
    """Finished runs of one LR monitoring ``val/<metric>`` with ``mode: min`` (test = val +
    0.1), one per value."""
    return [{"status": "ok", "failed": False, "seed": seed, "overrides": [f"seed={seed}",
             f"stage.optim.lr={lr}"], "monitor": {"metric": f"val/{metric}", "mode": "min"},
             "final": {f"val/{metric}": v, f"test/{metric}": v + 0.1}}
            for seed, v in enumerate(values, 1)]


def test_a_loss_is_ranked_and_best_of_n_by_its_lowest_value():
    """An MLM or CLM sweep monitors val/loss: the configuration with the lower test loss ranks
    first, and a loss's "best of n" is its minimum (not the largest, as for an accuracy)."""
    summary = summarize(minimised_runs("loss", "1e-3", [2.0, 2.2, 2.1])
                        + minimised_runs("loss", "1e-4", [3.0, 3.1, 3.2]))
    low, high = summary["stage.optim.lr=1e-3"], summary["stage.optim.lr=1e-4"]
    assert low["rank"] == {"metric": "test/loss", "rank": 1}
    assert high["rank"]["rank"] == 2 and high["rank"]["vs_best"]["diff"] == pytest.approx(1.0)
    assert low["metrics"]["test/loss"]["best"] == pytest.approx(2.1)
    assert low["selected"]["seed"] == "1"  # the lowest validation loss


def test_holm_adjusts_the_tests_against_the_best_as_a_family():
    from ftlab.seedstats import holm

    # Holm (1979): sorted 0.01, 0.02, 0.04 x 3, 2, 1 -> 0.03, 0.04, 0.04 (kept monotone)
    assert holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])
    assert holm([]) == []
    adjusted = holm([0.2, math.nan])
    assert adjusted[0] == 0.2 and math.isnan(adjusted[1])

    def runs(lr: str, shift: float) -> list[dict]:
        return [{"status": "ok", "failed": False, "seed": s, "overrides": [f"seed={s}",
                 f"stage.optim.lr={lr}"], "final": {"test/acc": 0.8 + 0.01 * s - shift}}
                for s in range(1, 7)]

    summary = summarize(runs("a", 0) + runs("b", 0.1) + runs("c", 0.2))
    vs = [summary[k]["rank"]["vs_best"] for k in ("stage.optim.lr=b", "stage.optim.lr=c")]
    assert [v["p"] for v in vs] == pytest.approx([2 / 64] * 2)
    assert [v["p_holm"] for v in vs] == pytest.approx([4 / 64] * 2)  # 2 tests: no longer < 0.05
    assert "| 0.031 | 0.062 | paired (n=6) |" in markdown(summary)


def test_save_artefact_best_keeps_the_lowest_loss_when_the_monitor_is_a_loss(tmp_path):
    """An MLM or CLM sweep (monitor val/loss, mode min) keeps the full-size artefact of its
    lowest-loss job, not of the highest."""
    from ftlab.artefact import keep_best_full_artefacts
    from ftlab.report import collect

    for job, loss in (("0", 0.7), ("1", 0.4), ("2", 0.9)):
        weights = tmp_path / job / "mlm" / "trainable.safetensors"
        weights.parent.mkdir(parents=True)
        (tmp_path / job / ".hydra").mkdir()
        weights.write_bytes(b"w")
        (tmp_path / job / "metrics.json").write_text(json.dumps({
            "status": "ok", "failed": False, "seed": int(job), "overrides": [f"seed={job}"],
            "monitor": {"metric": "val/loss", "mode": "min"}, "objective": loss,
            "final": {"val/loss": loss}, "stages": {"mlm": {
                "artefact": str(weights), "full_size_artefact": True}}}))
    assert keep_best_full_artefacts(collect(tmp_path), tmp_path) == "1"
    assert [(tmp_path / job / "mlm" / "trainable.safetensors").exists() for job in "012"] == [
        False, True, False]


def test_a_relaunch_with_an_extra_override_reads_as_one_configuration_without_errors(tmp_path):
    """``ftlab -m resume=<sweep> checkpoint.keep=true`` (README: extra overrides win) after a
    job errored: the re-launch's jobs go to new folders (their overrides differ), reusing the
    finished ones and running the errored one again. The report split the sweep into
    ``checkpoint.keep=None`` and ``checkpoint.keep=True`` and still counted the error, so
    ``ftlab`` exited 1 though every job had finished."""
    def job(name, seed, status="ok", extra=(), reused=None):
        r = rec(seed, 0.8 + seed / 100, status=status, failed=status != "ok")
        r["overrides"] = [f"seed={seed}", "model=tiny_bert", *extra]
        r["job_identity"] = [f"classify-{seed}", "callbacks-x"]
        if reused is not None:
            r["reused"] = {"from": str(tmp_path / reused), "skipped": True}
        (tmp_path / name / ".hydra").mkdir(parents=True)
        (tmp_path / name / "metrics.json").write_text(json.dumps(r))

    job("0", 1), job("1", 2, status="error"), job("2", 3)  # the first launch
    keep = ["checkpoint.keep=True"]
    job("3", 1, extra=keep, reused="0"), job("4", 2, extra=keep), job("5", 3, extra=keep,
                                                                      reused="2")
    summary = write_report(tmp_path)
    assert list(summary) == ["default"]
    s = summary["default"]
    assert (s["runs"], s["errored"], s["reused"]) == (3, 0, 2)
    assert s["metrics"]["test/acc"]["n"] == 3 and sorted(s["seeds"]) == ["1", "2", "3"]
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path)])
    assert exit_.value.code == 0


def test_a_metric_monitored_with_mode_min_is_ranked_by_its_lowest_value():
    """A multi-task stage monitoring ``mean`` with ``mode: min`` (sub-tasks' MSEs or losses):
    the report went by the name ``mean`` and ranked the highest test/mean first and took
    its maximum as best of n, against the task's own direction."""
    summary = summarize(minimised_runs("mean", "1e-3", [0.2, 0.4, 0.3])
                        + minimised_runs("mean", "1e-4", [0.9, 1.0, 1.1]))
    low, high = summary["stage.optim.lr=1e-3"], summary["stage.optim.lr=1e-4"]
    assert low["rank"] == {"metric": "test/mean", "rank": 1} and high["rank"]["rank"] == 2
    assert low["metrics"]["test/mean"]["best"] == pytest.approx(0.3)
    assert low["metrics"]["val/mean"]["best"] == pytest.approx(0.2)


def test_report_finds_job_folders_nested_by_their_overrides(tmp_path, capsys):
    """``hydra.sweep.subdir='${hydra.job.override_dirname}/${seed}'`` (the sweep check's
    advice for one folder per job): a data file's path in the overrides nests each job folder
    several levels down. The report and ftlab-report must count those jobs (they found none:
    an empty summary, exit status 0)."""
    key = "data.files.train=/data/a.jsonl"
    for seed, acc in ((1, 0.8), (2, 0.9)):
        job = tmp_path / "data.files.train=" / "data" / "a.jsonl" / str(seed)
        (job / ".hydra").mkdir(parents=True)
        (job / "metrics.json").write_text(json.dumps(rec(seed, acc, key=key)))
    (tmp_path / ".submitit" / "123").mkdir(parents=True)  # launcher files: not a job
    summary = write_report(tmp_path)
    assert summary["default"]["runs"] == 2 and summary["default"]["metrics"]["test/acc"]["n"] == 2
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path)])
    assert exit_.value.code in (0, None)
    assert "runs: 2" in capsys.readouterr().out
