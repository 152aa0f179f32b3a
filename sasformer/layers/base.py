"""The one interface every attention variant implements.

A variant is an ``nn.Module`` taking the block input ``x`` (B, T, d) and an :class:`AttentionContext`
(rotary tables, mask, optional cache) and returning (B, T, d). Each variant decides what it keeps in
the KV cache (MHA: keys and values; MLA: the latent; TPA: the factors; SAS: simulated or compact
K/V), which is why the cache stores named tensors rather than fixed keys/values.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from sasformer.ops.rope import RotaryTables


class LayerCache:
    """Per-layer store of named (B, S, ...) tensors, appended along the sequence axis.

    Each attention layer appends all of its names in one :meth:`append` call per forward pass.
    With ``capacity`` None the tensors grow by concatenation; with a capacity, each name gets a
    (B, capacity, ...) buffer on its first append and later steps write into it in place, so
    decoding does not copy the whole cache every step. The length is a host-side int (no device
    sync to read it).
    """

    def __init__(self, capacity: int | None = None) -> None:
        if capacity is not None and capacity < 1:
            raise ValueError(f"capacity={capacity} must be >= 1 (or None for a growing cache)")
        self.capacity = capacity
        self.length = 0
        self._store: dict[str, Tensor] = {}
        self._write_index: Tensor | None = None

    def write_at(self, index: Tensor | None) -> None:
        """Static-shape decoding (CUDA graphs): while ``index`` (a device tensor of positions) is set,
        :meth:`append` writes there and returns the whole (B, capacity, ...) buffers, and the caller
        masks the keys not yet written and advances :attr:`length` itself. None restores normal appends."""
        if index is not None and (self.capacity is None or not self._store):
            raise ValueError("write_at needs a cache with a capacity whose buffers exist (prefill first)")
        self._write_index = index

    @property
    def seq_len(self) -> int:
        return self.length

    @property
    def tensors(self) -> dict[str, Tensor]:
        """The cached (B, seq_len, ...) tensor of each name (views into the buffers)."""
        return {name: value[:, : self.length] for name, value in self._store.items()}

    def append(self, **new: Tensor) -> dict[str, Tensor]:
        """Append this step's tensors and return the full cached sequence for each name."""
        if self._write_index is not None:
            for name, value in new.items():
                self._store[name].index_copy_(1, self._write_index, value)
            return {name: self._store[name] for name in new}
        steps = {value.shape[1] for value in new.values()}
        if len(steps) != 1:
            raise ValueError(f"LayerCache.append needs tensors of one sequence length, got {sorted(steps)}")
        step = steps.pop()
        end = self.length + step
        if self.capacity is not None and end > self.capacity:
            raise ValueError(
                f"KV cache capacity {self.capacity} exceeded ({self.length} cached + {step} new); "
                "create the cache with a larger capacity"
            )
        for name, value in new.items():
            old = self._store.get(name)
            if self.capacity is None:
                self._store[name] = value if old is None else torch.cat((old, value), dim=1)
                continue
            if old is None:
                if self.length:
                    raise ValueError(f"LayerCache: {name!r} first appended after {self.length} tokens")
                # zeros, not garbage: static decoding reads (masked) unwritten slots, and NaN * 0 is NaN
                old = value.new_zeros((value.shape[0], self.capacity, *value.shape[2:]))
                self._store[name] = old
            old[:, self.length : end] = value
        self.length = end
        return {name: self._store[name][:, :end] for name in new}

    def nbytes_per_token(self) -> int:
        """Bytes this layer caches per token per sequence (summed over the named tensors)."""
        total = 0
        for value in self._store.values():
            total += value[0, 0].numel() * value.element_size()
        return total

    def crop(self, length: int) -> None:
        """Keep the first ``length`` tokens; a negative ``length`` drops that many from the end."""
        keep = self.length + length if length < 0 else min(length, self.length)
        if keep < 0:
            raise ValueError(f"cannot crop {-length} tokens from a cache of {self.length}")
        if self.capacity is None:
            self._store = {name: value[:, :keep] for name, value in self._store.items()}
        self.length = keep

    def reorder(self, index: Tensor) -> None:
        """Select batch rows (beam search / batch pruning)."""
        self._store = {k: v.index_select(0, index) for k, v in self._store.items()}

    def repeat_interleave(self, repeats: int) -> None:
        """Repeat each batch row ``repeats`` times (several samples per prompt)."""
        self._store = {k: v.repeat_interleave(repeats, dim=0) for k, v in self._store.items()}


@dataclass
class AttentionContext:
    """What every attention layer needs besides ``x``, built once per model forward.

    ``mask`` is a boolean (B, 1, T, S) mask (True = may attend) or None for plain causal attention
    (no padding; queries aligned with the last T keys). ``cache`` is this layer's store, or None.
    ``key_positions`` (B or 1, S) are the positions of all S keys, for variants that rebuild keys
    from a compact cache (SAS ``cache_mode="compact"``).
    """

    rotary: RotaryTables
    mask: Tensor | None = None
    cache: LayerCache | None = None
    key_positions: Tensor | None = None

    def for_layer(self, cache: LayerCache | None) -> AttentionContext:
        return dataclasses.replace(self, cache=cache)


@dataclass
class AttentionArgs:
    """Base of each variant's argument dataclass; ``validate`` raises ValueError naming the field."""

    def validate(self, d_model: int) -> None:  # pragma: no cover - overridden
        pass

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Attention(nn.Module, ABC):
    """Base class: subclasses set ``Args`` and implement ``forward`` and the cost model."""

    Args: ClassVar[type[AttentionArgs]]
    # feature sizes this layer rotates with RoPE; the model precomputes tables for them
    rope_dims: tuple[int, ...] = ()
    # names the layer's initialisation; a variant changes it when its init changes, so finished comparison
    # runs record which one they trained from and are not mixed with runs of another
    init_rule: ClassVar[str] = "standard"

    def __init__(self, d_model: int, args: AttentionArgs) -> None:
        super().__init__()
        args.validate(d_model)
        self.d_model = d_model
        self.args = args

    @abstractmethod
    def forward(self, x_BTd: Tensor, ctx: AttentionContext) -> Tensor: ...

    @abstractmethod
    def forward_flops_per_token(self, context_len: float) -> float:
        """Matmul FLOPs per token of one forward pass, with ``context_len`` keys per query.

        Counted as 2 FLOPs per multiply-add over dense (not causally halved) attention, the same
        convention as ``torch.utils.flop_counter.FlopCounterMode``.
        """

    @abstractmethod
    def cache_bytes_per_token(self, dtype: torch.dtype = torch.bfloat16) -> int:
        """KV-cache bytes one token occupies in this layer."""


def require(condition: bool, message: str) -> None:
    """Raise ValueError(message) when ``condition`` is false (config validation helper)."""
    if not condition:
        raise ValueError(message)


def linear_flops(in_features: int, out_features: int) -> float:
    return 2.0 * in_features * out_features


def attention_core_flops(n_heads: int, qk_dim: int, v_dim: int, context_len: float) -> float:
    """QK^T and PV for one query token against ``context_len`` keys."""
    return 2.0 * n_heads * context_len * (qk_dim + v_dim)
