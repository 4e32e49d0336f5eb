"""The architecture table on every tiny family: the top layers are the ones that drop or
re-initialise, hand-over carries the backbone and leaves the head fresh, layer-wise LR decay
follows depth, adapters sit on each block's output projection, inputs fit each family.

Module and parameter names below are written out per family from the models themselves, not
read from ``ftlab/model/arch.py``, so a wrong table entry fails here.
"""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSeq2SeqLM

from ftlab.data.batching import PadCollator
from ftlab.errors import FtlabError
from ftlab.handover import hand_over
from ftlab.model.arch import arch_for, head_parameters
from ftlab.model.backbone import ModelSpec, load_model, load_tokenizer
from ftlab.optim import OptimSpec, build_optimizer
from ftlab.peft.layers import top_layer_ops
from ftlab.run import run
from ftlab.tasks.classify import Classify
from ftlab.tasks.mlm import MaskedLM, split_mlm
from tests.conftest import ROOT, tiny_overrides
from tests.test_peft_contract import SEP, batch, logits, method, model_config, tiny_model

TOKENIZER = "pkg://ftlab/assets/tiny_tokenizer"

#: per family: the top stack's layer prefix, a lower stack (T5's encoder) that must not change,
#: an embedding, bottom-layer and top-layer parameter, a head parameter, the modules that hold
#: the attention / FFN adapters in layer {i} and the projection whose output they change
FAMILY = {
    "bert": dict(
        top="bert.encoder.layer", lower=None, emb="bert.embeddings.word_embeddings.weight",
        bottom="bert.encoder.layer.0.attention.self.query.weight",
        upper="bert.encoder.layer.1.output.dense.weight", head="classifier.weight",
        attn="bert.encoder.layer.{i}.attention.output", ffn="bert.encoder.layer.{i}.output",
        proj="dense", drop="dropout", source=AutoModelForMaskedLM),
    "roberta": dict(
        top="roberta.encoder.layer", lower=None,
        emb="roberta.embeddings.word_embeddings.weight",
        bottom="roberta.encoder.layer.0.attention.self.value.weight",
        upper="roberta.encoder.layer.1.intermediate.dense.weight",
        head="classifier.out_proj.weight", attn="roberta.encoder.layer.{i}.attention.output",
        ffn="roberta.encoder.layer.{i}.output", proj="dense", drop="dropout",
        source=AutoModelForMaskedLM),
    "deberta": dict(
        top="deberta.encoder.layer", lower=None,
        emb="deberta.embeddings.word_embeddings.weight",
        bottom="deberta.encoder.layer.0.attention.self.query_proj.weight",
        upper="deberta.encoder.layer.1.output.dense.weight", head="classifier.weight",
        attn="deberta.encoder.layer.{i}.attention.output", ffn="deberta.encoder.layer.{i}.output",
        proj="dense", drop="dropout", source=AutoModelForMaskedLM),
    "electra": dict(
        top="electra.encoder.layer", lower=None, emb="electra.embeddings_project.weight",
        bottom="electra.encoder.layer.0.attention.self.key.weight",
        upper="electra.encoder.layer.1.output.dense.weight", head="classifier.dense.weight",
        attn="electra.encoder.layer.{i}.attention.output", ffn="electra.encoder.layer.{i}.output",
        proj="dense", drop="dropout", source=AutoModelForMaskedLM),
    "distilbert": dict(
        top="distilbert.transformer.layer", lower=None,
        emb="distilbert.embeddings.word_embeddings.weight",
        bottom="distilbert.transformer.layer.0.attention.q_lin.weight",
        upper="distilbert.transformer.layer.1.ffn.lin2.weight", head="pre_classifier.weight",
        attn="distilbert.transformer.layer.{i}.attention",
        ffn="distilbert.transformer.layer.{i}.ffn", proj=("out_lin", "lin2"),
        drop=(None, "dropout"), source=AutoModelForMaskedLM),
    "gpt2": dict(
        top="transformer.h", lower=None, emb="transformer.wpe.weight",
        bottom="transformer.h.0.attn.c_attn.weight", upper="transformer.h.1.mlp.c_fc.weight",
        head="score.weight", attn="transformer.h.{i}.attn", ffn="transformer.h.{i}.mlp",
        proj="c_proj", drop=("resid_dropout", "dropout"), source=AutoModelForCausalLM),
    "llama": dict(
        top="model.layers", lower=None, emb="model.embed_tokens.weight",
        bottom="model.layers.0.self_attn.q_proj.weight",
        upper="model.layers.1.mlp.down_proj.weight", head="score.weight",
        attn="model.layers.{i}.self_attn", ffn="model.layers.{i}.mlp",
        proj=("o_proj", "down_proj"), drop=(None, None), source=AutoModelForCausalLM),
    "t5": dict(
        top="transformer.decoder.block", lower="transformer.encoder.block",
        emb="transformer.shared.weight",
        bottom="transformer.encoder.block.0.layer.0.SelfAttention.q.weight",
        upper="transformer.decoder.block.1.layer.2.DenseReluDense.wo.weight",
        head="classification_head.out_proj.weight",
        attn="transformer.{stack}.block.{i}.layer.0.SelfAttention",
        ffn="transformer.{stack}.block.{i}.layer.{ff}.DenseReluDense", proj=("o", "wo"),
        drop=("../dropout", "../dropout"), source=AutoModelForSeq2SeqLM),
}
FAMILIES = sorted(FAMILY)


