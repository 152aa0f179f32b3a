"""Graph breaks and recompilations ``torch.compile`` made while a block of code ran, with their reasons.

A graph break splits a compiled function into several graphs with eager Python between them; the model can
then run much slower than one graph would, and torch says so only in a warning in the log. Wrap the code
that compiles (a benchmark's warm-up steps, say) and report what was found::

    with watch_graph_breaks() as breaks:
        step()
    if breaks.count:
        print(breaks.warning("compiled step"))

The numbers are Dynamo's own records, which are private: the reason it keeps for each break (with the
source line; ``torch._dynamo.utils.graph_break_reasons``), else its counter per message
(``counters["graph_break"]``, which misses breaks on data-dependent branching); where neither exists, the
count is None ("unknown"), never an error.
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

# DDP's compiled graph is split on purpose at its gradient buckets (Dynamo's DDPOptimizer); counted apart
INTENTIONAL_PREFIX = "DDPOptimizer intentional graph-break"
# a reason's explanation is cut here in the short form (the full messages run to several paragraphs)
MAX_EXPLANATION = 160


class GraphBreakError(RuntimeError):
    """A compiled run broke its graph where the caller asked for none."""


@dataclass
class GraphBreaks:
    """What Dynamo did while a :func:`watch_graph_breaks` block ran.

    ``count``: graph breaks (None: this torch does not say); ``reasons``: short reason (with where it
    happened, when known) -> times seen; ``recompiles``: compilations of a function already compiled (after
    a guard failed, e.g. on a new shape); ``eager_frames``: functions Dynamo gave up on, which ran eagerly;
    ``intentional``: DDP's planned splits, not in ``count``. Fields are filled when the block ends.
    """

    count: int | None = None
    reasons: dict[str, int] = field(default_factory=dict)
    recompiles: int | None = None
    eager_frames: int | None = None
    intentional: int = 0

    @property
    def clean(self) -> bool:
        """No graph break, recompilation or eager fallback seen (False when unknown)."""
        return self.count == 0 and not self.recompiles and not self.eager_frames

    def summary(self) -> str:
        """A table cell: ``0``, ``unknown``, or ``12`` with recompilations and eager frames when any."""
        if self.count is None:
            return "unknown"
        extra = ([_plural(self.recompiles, "recompile")] if self.recompiles else []) + \
            ([_plural(self.eager_frames, "eager frame")] if self.eager_frames else [])
        return str(self.count) + (f" ({', '.join(extra)})" if extra else "")

    def findings(self) -> str:
        """``12 graph breaks, 3 recompilations, 1 function run eagerly`` (zeros after the first left out)."""
        if self.count is None:
            return "graph breaks unknown (this torch does not expose Dynamo's records)"
        return ", ".join([_plural(self.count, "graph break")] +
                         ([_plural(self.recompiles, "recompilation")] if self.recompiles else []) +
                         ([_plural(self.eager_frames, "function") + " run eagerly"] if self.eager_frames else []))

    def warning(self, what: str) -> str:
        """One loud line for the console: what happened, how often, and the most frequent reason."""
        top = max(self.reasons.items(), key=lambda kv: kv[1], default=None)
        reason = f"; most frequent ({top[1]}x): {top[0]}" if top else ""
        return f"WARNING: {what}: {self.findings()}{reason}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GraphBreaks:
        """The inverse of :meth:`to_dict` (keys this version does not know are ignored)."""
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    def check(self, what: str) -> None:
        """Raise :class:`GraphBreakError` if the block broke its graph (or the count is unknown)."""
        if self.count != 0:
            raise GraphBreakError(f"{what}: {self.findings()}" + "".join(
                f"\n  {n}x {reason}" for reason, n in self.reasons.items()))


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def cell(data: dict[str, Any] | None) -> str:
    """A Markdown table cell for a result's ``graph_breaks`` entry: ``n/a`` (not compiled), or the
    summary, in bold unless clean."""
    if data is None:
        return "n/a"
    breaks = GraphBreaks.from_dict(data)
    return breaks.summary() if breaks.clean else f"**{breaks.summary()}**"


def warning_line(what: str, data: dict[str, Any] | None) -> str | None:
    """:meth:`GraphBreaks.warning` for a result's ``graph_breaks`` entry; None when not compiled or clean."""
    if data is None:
        return None
    breaks = GraphBreaks.from_dict(data)
    return None if breaks.clean else breaks.warning(what)


def markdown_notes(labelled: list[tuple[str, dict[str, Any] | None]], measured: str = "speeds") -> list[str]:
    """Markdown lines listing each result's graph-break reasons (none when every result is clean);
    ``measured`` names what the results above the notes hold."""
    lines: list[str] = []
    for label, data in labelled:
        if data is None:
            continue
        breaks = GraphBreaks.from_dict(data)
        if breaks.clean:
            continue
        lines.append(f"- {label}: {breaks.findings()}")
        lines += [f"  - {n}x {reason}" for reason, n in breaks.reasons.items()]
    if lines:
        lines = ["", "**torch.compile did not make one clean graph** (reasons and the times each was seen; the "
                 f"{measured} above are those of the broken graphs):", "", *lines]
    return lines


