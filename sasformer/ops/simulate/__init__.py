"""SAS head and feature simulation: a plain reference and three fast paths behind one dispatch.

Implementations (all compute the same function; tests hold them to ``naive``):

- ``naive``: ``F.conv1d`` + ``F.linear``, the method spec in code (:mod:`.naive`).
- ``matmul``: the exact convolution over all tokens as one GEMM of inner size k*H, with a
  hand-written backward that recomputes intermediates instead of saving them (:mod:`.matmul`).
- ``banded``: each convolution as one dense GEMM against a banded (H*D, H'*D) matrix, inner size
  H*D; more FLOPs than needed but at tensor-core speed, recomputing backward (:mod:`.banded`).
- ``chunked``: the band cut into chunks of features with a halo, GEMMs of inner size H*(c+k-1):
  fewer wasted FLOPs than ``banded``, a few more copies (:mod:`.chunked`).
- ``blocked``: ``banded`` with the second convolution as one GEMM over diagonal blocks of c features
  (read in place, feature-major) plus two small GEMMs over the chunk borders: c/k times the useful
  FLOPs there instead of D/k (:mod:`.blocked`).
- ``triton``: fused kernels that read the compact heads once and write the simulated tensor once
  (:mod:`.fused`); CUDA tensors with Triton installed.

The choice is, in order: the ``impl`` argument, the ``SASFORMER_SIMULATE`` environment variable,
then automatic (:func:`default_impl`): for CUDA tensors of many tokens ``banded`` (``triton`` when
``TRITON_DEFAULT`` is set); ``naive`` otherwise.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

from sasformer.ops.rope import apply_rope
from sasformer.ops.simulate.banded import (
    projection_dtype,
    simulate_heads_banded,
    simulate_heads_banded_folded,
    simulate_qk_banded,
    simulate_qk_banded_folded,
)
from sasformer.ops.simulate.blocked import (
    simulate_heads_blocked,
    simulate_heads_blocked_folded,
    simulate_qk_blocked,
    simulate_qk_blocked_folded,
)
from sasformer.ops.simulate.chunked import simulate_heads_chunked, simulate_qk_chunked
from sasformer.ops.simulate.matmul import simulate_features_matmul, simulate_heads_matmul, simulate_qk_matmul
from sasformer.ops.simulate.naive import simulate_features_naive, simulate_heads_naive
from sasformer.ops.simulate.rotate import rope_simulated
from sasformer.ops.triton_support import TRITON_AVAILABLE

IMPLS = ("naive", "matmul", "banded", "chunked", "blocked", "triton")
# the implementations in plain PyTorch besides the reference (no kernel of their own)
PYTORCH_FAST_IMPLS = ("matmul", "banded", "chunked", "blocked")
# the implementations that fold the Q/K/V projection into their first GEMM (:func:`fold_pays`)
FOLDING_IMPLS = ("banded", "blocked")
ENV_VAR = "SASFORMER_SIMULATE"
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def triton_available() -> bool:
    return TRITON_AVAILABLE


def resolve_impl(impl: str | None, x: Tensor) -> str:
    """The implementation to use for input ``x``; raises ValueError on an unknown or unusable choice."""
    choice = impl if impl is not None else os.environ.get(ENV_VAR, "").strip().lower() or None
    kernel_dtype = x.dtype in KERNEL_DTYPES
    if choice is None:
        return default_impl(x)
    if choice not in IMPLS:
        source = "impl" if impl is not None else ENV_VAR
        raise ValueError(f"{source}={choice!r} is not a simulation implementation; choose one of {IMPLS}")
    if choice == "triton":
        interpreted = os.environ.get("TRITON_INTERPRET") == "1"
        if not triton_available():
            raise ValueError("simulation impl 'triton' needs the triton package; install it or choose 'matmul'")
        if not (x.is_cuda or interpreted):
            raise ValueError("simulation impl 'triton' needs CUDA tensors (or TRITON_INTERPRET=1); choose 'matmul'")
        if not kernel_dtype:
            raise ValueError(f"simulation impl 'triton' supports {KERNEL_DTYPES}, got {x.dtype}; choose 'matmul'")
    return choice


# below this many tokens per call (decoding, short prompts) building the banded matrices costs more
# than it saves: measured on an H200, batch-1 decode ran at 444 tok/s with ``naive`` against 301 with
# ``banded`` (benchmarks/results/h200/decode_run2.md, decode_run4.md)
BANDED_MIN_TOKENS = 2048


# off: on the H200 the fused kernels lost to ``banded`` at GPT-small (eager training 99.2k vs 103.6k
# tokens/s, compiled 119.9k vs 167.0k; layer fwd+bwd 11.87 vs 11.25 ms; sas_speed_run9.md). The rule
# is kept to one flag so that a GPU check or benchmark can flip it.
TRITON_DEFAULT = False
# fp32 inputs make the kernels take exact fp32 products (no tensor cores): never the automatic choice
TRITON_AUTO_DTYPES = (torch.bfloat16, torch.float16)


def default_impl(x: Tensor) -> str:
    """The automatic choice for ``x`` (B, T, H, D), from measurements (docs/performance.md).

    CUDA, at least ``BANDED_MIN_TOKENS`` tokens: ``banded`` (tensor-core-sized GEMMs; 1.7x the
    reference layer at GPT-small), or ``triton`` (reads the compact heads once, writes the simulated
    tensor once) when ``TRITON_DEFAULT`` is set, Triton is installed, the dtype is 16-bit and the call
    is not being compiled. ``impl="triton"`` or ``SASFORMER_SIMULATE=triton`` picks the kernels
    anywhere (they are custom ops, traced into a compiled graph). Fewer tokens (decoding, short
    prompts): ``naive``. CPU: ``naive`` (the fastest there: a tiny-preset SAS training step took 164 ms
    with naive, 181 ms banded, 227 ms matmul on 2 cores).
    """
    if not (x.is_cuda and x.shape[0] * x.shape[1] >= BANDED_MIN_TOKENS):
        return "naive"
    if TRITON_DEFAULT and triton_available() and x.dtype in TRITON_AUTO_DTYPES and not torch.compiler.is_compiling():
        return "triton"
    return "banded"


def _triton_ops():
    from sasformer.ops.simulate import fused

    return fused


# the fused kernels are custom ops: torch.compile traces them as opaque calls, in one graph
def _qk_triton(*args) -> Tensor:
    return _triton_ops().simulate_qk_triton(*args)


def _heads_triton(*args: Tensor) -> Tensor:
    return _triton_ops().simulate_heads_triton(*args)


def simulate_qk(
    x_BTHD: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
    w3: Tensor, b3: Tensor, w4: Tensor, b4: Tensor, impl: str | None = None,
    rope: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Head then feature simulation (queries, keys): (B, T, H, D) -> (B, T, H', D').

    ``rope``: optional (cos, sin) tables of shape (B or 1, T, D') applied to the result (RoPE after
    the simulation); the Triton path applies them inside the kernel.
    """
    which = resolve_impl(impl, x_BTHD)
    if which == "triton":
        return _qk_triton(x_BTHD, w1, b1, w2, b2, w3, b3, w4, b4, rope)
    if which == "naive":
        out = simulate_features_naive(simulate_heads_naive(x_BTHD, w1, b1, w2, b2), w3, b3, w4, b4)
        return out if rope is None else apply_rope(out, *rope)
    if which == "matmul":
        out = simulate_qk_matmul(x_BTHD, w1, b1, w2, b2, w3, b3, w4, b4)
    elif which == "chunked":
        out = simulate_qk_chunked(x_BTHD, w1, b1, w2, b2, w3, b3, w4, b4)
    elif which == "blocked":
        out = simulate_qk_blocked(x_BTHD, w1, b1, w2, b2, w3, b3, w4, b4)
    else:
        out = simulate_qk_banded(x_BTHD, w1, b1, w2, b2, w3, b3, w4, b4)
    return out if rope is None else rope_simulated(out, *rope)


