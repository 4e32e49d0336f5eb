"""The timed loops of benchmarks/overhead.py (benchmarks/loops.py), checked on the CPU: they run
the same steps on the same batches, and ftlab's fits leave the model where it is (Lightning's
own strategy moves it to the CPU at the end of a fit, which re-records CUDA graphs on a GPU)."""

from __future__ import annotations

import pytest
import torch

from benchmarks import loops
from benchmarks._common import rotten_setup


@pytest.fixture(scope="module")
def tiny():
    spec = loops.model_spec("tiny")
    task, dm, _ = rotten_setup(8, max_train=120, model=spec)
    return task, dm, spec


def test_ftlab_fits_do_not_move_the_model(tiny, monkeypatch):
    task, dm, spec = tiny
    model = task.build_model(spec)
    moved: list[str] = []
    real = torch.nn.Module.cpu
    monkeypatch.setattr(torch.nn.Module, "cpu",
                        lambda self, *a, **k: moved.append(type(self).__name__) or real(self))
    clock = loops.Clock(torch.device("cpu"), 1, 2)
    loops.run_ftlab(task, model, dm.train_dataloader(), clock, "32-true")
    assert clock.rows == 16 and clock.seconds > 0  # steps 2-3 timed, 8 rows each
    assert moved == []  # Lightning's SingleDeviceStrategy.teardown would call .cpu() here


@pytest.mark.parametrize("run", [loops.run_plain, loops.run_ftlab, loops.run_module])
def test_every_loop_takes_the_same_steps_on_the_same_batches(tiny, run):
    """Each loop's weights after 3 steps equal the plain loop's (same data, LR schedule,
    clipping): the loops time the same work."""
    task, dm, spec = tiny
    import copy

    torch.manual_seed(0)
    base = task.build_model(spec)
    config = copy.deepcopy(base.config)  # no dropout: the loops comparable without RNG
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    ref, other = type(base)(config), type(base)(config)
    ref.load_state_dict(base.state_dict())
    other.load_state_dict(base.state_dict())
    loops.run_plain(task, ref, dm.train_dataloader(), loops.Clock(torch.device("cpu"), 1, 2),
                    "32-true")
    run(task, other, dm.train_dataloader(), loops.Clock(torch.device("cpu"), 1, 2), "32-true")
    changed = any(not torch.equal(a, b) for a, b in zip(base.state_dict().values(),
                                                        ref.state_dict().values(), strict=True))
    assert changed
    for (name, a), b in zip(ref.state_dict().items(), other.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name
