"""W&B views beyond per-step logs (``logger=wandb``): stage lineage as artefacts, and one
``summary`` run per sweep configuration holding the cross-seed tables.

- Lineage: every stage that saved an artefact logs it as a W&B artifact named by its stage
  key (``<stage>-<hash of the resolved stage and its upstream>``, type ``ftlab-stage``), so
  the same resolved stage has the same artifact name in every run; a stage started from an
  earlier one (``init_from``) first declares that stage's artifact as its input
  (``use_artifact``), which draws the pipeline as a lineage graph. W&B refuses
  ``use_artifact`` offline: there the artifact's metadata names its ``upstream`` instead.
- Summary: when a multirun ends, each configuration of the sweep gets a run with
  ``job_type: summary`` in the jobs' own group (``<sweep>/<config>``) with two tables,
  ``cross_seed`` (metric, n, mean, its 95% interval, std, median, min, max) and
  ``per_seed`` (one row per seed). A re-launch of the sweep logs to the same summary run
  (its id comes from the sweep folder and configuration), so each configuration has one.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ARTIFACT_TYPE = "ftlab-stage"
#: files of a stage folder that make up its artifact (weights, card, tokenizer)
ARTIFACT_FILES = ("trainable.safetensors", "card.json")


def artifact_name(key: str) -> str:
    """A stage's artifact name: its stage key (``<stage>-<hash of the resolved stage>``)."""
    return key


def _active_run(job_type: str) -> Any:
    """The W&B run of this stage (the active run, if its job_type is the stage's)."""
    import sys

    if "wandb" not in sys.modules:
        return None
    import wandb

    run = wandb.run
    return run if run is not None and run.job_type == job_type else None


def log_stage_artifact(stage: Any, info: dict[str, Any], upstream: dict[str, Any] | None) -> \
        str | None:
    """Log the stage's artefact folder as an artifact of its W&B run (none without one, or
    for a stage reused from the cache: it has no run). ``upstream``: the ``info`` of the stage
    it started from. Returns the artifact's name."""
    run = _active_run(stage.name)
    if run is None or not info.get("artefact") or info.get("cache_hit"):
        return None
    import wandb

    stage_dir = Path(info["artefact"]).parent
    up = None
    if upstream and upstream.get("cache_key"):
        up = artifact_name(upstream["cache_key"])
        if run.settings.mode in ("offline", "dryrun"):
            log.info("W&B offline: %s names its upstream %s in its metadata (use_artifact "
                     "needs a connection).", stage.name, up)
        else:
            run.use_artifact(f"{up}:latest")
    name = artifact_name(info["cache_key"])
    art = wandb.Artifact(name, type=ARTIFACT_TYPE, metadata={
        "stage": stage.name, "stage_key": info["cache_key"], "init_from": stage.init_from,
        "upstream": up, "peft": info.get("peft"), "params_trainable": info.get(
            "params_trainable")})
    for file in ARTIFACT_FILES:
        if (stage_dir / file).is_file():
            art.add_file(str(stage_dir / file))
    if (stage_dir / "tokenizer").is_dir():
        art.add_dir(str(stage_dir / "tokenizer"), name="tokenizer")
    run.log_artifact(art)
    return name


def wandb_node(config: Any) -> dict[str, Any] | None:
    """The run config's ``logger.wandb`` node (ftlab's logger), or None."""
    from ftlab.config import plain

    node = (plain(config.get("logger")) or {}).get("wandb")
    return node if node and str(node.get("_target_", "")).endswith("wandb_logger") else None


def summary_run_id(sweep_dir: Path, group: str) -> str:
    """The summary run's W&B id: the same for a configuration's every report in one sweep
    folder (a re-launch, ``ftlab -m resume=<sweep>``, updates that run's tables instead of
    adding a second summary run to the group)."""
    import hashlib

    where = f"{Path(sweep_dir).resolve()}\n{group}"
    return "summary-" + hashlib.sha256(where.encode()).hexdigest()[:24]


def log_sweep_summary(config: Any, sweep_dir: Path, summary: dict[str, Any]) -> int:
    """One ``summary`` run per configuration with the cross-seed tables (when the sweep logs
    to W&B). Returns the number of runs logged."""
    node = wandb_node(config)
    if not node or not summary:
        return 0
    import wandb

    from ftlab.loggers import resolve_mode
    from ftlab.report import collect, swept_keys

    records = collect(sweep_dir)
    keys = swept_keys(records)
    config_keys = {keys[i]: r.get("config_key", keys[i]) for i, r in enumerate(records)}
    mode = resolve_mode(node.get("mode", "auto"))
    for key, s in summary.items():
        group = f"{sweep_dir.name}/{config_keys.get(key, key)}"  # the jobs' W&B group
        run = wandb.init(project=node.get("project", "ftlab"), entity=node.get("entity"),
                         dir=str(sweep_dir), mode=mode, group=group, job_type="summary",
                         name=f"summary/{key}", reinit="finish_previous",
                         id=summary_run_id(sweep_dir, group), resume="allow",
                         config={"sweep": sweep_dir.name, "configuration": key,
                                 "runs": s["runs"], "errored": s["errored"]})
        try:
            cols = ["metric", "n", "mean", "ci95_low", "ci95_high", "std", "median", "min",
                    "max"]
            run.log({"cross_seed": wandb.Table(columns=cols, data=[
                [m, st["n"], st["mean"], *(st["ci95"] or (None, None)), *(st[c] for c in cols[5:])]
                for m, st in s["metrics"].items()])})
            names = sorted({m for v in s["seeds"].values() for m in v})
            run.log({"per_seed": wandb.Table(columns=["seed", *names], data=[
                [seed, *(v.get(m) for m in names)] for seed, v in s["seeds"].items()])})
            run.summary.update({f"{m}/mean": st["mean"] for m, st in s["metrics"].items()})
        finally:
            run.finish()
    log.info("W&B: %d summary run(s) (job_type summary) in %s", len(summary),
             os.path.join(sweep_dir, "wandb"))
    return len(summary)
