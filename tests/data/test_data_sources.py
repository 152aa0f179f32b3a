from __future__ import annotations

import bz2
import gzip
import itertools
import json
import lzma
import sys
from pathlib import Path

import pytest

from sasformer.data.default_corpus import (
    _comment_text,
    _docstring_documents,
    _module_text,
    _topic_documents,
    corpus_id,
)
from sasformer.data.sources import Document, iter_documents, resolve_inputs

DOCS = [
    {"id": "a", "text": "first document\nwith two lines"},
    {"id": "b", "text": "second: ünïcödé ✓"},
    {"text": "third, without an id"},
]


def _compress(data: bytes, compression: str) -> bytes:
    if compression == ".gz":
        return gzip.compress(data)
    if compression == ".xz":
        return lzma.compress(data)
    if compression == ".bz2":
        return bz2.compress(data)
    if compression == ".zst":
        zstandard = pytest.importorskip("zstandard")
        return zstandard.ZstdCompressor().compress(data)
    return data


def _parquet_bytes(rows: list[dict], column: str = "text") -> bytes:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    import io

    table = pa.table({column: [r["text"] for r in rows], "id": [r.get("id") for r in rows]})
    buf = io.BytesIO()
    # two row groups, so reading crosses a group boundary
    pq.write_table(table, buf, row_group_size=2)
    return buf.getvalue()


COMPRESSIONS = ["", ".gz", ".xz", ".bz2", ".zst"]


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_jsonl_roundtrip(tmp_path, compression):
    data = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in DOCS).encode()
    path = tmp_path / f"docs.jsonl{compression}"
    path.write_bytes(_compress(data + b"\n", compression))
    docs = list(iter_documents(str(path)))
    assert docs == [Document(d["text"], d.get("id")) for d in DOCS]


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_text_roundtrip(tmp_path, compression):
    path = tmp_path / f"story.txt{compression}"
    path.write_bytes(_compress(DOCS[1]["text"].encode(), compression))
    assert list(iter_documents(str(path))) == [Document(DOCS[1]["text"], "story.txt" + compression)]


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_parquet_roundtrip(tmp_path, compression):
    path = tmp_path / f"docs.parquet{compression}"
    path.write_bytes(_compress(_parquet_bytes(DOCS), compression))
    assert list(iter_documents(str(path))) == [Document(d["text"], d.get("id")) for d in DOCS]


def test_parquet_missing_column(tmp_path):
    path = tmp_path / "docs.parquet"
    path.write_bytes(_parquet_bytes(DOCS, column="body"))
    with pytest.raises(ValueError, match=r"docs.parquet: Parquet file has no 'text' column"):
        list(iter_documents(str(path)))


def test_text_field_option(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"body": "hello", "id": 7}) + "\n")
    assert list(iter_documents(str(path), text_field="body")) == [Document("hello", "7")]


def test_jsonl_missing_text_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "no text"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: JSON line has no 'text' field"):
        list(iter_documents(str(path)))


def test_jsonl_bad_line(tmp_path):
    path = tmp_path / "bad.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"text": "ok"}\n\n{"text": "cut off\n'))
    with pytest.raises(ValueError, match=r"bad.jsonl.gz:3: not valid JSON"):
        list(iter_documents(str(path)))


def test_jsonl_text_not_string(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": 5}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: field 'text' is int"):
        list(iter_documents(str(path)))