def simulate_heads(
    x_BTHD: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, impl: str | None = None
) -> Tensor:
    """Head simulation (values, or the first half of Q/K): (B, T, H, D) -> (B, T, H', D)."""
    which = resolve_impl(impl, x_BTHD)
    if which == "triton":
        return _heads_triton(x_BTHD, w1, b1, w2, b2)
    if which == "matmul":
        return simulate_heads_matmul(x_BTHD, w1, b1, w2, b2)
    if which == "banded":
        return simulate_heads_banded(x_BTHD, w1, b1, w2, b2)
    if which == "chunked":
        return simulate_heads_chunked(x_BTHD, w1, b1, w2, b2)
    if which == "blocked":
        return simulate_heads_blocked(x_BTHD, w1, b1, w2, b2)
    return simulate_heads_naive(x_BTHD, w1, b1, w2, b2)


def _projected_probe(x_BTd: Tensor) -> Tensor:
    """An empty tensor with the (B, T) shape, device and dtype the projected heads would have, for the
    automatic choice (no memory)."""
    return x_BTd.new_empty((*x_BTd.shape[:2], 0), dtype=projection_dtype(x_BTd))


def fold_pays(weight: Tensor, w1: Tensor, tokens: int) -> bool:
    """Whether folding the projection ``weight`` (H*D, d) into the dense first convolution ``w1`` (H', H, k)
    takes fewer FLOPs for a call of ``tokens`` tokens. Per token the folded GEMM costs d*H'*D against
    d*H*D + (H*D)*(H'*D) unfolded; building W^T M1 costs d*(H*D)*(H'*D) a call, whatever the tokens (forward
    and backward scale alike). Pays for an MHA base from about H*D tokens (768 at GPT-small's queries); never
    for a base with few key/value heads (an MQA base's K and V: H = 1)."""
    H, HS = w1.shape[1], w1.shape[0]
    d, D = weight.shape[1], weight.shape[0] // H
    saved_per_token = d * H * D + H * D * HS * D - d * HS * D
    return saved_per_token > 0 and tokens * saved_per_token > d * H * D * HS * D


