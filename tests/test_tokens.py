"""stage=tokens: sub-word label alignment, entity metrics, CoNLL data, training end to end."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import torch
from torchmetrics import MetricCollection

from ftlab.build import StageBuilder
from ftlab.data.batching import PadCollator
from ftlab.data.conll import read_conll
from ftlab.data.sources import load_raw
from ftlab.data.spec import DataSpec
from ftlab.errors import FtlabError
from ftlab.model.backbone import ModelSpec, load_tokenizer
from ftlab.pipeline import build_pipeline
from ftlab.run import run
from ftlab.tasks.base import TaskOutput
from ftlab.tasks.tagging import IGNORE, EntityScore, align, words_tokenizer
from ftlab.tasks.tokens import Tokens
from tests.conftest import loss_before_after

TINY = ModelSpec(name_or_path=None, tokenizer="pkg://ftlab/assets/tiny_tokenizer",
                 config={"model_type": "bert"})
PEOPLE = ["alice", "bob", "carol", "dave"]
PLACES = [["paris"], ["london"], ["new", "york"], ["rome"]]
FILLER = ["the", "film", "was", "is", "a", "and", "this", "really", "long", "music"]


def tagged_rows(n: int, seed: int) -> list[tuple[list[str], list[str]]]:
    """Sentences of filler with a person (B-per) and a place (B-loc [I-loc]) at random spots:
    the entities are fixed words, so a tiny model can learn them."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = rng.choices(FILLER, k=rng.randint(3, 10))
        tags = ["O"] * len(words)
        for ent, typ in ((rng.choice(PEOPLE).split(), "per"), (rng.choice(PLACES), "loc")):
            at = rng.randrange(len(words) + 1)
            words[at:at] = ent
            tags[at:at] = [f"B-{typ}"] + [f"I-{typ}"] * (len(ent) - 1)
        rows.append((words, tags))
    return rows


def write_conll(path: Path, rows: list[tuple[list[str], list[str]]]) -> Path:
    path.write_text("\n\n".join("\n".join(f"{w}\t{t}" for w, t in zip(*r, strict=True))
                                for r in rows) + "\n")
    return path


@pytest.fixture(scope="module")
def conll_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("conll")
    for split, n, seed in (("train", 160, 0), ("validation", 48, 1), ("test", 48, 2)):
        write_conll(d / f"{split}.conll", tagged_rows(n, seed))
    return d


def token_overrides(d: Path, *extra: str) -> list[str]:
    return ["stage=tokens", "model=tiny_bert", "data=local",
            *(f"data.files.{s}={d}/{s}.conll" for s in ("train", "validation", "test")),
            "data.text_columns=[tokens]", "data.label_column=tags", "logger=none",
            "callbacks=none", "trainer.enable_progress_bar=false", "stage.batch_size=16", *extra]


# --- alignment ------------------------------------------------------------------------------

def test_wordpiece_first_subtoken_gets_the_word_label():
    tok = load_tokenizer(TINY)
    enc = tok([["from", "green", "newsfeed"]], is_split_into_words=True)
    pieces = tok.convert_ids_to_tokens(enc["input_ids"][0])
    assert pieces == ["[CLS]", "from", "gr", "##ee", "##n", "new", "##s", "##f", "##ee", "##d",
                      "[SEP]"]
    assert align(enc.word_ids(0), [0, 6, 16]) == [
        IGNORE, 0, 6, IGNORE, IGNORE, 16, IGNORE, IGNORE, IGNORE, IGNORE, IGNORE]


def byte_level_tokenizer(tmp_path: Path):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()  # add_prefix_space=False, as RoBERTa's and GPT-2's ship
    bpe.train_from_iterator(["the quick brown fox jumps over the lazy dog in New York"] * 20,
                            vocab_size=300, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>", unk_token="<unk>", mask_token="<mask>"
                            ).save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "roberta"}))
    return AutoTokenizer.from_pretrained(tmp_path)


