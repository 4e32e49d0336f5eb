"""Masked-LM adaptive fine-tuning, the auxiliary MLM loss and ULMFiT options on a tiny BERT."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from ftlab.callbacks import GradualUnfreeze
from ftlab.config import bind_schema
from ftlab.data.batching import PadCollator
from ftlab.errors import FtlabError
from ftlab.model.backbone import ModelSpec, load_tokenizer
from ftlab.optim import OptimSpec, build_optimizer, layer_depths
from ftlab.pipeline import build_pipeline
from ftlab.run import run
from ftlab.tasks.aux_mlm import AuxMLM
from ftlab.tasks.classify import Classify
from ftlab.tasks.mlm import MaskedLM, split_mlm
from ftlab.validate import check_configs
from tests.conftest import (
    compose_cfg,
    loss_before_after,
    masked_lm_folder,
    synthetic_rows,
    tiny_overrides,
)

TEXTS = [r["text"] for r in synthetic_rows(64, seed=5)]


@pytest.fixture
def tiny(make_cfg, sentiment_dir):
    """(spec, tokenizer) of the tiny BERT from the real conf/model/tiny_bert.yaml."""
    cfg = make_cfg(tiny_overrides(sentiment_dir))
    spec = bind_schema(ModelSpec, cfg.model, "model")
    return spec, load_tokenizer(spec)


def batch_for(task: MaskedLM, tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    feats = task.featurize({"text": texts})
    rows = [dict(zip(feats, vals, strict=True)) for vals in zip(*feats.values(), strict=True)]
    return PadCollator(tokenizer.pad_token_id)(rows)


def test_packing_fills_blocks_and_keeps_special_tokens(tiny):
    spec, tok = tiny
    task = MaskedLM(max_length=32, pack=True)
    task.bind(None, tok, ["text"])
    feats = task.featurize({"text": TEXTS})
    lengths = feats["length"]
    assert all(n == 32 for n in lengths[:-1]) and lengths[-1] <= 32  # only the last is short
    assert all(ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
               for ids in feats["input_ids"])
    unpacked = MaskedLM(max_length=32, pack=False)
    unpacked.bind(None, tok, ["text"])
    assert len(unpacked.featurize({"text": TEXTS})["input_ids"]) == len(TEXTS) > len(lengths)


def test_masking_rate_specials_and_whole_words(tiny):
    spec, tok = tiny
    task = MaskedLM(max_length=64, mask_prob=0.3, whole_word=True, pack=True)
    task.bind(None, tok, ["text"])
    batch = batch_for(task, tok, TEXTS * 4 + ["the unbelievably charming moviemaker"] * 40)
    torch.manual_seed(0)
    inputs, labels = task.mask(batch, train=True)
    chosen = labels != -100
    special = torch.isin(batch["input_ids"], task.special)
    assert not (chosen & special).any()  # [CLS]/[SEP]/[PAD] are never predicted
    rate = chosen.sum() / (~special).sum()
    assert 0.2 < rate < 0.4, rate
    assert (inputs[chosen] == tok.mask_token_id).float().mean() > 0.7  # ~80% become [MASK]
    # whole-word: a '##' piece is chosen exactly when the piece before it is
    cont = task.continues[batch["input_ids"]]
    cont &= ~torch.roll(special, 1, dims=1)  # a word cut by a block edge starts the block
    prev = torch.roll(chosen, 1, dims=1)
    assert torch.equal(chosen[cont], prev[cont])
    # evaluation masks are deterministic
    a, b = task.mask(batch, train=False), task.mask(batch, train=False)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_whole_word_masking_groups_byte_level_bpe_words_and_refuses_unmarked_vocabularies(
        tmp_path):
    """A byte-level BPE vocabulary (RoBERTa, GPT-2) has no '##' pieces: whole_word=true masked
    each piece on its own, silently. A piece without the 'Ġ' word-start mark continues its word;
    a vocabulary with no marks at all is refused."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from ftlab.errors import FtlabError
    from tests.test_tokens import byte_level_tokenizer

    tok = byte_level_tokenizer(tmp_path)
    task = MaskedLM(max_length=64, mask_prob=0.3, whole_word=True, pack=False)
    task.bind(None, tok, ["text"])
    batch = batch_for(task, tok, ["the quickbrown foxjumps overlazy dogin NewYork"] * 200)
    torch.manual_seed(0)
    _, labels = task.mask(batch, train=True)
    chosen, ids = labels != -100, batch["input_ids"]
    pieces = tok.convert_ids_to_tokens(ids[0].tolist())
    inside = torch.tensor([not p.startswith("Ġ") for p in pieces])
    inside[0] = False  # the text's first piece starts its word
    assert inside.sum() >= 8 and chosen.any()
    assert torch.equal(chosen[:, inside], torch.roll(chosen, 1, dims=1)[:, inside])
    rate = chosen.float().mean()
    assert 0.2 < rate < 0.4, rate

    plain = Tokenizer(models.WordLevel({"[UNK]": 0, "[MASK]": 1, "the": 2, "film": 3},
                                       unk_token="[UNK]"))
    plain.pre_tokenizer = pre_tokenizers.Whitespace()
    words = PreTrainedTokenizerFast(tokenizer_object=plain, unk_token="[UNK]",
                                    mask_token="[MASK]")
    MaskedLM(whole_word=False).bind(None, words, ["text"])  # fine without whole words
    with pytest.raises(FtlabError, match="whole_word=false"):
        MaskedLM(whole_word=True).bind(None, words, ["text"])


