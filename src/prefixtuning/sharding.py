"""`trainer=fsdp`: the frozen backbone sharded across ranks with PyTorch's FSDP2 (`fully_shard`), through
Lightning's own `ModelParallelStrategy`.

Each rank holds 1/world of every weight; a transformer block's weights are gathered just before the block runs
and freed after it (in the backward pass too), so the peak is one block's full weights plus the shards. The
units are: every transformer block (the classes the Hugging Face model lists in `_no_split_modules`), the HF
model itself (embeddings, final norm, LM head: what `generate` runs outside the blocks) and the tuned model as
the root, which owns the method's tensors (the prefix, APT's gates, prompt vectors); LoRA / adapter tensors that
live inside a block are sharded with that block. Gradients of the trainable tensors are reduce-scattered over
the ranks (a mean, as DDP's all-reduce), the optimizer state is sharded with them.

Checkpoints stay what they are in every other mode: the trainable tensors only, gathered to full tensors on
rank 0 and written by the project's crash-safe checkpoint writer, so a checkpoint of an FSDP run loads in a
single process (evaluate.py, export) and a single-process checkpoint continues under FSDP.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from .artifacts import check_checkpoint, read_checkpoint
from .errors import UserError

# set on a checkpoint this strategy loaded: its tensors were checked before they went into the shards
CHECKED_BY_STRATEGY = "_prefixtuning_checked"


class ShardingError(UserError):
    """A backbone or setting that cannot be sharded as asked (refused before any work)."""


def fsdp_available() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


def transformer_blocks(hf_model: nn.Module) -> list[nn.Module]:
    """The modules FSDP shards one by one: the classes the model declares unsplittable (its blocks)."""
    names = set(getattr(hf_model, "_no_split_modules", None) or [])
    blocks = [m for m in hf_model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ShardingError(f"trainer=fsdp: {type(hf_model).__name__} declares no transformer block classes "
                            f"(_no_split_modules is {sorted(names) or 'empty'}), so there is nothing to shard it "
                            f"by; use trainer=ddp for this backbone")
    return blocks


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules())


def shard_model(model: nn.Module, mesh) -> dict:
    """Apply FSDP2 to a TunedModel in place: each block, then the HF model, then the tuned model (root).
    Returns what this rank holds of the backbone's weights (MiB, its shards against the full size)."""
    from torch.distributed.fsdp import fully_shard

    hf = model.backbone.model
    blocks = transformer_blocks(hf)
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(hf, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return {"world": mesh.size(), "units": len(blocks) + 2,
            "backbone_mib": _mib(hf.parameters(), local=False), "backbone_mib_per_rank": _mib(hf.parameters())}


def _mib(params, local: bool = True) -> float:
    from torch.distributed.tensor import DTensor

    total = 0
    for p in params:
        t = p.to_local() if local and isinstance(p, DTensor) else p
        total += t.numel() * t.element_size()
    return total / 2**20


class gathered_method_tensors:
    """Outside `forward` (generation) the root unit's tensors, the method's (prefix, gates), are still sharded:
    gather them for the duration. Every rank must enter, as for any collective. Yields whether the model is
    sharded over more than one process."""

    def __init__(self, model: nn.Module):
        from torch.distributed.fsdp import FSDPModule

        self.model = model if isinstance(model, FSDPModule) else None

    def __enter__(self) -> bool:
        if self.model is None:
            return False
        self.model.unshard()
        import torch.distributed as dist

        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def __exit__(self, *exc):
        if self.model is not None:
            self.model.reshard()
        return False


def reshard_all(module: nn.Module) -> None:
    """FSDP2 keeps the root unit gathered after a forward pass without a backward (validation, generation): its
    module attributes are then the gathered tensors, not the shards the optimizer holds. Back to the shards
    before reading or writing the trainable state."""
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def full_trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """{name: full tensor on CPU} of the parameters that train (a collective: every rank calls it)."""
    from torch.distributed.tensor import DTensor

    reshard_all(module)
    out = {}
    for name, p in module.named_parameters():
        if p.requires_grad:
            t = p.detach()
            out[name] = (t.full_tensor() if isinstance(t, DTensor) else t).cpu().clone()
    return out


def load_trainable_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy full tensors into a (possibly sharded) module's parameters; each rank keeps its own shard."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    reshard_all(module)
    params = dict(module.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            p = params[name]
            if isinstance(p, DTensor):
                p.copy_(distribute_tensor(value.to(p.dtype), p.device_mesh, p.placements))
            else:
                p.copy_(value.to(device=p.device, dtype=p.dtype))


class PrefixFSDPStrategy(ModelParallelStrategy):
    """Lightning's FSDP2 strategy with data parallelism only (no tensor parallelism) and checkpoints that hold
    the trainable tensors, gathered in full on rank 0 (not the backbone: it is frozen and reloaded from its
    source). Everything else (process launch, device mesh, gradient reduction, the optimizer's sharded state,
    loading a checkpoint back into the shards) is Lightning's and PyTorch's own."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, save_distributed_checkpoint=False,
                         **kwargs)

    def setup_environment(self) -> None:
        # pure data parallelism: all processes of all nodes on the FSDP axis
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def lightning_module_state_dict(self) -> dict[str, Any]:
        state = full_trainable_state(self.lightning_module)  # (reshards first)
        return state if self.global_rank == 0 else {}

    def optimizer_state(self, optimizer) -> dict[str, Any]:
        """The optimizer state gathered in full, in the layout of a single process's `optimizer.state_dict()`
        (tensors numbered in the order the optimizer holds them), so checkpoints move between modes."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        reshard_all(self.lightning_module)
        optimizer = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer
        full = get_optimizer_state_dict(self.lightning_module, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.global_rank != 0:
            return {}
        names = [n for g in full["param_groups"] for n in g["params"]]
        index = {n: i for i, n in enumerate(names)}
        return {"state": {index[n]: v for n, v in full["state"].items()},
                "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in full["param_groups"]]}

    def load_checkpoint(self, checkpoint_path, weights_only=None) -> dict[str, Any]:
        """A checkpoint of trainable tensors (from this mode or any other) into the shards: the same checks as
        every other mode first (backbone, geometry, method, tensor names), then the tensors, then the optimizer
        state (numbered as a single process numbers it)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        module = self.lightning_module
        checkpoint = read_checkpoint(checkpoint_path)
        check_checkpoint(checkpoint, module, source=str(checkpoint_path))
        load_trainable_state(module, checkpoint.pop("state_dict"))
        names = {id(p): n for n, p in module.named_parameters()}
        for optimizer, state in zip(self.optimizers, checkpoint.get("optimizer_states", [])):
            optimizer = getattr(optimizer, "_optimizer", optimizer)
            order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
            by_name = {"state": {order[i]: v for i, v in state["state"].items()},
                       "param_groups": [{**g, "params": [order[i] for i in g["params"]]}
                                        for g in state["param_groups"]]}
            set_optimizer_state_dict(module, optimizer, optim_state_dict=by_name,
                                     options=StateDictOptions(full_state_dict=True))
        checkpoint[CHECKED_BY_STRATEGY] = True
        return checkpoint
