"""Check command-line overrides against the config tree before Hydra runs anything.

Hydra rejects a misspelt key with "Key 'max_epoch' is not in struct"; here the same mistake
names the closest valid key and the fix, in one paragraph, before a sweep starts.
"""

from __future__ import annotations

import re
from typing import Any

from ftlab.errors import FtlabError, choices_text, closest


def check_overrides(overrides: list[str], config_dir: str, config_name: str = "config",
                    own_dir: str | None = None) -> None:
    """Raise ``FtlabError`` if ``overrides`` do not compose with the config tree.

    ``own_dir``: ftlab's own conf/ (whose ``config.yaml`` may widen ``allow_targets``), when
    ``config_dir`` is another folder (``--config-dir`` with ``--config-name``).
    """
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import OverrideParseException

    if not overrides:
        return
    was = GlobalHydra.instance().is_initialized()
    if was:  # an app in this process (tests) holds Hydra; a preflight would reset it
        return
    try:
        parsed = _parse(overrides)
    except OverrideParseException as err:
        raise FtlabError(f"Cannot parse the overrides: {str(err).splitlines()[0]}.",
                         "write overrides as key=value (quote lists: 'data.text_columns=[a,b]'; "
                         "sweeps as key=a,b with -m).") from None
    try:
        with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            loader = GlobalHydra.instance().config_loader()
            groups = set(loader.list_groups(""))
            # extra config folders (hydra.searchpath) add options; compose sees them
            searchpath = [o.input_line for o in parsed if o.key_or_group == "hydra.searchpath"]
            plain: list[str] = []
            swept: dict[int, list[str]] = {}  # index in plain -> that override's other values
            for o in parsed:
                key = o.key_or_group
                try:
                    values = list(o.sweep_string_iterator()) if o.is_sweep_override() else None
                except Exception:  # interval/glob sweeps: left to Hydra and its sweeper
                    continue
                if key == "transform":  # conf/transform/ holds list entries, not an option
                    raise FtlabError(f"'{o.input_line}': transforms are a list under data, "
                                     "not a group option.",
                                     f"write data.transforms=[{o.value() or 'gender_swap'}] "
                                     "(several: data.transforms=[few_shot,gender_swap]).")
                if key in groups and not searchpath:
                    options = loader.get_group_options(key)
                    for value in values or [o.value()]:
                        # a list selects several options: callbacks=[ema,early_discard]
                        for one in value if isinstance(value, list) else [value]:
                            if one is not None and str(one) not in options:
                                raise _unknown_option(key, str(one), options)
                if key.startswith("hydra"):
                    continue
                if values is not None:
                    name = o.input_line.split("=", 1)[0]
                    if len(values) > 1 and (key in groups or key.endswith("_target_")):
                        swept[len(plain)] = [f"{name}={v}" for v in values[1:]]
                    plain.append(f"{name}={values[0]}" if values else "")
                else:
                    plain.append(o.input_line)
            first = [p for p in plain if p] + searchpath
            own = own_dir or config_dir
            _check_targets(_compose(config_name, first), overrides, own)
            # every job of a sweep over groups or targets: each value's _target_s, before any
            # job trains (one value at a time, the others at their first)
            for i, alternatives in swept.items():
                for alternative in alternatives:
                    job = [p for p in plain[:i] + [alternative] + plain[i + 1:] if p]
                    _check_targets(_compose(config_name, job + searchpath), overrides, own)
    finally:
        GlobalHydra.instance().clear()


def _compose(config_name: str, overrides: list[str]) -> Any:
    """``compose`` with its errors as ``FtlabError``s that name the fix."""
    from hydra import compose
    from hydra.errors import MissingConfigException

    try:
        return compose(config_name, overrides=overrides)
    except MissingConfigException as err:
        raise FtlabError(str(err).split("\nConfig search path")[0].replace("\n\t", " "),
                         "use one of the options listed (ftlab --help).") from None
    except Exception as err:
        raise _python_tag(err) or _explain(err, overrides, config_name) from None


