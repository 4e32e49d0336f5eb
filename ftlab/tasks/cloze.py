"""Cloze-style classification (PET, Schick & Schuetze 2021): the task framed in the
pre-training objective, so no head is learnt from scratch.

- Masked LMs: a label's score is the MLM logit of its verbaliser word at the ``[MASK]``.
- Causal LMs: the log-probability of the word's tokens after the pattern's text before
  ``{mask}`` (several tokens: summed log-probabilities).

Several words per label: the label's score is the log-sum-exp of its words' scores (the
probability of saying any of them). Training is cross-entropy over the label scores (soft
labels too); ``stage.aux_mlm_weight`` adds PET's auxiliary MLM loss. No training steps
(``stage.trainer.max_steps=0``) evaluates the pre-trained model: a zero-shot run.

Contextual calibration (Zhao et al. 2021, ``calibrate: true``): the label distribution the
model gives content-free inputs ("N/A", "", "[MASK]" put through the same pattern) estimates
its bias p_cf; calibrated probabilities are p / p_cf renormalised (W = diag(p_cf)^-1, b = 0).
Metrics then come twice: ``acc``/``f1`` and ``acc_cal``/``f1_cal``.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from ftlab.data.sources import RawData
from ftlab.errors import FtlabError
from ftlab.model.backbone import ModelSpec, load_config, load_model
from ftlab.rules import at_least
from ftlab.tasks.base import TaskOutput, as_text, soft_label_loss
from ftlab.tasks.calibration import CalibratedAccuracy, CalibratedF1, calibrate
from ftlab.tasks.classify import Classify
from ftlab.tasks.prompting import (
    Pattern,
    check_fields,
    continuation_logprob,
    cut_rows,
    fit_texts,
    input_logits,
    verbaliser_ids,
)

#: Zhao et al. (2021)'s content-free inputs; "[MASK]" becomes the tokenizer's mask token
CONTENT_FREE = ("N/A", "", "[MASK]")


class Cloze(Classify):
    """Classification by filling a pattern's slot with verbaliser words.

    Args:
        pattern: e.g. ``"{text} It was {mask}."``; fields are the data's text columns.
        verbalizer: label -> word or list of words; None: each label's own name.
        max_length: tokens per row; the longest text field is cut to fit, not the pattern.
        calibrate: also report contextually calibrated metrics (``acc_cal``, ``f1_cal``).
        content_free: the content-free inputs for calibration.
        monitor: validation metric that picks the best epoch (``acc_cal`` with calibration).
    """

    def __init__(self, pattern: str, verbalizer: Mapping[str, Any] | None = None,
                 max_length: Annotated[int, at_least(1, example="128")] = 128,
                 calibrate: bool = False, content_free: Sequence[str] = CONTENT_FREE,
                 monitor: str = "acc") -> None:
        super().__init__(max_length=max_length, monitor=monitor)
        self.pattern = Pattern(pattern)
        if verbalizer is not None and not isinstance(verbalizer, Mapping):  # a list, a word
            raise FtlabError(f"stage.task.verbalizer maps each label to its word(s); got "
                             f"{verbalizer!r}.", "write it as label: word (or [words]), e.g. "
                             "\"stage.task.verbalizer={fresh: great, rotten: terrible}\", or "
                             "null for the label names.")
        self.verbalizer = dict(verbalizer) if verbalizer is not None else None
        self.calibrate = calibrate
        # one input given as a string is one input, not its characters
        self.content_free = [content_free] if isinstance(content_free, str) \
            else list(content_free)
        self.causal: bool | None = None  # known once the model is built
        self._p_cf: tuple[Any, tuple, torch.Tensor] | None = None  # (model, weights, p_cf)

    def __getstate__(self) -> dict[str, Any]:  # pickled (DDP spawn) without the p_cf cache
        return {**self.__dict__, "_p_cf": None}

    # --- data -------------------------------------------------------------------------------
    def bind(self, raw: RawData, tokenizer: Any, text_columns: list[str]) -> None:
        super().bind(raw, tokenizer, text_columns)
        check_fields(self.pattern, self.text_columns)
        verbalizer = self.verbalizer or {label: label for label in self.labels}
        self.words = verbaliser_ids(tokenizer, self.pattern, verbalizer, self.labels)
        self.features = ("input_ids", "attention_mask", "labels", "slot")

    def _texts(self, batch: Mapping[str, list], i: int) -> dict[str, str]:
        return {c: as_text(batch[c][i]) for c in self.pattern.fields}

    def featurize(self, batch: dict[str, list]) -> dict[str, list]:
        rows = len(batch[self.text_columns[0]])
        ids, slots = zip(*(self.encode_slot(self._texts(batch, i)) for i in range(rows)),
                         strict=True) if rows else ((), ())
        return {"input_ids": list(ids), "attention_mask": [[1] * len(x) for x in ids],
                "labels": batch["label"], "slot": list(slots), "length": [len(x) for x in ids]}

    def encode_slot(self, texts: dict[str, str]) -> tuple[list[int], int]:
        """A row's token ids, the whole pattern with [MASK] (masked LM) or the text before the
        slot (causal LM), and the slot's position: the pattern's [MASK] (not a mask token the
        text itself holds, as the content-free input "[MASK]" does), or the prefix's last
        token."""
        if self.causal is None:
            raise FtlabError("Cloze.encode_slot before the model family is known.",
                             "call see_model(config) (StageBuilder does) before featurising.")
        ids, cut = self._fit(texts)
        if self.causal:
            return ids, len(ids) - 1
        mask_id = self.tokenizer.mask_token_id
        masks = [i for i, t in enumerate(ids) if t == mask_id]
        if len(masks) == 1:  # the usual row: no mask token in its text
            return ids, masks[0]
        before = self.tokenizer(self.pattern.before_mask.format_map(cut),
                                add_special_tokens=False)["input_ids"]
        return ids, masks[min(before.count(mask_id), len(masks) - 1)]

    def _fit(self, texts: dict[str, str]) -> tuple[list[int], dict[str, str]]:
        return fit_texts(self.tokenizer, self.pattern, texts, self.tokenizer.mask_token or "",
                         self.max_length, prefix_only=self.causal)

    def cut_to_fit(self, columns: Mapping[str, list]) -> list[bool]:
        return cut_rows(self._fit, columns, self.pattern.fields)

    # --- model ------------------------------------------------------------------------------
    def see_model(self, config: Any) -> None:
        """Masked or causal LM, from the model's config (before featurising)."""
        from transformers.models.auto import modeling_auto as auto

        kind = config.model_type
        if getattr(config, "is_encoder_decoder", False):
            raise FtlabError(f"stage=cloze scores a slot with a masked or causal LM; '{kind}' is "
                             "an encoder-decoder.", "use stage=text2text for T5/BART models.")
        if kind in auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES and self.tokenizer.mask_token:
            self.causal = False
        elif kind in auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            self.causal = True
        else:
            raise FtlabError(f"stage=cloze needs a language-model head, and '{kind}' has none "
                             "in transformers (or its tokenizer has no mask token).",
                             "use a masked LM (BERT, RoBERTa...) or a causal LM (model=smollm2).")
        after = [f for f in self.pattern.fields
                 if "{" + f + "}" not in self.pattern.before_mask]
        if self.causal and after:  # a causal LM reads the text before the slot only
            raise FtlabError(f"A causal LM scores the words after the pattern's text before "
                             f"{{mask}}, but {self.pattern.template!r} puts {after} after it: "
                             "that text would never be read.",
                             "put {mask} after every text field, e.g. "
                             "stage.task.pattern='{text} It was {mask}.'.")
        if not self.causal and any(len(w) != 1 for ws in self.words for w in ws):
            bad = {lab: [self.tokenizer.convert_ids_to_tokens(w) for w in ws]
                   for lab, ws in zip(self.labels, self.words, strict=True)
                   if any(len(w) != 1 for w in ws)}
            named = "" if self.verbalizer else (" (stage.task.verbalizer is null, so the words "
                                                 "are the label names)")
            example = ", ".join(f"{lab}: <word>" for lab in self.labels[:3])
            raise FtlabError(f"A masked LM fills one [MASK] with one token, but these verbaliser "
                             f"words are several tokens{named}: {bad}.",
                             "choose single-token words for this tokenizer in "
                             f"stage.task.verbalizer (\"stage.task.verbalizer={{{example}}}\"), "
                             "or use a causal LM (model=smollm2), which sums the tokens' "
                             "log-probabilities.")

    def positions_past_max_length(self) -> tuple[int, str, str | None]:
        """(positions, why, key) a causal LM's evaluation appends after a ``max_length`` prompt: a
        verbaliser of several tokens is scored after it, all of them fed (a masked LM scores
        the slot in place; one-token words are read off the prompt's last logits)."""
        longest = max((len(w) for ws in getattr(self, "words", []) for w in ws), default=0)
        if not self.causal or longest < 2:
            return 0, "", None
        return longest, f"the longest verbaliser word's {longest} tokens (task.verbalizer)", None

    def build_model(self, spec: ModelSpec) -> nn.Module:
        from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

        config = load_config(spec)
        self.see_model(config)
        return load_model(spec, AutoModelForCausalLM if self.causal else AutoModelForMaskedLM,
                          config=config)

    def untrained_head(self, missing: list[str]) -> FtlabError:
        return FtlabError(
            f"The model has no trained LM head (the checkpoint lacks {len(missing)} head "
            f"tensors, e.g. {missing[0]}): its [MASK] predictions would be random, "
            "so cloze scores would mean nothing.",
            "use a model with an MLM head (a BERT/RoBERTa checkpoint trained as a masked LM, or "
            "model=smollm2 for a causal LM), or train one first: a pipeline whose earlier stage "
            "is stage=mlm and whose cloze stage has init_from: <that stage>, carry: model.")

    # --- scoring ----------------------------------------------------------------------------
    def scores(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Log-space label scores ``[batch, labels]``."""
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")
                  if k in batch}
        words = self._word_scores(model, inputs, batch.get("slot"))  # [batch, all words]
        per_label, start = [], 0
        for ws in self.words:
            per_label.append(torch.logsumexp(words[:, start:start + len(ws)], dim=-1))
            start += len(ws)
        return torch.stack(per_label, dim=-1)

    def _word_scores(self, model: nn.Module, inputs: dict[str, torch.Tensor],
                     slot: torch.Tensor | None = None) -> torch.Tensor:
        flat = [w for ws in self.words for w in ws]
        ids = inputs["input_ids"]
        rows = torch.arange(ids.shape[0], device=ids.device)
        if not self.causal:  # the MLM logit of each word's token at the pattern's [MASK]
            at = slot if slot is not None else (
                ids == self.tokenizer.mask_token_id).int().argmax(-1)
            logits = input_logits(model(**inputs).logits, ids.shape[1])[rows, at].float()
            return logits[:, [w[0] for w in flat]]
        last = inputs["attention_mask"].sum(-1) - 1  # right-padded: the prefix's last token
        if all(len(w) == 1 for w in flat):
            logits = input_logits(model(**inputs).logits, ids.shape[1])
            logp = F.log_softmax(logits[rows, last].float(), dim=-1)
            return logp[:, [w[0] for w in flat]]
        pad = self.tokenizer.pad_token_id or 0
        return torch.stack([continuation_logprob(model, ids, inputs["attention_mask"], last, w,
                                                 pad) for w in flat], dim=-1)

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> TaskOutput:
        scores = self.scores(model, batch)
        target = batch["labels"]
        loss = (soft_label_loss(scores, target, self.soft_temperature)  # distillation
                if target.is_floating_point() else F.cross_entropy(scores, target))
        extras: dict[str, Any] = {}
        if self.calibrate and not model.training:
            extras["calibrated"] = self.calibrated(model, scores)
        return TaskOutput(loss, scores, extras)

    # --- calibration ------------------------------------------------------------------------
    def content_free_probs(self, model: nn.Module) -> torch.Tensor:
        """Mean label distribution over the content-free inputs (Zhao et al. 2021, p_cf), of
        ``model``'s weights as they are now. Estimated once per state of the weights, not per
        evaluation batch: it is kept with each parameter's storage and version counter, which
        every in-place change bumps (an optimiser step, restoring the best epoch's weights,
        loading a snapshot's), so a changed model is never scored with an old bias."""
        from ftlab.data.batching import PadCollator

        state = tuple((p.data_ptr(), p._version) for p in model.parameters())
        if self._p_cf is not None and self._p_cf[0]() is model and self._p_cf[1] == state:
            return self._p_cf[2]
        rows = []
        for cf in self.content_free:
            text = self.tokenizer.mask_token if cf == "[MASK]" and self.tokenizer.mask_token \
                else cf
            ids, slot = self.encode_slot({f: text for f in self.pattern.fields})
            rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "slot": slot})
        batch = PadCollator(self.tokenizer.pad_token_id or 0)(rows)
        device = next(model.parameters()).device
        with torch.no_grad():
            probs = self.scores(model, {k: v.to(device) for k, v in batch.items()}).softmax(-1)
        self._p_cf = (weakref.ref(model), state, probs.mean(0))  # a new model: estimated anew
        return self._p_cf[2]

    def calibrated(self, model: nn.Module, scores: torch.Tensor) -> torch.Tensor:
        """Calibrated label probabilities: softmax(scores) / p_cf, renormalised (p_cf of
        ``model``'s current weights)."""
        return calibrate(scores.softmax(-1), self.content_free_probs(model).to(scores.device))

    def probabilities(self, model: nn.Module, scores: torch.Tensor) -> torch.Tensor:
        """What ``ftlab.load(...).predict`` reports: calibrated when the stage calibrates
        (its ``acc_cal`` scored those), else the softmax of the verbaliser scores."""
        return self.calibrated(model, scores) if self.calibrate else scores.softmax(-1)

    # --- metrics ----------------------------------------------------------------------------
    def metrics(self) -> MetricCollection:
        n = len(self.labels)
        metrics = {"acc": MulticlassAccuracy(num_classes=n, average="micro"),
                   "f1": MulticlassF1Score(num_classes=n, average="macro")}
        if self.calibrate:
            metrics |= {"acc_cal": CalibratedAccuracy(num_classes=n, average="micro"),
                        "f1_cal": CalibratedF1(num_classes=n, average="macro")}
        # no compute groups: plain and calibrated metrics have equal states until they differ
        return MetricCollection(metrics, compute_groups=False)

    def update(self, metrics: MetricCollection, out: TaskOutput,
               batch: dict[str, torch.Tensor]) -> None:
        target = batch["labels"]
        if target.is_floating_point():
            target = target.argmax(-1)
        cal = out.extras.get("calibrated")
        metrics.update(preds=out.logits.argmax(-1), target=target,
                       calibrated=(cal if cal is not None else out.logits).argmax(-1))
