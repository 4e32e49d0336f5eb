"""Method-specific behaviour beyond the shared contract (tests/test_peft_contract.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

from ftlab.errors import FtlabError
from ftlab.peft.base import count_parameters
from ftlab.peft.intrinsic import SCALE, SEED, THETA
from ftlab.run import run
from ftlab.store import load_tensors, save_tensors
from tests.conftest import tiny_overrides
from tests.test_peft_contract import batch, logits, method, tiny_model, train_steps


def trainable_names(model: torch.nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def test_bitfit_trains_only_biases_and_head():
    model = method("bitfit").apply(tiny_model())
    names = trainable_names(model)
    assert all(n.endswith(".bias") or n.startswith("classifier.") for n in names)
    assert "classifier.weight" in names and "bert.encoder.layer.0.output.dense.bias" in names
    backbone = sum(p.numel() for n, p in model.named_parameters()
                   if p.requires_grad and not n.startswith("classifier."))
    assert backbone / sum(p.numel() for p in model.parameters()) < 0.01


def test_last_layer_top_k_trains_head_and_top_layers():
    assert trainable_names(method("last_layer").apply(tiny_model())) == [
        "classifier.weight", "classifier.bias"]
    names = trainable_names(method("last_layer", top_k=1).apply(tiny_model()))
    assert any(n.startswith("bert.encoder.layer.1.") for n in names)
    assert not any(n.startswith("bert.encoder.layer.0.") for n in names)



@pytest.mark.parametrize(("model", "stage"), [("tiny_gpt2", "clm"), ("tiny_t5", "text2text"),
                                              ("tiny_llama", "cloze")])
def test_last_layer_on_a_tied_lm_head_is_refused_before_training(model, stage, make_cfg,
                                                                  sentiment_dir, tmp_path):
    """An LM head tied to the input embeddings is backbone: head-only training would train
    nothing (the optimiser's 'empty parameter list' traceback mid-run); refused with the fix."""
    with pytest.raises(SystemExit):
        run(make_cfg([*tiny_overrides(sentiment_dir), f"model={model}", f"stage={stage}",
                      "peft=last_layer", "trainer.max_steps=1",
                      "stage.task.verbalizer={neg: bad, pos: good}" if stage == "cloze"
                      else "seed=1"]))
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert record["status"] == "error" and "peft.top_k=1" in record["error"], record
    assert record["stages"] == {}  # refused while checking the run: nothing trained
    assert not (tmp_path / "run" / "error.log").exists()  # no traceback


def test_a_method_that_leaves_nothing_to_train_is_refused_before_training(
        make_cfg, sentiment_dir, tmp_path, monkeypatch):
    """Any method (a contributor's too) that freezes every parameter stops at the checks."""
    from ftlab.peft.bitfit import BitFit

    monkeypatch.setattr(BitFit, "apply", lambda self, model: model.requires_grad_(False))
    with pytest.raises(SystemExit):
        run(make_cfg([*tiny_overrides(sentiment_dir), "peft=bitfit", "trainer.max_steps=1"]))
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert "peft=bitfit left no parameter" in record["error"] and record["stages"] == {}


def test_prompt_learning_on_a_masked_lm_cloze_stage_names_the_stage_and_the_model(
        make_cfg, sentiment_dir, tmp_path):
    with pytest.raises(SystemExit):
        run(make_cfg([*tiny_overrides(sentiment_dir), "model=tiny_electra", "stage=cloze",
                      "stage.task.verbalizer={neg: bad, pos: good}", "peft=prompt_tuning",
                      "trainer.max_steps=1"]))
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert "an ElectraForMaskedLM (masked LM)" in record["error"], record["error"]
    assert "stage=cloze on an encoder" in record["error"] and record["stages"] == {}

@pytest.mark.parametrize(("name", "per_layer"), [("adapter_houlsby", 2), ("adapter_pfeiffer", 1)])
def test_adapters_placement_and_near_identity_init(name, per_layer):
    plain = logits(tiny_model())
    model = method(name).apply(tiny_model())
    adapters = [n for n, _ in model.named_modules() if n.endswith("adapters.adapter")]
    assert len(adapters) == per_layer * 2
    torch.testing.assert_close(logits(model), plain, atol=1e-2, rtol=0)  # near identity
    assert not torch.equal(logits(model), plain)  # but the hooks do run


def test_adapters_name_unsupported_architectures():
    cfg = AutoConfig.for_model("albert", vocab_size=100, embedding_size=16, hidden_size=16,
                               num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32, num_labels=2)
    albert = AutoModelForSequenceClassification.from_config(cfg)
    with pytest.raises(FtlabError, match="(?s)'albert'.*BERT.*GPT-2.*Llama.*T5"):
        method("adapter_pfeiffer").apply(albert)


def _trained_adapter(tmp_path: Path, seed: int, name: str, **extra) -> Path:
    peft, base = method("adapter_pfeiffer", **extra), tiny_model()
    torch.manual_seed(seed)  # a different adapter init per language
    model = peft.apply(base)
    train_steps(model, steps=3, lr=5e-2)
    return save_tensors(tmp_path / f"{name}.safetensors", peft.trainable_state(model))


def test_adapter_stacking_madx(tmp_path):
    lang_a = _trained_adapter(tmp_path, 1, "lang_a", reduction_factor=2)
    lang_b = _trained_adapter(tmp_path, 2, "lang_b", reduction_factor=2)
    peft = method("adapter_pfeiffer", stack_on=[str(lang_a)])
    model = peft.apply(tiny_model())
    stacked = [p for n, p in model.named_parameters() if ".adapters.stack0." in n]
    assert stacked and not any(p.requires_grad for p in stacked)
    frozen = [p.detach().clone() for p in stacked]
    train_steps(model, steps=3, lr=5e-2)
    assert all(torch.equal(a, b.detach()) for a, b in zip(frozen, stacked, strict=True))
    task = peft.trainable_state(model)
    assert not any(".stack0." in k for k in task)  # the task artefact holds the task adapter
    on_a = logits(model)
    # inference: the same task adapter on the same / another language adapter
    again = method("adapter_pfeiffer", stack_on=[str(lang_a)])
    m_a = again.apply(tiny_model())
    again.load_trainable_state(m_a, task)
    torch.testing.assert_close(logits(m_a), on_a)
    other = method("adapter_pfeiffer", stack_on=[str(lang_b)])
    m_b = other.apply(tiny_model())
    other.load_trainable_state(m_b, task)
    assert not torch.allclose(logits(m_b), on_a, atol=1e-5)  # the stack changes the output
    with pytest.raises(FtlabError, match="no artefact"):
        method("adapter_pfeiffer", stack_on=[str(tmp_path / "missing.safetensors")]).apply(
            tiny_model())


def test_diff_pruning_artefact_has_target_sparsity():
    peft = method("diff_pruning", keep=0.01)
    model = peft.apply(tiny_model())
    train_steps(model, steps=3)
    assert model.extra_loss() > 0
    state = peft.trainable_state(model)
    kept = sum(v.numel() for k, v in state.items() if k.endswith(".delta_idx"))
    backbone = sum(p.numel() for p in tiny_model().bert.parameters())
    assert kept == pytest.approx(0.01 * backbone, abs=1)
    assert set(k for k in state if not k.endswith((".delta_idx", ".delta_val"))) == {
        "model.classifier.weight", "model.classifier.bias"}


def test_intrinsic_projection_follows_the_run_seed_unless_fixed():
    """peft.seed was 0 for every run, so a seed sweep never varied the random projection (its
    spread understated what a new projection changes); unset, it is drawn from the run's
    seed (torch's generator), and a fixed seed keeps one projection."""
    def projection_seed(run_seed: int, **kw) -> int:
        model = tiny_model()
        torch.manual_seed(run_seed)  # as the run seeds before building the stage's model
        return method("intrinsic", d=64, **kw).apply(model).seed

    assert projection_seed(1) == projection_seed(1) != projection_seed(2)
    assert projection_seed(1, seed=7) == projection_seed(2, seed=7) == 7


def test_intrinsic_artefact_is_d_numbers_and_seed():
    peft = method("intrinsic", d=64, seed=7)
    model = peft.apply(tiny_model())
    train_steps(model, steps=3, lr=0.5)
    state = peft.trainable_state(model)
    assert state[THETA].numel() == 64 and state[SEED].item() == 7
    assert set(state) == {THETA, SEED, "model.classifier.weight", "model.classifier.bias"}
    # a fresh model built with another seed re-projects from the artefact's seed
    other = method("intrinsic", d=64, seed=8)
    fresh = other.apply(tiny_model())
    other.load_trainable_state(fresh, state)
    for a, b in zip(model.weights().values(), fresh.weights().values(), strict=True):
        assert torch.equal(a, b)
    changed = [w for w, o in zip(model.weights().values(), model.originals(), strict=True)
               if not torch.equal(w, o)]
    assert len(changed) == len(model.names)  # theta moves every projected tensor


def test_lora_artefact_loads_with_peft_from_pretrained(tmp_path):
    from peft import PeftModel

    peft = method("lora")
    model = peft.apply(tiny_model())
    train_steps(model, steps=3)
    expected = logits(model)
    folder = peft.save(model, tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model(), str(folder))
    torch.testing.assert_close(logits(loaded), expected)


def test_drop_top_and_reinit_top_combine_with_any_method():
    model = method("bitfit", drop_top=1).apply(tiny_model())
    assert len(model.bert.encoder.layer) == 1 and model.config.num_hidden_layers == 1
    ref = tiny_model()
    model = method("lora", reinit_top=1).apply(tiny_model())
    top = model.base_model.model.bert.encoder.layer[1].intermediate.dense
    assert not torch.equal(top.weight, ref.bert.encoder.layer[1].intermediate.dense.weight)
    assert top.weight.requires_grad  # re-initialised layers train (and are saved)
    with pytest.raises(FtlabError, match="does not fit"):
        method("full", drop_top=2, reinit_top=1).apply(tiny_model())


def test_stage_reports_counts_and_writes_hf_peft_folder(make_cfg, sentiment_dir):
    cfg = make_cfg(tiny_overrides(sentiment_dir) + [
        "peft=lora", "stage.trainer.max_epochs=1", "stage.optim.lr=3e-3"])
    record = run(cfg)
    info = record["stages"]["classify"]
    assert 0 < info["params_trainable_pct"] < 100 and info["artefact_kb"] > 0
    folder = Path(info["artefact_dir"])
    assert (folder / "adapter_config.json").is_file()
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == 8
    full = count_parameters(tiny_model())["params_total"]
    assert info["params_total"] > full  # LoRA adds parameters on top of the model


def test_madx_pipeline_trains_task_adapter_on_frozen_language_adapter(make_cfg, sentiment_dir):
    cfg = make_cfg(tiny_overrides(sentiment_dir) + [
        "pipeline=madx", "pipeline.stages.lang.trainer.max_steps=4",
        "pipeline.stages.lang.task.max_length=32", "pipeline.stages.lang.optim.lr=1e-2",
        "pipeline.stages.task.trainer.max_epochs=1", "pipeline.stages.task.optim.lr=3e-3"])
    record = run(cfg)
    assert record["status"] == "ok", record
    lang = load_tensors(record["stages"]["lang"]["artefact"])
    task = load_tensors(record["stages"]["task"]["artefact"])
    assert any(".adapters.adapter." in k for k in lang)
    assert any(".adapters.adapter." in k for k in task)
    assert not any(".stack0." in k for k in task)  # the language adapter stayed frozen, unsaved
    assert any(".invertible_adapters.adapter." in k for k in lang)  # MAD-X's, on by default
    assert not any(".invertible_adapters." in k for k in task)  # loaded frozen, not saved


def test_diff_pruning_penalty_enters_the_training_loss():
    from ftlab.module import FineTuneModule
    from ftlab.optim import OptimSpec
    from ftlab.regularizers.none import NoRegularizer
    from ftlab.tasks.classify import Classify

    task = Classify()
    task.labels = ["neg", "pos"]
    peft = method("diff_pruning", l0_penalty=10.0)
    module = FineTuneModule(peft.apply(tiny_model()), task, NoRegularizer(), OptimSpec())
    torch.manual_seed(0)
    with_penalty = module.training_step(batch(0), 0)
    module.model.l0_penalty = 0.0
    torch.manual_seed(0)
    without = module.training_step(batch(0), 0)
    open_gates = torch.sigmoid(torch.tensor(3.0)).item()  # all gate logits start at 3.0
    assert (with_penalty - without).item() == pytest.approx(10.0 * open_gates, rel=1e-4)


def test_fastfood_hadamard_matches_the_explicit_matrix():
    from ftlab.peft.intrinsic import _hadamard, fwht

    for n in (1, 2, 64, 128, 4096):  # one block, and products of 2^6 blocks
        x = torch.randn(n, dtype=torch.float64)
        h = _hadamard(n, x)
        assert torch.equal(h @ h.T, n * torch.eye(n, dtype=x.dtype))
        torch.testing.assert_close(fwht(x), h @ x)


def test_said_spends_one_scale_per_tensor_and_round_trips():
    peft = method("intrinsic", d=64, seed=7, said=True)
    model = peft.apply(tiny_model())
    m = len(model.names)
    assert model.theta.numel() == 64 - m and model.scale.numel() == m  # d numbers in all
    train_steps(model, steps=3, lr=0.5)
    assert not torch.equal(model.scale.detach(), torch.ones(m))  # the scales learn
    state = peft.trainable_state(model)
    assert state[THETA].numel() + state[SCALE].numel() == 64
    again = method("intrinsic", d=64, seed=7, said=True)
    fresh = again.apply(tiny_model())
    again.load_trainable_state(fresh, state)
    for a, b in zip(model.weights().values(), fresh.weights().values(), strict=True):
        assert torch.equal(a, b)
    plain = method("intrinsic", d=64, seed=7)
    with pytest.raises(FtlabError, match="disagree on SAID"):
        plain.load_trainable_state(plain.apply(tiny_model()), state)
    with pytest.raises(FtlabError, match="SAID needs d larger"):
        method("intrinsic", d=4, said=True).apply(tiny_model())


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_prompt_tuned_decoder_classifier_pools_each_rows_last_token(family):
    """peft feeds soft prompts as inputs_embeds, where Transformers cannot find the pads: ftlab
    pools each row's last attended token, so a row's logits do not depend on its batch."""
    model = method("prompt_tuning").apply(tiny_model(0, family)).eval()
    short, long = [2, 11, 12, 3], [2, 21, 22, 23, 24, 25, 26, 3]
    pad = model.config.pad_token_id
    ids = torch.tensor([short + [pad] * 4, long])
    mask = (torch.arange(8) < torch.tensor([[4], [8]])).long()
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([short]), attention_mask=torch.ones(1, 4)).logits
        batched = model(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(batched[0], alone[0], atol=1e-5), (batched[0], alone[0])
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([long]), attention_mask=torch.ones(1, 8)).logits
    assert torch.allclose(batched[1], alone[0], atol=1e-5)


