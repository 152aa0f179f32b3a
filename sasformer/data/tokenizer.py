"""Tokenizers behind one small interface: a byte-level BPE trained here, a ``tokenizers`` JSON file,
GPT-2-style ``.tiktoken`` rank files, and Hugging Face tokenizers (through ``transformers``, when installed).

Every tokenizer treats text as plain text: a literal ``<|endoftext|>`` inside a document is encoded as
ordinary characters, never as the end-of-text token, so only the data pipeline places document separators.
A saved tokenizer is a folder with ``sasformer_tokenizer.json`` (kind, end-of-text token, fingerprint) next
to the files of its kind; :func:`load_tokenizer` reads it back.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path

from sasformer.utils.vocab import vocab_extent

DEFAULT_EOT = "<|endoftext|>"
META_FILE = "sasformer_tokenizer.json"
# the GPT-2 / r50k_base pre-tokenisation pattern
R50K_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# end-of-text names tried, in order, when a tokenizer file does not say which token separates documents
_EOT_CANDIDATES = (DEFAULT_EOT, "</s>", "<eos>", "<|end_of_text|>", "[SEP]")


def _sha256_json(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class Tokenizer(ABC):
    """The interface the data pipeline, training, evaluation and generation use."""

    kind: str
    vocab_size: int
    eot_id: int
    eot_token: str

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added)."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; the end-of-text token decodes to its own text."""

    @property
    @abstractmethod
    def fingerprint(self) -> str:
        """Stable sha256 (hex) of the vocabulary, merges and special tokens."""

    @abstractmethod
    def _save_files(self, directory: Path) -> dict:
        """Write this kind's files into ``directory``; returns extra fields for the metadata file."""

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the tokenizer into ``directory`` (created if needed) so :func:`load_tokenizer` can reload it."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {"kind": self.kind, "eot_token": self.eot_token, "eot_id": self.eot_id,
                "vocab_size": self.vocab_size, "fingerprint": self.fingerprint}
        meta.update(self._save_files(directory))
        (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return directory

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, eot_id={self.eot_id}, fp={self.fingerprint[:12]})"


class HFTokenizersTokenizer(Tokenizer):
    """A ``tokenizers.Tokenizer`` (a trained byte-level BPE or any ``tokenizer.json``)."""

    kind = "tokenizers"

    def __init__(self, tok, eot_token: str | None = None, source: str = "<memory>") -> None:
        self._tok = tok
        # documents are plain text: special-token strings inside them are not special
        self._tok.encode_special_tokens = True
        # whole documents, unpadded: a tokenizer.json saved with truncation or padding on would cut documents
        # or write pad ids into the shards, every id still in range
        self._tok.no_truncation()
        self._tok.no_padding()
        added = {t.content for t in tok.get_added_tokens_decoder().values()}
        self.eot_token = eot_token or _pick_eot(added | set(tok.get_vocab()), source)
        eot_id = tok.token_to_id(self.eot_token)
        if eot_id is None:
            raise ValueError(f"tokenizer {source} has no token {self.eot_token!r}; pass the end-of-text token it uses")
        self.eot_id = int(eot_id)
        self.vocab_size = vocab_extent(tok.get_vocab(with_added_tokens=True).values())
        self._fingerprint = _sha256_json({"tokenizers": json.loads(tok.to_str()), "eot": self.eot_token})

    @classmethod
    def from_file(cls, path: str | os.PathLike, eot_token: str | None = None) -> HFTokenizersTokenizer:
        from tokenizers import Tokenizer as RawTokenizer

        try:
            tok = RawTokenizer.from_file(str(path))
        except Exception as err:
            raise ValueError(f"cannot read tokenizer file {path}: {err}") from err
        return cls(tok, eot_token, source=str(path))

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def _save_files(self, directory: Path) -> dict:
        self._tok.save(str(directory / "tokenizer.json"))
        return {"file": "tokenizer.json"}


