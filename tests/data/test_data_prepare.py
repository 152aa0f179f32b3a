from __future__ import annotations

import argparse
import json
import os
import re
import socket
from pathlib import Path

import numpy as np
import pytest

from sasformer.data.loader import TokenLoader, TokenStream, eval_batches, load_data_tokenizer
from sasformer.data.prepare import PrepareOptions, prepare, read_meta, split_score
from sasformer.data.sources import Document


def _write_jsonl(path: Path, docs: list[tuple[str, str]]) -> Path:
    path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in docs))
    return path


def _corpus(tmp_path: Path, name: str, n: int) -> Path:
    docs = [(f"{name}-{i}", f"Document {i} of {name}: the cat sat. " * (1 + i % 3)) for i in range(n)]
    return _write_jsonl(tmp_path / f"{name}.jsonl", docs)


def _options(tmp_path, inputs, out="out", **kw) -> PrepareOptions:
    kw.setdefault("workers", 1)
    kw.setdefault("progress", False)
    return PrepareOptions(inputs=[str(p) for p in inputs], out=str(tmp_path / out), **kw)


def _split_docs(out: Path, split: str) -> list[str]:
    """Decode a split back into its documents (an end-of-text token precedes each)."""
    tok = load_data_tokenizer(out)
    stream = TokenStream(out, split)
    tokens = stream.read(0, stream.num_tokens)
    assert tokens[0] == tok.eot_id
    bounds = np.flatnonzero(tokens == tok.eot_id).tolist() + [len(tokens)]
    return [tok.decode(tokens[a + 1 : b].tolist()) for a, b in zip(bounds[:-1], bounds[1:])]


def test_prepare_roundtrip_with_trained_bpe(tmp_path, texts):
    (tmp_path / "notes").mkdir()
    for i, t in enumerate(texts[:3]):
        (tmp_path / "notes" / f"n{i}.txt").write_text(t)
    jsonl = _corpus(tmp_path, "web", 40)
    meta = prepare(_options(tmp_path, [tmp_path / "notes", jsonl], vocab_size=300, val_fraction=0.1))
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "tokenizer", "train", "val"]
    assert not (tmp_path / "out.partial").exists()
    assert meta["dtype"] == "uint16" and meta["vocab_size"] <= 300
    tok = load_data_tokenizer(out)
    assert meta["tokenizer_fingerprint"] == tok.fingerprint
    inputs = texts[:3] + [json.loads(line)["text"] for line in jsonl.read_text().splitlines()]
    train, val = _split_docs(out, "train"), _split_docs(out, "val")
    assert sorted(train + val) == sorted(inputs)
    assert meta["splits"]["train"]["documents"] == len(train) and meta["splits"]["val"]["documents"] == len(val)
    assert meta["splits"]["val"]["tokens"] == TokenStream(out, "val").num_tokens
    assert len(val) >= 1
    x, y = TokenLoader(out, seq_len=7, batch_size=2, expected_fingerprint=tok.fingerprint).next_batch()
    assert x.shape == (2, 7) and int(x.max()) < meta["vocab_size"]


def test_split_rule():
    doc = Document("text", "some-id")
    assert split_score(doc) == split_score(Document("other text", "some-id"))
    assert split_score(Document("text")) != split_score(doc)
    assert 0.0 <= split_score(doc) < 1.0


def test_split_is_stable_when_files_are_added(tmp_path, ranks_file):
    a = _corpus(tmp_path, "a", 300)
    b = _corpus(tmp_path, "b", 200)
    prepare(_options(tmp_path, [a], out="one", tokenizer=str(ranks_file), val_fraction=0.05))
    prepare(_options(tmp_path, [a, b], out="two", tokenizer=str(ranks_file), val_fraction=0.05))
    val_one = set(_split_docs(tmp_path / "one", "val"))
    val_two = set(_split_docs(tmp_path / "two", "val"))
    assert val_one and val_one == {d for d in val_two if "of a:" in d}
    assert any("of b:" in d for d in val_two)


