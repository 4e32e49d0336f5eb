"""Text-to-text classification on seq2seq (tiny T5) and decoder-only (tiny GPT-2) models."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from ftlab.config import bind_schema
from ftlab.data.batching import PadCollator
from ftlab.data.sources import RawData
from ftlab.errors import FtlabError
from ftlab.model.backbone import ModelSpec, load_config, load_tokenizer
from ftlab.run import run
from ftlab.tasks.text2text import TextToText
from tests.conftest import loss_before_after, prompt_tuned_causal_lm, synthetic_rows, tiny_overrides


def setup(make_cfg, sentiment_dir, model, **kwargs):
    cfg = make_cfg(tiny_overrides(sentiment_dir) + [f"model={model}"])
    spec = bind_schema(ModelSpec, cfg.model, "model")
    tok = load_tokenizer(spec)
    from datasets import Dataset, DatasetDict

    task = TextToText(**{"source": "review: {text}", **kwargs})
    task.bind(RawData(DatasetDict({"train": Dataset.from_list([{"text": "x", "label": 0}])}),
                      ["neg", "pos"]), tok, ["text"])
    task.see_model(load_config(spec))
    return spec, tok, task


def batch_for(task, rows, pad_id):
    feats = task.featurize({"text": [r["text"] for r in rows],
                            "label": [0 if r["label"] == "neg" else 1 for r in rows]})
    return PadCollator(pad_id)([dict(zip(feats, v, strict=True))
                                for v in zip(*feats.values(), strict=True)])


def test_decoder_only_loss_is_on_the_target_tokens_only(make_cfg, sentiment_dir):
    spec, tok, task = setup(make_cfg, sentiment_dir, "tiny_gpt2")
    rows = synthetic_rows(3, 1)
    feats = task.featurize({"text": [r["text"] for r in rows], "label": [1, 0, 1]})
    for ids, labels, cid in zip(feats["input_ids"], feats["labels"], feats["class_id"],
                                strict=True):
        target = task.targets[cid]
        kept = [t for t in labels if t != -100]
        assert tok.decode(kept, skip_special_tokens=True).strip() == target
        assert labels[: len(ids) - len(kept)] == [-100] * (len(ids) - len(kept))
        assert ids[-len(kept):] == kept  # the target is the end of the input


def test_rank_classification_scores_each_label_by_its_summed_log_probability(make_cfg,
                                                                             sentiment_dir):
    spec, tok, task = setup(make_cfg, sentiment_dir, "tiny_gpt2",
                            targets={"pos": "great film", "neg": "bad"})
    model = task.build_model(spec).eval()
    rows = synthetic_rows(3, 2)
    batch = batch_for(task, rows, tok.pad_token_id)
    scores = task.rank(model, batch)
    with torch.no_grad():
        for i, r in enumerate(rows):
            prompt = tok("review: " + r["text"])["input_ids"]
            for label in (0, 1):
                w = task.target_ids("", task.targets[label])
                logp = F.log_softmax(model(torch.tensor([prompt + w])).logits[0].float(), -1)
                manual = sum(logp[len(prompt) - 1 + j, t] for j, t in enumerate(w))
                assert scores[i, label].item() == pytest.approx(manual.item(), abs=1e-4)
    # and the prediction is the higher-scoring label
    out = task.forward(model, batch)
    assert torch.equal(out.logits.argmax(-1), scores.argmax(-1))


#: seeds 1 and 2 re-check seed 0's memorisation on other initial weights (robustness, not
#: another code path; measured: seeds 0-5 of both models all pass): `-m slow` runs them
@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow),
                                  pytest.param(2, marks=pytest.mark.slow)])
@pytest.mark.parametrize("model", ["tiny_t5", "tiny_gpt2"])
def test_training_learns_targets_and_generation_reproduces_them(model, seed, make_cfg,
                                                                sentiment_dir):
    spec, tok, task = setup(make_cfg, sentiment_dir, model, max_target_length=4)
    torch.manual_seed(seed)
    net = task.build_model(spec)
    batch = batch_for(task, synthetic_rows(16, 4), tok.pad_token_id)
    before, after = loss_before_after(task, net, batch, steps=150, lr=1e-2)
    # memorised the 16 targets (seed 0's tiny T5 ends at 0.057 on an AMD EPYC machine; it was
    # under 0.05 on earlier machines; the generation and ranking checks below are the sharp ones)
    assert after < 0.1 < before
    net.eval()
    out = task.forward(net, batch)
    rank_acc = (out.logits.argmax(-1) == batch["class_id"]).float().mean().item()
    assert rank_acc >= 0.9 and out.extras["em"].mean().item() >= 0.9  # memorised both ways


def test_an_encoder_is_refused(make_cfg, sentiment_dir):
    with pytest.raises(FtlabError, match="encoder"):
        setup(make_cfg, sentiment_dir, "tiny_bert")


def test_a_source_without_the_data_columns_suggests_one_with_them(make_cfg, sentiment_dir):
    """The fix names the data's own columns, not the default template that just failed."""
    from datasets import Dataset, DatasetDict

    spec, tok, _ = setup(make_cfg, sentiment_dir, "tiny_t5")
    task = TextToText(source="sst2 sentence: {text}")
    rows = DatasetDict({"train": Dataset.from_list([{"Review Text": "x", "label": 0}])})
    with pytest.raises(FtlabError, match=r"(?s)\['Review Text'\].*Fix: .*"
                       r"stage.task.source='sst2 sentence: \{Review Text\}'"):
        task.bind(RawData(rows, ["neg", "pos"]), tok, ["Review Text"])


