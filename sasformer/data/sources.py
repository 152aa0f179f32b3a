"""Where documents come from: text files, JSONL, Parquet (optionally .gz/.xz/.bz2/.zst compressed), folders and
globs of them, a Hugging Face dataset, or the embedded default corpus.

An input spec is one of

- ``default``                       the embedded corpus (:mod:`sasformer.data.default_corpus`),
- ``hf:NAME[:CONFIG][@SPLIT]``      a Hugging Face dataset (needs ``datasets`` and network or a local cache),
- a file, a folder (searched recursively for known suffixes) or a glob (``data/**/*.jsonl.zst``).

A text file is one document whose id is its path relative to the input (its name, for a single file). A JSONL
line / Parquet row is one document taken from its ``text`` field; its id is its ``id`` field when present.
"""

from __future__ import annotations

import bz2
import glob
import gzip
import io
import json
import lzma
import os
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

COMPRESSIONS = (".gz", ".xz", ".bz2", ".zst")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst")
_KNOWN = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES


@dataclass(frozen=True)
class Document:
    """One document. ``id`` is None when the source gives none (the split then hashes the text)."""

    text: str
    id: str | None = None


def _split_suffix(name: str) -> tuple[str, str]:
    """``a.jsonl.zst`` -> (``.jsonl``, ``.zst``); compression is ``""`` when the file is not compressed."""
    lower = name.lower()
    compression = next((c for c in COMPRESSIONS if lower.endswith(c)), "")
    stem = lower[: len(lower) - len(compression)]
    return os.path.splitext(stem)[1], compression


def _open_binary(path: Path, raw: IO[bytes]) -> IO[bytes]:
    _, compression = _split_suffix(path.name)
    if compression == ".gz":
        return gzip.GzipFile(fileobj=raw)
    if compression == ".xz":
        return lzma.LZMAFile(raw)
    if compression == ".bz2":
        return bz2.BZ2File(raw)
    if compression == ".zst":
        try:
            import zstandard
        except ImportError as err:
            raise ValueError(f"{path} is zstd-compressed: install `zstandard` (pip install zstandard)") from err
        return io.BufferedReader(_ZstdReader(raw, zstandard))
    return raw


class _ZstdReader(io.RawIOBase):
    """zstd frames decompressed from ``raw``, one after another; a stream cut short raises ``EOFError`` (zstandard's
    own reader returns what it has as if the file had ended), and a damaged one ``OSError`` naming zstd's error."""

    def __init__(self, raw: IO[bytes], zstandard) -> None:
        self._raw, self._zstd = raw, zstandard
        self._frame = zstandard.ZstdDecompressor().decompressobj()
        self._pending, self._pos = b"", 0
        self._started = False  # inside a frame: bytes of it have been fed

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self._pos == len(self._pending):
            chunk = self._raw.read(1 << 20)
            if not chunk:
                if self._started and not self._frame.eof:
                    raise EOFError("compressed file ended before the end-of-stream marker was reached")
                return 0
            self._pending, self._pos = self._decompress(chunk), 0
        n = min(len(buffer), len(self._pending) - self._pos)
        buffer[:n] = memoryview(self._pending)[self._pos:self._pos + n]
        self._pos += n
        return n

    def _decompress(self, chunk: bytes) -> bytes:
        out = []
        while chunk:
            try:
                out.append(self._frame.decompress(chunk))
            except self._zstd.ZstdError as err:
                raise OSError(f"not a valid zstd stream ({err})") from err
            self._started = True
            chunk = b""
            if self._frame.eof:  # the next frame, if any, starts in what this one left over
                chunk = self._frame.unused_data
                self._frame = self._zstd.ZstdDecompressor().decompressobj()
                self._started = False
        return b"".join(out)