def test_byte_level_bpe_words_tokenise_as_inside_a_sentence(tmp_path):
    tok = byte_level_tokenizer(tmp_path)
    words = ["New", "Yorkers", "fox"]
    conll = write_conll(tmp_path / "t.conll", [(words, ["B-loc", "O", "O"])] * 2)
    raw = load_raw(DataSpec(files={"train": str(conll)}, text_columns=["tokens"],
                            label_column="tags", splits={"train": "train"}))
    task = Tokens()
    task.bind(raw, tok, ["tokens"])
    row = task.featurize({"tokens": [words], "label": [[1, 0, 0]]})
    pieces = tok.convert_ids_to_tokens(row["input_ids"][0])
    # the same pieces as the words inside a sentence (leading space: Ġ), not at its start
    inside = tok.convert_ids_to_tokens(tok(" New Yorkers fox")["input_ids"])
    starts = [i for i, p in enumerate(pieces) if p.startswith("Ġ")]
    assert pieces == inside and [pieces[i] for i in starts] == ["ĠNew", "ĠYork", "Ġfox"]
    assert [row["labels"][0][i] for i in starts] == [1, 0, 0]
    assert all(row["labels"][0][i] == IGNORE for i in range(len(pieces)) if i not in starts)
    # the shared tokenizer is untouched (other stages keep its behaviour)
    plain = tok(["New"], is_split_into_words=True)["input_ids"]
    assert "ĠNew" not in tok.convert_ids_to_tokens(plain)
    assert tok.backend_tokenizer.pre_tokenizer.add_prefix_space is False


