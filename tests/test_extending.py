"""A contributor's own method, regulariser or task (README, "Extending ftlab"): what goes wrong
while writing one is named with the fix, before anything trains.

Each case writes a small package into a temporary folder on ``sys.path`` and points a config at
it with ``allow_targets``, as a user's own code outside ftlab would be.
"""

from __future__ import annotations

import json
import re
import sys
import textwrap
from pathlib import Path

import lightning as L
import pytest

from ftlab.cli import CONFIG_DIR
from ftlab.config import load_target
from ftlab.errors import FtlabError
from ftlab.run import run
from ftlab.targets import allowing
from tests.conftest import tiny_overrides

#: a PEFT method, a regulariser and a task that each work (norm-only tuning, an L2 pull back to
#: the start, classification); the cases below take one member away
GOOD = '''
import torch
from ftlab.peft.base import RequiresGradState
from ftlab.tasks.base import TaskOutput
from ftlab.tasks.classify import Classify


class NormOnly(RequiresGradState):
    name = "norm_only"

    def apply(self, model):
        model.requires_grad_(False)
        for n, p in model.named_parameters():
            p.requires_grad_("LayerNorm" in n or "classifier" in n)
        return model


class L2Start:
    name = "l2start"

    def apply(self, model):
        return model

    def training_loss(self, model, batch, task):
        return task.forward(model, batch)


class MyClassify(Classify):
    pass
'''


@pytest.fixture
def package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest):
    """``write(source, **modules)``: a fresh package (unique name) holding ``modules``."""
    name = "extpkg_" + re.sub(r"\W", "_", request.node.name)[-40:]

    def write(**modules: str) -> str:
        root = tmp_path / "user" / name
        root.mkdir(parents=True)
        (root / "__init__.py").write_text("")
        for module, source in modules.items():
            (root / f"{module}.py").write_text(textwrap.dedent(source))
        monkeypatch.syspath_prepend(str(tmp_path / "user"))
        return name

    yield write
    for module in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[module]


def load(target: str, allow: str) -> FtlabError:
    with allowing([allow], warn=False), pytest.raises(FtlabError) as err:
        load_target(target, "peft")
    return err.value


def test_a_module_that_raises_while_importing_is_named_with_its_error_and_line(package):
    pkg = package(m="from ftlab.peft.layers import freez\n\nclass A:\n    pass\n")
    err = load(f"{pkg}.m.A", pkg)
    assert "cannot import name 'freez'" in err.problem, err
    assert re.search(rf"{pkg}/m\.py, line 1", err.problem), err
    assert "fix that error" in err.fix


def test_a_module_that_imports_a_missing_package_names_that_package(package):
    pkg = package(m="import notinstalled_xyz\n")
    err = load(f"{pkg}.m.A", pkg)
    assert "notinstalled_xyz" in err.problem and "install 'notinstalled_xyz'" in err.fix, err


def test_a_package_not_on_the_path_names_pythonpath():
    err = load("nosuchpkg_abc.m.A", "nosuchpkg_abc")
    assert "no module 'nosuchpkg_abc'" in err.problem and "PYTHONPATH" in err.fix, err


def test_a_misspelt_class_suggests_the_right_one():
    err = load("ftlab.peft.bitfit.BitFitt", "ftlab")
    assert "has no 'BitFitt'" in err.problem and "Did you mean 'BitFit'" in err.problem, err


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args, **kwargs):
        raise AssertionError("training started before the bad class was reported")

    monkeypatch.setattr(L.Trainer, "fit", forbidden)