def params(model: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith(prefix)}


@pytest.mark.parametrize("family", FAMILIES)
def test_drop_top_removes_the_top_layer_of_the_stack_nearest_the_head(family):
    facts, model = FAMILY[family], tiny_model(0, family)
    below = params(model, f"{facts['top']}.0.")
    lower = params(model, facts["lower"]) if facts["lower"] else {}
    before = logits(model)
    top_layer_ops(model, drop_top=1)
    names = [n for n, _ in model.named_parameters()]
    assert not any(n.startswith(f"{facts['top']}.1.") for n in names)  # the top layer is gone
    assert all(torch.equal(p, params(model, n)[n]) for n, p in below.items())  # layer 0 stays
    assert all(torch.equal(p, params(model, n)[n]) for n, p in lower.items())  # T5's encoder too
    after = logits(model)  # still runs, and the dropped layer mattered
    assert after.shape == before.shape and not torch.allclose(after, before)


@pytest.mark.parametrize("family", FAMILIES)
def test_reinit_top_reinitialises_only_the_top_layer(family):
    facts, model = FAMILY[family], tiny_model(0, family)
    top, rest = params(model, f"{facts['top']}.1."), params(model, "")
    fresh = top_layer_ops(model, reinit_top=1)
    now = params(model, "")
    matrices = [n for n, p in top.items() if p.ndim == 2]
    assert matrices and all(not torch.equal(now[n], top[n]) for n in matrices)
    pool = {n for n in rest if ".pooler." in n}  # re-initialised with the top layer
    unchanged = [n for n in rest if n not in top and n not in pool]
    assert all(torch.equal(now[n], rest[n]) for n in unchanged)
    named = {id(p): n for n, p in model.named_parameters()}
    assert {named[id(p)] for p in fresh} == set(top) | pool  # these must train


@pytest.mark.parametrize("family", FAMILIES)
def test_hand_over_carries_the_backbone_and_leaves_the_head_fresh(family):
    facts = FAMILY[family]
    torch.manual_seed(1)
    source = load_model(ModelSpec(config=model_config(family)), facts["source"])
    target = tiny_model(2, family)
    head = {id(p): p.detach().clone() for p in head_parameters(target)}
    emb, bottom, upper = facts["emb"], facts["bottom"], facts["upper"]
    src = {n.removeprefix("transformer."): p for n, p in source.named_parameters()} \
        if family == "t5" else dict(source.named_parameters())  # no prefix in the LM
    key = (lambda n: n.removeprefix("transformer.")) if family == "t5" else (lambda n: n)
    assert not torch.equal(dict(target.named_parameters())[bottom], src[key(bottom)])
    counts = hand_over(source, target, "encoder")
    own = dict(target.named_parameters())
    for name in (emb, bottom, upper):
        assert torch.equal(own[name], src[key(name)]), f"{name} was not handed over"
    assert counts["copied"] > 0
    assert all(torch.equal(p, head[id(p)]) for p in head_parameters(target))  # head is fresh
    assert id(own[facts["head"]]) in head  # the named head parameter counts as head


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_decay_lowers_the_lr_with_depth(family):
    facts, model = FAMILY[family], tiny_model(0, family)
    opt, _ = build_optimizer(model, OptimSpec(lr=1.0, layer_decay=0.5), 10)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    own = dict(model.named_parameters())
    layers = 4 if family == "t5" else 2  # T5: encoder blocks 1-2, then decoder blocks 3-4
    assert lr_of[id(own[facts["head"]])] == 1.0
    assert lr_of[id(own[facts["upper"]])] == 0.5  # the top layer: one group below the head
    assert lr_of[id(own[facts["bottom"]])] == 0.5 ** layers  # the bottom layer
    assert lr_of[id(own[facts["emb"]])] == 0.5 ** (layers + 1)  # embeddings lowest


