"""The decoder: pre-norm RMSNorm blocks, SwiGLU MLP, RoPE, tied embeddings, any attention variant."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sasformer.layers.base import AttentionContext, LayerCache
from sasformer.layers.registry import build_attention
from sasformer.models.config import ModelConfig
from sasformer.ops.attention import padded_causal_mask
from sasformer.ops.cross_entropy import DEFAULT_CHUNK_SIZE, linear_cross_entropy
from sasformer.ops.linear import linear_fused
from sasformer.ops.rope import RotaryCache
from sasformer.ops.swiglu import swiglu


class KVCache:
    """One :class:`LayerCache` per layer; each attention variant decides what it stores.

    ``capacity`` (tokens) preallocates every layer's buffers on first use; None grows them.
    """

    def __init__(self, n_layers: int, capacity: int | None = None) -> None:
        self.layers = [LayerCache(capacity) for _ in range(n_layers)]

    @property
    def seq_len(self) -> int:
        return self.layers[0].seq_len

    def nbytes_per_token(self) -> int:
        return sum(layer.nbytes_per_token() for layer in self.layers)

    def crop(self, length: int) -> None:
        """Keep the first ``length`` tokens (negative: drop that many from the end)."""
        for layer in self.layers:
            layer.crop(length)

    def reorder(self, index: Tensor) -> None:
        for layer in self.layers:
            layer.reorder(index)

    def repeat_interleave(self, repeats: int) -> None:
        for layer in self.layers:
            layer.repeat_interleave(repeats)


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``; gate and up run as one matmul (:func:`linear_fused`), gated by
    :func:`sasformer.ops.swiglu.swiglu` (the plain form, or one Triton kernel each way)."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def fused_linear_groups(self) -> list[tuple[nn.Linear, ...]]:
        """The maps :func:`linear_fused` runs as one (a decoder keeps their concatenation)."""
        return [(self.gate_proj, self.up_proj)]

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(swiglu(linear_fused(x, self.gate_proj, self.up_proj)))


class DecoderBlock(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.attn = build_attention(config.attention, config.d_model, config.resolved_attention_args())
        self.mlp_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.mlp = SwiGLU(config.d_model, config.mlp_hidden)

    def forward(self, x: Tensor, ctx: AttentionContext) -> Tensor:
        x = x + self.attn(self.attn_norm(x), ctx)
        return x + self.mlp(self.mlp_norm(x))


class DecoderLM(nn.Module):
    """Causal language model. ``forward`` returns logits (B, T, vocab), or the loss given ``targets``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(DecoderBlock(config) for _ in range(config.n_layers))
        self.rotary = rotary_cache(config, self.blocks)
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.reset_parameters()
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) for embeddings and linear maps, residual outputs scaled by 1/sqrt(2L).

        Simulation blocks (SAS) and TPA's head factors are not ``nn.Linear`` and keep their own initialisation.
        """
        std = self.config.init_std
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                scale = (2 * self.config.n_layers) ** -0.5 if name.endswith(("o_proj", "down_proj")) else 1.0
                nn.init.normal_(module.weight, mean=0.0, std=std * scale)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def new_cache(self, capacity: int | None = None) -> KVCache:
        return KVCache(self.config.n_layers, capacity)

    def __getstate__(self) -> dict[str, Any]:
        # a compiled head and loss set on the instance (the trainer's compile_scope "block") cannot be pickled;
        # dropped, as nn.Module drops a compiled forward, so the copy runs the plain method
        state = super().__getstate__()
        state.pop("head_loss", None)
        return state

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        cache: KVCache | None = None,
        position_ids: Tensor | None = None,
        targets: Tensor | None = None,
        ignore_index: int = -100,
        loss_impl: str = "chunked",
        loss_chunk_size: int = DEFAULT_CHUNK_SIZE,
        residual_dtype: torch.dtype | None = None,
    ) -> Tensor:
        """Logits for ``input_ids`` (B, T); with ``targets`` (B, T), the mean loss instead.

        ``attention_mask`` (B, S) marks real tokens (1) and padding (0) over the cached tokens plus
        this call's, S = cache length + T (Hugging Face convention; left padding for generation).
        ``targets`` are already shifted (``targets[:, t]`` is the token after ``input_ids[:, t]``);
        the loss is :func:`sasformer.ops.cross_entropy.linear_cross_entropy` (``loss_impl``
        "chunked" and its forced variants never materialise the logits; "naive" is the plain reference). The loss is
        computed inside ``forward`` so that wrappers hooking the call (FSDP, DDP) see the head too.
        ``residual_dtype`` (None: the embedding's dtype) is the dtype of the residual stream between the blocks;
        use it under autocast (or with parameters of that dtype), whose matmuls take any input dtype.
        """
        if targets is not None and targets.shape != input_ids.shape:
            raise ValueError(f"targets must have the shape of input_ids {tuple(input_ids.shape)}, "
                             f"got {tuple(targets.shape)}")
        x = run_blocks(self.embed, self.blocks, self.rotary, input_ids, attention_mask, cache, position_ids,
                       residual_dtype)
        if targets is None:
            return self.lm_head(self.norm(x))
        return self.head_loss(x, targets, ignore_index, loss_impl, loss_chunk_size)

    def head_loss(self, x_BTd: Tensor, targets: Tensor, ignore_index: int = -100, loss_impl: str = "chunked",
                  loss_chunk_size: int = DEFAULT_CHUNK_SIZE) -> Tensor:
        """The forward after the blocks: final norm, LM head and mean cross-entropy of the residual stream.

        A method of its own so that it can be compiled on its own where the whole model is not (FSDP2
        compiles each block and this).
        """
        return linear_cross_entropy(self.norm(x_BTd).flatten(0, 1), self.lm_head.weight, targets.flatten(),
                                    ignore_index, loss_impl, loss_chunk_size)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if exclude_embeddings else n


def lm_loss(logits: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
    """Mean next-token cross-entropy; ``targets`` are already shifted, fp32 softmax."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=ignore_index)


def rotary_cache(config: ModelConfig, blocks: nn.ModuleList) -> RotaryCache:
    """Precomputed RoPE tables for every feature size the model's attention layers rotate."""
    dims = {dim for block in blocks for dim in block.attn.rope_dims}
    return RotaryCache(dims, config.max_seq_len, config.rope_theta)


def run_blocks(
    embed: nn.Embedding,
    blocks: nn.ModuleList,
    rotary: RotaryCache,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    cache: KVCache | None = None,
    position_ids: Tensor | None = None,
    residual_dtype: torch.dtype | None = None,
) -> Tensor:
    """Embed ``input_ids`` and run the decoder blocks; returns the residual stream before the final norm.

    ``residual_dtype`` casts the embeddings, and so the residual stream the blocks add to, to that dtype
    (None keeps the embedding's: fp32 parameters keep an fp32 stream under autocast, whose matmuls
    return bf16 that the additions promote back to fp32). Meant for autocast, as the trainer's ``residual_dtype``.

    Shared by :class:`DecoderLM` and the Hugging Face wrappers, so both compute exactly the same thing.
    Positions are ``cumsum(attention_mask) - 1`` (0 at the first real token of a left-padded row).
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
    B, T = input_ids.shape
    past = cache.seq_len if cache is not None else 0
    S = past + T
    if attention_mask is not None and attention_mask.shape != (B, S):
        raise ValueError(
            f"attention_mask must be (batch, cache length + seq) = {(B, S)}, got {tuple(attention_mask.shape)}"
        )
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None  # no padding: take the plain causal path
    if attention_mask is None:
        key_positions = torch.arange(S, device=input_ids.device).unsqueeze(0)
        mask = None
    else:
        key_positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        mask = padded_causal_mask(attention_mask, T)
    # without padding or given positions they are past .. S - 1 in every row: the tables are then slices
    first_position = past if attention_mask is None and position_ids is None else None
    if position_ids is None:
        position_ids = key_positions[:, past:]
    elif past == 0:
        key_positions = position_ids  # the keys are these tokens, at the positions given
    elif position_ids.shape != key_positions[:, past:].shape or not torch.equal(position_ids, key_positions[:, past:]):
        key_positions = None  # other positions than the mask's: the cached keys' were given to earlier calls, not kept
    ctx = AttentionContext(rotary.tables(position_ids, S, first_position), mask, None, key_positions)
    x = embed(input_ids)
    if residual_dtype is not None:
        x = x.to(residual_dtype)
    for i, block in enumerate(blocks):
        x = block(x, ctx.for_layer(cache.layers[i] if cache is not None else None))
    return x
