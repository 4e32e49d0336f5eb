"""The README's command lines and the small CLIs it documents, as a new user meets them.

Every ``ftlab ...`` line of the README (code blocks and inline spans) without a placeholder
composes and passes the config-level checks a sweep runs before its first job (schemas, rules,
constructor signatures, targets; no data or model is loaded): a README example that a later
change breaks fails here, not on a user's machine.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

#: placeholders and commands that need a folder of an earlier run
SKIP = ("<", "...", "resume=", "--help", "--cfg")


def readme_commands() -> list[str]:
    """``ftlab`` command lines of the README: code-block lines (continuations joined, comments
    dropped) and inline spans."""
    text = README.read_text()
    found: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line.strip())
            if line == "ftlab" or line.startswith("ftlab "):
                found.append(line)
    prose = re.sub(r"```.*?```", "", text, flags=re.S).replace("\n", " ")
    found += [m for m in re.findall(r"`(ftlab [^`]*)`", prose)]
    return sorted({" ".join(c.split()) for c in found if not any(s in c for s in SKIP)})


def test_the_readme_has_commands_to_check():
    commands = readme_commands()
    assert len(commands) > 40
    assert "ftlab experiment=quick" in commands


def check_command(line: str) -> None:
    """Compose ``line``'s overrides (each job of a comma sweep) and run ``ftlab``'s own
    pre-run checks on them; raise what a user would see."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import open_dict

    from ftlab.cli import CONFIG_DIR, replace_files
    from ftlab.preflight import check_overrides
    from ftlab.sweepcheck import check_job

    argv = replace_files([a for a in shlex.split(line)[1:] if a != "-m"])
    GlobalHydra.instance().clear()
    check_overrides(argv, CONFIG_DIR, "config")
    # a search space (interval, tag, choice) is Optuna's to sample: check the rest
    parsed = [o for o in OverridesParser.create().parse_overrides(argv)
              if not o.is_sweep_override() or o.is_discrete_sweep()]
    jobs = [list(job) for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    for job in {id(j): j for j in (jobs[0], jobs[-1])}.values():  # a sweep's first and last
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose("config", overrides=job, return_hydra_config=True)
            with open_dict(cfg):
                cfg.hydra.job.num, cfg.hydra.job.id = 0, "readme"
                cfg.hydra.runtime.output_dir = "/nonexistent/readme-check"
            HydraConfig.instance().set_config(cfg)
            check_job(cfg, job)
    GlobalHydra.instance().clear()


@pytest.mark.parametrize("line", readme_commands())
def test_readme_command_composes_and_passes_the_pre_run_checks(line):
    check_command(line)


def test_a_broken_readme_command_is_caught():
    """The check above can fail: the step-0 perplexity line as the README once had it."""
    from ftlab.errors import FtlabError

    with pytest.raises(FtlabError, match="limit_train_batches"):
        check_command("ftlab model=smollm2 stage=clm data=news trainer.limit_train_batches=0")


# --- ftlab-report on one run's folder ----------------------------------------------------------

def test_report_on_a_failed_run_says_why_and_exits_3(tmp_path, capsys):
    from ftlab.report_cli import main

    record = {"status": "ok", "failed": True, "failure": "val/acc 0.4850 <= baseline 0.5150"}
    (tmp_path / "metrics.json").write_text(json.dumps(record))
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path)])
    assert exit_.value.code == 3
    assert "FAILED: val/acc 0.4850 <= baseline 0.5150" in capsys.readouterr().out


def test_report_on_a_cut_short_run_record_names_the_fix(tmp_path, capsys):
    """README, *Errors*: a metrics.json cut short is reported as missing "with the fix"; it
    said only "no readable metrics.json"."""
    from ftlab.report_cli import main

    (tmp_path / "metrics.json").write_text('{"status": "ok", "fin')
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path)])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert "no readable metrics.json" in err and "Traceback" not in err
    assert f"Fix: run the job again: ftlab resume={tmp_path}" in err


def test_report_help_names_run_folders_too(capsys):
    from ftlab.report_cli import main

    with pytest.raises(SystemExit):
        main(["--help"])
    assert "run folder" in capsys.readouterr().out


# --- nox -s demo -----------------------------------------------------------------------------

def test_nox_demo_accepts_the_quick_sweeps_failed_status():
    """`nox -s demo` ends with `ftlab -m experiment=quick seed=1,2,3`, whose 7-step jobs end at
    the majority class (exit 3, the README's "Everyday use"): that must not fail the session,
    while an error (1) or a bad command line (2) still does."""
    pytest.importorskip("nox")
    spec = importlib.util.spec_from_file_location("noxfile", ROOT / "noxfile.py")
    noxfile = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(noxfile)
    runs = []

    class Session:
        posargs: list[str] = []

        def install(self, *args, **kwargs):
            pass

        def run(self, *args, **kwargs):
            runs.append((args, kwargs))

    noxfile.demo(Session())
    quick = [kw for args, kw in runs if "experiment=quick" in args]
    assert quick, runs
    codes = quick[0].get("success_codes", [0])
    assert 3 in codes and 1 not in codes and 2 not in codes


