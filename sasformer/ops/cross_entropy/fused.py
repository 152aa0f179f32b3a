"""Chunked LM head + cross-entropy with the Triton row kernel: each chunk's logits are written once,
read once for the loss and overwritten once by their gradient.

Per chunk of C tokens: one GEMM writes the logits (C, V) into a reused buffer, the kernel
(:mod:`.kernel`) turns them in place into ``(softmax - onehot) / n_valid`` while writing the row
losses, and two GEMMs take that gradient to the hidden states (C, d) and to the head weight
(V, d, accumulated in fp32 over chunks, inside the GEMM on CUDA). The mean over valid tokens is part of
the gradient, so the autograd backward only multiplies the two saved gradients by ``grad_output``: no logits are
recomputed or read again.

The forward is one ``torch.library`` custom op, so ``torch.compile`` keeps the model and the loss in
one graph and calls the op (cuBLAS GEMMs and the kernel) as it is. The reference is
:func:`sasformer.ops.cross_entropy.naive.linear_cross_entropy_naive`; the PyTorch chunked path
(:mod:`.chunked`) computes the same function without Triton.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sasformer.ops.cross_entropy.chunked import DEFAULT_CHUNK_SIZE, prepare_call

# addmm with a wider output than its inputs (torch >= 2.8 on CUDA); checked on the GPU by benchmarks/loss_speed.py
_GEMM_ACCUMULATES_IN_FP32 = hasattr(torch.ops.aten.addmm, "dtype_out") and torch.version.hip is None


@torch.library.custom_op("sasformer::linear_cross_entropy_fused", mutates_args=())
def linear_cross_entropy_fused_op(
    h_ND: Tensor, w_VD: Tensor, targets_N: Tensor, ignore_index: int, chunk_size: int, with_grad: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Mean loss (fp32) and, with ``with_grad``, its gradients w.r.t. ``h`` (h's dtype) and ``w`` (fp32).

    ``h`` and ``w`` share one dtype, the dtype of the GEMMs and the logits. Without ``with_grad`` the
    two gradients are empty.
    """
    from sasformer.ops.cross_entropy.kernel import cross_entropy_rows_

    N, V = h_ND.shape[0], w_VD.shape[0]
    with torch.autocast(h_ND.device.type, enabled=False):
        h_ND, w_VD = h_ND.contiguous(), w_VD.contiguous()
        n_valid = (targets_N != ignore_index).sum().float()
        scale = 1.0 / n_valid  # inf with no valid target: every row is ignored then, and its scale is 0
        loss_N = torch.empty(N, dtype=torch.float32, device=h_ND.device)
        logits = torch.empty(min(chunk_size, N), V, dtype=h_ND.dtype, device=h_ND.device)
        grad_h = torch.empty_like(h_ND) if with_grad else h_ND.new_empty(0)
        grad_w = torch.zeros(w_VD.shape, dtype=torch.float32, device=w_VD.device) if with_grad \
            else w_VD.new_empty(0, dtype=torch.float32)
        for start in range(0, N, chunk_size):
            stop = min(start + chunk_size, N)
            h_CD, logits_CV = h_ND[start:stop], logits[:stop - start]
            torch.mm(h_CD, w_VD.T, out=logits_CV)
            cross_entropy_rows_(logits_CV, targets_N[start:stop], loss_N[start:stop], scale, ignore_index, with_grad)
            if with_grad:
                torch.mm(logits_CV, w_VD, out=grad_h[start:stop])
                accumulate_weight_grad_(grad_w, logits_CV, h_CD)
        # like F.cross_entropy, no valid target gives 0 / 0 = NaN
        loss = loss_N.sum() / n_valid
    return loss, grad_h, grad_w


def accumulate_weight_grad_(grad_w_VD: Tensor, grad_logits_CV: Tensor, h_CD: Tensor) -> None:
    """``grad_w += grad_logits.T @ h`` into the fp32 ``grad_w``, in one GEMM where the device allows it.

    On CUDA the GEMM reads ``grad_w`` and adds its fp32 accumulator to it in the epilogue (``out_dtype``,
    ``beta = 1``): no bf16 product is written, read back and rounded on the way. Elsewhere (no such
    GEMM on the CPU, nor before torch 2.8; ROCm is left out) the product is formed in the inputs' dtype and
    then added.
    """
    if grad_w_VD.is_cuda and _GEMM_ACCUMULATES_IN_FP32:
        torch.addmm(grad_w_VD, grad_logits_CV.T, h_CD, out_dtype=torch.float32, out=grad_w_VD)
    else:
        grad_w_VD += torch.mm(grad_logits_CV.T, h_CD)


@linear_cross_entropy_fused_op.register_fake
def _(h_ND, w_VD, targets_N, ignore_index, chunk_size, with_grad):
    loss = h_ND.new_empty((), dtype=torch.float32)
    if not with_grad:
        return loss, h_ND.new_empty(0), w_VD.new_empty(0, dtype=torch.float32)
    return loss, torch.empty_like(h_ND), w_VD.new_empty(w_VD.shape, dtype=torch.float32)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_ND: Tensor, weight_VD: Tensor, targets_N: Tensor, ignore_index: int, chunk_size: int,
                compute_dtype: torch.dtype, with_grad: bool) -> Tensor:
        with torch.autocast(h_ND.device.type, enabled=False):
            loss, grad_h, grad_w = linear_cross_entropy_fused_op(
                h_ND.to(compute_dtype), weight_VD.to(compute_dtype), targets_N, ignore_index, chunk_size, with_grad)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (h_ND.dtype, weight_VD.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        g = grad_loss.float()
        return (grad_h.float() * g).to(h_dtype), (grad_w * g).to(w_dtype), None, None, None, None, None


def linear_cross_entropy_fused(
    h_ND: Tensor,
    weight_VD: Tensor,
    targets_N: Tensor,
    ignore_index: int = -100,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    compute_dtype: torch.dtype | None = None,
) -> Tensor:
    """Mean cross-entropy of ``h @ weight.T`` against ``targets`` with the Triton row kernel.

    Same contract as :func:`sasformer.ops.cross_entropy.chunked.linear_cross_entropy_chunked`
    (``compute_dtype`` None: the autocast dtype, else ``h``'s); needs Triton and CUDA tensors, or
    ``TRITON_INTERPRET=1``. Gradients flow to ``h`` and ``weight``.
    """
    compute_dtype, with_grad = prepare_call(h_ND, weight_VD, targets_N, chunk_size, compute_dtype)
    return _FusedLinearCrossEntropy.apply(h_ND, weight_VD, targets_N, ignore_index, chunk_size, compute_dtype,
                                          with_grad)
