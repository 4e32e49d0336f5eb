"""Lightning strategies as ftlab configures them (``conf/trainer/fsdp.yaml``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch.strategies import FSDPStrategy

from ftlab.errors import FtlabError


class PerRank:
    """A callback whose state differs between the ranks of a multi-process run (DDP, FSDP):
    checkpoints keep every rank's (``{"per_rank": [...]}``, gathered to rank zero, which writes
    the checkpoint) and each rank gets its own back on resume (``StageCheckpoint`` calls
    ``gather_per_rank`` and ``own_per_rank``). A checkpoint with a single state (one process,
    or written before ftlab kept every rank's) gives it to every rank."""

    def differs(self, strategy: Any) -> bool:
        """Whether ranks hold different states under ``strategy`` (else rank zero's is saved)."""
        return True

    def own_state(self, ranks: list[Any], rank: int, world_size: int, where: Any) -> Any:
        """This rank's state from every rank's; another number of processes is refused."""
        if len(ranks) != world_size:
            key = getattr(self, "state_key", type(self).__name__)
            raise FtlabError(f"the checkpoint {where} was written by {len(ranks)} processes, "
                             f"this run has {world_size}: the shards of {key} differ.",
                             "resume with the same trainer.devices and num_nodes, or delete "
                             "the stage's checkpoints folder to train it anew.")
        return ranks[rank]


class HoldsShards(PerRank):
    """A callback whose state holds copies of this rank's parameters (weight averages,
    snapshots): under FSDP each rank's differs (its shard), so FSDP checkpoints keep every
    rank's state and each rank gets its own back on resume; under DDP every rank holds the
    same copy and rank zero's is saved."""

    def differs(self, strategy: Any) -> bool:
        return isinstance(strategy, FSDPStrategy)


class FSDP(FSDPStrategy):
    """Lightning's ``FSDPStrategy`` that may also run on the CPU and checkpoints through ftlab's
    ``CheckpointIO`` (``ftlab.checkpoint_io``: a folder of safetensors + JSON).

    Lightning refuses ``strategy="fsdp"`` (and a plain ``FSDPStrategy``) unless the accelerator
    is a GPU, but torch's FSDP runs on the CPU with the gloo backend: that is how ftlab tests
    the FSDP config without a GPU (``trainer=fsdp trainer.accelerator=cpu``). Gradient clipping
    by norm goes through the sharded root module (``FineTuneModule.configure_gradient_clipping``),
    which Lightning's FSDP precision plugin cannot do.

    Checkpoints hold the *full* model and optimiser state (gathered from the shards with
    ``torch.distributed.checkpoint.state_dict``, keyed by parameter name), written once by rank
    zero. On resume rank zero alone reads the model and optimiser tensors and sends each rank
    its shard (the others read only the rest: loop progress, data position, their callback
    states), so a node holds one copy of the checkpoint, not one per GPU. Lightning's own
    FSDP load path reads only a ``.ckpt`` file or a sharded folder, not ftlab's folder.
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

    # ---- checkpoints: full state dicts in ftlab's CheckpointIO (every rank takes part) ----

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The whole model's state on rank zero (on the CPU); empty on the other ranks."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(self.model, options=self._save_options())

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        """The whole optimiser state keyed by parameter name on rank zero; empty elsewhere."""
        from lightning.pytorch.core.optimizer import LightningOptimizer
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        return get_optimizer_state_dict(self.model, optimizer, options=self._save_options())

    def _save_options(self):
        """Whole state dicts; on a GPU gathered onto rank zero's CPU only (on the CPU torch's
        offload of CPU tensors crashed: a segmentation fault in the state dict's clone)."""
        return _options(offload=self.root_device.type != "cpu")

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any,
                        storage_options: Any = None) -> None:
        """Rank zero writes the gathered checkpoint with the ``CheckpointIO`` (atomically)."""
        if self.is_global_zero:
            self.checkpoint_io.save_checkpoint(checkpoint, filepath, storage_options)

    def load_checkpoint(self, checkpoint_path: Any,
                        weights_only: bool | None = None) -> dict[str, Any]:
        """Rank zero reads the whole checkpoint (rank zero's path) and sends every rank its
        shard of the model and, when fitting, of the optimiser state (torch's
        ``broadcast_from_rank0``, one tensor at a time); the other ranks read only the rest
        (``_not_read``). The rest goes back to Lightning."""
        from lightning.pytorch.trainer.states import TrainerFn
        from torch.distributed.checkpoint.state_dict import (
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        path = Path(self.broadcast(checkpoint_path))
        zero = self.is_global_zero
        checkpoint = self.checkpoint_io.load_checkpoint(
            path, skip=None if zero else _not_read(self.global_rank))
        module = self.lightning_module
        _forget_training_loader(module.trainer)
        model = checkpoint.pop("state_dict")
        set_model_state_dict(self.model, model if zero else {},
                             options=_options(strict=module.strict_loading, broadcast=True))
        states = checkpoint.get("optimizer_states")
        if states is None or module.trainer.state.fn != TrainerFn.FITTING:
            return checkpoint
        if len(states) != len(self.optimizers):  # every rank knows (from state.json)
            raise FtlabError(f"the checkpoint {path} holds {len(states)} optimiser states, this "
                             f"stage has {len(self.optimizers)}.",
                             "delete the stage's checkpoints folder to train it from the start.")
        for optimizer, state in zip(self.optimizers, states, strict=True):
            set_optimizer_state_dict(self.model, optimizer, state if zero else {},
                                     options=_options(broadcast=True))
        return checkpoint


def _not_read(rank: int):
    """Which tensors of a checkpoint a non-zero ``rank`` skips (a test on their keys): the
    model's and optimiser's (rank zero sends it its shard) and the ``PerRank`` states of the
    ranks other than itself and rank zero (``RngState`` falls back to rank zero's)."""
    import re

    other = re.compile(r"/per_rank/(\d+)(?:[/']|$)")

    def skip(key: str) -> bool:
        found = other.search(key)
        return (key.startswith(("/state_dict/", "/optimizer_states/"))
                or (found is not None and int(found[1]) not in (0, rank)))
    return skip


def gather_per_rank(trainer: Any, checkpoint: dict[str, Any]) -> None:
    """Replace each ``PerRank`` callback's state in ``checkpoint`` by every rank's (on rank
    zero), when the ranks' differ; every rank must call it (it gathers)."""
    import torch
    import torch.distributed as dist
    from lightning.fabric.utilities.apply_func import apply_to_collection
    from lightning.pytorch.strategies import ParallelStrategy

    strategy = trainer.strategy
    if not (isinstance(strategy, ParallelStrategy) and dist.is_available()
            and dist.is_initialized()):
        return
    states = checkpoint.get("callbacks", {})
    for callback in trainer.callbacks:
        if not (isinstance(callback, PerRank) and callback.differs(strategy)):
            continue
        key = callback.state_key
        own = apply_to_collection(states.get(key), torch.Tensor, lambda t: t.detach().cpu())
        ranks = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(own, ranks, dst=0)
        if dist.get_rank() == 0:
            states[key] = {"per_rank": ranks}


def own_per_rank(trainer: Any, checkpoint: dict[str, Any], where: Any) -> None:
    """Give each ``PerRank`` callback this rank's state from ``checkpoint`` (its
    ``own_state``); a single state (no ``per_rank``) stays as it is, for every rank."""
    states = checkpoint.get("callbacks", {})
    for callback in trainer.callbacks:
        state = states.get(getattr(callback, "state_key", None))
        if isinstance(callback, PerRank) and isinstance(state, dict) and "per_rank" in state:
            states[callback.state_key] = callback.own_state(
                state["per_rank"], trainer.global_rank, trainer.world_size, where)


def _forget_training_loader(trainer: Any) -> None:
    """FSDP reads the checkpoint after setup, where ``configure_optimizers`` (through
    ``estimated_stepping_batches``) already built the training loader at the start of the
    data: drop it, so the fit loop builds it again at the checkpoint's data position (without
    this the resumed stage trained one batch of the epoch twice)."""
    loop = trainer.fit_loop
    if loop._combined_loader is None:
        return
    if loop._data_fetcher is not None:
        loop._data_fetcher.teardown()
    loop._combined_loader = loop._data_fetcher = None


def _options(offload: bool = False, strict: bool = True, broadcast: bool = False):
    """Whole (unsharded) state dicts; with ``offload``, gathered on rank zero's CPU only; with
    ``broadcast``, loaded from rank zero's (the other ranks pass ``{}``). torch 2.13 does this
    for FSDP1's flat parameters too, on gloo (CPU) as on NCCL: the model's tensors are
    broadcast one by one, the optimiser's through FSDP1's ``rank0_only`` optimiser loading."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=offload, strict=strict,
                            broadcast_from_rank0=broadcast)


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