def test_sentencepiece_style_tokenizer_needs_no_change():
    """Llama/T5-style Metaspace (SentencePiece) marks every word's start by itself."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    sp = Tokenizer(models.BPE(unk_token="<unk>"))
    sp.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    sp.train_from_iterator(["the quick brown fox jumps over the lazy dog in New York"] * 20,
                           trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=sp, bos_token="<s>", unk_token="<unk>")
    assert words_tokenizer(tok) is tok
    enc = tok([["New", "Yorkers", "fox"]], is_split_into_words=True)
    assert enc.tokens(0) == tok("New Yorkers fox").tokens() == ["▁New", "▁York", "er", "s",
                                                                "▁fox"]
    assert align(enc.word_ids(0), [1, 0, 2]) == [1, 0, IGNORE, IGNORE, 2]


# --- metrics ---------------------------------------------------------------------------------

def test_entity_scores_match_seqeval_on_a_known_prediction():
    from seqeval.metrics import f1_score, precision_score, recall_score

    labels = ["O", "B-LOC", "B-PER", "I-LOC", "I-PER"]
    ids = {t: i for i, t in enumerate(labels)}
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-LOC", "I-LOC", "O"]]
    pred = [["B-PER", "I-PER", "O", "O"], ["B-LOC", "O", "B-PER"]]
    # 3 gold entities, 3 predicted, 1 exact match (Bob Smith): P = R = F1 = 1/3
    target = torch.full((2, 6), IGNORE)
    preds = torch.zeros((2, 6), dtype=torch.long)
    for r, (g, p) in enumerate(zip(gold, pred, strict=True)):
        at = [1, 2, 4, 5][: len(g)]  # word starts; 0 ([CLS]) and 3 (a later piece) skipped
        target[r, at] = torch.tensor([ids[t] for t in g])
        preds[r, at] = torch.tensor([ids[t] for t in p])
    preds[:, 3] = ids["B-PER"]  # a prediction at an ignored position must not count
    scores = {w: EntityScore(labels, w) for w in ("precision", "recall", "f1")}
    for m in scores.values():
        m.update(preds, target)
    got = {w: m.compute().item() for w, m in scores.items()}
    assert got == pytest.approx({"precision": 1 / 3, "recall": 1 / 3, "f1": 1 / 3})
    assert got["f1"] == pytest.approx(f1_score(gold, pred))
    assert got["precision"] == pytest.approx(precision_score(gold, pred))
    assert got["recall"] == pytest.approx(recall_score(gold, pred))
    one = EntityScore(labels, "f1")  # 1 predicted, right; 2 gold: P = 1, R = 1/2, F1 = 2/3
    one.update(preds[:1], target[:1])
    assert one.compute().item() == pytest.approx(2 / 3)
    assert f1_score(gold[:1], pred[:1]) == pytest.approx(2 / 3)


def test_entities_past_max_length_count_as_missed_over_the_whole_sentence(tmp_path):
    """A sentence longer than max_length: its cut words are not scored, but its gold entities
    there still count (missed), and one running past the cut is no match for its visible
    start: the scores are seqeval's over the whole sentences, cut words predicted O."""
    from seqeval.metrics import f1_score, precision_score, recall_score

    gold = [["B-per", "O", "B-loc", "I-loc", "O", "B-per", "O"],  # cut inside new york
            ["B-per", "O", "O", "O", "O", "O", "B-loc"],  # the place is past the cut
            ["O", "B-loc", "O"]]  # short: whole
    words = [["alice", "was", "new", "york", "is", "bob", "the"],
             ["carol", "the", "film", "was", "a", "the", "rome"], ["the", "paris", "a"]]
    conll = write_conll(tmp_path / "t.conll", list(zip(words, gold, strict=True)) * 2)
    raw = load_raw(DataSpec(files={"train": str(conll)}, text_columns=["tokens"],
                            splits={"train": "train"}, label_column="tags"))
    task = Tokens(max_length=6)  # [CLS] + 4 pieces + [SEP]: the first 3 words of each row
    task.bind(raw, load_tokenizer(TINY), ["tokens"])
    feats = task.featurize({"tokens": words, "label": [[raw.labels.index(t) for t in row]
                                                       for row in gold]})
    assert feats["entities_cut"] == [2, 1, 0] and feats["entity_crossing"] == [1, 0, 0]
    batch = PadCollator(0, pad_values={"labels": IGNORE})(
        [{k: feats[k][i] for k in task.features} for i in range(3)])
    preds = batch["labels"].clamp(min=0)  # every kept word predicted right
    scores = {w: EntityScore(raw.labels, w) for w in ("precision", "recall", "f1")}
    metrics = MetricCollection(scores, compute_groups=False)
    task.update(metrics, TaskOutput(torch.tensor(0.0), torch.nn.functional.one_hot(
        preds, len(raw.labels)).float()), batch)
    pred = [row[:3] + ["O"] * (len(row) - 3) for row in gold]  # "alice was new": B-per O B-loc
    got = {w: m.compute().item() for w, m in scores.items()}
    # gold: 6 entities; predicted: alice, new (B-loc, not "new york"), carol, paris: 3 right
    assert got == pytest.approx({"precision": 3 / 4, "recall": 3 / 6, "f1": 0.6})
    assert got["precision"] == pytest.approx(precision_score(gold, pred))
    assert got["recall"] == pytest.approx(recall_score(gold, pred))
    assert got["f1"] == pytest.approx(f1_score(gold, pred))
    model = task.build_model(TINY)  # the per-row counts never reach the model
    assert task.forward(model, batch).logits.shape[:2] == batch["input_ids"].shape


# --- data ------------------------------------------------------------------------------------

