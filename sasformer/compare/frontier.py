"""Loss against training compute across grid folders.

Finished runs of any number of grid folders (one per budget, say) become points: per entry and budget,
the final validation loss and the training FLOPs (tokens seen x training FLOPs/token), averaged over
seeds. Each entry is then compared with a baseline entry at equal compute: the baseline's loss at the
entry's FLOPs, interpolated linearly in log(FLOPs) between the two baseline points around it, and the
FLOPs the baseline needs to reach the entry's loss. Neither is extrapolated: outside the baseline's
points the answer is "not bracketed".

Spread and uncertainty: a point's ``loss_std`` is the sample std of its seeds' losses (the spread of one
run). The baseline's std at an interpolated FLOPs is the sample std of each seed's own interpolated loss
(over the seeds both bracketing points hold), so it keeps whatever correlation a seed has across budgets
instead of assuming none. ``difference_se`` is the standard error of the difference of the two means,
sqrt(s_entry^2 / n_entry + s_baseline^2 / n_baseline), the entry's runs and the baseline's taken as
independent.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from sasformer.compare.report import mean_std
from sasformer.compare.runner import RESULT_FILE, comparable_train_config, init_of, validation_rule_of

METRICS_FILE = "metrics.jsonl"
# what a run's result.json must hold to become a point
NEEDED = ("entry", "seed", "train_flops_per_token", "tokens_seen", "final_val_loss")
# training-config keys that set a run's budget (they differ between the points of one entry)
BUDGET_KEYS = ("max_tokens", "max_time_s")
# settings that differ between entries by design
_ENTRY_KEYS = ("model.attention", "model.attention_args")


@dataclass
class FrontierRun:
    """One finished run: its final (FLOPs, loss) and its validation curve as (FLOPs, loss) pairs."""

    id: str
    entry: str
    attention: str | None
    seed: int
    folder: str
    run_dir: str
    train_flops_per_token: float
    tokens: int
    flops: float
    final_val_loss: float
    epochs: float | None
    budget_key: str
    signature: str
    settings: dict[str, Any] | None
    curve: list[tuple[float, float]] = field(default_factory=list)


@dataclass
class FrontierPoint:
    """One entry at one budget: means over its seeds (std: sample std, None with one seed)."""

    entry: str
    attention: str | None
    n: int
    seeds: list[int]
    folders: list[str]
    run_dirs: list[str]
    tokens: float
    flops: float
    loss: float
    loss_std: float | None
    epochs: float | None
    # each seed's final loss, in the order of ``seeds`` (pairs a seed's runs across budgets)
    losses: list[float] = field(default_factory=list)


class AtFlops(NamedTuple):
    """A loss read off a curve at some FLOPs: its mean, its sample std over seeds, and how many seeds."""

    loss: float
    std: float | None
    n: int


@dataclass
class Comparison:
    """A point of ``entry`` against the baseline's points.

    ``difference`` is entry loss minus the baseline's loss at the same FLOPs (negative: the entry is
    lower). ``multiplier`` is the FLOPs the baseline needs to reach the entry's loss over the entry's
    FLOPs (above 1: the baseline needs more compute for that loss). ``loss_std`` and ``baseline_loss_std``
    are spreads over seeds (over ``baseline_n`` seeds for the baseline); ``difference_se`` is the standard
    error of ``difference``.
    """

    entry: str
    baseline: str
    flops: float
    loss: float
    loss_std: float | None
    baseline_loss: float | None
    baseline_loss_std: float | None
    baseline_n: int
    difference: float | None
    difference_se: float | None
    at_flops: str
    baseline_flops: float | None
    multiplier: float | None
    at_loss: str


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def run_dirs(folder: Path) -> tuple[str, list[Path]]:
    """The run folders under ``folder``: a grid folder (``runs/``), a folder of run folders, or one run folder."""
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such folder; give grid folders (each with runs/) or folders of run folders")
    if (folder / "runs").is_dir():
        return "grid", sorted(d for d in (folder / "runs").iterdir() if d.is_dir())
    if (folder / RESULT_FILE).is_file():
        return "run", [folder]
    dirs = sorted(d for d in folder.iterdir()
                  if d.is_dir() and any((d / name).is_file() for name in (RESULT_FILE, METRICS_FILE)))
    if not dirs:
        raise ValueError(f"{folder} is neither a grid folder (it has no runs/) nor a folder of run folders (none of "
                         f"its folders holds {RESULT_FILE} or {METRICS_FILE})")
    return "runs", dirs


def _grid_results(folder: Path, kind: str) -> dict[str, Any] | None:
    """The grid's ``results.json`` (its data and budget), looked for where the folder kind puts it."""
    home = {"grid": folder, "runs": folder.parent, "run": folder.parent.parent}[kind]
    try:
        return json.loads((home / "results.json").read_text())
    except (OSError, ValueError):
        return None