@pytest.mark.parametrize(("node", "cls", "cut", "missing", "hint"), [
    ("peft", "NormOnly", ("class NormOnly(RequiresGradState):", "class NormOnly:"),
     "load_trainable_state, trainable_state", "RequiresGradState"),
    ("regularizer", "L2Start", ('    name = "l2start"\n', ""), "name", "class attribute"),
    ("stage.task", "MyClassify", ("class MyClassify(Classify):\n    pass",
                                  "class MyClassify:\n    def __init__(self, **settings):\n"
                                  "        pass"), "baseline, bind", "TaskDefaults"),
])
def test_a_class_missing_what_its_protocol_asks_is_refused_before_training(
        node, cls, cut, missing, hint, package, make_cfg, sentiment_dir, tmp_path, no_training):
    pkg = package(good=GOOD, bad=GOOD.replace(*cut))
    overrides = [*tiny_overrides(sentiment_dir), f"allow_targets=[{pkg}.]"]
    record = tmp_path / "run" / "metrics.json"
    for module in ("good", "bad"):  # the whole class reaches training; the cut one stops first
        with pytest.raises(SystemExit):
            run(make_cfg([*overrides, f"{node}._target_={pkg}.{module}.{cls}"]))
        error = json.loads(record.read_text())["error"]
        if module == "good":
            assert "training started" in error, error
    assert re.search(rf"{pkg}\.bad\.{cls} is not a .*: it lacks {missing}", error), error
    assert hint in error.split("Fix:")[1], error


def test_keys_for_a_class_that_takes_none_say_so(package):
    from ftlab.config import check_binds

    pkg = package(m="class Plain:\n    pass\n")
    with allowing([pkg], warn=False), pytest.raises(FtlabError) as err:
        check_binds({"_target_": f"{pkg}.m.Plain", "alpha": 1}, "regularizer")
    assert "['alpha']" in err.value.problem and "takes no settings" in err.value.fix, err.value


def test_a_stage_key_the_stage_yaml_does_not_list_names_that_yaml(tmp_path, capsys):
    """A new stage YAML with only ``name`` and ``task`` composes and trains (the stage schema
    fills in the rest), but ``stage.batch_size=8`` cannot reach a key it does not list: say so,
    naming the file, instead of "Unknown key 'batch_size'... Valid keys: name, task"."""
    from ftlab.cli import preflight

    (tmp_path / "stage").mkdir()
    (tmp_path / "stage" / "mine.yaml").write_text(
        "name: mine\ntask:\n  _target_: ftlab.tasks.classify.Classify\n")
    preflight(["--config-dir", str(tmp_path), "stage=mine", "+stage.batch_size=8"])
    for key in ("batch_size", "optim.lr"):
        with pytest.raises(SystemExit) as exit_:
            preflight(["--config-dir", str(tmp_path), "stage=mine", f"stage.{key}=8"])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert f"stage.{key} is a stage setting, but stage/mine.yaml (stage=mine) does not " \
               f"list stage.{key.split('.')[0]}" in err, err
        assert "copies the keys of conf/stage/classify.yaml" in err, err
        assert f"+stage.{key}=..." in err, err
    with pytest.raises(SystemExit):  # a real typo still gets the closest key
        preflight(["--config-dir", str(tmp_path), "stage=mine", "stage.batch_sise=8"])
    assert "Unknown key 'batch_sise'" in capsys.readouterr().err


@pytest.mark.parametrize("option", sorted(p.stem for p in Path(CONFIG_DIR, "stage").glob("*.yaml")))
def test_every_stage_yaml_lists_the_stage_keys_the_command_line_sets(option):
    """``stage.<key>=...`` reaches only keys the chosen stage's YAML lists: every
    conf/stage/*.yaml lists those of classify.yaml (its own task aside)."""
    import yaml

    common = set(yaml.safe_load(Path(CONFIG_DIR, "stage", "classify.yaml").read_text()))
    own = set(yaml.safe_load(Path(CONFIG_DIR, "stage", f"{option}.yaml").read_text()))
    missing = sorted(common - own)
    assert not missing, (f"conf/stage/{option}.yaml does not list {missing}: copy them from "
                         "conf/stage/classify.yaml")


