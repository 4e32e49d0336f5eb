"""What the embedding-space regularisers (R3F, SMART, FreeLB) share: a perturbation added to
the input word embeddings, the check that the task has logits, and the symmetric KL.

The perturbation is a forward hook on the model's input embedding module
(``get_input_embeddings()`` of the Hugging Face model inside any PEFT wrapper), so it reaches
every family and every way a PEFT method wraps the model: HF ``peft`` models (LoRA, prompts:
the prompts are concatenated after the word embeddings and stay clean), forward-hook adapters
and the ``functional_call`` re-parametrisations (module hooks run there too). It is added to
every call of the embedding whose output has the perturbation's shape; an encoder-decoder
(T5) is hooked on its encoder's copy only (``word_embeddings``), so its decoder inputs, which
may have the same shape, stay clean.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ftlab.errors import FtlabError
from ftlab.model.arch import tied_embeddings, unwrap
from ftlab.tasks.base import HasSubtasks, PredictsNumbers, Task, TaskOutput


def input_embeddings(model: nn.Module) -> nn.Module:
    return unwrap(model).get_input_embeddings()


def zeros_like_embeddings(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """A zero perturbation shaped like the word embeddings of ``batch`` ([batch, tokens, dim])."""
    weight = input_embeddings(model).weight
    ids = batch["input_ids"]
    return torch.zeros((*ids.shape, weight.shape[-1]), dtype=torch.float32, device=ids.device)


def token_mask(batch: dict[str, torch.Tensor], delta: torch.Tensor) -> torch.Tensor:
    """1 at real tokens, 0 at padding, broadcastable to ``delta``."""
    mask = batch.get("attention_mask")
    if mask is None:
        return torch.ones_like(delta[..., :1])
    return mask.to(delta.dtype).unsqueeze(-1)


@contextmanager
def perturbed(model: nn.Module, delta: torch.Tensor, detach: bool = False) -> Iterator[None]:
    """Within the block, the word embeddings' output is ``output + delta``; with ``detach``
    ``output.detach() + delta``: that forward sends no gradient to the embedding table
    (fairseq's R3F: ``token_embeddings.detach().clone() + noise``)."""

    def hook(_module: nn.Module, _inputs: tuple, out: torch.Tensor) -> torch.Tensor:
        if out.shape != delta.shape:
            return out
        return (out.detach() if detach else out) + delta.to(out.dtype)

    # prepend: the noise is part of the embedding, before any other hook sees it
    handles = [m.register_forward_hook(hook, prepend=True) for m in word_embeddings(model)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def word_embeddings(model: nn.Module) -> list[nn.Module]:
    """Where the word embeddings are computed: the input embedding module, or for an
    encoder-decoder the encoder's copy tied to it (T5's forward calls ``encoder``/``decoder.
    embed_tokens``, never ``get_input_embeddings()``, which is ``shared``). The encoder's only:
    the noise is on the input text (fairseq's R3F perturbs BART's encoder embeddings), and the
    decoder's inputs are other tokens that may have the same shape."""
    tied = tied_embeddings(model, input_embeddings(model))
    if len(tied) == 1:
        return tied
    root = unwrap(model)
    encoder = root.get_encoder() if hasattr(root, "get_encoder") else None
    inside = {id(m) for m in encoder.modules()} if encoder is not None else set()
    return [m for m in tied if id(m) in inside] or tied


COMPARES = "compares the model's predictions (logits) on clean and perturbed inputs"


def needs_logits(name: str, task: Task, why: str = COMPARES,
                 distribution: bool = True) -> None:
    """Before training: a task whose training outputs have no per-row logits (masked or causal
    LM, text-to-text) is refused; with ``distribution`` (the regulariser compares softmax
    distributions) so is a regression task, whose one output per row has no distribution (its
    softmax is always 1: the term would silently be 0), or a multitask with a regression
    sub-task (its batches' term would be 0)."""
    if not task.row_logits:
        raise no_logits(name, type(task).__name__, why)
    parts = task.parts if isinstance(task, HasSubtasks) else {}
    numbers = [k for k, p in parts.items() if isinstance(getattr(p, "task", None),
                                                         PredictsNumbers)]
    if distribution and (isinstance(task, PredictsNumbers) or numbers):
        which = (f"stage=multitask's sub-task '{numbers[0]}' (a regression)" if numbers
                 else "stage=regression")
        raise FtlabError(f"regularizer={name} {why} as class distributions (a KL divergence), "
                         f"but {which} predicts one number per row: the term would "
                         "always be 0.", "use regularizer=smart (the squared loss there), "
                         "freelb or mixout with stage=regression, or regularizer=none.")


def no_logits(name: str, task: str, why: str = COMPARES) -> FtlabError:
    return FtlabError(
        f"regularizer={name} {why}, but the {task} task's training outputs have no per-row "
        "logits (a masked LM scores only masked positions, drawn anew in every forward; causal "
        "LM and text-to-text training score tokens).",
        "use it with a task that has logits (stage=classify: sequence or sentence-pair "
        "classification; stage=cloze), or regularizer=none / regularizer=mixout for this stage.")


def logits_of(name: str, task: Task, out: TaskOutput, why: str = COMPARES) -> torch.Tensor:
    if out.logits is None:
        raise no_logits(name, type(task).__name__, why)
    return out.logits


def real_positions(batch: dict[str, torch.Tensor], logits: torch.Tensor) -> torch.Tensor | None:
    """For per-token logits (``[batch, tokens, classes]``: stage=tokens) the batch's attention
    mask (1 at real tokens): the divergence is a mean over real tokens, never over padding,
    whose predictions no loss or metric reads (a padded batch's term would otherwise shrink by
    its share of padding). None for per-row logits."""
    mask = batch.get("attention_mask")
    if logits.dim() != 3 or mask is None or mask.shape != logits.shape[:2]:
        return None
    return mask.float()


def kl(target: torch.Tensor, logits: torch.Tensor,
       mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(softmax(target) || softmax(logits)), summed over classes, mean over rows (positions;
    with ``mask``, over the positions where it is 1)."""
    if mask is not None:
        per = F.kl_div(F.log_softmax(logits.float(), -1), F.log_softmax(target.float(), -1),
                       log_target=True, reduction="none").sum(-1)
        return (per * mask).sum() / mask.sum().clamp(min=1)
    target = target.float().reshape(-1, target.shape[-1])
    logits = logits.float().reshape(-1, logits.shape[-1])
    return F.kl_div(F.log_softmax(logits, -1), F.log_softmax(target, -1), log_target=True,
                    reduction="batchmean")


def symmetric_kl(a: torch.Tensor, b: torch.Tensor,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(a||b) + KL(b||a); gradients reach both (fairseq's R3F)."""
    return kl(a, b, mask) + kl(b, a, mask)


def symmetric_kl_fixed_targets(a: torch.Tensor, b: torch.Tensor,
                               mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(a||b) + KL(b||a) where each direction treats its target as a constant (mt-dnn's
    symmetric KL for SMART): gradients reach both, never through a target distribution."""
    return kl(a.detach(), b, mask) + kl(b.detach(), a, mask)
