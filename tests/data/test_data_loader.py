from __future__ import annotations

import numpy as np
import pytest
import torch

from sasformer.data.loader import TokenLoader, eval_batches
from sasformer.data.shards import ShardError, write_shard

FP = "12" * 32
VOCAB = 70000  # uint32 shards; token value = position in the stream, so windows can be checked exactly
SHARD_SIZES = [1000, 63, 1, 2937]


@pytest.fixture
def data_dir(tmp_path):
    start = 0
    for split, sizes in (("train", SHARD_SIZES), ("val", [700, 211])):
        (tmp_path / split).mkdir()
        start = 0
        for i, n in enumerate(sizes):
            write_shard(tmp_path / split / f"{split}_{i:06d}.bin", np.arange(start, start + n), VOCAB, FP)
            start += n
    return tmp_path


def _assert_windows(x: torch.Tensor, y: torch.Tensor, seq_len: int) -> None:
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape and x.shape[1] == seq_len
    assert x.is_contiguous() and y.is_contiguous()
    torch.testing.assert_close(y, x + 1)
    torch.testing.assert_close(x[:, 1:], x[:, :-1] + 1)


@pytest.mark.parametrize("seq_len", [1, 7, 63])
def test_batches_are_stream_windows(data_dir, seq_len):
    loader = TokenLoader(data_dir, seq_len=seq_len, batch_size=5, seed=3, expected_fingerprint=FP)
    assert (loader.vocab_size, loader.tokenizer_fingerprint, loader.num_tokens) == (VOCAB, FP, sum(SHARD_SIZES))
    for _ in range(20):
        x, y = loader.next_batch()
        assert x.shape == (5, seq_len)
        _assert_windows(x, y, seq_len)
        assert int(y.max()) < loader.num_tokens


def test_windows_cross_shard_boundaries_and_cover_stream(data_dir):
    loader = TokenLoader(data_dir, seq_len=63, batch_size=64, seed=0)
    starts = np.concatenate([loader.next_batch()[0][:, 0].numpy() for _ in range(50)])
    assert starts.min() >= 0 and starts.max() <= loader.num_tokens - 64
    # every shard region gets sampled, including starts just before a boundary
    assert (starts < 1000).any() and (starts > 1064).any() and ((starts > 1000 - 63) & (starts < 1000)).any()