@pytest.mark.parametrize("pack", [True, False])
def test_a_max_length_with_no_room_beside_cls_and_sep_is_refused(tiny, pack):
    """max_length=2 left packed blocks no body (a ValueError on the first row) and unpacked
    rows no text ([CLS] [SEP] only)."""
    from ftlab.errors import FtlabError

    _, tok = tiny
    with pytest.raises(FtlabError, match=r"(?s)max_length=2 leaves no room.*at least 3"):
        MaskedLM(max_length=2, pack=pack).bind(None, tok, ["text"])
    task = MaskedLM(max_length=3, pack=pack)
    task.bind(None, tok, ["text"])
    assert all(len(x) == 3 for x in task.featurize({"text": TEXTS[:4]})["input_ids"])


def test_masked_only_logits_equal_the_full_computation(tiny):
    spec, tok = tiny
    task = MaskedLM(max_length=32)
    task.bind(None, tok, ["text"])
    torch.manual_seed(0)
    model = task.build_model(spec).eval()
    batch = batch_for(task, tok, TEXTS[:16])
    inputs, labels = task.mask(batch, train=False)
    where = labels != -100
    encoder, head = split_mlm(model)
    with torch.no_grad():
        full = model(input_ids=inputs, attention_mask=batch["attention_mask"]).logits
        hidden = encoder(input_ids=inputs, attention_mask=batch["attention_mask"])[0]
        sparse = head(hidden[where])
        torch.testing.assert_close(sparse, full[where], rtol=1e-5, atol=1e-5)
        loss_sparse, n = task.masked_loss(model, inputs, labels, batch)
        task.sparse_logits = False
        loss_full, _ = task.masked_loss(model, inputs, labels, batch)
    torch.testing.assert_close(loss_sparse, loss_full, rtol=1e-5, atol=1e-5)
    assert n == where.sum()


