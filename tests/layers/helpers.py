"""Small configurations of every variant, shared by the layer tests."""

from __future__ import annotations

import torch

from sasformer.layers.base import AttentionContext, LayerCache
from sasformer.ops.attention import padded_causal_mask
from sasformer.ops.rope import RotaryTables

D_MODEL = 48

# (registry name, args): odd head counts and non-default options on purpose
VARIANTS: dict[str, tuple[str, dict]] = {
    "mha": ("mha", {"n_heads": 4}),
    "gqa": ("gqa", {"n_heads": 6, "n_kv_heads": 3, "head_dim": 8}),
    "mqa": ("mqa", {"n_heads": 3, "head_dim": 16}),
    "mla": ("mla", {"n_heads": 3, "q_lora_rank": 20, "kv_lora_rank": 12, "qk_nope_head_dim": 6,
                    "qk_rope_head_dim": 4, "v_head_dim": 10}),
    "mla_full_q": ("mla", {"n_heads": 2, "q_lora_rank": 0, "kv_lora_rank": 8, "qk_nope_head_dim": 8,
                           "qk_rope_head_dim": 6, "v_head_dim": 5}),
    "tpa": ("tpa", {"n_heads": 5, "head_dim": 8, "q_rank": 3, "k_rank": 2, "v_rank": 1}),
    "sas": ("sas", {"n_heads": 4}),
    "sas_k1": ("sas", {"n_heads": 3, "n_sim_heads": 9, "sim_head_dim": 10, "kernel_size": 1}),
    "sas_k5_before": ("sas", {"n_heads": 4, "n_sim_heads": 8, "sim_head_dim": 14, "kernel_size": 5, "rope": "before"}),
    "sas_norope_novsim": ("sas", {"n_heads": 2, "n_sim_heads": 6, "rope": "none", "simulate_v": False}),
    "sas_gqa": ("sas", {"n_heads": 4, "n_kv_heads": 2, "n_sim_heads": 8, "sim_head_dim": 16}),
    "sas_mqa_full": ("sas", {"n_heads": 4, "n_kv_heads": 1, "peaa": "full"}),
    "sas_compact": ("sas", {"n_heads": 4, "cache_mode": "compact"}),
}


def context(B: int, T: int, key_padding=None, theta: float = 10000.0) -> AttentionContext:
    """Context for a full (uncached) forward of T tokens, optionally left-padded."""
    if key_padding is None:
        positions = torch.arange(T).unsqueeze(0)
        return AttentionContext(RotaryTables(positions, theta), None, None, positions)
    positions = (key_padding.long().cumsum(-1) - 1).clamp(min=0)
    return AttentionContext(RotaryTables(positions, theta), padded_causal_mask(key_padding, T), None, positions)


def rope_written_out(x_TD: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """RoPE from its definition, for equation tests: row t of ``x`` (T, D) is at position t, and the
    pair (i, i + D/2) turns by the angle t * theta^(-2i/D) ("rotate-half" layout)."""
    T, D = x_TD.shape
    half = D // 2
    freq = theta ** (-2.0 * torch.arange(half, dtype=torch.float64) / D)
    angle = torch.arange(T, dtype=torch.float64)[:, None] * freq[None, :]
    cos, sin = angle.cos().to(x_TD.dtype), angle.sin().to(x_TD.dtype)
    x1, x2 = x_TD[:, :half], x_TD[:, half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def causal_attention_written_out(q_TD: torch.Tensor, k_TD: torch.Tensor, v_TE: torch.Tensor,
                                 scale: float) -> torch.Tensor:
    """One head of causal softmax attention, query by query: o_t = sum_{s <= t} softmax_s(scale q_t.k_s) v_s."""
    rows = []
    for t in range(q_TD.shape[0]):
        scores = (k_TD[: t + 1] @ q_TD[t]) * scale
        weights = torch.exp(scores - scores.max())
        rows.append((weights / weights.sum()) @ v_TE[: t + 1])
    return torch.stack(rows)


@torch.no_grad()
def randomise_parameters(layer: torch.nn.Module) -> None:
    """Every weight drawn afresh at a 1/sqrt(fan-in) scale, norm gains around 1, so that no parameter of an
    equation test sits at a value (ones, zeros) that would hide a mistake."""
    for p in layer.parameters():
        if p.dim() == 1:
            p.copy_(1.0 + 0.3 * torch.randn_like(p))
        else:
            p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)


__all__ = ["D_MODEL", "VARIANTS", "LayerCache", "causal_attention_written_out", "context", "randomise_parameters",
           "rope_written_out"]


def assert_layer_matches_equations(name: str, d_model: int, args: dict, written_out) -> None:
    """Variant ``name``'s output and input gradient against ``written_out(layer, x)``, the variant's equations
    written out from the layer's own (randomised) parameters, in fp64 over 2 x 9 tokens."""
    from sasformer.layers.registry import build_attention

    layer = build_attention(name, d_model, dict(args)).double()
    randomise_parameters(layer)
    B, T = 2, 9
    x = torch.randn(B, T, d_model, dtype=torch.float64, requires_grad=True)
    got, expected = layer(x, context(B, T)), written_out(layer, x)
    # the layer's RoPE tables are fp32 (cast to fp64), hence not fp64-tight tolerances
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    cotangent = torch.randn_like(got)
    (grad_got,) = torch.autograd.grad(got, x, cotangent)
    (grad_expected,) = torch.autograd.grad(expected, x, cotangent)
    torch.testing.assert_close(grad_got, grad_expected, rtol=1e-5, atol=1e-6)
