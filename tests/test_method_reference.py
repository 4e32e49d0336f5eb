"""Hand-written methods against their papers' reference code: each test pins one mechanism
detail where ftlab once differed from it (fairseq's R3F, FreeLB's repo, bloodwass/mixout,
DiffPruning, Li et al.'s Fastfood), on tiny modules with hand-computed expectations."""

from __future__ import annotations

import math

import pytest
import torch

from ftlab.tasks.base import TaskOutput
from tests.test_peft_contract import batch, method, tiny_model
from tests.test_regularizer_contract import TASK, TinyClassify, prepared, regularizer


def symmetric_kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """fairseq's ``_get_symm_kl``, written out here (not ftlab's, which is under test): KL(p||q)
    + KL(q||p) of the rows' softmaxes, summed over the classes, divided by the rows."""
    la, lb = a.float().log_softmax(-1), b.float().log_softmax(-1)
    return ((la.exp() - lb.exp()) * (la - lb)).sum() / a.shape[0]

# -- Mixout (Lee et al. 2020; bloodwass/mixout) ------------------------------------------------


@pytest.mark.parametrize(("family", "layer"), [
    ("bert", lambda m: m.bert.encoder.layer[0].intermediate.dense),  # nn.Linear [out, in]
    ("gpt2", lambda m: m.transformer.h[0].mlp.c_fc),                 # Conv1D [in, out]
])
def test_mixout_swaps_whole_input_units_for_their_pretrained_weights(family, layer):
    """The reference draws one Bernoulli per *input unit* (``noise[0]`` repeated over the
    output rows: with a zero target it is dropout on the layer's input), not per element. Fed
    the identity, the layer's output row j is input unit j's weights: all kept (rescaled,
    ``(W - pU) / (1 - p)``) or all swapped (``(U - pU) / (1 - p) = U``)."""
    p = 0.5
    model = regularizer("mixout", p=p).apply(method("full").apply(tiny_model(0, family)))
    lin = layer(model)
    pretrained = lin.mixout_target.clone()
    with torch.no_grad():
        lin.weight.add_(torch.randn_like(lin.weight))  # far from the pre-trained value
    w = lin.weight.detach()
    rows = (lambda t: t) if family == "gpt2" else (lambda t: t.T)  # input units as rows
    kept, swapped = rows((w - p * pretrained) / (1 - p)), rows(pretrained)
    eye = torch.eye(kept.shape[0])
    torch.manual_seed(0)
    with torch.no_grad():
        out = lin.train()(eye) - lin.bias
    whole_kept = torch.isclose(out, kept, atol=1e-5).all(1)
    whole_swapped = torch.isclose(out, swapped, atol=1e-5).all(1)
    assert (whole_kept | whole_swapped).all(), "a unit's weights were mixed one by one"
    assert whole_kept.any() and whole_swapped.any()


# -- FreeLB (Zhu et al. 2020; zhuchen03/FreeLB) -------------------------------------------------


