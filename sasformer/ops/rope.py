"""Rotary position embedding (RoPE), "rotate-half" layout.

Every attention variant rotates tensors of its own feature size (MHA: D, MLA: the decoupled rope
size, SAS: D' when applied after simulation), so the tables are built per size on demand and
memoised for the duration of one forward pass by :class:`RotaryTables`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn


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
    """cos/sin tables for given positions, per feature size, memoised for one forward pass.

    ``position_ids`` is (B, T) or (1, T): absolute positions of the tokens in this call (with a KV
    cache they start at the cache length; with left padding they start at 0 at the first real token).
    ``precomputed`` maps a feature size to full (max_len, dim) cos/sin tables (a
    :class:`RotaryCache`'s buffers) that are gathered instead of computed: under ``torch.compile`` this
    keeps the transcendental functions out of every layer's kernels. ``first_position``: the positions
    are ``first_position, first_position + 1, ...`` in every row (no padding), known on the host, so
    the precomputed tables are sliced instead of gathered. Then the compiled code reads them at affine
    offsets rather than through indirect loads, in RoPE's forward and backward kernels alike.
    """

    def __init__(
        self, position_ids: Tensor, theta: float, precomputed: dict[int, tuple[Tensor, Tensor]] | None = None,
        first_position: int | None = None,
    ) -> None:
        self.position_ids = position_ids
        self.theta = theta
        self.precomputed = precomputed or {}
        self.first_position = first_position
        self._tables: dict[int, tuple[Tensor, Tensor]] = {}

    def __call__(self, dim: int) -> tuple[Tensor, Tensor]:
        if dim not in self._tables:
            if dim in self.precomputed and self.first_position is not None:
                cos, sin = self.precomputed[dim]
                span = slice(self.first_position, self.first_position + self.position_ids.shape[-1])
                self._tables[dim] = (cos[span].unsqueeze(0), sin[span].unsqueeze(0))
            elif dim in self.precomputed:
                cos, sin = self.precomputed[dim]
                self._tables[dim] = (cos[self.position_ids], sin[self.position_ids])
            else:
                self._tables[dim] = _cos_sin(self.position_ids, dim, self.theta)
        return self._tables[dim]

    def rotate(self, x_BTHD: Tensor) -> Tensor:
        cos, sin = self(x_BTHD.shape[-1])
        return apply_rope(x_BTHD, cos, sin)


def _cos_sin(position_ids: Tensor, dim: int, theta: float) -> tuple[Tensor, Tensor]:
    inv_freq = rope_frequencies(dim, theta, position_ids.device)
    angles = position_ids.float().unsqueeze(-1) * inv_freq  # (B, T, dim/2)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


class RotaryCache(nn.Module):
    """Full cos/sin tables for positions 0 .. max_len-1 of every feature size a model rotates.

    Buffers are not saved (they are a function of ``theta``); positions at or past ``max_len`` (longer
    contexts than trained, at evaluation) fall back to computing the tables.
    """

    def __init__(self, dims: Iterable[int], max_len: int, theta: float) -> None:
        super().__init__()
        self.dims, self.max_len, self.theta = tuple(sorted(set(dims))), max_len, theta
        self.build(None)

    def build(self, device: torch.device | None = None) -> None:
        """(Re)create the tables on ``device``."""
        positions = torch.arange(self.max_len, device=device).unsqueeze(0)
        for dim in self.dims:
            cos, sin = _cos_sin(positions, dim, self.theta)
            self.register_buffer(f"cos_{dim}", cos[0], persistent=False)
            self.register_buffer(f"sin_{dim}", sin[0], persistent=False)

    @torch.no_grad()
    def reset_tables(self) -> None:
        """Recompute the tables in place (after a loader allocated them without values)."""
        for dim in self.dims:
            positions = torch.arange(self.max_len, device=getattr(self, f"cos_{dim}").device).unsqueeze(0)
            if positions.is_meta:
                return
            cos, sin = _cos_sin(positions, dim, self.theta)
            getattr(self, f"cos_{dim}").copy_(cos[0])
            getattr(self, f"sin_{dim}").copy_(sin[0])

    def tables(self, position_ids: Tensor, seq_len: int, first_position: int | None = None) -> RotaryTables:
        """Tables for ``position_ids``, all below ``seq_len`` (the host-side bound: cache + new tokens), built
        for every size the model rotates before any layer asks: blocks compiled one by one (FSDP2) then see
        the same built tables and share one graph, where the first block would otherwise compile its own.
        ``first_position``: the positions are a plain range starting there (see :class:`RotaryTables`)."""
        precomputed = None
        if self.dims and getattr(self, f"cos_{self.dims[0]}").is_meta:
            # built on the meta device (e.g. by a loader that creates modules without memory): build now
            self.build(position_ids.device)
        if seq_len <= self.max_len:
            precomputed = {d: (getattr(self, f"cos_{d}"), getattr(self, f"sin_{d}")) for d in self.dims}
        tables = RotaryTables(position_ids, self.theta, precomputed, first_position)
        for dim in self.dims:
            tables(dim)
        return tables
