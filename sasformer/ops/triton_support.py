"""Whether Triton can be imported, looked up once at import: a plain constant, which ``torch.compile``
traces without calling anything. And the choice between a plain-PyTorch op and its Triton kernels."""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import torch

TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None

IMPLS = ("auto", "torch", "triton")
# what ``auto`` hands to a kernel that computes in fp32 (float64 would lose precision there)
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def choose_impl(setting: str | None, setting_name: str, env_var: str, x: Any,
                triton_available: bool = TRITON_AVAILABLE, default: str = "auto", auto_pays: bool = True) -> str:
    """``torch`` or ``triton`` for an op on tensor ``x``.

    The choice is ``setting`` (a module attribute named ``setting_name``) when not None, else the variable
    ``env_var``, unset = ``default``; ``auto`` is Triton for CUDA tensors when it is installed and ``auto_pays``
    (the caller's word that the kernel wins for this call), else the plain form.
    Raises ValueError on an unknown choice or a ``triton`` that cannot run here (it needs Triton and
    CUDA tensors, or ``TRITON_INTERPRET=1``)."""
    choice = setting if setting is not None else os.environ.get(env_var, "").strip().lower() or default
    source = setting_name if setting is not None else env_var
    if choice not in IMPLS:
        raise ValueError(f"{source}={choice!r} is not an implementation; choose one of {IMPLS}")
    if choice == "auto":
        # the kernels compute in fp32: float64 keeps the plain form's precision
        return "triton" if auto_pays and triton_available and x.is_cuda and x.dtype in KERNEL_DTYPES else "torch"
    if choice == "triton":
        if not triton_available:
            raise ValueError(f"{source}='triton' needs the triton package; use 'torch'")
        if not (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
            raise ValueError(f"{source}='triton' needs CUDA tensors (or TRITON_INTERPRET=1); use 'torch'")
    return choice