def _curve(run_dir: Path, result: dict[str, Any], flops_per_token: float) -> list[tuple[float, float]]:
    """(training FLOPs, validation loss) at every validation after step 0, from metrics.jsonl when present."""
    from sasformer.train.metrics import read_metrics

    path = run_dir / METRICS_FILE
    if path.is_file():
        try:
            train = read_metrics(path, "train")
            val = read_metrics(path, "val")
        except (OSError, ValueError):
            train, val = [], []
        if train and val and train[-1].get("step") and train[-1].get("tokens"):
            tokens_per_step = train[-1]["tokens"] / train[-1]["step"]
            return [(r["step"] * tokens_per_step * flops_per_token, float(r["val_loss"])) for r in val
                    if r.get("step") and r.get("val_loss") is not None]
    return [(float(p["flops"]), float(p["val_loss"])) for p in result.get("val_curve") or []
            if p.get("flops") and p.get("val_loss") is not None]


def load_run(run_dir: Path, folder: Path, grid: dict[str, Any] | None) -> FrontierRun | str:
    """The run in ``run_dir``, or the reason it cannot be a point."""
    path = run_dir / RESULT_FILE
    if not path.is_file():
        return f"not finished: no {RESULT_FILE}"
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        return f"{RESULT_FILE} is unreadable ({err})"
    if not isinstance(result, dict):
        return f"{RESULT_FILE} does not hold a JSON object"
    if result.get("diverged"):
        return f"diverged: {result['diverged']}"
    missing = [key for key in NEEDED if result.get(key) is None]
    if missing:
        return f"{RESULT_FILE} lacks {', '.join(missing)}"
    try:
        flops_per_token, tokens = float(result["train_flops_per_token"]), int(result["tokens_seen"])
        loss, seed = float(result["final_val_loss"]), int(result["seed"])
    except (TypeError, ValueError) as err:
        return f"{RESULT_FILE} has a non-numeric value ({err})"
    if not (flops_per_token > 0 and tokens > 0):
        return f"{RESULT_FILE} has train_flops_per_token={flops_per_token:g}, tokens_seen={tokens}: both must be > 0"
    if not math.isfinite(loss):
        return f"{RESULT_FILE} has final_val_loss={loss}"
    train = result.get("train_config")
    settings = None
    if isinstance(train, dict):
        comparable = json.loads(json.dumps(comparable_train_config(train), default=str))
        settings = {k: v for k, v in _flatten(comparable).items()
                    if k != "seed"}
        # runs validated on other windows (the rule before VALIDATION_RULE, with micro-batches) are not one point
        settings["validation_rule"] = validation_rule_of(result)
        # nor are runs of two initialisations of one attention layer (TPA's before and after its change)
        settings["attention_init"] = init_of(result)
    # runs of one entry are seeds of one point when everything but the seed matches; without a training
    # config, when their recorded budget (else the tokens they saw) matches
    budget_key = json.dumps(settings if settings is not None else result.get("budget") or {"tokens_seen": tokens},
                            sort_keys=True, default=str)
    signature = json.dumps([result["entry"], seed, settings, result.get("model_config"), tokens], sort_keys=True,
                           default=str)
    epochs = None
    data = (grid or {}).get("data") or {}
    if data.get("train_tokens") and (settings is None or settings.get("data_dir") == data.get("dir")):
        epochs = tokens / float(data["train_tokens"])
    return FrontierRun(
        id=str(result.get("id") or run_dir.name), entry=str(result["entry"]), attention=result.get("attention"),
        seed=seed, folder=str(folder), run_dir=str(run_dir), train_flops_per_token=flops_per_token, tokens=tokens,
        flops=tokens * flops_per_token, final_val_loss=loss, epochs=epochs, budget_key=budget_key,
        signature=signature, settings=settings, curve=_curve(run_dir, result, flops_per_token))


