"""Use a finished run: ``ftlab.load(run_dir)`` rebuilds a stage's model with the builders
training used (``ftlab/rebuild.py``: task model, PEFT method, ``load_trainable_state``; earlier
stages first when it started from one) from the stage card, and predicts labels and
probabilities in length-bucketed batches (fp32, on the CPU). ``ftlab-predict``
(ftlab/predict_cli.py) is its CLI.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ftlab.errors import FtlabError, choices_text
from ftlab.pipeline import ResolvedStage
from ftlab.run_folder import stage_card

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    import torch
    from torch import nn

@dataclass
class Predictor:
    """A trained stage, ready to predict.

    Attributes:
        model: the task model with its trained parameters, in eval mode, fp32.
        tokenizer: the tokenizer the stage trained with (``<stage>/tokenizer/``).
        labels: class names in id order (``model.config.id2label`` agrees); empty for a
            language-model stage (stage=mlm/clm: TAPT, DAPT), which loads but cannot predict.
        stage: the resolved stage it was trained as.
        peft: the stage's PEFT method (``ftlab-export`` asks it to merge).
        task: the stage's task, bound to the labels and tokenizer (featurises the texts).
    """

    model: nn.Module
    tokenizer: Any
    labels: list[str]
    stage: ResolvedStage
    peft: Any
    task: Any

    @property
    def text_columns(self) -> list[str]:
        return list(self.stage.data.text_columns)

    def predict(self, texts: list[Any], batch_size: int = 64) -> list[dict[str, Any]]:
        """Per row ``{"label", "score", "probs": {label: probability}}``, in input order
        (regression, ``stage=regression``: ``{"value": number}``).

        ``texts``: strings, or (for a sentence-pair stage) tuples/lists of one string per text
        column, or dicts keyed by the text columns; a list, or any sequence or iterable of them
        (a pandas Series, a numpy array, a generator).
        """
        from ftlab.tasks.base import PredictsNumbers, PredictsRows, ProbabilitiesFromScores

        self._check_predicts()
        texts = _as_rows(texts)
        if batch_size < 1:
            raise FtlabError(f"batch_size must be at least 1, got {batch_size}.",
                             "pass a positive --batch-size (default 64).")
        if not texts:  # an empty input file: no rows (the tokenizer refuses an empty list)
            return []
        if isinstance(self.task, PredictsRows):  # e.g. stage=tokens: a tag per word
            return self.task.predict_rows(self.model, list(texts), batch_size)
        scores = self.scores(texts, batch_size)
        self._say_cut(texts)
        if isinstance(self.task, PredictsNumbers):  # regression: the number per row
            return [{"value": v} for v in self.task.values(scores).tolist()]
        probs = (self.task.probabilities(self.model, scores)
                 if isinstance(self.task, ProbabilitiesFromScores) else scores.softmax(-1))
        best = probs.argmax(-1).tolist()
        return [{"label": self.labels[b], "score": p[b],
                 "probs": dict(zip(self.labels, p, strict=True))}
                for b, p in zip(best, probs.tolist(), strict=True)]

    def scores(self, texts: list[Any], batch_size: int = 64) -> torch.Tensor:
        """The task's class scores (logits; a cloze task's verbaliser scores) ``[rows,
        classes]``, in input order, from length-bucketed batches."""
        import torch

        from ftlab.data.batching import LengthGroupedBatchSampler, PadCollator

        self._check_predicts()
        texts = _as_rows(texts)
        if not texts:
            return torch.empty(0, len(self.labels))
        columns = self._columns(texts)
        features = self.task.featurize({**columns, "label": [0] * len(texts)})
        _check_tokens(features["length"])
        keep = list(self.task.features)  # scores() ignores what it does not need
        rows = [{k: features[k][i] for k in keep} for i in range(len(texts))]
        collate = PadCollator(self.tokenizer.pad_token_id, pad_values=self.task.pad_values)
        out = torch.empty(len(texts), len(self.labels))
        order = LengthGroupedBatchSampler(features["length"], batch_size, shuffle=False)
        device = next(self.model.parameters()).device
        with torch.inference_mode():
            for idx in order:
                batch = {k: v.to(device) for k, v in collate([rows[i] for i in idx]).items()}
                out[idx] = self.task.scores(self.model, batch).float().cpu()
        return out

    def _say_cut(self, texts: list[Any]) -> None:
        """Log how many rows are longer than the stage's ``max_length`` tokens (beside a
        template's own tokens: a cloze pattern, a text2text source): they are cut to fit (as
        in training), which a prediction alone does not show."""
        from ftlab.tasks.base import FitsTemplate, as_text

        limit = getattr(self.task, "max_length", None)
        if not isinstance(limit, int):
            return
        columns, beside = self._columns(texts), ""
        if isinstance(self.task, FitsTemplate):  # the room its template's tokens leave
            cut, beside = sum(self.task.cut_to_fit(columns)), " with its template's own tokens"
        else:
            ids = self.tokenizer(*[[as_text(t) for t in columns[c]] for c in self.text_columns],
                                 verbose=False)["input_ids"]
            cut = sum(len(row) > limit for row in ids)
        if cut:
            log.warning("%d of %d row(s) are longer than the stage's max_length (%d tokens)%s "
                        "and were cut to fit it, as in training: the model did not see their "
                        "ends.", cut, len(texts), limit, beside)

    def _check_predicts(self) -> None:
        """A language-model stage (TAPT/DAPT: stage=mlm or clm) loads, but has no classes."""
        if not self.labels:
            name = self.stage.name
            raise FtlabError(f"Stage '{name}' trains a language model "
                             f"({self.stage.task.get('_target_')}) and predicts no classes.",
                             "use its .model and .tokenizer (the adapted LM), or write them as a "
                             f"Transformers folder: ftlab-export RUN_DIR --stage {name} --to hf "
                             "--output DIR; to predict, load a stage with labels: "
                             "ftlab.load(run_dir, stage=...).")

    def _columns(self, texts: list[Any]) -> dict[str, list[str]]:
        cols = self.text_columns
        if texts and isinstance(texts[0], dict):
            for n, row in enumerate(texts, 1):  # every row: a later one may lack a column
                missing = [c for c in cols if not isinstance(row, dict) or c not in row]
                if missing:
                    has = choices_text(row) if isinstance(row, dict) else type(row).__name__
                    raise FtlabError(f"Row {n} has no column {missing[0]!r} (it has {has}).",
                                     f"pass the stage's text columns: {', '.join(cols)} "
                                     "(ftlab-predict: --text-column).")
            return {c: [r[c] for r in texts] for c in cols}
        if texts and isinstance(texts[0], list | tuple):
            if any(len(t) != len(cols) for t in texts):
                raise FtlabError(f"The stage reads {len(cols)} text(s) per row ({cols}).",
                                 "give each row that many texts.")
            return {c: [t[i] for t in texts] for i, c in enumerate(cols)}
        if len(cols) != 1:
            raise FtlabError(f"The stage reads {len(cols)} texts per row ({cols}); got plain "
                             "strings.", "pass tuples or dicts with one text per column.")
        return {cols[0]: list(texts)}


def _check_tokens(lengths: list[int]) -> None:
    """Refuse rows that tokenise to nothing (an empty text, a tokenizer without special tokens:
    GPT-2's): alone in a batch they crashed the model, among others they read a pad."""
    from ftlab.data.batching import no_token_rows

    empty, rows = no_token_rows(lengths)
    if empty:
        raise FtlabError(f"{empty} row(s) ({rows}; 1 = the first) have no tokens: an empty "
                         "text, and the stage's tokenizer adds no special tokens (as GPT-2's), "
                         "so the model has nothing to read.", "drop those rows or give them "
                         "text (a .txt file: remove its empty lines).")


def _as_rows(texts: Any) -> list[Any]:
    """``texts`` as a list of rows: a pandas DataFrame as dicts by column (iterating one gives
    its column names), a Series or numpy array (whose truth value is ambiguous) through
    ``tolist``, any other iterable through ``list``; one string is refused (it would be read
    character by character)."""
    if isinstance(texts, str):
        cut = "..." if len(texts) > 40 else ""
        raise FtlabError(f"predict takes a list of texts, got one string ({texts[:40]!r}{cut}): "
                         "each character would be a row.", "pass a list: predict([text]).")
    if hasattr(texts, "columns") and hasattr(texts, "to_dict"):  # a DataFrame
        return texts.to_dict("records")
    return texts.tolist() if hasattr(texts, "tolist") else list(texts)


#: how ``load`` allows a run's own code (a refused ``_target_``'s fix)
LOAD_HOW = ("with ftlab.load(run_dir, allow_targets=[{quoted}]), or {flags} for ftlab-predict "
            "and ftlab-export")


def load(run_dir: str | Path, stage: str | None = None,
         allow_targets: list[str] | None = None) -> Predictor:
    """Rebuild a trained stage of the run in ``run_dir`` (default: its last stage).

    ``allow_targets``: modules of your own code that the run's config names (the run's own
    ``allow_targets``, e.g. ``['mypkg.']``); a run folder is a config too, so only for runs
    you trust. Inside a job (a distillation teacher) the job's ``allow_targets`` hold too.
    """
    from ftlab.targets import allowed, allowing

    job = allowed()
    with allowing([*job, *(allow_targets or [])], warn=bool(allow_targets),
                  how=None if job else LOAD_HOW):
        return _load(run_dir, stage)


def _load(run_dir: str | Path, stage: str | None) -> Predictor:
    import lightning as L

    run_dir = Path(run_dir).expanduser()
    name, spec, labels = stage_card(run_dir, stage)
    from ftlab.targets import check_all, targets_in

    check_all(t for part in ("task", "peft", "regularizer")  # every refused one in one message
              for t in targets_in(getattr(spec, part), f"{spec.where} {part}"))
    L.seed_everything(spec.seed, verbose=False)
    from ftlab.build import StageBuilder
    from ftlab.rebuild import rebuild

    model, peft, task = rebuild(run_dir, name, StageBuilder())
    return Predictor(model.float().eval(), task.tokenizer, labels or [], spec, peft, task)
