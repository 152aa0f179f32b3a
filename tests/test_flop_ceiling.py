"""benchmarks/flop_ceiling.py: the executed-FLOP counts order as the paths do (meta-device models, fast)."""

from __future__ import annotations

from benchmarks.flop_ceiling import rows


def test_counts_order_useful_folded_banded():
    mha, sas, sas_mqa_like = rows("small", 1024, [(24, 128, 3), (24, 64, 1)], chunks=[8])
    assert mha["useful"] == mha["banded"] == mha["folded"]  # nothing to fold or band in MHA
    for row in (sas, sas_mqa_like):
        # useful < folded < banded: the fold removes the projections' FLOPs, the band's zeros remain
        assert row["useful"] < row["folded"] < row["banded"]
        assert row["chunked"][8] < row["banded"]
    # at GPT-small, (24, 128, 3): the fold saves 3 x 12 layers x 3 projections x 2 x 768 x 768 per token
    assert abs((sas["banded"] - sas["folded"]) - 3 * 12 * 3 * 2 * 768 * 768) < 1e3
