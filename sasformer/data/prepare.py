"""``sasformer prepare``: documents -> tokenizer -> token shards, written so a crash never leaves a complete-looking
output and an unchanged re-run does nothing.

Output folder::

    OUT/meta.json        tokenizer fingerprint, vocab size, token counts, inputs, split rule, build key
    OUT/tokenizer/       the tokenizer (load with ``load_tokenizer(OUT / "tokenizer")``)
    OUT/train/*.bin      token shards (see :mod:`sasformer.data.shards`)
    OUT/val/*.bin

The output is built in ``OUT.partial`` and renamed into place when complete; ``meta.json`` is written last. A run
holds an exclusive lock on ``OUT.lock`` (beside OUT) throughout, and deletes an ``OUT.partial`` or ``OUT.old`` only
when it carries the marker file that ``prepare`` writes into the folders it makes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import socket
import struct
import sys
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from sasformer.data.shards import FORMAT_VERSION, Shard, ShardWriter, token_dtype
from sasformer.data.sources import DefaultCorpusSource, Document, FileSource, Source, resolve_inputs
from sasformer.data.tokenizer import DEFAULT_EOT, Tokenizer, load_tokenizer, train_bpe
from sasformer.data.tokenizer import META_FILE as TOKENIZER_FILE

try:
    import fcntl
except ImportError:  # Windows: runs go unlocked (see _exclusive_lock)
    fcntl = None  # type: ignore[assignment]

META_FILE = "meta.json"
# written into OUT.partial and OUT.old when prepare makes them: only folders carrying it are ever deleted
TEMP_MARKER = ".sasformer-prepare-temp"
META_FORMAT = "sasformer-token-data"
SPLIT_RULE = (
    "a document goes to val when the first 8 bytes of sha256(id, or text when it has no id), read as a big-endian "
    "integer and divided by 2**64, are below val_fraction; if no document lands in val, the one with the smallest "
    "such value does"
)
# the lock file's descriptor while this process holds it (forked tokenizer workers close their copy)
_held_lock_fd: int | None = None
# documents per unit of work handed to a tokenizer worker
_CHUNK_DOCS = 256
# distinct split keys remembered to explain a split that cannot be made; bounded so memory stays flat
_KEYS_REMEMBERED = 1024


@dataclass
class PrepareOptions:
    """Everything that decides the output (``workers`` only decides the speed)."""

    inputs: list[str]
    out: str
    tokenizer: str | None = None
    vocab_size: int | None = None
    eot_token: str | None = None
    val_fraction: float = 0.005
    text_field: str = "text"
    shard_tokens: int = 100_000_000
    bpe_sample_mb: float = 256.0
    workers: int = field(default_factory=lambda: os.cpu_count() or 1, metadata={"key": False})
    force: bool = field(default=False, metadata={"key": False})
    progress: bool = field(default=True, metadata={"key": False})

    def validate(self) -> None:
        if (self.tokenizer is None) == (self.vocab_size is None):
            raise ValueError("pass exactly one of --tokenizer SPEC (use a tokenizer) or --vocab-size N (train a BPE)")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        if self.shard_tokens < 1024:
            raise ValueError(f"--shard-tokens must be at least 1024, got {self.shard_tokens}")
        if self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")
        if self.bpe_sample_mb <= 0:
            raise ValueError(f"--bpe-sample-mb must be positive, got {self.bpe_sample_mb}")


def split_score(doc: Document) -> float:
    """The document's place in [0, 1) for the train/val split (see :data:`SPLIT_RULE`)."""
    key = doc.id if doc.id is not None else doc.text
    (value,) = struct.unpack(">Q", hashlib.sha256(key.encode("utf-8")).digest()[:8])
    return value / 2.0**64


def _split_key(doc: Document) -> str:
    return doc.id if doc.id is not None else doc.text


def _describe_key(doc: Document) -> str:
    if doc.id is not None:
        return f"the id {doc.id!r}"
    text = doc.text if len(doc.text) <= 40 else doc.text[:40] + "..."
    return f"the text {text!r}"