def test_targets_must_name_the_labels(make_cfg, sentiment_dir):
    with pytest.raises(FtlabError, match="targets"):
        setup(make_cfg, sentiment_dir, "tiny_t5", targets={"good": "great"})


@pytest.mark.parametrize("model", ["tiny_t5", "tiny_gpt2"])
def test_text2text_stage_runs_with_lora_and_reports_rank_and_generation(model, make_cfg,
                                                                        sentiment_dir):
    record = run(make_cfg(tiny_overrides(sentiment_dir) + [
        f"model={model}", "stage=text2text", "peft=lora", "trainer.max_steps=4"]))
    assert record["status"] == "ok"
    assert {"val/acc", "val/f1", "val/em", "test/acc", "test/em"} <= set(record["final"])


def test_seq2seq_targets_longer_than_the_source_are_batched_whole(make_cfg, sentiment_dir):
    """A short source ("ok") with a longer target: the batch's decoder labels hold the whole
    target (the collator once cut every sequence feature to the longest source)."""
    spec, tok, task = setup(make_cfg, sentiment_dir, "tiny_t5", source="{text}",
                            targets={"pos": "a very good and pleasant film", "neg": "bad"})
    batch = batch_for(task, [{"text": "ok", "label": "pos"}, {"text": "ok", "label": "neg"}],
                      tok.pad_token_id)
    assert batch["input_ids"].shape[1] < len(tok("a very good and pleasant film")["input_ids"])
    for row, target in zip(batch["labels"].tolist(), ["a very good and pleasant film", "bad"],
                           strict=True):
        assert [t for t in row if t != -100] == tok(target)["input_ids"]


@pytest.mark.parametrize("targets", [{"pos": "good", "neg": "good"},
                                     {"pos": "Good", "neg": "good"}])  # uncased: equal ids
def test_two_labels_with_one_target_are_refused(targets, make_cfg, sentiment_dir):
    with pytest.raises(FtlabError, match="several labels the same target '[Gg]ood'"):
        setup(make_cfg, sentiment_dir, "tiny_t5", targets=targets)


@pytest.mark.parametrize("model", ["tiny_t5", "tiny_gpt2"])
def test_exact_match_compares_with_the_target_as_the_tokenizer_writes_it(model, make_cfg,
                                                                         sentiment_dir):
    """The tiny tokenizer is uncased, so a model can only write "great film!" as "great film !"
    lowercased: a perfect generation of "Great Film!" scored 0 before."""
    spec, tok, task = setup(make_cfg, sentiment_dir, model, max_target_length=5,
                            targets={"pos": "Great Film!", "neg": "Bad"})
    net = task.build_model(spec).eval()
    rows = synthetic_rows(4, 5)
    batch = batch_for(task, rows, tok.pad_token_id)
    want = batch["class_id"].tolist()
    ids = [task.target_ids("", task.targets[c]) if not task.seq2seq else
           tok(task.targets[c], add_special_tokens=False)["input_ids"] for c in want]
    width = task.max_target_length
    # a model that writes each row's target perfectly (then EOS): stands in for the decoding
    perfect = torch.tensor([(i + [task.eos] * width)[:width] for i in ids])
    task._greedy = lambda *a: perfect  # decoder-only decoding
    if task.seq2seq:
        logits = torch.full((len(rows), width, tok.vocab_size), -1e4)
        logits.scatter_(2, perfect[..., None], 0.0)

        class Writes(torch.nn.Module):
            config = net.config

            def forward(self, input_ids, attention_mask, decoder_input_ids):
                step = decoder_input_ids.shape[1] - 1
                return type("Out", (), {"logits": logits[:, : step + 1]})()
        net = Writes()
    assert task.exact_match(net, batch).tolist() == [1.0] * len(rows)


