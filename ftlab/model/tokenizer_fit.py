"""What each architecture needs of its tokenizer (read from the one table of parts in
``ftlab.model.arch``): which inputs it takes, and where it pools."""

from __future__ import annotations

from torch import nn

from ftlab.errors import FtlabError
from ftlab.model.arch import ARCHS, unwrap


def configure_tokenizer(tokenizer, model_type: str):
    """Make ``tokenizer`` emit only what a ``model_type`` model's forward takes.

    Drops ``token_type_ids`` for families without segment ids, and for families that pool at
    the EOS (T5) makes a separator-ending tokenizer's ``[SEP]`` its EOS.
    """
    if model_type not in ARCHS:
        return tokenizer  # unknown families keep the tokenizer's own inputs
    arch = ARCHS[model_type]
    if not arch.token_type_ids:
        tokenizer.model_input_names = [n for n in tokenizer.model_input_names
                                       if n != "token_type_ids"]
        # kept by save_pretrained, so the stage's saved (and exported) tokenizer emits the same
        tokenizer.init_kwargs["model_input_names"] = list(tokenizer.model_input_names)
    if arch.eos_pooling and tokenizer.eos_token is None and tokenizer.sep_token is not None:
        tokenizer.eos_token = tokenizer.sep_token
    return tokenizer


def check_pooling_token(model: nn.Module, tokenizer) -> None:
    """A family that classifies at the last EOS (T5) needs a tokenizer that ends every input
    with the model's EOS (T5's tokenizer and BERT-style ``[SEP]`` as EOS do)."""
    model = unwrap(model)
    arch = ARCHS.get(model.config.model_type)
    if arch is None or not arch.eos_pooling:
        return
    eos = model.config.eos_token_id
    if eos is None or tokenizer("a b")["input_ids"][-1] != eos:
        raise FtlabError(f"{arch.family} classifies at the last EOS token, but the tokenizer "
                         f"does not end its inputs with EOS (id {eos}).",
                         "use a tokenizer that appends EOS (T5's does), or set "
                         "model.config.eos_token_id to the id it ends inputs with.")
