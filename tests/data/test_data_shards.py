from __future__ import annotations

import numpy as np
import pytest

from sasformer.data.shards import HEADER_BYTES, Shard, ShardError, ShardWriter, read_header, write_shard

FP = "ab" * 32
OTHER_FP = "cd" * 32


@pytest.mark.parametrize("vocab, dtype", [(300, np.uint16), (65536, np.uint16), (65537, np.uint32)])
def test_roundtrip(tmp_path, vocab, dtype):
    tokens = np.random.default_rng(0).integers(0, vocab, size=63)
    write_shard(tmp_path / "s.bin", tokens, vocab, FP)
    shard = Shard(tmp_path / "s.bin", FP, validate="full")
    assert shard.tokens.dtype == dtype
    assert (shard.header.num_tokens, shard.header.vocab_size, shard.header.fingerprint) == (63, vocab, FP)
    np.testing.assert_array_equal(shard.tokens, tokens)
    assert (tmp_path / "s.bin").stat().st_size == HEADER_BYTES + 63 * np.dtype(dtype).itemsize
    assert [p.name for p in tmp_path.iterdir()] == ["s.bin"]


def test_single_token(tmp_path):
    write_shard(tmp_path / "s.bin", np.array([7]), 8, FP)
    assert Shard(tmp_path / "s.bin").tokens.tolist() == [7]


def test_writer_refuses_bad_input(tmp_path):
    with pytest.raises(ValueError, match="empty shard"):
        write_shard(tmp_path / "s.bin", np.array([], dtype=np.int64), 300, FP)
    with pytest.raises(ValueError, match=r"must lie in \[0, 300\)"):
        write_shard(tmp_path / "s.bin", np.array([1, 300]), 300, FP)
    with pytest.raises(ValueError, match="64-character hex"):
        write_shard(tmp_path / "s.bin", np.array([1]), 300, "abc")
    assert not list(tmp_path.iterdir())


def _shard(tmp_path, n=100, vocab=1000):
    path = tmp_path / "train_000000.bin"
    write_shard(path, np.arange(n) % vocab, vocab, FP)
    return path


def test_empty_file(tmp_path):
    (tmp_path / "e.bin").write_bytes(b"")
    with pytest.raises(ShardError, match=r"e.bin is empty"):
        read_header(tmp_path / "e.bin")


def test_missing_file(tmp_path):
    with pytest.raises(ShardError, match="does not exist"):
        Shard(tmp_path / "nope.bin")


def test_truncated(tmp_path):
    path = _shard(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:-3])
    with pytest.raises(ShardError, match=r"train_000000.bin is truncated: .* header says 100 tokens"):
        Shard(path)
    path.write_bytes(data[:50])
    with pytest.raises(ShardError, match="shorter than its 128-byte header"):
        Shard(path)


def test_trailing_bytes(tmp_path):
    path = _shard(tmp_path)
    path.write_bytes(path.read_bytes() + b"\0\0")
    with pytest.raises(ShardError, match="longer than its header says"):
        Shard(path)


def test_bad_magic(tmp_path):
    path = _shard(tmp_path)
    path.write_bytes(b"NOTMAGIC" + path.read_bytes()[8:])
    with pytest.raises(ShardError, match="is not a sasformer token shard"):
        Shard(path)


def test_corrupt_header(tmp_path):
    path = _shard(tmp_path)
    data = bytearray(path.read_bytes())
    data[16] ^= 0x01  # one bit of the token count
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="corrupt header"):
        Shard(path)


@pytest.mark.parametrize("position", [0, 57, 99])
@pytest.mark.parametrize("validate", ["full", "sample"])
def test_ids_out_of_vocab(tmp_path, position, validate):
    path = _shard(tmp_path)
    data = bytearray(path.read_bytes())
    data[HEADER_BYTES + 2 * position : HEADER_BYTES + 2 * position + 2] = (5000).to_bytes(2, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=rf"train_000000.bin holds token id 5000 at position {position}"):
        Shard(path, validate=validate)
    Shard(path, validate="none")


def test_fingerprint_mismatch(tmp_path):
    path = _shard(tmp_path)
    with pytest.raises(ShardError, match="written with tokenizer abababab.*in use is cdcdcdcd"):
        Shard(path, expected_fingerprint=OTHER_FP)


def test_shard_writer_splits(tmp_path):
    writer = ShardWriter(tmp_path, "train", 70000, FP, shard_tokens=10)
    tokens = np.arange(37) * 1000
    for part in np.split(tokens, [3, 4, 20]):
        writer.add(part)
    shards = writer.close()
    assert [s["tokens"] for s in shards] == [10, 10, 10, 7]
    assert writer.num_tokens == 37
    read = np.concatenate([Shard(tmp_path / s["file"]).tokens for s in shards])
    np.testing.assert_array_equal(read, tokens)
