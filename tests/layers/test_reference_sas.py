"""Parity with the SAS reference module's equations and state-dict layout.

``EquationsSAS`` below is written from the method spec with ``nn.Conv1d``/``nn.Linear`` modules and
the reference's parameter names; it applies the output projection to every group and then averages
(the reference's order), while sasformer averages first: the two must agree.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sasformer import load_reference_sas
from sasformer.layers.registry import build_attention
from sasformer.reference import load_reference_into
from tests.layers.helpers import context


class _Residual(nn.Module):
    def __init__(self, process: nn.Module) -> None:
        super().__init__()
        self.process = process

    def forward(self, x):
        return x + self.process(F.relu(x))


class EquationsSAS(nn.Module):
    def __init__(self, H, Hs, D, Ds, k):
        super().__init__()
        pad = (k - 1) // 2
        self.H, self.Hs, self.D, self.Ds = H, Hs, D, Ds

        def heads():
            return [nn.Conv1d(H, Hs, k, 1, pad), _Residual(nn.Conv1d(Hs, Hs, k, 1, pad))]

        def features():
            return [nn.Linear(D, Ds), _Residual(nn.Linear(Ds, Ds))]

        self.sas_q = nn.Sequential(*heads(), *features())
        self.sas_k = nn.Sequential(*heads(), *features())
        self.sas_v = nn.Sequential(*heads())
        self.output_dense = nn.Linear(H * D, H * D)

    def forward(self, q, k, v):
        B, T, H, D = q.shape
        q = self.sas_q(q.reshape(B * T, H, D)).view(B, T, self.Hs, self.Ds).transpose(1, 2)
        k = self.sas_k(k.reshape(B * T, H, D)).view(B, T, self.Hs, self.Ds).transpose(1, 2)
        v = self.sas_v(v.reshape(B * T, H, D)).view(B, T, self.Hs, D).transpose(1, 2)
        scores = (q @ k.transpose(-1, -2)) / self.Ds**0.5
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        o = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v  # (B, Hs, T, D)
        groups = o.transpose(1, 2).reshape(B, T, self.Hs // H, H * D)
        return self.output_dense(groups).mean(dim=2)


SHAPES = [  # (H, D, H', D', k, T)
    (4, 8, 8, 16, 3, 7),
    (3, 10, 9, 10, 1, 13),
    (2, 6, 4, 12, 5, 1),
    (4, 16, 12, 32, 3, 63),
    (1, 5, 3, 7, 5, 9),
]


@pytest.mark.parametrize("H,D,Hs,Ds,k,T", SHAPES)
def test_load_reference_sas_matches_equations(H, D, Hs, Ds, k, T):
    ref = EquationsSAS(H, Hs, D, Ds, k)
    ours = load_reference_sas(ref.state_dict(), n_heads=H, head_dim=D, n_sim_heads=Hs, sim_head_dim=Ds, kernel_size=k)
    q, k_, v = (torch.randn(2, T, H, D) for _ in range(3))
    with torch.no_grad():
        expected, got = ref(q, k_, v), ours(q, k_, v)
    assert got.shape == (2, T, H * D)
    assert (got - expected).abs().max().item() <= 1e-5


def test_reference_weights_load_into_full_layer():
    H, D, Hs, Ds, k = 4, 8, 8, 16, 3
    ref = EquationsSAS(H, Hs, D, Ds, k)
    layer = build_attention("sas", H * D, {"n_heads": H, "n_sim_heads": Hs, "sim_head_dim": Ds,
                                           "kernel_size": k, "rope": "none"})
    load_reference_into(layer, ref.state_dict())
    x = torch.randn(2, 9, H * D)
    with torch.no_grad():
        proj = [p(x).view(2, 9, H, D) for p in (layer.q_proj, layer.k_proj, layer.v_proj)]
        torch.testing.assert_close(layer(x, context(2, 9)), ref(*proj), rtol=1e-5, atol=1e-5)


def test_reference_shape_mismatch_is_a_clear_error():
    ref = EquationsSAS(4, 8, 8, 16, 3)
    with pytest.raises(ValueError, match="kernel_size"):
        load_reference_sas(ref.state_dict(), n_heads=4, head_dim=8, n_sim_heads=8, sim_head_dim=16, kernel_size=5)
    with pytest.raises(ValueError, match="missing"):
        sd = ref.state_dict()
        sd.pop("sas_v.0.bias")
        load_reference_sas(sd, n_heads=4, head_dim=8, n_sim_heads=8, sim_head_dim=16, kernel_size=3)
