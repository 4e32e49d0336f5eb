"""The task seams: typed outputs, declared features and pad values, soft labels, the
regulariser's view of a batch, and the auxiliary MLM loss through every kind of PEFT method."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset, DatasetDict
from omegaconf import OmegaConf

from ftlab.cli import CONFIG_DIR
from ftlab.config import bind_schema, instantiate_checked
from ftlab.data.batching import PadCollator
from ftlab.data.datamodule import TextDataModule
from ftlab.data.sources import RawData
from ftlab.errors import FtlabError
from ftlab.model.backbone import ModelSpec, load_tokenizer
from ftlab.module import FineTuneModule
from ftlab.optim import OptimSpec
from ftlab.peft.base import Penalized, SavesArtefact
from ftlab.pipeline import split_peft
from ftlab.regularizers.none import NoRegularizer
from ftlab.tasks.aux_mlm import AuxMLM
from ftlab.tasks.base import Task, TaskOutput
from ftlab.tasks.classify import Classify
from ftlab.tasks.mlm import MaskedLM
from tests.conftest import synthetic_rows, tiny_overrides


@pytest.fixture(scope="module")
def tiny() -> tuple[ModelSpec, object]:
    """(spec, tokenizer) of conf/model/tiny_bert.yaml."""
    node = OmegaConf.load(Path(CONFIG_DIR) / "model" / "tiny_bert.yaml")
    spec = bind_schema(ModelSpec, node, "model")
    return spec, load_tokenizer(spec)


def raw_data(n: int = 64, seed: int = 3, soft: bool = False) -> RawData:
    rows = synthetic_rows(n, seed)
    label = [float(r["label"] == "pos") for r in rows]
    labels = [[1 - p * 0.8, p * 0.8] for p in label] if soft else [int(p) for p in label]
    ds = Dataset.from_dict({"text": [r["text"] for r in rows], "label": labels})
    return RawData(DatasetDict(train=ds, validation=ds), ["neg", "pos"])


def bound(task: Task, raw: RawData, tokenizer) -> Task:
    task.bind(raw, tokenizer, ["text"])
    return task


def first_batch(task: Task, raw: RawData, tokenizer, batch_size: int = 16) -> dict:
    dm = TextDataModule(raw.splits, task, tokenizer.pad_token_id, batch_size=batch_size)
    return next(iter(dm.train_dataloader()))


# --- the hard-label path is unchanged -------------------------------------------------------

#: sha256 over (name, dtype, shape, bytes) of every batch of one epoch, recorded with the
#: collator and datamodule before tasks declared their features (the FEATURES whitelist)
HARD_LABEL_DIGEST = "a6812d1ad8ad2cb719b899417a72e61a56117ffa8c31d1d83a4e9d723fbe52d3"


def test_hard_label_batches_are_byte_identical_to_the_whitelist_version(tiny):
    _, tok = tiny
    raw = raw_data()
    task = bound(Classify(), raw, tok)
    dm = TextDataModule(raw.splits, task, tok.pad_token_id, batch_size=16, seed=0)
    digest = hashlib.sha256()
    for batch in dm.train_dataloader():
        assert batch["labels"].dtype == torch.long and batch["labels"].dim() == 1
        for k in sorted(batch):
            v = batch[k]
            for part in (k, str(v.dtype), str(tuple(v.shape))):
                digest.update(part.encode())
            digest.update(v.numpy().tobytes())
    assert sorted(batch) == ["attention_mask", "input_ids", "labels", "token_type_ids"]
    assert digest.hexdigest() == HARD_LABEL_DIGEST


# --- declared features ----------------------------------------------------------------------

class Weighted(Classify):
    """Classification that also emits a per-row weight and per-token tags (padded with 7)."""

    pad_values = {"tags": 7}

    def bind(self, raw, tokenizer, text_columns) -> None:
        super().bind(raw, tokenizer, text_columns)
        self.features = (*self.features, "weight", "tags")

    def featurize(self, batch: dict[str, list]) -> dict[str, list]:
        enc = super().featurize(batch)
        enc["weight"] = [0.5] * len(enc["input_ids"])
        enc["tags"] = [[i % 3 for i in range(len(ids))] for ids in enc["input_ids"]]
        enc["scratch"] = [0] * len(enc["input_ids"])  # emitted, not declared: dropped
        return enc


def test_a_declared_extra_feature_survives_the_datamodule_with_its_pad_value(tiny):
    _, tok = tiny
    batch = first_batch(bound(Weighted(), raw_data(), tok), raw_data(), tok)
    assert "scratch" not in batch and "length" not in batch
    assert batch["weight"].dtype == torch.float32 and batch["weight"].tolist() == [0.5] * 16
    tags, mask = batch["tags"], batch["attention_mask"]
    assert tags.dtype == torch.long and tags.shape == batch["input_ids"].shape
    assert (mask == 0).any()  # the batch has padding, so the pad value shows
    assert (tags[mask == 0] == 7).all() and (tags[mask == 1] < 3).all()


def test_a_declared_feature_that_featurize_does_not_emit_fails_clearly(tiny):
    _, tok = tiny
    task = bound(Classify(), raw_data(), tok)
    task.features = (*task.features, "teacher_logits")
    expected = re.compile(r"Classify.featurize did not emit the declared feature\(s\) "
                          r"\['teacher_logits'\].*Fix: emit them", re.S)
    with pytest.raises(FtlabError, match=expected):
        TextDataModule(raw_data().splits, task, tok.pad_token_id, batch_size=16)


def test_a_sequence_feature_without_a_pad_value_fails_clearly():
    rows = [{"input_ids": [1, 2], "spans": [0, 1]}, {"input_ids": [1], "spans": [0]}]
    with pytest.raises(FtlabError, match=re.compile(r"'spans' has no pad value.*Fix: declare",
                                                    re.S)):
        PadCollator(pad_id=0)(rows)


def test_masked_lm_keeps_only_its_token_features(tiny):
    _, tok = tiny
    task = bound(MaskedLM(max_length=32), raw_data(), tok)
    assert sorted(first_batch(task, raw_data(), tok)) == ["attention_mask", "input_ids"]


# --- soft labels ----------------------------------------------------------------------------

def test_collator_keeps_probability_vectors_float_and_pads_token_labels_with_minus_100():
    soft = [{"input_ids": [5, 6, 7], "labels": [0.2, 0.8]},
            {"input_ids": [5], "labels": [1.0, 0.0]}]
    batch = PadCollator(pad_id=0)(soft)
    assert batch["labels"].dtype == torch.float32
    assert torch.equal(batch["labels"], torch.tensor([[0.2, 0.8], [1.0, 0.0]]))  # not padded
    tokens = [{"input_ids": [5, 6, 7], "labels": [1, 2, 3]}, {"input_ids": [5], "labels": [4]}]
    batch = PadCollator(pad_id=0)(tokens)
    assert batch["labels"].dtype == torch.long
    assert batch["labels"].tolist() == [[1, 2, 3], [4, -100, -100]]


def test_soft_labels_give_the_soft_target_cross_entropy(tiny):
    spec, tok = tiny
    raw = raw_data(soft=True)
    task = bound(Classify(), raw, tok)
    batch = first_batch(task, raw, tok)
    assert batch["labels"].dtype == torch.float32 and batch["labels"].shape == (16, 2)
    torch.manual_seed(0)
    model = task.build_model(spec).eval()
    out = task.forward(model, batch)
    expected = -(batch["labels"] * out.logits.log_softmax(-1)).sum(-1).mean()
    torch.testing.assert_close(out.loss, expected)
    # one-hot targets: the same loss as the class ids (HF's own cross-entropy)
    hard = dict(batch, labels=batch["labels"].argmax(-1))
    one_hot = dict(batch, labels=F.one_hot(hard["labels"], 2).float())
    torch.testing.assert_close(task.forward(model, one_hot).loss, task.forward(model, hard).loss)
    metrics = task.metrics()
    task.update(metrics, out, batch)
    acc = (out.logits.argmax(-1) == hard["labels"]).float().mean()
    torch.testing.assert_close(metrics.compute()["acc"], acc)
    labels = raw.splits["validation"]["label"]
    majority = max(sum(p[1] > 0.5 for p in labels), sum(p[1] <= 0.5 for p in labels))
    assert task.baseline(labels)["acc"] == pytest.approx(majority / len(labels))


# --- what regularisers and the module see ---------------------------------------------------

class Recording:
    """A regulariser that keeps what it saw and adds a known term to the task loss."""

    name = "recording"

    def __init__(self) -> None:
        self.seen: list[TaskOutput] = []

    def apply(self, model):
        return model

    def training_loss(self, model, batch, task: Task) -> TaskOutput:
        out = task.forward(model, batch)
        self.seen.append(out)
        return TaskOutput(out.loss + 0.1 * out.logits.square().mean() + 5.0, out.logits)


def test_a_regulariser_gets_the_logits_and_its_loss_is_the_training_loss(tiny):
    spec, tok = tiny
    raw = raw_data()
    task = bound(Classify(), raw, tok)
    batch = first_batch(task, raw, tok)
    torch.manual_seed(0)
    model = task.build_model(spec)
    reg = Recording()
    loss = FineTuneModule(model, task, reg, OptimSpec()).training_step(batch, 0)
    logits = reg.seen[0].logits
    assert logits.shape == (16, 2) and logits.requires_grad
    assert loss.item() == pytest.approx(
        (reg.seen[0].loss + 0.1 * logits.square().mean() + 5.0).item())
    plain = FineTuneModule(model, task, NoRegularizer(), OptimSpec()).training_step(batch, 0)
    assert loss.item() > plain.item() + 4.9  # dropout differs a little; the +5 does not


def test_optional_hooks_are_found_by_their_protocols(tiny):
    spec, tok = tiny
    task = bound(Classify(), raw_data(), tok)
    assert isinstance(peft_method("lora"), SavesArtefact)  # the stage writes <stage>/peft/
    assert not isinstance(peft_method("bitfit"), SavesArtefact)
    assert isinstance(peft_method("diff_pruning").apply(task.build_model(spec)), Penalized)
    assert not isinstance(peft_method("lora").apply(task.build_model(spec)), Penalized)
    assert MaskedLM().baseline([0, 1, 1]) is None  # the default: no baseline
    assert AuxMLM(task, 0.5).baseline([0, 1, 1]) == task.baseline([0, 1, 1])
    assert task.baseline([0, 1, 1])["acc"] == pytest.approx(2 / 3)


# --- the auxiliary MLM loss through every kind of PEFT method ------------------------------

METHODS = sorted(p.stem for p in (Path(CONFIG_DIR) / "peft").glob("*.yaml"))
#: a parameter the method trains on the encoder path, by a part of its name (full: the backbone)
AUX_REACHES = {"full": "encoder.layer.0.", "lora": "lora_B", "diff_pruning": "delta.",
               "intrinsic": "theta", "movement_pruning": "scores."}


def peft_method(name: str):
    node = OmegaConf.load(Path(CONFIG_DIR) / "peft" / f"{name}.yaml")
    return instantiate_checked(split_peft(node)[0], f"peft={name}")


def aux_setup(tiny, peft_name: str):
    spec, tok = tiny
    raw = raw_data()
    task = bound(AuxMLM(Classify(), weight=0.5), raw, tok)
    batch = first_batch(task, raw, tok)
    torch.manual_seed(0)
    model = peft_method(peft_name).apply(task.build_model(spec)).train()
    return task, model, batch


@pytest.mark.parametrize("peft_name", METHODS)
def test_aux_mlm_loss_runs_through_the_peft_prepared_model(tiny, peft_name):
    task, model, batch = aux_setup(tiny, peft_name)
    inputs, labels = task.mlm.mask(batch, train=True)
    aux = task.aux_loss(model, inputs, labels, batch)
    assert torch.isfinite(aux) and aux > 1.0  # ~ln(2000) = 7.6 for an untrained head
    aux.backward()
    key = AUX_REACHES.get(peft_name, "")  # other methods: any parameter they train
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    body = [p for n, p in trained.items() if key in n and not ("classifier" in n or "aux_" in n)]
    if not body:  # head-only training (last_layer): the aux loss trains the MLM head alone
        body = [p for n, p in trained.items() if "aux_mlm_head" in n]
    assert sum(p.grad.abs().sum() for p in body if p.grad is not None) > 0, peft_name
    model.zero_grad()
    out = task.forward(model, batch)  # the joint loss: the task's plus weight * aux
    assert out.logits.shape == (16, 2) and out.extras["aux_mlm_loss"] > 1.0
    plain = task.task.forward(model, batch).loss
    assert out.loss > plain + 0.5 * 1.0



@pytest.mark.parametrize("peft_name", METHODS)
def test_aux_mlm_heads_own_weights_train_with_every_method(tiny, peft_name):
    """The auxiliary MLM head's transform and bias learn under every method (peft's LoRA, IA3
    and prompts froze them: the auxiliary loss ran through a frozen head, random for a model
    saved without one, as MiniLM); its decoder stays the tied, frozen-or-not word embeddings."""
    task, model, batch = aux_setup(tiny, peft_name)
    head = dict(model.named_parameters())
    own = {n: p for n, p in head.items() if "aux_mlm_head" in n}
    assert own and all(p.requires_grad for p in own.values()), (
        peft_name, [n for n, p in own.items() if not p.requires_grad])
    task.aux_loss(model, *task.mlm.mask(batch, train=True), batch).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in own.values())

def test_aux_mlm_head_of_a_checkpoint_with_one_trains_under_lora_too(tiny, tmp_path):
    """The auxiliary head trains under every method also where the checkpoint has its MLM head
    (not created fresh): peft's LoRA keeps such a head frozen in an MLM stage, not here."""
    import dataclasses

    from tests.conftest import masked_lm_folder

    spec, tok = tiny
    node = OmegaConf.load(Path(CONFIG_DIR) / "model" / "tiny_bert.yaml")
    masked_lm_folder(tmp_path / "bert_mlm", node)
    saved = dataclasses.replace(spec, name_or_path=str(tmp_path / "bert_mlm"), config={},
                                tokenizer=None)
    task = bound(AuxMLM(Classify(), weight=0.5), raw_data(), tok)
    model = peft_method("lora").apply(task.build_model(saved))
    assert task.mlm.info["mlm_head_fresh"] == []  # the checkpoint's own head
    own = {n: p for n, p in model.named_parameters() if "aux_mlm_head" in n}
    assert own and all(p.requires_grad for p in own.values()), [
        n for n, p in own.items() if not p.requires_grad]