def test_empty_texts_are_dropped_and_a_batch_with_nothing_to_mask_has_loss_zero(tiny):
    """Unpacked, an empty text became a row of [CLS] [SEP] only; a batch of such rows (the
    shortest rows batch together) stopped the run with an IndexError in ``mask``. Such rows
    are dropped; a batch with no maskable token (the auxiliary MLM on empty rows) predicts
    nothing and has loss 0, not NaN."""
    spec, tok = tiny
    task = MaskedLM(max_length=32, pack=False)
    task.bind(None, tok, ["text"])
    assert task.featurize({"text": ["", "the film", " "]})["input_ids"] == [
        tok("the film")["input_ids"]]
    torch.manual_seed(0)
    model = task.build_model(spec)
    empty = PadCollator(tok.pad_token_id)([tok("")] * 2)
    for sparse in (True, False):
        task.sparse_logits = sparse
        out = task.forward(model, empty)
        assert out.loss.item() == 0.0 and out.extras["count"] == 0
        out.loss.backward()
    cls = Classify()
    cls.labels, cls.tokenizer, cls.text_columns = ["neg", "pos"], tok, ["text"]
    aux = AuxMLM(cls, weight=0.5)
    aux.mlm.bind(None, tok, ["text"])
    classifier = aux.build_model(spec).train()
    batch = {**empty, "labels": torch.tensor([0, 1])}
    torch.manual_seed(1)
    plain = cls.forward(classifier, batch).loss
    torch.manual_seed(1)
    torch.testing.assert_close(aux.forward(classifier, batch).loss, plain)


def test_mlm_loss_decreases(tiny):
    spec, tok = tiny
    task = MaskedLM(max_length=32)
    task.bind(None, tok, ["text"])
    torch.manual_seed(0)
    model = task.build_model(spec)
    batch = batch_for(task, tok, TEXTS)
    before, after = loss_before_after(task, model, batch, steps=40)
    assert after < before - 1.0, before


def test_mlm_stage_reports_loss_perplexity_and_fresh_head(make_cfg, sentiment_dir):
    cfg = make_cfg(tiny_overrides(sentiment_dir) + [
        "stage=mlm", "stage.batch_size=16", "stage.trainer.max_steps=8",
        "stage.task.max_length=32", "data.label_column=null"])
    record = run(cfg)
    assert record["status"] == "ok", record
    final, info = record["final"], record["stages"]["mlm"]
    assert final["val/ppl"] == pytest.approx(torch.tensor(final["val/loss"]).exp().item(),
                                             rel=0.05)
    assert final["test/ppl"] == pytest.approx(torch.tensor(final["test/loss"]).exp().item(),
                                              rel=0.05)
    assert info["global_steps"] == 8
    assert "cls.predictions.transform.dense.weight" in info["mlm_head_fresh"]


@pytest.mark.parametrize("saved_head", [False, True])
def test_lora_trains_a_fresh_mlm_head_and_keeps_a_pretrained_one_frozen(saved_head, make_cfg,
                                                                       sentiment_dir, tmp_path):
    """peft's LoRA freezes every parameter it does not add. MiniLM's checkpoint has no MLM head
    (it is created fresh, random), so TAPT with LoRA trained through a random, frozen head
    transform. A fresh head now trains; a checkpoint's own head stays frozen, as LoRA means."""
    from ftlab.store import load_tensors

    over = tiny_overrides(sentiment_dir) + [
        "stage=mlm", "peft=lora", "stage.batch_size=16", "stage.trainer.max_steps=3",
        "stage.task.max_length=32", "data.label_column=null"]
    if saved_head:
        over += masked_lm_folder(tmp_path / "bert_mlm", make_cfg(over).model)
    record = run(make_cfg(over))
    assert record["status"] == "ok", record.get("error")
    assert bool(record["stages"]["mlm"]["mlm_head_fresh"]) is not saved_head
    saved = load_tensors(tmp_path / "run" / "mlm" / "trainable.safetensors")
    head = sorted(k for k in saved if ".predictions." in k)
    assert any("lora_" in k for k in saved)
    assert bool(head) is not saved_head, head  # the transform and bias train where fresh