class _KeyTally:
    """Distinct split keys among the documents, counted up to :data:`_KEYS_REMEMBERED`: documents sharing a key
    always share a split, so a corpus of copies cannot be split however many documents it has."""

    def __init__(self) -> None:
        self.scores: set[float] = set()
        self.overflow = False
        self.repeated: Document | None = None  # a document whose key an earlier one had

    def add(self, doc: Document, score: float) -> None:
        if score in self.scores:
            if self.repeated is None:
                self.repeated = doc
        elif len(self.scores) < _KEYS_REMEMBERED:
            self.scores.add(score)
        else:
            self.overflow = True

    @property
    def distinct(self) -> int | None:
        """The number of distinct keys; None when more than :data:`_KEYS_REMEMBERED`."""
        return None if self.overflow else len(self.scores)


# why documents sharing a key are never split apart, and what to do about it
_SHARED_KEY_RULE = "documents with the same id (or, without an id, the same text) always go to the same split"
_SHARED_KEY_FIX = ("give documents that differ distinct ids (a text file's id is its name, or its path below the "
                   "input folder), and remove copies of the same text")


def _one_key_error(documents: int, keys: _KeyTally) -> ValueError:
    assert keys.repeated is not None
    return ValueError(
        f"all {documents} documents have one split key, {_describe_key(keys.repeated)}, and {_SHARED_KEY_RULE}: "
        f"no train/val split is possible (lowering --val-fraction cannot help); {_SHARED_KEY_FIX}"
    )


def _all_in_val_error(documents: int, keys: _KeyTally) -> ValueError:
    if keys.distinct is not None and keys.distinct < documents and keys.repeated is not None:
        return ValueError(
            f"every document landed in val: the {documents} documents have only {keys.distinct} distinct split "
            f"keys ({_describe_key(keys.repeated)} is repeated), and {_SHARED_KEY_RULE}; lower --val-fraction, "
            f"or {_SHARED_KEY_FIX}"
        )
    return ValueError("every document landed in val; lower --val-fraction or add documents")


def _source_record(source: Source) -> dict:
    if isinstance(source, FileSource):
        st = source.path.stat()
        return {"file": str(source.path.resolve()), "id": source.text_id, "bytes": st.st_size,
                "mtime_ns": st.st_mtime_ns}
    if isinstance(source, DefaultCorpusSource):
        from sasformer.data.default_corpus import corpus_id

        return {"default_corpus": corpus_id()}
    return {"hf_dataset": source.name, "config": source.config, "split": source.split}