def collect_runs(folders: Sequence[str | Path]) -> dict[str, Any]:
    """Every run under ``folders``: finished ones, skipped ones with the reason, and copies counted once.

    Two run folders with the same run id and the same configuration are one run copied twice (the first
    is kept); the same id with another configuration (another budget, say) is another run.
    """
    if not folders:
        raise ValueError("no folder given: name one or more grid folders (each with runs/), e.g. runs/compare/mini")
    runs: list[FrontierRun] = []
    skipped: list[dict[str, str]] = []
    duplicates: list[dict[str, str]] = []
    read: list[dict[str, Any]] = []
    kept: dict[tuple[str, str], FrontierRun] = {}
    for given in folders:
        folder = Path(given)  # as given: reports name the folders the way the user did
        kind, dirs = run_dirs(folder)
        grid = _grid_results(folder, kind)
        info = {"folder": str(folder), "kind": kind, "runs": len(dirs), "finished": 0,
                "budget": (grid or {}).get("spec", {}).get("budget"),
                "data": {k: ((grid or {}).get("data") or {}).get(k) for k in ("dir", "tokenizer_fingerprint",
                                                                               "train_tokens")}}
        for run_dir in dirs:
            run = load_run(run_dir, folder, grid)
            if isinstance(run, str):
                skipped.append({"run_dir": str(run_dir), "entry": _entry_of(run_dir), "reason": run})
                continue
            info["finished"] += 1
            key = (run.id, run.signature)
            if key in kept:
                duplicates.append({"id": run.id, "entry": run.entry, "run_dir": run.run_dir,
                                   "same_as": kept[key].run_dir})
                continue
            kept[key] = run
            runs.append(run)
        read.append(info)
    return {"runs": runs, "skipped": skipped, "duplicates": duplicates, "folders": read}


def _entry_of(run_dir: Path) -> str | None:
    """The entry a skipped run belongs to, when its result.json or its folder name says."""
    try:
        entry = json.loads((run_dir / RESULT_FILE).read_text()).get("entry")
        if entry:
            return str(entry)
    except (OSError, ValueError, AttributeError):
        pass
    name, sep, seed = run_dir.name.rpartition("-s")
    return name if sep and seed.isdigit() else None


def seed_points(runs: Sequence[FrontierRun], entries: Sequence[str]) -> list[FrontierPoint]:
    """One point per entry and budget (runs that differ only by seed), entries in order, then by FLOPs."""
    groups: dict[tuple[str, str], list[FrontierRun]] = {}
    for run in runs:
        groups.setdefault((run.entry, run.budget_key), []).append(run)
    points = []
    for (entry, _), group in groups.items():
        group = sorted(group, key=lambda r: r.seed)
        loss, loss_std = mean_std([r.final_val_loss for r in group])
        epochs = None if any(r.epochs is None for r in group) else sum(r.epochs for r in group) / len(group)
        points.append(FrontierPoint(
            entry=entry, attention=group[0].attention, n=len(group), seeds=[r.seed for r in group],
            folders=list(dict.fromkeys(r.folder for r in group)), run_dirs=[r.run_dir for r in group],
            tokens=sum(r.tokens for r in group) / len(group),
            flops=sum(r.flops for r in group) / len(group), loss=loss, loss_std=loss_std, epochs=epochs,
            losses=[r.final_val_loss for r in group]))
    order = {e: i for i, e in enumerate(entries)}
    return sorted(points, key=lambda p: (order[p.entry], p.flops))