@pytest.mark.parametrize(("name", "extra", "expected"), [
    ("diff_pruning", {"keep": 0}, r"keep=0 is not a fraction in \(0, 1\].*Fix: use e.g. peft.keep"),
    ("diff_pruning", {"keep": 2.0}, r"keep=2.0 is not a fraction"),  # was topk's RuntimeError
    ("diff_pruning", {"l0_penalty": -1}, r"l0_penalty=-1 is negative.*Fix: use peft.l0_penalty"),
    ("movement_pruning", {"sparsity": 1.0}, r"sparsity=1.0 is not a fraction in \[0, 1\)"),
    ("movement_pruning", {"sparsity": -0.2}, r"sparsity=-0.2 is not a fraction.*Fix: use e.g."),
    ("intrinsic", {"d": 0}, r"d=0 is not between 1 and the [\d,]+ backbone weights.*Fix: use"),
    ("intrinsic", {"d": 10**5}, r"d=100000 is not between 1 and the 18,144"),  # > the model
    ("last_layer", {"top_k": -1}, r"top_k=-1 is not a layer count of a stack of 2 layers.*"
                                  r"Fix: use peft.top_k between 0 \(head only\) and 2"),
    ("last_layer", {"top_k": 3}, r"top_k=3 is not a layer count"),
    ("adapter_pfeiffer", {"reduction_factor": 0}, r"reduction_factor=0 is not a reduction factor"),
    ("adapter_pfeiffer", {"reduction_factor": -4}, r"reduction_factor=-4 is not a reduction"),
    ("adapter_pfeiffer", {"reduction_factor": 64}, r"reduction_factor=64 leaves no bottleneck "
                                                   r"unit for a hidden size of 32.*<= 32"),
    ("adapter_pfeiffer", {"invertible": True, "invertible_reduction": 0},
     r"invertible_reduction=0 is not a reduction factor"),
    ("adapter_pfeiffer", {"invertible": True, "invertible_reduction": 17},
     r"invertible_reduction=17 leaves no bottleneck unit"),
    ("adapter_houlsby", {"init_std": -1.0}, r"init_std=-1.0 is negative"),
    ("full", {"drop_top": 2}, r"drop_top=2 \+ reinit_top=0 does not fit a stack of 2 layers.*"
                              r"Fix: choose drop_top < 2"),
    ("bitfit", {"reinit_top": -1}, r"reinit_top=-1: a layer count is negative.*Fix: use counts"),
])
def test_nonsense_sizes_stop_with_the_problem_and_the_fix(name, extra, expected):
    """Not a traceback (ZeroDivisionError, topk's RuntimeError) and not a silent no-op (a top_k
    that trains no layer, a bottleneck clamped to 1 unit, a model with its layers dropped)."""
    with pytest.raises(FtlabError, match=f"(?s){expected}"):
        method(name, **extra).apply(tiny_model())
