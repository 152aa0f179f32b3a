"""Process-group setup and data parallelism (DDP or FSDP2), applied to a model from outside.

Launch with ``torchrun --nproc-per-node N -m sasformer train ...``; a plain ``python`` launch is a
world of one and wraps nothing. Full (unsharded) state dicts keyed by parameter name are used for
checkpoints, so a checkpoint does not depend on the world size or the parallelism that wrote it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
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


# issue each unit's all-gather from the host as soon as the previous unit's parameters are gathered,
# before that unit's kernels are launched (FSDP2's default issues it in the unit's own pre-forward): when
# the host sets the pace, this keeps the collective off the critical path. A flag, so benchmarks can flip it.
FORWARD_PREFETCH = True


def apply_fsdp(model: nn.Module, blocks: nn.ModuleList, param_dtype: torch.dtype | None,
               reshard_after_forward: bool = True, blocks_per_unit: int = 1) -> None:
    """FSDP2: shard groups of ``blocks_per_unit`` consecutive blocks, then the root (embedding, final
    norm, head, and any block not in a group); in place.

    Each unit costs host time per step in FSDP2's own hooks (gathering, setting and freeing its parameters,
    reducing and wrapping its gradients; about 1.1 ms per unit plus 30 us per parameter tensor on a 2-core
    CPU, docs/training.md), and its collectives, which every process waits for (an all-gather in forward,
    another in backward when resharding, a reduce-scatter). Where that is comparable to a block's kernels
    (GPT-small on an H200: about 3 ms a block and micro-batch of 16), the step is bound by it: larger units, or
    ``blocks_per_unit`` 0 (the whole model one unit), trade overlap of communication with compute for
    fewer of them. ``reshard_after_forward`` False keeps each unit's gathered parameters from its forward
    to its backward (one all-gather per unit and step instead of two, for the memory of the unsharded
    units). With :data:`FORWARD_PREFETCH`, each unit prefetches the next one's parameters in forward.
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
    if FORWARD_PREFETCH and units:
        # a unit of several blocks keeps its FSDP state on its first block
        order = [model] + [unit[0] for unit in units]
        for module, following in zip(order, order[1:]):
            module.set_modules_to_forward_prefetch([following])


def apply_ddp(module: nn.Module, device: torch.device) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, gradient_as_bucket_view=True)


def no_sync(module: nn.Module | None, skip: bool) -> contextlib.AbstractContextManager:
    """DDP's ``no_sync`` for accumulation micro-steps that are not the last; a no-op otherwise.

    FSDP2 reduce-scatters every micro-step on purpose: skipping it (``set_requires_gradient_sync``) would
    hold the whole model's unsharded fp32 gradients between micro-steps, the memory FSDP is used to save.
    """
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


def _shard_group(tensors: list[torch.Tensor]) -> dist.ProcessGroup | None:
    """The process group over which ``tensors`` are sharded, if all are DTensors sharded on one 1-D mesh
    (FSDP2's parameters and gradients); None otherwise."""
    from torch.distributed.tensor import DTensor, Shard

    if not tensors or not all(isinstance(t, DTensor) for t in tensors):
        return None
    mesh = tensors[0].device_mesh
    if mesh.ndim != 1 or any(t.device_mesh != mesh or not isinstance(t.placements[0], Shard) for t in tensors):
        return None
    return mesh.get_group()


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` (L2, foreach): scale the gradients so their global norm is at
    most ``max_norm``; returns the norm before clipping as a plain tensor, the same on every process.

    For FSDP2's gradients (DTensors sharded on dim 0; the shards are disjoint) the norm is computed on
    the local shards with one all-reduce of the squared norm, and the gradients are scaled in place
    locally: the same arithmetic as DTensor's own dispatch, without its per-tensor host cost.
    """
    params = list(parameters)
    grads = [p.grad for p in params if p.grad is not None]
    group = _shard_group(grads)
    if group is None:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    local = [g.to_local() for g in grads]
    norm_sq = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(local, 2.0)), 2.0).square()
    dist.all_reduce(norm_sq, op=dist.ReduceOp.SUM, group=group)
    norm = norm_sq.sqrt()
    # as torch's clip: the coefficient is applied even when it is 1 (a NaN norm spreads, as there)
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    torch._foreach_mul_(local, coef)
    return norm


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` (picklable) on every process; ``obj`` itself without a process group."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every process's ``obj`` (picklable), by rank; ``[obj]`` without a process group."""
    if not dist.is_initialized():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
