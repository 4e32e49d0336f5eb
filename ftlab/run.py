"""One job: run the pipeline's stages in order and record everything in ``metrics.json``."""

from __future__ import annotations

import logging
import sys
import traceback
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ftlab.cache import CacheSpec, StageCache, cached_stages, pipeline_keys, run_or_reuse
from ftlab.config import bind_schema
from ftlab.errors import FtlabError
from ftlab.loggers import finish_wandb
from ftlab.pipeline import build_pipeline
from ftlab.stage import StageResult
from ftlab.store import write_json
from ftlab.validate import validate

log = logging.getLogger("ftlab")

#: jobs of this process that ended in an error (the CLI exits non-zero if any did)
ERRORED: list[str] = []


def _hydra_info() -> dict[str, Any]:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return {"multirun": False, "overrides": [], "sweep": None, "job": "run", "choices": {}}
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    return {"multirun": multirun, "overrides": list(hc.overrides.task),
            "sweep": Path(hc.sweep.dir).name if multirun else None,
            "job": hc.job.override_dirname or "default", "choices": dict(hc.runtime.choices)}


def config_key(overrides: list[str]) -> str:
    """The configuration a job belongs to: its overrides other than the seed."""
    rest = sorted(o for o in overrides if o.split("=", 1)[0].lstrip("+~") != "seed")
    return ",".join(rest) or "default"


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run every stage; write ``metrics.json`` after each; never lose a finished stage."""
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    hydra = _hydra_info()
    key = config_key(hydra["overrides"])
    record: dict[str, Any] = {"status": "running", "seed": cfg.seed, "config_key": key,
                              "overrides": hydra["overrides"], "stages": {}}
    out = run_dir / "metrics.json"
    context = {"group": f"{hydra['sweep']}/{key}" if hydra["sweep"] else None,
               "tags": [f"peft:{hydra.get('choices', {}).get('peft', 'custom')}",
                        f"regularizer:{hydra.get('choices', {}).get('regularizer', 'custom')}"],
               "config": OmegaConf.to_container(cfg, resolve=True), "name": hydra["job"]}
    try:
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
        stages = build_pipeline(cfg)
        record["pipeline"] = [s.name for s in stages]
        validate(cfg, stages)  # every stage's config and data, before any training
        cache_spec = bind_schema(CacheSpec, cfg.get("cache"), "cache")
        cache, cached = StageCache(cache_spec.dir), cached_stages(stages, cache_spec.stages)
        keys = pipeline_keys(stages, cfg)
        lineage = record["lineage"] = [{"stage": s.name, "init_from": s.init_from,
                                        "key": keys[s.name], "cache_hit": None} for s in stages]
        context["config"]["lineage"] = lineage  # W&B config: the chain of stages and keys
        results: dict[str, StageResult] = {}
        for stage, line in zip(stages, lineage, strict=True):
            result = run_or_reuse(stage, cfg, run_dir, results, context, keys[stage.name],
                                  cache if stage.name in cached else None)
            results[stage.name] = result
            line["cache_hit"] = result.info["cache_hit"]
            record["stages"][stage.name] = {"metrics": result.metrics, **result.info}
            write_json(out, record)
        final = results[stages[-1].name].metrics
        record |= {"status": "ok", "final": final, "failed": is_degenerate(final)}
    except (FtlabError, Exception, KeyboardInterrupt) as err:
        _record_error(record, err, run_dir)
        if isinstance(err, KeyboardInterrupt):
            raise
        if not hydra["multirun"]:
            sys.exit(1)  # the message is printed; SystemExit passes Hydra without a traceback
        return record  # a sweep goes on with its next job
    finally:
        write_json(out, record)
        finish_wandb(failed=record["status"] != "ok")
    log.info("Final metrics: %s", {k: round(v, 4) for k, v in record["final"].items()})
    log.info("Results in %s", run_dir)
    return record


def is_degenerate(metrics: dict[str, float]) -> bool:
    """True when validation accuracy is at or below the majority-class baseline."""
    acc, base = metrics.get("val/acc"), metrics.get("val/baseline_acc")
    return acc is not None and base is not None and acc <= base + 1e-9


def _record_error(record: dict[str, Any], err: BaseException, run_dir: Path) -> None:
    record["status"] = "interrupted" if isinstance(err, KeyboardInterrupt) else "error"
    record["failed"] = True
    record["error"] = str(err) if isinstance(err, FtlabError) else f"{type(err).__name__}: {err}"
    if not isinstance(err, FtlabError | KeyboardInterrupt):
        (run_dir / "error.log").write_text(traceback.format_exc())
        record["error"] += f" (traceback in {run_dir / 'error.log'})"
    ERRORED.append(str(run_dir))
    print(f"\nftlab: {record['error']}\n", file=sys.stderr)
