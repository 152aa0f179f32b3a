"""Running a grid: prepare the data once, train every (entry, seed) run, measure it, resume what is left.

A run lives in ``GRID/runs/<entry>-s<seed>/`` (the trainer's checkpoints and metrics). It is finished
when its ``result.json`` exists; that file is written atomically after training and evaluation, so an
interrupted grid re-run skips finished runs and resumes an unfinished one from its last checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sasformer.compare.budget import RunBudget, run_budget
from sasformer.compare.spec import DataSpec, GridSpec, VariantSpec

RESULT_FILE = "result.json"
# training-config keys that may differ between attempts of one run without changing its result
# (out_dir: a grid folder may be moved)
_VOLATILE_KEYS = ("progress", "console", "resume", "tensorboard", "out_dir")

Log = Callable[[str], None]
# what summarize_metrics measures (None for a run that diverged)
_SUMMARY_KEYS = ("steps", "tokens_seen", "train_flops", "train_seconds", "tokens_per_s", "tflops_per_s", "mfu",
                 "peak_mem_gib", "final_train_loss", "initial_val_loss", "final_val_loss", "final_val_ppl")


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class RunPlan:
    """One training run of the grid, with its resolved training config (a ``TrainConfig`` dict)."""

    id: str
    entry: str
    variant: VariantSpec
    size: str | None
    seed: int
    train: dict[str, Any]
    budget: RunBudget
    train_flops_per_token: float
    params: int

    @property
    def run_dir(self) -> Path:
        return Path(self.train["out_dir"])


def ensure_data(data: DataSpec, progress: bool = True) -> tuple[Path, dict[str, Any]]:
    """The prepared folder and its metadata; prepares it first when ``data.inputs`` is set (a no-op if current)."""
    from sasformer.data.prepare import PrepareOptions, prepare, read_meta

    out = Path(data.dir)
    if data.inputs is not None:
        options = PrepareOptions(inputs=list(data.inputs), out=str(out), tokenizer=data.tokenizer,
                                 vocab_size=data.vocab_size, val_fraction=data.val_fraction,
                                 text_field=data.text_field, progress=progress)
        return out, prepare(options)
    meta = read_meta(out)
    if meta is None:
        raise ValueError(f"data.dir={str(out)!r} is not a complete prepared data folder; run `sasformer prepare` "
                         "into it, or set data.inputs (and data.vocab_size or data.tokenizer) to prepare it here")
    return out, meta


def run_id(entry: str, seed: int) -> str:
    return f"{entry}-s{seed}"


def plan_runs(spec: GridSpec, data_dir: Path, vocab_size: int, grid_dir: Path) -> list[RunPlan]:
    """Every run of the grid, entries in order and seeds inside each entry, with its budget resolved."""
    from sasformer.models.flops import meta_model, train_flops_per_token
    from sasformer.train.config import TrainConfig

    plans = []
    for entry, variant, size in spec.entries():
        model = {**spec.model, **variant.model, "attention": variant.attention,
                 "attention_args": dict(variant.attention_args)}
        if size is not None:
            model["size"] = size
        for seed in spec.seeds:
            # the grid prints its own line per run; its runs' own lines would bury it
            train: dict[str, Any] = {"tensorboard": False, "progress": spec.progress, "console": False, **spec.train}
            train.update(model=model, data_dir=str(data_dir), out_dir=str(grid_dir / "runs" / run_id(entry, seed)),
                         seed=seed, max_steps=None, max_tokens=1, max_time_s=None, resume="auto")
            try:
                config = TrainConfig.from_dict(train)
                model_config = config.model.build(vocab_size, config.seq_len)
            except ValueError as err:
                raise ValueError(f"grid entry {entry!r}: {err}") from None
            if spec.eval.mqar.enabled:  # fail now, not after training, if the probe cannot be built
                try:
                    mqar_probe_config(spec, train, variant, model_config)[1].resolved_attention_args()
                except ValueError as err:
                    raise ValueError(f"grid entry {entry!r}: its MQAR probe model is invalid: {err}") from None
            meta = meta_model(model_config)
            flops = train_flops_per_token(model_config, config.seq_len, meta)
            budget = run_budget(spec.budget, flops)
            train.update(max_tokens=budget.max_tokens, max_time_s=budget.max_time_s)
            TrainConfig.from_dict(train)  # the final config validates too
            plans.append(RunPlan(run_id(entry, seed), entry, variant, size, seed, train, budget, flops,
                                 meta.num_parameters()))
    return plans


def comparable_train_config(train: dict[str, Any]) -> dict[str, Any]:
    """A run's training config without the keys that may differ between calls of one grid (output, progress)."""
    return {k: v for k, v in train.items() if k not in _VOLATILE_KEYS}


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        json.dump(data, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_finished(plan: RunPlan, allow_old_rule: bool = False) -> dict[str, Any] | None:
    """The run's saved result, or None if it has not finished; an error if it finished with another config
    or, unless ``allow_old_rule`` (a report, which sets such runs apart), under the old validation rule."""
    path = plan.run_dir / RESULT_FILE
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    if not allow_old_rule:
        _check_validation_rule(path, result, plan)
        if earlier_init(result, plan):
            raise ValueError(
                f"{path} was trained with an earlier initialisation of {plan.variant.attention} "
                f"({init_of(result)!r}; now {_current_init(plan)!r}), so it is not the run the grid would make now; "
                "delete that run's folder to redo it, or use another --out"
            )
    saved = json.loads(json.dumps(comparable_train_config(result["train_config"]), default=str))
    wanted = json.loads(json.dumps(comparable_train_config(plan.train), default=str))
    if saved != wanted:
        changed = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
        raise ValueError(
            f"{path} was made with another config (differs in {changed}); the grid changed since it ran. Use "
            "another --out, or delete that run's folder to redo it"
        )
    return result


# the validation set of a run: the first eval_batches x batch_size windows of the val split (since the trainer
# scores global batches a micro-batch at a time; before, eval_batches x micro-batch windows)
VALIDATION_RULE = "eval_batches x batch_size windows"
OLD_VALIDATION_RULE = "eval_batches x micro_batch_size windows"


def validation_rule_of(result: dict[str, Any]) -> str:
    """The validation rule a finished run's loss was measured under (runs from before the rule was recorded
    scored eval_batches micro-batches, the same windows as now where there were no micro-batches)."""
    from sasformer.train.config import TrainConfig

    if "validation_rule" in result:
        return str(result["validation_rule"])
    try:
        config = TrainConfig.from_dict(result["train_config"])
        same = config.micro_batch(1) == config.batch_size
    except (KeyError, TypeError, ValueError):
        return "unrecorded"
    return VALIDATION_RULE if same else OLD_VALIDATION_RULE


def _old_rule(result: dict[str, Any], plan: RunPlan) -> bool:
    """Whether a finished run was validated on other windows than new runs of its plan would be."""
    return validation_rule_of({"train_config": plan.train, **result}) != VALIDATION_RULE


def init_of(result: dict[str, Any]) -> str:
    """The attention layer's initialisation a finished run trained from (unrecorded: the standard one, which
    every variant used until a variant's changed)."""
    return str(result.get("attention_init", "standard"))


def _current_init(plan: RunPlan) -> str:
    from sasformer.layers.registry import attention_class

    return attention_class(plan.variant.attention).init_rule


def earlier_init(result: dict[str, Any], plan: RunPlan) -> bool:
    """Whether a finished run trained from another initialisation than a new run of its plan would."""
    return init_of(result) != _current_init(plan)


def _check_validation_rule(path: Path, result: dict[str, Any], plan: RunPlan) -> None:
    """A run validated under the old rule on other windows than the new runs would be: refuse to mix them."""
    if _old_rule(result, plan):
        raise ValueError(
            f"{path} was validated on {OLD_VALIDATION_RULE}, which later runs replace by {VALIDATION_RULE} (the same "
            "windows however a run is split); its validation loss would not "
            "compare with theirs. Use another --out, or delete that run's folder to redo it"
        )


def _interpolate(step: int, steps: list[int], values: list[float]) -> float | None:
    """Linear interpolation of ``values`` (given at increasing ``steps``) at ``step``; 0 at step 0."""
    points = [(0, 0.0)] + list(zip(steps, values))
    for (s0, v0), (s1, v1) in itertools.pairwise(points):
        if s0 <= step <= s1:
            return v0 if s1 == s0 else v0 + (v1 - v0) * (step - s0) / (s1 - s0)
    return None


def summarize_metrics(metrics_path: Path, tokens_per_step: int, flops_per_token: float,
                      peak_tflops: float | None) -> dict[str, Any]:
    """Tokens seen, throughput, MFU, memory and the validation curve of one finished training run."""
    from sasformer.train.metrics import read_metrics

    train = read_metrics(metrics_path, "train")
    val = read_metrics(metrics_path, "val")
    if not train or not val:
        raise ValueError(f"{metrics_path} has no {'train' if not train else 'validation'} records; the run did "
                         "not finish (delete its folder to redo it)")
    last = train[-1]
    if val[-1]["step"] != last["step"]:
        raise ValueError(f"{metrics_path}: the last validation (step {val[-1]['step']}) is not at the last "
                         f"step ({last['step']})")
    steps = [r["step"] for r in train]
    seconds = [r["train_seconds"] for r in train]
    # steady-state throughput: the first logged window holds warm-up (allocator, compilation)
    if len(train) >= 2 and seconds[-1] > seconds[0]:
        tokens_per_s = (last["tokens"] - train[0]["tokens"]) / (seconds[-1] - seconds[0])
    else:
        tokens_per_s = last["tokens"] / max(seconds[-1], 1e-9)
    tflops = tokens_per_s * flops_per_token / 1e12
    curve = []
    for r in val:
        tokens = r["step"] * tokens_per_step
        curve.append({"step": r["step"], "tokens": tokens, "flops": tokens * flops_per_token,
                      "train_seconds": _interpolate(r["step"], steps, seconds), "val_loss": r["val_loss"]})
    memory = [r["peak_mem_gib"] for r in train if r.get("peak_mem_gib") is not None]
    summary = {
        "steps": last["step"],
        "tokens_seen": last["tokens"],
        "train_flops": last["tokens"] * flops_per_token,
        "train_seconds": seconds[-1],
        "tokens_per_s": tokens_per_s,
        "tflops_per_s": tflops,
        "mfu": tflops / peak_tflops if peak_tflops else None,
        "peak_mem_gib": max(memory) if memory else None,
        "final_train_loss": last["loss"],
        "initial_val_loss": val[0]["val_loss"] if val[0]["step"] == 0 else None,
        "final_val_loss": val[-1]["val_loss"],
        "final_val_ppl": math.exp(min(val[-1]["val_loss"], 50.0)),
        "val_curve": curve,
    }
    return summary


def _zero_shot(spec: GridSpec, tasks: dict[str, list], checkpoint: Path, data_dir: Path, device,
               log: Log) -> tuple[dict[str, Any], float]:
    from sasformer.data.loader import load_data_tokenizer
    from sasformer.eval import evaluate_tasks
    from sasformer.train.checkpoint import load_model, trained_seq_len

    model = load_model(checkpoint, device)
    # no row longer than training saw: variants extrapolate differently, which would bias the ranking
    max_len = trained_seq_len(checkpoint) or model.config.max_seq_len
    metrics = evaluate_tasks(model, load_data_tokenizer(data_dir), tasks, max_len=max_len,
                             batch_size=spec.eval.zero_shot_batch_size, device=device, log=log)
    return metrics, sum(m["acc"] for m in metrics.values()) / len(metrics)


def mqar_probe_config(spec: GridSpec, entry_train: dict[str, Any], variant, model_config):
    """The MQAR task and the probe model for a grid entry whose trained model is ``model_config``."""
    from sasformer.eval.mqar import MQARConfig, probe_attention_args, variant_configs
    from sasformer.models.presets import SIZES, Size
    from sasformer.train.config import TrainConfig

    m = spec.eval.mqar
    task = MQARConfig(num_kv_pairs=m.num_kv_pairs, seq_len=m.seq_len, vocab_size=m.vocab_size,
                      num_queries=m.num_queries)
    probe = Size(d_model=m.d_model, n_layers=m.n_layers, n_heads=m.n_heads, max_seq_len=task.seq_len,
                 vocab_size=task.vocab_size)
    # the entry's overrides were written for the trained model: carry them to the probe's size
    preset_size = SIZES[TrainConfig.from_dict(entry_train).model.size]
    main = dataclasses.replace(preset_size, d_model=model_config.d_model, n_layers=model_config.n_layers,
                               max_seq_len=model_config.max_seq_len, vocab_size=model_config.vocab_size)
    args = probe_attention_args(variant.attention, dict(variant.attention_args), main, probe)
    config = variant_configs([variant.attention], task, m.d_model, m.n_layers, m.n_heads,
                             {variant.attention: args})[variant.attention]
    return task, config


def _mqar(spec: GridSpec, plan: RunPlan, model_config, device) -> float:
    from sasformer.eval.mqar import train_mqar

    m = spec.eval.mqar
    task, config = mqar_probe_config(spec, plan.train, plan.variant, model_config)
    result = train_mqar(config, task, steps=m.steps, batch_size=m.batch_size, lr=m.lr, weight_decay=m.weight_decay,
                        n_test=m.n_test, seed=plan.seed, device=device)
    return result.accuracy


def execute_run(spec: GridSpec, plan: RunPlan, data_dir: Path, tasks: dict[str, list] | None,
                log: Log = _stderr) -> dict[str, Any]:
    """Train (or resume) one run, evaluate it, and write its ``result.json`` atomically; returns the result."""
    import torch

    from sasformer.compare.env import environment
    from sasformer.data.prepare import read_meta
    from sasformer.train.checkpoint import latest_checkpoint
    from sasformer.train.config import TrainConfig
    from sasformer.train.metrics import MetricsLogger
    from sasformer.train.trainer import NonFiniteLossError, Trainer

    config = TrainConfig.from_dict(plan.train)
    start = time.perf_counter()
    trainer = Trainer(config)
    device = trainer.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # peak memory of this run only
    if trainer.resumed_from is not None:
        log(f"  resuming from {trainer.resumed_from}")
    else:
        # the curve starts at the initialised model; evaluation draws no random numbers, so training is unchanged
        initial = trainer.evaluate()
        logger = MetricsLogger(plan.run_dir, tensorboard=False)
        logger.log({"kind": "val", "step": 0, "val_loss": initial, "val_ppl": math.exp(min(initial, 50.0))})
        logger.close()
    diverged = None
    try:
        trainer.fit()
    except NonFiniteLossError as err:  # a result of the comparison, not a reason to stop the grid
        diverged = str(err)
        log(f"  {plan.id} diverged: {diverged}")
    model_config, peak = trainer.model_config, trainer.peak
    del trainer
    if device.type == "cuda":
        torch.cuda.empty_cache()

    result: dict[str, Any] = {
        "id": plan.id,
        "entry": plan.entry,
        "attention": plan.variant.attention,
        "attention_args": model_config.resolved_attention_args().to_dict(),
        "size": plan.size or config.model.size,
        "seed": plan.seed,
        "params": plan.params,
        "train_flops_per_token": plan.train_flops_per_token,
        "budget": {"max_tokens": plan.budget.max_tokens, "max_time_s": plan.budget.max_time_s},
    }
    result["diverged"] = diverged
    result["zero_shot"], result["zero_shot_avg"], result["mqar_accuracy"] = None, None, None
    if diverged is not None:
        result.update({key: None for key in _SUMMARY_KEYS}, val_curve=[])
    else:
        result.update(summarize_metrics(plan.run_dir / "metrics.jsonl", config.batch_size * config.seq_len,
                                        plan.train_flops_per_token, peak))
    # where a run's wall time goes (setup and compilation count as training), to plan GPU time
    seconds = {"training": time.perf_counter() - start, "zero_shot": None, "mqar": None}
    if tasks and diverged is None:
        began = time.perf_counter()
        result["zero_shot"], result["zero_shot_avg"] = _zero_shot(
            spec, tasks, latest_checkpoint(plan.run_dir / "checkpoints"), data_dir, device, log)
        seconds["zero_shot"] = time.perf_counter() - began
    if spec.eval.mqar.enabled and diverged is None:
        began = time.perf_counter()
        result["mqar_accuracy"] = _mqar(spec, plan, model_config, device)
        seconds["mqar"] = time.perf_counter() - began
    result["wall_seconds_last_attempt"] = time.perf_counter() - start
    result["wall_seconds_split"] = seconds
    result["environment"] = environment(device)  # each run's own: a resumed grid may span machines
    result["model_config"] = model_config.to_dict()
    result["train_config"] = plan.train
    result["validation_rule"] = VALIDATION_RULE
    result["attention_init"] = _current_init(plan)
    meta = read_meta(data_dir)
    result["data_vocab_size"] = None if meta is None else meta["vocab_size"]  # the tokenizer's, unpadded
    _write_json_atomic(plan.run_dir / RESULT_FILE, result)
    return result


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def validation_tokens(plan: RunPlan) -> int:
    """Target tokens of the fixed validation set the trainer scores (identical for every run of a grid)."""
    from sasformer.train.config import TrainConfig
    from sasformer.train.data import PreparedData

    config = TrainConfig.from_dict(plan.train)
    # the trainer's validation batches: global batches of batch_size windows (Trainer.evaluate)
    batches = PreparedData(config.data_dir).eval_batches(config.seq_len, config.batch_size, config.eval_batches,
                                                         0, 1, None)
    return sum(int(targets.numel()) for _, targets in batches)


@contextlib.contextmanager
def grid_lock(grid_dir: Path) -> Iterator[None]:
    """Refuse a second live ``compare`` process on the same grid folder (a stale lock is taken over)."""
    path = grid_dir / "compare.lock"
    if path.is_file():
        try:
            pid = int(path.read_text().strip())
            os.kill(pid, 0)
        except (ValueError, ProcessLookupError):
            pid = None  # unreadable, or its process is gone
        except PermissionError:
            pass  # the process exists but belongs to someone else
        if pid is not None and pid != os.getpid():
            raise ValueError(f"{grid_dir} is in use by process {pid} (see {path}); wait for it, or use another --out")
    path.write_text(str(os.getpid()))
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def run_grid(spec: GridSpec, grid_dir: str | Path, command: str = "", log: Log = _stderr,
             report_only: bool = False, time_limit_s: float | None = None, redo_mqar: bool = False,
             gpus: list[str] | None = None) -> dict[str, Any]:
    """Run (or finish) the whole grid and write ``results.json``, ``results.md`` and the plots into ``grid_dir``.

    ``report_only`` trains nothing: the results cover the finished runs and list the others as missing
    (a grid run in parts, e.g. one job at a time). ``time_limit_s``: start a run only if it
    should end within that many seconds of this call's start, judged by the longest run of this call so
    far (the first run always starts); the runs left out are listed as missing, for the next call.
    ``redo_mqar`` runs the MQAR probe of every finished run again (after a change to the probe) and
    rewrites its ``result.json``, noting the previous value and the device. ``gpus`` (CUDA device
    indices) runs the pending runs side by side, one worker process per GPU (:mod:`.workers`); runs
    whose worker failed are listed in ``failed_runs`` and left for the next call.
    """
    called = time.perf_counter()  # the time limit counts from here: preparing the data is part of it
    if time_limit_s is not None and not time_limit_s > 0:
        raise ValueError(f"time limit {time_limit_s} s must be > 0")
    grid_dir = Path(grid_dir)
    grid_dir.mkdir(parents=True, exist_ok=True)
    with grid_lock(grid_dir):
        return _run_grid(spec, grid_dir, command, log, report_only, time_limit_s, redo_mqar, called, gpus)


def _host_device(plan: RunPlan):
    """The device this process gives a run's work that is not the trainer's (the first GPU unless told CPU)."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() and plan.train.get("device", "auto") != "cpu" else "cpu")


def _redo_mqar(spec: GridSpec, plan: RunPlan, result: dict[str, Any], log: Log) -> dict[str, Any]:
    from sasformer.compare.env import environment
    from sasformer.models.config import ModelConfig

    if result.get("diverged") is not None:
        return result
    device = _host_device(plan)
    previous = result.get("mqar_accuracy")
    accuracy = _mqar(spec, plan, ModelConfig.from_dict(result["model_config"]), device)
    log(f"  {plan.id}: MQAR {previous} -> {accuracy:.4f} ({device.type})")
    result = {**result, "mqar_accuracy": accuracy,
              "mqar_redone": {"previous": previous, "device": device.type, "environment": environment(device)}}
    _write_json_atomic(plan.run_dir / RESULT_FILE, result)
    return result


def _data_summary(data_dir: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """What ``results.json`` records of the prepared data."""
    return {"dir": str(data_dir), "vocab_size": meta["vocab_size"],
            "tokenizer_fingerprint": meta["tokenizer_fingerprint"],
            "train_tokens": meta["splits"]["train"]["tokens"],
            "val_split_tokens": meta["splits"]["val"]["tokens"]}


def _report_data(spec: GridSpec, grid_dir: Path) -> tuple[dict[str, Any], int | None, bool]:
    """The data summary and validation tokens for a report, found without preparing or tokenising anything
    (the inputs or the data folder may be gone): from the data folder's metadata when it is complete, else
    from the grid's last ``results.json``, else only the vocabulary the finished runs were built with. The
    flag says whether the data folder is there (to count the validation tokens in)."""
    from sasformer.data.prepare import read_meta

    data_dir = Path(spec.data.dir)
    meta = read_meta(data_dir)
    if meta is not None:
        return _data_summary(data_dir, meta), None, True
    try:
        previous = json.loads((grid_dir / "results.json").read_text())
        if previous["data"]["dir"] == str(data_dir) and previous["data"].get("vocab_size"):
            return previous["data"], previous.get("val_tokens"), False
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    for entry, _, _ in spec.entries():
        for seed in spec.seeds:
            try:
                result = json.loads((grid_dir / "runs" / run_id(entry, seed) / RESULT_FILE).read_text())
                vocab_size = int(result["model_config"]["vocab_size"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if result.get("data_vocab_size"):  # recorded by runs since it was: the tokenizer's own size
                return {"dir": str(data_dir), "vocab_size": int(result["data_vocab_size"]),
                        "tokenizer_fingerprint": None, "train_tokens": None, "val_split_tokens": None}, None, False
            # the models' vocabulary is the tokenizer's padded (pad_vocab_to): not the tokenizer's own size
            return {"dir": str(data_dir), "vocab_size": None, "padded_vocab_size": vocab_size,
                    "tokenizer_fingerprint": None, "train_tokens": None, "val_split_tokens": None}, None, False
    raise ValueError(f"--report: {grid_dir} has no finished run to report and {data_dir} is not a prepared data "
                     "folder; train the grid first")


def _run_grid(spec: GridSpec, grid_dir: Path, command: str, log: Log, report_only: bool,
              time_limit_s: float | None, redo_mqar: bool, called: float, gpus: list[str] | None) -> dict[str, Any]:
    from sasformer.compare.env import environment
    from sasformer.compare.plots import matplotlib_available, plot_curves
    from sasformer.compare.report import aggregate, markdown_report

    if report_only:  # a report reads the finished runs only: it needs neither the inputs nor the data
        data, val_tokens, data_there = _report_data(spec, grid_dir)
        data_dir = Path(spec.data.dir)
    else:
        data_dir, meta = ensure_data(spec.data, spec.progress)
        data, val_tokens, data_there = _data_summary(data_dir, meta), None, True
    # without the tokenizer's size (runs from before it was recorded, no data folder) the runs are planned with
    # their padded vocabulary: the same plans when every entry pads to one multiple (the usual case)
    plans = plan_runs(spec, data_dir, int(data["vocab_size"] or data["padded_vocab_size"]), grid_dir)
    if data_there:
        val_tokens = validation_tokens(plans[0])  # reads the validation split, tokenises nothing
    if not report_only:
        _write_json_atomic(grid_dir / "grid.json", {"spec": spec.to_dict(), "command": command,
                                                "runs": [{"id": p.id, "max_tokens": p.budget.max_tokens,
                                                          "max_time_s": p.budget.max_time_s,
                                                          "train_flops_per_token": p.train_flops_per_token,
                                                          "params": p.params} for p in plans]})
    train_here = not report_only and not gpus  # with gpus, worker processes train (and read the tasks)
    tasks = None
    if spec.eval.zero_shot_dir is not None and train_here:
        from sasformer.eval import read_eval_dir

        tasks = read_eval_dir(spec.eval.zero_shot_dir, spec.eval.zero_shot_tasks, spec.eval.zero_shot_limit)

    if redo_mqar and not spec.eval.mqar.enabled:
        log("--redo-mqar: the grid's MQAR probe is disabled (eval.mqar.enabled), so there is nothing to redo")
    runs: list[dict[str, Any]] = []
    finished = [load_finished(p, allow_old_rule=report_only) for p in plans]
    # a report lists runs validated under the old rule apart when the grid mixes the two rules (their losses are
    # on other windows); runs that all share the old rule compare with each other and stay in the table
    set_apart = {p.id for p, r in zip(plans, finished) if r is not None and _old_rule(r, p)}
    all_old_rule = bool(set_apart) and set_apart == {p.id for p, r in zip(plans, finished) if r is not None}
    if all_old_rule:
        set_apart = set()
        val_tokens = None  # counted under the present rule, which these runs were not scored on
    old_rule = [r for p, r in zip(plans, finished) if p.id in set_apart]
    # only a report gets here with such runs (training refuses them): listed, kept in the table
    other_init = [p.id for p, r in zip(plans, finished) if r is not None and earlier_init(r, p)]
    todo = sum(r is None for r in finished)
    log(f"grid {spec.name}: {len(plans)} runs ({len(plans) - todo} already finished), results in {grid_dir}")
    spent: list[float] = []
    missing: list[str] = []
    failed: list[str] = []
    if gpus and not report_only:
        from sasformer.compare.workers import run_in_workers

        pending = [(i, p) for i, (p, r) in enumerate(zip(plans, finished), start=1) if r is None]
        done, failed = run_in_workers(pending, grid_dir, gpus, log, time_limit_s, called, len(plans))
        # the workers' results in grid order; what they left counts as missing below
        finished = [r if r is not None else done.get(p.id) for p, r in zip(plans, finished)]
    for index, (plan, result) in enumerate(zip(plans, finished), start=1):
        if plan.id in set_apart:
            continue
        if result is not None:
            if redo_mqar and spec.eval.mqar.enabled:
                result = _redo_mqar(spec, plan, result, log)
            runs.append(result)
            continue
        if not train_here:
            missing.append(plan.id)
            continue
        if time_limit_s is not None and spent and time.perf_counter() - called + max(spent) > time_limit_s:
            log(f"[run {index}/{len(plans)}] {plan.id} not started: it would likely end after the time limit "
                f"of {time_limit_s:g} s (longest run so far {_duration(max(spent))})")
            missing.append(plan.id)
            continue
        left = todo - len(spent)
        eta = f", ETA {_duration(sum(spent) / len(spent) * left)}" if spent else ""
        limit = f" or {plan.budget.max_time_s:g} s" if plan.budget.max_time_s else ""
        log(f"[run {index}/{len(plans)}] {plan.entry} seed {plan.seed}: {plan.budget.max_tokens:,} tokens{limit}, "
            f"{plan.params / 1e6:.2f}M params{eta}")
        start = time.perf_counter()
        result = execute_run(spec, plan, data_dir, tasks, log)
        spent.append(time.perf_counter() - start)
        outcome = "diverged" if result["diverged"] else \
            f"val loss {result['final_val_loss']:.4f} after {result['tokens_seen']:,} tokens"
        log(f"[run {index}/{len(plans)}] {plan.entry} seed {plan.seed}: {outcome} ({_duration(spent[-1])})")
        runs.append(result)

    device = _host_device(plans[0])
    results: dict[str, Any] = {
        "command": command,
        # a pass that trained nothing itself describes the machine the runs trained on
        "environment": (runs[0]["environment"] if not train_here and runs and runs[0].get("environment")
                        else environment(device)),
        "spec": spec.to_dict(),
        "data": data,
        "val_tokens": val_tokens,
        "runs": runs,
        "missing_runs": missing,
        "failed_runs": failed,
        "old_validation_rule_runs": old_rule,
        "validation_rule": OLD_VALIDATION_RULE if all_old_rule else VALIDATION_RULE,
        "earlier_init_runs": other_init,
        "aggregates": aggregate(runs),
        "plots": [],
    }
    if matplotlib_available():
        paths = plot_curves(runs, grid_dir, title=f"{spec.name}: validation loss")
        results["plots"] = [p.name for p in paths]
    else:
        log("matplotlib is not installed (pip install 'sasformer[plot]'): no plots written, everything else is")
    _write_json_atomic(grid_dir / "results.json", results)
    (grid_dir / "results.md").write_text(markdown_report(results))
    return results
