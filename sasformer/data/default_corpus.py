"""An offline corpus that every CPython installation carries: no download, deterministic, a few MB of English.

Three parts, in this order:

1. ``pydoc_data.topics``: the help topics of the Python language reference (what ``help("if")`` prints), one
   document per topic, id ``pydoc/<topic>``, topics sorted by name.
2. The docstrings of the standard library's pure-Python modules, read with :mod:`ast` (nothing is imported, so
   no module runs): one document per module holding its module, class and function docstrings, each headed by
   its qualified name; id ``stdlib/<dotted.module>``, modules sorted by path. Tests, ``idlelib``, ``lib2to3``,
   ``turtledemo`` and ``site-packages`` are left out.
3. The comments of the same modules (read with :mod:`tokenize`): one document per module, each block of
   consecutive comment lines a paragraph without its ``#`` marks; shebangs, coding lines, one-word lines and blocks of
   fewer than four words are dropped. id ``stdlib-comments/<dotted.module>``.

The text depends on the Python version (it is that version's documentation), so the tokens differ between
Python versions; within one version the order and the ids are fixed. It exists so that ``sasformer prepare
default`` and the quick-start work on a fresh machine. It is small and narrow (technical documentation of one
programming language): real experiments should bring their own data.
"""

from __future__ import annotations

import ast
import functools
import io
import itertools
import os
import sys
import sysconfig
import tokenize
from collections.abc import Iterator
from pathlib import Path

from sasformer.data.sources import Document

CORPUS_VERSION = 1
_SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "__pycache__", "turtledemo"}


def corpus_id() -> str:
    """Names the corpus contents: changes when this module's rules or the Python version change."""
    return f"sasformer-default-v{CORPUS_VERSION}-python{sys.version_info.major}.{sys.version_info.minor}"


def _topic_documents() -> Iterator[Document]:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return
    for name in sorted(topics):
        text = topics[name].strip()
        if text:
            yield Document(text, f"pydoc/{name}")


def _stdlib_files(root: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        files += [Path(dirpath, f) for f in filenames if f.endswith(".py")]
    return sorted(files)


def _module_text(path: Path, module: str) -> str:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return ""
    parts = []
    stack: list[tuple[ast.AST, str]] = [(tree, module)]
    while stack:
        node, name = stack.pop(0)
        doc = ast.get_docstring(node)
        if doc:
            parts.append(f"{name}\n\n{doc.strip()}")
        children = [c for c in ast.iter_child_nodes(node)
                    if isinstance(c, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
        stack[0:0] = [(c, f"{name}.{c.name}") for c in children]
    return "\n\n".join(parts)


def _comment_text(path: Path) -> str:
    try:
        tokens = list(tokenize.tokenize(io.BytesIO(path.read_bytes()).readline))
    except (tokenize.TokenError, SyntaxError, UnicodeDecodeError):
        return ""
    blocks: list[list[str]] = []
    last_row = -2
    for tok in tokens:
        if tok.type != tokenize.COMMENT:
            continue
        if tok.start[0] != last_row + 1 or not blocks:
            blocks.append([])
        last_row = tok.start[0]
        line = tok.string.lstrip("#").strip()
        # shebangs, coding cookies and one-word markers (noqa, pragma) are not prose
        if line.startswith("!") or "-*-" in line or len(line.split()) < 2:
            continue
        blocks[-1].append(line)
    paragraphs = ["\n".join(b) for b in blocks if sum(len(line.split()) for line in b) >= 4]
    return "\n\n".join(paragraphs)


def _stdlib_modules() -> Iterator[tuple[Path, str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in _stdlib_files(root):
        rel = path.relative_to(root).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        if parts:
            yield path, ".".join(parts)


def _docstring_documents() -> Iterator[Document]:
    for path, module in _stdlib_modules():
        text = _module_text(path, module)
        if text:
            yield Document(text, f"stdlib/{module}")


def _comment_documents() -> Iterator[Document]:
    for path, module in _stdlib_modules():
        text = _comment_text(path)
        if text:
            yield Document(text, f"stdlib-comments/{module}")


@functools.lru_cache(maxsize=1)
def _all_documents() -> tuple[Document, ...]:
    docs = tuple(itertools.chain(_topic_documents(), _docstring_documents(), _comment_documents()))
    if not docs:
        raise ValueError(
            "this Python installation has neither pydoc_data nor standard-library sources, so the default "
            "corpus is empty; pass your own text files instead"
        )
    return docs


def iter_default_corpus() -> Iterator[Document]:
    """Every document of the default corpus, in its fixed order (built once per process: a few MB).

    Raises ValueError if this Python carries none of the texts.
    """
    yield from _all_documents()
