"""Config and names are untrusted input (issue 15): a config cannot run code outside the
allow-list, a name cannot become a path outside the run and cache folders, a corrupt stage-cache
entry is set aside and retrained, and the same rows in any file format give the same data.

Each refusal is asserted by exit status and message, with a canary file that a successful
attack would have created.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import open_dict

from ftlab.cli import preflight
from ftlab.config import check_binds, instantiate_checked
from ftlab.errors import FtlabError
from ftlab.run import run
from ftlab.targets import allowing
from tests.conftest import tiny_overrides
from tests.test_bad_inputs import assert_one_paragraph, no_training  # noqa: F401

ALLOW = r"is not allowed.*allow_targets"


class _Payload:
    """Unpickling this runs ``touch <path>``: what a malicious pickle does."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def payloads(tmp: Path) -> dict[str, dict]:
    """Config nodes that, if instantiated, create ``tmp/canary``: one per attack."""
    canary = tmp / "canary"
    (tmp / "secret").write_text("secret")
    (tmp / "evil.pkl").write_bytes(pickle.dumps(_Payload(canary)))
    return {
        "shutil.copyfile": {"_target_": "shutil.copyfile", "src": str(tmp / "secret"),
                            "dst": str(canary)},
        "pandas.read_pickle": {"_target_": "pandas.read_pickle",
                               "filepath_or_buffer": str(tmp / "evil.pkl")},
        "os.system": {"_target_": "os.system", "command": f"touch {canary}"},
        "builtins.eval": {"_target_": "builtins.eval", "_args_": [f"open({str(canary)!r}, 'w')"]},
    }


def _flow(node: dict) -> str:
    """A node as flow-style YAML (JSON is YAML)."""
    return json.dumps(node)


def _hydra(value: object) -> str:
    """A node as a Hydra override value (keys bare, strings in double quotes)."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_hydra(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_hydra(v) for v in value) + "]"
    return json.dumps(value)


def _into_group(group: str, node: dict) -> list[str]:
    """Overrides turning a group's node (``peft``) into ``node``."""
    return [f"{group}._target_={node['_target_']}"] + [
        f"+{group}.{k}={_hydra(v)}" for k, v in node.items() if k != "_target_"]


# where a malicious node can sit: (override that puts `node` there, the name in the message)
PLACES = {
    "task": (lambda n: ["~stage.task", f"+stage.task={_hydra(n)}"], r"stage\.task\._target_"),
    "peft": (lambda n: _into_group("peft", n), r"peft\._target_"),
    "regularizer": (lambda n: _into_group("regularizer", n), r"regularizer\._target_"),
    "callback": (lambda n: [f"+callbacks.evil={_hydra(n)}"], r"callbacks\.evil\._target_"),
    "logger": (lambda n: [f"+logger.evil={_hydra(n)}"], r"logger\.evil\._target_"),
    "trainer-nested": (lambda n: [f"+trainer.plugins=[{_hydra(n)}]"],
                       r"trainer\.plugins\[0\]"),
    "peft-config-nested": (lambda n: ["peft=lora", "~peft.config", f"+peft.config={_hydra(n)}"],
                           r"peft\.config\._target_"),
}
ATTACKS = ["shutil.copyfile", "pandas.read_pickle", "os.system", "builtins.eval"]
# every attack in the task node, every place with one attack each
COMBOS = [(a, "task") for a in ATTACKS] + [(ATTACKS[i % 4], p) for i, p in enumerate(PLACES)
                                          if p != "task"]