def test_decoder_only_with_prompt_tuning_scores_the_rows_own_positions(make_cfg, sentiment_dir):
    """Prompt tuning prepends virtual tokens' positions to a causal LM's logits: the target
    loss stopped with a shape error and rank scores read shifted positions."""
    spec, tok, task = setup(make_cfg, sentiment_dir, "tiny_gpt2")
    model = prompt_tuned_causal_lm(task, spec)  # 4 virtual tokens
    rows = synthetic_rows(3, 2)
    batch = batch_for(task, rows, tok.pad_token_id)
    with torch.no_grad():
        out = task.forward(model, batch)
        logits = model(input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"]).logits[:, 4:]
        want = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                               batch["labels"][:, 1:].reshape(-1), ignore_index=-100)
        assert out.loss.item() == pytest.approx(want.item(), abs=1e-5)
        for i, r in enumerate(rows):
            prompt = tok("review: " + r["text"])["input_ids"]
            for label in (0, 1):
                w = task.target_ids("", task.targets[label])
                lp = F.log_softmax(model(input_ids=torch.tensor([prompt + w])).logits[0, 4:]
                                   .float(), -1)
                manual = sum(lp[len(prompt) - 1 + j, t] for j, t in enumerate(w))
                assert out.logits[i, label].item() == pytest.approx(manual.item(), abs=1e-4)


def test_targets_keyed_by_numbers_match_numeric_label_names(make_cfg, sentiment_dir):
    """Labels read from numbers are named '0', '1'; targets written `{0: negative, 1:
    positive}` have int keys (Hydra/YAML), which were refused as not naming the labels."""
    from datasets import Dataset, DatasetDict

    cfg = make_cfg(tiny_overrides(sentiment_dir) + ["model=tiny_t5"])
    tok = load_tokenizer(bind_schema(ModelSpec, cfg.model, "model"))
    task = TextToText(targets={0: "negative", 1: "positive"})
    task.bind(RawData(DatasetDict({"train": Dataset.from_list([{"text": "x", "label": 0}])}),
                      ["0", "1"]), tok, ["text"])
    assert task.targets == ["negative", "positive"]


@pytest.mark.parametrize("generate", [True, False])
def test_a_decoder_evaluates_up_to_its_positions_and_is_refused_past_them(generate, make_cfg,
                                                                           sentiment_dir):
    """Decoder-only evaluation appends to each max_length row the targets it ranks and the
    tokens it generates: a max_length that leaves no room for them crashed at the first
    validation (an index error); the pre-flight now refuses it and allows the longest that
    works."""
    from types import SimpleNamespace

    from ftlab.task_fit import require_positions

    cfg = make_cfg(tiny_overrides(sentiment_dir) + ["model=tiny_gpt2",
                                                    "model.config.n_positions=40"])
    spec = bind_schema(ModelSpec, cfg.model, "model")
    tok = load_tokenizer(spec)
    from datasets import Dataset, DatasetDict

    task = TextToText(source="review: {text}", max_target_length=8, generate=generate)
    task.bind(RawData(DatasetDict({"train": Dataset.from_list([{"text": "x", "label": 0}])}),
                      ["neg", "pos"]), tok, ["text"])
    torch.manual_seed(0)
    model = task.build_model(spec).eval()
    stage = SimpleNamespace(where="stage 'text2text'", key="stage",
                            peft={"_target_": "full"})
    # the long row has the longest target ('neg': 2 tokens): its source, target and EOS fill
    # max_length (every row's source has the room that target leaves)
    rows = [{"text": "a fine film " * 30, "label": "neg"}, {"text": "dull", "label": "pos"}]
    past = 8 if generate else max(len(task.target_ids("", t)) for t in ("neg", "pos"))
    task.max_length = 40 - past
    require_positions(stage, task, model)  # fits: allowed, and it evaluates
    batch = batch_for(task, rows, tok.pad_token_id)
    assert batch["input_ids"].shape[1] == task.max_length  # the long row fills max_length
    task.forward(model, batch)
    task.max_length += 1  # one more would crash mid-validation: refused before training
    with pytest.raises(IndexError):
        task.forward(model, batch_for(task, rows, tok.pad_token_id))
    why = "8 generated tokens" if generate else f"the longest target's {past} tokens"
    with pytest.raises(FtlabError, match=rf"stage 'text2text': task.max_length={41 - past} plus "
                                         rf"{why}.* is more than the 40 positions(?s:.*)at most "
                                         rf"{40 - past}"):
        require_positions(stage, task, model)
    try:  # generation's length has its own key to lower; the targets' has none
        require_positions(stage, task, model)
    except FtlabError as err:
        assert ("or lower stage.task.max_target_length" in str(err)) == generate


