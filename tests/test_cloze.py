"""Cloze-style (PET) classification: patterns, verbaliser token ids per tokenizer family,
scoring on masked and causal LMs, calibration, zero-shot runs and the untrained-head refusal."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset, DatasetDict

from ftlab.config import bind_schema
from ftlab.data.batching import PadCollator
from ftlab.data.sources import RawData
from ftlab.errors import FtlabError
from ftlab.model.backbone import ModelSpec, load_tokenizer
from ftlab.run import run
from ftlab.tasks.calibration import calibrate
from ftlab.tasks.cloze import Cloze
from ftlab.tasks.prompting import Pattern, fit_texts, word_ids
from tests.conftest import loss_before_after, prompt_tuned_causal_lm, synthetic_rows, tiny_overrides

VERB = {"pos": "great", "neg": "bad"}


def bound(tokenizer, **kwargs) -> Cloze:
    from datasets import Dataset, DatasetDict

    task = Cloze(kwargs.pop("pattern", "{text} It was {mask}."), kwargs.pop("verbalizer", VERB),
                 **kwargs)
    raw = RawData(DatasetDict({"train": Dataset.from_list([{"text": "x", "label": 0}])}),
                  ["neg", "pos"])
    task.bind(raw, tokenizer, ["text"])
    return task


def batch_for(task, rows, pad_id):
    feats = task.featurize({"text": [r["text"] for r in rows],
                            "label": [0 if r["label"] == "neg" else 1 for r in rows]})
    return PadCollator(pad_id)([dict(zip(feats, v, strict=True))
                                for v in zip(*feats.values(), strict=True)])


@pytest.fixture(params=["tiny_bert", "tiny_gpt2"])
def tiny(request, make_cfg, sentiment_dir):
    cfg = make_cfg(tiny_overrides(sentiment_dir) + [f"model={request.param}"])
    spec = bind_schema(ModelSpec, cfg.model, "model")
    return spec, load_tokenizer(spec)


def byte_level_bpe():
    """A small GPT-2-style byte-level BPE tokenizer trained here (offline)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    text = [r["text"] + " It was great. It was awful." for r in synthetic_rows(200, 3)]
    bpe.train_from_iterator(text, vocab_size=400, min_frequency=1, special_tokens=["<pad>"])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>")


def test_pattern_needs_exactly_one_slot_and_plain_fields():
    assert Pattern("{text} It was {mask}.").fields == ["text"]
    for bad in ("{text} It was good.", "{mask} {text} {mask}", "{text[0]} {mask}", "{text"):
        with pytest.raises(FtlabError):
            Pattern(bad)


def test_verbaliser_ids_use_the_leading_space_token_in_byte_level_bpe():
    tok = byte_level_bpe()
    ids = word_ids(tok, Pattern("{text} It was {mask}."), "great")
    assert tok.convert_ids_to_tokens(ids) == ["Ġgreat"]  # " great", not "great"
    # no space before the slot: the bare word
    glued = word_ids(tok, Pattern("{text} It was:{mask}"), "great")
    assert "Ġ" not in "".join(tok.convert_ids_to_tokens(glued))


def test_verbaliser_ids_wordpiece(tiny):
    _, tok = tiny
    task = bound(tok)
    assert task.words == [[tok.convert_tokens_to_ids(["bad"])], [tok.convert_tokens_to_ids(
        ["great"])]]  # label order: neg, pos


def test_verbaliser_must_cover_the_labels(tiny):
    _, tok = tiny
    with pytest.raises(FtlabError, match="missing: \\['neg'\\]"):
        bound(tok, verbalizer={"pos": "great"})


def test_long_text_is_cut_but_never_the_pattern_or_the_slot(tiny):
    _, tok = tiny
    ids, _ = fit_texts(tok, Pattern("{text} It was {mask}."), {"text": "the film " * 100},
                       tok.mask_token, 24)
    assert len(ids) == 24 and tok.mask_token_id in ids  # the text fills the room it has
    tail = tok("It was " + tok.mask_token + ".", add_special_tokens=False)["input_ids"]
    body = ids[:-1] if ids[-1] == tok.sep_token_id else ids
    assert body[-len(tail):] == tail


