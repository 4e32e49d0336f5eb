"""ftlab: declarative fine-tuning experiments for pre-trained language models."""

__version__ = "0.1.0"


def load(run_dir, stage=None, allow_targets=None):
    """A trained stage of a run, ready to predict: ``.model``, ``.tokenizer``, ``.labels``,
    ``.predict(texts)`` (see ``ftlab.inference.load``; ``allow_targets=['mypkg.']`` for a run
    of your own code)."""
    from ftlab.inference import load as _load

    return _load(run_dir, stage, allow_targets)