def test_a_decoder_cuts_a_long_source_alike_whatever_the_rows_label(make_cfg, sentiment_dir):
    """A long row's source was cut to fit its own target: with targets of different lengths
    the evaluation prompt (and its rank scores) told the gold label, and differed from the
    prompt predict scores (featurised as label 0)."""
    spec, tok, task = setup(make_cfg, sentiment_dir, "tiny_gpt2", max_length=16,
                            targets={"neg": "bad", "pos": "great film indeed"})
    torch.manual_seed(0)
    model = task.build_model(spec).eval()
    text = "the film was really quite long and the plot was a mess " * 3
    batch = batch_for(task, [{"text": text, "label": "neg"}, {"text": text, "label": "pos"}],
                      tok.pad_token_id)
    source = (batch["labels"] == -100) & batch["attention_mask"].bool()
    prompts = [ids[keep].tolist() for ids, keep in zip(batch["input_ids"], source, strict=True)]
    assert prompts[0] == prompts[1]
    assert batch["input_ids"].shape[1] <= 16  # source, target and EOS within max_length
    scores = task.rank(model, batch)
    assert torch.allclose(scores[0], scores[1])


def test_a_decoder_target_that_leaves_no_room_for_the_source_is_refused(make_cfg,
                                                                        sentiment_dir):
    spec, tok, task = setup(make_cfg, sentiment_dir, "tiny_gpt2", max_length=4,
                            targets={"neg": "bad", "pos": "great film indeed"})
    n = len(task.target_ids("", "great film indeed"))
    with pytest.raises(FtlabError, match=r"max_length=4 leaves no token for the source(?s:.*)"
                                         rf"'great film indeed' alone takes {n} tokens"
                                         rf"(?s:.*)raise stage.task.max_length above {n + 1}"):
        batch_for(task, [{"text": "a fine film", "label": "pos"}], tok.pad_token_id)


@pytest.mark.parametrize("model", ["tiny_t5", "tiny_gpt2"])
def test_a_long_source_loses_text_never_the_templates_words(model, make_cfg, sentiment_dir):
    """The source was truncated from the right: a template whose cue follows the text
    ('... Sentiment:') lost the cue on long rows, so the model read another prompt there."""
    spec, tok, task = setup(make_cfg, sentiment_dir, model, max_length=16,
                            source="Review: {text} Sentiment:")
    rows = [{"text": "the film was really quite long and the plot was a mess " * 3,
             "label": "pos"}, {"text": "dull", "label": "neg"}]
    batch = batch_for(task, rows, tok.pad_token_id)
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"],
                                 strict=True):
        source = ids[mask.bool() & (labels == -100)] if not task.seq2seq else ids[mask.bool()]
        text = tok.decode(source, skip_special_tokens=True)
        assert text.startswith("review :") and text.endswith("sentiment :")
        assert len(source) <= (16 if task.seq2seq else task.source_room())