def build_key(options: PrepareOptions, sources: list[Source], tokenizer: Tokenizer | None = None) -> str:
    """sha256 over everything that decides the output: input files (path, size, mtime), options, and the given
    tokenizer's fingerprint (its content, however ``--tokenizer`` names it: a file, a prefixed spec, a hub name)."""
    opts = {k: v for k, v in asdict(options).items()
            if PrepareOptions.__dataclass_fields__[k].metadata.get("key", True) and k not in ("inputs", "out")}
    if tokenizer is not None:
        opts["tokenizer_fingerprint"] = tokenizer.fingerprint
    payload = {"format": FORMAT_VERSION, "options": opts, "inputs": [_source_record(s) for s in sources]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _our_meta(out: Path) -> dict | None:
    """``OUT/meta.json`` when it was written by ``prepare`` (complete or not), else None."""
    try:
        meta = json.loads((out / META_FILE).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == META_FORMAT else None


def _complete(out: Path, meta: dict) -> bool:
    if not (out / meta.get("tokenizer", {}).get("dir", "tokenizer") / TOKENIZER_FILE).is_file():
        return False  # the shards alone cannot be read: the loader needs the tokenizer saved beside them
    try:
        itemsize = np.dtype(meta["dtype"]).itemsize
        for split, info in meta["splits"].items():
            for shard in info["shards"]:
                path = out / split / shard["file"]
                if not path.is_file() or path.stat().st_size != 128 + shard["tokens"] * itemsize:
                    return False
    except (KeyError, TypeError):
        return False
    return True


def read_meta(out: str | os.PathLike) -> dict | None:
    """``OUT/meta.json`` if OUT is a complete prepared folder (every shard present with the recorded size)."""
    meta = _our_meta(Path(out))
    return meta if meta is not None and _complete(Path(out), meta) else None


class _Progress:
    """A tqdm bar over input bytes (with ETA) when sizes are known, else over documents."""

    def __init__(self, sources: list[Source], desc: str, enabled: bool) -> None:
        from tqdm.auto import tqdm

        sized = all(getattr(s, "size", None) is not None for s in sources)
        self.sources = sources
        self.by_bytes = sized
        total = sum(s.size for s in sources) if sized else None
        self.bar = tqdm(total=total, desc=desc, unit="B" if sized else "doc", unit_scale=True, disable=not enabled,
                        file=sys.stderr, dynamic_ncols=True)
        self.done_bytes = 0

    def update(self, source: Source, docs: int) -> None:
        if self.by_bytes:
            self.bar.n = self.done_bytes + source.bytes_read
            self.bar.refresh()
        else:
            self.bar.update(docs)

    def finish_source(self, source: Source) -> None:
        if self.by_bytes:
            self.done_bytes += source.size
            self.bar.n = self.done_bytes
            self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def _iter_labelled(sources: list[Source], val_fraction: float, forced_val: str | None,
                   progress: _Progress | None = None) -> Iterator[tuple[Document, bool, float]]:
    """Every document with its split (True = val) and split score; advances the progress bar."""
    for source in sources:
        count = 0
        for doc in source.documents():
            score = split_score(doc)
            is_val = score < val_fraction or (forced_val is not None and _split_key(doc) == forced_val)
            count += 1
            if progress is not None and count % 64 == 0:
                progress.update(source, 64)
            yield doc, is_val, score
        if progress is not None:
            progress.update(source, count % 64)
            progress.finish_source(source)


def _train_tokenizer(options: PrepareOptions, sources: list[Source]) -> Tokenizer:
    budget = int(options.bpe_sample_mb * 2**20)

    # each named input (file, folder, glob, dataset) gets an even share of what is left (UTF-8 bytes), so a
    # first folder of code does not take the whole budget of a corpus of code and prose; a short input leaves
    # its rest to the next
    inputs: dict[object, list[Source]] = {}
    for source in sources:
        inputs.setdefault(source.input_spec or id(source), []).append(source)

    def sample() -> Iterator[str]:
        used = 0
        for i, group in enumerate(inputs.values()):
            share, taken = (budget - used) / (len(inputs) - i), 0
            for doc, is_val, _ in _iter_labelled(group, options.val_fraction, None):
                if taken >= share:
                    break
                if not is_val:
                    yield doc.text
                    taken += len(doc.text.encode("utf-8"))
            used += taken

    print(f"training a byte-level BPE with {options.vocab_size} ids on up to {options.bpe_sample_mb:g} MB of "
          "train-split text, an even share from each input", file=sys.stderr)
    return train_bpe(sample(), options.vocab_size, options.eot_token or DEFAULT_EOT, show_progress=options.progress)


_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_dir: str) -> None:
    global _worker_tokenizer
    if _held_lock_fd is not None:
        # a forked worker shares the run's lock; closing its copy lets the lock end with the run, even when
        # the run is killed and this worker lives on for a while
        os.close(_held_lock_fd)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tokenizer = load_tokenizer(tokenizer_dir)
    if hasattr(_worker_tokenizer, "num_threads"):
        _worker_tokenizer.num_threads = 1


def _encode_docs(tokenizer: Tokenizer, texts: list[str], dtype: np.dtype) -> np.ndarray:
    """Token ids of ``texts`` as one flat array, an end-of-text token before each document."""
    ids = tokenizer.encode_batch(texts)
    out = np.empty(sum(len(x) for x in ids) + len(ids), dtype=dtype)
    pos = 0
    for doc in ids:
        out[pos] = tokenizer.eot_id
        out[pos + 1 : pos + 1 + len(doc)] = doc
        pos += 1 + len(doc)
    return out


def _encode_job(job: tuple[bool, list[str], str]) -> tuple[bool, np.ndarray]:
    is_val, texts, dtype = job
    assert _worker_tokenizer is not None
    return is_val, _encode_docs(_worker_tokenizer, texts, np.dtype(dtype))


def _encode_in_workers(jobs: Iterator[tuple[bool, list[str], str]], workers: int, ctx, tokenizer_dir: Path
                       ) -> Iterator[tuple[bool, np.ndarray]]:
    """The encoded jobs in input order, at most two per worker in flight (memory stays bounded).

    A worker that dies (killed for memory, or failing to load the tokenizer) ends the run with an error,
    where ``multiprocessing.Pool`` would replace the worker and wait for its job forever.
    """
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(str(tokenizer_dir),)) as pool:
        window: deque[Future] = deque()
        try:
            for job in jobs:
                window.append(pool.submit(_encode_job, job))
                if len(window) >= 2 * workers:
                    yield window.popleft().result()
            while window:
                yield window.popleft().result()
        except BrokenProcessPool as err:
            raise RuntimeError(f"a tokenizer worker process died ({err}): killed for memory, or it could not load "
                               f"the tokenizer; --workers 1 runs in this process and shows the error") from err
        finally:
            for future in window:
                future.cancel()


