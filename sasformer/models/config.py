"""Model configuration: a plain dataclass, validated at construction."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from sasformer.layers.base import AttentionArgs, require
from sasformer.layers.registry import make_attention_args


@dataclass
class ModelConfig:
    """A LLaMA-style decoder with a pluggable attention variant.

    ``attention`` names a registered variant (``sasformer.layers.registry``); ``attention_args`` are
    that variant's arguments (unknown keys are an error). ``mlp_hidden`` None means 8/3 * d_model
    rounded up to a multiple of 64 (SwiGLU with the parameters of a 4x GELU MLP).
    """

    vocab_size: int = 50304
    d_model: int = 768
    n_layers: int = 12
    max_seq_len: int = 1024
    attention: str = "mha"
    attention_args: dict[str, Any] = field(default_factory=dict)
    mlp_hidden: int | None = None
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02

    def __post_init__(self) -> None:
        require(self.vocab_size >= 2, f"vocab_size={self.vocab_size} must be >= 2")
        require(self.d_model >= 2, f"d_model={self.d_model} must be >= 2")
        require(self.n_layers >= 1, f"n_layers={self.n_layers} must be >= 1")
        require(self.max_seq_len >= 1, f"max_seq_len={self.max_seq_len} must be >= 1")
        require(self.rope_theta > 0, f"rope_theta={self.rope_theta} must be > 0")
        require(self.norm_eps > 0, f"norm_eps={self.norm_eps} must be > 0")
        require(self.init_std > 0, f"init_std={self.init_std} must be > 0")
        require(isinstance(self.attention_args, dict), "attention_args must be a mapping of argument -> value")
        if self.mlp_hidden is None:
            self.mlp_hidden = -(-(8 * self.d_model) // (3 * 64)) * 64
        require(self.mlp_hidden >= 1, f"mlp_hidden={self.mlp_hidden} must be >= 1")
        self.resolved_attention_args()  # validates name, keys and values now, not at first use

    def resolved_attention_args(self) -> AttentionArgs:
        """The variant's argument dataclass, with defaults filled in and validated for d_model."""
        args = make_attention_args(self.attention, dict(self.attention_args))
        args.validate(self.d_model)
        return args

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model config key(s) {unknown}; known: {sorted(known)}")
        return cls(**data)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)
