"""Shared fixtures: tiny synthetic data, composed configs, the shared real data folder."""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from ftlab.cli import CONFIG_DIR, quiet

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):  # pytest -n N: each worker gets its share of
    # the cores (N workers at torch's default of one thread per core oversubscribe them);
    # the ftlab processes a test starts inherit it (ftlab.run.set_threads keeps it)
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    _workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (_cores or 1) // _workers)))
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
quiet()

POS = ["great", "superb", "moving", "funny", "brilliant", "charming", "delightful", "best"]
NEG = ["awful", "boring", "dull", "worst", "tedious", "bad", "mess", "stupid"]
FILLER = ["the", "film", "movie", "plot", "actors", "story", "was", "is", "a", "and", "this",
          "really", "quite", "long", "ending", "music", "scenes", "director"]


def synthetic_rows(n: int, seed: int) -> list[dict]:
    """Sentiment-like rows: one or two cue words among filler; lengths vary 4..30 words."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = rng.choice(["pos", "neg"])
        words = rng.choices(FILLER, k=rng.randint(3, 28))
        for _ in range(rng.randint(1, 2)):
            words.insert(rng.randrange(len(words) + 1), rng.choice(POS if label == "pos" else NEG))
        rows.append({"text": " ".join(words), "label": label, "group": f"g{i % 37}"})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def sentiment_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("sentiment")
    for split, n, seed in (("train", 256, 0), ("validation", 96, 1), ("test", 96, 2)):
        write_jsonl(d / f"{split}.jsonl", synthetic_rows(n, seed))
    return d


def scored_rows(n: int, seed: int) -> list[dict]:
    """STS-B-shaped rows: a sentence pair (``text``, ``text_pair``) and a ``score`` in 0-5,
    1.25 x the number of cue words (0-4) spread over the two texts among filler."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        k = rng.randint(0, 4)
        texts = [rng.choices(FILLER, k=rng.randint(3, 12)) for _ in range(2)]
        for _ in range(k):
            words = rng.choice(texts)
            words.insert(rng.randrange(len(words) + 1), rng.choice(POS))
        rows.append({"text": " ".join(texts[0]), "text_pair": " ".join(texts[1]),
                     "score": 1.25 * k})
    return rows


@pytest.fixture(scope="session")
def scores_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Numeric-label data (stage=regression): ``<split>.jsonl`` and ``<split>.csv`` of
    :func:`scored_rows` (train 256 rows, validation and test 96)."""
    import csv

    d = tmp_path_factory.mktemp("scores")
    for split, n, seed in (("train", 256, 0), ("validation", 96, 1), ("test", 96, 2)):
        rows = scored_rows(n, seed)
        write_jsonl(d / f"{split}.jsonl", rows)
        with (d / f"{split}.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, ["text", "text_pair", "score"])
            writer.writeheader()
            writer.writerows(rows)
    return d


def tiny_overrides(data_dir: Path) -> list[str]:
    """Overrides that make any config run in seconds: tiny BERT, synthetic data, no logs."""
    return [
        "model=tiny_bert", "data=local",
        f"data.files.train={data_dir}/train.jsonl",
        f"data.files.validation={data_dir}/validation.jsonl",
        f"data.files.test={data_dir}/test.jsonl",
        "data.path=json", "logger=none", "callbacks=none",
        "trainer.enable_progress_bar=false", "stage.batch_size=16", NO_BUDGET,
    ]


#: tests fix their own length: the adaptive budget (ftlab/budget.py: at least 600 steps) is off
#: unless a test sets trainer.budget.* itself (tests/test_budget.py)
NO_BUDGET = "trainer.budget.min_steps=0"


def compose_cfg(overrides: list[str], output_dir: Path) -> DictConfig:
    """Compose the real conf/ with overrides, as the CLI would, writing into output_dir."""
    if not any(o.startswith("trainer.budget.") for o in overrides):
        overrides = [*overrides, NO_BUDGET]
    from tests import your_conf

    overrides = [*overrides, *your_conf.overrides()]  # FTLAB_CONTRACT_CONF: your folders too
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        del cfg["hydra"]  # the app's cfg has no hydra node (HydraConfig holds it)
    return cfg


@pytest.fixture
def make_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    """Compose the real conf/ with overrides, as the CLI would, writing into tmp_path/run."""

    def _make(overrides: list[str]) -> DictConfig:
        return compose_cfg(overrides, tmp_path / "run")

    return _make


@pytest.fixture(scope="session")
def two_steps(sentiment_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny classifier's run folder (2 steps), trained once for the tests that only read it
    (predict, export into their own tmp_path)."""
    from ftlab.run import run

    run_dir = tmp_path_factory.mktemp("two_steps") / "run"
    record = run(compose_cfg([*tiny_overrides(sentiment_dir), "stage.optim.lr=2e-3",
                              "trainer.max_epochs=2", "trainer.max_steps=2"], run_dir))
    assert record["status"] == "ok", record.get("error")
    return run_dir


def shared_file(rel: str) -> Path:
    path = SHARED / rel
    if not path.exists():
        pytest.skip(f"{path} is absent (a user's clone has no ../shared/data)")
    return path


def loss_before_after(task, model, batch: dict, steps: int,
                      lr: float = 3e-3) -> tuple[float, float]:
    """Eval-mode task loss on ``batch`` before and after ``steps`` AdamW steps on it."""
    import torch

    from ftlab.optim import OptimSpec, build_optimizer

    opt, _ = build_optimizer(model, OptimSpec(lr=lr, warmup_ratio=0.0), 100)

    def eval_loss() -> float:
        model.eval()
        with torch.no_grad():
            return task.forward(model, batch).loss.item()

    before = eval_loss()
    model.train()
    for _ in range(steps):
        loss = task.forward(model, batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return before, eval_loss()


def prompt_tuned_causal_lm(task, spec, virtual_tokens: int = 4):
    """``task``'s causal LM (seed 0) wrapped by peft's prompt tuning, in eval mode: its logits
    carry ``virtual_tokens`` extra positions before the row's own."""
    import torch
    from peft import PromptTuningConfig, get_peft_model

    torch.manual_seed(0)
    return get_peft_model(task.build_model(spec), PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=virtual_tokens)).eval()


def wandb_run_id(folder: Path) -> str:
    """The run id in an offline W&B folder's name, ``offline-run-<time>-<id>`` (W&B adds
    ``-<n>`` when a folder of that second and id exists: a resumed attempt within a second)."""
    found = re.fullmatch(r"offline-run-\d{8}_\d{6}-(.+?)(?:-\d+)?", folder.name)
    return found.group(1) if found else folder.name


def masked_lm_folder(folder: Path, model_node) -> list[str]:
    """Save the tiny BERT of ``model_node`` as a masked LM with its MLM head in ``folder`` (a
    checkpoint that has a head, unlike MiniLM's); the model overrides that load it."""
    from transformers import BertConfig, BertForMaskedLM

    from ftlab.config import bind_schema
    from ftlab.model.backbone import ModelSpec, load_tokenizer

    spec = bind_schema(ModelSpec, model_node, "model")
    BertForMaskedLM(BertConfig(**{k: v for k, v in spec.config.items() if k != "model_type"})) \
        .save_pretrained(folder)
    load_tokenizer(spec).save_pretrained(folder)
    return [f"model.name_or_path={folder}", "model.config={}", "model.tokenizer=null"]