def _tokenize(options: PrepareOptions, sources: list[Source], tokenizer: Tokenizer, tokenizer_dir: Path,
              build_dir: Path, forced_val: str | None) -> tuple[dict, tuple[str, str] | None, _KeyTally]:
    """Write the train/val shards; returns the per-split summary, the key of the lowest-scoring document (with its
    description) and the tally of distinct keys."""
    dtype = token_dtype(tokenizer.vocab_size)
    writers = {
        split: ShardWriter(build_dir / split, split, tokenizer.vocab_size, tokenizer.fingerprint, options.shard_tokens)
        for split in ("train", "val")
    }
    docs = {"train": 0, "val": 0}
    best: tuple[float, tuple[str, str] | None] = (2.0, None)
    keys = _KeyTally()
    progress = _Progress(sources, "tokenizing", options.progress)

    def jobs() -> Iterator[tuple[bool, list[str], str]]:
        nonlocal best
        pending: dict[bool, list[str]] = {False: [], True: []}
        for doc, is_val, score in _iter_labelled(sources, options.val_fraction, forced_val, progress):
            if score < best[0]:
                best = (score, (_split_key(doc), _describe_key(doc)))
            keys.add(doc, score)
            docs["val" if is_val else "train"] += 1
            pending[is_val].append(doc.text)
            if len(pending[is_val]) >= _CHUNK_DOCS:
                yield is_val, pending[is_val], dtype.str
                pending[is_val] = []
        for is_val, texts in pending.items():
            if texts:
                yield is_val, texts, dtype.str

    try:
        if options.workers > 1:
            # tokenizers' own thread pool would oversubscribe the cores the worker processes already use
            saved = os.environ.get("TOKENIZERS_PARALLELISM")
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
            ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
            try:
                # closed at once if a write fails (disk full): the pool's processes end then, not at collection
                with contextlib.closing(_encode_in_workers(jobs(), options.workers, ctx, tokenizer_dir)) as encoded:
                    for is_val, tokens in encoded:
                        writers["val" if is_val else "train"].add(tokens)
            finally:
                if saved is None:
                    del os.environ["TOKENIZERS_PARALLELISM"]
                else:
                    os.environ["TOKENIZERS_PARALLELISM"] = saved
        else:
            for is_val, texts, _ in jobs():
                writers["val" if is_val else "train"].add(_encode_docs(tokenizer, texts, dtype))
    finally:
        progress.close()
    summary = {}
    for split, writer in writers.items():
        shards = writer.close()
        summary[split] = {"tokens": writer.num_tokens, "documents": docs[split], "shards": shards}
    return summary, best[1], keys


def _sibling(out: Path, suffix: str) -> Path:
    return out.with_name(out.name + suffix)


