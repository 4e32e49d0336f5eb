"""The contract every conf/regularizer/*.yaml keeps (tiny BERT from a config, no downloads).

For every regulariser (new YAML files are picked up with no test edits): it composes with
``peft=full``, ``lora`` and ``adapter_pfeiffer``, its training loss reaches exactly the
trainable parameters, evaluation is the plain model, it is applied on the meta device as the
stage's validation does, a task without logits gets a clear error or works, and a tiny
end-to-end run learns and records its metrics. Then each known regulariser's own term is
checked against its definition (R3F/SMART: a non-negative KL term, zero without noise or
weight, linear in its weight; SMART's teacher; FreeLB: the parameter gradient is the mean over
its K perturbations; Mixout: unbiased in training, exact in evaluation).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ftlab.config import instantiate_checked
from ftlab.errors import FtlabError
from ftlab.run import run
from ftlab.targets import allowing
from ftlab.tasks.base import TaskOutput
from ftlab.tasks.classify import Classify
from tests import your_conf
from tests.conftest import tiny_overrides
from tests.test_peft_contract import FAMILIES, batch, logits, method, tiny_model

REGULARIZERS = your_conf.options("regularizer")  # and FTLAB_CONTRACT_CONF's (your_conf.py)
PEFTS = ("full", "lora", "adapter_pfeiffer")
#: the regularisers' own terms, logged per step as train/<term>
LOGGED_TERMS = {"r3f": ("r3f_kl",), "smart": ("smart_adv", "smart_bregman"),
                "freelb": ("freelb_first_loss",)}
#: scaled to the tiny model in the end-to-end run: FreeLB's steps (norm 0.1-0.3 per row) are
#: ~60% of a tiny row's embedding norm (random, std 0.02; ~5% for MiniLM) and keep it at the
#: majority class; a random "pre-trained" backbone is what mixout holds the weights to
TINY_RUN = {"freelb": ["regularizer.adv_lr=1e-3", "regularizer.init_mag=1e-3"],
            "mixout": ["regularizer.p=0.5"]}


def regularizer(name: str, **extra):
    node = OmegaConf.merge(OmegaConf.load(your_conf.conf_file("regularizer", name)), extra)
    with allowing(your_conf.packages(), warn=False):
        return instantiate_checked(node, f"regularizer={name}")


class TinyClassify(Classify):
    """Classification over the tiny batches' two labels (no data to bind)."""

    def __init__(self) -> None:
        super().__init__()
        self.labels = ["neg", "pos"]


class NoLogits(TinyClassify):
    """A task whose output has a loss but no logits (as masked LM)."""

    row_logits = False

    def forward(self, model, batch):
        return TaskOutput(super().forward(model, batch).loss)


TASK = TinyClassify()


def prepared(name: str, peft: str = "full", seed: int = 0, **extra):
    reg = regularizer(name, **extra)
    return reg, reg.apply(method(peft).apply(tiny_model(seed)))


def trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


# -- every regulariser -------------------------------------------------------------------------

@pytest.mark.parametrize("peft", PEFTS)
@pytest.mark.parametrize("name", REGULARIZERS)
def test_training_loss_reaches_exactly_the_trainable_parameters(name, peft):
    reg, model = prepared(name, peft)
    model.train()
    torch.manual_seed(0)
    out = reg.training_loss(model, batch(0), TASK)
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert out.logits is not None and out.logits.shape == (8, 2)
    out.loss.backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    want = set(trainable(model))
    assert got == want, f"{name} with {peft}: these differ: {sorted(got ^ want)[:4]}"
    assert all(torch.isfinite(p.grad).all() for p in trainable(model).values())


