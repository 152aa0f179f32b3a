"""Whether Triton can be imported, looked up once at import: a plain constant, which ``torch.compile``
traces without calling anything. And the choice between a plain-PyTorch op and its Triton kernels."""

from __future__ import annotations

import importlib.util
import os
from typing import Any

TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None

IMPLS = ("auto", "torch", "triton")


def choose_impl(setting: str | None, setting_name: str, env_var: str, x: Any,
                triton_available: bool = TRITON_AVAILABLE, default: str = "auto") -> str:
    """``torch`` or ``triton`` for an op on tensor ``x``.

    The choice is ``setting`` (a module attribute named ``setting_name``) when not None, else the variable
    ``env_var``, unset = ``default``; ``auto`` is Triton for CUDA tensors when it is installed, else the plain
    form. Raises ValueError on an unknown choice or a ``triton`` that cannot run here (it needs Triton and
    CUDA tensors, or ``TRITON_INTERPRET=1``)."""
    choice = setting if setting is not None else os.environ.get(env_var, "").strip().lower() or default
    if choice not in IMPLS:
        source = setting_name if setting is not None else env_var
        raise ValueError(f"{source}={choice!r} is not an implementation; choose one of {IMPLS}")
    if choice == "auto":
        return "triton" if triton_available and x.is_cuda else "torch"
    if choice == "triton":
        if not triton_available:
            raise ValueError(f"{setting_name} 'triton' needs the triton package; use 'torch'")
        if not (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
            raise ValueError(f"{setting_name} 'triton' needs CUDA tensors (or TRITON_INTERPRET=1); use 'torch'")
    return choice