class FileSource:
    """Documents of one file. ``bytes_read`` follows the position in the file on disk (for progress bars)."""

    input_spec: str | None = None  # the input (file, folder, glob) that named it, set by resolve_inputs

    def __init__(self, path: str | os.PathLike, text_id: str | None = None, text_field: str = "text") -> None:
        self.path = Path(path)
        self.format, self.compression = _split_suffix(self.path.name)
        if self.format not in JSONL_SUFFIXES + PARQUET_SUFFIXES:
            self.format = ".txt"
        self.text_id = text_id or self.path.name
        self.text_field = text_field
        self.size = self.path.stat().st_size
        self.bytes_read = 0

    def __repr__(self) -> str:
        return f"FileSource({str(self.path)!r})"

    def documents(self) -> Iterator[Document]:
        self.bytes_read = 0
        with open(self.path, "rb") as raw, _open_binary(self.path, raw) as stream:
            if self.format == ".txt":
                yield from self._text(stream)
            elif self.format in JSONL_SUFFIXES:
                yield from self._jsonl(stream, raw)
            else:
                yield from self._parquet(stream)
        self.bytes_read = self.size

    def _text(self, stream: IO[bytes]) -> Iterator[Document]:
        try:
            text = stream.read().decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{self.path} is not UTF-8 text ({err}); convert it or remove it from the inputs") from err
        except (OSError, EOFError, lzma.LZMAError, zlib.error) as err:
            raise ValueError(f"cannot decompress {self.path}: {err}") from err
        if "\x00" in text:  # an archive or other binary named on the command line: no text to train on
            raise ValueError(f"{self.path} holds NUL bytes, so it is not text (an archive? a binary?); give text, "
                             f"JSONL ({', '.join(JSONL_SUFFIXES)}) or Parquet files, optionally compressed")
        if text.strip():
            yield Document(text, self.text_id)

    def _jsonl(self, stream: IO[bytes], raw: IO[bytes]) -> Iterator[Document]:
        field = self.text_field
        lineno = 0
        try:
            # bytes per line, decoded here: a text decoder reads ahead and would name a later line in its errors,
            # and would split lines at a bare carriage return, which JSON allows inside a line
            for lineno, raw_line in enumerate(stream, 1):
                line = raw_line.decode("utf-8-sig" if lineno == 1 else "utf-8")
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(
                        f"{self.path}:{lineno}: not valid JSON ({err.msg}); fix or remove the line"
                    ) from err
                if not isinstance(record, dict) or field not in record:
                    raise ValueError(f"{self.path}:{lineno}: JSON line has no {field!r} field (use --text-field)")
                text = record[field]
                if not isinstance(text, str):
                    raise ValueError(f"{self.path}:{lineno}: field {field!r} is {type(text).__name__}, not a string")
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError as err:  # a lone surrogate escaped in the JSON: no UTF-8 text at all
                    raise ValueError(f"{self.path}:{lineno}: field {field!r} holds an unpaired surrogate "
                                     f"({err.reason} at character {err.start}); fix or remove the line") from err
                if lineno % 256 == 0:
                    self.bytes_read = raw.tell()
                if text.strip():
                    doc_id = record.get("id")
                    yield Document(text, None if doc_id is None else str(doc_id))
        except UnicodeDecodeError as err:
            raise ValueError(f"{self.path}:{lineno}: not UTF-8 ({err})") from err
        except (OSError, EOFError, lzma.LZMAError, zlib.error) as err:
            raise ValueError(f"cannot decompress {self.path} near line {lineno + 1}: {err}") from err

    def _parquet(self, stream: IO[bytes]) -> Iterator[Document]:
        try:
            import pyarrow.parquet as pq
        except ImportError as err:
            raise ValueError(f"reading {self.path} needs `pyarrow` (pip install pyarrow)") from err
        source = stream if not self.compression else io.BytesIO(stream.read())
        try:
            pf = pq.ParquetFile(source)
        except Exception as err:
            raise ValueError(f"cannot read Parquet file {self.path}: {err}") from err
        names = pf.schema_arrow.names
        if self.text_field not in names:
            raise ValueError(f"{self.path}: Parquet file has no {self.text_field!r} column (columns: {names})")
        columns = [self.text_field] + (["id"] if "id" in names else [])
        for group in range(pf.num_row_groups):
            table = pf.read_row_group(group, columns=columns)
            texts = table.column(self.text_field).to_pylist()
            ids = table.column("id").to_pylist() if "id" in names else [None] * len(texts)
            for text, doc_id in zip(texts, ids):
                if text and text.strip():
                    yield Document(text, None if doc_id is None else str(doc_id))
            self.bytes_read = int(self.size * (group + 1) / pf.num_row_groups)


class HFDatasetSource:
    """A Hugging Face dataset, streamed: ``hf:NAME[:CONFIG][@SPLIT]`` (split defaults to ``train``)."""

    size = None
    input_spec: str | None = None

    def __init__(self, spec: str, text_field: str = "text") -> None:
        body = spec[len("hf:"):]
        body, _, self.split = body.partition("@")
        self.name, _, config = body.partition(":")
        self.config = config or None
        self.split = self.split or "train"
        self.text_field = text_field
        self.bytes_read = 0

    def __repr__(self) -> str:
        return f"HFDatasetSource({self.name!r}, config={self.config!r}, split={self.split!r})"

    def documents(self) -> Iterator[Document]:
        try:
            import datasets
        except ImportError as err:
            raise ValueError(f"Hugging Face dataset {self.name!r} needs `datasets` "
                             "(pip install datasets, or the [hub] extra)") from err
        try:
            ds = datasets.load_dataset(self.name, self.config, split=self.split, streaming=True)
        except Exception as err:
            raise ValueError(
                f"cannot open Hugging Face dataset {self.name!r} (config {self.config}, split {self.split}): {err}. "
                "It needs network access or a local cache; otherwise download it to JSONL/Parquet and pass the files"
            ) from err
        for i, record in enumerate(ds):
            if self.text_field not in record:
                raise ValueError(f"dataset {self.name!r} row {i} has no {self.text_field!r} field (use --text-field)")
            text = record[self.text_field]
            if text and text.strip():
                doc_id = record.get("id")
                yield Document(text, None if doc_id is None else str(doc_id))


