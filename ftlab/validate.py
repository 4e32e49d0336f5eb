"""Check a whole run before any stage trains: a bad last stage costs seconds, not hours.

``validate(cfg, stages)`` binds every schema, checks every ``_target_`` node against its
constructor, that the model and tokenizer paths exist, and loads and checks every stage's data
(files, columns, labels, enough rows for a batch). The data loads are cached by ``datasets``,
so the stages later read them again from the Arrow cache at little cost.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ftlab.config import bind_schema, check_binds, instantiate_checked
from ftlab.data.sources import RawData, load_raw
from ftlab.data.spec import DataSpec
from ftlab.errors import FtlabError
from ftlab.model.backbone import ModelSpec, load_tokenizer
from ftlab.pipeline import StageSpec, stage_data, stage_node, stage_seed, stage_trainer
from ftlab.resolve import resolve

log = logging.getLogger(__name__)


def validate(cfg: DictConfig, stages: list[StageSpec]) -> None:
    """Raise ``FtlabError`` for the first problem found in any stage; train nothing."""
    if not isinstance(cfg.get("seed"), int) or isinstance(cfg.get("seed"), bool):
        raise FtlabError(f"seed must be an integer, got {cfg.get('seed')!r}.",
                         "e.g. seed=1 (sweep: -m seed=1,2,3).")
    model_spec = bind_schema(ModelSpec, cfg.model, "model")
    check_model_path(model_spec)
    for key, node in (cfg.get("callbacks") or {}).items():
        if node is not None:
            check_binds(node, f"callbacks.{key}", partial=True)
    tokenizer = load_tokenizer(model_spec)
    loaded: dict[str, RawData] = {}
    for stage in stages:
        where = f"stage '{stage.name}'"
        check_binds(stage_trainer(cfg, stage), f"{where} trainer", partial=True)  # stage typos too
        check_binds(stage.task, f"{where}.task")
        peft_node = stage_node(stage, cfg, "peft")
        reg_node = stage_node(stage, cfg, "regularizer")
        check_binds(peft_node, f"{where} peft")
        check_binds(reg_node, f"{where} regularizer")
        spec = bind_schema(DataSpec, stage_data(stage, cfg), f"{where} data")
        seed = stage_seed(stage, cfg)
        ident = f"{spec!r}/{seed}"
        if ident not in loaded:
            loaded[ident] = load_raw(spec, seed)
        raw = loaded[ident]
        rows = len(raw.splits["train"])
        if rows < stage.batch_size:
            raise FtlabError(
                f"{where}: the training split has {rows} rows, fewer than one batch "
                f"(batch_size={stage.batch_size}).",
                f"lower the stage's batch_size to at most {rows}, or add data.")
        task = instantiate_checked(stage.task, f"{where}.task")
        if stage.aux_mlm_weight > 0:
            from ftlab.tasks.mlm import AuxMLM

            task = AuxMLM(task, stage.aux_mlm_weight)
        task.bind(raw, tokenizer, spec.text_columns)
        check_peft_fits(task, model_spec, peft_node, where)
    log.info("Checked %d stage(s): config and data are fine.", len(stages))


def _looks_local(name: str) -> bool:
    """A path rather than a hub name (``org/model``): absolute, relative, home or deeper."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or Path(name).exists()


def check_model_path(spec: ModelSpec) -> None:
    """A local model or tokenizer folder must exist and hold a ``config.json`` (models)."""
    for what, name in (("model.name_or_path", spec.name_or_path),
                       ("model.tokenizer", spec.tokenizer)):
        if not name or "://" in name or not _looks_local(name):
            continue
        path = Path(name).expanduser()
        if not path.exists():
            raise FtlabError(f"{what} points at '{name}', which does not exist.",
                             "fix the path (relative paths are from the directory you ran "
                             "ftlab in), or use a hub name, a pypi:// URI or model=minilm.")
        if what == "model.name_or_path" and path.is_dir() and not (path / "config.json").exists():
            raise FtlabError(f"{what} '{name}' has no config.json, so it is not a saved model.",
                             "point it at a folder written by save_pretrained (config.json + "
                             "weights).")


def check_peft_fits(task: Any, spec: ModelSpec, peft_node: Any, where: str) -> None:
    """Apply the PEFT method to the model's architecture (on the meta device: no weights)."""
    import torch

    arch = _architecture_spec(spec)
    if arch is None:
        return
    try:
        with torch.device("meta"):
            model = task.build_model(arch)
    except FtlabError:
        raise
    except Exception as err:  # the real load reports real problems; this is only a check
        log.debug("Skipped the PEFT check (%s: %s).", type(err).__name__, err)
        return
    peft = instantiate_checked(peft_node, f"{where} peft")
    try:
        peft.apply(model)
    except FtlabError:
        raise
    except Exception as err:
        log.debug("PEFT check inconclusive on the meta device (%s: %s).", type(err).__name__, err)


def _architecture_spec(spec: ModelSpec) -> ModelSpec | None:
    """A from-config twin of ``spec`` (same architecture, random weights), if it can be had."""
    if spec.name_or_path is None:
        return spec
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(resolve(spec.name_or_path), **spec.config).to_dict()
    except Exception:
        return None
    keep = {k: v for k, v in config.items() if not k.startswith("_") and k not in (
        "architectures", "transformers_version", "id2label", "label2id", "num_labels")}
    return ModelSpec(name_or_path=None, tokenizer=spec.tokenizer, config=keep,
                     revision=spec.revision)