@pytest.mark.parametrize(("attack", "place"), COMBOS, ids=[f"{a}@{p}" for a, p in COMBOS])
def test_command_line_target_is_refused_before_hydra(attack, place, tmp_path, capsys):
    overrides, _ = PLACES[place]
    node = payloads(tmp_path)[attack]
    with pytest.raises(SystemExit) as exit_:
        preflight(["model=tiny_bert", *overrides(node)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert re.search(rf"'{re.escape(attack)}' {ALLOW}", err, re.S), err
    assert_one_paragraph(err.strip().removeprefix("ftlab: "))
    assert not (tmp_path / "canary").exists()


@pytest.mark.usefixtures("no_training")
@pytest.mark.parametrize(("attack", "place"), COMBOS, ids=[f"{a}@{p}" for a, p in COMBOS])
def test_target_is_refused_in_the_job(attack, place, make_cfg, sentiment_dir, tmp_path, capsys):
    """The job checks too (a config that reached Hydra another way): exit 2 (a wrong config),
    nothing ran."""
    overrides, where = PLACES[place]
    node = payloads(tmp_path)[attack]
    cfg = make_cfg(tiny_overrides(sentiment_dir) + overrides(node))
    with pytest.raises(SystemExit) as exit_:
        run(cfg)
    assert exit_.value.code == 2
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert re.search(rf"{where}.*'{re.escape(attack)}' {ALLOW}", record["error"], re.S)
    assert_one_paragraph(record["error"])
    assert record["error"] in capsys.readouterr().err
    assert not (tmp_path / "canary").exists()


def test_every_job_of_a_sweep_is_checked_before_any_trains(tmp_path, capsys):
    """The bad value second in a sweep (of a target or of a group) is refused up front."""
    folder = _experiment(tmp_path, "paper", "stage:\n  task: "
                         + _flow(payloads(tmp_path)["os.system"]) + "\n")
    for argv in (["-m", "stage.task._target_=ftlab.tasks.classify.Classify,os.system"],
                 ["-m", f"hydra.searchpath=[file://{folder}]", "experiment=quick,paper"]):
        with pytest.raises(SystemExit) as exit_:
            preflight(argv)
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert re.search(rf"stage\.task\._target_ 'os.system' {ALLOW}", err, re.S), err
    preflight(["-m", "stage.task._target_=ftlab.tasks.classify.Classify", "peft=full,lora"])
    assert not (tmp_path / "canary").exists()


def ftlab(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    return subprocess.run([sys.executable, "-m", "ftlab", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env=env | {"WANDB_MODE": "offline"})


def _experiment(tmp: Path, name: str, body: str) -> Path:
    folder = tmp / "shared_configs"
    (folder / "experiment").mkdir(parents=True, exist_ok=True)
    (folder / "experiment" / f"{name}.yaml").write_text("# @package _global_\n" + body)
    return folder


@pytest.mark.parametrize("how", ["searchpath", "config-dir"])
def test_malicious_experiment_yaml_is_refused(how, tmp_path, sentiment_dir):
    """A downloaded experiment naming ``shutil.copyfile`` and, in a nested node,
    ``pandas.read_pickle``: refused with exit 2, no traceback, no canary."""
    payload = payloads(tmp_path)
    folder = _experiment(tmp_path, "paper", (
        f"stage:\n  task: {_flow(payload['shutil.copyfile'])}\n"
        f"callbacks:\n  sneaky: {{_target_: ftlab.averaging.WeightAverage, decay: "
        f"{_flow(payload['pandas.read_pickle'])}}}\n"))
    where = ([f"hydra.searchpath=[file://{folder}]"] if how == "searchpath"
             else ["--config-dir", str(folder)])
    proc = ftlab(*tiny_overrides(sentiment_dir), *where, "experiment=paper", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    # both refused in one message (ftlab.targets.check_all)
    assert re.search(r"not allowed.*stage\.task\._target_ 'shutil.copyfile'.*"
                     r"callbacks\.sneaky\.decay\._target_ 'pandas.read_pickle'.*allow_targets",
                     proc.stderr, re.S), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "canary").exists()


def test_a_good_shared_experiment_passes_the_preflight(tmp_path):
    """``hydra.searchpath`` and ``--config-dir`` are accepted (the pre-check used to refuse
    options found there)."""
    folder = _experiment(tmp_path, "shared", "trainer:\n  max_epochs: 2\n")
    preflight([f"hydra.searchpath=[file://{folder}]", "experiment=shared", "model=tiny_bert"])
    preflight(["--config-dir", str(folder), "experiment=shared"])


@pytest.mark.parametrize("body", ["stage:\n  task: {payload}\n",
                                  "seed: !!python/object/apply:os.system [\"touch {canary}\"]\n"],
                         ids=["target", "yaml-tag"])
def test_a_shared_primary_config_is_checked(body, tmp_path, sentiment_dir):
    """``-cd folder -cn main``: a whole config from elsewhere, built on ftlab's."""
    payload = _flow(payloads(tmp_path)["os.system"])
    folder = tmp_path / "shared_configs"
    folder.mkdir()
    (folder / "main.yaml").write_text("defaults:\n  - config\n  - _self_\n" + body.format(
        payload=payload, canary=tmp_path / "canary"))
    proc = ftlab(*tiny_overrides(sentiment_dir), "-cd", str(folder), "-cn", "main", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert re.search(r"'os.system' is not allowed|main.yaml, line \d+ uses a YAML tag",
                     proc.stderr), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "canary").exists()


def test_an_experiment_cannot_allow_itself_more(tmp_path, sentiment_dir):
    folder = _experiment(tmp_path, "sly", "allow_targets: [os.]\nstage:\n  task: "
                         + _flow(payloads(tmp_path)["os.system"]) + "\n")
    proc = ftlab(*tiny_overrides(sentiment_dir), "--config-dir", str(folder), "experiment=sly",
                 cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert re.search(r"allow_targets=\['os.'\] is set by a config file.*on the command line",
                     proc.stderr, re.S), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "canary").exists()


def test_an_experiment_cannot_turn_on_remote_code(tmp_path, sentiment_dir):
    folder = _experiment(tmp_path, "remote", "model:\n  trust_remote_code: true\n")
    proc = ftlab(*tiny_overrides(sentiment_dir), "--config-dir", str(folder), "experiment=remote",
                 cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert re.search(r"model.trust_remote_code=True is set by a config file", proc.stderr)
    assert "Traceback" not in proc.stderr


def test_yaml_python_tags_are_refused_without_a_traceback(tmp_path, sentiment_dir):
    canary = tmp_path / "canary"
    folder = _experiment(tmp_path, "tagged",
                         f'seed: !!python/object/apply:os.system ["touch {canary}"]\n')
    proc = ftlab(*tiny_overrides(sentiment_dir), "--config-dir", str(folder),
                 "experiment=tagged", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert re.search(r"tagged.yaml, line 2 uses a YAML tag that would construct a Python "
                     r"object.*Fix: remove the !!python tag", proc.stderr, re.S), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not canary.exists()


@pytest.mark.parametrize(("node", "why"), [
    ({"_target_": "ftlab.store.write_json", "obj": 1}, r"it is a function or method"),
    ({"_target_": "ftlab.peft.hf.HfPeft", "config": {
        "_target_": "peft.PeftModel.from_pretrained"}}, r"it is a function or method"),
    ({"_target_": "ftlab.resolve.subprocess.Popen", "shell": True},
     r"it is defined in 'subprocess' and only reached through an allowed module's imports"
     r"[\s\S]*allow_targets=\[subprocess.\]"),
    ({"_target_": "ftlab.threads.os.system"}, r"it is defined in 'posix'"),
    ({"_target_": "lightning.pytorch.cli.LightningCLI"}, r"its module is not on the allow-list"),
], ids=["function", "nested-method", "imported-class", "imported-function", "lightning-cli"])
def test_allowed_modules_give_only_their_own_classes(node, why, tmp_path):
    """An allowed module reaches more than its own classes: functions that write files
    (``ftlab.store.write_json``) and everything it imports (``ftlab.resolve.subprocess``)."""
    canary = tmp_path / "canary"
    node = node | ({"path": str(canary)} if "write_json" in node["_target_"] else {})
    node = node | ({"args": f"touch {canary}"} if "Popen" in node["_target_"] else {})
    with pytest.raises(FtlabError, match=rf"is not allowed: {why}"):
        instantiate_checked(node, "peft")
    assert not canary.exists()


def test_allow_targets_lets_your_own_module_in(caplog):
    node = {"_target_": "fractions.Fraction", "numerator": 3}
    with pytest.raises(FtlabError, match=ALLOW):
        check_binds(node, "stage.task")
    with allowing(["fractions."]):
        assert instantiate_checked(node, "stage.task") == 3
    assert "allow_targets=['fractions']" in caplog.text
    with pytest.raises(FtlabError, match=r"not a module name"), allowing(["../x"]):
        pass


def test_every_target_in_conf_is_allowed():
    """The registry itself passes: every ``_target_`` under conf/ (``hydra/`` aside)."""
    import yaml

    from ftlab.cli import CONFIG_DIR
    from ftlab.config import load_target
    from ftlab.targets import targets_in

    found = 0
    for path in sorted(Path(CONFIG_DIR).rglob("*.yaml")):
        if path.relative_to(CONFIG_DIR).parts[0] == "hydra":  # conf/hydra/** is Hydra's
            continue
        for target, where in targets_in(yaml.safe_load(path.read_text()) or {}, path.stem):
            load_target(target, where)
            found += 1
    assert found >= 20


# --- names never become paths ------------------------------------------------------------

NAME_CASES = {
    "dot-dot": (["stage.name=../../x"], r"Stage name '../../x' cannot be used.*stage.name=x"),
    "absolute": (["stage.name=/tmp/ftlab_abs"],
                 r"Stage name '/tmp/ftlab_abs' cannot be used.*stage.name=tmp_ftlab_abs"),
    "dot-dot-inside": (["stage.name=a..b"], r"'a..b' cannot be used"),
    "too-long": (["stage.name=" + "s" * 65], r"cannot be used.*1-64 letters"),
    "hidden": (["stage.name=.cache"], r"Stage name '.cache' cannot be used.*stage.name=cache"),
}


@pytest.mark.usefixtures("no_training")
@pytest.mark.parametrize("case", NAME_CASES)
def test_unsafe_stage_name_is_refused(case, make_cfg, sentiment_dir, tmp_path, capsys):
    extra, expected = NAME_CASES[case]
    cfg = make_cfg(tiny_overrides(sentiment_dir) + ["cache.stages=all",
                                                    f"cache.dir={tmp_path / 'cache'}", *extra])
    with pytest.raises(SystemExit) as exit_:
        run(cfg)
    assert exit_.value.code == 2  # a wrong config (README: exit statuses)
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert re.search(expected, record["error"], re.S), record["error"]
    assert_one_paragraph(record["error"])
    assert record["error"] in capsys.readouterr().err
    assert not Path("/tmp/ftlab_abs").exists() and not (tmp_path.parent / "x").exists()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.yaml",
                                                                   "metrics.json"]


@pytest.mark.usefixtures("no_training")
def test_pipeline_stage_key_with_a_slash_is_refused(make_cfg, sentiment_dir, tmp_path):
    from omegaconf import open_dict

    cfg = make_cfg(tiny_overrides(sentiment_dir) + ["pipeline=tiny"])
    with open_dict(cfg):
        stages = cfg.pipeline.stages
        cfg.pipeline.stages = {"../escape/tapt": stages.tapt, "task": stages.task}
        cfg.pipeline.stages.task.init_from = "../escape/tapt"
    with pytest.raises(SystemExit):
        run(cfg)
    error = json.loads((tmp_path / "run" / "metrics.json").read_text())["error"]
    assert re.search(r"Stage name '../escape/tapt' cannot be used.*key under pipeline.stages "
                     r"\(e.g. to 'escape_tapt'\)", error, re.S), error
    assert not (tmp_path / "escape").exists()


@pytest.mark.usefixtures("no_training")
@pytest.mark.parametrize(("extra", "expected"), [
    (["logger=csv", "logger.csv.name=../../escape"], r"logger.csv.name='../../escape' would "
     r"write outside the run folder"),
    (["logger=csv", "+logger.csv.save_dir=/tmp/ftlab_escape"],
     r"logger.csv.save_dir='/tmp/ftlab_escape': ftlab chooses where.*Fix: remove"),
    (["+callbacks.ckpt={_target_: lightning.pytorch.callbacks.ModelCheckpoint, dirpath: /tmp}"],
     r"callbacks.ckpt.dirpath='/tmp'"),
], ids=["logger-name", "logger-save-dir", "callback-dirpath"])
def test_loggers_and_callbacks_write_inside_the_run(extra, expected, make_cfg, sentiment_dir,
                                                    tmp_path):
    cfg = make_cfg([o for o in tiny_overrides(sentiment_dir) if o != "logger=none"] + extra)
    with pytest.raises(SystemExit):
        run(cfg)
    error = json.loads((tmp_path / "run" / "metrics.json").read_text())["error"]
    assert re.search(expected, error, re.S), error
    assert_one_paragraph(error)
    assert not Path("/tmp/ftlab_escape").exists() and not (tmp_path.parent / "escape").exists()


def test_paths_stay_inside_their_folder(tmp_path):
    from ftlab.cache import StageCache
    from ftlab.store import inside

    (tmp_path / "run").mkdir()
    assert inside(tmp_path / "run", "task") == (tmp_path / "run" / "task").resolve()
    (tmp_path / "run" / "link").symlink_to(tmp_path)  # a link out of the run folder
    for part in ("../x", "/etc", "link/x"):
        with pytest.raises(FtlabError, match=r"outside"):
            inside(tmp_path / "run", part)
    with pytest.raises(FtlabError, match=r"Stage-cache key '../k' cannot be used"):
        StageCache(tmp_path / "cache").lookup("../k")


# --- a corrupt stage cache is set aside and the stage retrained ------------------------------

def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip(path: Path) -> None:  # same size, one byte changed
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated-model": (lambda e: _truncate(e / "model.safetensors"),
                        r"model.safetensors does not match its checksum"),
    "changed-trainable": (lambda e: _flip(e / "trainable.safetensors"),
                          r"trainable.safetensors does not match its checksum"),
    "missing-model": (lambda e: (e / "model.safetensors").unlink(), r"model.safetensors is "
                      r"missing"),
    "bad-json": (lambda e: (e / "stage.json").write_text('{"name": "ta'),
                 r"stage.json is unreadable"),
    "no-json": (lambda e: (e / "stage.json").unlink(), r"stage.json is missing"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_cache_entry_is_set_aside(damage, tmp_path, caplog):
    import torch

    from ftlab.cache import StageCache

    cache = StageCache(tmp_path)
    artefact = tmp_path / "artefact.safetensors"
    from ftlab.store import save_tensors

    save_tensors(artefact, {"a": torch.ones(3)})
    cache.store("s-1", {"w": torch.ones(2)}, {"name": "s", "metrics": {},
                                               "info": {"artefact": str(artefact)}})
    assert set(cache.lookup("s-1")["checksums"]) == {"model.safetensors",
                                                      "trainable.safetensors"}
    break_it, expected = DAMAGE[damage]
    entry = cache.entry("s-1")
    break_it(entry)
    assert cache.lookup("s-1") is None and entry.is_dir()  # no lock: left alone
    assert cache.lookup("s-1", repair=True) is None
    assert not entry.exists()
    [aside] = tmp_path.glob("s-1-*.corrupt-*")
    assert re.search(rf"entry .*s-1-\w+ is damaged: {expected}.*Moved it aside to .*{aside.name}",
                     caplog.text), caplog.text


def test_truncated_cache_entry_is_retrained(make_cfg, sentiment_dir, tmp_path, caplog):
    """A truncated model.safetensors in the cache: the next run warns, sets the entry aside
    and retrains; the run after that reuses the new entry."""
    from ftlab.cache import StageCache

    cache_dir = tmp_path / "cache"
    base = tiny_overrides(sentiment_dir) + [
        "cache.stages=all", f"cache.dir={cache_dir}", "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1", "trainer.limit_test_batches=1"]

    runs = iter(range(3))

    def once() -> dict:  # each run in its own folder (a finished folder would be reused whole)
        cfg = make_cfg(base)
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / f"run{next(runs)}")
        return run(cfg)["lineage"][0]

    first = once()
    assert first["cache_hit"] is False
    entry = StageCache(cache_dir).entry(first["key"])
    _truncate(entry / "model.safetensors")
    caplog.clear()
    second = once()
    assert second["cache_hit"] is False and second["key"] == first["key"]
    assert re.search(r"is damaged: model.safetensors does not match its checksum \(truncated "
                     r"or changed\). Moved it aside to .*\.corrupt-.*the stage is retrained",
                     caplog.text), caplog.text
    [aside] = cache_dir.glob(f"{first['key']}-*.corrupt-*")
    assert (aside / "model.safetensors").stat().st_size < (entry / "model.safetensors").stat(
    ).st_size
    assert once()["cache_hit"] is True


# --- the same rows in any format give the same training data ---------------------------------

LABEL_TYPES = {"str": ("neg", "pos"), "int": (3, 7), "bool": (False, True), "float": (0.5, 2.0)}
FORMATS = ("csv", "tsv", "jsonl", "parquet", "jsonl.gz")


def _write_format(df, path: Path, fmt: str) -> None:
    if fmt == "csv":
        df.to_csv(path, index=False)
    elif fmt == "tsv":
        df.to_csv(path, index=False, sep="\t")
    elif fmt == "parquet":
        df.to_parquet(path, index=False)
    else:
        df.to_json(path, orient="records", lines=True, compression="infer")


def _local(sentiment_dir: Path, folder: Path, fmt: str) -> list[str]:
    """Tiny overrides reading ``folder/<split>.<fmt>``, the format left to the extension."""
    base = [o for o in tiny_overrides(sentiment_dir) if not o.startswith(("data.files",
                                                                           "data.path"))]
    return [*base, *(f"data.files.{s}={folder}/{s}.{fmt}" for s in
                     ("train", "validation", "test"))]


def _first_batch(make_cfg, overrides: list[str]):
    """The first training batch (and the label names) that ftlab builds."""
    from ftlab.build import StageBuilder
    from ftlab.data.datamodule import TextDataModule
    from ftlab.pipeline import build_pipeline

    [stage] = build_pipeline(make_cfg(overrides))
    assert stage.data.path is None  # data=local: the format comes from the extension
    builder = StageBuilder()
    task = builder.task(stage)
    raw = builder.raw(stage)
    dm = TextDataModule(raw.splits, task, builder.tokenizer(stage.model).pad_token_id,
                        batch_size=stage.batch_size, seed=stage.seed)
    return next(iter(dm.train_dataloader())), raw.labels


@pytest.mark.parametrize("column", ["label", "sentiment"])
@pytest.mark.parametrize("kind", LABEL_TYPES)
def test_same_rows_in_every_format_give_the_same_batch(kind, column, make_cfg, sentiment_dir,
                                                       tmp_path):
    import pandas as pd
    import torch

    from tests.conftest import synthetic_rows

    values = dict(zip(("neg", "pos"), LABEL_TYPES[kind], strict=True))
    for split, n, seed in (("train", 48, 0), ("validation", 16, 1), ("test", 16, 2)):
        rows = [{"text": r["text"], column: values[r["label"]]} for r in synthetic_rows(n, seed)]
        for fmt in FORMATS:
            (tmp_path / fmt).mkdir(exist_ok=True)
            _write_format(pd.DataFrame(rows), tmp_path / fmt / f"{split}.{fmt}", fmt)
    column_key = f"data.label_column={column}"
    reference, names = _first_batch(
        make_cfg, [*_local(sentiment_dir, tmp_path / "jsonl", "jsonl"), column_key])
    assert names == sorted(str(v) for v in LABEL_TYPES[kind])
    assert reference["labels"].dtype == torch.long
    for fmt in FORMATS:
        batch, got = _first_batch(make_cfg, [*_local(sentiment_dir, tmp_path / fmt, fmt),
                                             column_key])
        assert got == names, fmt
        assert batch.keys() == reference.keys(), fmt
        for key, tensor in reference.items():
            assert torch.equal(batch[key], tensor), (fmt, key)


def test_csv_with_a_string_label_column_trains(make_cfg, sentiment_dir, tmp_path):
    """The reported crash: a CSV whose label column is ``label`` with string values."""
    import pandas as pd

    from tests.conftest import synthetic_rows

    for split, n, seed in (("train", 64, 0), ("validation", 16, 1), ("test", 16, 2)):
        pd.DataFrame(synthetic_rows(n, seed)).to_csv(tmp_path / f"{split}.csv", index=False)
    record = run(make_cfg([*_local(sentiment_dir, tmp_path, "csv"),
                           "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
                           "trainer.limit_test_batches=1"]))
    assert record["status"] == "ok" and "test/acc" in record["final"]


@pytest.mark.usefixtures("no_training")
def test_explicit_format_that_contradicts_the_extension_names_the_fix(make_cfg, sentiment_dir,
                                                                     tmp_path):
    base = [o for o in tiny_overrides(sentiment_dir) if o != "data.path=json"]
    with pytest.raises(SystemExit):
        run(make_cfg([*base, "data.path=csv"]))
    error = json.loads((tmp_path / "run" / "metrics.json").read_text())["error"]
    assert re.search(r"as csv \(data.path=csv\), but their extension says json.*Fix: set "
                     r"data.path=json, or data.path=null", error, re.S), error
    assert_one_paragraph(error)