def test_masked_lm_scores_are_the_mlm_logits_of_the_words_at_the_mask(make_cfg, sentiment_dir):
    cfg = make_cfg(tiny_overrides(sentiment_dir))
    spec = bind_schema(ModelSpec, cfg.model, "model")
    tok = load_tokenizer(spec)
    task = bound(tok, verbalizer={"pos": ["great", "best"], "neg": "bad"})
    model = task.build_model(spec).eval()
    assert not task.causal
    batch = batch_for(task, synthetic_rows(4, 1), tok.pad_token_id)
    with torch.no_grad():
        scores = task.scores(model, batch)
        logits = model(input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"]).logits
    at = (batch["input_ids"] == tok.mask_token_id).nonzero()[:, 1]
    word = logits[torch.arange(4), at]
    ids = tok.convert_tokens_to_ids(["bad", "great", "best"])
    expected = torch.stack([word[:, ids[0]], torch.logsumexp(word[:, ids[1:]], -1)], -1)
    torch.testing.assert_close(scores, expected)


def test_causal_lm_sums_log_probabilities_of_multi_token_words(make_cfg, sentiment_dir):
    cfg = make_cfg(tiny_overrides(sentiment_dir) + ["model=tiny_gpt2"])
    spec = bind_schema(ModelSpec, cfg.model, "model")
    tok = load_tokenizer(spec)
    task = bound(tok, verbalizer={"pos": "great film", "neg": "awful"})
    model = task.build_model(spec).eval()
    assert task.causal and len(task.words[1][0]) == 2
    rows = synthetic_rows(3, 2)
    batch = batch_for(task, rows, tok.pad_token_id)
    with torch.no_grad():
        scores = task.scores(model, batch)
        for i, r in enumerate(rows):  # by hand: prefix + word, one row at a time, no padding
            prefix = tok(r["text"] + " It was")["input_ids"]
            for label in (0, 1):  # neg: "awful", pos: "great film" (two tokens)
                w = task.words[label][0]
                logp = F.log_softmax(model(torch.tensor([prefix + w])).logits[0].float(), -1)
                manual = sum(logp[len(prefix) - 1 + j, t] for j, t in enumerate(w))
                assert scores[i, label].item() == pytest.approx(manual.item(), abs=1e-4)


def test_masked_lm_refuses_multi_token_words(make_cfg, sentiment_dir):
    cfg = make_cfg(tiny_overrides(sentiment_dir))
    spec = bind_schema(ModelSpec, cfg.model, "model")
    task = bound(load_tokenizer(spec), verbalizer={"pos": "great film", "neg": "awful"})
    with pytest.raises(FtlabError, match="(?s)several tokens.*causal LM"):
        task.build_model(spec)


def test_verbaliser_errors_name_the_key_and_an_example_for_the_datas_labels(make_cfg,
                                                                            sentiment_dir):
    """A null verbaliser uses the label names ('neg' is two WordPiece tokens): the message says
    so and the fix names stage.task.verbalizer with the data's labels, not another data set's;
    so does the fix for a verbaliser that misses a label."""
    cfg = make_cfg(tiny_overrides(sentiment_dir))
    spec = bind_schema(ModelSpec, cfg.model, "model")
    tok = load_tokenizer(spec)
    task = Cloze("{text} It was {mask}.", None)
    task.bind(RawData(DatasetDict({"train": Dataset.from_list([{"text": "x", "label": 0}])}),
                      ["neg", "pos"]), tok, ["text"])
    with pytest.raises(FtlabError, match=r"(?s)several tokens \(stage.task.verbalizer is null, "
                       r"so the words are the label names\).*Fix: .*\"stage.task.verbalizer="
                       r"\{neg: <word>, pos: <word>\}\""):
        task.build_model(spec)
    with pytest.raises(FtlabError, match=r"Fix: .*\"stage.task.verbalizer=\{neg: <word>, "
                       r"pos: great\}\""):
        bound(tok, verbalizer={"pos": "great"})


def test_a_verbaliser_word_the_vocabulary_lacks_is_refused(tiny):
    """An emoji is one [UNK] token for WordPiece: a single token, so the masked-LM check
    passed and the label was scored by [UNK]'s logit, whatever the word."""
    _, tok = tiny
    with pytest.raises(FtlabError, match=r"(?s)verbaliser word\(s\) \['\U0001F600'\] of label "
                       r"'pos' are not in the tokenizer's vocabulary.*\[UNK\].*Fix: choose "
                       r"words the tokenizer knows"):
        bound(tok, verbalizer={"pos": ["great", "\U0001F600"], "neg": "awful"})


def test_cloze_training_lowers_the_loss(tiny, sentiment_dir):
    spec, tok = tiny
    task = bound(tok)
    model = task.build_model(spec)
    batch = batch_for(task, synthetic_rows(16, 4), tok.pad_token_id)
    before, after = loss_before_after(task, model, batch, steps=15)
    assert after < before * 0.7


def test_calibration_makes_the_content_free_distribution_uniform():
    p_cf = torch.tensor([0.8, 0.2])
    assert torch.allclose(calibrate(p_cf[None], p_cf), torch.tensor([[0.5, 0.5]]))
    # a row the raw model calls class 0 (0.7 vs 0.3) is class 1 once the bias is divided out
    out = calibrate(torch.tensor([[0.7, 0.3]]), p_cf)
    assert out.argmax(-1).item() == 1
    assert out[0, 1].item() == pytest.approx((0.3 / 0.2) / (0.7 / 0.8 + 0.3 / 0.2))


def test_zero_shot_run_with_calibration_reports_both(make_cfg, sentiment_dir):
    cfg = make_cfg(tiny_overrides(sentiment_dir) + [
        "stage=cloze", "stage.task.verbalizer={pos: great, neg: bad}",
        "stage.task.calibrate=true", "stage.trainer.max_steps=0"])
    record = run(cfg)
    assert record["status"] == "ok"
    final = record["final"]
    for m in ("val/acc", "val/f1", "val/acc_cal", "val/f1_cal", "test/acc", "test/acc_cal"):
        assert m in final
    assert record["stages"]["cloze"]["global_steps"] == 0


def test_a_masked_lm_without_a_trained_head_is_refused(tmp_path, make_cfg, sentiment_dir):
    from transformers import BertConfig, BertModel

    cfg0 = make_cfg(tiny_overrides(sentiment_dir))
    spec = bind_schema(ModelSpec, cfg0.model, "model")
    folder = tmp_path / "encoder_only"
    BertModel(BertConfig(**{k: v for k, v in spec.config.items() if k != "model_type"})) \
        .save_pretrained(folder)  # like MiniLM: an encoder checkpoint, no MLM head
    load_tokenizer(spec).save_pretrained(folder)
    over = tiny_overrides(sentiment_dir) + [
        "stage=cloze", "stage.task.verbalizer={pos: great, neg: bad}",
        f"model.name_or_path={folder}", "model.config={}", "model.tokenizer=null"]
    with pytest.raises(SystemExit):
        run(make_cfg(over))
    import json

    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert "no trained LM head" in record["error"] and "stage=mlm" in record["error"]


@pytest.mark.parametrize("model", ["tiny_bert", "tiny_gpt2"])
@pytest.mark.parametrize("peft", ["lora", "adapter_pfeiffer", "bitfit"])
def test_cloze_composes_with_peft_methods(model, peft, make_cfg, sentiment_dir):
    cfg = make_cfg(tiny_overrides(sentiment_dir) + [
        f"model={model}", f"peft={peft}", "stage=cloze",
        "stage.task.verbalizer={pos: great, neg: bad}", "trainer.max_steps=3"])
    record = run(cfg)
    stage = record["stages"]["cloze"]
    assert record["status"] == "ok" and stage["global_steps"] == 3
    assert 0 < stage["params_trainable_pct"] < 50  # the method's share, not the whole LM


def test_a_masked_lm_scores_the_patterns_slot_not_a_mask_token_in_the_text(make_cfg,
                                                                          sentiment_dir):
    """The content-free input "[MASK]" (and a text holding the mask token) puts a second
    [MASK] before the pattern's: the verbaliser is scored at the pattern's slot."""
    cfg = make_cfg(tiny_overrides(sentiment_dir) + ["model=tiny_bert"])
    spec = bind_schema(ModelSpec, cfg.model, "model")
    tok = load_tokenizer(spec)
    task = bound(tok)
    model = task.build_model(spec).eval()
    mask = tok.mask_token
    batch = batch_for(task, [{"text": f"a {mask} film", "label": "pos"},
                             {"text": mask, "label": "neg"}], tok.pad_token_id)
    got = task.scores(model, batch)
    with torch.no_grad():
        for row, text in enumerate([f"a {mask} film", mask]):
            ids = tok(f"{text} It was {mask}.")["input_ids"]
            slot = max(i for i, t in enumerate(ids) if t == tok.mask_token_id)
            logits = model(input_ids=torch.tensor([ids])).logits[0, slot]
            want = [logits[ws[0][0]] for ws in task.words]
            assert got[row].tolist() == pytest.approx([w.item() for w in want], abs=1e-5)


def test_two_labels_sharing_a_verbaliser_word_are_refused(tiny):
    """Labels whose words tokenise alike (the same word, or 'Good'/'good' for an uncased
    tokenizer) get equal scores and can never be told apart: refused, naming both."""
    _, tok = tiny
    with pytest.raises(FtlabError, match="(?s)label 'pos'.*of label 'neg'"):
        bound(tok, verbalizer={"neg": ["bad", "good"], "pos": "good"})
    if tok("Good")["input_ids"] == tok("good")["input_ids"]:  # uncased (tiny_bert)
        with pytest.raises(FtlabError, match="same score"):
            bound(tok, verbalizer={"neg": "good", "pos": "Good"})
    assert len(bound(tok, verbalizer={"neg": "bad", "pos": ["good", "great"]}).words[1]) == 2


@pytest.mark.parametrize("verbalizer", [{"pos": "great", "neg": "awful"},
                                        {"pos": "great film", "neg": "awful"}])
def test_a_causal_lm_with_prompt_tuning_is_scored_at_the_rows_own_positions(
        verbalizer, make_cfg, sentiment_dir):
    """Prompt tuning prepends virtual tokens' positions to a causal LM's logits: scores read
    at the row's indices came from the wrong positions (shifted by the prompt's length)."""
    cfg = make_cfg(tiny_overrides(sentiment_dir) + ["model=tiny_gpt2"])
    spec = bind_schema(ModelSpec, cfg.model, "model")
    tok = load_tokenizer(spec)
    task = bound(tok, verbalizer=verbalizer)
    model = prompt_tuned_causal_lm(task, spec)  # 4 virtual tokens
    rows = synthetic_rows(3, 2)
    batch = batch_for(task, rows, tok.pad_token_id)
    with torch.no_grad():
        scores = task.scores(model, batch)
        for i, r in enumerate(rows):  # by hand: one row at a time, virtual positions dropped
            prefix = tok(r["text"] + " It was")["input_ids"]
            for label in (0, 1):
                w = task.words[label][0]
                logits = model(input_ids=torch.tensor([prefix + w])).logits[0, 4:]
                logp = F.log_softmax(logits.float(), -1)
                manual = sum(logp[len(prefix) - 1 + j, t] for j, t in enumerate(w))
                assert scores[i, label].item() == pytest.approx(manual.item(), abs=1e-4)


def test_a_causal_lm_refuses_text_fields_after_the_slot(make_cfg, sentiment_dir):
    """A causal LM reads only the text before {mask}: '{mask}: {text}' scored every row from
    the pattern alone (the same scores for all rows)."""
    cfg = make_cfg(tiny_overrides(sentiment_dir) + ["model=tiny_gpt2"])
    spec = bind_schema(ModelSpec, cfg.model, "model")
    tok = load_tokenizer(spec)
    with pytest.raises(FtlabError, match=r"puts \['text'\] after it"):
        bound(tok, pattern="It was {mask}: {text}").build_model(spec)
    assert bound(tok, pattern="{text} It was {mask}: so.").build_model(spec) is not None


@pytest.mark.parametrize(("verbalizer", "past"), [(VERB, 0),
                                                  ({"pos": "great film", "neg": "awful"}, 2)])
def test_a_causal_lm_scores_up_to_its_positions_and_is_refused_past_them(verbalizer, past,
                                                                         make_cfg, sentiment_dir):
    """A causal LM scores a several-token word after a max_length prompt: a max_length that
    leaves no room for it crashed at the first validation (an index error); refused before
    training, while one-token words (read off the prompt's last logits) may use every
    position."""
    from types import SimpleNamespace

    from ftlab.task_fit import require_positions

    cfg = make_cfg(tiny_overrides(sentiment_dir) + ["model=tiny_gpt2",
                                                    "model.config.n_positions=40"])
    spec = bind_schema(ModelSpec, cfg.model, "model")
    tok = load_tokenizer(spec)
    task = bound(tok, verbalizer=verbalizer, max_length=40 - past)
    model = task.build_model(spec).eval()
    assert max(len(w) for ws in task.words for w in ws) == max(past, 1)
    stage = SimpleNamespace(where="stage 'cloze'", key="stage", peft={"_target_": "full"})

    def rows():  # a prompt of exactly max_length tokens (a longer text is cut to at most it)
        text = next(t for n in range(1, 80) if len(task.encode_slot(
            {"text": (t := "a " * n)})[0]) == task.max_length)
        return [{"text": text, "label": "pos"}, {"text": "dull", "label": "neg"}]

    require_positions(stage, task, model)  # fits: allowed, and it evaluates
    batch = batch_for(task, rows(), tok.pad_token_id)
    assert batch["input_ids"].shape[1] == task.max_length
    task.forward(model, batch)
    if not past:
        return  # every position used: nothing past them to refuse
    task.max_length += 1  # one more would crash mid-validation: refused before training
    with pytest.raises(IndexError):
        task.forward(model, batch_for(task, rows(), tok.pad_token_id))
    with pytest.raises(FtlabError, match=r"stage 'cloze': task.max_length=39 plus the longest "
                                         r"verbaliser word's 2 tokens(?s:.*)at most 38"):
        require_positions(stage, task, model)


def test_verbaliser_numbers_are_words_and_a_null_word_is_refused(make_cfg, sentiment_dir):
    """YAML reads `{pos: 5, neg: 1}`'s words as numbers and `{neg: null}`'s as None: both
    stopped with a TypeError ('int' object is not iterable) from a real run's config."""
    cfg = make_cfg(tiny_overrides(sentiment_dir) + [
        "stage=cloze", "stage.task.verbalizer={pos: 5, neg: 1}", "stage.trainer.max_steps=0"])
    assert run(cfg)["status"] == "ok"
    tok = load_tokenizer(bind_schema(ModelSpec, cfg.model, "model"))
    assert bound(tok, verbalizer={"pos": 5, "neg": [1, 2.5]}).words == \
        [[tok("1", add_special_tokens=False)["input_ids"],
          tok("2.5", add_special_tokens=False)["input_ids"]],
         [tok("5", add_special_tokens=False)["input_ids"]]]
    with pytest.raises(FtlabError, match=r"gives label 'neg' no word \(\[None\]\)"):
        bound(tok, verbalizer={"pos": "great", "neg": None})


def test_a_word_twice_in_one_label_counts_once(tiny):
    """'great' and 'Great' are one word to an uncased tokenizer: the label's log-sum-exp
    counted it twice, adding log 2 to that label's score."""
    spec, tok = tiny
    once = bound(tok, verbalizer={"pos": "great", "neg": "bad"})
    twice = bound(tok, verbalizer={"pos": ["great", "Great", "great"], "neg": "bad"})
    assert twice.words == once.words
    torch.manual_seed(0)
    model = once.build_model(spec).eval()
    twice.see_model(model.config)
    batch = batch_for(once, synthetic_rows(3, 1), tok.pad_token_id)
    with torch.no_grad():
        torch.testing.assert_close(twice.scores(model, batch), once.scores(model, batch))


def test_calibration_reestimates_the_bias_of_the_weights_it_scores(tiny):
    """p_cf was cached from the first evaluation batch until the next training step: after the
    best epoch's weights were restored (in place, no training step), test's acc_cal and a
    distillation teacher's probabilities divided by the last epoch's bias."""
    spec, tok = tiny
    task = bound(tok, calibrate=True)
    torch.manual_seed(0)
    model = task.build_model(spec).eval()
    batch = batch_for(task, synthetic_rows(4, 1), tok.pad_token_id)
    with torch.no_grad():
        task.forward(model, batch)  # an evaluation: the bias of these weights
        torch.manual_seed(1)
        model.load_state_dict(task.build_model(spec).state_dict())  # the best epoch's, in place
        out = task.forward(model, batch)
        # the bias of these weights, estimated by a task that never saw the old ones (the
        # task's own content_free_probs would hand back the same stale cache it used)
        other = bound(tok, calibrate=True)
        other.see_model(model.config)
        want = calibrate(out.logits.softmax(-1), other.content_free_probs(model))
    torch.testing.assert_close(out.extras["calibrated"], want)
    torch.testing.assert_close(task.probabilities(model, out.logits), want)


def test_calibration_estimates_the_bias_once_per_state_of_the_weights(tiny):
    """p_cf was estimated again for every evaluation batch (three more forwards each); it is
    kept while no parameter changes, and estimated anew after any in-place change (an
    optimiser step, a snapshot's weights copied in) or for another model."""
    import pickle

    spec, tok = tiny
    task = bound(tok, calibrate=True)
    torch.manual_seed(0)
    model = task.build_model(spec).eval()
    batch = batch_for(task, synthetic_rows(4, 1), tok.pad_token_id)
    estimates = []
    encode = task.encode_slot
    task.encode_slot = lambda fields: (estimates.append(1), encode(fields))[1]
    per_estimate = len(task.content_free)
    with torch.no_grad():
        first = task.forward(model, batch).extras["calibrated"]
        torch.testing.assert_close(task.forward(model, batch).extras["calibrated"], first)
        assert len(estimates) == per_estimate  # the second batch reused it
        weight = next(model.parameters())
        weight.add_(0.5)  # as an optimiser step does, in place
        changed = task.forward(model, batch).extras["calibrated"]
        assert len(estimates) == 2 * per_estimate
        task._p_cf = None  # the same weights estimated from scratch give the same bias
        torch.testing.assert_close(task.forward(model, batch).extras["calibrated"], changed)
        weight.copy_(weight - 0.5)  # a snapshot's (here: the first) weights copied in
        torch.testing.assert_close(task.forward(model, batch).extras["calibrated"], first)
        other = task.build_model(spec).eval()
        task.forward(other, batch)
    assert len(estimates) == 5 * per_estimate
    del task.encode_slot
    assert pickle.loads(pickle.dumps(task))._p_cf is None  # the cache does not travel


@pytest.mark.parametrize("verbalizer", [["bad", "great"], "great"])
def test_a_verbaliser_that_is_not_a_mapping_is_refused(verbalizer):
    """`stage.task.verbalizer=[bad, great]` stopped the run with a ValueError traceback
    (dictionary update sequence element #0 has length 3; 2 is required)."""
    with pytest.raises(FtlabError, match=r"(?s)maps each label to its word\(s\); got .*"
                                         r"stage.task.verbalizer=\{fresh: great"):
        Cloze("{text} It was {mask}.", verbalizer)


def test_one_content_free_input_given_as_a_string_is_one_input(tiny):
    """`+stage.task.content_free=N/A` became the inputs 'N', '/' and 'A' (list of a string)."""
    spec, tok = tiny
    one, listed = (bound(tok, calibrate=True, content_free=cf) for cf in ("N/A", ["N/A"]))
    assert one.content_free == ["N/A"]
    torch.manual_seed(0)
    model = one.build_model(spec).eval()
    listed.see_model(model.config)
    torch.testing.assert_close(one.content_free_probs(model), listed.content_free_probs(model))
