"""trainer.compile (ftlab/compiling.py): one graph per forward under CUDA graphs, refusals.

Captured with dynamo's ``eager`` backend: no kernels are built (CPU, seconds)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from ftlab.compiling import check_trainer, compile_model, graph_breaks
from ftlab.config import bind_schema
from ftlab.errors import FtlabError
from ftlab.model.backbone import ModelSpec, load_tokenizer
from ftlab.tasks.classify import Classify
from tests.conftest import CONFIG_DIR


def classifier(name: str) -> tuple[Classify, nn.Module, dict[str, torch.Tensor]]:
    """(task, model, padded batch) for conf/model/<name>.yaml, built as ftlab builds it."""
    spec = bind_schema(ModelSpec, OmegaConf.load(f"{CONFIG_DIR}/model/{name}.yaml"), "model")
    task = Classify()
    task.labels, task.tokenizer = ["neg", "pos"], load_tokenizer(spec)
    torch.manual_seed(0)
    model = task.build_model(spec).train()
    ids = torch.randint(5, 100, (4, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(4, 16, dtype=torch.long)
    mask[0, 10:] = 0  # one padded row: the attention mask is not all ones
    return task, model, {"input_ids": ids, "attention_mask": mask,
                         "labels": torch.tensor([0, 1, 1, 0])}


@pytest.mark.parametrize("name", ["tiny_bert", "tiny_llama", "tiny_deberta"])
def test_the_forward_with_its_loss_is_one_graph(name):
    """What ``compile: reduce-overhead`` records: BERT (the GPU check's model), a decoder
    (Llama) and DeBERTa-v2 run forward + classification loss as one graph, no break (DeBERTa's
    loss breaks on ``labels.nonzero()`` unless the config names its problem type)."""
    task, model, batch = classifier(name)
    assert graph_breaks(lambda b: task.forward(model, b).loss, batch) == []


def test_the_first_forward_with_labels_does_not_recompile():
    """The model is built knowing its problem type: a transformers classifier that infers it
    writes it to its config on the first forward with labels, and that write made
    torch.compile compile the same forward a second time (30-60 s for BERT-base on a GPU)."""
    task, model, batch = classifier("tiny_bert")
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compile_model(model, "default", backend=counting)
    for _ in range(3):
        task.forward(model, batch).loss.backward()
    assert model.config.problem_type == "single_label_classification"
    assert len(graphs) == 1


def test_cuda_graph_modes_compile_in_place_as_one_graph():
    """Names, state dict and parameters stay those of the eager model (artefacts, KeepBest);
    the compiled forward + backward gives the eager loss and gradients."""
    task, model, batch = classifier("tiny_bert")
    model.eval()  # no dropout: eager and compiled see the same function
    keys, params = list(model.state_dict()), list(model.parameters())
    task.forward(model, batch).loss.backward()
    eager = {n: p.grad.clone() for n, p in model.named_parameters()}
    loss = task.forward(model, batch).loss.item()
    model.zero_grad(set_to_none=True)
    assert compile_model(model, "reduce-overhead", backend="eager") is model
    assert list(model.state_dict()) == keys and list(model.parameters()) == params
    out = task.forward(model, batch).loss  # fullgraph=True: a break would raise here
    out.backward()
    assert out.item() == pytest.approx(loss, rel=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, eager[n])


class Net(nn.Module):
    """A forward of one graph (a module of the test, not of torch: dynamo traces it)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x).relu()