def test_rerun_is_idempotent_and_changes_rebuild(tmp_path, ranks_file, capsys):
    a = _corpus(tmp_path, "a", 30)
    opts = _options(tmp_path, [a], tokenizer=str(ranks_file))
    first = prepare(opts)
    shard = tmp_path / "out" / "train" / "train_000000.bin"
    stamp = shard.stat().st_mtime_ns
    assert prepare(opts) == first
    assert shard.stat().st_mtime_ns == stamp
    assert "up to date" in capsys.readouterr().err
    _corpus(tmp_path, "a", 31)
    second = prepare(opts)
    assert second["build_key"] != first["build_key"]
    assert second["splits"]["train"]["documents"] + second["splits"]["val"]["documents"] == 31
    changed = prepare(_options(tmp_path, [a], tokenizer=str(ranks_file), val_fraction=0.5))
    assert changed["build_key"] != second["build_key"]


def test_a_changed_tokenizer_rebuilds_however_it_is_named(tmp_path, make_ranks):
    # the key holds the tokenizer's fingerprint: a prefixed spec (not a path) must not hide a changed file
    a = _corpus(tmp_path, "a", 30)
    ranks = make_ranks("r.tiktoken")
    opts = _options(tmp_path, [a], tokenizer=f"tiktoken:{ranks}")
    first = prepare(opts)
    assert prepare(opts)["build_key"] == first["build_key"]
    make_ranks("r.tiktoken", [b"th", b"he"])  # other merges: another tokenizer at the same path
    assert prepare(opts)["build_key"] != first["build_key"]


def test_a_worker_that_cannot_start_fails_the_run_instead_of_hanging(tmp_path, ranks_file, monkeypatch):
    import importlib
    import signal

    prepare_module = importlib.import_module("sasformer.data.prepare")  # the package exports the function

    def broken_worker(tokenizer_dir):
        raise OSError("cannot load the tokenizer here")

    def hung(signum, frame):
        raise TimeoutError("prepare hung after its worker failed")

    monkeypatch.setattr(prepare_module, "_init_worker", broken_worker)
    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(120)  # a hang fails this test, not the whole suite
    try:
        with pytest.raises(RuntimeError, match="tokenizer worker process died"):
            prepare(_options(tmp_path, [_corpus(tmp_path, "a", 40)], tokenizer=str(ranks_file), workers=2))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert not (tmp_path / "out").exists()


def test_workers_do_not_change_output(tmp_path, ranks_file):
    a = _corpus(tmp_path, "a", 700)
    one = prepare(_options(tmp_path, [a], out="w1", tokenizer=str(ranks_file), shard_tokens=5000))
    two = prepare(_options(tmp_path, [a], out="w2", tokenizer=str(ranks_file), shard_tokens=5000, workers=2))
    assert one["splits"] == two["splits"] and len(one["splits"]["train"]["shards"]) > 1
    for split in ("train", "val"):
        for shard in one["splits"][split]["shards"]:
            assert (tmp_path / "w1" / split / shard["file"]).read_bytes() == \
                (tmp_path / "w2" / split / shard["file"]).read_bytes()


def test_at_least_one_val_document(tmp_path, ranks_file):
    a = _corpus(tmp_path, "a", 3)
    meta = prepare(_options(tmp_path, [a], tokenizer=str(ranks_file), val_fraction=1e-9))
    assert (meta["splits"]["train"]["documents"], meta["splits"]["val"]["documents"]) == (2, 1)
    with pytest.raises(ValueError, match="fewer than 2 non-empty documents"):
        prepare(_options(tmp_path, [_corpus(tmp_path, "one", 1)], out="o2", tokenizer=str(ranks_file)))


def test_failure_leaves_no_output(tmp_path, ranks_file):
    good = _corpus(tmp_path, "a", 10)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: not valid JSON"):
        prepare(_options(tmp_path, [good, bad], tokenizer=str(ranks_file)))
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    # a failed rebuild keeps the previous complete output
    prepare(_options(tmp_path, [good], tokenizer=str(ranks_file)))
    before = json.loads((tmp_path / "out" / "meta.json").read_text())
    with pytest.raises(ValueError, match="not valid JSON"):
        prepare(_options(tmp_path, [good, bad], tokenizer=str(ranks_file)))
    assert json.loads((tmp_path / "out" / "meta.json").read_text()) == before


