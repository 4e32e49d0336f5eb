"""``trainer.compile``: the one place that ``torch.compile``s a model (stage and benchmarks).

The model is compiled in place (``nn.Module.compile``), so parameter names and state dicts stay
those of the eager model (artefacts, KeepBest, checkpoints read them).

Under the CUDA-graph modes (``reduce-overhead``, ``max-autotune``; CUDA graph trees) two things
must hold, and ftlab checks both instead of failing on a GPU mid-run:

- The parameters' gradients are CUDA-graph outputs, overwritten by the next step's replay, so
  every backward must follow a ``zero_grad(set_to_none=True)`` (Lightning's default): gradient
  accumulation over batches reads the previous batch's overwritten gradients ("accessing tensor
  output of CUDAGraphs that has been overwritten by a subsequent run", pytorch#169545, open; on
  some versions silently wrong sums, pytorch#96693). ``trainer.accumulate_grad_batches`` > 1 is
  refused (``check_trainer``); ``cudagraph_mark_step_begin`` cannot help (pytorch#177192).
- The forward (with the task's loss) is one graph: ``fullgraph=True``. A graph break runs the
  step as several graphs with eager code between (what the mode exists to remove), and breaks
  come from data-dependent ops (``nonzero`` on the labels in DeBERTa-v2's loss when the config
  names no ``problem_type``; ftlab's classifiers name it) that the graphs after them cannot
  record. The first forward that would break raises an ``FtlabError`` naming the break and the
  modes that work instead.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ftlab.errors import FtlabError

#: ``torch.compile`` modes that record and replay CUDA graphs
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")
#: recompilations allowed per compiled forward under ``fullgraph`` (torch's default, 8, falls
#: back to eager without it, but fails hard with it): batch shapes x train/eval x the layers
#: that GradualUnfreeze/HeadWarmup (un)freeze each ask for one
RECOMPILE_LIMIT = 64


def compile_model(model: nn.Module, mode: str | None, backend: str = "inductor") -> nn.Module:
    """Compile ``model`` in place with ``mode`` (None: leave it eager); returns the model.

    ``backend``: ``inductor`` (what training uses); tests pass ``eager``/``aot_eager`` to check
    the capture (graph breaks, ``fullgraph``) without building kernels, ``mode`` then only
    decides ``fullgraph``.
    """
    if not mode:
        return model
    fullgraph = mode in CUDAGRAPH_MODES
    kwargs: dict[str, Any] = {"mode": mode} if backend == "inductor" else {"backend": backend}
    if fullgraph and "recompile_limit" in inspect.signature(torch.compile).parameters:
        kwargs["recompile_limit"] = RECOMPILE_LIMIT  # this forward's own (torch >= 2.13)
    elif fullgraph:  # older torch: the process-wide limit
        dynamo_config = torch._dynamo.config
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
    model.compile(fullgraph=fullgraph, **kwargs)
    if fullgraph and model._compiled_call_impl is not None:  # where nn.Module.compile keeps it
        model._compiled_call_impl = _refusing_breaks(model._compiled_call_impl, mode,
                                                     type(model).__name__)
    return model


def check_trainer(mode: str | None, trainer: dict[str, Any], where: str) -> None:
    """Refuse what CUDA graphs cannot train: gradient accumulation over batches (see above)."""
    accumulate = trainer.get("accumulate_grad_batches") or 1
    if mode in CUDAGRAPH_MODES and not (isinstance(accumulate, int) and accumulate == 1):
        raise FtlabError(
            f"{where}: trainer.compile={mode} records CUDA graphs, whose gradients the next "
            f"batch's replay overwrites, so trainer.accumulate_grad_batches={accumulate} would "
            "add to overwritten gradients (pytorch#169545).",
            "use trainer.accumulate_grad_batches=1 (a larger stage.batch_size instead), or "
            "trainer.compile=max-autotune-no-cudagraphs (or default) to keep accumulating.")


def _refusing_breaks(call: Callable[..., Any], mode: str, name: str) -> Callable[..., Any]:
    """``call`` with dynamo's full-graph failures turned into ``FtlabError``s."""
    from torch._dynamo import exc

    Unsupported, UserError = exc.Unsupported, exc.UserError
    FailOnRecompileLimitHit = getattr(exc, "FailOnRecompileLimitHit", Unsupported)

    no_graphs = "use trainer.compile=max-autotune-no-cudagraphs (or default): the same kernels " \
                "without CUDA graphs, where "

    @functools.wraps(call)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return call(*args, **kwargs)
        except FailOnRecompileLimitHit:
            raise FtlabError(
                f"trainer.compile={mode}: {name}'s forward was compiled more than "
                f"{RECOMPILE_LIMIT} times (each new batch shape, train/eval switch or change "
                "of frozen layers compiles it again).",
                "use trainer.pad_to_buckets (few shapes), or " + no_graphs
                + "the limit only falls back to uncompiled steps.") from None
        except (Unsupported, UserError) as err:  # a break; a data-dependent guard
            raise FtlabError(
                f"trainer.compile={mode} records CUDA graphs, which need the model's forward "
                f"to be one graph, but {name}'s forward (with this task's loss) has a graph "
                f"break: {break_reason(err)}",
                no_graphs + "graph breaks are harmless.") from None
    return run


def break_reason(err: BaseException) -> str:
    """What broke a dynamo full-graph capture, and where in the model's code (one line)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    cause = next((ln for ln in lines if ln.startswith("Caused by:")), None)
    if cause:  # a data-dependent guard: "Caused by: <code>  # <file>:<line> in <fn> (...)"
        return cause.removeprefix("Caused by:").split(" (_dynamo")[0].strip()
    user = [ln for ln in lines if ln.startswith("File ")]  # "from user code:" frames
    where = user[-1].split("site-packages/")[-1] if user else ""
    return f"{lines[0][:200]}" + (f" ({where})" if where else "")


def graph_breaks(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[str]:
    """The reasons of every graph break dynamo meets tracing ``fn(*args, **kwargs)`` (empty:
    one graph); runs ``fn`` once (eagerly after tracing), nothing is compiled to kernels."""
    explained = torch._dynamo.explain(fn)(*args, **kwargs)
    return [str(b.reason).strip().splitlines()[0] for b in explained.break_reasons]
