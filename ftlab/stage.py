"""Run one stage: data -> task model -> PEFT/regulariser -> fit -> best -> test -> artefact."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar
from omegaconf import DictConfig
from torch import nn

from ftlab.callbacks import GradualUnfreeze, KeepBest
from ftlab.config import bind_schema, instantiate_checked
from ftlab.data.datamodule import TextDataModule
from ftlab.data.sources import load_raw
from ftlab.data.spec import DataSpec
from ftlab.handover import hand_over
from ftlab.loggers import build_loggers
from ftlab.model.backbone import ModelSpec, load_tokenizer
from ftlab.module import FineTuneModule
from ftlab.optim import OptimSpec
from ftlab.peft.base import SavesArtefact, count_parameters
from ftlab.pipeline import StageSpec, stage_data, stage_node, stage_optim, stage_seed, stage_trainer
from ftlab.store import save_tensors

log = logging.getLogger(__name__)


@dataclass
class StageResult:
    name: str
    metrics: dict[str, float]
    model: nn.Module | dict[str, Any]  # a cache hit holds the stored state dict instead
    info: dict[str, Any] = field(default_factory=dict)


def run_stage(stage: StageSpec, cfg: DictConfig, run_dir: Path,
              upstream: dict[str, StageResult], context: dict[str, Any]) -> StageResult:
    """Train and evaluate ``stage``; ``upstream`` holds earlier stages of this run."""
    seed = stage_seed(stage, cfg)
    stage_dir = run_dir / stage.name
    L.seed_everything(seed, workers=True, verbose=False)
    data_spec = bind_schema(DataSpec, stage_data(stage, cfg), "data")
    model_spec = bind_schema(ModelSpec, cfg.model, "model")
    raw = load_raw(data_spec, seed)
    tokenizer = load_tokenizer(model_spec)
    task = instantiate_checked(stage.task, f"stage '{stage.name}'.task")
    if stage.aux_mlm_weight > 0:
        from ftlab.tasks.mlm import AuxMLM

        task = AuxMLM(task, stage.aux_mlm_weight)
    task.bind(raw, tokenizer, data_spec.text_columns)
    dm = TextDataModule(raw.splits, task, tokenizer.pad_token_id,
                        batch_size=stage.batch_size, eval_batch_size=stage.eval_batch_size,
                        seed=seed)

    model = task.build_model(model_spec)
    handed = {}
    if stage.init_from != "pretrained":
        handed = hand_over(upstream[stage.init_from].model, model, stage.carry)
    peft = instantiate_checked(stage_node(stage, cfg, "peft"), "peft")
    regularizer = instantiate_checked(stage_node(stage, cfg, "regularizer"), "regularizer")
    model = regularizer.apply(peft.apply(model))
    counts = count_parameters(model)
    optim = stage_optim(stage, cfg)
    log.info("Stage %s: %s trainable of %s parameters (%.3f%%) with peft=%s, peak lr %g",
             stage.name, f"{counts['params_trainable']:,}", f"{counts['params_total']:,}",
             counts["params_trainable_pct"], peft.name, optim.lr)

    module = FineTuneModule(model, task, regularizer, optim)
    keep = KeepBest(peft, f"val/{task.monitor}", task.mode)
    trainer = _trainer(cfg, stage, optim, stage_dir, keep, context | {
        "name": f"{context.get('name', 'run')}/{stage.name}", "job_type": stage.name})
    start = time.perf_counter()
    trainer.fit(module, dm)
    fit_s = time.perf_counter() - start
    if keep.best is None and "validation" in dm.splits:  # max_steps ended before any validation
        trainer.validate(module, dm, verbose=False)
    keep.restore(module)

    metrics: dict[str, float] = {f"val/{k}": v for k, v in keep.metrics.items()}
    if "test" in dm.splits:
        metrics |= {k: float(v) for k, v in trainer.test(module, dm, verbose=False)[0].items()}
    if raw.labels is not None and "validation" in raw.splits:
        baseline = task.baseline(raw.splits["validation"]["label"]) or {}
        metrics |= {f"val/baseline_{k}": v for k, v in baseline.items()}
    info = counts | {"lr": optim.lr, "fit_seconds": round(fit_s, 2), "best_epoch": keep.best_epoch,
                     "seed": seed, "train_rows": len(raw.splits["train"]),
                     "global_steps": trainer.global_step, "handed_over": handed,
                     **task.info}
    if stage.save_artefact:
        state = peft.trainable_state(module.model)
        path = save_tensors(stage_dir / "trainable.safetensors", state,
                            metadata={"peft": peft.name, "stage": stage.name})
        info |= {"artefact": str(path), "artefact_kb": round(path.stat().st_size / 1024, 1)}
        if isinstance(peft, SavesArtefact):  # e.g. HF peft's save_pretrained folder
            info["artefact_dir"] = str(peft.save(module.model, stage_dir))
    return StageResult(stage.name, metrics, module.model, info)


def _trainer(cfg: DictConfig, stage: StageSpec, optim: OptimSpec, stage_dir: Path,
             keep: KeepBest, context: dict[str, Any]) -> L.Trainer:
    stage_dir.mkdir(parents=True, exist_ok=True)
    callbacks = [instantiate_checked(node, f"callbacks.{key}")
                 for key, node in (cfg.get("callbacks") or {}).items() if node is not None]
    if optim.gradual_unfreeze:
        callbacks.append(GradualUnfreeze())
    loggers = build_loggers(cfg.get("logger"), save_dir=str(stage_dir), **context)
    node = stage_trainer(cfg, stage)
    if node.get("enable_progress_bar") is False:  # a bar callback would contradict it
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    return instantiate_checked(node, "trainer", default_root_dir=str(stage_dir),
                               callbacks=[*callbacks, keep], logger=loggers or False,
                               enable_checkpointing=False)