def test_conll_parsing(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("-DOCSTART- -X- O O\n\nJohn\tB-per\nlives\tO\n \t\nin NNP B-loc\n\n\n")
    assert read_conll(path) == {"tokens": [["John", "lives"], ["in"]],
                                "tags": [["B-per", "O"], ["B-loc"]]}
    path.write_text("John\tB-per\nlives\n")
    with pytest.raises(FtlabError, match=r"a.txt, line 2: expected a word and its tag"):
        read_conll(path)
    path.write_text("John\tB-per\n\nlives\tPER\n")
    with pytest.raises(FtlabError, match=r"a.txt, line 3: the tag 'PER' is not a BIO tag"):
        read_conll(path)


def test_tag_set_is_o_first_then_sorted_and_jsonl_is_read(tmp_path):
    rows = [{"tokens": ["a", "b", "c"], "tags": ["B-z", "O", "B-a"]},
            {"tokens": ["d", "e"], "tags": ["I-a", "O"]}]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = load_raw(DataSpec(files={"train": str(path)}, text_columns=["tokens"],
                            label_column="tags", splits={"train": "train"}))
    assert raw.labels == ["O", "B-a", "B-z", "I-a"]
    assert raw.splits["train"]["label"] == [[2, 0, 1], [3, 0]]
    path.write_text(json.dumps({"tokens": ["a"], "tags": ["E-x"]}) + "\n")
    with pytest.raises(FtlabError, match="'E-x' is not a BIO tag"):
        load_raw(DataSpec(files={"train": str(path)}, text_columns=["tokens"],
                          label_column="tags", splits={"train": "train"}))


def test_plain_text_rows_are_refused(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"text": "a b", "label": "x"}) + "\n"
                    + json.dumps({"text": "c", "label": "y"}) + "\n")
    raw = load_raw(DataSpec(files={"train": str(path)}, splits={"train": "train"}))
    with pytest.raises(FtlabError, match="a list of words per row in column 'text', got str"):
        Tokens().bind(raw, load_tokenizer(TINY), ["text"])


# --- training --------------------------------------------------------------------------------

def test_tiny_tokens_run_learns(make_cfg, conll_dir):
    cfg = make_cfg(token_overrides(conll_dir, "stage.trainer.max_epochs=8",
                                   "stage.optim.lr=3e-3", "seed=1"))
    record = run(cfg)
    final = record["final"]
    # fixed entity words: entity F1 far above tagging everything O (F1 0)
    assert final["test/f1"] > 0.5 and final["val/f1"] > final["val/baseline_f1"] + 0.5, final
    assert final["test/acc"] > final["test/baseline_acc"], final
    assert record["status"] == "ok" and record["failed"] is False
    assert record["monitor"]["failed_by"] == ["f1"]  # what run() judged the run by
    card = json.loads((Path(cfg.paths.output_dir) / "tokens" / "card.json").read_text())
    assert card["labels"] == ["O", "B-loc", "B-per", "I-loc"]
    import ftlab

    predictor = ftlab.load(cfg.paths.output_dir)
    rows = [["alice", "was", "in", "new", "york"], "bob is in paris"]
    preds = predictor.predict(rows)
    assert [p["tokens"] for p in preds] == [rows[0], rows[1].split()]
    assert preds[0]["tags"][0] == "B-per" and preds[1]["tags"][3] == "B-loc", preds
    assert all(0 < s <= 1 for p in preds for s in p["scores"])
    again = predictor.predict([(rows[0],), (rows[1],), {"tokens": rows[0]}])  # ftlab-predict
    assert [p["tags"] for p in again] == [preds[0]["tags"], preds[1]["tags"], preds[0]["tags"]]
    from ftlab.predict_cli import main as predict_main  # a jsonl of word lists, through the CLI

    src, out = Path(cfg.paths.output_dir) / "in.jsonl", Path(cfg.paths.output_dir) / "p.jsonl"
    src.write_text(json.dumps({"tokens": rows[0]}) + "\n" + json.dumps({"tokens": rows[1]}) + "\n")
    predict_main([cfg.paths.output_dir, "--input", str(src), "--output", str(out)])
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [g["tags"] for g in got] == [preds[0]["tags"], preds[1]["tags"]]


