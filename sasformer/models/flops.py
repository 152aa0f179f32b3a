"""FLOP accounting per variant: forward and training step, per token, as a function of T.

Counts matrix multiplies (2 FLOPs per multiply-add) in projections, simulation, the attention core
and the LM head. The attention core is counted dense by default (every query against all T keys,
which is what ``FlopCounterMode`` counts for causal SDPA too, and the usual MFU convention);
``causal=True`` counts only the keys each query can see (T+1)/2 on average, the work a causal kernel
does. A training step is 3x the forward (backward = 2x forward).
"""

from __future__ import annotations

import torch

from sasformer.models.config import ModelConfig
from sasformer.models.decoder import DecoderLM


def meta_model(config: ModelConfig) -> DecoderLM:
    """The model on the meta device: shapes and parameter counts without memory."""
    with torch.device("meta"):
        return DecoderLM(config)


def forward_flops_per_token(
    config: ModelConfig, seq_len: int, model: DecoderLM | None = None, causal: bool = False
) -> float:
    model = model if model is not None else meta_model(config)
    d, hidden = config.d_model, config.mlp_hidden
    per_layer_mlp = 3 * 2.0 * d * hidden
    context = (seq_len + 1) / 2 if causal else seq_len
    attn = sum(block.attn.forward_flops_per_token(context) for block in model.blocks)
    return attn + config.n_layers * per_layer_mlp + 2.0 * d * config.vocab_size


def train_flops_per_token(
    config: ModelConfig, seq_len: int, model: DecoderLM | None = None, causal: bool = False
) -> float:
    return 3.0 * forward_flops_per_token(config, seq_len, model, causal)


def parameter_count(config: ModelConfig) -> int:
    return meta_model(config).num_parameters()


def attention_parameter_count(config: ModelConfig) -> int:
    """Parameters of one attention layer."""
    return sum(p.numel() for p in meta_model(config.replace(n_layers=1)).blocks[0].attn.parameters())
