"""Scaled dot-product attention for every variant, through one function.

The caller passes heads-first tensors; query/key size may differ from value size (SAS, MLA) and the
key/value head count may divide the query head count (GQA/MQA, possibly after simulation).

Backends. PyTorch's default SDPA choice has no flash kernel for query/key size != value size and
falls back to the memory-efficient kernel, which is about 3x slower than cuDNN's for SAS shapes
(q/k 128, v 64). So on CUDA, causal attention with unequal sizes uses cuDNN, or, where cuDNN
attention is unavailable, flash with the values zero-padded to the query size (the padded output
columns are dropped). Everything else, and every CPU call, takes PyTorch's default. The choice can
be forced with the ``backend`` argument or the ``SASFORMER_ATTENTION`` environment variable (one of
:data:`BACKENDS`; ``flash`` pins PyTorch's flash kernel, which needs equal sizes and, on CUDA, no
explicit mask); ``benchmarks/sas_speed.py`` times the automatic choice against cuDNN, padded flash,
memory-efficient and math.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = ("auto", "default", "cudnn", "flash", "flash_pad", "efficient", "math")
ENV_VAR = "SASFORMER_ATTENTION"
_PINNED = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
           "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
# set after cuDNN attention refuses an input once, so the fallback costs one exception, not one per call
_cudnn_failed = False
# read once: Dynamo cannot trace torch.backends.cudnn.is_available() (it breaks the graph there, and on the
# H200 a compiled SAS model broken there got wrong gradients through cuDNN attention)
_HAS_CUDNN = torch.backends.cudnn.is_available()


def resolve_backend(backend: str | None, q_BHTD: Tensor, v_BHSE: Tensor, causal_no_mask: bool) -> str:
    """The SDPA backend ``attend`` uses for these inputs (never ``auto``)."""
    choice = backend if backend is not None else os.environ.get(ENV_VAR, "").strip().lower() or "auto"
    if choice not in BACKENDS:
        source = "backend" if backend is not None else ENV_VAR
        raise ValueError(f"{source}={choice!r} is not an attention backend; choose one of {BACKENDS}")
    if choice != "auto":
        return choice
    unequal = q_BHTD.shape[-1] != v_BHSE.shape[-1]
    half = q_BHTD.dtype in (torch.float16, torch.bfloat16)
    fits_cudnn = q_BHTD.is_cuda and unequal and half and causal_no_mask
    if fits_cudnn and not _cudnn_failed and _HAS_CUDNN and max(q_BHTD.shape[-1], v_BHSE.shape[-1]) <= 128:
        # also while compiling: the compiled model's gradients through cuDNN over unpadded values passed
        # benchmarks/train_check.py on the H200 (torch 2.11): pinned (run 16, bit for bit those of the padded
        # call) and chosen here (run 17, once this choice traced without a graph break)
        return "cudnn"
    if unequal and v_BHSE.shape[-1] < q_BHTD.shape[-1] and torch.compiler.is_compiling() and torch.is_grad_enabled():
        # Inductor on CPU (torch 2.13, bf16) got the key gradient of SAS's attention (value size <
        # query/key size, keys from the simulation with RoPE) wrong: NaN
        # (tests/ops/test_attention_compiled.py). Plain projections or MLA with the same sizes did not
        # show it, so the trigger is narrower than the sizes; with V zero-padded to the query size the
        # graph holds equal-size attention only, and the fault is gone. Kept wherever cuDNN does not take
        # the call (CPU, fp32, masks), since only the cuDNN case was checked without it on a GPU. Without
        # gradients (a compiled decode step) the padding would copy the whole value cache every step, so it
        # is skipped.
        return "flash_pad"
    if not fits_cudnn:
        return "default"
    return "flash_pad" if v_BHSE.shape[-1] < q_BHTD.shape[-1] <= 256 else "default"


def sdpa(q: Tensor, k: Tensor, v: Tensor, backend: str, strict: bool = True, **kwargs) -> Tensor:
    """``F.scaled_dot_product_attention`` on a named backend (see :data:`BACKENDS`).

    ``strict=False`` (the automatic choice) lets a refused cuDNN call fall back to padded flash.
    """
    global _cudnn_failed
    if backend == "flash" and v.shape[-1] != q.shape[-1]:
        way_out = ("flash_pad pads the values to the query size" if v.shape[-1] < q.shape[-1]
                   else "default lets PyTorch choose a kernel that takes them")
        raise ValueError(f"the flash backend needs equal query and value sizes, not {q.shape[-1]} and "
                         f"{v.shape[-1]}; {way_out}")
    if backend == "flash_pad" and v.shape[-1] < q.shape[-1]:
        E = v.shape[-1]
        out = F.scaled_dot_product_attention(q, k, F.pad(v, (0, q.shape[-1] - E)), **kwargs)
        return out[..., :E]
    if backend in _PINNED:
        try:
            with sdpa_kernel(_PINNED[backend]):
                return F.scaled_dot_product_attention(q, k, v, **kwargs)
        except RuntimeError as err:
            if strict or backend != "cudnn":
                raise
            _cudnn_failed = True
            warnings.warn(f"cuDNN attention unavailable ({err}); using flash with padded values", stacklevel=2)
            return sdpa(q, k, v, "flash_pad", strict=True, **kwargs)
    return F.scaled_dot_product_attention(q, k, v, **kwargs)


def attend(
    q_BHTD: Tensor,
    k_BHSD: Tensor,
    v_BHSE: Tensor,
    mask_BTS: Tensor | None,
    scale: float | None = None,
    backend: str | None = None,
) -> Tensor:
    """Attention of T queries over S keys; returns (B, H, T, E).

    ``mask_BTS`` is a boolean (B, 1, T, S) mask (True = may attend) or None, which means plain causal
    attention with queries and keys aligned at the end (T == S: ordinary causal; T < S: the last T
    positions of S, as in cached decoding without padding). ``backend``: see :data:`BACKENDS`
    (None: the ``SASFORMER_ATTENTION`` variable, else ``auto``).
    """
    n_q, n_kv = q_BHTD.shape[1], k_BHSD.shape[1]
    T, S = q_BHTD.shape[2], k_BHSD.shape[2]
    if n_q != n_kv:
        # grouped heads: query head i reads key/value head i // (n_q // n_kv)
        rep = n_q // n_kv
        if T < S:
            return _attend_folded(q_BHTD, k_BHSD, v_BHSE, mask_BTS, scale, backend, rep)
        k_BHSD = k_BHSD.repeat_interleave(rep, dim=1)
        v_BHSE = v_BHSE.repeat_interleave(rep, dim=1)
    which = resolve_backend(backend, q_BHTD, v_BHSE, causal_no_mask=mask_BTS is None and T == S)
    strict = _forced(backend)
    if mask_BTS is None:
        if T == S:
            return sdpa(q_BHTD, k_BHSD, v_BHSE, which, strict, is_causal=True, scale=scale)
        if T == 1:
            return sdpa(q_BHTD, k_BHSD, v_BHSE, which, strict, scale=scale)
        mask_BTS = causal_mask(T, S, q_BHTD.device)
    return sdpa(q_BHTD, k_BHSD, v_BHSE, which, strict, attn_mask=mask_BTS, scale=scale)


def _forced(backend: str | None) -> bool:
    """Whether a backend was named (argument or environment): then a refused backend is an error."""
    return (backend or os.environ.get(ENV_VAR, "").strip().lower() or "auto") != "auto"


def _attend_folded(
    q_BHTD: Tensor, k_BGSD: Tensor, v_BGSE: Tensor, mask_BTS: Tensor | None, scale: float | None,
    backend: str | None, rep: int,
) -> Tensor:
    """Grouped-head attention with a KV cache (T < S) without copying keys/values per query head.

    The ``rep`` query heads of one group become ``rep * T`` query rows of one key/value head, with
    the mask repeated to match, so each cached key/value is read once per group instead of copied.
    """
    B, H, T, D = q_BHTD.shape
    G, S = k_BGSD.shape[1], k_BGSD.shape[2]
    q = q_BHTD.reshape(B, G, rep * T, D)
    if mask_BTS is None and T > 1:
        mask_BTS = causal_mask(T, S, q_BHTD.device)
    # None: one query row per head with no padding, which sees every cached key
    mask = None if mask_BTS is None else mask_BTS.repeat(1, 1, rep, 1)
    which = resolve_backend(backend, q, v_BGSE, causal_no_mask=False)
    strict = _forced(backend)
    o = sdpa(q, k_BGSD, v_BGSE, which, strict, attn_mask=mask, scale=scale)
    return o.reshape(B, H, T, -1)


def _positions(T: int, S: int, device: torch.device) -> tuple[Tensor, Tensor]:
    q_pos = torch.arange(S - T, S, device=device).view(1, 1, T, 1)
    k_pos = torch.arange(S, device=device).view(1, 1, 1, S)
    return q_pos, k_pos


def causal_mask(T: int, S: int, device: torch.device) -> Tensor:
    """(1, 1, T, S) boolean mask: query t (at absolute position S - T + t) sees keys 0 .. S - T + t."""
    q_pos, k_pos = _positions(T, S, device)
    return k_pos <= q_pos


def padded_causal_mask(key_padding_BS: Tensor, T: int) -> Tensor:
    """Causal mask for the last T of S positions, combined with a (B, S) key mask (1 = real token).

    A query row whose keys are all masked (a padding query) may see itself, so softmax has no empty
    row and produces no NaN; the output at padding positions is never used.
    """
    B, S = key_padding_BS.shape
    q_pos, k_pos = _positions(T, S, key_padding_BS.device)
    mask = (k_pos <= q_pos) & key_padding_BS.bool().view(B, 1, 1, S)
    empty_row = ~mask.any(dim=-1, keepdim=True)
    return mask | (empty_row & (k_pos == q_pos))
