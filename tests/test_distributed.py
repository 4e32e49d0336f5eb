"""Multi-device training: the sampler's sharding, DDP on the CPU (gloo) against one process with
the same effective batch, and files written by rank zero only."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ftlab.data.batching import LengthGroupedBatchSampler
from ftlab.store import load_tensors
from tests.conftest import ROOT, tiny_overrides


def _lengths(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(3, 120) for _ in range(n)]


def _ranks(n: int, world: int, **kw) -> list[list[list[int]]]:
    lengths = _lengths(n)
    return [list(LengthGroupedBatchSampler(lengths, num_replicas=world, rank=r, **kw))
            for r in range(world)]


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("n", [1000, 1001, 995, 33])
def test_every_row_once_per_epoch_across_ranks_and_equal_batches(n: int, shuffle: bool):
    per_rank = _ranks(n, 3, batch_size=8, shuffle=shuffle, group=4, seed=5)
    assert len({len(batches) for batches in per_rank}) == 1  # the same number of batches
    rows = sorted(i for batches in per_rank for b in batches for i in b)
    assert rows == list(range(n))  # no row twice, none missing (no padding with n >= ranks)
    sampler = LengthGroupedBatchSampler(_lengths(n), batch_size=8, shuffle=shuffle, group=4,
                                        num_replicas=3, rank=1)
    assert len(sampler) == len(per_rank[1])


def test_a_split_smaller_than_the_ranks_repeats_rows_so_every_rank_gets_one():
    per_rank = _ranks(2, 3, batch_size=4, shuffle=False)
    assert [len(batches) for batches in per_rank] == [1, 1, 1]
    assert sorted({i for batches in per_rank for b in batches for i in b}) == [0, 1]


def test_ranks_together_take_the_batches_of_one_process_with_the_effective_batch():
    lengths = _lengths(500)
    single = list(LengthGroupedBatchSampler(lengths, batch_size=16, seed=3))
    ranks = [list(LengthGroupedBatchSampler(lengths, batch_size=8, seed=3, num_replicas=2,
                                            rank=r)) for r in range(2)]
    assert [sorted(a + b) for a, b in zip(*ranks, strict=True)] == [sorted(b) for b in single]
    for a, b in zip(*ranks, strict=True):  # each rank's share of a step is one length bucket
        assert len(a) == len(b) or abs(len(a) - len(b)) == 1


def test_order_changes_per_epoch_and_repeats_for_the_same_seed():
    lengths = _lengths(400)

    def epoch(e: int, seed: int = 0) -> list[list[int]]:
        s = LengthGroupedBatchSampler(lengths, batch_size=8, seed=seed, num_replicas=2, rank=1)
        s.set_epoch(e)
        return list(s)

    assert epoch(0) == epoch(0)
    assert epoch(0) != epoch(1)
    assert epoch(0, seed=0) != epoch(0, seed=1)


def test_non_zero_rank_writes_no_files(make_cfg, sentiment_dir, tmp_path, monkeypatch):
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    from ftlab.run import run

    cfg = make_cfg([*tiny_overrides(sentiment_dir), "trainer.max_steps=2"])
    monkeypatch.setattr(rank_zero_only, "rank", 1, raising=False)
    record = run(cfg)
    assert record["status"] == "ok"
    assert not any((tmp_path / "run").rglob("*.json"))
    assert not any((tmp_path / "run").rglob("*.safetensors"))
    assert not (tmp_path / "run" / "config.yaml").exists()


def _overrides(data_dir: Path, extra: list[str]) -> list[str]:
    over = [o for o in tiny_overrides(data_dir) if not o.startswith("stage.batch_size")]
    return [*over, "trainer.max_epochs=5", "trainer.deterministic=true", "stage.optim.lr=3e-3",
            "seed=3", "+model.config.hidden_dropout_prob=0",
            "+model.config.attention_probs_dropout_prob=0", "cache.stages=off", *extra]


def _train(data_dir: Path, out: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "ftlab", *_overrides(data_dir, extra), f"paths.output_dir={out}"]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=out.parent, env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def single_run(sentiment_dir, tmp_path_factory) -> tuple[dict, Path]:
    """The one-process reference, run in this process (a ``python -m ftlab`` launch spends ~7 s
    of a CPU on imports) with one torch thread, as each DDP rank has (OMP_NUM_THREADS=1)."""
    from ftlab.run import run
    from tests.conftest import compose_cfg

    out = tmp_path_factory.mktemp("single") / "run"
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")  # ftlab.run.set_threads leaves the count as it is
        torch.set_num_threads(1)
        try:
            record = run(compose_cfg(_overrides(sentiment_dir, ["stage.batch_size=16"]), out))
        finally:
            torch.set_num_threads(threads)
            torch.use_deterministic_algorithms(False)  # trainer.deterministic's global switch
    assert record["status"] == "ok", record.get("error")
    return json.loads((out / "metrics.json").read_text()), out


# both match one process to float noise (val/loss to ~1e-6 after 80 steps); FSDP did not while
# the optimiser judged weight decay by the flattened shards' shapes (every matrix skipped)
TOLERANCE = {"ddp": (2e-4, 1e-4), "fsdp": (2e-4, 1e-4)}  # (loss, weights)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_cpu_processes_match_one_process_with_the_same_effective_batch(
        strategy, single_run, sentiment_dir, tmp_path):
    loss_tol, weight_tol = TOLERANCE[strategy]
    single, single_dir = single_run
    ddp = _train(sentiment_dir, tmp_path / strategy, [
        f"trainer={strategy}", "trainer.accelerator=cpu", "trainer.devices=2",
        "trainer.precision=32-true", "stage.batch_size=8", "stage.optim.lr_scaling=none",
        "trainer.num_workers=0", "trainer.pin_memory=false"])
    assert ddp["stages"]["classify"]["global_steps"] == single["stages"]["classify"][
        "global_steps"] == 5 * 256 // 16
    assert single["final"]["val/acc"] > single["final"]["val/baseline_acc"] + 0.2  # it learnt
    for key in ("val/loss", "test/loss"):
        assert ddp["final"][key] == pytest.approx(single["final"][key], abs=loss_tol), key
    for key in ("val/acc", "test/acc"):
        assert ddp["final"][key] == pytest.approx(single["final"][key], abs=1e-6), key
    a = load_tensors(single_dir / "classify" / "trainable.safetensors")
    b = load_tensors(tmp_path / strategy / "classify" / "trainable.safetensors")
    assert a.keys() == b.keys()  # FSDP: whole tensors, gathered from the shards
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=weight_tol, rtol=1e-3, msg=name)


def test_a_non_zero_rank_trains_a_cache_miss_without_waiting_on_rank_zeros_lock(
        tmp_path, monkeypatch):
    """Under DDP rank zero holds the stage's cache lock while its fit waits for the other
    ranks: they must train beside it, not wait for the lock (the pipeline hung for good)."""
    import threading
    from types import SimpleNamespace

    from filelock import FileLock
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    import ftlab.cache
    from ftlab.cache import StageCache, run_or_reuse
    from ftlab.stage import StageResult

    cache = StageCache(tmp_path / "cache")
    cache.root.mkdir()
    trained = []

    def train(stage, builder, run, upstream, key):
        trained.append(key)
        return StageResult(stage.name, {"val/loss": 1.0}, {"w": torch.ones(2)}, {})

    monkeypatch.setattr(ftlab.cache, "run_stage", train)
    monkeypatch.setattr(rank_zero_only, "rank", 1, raising=False)
    rank_zero = FileLock(str(cache.root / ".tapt-1.lock"))
    rank_zero.acquire()  # rank zero: training the stage, inside fit
    results: list[StageResult] = []
    job = threading.Thread(target=lambda: results.append(run_or_reuse(
        SimpleNamespace(name="tapt", trainer={}), None, SimpleNamespace(run_dir=tmp_path), {},
        "tapt-1", cache)), daemon=True)
    try:
        job.start()
        job.join(20)
        assert results and trained == ["tapt-1"], "rank 1 waited on rank zero's lock"
        assert results[0].info["cached"] is False and cache.lookup("tapt-1") is None  # stores: 0
    finally:
        rank_zero.release()
        job.join(20)


@pytest.mark.slow
def test_ddp_madx_task_stage_waits_for_the_language_adapter_rank_zero_writes(
        sentiment_dir, tmp_path):
    """Rank zero writes the lang stage's artefact after the stage; the other rank must not
    build the task stage (which stacks on it) before that file is complete. A slow disk is
    simulated by a 4 s pause in the write (~40 s: two CPU processes, two stages)."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import time\nimport ftlab.stage as st\n_save = st._save_artefact\n"
        "def slow(*a, **k):\n    time.sleep(4)\n    return _save(*a, **k)\n"
        "st._save_artefact = slow\n")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "ftlab", *tiny_overrides(sentiment_dir), "pipeline=madx",
           f"paths.output_dir={out}", "trainer.max_steps=3", "trainer=ddp",
           "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
           "trainer.num_workers=0", "trainer.pin_memory=false", "cache.stages=off"]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": f"{hook}:{ROOT}"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=150)  # without the wait rank 1 fails and rank 0 hangs
    assert proc.returncode in (0, 3), proc.stderr[-3000:]  # 3: at the majority baseline
    record = json.loads((out / "metrics.json").read_text())
    assert record["status"] == "ok" and list(record["stages"]) == ["lang", "task"]


