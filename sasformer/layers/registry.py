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
    # argument -> the argument it must equal when set (mha: as many kv heads as heads, or the name lies)
    tied: dict[str, str] = field(default_factory=dict)

    def load(self) -> type[Attention]:
        return getattr(importlib.import_module(self.module), self.cls)


_VARIANTS: dict[str, Variant] = {
    "mha": Variant("sasformer.layers.mha", "MultiHeadAttention", tied={"n_kv_heads": "n_heads"}),
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
    """Build the variant's argument dataclass, rejecting unknown keys with the list of known ones and
    values that contradict the name (:func:`check_implied_args`)."""
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
        built = cls(**merged)
    except TypeError as err:  # a required field is missing
        raise ValueError(f"attention_args for attention={name!r}: {err}") from None
    check_implied_args(name, built)
    return built


def check_implied_args(name: str, args: AttentionArgs) -> None:
    """Refuse arguments that contradict what ``name`` promises (``mqa``: one KV head; ``mha``: one per head).

    Without this, ``mha`` with fewer ``n_kv_heads`` would quietly build GQA under MHA's name. An unset
    (None) tied argument is fine: it defaults to its partner. Saved configs that spell out the default
    (``n_kv_heads`` equal to ``n_heads``) pass.
    """
    variant = _VARIANTS[name]
    for key, value in variant.fixed.items():
        if getattr(args, key) != value:
            raise ValueError(f"attention={name!r} needs {key}={value}, got {key}={getattr(args, key)}; "
                             "use 'gqa' instead")
    for key, partner in variant.tied.items():
        got, want = getattr(args, key), getattr(args, partner)
        if got is not None and got != want:
            raise ValueError(f"attention={name!r} needs {key} unset or equal to {partner}={want}, got {key}={got}; "
                             "use 'gqa' instead")


def build_attention(name: str, d_model: int, args: dict[str, Any] | AttentionArgs) -> Attention:
    """Construct attention variant ``name`` for width ``d_model``."""
    cls = attention_class(name)
    if isinstance(args, AttentionArgs):
        check_implied_args(name, args)  # a dataclass built by hand skips make_attention_args' checks
    else:
        args = make_attention_args(name, args)
    return cls(d_model, args)
