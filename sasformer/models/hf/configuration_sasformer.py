"""``SASFormerConfig``: the Hugging Face view of :class:`sasformer.models.config.ModelConfig`."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from transformers import PretrainedConfig

from sasformer.models.config import ModelConfig

# ModelConfig fields stored under the same name; ``tie_embeddings`` is HF's ``tie_word_embeddings``
_SHARED_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig) if f.name != "tie_embeddings")


class SASFormerConfig(PretrainedConfig):
    """Configuration of :class:`SASFormerModel` / :class:`SASFormerForCausalLM`.

    Field names and defaults are those of :class:`ModelConfig` (``attention`` names a variant,
    ``attention_args`` are its arguments); values are validated by building a ``ModelConfig``, so a
    bad value raises the same ValueError as in training. ``hidden_size``, ``num_hidden_layers`` and
    ``max_position_embeddings`` are aliases for ``d_model``, ``n_layers`` and ``max_seq_len``.
    """

    model_type = "sasformer"
    attribute_map: ClassVar[dict[str, str]] = {
        "hidden_size": "d_model",
        "num_hidden_layers": "n_layers",
        "max_position_embeddings": "max_seq_len",
    }

    def __init__(
        self,
        vocab_size: int = 50304,
        d_model: int = 768,
        n_layers: int = 12,
        max_seq_len: int = 1024,
        attention: str = "mha",
        attention_args: dict[str, Any] | None = None,
        mlp_hidden: int | None = None,
        rope_theta: float = 10000.0,
        norm_eps: float = 1e-5,
        init_std: float = 0.02,
        tie_word_embeddings: bool = True,
        use_cache: bool = True,
        **kwargs: Any,
    ) -> None:
        model_config = ModelConfig(
            vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, max_seq_len=max_seq_len,
            attention=attention, attention_args=dict(attention_args or {}), mlp_hidden=mlp_hidden,
            rope_theta=rope_theta, norm_eps=norm_eps, init_std=init_std, tie_embeddings=tie_word_embeddings,
        )
        for name in _SHARED_FIELDS:
            setattr(self, name, getattr(model_config, name))
        self.use_cache = use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        # some transformers versions set this field only when given, so keep ours authoritative
        self.tie_word_embeddings = tie_word_embeddings

    def to_model_config(self) -> ModelConfig:
        """The equivalent :class:`ModelConfig` (what ``DecoderLM`` and the training code use)."""
        fields = {name: getattr(self, name) for name in _SHARED_FIELDS}
        fields["attention_args"] = dict(fields["attention_args"])
        return ModelConfig(**fields, tie_embeddings=bool(self.tie_word_embeddings))

    @classmethod
    def from_model_config(cls, config: ModelConfig, **kwargs: Any) -> SASFormerConfig:
        """Build from a :class:`ModelConfig`; ``kwargs`` add HF fields (``eos_token_id``, ...)."""
        fields = {name: getattr(config, name) for name in _SHARED_FIELDS}
        return cls(**fields, tie_word_embeddings=config.tie_embeddings, **kwargs)