class Breaks(nn.Module):
    """A forward with a graph break in the middle (what a data-dependent op does)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        torch._dynamo.graph_break()
        return self.b(h).sum()


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])
def test_a_graph_break_under_cuda_graphs_is_refused_with_the_fix(mode):
    torch._dynamo.reset()
    model = compile_model(Breaks(), mode, backend="eager")
    with pytest.raises(FtlabError) as err:
        model(torch.randn(2, 4))
    text = str(err.value)
    assert f"trainer.compile={mode}" in text and "Breaks's forward" in text
    assert "graph break" in text and "Fix: use trainer.compile=max-autotune-no-cudagraphs" in text


@pytest.mark.parametrize("mode", ["default", "max-autotune-no-cudagraphs"])
def test_without_cuda_graphs_a_graph_break_is_fine(mode):
    torch._dynamo.reset()
    model = compile_model(Breaks(), mode, backend="eager")
    x = torch.randn(2, 4)
    assert model(x).item() == pytest.approx(model._call_impl(x).item())
    assert compile_model(Breaks(), None)._compiled_call_impl is None  # off: left eager


def test_recompilations_past_the_limit_are_refused_not_left_to_crash(monkeypatch):
    """Under fullgraph torch's recompile limit is a hard failure: ftlab raises it to
    RECOMPILE_LIMIT (more than torch's 8) and names the fix past it."""
    import ftlab.compiling

    with torch._dynamo.config.patch(automatic_dynamic_shapes=False):  # one per shape
        torch._dynamo.reset()
        model = compile_model(Net(), "reduce-overhead", backend="eager")
        for rows in range(1, 12):  # 11 shapes: past torch's default of 8
            model(torch.randn(rows, 4))
        monkeypatch.setattr(ftlab.compiling, "RECOMPILE_LIMIT", 2)
        torch._dynamo.reset()
        model = compile_model(Net(), "reduce-overhead", backend="eager")
        model(torch.randn(1, 4)), model(torch.randn(2, 4))
        with pytest.raises(FtlabError, match=r"compiled more than 2 times.*\nFix: use trainer."):
            model(torch.randn(3, 4))


@pytest.mark.parametrize("mode, accumulate, refused", [
    ("reduce-overhead", 2, True), ("max-autotune", 4, True), ("reduce-overhead", 1, False),
    ("reduce-overhead", None, False), ("max-autotune-no-cudagraphs", 4, False),
    ("default", 2, False), (None, 8, False)])
def test_gradient_accumulation_under_cuda_graphs_is_refused(mode, accumulate, refused):
    """CUDA-graph gradients are overwritten by the next replay (pytorch#169545)."""
    trainer = {"accumulate_grad_batches": accumulate}
    if not refused:
        check_trainer(mode, trainer, "stage 'classify'")
        return
    with pytest.raises(FtlabError, match=r"stage 'classify': trainer.compile=.*accumulate_grad_"
                       r"batches=\d.*\nFix: use trainer.accumulate_grad_batches=1"):
        check_trainer(mode, trainer, "stage 'classify'")


def test_the_run_check_refuses_accumulation_with_reduce_overhead(make_cfg):
    """Through the run's config check (ftlab.validate), before any stage trains."""
    from ftlab.overrides import explicit_keys
    from ftlab.pipeline import build_pipeline
    from ftlab.validate import check_configs

    given = ["model=tiny_bert", "trainer.compile=reduce-overhead",
             "trainer.accumulate_grad_batches=2"]
    stages = build_pipeline(make_cfg(given), explicit_keys(given))
    with pytest.raises(FtlabError, match="accumulate_grad_batches=2"):
        check_configs(stages)
    given = given[:2]
    check_configs(build_pipeline(make_cfg(given), explicit_keys(given)))


def test_a_run_with_reduce_overhead_trains_through_the_one_compile_seam(make_cfg, sentiment_dir,
                                                                         monkeypatch):
    """ftlab.stage compiles through compile_model (fullgraph under CUDA graphs): training,
    validation and test steps of tiny BERT run as full graphs (AOT autograd's capture, no
    kernels), and the artefact keeps the eager parameter names."""
    import ftlab.stage
    from ftlab.run import run
    from ftlab.store import load_tensors
    from tests.conftest import tiny_overrides

    seen = []

    def compile_aot(model, mode):
        seen.append(mode)
        return compile_model(model, mode, backend="aot_eager")

    monkeypatch.setattr(ftlab.stage, "compile_model", compile_aot)
    torch._dynamo.reset()
    cfg = make_cfg(tiny_overrides(sentiment_dir) + [
        "trainer.compile=reduce-overhead", "trainer.pad_to_buckets=[16,32,64]",
        "stage.trainer.max_steps=4", "trainer.limit_val_batches=2", "trainer.limit_test_batches=2"])
    record = run(cfg)
    assert seen == ["reduce-overhead"] and record["status"] == "ok", record
    state = load_tensors(Path(cfg.paths.output_dir) / "classify" / "trainable.safetensors")
    _, model, _ = classifier("tiny_bert")
    assert set(state) == {n for n, _ in model.named_parameters()}  # no _orig_mod. prefix


@pytest.mark.parametrize("value, mode", [(False, None), (None, None), (True, "default"),
                                         ("reduce-overhead", "reduce-overhead")])
def test_compile_null_is_off_like_false(value, mode):
    from ftlab.runtime import RuntimeSpec

    spec = RuntimeSpec(compile=value)
    assert spec.compile_mode() == mode and spec.cudagraphs() == (mode == "reduce-overhead")