def _python_tag(err: BaseException) -> FtlabError | None:
    """A YAML tag that would construct a Python object (``!!python/object/apply:...``): the
    YAML loader refuses it (nothing runs); say which file and what to do."""
    import yaml

    while err is not None and not isinstance(err, yaml.YAMLError):
        err = err.__cause__ or err.__context__
    if err is None:
        return None
    mark = getattr(err, "problem_mark", None)
    where = f"{mark.name}, line {mark.line + 1}" if mark else "a config file"
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    if "python/" in problem:
        return FtlabError(f"{where} uses a YAML tag that would construct a Python object "
                          f"({problem.split('tag:yaml.org,2002:')[-1].rstrip(chr(39))}); ftlab "
                          "reads configs as plain YAML, so it was refused and nothing ran.",
                          "remove the !!python tag; name building blocks with _target_ "
                          "(see conf/).")
    return FtlabError(f"{where} is not valid YAML: {problem}.",
                      "fix the YAML (indentation, quotes, colons).")


def _check_targets(cfg: Any, overrides: list[str], config_dir: str) -> None:
    """Every ``_target_`` of the composed config is on the allow-list (``ftlab.targets``)."""
    from omegaconf import OmegaConf

    from ftlab.targets import allowing, check_config, settings_from_you

    plain = OmegaConf.to_container(cfg, resolve=False)
    settings_from_you(plain, overrides, config_dir)
    with allowing(plain.get("allow_targets"), warn=False):
        check_config(plain, interpolated=False)  # ${...} targets: the job checks them resolved


def _parse(overrides: list[str]) -> list[Any]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides(overrides)


def _unknown_option(group: str, value: str, options: list[str]) -> FtlabError:
    return FtlabError(
        f"Unknown option '{value}' for config group '{group}'.{closest(value, options)} "
        f"Available options in '{group}': {choices_text(options)}.",
        f"use {group}=<one of those> (each is a file conf/{group}/<option>.yaml; "
        "`ftlab --help` lists every group); an option of your own: --config-dir DIR "
        f"with DIR/{group}/{value}.yaml.")


def _explain(err: Exception, overrides: list[str], config_name: str) -> FtlabError:
    """One paragraph for a composition error: the bad key, the closest valid one, the fix."""
    from hydra import compose
    from omegaconf import OmegaConf

    cause = err.__cause__
    full_key = getattr(cause, "full_key", None) or ""
    first = str(err).splitlines()[0] if str(err) else type(err).__name__
    append = re.search(r"To append to your default list use (\+\S+)", str(err))
    if not full_key and append:  # group@package where the defaults list has no such entry
        given = first.removeprefix("Could not override ").rstrip(".")
        return FtlabError(f"{given} is not in the config's defaults list (null there: e.g. a "
                          "stage's own peft, regularizer or data), so it cannot be replaced.",
                          f"add it with a leading +: {append.group(1)}")
    there = re.search(r"An item is already at '([^']+)'", str(err))
    if not full_key and there:  # +key=value for a key the config has
        given = next((o.lstrip("+") for o in overrides if o.startswith("+") and
                      o.lstrip("+").split("=", 1)[0] == there.group(1)), f"{there.group(1)}=...")
        return FtlabError(f"{there.group(1)} is already in the config, so a leading + cannot "
                          "add it.", f"set it without the +: {given}")
    if not full_key:
        return FtlabError(f"The overrides do not fit the config: {first}",
                          "check the keys and values (`ftlab --cfg job` prints the config).")
    parent, _, leaf = full_key.rpartition(".")
    # drop the bad key and any key under it (pipeline.stages.tsk.optim.lr for a bad 'tsk'),
    # so the node the valid keys come from is composed with the run's other choices
    rest = [o for o in overrides
            if not _under(o.lstrip("+~").split("=", 1)[0], full_key)]
    try:
        cfg = compose(config_name, overrides=rest)
    except Exception:
        cfg = compose(config_name)
    node = OmegaConf.select(cfg, parent) if parent else cfg
    valid = [str(k) for k in node.keys()] if hasattr(node, "keys") else []
    where = f"'{parent}'" if parent else "the top level"
    if ("not in struct" in str(cause) or "Could not override" in str(err)) and \
            parent == "model.config":
        return _model_config_key(leaf, node, valid)
    unlisted = ("not in struct" in str(cause) or "Could not override" in str(err)) and \
        _unlisted_stage_key(parent, leaf, overrides, config_name)
    if unlisted:
        return unlisted
    nested = ("not in struct" in str(cause) or "Could not override" in str(err)) and \
        _config_key(node, leaf)
    if nested:
        return FtlabError(f"Unknown key '{leaf}' in {where}: it is a setting of the method's "
                          f"own config ({nested}).",
                          f"set {full_key.rpartition('.')[0]}.config.{leaf}=... instead.")
    if "not in struct" in str(cause) or "Could not override" in str(err):
        return FtlabError(
            f"Unknown key '{leaf}' in {where}.{closest(leaf, valid)} Valid keys: "
            f"{choices_text(valid) or '(none)'}.",
            f"correct the spelling, or add a new key with +{full_key}=... if you really mean to.")
    return FtlabError(f"Invalid override for '{full_key}': {str(cause).splitlines()[0]}",
                      f"give {full_key} a value of the right type (see its YAML file).")