@pytest.mark.parametrize("peft", PEFTS)
@pytest.mark.parametrize("name", REGULARIZERS)
def test_evaluation_is_the_plain_model(name, peft):
    plain = method(peft).apply(tiny_model(0))
    _, model = prepared(name, peft)
    torch.testing.assert_close(logits(model), logits(plain), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", REGULARIZERS)
def test_applies_on_the_meta_device(name):
    """As the stage's validation does: a weightless model, the PEFT method, then this."""
    with torch.device("meta"):
        model = method("full").apply(tiny_model(0))
        regularizer(name).apply(model)


@pytest.mark.parametrize("name", REGULARIZERS)
def test_a_task_without_logits_gets_a_clear_error_or_works(name):
    """The builder's check of the task and a training step of a logit-less task agree: both
    stop with an error naming the tasks it supports, or both work."""
    from ftlab.regularizers.base import ChecksTask

    reg = regularizer(name)
    try:
        if isinstance(reg, ChecksTask):
            reg.check_task(NoLogits())
        refused = None
    except FtlabError as err:
        refused = err
    _, model = prepared(name)
    model.train()
    if refused is None:
        assert torch.isfinite(reg.training_loss(model, batch(0), NoLogits()).loss)
        return
    assert "logits" in refused.problem and "stage=classify" in refused.fix
    with pytest.raises(FtlabError, match="logits") as err:
        reg.training_loss(model, batch(0), NoLogits())
    assert "stage=classify" in err.value.fix


@pytest.mark.parametrize("name", ["r3f", "smart"])
@pytest.mark.parametrize("stage", ["mlm", "cloze"])
def test_logit_regularisers_refuse_a_masked_lm_and_take_cloze(name, stage, make_cfg,
                                                              sentiment_dir):
    """stage=mlm has no per-row logits (refused before training); stage=cloze on the same
    masked LM has (its verbaliser scores) and trains."""
    from ftlab.run import run
    from tests.conftest import tiny_overrides

    cfg = make_cfg(tiny_overrides(sentiment_dir) + [
        f"stage={stage}", f"regularizer={name}", "trainer.max_steps=2",
        *(["stage.task.verbalizer={pos: great, neg: bad}"] if stage == "cloze" else [])])
    if stage == "mlm":
        with pytest.raises(SystemExit):
            run(cfg)
        run_dir = Path(cfg.paths.output_dir)
        record = json.loads((run_dir / "metrics.json").read_text())
        # refused by the checks before any stage starts, not by the first training step
        assert "current_stage" not in record and not (run_dir / "mlm").exists(), record
        assert f"regularizer={name} " in record["error"], record["error"]
        assert "MaskedLM task's training outputs have no per-row logits" in record["error"]
        assert "Fix: use it with a task that has logits" in record["error"]
        return
    record = run(cfg)
    assert record["status"] == "ok" and record["stages"]["cloze"]["global_steps"] == 2


@pytest.mark.parametrize(("stage", "model"), [("mlm", "tiny_bert"), ("clm", "tiny_gpt2"),
                                            ("text2text", "tiny_t5")])
def test_freelb_trains_token_level_tasks_on_one_objective_per_batch(stage, model, tmp_path,
                                                                    sentiment_dir):
    """FreeLB needs only the task's loss: masked LM, causal LM and text-to-text train with it.
    Its K forwards restore the random state, so they see the same dropout masks and (mlm) the
    same masked positions: with no perturbation (init 0, step 0) every step's loss is its first
    forward's exactly; with the perturbation on, the K forwards see it (the mean moves)."""
    from ftlab.run import run
    from tests.conftest import compose_cfg, tiny_overrides

    def logged(*extra: str) -> list[dict[str, str]]:
        overrides = [o for o in tiny_overrides(sentiment_dir) if o != "logger=none"]
        cfg = compose_cfg(overrides + [f"model={model}", f"stage={stage}", "regularizer=freelb",
                                       "logger=csv", "trainer.log_every_n_steps=1",
                                       "stage.trainer.max_steps=3", *extra],
                          tmp_path / "-".join(extra))
        try:
            run(cfg)
        except SystemExit as stop:  # 3 steps of a tiny model may stay at the baseline
            assert stop.code == 3, stop.code
        (path,) = (Path(cfg.paths.output_dir) / stage / "csv").rglob("metrics.csv")
        return [r for r in csv.DictReader(path.open()) if r.get("train/loss")]

    rows = logged("regularizer.init_mag=0", "regularizer.adv_lr=0")
    assert len(rows) == 3
    for r in rows:
        assert float(r["train/loss"]) == pytest.approx(float(r["train/freelb_first_loss"]),
                                                       rel=1e-6), r
    moved = logged("regularizer.init_mag=1", "regularizer.adv_lr=1")
    assert any(abs(float(r["train/loss"]) - float(r["train/freelb_first_loss"])) > 1e-4
               for r in moved), moved


def train_losses(run_dir: Path) -> list[float]:
    (path,) = (run_dir / "classify" / "csv").rglob("metrics.csv")
    return [float(r["train/loss"]) for r in csv.DictReader(path.open()) if r.get("train/loss")]


@pytest.mark.parametrize("name", REGULARIZERS)
def test_a_tiny_run_learns_and_records_its_metrics(name, make_cfg, sentiment_dir):
    cfg = make_cfg([*tiny_overrides(sentiment_dir), f"regularizer={name}", "logger=csv",
                    "trainer.log_every_n_steps=1", "stage.trainer.max_epochs=6",
                    "stage.optim.lr=3e-3", "seed=3", *TINY_RUN.get(name, [])])
    record = run(cfg)
    assert record["status"] == "ok", record
    final = record["final"]
    assert final["val/acc"] > final["val/baseline_acc"] + 0.1, final
    assert {"test/acc", "test/f1", "test/loss"} <= set(final)
    run_dir = Path(cfg.paths.output_dir)
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved["final"] == final
    assert OmegaConf.load(run_dir / "config.yaml").regularizer._target_ == cfg.regularizer._target_
    (path,) = (run_dir / "classify" / "csv").rglob("metrics.csv")
    header = path.read_text().splitlines()[0].split(",")
    assert {f"train/{t}" for t in LOGGED_TERMS.get(name, ())} <= set(header), header
    reg, model = prepared(name)  # and whatever terms a new regulariser's output names
    terms = {k for k in reg.training_loss(model.train(), batch(0), TASK).extras
             if k.startswith(f"{reg.name}_")}
    assert {f"train/{t}" for t in terms} <= set(header), (terms, header)
    losses = train_losses(run_dir)
    assert len(losses) >= 90
    assert sum(losses[-8:]) / 8 < sum(losses[:8]) / 8 - 0.1, losses


@pytest.mark.parametrize("family", FAMILIES)
def test_the_embedding_perturbation_reaches_every_familys_logits(family):
    """R3F/SMART/FreeLB add their noise to the word embeddings; T5's forward embeds with
    modules tied to (not the same as) get_input_embeddings(): the noise must reach it too
    (else R3F is silently the plain loss and SMART/FreeLB fail on an unused gradient)."""
    from ftlab.regularizers.embedding import perturbed, zeros_like_embeddings

    model = tiny_model(0, family).eval()
    inputs = {k: v for k, v in batch(0).items() if k != "labels"}
    delta = zeros_like_embeddings(model, inputs).requires_grad_()
    with perturbed(model, delta):
        out = model(**inputs).logits
    (grad,) = torch.autograd.grad(out.square().sum(), delta)
    assert grad.abs().sum() > 0, family


def test_an_encoder_decoder_is_perturbed_on_its_input_text_only():
    """T5's classifier feeds its decoder the shifted input (the same shape as the noise): the
    noise goes to the encoder's embeddings only, as fairseq's R3F does for BART."""
    from ftlab.regularizers.embedding import perturbed, zeros_like_embeddings

    model = tiny_model(0, "t5").eval()
    inputs = {k: v for k, v in batch(0).items() if k != "labels"}
    seen: dict[str, list[torch.Tensor]] = {"encoder": [], "decoder": []}
    for side in seen:
        getattr(model.transformer, side).embed_tokens.register_forward_hook(
            lambda _m, _i, out, side=side: seen[side].append(out.detach()))
    model(**inputs)
    delta = torch.randn_like(zeros_like_embeddings(model, inputs))
    with perturbed(model, delta):
        model(**inputs)
    assert seen["decoder"][0].shape == delta.shape  # the same shape, yet left alone
    torch.testing.assert_close(seen["decoder"][1], seen["decoder"][0])
    torch.testing.assert_close(seen["encoder"][1], seen["encoder"][0] + delta)


# -- each regulariser's own term, against its definition ---------------------------------------

def loss_of(name: str, seed: int = 0, **extra) -> tuple[float, float, TaskOutput]:
    """(training loss, plain task loss) on one batch in eval mode (no dropout: deterministic
    but for the regulariser's own noise, drawn from ``torch.manual_seed(seed)``)."""
    reg, model = prepared(name, **extra)
    model.eval()
    plain = TASK.forward(model, batch(0)).loss.item()
    torch.manual_seed(seed)
    out = reg.training_loss(model, batch(0), TASK)
    return out.loss.item(), plain, out


def test_none_is_the_plain_loss():
    loss, plain, _ = loss_of("none")
    assert loss == plain


@pytest.mark.parametrize(("name", "noise", "weight", "off"), [
    ("r3f", {"eps": 1e-2}, "r3f_lambda", {"eps": 0.0}),
    ("r3f", {"eps": 1e-2, "noise": "normal"}, "r3f_lambda", {"eps": 0.0, "noise": "normal"}),
    ("smart", {"eps": 1e-2, "noise_std": 1e-2, "mu": 0.0}, "lambda_s", {"eps": 0.0}),
])
def test_a_kl_term_is_non_negative_zero_without_noise_and_linear_in_its_weight(
        name, noise, weight, off):
    loss, plain, _ = loss_of(name, **noise)
    term = loss - plain
    assert term > 1e-7, f"{name}: the perturbation changed nothing ({term})"
    double, _, _ = loss_of(name, **noise, **{weight: 2.0})  # same seed: same noise
    assert double - plain == pytest.approx(2 * term, rel=2e-2)  # float32 losses near 0.7
    assert loss_of(name, **noise, **{weight: 0.0})[0] == pytest.approx(plain, abs=1e-7)
    assert loss_of(name, **off)[0] == pytest.approx(plain, abs=1e-7)  # no noise: KL 0


def test_smart_adversarial_steps_find_a_worse_perturbation_than_its_initial_noise():
    # eps large enough that the projection does not flatten the difference
    random, _, _ = loss_of("smart", mu=0.0, eps=1e-2, noise_std=1e-2, steps=0)
    ascended, _, _ = loss_of("smart", mu=0.0, eps=1e-2, noise_std=1e-2, steps=2,
                             step_size=1e-2)
    assert ascended > random


def test_smart_bregman_term_pulls_toward_a_lagging_momentum_teacher():
    reg, model = prepared("smart", lambda_s=0.0)
    model.eval()
    first = reg.training_loss(model, batch(0), TASK).extras["smart_bregman"]
    assert first == 0  # the teacher starts as the model
    again = reg.training_loss(model, batch(0), TASK).extras["smart_bregman"]
    assert again == 0  # no optimiser step in between (gradient accumulation): teacher stays
    start = {n: p.detach().clone() for n, p in trainable(model).items()}
    with torch.no_grad():  # an optimiser step moves the model; the teacher follows 1% of it
        for p in trainable(model).values():
            p.add_(torch.randn_like(p) * 0.05)
    moved = reg.training_loss(model, batch(0), TASK)
    assert moved.extras["smart_bregman"] > 0
    for n, p in trainable(model).items():  # theta~ <- beta theta~ + (1 - beta) theta, beta .99
        torch.testing.assert_close(reg.teacher[n], start[n] + 0.01 * (p.detach() - start[n]))
    plain = TASK.forward(model, batch(0)).loss
    assert moved.loss.item() == pytest.approx((plain + moved.extras["smart_bregman"]).item())
    reg0, model0 = prepared("smart", lambda_s=0.0, beta=0.0)  # no momentum: teacher = model
    model0.eval()
    reg0.training_loss(model0, batch(0), TASK)
    with torch.no_grad():
        for p in trainable(model0).values():
            p.add_(torch.randn_like(p) * 0.05)
    assert reg0.training_loss(model0, batch(0), TASK).extras["smart_bregman"] == 0


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in trainable(model).items()}


