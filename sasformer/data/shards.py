"""Token shards: a flat array of token ids behind a small fixed header.

Layout of a ``.bin`` shard (little endian)::

    offset  size  field
    0       8     magic b"SASFTOKS"
    8       4     format version (uint32, currently 1)
    12      4     bytes per token (uint32: 2 -> uint16, 4 -> uint32)
    16      8     token count (uint64)
    24      8     vocabulary size (uint64)
    32      32    tokenizer fingerprint (raw sha256 digest)
    64      4     crc32 of bytes 0..63 (catches a corrupt header)
    68      60    zero padding
    128     ...   token ids, ``count * bytes_per_token`` bytes

Documents inside a shard are separated by the tokenizer's end-of-text token (one before each document).
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC = b"SASFTOKS"
FORMAT_VERSION = 1
HEADER_BYTES = 128
_HEADER_STRUCT = struct.Struct("<8sIIQQ32s")
_DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}
# tokens checked per validation chunk; bounded so validation of a huge shard never allocates much
_VALIDATE_CHUNK = 1 << 22


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab <= 65536), else uint32."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    if vocab_size > 2**32:
        raise ValueError(f"vocab_size={vocab_size} does not fit in uint32 token ids")
    return _DTYPES[2] if vocab_size <= 2**16 else _DTYPES[4]


@dataclass(frozen=True)
class ShardHeader:
    """What the header of a shard says about its contents."""

    version: int
    dtype: np.dtype
    num_tokens: int
    vocab_size: int
    fingerprint: str  # hex sha256 of the tokenizer

    def pack(self) -> bytes:
        try:
            digest = bytes.fromhex(self.fingerprint)
        except ValueError:
            digest = b""
        if len(digest) != 32:
            raise ValueError(f"tokenizer fingerprint must be a 64-character hex sha256, got {self.fingerprint!r}")
        body = _HEADER_STRUCT.pack(MAGIC, self.version, self.dtype.itemsize, self.num_tokens, self.vocab_size, digest)
        body += struct.pack("<I", zlib.crc32(body))
        return body.ljust(HEADER_BYTES, b"\0")


class ShardError(ValueError):
    """A shard is missing, empty, truncated, corrupt or does not match the tokenizer in use."""


def write_shard(path: str | os.PathLike, tokens: np.ndarray, vocab_size: int, fingerprint: str) -> ShardHeader:
    """Write ``tokens`` as a shard at ``path`` atomically (a temporary file renamed into place)."""
    path = Path(path)
    dtype = token_dtype(vocab_size)
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be a flat array, got shape {tokens.shape}")
    if tokens.size == 0:
        raise ValueError(f"refusing to write an empty shard to {path}")
    if (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
        raise ValueError(f"token ids for {path} must lie in [0, {vocab_size}); got [{tokens.min()}, {tokens.max()}]")
    header = ShardHeader(FORMAT_VERSION, dtype, int(tokens.size), int(vocab_size), fingerprint)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(header.pack())
            f.write(np.ascontiguousarray(tokens, dtype=dtype).tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return header


def read_header(path: str | os.PathLike) -> ShardHeader:
    """Parse and check the header of a shard; the file size must match the token count."""
    path = Path(path)
    if not path.is_file():
        raise ShardError(f"shard {path} does not exist")
    size = path.stat().st_size
    if size == 0:
        raise ShardError(f"shard {path} is empty (0 bytes); re-run `sasformer prepare`")
    if size < HEADER_BYTES:
        raise ShardError(f"shard {path} is truncated: {size} bytes, shorter than its {HEADER_BYTES}-byte header")
    with open(path, "rb") as f:
        raw = f.read(HEADER_BYTES)
    magic, version, itemsize, count, vocab_size, digest = _HEADER_STRUCT.unpack_from(raw)
    if magic != MAGIC:
        raise ShardError(f"{path} is not a sasformer token shard (magic {magic!r}, expected {MAGIC!r})")
    (crc,) = struct.unpack_from("<I", raw, _HEADER_STRUCT.size)
    if crc != zlib.crc32(raw[: _HEADER_STRUCT.size]):
        raise ShardError(f"shard {path} has a corrupt header (checksum mismatch); re-run `sasformer prepare`")
    if version != FORMAT_VERSION:
        raise ShardError(f"shard {path} has format version {version}; this sasformer reads version {FORMAT_VERSION}")
    if itemsize not in _DTYPES:
        raise ShardError(f"shard {path} declares {itemsize} bytes per token; only 2 and 4 are valid")
    if count == 0:
        raise ShardError(f"shard {path} holds no tokens; re-run `sasformer prepare`")
    expected = HEADER_BYTES + count * itemsize
    if size != expected:
        what = "truncated" if size < expected else "longer than its header says"
        raise ShardError(
            f"shard {path} is {what}: {size} bytes, header says {count} tokens = {expected} bytes; "
            "re-run `sasformer prepare`"
        )
    return ShardHeader(version, _DTYPES[itemsize], int(count), int(vocab_size), digest.hex())


class Shard:
    """A read-only, memory-mapped shard whose header has been checked.

    ``expected_fingerprint`` (the tokenizer the caller will use) must match the shard's. ``validate`` checks that
    every token id is below the vocabulary size: ``"full"`` reads the whole shard, ``"sample"`` reads the first
    and last chunks and a few spread in between, ``"none"`` skips it.
    """

    def __init__(
        self, path: str | os.PathLike, expected_fingerprint: str | None = None, validate: str = "sample"
    ) -> None:
        self.path = Path(path)
        self.header = read_header(self.path)
        if expected_fingerprint is not None and expected_fingerprint != self.header.fingerprint:
            raise ShardError(
                f"shard {self.path} was written with tokenizer {self.header.fingerprint[:16]}..., "
                f"but the tokenizer in use is {expected_fingerprint[:16]}...; prepare the data again with this "
                "tokenizer or use the tokenizer stored next to the data"
            )
        self.tokens: np.ndarray = np.memmap(
            self.path, dtype=self.header.dtype, mode="r", offset=HEADER_BYTES, shape=(self.header.num_tokens,)
        )
        if validate not in ("full", "sample", "none"):
            raise ValueError(f"validate must be 'full', 'sample' or 'none', got {validate!r}")
        if validate != "none":
            self.check_ids(full=validate == "full")

    def __len__(self) -> int:
        return self.header.num_tokens

    def check_ids(self, full: bool = True, n_samples: int = 8) -> None:
        """Raise :class:`ShardError` if a token id is >= the vocabulary size (in the chunks checked)."""
        n = len(self)
        starts = range(0, n, _VALIDATE_CHUNK)
        if not full:
            starts = sorted({int(s) // _VALIDATE_CHUNK * _VALIDATE_CHUNK for s in np.linspace(0, n - 1, n_samples)})
        for start in starts:
            chunk = self.tokens[start : start + _VALIDATE_CHUNK]
            top = int(chunk.max())
            if top >= self.header.vocab_size:
                bad = start + int(np.argmax(chunk >= self.header.vocab_size))
                raise ShardError(
                    f"shard {self.path} holds token id {int(self.tokens[bad])} at position {bad}, "
                    f"outside the vocabulary (size {self.header.vocab_size}); the shard is corrupt or was written "
                    "with another tokenizer - re-run `sasformer prepare`"
                )


class ShardWriter:
    """Accumulates token arrays and writes ``{prefix}_{index:06d}.bin`` shards of ``shard_tokens`` tokens."""

    def __init__(
        self, directory: str | os.PathLike, prefix: str, vocab_size: int, fingerprint: str, shard_tokens: int
    ) -> None:
        if shard_tokens <= 0:
            raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.vocab_size = vocab_size
        self.fingerprint = fingerprint
        self.shard_tokens = shard_tokens
        self.dtype = token_dtype(vocab_size)
        self._buffer = np.empty(shard_tokens, dtype=self.dtype)
        self._filled = 0
        self.shards: list[dict] = []
        self.num_tokens = 0

    def add(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens)
        while tokens.size:
            take = min(tokens.size, self.shard_tokens - self._filled)
            self._buffer[self._filled : self._filled + take] = tokens[:take]
            self._filled += take
            tokens = tokens[take:]
            if self._filled == self.shard_tokens:
                self._flush()

    def _flush(self) -> None:
        if self._filled == 0:
            return
        name = f"{self.prefix}_{len(self.shards):06d}.bin"
        write_shard(self.directory / name, self._buffer[: self._filled], self.vocab_size, self.fingerprint)
        self.shards.append({"file": name, "tokens": self._filled})
        self.num_tokens += self._filled
        self._filled = 0

    def close(self) -> list[dict]:
        """Write the last, partial shard; returns ``[{"file", "tokens"}, ...]``."""
        self._flush()
        return self.shards
