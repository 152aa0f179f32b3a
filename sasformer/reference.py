"""Loading weights of the SAS authors' reference module.

The reference module (class ``SAS(ori_head, target_head, ori_feature, target_feature, kernel_size)``)
maps per-head queries, keys and values (B, T, H, D) to (B, T, H*D): causal attention over simulated
heads, no positional encoding, PEAA through ``output_dense``. Its state dict names:

    sas_q.0.*          Conv1d H -> H'         -> heads_q.w1 / b1
    sas_q.1.process.*  Conv1d H' -> H'        -> heads_q.w2 / b2      (residual conv block)
    sas_q.2.*          Linear D -> D'         -> features_q.w3 / b3
    sas_q.3.process.*  Linear D' -> D'        -> features_q.w4 / b4   (residual MLP)
    sas_k.*            the same for keys      -> heads_k, features_k
    sas_v.0.*, sas_v.1.process.*              -> heads_v
    output_dense.*     Linear d -> d          -> o_proj
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from sasformer.layers.sas import SASArgs, SimulatedAttention
from sasformer.ops.attention import attend

_PIECES = {
    "0.weight": "w1", "0.bias": "b1", "1.process.weight": "w2", "1.process.bias": "b2",
    "2.weight": "w3", "2.bias": "b3", "3.process.weight": "w4", "3.process.bias": "b4",
}


def reference_key_map() -> dict[str, str]:
    """Reference state-dict key -> ``SimulatedAttention`` parameter name."""
    mapping = {"output_dense.weight": "o_proj.weight", "output_dense.bias": "o_proj.bias"}
    for stream in ("q", "k", "v"):
        for ref_suffix, ours in _PIECES.items():
            if stream == "v" and ours in ("w3", "b3", "w4", "b4"):
                continue  # values get head simulation only
            block = f"heads_{stream}" if ours in ("w1", "b1", "w2", "b2") else f"features_{stream}"
            mapping[f"sas_{stream}.{ref_suffix}"] = f"{block}.{ours}"
    return mapping


def load_reference_into(layer: SimulatedAttention, state_dict: Mapping[str, Tensor]) -> None:
    """Copy a reference state dict into a full ``sas`` layer (q/k/v projections are left as they are).

    The layer must have the reference's structure: MHA base, ``simulate_v=True``, ``peaa="mean"``.
    """
    a = layer.args
    if a.n_kv_heads != a.n_heads or not a.simulate_v or a.peaa != "mean":
        raise ValueError("the reference module has an MHA base, simulated values and PEAA mean; "
                         f"got n_kv_heads={a.n_kv_heads}, simulate_v={a.simulate_v}, peaa={a.peaa!r}")
    mapping = reference_key_map()
    missing = sorted(set(mapping) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(mapping))
    if missing or unexpected:
        raise ValueError(f"not a reference SAS state dict: missing {missing}, unexpected {unexpected}")
    params = dict(layer.named_parameters())
    with torch.no_grad():
        for ref_key, ours in mapping.items():
            src, dst = state_dict[ref_key], params[ours]
            if tuple(src.shape) != tuple(dst.shape):
                raise ValueError(
                    f"{ref_key} has shape {tuple(src.shape)} but the layer expects {tuple(dst.shape)} "
                    "(check n_heads, head_dim, n_sim_heads, sim_head_dim, kernel_size)"
                )
            dst.copy_(src)


class ReferenceSAS(nn.Module):
    """SAS core on given (q, k, v), each (B, T, H, D) -> (B, T, H*D): causal, no RoPE, PEAA mean."""

    def __init__(self, n_heads: int, head_dim: int, n_sim_heads: int, sim_head_dim: int, kernel_size: int) -> None:
        super().__init__()
        args = SASArgs(n_heads=n_heads, n_sim_heads=n_sim_heads, sim_head_dim=sim_head_dim,
                       kernel_size=kernel_size, rope="none")
        self.layer = SimulatedAttention(n_heads * head_dim, args)
        # only the simulation blocks and the output projection are used here
        self.layer.q_proj = self.layer.k_proj = self.layer.v_proj = None

    def forward(self, q_BTHD: Tensor, k_BTHD: Tensor, v_BTHD: Tensor) -> Tensor:
        layer = self.layer
        if q_BTHD.shape[2:] != (layer.n_heads, layer.head_dim):
            raise ValueError(f"q must be (B, T, {layer.n_heads}, {layer.head_dim}), got {tuple(q_BTHD.shape)}")
        q = layer.simulate_q(q_BTHD, rotary=None)
        k, v = layer.simulate_kv(k_BTHD, v_BTHD, rotary=None)
        o = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None,
                   scale=1.0 / math.sqrt(layer.sim_head_dim))
        return layer.aggregate(o.transpose(1, 2))


def load_reference_sas(
    state_dict: Mapping[str, Tensor],
    n_heads: int,
    head_dim: int,
    n_sim_heads: int,
    sim_head_dim: int,
    kernel_size: int,
) -> ReferenceSAS:
    """A module computing what the reference ``SAS`` module computes with ``state_dict``."""
    module = ReferenceSAS(n_heads, head_dim, n_sim_heads, sim_head_dim, kernel_size)
    load_reference_into(module.layer, state_dict)
    return module
