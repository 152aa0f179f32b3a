"""The fused forward kernel with its weights prepared in advance: a few tokens simulated in one launch.

At decode time a step simulates N = B*T new tokens and is bound by kernel launches and weight bytes,
not FLOPs. :func:`~sasformer.ops.simulate.fused.simulate_fused_op` pads and converts the
convolutions' weights on every call (a dozen tiny kernels); here that is done once per weight
version (:func:`prepare_simulation`, the caller keeps the result and refreshes it in place when the
weights change) and each call is one launch of the forward kernel (:func:`simulate_prepared`),
reading the convolutions' own small weights: k*H*H' + k*H'^2 values instead of dense (H*D, H'*D)
matrices.

:func:`simulate_prepared` is a forward-only custom op with a fake implementation, so a compiled
decode step keeps one graph; it allocates only its fixed-size output and never syncs with the host,
so a CUDA graph can capture it. The reference it is held to is :mod:`.naive` (tests).

Two ways to use more of the GPU at a few tokens, chosen by the caller (the SAS decode path stacks by
default and splits on request, :func:`sasformer.layers.sas_decode.decode_launch`; the decode benchmark
times each as a row of its own): tensors of equal shapes (queries and keys on an MHA
base) prepared as one stacked set (:func:`stack_simulations`) are simulated in one launch, and
``split=True`` spreads each token's feature MLP and RoPE over programs by groups of simulated heads
and blocks of output columns (:func:`~sasformer.ops.simulate.fused.launch_forward`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sasformer.ops.simulate.fused import launch_forward, prepare_forward, rotation_matrix, stack_prepared


@dataclass
class PreparedSimulation:
    """Operands of one simulated tensor (queries, keys or values) for the forward kernel."""

    weights: list[Tensor]  # 4 (head simulation) or 8 (+ feature MLP) padded operands
    n_heads: int
    head_dim: int
    n_sim_heads: int
    sim_dim: int | None  # D' with the feature MLP, else None (the output keeps D)
    rot: Tensor | None  # RoPE operand when RoPE follows the feature MLP in the kernel
    n_stacked: int | None = None  # G tensors' operands stacked on a new first axis (stack_simulations)
    n_tail: int = 0  # of those, how many (the last) have no feature MLP

    def tensors(self) -> list[Tensor]:
        return self.weights + ([self.rot] if self.rot is not None else [])


@torch.no_grad()
def prepare_simulation(
    w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
    w3: Tensor | None = None, b3: Tensor | None = None, w4: Tensor | None = None, b4: Tensor | None = None,
    *, head_dim: int, rope: bool = False, dtype: torch.dtype | None = None,
) -> PreparedSimulation:
    """Pad and convert the weights of a head simulation (``w1`` (H', H, k) ... ``b2``) and optional
    feature MLP (``w3`` (D', D) ... ``b4``) for :func:`simulate_prepared`, in ``dtype`` (default:
    ``w1``'s). ``rope``: the kernel will rotate its output (RoPE after the feature MLP)."""
    if rope and w3 is None:
        raise ValueError("rope=True needs the feature MLP (w3, b3, w4, b4): RoPE is applied after it")
    dtype = dtype or w1.dtype
    weights = prepare_forward(w1, b1, w2, b2, w3, b3, w4, b4, head_dim, dtype)
    sim_dim = w3.shape[0] if w3 is not None else None
    rot = rotation_matrix(sim_dim, dtype, w1.device) if rope else None
    return PreparedSimulation(weights, w1.shape[1], head_dim, w1.shape[0], sim_dim, rot)


def stack_simulations(prepared: list[PreparedSimulation]) -> PreparedSimulation:
    """One set of operands for tensors of equal head shapes (queries, keys and values on an MHA base),
    simulated together by one launch of :func:`simulate_prepared` on input (N, G, H, D). Those with the
    feature MLP (same D' and RoPE choice) come first; those without it (values) may follow. A new
    copy: refresh it from new weights, not through the parts."""
    first = prepared[0]
    heads = (first.n_heads, first.head_dim, first.n_sim_heads)
    features = [p for p in prepared if p.sim_dim is not None]
    described = [(p.n_heads, p.head_dim, p.n_sim_heads, p.sim_dim, p.rot is not None) for p in prepared]
    if (
        any(p.n_stacked is not None for p in prepared)
        or any(d[:3] != heads for d in described)
        or len({d[3:] for d in described[: len(features)]}) > 1
        or any(p.sim_dim is None for p in prepared[: len(features)])
    ):
        raise ValueError("stack_simulations needs unstacked operands of equal head shapes, those with the feature "
                         f"MLP first and with the same D' and rope choice; got (H, D, H', D', rope) = {described}")
    rot = features[0].rot.clone() if features and features[0].rot is not None else None
    sim_dim = features[0].sim_dim if features else None
    weights = stack_prepared([p.weights for p in prepared])
    return PreparedSimulation(weights, *heads, sim_dim, rot, len(prepared), len(prepared) - len(features))


def _launch_prepared(x, weights, rot, cos, sin, n_sim_heads, sim_dim, T, split):
    return launch_forward(x, weights, n_sim_heads, sim_dim, T, rot, cos, sin, split)


@torch.library.custom_op("sasformer::simulate_prepared", mutates_args=())
def simulate_prepared_op(x: Tensor, weights: list[Tensor], rot: Tensor | None, cos: Tensor | None,
                         sin: Tensor | None, n_sim_heads: int, sim_dim: int | None, T: int,
                         split: bool = False) -> Tensor:
    """Forward kernel on prepared operands: x (N, H, D) -> (N, H', D') with the feature MLP, else (N, H', D);
    stacked x (N, G, H, D) -> (G, N, H', D')."""
    return _launch_prepared(x, weights, rot, cos, sin, n_sim_heads, sim_dim, T, split)


@simulate_prepared_op.register_fake
def _(x, weights, rot, cos, sin, n_sim_heads, sim_dim, T, split=False):
    stacked = (x.shape[1],) if x.dim() == 4 else ()
    return x.new_empty(*stacked, x.shape[0], n_sim_heads, sim_dim if sim_dim is not None else x.shape[-1])


@torch.library.custom_op("sasformer::simulate_prepared_pair", mutates_args=())
def simulate_prepared_pair_op(x: Tensor, weights: list[Tensor], rot: Tensor | None, cos: Tensor | None,
                              sin: Tensor | None, n_sim_heads: int, sim_dim: int, T: int,
                              split: bool = False) -> tuple[Tensor, Tensor]:
    """Forward kernel on stacked operands whose first F tensors have the feature MLP: x (N, G, H, D) ->
    (F, N, H', D'), (G - F, N, H', D)."""
    return _launch_prepared(x, weights, rot, cos, sin, n_sim_heads, sim_dim, T, split)


@simulate_prepared_pair_op.register_fake
def _(x, weights, rot, cos, sin, n_sim_heads, sim_dim, T, split=False):
    N, G = x.shape[:2]
    F = weights[4].shape[0]
    return x.new_empty(F, N, n_sim_heads, sim_dim), x.new_empty(G - F, N, n_sim_heads, x.shape[-1])


def simulate_prepared(x_NHD: Tensor, prepared: PreparedSimulation, T: int = 1,
                      rope: tuple[Tensor, Tensor] | None = None, split: bool = False
                      ) -> Tensor | tuple[Tensor, Tensor]:
    """Simulate ``x`` (N, H, D) with prepared operands in one kernel launch: (N, H', D') with the
    feature MLP, else (N, H', D). ``rope``: (cos, sin) tables (B or 1, T, D') with N = B*T, applied
    after the feature MLP (needs ``prepare_simulation(..., rope=True)``). With operands of G stacked
    tensors (:func:`stack_simulations`) ``x`` is (N, G, H, D) and the result (G, N, H', D'), or,
    when the last G - F of them have no feature MLP, the pair (F, N, H', D'), (G - F, N, H', D).
    ``split``: more programs per token (for a few tokens; the result is the same).

    Forward only: no gradient flows through it (use ``simulate_qk(..., impl="triton")`` to train).
    Each token's H x D block must be contiguous; tokens may be any stride apart."""
    if torch.is_grad_enabled() and (x_NHD.requires_grad or any(t.requires_grad for t in prepared.tensors())):
        raise ValueError("simulate_prepared is forward only: call it under torch.no_grad() or "
                         "torch.inference_mode(), or train with simulate_qk/simulate_heads(impl='triton')")
    if rope is not None and prepared.rot is None:
        raise ValueError("rope tables given, but the weights were prepared without rope=True")
    stacked = (prepared.n_stacked,) if prepared.n_stacked is not None else ()
    if tuple(x_NHD.shape[1:]) != (*stacked, prepared.n_heads, prepared.head_dim):
        g = f"G={prepared.n_stacked}, " if stacked else ""
        raise ValueError(f"x must be (N, {g}H={prepared.n_heads}, D={prepared.head_dim}) for these prepared "
                         f"weights, got shape {tuple(x_NHD.shape)}")
    cos, sin = rope if rope is not None else (None, None)
    op = simulate_prepared_pair_op if 0 < prepared.n_tail < prepared.n_stacked else simulate_prepared_op
    return op(x_NHD, prepared.weights, prepared.rot if rope is not None else None, cos, sin,
              prepared.n_sim_heads, prepared.sim_dim, T, split)


__all__ = ["PreparedSimulation", "prepare_simulation", "simulate_prepared", "simulate_prepared_op",
           "simulate_prepared_pair_op", "stack_simulations"]