def test_freelb_gradient_is_the_mean_over_its_k_perturbations():
    """Record the perturbed word embeddings FreeLB's K forwards see; then, independently,
    backpropagate the plain task loss at each of those K perturbations and average."""
    reg, model = prepared("freelb")
    model.eval()
    emb = model.get_input_embeddings()
    seen: list[torch.Tensor] = []
    handle = emb.register_forward_hook(lambda m, i, out: seen.append(out.detach().clone()))
    torch.manual_seed(0)
    reg.training_loss(model, batch(0), TASK).loss.backward()
    handle.remove()
    freelb = grads(model)
    assert len(seen) == reg.steps
    with torch.no_grad():
        clean = emb(batch(0)["input_ids"])
    deltas = [s - clean for s in seen]
    assert all(d.abs().max() > 0 for d in deltas)  # and it ascended:
    assert all(not torch.allclose(a, b) for a, b in zip(deltas, deltas[1:], strict=False))

    model.zero_grad()
    for delta in deltas:  # the definition: (1/K) sum_k grad L(x + delta_k)
        handle = emb.register_forward_hook(lambda m, i, out, d=delta: out + d)
        (TASK.forward(model, batch(0)).loss / len(deltas)).backward()
        handle.remove()
    for n, g in grads(model).items():
        torch.testing.assert_close(freelb[n], g, rtol=1e-4, atol=1e-7, msg=n)

    model.zero_grad()
    TASK.forward(model, batch(0)).loss.backward()
    plain = grads(model)
    assert any(not torch.allclose(freelb[n], plain[n], rtol=1e-3, atol=1e-6) for n in plain)