def train_bpe(texts: Iterable[str], vocab_size: int, eot_token: str = DEFAULT_EOT, show_progress: bool = True,
              length: int | None = None) -> HFTokenizersTokenizer:
    """Train a byte-level BPE (GPT-2 style: no unknown tokens, lossless) of ``vocab_size`` ids on ``texts``.

    The vocabulary holds the 256 byte symbols and the end-of-text token, so ``vocab_size`` must exceed 257.
    It can come out smaller than asked when the texts hold too few distinct merges.
    """
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size <= 257:
        raise ValueError(f"vocab_size={vocab_size} is too small: a byte-level BPE needs 256 bytes + end-of-text")
    tok = RawTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[eot_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tok.train_from_iterator(texts, trainer, length=length)
    return HFTokenizersTokenizer(tok, eot_token, source="trained BPE")


def read_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Parse a ``.tiktoken`` file (lines ``base64-token rank``) without touching tiktoken's download cache."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except Exception as err:
                raise ValueError(f"{path}:{lineno}: not a 'base64-token rank' line: {line[:80]!r}") from err
    if not ranks:
        raise ValueError(f"tiktoken rank file {path} is empty")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"tiktoken rank file {path}: ranks must be 0..{len(ranks) - 1} without gaps or repeats")
    return ranks


class TiktokenTokenizer(Tokenizer):
    """BPE ranks for ``tiktoken`` (e.g. GPT-2's ``gpt2.tiktoken``); end-of-text gets the id after the last rank."""

    kind = "tiktoken"

    def __init__(self, ranks_path: str | os.PathLike, pattern: str = R50K_PATTERN, eot_token: str = DEFAULT_EOT,
                 name: str | None = None) -> None:
        import tiktoken

        self.ranks_path = Path(ranks_path)
        ranks = read_tiktoken_ranks(self.ranks_path)
        self.pattern = pattern
        self.eot_token = eot_token
        self.eot_id = len(ranks)
        self.vocab_size = len(ranks) + 1
        self.name = name or self.ranks_path.stem
        # threads used by encode_batch; None = every core (data-prep workers set 1)
        self.num_threads: int | None = None
        self._enc = tiktoken.Encoding(
            name=self.name, pat_str=pattern, mergeable_ranks=ranks, special_tokens={eot_token: self.eot_id}
        )
        digest = hashlib.sha256()
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            digest.update(base64.b64encode(token) + b" %d\n" % rank)
        self._fingerprint = _sha256_json({"tiktoken": digest.hexdigest(), "pattern": pattern,
                                          "special": {eot_token: self.eot_id}})

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._enc.encode_ordinary_batch(list(texts), num_threads=self.num_threads or os.cpu_count() or 1)

    def decode(self, ids: Iterable[int]) -> str:
        return self._enc.decode(list(ids))

    def _save_files(self, directory: Path) -> dict:
        target = directory / "ranks.tiktoken"
        if self.ranks_path.resolve() != target.resolve():
            shutil.copyfile(self.ranks_path, target)
        return {"file": "ranks.tiktoken", "pattern": self.pattern, "name": self.name}


class HFAutoTokenizer(Tokenizer):
    """A Hugging Face tokenizer loaded with ``transformers.AutoTokenizer`` (a hub name or a local folder)."""

    kind = "hf"

    def __init__(self, name_or_path: str, eot_token: str | None = None) -> None:
        try:
            from transformers import AutoTokenizer
        except ImportError as err:
            raise ValueError(
                f"loading the Hugging Face tokenizer {name_or_path!r} needs `transformers` (pip install transformers)"
            ) from err
        try:
            self._tok = AutoTokenizer.from_pretrained(name_or_path)
        except (OSError, ValueError) as err:
            raise ValueError(
                f"cannot load Hugging Face tokenizer {name_or_path!r}: {err}. A hub name needs network access "
                "(or a copy in the Hugging Face cache); otherwise pass a local folder, a tokenizer.json or a "
                ".tiktoken file"
            ) from err
        self.name_or_path = name_or_path
        self.eot_token = eot_token or self._tok.eos_token or _pick_eot(set(self._tok.get_vocab()), name_or_path)
        eot_id = self._tok.convert_tokens_to_ids(self.eot_token)
        if eot_id is None or eot_id == self._tok.unk_token_id and self.eot_token != self._tok.unk_token:
            raise ValueError(f"tokenizer {name_or_path!r} has no token {self.eot_token!r}")
        self.eot_id = int(eot_id)
        self.vocab_size = vocab_extent(self._tok.get_vocab().values(), len(self._tok))
        backend = getattr(self._tok, "backend_tokenizer", None)
        if backend is not None:
            content: object = json.loads(backend.to_str())
        else:
            content = sorted(self._tok.get_vocab().items(), key=lambda kv: kv[1])
        self._fingerprint = _sha256_json({"hf": content, "eot": self.eot_token})

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False, split_special_tokens=True)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        out = self._tok(list(texts), add_special_tokens=False, split_special_tokens=True)
        return list(out["input_ids"])

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def _save_files(self, directory: Path) -> dict:
        self._tok.save_pretrained(str(directory / "hf"))
        return {"file": "hf", "source": self.name_or_path}


