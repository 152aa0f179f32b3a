"""An offline corpus that every CPython installation carries: no download, deterministic, a few MB of English.

Two parts, in this order:

1. ``pydoc_data.topics``: the help topics of the Python language reference (what ``help("if")`` prints), one
   document per topic, id ``pydoc/<topic>``, topics sorted by name.
2. The docstrings of the standard library's pure-Python modules, read with :mod:`ast` (nothing is imported, so
   no module runs): one document per module holding its module, class and function docstrings, each headed by
   its qualified name; id ``stdlib/<dotted.module>``, modules sorted by path. Tests, ``idlelib``, ``lib2to3``,
   and ``site-packages`` are left out.

The text depends on the Python version (it is that version's documentation), so the tokens differ between
Python versions; within one version the order and the ids are fixed. It exists so that ``sasformer prepare
default`` and the quick-start work on a fresh machine. It is small and narrow (technical documentation of one
programming language): real experiments should bring their own data.
"""

from __future__ import annotations

import ast
import os
import sys
import sysconfig
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


def _docstring_documents() -> Iterator[Document]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in _stdlib_files(root):
        rel = path.relative_to(root).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        if not parts:
            continue
        module = ".".join(parts)
        text = _module_text(path, module)
        if text:
            yield Document(text, f"stdlib/{module}")


def iter_default_corpus() -> Iterator[Document]:
    """Every document of the default corpus, in its fixed order. Raises if this Python carries no such text."""
    count = 0
    for doc in _topic_documents():
        count += 1
        yield doc
    for doc in _docstring_documents():
        count += 1
        yield doc
    if count == 0:
        raise ValueError(
            "this Python installation has neither pydoc_data nor standard-library sources, so the default "
            "corpus is empty; pass your own text files instead"
        )