@pytest.mark.parametrize("empty", ["", " ", None])
@pytest.mark.parametrize("model", ["tiny_t5", "tiny_gpt2"])
def test_a_label_without_target_text_is_refused(empty, model, make_cfg, sentiment_dir):
    """An empty target stopped a decoder's first evaluation with a RuntimeError (scatter of an
    empty word) and T5 ranked it as EOS alone; a null one became the text 'None'."""
    with pytest.raises(FtlabError, match=r"(?s)gives label\(s\) \['neg'\] no target text.*"
                                         r"stage.task.targets='\{neg: <text>, pos: <text>\}'"):
        setup(make_cfg, sentiment_dir, model, targets={"pos": "good", "neg": empty})


@pytest.mark.parametrize("model", ["tiny_t5", "tiny_gpt2"])
def test_a_target_longer_than_generation_is_refused_before_training(model, make_cfg,
                                                                   sentiment_dir, tmp_path):
    """Greedy decoding stops after max_target_length tokens: a longer target could never be
    written whole, so its rows' exact match was 0 however good the model (a perfect writer
    scored 0). The pre-flight refuses it; generate=false (rank only) and a finished run's
    loading are unaffected."""
    import json

    long = "a very good and pleasant film"
    base = tiny_overrides(sentiment_dir) + [
        f"model={model}", "stage=text2text", f"stage.task.targets={{pos: '{long}', neg: bad}}",
        "stage.task.max_target_length=3", "trainer.max_steps=1"]
    with pytest.raises(SystemExit):
        run(make_cfg(base))
    error = json.loads((tmp_path / "run" / "metrics.json").read_text())["error"]
    assert re.search(rf"max_target_length=3 stops generation before the end of label 'pos's "
                     rf"target '{long}' \(\d+ tokens\): exact match \(em\) could never count "
                     r"its rows.*Fix: set stage.task.max_target_length to at least \d+, or "
                     r"stage.task.generate=false", error, re.S), error
    spec, tok, task = setup(make_cfg, sentiment_dir, model, max_target_length=3,
                            targets={"pos": long, "neg": "bad"})
    need = int(re.search(r"at least (\d+)", error).group(1))
    ids = task.target_ids("", long) if not task.seq2seq else tok(long)["input_ids"][:-1]
    assert need == len(ids) > 3  # exactly what a model writes before it stops
    task.max_target_length = need
    task.check_settings()
    assert run(make_cfg([*base, "stage.task.generate=false"]))["status"] == "ok"


@pytest.mark.parametrize("model", ["tiny_t5", "tiny_gpt2"])
def test_a_source_template_longer_than_its_room_is_refused(model, make_cfg, sentiment_dir):
    """Right truncation cut such a template's own words; now it is refused with the room it
    had (a decoder's: what max_length leaves after the longest target and EOS)."""
    spec, tok, task = setup(make_cfg, sentiment_dir, model, max_length=8,
                            source="Classify the sentiment of this review: {text}")
    room = "max_length=8 tokens" if task.seq2seq else \
        f"the {task.source_room()} tokens max_length=8 leaves after the longest target and EOS"
    with pytest.raises(FtlabError, match=rf"(?s)The source template .* alone is longer than "
                                         rf"{room}.*Fix: raise stage.task.max_length or "
                                         r"shorten stage.task.source"):
        batch_for(task, [{"text": "a fine film", "label": "pos"}], tok.pad_token_id)


@pytest.mark.parametrize("source", ["review: {text.foo}", "review: {text.upper}"])
def test_a_source_field_that_is_not_a_plain_column_is_refused(source, make_cfg, sentiment_dir):
    """An attribute field stopped binding with an AttributeError ('{text.foo}') or rendered a
    method's repr into every row ('{text.upper}')."""
    with pytest.raises(FtlabError, match=r"(?s)does not fit the data's text columns.*"
                                         r"stage.task.source='sst2 sentence: \{text\}'"):
        spec, tok, task = setup(make_cfg, sentiment_dir, "tiny_t5", source=source)
        batch_for(task, [{"text": "a fine film", "label": "pos"}], tok.pad_token_id)


@pytest.mark.parametrize("targets", [["negative", "positive"], "positive"])
def test_targets_that_are_not_a_mapping_are_refused(targets):
    """`stage.task.targets=[negative, positive]` stopped the run with an AttributeError
    traceback ('list' object has no attribute 'items')."""
    with pytest.raises(FtlabError, match=r"(?s)maps each label to its target string; got .*"
                                         r"stage.task.targets=\{fresh: positive"):
        TextToText(targets=targets)