def test_a_run_of_your_own_method_loads_with_allow_targets_and_export_says_what_is_missing(
        package, make_cfg, sentiment_dir, tmp_path, capsys):
    """ftlab.load refuses a run whose config names your code (a run folder is a config), with
    the fix that works there (not the training command line's allow_targets=...); export of a
    method without merged() says that is what it lacks."""
    import ftlab
    from ftlab.export import main as export_main

    pkg = package(good=GOOD)
    record = run(make_cfg([*tiny_overrides(sentiment_dir), f"allow_targets=[{pkg}.]",
                           f"peft._target_={pkg}.good.NormOnly", "trainer.max_steps=2"]))
    assert record["status"] == "ok", record
    run_dir = tmp_path / "run"
    with pytest.raises(FtlabError, match="is not allowed") as err:
        ftlab.load(run_dir)
    assert f"ftlab.load(run_dir, allow_targets=['{pkg}.good.'])" in err.value.fix, err.value
    assert "--allow-targets" in err.value.fix, err.value
    predictor = ftlab.load(run_dir, allow_targets=[f"{pkg}."])
    assert predictor.predict(["a fine film"])[0]["label"] in ("neg", "pos")
    with allowing([pkg], warn=False):  # in a job (a distillation teacher): the job's setting
        ftlab.load(run_dir)
    with pytest.raises(SystemExit) as exit_:
        export_main([str(run_dir), "--output", str(tmp_path / "hf"), "--allow-targets", pkg])
    message = str(exit_.value.code) + capsys.readouterr().err
    assert "has no merged()" in message and "def merged(self, model)" in message, message


def test_a_regulariser_returning_a_bare_loss_is_told_to_return_a_task_output(
        package, make_cfg, sentiment_dir, tmp_path):
    pkg = package(bad=GOOD.replace("        return task.forward(model, batch)",
                                   "        return task.forward(model, batch).loss"))
    with pytest.raises(SystemExit):
        run(make_cfg([*tiny_overrides(sentiment_dir), f"allow_targets=[{pkg}.]",
                      f"regularizer._target_={pkg}.bad.L2Start", "trainer.max_steps=2"]))
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert "training_loss returned a Tensor, not a TaskOutput" in record["error"], record
    assert "TaskOutput(out.loss + term" in record["error"].split("Fix:")[1]
    assert not (tmp_path / "run" / "error.log").exists()  # a user error, not a crash


#: a contributor's class that has every member its Protocol names but breaks its contract:
#: a wrong signature, or the wrong thing returned; each is named before anything trains
BROKEN = '''
from ftlab.peft.base import RequiresGradState


class ApplyNoModel(RequiresGradState):
    name = "apply_no_model"

    def apply(self):
        return None


class ApplyNoReturn(RequiresGradState):
    name = "apply_no_return"

    def apply(self, model):
        model.requires_grad_(True)


class StateList(RequiresGradState):
    name = "state_list"

    def apply(self, model):
        return model

    def trainable_state(self, model):
        return [p for p in model.parameters() if p.requires_grad]


class LossNoTask:
    name = "loss_no_task"

    def apply(self, model):
        return model

    def training_loss(self, model, batch):
        return model(**batch)


class RegNoReturn:
    name = "reg_no_return"

    def apply(self, model):
        model.train()

    def training_loss(self, model, batch, task):
        return task.forward(model, batch)


class CallTwoArgs:
    def __call__(self, train, seed):
        return train
'''


@pytest.mark.parametrize(("override", "says", "fix"), [
    ("peft._target_={pkg}.m.ApplyNoModel", "ApplyNoModel.apply() cannot be called as "
     "PeftMethod.apply is: apply(model)", "def apply(self, model)"),
    ("regularizer._target_={pkg}.m.LossNoTask", "LossNoTask.training_loss(model, batch) cannot "
     "be called as Regularizer.training_loss is", "def training_loss(self, model, batch, task)"),
    ("data.transforms=[{{_target_: {pkg}.m.CallTwoArgs}}]", "CallTwoArgs.__call__(train, seed) "
     "cannot be called as Transform.__call__ is: __call__(rows)", "def __call__(self, rows)"),
    ("peft._target_={pkg}.m.ApplyNoReturn", "ApplyNoReturn.apply returned None, not the model",
     "`return model`"),
    ("regularizer._target_={pkg}.m.RegNoReturn", "RegNoReturn.apply returned None, not the "
     "model", "`return model`"),
    ("peft._target_={pkg}.m.StateList", "StateList.trainable_state returned list, not a dict",
     "RequiresGradState"),
])
def test_a_class_breaking_its_contract_is_named_with_the_fix_before_training(
        override, says, fix, package, make_cfg, sentiment_dir, tmp_path, no_training):
    """Before: a TypeError or AttributeError from deep inside the stage (error.log), after
    validation had passed; a wrong trainable_state only once training had finished."""
    pkg = package(m=BROKEN)
    with pytest.raises(SystemExit):
        run(make_cfg([*tiny_overrides(sentiment_dir), f"allow_targets=[{pkg}.]",
                      override.format(pkg=pkg)]))
    error = json.loads((tmp_path / "run" / "metrics.json").read_text())["error"]
    assert says in error and fix in error.split("Fix:")[1], error
    assert not (tmp_path / "run" / "error.log").exists()  # a user error, not a crash


