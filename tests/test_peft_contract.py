"""The contract every conf/peft/*.yaml method keeps on every model family of
conf/model/tiny_*.yaml (tiny models built from a config, no downloads).

Each (family, method) cell either works — only the declared parameters get gradients and
change (the rest stays bit-identical), the head trains, identity-start methods leave the
untouched model's output as it was and training moves it, and the trained state saves to a
small safetensors artefact that reproduces the predictions on a freshly built model — or
raises ``FtlabError`` with the problem and a fix, as declared in ``EXPECTED_ERRORS``. New YAML
files are picked up with no test edits; the matrix is printed at the end of the run
(also: ``python -m tests.peft_matrix``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf
from transformers import AutoModelForSequenceClassification

from ftlab.cli import CONFIG_DIR
from ftlab.config import instantiate_checked
from ftlab.errors import FtlabError
from ftlab.model.arch import head_modules, head_parameters
from ftlab.model.backbone import ModelSpec, load_model
from ftlab.peft.base import Penalized, count_parameters
from ftlab.pipeline import split_peft
from ftlab.store import load_tensors, save_tensors
from ftlab.targets import allowing
from tests import your_conf

METHODS = your_conf.options("peft")  # conf/peft/ (and FTLAB_CONTRACT_CONF's: tests/your_conf.py)
FAMILIES = sorted(p.stem.removeprefix("tiny_")
                  for p in (Path(CONFIG_DIR) / "model").glob("tiny_*.yaml"))
#: methods whose artefact is not meant to be small (they change every weight)
LARGE = {"full", "movement_pruning"}
#: methods that train every backbone weight (no frozen original parameter)
DENSE = {"full", "movement_pruning"}
#: methods whose untrained start is not the pre-trained model (prompts)
NOT_IDENTITY = {"prefix_tuning", "prompt_tuning"}
#: methods that start *near* identity (bottleneck adapters: a small random up-projection)
NEAR_IDENTITY = {"adapter_houlsby", "adapter_pfeiffer"}
#: (family, method) -> a phrase the FtlabError must contain: the cells that cannot work
EXPECTED_ERRORS = {
    ("llama", "bitfit"): "has none in its linear layers",
    ("t5", "bitfit"): "has none in its linear layers",
    ("deberta", "prefix_tuning"): "past_key_values",
    ("distilbert", "prefix_tuning"): "past_key_values",
    ("t5", "prefix_tuning"): "only for a seq2seq LM",
    ("t5", "prompt_tuning"): "only for a seq2seq LM",
}
VOCAB, CLS, SEP = 2000, 2, 3  # the tiny tokenizer's size, [CLS] and [SEP] (T5's EOS) ids


def model_config(family: str) -> dict:
    return dict(yaml.safe_load((Path(CONFIG_DIR) / "model" / f"tiny_{family}.yaml")
                               .read_text())["config"])


def tiny_model(seed: int = 0, family: str = "bert") -> torch.nn.Module:
    """The tiny ``family`` classifier of conf/model/tiny_<family>.yaml, seeded."""
    torch.manual_seed(seed)
    spec = ModelSpec(config=model_config(family))
    return load_model(spec, AutoModelForSequenceClassification, num_labels=2)


def fresh_model(family: str = "bert") -> torch.nn.Module:
    """The same 'pre-trained' backbone with a differently initialised head."""
    model = tiny_model(0, family)
    torch.manual_seed(123)
    with torch.no_grad():
        for p in head_parameters(model):
            p.normal_(0, 0.5)
    return model


def method(name: str, **extra):
    node = OmegaConf.load(your_conf.conf_file("peft", name))
    with allowing(your_conf.packages(), warn=False):
        return instantiate_checked(split_peft(OmegaConf.merge(node, extra))[0], f"peft={name}")


def batch(seed: int = 0, n: int = 8) -> dict[str, torch.Tensor]:
    """Random rows framed as the tiny tokenizer frames them: [CLS] ... [SEP]."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (n, 12), generator=g)
    ids[:, 0], ids[:, -1] = CLS, SEP
    return {"input_ids": ids, "attention_mask": torch.ones(n, 12, dtype=torch.long),
            "labels": torch.randint(0, 2, (n,), generator=g)}


def train_steps(model: torch.nn.Module, steps: int = 4, lr: float = 1e-2) -> set[int]:
    """A few AdamW steps (no weight decay) on random batches, adding any extra loss.

    Returns the ids of the parameters that received a gradient.
    """
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    got_grad: set[int] = set()
    for step in range(steps):
        out = model(**batch(step))
        loss = out.loss + (model.extra_loss() if isinstance(model, Penalized) else 0.0)
        assert torch.isfinite(loss)
        loss.backward()
        got_grad |= {id(p) for p in model.parameters() if p.grad is not None}
        opt.step()
        opt.zero_grad()
    return got_grad


