"""``ftlab-export RUN_DIR --to hf --output DIR``: a trained stage as a plain Transformers folder
(``save_pretrained`` of the model, PEFT folded in, plus the tokenizer) that
``AutoModelFor...from_pretrained(DIR)`` loads without ftlab. Methods that cannot fold
(prompt/prefix tuning) get their PEFT folder instead (``DIR/peft``, and ``DIR/base``, the model it
goes on), with a message and exit status 3;
ftlab's bottleneck adapters have neither (use ``ftlab.load`` / ``ftlab-predict``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from ftlab.errors import FtlabError
from ftlab.peft.base import Mergeable, NotMergeable, SavesArtefact

#: exit status when DIR holds a PEFT folder rather than a plain Transformers model
PEFT_FOLDER = 3
#: models whose tokenised input is the text alone, cut at the task's ``max_length`` (a cloze or
#: text2text stage's input is a pattern around a text: its limit is not the tokenizer's)
_WHOLE_INPUT = ("ForSequenceClassification", "ForTokenClassification")


def export_hf(run_dir: str | Path, output: str | Path, stage: str | None = None,
              allow_targets: list[str] | None = None) -> Path:
    """Write the stage as a plain Transformers folder into ``output`` and return it. A method
    that cannot fold raises ``NotMergeable`` after writing its PEFT folder (``output/peft``)
    where it has one; ftlab's adapters raise ``FtlabError``."""
    from ftlab.inference import load
    from ftlab.writable import check_output

    output = Path(output)
    if output.exists() and not output.is_dir():  # save_pretrained only logs this and returns
        raise FtlabError(f"--output {output} is a file, not a folder.",
                         f"name a new folder: --output {output.with_suffix('')}_hf/.")
    if output.is_dir() and any(output.iterdir()):  # an earlier export's files would stay
        raise FtlabError(f"--output {output} is a folder that holds files already: the export's "
                         "files would land beside them (an earlier export's model or peft/ "
                         "folder would then load instead, or with it).",
                         f"name a new folder, or remove this one first (rm -r {output}).")
    check_output(output)  # before loading, not in a traceback from save_pretrained
    p = load(run_dir, stage, allow_targets)
    if not isinstance(p.peft, Mergeable):
        raise FtlabError(f"peft={p.peft.name} does not fold into a plain Transformers model "
                         f"(its class has no merged(); ftlab.peft.base.Mergeable), so it cannot "
                         "be exported as one.", "use ftlab.load(run_dir) or ftlab-predict; the "
                         "run folder is the artefact. (A method whose model stays a plain "
                         "Transformers model, as BitFit's, adds `def merged(self, model): "
                         "return model`.)")
    try:
        model = p.peft.merged(p.model)
    except NotMergeable:
        if not isinstance(p.peft, SavesArtefact):
            raise
        p.peft.save(p.model, output)  # <output>/peft, for peft.PeftModel.from_pretrained
        p.tokenizer.save_pretrained(str(output / "peft"))
        _save(_base_of(p.model), output / BASE)  # what it goes on: no other copy has the stage's
        raise                                    # (a config-built model, an earlier stage's)
    _save(model, output)
    length = getattr(p.task, "max_length", None)
    if isinstance(length, int) and type(model).__name__.endswith(_WHOLE_INPUT):
        p.tokenizer.model_max_length = length  # truncation=True then cuts where training did
    p.tokenizer.save_pretrained(str(output))
    return output


#: the folder (in ``--output``) holding the model a PEFT folder goes on
BASE = "base"


def _save(model: Any, folder: Path) -> None:
    if hasattr(model, "aux_mlm_head"):  # stage.aux_mlm_weight's training-only MLM head, whose
        del model.aux_mlm_head           # decoder is tied to the embeddings: save_pretrained fails
    model.save_pretrained(str(folder))


def _base_of(model: Any) -> Any:
    """A copy of the Transformers model under a ``peft.PeftModel`` with the weights it started
    from: its trained heads (``modules_to_save``) stay in the PEFT folder, which puts them back."""
    import copy

    from peft.utils import ModulesToSaveWrapper

    base = copy.deepcopy(model.get_base_model())
    for name, module in list(base.named_modules()):
        if isinstance(module, ModulesToSaveWrapper):
            parent, _, child = name.rpartition(".")
            setattr(base.get_submodule(parent), child, module.original_module)
    return base


def main(argv: list[str] | None = None) -> None:
    """``ftlab-export RUN_DIR [--stage NAME] --to hf --output DIR``."""
    from ftlab.cli import quiet_loading, run_parser

    parser = run_parser("ftlab-export", main.__doc__)
    parser.add_argument("--to", choices=["hf"], default="hf", help="the format (Transformers)")
    parser.add_argument("--output", type=Path, required=True, help="the folder to write")
    args = parser.parse_args(argv)
    args.output = args.output.expanduser()  # --output=~/x: no shell expands that ~
    quiet_loading()
    try:
        export_hf(args.run_dir, args.output, args.stage, args.allow_targets)
    except NotMergeable as err:
        peft, base = args.output / "peft", args.output / BASE
        print(f"ftlab-export: {err}\nWrote the PEFT folder instead: {peft}, and the model it goes "
              f"on: {base} (peft.PeftModel.from_pretrained({auto_class(base)}.from_pretrained("
              f"'{base}'), '{peft}'))", file=sys.stderr)
        sys.exit(PEFT_FOLDER)
    except FtlabError as err:
        sys.exit(f"ftlab-export: {err}")
    print(f"ftlab-export: a Transformers folder in {args.output} "
          f"({auto_class(args.output)}.from_pretrained loads it)", file=sys.stderr)


#: the transformers Auto class for an architecture's name ending
_AUTO = {"ForSequenceClassification": "AutoModelForSequenceClassification",
         "ForTokenClassification": "AutoModelForTokenClassification",
         "ForMaskedLM": "AutoModelForMaskedLM", "ForCausalLM": "AutoModelForCausalLM",
         "ForConditionalGeneration": "AutoModelForSeq2SeqLM", "LMHeadModel": "AutoModelForCausalLM"}


def auto_class(folder: Path) -> str:
    """Which Auto class loads the exported model (from its config's ``architectures``)."""
    import json

    try:
        arch = json.loads((folder / "config.json").read_text())["architectures"][0]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return "AutoModel"
    return next((auto for end, auto in _AUTO.items() if arch.endswith(end)), "AutoModel")


if __name__ == "__main__":
    main()