def _sites(family: str, kind: str) -> list[str]:
    facts = FAMILY[family]
    if family != "t5":
        return [facts[kind].format(i=i) for i in range(2)]
    return [facts[kind].format(stack=s, i=i, ff=1 if s == "encoder" else 2)
            for s in ("encoder", "decoder") for i in range(2)]


@pytest.mark.parametrize("family", FAMILIES)
def test_adapters_sit_on_each_blocks_output_projection(family):
    """Each adapter runs on its block's output projection, after the dropout on it where the
    family has one (``drop``: relative to the holder, ``../`` its parent; None: no dropout)."""
    model = method("adapter_houlsby").apply(tiny_model(0, family))
    holders = sorted(n.removesuffix(".adapters") for n, _ in model.named_modules()
                     if n.endswith(".adapters"))
    assert holders == sorted(_sites(family, "attn") + _sites(family, "ffn"))
    proj = FAMILY[family]["proj"]
    proj = proj if isinstance(proj, tuple) else (proj, proj)
    drop = FAMILY[family]["drop"]
    drop = drop if isinstance(drop, tuple) else (drop, drop)
    for holder in holders:
        with torch.no_grad():
            for p in model.get_submodule(f"{holder}.adapters.adapter.up").parameters():
                p.zero_()
    plain = logits(model)
    torch.testing.assert_close(plain, logits(tiny_model(0, family)))  # zero up = identity
    for kind, name, after in (("attn", proj[0], drop[0]), ("ffn", proj[1], drop[1])):
        site = _sites(family, kind)[-1]  # T5: the decoder's
        seen: list[torch.Tensor] = []
        path = (f"{site}.{name}" if after is None else f"{site}.{after}" if
                not after.startswith("../") else f"{site.rpartition('.')[0]}.{after[3:]}")
        out = model.get_submodule(path)
        handle = out.register_forward_hook(lambda m, i, o, seen=seen: seen.append(o.detach()))
        logits(model)
        up = model.get_submodule(f"{site}.adapters.adapter.up").bias
        shift = torch.linspace(-1, 1, up.numel())  # not constant: a LayerNorm would remove that
        with torch.no_grad():
            up.copy_(shift)
        shifted = logits(model)
        handle.remove()
        with torch.no_grad():
            up.zero_()
        assert not torch.allclose(shifted, plain)  # a non-zero up-projection changes the output
        torch.testing.assert_close(seen[1] - seen[0], shift.expand_as(seen[0]))  # on its output


@pytest.mark.parametrize("family", FAMILIES)
def test_classifier_pools_the_same_with_and_without_padding(family):
    spec = ModelSpec(tokenizer=TOKENIZER, config=model_config(family))
    tok = load_tokenizer(spec)
    assert ("token_type_ids" in tok("a b")) == arch_for(spec.config["model_type"]).token_type_ids
    task = Classify()
    task.bind(SimpleNamespace(labels=["neg", "pos"], splits={}), tok, ["text", "pair"])
    torch.manual_seed(0)
    model = task.build_model(spec).eval()
    rows = task.featurize({"text": ["a good film", "the plot was dull and the actors bad"],
                           "pair": ["fine", "really"], "label": [0, 1]})
    feats = [dict(zip(rows, vals, strict=True)) for vals in zip(*rows.values(), strict=True)]
    padded = PadCollator(tok.pad_token_id)(feats)
    alone = PadCollator(tok.pad_token_id)(feats[:1])
    with torch.no_grad():
        both = model(**{k: v for k, v in padded.items() if k != "labels"}).logits
        one = model(**{k: v for k, v in alone.items() if k != "labels"}).logits
    torch.testing.assert_close(both[0], one[0], atol=1e-5, rtol=1e-4)  # pads are ignored