def test_aux_mlm_adds_a_loss_in_training_only(tiny, make_cfg, sentiment_dir, monkeypatch):
    spec, tok = tiny
    cls = Classify()
    cls.labels, cls.tokenizer, cls.text_columns = ["neg", "pos"], tok, ["text"]
    task = AuxMLM(cls, weight=0.5)
    task.mlm.bind(None, tok, ["text"])
    torch.manual_seed(0)
    model = task.build_model(spec)
    assert model.aux_mlm_head.predictions.decoder.weight is model.get_input_embeddings().weight
    feats = cls.featurize({"text": TEXTS[:8], "label": [1] * 8})
    rows = [dict(zip(feats, vals, strict=True)) for vals in zip(*feats.values(), strict=True)]
    batch = PadCollator(tok.pad_token_id)(rows)
    model.eval()
    with torch.no_grad():
        plain = cls.forward(model, batch).loss
        assert torch.equal(task.forward(model, batch).loss, plain)  # evaluation: task loss only
    model.train()
    torch.manual_seed(1)
    joint = task.forward(model, batch).loss
    assert joint > cls.forward(model, batch).loss + 1.0  # + 0.5 * MLM loss (~ln 2000 = 7.6)
    # in a run, stage.aux_mlm_weight reaches the task that computes the training loss
    weights = []
    real = AuxMLM.forward

    def spy(self, model, batch):
        if model.training:
            weights.append(self.weight)
        return real(self, model, batch)

    monkeypatch.setattr(AuxMLM, "forward", spy)
    record = run(make_cfg(tiny_overrides(sentiment_dir) + [
        "stage.aux_mlm_weight=0.3", "stage.trainer.max_steps=4"]))
    assert record["status"] == "ok", record
    assert weights == [0.3] * 4  # one joint loss per training step


def test_layer_decay_gives_lower_layers_lower_lrs(tiny):
    spec, _ = tiny
    cls = Classify()
    cls.labels = ["a", "b"]
    model = cls.build_model(spec)
    depth, top = layer_depths(model)
    assert top == 3 and depth["bert.embeddings.word_embeddings.weight"] == 0
    assert depth["bert.encoder.layer.1.output.dense.weight"] == 2
    assert depth["classifier.weight"] == top
    opt, _ = build_optimizer(model, OptimSpec(lr=1e-3, layer_decay=0.5), 10)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert lr_of[id(params["classifier.weight"])] == pytest.approx(1e-3)
    assert lr_of[id(params["bert.encoder.layer.1.output.dense.weight"])] == pytest.approx(5e-4)
    assert lr_of[id(params["bert.embeddings.word_embeddings.weight"])] == pytest.approx(1.25e-4)


def test_gradual_unfreezing_trains_only_the_top_group_first(tiny, make_cfg, sentiment_dir,
                                                             monkeypatch):
    spec, _ = tiny
    cls = Classify()
    cls.labels = ["a", "b"]
    torch.manual_seed(0)
    model = cls.build_model(spec)
    module = L.LightningModule()
    module.model = model
    cb = GradualUnfreeze()
    trainer = type("T", (), {"current_epoch": 0, "fast_dev_run": 1})()  # no epoch count
    cb.on_train_start(trainer, module)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    cb.on_after_backward(trainer, module)
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, d in cb.depth.items() if d == cb.top}  # heads + pooler
    trainer.current_epoch = 1
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    cb.on_after_backward(trainer, module)
    assert any(".layer.1." in n for n, p in model.named_parameters() if p.grad is not None)
    assert all(p.grad is None for n, p in model.named_parameters() if ".layer.0." in n)
    # in a run, stage.optim.gradual_unfreeze=true drops lower groups' gradients per epoch
    learning: dict[int, set[str]] = {}
    real = GradualUnfreeze.on_after_backward

    def spy(self, trainer, pl_module):
        real(self, trainer, pl_module)
        learning.setdefault(trainer.current_epoch, set()).update(
            n for n, p in pl_module.model.named_parameters() if p.grad is not None)

    monkeypatch.setattr(GradualUnfreeze, "on_after_backward", spy)
    record = run(make_cfg(tiny_overrides(sentiment_dir) + [
        "stage.optim.gradual_unfreeze=true", "stage.optim.layer_decay=0.9",
        "stage.trainer.max_epochs=2", "trainer.limit_train_batches=3"]))
    assert record["status"] == "ok", record
    assert learning[0] == {n for n, d in cb.depth.items() if d == cb.top}
    assert learning[1] == {n for n, d in cb.depth.items() if d >= cb.top - 1}


