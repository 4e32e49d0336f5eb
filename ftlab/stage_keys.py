"""Stage keys: a hash of everything that shapes a stage's trained weights (its resolved spec,
model, data, seed, and the keys of the stages it starts from, stacks or learns from). The stage
cache stores finished stages under them; a job's identity (``ftlab.resume``) is its stage keys.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ftlab.pipeline import ResolvedStage

#: bump when the stored format or the meaning of a key changes (3: checksums in stage.json)
FORMAT = 3
#: trainer keys that change nothing about the trained weights
COSMETIC = {"enable_progress_bar", "enable_model_summary", "log_every_n_steps", "logger",
            "callbacks", "default_root_dir", "enable_checkpointing"}
#: run callbacks (``callbacks`` group) that change no stage's trained weights: the progress bar;
#: early discard only stops a stage, and a stopped stage is never stored
COSMETIC_CALLBACKS = ("ProgressBar", "EarlyDiscard")


def weight_callbacks(callbacks: dict[str, Any] | None) -> dict[str, Any]:
    """The run's callback nodes that may change every stage's weights (EMA, SWA, snapshots, your
    own), by name: they enter the stage keys."""
    return {k: v for k, v in (callbacks or {}).items() if v is not None and not any(
        c in str(v.get("_target_", "")) for c in COSMETIC_CALLBACKS)}


def stage_key(stage: ResolvedStage, upstream_key: str | None,
              in_run: tuple[str, ...] = (), callbacks: dict[str, Any] | None = None) -> str:
    """A hash of what determines the stage's trained weights (not its name or log settings).

    The seed enters as the seed that applies (the stage's own if set, else the run's), so a
    stage with a fixed ``seed`` keeps its key across a seed sweep. ``in_run``: ``stack_on``
    artefacts of earlier stages of the run, which enter by their stage's key in
    ``upstream_key``; other stacked artefacts enter by size and modification time.
    ``callbacks``: the run's callback nodes; those of ``weight_callbacks`` (a weight average
    becomes the stage's model) enter when there are any (none: the key it had before).
    """
    spec = asdict(stage)
    # runtime: how it ran, not what it learnt; data_keys, key: where it is set (messages)
    for k in ("name", "save_artefact", "runtime", "data_keys", "key"):
        spec.pop(k)
    if not stage.head_warmup_steps:  # off: the key it had before the field existed
        spec.pop("head_warmup_steps")
    if not stage.teachers or stage.teacher_rows is not None:  # no soft labels to learn
        spec.pop("student_temperature")
    for data in (spec["data"], *(sub["data"] for sub in spec["subtasks"])):
        for field in ("delimiter", "label_names"):  # null (by extension; the data's own
            if data.get(field) is None:  # names): the key it had before the field existed
                data.pop(field, None)
    spec["trainer"] = {k: v for k, v in stage.trainer.items() if k not in COSMETIC}
    # local files enter by size and modification time too: an edited file is a new key
    spec["data"]["file_stats"] = {k: _stat(v) for k, v in (stage.data.files or {}).items()}
    for sub, resolved in zip(spec["subtasks"], stage.subtasks, strict=True):  # multi-task
        sub["data"]["file_stats"] = {k: _stat(v) for k, v in (resolved.data.files or {}).items()}
    if stage.peft.get("stack_on"):  # stacked artefacts of other runs: by size and time
        spec["stack_on_stats"] = [None if str(p) in in_run else _stat(p)
                                  for p in stage.peft["stack_on"]]
    if str(stage.peft.get("_target_", "")).endswith(".HfPeft"):  # peft froze these before:
        if stage.aux_mlm_weight:  # a new key, not an old cache
            spec["aux_head_trains"] = True
        if str((stage.task or {}).get("_target_", "")).endswith(".MaskedLM"):
            spec["fresh_head_trains"] = True
    if stage.teachers:  # teachers that are finished runs enter by their artefact's identity
        from ftlab.distill import is_run_dir, teacher_fingerprint

        spec["teacher_runs"] = [teacher_fingerprint(t) for t in stage.teachers if is_run_dir(t)]
        if (stage.task or {}).get("class_weights") == "balanced":  # counted on the teachers'
            spec["class_weights_from"] = "teachers"  # labels since format 1's keys: a new key
    payload = {"format": FORMAT, "stage": spec, "upstream": upstream_key}
    if weight_callbacks(callbacks):
        payload["callbacks"] = weight_callbacks(callbacks)
    text = json.dumps(payload, sort_keys=True, default=str)
    return f"{stage.name}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def _stat(path: Any) -> list[int] | None:
    p = Path(str(path)).expanduser()
    return [p.stat().st_size, p.stat().st_mtime_ns] if p.is_file() else None


def pipeline_keys(stages: list[ResolvedStage], run_dir: Path | None = None,
                  callbacks: dict[str, Any] | None = None) -> dict[str, str]:
    """Every stage's key; a stage's key includes the key of the stage it starts from, of its
    teachers, and of the earlier stages whose artefacts (in ``run_dir``) its ``peft.stack_on``
    stacks (MAD-X: the task adapter on the language adapter), and the run's ``callbacks`` that
    change weights (``weight_callbacks``)."""
    keys: dict[str, str] = {}
    for s in stages:  # teachers from the pipeline: their keys, beside the init_from stage's
        stacked = stacked_stages(s, keys, run_dir)
        up = [keys.get(s.init_from), *(keys[t] for t in s.teachers if t in keys),
              *(keys[n] for n in stacked.values())]
        keys[s.name] = stage_key(s, up[0] if len(up) == 1 else "+".join(map(str, up)),
                                 tuple(stacked), callbacks)
    return keys


def stacked_stages(stage: ResolvedStage, keys: dict[str, str],
                    run_dir: Path | None) -> dict[str, str]:
    """``stack_on`` entries that point into an earlier stage's folder of this run: its name."""
    if run_dir is None:
        return {}
    run = Path(run_dir).resolve()
    return {str(p): n for p in stage.peft.get("stack_on") or [] for n in keys
            if Path(str(p)).expanduser().resolve().parent == run / n}