def failures(labelled: list[tuple[str, dict[str, Any] | None]]) -> list[str]:
    """Why each labelled result fails :meth:`GraphBreaks.check` (results not compiled, None, pass)."""
    messages = []
    for label, data in labelled:
        if data is None:
            continue
        try:
            GraphBreaks.from_dict(data).check(label)
        except GraphBreakError as err:
            messages.append(str(err))
    return messages


def short_reason(message: str) -> str:
    """A break's message in one line: its first line, plus the explanation's start where torch gives one."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if not lines:
        return "(no reason given)"
    explanation = next((line.removeprefix("Explanation:").strip() for line in lines[1:]
                        if line.startswith("Explanation:")), "")
    if len(explanation) > MAX_EXPLANATION:
        explanation = explanation[:MAX_EXPLANATION - 3] + "..."
    return f"{lines[0]}: {explanation}" if explanation else lines[0]


def _where(stack: list) -> str | None:
    """``file:line`` of the innermost frame outside torch (else the innermost), relative to the working
    directory when under it."""
    if not stack:
        return None
    torch_dir = os.path.dirname(torch.__file__) + os.sep
    frame = next((f for f in reversed(stack) if not f.filename.startswith(torch_dir)), stack[-1])
    name = frame.filename
    cwd = os.getcwd() + os.sep
    return f"{name.removeprefix(cwd)}:{frame.lineno}"


def _dynamo_state() -> dict[str, Any]:
    """Dynamo's records as they are now; a key is absent where this torch does not have the record."""
    state: dict[str, Any] = {}
    try:
        from torch._dynamo import convert_frame, utils
    except Exception:  # noqa: BLE001 - a torch without Dynamo: everything unknown
        return state
    reasons = getattr(utils, "graph_break_reasons", None)
    if isinstance(reasons, list):
        state["reasons"] = reasons
        state["last_reason"] = reasons[-1] if reasons else None
    counters = getattr(utils, "counters", None)
    if counters is not None:
        state["break_counts"] = Counter(counters.get("graph_break", {}))
        frames = counters.get("frames", {})
        state["failed_frames"] = frames.get("total", 0) - frames.get("ok", 0)
    compiles = getattr(convert_frame, "FRAME_COMPILE_COUNTER", None)
    if compiles is not None:
        counts = [n for n in compiles.values() if isinstance(n, int)]
        state["recompiles"] = sum(counts) - len(counts)  # each function's first compilation is not one
    return state


def _since(before: dict[str, Any], after: dict[str, Any], result: GraphBreaks) -> None:
    """Fill ``result`` with what happened between two :func:`_dynamo_state` snapshots."""
    reasons: Counter[str] = Counter()
    if "reasons" in after:
        # new entries follow the last one seen before; a reset inside the block removed it: all are new
        listed, last = after["reasons"], before.get("last_reason")
        start = next((i + 1 for i in range(len(listed) - 1, -1, -1) if listed[i] is last), 0)
        for r in listed[start:]:
            text = str(getattr(r, "reason", r))
            if text.startswith(INTENTIONAL_PREFIX):
                result.intentional += 1
                continue
            where = _where(list(getattr(r, "user_stack", None) or []))
            reasons[short_reason(text) + (f" (at {where})" if where else "")] += 1
        result.count = sum(reasons.values())
    elif "break_counts" in after:
        new = after["break_counts"] - before.get("break_counts", Counter())
        for message, n in new.items():
            reasons[short_reason(str(message))] += n
        result.count = sum(reasons.values())
    result.reasons = dict(reasons.most_common())
    if "failed_frames" in after:
        result.eager_frames = max(0, after["failed_frames"] - before.get("failed_frames", 0))
    if "recompiles" in after:
        delta = after["recompiles"] - before.get("recompiles", 0)
        result.recompiles = delta if delta >= 0 else after["recompiles"]


@contextlib.contextmanager
def watch_graph_breaks() -> Iterator[GraphBreaks]:
    """Count the graph breaks, recompilations and eager fallbacks of ``torch.compile`` in the block.

    Yields an empty :class:`GraphBreaks` that is filled when the block ends (also when it raises). Compiled
    code that ran before the block and does not compile again inside it is not counted: wrap the first
    calls (the compilation), not only later ones. A ``torch._dynamo.reset()`` inside the block may make
    ``recompiles`` too low (it restarts Dynamo's count); the graph breaks stay right.
    """
    before = _dynamo_state()
    result = GraphBreaks()
    try:
        yield result
    finally:
        _since(before, _dynamo_state(), result)