def test_refuses_foreign_output_folder(tmp_path, ranks_file):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious.txt").write_text("keep me")
    with pytest.raises(ValueError, match="is not a sasformer data folder"):
        prepare(_options(tmp_path, [_corpus(tmp_path, "a", 5)], tokenizer=str(ranks_file)))
    assert (tmp_path / "out" / "precious.txt").read_text() == "keep me"


def test_damaged_output_is_rebuilt(tmp_path, ranks_file, capsys):
    opts = _options(tmp_path, [_corpus(tmp_path, "a", 20)], tokenizer=str(ranks_file))
    meta = prepare(opts)
    shard = tmp_path / "out" / "train" / meta["splits"]["train"]["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-2])
    assert read_meta(tmp_path / "out") is None
    rebuilt = prepare(opts)
    assert rebuilt["splits"] == meta["splits"] and read_meta(tmp_path / "out") == rebuilt
    assert "incomplete or damaged" in capsys.readouterr().err
    # shards without the tokenizer saved beside them cannot be loaded: also rebuilt
    import shutil

    shutil.rmtree(tmp_path / "out" / "tokenizer")
    assert read_meta(tmp_path / "out") is None
    prepare(opts)
    assert "incomplete or damaged" in capsys.readouterr().err
    assert load_data_tokenizer(tmp_path / "out").fingerprint == meta["tokenizer_fingerprint"]


def test_option_errors(tmp_path, ranks_file):
    a = _corpus(tmp_path, "a", 5)
    with pytest.raises(ValueError, match="exactly one of --tokenizer"):
        prepare(_options(tmp_path, [a]))
    with pytest.raises(ValueError, match="--val-fraction"):
        prepare(_options(tmp_path, [a], tokenizer=str(ranks_file), val_fraction=1.5))
    with pytest.raises(ValueError, match="too small"):
        prepare(_options(tmp_path, [a], vocab_size=100))


def test_command(tmp_path, ranks_file, capsys):
    from sasformer.commands import prepare as command

    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    a = _corpus(tmp_path, "a", 20)
    args = parser.parse_args([str(a), "--out", str(tmp_path / "cli"), "--tokenizer", str(ranks_file),
                              "--workers", "1", "--no-progress"])
    assert command.run(args) == 0
    assert "train" in capsys.readouterr().out
    assert sum(1 for _ in eval_batches(tmp_path / "cli", seq_len=7, batch_size=2)) > 0
    with pytest.raises(SystemExit):
        parser.parse_args([str(a), "--out", "x", "--tokenizer", "t", "--vocab-size", "300"])


# documents that share a split key (an id, or the text when there is no id) always share a split


def _jsonl_records(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize("val_fraction", [0.005, 0.5])  # the key's value (0.18) above / below the fraction
@pytest.mark.parametrize("records, named", [
    ([{"id": "x", "text": f"document {i}"} for i in range(50)], "the id 'x'"),
    ([{"text": "one text, copied"} for _ in range(50)], "the text 'one text, copied'"),
])
def test_documents_with_one_shared_key_are_a_clear_error(tmp_path, ranks_file, records, named, val_fraction):
    assert split_score(Document("", "x")) == split_score(Document("x")) == pytest.approx(0.1775, abs=1e-4)
    a = _jsonl_records(tmp_path / "a.jsonl", records)
    with pytest.raises(ValueError) as err:
        prepare(_options(tmp_path, [a], tokenizer=str(ranks_file), val_fraction=val_fraction))
    message = str(err.value)
    assert f"all 50 documents have one split key, {named}" in message
    assert "lowering --val-fraction cannot help" in message and "distinct ids" in message
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_few_repeated_keys_all_in_val_are_named(tmp_path, ranks_file):
    scores = [split_score(Document("", str(i))) for i in range(2)]
    assert max(scores) < 0.5  # both ids land in val at --val-fraction 0.5
    a = _jsonl_records(tmp_path / "a.jsonl", [{"id": str(i % 2), "text": f"doc {i}"} for i in range(40)])
    with pytest.raises(ValueError, match=r"the 40 documents have only 2 distinct split keys \(the id '0' is repeated"):
        prepare(_options(tmp_path, [a], tokenizer=str(ranks_file), val_fraction=0.5))


def test_forced_val_document_with_copies_says_so(tmp_path, ranks_file, capsys):
    ids = sorted(["p", "q", "r"], key=lambda i: split_score(Document("", i)))
    lowest = ids[0]
    records = [{"id": lowest, "text": f"part {i}"} for i in range(5)] + [{"id": i, "text": i} for i in ids[1:]]
    meta = prepare(_options(tmp_path, [_jsonl_records(tmp_path / "a.jsonl", records)], tokenizer=str(ranks_file),
                            val_fraction=1e-9))
    assert (meta["splits"]["train"]["documents"], meta["splits"]["val"]["documents"]) == (2, 5)
    assert f"val holds the 5 documents with the id {lowest!r}" in capsys.readouterr().err
    assert sorted(_split_docs(tmp_path / "out", "val")) == [f"part {i}" for i in range(5)]


# OUT.partial / OUT.old are deleted only when prepare made them, and one run at a time writes OUT


@pytest.mark.parametrize("suffix", [".partial", ".old"])
def test_sibling_folders_not_made_by_prepare_are_kept(tmp_path, ranks_file, suffix):
    theirs = tmp_path / f"out{suffix}"
    (theirs / "sub").mkdir(parents=True)
    (theirs / "sub" / "precious.txt").write_text("keep me")
    with pytest.raises(ValueError, match=rf"out\{suffix} exists without the .* file `sasformer prepare` puts in"):
        prepare(_options(tmp_path, [_corpus(tmp_path, "a", 10)], tokenizer=str(ranks_file)))
    assert (theirs / "sub" / "precious.txt").read_text() == "keep me"
    assert not (tmp_path / "out").exists()


def test_an_up_to_date_folder_is_answered_without_the_lock(tmp_path, ranks_file, monkeypatch, capsys):
    """A read-only data mount (no lock file can be made beside OUT) still answers "up to date"."""
    import importlib

    prepare_module = importlib.import_module("sasformer.data.prepare")
    opts = _options(tmp_path, [_corpus(tmp_path, "a", 10)], tokenizer=str(ranks_file))
    meta = prepare(opts)

    def no_lock(out):
        raise ValueError(f"cannot open the lock file beside {out}")

    monkeypatch.setattr(prepare_module, "_exclusive_lock", no_lock)
    assert prepare(opts) == meta
    assert "up to date" in capsys.readouterr().err
    opts.force = True
    with pytest.raises(ValueError, match="cannot open the lock file"):  # a build does need it
        prepare(opts)


def test_leftovers_of_an_interrupted_run_are_removed(tmp_path, ranks_file):
    from sasformer.data.prepare import TEMP_MARKER

    for suffix in (".partial", ".old"):  # as a killed run leaves them: marked, holding anything
        leftover = tmp_path / f"out{suffix}"
        (leftover / "train").mkdir(parents=True)
        (leftover / "train" / "train_000000.bin").write_bytes(b"half")
        (leftover / TEMP_MARKER).write_text("")
    opts = _options(tmp_path, [_corpus(tmp_path, "a", 10)], tokenizer=str(ranks_file))
    prepare(opts)
    opts.force = True
    prepare(opts)  # a rebuild moves the previous output to OUT.old (marked) and removes it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "out", "out.lock", "tiny.tiktoken"]
    assert not (tmp_path / "out" / TEMP_MARKER).exists()
    assert read_meta(tmp_path / "out") is not None


def test_a_second_run_on_the_same_out_is_refused_while_the_first_builds(tmp_path, ranks_file, monkeypatch):
    pytest.importorskip("fcntl")
    import importlib

    prepare_module = importlib.import_module("sasformer.data.prepare")
    tokenize = prepare_module._tokenize
    opts = _options(tmp_path, [_corpus(tmp_path, "a", 20)], tokenizer=str(ranks_file))
    refusals = []

    def tokenize_while_another_run_starts(*args, **kwargs):
        if refusals:  # the second run's own tokenizing, were it let in
            return tokenize(*args, **kwargs)
        refusals.append("")
        # a second run starting now would, unlocked, delete this run's OUT.partial under it
        holder = f"{re.escape(socket.gethostname())}:{os.getpid()}"
        held = rf"another `sasformer prepare` \(host:process {holder}\) is writing"
        with pytest.raises(ValueError, match=held) as err:
            prepare(_options(tmp_path, [_corpus(tmp_path, "b", 20)], tokenizer=str(ranks_file)))
        refusals.append(str(err.value))
        return tokenize(*args, **kwargs)

    monkeypatch.setattr(prepare_module, "_tokenize", tokenize_while_another_run_starts)
    meta = prepare(opts)
    assert len(refusals) == 2 and "out.lock" in refusals[1]
    assert read_meta(tmp_path / "out") == meta
    monkeypatch.setattr(prepare_module, "_tokenize", tokenize)
    opts.force = True
    assert prepare(opts)["splits"] == meta["splits"]  # the lock is released when a run ends


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads the workers' open files from /proc")
def test_tokenizer_workers_do_not_hold_the_lock(tmp_path, ranks_file, monkeypatch):
    """Forked workers close their copy of the lock: one that outlives a killed run must not block the next."""
    pytest.importorskip("fcntl")
    import importlib

    prepare_module = importlib.import_module("sasformer.data.prepare")
    encode = prepare_module._encode_docs

    def encode_checking_open_files(*args, **kwargs):  # runs in the worker
        held = [os.readlink(f) for f in Path("/proc/self/fd").iterdir() if os.path.islink(f)]
        if any(target.endswith("out.lock") for target in held):
            raise RuntimeError("a tokenizer worker holds the lock file open")
        return encode(*args, **kwargs)

    monkeypatch.setattr(prepare_module, "_encode_docs", encode_checking_open_files)
    meta = prepare(_options(tmp_path, [_corpus(tmp_path, "a", 40)], tokenizer=str(ranks_file), workers=2))
    assert meta["splits"]["train"]["documents"] > 0


def test_a_marker_left_in_a_complete_output_is_removed(tmp_path, ranks_file):
    """A run killed after its output took its name but before the marker went: the marker must not stay, or a
    user's later `mv out out.old` would hand that folder to prepare to delete."""
    from sasformer.data.prepare import TEMP_MARKER

    opts = _options(tmp_path, [_corpus(tmp_path, "a", 10)], tokenizer=str(ranks_file))
    meta = prepare(opts)
    (tmp_path / "out" / TEMP_MARKER).write_text("")
    assert prepare(opts) == meta and not (tmp_path / "out" / TEMP_MARKER).exists()


def test_the_bpe_sample_takes_a_share_of_every_input(tmp_path, monkeypatch):
    # with a budget the first input alone would fill, the second must still be in the tokenizer's sample
    import importlib

    prepare_module = importlib.import_module("sasformer.data.prepare")  # the package re-exports the function
    seen: list[str] = []
    real = prepare_module.train_bpe

    def recording(texts, *args, **kwargs):
        texts = list(texts)
        seen.extend(texts)
        return real(texts, *args, **kwargs)

    monkeypatch.setattr(prepare_module, "train_bpe", recording)
    (tmp_path / "code").mkdir()  # a folder of several files is one input: its share is not one per file
    for part in range(3):
        _write_jsonl(tmp_path / "code" / f"part{part}.jsonl",
                     [(f"c{part}-{i}", f"def f{i}(x): return x * {i}\n" * 40) for i in range(20)])
    prose = _write_jsonl(tmp_path / "prose.jsonl", [(f"p{i}", f"The cat sat on mat {i}. " * 40) for i in range(60)])
    budget_mb = 40_000 / 2**20  # about 40 KB: a third of the code alone
    prepare(_options(tmp_path, [tmp_path / "code", prose], vocab_size=300, bpe_sample_mb=budget_mb))
    from_code = sum(len(t.encode()) for t in seen if t.startswith("def "))
    from_prose = sum(len(t.encode()) for t in seen if t.startswith("The cat"))
    assert from_prose > 0 and 0.5 < from_code / from_prose < 2.0
    assert from_code + from_prose < 40_000 + 2 * 1200  # each share ends within one document of its size
