"""Small helpers shared by the evaluators."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch
from torch import Tensor

Model = Callable[..., Tensor]
T = TypeVar("T")


def model_device(model: Any) -> torch.device:
    """Device of the model's first parameter; CPU for a model without parameters."""
    parameters = getattr(model, "parameters", None)
    if parameters is not None:
        for p in parameters():
            return p.device
    return torch.device("cpu")


def progress(items: Iterable[T], enabled: bool, desc: str) -> Iterable[T]:
    """``items`` wrapped in a tqdm bar (with ETA) when enabled and tqdm is installed."""
    if not enabled:
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, unit="batch")
