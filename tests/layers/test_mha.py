"""MHA / GQA / MQA: the name asked for is the attention built."""

from __future__ import annotations

import pytest

from sasformer.layers.mha import MHAArgs
from sasformer.layers.registry import build_attention

D = 48


@pytest.mark.parametrize("args", [{"n_heads": 4, "n_kv_heads": 2}, {"n_kv_heads": 3}])  # n_heads: default 12
def test_mha_refuses_fewer_kv_heads_and_points_at_gqa(args):
    with pytest.raises(ValueError, match=r"attention='mha' needs n_kv_heads unset or equal to n_heads=.*use 'gqa'"):
        build_attention("mha", D, dict(args))


def test_mha_accepts_n_kv_heads_spelled_out():
    """Saved configs and results carry the resolved ``n_kv_heads`` (= n_heads): they must keep loading."""
    spelled = build_attention("mha", D, {"n_heads": 4, "n_kv_heads": 4})
    plain = build_attention("mha", D, {"n_heads": 4})
    assert spelled.n_kv_heads == plain.n_kv_heads == 4
    assert {k: v.shape for k, v in spelled.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
    assert build_attention("mha", D, plain.args.to_dict()).n_kv_heads == 4  # the resolved arguments, fed back


def test_gqa_still_takes_fewer_kv_heads():
    assert build_attention("gqa", D, {"n_heads": 4, "n_kv_heads": 2}).n_kv_heads == 2


def test_argument_dataclass_gets_the_same_checks_as_a_dict():
    with pytest.raises(ValueError, match="attention='mha' needs n_kv_heads"):
        build_attention("mha", D, MHAArgs(n_heads=4, n_kv_heads=2))
    with pytest.raises(ValueError, match="attention='mqa' needs n_kv_heads=1"):
        build_attention("mqa", D, MHAArgs(n_heads=4, n_kv_heads=2))
    assert build_attention("mha", D, MHAArgs(n_heads=4)).n_kv_heads == 4
    assert build_attention("mqa", D, MHAArgs(n_heads=4, n_kv_heads=1)).n_kv_heads == 1
