"""Fused LM head + cross-entropy over chunks of tokens, never holding the full (N, V) logits.

For a chunk of C tokens the forward computes the logits in the compute dtype, the log-sum-exp
and the loss in fp32, and at once the gradient of the summed loss with respect to the logits,
``softmax - onehot`` (zero on ignored rows), which it multiplies into the gradients of the hidden
states (C, d) and of the head weight (V, d, accumulated in fp32). Backward only scales the saved
gradients by ``grad_output / n_valid``. Peak extra memory is a few (C, V) chunks instead of the
(N, V) logits, their fp32 copy and their gradient, and the logits are read back from memory
once instead of several times.

The loop has a static trip count and no in-place updates, so ``torch.compile`` unrolls it into
the surrounding graph and fuses each chunk's softmax into one or two kernels.
"""

from __future__ import annotations

import torch
from torch import Tensor

# 8192 tokens: a chunk's (C, d) hidden-state gradient at d=768 has a few hundred 128x128 output tiles,
# several waves on an H100/H200, while its bf16 logits take 0.8 GB at vocabulary 50k
DEFAULT_CHUNK_SIZE = 8192


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_ND: Tensor, weight_VD: Tensor, targets_N: Tensor, ignore_index: int, chunk_size: int,
                compute_dtype: torch.dtype, with_grad: bool) -> Tensor:
        with torch.autocast(h_ND.device.type, enabled=False):
            h_c = h_ND.to(compute_dtype)
            w_c = weight_VD.to(compute_dtype)
            # fp32 softmax for half-precision logits, the logits' own precision above that
            acc = torch.promote_types(compute_dtype, torch.float32)
            valid_N = targets_N != ignore_index
            vocab_V = torch.arange(w_c.shape[0], device=h_ND.device)
            loss_sum = h_ND.new_zeros((), dtype=acc)
            grad_w: Tensor | None = None
            grad_h_chunks = []
            for start in range(0, h_ND.shape[0], chunk_size):
                h_CD = h_c[start:start + chunk_size]
                valid_C = valid_N[start:start + chunk_size]
                target_C = torch.where(valid_C, targets_N[start:start + chunk_size], 0)
                logits_CV = (h_CD @ w_c.T).to(acc)
                lse_C = torch.logsumexp(logits_CV, dim=-1)
                target_logit_C = logits_CV.gather(1, target_C.unsqueeze(1)).squeeze(1)
                loss_sum = loss_sum + torch.where(valid_C, lse_C - target_logit_C, 0.0).sum()
                if not with_grad:  # validation: the loss only, one matmul per chunk
                    continue
                # d(sum of losses)/d(logits): softmax minus the one-hot target, nothing for ignored rows
                onehot_CV = vocab_V == target_C.unsqueeze(1)
                grad_CV = torch.exp(logits_CV - lse_C.unsqueeze(1)) - onehot_CV.to(acc)
                grad_CV = torch.where(valid_C.unsqueeze(1), grad_CV, 0.0).to(compute_dtype)
                grad_h_chunks.append(grad_CV @ w_c)
                grad_w_chunk = (grad_CV.T @ h_CD).to(acc)
                grad_w = grad_w_chunk if grad_w is None else grad_w + grad_w_chunk
            # like F.cross_entropy, no valid target gives 0 / 0 = NaN
            n_valid = valid_N.sum().to(acc)
        if with_grad:
            grad_h = torch.cat(grad_h_chunks) if len(grad_h_chunks) > 1 else grad_h_chunks[0]
            ctx.save_for_backward(grad_h, grad_w, n_valid)
        ctx.dtypes = (h_ND.dtype, weight_VD.dtype)
        return loss_sum / n_valid

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        grad_h, grad_w, n_valid = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        scale = grad_loss.to(n_valid.dtype) / n_valid
        return (grad_h.to(scale.dtype) * scale).to(h_dtype), (grad_w * scale).to(w_dtype), None, None, None, None, None


def linear_cross_entropy_chunked(
    h_ND: Tensor,
    weight_VD: Tensor,
    targets_N: Tensor,
    ignore_index: int = -100,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    compute_dtype: torch.dtype | None = None,
) -> Tensor:
    """Mean cross-entropy of ``h @ weight.T`` against ``targets`` without materialising the logits.

    ``compute_dtype`` is the dtype of the matrix multiplies (None: the autocast dtype when autocast
    is on, else ``h``'s dtype); the softmax is always fp32. Gradients flow to ``h`` and ``weight``.
    """
    compute_dtype, with_grad = prepare_call(h_ND, weight_VD, targets_N, chunk_size, compute_dtype)
    return _LinearCrossEntropy.apply(h_ND, weight_VD, targets_N, ignore_index, chunk_size, compute_dtype, with_grad)


def prepare_call(h_ND: Tensor, weight_VD: Tensor, targets_N: Tensor, chunk_size: int,
                 compute_dtype: torch.dtype | None) -> tuple[torch.dtype, bool]:
    """What every LM-head cross-entropy does first: check the inputs, then pick the matmul dtype and
    whether gradients are needed (computed in the forward when they are)."""
    check_inputs(h_ND, weight_VD, targets_N, chunk_size)
    with_grad = torch.is_grad_enabled() and (h_ND.requires_grad or weight_VD.requires_grad)
    return compute_dtype or default_compute_dtype(h_ND), with_grad


def check_inputs(h_ND: Tensor, weight_VD: Tensor, targets_N: Tensor, chunk_size: int) -> None:
    """ValueError naming the mismatch for inputs no LM-head cross-entropy can take."""
    if h_ND.dim() != 2 or weight_VD.dim() != 2 or targets_N.dim() != 1:
        raise ValueError(f"expected h (N, d), weight (V, d), targets (N,); got {tuple(h_ND.shape)}, "
                         f"{tuple(weight_VD.shape)}, {tuple(targets_N.shape)}")
    if h_ND.shape[0] != targets_N.shape[0] or h_ND.shape[1] != weight_VD.shape[1]:
        raise ValueError(f"shapes do not match: h {tuple(h_ND.shape)}, weight {tuple(weight_VD.shape)}, "
                         f"targets {tuple(targets_N.shape)}")
    if h_ND.shape[0] == 0:
        raise ValueError("linear_cross_entropy needs at least one token")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")


def default_compute_dtype(h_ND: Tensor) -> torch.dtype:
    """The autocast dtype when autocast is on for ``h``'s device, else ``h``'s dtype."""
    device_type = h_ND.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else h_ND.dtype