def stage_parts(make_cfg, conll_dir: Path, *extra: str):
    """(task, model with its PEFT method and regulariser, regulariser, a training batch)."""
    stage = build_pipeline(make_cfg(token_overrides(conll_dir, *extra)))[0]
    builder = StageBuilder()
    task = builder.task(stage)
    model, _, regularizer, _ = builder.model(stage)
    feats = task.featurize(builder.raw(stage).splits["train"][:16])
    rows = [{k: feats[k][i] for k in task.features} for i in range(16)]
    tok = builder.tokenizer(stage.model)
    return task, model, regularizer, PadCollator(tok.pad_token_id)(rows)


@pytest.mark.parametrize("peft", ["full", "lora", "adapter_pfeiffer", "bitfit", "prompt_tuning"])
def test_peft_methods_train_the_tagger(make_cfg, conll_dir, peft):
    task, model, _, batch = stage_parts(make_cfg, conll_dir, f"peft={peft}")
    out = task.forward(model, batch)
    assert out.logits.shape[:2] == batch["input_ids"].shape and out.logits.shape[2] == 4
    before, after = loss_before_after(task, model, batch, steps=8, lr=1e-2)
    assert after < before - 0.05, (peft, before, after)


def _no_dropout(model: torch.nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


def test_r3f_adds_a_positive_kl_term_on_token_logits(make_cfg, conll_dir):
    task, model, reg, batch = stage_parts(make_cfg, conll_dir, "regularizer=r3f",
                                          "regularizer.eps=0.1")
    _no_dropout(model)
    model.train()
    out = reg.training_loss(model, batch, task)
    plain = task.forward(model, batch).loss
    assert out.extras["r3f_kl"] > 0
    assert out.loss.item() == pytest.approx(plain.item() + reg.r3f_lambda
                                            * out.extras["r3f_kl"].item(), rel=1e-5)


def test_aux_mlm_adds_the_masked_lm_loss(make_cfg, conll_dir):
    task, model, _, batch = stage_parts(make_cfg, conll_dir, "stage.aux_mlm_weight=0.5")
    _no_dropout(model)
    model.train()
    torch.manual_seed(0)
    out = task.forward(model, batch)
    plain = task.task.forward(model, batch).loss
    assert out.extras["aux_mlm_loss"] > 0
    assert out.loss.item() == pytest.approx(plain.item() + 0.5 * out.extras["aux_mlm_loss"].item(),
                                            rel=1e-5)
    assert out.loss.item() > plain.item() + 0.1
    model.eval()  # evaluation reports the plain tagging loss and metrics
    assert task.forward(model, batch).loss.item() == pytest.approx(plain.item(), rel=1e-5)


def test_tokens_run_with_aux_mlm(make_cfg, conll_dir):
    cfg = make_cfg(token_overrides(conll_dir, "stage.aux_mlm_weight=0.5",
                                   "stage.trainer.max_steps=6"))
    record = run(cfg)
    assert record["status"] in ("ok", "failed") and "test/f1" in record["final"]


def test_tag_lists_must_match_their_word_lists_and_need_word_lists(tmp_path):
    """A row with fewer tags than words stopped featurising with an IndexError; a list of
    labels beside plain text (multi-label data) was refused as 'not a BIO tag'."""
    from ftlab.data.sources import load_raw
    from ftlab.data.spec import DataSpec

    rows = [{"tokens": ["alice", "went", "home"], "tags": ["B-per", "O", "O"]}] * 5
    rows[3] = {"tokens": ["alice", "went", "home"], "tags": ["B-per", "O"]}
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = DataSpec(files={"train": str(tmp_path / "t.jsonl")}, splits={"train": "train"},
                    text_columns=["tokens"], label_column="tags")
    with pytest.raises(FtlabError, match=r"(?s)1 row.*row 4: 3 words, 2 tags.*one tag"):
        load_raw(spec)
    rows[3] = {"tokens": ["alice"], "tags": None}
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(FtlabError, match=r"1 row\(s\) with no 'tags' list .*row 4"):
        load_raw(spec)
    multi = [{"text": f"news {i}", "label": ["sports", "politics"][: i % 2 + 1]}
             for i in range(6)]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in multi))
    with pytest.raises(FtlabError, match="(?s)multi-label.*data.text_columns"):
        load_raw(DataSpec(files={"train": str(tmp_path / "m.jsonl")}, splits={"train": "train"}))