def test_aux_mlm_head_sees_a_wrappers_swapped_in_tied_embeddings(tiny):
    """Diff pruning's delta on the word embeddings reaches the tied MLM decoder too."""
    task, model, batch = aux_setup(tiny, "diff_pruning")
    model.phase2 = True  # fixed-mask phase with the all-ones initial mask: the delta as is
    i = model.names.index("bert.embeddings.word_embeddings.weight")
    with torch.no_grad():
        model.delta[i].fill_(0.01)
    seen = {}
    decoder = model.model.aux_mlm_head.predictions.decoder
    handle = decoder.register_forward_pre_hook(lambda m, args: seen.update(w=m.weight.detach()))
    task.aux_loss(model, *task.mlm.mask(batch, train=True), batch)
    handle.remove()
    original = model.model.bert.embeddings.word_embeddings.weight
    torch.testing.assert_close(seen["w"], original + 0.01)


def test_aux_mlm_stage_runs_with_a_wrapper_method(make_cfg, sentiment_dir):
    from ftlab.run import run

    record = run(make_cfg(tiny_overrides(sentiment_dir) + [
        "peft=intrinsic", "stage.aux_mlm_weight=0.3", "stage.trainer.max_steps=3"]))
    assert record["status"] == "ok", record
    assert record["final"]["val/baseline_acc"] > 0  # AuxMLM hands on the task's baseline