def _under(key: str, full_key: str) -> bool:
    return key == full_key or key.startswith(f"{full_key}.")


def _config_key(node: Any, leaf: str) -> str | None:
    """The class of ``node.config`` (a PEFT method's ``config: {_target_: peft.LoraConfig}``)
    where ``leaf`` is one of its settings (``peft.r=4`` meant ``peft.config.r=4``), else None."""
    import dataclasses

    from hydra.utils import get_class

    config = node.get("config") if hasattr(node, "get") else None
    target = config.get("_target_") if hasattr(config, "get") else None
    if not isinstance(target, str):
        return None
    if leaf in config:
        return target
    if not target.startswith("peft."):  # import only the library's classes, not a config's
        return None
    try:
        cls = get_class(target)
    except Exception:  # noqa: BLE001 - not importable: no hint
        return None
    names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    return target if leaf in names else None


def _unlisted_stage_key(parent: str, leaf: str, overrides: list[str],
                        config_name: str) -> FtlabError | None:
    """``stage.<key>=...`` (or ``stage.optim.<key>``) for a key the stage schema has but the
    chosen stage's YAML does not list (a new stage YAML with only ``name`` and ``task``): the
    command line can only change keys the YAML lists."""
    from dataclasses import fields

    from hydra import compose

    from ftlab.optim import OptimSpec
    from ftlab.pipeline import StageSpec

    schema = {"stage": StageSpec, "stage.optim": OptimSpec}.get(parent)
    if schema is None or leaf not in {f.name for f in fields(schema)}:
        return None
    keys = [o.lstrip("+~").split("=", 1)[0] for o in overrides]
    given = next((k for k in keys if k.startswith(f"{parent}.{leaf}")), f"{parent}.{leaf}")
    choices = [o for o, k in zip(overrides, keys, strict=True)  # group options, search path
               if "=" in o and ("." not in k or k.startswith("hydra."))]
    try:
        option = compose(config_name, overrides=choices,
                         return_hydra_config=True).hydra.runtime.choices.get("stage")
    except Exception:  # noqa: BLE001 - only for naming the file
        option = None
    yaml = f"stage/{option}.yaml (stage={option})" if option else "the stage's YAML"
    return FtlabError(
        f"{given} is a stage setting, but {yaml} does not list {parent}.{leaf}, so it "
        "cannot be changed from the command line.",
        f"list it in {yaml} (a new stage YAML copies the keys of conf/stage/classify.yaml and "
        f"changes its task), or add it for this run with +{given}=...")


def _model_config_key(leaf: str, node: Any, valid: list[str]) -> FtlabError:
    """``model.config.<leaf>=...`` for a key the model's YAML does not set: model.config takes
    any key of the model's transformers config, so say whether ``leaf`` is one (for the
    ``model_type`` the YAML builds) and how to add it."""
    model_type = node.get("model_type") if hasattr(node, "get") else None
    keys: list[str] = []
    if model_type:
        try:
            from transformers import AutoConfig

            keys = sorted(AutoConfig.for_model(str(model_type)).to_dict())
        except Exception:  # noqa: BLE001 - an unknown model_type: no key list to offer
            keys = []
    add = f"+model.config.{leaf}=..."
    sets = f"sets {choices_text(valid)}" if valid else "is empty"
    if keys and leaf not in keys:
        return FtlabError(
            f"'{leaf}' is not a key of the {model_type} config.{closest(leaf, keys)} (model.config "
            f"in this model's YAML {sets}.)", f"use a key of the {model_type} config (e.g. "
            f"{', '.join(k for k in keys if k in valid)[:120] or keys[0]}), added with "
            "+model.config.<key>=... when the YAML does not set it.")
    return FtlabError(
        f"model.config.{leaf} is not set in this model's YAML (its model.config {sets}), so "
        "it cannot be changed, only added.",
        f"add it with {add} (model.config takes any key of the model's transformers config"
        f"{f' ({model_type})' if model_type else ''}).")