# --- data=local with fewer files than its three default names -----------------------------

def test_a_missing_validation_file_says_how_to_do_without_it(tmp_path, monkeypatch):
    """data=local names data/{train,validation,test}.csv by default, so a user who gives only
    their training file meets a file they never named: the fix says how to drop that split."""
    from ftlab.data.sources import load_raw
    from ftlab.data.spec import DataSpec
    from ftlab.errors import FtlabError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.csv").write_text("text,label\ngood,pos\nbad,neg\n")
    spec = DataSpec(files={"train": "train.csv", "validation": "data/validation.csv"})
    with pytest.raises(FtlabError) as err:
        load_raw(spec)
    assert "'~data.files.validation' data.splits.validation=null" in str(err.value)
    assert "data.files={all: FILE}" in str(err.value)
    spec = DataSpec(files={"train": "nope.csv"})  # the training file itself: no such advice
    with pytest.raises(FtlabError) as err:
        load_raw(spec)
    assert "~data.files" not in str(err.value)


@pytest.mark.parametrize("path", sorted((ROOT / "conf" / "data").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_every_data_option_takes_every_data_key(path):
    """`data.<key>=...` works whichever data= option is chosen (the README's
    `data.transforms=[gender_swap]` with `data=wnut16` stopped at "Unknown key 'transforms'"):
    each conf/data/*.yaml lists every DataSpec field."""
    import dataclasses

    import yaml

    from ftlab.data.spec import DataSpec

    missing = {f.name for f in dataclasses.fields(DataSpec)} - set(yaml.safe_load(path.read_text()))
    assert not missing, f"{path.name} lacks {sorted(missing)}"


@pytest.mark.parametrize("path", sorted((ROOT / "conf" / "stage").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_every_stage_yaml_lists_classifys_optim_and_trainer_keys(path):
    """`stage.optim.lr_scaling=linear` (README, "GPUs") and `stage.trainer.val_check_interval`
    work with every stage= option: the command line reaches only keys a stage YAML lists."""
    import yaml

    classify = yaml.safe_load((ROOT / "conf" / "stage" / "classify.yaml").read_text())
    node = yaml.safe_load(path.read_text())
    for group in ("optim", "trainer"):
        missing = set(classify[group]) - set(node.get(group) or {})
        assert not missing, f"{path.name} {group} lacks {sorted(missing)}"


# --- options the README shows outside full command lines ---------------------------------------

def test_a_list_of_group_options_passes_the_preflight():
    """`callbacks=[ema,early_discard]` (README, *Parameter-efficient fine-tuning*) selects two
    callbacks: the pre-flight read the list as one option '['ema', 'early_discard']' and
    stopped the run; a wrong entry in the list is still named."""
    from ftlab.cli import CONFIG_DIR
    from ftlab.errors import FtlabError
    from ftlab.preflight import check_overrides

    check_overrides(["callbacks=[ema,early_discard]"], CONFIG_DIR, "config")
    with pytest.raises(FtlabError, match="Unknown option 'nope' for config group 'callbacks'"):
        check_overrides(["callbacks=[ema,nope]"], CONFIG_DIR, "config")


def test_the_separator_hint_is_an_override_a_shell_passes_on():
    """The hint for a ';'-separated csv, pasted into a shell, gives Hydra a ';' (the README's
    and the hint's old `data.delimiter=';'` reached Hydra as `data.delimiter=;`, a parse error)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from ftlab.errors import separator_hint

    hint = separator_hint(["review;sentiment"], ["review", "sentiment"], "set data.delimiter")
    argv = shlex.split(hint.split("-separated: set ", 1)[1].rstrip("."))
    (override,) = OverridesParser.create().parse_overrides(argv)
    assert (override.key_or_group, override.value()) == ("data.delimiter", ";")


def test_one_file_for_a_stages_own_data_replaces_its_files(make_cfg, tmp_path):
    """The form the data error's fix names for a pipeline stage,
    `pipeline.stages.inter.data.files={all: FILE}`, stopped with "Unknown key 'all'": only the
    run's `data.files={...}` was made a replacement of the files node."""
    from ftlab.cli import replace_files

    given = ["pipeline=intermediate_task", "data@pipeline.stages.inter.data=local",
             f"pipeline.stages.inter.data.files={{all: {tmp_path}/nli.jsonl}}",
             "+data@pipeline.stages.task.data=local",
             f"pipeline.stages.task.data.files={{all: {tmp_path}/rt.jsonl}}"]
    cfg = make_cfg(replace_files(given))
    assert dict(cfg.pipeline.stages.inter.data.files) == {"all": f"{tmp_path}/nli.jsonl"}
    assert dict(cfg.pipeline.stages.task.data.files) == {"all": f"{tmp_path}/rt.jsonl"}