def folds_projection(impl: str | None, x_BTd: Tensor) -> bool:
    """Whether the implementation chosen for the heads projected from ``x_BTd`` (B, T, d) folds the projection
    into the first head convolution (:data:`FOLDING_IMPLS`: :mod:`.banded`, :mod:`.blocked`)."""
    return resolve_impl(impl, _projected_probe(x_BTd)) in FOLDING_IMPLS


def _fold_or_impl(impl: str | None, x_BTd: Tensor, weight: Tensor, w1: Tensor) -> tuple[str, bool]:
    """The implementation for the heads projected by ``weight``, and whether it folds that projection into
    the first convolution ``w1`` (it is one of :data:`FOLDING_IMPLS` and :func:`fold_pays`)."""
    which = resolve_impl(impl, _projected_probe(x_BTd))
    return which, which in FOLDING_IMPLS and fold_pays(weight, w1, x_BTd.shape[:-1].numel())


def _project(x_BTd: Tensor, weight: Tensor, w1: Tensor) -> Tensor:
    """The heads ``linear(x, weight)`` as (B, T, H, D), H = ``w1``'s input heads."""
    return F.linear(x_BTd, weight).unflatten(-1, (w1.shape[1], -1))


def simulate_qk_projected(
    x_BTd: Tensor, weight: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
    w3: Tensor, b3: Tensor, w4: Tensor, b4: Tensor, impl: str | None = None,
    rope: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """:func:`simulate_qk` of the heads ``linear(x, weight)`` (H*D features, H = ``w1``'s input heads): (B, T, d)
    -> (B, T, H', D'). ``banded`` and ``blocked`` fold the projection into their first GEMM where that takes
    fewer FLOPs (:func:`fold_pays`); otherwise the projection runs first."""
    which, folds = _fold_or_impl(impl, x_BTd, weight, w1)
    if not folds:
        return simulate_qk(_project(x_BTd, weight, w1), w1, b1, w2, b2, w3, b3, w4, b4, impl=which, rope=rope)
    folded = simulate_qk_blocked_folded if which == "blocked" else simulate_qk_banded_folded
    out = folded(x_BTd, weight, w1, b1, w2, b2, w3, b3, w4, b4)
    return out if rope is None else rope_simulated(out, *rope)


def simulate_heads_projected(
    x_BTd: Tensor, weight: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, impl: str | None = None
) -> Tensor:
    """:func:`simulate_heads` of the heads ``linear(x, weight)``: (B, T, d) -> (B, T, H', D); folded by
    ``banded`` and ``blocked`` where that pays (:func:`fold_pays`)."""
    which, folds = _fold_or_impl(impl, x_BTd, weight, w1)
    if not folds:
        return simulate_heads(_project(x_BTd, weight, w1), w1, b1, w2, b2, impl=which)
    folded = simulate_heads_blocked_folded if which == "blocked" else simulate_heads_banded_folded
    return folded(x_BTd, weight, w1, b1, w2, b2)


def simulate_features(
    y_BTHD: Tensor, w3: Tensor, b3: Tensor, w4: Tensor, b4: Tensor, impl: str | None = None
) -> Tensor:
    """Feature simulation alone: (B, T, H', D) -> (B, T, H', D'). Two GEMMs; no kernel of its own."""
    if resolve_impl(impl, y_BTHD) == "naive":
        return simulate_features_naive(y_BTHD, w3, b3, w4, b4)
    return simulate_features_matmul(y_BTHD, w3, b3, w4, b4)


__all__ = [
    "ENV_VAR",
    "FOLDING_IMPLS",
    "IMPLS",
    "PYTORCH_FAST_IMPLS",
    "TRITON_DEFAULT",
    "default_impl",
    "fold_pays",
    "folds_projection",
    "resolve_impl",
    "simulate_features",
    "simulate_features_naive",
    "simulate_heads",
    "simulate_heads_naive",
    "simulate_heads_projected",
    "simulate_qk",
    "simulate_qk_projected",
    "triton_available",
]