def test_tag_ids_of_a_hugging_face_classlabel_are_read_as_their_names():
    """conll2003/wnut_17 on the Hub store tag ids of a ClassLabel: they were read as the tags
    '0', '3'... and refused as not BIO."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, List, Value

    from ftlab.data.labels import encode_labels
    from ftlab.data.spec import DataSpec

    names = ["O", "B-PER", "I-PER", "B-LOC"]
    feats = Features({"tokens": List(Value("string")), "ner_tags": List(ClassLabel(names=names))})
    rows = {"tokens": [["alice", "smith", "left"], ["rome"]], "ner_tags": [[1, 2, 0], [3]]}
    dsd = DatasetDict({"train": Dataset.from_dict(rows, features=feats)})
    out, labels, _ = encode_labels(dsd, DataSpec(text_columns=["tokens"], label_column="ner_tags"))
    assert labels == names and list(out["train"]["label"]) == [[1, 2, 0], [3]]
    declared = ["O", "B-LOC", "B-PER", "I-PER"]
    out, labels, _ = encode_labels(dsd, DataSpec(text_columns=["tokens"], label_column="ner_tags",
                                              labels=declared))
    assert labels == declared and list(out["train"]["label"]) == [[2, 3, 0], [1]]


def test_conll_file_with_a_byte_order_mark(tmp_path):
    """A BOM before '-DOCSTART-' made it a word (tagged O) of a sentence of its own, and
    glued itself to a first word otherwise."""
    path = tmp_path / "bom.conll"
    path.write_bytes("\ufeff-DOCSTART- -X- -X- O\n\nEU\tB-org\nrejects\tO\n".encode())
    assert read_conll(path) == {"tokens": [["EU", "rejects"]], "tags": [["B-org", "O"]]}
    path.write_bytes("\ufeffEU\tB-org\n".encode())
    assert read_conll(path)["tokens"] == [["EU"]]


def test_a_batch_of_rows_without_words_has_loss_zero_not_nan(tmp_path):
    """A jsonl row with no words ("tokens": []) has no scored position: when it made up a
    batch alone (the shortest row is last), the mean loss was NaN and the run stopped as
    diverged. Its loss is 0 (no gradient); mixed with other rows the mean is unchanged."""
    conll = write_conll(tmp_path / "t.conll", [(["paris", "is"], ["B-loc", "O"])] * 2)
    raw = load_raw(DataSpec(files={"train": str(conll)}, text_columns=["tokens"],
                            label_column="tags", splits={"train": "train"}))
    task = Tokens()
    task.bind(raw, load_tokenizer(TINY), ["tokens"])
    feats = task.featurize({"tokens": [[], ["paris", "is"]], "label": [[], [1, 0]]})
    rows = [{k: feats[k][i] for k in task.features} for i in range(2)]
    collate = PadCollator(0, pad_values={"labels": IGNORE})
    model = task.build_model(TINY)
    empty = task.forward(model, collate(rows[:1]))
    assert empty.loss.item() == 0.0
    empty.loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    both, full = collate(rows), task.forward(model, collate(rows))
    expected = torch.nn.functional.cross_entropy(full.logits.flatten(0, 1),
                                                 both["labels"].flatten(), ignore_index=IGNORE)
    assert full.loss.item() == pytest.approx(expected.item())


def test_a_word_list_with_a_number_in_it_names_the_item_not_joining_lists(tmp_path):
    """A jsonl word list holding a number (["Paris", 5]) was told to "join lists into one
    text", the wrong fix for word lists: the item and the row are named instead."""
    rows = [{"tokens": ["Paris", "is"], "tags": ["B-loc", "O"]}] * 3
    rows.insert(1, {"tokens": ["Paris", 5], "tags": ["B-loc", "O"]})
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(FtlabError, match=r"(?s)'tokens' in .*train.jsonl holds lists of mixed "
                       r"items: row 2 \(\['Paris', 5\]\) has 5 among its texts.*Fix: make "
                       r"every item of the 'tokens' lists a text") as err:
        load_raw(DataSpec(files={"train": str(path)}, text_columns=["tokens"],
                          label_column="tags", splits={"train": "train"}))
    assert "join lists" not in str(err.value)