def _paired_std(a: FrontierPoint, b: FrontierPoint, w: float) -> tuple[float | None, int]:
    """Sample std over seeds of each seed's own interpolated loss, (1-w) a_seed + w b_seed, over the seeds
    both points hold, and how many; (None, 0) below two such seeds or when a point holds a seed twice."""
    at_a, at_b = dict(zip(a.seeds, a.losses)), dict(zip(b.seeds, b.losses))
    if len(at_a) != len(a.losses) or len(at_b) != len(b.losses):
        return None, 0
    common = sorted(at_a.keys() & at_b.keys())
    _, std = mean_std([(1 - w) * at_a[s] + w * at_b[s] for s in common])
    return (std, len(common)) if std is not None else (None, 0)


def loss_at_flops(points: Sequence[FrontierPoint], flops: float) -> AtFlops | None:
    """The loss of ``points`` at ``flops``, linear in log(FLOPs) between the two points around it.

    None when no two points bracket ``flops`` (never extrapolated). The loss interpolates the two points'
    means; its std is the sample std of the per-seed interpolated losses (a seed's runs at two budgets
    share its initialisation and data order, so they need not be independent), None with fewer than two
    seeds common to both points.
    """
    ordered = sorted(points, key=lambda p: p.flops)
    for p in ordered:
        if p.flops == flops:
            return AtFlops(p.loss, p.loss_std, p.n if p.loss_std is not None else 0)
    for a, b in itertools.pairwise(ordered):
        if a.flops < flops < b.flops:
            w = (math.log(flops) - math.log(a.flops)) / (math.log(b.flops) - math.log(a.flops))
            return AtFlops((1 - w) * a.loss + w * b.loss, *_paired_std(a, b, w))
    return None


def flops_for_loss(points: Sequence[FrontierPoint], loss: float) -> float | None:
    """The FLOPs at which ``points`` reach ``loss``, log(FLOPs) linear in loss between two bracketing points.

    The lowest-FLOPs crossing when the losses do not fall monotonically; None when no two points bracket
    ``loss`` (never extrapolated).
    """
    ordered = sorted(points, key=lambda p: p.flops)
    if len(ordered) == 1 and ordered[0].loss == loss:
        return ordered[0].flops
    for a, b in itertools.pairwise(ordered):
        if min(a.loss, b.loss) <= loss <= max(a.loss, b.loss):
            if a.loss == b.loss:
                return a.flops
            w = (loss - a.loss) / (b.loss - a.loss)
            return math.exp(math.log(a.flops) + w * (math.log(b.flops) - math.log(a.flops)))
    return None


def _span(points: Sequence[FrontierPoint], what: str) -> str:
    if len(points) < 2:
        return "the baseline has one point"
    if what == "flops":
        values = [p.flops for p in points]
        return f"the baseline's points span {min(values):.3e} to {max(values):.3e} FLOPs"
    values = [p.loss for p in points]
    return f"the baseline's losses span {min(values):.4f} to {max(values):.4f}"


def compare_points(points: Sequence[FrontierPoint], baseline: str) -> list[Comparison]:
    """Every point of every other entry against the baseline's points, in both views."""
    base = [p for p in points if p.entry == baseline]
    out = []
    for p in points:
        if p.entry == baseline:
            continue
        at = loss_at_flops(base, p.flops)
        base_loss, base_std, base_n, diff, diff_se = None, None, 0, None, None
        if at is not None:
            base_loss, base_std, base_n = at
            diff = p.loss - base_loss
            # the standard error of a difference of two independent means
            if p.loss_std is not None and base_std is not None:
                diff_se = math.sqrt(p.loss_std ** 2 / p.n + base_std ** 2 / base_n)
        reach = flops_for_loss(base, p.loss)
        out.append(Comparison(
            entry=p.entry, baseline=baseline, flops=p.flops, loss=p.loss, loss_std=p.loss_std,
            baseline_loss=base_loss, baseline_loss_std=base_std, baseline_n=base_n, difference=diff,
            difference_se=diff_se,
            at_flops="interpolated" if at is not None else f"not bracketed: {_span(base, 'flops')}",
            baseline_flops=reach, multiplier=None if reach is None else reach / p.flops,
            at_loss="interpolated" if reach is not None else f"not bracketed: {_span(base, 'loss')}"))
    return out


