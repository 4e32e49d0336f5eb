"""Lightning strategies as ftlab configures them (``conf/trainer/fsdp.yaml``)."""

from __future__ import annotations

from lightning.pytorch.strategies import FSDPStrategy


class FSDP(FSDPStrategy):
    """Lightning's ``FSDPStrategy``, unchanged, that may also run on the CPU.

    Lightning refuses ``strategy="fsdp"`` (and a plain ``FSDPStrategy``) unless the accelerator
    is a GPU, but torch's FSDP runs on the CPU with the gloo backend: that is how ftlab tests
    the FSDP config without a GPU (``trainer=fsdp trainer.accelerator=cpu``). Gradient clipping
    by norm goes through the sharded root module (``FineTuneModule.configure_gradient_clipping``),
    which Lightning's FSDP precision plugin cannot do.
    """

    _root = None  # the wrapper made for fit, reused by test: re-wrapping would shard shards

    def _setup_model(self, model):  # type: ignore[override]
        """Reuse the fit's wrapper for a later ``test``; on the CPU, wrap with ``device_id=cpu``
        (torch's FSDP otherwise looks for a GPU), which Lightning's setup then takes as is."""
        import torch
        from torch.distributed.fsdp import FullyShardedDataParallel

        if self._root is not None and self._root.module is model:
            return self._root
        if self.root_device.type == "cpu":
            model = FullyShardedDataParallel(
                module=model, cpu_offload=self.cpu_offload,
                mixed_precision=self.mixed_precision_config,
                sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"),
                **{k: v for k, v in self.kwargs.items() if k != "auto_wrap_policy"})
        self._root = super()._setup_model(model)
        return self._root


def full_weights(trainer, writeback: bool = False):
    """A context in which the model's parameters are whole (FSDP keeps only a shard on each rank
    outside forward; what is written to them is kept only with ``writeback``); every rank must
    enter it. A no-op for other strategies."""
    from contextlib import nullcontext

    from torch.distributed.fsdp import FullyShardedDataParallel

    root = getattr(trainer, "model", None)
    if isinstance(root, FullyShardedDataParallel):
        return FullyShardedDataParallel.summon_full_params(root, writeback=writeback)
    return nullcontext()