@pytest.mark.parametrize("width", [1, 2, 64, 1001])
def test_read_windows_equals_reading_row_by_row(data_dir, width):
    # the gathered rows inside a shard and the rows crossing one (or several: shards of 63 and 1 tokens) agree
    from sasformer.data.loader import TokenStream

    stream = TokenStream(data_dir, "train")
    last = stream.num_tokens - width
    starts = np.array([0, 1, 999, 1000 - width // 2, 1000, 1062, 1063, 1064, last, last // 3, 5, 5])
    starts = np.clip(starts, 0, last)
    got = stream.read_windows(starts, width)
    assert got.dtype == np.int64 and got.shape == (len(starts), width)
    np.testing.assert_array_equal(got, np.stack([stream.read(int(s), int(s) + width) for s in starts]))
    np.testing.assert_array_equal(got, starts[:, None] + np.arange(width))  # token value = stream position


def test_deterministic_in_seed_and_step(data_dir):
    a = TokenLoader(data_dir, seq_len=7, batch_size=4, seed=1)
    b = TokenLoader(data_dir, seq_len=7, batch_size=4, seed=1)
    c = TokenLoader(data_dir, seq_len=7, batch_size=4, seed=2)
    batches_a = [a.next_batch()[0] for _ in range(5)]
    batches_b = [b.next_batch()[0] for _ in range(5)]
    batches_c = [c.next_batch()[0] for _ in range(5)]
    for xa, xb in zip(batches_a, batches_b):
        torch.testing.assert_close(xa, xb)
    assert any(not torch.equal(xa, xc) for xa, xc in zip(batches_a, batches_c))
    assert not torch.equal(batches_a[0], batches_a[1])


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_slice_the_global_batch(data_dir, world_size):
    batch = 6
    whole = TokenLoader(data_dir, seq_len=7, batch_size=batch, seed=5)
    ranks = [TokenLoader(data_dir, seq_len=7, batch_size=batch, seed=5, rank=r, world_size=world_size)
             for r in range(world_size)]
    for _ in range(4):
        gx, gy = whole.next_batch()
        parts = [loader.next_batch() for loader in ranks]
        for r, (x, y) in enumerate(parts):
            assert x.shape == (batch // world_size, 7)
            torch.testing.assert_close(x, gx[r::world_size])
            torch.testing.assert_close(y, gy[r::world_size])


def test_exact_resume(data_dir):
    loader = TokenLoader(data_dir, seq_len=63, batch_size=4, seed=9)
    for _ in range(3):
        loader.next_batch()
    state = loader.state_dict()
    expected = [loader.next_batch() for _ in range(4)]
    resumed = TokenLoader(data_dir, seq_len=63, batch_size=4, seed=0, rank=1, world_size=2)
    resumed.load_state_dict(state)
    assert resumed.seed == 9 and resumed.step == 3
    for x, _ in expected:
        rx, _ = resumed.next_batch()
        torch.testing.assert_close(rx, x[1::2])


def test_resume_on_data_prepared_again_warns(data_dir):
    state = TokenLoader(data_dir, seq_len=7).state_dict()
    write_shard(data_dir / "train" / "train_000004.bin", np.arange(4001, 4101), VOCAB, FP)  # more text since
    with pytest.warns(UserWarning, match="has 4,101 tokens, the run's checkpoint was taken on 4,001"):
        TokenLoader(data_dir, seq_len=7).load_state_dict(state)


def test_resume_refuses_other_shapes(data_dir):
    state = TokenLoader(data_dir, seq_len=7, batch_size=4).state_dict()
    with pytest.raises(ValueError, match="seq_len=7 but this loader has seq_len=8"):
        TokenLoader(data_dir, seq_len=8, batch_size=4).load_state_dict(state)
    with pytest.raises(ValueError, match="another tokenizer"):
        TokenLoader(data_dir, seq_len=7, batch_size=4).load_state_dict({**state, "tokenizer_fingerprint": "x"})


def test_bad_arguments(data_dir, tmp_path):
    with pytest.raises(ValueError, match="fewer than seq_len \\+ 1 = 4002"):
        TokenLoader(data_dir, seq_len=4001)
    TokenLoader(data_dir, seq_len=4000, batch_size=2).next_batch()
    with pytest.raises(ValueError, match="batch_size=6 is the global batch and must be a multiple of world_size=4"):
        TokenLoader(data_dir, batch_size=6, world_size=4, seq_len=7)
    with pytest.raises(ValueError, match="rank"):
        TokenLoader(data_dir, rank=2, world_size=2, seq_len=7)
    with pytest.raises(ValueError, match="no token shards"):
        TokenLoader(tmp_path / "nothing", seq_len=7)
    with pytest.raises(ShardError, match="in use is abababab"):
        TokenLoader(data_dir, seq_len=7, expected_fingerprint="ab" * 32)


def test_mixed_tokenizers_in_split(data_dir):
    write_shard(data_dir / "train" / "train_000009.bin", np.arange(10), VOCAB, "ef" * 32)
    with pytest.raises(ShardError, match="train_000009.bin was written with another tokenizer"):
        TokenLoader(data_dir, seq_len=7)


@pytest.mark.parametrize("seq_len", [1, 7, 63])
def test_eval_batches_cover_split(data_dir, seq_len):
    total = 911
    n_windows = (total - 1) // seq_len
    batches = list(eval_batches(data_dir, seq_len=seq_len, batch_size=8))
    assert len(batches) == -(-n_windows // 8)
    targets = torch.cat([y.reshape(-1) for _, y in batches])
    torch.testing.assert_close(targets, torch.arange(1, 1 + n_windows * seq_len))
    for x, y in batches:
        _assert_windows(x, y, seq_len)
    again = list(eval_batches(data_dir, seq_len=seq_len, batch_size=8))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))


def test_eval_batches_ranks_and_limit(data_dir):
    seq_len, batch = 7, 6
    whole = list(eval_batches(data_dir, seq_len=seq_len, batch_size=batch))
    per_rank = [list(eval_batches(data_dir, seq_len=seq_len, batch_size=batch, rank=r, world_size=3))
                for r in range(3)]
    assert all(len(p) == len(per_rank[0]) for p in per_rank)
    for k, (x, _) in enumerate(whole[:-1]):
        for r in range(3):
            torch.testing.assert_close(per_rank[r][k][0], x[r::3])
    # (911 - 1) // 7 = 130 windows: the last global batch has 4 rows, cut to 3 so every rank gets one
    assert whole[-1][0].shape[0] == 4 and all(p[-1][0].shape[0] == 1 for p in per_rank)
    assert len(list(eval_batches(data_dir, seq_len=seq_len, batch_size=batch, max_batches=3))) == 3
    with pytest.raises(ValueError, match="fewer than seq_len"):
        next(eval_batches(data_dir, seq_len=911))


def test_meta_must_agree_with_shards(data_dir):
    (data_dir / "meta.json").write_text('{"tokenizer_fingerprint": "' + "ef" * 32 + '"}')
    with pytest.raises(ShardError, match="do not match the tokenizer recorded"):
        TokenLoader(data_dir, seq_len=7)
    (data_dir / "meta.json").write_text("{not json")
    with pytest.raises(ShardError, match="meta.json is corrupt"):
        TokenLoader(data_dir, seq_len=7)


def test_shards_must_be_the_ones_prepare_listed(data_dir):
    import json

    listed = {split: {"shards": [{"file": p.name} for p in sorted((data_dir / split).glob("*.bin"))]}
              for split in ("train", "val")}
    (data_dir / "meta.json").write_text(json.dumps({"tokenizer_fingerprint": FP, "splits": listed}))
    assert TokenLoader(data_dir, seq_len=7).num_tokens == sum(SHARD_SIZES)
    (data_dir / "train" / "train_000001.bin").unlink()  # a lost shard would shrink the stream unnoticed
    with pytest.raises(ShardError, match=r"lacks shard\(s\) \['train_000001.bin'\]"):
        TokenLoader(data_dir, seq_len=7)
    write_shard(data_dir / "train" / "train_000001.bin", np.arange(1000, 1063), VOCAB, FP)
    write_shard(data_dir / "train" / "other_000000.bin", np.arange(5), VOCAB, FP)  # a stray one would join it
    with pytest.raises(ShardError, match=r"holds shard\(s\) \['other_000000.bin'\] that .* does not list"):
        TokenLoader(data_dir, seq_len=7)
    (data_dir / "meta.json").write_text(json.dumps({"splits": {"train": {"shards": [{"name": "x"}]}}}))
    with pytest.raises(ShardError, match="meta.json is corrupt"):
        TokenLoader(data_dir, seq_len=7)