def test_a_regulariser_returning_a_detached_loss_is_told_why_it_cannot_train(
        package, make_cfg, sentiment_dir, tmp_path):
    pkg = package(bad=GOOD.replace("        return task.forward(model, batch)",
                                   "        out = task.forward(model, batch)\n"
                                   "        return TaskOutput(out.loss.detach(), out.logits)"))
    with pytest.raises(SystemExit):
        run(make_cfg([*tiny_overrides(sentiment_dir), f"allow_targets=[{pkg}.]",
                      f"regularizer._target_={pkg}.bad.L2Start", "trainer.max_steps=2"]))
    error = json.loads((tmp_path / "run" / "metrics.json").read_text())["error"]
    assert "the loss training_loss returned has no gradient" in error, error
    assert not (tmp_path / "run" / "error.log").exists()


def test_a_task_returning_a_detached_loss_is_named_not_the_builtin_regulariser(
        package, make_cfg, sentiment_dir, tmp_path):
    """With ftlab's regulariser (none, r3f ...) the loss is the task's: the message blamed
    ``regularizer=none`` and told the user to fix a training_loss they never wrote."""
    pkg = package(t="from ftlab.tasks.base import TaskOutput\n"
                    "from ftlab.tasks.classify import Classify\n\n\n"
                    "class Detached(Classify):\n"
                    "    def forward(self, model, batch):\n"
                    "        out = super().forward(model, batch)\n"
                    "        return TaskOutput(out.loss.detach(), out.logits, out.extras)\n")
    with pytest.raises(SystemExit):
        run(make_cfg([*tiny_overrides(sentiment_dir), f"allow_targets=[{pkg}.]",
                      f"stage.task._target_={pkg}.t.Detached", "trainer.max_steps=2"]))
    error = json.loads((tmp_path / "run" / "metrics.json").read_text())["error"]
    assert f"The loss {pkg}.t.Detached.forward returned has no gradient" in error, error
    assert "regularizer=" not in error and "training_loss" not in error, error
    assert not (tmp_path / "run" / "error.log").exists()


def test_your_package_in_the_current_folder_is_named_with_pythonpath(
        package, tmp_path, monkeypatch, caplog):
    """The ``ftlab`` command does not import from the folder it runs in (``python -m`` does):
    the fix said "run from the folder that holds it", which is where the user already was."""
    (tmp_path / "here" / "herepkg").mkdir(parents=True)
    (tmp_path / "here" / "herepkg" / "__init__.py").write_text("")
    (tmp_path / "here" / "nsdir").mkdir()  # a namespace package: modules, no __init__.py
    (tmp_path / "here" / "nsdir" / "m.py").write_text("class A:\n    pass\n")
    monkeypatch.chdir(tmp_path / "here")
    for pkg in ("herepkg", "nsdir"):
        err = load(f"{pkg}.m.A", pkg)
        assert f"'{pkg}' is in the current folder" in err.problem, err
        assert f"PYTHONPATH={tmp_path / 'here'} ftlab" in err.fix, err
    assert not [r for r in caplog.records if r.levelname == "ERROR"]  # Hydra's own line


def test_a_misspelt_module_of_your_package_suggests_the_right_one(package):
    pkg = package(norm_only="class NormOnly:\n    pass\n")
    err = load(f"{pkg}.norm_onyl.NormOnly", pkg)
    assert f"module {pkg} has no 'norm_onyl'. Did you mean 'norm_only'?" in err.problem, err


