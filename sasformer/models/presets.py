"""Named model sizes and, for each, attention arguments that match MHA's attention parameters.

Derivations (per layer, d = width, H heads of size D = d / H; MHA attention has 4 d^2 parameters):
- GQA with 2 KV heads of size D: 2 d D (H_q + 2) = 4 d^2   ->  H_q = 2 H - 2   (22 at d=768)
- MQA, one KV head of size D:     2 d D (H_q + 1) = 4 d^2   ->  H_q = 2 H - 1   (23 at d=768)
- TPA, ranks 6/2/2, size D:  d (10 H_t + 10 D) + H_t D d = 4 d^2  ->  H_t = (4d - 10D) / (10 + D),
  rounded (33 at d=768; the TPA paper's 34 counted differently)
- MLA, H heads, nope = v = D, rope = D/2, kv_lora_rank = d/3 (rounded to 8): q_lora_rank is solved for, rounded
  to a multiple of 8
- SAS keeps MHA's heads; the simulation adds < 1% of the model at small and medium.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sasformer.layers.registry import variant_names
from sasformer.models.config import ModelConfig


@dataclass(frozen=True)
class Size:
    d_model: int
    n_layers: int
    n_heads: int
    max_seq_len: int
    vocab_size: int


SIZES: dict[str, Size] = {
    "tiny": Size(d_model=128, n_layers=4, n_heads=4, max_seq_len=256, vocab_size=4096),
    # the evidence grid's shape (docs/results.md): small enough that a run of 50M+ tokens takes minutes on one H200
    "mini": Size(d_model=512, n_layers=8, n_heads=8, max_seq_len=512, vocab_size=50304),
    "small": Size(d_model=768, n_layers=12, n_heads=12, max_seq_len=1024, vocab_size=50304),
    "medium": Size(d_model=1024, n_layers=24, n_heads=16, max_seq_len=1024, vocab_size=50304),
}


def _round_to(x: float, multiple: int) -> int:
    return max(multiple, int(round(x / multiple)) * multiple)


def matched_attention_args(size: str | Size, attention: str) -> dict[str, Any]:
    """Arguments for ``attention`` at ``size`` that give (about) MHA's attention parameter count."""
    s = SIZES[size] if isinstance(size, str) else size
    d, H = s.d_model, s.n_heads
    D = d // H
    if attention == "mha":
        return {"n_heads": H}
    if attention == "gqa":
        return {"n_heads": 2 * H - 2, "n_kv_heads": 2, "head_dim": D}
    if attention == "mqa":
        return {"n_heads": 2 * H - 1, "n_kv_heads": 1, "head_dim": D}
    if attention == "tpa":
        return {"n_heads": round((4 * d - 10 * D) / (10 + D)), "head_dim": D, "q_rank": 6, "k_rank": 2, "v_rank": 2}
    if attention == "mla":
        nope, rope, v, rkv = D, D // 2, D, _round_to(d / 3, 8)
        fixed = d * (rkv + rope) + rkv * H * (nope + v) + H * v * d + rkv  # kv path, output, kv norm
        per_q_rank = d + H * (nope + rope) + 1  # q_down column, q_up row, q norm weight
        rq = _round_to((4 * d * d - fixed) / per_q_rank, 8)
        return {"n_heads": H, "q_lora_rank": rq, "kv_lora_rank": rkv, "qk_nope_head_dim": nope,
                "qk_rope_head_dim": rope, "v_head_dim": v}
    if attention == "sas":
        return {"n_heads": H}
    raise ValueError(f"attention={attention!r} is not a known variant; choose one of {variant_names()}")


def preset(size: str, attention: str = "mha", **overrides: Any) -> ModelConfig:
    """A model config: ``preset("small", "sas", attention_args={"kernel_size": 1})``.

    ``attention_args`` given here update the matched defaults instead of replacing them.
    """
    if size not in SIZES:
        raise ValueError(f"size={size!r} is not a preset; choose one of {list(SIZES)}")
    s = SIZES[size]
    args = {**matched_attention_args(s, attention), **overrides.pop("attention_args", {})}
    fields = {"d_model": s.d_model, "n_layers": s.n_layers, "max_seq_len": s.max_seq_len, "vocab_size": s.vocab_size}
    return ModelConfig(**{**fields, **overrides}, attention=attention, attention_args=args)