def test_a_conll_file_without_a_sentence_is_named(tmp_path, conll_dir):
    """A validation file of only '-DOCSTART-' and blank lines had no columns to rename: a
    datasets ValueError traceback; now the file, the split and going without it."""
    empty = tmp_path / "dev.conll"
    empty.write_text("-DOCSTART- -X- -X- O\n\n\n")
    files = {"train": str(conll_dir / "train.conll"), "validation": str(empty)}
    with pytest.raises(FtlabError, match=r"(?s)dev.conll \(split 'validation'\) holds no "
                       r"sentence.*Fix: add sentences to it, or go without that split "
                       r"\(~data.files.validation data.splits.validation=null\)"):
        load_raw(DataSpec(files=files, text_columns=["tokens"], label_column="tags",
                          splits={"train": "train", "validation": "validation"}))


def test_a_tagger_that_finds_entities_has_not_failed_below_the_all_o_accuracy():
    """With rare entities the all-O token accuracy is high: a tagger that finds entities while
    over-tagging some words falls below it. Only entity F1 0 (nothing found) is a failure."""
    from ftlab.seedstats import failure

    judged_by = Tokens.failed_by
    finds_some = {"val/acc": 0.85, "val/baseline_acc": 0.9, "val/f1": 0.2, "val/baseline_f1": 0.0}
    assert failure(finds_some) is not None  # every baseline: failed on token accuracy
    assert failure(finds_some, judged_by) is None
    assert failure(finds_some | {"val/f1": 0.0}, judged_by) == "val/f1 0.0000 <= baseline 0.0000"


@pytest.mark.parametrize("max_length", [1, 2])
def test_a_max_length_with_no_room_for_a_word_is_refused_before_training(
        max_length, make_cfg, conll_dir, tmp_path):
    """[CLS] and [SEP] take 2 tokens: at 1 Transformers skipped truncation (the setting was
    ignored, rows kept their full length); at 2 every row was [CLS] [SEP], no word scored."""
    with pytest.raises(SystemExit):
        run(make_cfg(token_overrides(conll_dir, f"stage.task.max_length={max_length}")))
    error = json.loads((tmp_path / "run" / "metrics.json").read_text())["error"]
    assert re.search(rf"max_length={max_length} leaves no room.*at least 3", error, re.S), error


def test_monitoring_the_loss_keeps_the_epoch_with_the_lowest_loss(make_cfg, conll_dir):
    """stage.task.monitor=loss was accepted with mode 'max': the epoch with the highest
    validation loss was kept (and early stopping waited for the loss to rise)."""
    import csv

    # lr 0.1: the loss falls, then rises in the last epoch (0.920, 0.905, 0.912); at 3e-3 it
    # falls every epoch and the last epoch is the best, which would hide a kept-weights bug
    cfg = make_cfg([*token_overrides(conll_dir, "stage.task.monitor=loss",
                                     "stage.trainer.max_epochs=3", "stage.optim.lr=1e-1"),
                    "logger=csv"])
    record = run(cfg)
    path = next((Path(cfg.paths.output_dir) / "tokens").rglob("metrics.csv"))
    with path.open() as f:
        losses = [float(r["val/loss"]) for r in csv.DictReader(f) if r.get("val/loss")]
    assert len(losses) == 3 and min(losses) < max(losses), losses
    best = losses.index(min(losses))
    assert best < len(losses) - 1, losses  # else the last epoch's weights would pass below
    assert record["stages"]["tokens"]["best_epoch"] == best, losses
    assert record["final"]["val/loss"] == pytest.approx(min(losses), abs=1e-4)
    # the weights kept (the artefact, and what test/ scored) are that epoch's, not the last's
    assert val_loss_of(cfg.paths.output_dir, conll_dir) == pytest.approx(min(losses), abs=1e-4)


