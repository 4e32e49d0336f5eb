"""Model FLOPs for MFU (ftlab.flops): PaLM's count, checked against the models' own parts."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from ftlab.flops import FlopRule, flop_rule
from ftlab.model.backbone import ModelSpec, load_model
from ftlab.run import run
from tests.conftest import tiny_overrides


def _tiny(name: str, auto):
    from omegaconf import OmegaConf

    from ftlab.config import bind_schema

    conf = OmegaConf.load(Path(__file__).parents[1] / "conf" / "model" / f"{name}.yaml")
    return load_model(bind_schema(ModelSpec, conf, "model"), auto)


def test_a_classifier_counts_every_weight_but_its_embedding_tables():
    model = _tiny("tiny_bert", AutoModelForSequenceClassification)
    emb = model.bert.embeddings
    tables = sum(m.weight.numel() for m in (emb.word_embeddings, emb.position_embeddings,
                                             emb.token_type_embeddings))
    rule = flop_rule(model)
    assert rule.matmul_params == sum(p.numel() for p in model.parameters()) - tables
    assert (rule.layers, rule.hidden) == (2, model.config.hidden_size)


def test_a_tied_lm_head_multiplies_so_its_table_counts():
    model = _tiny("tiny_gpt2", AutoModelForCausalLM)
    assert model.lm_head.weight is model.transformer.wte.weight  # tied
    rule = flop_rule(model)
    total = sum(p.numel() for p in model.parameters())  # each tied tensor once
    assert rule.matmul_params == total - model.transformer.wpe.weight.numel()


def test_per_batch_is_six_n_plus_the_attention_term():
    rule = FlopRule(matmul_params=1000, layers=2, hidden=8)
    # 4 rows x 16 tokens, each 6 x 1000 + 12 x 2 x 8 x 16 FLOPs
    assert rule.per_batch(4, 16) == 64 * (6000 + 3072)
    assert rule.per_batch(4, 32) > 2 * rule.per_batch(4, 16)  # attention grows with width


def test_bert_base_matches_the_known_count():
    model = _tiny("bert_base_random", AutoModelForSequenceClassification)
    rule = flop_rule(model)
    # BERT-base: 12 layers x (4 x 768^2 + 2 x 768 x 3072 + biases and norms) + pooler + head
    per_layer = 4 * 768 * 768 + 2 * 768 * 3072 + 4 * 768 + 3072 + 768 + 4 * 768
    assert rule.matmul_params == 12 * per_layer + 768 * 768 + 768 + 768 * 2 + 2 + 2 * 768
    assert (rule.layers, rule.hidden) == (12, 768)


def test_a_run_records_model_flops_per_second(make_cfg, sentiment_dir):
    cfg = make_cfg([*tiny_overrides(sentiment_dir), "trainer.max_steps=4", "cache.stages=off"])
    assert run(cfg)["status"] == "ok"
    info = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())[
        "stages"]["classify"]
    rule = flop_rule(_tiny("tiny_bert", AutoModelForSequenceClassification))
    per_token = info["train_model_flops_per_s"] / info["train_tokens_per_s"]
    # between 6N (width 0) and 6N + the attention term at the longest width (128)
    assert 6 * rule.matmul_params < per_token < 6 * rule.matmul_params + 12 * 2 * 32 * 128


def test_a_model_outside_the_architecture_table_has_no_rule():
    from torch import nn

    assert flop_rule(nn.Sequential(nn.Embedding(4, 2), nn.Linear(2, 2))) is None
