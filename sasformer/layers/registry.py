"""Attention variants by name.

Adding a variant: write ``layers/<name>.py`` with an :class:`Attention` subclass and its ``Args``
dataclass, then add one line to ``_VARIANTS`` below.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from typing import Any

from sasformer.layers.base import Attention, AttentionArgs


@dataclass(frozen=True)
class Variant:
    module: str  # module path of the implementation
    cls: str  # class name inside it
    fixed: dict[str, Any] = field(default_factory=dict)  # arguments this name implies (mqa: one kv head)

    def load(self) -> type[Attention]:
        return getattr(importlib.import_module(self.module), self.cls)


_VARIANTS: dict[str, Variant] = {
    "mha": Variant("sasformer.layers.mha", "MultiHeadAttention"),
    "gqa": Variant("sasformer.layers.mha", "MultiHeadAttention"),
    "mqa": Variant("sasformer.layers.mha", "MultiHeadAttention", {"n_kv_heads": 1}),
    "mla": Variant("sasformer.layers.mla", "MultiHeadLatentAttention"),
    "tpa": Variant("sasformer.layers.tpa", "TensorProductAttention"),
    "sas": Variant("sasformer.layers.sas", "SimulatedAttention"),
}


def variant_names() -> list[str]:
    """The registered attention variants' names, in registration order."""
    return list(_VARIANTS)


def attention_class(name: str) -> type[Attention]:
    """The :class:`Attention` subclass registered as ``name`` (ValueError naming the known ones otherwise)."""
    if name not in _VARIANTS:
        raise ValueError(f"attention={name!r} is not a known variant; choose one of {variant_names()}")
    return _VARIANTS[name].load()


def make_attention_args(name: str, args: dict[str, Any]) -> AttentionArgs:
    """Build the variant's argument dataclass, rejecting unknown keys with the list of known ones."""
    cls = attention_class(name).Args
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(
            f"attention_args has unknown key(s) {unknown} for attention={name!r}; known: {sorted(known)}"
        )
    for key, value in _VARIANTS[name].fixed.items():
        if key in args and args[key] != value:
            raise ValueError(f"attention={name!r} needs {key}={value}, got {key}={args[key]}; use 'gqa' instead")
    merged = {**args, **_VARIANTS[name].fixed}
    try:
        return cls(**merged)
    except TypeError as err:  # a required field is missing
        raise ValueError(f"attention_args for attention={name!r}: {err}") from None


def build_attention(name: str, d_model: int, args: dict[str, Any] | AttentionArgs) -> Attention:
    """Construct attention variant ``name`` for width ``d_model``."""
    if not isinstance(args, AttentionArgs):
        args = make_attention_args(name, args)
    return attention_class(name)(d_model, args)
