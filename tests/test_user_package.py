"""A researcher's own PEFT method, regulariser and data transform, in a package and a config
folder outside ftlab, run through the command line as the README's "From outside ftlab" says
(``--config-dir``, ``allow_targets``, ``PYTHONPATH``): each takes effect, in a sweep too, and
``ftlab-predict``/``ftlab-export`` use the run."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import ROOT, tiny_overrides

PACKAGE = {
    "norm_only.py": '''
        """LayerNorm-only tuning: the LayerNorm weights and biases and the head train."""
        from torch import nn

        from ftlab.model.arch import backbone_modules
        from ftlab.peft.base import RequiresGradState
        from ftlab.peft.layers import freeze, head_parameters, top_layer_ops, unfreeze


        class NormOnly(RequiresGradState):
            name = "norm_only"

            def __init__(self, drop_top: int = 0, reinit_top: int = 0) -> None:
                self.drop_top, self.reinit_top = drop_top, reinit_top

            def apply(self, model: nn.Module) -> nn.Module:
                fresh = top_layer_ops(model, self.drop_top, self.reinit_top)
                freeze(model)
                unfreeze([p for m in backbone_modules(model) for mod in m.modules()
                          if isinstance(mod, nn.LayerNorm) for p in mod.parameters()])
                unfreeze(head_parameters(model))
                unfreeze(fresh)
                return model

            def merged(self, model: nn.Module) -> nn.Module:
                return model
    ''',
    "l2sp.py": '''
        """L2-SP (Li et al. 2018): alpha/2 * ||w - w0||^2 towards the starting weights."""
        from ftlab.tasks.base import TaskOutput


        class L2SP:
            name = "l2sp"

            def __init__(self, alpha: float = 0.01) -> None:
                self.alpha, self.start = alpha, {}

            def apply(self, model):
                self.start = {n: p.detach().clone() for n, p in model.named_parameters()
                              if p.requires_grad and "classifier" not in n}
                return model

            def training_loss(self, model, batch, task):
                out = task.forward(model, batch)
                params = dict(model.named_parameters())
                term = 0.5 * self.alpha * sum((((params[n] - w) ** 2).sum()
                                               for n, w in self.start.items()),
                                              out.loss.new_zeros(()))
                return TaskOutput(out.loss + term, out.logits,
                                  {**out.extras, "l2sp_penalty": term.detach()})
    ''',
    "shout.py": '''
        """Adds an upper-cased copy of every training row."""
        from ftlab.data.transforms.base import Applied, Rows, rowwise


        class Shout:
            name = "shout"

            def __init__(self, mode: str = "add") -> None:
                self.mode = mode

            def __call__(self, rows: Rows) -> Applied:
                return rowwise(rows.train, lambda row: {c: row[c].upper()
                                                        for c in rows.text_columns}, self.mode)
    ''',
}
CONF = {"peft/norm_only.yaml": "_target_: {pkg}.norm_only.NormOnly\nlr: 1.0e-2\n",
        "regularizer/l2sp.yaml": "_target_: {pkg}.l2sp.L2SP\nalpha: 0.01\n",
        "transform/shout.yaml": "_target_: {pkg}.shout.Shout\nmode: add\n"}


@pytest.fixture
def user(tmp_path: Path) -> tuple[Path, Path, dict[str, str]]:
    """(the user's folder, their config folder, the environment their shell has): a package
    ``userpkg`` beside ``myconf/``, found through PYTHONPATH, not installed."""
    pkg = tmp_path / "user" / "userpkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    for name, source in PACKAGE.items():
        (pkg / name).write_text(textwrap.dedent(source))
    conf = tmp_path / "user" / "myconf"
    for name, text in CONF.items():
        (conf / name).parent.mkdir(parents=True, exist_ok=True)
        (conf / name).write_text(text.format(pkg="userpkg"))
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(tmp_path / "user"), str(ROOT)]),
                        "FTLAB_ROOT": str(tmp_path / "user"), "WANDB_MODE": "offline"}
    return tmp_path / "user", conf, env


def ftlab(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ftlab", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def csv_log(job: Path) -> list[dict[str, str]]:
    (log,) = job.glob("classify/csv/*/metrics.csv")
    with log.open() as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_your_method_regulariser_and_transform_from_your_own_package_and_config_folder(
        user, sentiment_dir, tmp_path):
    folder, conf, env = user
    overrides = [o for o in tiny_overrides(sentiment_dir) if not o.startswith("logger=")]
    # the flag among the overrides, as a user adds it to a command they had
    proc = ftlab(["-m", *overrides, "peft=norm_only", "regularizer=l2sp", "--config-dir",
                  str(conf), "regularizer.alpha=0,100", "data.transforms=[shout]",
                  "allow_targets=[userpkg.]", "logger=csv", "trainer.log_every_n_steps=1",
                  "trainer.max_steps=4"], folder, env)
    assert proc.returncode in (0, 3), proc.stderr[-3000:]  # 3: the tiny run stays at chance
    jobs = {next(o for o in json.loads(m.read_text())["overrides"] if "alpha" in o): m.parent
            for m in (folder / "outputs" / "multirun").glob("*/*/metrics.json")}
    assert set(jobs) == {"regularizer.alpha=0", "regularizer.alpha=100"}, jobs
    drift = {}
    for alpha, job in jobs.items():
        stage = json.loads((job / "metrics.json").read_text())["stages"]["classify"]
        state = load_file(job / "classify" / "trainable.safetensors")
        # the method: only LayerNorms and the head train, and the artefact holds just those
        assert state and all("LayerNorm" in n or "classifier" in n for n in state), list(state)
        assert stage["params_trainable"] == sum(t.numel() for t in state.values()) < 1000
        # the transform: an upper-cased copy of every training row (256 synthetic rows)
        (record,) = stage["data_transforms"]
        assert record["transform"] == "shout" and record["added"] == 256, record
        # the regulariser: its term reaches the log, and pulls the weights back to the start
        penalties = [float(r["train/l2sp_penalty"]) for r in csv_log(job)
                     if r.get("train/l2sp_penalty")]
        assert len(penalties) == 4 and penalties[0] == 0.0, penalties
        drift[alpha] = max((state[n] - (1.0 if n.endswith("weight") else 0.0)).abs().max()
                           for n in state if "LayerNorm" in n).item()
    assert drift["regularizer.alpha=100"] < drift["regularizer.alpha=0"] / 2, drift

    from ftlab.export import main as export_main
    from ftlab.predict_cli import main as predict_main

    job = jobs["regularizer.alpha=0"]
    (tmp_path / "new.csv").write_text("text\na fine film\nawful and boring\n")
    sys.path.insert(0, str(folder))
    try:
        with pytest.raises(SystemExit) as refused:  # not allowed: one message, one fix
            predict_main([str(job), "--input", str(tmp_path / "new.csv"),
                          "--output", str(tmp_path / "p.jsonl")])
        said = str(refused.value.code)
        assert "'userpkg.norm_only.NormOnly'" in said and "'userpkg.l2sp.L2SP'" in said, said
        assert "--allow-targets userpkg. for" in said, said
        predict_main([str(job), "--input", str(tmp_path / "new.csv"), "--output",
                      str(tmp_path / "p.jsonl"), "--allow-targets", "userpkg."])
        export_main([str(job), "--output", str(tmp_path / "hf"), "--allow-targets", "userpkg."])
    finally:
        sys.path.remove(str(folder))
        for name in [m for m in sys.modules if m.split(".")[0] == "userpkg"]:
            del sys.modules[name]
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and {r["label"] for r in rows} <= {"neg", "pos"}, rows
    assert (tmp_path / "hf" / "model.safetensors").is_file()


def test_your_method_in_one_stage_of_a_pipeline(user, sentiment_dir):
    folder, conf, env = user
    proc = ftlab(["--config-dir", str(conf), *tiny_overrides(sentiment_dir), "pipeline=tiny",
                  "+peft@pipeline.stages.task.peft=norm_only", "allow_targets=[userpkg.]",
                  "trainer.max_steps=2"], folder, env)
    assert proc.returncode in (0, 3), proc.stderr[-3000:]
    (record,) = (folder / "outputs" / "runs").glob("*/metrics.json")
    stages = json.loads(record.read_text())["stages"]
    assert stages["tapt"]["params_trainable"] == stages["tapt"]["params_total"]  # peft=full
    assert stages["task"]["params_trainable"] < 1000, stages["task"]  # norm_only


def test_without_allow_targets_every_module_of_your_package_is_named_at_once(user):
    folder, conf, env = user
    proc = ftlab(["--config-dir", str(conf), "model=tiny_bert", "peft=norm_only",
                  "regularizer=l2sp"], folder, env)
    assert proc.returncode == 2, proc.stderr
    assert "'userpkg.norm_only.NormOnly'" in proc.stderr, proc.stderr
    assert "'userpkg.l2sp.L2SP'" in proc.stderr, proc.stderr
    assert "allow_targets=[userpkg.]" in proc.stderr, proc.stderr


@pytest.mark.slow
def test_the_contract_tests_run_on_your_config_folder(user):
    """FTLAB_CONTRACT_CONF adds your folder's YAMLs to the contract tests' globs (no copy into
    a checkout): your method on every tiny family, your regulariser, your transform."""
    folder, conf, env = user
    (conf / "regularizer" / "l2sp.yaml").write_text(  # the tiny random model learns at 1e-4
        "_target_: userpkg.l2sp.L2SP\nalpha: 1.0e-4\n")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "",
         "tests/test_peft_contract.py", "tests/test_regularizer_contract.py",
         "tests/test_transforms.py", "-k", "norm_only or l2sp or shout"],
        cwd=ROOT, env=env | {"FTLAB_CONTRACT_CONF": str(conf)}, capture_output=True, text=True,
        timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    ran = [line for line in proc.stdout.splitlines() if " passed" in line][-1]
    families = len(list((ROOT / "conf" / "model").glob("tiny_*.yaml")))
    assert int(ran.split(" passed")[0].split()[-1]) >= families + 5, ran
