"""What the GPU checks among the benchmark scripts share."""

from __future__ import annotations

import torch

# NVLink multicast stays off on hosts whose GPUs other jobs share (NCCL, PyTorch symmetric memory, NVSHMEM)
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """``|got - want| / |want|`` in L2 norm, computed in fp32 (``want`` is the reference)."""
    got, want = got.float(), want.float()
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()