def logits(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        b = batch(99)
        return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits


def check_cell(family: str, name: str, tmp_path: Path) -> str:
    """Run the contract on one cell; returns a one-line summary (raises what it finds)."""
    peft = method(name)
    base = tiny_model(0, family)
    untouched = logits(tiny_model(0, family))
    heads = head_modules(base)
    original = dict(base.named_parameters())
    before = {n: p.detach().clone() for n, p in original.items()}
    model = peft.apply(base)
    counts = count_parameters(model)
    assert 0 < counts["params_trainable"] <= counts["params_total"]
    trainable = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for head in heads:  # the task head always trains
        assert any(f"{head}." in n for n in names), f"{family}/{name}: head {head} is frozen"
    start = logits(model)
    if name in NOT_IDENTITY:
        assert not torch.allclose(start, untouched, rtol=1e-3, atol=1e-7), f"{name}: identity"
    else:
        tol = 1e-2 if name in NEAR_IDENTITY else 1e-5
        torch.testing.assert_close(start, untouched, atol=tol, rtol=0)

    new = {n: p.detach().clone() for n, p in model.named_parameters()
           if p.requires_grad and not any(p is q for q in original.values())}
    got_grad = train_steps(model)
    assert got_grad == {id(p) for p in trainable}, f"{name}: gradients reach undeclared params"
    for n, p in original.items():  # frozen originals bit-identical; trained ones moved
        if p.requires_grad:
            assert not torch.equal(p.detach(), before[n]), f"{name}: {n} did not train"
        else:
            assert torch.equal(p.detach(), before[n]), f"{name}: frozen {n} changed"
    if name not in DENSE:
        assert counts["params_trainable_pct"] < 100.0
        assert any(not p.requires_grad for p in original.values()), f"{name} froze nothing"
    # every new module learns (one tensor of it may sit still: a dead ReLU unit's bias)
    own = dict(model.named_parameters())
    moved = {n.rsplit(".", 2)[0] for n, init in new.items() if not torch.equal(own[n], init)}
    stuck = [n for n in new if n.rsplit(".", 2)[0] not in moved]
    assert not stuck, f"{name}: new parameters did not train: {stuck[:3]}"

    state = peft.trainable_state(model)
    peft.load_trainable_state(model, state)  # as the stage does after fit (KeepBest.restore)
    expected = logits(model)
    assert torch.isfinite(expected).all()
    assert not torch.allclose(expected, untouched, rtol=1e-3, atol=1e-7), f"{name}: no change"
    path = save_tensors(tmp_path / "trainable.safetensors", state)
    if name not in LARGE:
        total = sum(p.numel() for p in tiny_model(0, family).parameters())
        assert sum(v.numel() for v in state.values()) < 0.5 * total, f"{name}: large artefact"
    again = method(name)
    other = again.apply(fresh_model(family))
    assert not torch.allclose(logits(other), expected)  # the head alone differs already
    again.load_trainable_state(other, load_tensors(path))
    torch.testing.assert_close(logits(other), expected)
    return f"works ({counts['params_trainable_pct']:.1f}% trainable)"


def run_cell(family: str, name: str, tmp_path: Path) -> str:
    """``check_cell``, or the declared clear error: ``error: <problem>``."""
    expected = EXPECTED_ERRORS.get((family, name))
    if expected is None:
        return check_cell(family, name, tmp_path)
    with pytest.raises(FtlabError, match=expected) as err:
        check_cell(family, name, tmp_path)
    assert err.value.fix, f"{family}/{name}: the error names no fix"
    return f"error: {err.value.problem}"


MATRIX: dict[tuple[str, str], str] = {}


def format_matrix(matrix: dict[tuple[str, str], str]) -> str:
    """Families as rows, methods as columns (ok / ERR), then each error's reason."""
    fams = sorted({f for f, _ in matrix})
    meths = sorted({m for _, m in matrix})
    width = max(len(m) for m in meths)
    lines = ["PEFT methods x model families (ok: works; ERR: a clear FtlabError)",
             " " * (width + 1) + " ".join(f"{f:>10}" for f in fams)]
    for m in meths:
        cells = [("ERR" if matrix.get((f, m), "?").startswith("error") else
                  "ok" if (f, m) in matrix else "?") for f in fams]
        lines.append(f"{m:<{width}} " + " ".join(f"{c:>10}" for c in cells))
    lines += [f"  {f} x {m}: {v.removeprefix('error: ')}" for (f, m), v in sorted(matrix.items())
              if v.startswith("error")]
    return "\n".join(lines)


@pytest.fixture(scope="module", autouse=True)
def _print_matrix(request):
    yield
    plugins = request.config.pluginmanager
    reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
    if MATRIX and reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():  # past pytest's output capture
            reporter.write_line("\n" + format_matrix(MATRIX))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", METHODS)
def test_method_contract(family: str, name: str, tmp_path: Path) -> None:
    MATRIX[(family, name)] = run_cell(family, name, tmp_path)
