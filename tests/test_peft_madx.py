"""MAD-X fidelity: invertible adapters, LayerNorms handed over with a stacked adapter, and the
method's own LR for an inline pipeline peft node."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForMaskedLM

from ftlab.cli import CONFIG_DIR
from ftlab.errors import FtlabError
from ftlab.model.backbone import ModelSpec, load_model
from ftlab.peft.group_lr import group_lr
from ftlab.peft.invertible import NiceCoupling
from ftlab.peft.stacking import block_norm_parameters
from ftlab.store import load_tensors, save_tensors
from tests.conftest import tiny_overrides
from tests.test_peft_contract import (
    FAMILIES,
    batch,
    logits,
    method,
    model_config,
    tiny_model,
    train_steps,
)
from tests.test_resolved import resolve


def mlm_model(seed: int = 0, family: str = "bert") -> torch.nn.Module:
    torch.manual_seed(seed)
    return load_model(ModelSpec(config=model_config(family)), AutoModelForMaskedLM)


def mlm_logits(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        b = batch(99)
        return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits


@pytest.mark.parametrize("width", [32, 33])
def test_nice_coupling_inverse_reconstructs_its_input(width):
    torch.manual_seed(0)
    block = NiceCoupling(width, size=8, init_std=0.5)  # far from identity
    x = torch.randn(4, 7, width)
    y = block(x)
    assert (y - x).abs().max() > 0.1
    torch.testing.assert_close(block.inverse(y), x, atol=1e-5, rtol=0)
    torch.testing.assert_close(block(block.inverse(x)), x, atol=1e-5, rtol=0)


def test_invertible_adapter_starts_near_identity_and_is_inverted_before_the_mlm_output():
    plain = mlm_logits(mlm_model())
    peft = method("adapter_pfeiffer", invertible=True, reduction_factor=2)
    model = peft.apply(mlm_model())
    blocks = model.bert.invertible_adapters
    assert list(blocks) == ["adapter"] and blocks.adapter.F[0].out_features == 8  # 32/2/2
    torch.testing.assert_close(mlm_logits(model), plain, atol=1e-2, rtol=0)
    assert not torch.equal(mlm_logits(model), plain)  # the hooks run
    # the inverse runs before the output embeddings: with the transformer layers and the
    # head's transform taken out, a far-from-identity block cancels out exactly
    with torch.no_grad():
        for p in blocks.parameters():
            p.normal_(0, 0.5)
    model.bert.encoder.layer = torch.nn.ModuleList()
    model.cls.predictions.transform = torch.nn.Identity()
    seen: dict[str, torch.Tensor] = {}
    model.bert.embeddings.register_forward_hook(lambda m, i, o: seen.setdefault("emb", o))
    model.cls.predictions.decoder.register_forward_pre_hook(
        lambda m, a: seen.setdefault("head_in", a[0]))
    mlm_logits(model)
    with torch.no_grad():
        raw = model.bert.embeddings.forward(input_ids=batch(99)["input_ids"])  # no hooks
    assert (seen["emb"] - raw).abs().max() > 0.1  # the block changed the embeddings
    torch.testing.assert_close(seen["head_in"], raw, atol=1e-5, rtol=0)


def test_invertible_adapter_trains_in_an_mlm_stage():
    peft = method("adapter_pfeiffer", invertible=True, reduction_factor=2)
    model = peft.apply(mlm_model())
    model.train()
    b = batch(0)
    labels = b["input_ids"].clone()
    out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=labels)
    out.loss.backward()
    inv = {n: p for n, p in model.named_parameters() if ".invertible_adapters." in n}
    assert len(inv) == 8 and all(p.requires_grad for p in inv.values())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in inv.values()), [
        n for n, p in inv.items() if p.grad is None or not p.grad.abs().sum()]
    state = peft.trainable_state(model)
    assert set(inv) <= set(state)  # saved in the language artefact


def _language_artefact(tmp_path: Path, seed: int, **extra) -> Path:
    peft = method("adapter_pfeiffer", invertible=True, reduction_factor=2, **extra)
    model = peft.apply(mlm_model(seed))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-2, weight_decay=0.0)
    for step in range(3):
        b = batch(step)
        model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
              labels=b["input_ids"]).loss.backward()
        opt.step()
        opt.zero_grad()
    return save_tensors(tmp_path / f"lang{seed}.safetensors", peft.trainable_state(model))


@pytest.mark.parametrize("family", FAMILIES)
def test_invertible_adapter_is_on_the_input_path_of_every_family(family):
    """T5's forward embeds with encoder/decoder.embed_tokens, tied to but not ``shared``
    (its embeddings entry): a hook on ``shared`` alone never ran (the adapter got no
    gradient)."""
    model = method("adapter_pfeiffer", invertible=True).apply(tiny_model(0, family))
    model.train()
    model(**batch(0)).loss.backward()
    inv = {n: p.grad for n, p in model.named_parameters() if "invertible_adapters" in n}
    assert inv and all(g is not None and g.abs().sum() > 0 for g in inv.values()), family


def test_stacked_artefact_brings_its_invertible_adapter_frozen(tmp_path):
    lang = _language_artefact(tmp_path, 1, train_layernorm=False)
    saved = {k: v for k, v in load_tensors(lang).items() if ".invertible_adapters." in k}
    assert saved
    peft = method("adapter_pfeiffer", stack_on=[str(lang)], train_layernorm=False)
    model = peft.apply(tiny_model())
    inv = {n: p for n, p in model.named_parameters() if ".invertible_adapters." in n}
    assert {n.replace(".stack0.", ".adapter.") for n in inv} == set(saved)
    assert all(torch.equal(p, saved[n.replace(".stack0.", ".adapter.")]) for n, p in inv.items())
    before = logits(model)
    train_steps(model, steps=2, lr=5e-2)
    assert not any(p.requires_grad for p in inv.values())
    assert all(torch.equal(p, saved[n.replace(".stack0.", ".adapter.")]) for n, p in inv.items())
    assert not any(".invertible_adapters." in k for k in peft.trainable_state(model))
    # the frozen block runs on the classifier's embeddings: without it the output differs
    fresh = method("adapter_pfeiffer", stack_on=[str(lang)], train_layernorm=False)
    again = fresh.apply(tiny_model())
    assert torch.allclose(logits(again), before, atol=1e-6)
    again.bert.invertible_adapters.stack0.F[2].weight.data.zero_()
    again.bert.invertible_adapters.stack0.G[2].weight.data.zero_()
    assert not torch.allclose(logits(again), before, atol=1e-6)


def test_stacked_invertible_adapter_of_another_width_stops_with_the_fix(tmp_path):
    lang = _language_artefact(tmp_path, 1)
    wide = {k: torch.cat([v, v], dim=-1) if k.endswith("F.0.weight") else v
            for k, v in load_tensors(lang).items()}
    wide = {k: (torch.cat([v, v]) if k.endswith(("F.2.weight", "F.2.bias")) else v)
            for k, v in wide.items()}
    path = save_tensors(tmp_path / "wide.safetensors", wide)
    with pytest.raises(FtlabError, match="same model family"):
        method("adapter_pfeiffer", stack_on=[str(path)]).apply(tiny_model())


def test_stacking_hands_over_the_language_stages_layernorms(tmp_path):
    lang = _language_artefact(tmp_path, 1, train_layernorm=True)
    saved = load_tensors(lang)
    pretrained = {n: p.detach().clone() for n, p in block_norm_parameters(tiny_model()).items()}
    assert any(not torch.equal(saved[n], p) for n, p in pretrained.items())  # they trained
    for train_layernorm in (False, True):
        model = method("adapter_pfeiffer", stack_on=[str(lang)],
                       train_layernorm=train_layernorm).apply(tiny_model())
        norms = block_norm_parameters(model)
        assert set(norms) == set(pretrained) and set(norms) <= set(saved)
        assert all(torch.equal(p, saved[n]) for n, p in norms.items())
        assert all(p.requires_grad == train_layernorm for p in norms.values())


def test_madx_stages_get_the_paper_settings_and_the_methods_lr(make_cfg, sentiment_dir):
    stages = resolve(make_cfg, tiny_overrides(sentiment_dir) + ["pipeline=madx"])
    lang, task = stages["lang"], stages["task"]
    assert lang.peft["invertible"] is True and lang.peft["reduction_factor"] == 2
    assert not lang.peft["train_layernorm"] and not task.peft["train_layernorm"]
    assert not task.peft.get("invertible", False) and task.peft["reduction_factor"] == 16
    assert lang.optim.lr == pytest.approx(1e-4)  # stage=mlm's own lr
    assert task.optim.lr == pytest.approx(1e-3)  # peft=adapter_pfeiffer's, not DEFAULT_LR 5e-5


@pytest.mark.parametrize(("node", "lr"), [
    ({"_target_": "ftlab.peft.adapter.BottleneckAdapter", "placement": "houlsby"}, 1e-3),
    ({"_target_": "ftlab.peft.hf.HfPeft", "config": {"_target_": "peft.LoraConfig", "r": 4}},
     5e-4),
    ({"_target_": "ftlab.peft.hf.HfPeft", "config": {"_target_": "peft.IA3Config"}}, 3e-3),
    ({"_target_": "ftlab.peft.full.Full"}, 5e-5),
    ({"_target_": "ftlab.peft.hf.HfPeft"}, None),  # LoRA? IA3? ambiguous: none
    ({"_target_": "mypkg.Method"}, None),
])
def test_an_inline_peft_node_without_lr_takes_its_groups_lr(node, lr):
    assert group_lr(node, CONFIG_DIR) == (None if lr is None else pytest.approx(lr))


def test_an_inline_peft_nodes_own_lr_and_the_stages_still_win(make_cfg, sentiment_dir):
    base = tiny_overrides(sentiment_dir) + ["pipeline=madx"]
    own = resolve(make_cfg, base + ["+pipeline.stages.task.peft.lr=2e-4"])["task"]
    assert own.optim.lr == pytest.approx(2e-4) and "lr" not in own.peft
    stage = resolve(make_cfg, base + ["pipeline.stages.task.optim.lr=3e-5"])["task"]
    assert stage.optim.lr == pytest.approx(3e-5)


def test_the_task_adapters_cache_key_follows_the_adapter_it_stacks_on(make_cfg, sentiment_dir,
                                                                      tmp_path):
    """A changed language stage (or another run's stacked artefact) is a new task key: the task
    stage starts from ``pretrained``, so only ``stack_on`` ties it to what it stacks on."""
    from ftlab.pipeline import build_pipeline
    from ftlab.stage_keys import pipeline_keys

    def keys(*extra: str) -> dict[str, str]:
        cfg = make_cfg(tiny_overrides(sentiment_dir) + ["pipeline=madx", *extra])
        return pipeline_keys(build_pipeline(cfg), Path(cfg.paths.output_dir))

    base, changed = keys(), keys("pipeline.stages.lang.optim.lr=5e-3")
    assert changed["lang"] != base["lang"] and changed["task"] != base["task"]
    run_dir = tmp_path / "run"  # the language artefact of this run, written by a first run:
    save_tensors(run_dir / "lang" / "trainable.safetensors", {"x": torch.zeros(1)})
    assert keys() == base  # ... enters by the lang stage's key, not by the file
    other = tmp_path / "other" / "lang" / "trainable.safetensors"
    save_tensors(other, {"x": torch.zeros(1)})
    ext = f"pipeline.stages.task.peft.stack_on=[{other}]"
    before = keys(ext)["task"]
    save_tensors(other, {"x": torch.ones(2)})  # another run's artefact, retrained in place
    assert keys(ext)["task"] != before


def test_a_madx_run_moved_elsewhere_loads_the_language_adapter_it_holds(make_cfg, sentiment_dir,
                                                                        tmp_path):
    """The task stage's card names the language adapter by its absolute path in the folder it
    was trained in (``${paths.output_dir}/lang/...``): a run folder moved or copied elsewhere
    (the original gone) stopped with "peft.stack_on: no artefact at '<old>/lang/...'"."""
    import shutil

    import ftlab
    from ftlab.run import run

    cfg = make_cfg([*tiny_overrides(sentiment_dir), "pipeline=madx", "stage.optim.lr=3e-3",
                    "pipeline.stages.lang.trainer.max_steps=2",
                    "pipeline.stages.task.trainer.max_steps=2"])
    assert run(cfg)["status"] == "ok"
    texts = ["great superb film", "the plot was dull and the ending awful"]
    before = ftlab.load(cfg.paths.output_dir).predict(texts)
    moved = shutil.move(cfg.paths.output_dir, tmp_path / "elsewhere")
    assert ftlab.load(moved).predict(texts) == before
