"""An auxiliary masked-LM loss beside any task (Chronopoulou et al. 2019), set by
``stage.aux_mlm_weight``."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MetricCollection

from ftlab.data.sources import RawData
from ftlab.errors import FtlabError
from ftlab.model.arch import mlm_head
from ftlab.model.backbone import ModelSpec
from ftlab.peft.layers import mark_fresh
from ftlab.tasks.base import Task, TaskOutput
from ftlab.tasks.mlm import MaskedLM


class AuxMLM:
    """Joint task + masked-LM training (Chronopoulou et al. 2019): the task's loss plus
    ``weight`` times an MLM loss on the same batch's text, through the same encoder.

    Wraps any task; evaluation reports the plain task loss and metrics. The MLM head is
    attached to the task model as ``aux_mlm_head`` (decoder tied to the word embeddings). The
    MLM loss runs through the model as the PEFT method prepared it (a wrapper's swapped-in
    weights, LoRA layers, prompts): see :meth:`aux_loss`.

    ``AuxMLM(task, w)`` is an instance of a subclass made for ``type(task)`` whose class shows
    the task's own members, so the optional task Protocols (``ftlab.tasks.base``) see them on
    every Python; it pickles as ``AuxMLM(task, w, mlm)``.
    """

    def __new__(cls, task: Task, weight: float, mlm: MaskedLM | None = None) -> AuxMLM:
        return super().__new__(_forwarding_class(task) if cls is AuxMLM else cls)

    def __init__(self, task: Task, weight: float, mlm: MaskedLM | None = None) -> None:
        self.task, self.weight = task, weight
        self.mlm = mlm or MaskedLM(pack=False)

    def __getattr__(self, name: str) -> Any:  # the wrapped task's own attributes (labels...)
        if name in ("task", "mlm"):
            raise AttributeError(name)
        return getattr(self.task, name)

    def __reduce__(self) -> tuple[Any, ...]:  # by AuxMLM, not by its per-task-class subclass
        return AuxMLM, (self.task, self.weight, self.mlm), self.__dict__

    @property
    def monitor(self) -> str:
        return self.task.monitor

    @property
    def mode(self) -> str:
        return self.task.mode

    @property
    def features(self) -> tuple[str, ...]:
        return self.task.features

    @property
    def pad_values(self) -> Mapping[str, int | float]:
        return self.task.pad_values

    @property
    def info(self) -> Mapping[str, Any]:
        return self.task.info

    def baseline(self, labels: Sequence[Any]) -> dict[str, float] | None:
        return self.task.baseline(labels)

    def bind(self, raw: RawData, tokenizer: Any, text_columns: list[str]) -> None:
        self.task.bind(raw, tokenizer, text_columns)
        self.mlm.bind(raw, tokenizer, text_columns)

    def featurize(self, batch: dict[str, list]) -> dict[str, list]:
        return self.task.featurize(batch)

    def build_model(self, spec: ModelSpec) -> nn.Module:
        model = self.task.build_model(spec)
        donor = self.mlm.build_model(spec)
        head = mlm_head(donor)  # a clear error for families without one
        tied = donor.get_output_embeddings().weight = model.get_input_embeddings().weight
        model.add_module("aux_mlm_head", head)
        # its own transform and bias train under every PEFT method (peft's would freeze them);
        # its decoder is the tied word embeddings, which the method decides about
        mark_fresh([p for p in head.parameters() if p is not tied])
        return model

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> TaskOutput:
        out = self.task.forward(model, batch)
        if not (model.training and self.weight > 0):
            return out
        inputs, labels = self.mlm.mask(batch, train=True)
        aux = self.aux_loss(model, inputs, labels, batch)
        return replace(out, loss=out.loss + self.weight * aux,
                       extras=out.extras | {"aux_mlm_loss": aux.detach()})

    def aux_loss(self, model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor,
                 batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean MLM loss over the masked tokens, through ``model``'s own forward.

        A forward hook on the task model's backbone applies ``aux_mlm_head`` to its last
        hidden states (masked positions only) while ``model`` runs, so whatever the PEFT method
        changed is in the path: a ``functional_call`` wrapper's swapped-in weights (diff
        pruning, intrinsic, movement pruning; the tied decoder included), LoRA layers, prompts.
        """
        owner = _aux_owner(model)
        where = labels != -100
        logits: list[torch.Tensor] = []

        def head(module: nn.Module, args: Any, output: Any) -> None:
            hidden = output[0][:, -labels.shape[1]:]  # prompt tuning prepends virtual tokens
            logits.append(owner.aux_mlm_head(hidden[where]))

        kwargs = {k: batch[k] for k in ("attention_mask", "token_type_ids") if k in batch}
        handle = owner.base_model.register_forward_hook(head)
        try:
            model(input_ids=inputs, **kwargs)
        finally:
            handle.remove()
        # no masked token (a batch of rows of special tokens only): 0, not an empty mean's NaN
        total = F.cross_entropy(logits[-1].float(), labels[where], reduction="sum")
        return total / where.sum().clamp(min=1)

    def metrics(self) -> MetricCollection:
        return self.task.metrics()

    def update(self, metrics: MetricCollection, out: TaskOutput,
               batch: dict[str, torch.Tensor]) -> None:
        self.task.update(metrics, out, batch)


#: (task class, forwarded names) -> the AuxMLM subclass that forwards them
_FORWARDING: dict[tuple[type, frozenset[str]], type] = {}


def _forwarding_class(task: Task) -> type:
    """The subclass of AuxMLM (one per wrapped task class and attribute set) with a forwarding
    property for each public attribute of ``task`` that AuxMLM does not define itself.

    ``isinstance(wrapper, P)`` for a runtime Protocol ``P`` (``HasSubtasks``, ``PredictsNumbers``
    ...) must answer as for the wrapped task. Python >= 3.12 looks members up with
    ``inspect.getattr_static``, which never calls ``__getattr__``: the members must be on the
    class. Properties read the task's current value (``parts`` changes in ``bind_tasks``). A
    member the task sets to None is left to ``__getattr__``: Protocols read a None method as
    absent (an opt-out).
    """
    own = set(dir(AuxMLM)) | {"task", "weight", "mlm"}
    names = frozenset(
        n for n in {*dir(type(task)), *getattr(task, "__dict__", {})}
        if not n.startswith("_") and n not in own
        and inspect.getattr_static(task, n, None) is not None)
    key = (type(task), names)
    if key not in _FORWARDING:
        _FORWARDING[key] = type(f"AuxMLM[{type(task).__qualname__}]", (AuxMLM,),
                                {n: _forward(n) for n in sorted(names)}
                                | {"__module__": __name__, "__slots__": ()})
    return _FORWARDING[key]


def _forward(name: str) -> property:
    return property(lambda self: getattr(self.task, name),
                    lambda self, value: setattr(self.task, name, value),
                    doc=f"The wrapped task's ``{name}``.")


def _aux_owner(model: nn.Module) -> nn.Module:
    """The task model inside ``model`` (a PEFT wrapper, or itself) that holds ``aux_mlm_head``."""
    for name, _ in model.named_modules():
        parent, _, leaf = name.rpartition(".")
        if leaf == "aux_mlm_head":
            return model.get_submodule(parent)
    raise FtlabError("The model has no aux_mlm_head: it was not built by AuxMLM.build_model.",
                     "build the model with the AuxMLM task that trains it.")