def _notes(runs: Sequence[FrontierRun], points: Sequence[FrontierPoint], baseline: str,
           folders: Sequence[dict[str, Any]]) -> list[str]:
    """What a reader should know before trusting the comparison: settings that differ beyond the budget."""
    notes = []
    unknown = sorted(r.run_dir for r in runs if r.settings is None)
    if unknown:
        notes.append(f"no training config in {', '.join(unknown)}: their settings could not be checked")
    known = [r for r in runs if r.settings is not None]

    def varying(group: Sequence[FrontierRun], ignore: tuple[str, ...]) -> list[str]:
        keys = sorted({k for r in group for k in r.settings})
        return [k for k in keys if not k.startswith(ignore) and len({json.dumps(r.settings.get(k), default=str)
                                                                     for r in group}) > 1]

    budget = BUDGET_KEYS
    for entry in dict.fromkeys(r.entry for r in known):
        keys = varying([r for r in known if r.entry == entry], budget)
        if keys:
            notes.append(f"the points of {entry} differ in more than the budget: {keys}")
    keys = varying(known, budget + _ENTRY_KEYS)
    if keys:
        notes.append(f"the entries differ in more than attention and budget: {keys}")
    fingerprints = {f["data"]["tokenizer_fingerprint"] for f in folders if f["data"]["tokenizer_fingerprint"]}
    if len(fingerprints) > 1:
        notes.append("the folders used different tokenizers: their losses are not comparable")
    base = sorted((p for p in points if p.entry == baseline), key=lambda p: p.flops)
    if any(b.loss > a.loss for a, b in itertools.pairwise(base)):
        notes.append(f"{baseline}'s final loss does not fall with every step up in FLOPs; the compute multiplier "
                     "uses the lowest-FLOPs crossing")
    return notes


def build_frontier(folders: Sequence[str | Path], only: Sequence[str] | None = None,
                   baseline: str = "mha") -> dict[str, Any]:
    """Points, baseline comparisons, skipped and duplicate runs and notes for ``folders`` (JSON-ready)."""
    collected = collect_runs(folders)
    runs: list[FrontierRun] = collected["runs"]
    found = list(dict.fromkeys(r.entry for r in runs))
    if not runs:
        reasons = "; ".join(f"{s['run_dir']}: {s['reason']}" for s in collected["skipped"]) or "no run folders"
        raise ValueError(f"no finished runs in {[str(f) for f in folders]} ({reasons})")
    skipped = collected["skipped"]
    if only:
        unknown = [name for name in only if name not in found]
        if unknown:
            raise ValueError(f"--only: no finished runs of {unknown}; the folders hold {found}")
        entries = list(dict.fromkeys(only))
        runs = [r for r in runs if r.entry in entries]
        skipped = [s for s in skipped if s["entry"] is None or s["entry"] in entries]
    else:
        entries = found
    if baseline not in entries:
        raise ValueError(f"--baseline {baseline!r} has no finished runs among the entries {entries}; pass one of "
                         "them as --baseline (or add it to --only)")
    points = seed_points(runs, entries)
    return {
        "folders": collected["folders"],
        "baseline": baseline,
        "entries": entries,
        "points": [asdict(p) for p in points],
        "comparisons": [asdict(c) for c in compare_points(points, baseline)],
        "skipped": skipped,
        "duplicates": [d for d in collected["duplicates"] if d["entry"] in entries],
        "notes": _notes(runs, points, baseline, collected["folders"]),
        "runs": [{"id": r.id, "entry": r.entry, "seed": r.seed, "run_dir": r.run_dir, "tokens": r.tokens,
                  "flops": r.flops, "final_val_loss": r.final_val_loss, "epochs": r.epochs,
                  "train_flops_per_token": r.train_flops_per_token, "curve": [list(c) for c in r.curve]}
                 for r in runs],
    }