def eval_logits(model: torch.nn.Module, train: bool) -> torch.Tensor:
    b = batch(99)
    model.train(train)
    with torch.no_grad():
        return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits


def test_mixout_replaces_dropout_and_mixes_only_weights_that_moved():
    _, model = prepared("mixout")
    model.dropout.p = 0.0  # the head's own dropout (mixout leaves it)
    at_start = eval_logits(model, train=False)
    # at the pre-trained weights every mix is the weight itself: training = evaluation, so
    # the backbone's dropout is gone too
    torch.testing.assert_close(eval_logits(model, train=True), at_start, atol=1e-5, rtol=0)
    with torch.no_grad():
        for p in trainable(model).values():
            p.add_(torch.randn_like(p) * 0.05)
    draws = [eval_logits(model, train=True) for _ in range(2)]
    assert not torch.allclose(draws[0], draws[1])  # a new mix of the weights each forward



@pytest.mark.parametrize("peft", ["movement_pruning", "diff_pruning", "intrinsic"])
def test_mixout_refuses_a_method_that_recomputes_the_weights(peft):
    """Movement pruning trains its weights, but each forward uses w x mask: mixout's swapped
    units (p = 0.9 of them) would train on the unpruned pre-trained weight, a model evaluation
    never sees. Every re-parametrising method is refused, with the methods that fit."""
    with pytest.raises(FtlabError, match="re-parametrises the weights") as err:
        regularizer("mixout").apply(method(peft).apply(tiny_model(0)))
    assert "lora" in err.value.fix

def test_mixout_is_unbiased_in_training_and_exact_in_evaluation():
    reg, model = prepared("mixout")
    # each mixed layer's output is unbiased: E[x W_mix^T] = x W^T (mean of 4,000 draws)
    layer = model.bert.encoder.layer[0].intermediate.dense
    x = torch.randn(4, layer.in_features)
    with torch.no_grad():
        layer.weight.add_(torch.randn_like(layer.weight) * 0.05)  # away from pre-trained
        mean = torch.stack([layer.train()(x) for _ in range(4000)]).mean(0)
        exact = layer.eval()(x)
    torch.testing.assert_close(mean, exact, atol=0.06, rtol=0)  # std of the mean ~0.013
    assert torch.equal(exact, torch.nn.functional.linear(x, layer.weight, layer.bias))
    # train a few steps with mixout, then evaluation = a plain model with the same weights
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(3):
        reg.training_loss(model, batch(step), TASK).loss.backward()
        opt.step()
        opt.zero_grad()
    plain = tiny_model(1)
    plain.load_state_dict(model.state_dict())
    torch.testing.assert_close(logits(model), logits(plain), atol=0, rtol=0)
    assert not torch.allclose(logits(plain), logits(tiny_model(0)))  # it trained