def test_every_refused_target_of_your_package_is_named_in_one_message():
    """Your method and regulariser outside allow_targets: one message with one fix for both,
    not a run per module (each naming the next one)."""
    from ftlab.targets import check_config

    cfg = {"peft": {"_target_": "mypkg.norm_only.NormOnly"},
           "regularizer": {"_target_": "mypkg.l2sp.L2SP"}}
    with pytest.raises(FtlabError) as err:
        check_config(cfg)
    assert "peft._target_ 'mypkg.norm_only.NormOnly'" in err.value.problem, err.value
    assert "regularizer._target_ 'mypkg.l2sp.L2SP'" in err.value.problem, err.value
    assert "allow_targets=[mypkg.]" in err.value.fix, err.value
    with allowing(["mypkg."], warn=False):
        check_config(cfg)


@pytest.mark.parametrize("how", ["cli", "load"])
def test_refused_targets_of_two_packages_get_one_setting_that_allows_both(how):
    """The fix listed one ``allow_targets=[a.]`` per package: given as said, the second
    override replaced the first (Hydra keeps the last), and the run was refused again."""
    from ftlab.inference import LOAD_HOW
    from ftlab.targets import check_config

    cfg = {"peft": {"_target_": "mypkg.norm_only.NormOnly"},
           "regularizer": {"_target_": "otherpkg.l2sp.L2SP"}}
    with allowing([], how=LOAD_HOW if how == "load" else None), \
            pytest.raises(FtlabError) as err:
        check_config(cfg)
    said = re.findall(r"allow_targets=\[([^]]*)\]", err.value.fix)
    assert len(said) == 1, err.value.fix  # one setting ...
    with allowing([e.strip(" '") for e in said[0].split(",")], warn=False):
        check_config(cfg)  # ... that allows both
    assert "use _target_s from conf/" in err.value.fix, err.value
    if how == "load":
        assert "--allow-targets mypkg. --allow-targets otherpkg." in err.value.fix, err.value


def test_an_option_of_your_own_without_its_config_folder_names_config_dir(capsys):
    from ftlab.cli import preflight

    with pytest.raises(SystemExit) as exit_:
        preflight(["peft=norm_only"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Unknown option 'norm_only' for config group 'peft'" in err, err
    assert "--config-dir DIR with DIR/peft/norm_only.yaml" in err, err


@pytest.mark.parametrize("form", [["--config-dir", "{d}"], ["--config-dir={d}"], ["-cd", "{d}"],
                                  ["-cd={d}"]])
def test_your_config_folder_is_found_in_every_form_hydra_takes(form, tmp_path, capsys):
    """``-cd=DIR`` is a form Hydra's parser takes (as ``--config-dir=DIR``): the pre-check
    did not see the folder in it (refusing ``peft=norm_only`` as an unknown option), and the
    flag stayed after the overrides, where Hydra stops with "unrecognized arguments"."""
    from hydra._internal.utils import get_args_parser

    from ftlab.cli import config_flags_first, preflight

    (tmp_path / "peft").mkdir()
    (tmp_path / "peft" / "norm_only.yaml").write_text(
        (Path(CONFIG_DIR) / "peft" / "bitfit.yaml").read_text())
    argv = ["peft=norm_only", *(a.format(d=tmp_path) for a in form), "seed=3"]
    preflight(argv)  # no SystemExit: the option is found in the folder
    assert "Unknown option" not in capsys.readouterr().err
    parsed = get_args_parser().parse_args(config_flags_first(argv))
    assert (parsed.config_dir, parsed.overrides) == (str(tmp_path), ["peft=norm_only", "seed=3"])


def test_a_refused_target_survives_a_process_boundary():
    """``ftlab.load`` in a process pool (or a launcher's job) sends its error back pickled:
    ``Refused`` (made with its target, where and module) could not be unpickled (a TypeError
    in place of the message), and an ``FtlabError`` came back with its fix inside its problem."""
    import pickle

    from ftlab.targets import check_config

    with pytest.raises(FtlabError) as err:
        check_config({"peft": {"_target_": "mypkg.norm_only.NormOnly"}})
    back = pickle.loads(pickle.dumps(err.value))
    assert (type(back), str(back), back.problem, back.fix, back.module) == (
        type(err.value), str(err.value), err.value.problem, err.value.fix, "mypkg.norm_only")
    plain = pickle.loads(pickle.dumps(FtlabError("a problem", "the fix")))
    assert (plain.problem, plain.fix) == ("a problem", "the fix")