@pytest.mark.parametrize("family", FAMILIES)
def test_mlm_head_per_family_or_a_clear_error(family):
    spec = ModelSpec(tokenizer=TOKENIZER, config=model_config(family))
    if not arch_for(spec.config["model_type"]).mlm_head:
        with pytest.raises(FtlabError, match="no masked-LM head"):
            MaskedLM().build_model(spec)
        return
    model = MaskedLM().build_model(spec).eval()
    encoder, head = split_mlm(model)
    ids = batch(0)["input_ids"]
    with torch.no_grad():  # the split computes what the whole model computes
        torch.testing.assert_close(head(encoder(input_ids=ids)[0]), model(input_ids=ids).logits)


@pytest.mark.parametrize(("model", "peft"), [("tiny_llama", "lora"), ("tiny_t5", "adapter_houlsby"),
                                             ("tiny_gpt2", "ia3")])
def test_a_classify_stage_runs_on_other_families(make_cfg, sentiment_dir, model, peft):
    cfg = make_cfg(tiny_overrides(sentiment_dir) + [
        f"model={model}", f"peft={peft}", "stage.trainer.max_epochs=2",
        "trainer.limit_train_batches=3",  # gradual_unfreeze: one epoch is refused
        "stage.optim.layer_decay=0.9", "stage.optim.gradual_unfreeze=true"])
    record = run(cfg)
    assert record["status"] == "ok", record
    assert 0 < record["stages"]["classify"]["params_trainable_pct"] < 100


def test_a_tokenizer_without_pad_pads_with_eos_and_the_classifier_knows(tmp_path):
    folder = tmp_path / "tok"
    shutil.copytree(ROOT / "ftlab" / "assets" / "tiny_tokenizer", folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(pad_token=None, eos_token="[SEP]")  # as GPT-2's: an EOS, no pad token
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    spec = ModelSpec(tokenizer=str(folder), config=model_config("gpt2") | {"pad_token_id": None})
    tok = load_tokenizer(spec)
    assert tok.pad_token == "[SEP]" and "token_type_ids" not in tok("a b")
    task = Classify()
    task.bind(SimpleNamespace(labels=["neg", "pos"], splits={}), tok, ["text"])
    assert task.build_model(spec).config.pad_token_id == tok.pad_token_id == SEP


@pytest.mark.parametrize("family", FAMILIES)
def test_position_limit_is_the_longest_row_the_model_takes(family):
    """``position_limit``: rows of that many tokens run and one more fails (learned absolute
    positions); None for relative or rotary positions, which take rows past 512 tokens. The
    pre-flight refuses a task.max_length above it (tests/test_bad_inputs_values.py)."""
    from ftlab.model.arch import position_limit
    from tests.test_peft_contract import CLS, VOCAB

    model = tiny_model(0, family).eval()
    limit = position_limit(model)

    def forward(length: int) -> None:
        ids = torch.randint(5, VOCAB, (1, length), generator=torch.Generator().manual_seed(0))
        ids[:, 0], ids[:, -1] = CLS, SEP
        with torch.no_grad():
            model(input_ids=ids, attention_mask=torch.ones_like(ids))

    forward(limit or 600)
    if limit is not None:
        with pytest.raises((IndexError, RuntimeError)):
            forward(limit + 1)
    assert (limit is None) == (family in ("deberta", "llama", "t5"))


@pytest.mark.parametrize("method", ["prompt", "prefix"])
@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_soft_tokens_take_positions(family, method):
    """The premise of the pre-flight's room for ``num_virtual_tokens`` (``task_fit``): with n
    soft tokens (prompt or prefix tuning) a row of ``limit - n`` tokens runs and one more
    fails, for an encoder and a decoder."""
    from peft import PrefixTuningConfig, PromptTuningConfig, TaskType, get_peft_model

    from ftlab.model.arch import position_limit
    from ftlab.task_fit import virtual_tokens
    from tests.test_peft_contract import VOCAB

    base = tiny_model(0, family).eval()
    limit, n = position_limit(base), 8
    kind = PromptTuningConfig if method == "prompt" else PrefixTuningConfig
    model = get_peft_model(base, kind(task_type=TaskType.SEQ_CLS, num_virtual_tokens=n))
    assert virtual_tokens({"config": {"num_virtual_tokens": n}}) == n

    def forward(length: int) -> None:
        ids = torch.randint(5, VOCAB, (1, length), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            model(input_ids=ids, attention_mask=torch.ones_like(ids))

    forward(limit - n)
    with pytest.raises((IndexError, RuntimeError)):
        forward(limit - n + 1)