def test_gradual_unfreezing_over_one_epoch_is_refused(sentiment_dir, tmp_path, capsys, caplog):
    """One layer group per epoch: a 1-epoch stage trained only its heads and pooler, without
    a word. A fixed length is refused before training; an adaptive budget's once the data is
    batched (256 rows / 16 = 16 steps reach min_steps 10 in one epoch); fewer epochs than
    groups warn which never learn."""
    base = [*tiny_overrides(sentiment_dir), "stage.optim.gradual_unfreeze=true"]

    def make_cfg(extra: list[str]):  # each run its own folder
        return compose_cfg(extra, tmp_path / str(len(list(tmp_path.iterdir()))))

    with pytest.raises(FtlabError, match=r"(?s)1 epoch: only its top group.*"
                       r"stage.trainer.max_epochs=N.*stage.optim.gradual_unfreeze=false"):
        check_configs(build_pipeline(make_cfg([*base, "trainer.max_epochs=1"])))
    with pytest.raises(FtlabError, match="only its top group"):  # max_steps: still 1 epoch
        check_configs(build_pipeline(make_cfg([*base, "trainer.max_steps=100"])))
    check_configs(build_pipeline(make_cfg([*base, "trainer.max_epochs=2"])))
    with pytest.raises(SystemExit):
        run(make_cfg([*base, "trainer.budget.min_steps=10"]))
    assert "only its top group" in capsys.readouterr().err
    record = run(make_cfg([*base, "trainer.max_epochs=2", "trainer.limit_train_batches=2"]))
    assert record["status"] == "ok", record
    assert "unfreezes the top 2 of 4 layer groups; the lowest 2" in caplog.text


def test_a_zip_holding_one_csv_is_read_as_unlabelled_text(tmp_path):
    import zipfile

    from ftlab.data.sources import load_raw
    from ftlab.data.spec import DataSpec

    csv = "article_id,text\n" + "".join(f'{i},"{t}"\n' for i, t in enumerate(TEXTS))
    with zipfile.ZipFile(tmp_path / "news.zip", "w") as zf:
        zf.writestr("News.csv", csv)
    raw = load_raw(DataSpec(files={"all": str(tmp_path / "news.zip")}, label_column=None,
                            split_by="article_id"))
    assert raw.labels is None and sum(len(s) for s in raw.splits.values()) == len(TEXTS)
    assert (tmp_path / "news.zip.d" / "News.csv").read_text() == csv  # extracted beside it


@pytest.mark.parametrize("task_class", ["mlm", "clm", "classify"])
def test_word_list_text_is_tokenised_as_its_words_not_a_python_list(tiny, task_class):
    """TAPT on a tagging task's data (CoNLL: a list of words per row) reads the words joined
    by spaces; it once read "['alice', 'went']" with brackets, quotes and commas."""
    from datasets import Dataset, DatasetDict

    from ftlab.data.sources import RawData
    from ftlab.tasks.clm import CausalLM

    spec, tok = tiny
    words = [t.split() for t in TEXTS[:8]]
    task = {"mlm": lambda: MaskedLM(max_length=32, pack=False),
            "clm": lambda: CausalLM(max_length=32, pack=False), "classify": Classify}[task_class]()
    raw = RawData(DatasetDict({"train": Dataset.from_list([{"text": "x", "label": 0}])}),
                  ["neg", "pos"])
    task.bind(raw, tok, ["text"])
    labels = {"label": [0] * 8}
    as_words = task.featurize({"text": words, **labels})["input_ids"]
    as_text = task.featurize({"text": [" ".join(w) for w in words], **labels})["input_ids"]
    assert as_words == as_text