@pytest.mark.slow
def test_cpu_ddp_ranks_of_every_sweep_job_share_the_cores(sentiment_dir, tmp_path):
    """A sweep of two CPU DDP jobs, one after the other (~40 s): Lightning's DDP launcher divided
    the first job's cores by its 2 ranks and left OMP_NUM_THREADS set in the process, so for the
    second ftlab's count (every core) stood: rank zero took them all beside rank one. Each rank
    writes its count as it trains; every rank of every job must have cores / 2."""
    from ftlab.threads import cores

    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os\nimport lightning.pytorch.trainer.trainer as tt\n_run = tt.Trainer._run\n"
        "def run(self, *a, **k):\n    import torch\n    e = os.environ\n"
        "    name = e['PL_GLOBAL_SEED'] + '-' + e.get('LOCAL_RANK', '0')\n"
        "    with open(os.path.join(e['THREADS_OUT'], name), 'w') as f:\n"
        "        f.write(str(torch.get_num_threads()))\n"
        "    return _run(self, *a, **k)\ntt.Trainer._run = run\n")
    seen = tmp_path / "threads"
    seen.mkdir()
    cmd = [sys.executable, "-m", "ftlab", "-m", "seed=1,2", *tiny_overrides(sentiment_dir),
           "trainer.max_steps=2", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
           "trainer.precision=32-true", "trainer.num_workers=0", "trainer.pin_memory=false",
           "cache.stages=off"]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS",
                                                            "HYDRA_FULL_ERROR")}
    env |= {"FTLAB_ROOT": str(tmp_path), "THREADS_OUT": str(seen),
            "PYTHONPATH": f"{hook}:{ROOT}"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode in (0, 3), proc.stderr[-3000:]  # 3: at the majority baseline
    share = str(max(1, cores() // 2))
    assert {f.name: f.read_text() for f in seen.iterdir()} == {
        "1-0": share, "1-1": share, "2-0": share, "2-1": share}


def _launch(data_dir: Path, out: Path, extra: list[str], strategy: str = "fsdp",
            dropout: bool = False, **env: str):
    """A 2-process run (``strategy``) on the CPU of 12 steps, checkpointed every 4, with an
    EMA; without ``dropout`` the model's is off."""
    over = [o for o in tiny_overrides(data_dir) if not o.startswith(("stage.batch_size",
                                                                     "callbacks="))]
    no_dropout = ["+model.config.hidden_dropout_prob=0",
                  "+model.config.attention_probs_dropout_prob=0"]
    cmd = [sys.executable, "-m", "ftlab", *over, f"paths.output_dir={out}",
           f"trainer={strategy}",
           "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
           "trainer.num_workers=0", "trainer.pin_memory=false", "stage.batch_size=8",
           "stage.optim.lr_scaling=none", "data.max_train_samples=112", "trainer.max_steps=12",
           "trainer.max_epochs=5", "trainer.deterministic=true", "stage.optim.lr=1e-3",
           "seed=3", "checkpoint.every_n_steps=4", "checkpoint.keep=true", "cache.stages=off",
           *([] if dropout else no_dropout),
           "callbacks=ema", "callbacks.progress=null", "callbacks.ema.decay=0.9",
           "+callbacks.crash._target_=tests.crash.CrashAt", "+callbacks.crash.step=10",
           "allow_targets=[tests.]", *extra]
    env = {k: v for k, v in os.environ.items() if k != "FTLAB_TEST_CRASH_SEEDS"} | {
        "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)} | env
    return subprocess.run(cmd, cwd=out.parent, env=env, capture_output=True, text=True,
                          timeout=300)


def _kill_and_resume(data_dir: Path, tmp_path: Path, extra: list[str] = (),
                     resume_env: dict[str, str] | None = None, **kw) -> tuple[dict, dict]:
    """An uninterrupted run and one killed at step 10 then resumed (the same command, in its
    folder, with ``resume_env`` added to its environment) from its step-8 checkpoint: their
    records, after checking both ran to the end."""
    extra = list(extra)
    whole = _launch(data_dir, tmp_path / "whole", extra, **kw)
    assert whole.returncode in (0, 3), whole.stderr[-3000:]  # 3: at the majority baseline
    killed = _launch(data_dir, tmp_path / "killed", extra, FTLAB_TEST_CRASH_SEEDS="3", **kw)
    assert killed.returncode == 1 and "killed at step 10" in killed.stderr, killed.stderr[-3000:]
    resumed = _launch(data_dir, tmp_path / "killed", extra, **kw, **(resume_env or {}))
    assert resumed.returncode in (0, 3), resumed.stderr[-3000:]
    a, b = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("whole", "killed"))
    assert b["stages"]["classify"]["resumed_from_step"] == 8
    return a, b


_RECORD_READS = """import os, safetensors, safetensors.torch
_open, _load = safetensors.safe_open, safetensors.torch.load_file
def _note(file, keys):
    import torch.distributed as dist
    rank = dist.get_rank() if dist.is_initialized() else 0
    with open(os.path.join(os.environ["FTLAB_TEST_READS"], f"rank{rank}.txt"), "a") as f:
        f.writelines(f"{file}\\t{key}\\n" for key in keys)
class Recording:
    def __init__(self, file, *a, **k):
        self.file, self.f = str(file), _open(file, *a, **k)
    def __enter__(self):
        self.f.__enter__()
        return self
    def __exit__(self, *a):
        return self.f.__exit__(*a)
    def __getattr__(self, name):
        return getattr(self.f, name)
    def get_tensor(self, key):
        _note(self.file, [key])
        return self.f.get_tensor(key)
def load_file(file, *a, **k):
    tensors = _load(file, *a, **k)
    _note(str(file), tensors)
    return tensors
safetensors.safe_open, safetensors.torch.load_file = Recording, load_file
"""


def _record_reads(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """An environment in which every process notes which safetensors tensors it reads (in
    ``<folder>/rank<N>.txt``, one ``file<TAB>key`` a line), and that folder."""
    hook, reads = tmp_path / "hook", tmp_path / "reads"
    hook.mkdir()
    reads.mkdir()
    (hook / "sitecustomize.py").write_text(_RECORD_READS)
    return {"PYTHONPATH": f"{hook}:{ROOT}", "FTLAB_TEST_READS": str(reads)}, reads


@pytest.mark.slow
def test_fsdp_run_killed_midway_resumes_and_ends_like_an_uninterrupted_one(
        sentiment_dir, tmp_path):
    """Two CPU processes (gloo): rank zero writes the gathered model and optimiser state and
    every rank's shard of the EMA; on resume rank zero alone reads the model and optimiser
    tensors and sends rank one its shard, each rank loads its EMA shard, and the data goes on
    from the checkpoint's position (~60 s: three 2-process runs)."""
    from ftlab.checkpoint import NAME, SafetensorsCheckpointIO

    env, reads = _record_reads(tmp_path)
    a, b = _kill_and_resume(sentiment_dir, tmp_path, resume_env=env)
    read = {r: [line.split("\t")[1] for line in (reads / f"rank{r}.txt").read_text().split("\n")
                if f"{NAME}/" in line] for r in (0, 1)}  # the resumed checkpoint's tensors
    heavy = ("/state_dict/", "/optimizer_states/")
    assert any(k.startswith("/state_dict/") for k in read[0])
    assert any(k.startswith("/optimizer_states/") for k in read[0])
    assert [k for k in read[1] if k.startswith(heavy)] == []  # rank one: none of them
    assert any("/per_rank/1/" in k for k in read[1])  # but its own EMA shard and RNG states
    tol = 1e-6  # measured: equal to the bit (the one-batch replay it catches moved 3e-4)
    for key, value in a["final"].items():
        assert b["final"][key] == pytest.approx(value, abs=tol), key
    io = SafetensorsCheckpointIO()
    ca, cb = (io.load_checkpoint(tmp_path / n / "classify" / "checkpoints" / NAME)
              for n in ("whole", "killed"))
    assert ca["global_step"] == cb["global_step"] == 12
    for name, tensor in ca["state_dict"].items():  # the last step's whole weights
        torch.testing.assert_close(cb["state_dict"][name], tensor, atol=tol, rtol=0)
    ema_a, ema_b = (next(v["per_rank"] for k, v in c["callbacks"].items()
                         if "WeightAverage" in k) for c in (ca, cb))
    assert len(ema_a) == 2 and all(any(t.numel() for t in r["shadow"].values())
                                   for r in ema_a)  # each rank's own shard
    for ra, rb in zip(ema_a, ema_b, strict=True):
        for name, tensor in ra["shadow"].items():
            torch.testing.assert_close(rb["shadow"][name], tensor, atol=tol, rtol=0)


@pytest.mark.slow
def test_ddp_run_with_dropout_killed_midway_resumes_every_ranks_random_state(
        sentiment_dir, tmp_path):
    """Two CPU processes (gloo), dropout on, each rank's batch padded to its own longest row:
    the ranks' batches differ in width, so their dropout draws move their random states apart
    (with trainer=gpu's width buckets every batch here is 32 wide and they stay equal), and
    each rank must get its own state back on resume, not rank zero's. ~60 s: three
    2-process runs."""
    from ftlab.checkpoint import NAME, SafetensorsCheckpointIO

    own_widths = ["trainer.pad_to_buckets=null", "trainer.pad_to_multiple_of=null"]
    a, b = _kill_and_resume(sentiment_dir, tmp_path, own_widths, strategy="ddp", dropout=True)
    for key, value in a["final"].items():
        assert b["final"][key] == pytest.approx(value, abs=1e-6), key
    io = SafetensorsCheckpointIO()
    ca, cb = (io.load_checkpoint(tmp_path / n / "classify" / "checkpoints" / NAME)
              for n in ("whole", "killed"))
    assert ca["global_step"] == cb["global_step"] == 12
    for name, tensor in ca["state_dict"].items():
        torch.testing.assert_close(cb["state_dict"][name], tensor, atol=1e-6, rtol=0, msg=name)
    ranks = cb["callbacks"]["RngState"]["per_rank"]
    assert len(ranks) == 2 and not torch.equal(ranks[0]["torch"], ranks[1]["torch"])


def test_a_crash_on_another_rank_keeps_its_traceback(tmp_path, monkeypatch, capsys):
    """Only rank zero writes metrics.json and error.log; a crash on rank 1 alone wrote no
    traceback anywhere (the user saw 'ftlab: AssertionError: '). It goes to error.rank1.log."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    from ftlab.record import record_error

    monkeypatch.setattr(rank_zero_only, "rank", 1, raising=False)

    def deep_in_a_callback() -> None:
        raise AssertionError

    record: dict = {}
    try:
        deep_in_a_callback()
    except AssertionError as err:
        record_error(record, err, tmp_path, primary=False)
    log = tmp_path / "error.rank1.log"
    assert "deep_in_a_callback" in log.read_text() and "Traceback" in log.read_text()
    assert not (tmp_path / "error.log").exists()  # rank zero's own name stays free
    assert str(log) in record["error"] and str(log) in capsys.readouterr().err
