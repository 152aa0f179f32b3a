"""Tiny fixtures for the data tests: a hand-made tiktoken rank file and a small trained BPE."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

TEXTS = [
    "The cat sat on the mat. The dog sat on the log.",
    "Une phrase en français, avec des accents: é à ç.",
    "def f(x):\n    return x * 2  # the answer\n",
    "Numbers 1234 and 56789, then more words: the the the.",
    "A literal <|endoftext|> inside a document is just text.",
    "Short.",
    "the theory of the thermal thesis",
]

# merges over the 256 byte symbols, each formed from two earlier tokens
MERGES = [b"th", b"he", b"the", b" t", b" the", b"at", b" c", b" cat"]


def write_ranks(path: Path, merges: list[bytes] = MERGES) -> Path:
    tokens = [bytes([i]) for i in range(256)] + merges
    path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % r for r, t in enumerate(tokens)))
    return path


@pytest.fixture
def texts() -> list[str]:
    return list(TEXTS)


@pytest.fixture
def make_ranks(tmp_path: Path):
    return lambda name="tiny.tiktoken", merges=MERGES: write_ranks(tmp_path / name, merges)


@pytest.fixture
def ranks_file(make_ranks) -> Path:
    return make_ranks()


@pytest.fixture(scope="session")
def bpe():
    from sasformer.data.tokenizer import train_bpe

    return train_bpe(TEXTS * 4, vocab_size=300, show_progress=False)
