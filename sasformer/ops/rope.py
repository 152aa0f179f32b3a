"""Rotary position embedding (RoPE), "rotate-half" layout.

Every attention variant rotates tensors of its own feature size (MHA: D, MLA: the decoupled rope
size, SAS: D' when applied after simulation), so the tables are built per size on demand and
memoised for the duration of one forward pass by :class:`RotaryTables`.
"""

from __future__ import annotations

import torch
from torch import Tensor


def rope_frequencies(dim: int, theta: float, device: torch.device | None = None) -> Tensor:
    """Inverse frequencies ``theta^(-2i/dim)`` for ``i < dim/2`` (fp32)."""
    if dim % 2 != 0:
        raise ValueError(f"RoPE needs an even feature size, got {dim}")
    return 1.0 / (theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x_BTHD: Tensor, cos_BTD: Tensor, sin_BTD: Tensor) -> Tensor:
    """Rotate ``x`` of shape (B, T, H, D) with tables of shape (B or 1, T, D)."""
    cos = cos_BTD.unsqueeze(2).to(x_BTHD.dtype)
    sin = sin_BTD.unsqueeze(2).to(x_BTHD.dtype)
    return x_BTHD * cos + rotate_half(x_BTHD) * sin


class RotaryTables:
    """cos/sin tables for given positions, built lazily for each feature size and cached.

    ``position_ids`` is (B, T) or (1, T): absolute positions of the tokens in this call (with a KV
    cache they start at the cache length; with left padding they start at 0 at the first real token).
    """

    def __init__(self, position_ids: Tensor, theta: float) -> None:
        self.position_ids = position_ids
        self.theta = theta
        self._tables: dict[int, tuple[Tensor, Tensor]] = {}

    def __call__(self, dim: int) -> tuple[Tensor, Tensor]:
        if dim not in self._tables:
            inv_freq = rope_frequencies(dim, self.theta, self.position_ids.device)
            angles = self.position_ids.float().unsqueeze(-1) * inv_freq  # (B, T, dim/2)
            angles = torch.cat((angles, angles), dim=-1)
            self._tables[dim] = (angles.cos(), angles.sin())
        return self._tables[dim]

    def rotate(self, x_BTHD: Tensor) -> Tensor:
        cos, sin = self(x_BTHD.shape[-1])
        return apply_rope(x_BTHD, cos, sin)