@contextlib.contextmanager
def _exclusive_lock(out: Path) -> Iterator[None]:
    """Hold ``OUT.lock`` for the whole run, so two runs on one OUT cannot delete each other's ``OUT.partial`` or
    swap half-built folders. The lock file stays: removing it would let a run that opened it before the removal
    lock a file that later runs no longer see."""
    lock = _sibling(out, ".lock")
    if fcntl is None:
        print(f"note: no fcntl on this platform, so {out} is not locked; do not run two `sasformer prepare` on it "
              "at once", file=sys.stderr)
        yield
        return
    global _held_lock_fd
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise ValueError(f"cannot open the lock file {lock} ({err}); it must be a file prepare can create or "
                         "open beside --out") from err
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise ValueError(f"another `sasformer prepare` (host:process {holder}) is writing {out}: it holds the lock "
                             f"{lock}; wait for it to finish or choose another --out (nothing was changed)") from None
        os.ftruncate(fd, 0)
        # named by a run that finds the lock held (with the host: OUT may be on a shared filesystem)
        os.pwrite(fd, f"{socket.gethostname()}:{os.getpid()}\n".encode(), 0)
        _held_lock_fd = fd
        yield
    finally:
        if _held_lock_fd == fd:  # a refused attempt must not forget the holder's descriptor
            _held_lock_fd = None
        os.close(fd)  # releases the lock


def _mark(folder: Path) -> None:
    (folder / TEMP_MARKER).write_text("made by `sasformer prepare`, which deletes this folder\n")


def _remove_leftover(folder: Path) -> None:
    """Delete ``folder`` (an ``OUT.partial`` or ``OUT.old``) if it carries :data:`TEMP_MARKER`; refuse if it does
    not, since then it is someone else's. The marker goes last, so a removal cut short can be finished later."""
    if not folder.exists() and not folder.is_symlink():
        return
    if folder.is_symlink() or not folder.is_dir() or not (folder / TEMP_MARKER).is_file():
        raise ValueError(
            f"{folder} exists without the {TEMP_MARKER} file `sasformer prepare` puts in the folders it makes: it "
            "is someone else's, or left by an interrupted prepare of a version before that file; prepare needs "
            "the name, so delete it if it is such a left-over, else move it away or choose another --out (it was "
            "left untouched)"
        )
    for child in folder.iterdir():
        if child.name == TEMP_MARKER:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    (folder / TEMP_MARKER).unlink()
    folder.rmdir()


def prepare(options: PrepareOptions) -> dict:
    """Build (or find up to date) the prepared folder ``options.out``; returns its metadata."""
    options.validate()
    out = Path(options.out)
    sources = resolve_inputs(options.inputs, options.text_field)
    given = load_tokenizer(options.tokenizer, options.eot_token) if options.tokenizer is not None else None
    key = build_key(options, sources, given)
    # an up-to-date folder needs no lock (so a read-only data mount still answers); a build does
    current = _up_to_date(options, out, key)
    if current is not None and not (out / TEMP_MARKER).exists():
        return current
    with _exclusive_lock(out.resolve()):
        current = _up_to_date(options, out, key, quiet=True)  # another run may have built it meanwhile
        if current is not None:
            # a run killed between its last renames can leave the marker in a complete OUT: not ours to delete
            # should OUT be renamed later, so it goes
            (out / TEMP_MARKER).unlink(missing_ok=True)
            return current
        return _build(options, out, sources, given, key)


def _up_to_date(options: PrepareOptions, out: Path, key: str, quiet: bool = False) -> dict | None:
    """``out``'s metadata when it is complete and built from these inputs and options; None when it needs
    building. Refuses a folder prepare did not make, before anything is written."""
    existing = _our_meta(out)
    if out.exists() and existing is None and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(
            f"{out} exists but is not a sasformer data folder (no meta.json written by `sasformer prepare`); "
            "remove it or choose another --out (nothing was changed)"
        )
    if existing is None:
        return None
    if not _complete(out, existing):
        if not quiet:
            print(f"{out} is incomplete or damaged (a shard or the tokenizer is missing, or a shard has the wrong "
                  "size); rebuilding", file=sys.stderr)
        return None
    if existing.get("build_key") == key and not options.force:
        print(f"{out} is up to date (same inputs and options); nothing to do", file=sys.stderr)
        return existing
    return None