@pytest.mark.parametrize("compression", [c for c in COMPRESSIONS if c])
@pytest.mark.parametrize("kind", [".jsonl", ".txt"])
def test_a_truncated_compressed_file_is_an_error(tmp_path, compression, kind):
    # cut at a line boundary too: a reader that stops quietly would drop the rest of the documents unseen
    data = b'{"text": "some words of a document"}\n' * 20000 if kind == ".jsonl" else b"a long text. " * 60000
    packed = _compress(data, compression)
    path = tmp_path / f"broken{kind}{compression}"
    path.write_bytes(packed[: len(packed) // 2])
    with pytest.raises(ValueError, match=f"cannot decompress .*broken{kind}{compression}"):
        list(iter_documents(str(path)))


def test_a_damaged_zstd_file_names_the_file(tmp_path):
    pytest.importorskip("zstandard")
    path = tmp_path / "garbage.txt.zst"
    path.write_bytes(b"this is not a zstd stream at all")
    with pytest.raises(ValueError, match="cannot decompress .*garbage.txt.zst: not a valid zstd stream"):
        list(iter_documents(str(path)))


def test_several_zstd_frames_are_one_file(tmp_path):
    zstandard = pytest.importorskip("zstandard")
    lines = [json.dumps({"text": f"document {i}"}) + "\n" for i in range(3000)]
    packer = zstandard.ZstdCompressor()
    path = tmp_path / "frames.jsonl.zst"
    path.write_bytes(packer.compress("".join(lines[:1000]).encode()) + packer.compress("".join(lines[1000:]).encode()))
    assert [d.text for d in iter_documents(str(path))] == [f"document {i}" for i in range(3000)]


def test_jsonl_errors_name_the_line_they_are_on(tmp_path):
    # a text decoder reads ahead: a bad byte far down the file must still be reported at its own line
    path = tmp_path / "late.jsonl"
    good = b'{"text": "a line of ordinary text"}\n'
    path.write_bytes(good * 900 + b'{"text": "caf\xe9"}\n' + good * 10)
    with pytest.raises(ValueError, match=r"late.jsonl:901: not UTF-8"):
        list(iter_documents(str(path)))


def test_jsonl_with_a_bom_and_bare_carriage_returns(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "first"}\n{\r"text": "second"}\n')
    assert [d.text for d in iter_documents(str(path))] == ["first", "second"]


def test_jsonl_with_an_unpaired_surrogate_names_the_line(tmp_path):
    path = tmp_path / "surrogate.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "broken \\ud83d here"}\n')
    with pytest.raises(ValueError, match=r"surrogate.jsonl:2: field 'text' holds an unpaired surrogate"):
        list(iter_documents(str(path)))


def test_not_utf8_text(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt is not UTF-8"):
        list(iter_documents(str(path)))


def _tree(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / ".hidden").mkdir()
    (root / "b.txt").write_text("bee")
    (root / "a.md").write_text("ay")
    (root / "sub" / "c.jsonl.gz").write_bytes(gzip.compress(b'{"text": "see", "id": "c1"}\n'))
    (root / "sub" / "notes.csv").write_text("skipped: unknown suffix")
    (root / ".hidden" / "d.txt").write_text("skipped: hidden")
    (root / "empty.txt").write_text("  \n")
    return root


def test_folder_sorted_and_filtered(tmp_path):
    docs = list(iter_documents(str(_tree(tmp_path))))
    assert docs == [Document("ay", "a.md"), Document("bee", "b.txt"), Document("see", "c1")]


def test_glob(tmp_path):
    root = _tree(tmp_path)
    docs = list(iter_documents(str(root / "**" / "*.txt")))
    assert docs == [Document("bee", "b.txt")]
    with pytest.raises(ValueError, match="matches no files"):
        resolve_inputs([str(root / "*.parquet")])


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="is not a file, folder, glob"):
        resolve_inputs([str(tmp_path / "missing.jsonl")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no input files"):
        resolve_inputs([str(tmp_path / "empty")])
    with pytest.raises(ValueError, match="no inputs"):
        resolve_inputs([])


def test_hf_dataset_spec_parsing():
    source = resolve_inputs(["hf:someone/corpus:cfg@validation"])[0]
    assert (source.name, source.config, source.split) == ("someone/corpus", "cfg", "validation")


def test_default_corpus_is_deterministic():
    pytest.importorskip("pydoc_data.topics")
    first = list(itertools.islice(_topic_documents(), 40))
    again = list(itertools.islice(_topic_documents(), 40))
    assert first == again and len(first) == 40
    assert len({d.id for d in first}) == len(first)
    assert all(d.text.strip() and d.id.startswith("pydoc/") for d in first)
    assert "python" in corpus_id()
    modules = list(itertools.islice(_docstring_documents(), 3))
    assert len(modules) == 3 and all(d.id.startswith("stdlib/") for d in modules)


def test_default_corpus_docstrings(tmp_path):
    path = tmp_path / "mod.py"
    path.write_text(
        '"""Module doc."""\n\nclass A:\n    """Class doc."""\n\n    def f(self):\n        """Method doc."""\n'
    )
    assert _module_text(path, "mod") == "mod\n\nModule doc.\n\nmod.A\n\nClass doc.\n\nmod.A.f\n\nMethod doc."


def test_default_corpus_comments(tmp_path):
    path = tmp_path / "mod.py"
    path.write_text("#!/usr/bin/env python\n# noqa\nx = 1  # the first comment line\n# and its second line\n"
                    "s = '# not a comment, a string'\n\n# another block with enough words\n")
    assert _comment_text(path) == "the first comment line\nand its second line\n\nanother block with enough words"


class _FakeDatasets:
    """Stands in for the optional `datasets` package: records the call, returns rows."""

    def __init__(self, rows):
        self.rows = rows
        self.calls = []

    def load_dataset(self, name, config, split, streaming):
        self.calls.append((name, config, split, streaming))
        if name == "missing/dataset":
            raise ConnectionError("offline")
        return iter(self.rows)


def test_hf_dataset_documents(monkeypatch):
    fake = _FakeDatasets([{"text": "one", "id": 1}, {"text": " "}, {"text": "two"}])
    monkeypatch.setitem(sys.modules, "datasets", fake)
    docs = list(iter_documents("hf:org/set@validation"))
    assert docs == [Document("one", "1"), Document("two", None)]
    assert fake.calls == [("org/set", None, "validation", True)]
    with pytest.raises(ValueError, match="cannot open Hugging Face dataset 'missing/dataset'.*network"):
        list(iter_documents("hf:missing/dataset"))
    fake.rows = [{"body": "x"}]
    with pytest.raises(ValueError, match="row 0 has no 'text' field"):
        list(iter_documents("hf:org/set"))


def test_hf_dataset_without_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ValueError, match="needs `datasets`"):
        list(iter_documents("hf:org/set"))


def test_overlapping_inputs_read_each_file_once(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.txt").write_text("the same text")
    (tmp_path / "y.txt").write_text("another text")
    with pytest.warns(UserWarning, match=r"2 input\(s\) reached more than once are read once: .*sub/x.txt, .*y.txt"):
        sources = resolve_inputs([str(tmp_path), str(tmp_path / "sub" / "x.txt"), str(tmp_path / "y.txt")])
    assert [s.text_id for s in sources] == ["sub/x.txt", "y.txt"]
    with pytest.warns(UserWarning, match="1 input"):
        assert len(resolve_inputs(["default", "default"])) == 1


def test_a_binary_file_named_as_input_is_refused(tmp_path):
    path = tmp_path / "corpus.tar"
    path.write_bytes(b"ustar\x00\x00some text\x00\x00")
    with pytest.raises(ValueError, match="corpus.tar holds NUL bytes"):
        list(iter_documents(str(path)))


def test_a_corrupt_gzip_names_its_file(tmp_path):
    data = bytearray(gzip.compress(("some text that compresses " * 200).encode()))
    data[20:40] = b"\xff" * 20  # the deflate stream broken after a valid header
    path = tmp_path / "broken.txt.gz"
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="cannot decompress .*broken.txt.gz"):
        list(iter_documents(str(path)))