def test_freelb_k_forwards_share_one_dropout_mask():
    """Sec. 3.2 of the paper and the repo's ``dp_masks``: the K ascent forwards run the same
    sub-network. With no perturbation (init 0, step 0) the K losses are then equal, so the
    returned mean is the first forward's loss exactly, in training mode with dropout."""
    reg, model = prepared("freelb", init_mag=0.0, adv_lr=0.0, steps=3)
    model.train()
    assert any(m.p > 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    torch.manual_seed(0)
    out = reg.training_loss(model, batch(0), TASK)
    assert out.loss.item() == pytest.approx(out.extras["freelb_first_loss"].item(), abs=1e-7)
    torch.manual_seed(1)  # and another batch's masks differ: dropout is on
    again = reg.training_loss(model, batch(0), TASK)
    assert again.loss.item() != pytest.approx(out.loss.item(), abs=1e-6)


# -- SMART (Jiang et al. 2020, Algorithm 1) -----------------------------------------------------


def test_smart_ascends_the_gradient_of_the_symmetric_kl_as_algorithm_1():
    """g = grad_delta l_s(f(x), f(x + delta)) with l_s the *symmetric* KL (the clean
    prediction constant), then delta + eta g / ||g||_inf (per token), clipped to the eps box:
    recomputed by hand from the perturbations the forwards saw."""
    eta, eps = 0.05, 1.0
    reg, model = prepared("smart", mu=0.0, eps=eps, noise_std=0.3, step_size=eta, steps=1)
    model.eval()
    emb = model.get_input_embeddings()
    seen: list[torch.Tensor] = []
    handle = emb.register_forward_hook(lambda m, i, out: seen.append(out.detach().clone()))
    torch.manual_seed(0)
    out = reg.training_loss(model, batch(0), TASK)
    handle.remove()
    assert len(seen) == 3  # clean, ascent, adversarial
    delta0, delta1 = seen[1] - seen[0], seen[2] - seen[0]

    clean = TASK.forward(model, batch(0)).logits.detach()
    d = delta0.clone().requires_grad_()
    handle = emb.register_forward_hook(lambda m, i, out: out + d)
    noisy = TASK.forward(model, batch(0)).logits
    handle.remove()
    (g,) = torch.autograd.grad(symmetric_kl(noisy, clean), d)
    hand = (delta0 + eta * g / (g.abs().amax(-1, keepdim=True) + 1e-6)).clamp(-eps, eps)
    torch.testing.assert_close(delta1, hand, rtol=1e-3, atol=1e-5)
    assert (delta1 - delta0).abs().max() > 1e-3  # it moved
    # the term is l_s(f(x), f(x + delta)) at the adversarial delta, both directions of the KL
    handle = emb.register_forward_hook(lambda m, i, out: out + delta1)
    with torch.no_grad():
        adversarial = TASK.forward(model, batch(0)).logits
    handle.remove()
    term = symmetric_kl(clean, adversarial)
    assert term > 1e-4
    assert out.extras["smart_adv"].item() == pytest.approx(term.item(), rel=1e-4)
    assert out.loss.item() == pytest.approx(TASK.forward(model, batch(0)).loss.item()
                                            + term.item(), rel=1e-5)  # lambda_s = 1, mu = 0


# -- R3F (Aghajanyan et al. 2021; fairseq's sentence_prediction_r3f) ---------------------------


class KLOnly(TinyClassify):
    """A zero task loss: R3F's training loss is then its KL term alone."""

    def forward(self, model, batch):
        out = super().forward(model, batch)
        return TaskOutput(out.loss * 0.0, out.logits)


def test_r3f_noisy_forward_sends_no_gradient_to_the_embedding_table():
    """fairseq feeds the noisy forward ``token_embeddings.detach().clone() + noise``: the word
    embeddings learn from the clean forward only. Rebuild the term by hand with the same
    noise and compare the embedding table's gradient."""
    eps, lam = 0.05, 3.0
    reg, model = prepared("r3f", eps=eps, r3f_lambda=lam)
    model.eval()
    emb = model.get_input_embeddings()
    torch.manual_seed(0)
    reg.training_loss(model, batch(0), KLOnly()).loss.backward()
    got = emb.weight.grad.clone()
    model.zero_grad()

    ids = batch(0)["input_ids"]
    torch.manual_seed(0)  # R3F's noise: its first draw after the seed
    noise = torch.zeros(*ids.shape, emb.weight.shape[1]).uniform_(-eps, eps)
    clean = TASK.forward(model, batch(0)).logits
    handle = emb.register_forward_hook(lambda m, i, out: out.detach() + noise)
    noisy = TASK.forward(model, batch(0)).logits
    handle.remove()
    (lam * symmetric_kl(noisy, clean)).backward()
    # atol: float32 rounding of the two KL formulas, ~1e-4 of the largest gradient (8e-5)
    torch.testing.assert_close(got, emb.weight.grad, rtol=1e-4, atol=1e-7)
    assert emb.weight.grad.abs().sum() > 0


# -- Diff pruning (Guo et al. 2021; dguo98/DiffPruning) ----------------------------------------


def test_diff_pruning_gate_is_guo_et_al_hard_concrete_without_temperature():
    """``concrete_stretched``: s = sigmoid(log u - log(1 - u) + log_alpha), z = clamp(3 s -
    1.5, 0, 1) (l, r = -1.5, 1.5; no temperature), and the L0 term sigmoid(log_alpha -
    log(-l/r)) (= sigmoid(log_alpha) here), by hand on the same uniforms."""
    model = method("diff_pruning").apply(tiny_model(0))
    log_alpha = torch.linspace(-3, 3, 101)
    torch.manual_seed(0)
    u = torch.rand_like(log_alpha).clamp(1e-6, 1 - 1e-6)
    s = torch.sigmoid(u.log() - (1 - u).log() + log_alpha)
    hand = (s * 3.0 - 1.5).clamp(0, 1)
    torch.manual_seed(0)
    torch.testing.assert_close(model.gate(log_alpha, sample=True), hand)
    # test time: the deterministic gate clamp(3 sigmoid(log_alpha) - 1.5, 0, 1)
    torch.testing.assert_close(model.gate(log_alpha, sample=False),
                               (torch.sigmoid(log_alpha) * 3 - 1.5).clamp(0, 1))
    with torch.no_grad():
        for a in model.log_alpha:
            a.fill_(0.7)
    expected = model.l0_penalty * 1 / (1 + math.exp(-0.7))  # mean over all gates
    assert model.extra_loss().item() == pytest.approx(expected, rel=1e-5)


# -- Intrinsic dimension (Li et al. 2018; Aghajanyan et al. 2021) -----------------------------


def test_fastfood_map_is_li_et_al_scaled_to_the_tensor_size():
    """Li et al.'s ``fastfood_torched`` divides HG(Pi)HB x, truncated to ``numel``, by
    ``sqrt(L |G|^2) sqrt(numel / L)`` = |G| sqrt(numel): built here with dense Hadamard
    matrices from the map's own B, Pi and raw Gaussians, for a size that is no power of 2."""
    from ftlab.peft.intrinsic import Fastfood, _hadamard

    d, numel, seed = 3, 5, 7
    ff = Fastfood(d, numel, seed)
    size = ff.size
    gen = torch.Generator().manual_seed(seed)  # the map's draws, in its order
    b = torch.randint(0, 2, (size,), generator=gen).float() * 2 - 1
    perm = torch.randperm(size, generator=gen)
    gauss = torch.randn(size, generator=gen)
    h = _hadamard(size, b)
    dense = (h @ torch.diag(gauss) @ torch.eye(size)[perm] @ h @ torch.diag(b))[:numel, :d]
    dense = dense / (gauss.norm() * math.sqrt(numel))
    theta = torch.tensor([0.3, -1.2, 0.5])
    torch.testing.assert_close(ff(theta), dense @ theta, rtol=1e-5, atol=1e-6)


def test_diff_pruning_gate_logits_train_in_their_own_group_at_the_reference_lr():
    """The reference steps the gate logits with their own AdamW (lr 0.1, no weight decay, the
    same warmup/decay schedule); at the delta's 5e-5 they would barely move from their start
    and the L0 penalty could close no gate."""
    from ftlab.optim import OptimSpec, build_optimizer

    model = method("diff_pruning").apply(tiny_model(0))
    opt, _ = build_optimizer(model, OptimSpec(lr=5e-5, warmup_ratio=0.0), total_steps=10)
    alphas = {id(p) for p in model.log_alpha}
    [group] = [g for g in opt.param_groups if any(id(p) in alphas for p in g["params"])]
    assert {id(p) for p in group["params"]} == alphas
    assert group["initial_lr"] == pytest.approx(0.1) and group["weight_decay"] == 0
    others = [p for g in opt.param_groups if g is not group for p in g["params"]]
    assert {id(p) for p in model.delta} <= {id(p) for p in others}
    assert all(g["initial_lr"] == pytest.approx(5e-5) for g in opt.param_groups if g is not group)
    shared = method("diff_pruning", alpha_lr=None).apply(tiny_model(0))
    opt, _ = build_optimizer(shared, OptimSpec(lr=5e-5), total_steps=10)
    assert all(g["initial_lr"] == pytest.approx(5e-5) for g in opt.param_groups)