def _build(options: PrepareOptions, out: Path, sources: list[Source], given: Tokenizer | None, key: str) -> dict:
    """:func:`prepare` once it holds the lock on ``out`` and found it in need of building."""
    build_dir = _sibling(out.resolve(), ".partial")
    # both checked before any work, so a folder that is not ours stops the run at once, not after a long build
    _remove_leftover(build_dir)
    _remove_leftover(_sibling(out.resolve(), ".old"))
    build_dir.mkdir(parents=True)
    start = time.time()
    try:
        _mark(build_dir)
        if given is not None:
            tokenizer = given
        else:
            tokenizer = _train_tokenizer(options, sources)
        tokenizer_dir = tokenizer.save(build_dir / "tokenizer")
        print(f"tokenizer: {tokenizer.kind}, vocab {tokenizer.vocab_size}, eot id {tokenizer.eot_id}, "
              f"fingerprint {tokenizer.fingerprint[:16]}", file=sys.stderr)

        summary, lowest, keys = _tokenize(options, sources, tokenizer, tokenizer_dir, build_dir, None)
        documents = summary["train"]["documents"] + summary["val"]["documents"]
        if documents < 2:
            raise ValueError(f"inputs {options.inputs} hold fewer than 2 non-empty documents; a train and a val "
                             "split need at least one each (a plain text file is one document: split a single "
                             "text into several files, or give JSONL with one document a line)")
        if keys.distinct == 1:
            # one key for every document: no --val-fraction can split them, and forcing val would empty train
            raise _one_key_error(documents, keys)
        if summary["val"]["documents"] == 0:
            # too few documents for val_fraction: redo with the lowest-scoring document forced into val
            assert lowest is not None
            for split in ("train", "val"):
                shutil.rmtree(build_dir / split)
            summary, _, _ = _tokenize(options, sources, tokenizer, tokenizer_dir, build_dir, lowest[0])
            if summary["val"]["documents"] > 1:
                print(f"val holds the {summary['val']['documents']} documents with {lowest[1]} (no document fell "
                      "below --val-fraction, and documents with the same id or text share a split)", file=sys.stderr)
        if summary["train"]["documents"] == 0:
            raise _all_in_val_error(documents, keys)

        for split in ("train", "val"):
            for shard in summary[split]["shards"]:
                Shard(build_dir / split / shard["file"], tokenizer.fingerprint, validate="full")
        meta = {
            "format": META_FORMAT,
            "shard_format_version": FORMAT_VERSION,
            "dtype": token_dtype(tokenizer.vocab_size).name,
            "tokenizer": {"kind": tokenizer.kind, "spec": options.tokenizer, "fingerprint": tokenizer.fingerprint,
                          "vocab_size": tokenizer.vocab_size, "eot_id": tokenizer.eot_id,
                          "eot_token": tokenizer.eot_token, "dir": "tokenizer"},
            "vocab_size": tokenizer.vocab_size,
            "tokenizer_fingerprint": tokenizer.fingerprint,
            "splits": summary,
            "inputs": {"specs": list(options.inputs), "sources": [_source_record(s) for s in sources]},
            "split_rule": SPLIT_RULE,
            "val_fraction": options.val_fraction,
            "document_separator": "end-of-text token before each document",
            "options": {k: v for k, v in asdict(options).items() if k not in ("inputs", "force", "progress")},
            "build_key": key,
            "seconds": round(time.time() - start, 1),
        }
        (build_dir / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        _swap_into_place(build_dir, out.resolve())
    except BaseException:
        shutil.rmtree(build_dir, ignore_errors=True)
        raise
    return meta


def _swap_into_place(build_dir: Path, out: Path) -> None:
    """Replace ``out`` with the finished ``build_dir``; the old output is removed only after the rename."""
    old = _sibling(out, ".old")
    _remove_leftover(old)  # refuses a folder that appeared there during the build
    # every folder is marked before it takes a temporary name and loses the marker only after it is OUT, so a
    # run killed between the renames never leaves an unmarked OUT.old that would block the next run
    if out.exists():
        _mark(out)
        os.replace(out, old)
    os.replace(build_dir, out)
    # the output carries no marker, so a copy of it a user makes (say as OUT.old) is never taken for ours
    (out / TEMP_MARKER).unlink()
    _remove_leftover(old)