class DefaultCorpusSource:
    """The embedded offline corpus (see :mod:`sasformer.data.default_corpus`)."""

    size = None
    bytes_read = 0
    input_spec: str | None = None

    def __repr__(self) -> str:
        return "DefaultCorpusSource()"

    def documents(self) -> Iterator[Document]:
        from sasformer.data.default_corpus import iter_default_corpus

        yield from iter_default_corpus()


Source = FileSource | HFDatasetSource | DefaultCorpusSource


def _is_known(path: Path) -> bool:
    return _split_suffix(path.name)[0] in _KNOWN


def resolve_inputs(specs: list[str], text_field: str = "text") -> list[Source]:
    """Expand input specs into sources, in a deterministic order (folder and glob matches sorted by path)."""
    if not specs:
        raise ValueError("no inputs given: pass files, folders, globs, hf:NAME or `default`")
    sources: list[Source] = []
    for spec in specs:
        first = len(sources)
        _add_sources(sources, spec, text_field)
        for source in sources[first:]:
            source.input_spec = spec  # which named input it came from (the BPE sample shares by input)
    return _without_repeats(sources)


def _add_sources(sources: list[Source], spec: str, text_field: str) -> None:
    if spec == "default":
        sources.append(DefaultCorpusSource())
    elif spec.startswith("hf:"):
        sources.append(HFDatasetSource(spec, text_field))
    elif os.path.isfile(spec):
        sources.append(FileSource(spec, text_field=text_field))
    elif os.path.isdir(spec):
        root = Path(spec)
        files = sorted(
            p for p in root.rglob("*")
            if p.is_file() and _is_known(p) and not any(part.startswith(".") for part in p.relative_to(root).parts)
        )
        if not files:
            raise ValueError(f"folder {spec} holds no input files (suffixes {list(_KNOWN)}, optionally compressed)")
        sources += [FileSource(p, p.relative_to(root).as_posix(), text_field) for p in files]
    elif glob.has_magic(spec):
        matches = sorted(Path(p) for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
        if not matches:
            raise ValueError(f"glob {spec!r} matches no files")
        base = Path(spec.split("*")[0].split("?")[0].split("[")[0])
        base = base if base.is_dir() else base.parent
        sources += [FileSource(p, _relative(p, base), text_field) for p in matches]
    else:
        raise ValueError(f"input {spec!r} is not a file, folder, glob, hf:NAME or `default`")


def _without_repeats(sources: list[Source]) -> list[Source]:
    """Each input once, as first reached: inputs that overlap (a folder and a file in it, a link to a file beside
    it, ``default`` twice) would otherwise repeat documents, and a file's under two ids (``sub/x.txt``, ``x.txt``)
    could fall on both sides of the split. One warning names the repeats."""
    seen: dict[object, Source] = {}
    kept: list[Source] = []
    repeats: list[str] = []
    for source in sources:
        key = _identity(source)
        if key in seen:
            first, again = _label(seen[key]), _label(source)
            repeats.append(again if again == first else f"{again} (= {first})")
            continue
        seen[key] = source
        kept.append(source)
    if repeats:
        listed = ", ".join(repeats[:5]) + (f" and {len(repeats) - 5} more" if len(repeats) > 5 else "")
        warnings.warn(f"{len(repeats)} input(s) reached more than once are read once: {listed}", stacklevel=3)
    return kept


def _label(source: Source) -> str:
    return str(source.path) if isinstance(source, FileSource) else repr(source)


def _identity(source: Source) -> object:
    if isinstance(source, FileSource):
        return source.path.resolve()
    if isinstance(source, HFDatasetSource):
        return ("hf", source.name, source.config, source.split, source.text_field)
    return type(source)


def _relative(path: Path, base: Path) -> str:
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return path.name


def iter_documents(specs: str | list[str], text_field: str = "text") -> Iterator[Document]:
    """Every document of every input, in order."""
    for source in resolve_inputs([specs] if isinstance(specs, str) else specs, text_field):
        yield from source.documents()