def _pick_eot(tokens: set[str], source: str) -> str:
    for name in _EOT_CANDIDATES:
        if name in tokens:
            return name
    raise ValueError(
        f"tokenizer {source} has none of the usual end-of-text tokens {list(_EOT_CANDIDATES)}; "
        "name the one that separates documents (--eot-token)"
    )


def load_tokenizer(spec: str | os.PathLike, eot_token: str | None = None) -> Tokenizer:
    """Load a tokenizer from ``spec``:

    - a folder written by :meth:`Tokenizer.save` (e.g. ``DATA/tokenizer``),
    - ``*.tiktoken`` (GPT-2 pattern; end-of-text = the id after the last rank, 50256 for GPT-2),
    - ``*.json`` (a ``tokenizers`` file),
    - ``hf:NAME`` or a folder with ``tokenizer_config.json`` (``transformers.AutoTokenizer``).

    A prefix ``tiktoken:`` / ``tokenizers:`` / ``hf:`` forces the kind.
    """
    spec = str(spec)
    kind, _, rest = spec.partition(":")
    if kind in ("tiktoken", "tokenizers", "hf") and rest:
        path = rest
    else:
        kind, path = "", spec
    p = Path(path)
    if not kind:
        if p.is_dir() and (p / META_FILE).is_file():
            return _load_saved(p)
        if p.is_file() and p.name.endswith(".tiktoken"):
            kind = "tiktoken"
        elif p.is_file() and p.suffix == ".json":
            kind = "tokenizers"
        elif p.is_dir() and (p / "tokenizer_config.json").is_file():
            kind = "hf"
        elif p.exists():
            raise ValueError(
                f"cannot tell what kind of tokenizer {spec!r} is: expected a saved tokenizer folder, a .tiktoken "
                "file, a tokenizers .json file or a Hugging Face folder (or prefix tiktoken:/tokenizers:/hf:)"
            )
        else:
            raise ValueError(
                f"tokenizer {spec!r} is not an existing file or folder; for a Hugging Face hub name write hf:{spec}"
            )
    if kind == "tiktoken":
        return TiktokenTokenizer(p, eot_token=eot_token or DEFAULT_EOT)
    if kind == "tokenizers":
        return HFTokenizersTokenizer.from_file(p, eot_token)
    return HFAutoTokenizer(path, eot_token)


def _load_saved(directory: Path) -> Tokenizer:
    try:
        meta = json.loads((directory / META_FILE).read_text())
        kind = meta["kind"]
        file = directory / meta["file"]
    except (ValueError, KeyError) as err:
        raise ValueError(f"{directory / META_FILE} is corrupt ({err}); save the tokenizer again") from err
    if kind == "tokenizers":
        tok: Tokenizer = HFTokenizersTokenizer.from_file(file, meta["eot_token"])
    elif kind == "tiktoken":
        tok = TiktokenTokenizer(file, pattern=meta["pattern"], eot_token=meta["eot_token"], name=meta.get("name"))
    elif kind == "hf":
        tok = HFAutoTokenizer(str(file), meta["eot_token"])
    else:
        raise ValueError(f"{directory / META_FILE} names unknown tokenizer kind {kind!r}")
    if meta.get("fingerprint") not in (None, tok.fingerprint):
        raise ValueError(
            f"tokenizer in {directory} does not match its recorded fingerprint "
            f"({tok.fingerprint[:16]}... != {meta['fingerprint'][:16]}...): its files were changed"
        )
    return tok
