"""Process-group setup and data parallelism (DDP or FSDP2), applied to a model from outside.

Launch with ``torchrun --nproc-per-node N -m sasformer train ...``; a plain ``python`` launch is a
world of one and wraps nothing. Full (unsharded) state dicts keyed by parameter name are used for
checkpoints, so a checkpoint does not depend on the world size or the parallelism that wrote it.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def pick_device(preference: str, local_rank: int = 0) -> torch.device:
    if preference == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but CUDA is not available; use device: cpu or auto")
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def init_distributed(device_preference: str = "auto") -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun describes in the environment (NCCL on CUDA, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_preference, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        cuda = device.type == "cuda"
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank, local_rank, world_size), device


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def apply_fsdp(model: nn.Module, blocks: nn.ModuleList, param_dtype: torch.dtype | None,
               reshard_after_forward: bool = True, blocks_per_unit: int = 1) -> None:
    """FSDP2: shard groups of ``blocks_per_unit`` consecutive blocks, then the root (embedding, final
    norm, head, and any block not in a group); in place.

    Each unit costs host time per step (hooks, one all-gather and one reduce-scatter), so a small model
    with short steps can be bound by the host: larger units, or ``blocks_per_unit`` 0 (the whole model
    one unit), trade overlap of communication with compute for fewer of them.
    ``reshard_after_forward`` False keeps each unit's gathered parameters from its forward to its
    backward (one all-gather per unit and step instead of two, for the memory of the unsharded units).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if blocks_per_unit < 0:
        raise ValueError(f"blocks_per_unit={blocks_per_unit} must be >= 0 (0: the whole model is one unit)")
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else None
    kwargs: dict[str, Any] = {"mp_policy": mp} if mp is not None else {}
    n = blocks_per_unit
    units = [list(blocks[i:i + n]) for i in range(0, len(blocks), n)] if n else []
    for i, unit in enumerate(units):
        # the last unit's parameters are needed again at once by backward: keep them gathered
        fully_shard(unit if len(unit) > 1 else unit[0],
                    reshard_after_forward=reshard_after_forward and i < len(units) - 1, **kwargs)
    fully_shard(model, **kwargs)


def apply_ddp(module: nn.Module, device: torch.device) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, gradient_as_bucket_view=True)


def no_sync(module: nn.Module, skip: bool) -> contextlib.AbstractContextManager:
    """DDP's ``no_sync`` for accumulation micro-steps that are not the last; a no-op otherwise."""
    if skip and hasattr(module, "no_sync"):
        return module.no_sync()
    return contextlib.nullcontext()


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Unsharded model and optimizer state, by parameter name, on CPU; complete on rank 0 only."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_state_dict(model, optimizer, options=options)


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, optim_state: dict) -> None:
    """Load full state dicts (each process read them from disk); FSDP keeps only its shard."""
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state,
                   options=StateDictOptions(full_state_dict=True))


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_min(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return tensor


def local_tensor(value: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a (replicated) DTensor such as FSDP2's gradient norm."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