def val_loss_of(run_dir, data_dir: Path) -> float:
    """The validation split's mean cross-entropy per scored word under the run's saved
    model (``ftlab.load``), one row at a time."""
    import ftlab

    predictor = ftlab.load(run_dir)
    val = read_conll(data_dir / "validation.conll")
    tag_ids = [[predictor.labels.index(t) for t in tags] for tags in val["tags"]]
    feats = predictor.task.featurize({"tokens": val["tokens"], "label": tag_ids})
    total, words = 0.0, 0
    with torch.no_grad():
        for ids, labels in zip(feats["input_ids"], feats["labels"], strict=True):
            logits = predictor.model(input_ids=torch.tensor([ids])).logits[0]
            target = torch.tensor(labels)
            total += torch.nn.functional.cross_entropy(logits, target, ignore_index=IGNORE,
                                                       reduction="sum").item()
            words += int((target != IGNORE).sum())
    return total / words


def test_val_loss_is_the_mean_over_the_splits_scored_words(make_cfg, tmp_path):
    """val/loss was a row-weighted mean of per-batch word means: a batch of 3-word rows
    weighed as much per row as one of 30-word rows. It is the split's mean cross-entropy per
    scored word, recomputed here from the loaded model one row at a time."""
    rng = random.Random(0)
    for split in ("train", "validation", "test"):
        rows = [([rng.choice(PEOPLE)] + rng.choices(FILLER, k=2 if i % 2 else 29),
                 ["B-per"] + ["O"] * (2 if i % 2 else 29)) for i in range(32)]
        write_conll(tmp_path / f"{split}.conll", rows)
    cfg = make_cfg(token_overrides(tmp_path, "stage.eval_batch_size=4", "trainer.max_steps=3",
                                   "stage.optim.lr=3e-3"))
    final = run(cfg)["final"]
    by_hand = val_loss_of(cfg.paths.output_dir, tmp_path)
    assert final["val/loss"] == pytest.approx(by_hand, abs=1e-4), (final, by_hand)


def test_a_word_with_no_sub_token_is_read_as_unknown_and_scored(tmp_path):
    """A zero-width space (or a control character, an accent alone) gives no sub-token: its
    gold tag fell out of the sentence, so a person written that way was neither found nor
    missed, and predict left it 'O' with no score. It is read as [UNK] and tagged."""
    from transformers import BertConfig, BertForTokenClassification

    rows = [{"tokens": ["alice", "\u200b", "paris"], "tags": ["B-per", "B-per", "B-loc"]},
            {"tokens": ["bob", "\x07"], "tags": ["B-per", "O"]}]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = load_raw(DataSpec(files={"train": str(path)}, text_columns=["tokens"],
                            label_column="tags", splits={"train": "train"}))
    task = Tokens()
    task.bind(raw, load_tokenizer(TINY), ["tokens"])
    train = raw.splits["train"]
    feats = task.featurize({"tokens": train["tokens"], "label": train["label"]})
    scored = [[t for t in row if t != IGNORE] for row in feats["labels"]]
    assert scored == train["label"]  # every word's tag, the zero-width one's too
    unk = task.tokenizer.unk_token_id
    assert unk in feats["input_ids"][0] and feats["input_ids"][1][-2] == unk
    model = BertForTokenClassification(BertConfig(
        vocab_size=task.tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=32, num_labels=len(task.labels))).eval()
    preds = task.predict_rows(model, train["tokens"])
    assert preds[0]["tokens"] == ["alice", "\u200b", "paris"]  # the words as given
    assert all(s is not None for p in preds for s in p["scores"])
