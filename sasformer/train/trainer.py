"""The training loop: accumulation, clipping, autocast, validation, logging, checkpoints and resume.

The step makes no host round trip: the loss and gradient norm stay on the device and are read at
log intervals only; a non-finite loss is remembered on the device (with its step) and raised at the
next log, validation or checkpoint, before anything is written, so the last checkpoint stays good.
"""

from __future__ import annotations

import contextlib
import json
import math
import platform
import random
import subprocess
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from sasformer.errors import RunStoppedError
from sasformer.models.decoder import DecoderLM
from sasformer.models.flops import train_flops_per_token
from sasformer.train import checkpoint as ckpt
from sasformer.train import distributed as D
from sasformer.train.config import TrainConfig
from sasformer.train.data import DataSource, PreparedData
from sasformer.train.metrics import MetricsLogger, peak_memory_gib, peak_tflops, throughput
from sasformer.train.optim import CosineSchedule, apply_hyperparameters, build_optimizer
from sasformer.utils.graph_breaks import watch_graph_breaks


class NonFiniteLossError(RunStoppedError):
    """Training produced a NaN or infinite loss; the message names the step and the last good checkpoint."""


class LossModel(nn.Module):
    """The model plus the loss, so one compiled graph covers the LM head and cross-entropy too.

    ``loss_impl`` (one of :data:`sasformer.ops.cross_entropy.IMPLS`) "chunked" fuses the head with
    the cross-entropy and never materialises the (tokens, vocab) logits (Triton kernel on CUDA,
    PyTorch elsewhere); "naive" computes them in full (the reference). ``residual_dtype`` (None: the
    embedding's) is the dtype of the residual stream (:meth:`DecoderLM.forward`).
    """

    def __init__(self, model: DecoderLM, loss_impl: str = "chunked", chunk_size: int = 8192,
                 residual_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.model = model
        self.loss_impl = loss_impl
        self.chunk_size = chunk_size
        self.residual_dtype = residual_dtype

    def forward(self, input_ids: Tensor, targets: Tensor) -> Tensor:
        return self.model(input_ids, targets=targets, loss_impl=self.loss_impl, loss_chunk_size=self.chunk_size,
                          residual_dtype=self.residual_dtype)


StepHook = Callable[["Trainer", int], None]


def _dotted(options: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings flattened to dotted names: {"triton": {"cudagraphs": False}} -> {"triton.cudagraphs": False}."""
    flat: dict[str, Any] = {}
    for key, value in options.items():
        if isinstance(value, dict):
            flat.update(_dotted(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class Trainer:
    """Train ``config``; ``data`` defaults to the prepared shards in ``config.data_dir``.

    ``step_hooks`` are called as ``hook(trainer, step)`` after every optimiser step (tests use them
    to inject faults; they are also a place for custom logging).
    """

    def __init__(self, config: TrainConfig, data: DataSource | None = None,
                 step_hooks: list[StepHook] | None = None) -> None:
        self.config = config
        self.step_hooks = list(step_hooks or [])
        self.dist, self.device = D.init_distributed(config.device)
        self.out_dir = Path(config.out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.accum = config.grad_accum(self.dist.world_size)
        self.micro = config.micro_batch(self.dist.world_size)
        self.total_steps = config.total_steps()
        self.autocast_dtype = self._autocast_dtype()
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls outside autocast (fp32 runs)
            torch.backends.cudnn.allow_tf32 = True
        data = data if data is not None else PreparedData(config.data_dir)
        self.data = data

        resume_from = self._resume_path()
        saved_state: dict[str, Any] | None = None
        saved_optim: dict[str, Any] | None = None
        if resume_from is not None:
            saved_optim, saved_state = ckpt.load_train_state(resume_from)

        # one loader call per step yields this process's rows of the global batch, whatever the world
        # size and micro-batch, so a run's data does not depend on how it is parallelised
        self.loader = data.train_loader(
            config.seq_len, config.batch_size, config.seed, self.dist.rank, self.dist.world_size,
            saved_state["tokenizer_fingerprint"] if saved_state else None,
        )
        if saved_state and self.loader.tokenizer_fingerprint != saved_state["tokenizer_fingerprint"]:
            raise ValueError(
                f"data in {config.data_dir} was tokenized with tokenizer {self.loader.tokenizer_fingerprint}, but "
                f"checkpoint {resume_from} was trained with {saved_state['tokenizer_fingerprint']}; prepare the "
                "data with the same tokenizer or start a new run (resume: none, another out_dir)"
            )
        if config.eval_interval:
            self._require_a_validation_batch()
        self.model_config = config.model.build(self.loader.vocab_size, config.seq_len)
        if resume_from is not None:
            saved_model = ckpt.read_model_config(resume_from)
            if saved_model != self.model_config:
                diff = {k: (v, getattr(self.model_config, k)) for k, v in saved_model.to_dict().items()
                        if getattr(self.model_config, k) != v}
                raise ValueError(f"checkpoint {resume_from} has another model (field: (saved, configured)) {diff}")

        _seed_everything(config.seed)
        model = DecoderLM(self.model_config)  # built on CPU from the seed: identical on every rank
        self.model = model.to(self.device)
        self.num_parameters = model.num_parameters()  # before sharding
        self.flops_per_token = train_flops_per_token(self.model_config, config.seq_len)
        self.loss_module, self._ddp = self._parallelize()
        self.optimizer = build_optimizer(self.model, config.optim, self.device)
        self.schedule = CosineSchedule(config.optim.lr, config.optim.min_lr, config.optim.warmup_steps,
                                       self.total_steps)
        self.step = 0
        self.train_seconds = 0.0  # training time so far, over all resumes (for max_time_s)
        if resume_from is not None:
            D.load_full_state(self.model, self.optimizer, ckpt.read_model_state(resume_from, self.model_config),
                              saved_optim)
            apply_hyperparameters(self.optimizer, config.optim, self.device)  # the config wins over the checkpoint
            self.loader.load_state_dict(saved_state["loader"])
            ckpt.set_rng_state(saved_state["rng"])
            self.step = int(saved_state["step"])
            self.train_seconds = float(saved_state.get("train_seconds", 0.0))
        # the log window open at the checkpoint (its steps' loss sum), so a resumed run logs the same means
        window = saved_state.get("log_window", {}) if resume_from is not None else {}
        self.resumed_from = resume_from
        self.last_checkpoint: Path | None = resume_from
        self.peak = peak_tflops(self.device, config.mfu_peak_tflops)
        self.logger: MetricsLogger | None = None  # opened by fit(), on rank 0
        # device-side accumulators, read only at log time
        self._loss_sum = torch.tensor(float(window.get("loss_sum", 0.0)), device=self.device)
        self._steps_in_window = int(window.get("steps", 0))
        self._bad_step = torch.full((), -1, dtype=torch.long, device=self.device)
        self._dev_step = torch.full((), self.step, dtype=torch.long, device=self.device)
        self._last_grad_norm = torch.zeros((), device=self.device)
        # the step whose losses and gradient norms, and whose weights, were last found finite: a step that
        # logs, validates and saves checks each once (nothing changes them until the next step)
        self._losses_checked_at = -1
        self._weights_checked_at = -1

    def _refuse_newer_checkpoints(self, resume_from: Path | None, start: int) -> None:
        """A fresh start, or a resume from an older step (``start``), next to checkpoints of a later step would
        mix two runs: keep_last would delete this run's checkpoints and ``resume: auto`` would continue the other's."""
        found = ckpt.list_checkpoints(self.ckpt_dir)
        newest = found[-1] if found else None
        resumed_newest = resume_from is not None and newest is not None and \
            newest.resolve() == Path(resume_from).resolve()
        if newest is not None and ckpt.checkpoint_step(newest) >= start and not resumed_newest:
            raise ValueError(
                f"{self.ckpt_dir} already holds checkpoints up to {newest.name} from an earlier run, which this "
                f"run (starting at step {start}) would mix with its own; use another out_dir, move them away, "
                "or resume: auto to continue that run (its checkpoints were left in place)"
            )

    def _autocast_dtype(self) -> torch.dtype | None:
        dtype = self.config.dtype
        if dtype == "auto":
            return torch.bfloat16 if self.device.type == "cuda" else None
        return torch.bfloat16 if dtype == "bfloat16" else None

    def _resume_path(self) -> Path | None:
        """The checkpoint to resume from (None: a fresh start), chosen by rank 0 and the same on every rank.

        Ranks listing ``out_dir`` each for themselves could pick different checkpoints (one written between
        the listings, or nodes that see different filesystems). Rank 0's outcome, a refusal included, reaches
        every rank, so all stop together; a rank that cannot see the chosen checkpoint stops them all too.
        """
        chosen: Path | None = None
        failure: Exception | None = None
        if self.dist.is_main:
            try:
                chosen = self._choose_resume()
            except Exception as error:  # re-raised below, once the other ranks have heard of it
                failure = error
        name, message = D.broadcast_object((None if chosen is None else str(chosen),
                                            None if failure is None else f"{type(failure).__name__}: {failure}"))
        if failure is not None:
            raise failure
        if message is not None:
            raise RuntimeError(f"rank 0 could not choose a checkpoint to resume from: {message}")
        path = None if name is None else Path(name)
        blind = [rank for rank, sees in enumerate(D.all_gather_object(path is None or ckpt.is_complete(path)))
                 if not sees]
        if blind:
            raise ValueError(
                f"rank 0 resumes from {path}, which rank(s) {blind} cannot find complete; every process must see "
                "the same out_dir (on several nodes, a filesystem they share) or resume: none"
            )
        return path

    def _choose_resume(self) -> Path | None:
        """Rank 0's choice: after finishing or undoing saves a crash interrupted, ``resume``'s checkpoint."""
        ckpt.recover_interrupted_saves(self.ckpt_dir)
        resume = self.config.resume
        if resume == "none":
            path = None
        elif resume == "auto":
            path = ckpt.latest_checkpoint(self.ckpt_dir)
        else:
            path = Path(resume)
        # read once; for a named path also the clear error when it is not a complete checkpoint
        start = int(ckpt.read_config(path)["step"]) if path is not None else 0
        self._refuse_newer_checkpoints(path, start)
        return path

    def _parallelize(self) -> tuple[nn.Module, nn.Module | None]:
        """The callable module computing the loss, and the DDP wrapper if any (for ``no_sync``)."""
        cfg, model = self.config, self.model
        if cfg.compile and self.compile_scope == "block":
            self._compile_blocks()
        if self.fsdp_sharded:
            param_dtype = self.autocast_dtype if cfg.fsdp_param_dtype == "compute" else None
            D.apply_fsdp(model, model.blocks, param_dtype, cfg.fsdp_reshard_after_forward, cfg.fsdp_blocks_per_unit)
            return self._loss_model(), None
        module: nn.Module = self._loss_model()
        if cfg.compile and self.compile_scope == "model":
            # compiled inside DDP rather than around it: Dynamo then never traces DDP's own forward (which it
            # would run eagerly after three graph breaks), and the compiled module, called from that forward,
            # is still split at DDP's gradient buckets (DDPOptimizer) so communication overlaps the backward
            module = torch.compile(module, **self._compile_kwargs())
        ddp = None
        if self.dist.enabled:
            module = ddp = D.apply_ddp(module, self.device)
        return module, ddp

    def _loss_model(self) -> LossModel:
        cfg = self.config
        residual_dtype = self.autocast_dtype if cfg.residual_dtype == "compute" else None
        if residual_dtype is not None:  # bf16 norm inputs with fp32 weights: eager RMSNorm says it takes its plain path
            warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight", category=UserWarning,
                                    module="torch.nn.functional")
        return LossModel(self.model, cfg.loss_impl, cfg.loss_chunk_size, residual_dtype)

    @property
    def fsdp_sharded(self) -> bool:
        """Whether FSDP2 shards the model: ``parallel: fsdp`` on more than one process."""
        return self.dist.enabled and self.config.parallel == "fsdp"

    @property
    def compile_scope(self) -> str:
        """``model`` or ``block``: what one ``torch.compile`` covers (config ``compile_scope``, ``auto`` resolved)."""
        if self.config.compile_scope != "auto":
            return self.config.compile_scope
        return "block" if self.fsdp_sharded else "model"

    def _compile_blocks(self) -> None:
        """Compile each decoder block, and the final norm, head and loss, on their own.

        FSDP2's hooks sit between the blocks, so it needs this form; the head and loss would otherwise run
        eager, with full-size fp32 temporaries of the logits. Dynamo starts tracing at the block's forward and
        FSDP2's hooks (excluded from dynamo) run eagerly around it: compiling before or after ``fully_shard``
        times the same.
        """
        compile_kwargs = self._compile_kwargs()
        for block in self.model.blocks:
            block.compile(**compile_kwargs)
        self.model.head_loss = torch.compile(self.model.head_loss, **compile_kwargs)

    def _compile_kwargs(self) -> dict[str, Any]:
        """``torch.compile``'s ``mode``, or its Inductor ``options`` when the config sets them."""
        if not self.config.compile_options:
            return {"mode": self.config.compile_mode}
        from torch._inductor import list_options

        # a dotted option given as nested keys (``--compile_options.triton.cudagraphs false``) is one name
        options = _dotted(self.config.compile_options)

        if unknown := sorted(set(options) - set(list_options())):
            raise ValueError(f"compile_options {unknown} are not Inductor options (torch._inductor.list_options())")
        return {"options": dict(options)}

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def train_step(self, mark: Callable[[str], None] | None = None) -> None:
        """One optimiser step over ``accum`` micro-batches; no host synchronisation.

        ``mark(phase)``, if given, is called at the end of each phase of the step (``schedule``,
        ``batch``, ``forward``, ``backward`` per micro-batch, ``clip``, ``optimizer``, ``zero_grad``,
        ``bookkeeping``); ``benchmarks/train_speed.py --breakdown`` times them with it.
        """
        mark = mark or _no_mark
        self.schedule.apply(self.optimizer, self.step)
        mark("schedule")
        loss_sum = torch.zeros((), device=self.device)
        inputs_BT, targets_BT = self.loader.next_batch()
        if self.device.type == "cuda":  # a copy from pageable memory would make the host wait for the GPU
            inputs_BT, targets_BT = inputs_BT.pin_memory(), targets_BT.pin_memory()
        inputs_BT = inputs_BT.to(self.device, non_blocking=True)
        targets_BT = targets_BT.to(self.device, non_blocking=True)
        mark("batch")
        for micro, (inputs, targets) in enumerate(zip(inputs_BT.split(self.micro), targets_BT.split(self.micro))):
            with D.no_sync(self._ddp, micro < self.accum - 1):
                with self._autocast():
                    loss = self.loss_module(inputs, targets)
                mark("forward")
                (loss / self.accum).backward()  # outside autocast, as autocast's documentation asks
            loss_sum += loss.detach()
            mark("backward")
        max_norm = self.config.optim.grad_clip if self.config.optim.grad_clip is not None else math.inf
        grad_norm = D.clip_grad_norm_(self.model.parameters(), max_norm)
        mark("clip")
        self.optimizer.step()
        mark("optimizer")
        self.optimizer.zero_grad(set_to_none=True)
        mark("zero_grad")
        self.step += 1
        self._dev_step += 1
        step_loss = loss_sum / self.accum
        # a finite loss with a non-finite gradient still ruins the weights (clipping spreads the NaN to all)
        newly_bad = (~torch.isfinite(step_loss) | ~torch.isfinite(grad_norm)) & (self._bad_step < 0)
        self._bad_step = torch.where(newly_bad, self._dev_step, self._bad_step)
        self._loss_sum += step_loss
        self._steps_in_window += 1
        self._last_grad_norm = grad_norm.detach()
        mark("bookkeeping")

    def check_finite(self) -> None:
        """Raise :class:`NonFiniteLossError` if any step since the start had a non-finite loss or gradient norm
        (syncs)."""
        if self._losses_checked_at == self.step:
            return
        never = torch.iinfo(torch.long).max
        first_bad = D.all_reduce_min(torch.where(self._bad_step >= 0, self._bad_step, never))
        if first_bad.item() != never:
            bad_step = int(first_bad.item())
            raise NonFiniteLossError(
                f"loss or gradient norm became NaN/inf at step {bad_step}; training stopped and nothing after it was "
                f"saved ({self._last_good()}). Lower optim.lr, raise optim.warmup_steps or set optim.grad_clip, then "
                "resume."
            )
        self._losses_checked_at = self.step

    def _last_good(self) -> str:
        """Where a stopped run can resume from, for the messages that stop it."""
        return f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint else \
            "no checkpoint was written"

    @torch.no_grad()
    def _check_parameters_finite(self) -> None:
        """Refuse to save non-finite weights (an update can overflow with a finite loss and gradient)."""
        if self._weights_checked_at == self.step:
            return
        local = [p.to_local() if hasattr(p, "to_local") else p for p in self.model.parameters()]
        finite = torch.stack([torch.isfinite(t).all() for t in local if t.numel()]).all().long()
        if D.all_reduce_min(finite).item() == 0:
            raise NonFiniteLossError(
                f"the weights hold NaN/inf after step {self.step} (the loss and gradient norm were finite: the "
                f"update overflowed); training stopped and nothing was saved ({self._last_good()}). Lower optim.lr, "
                "then resume."
            )
        self._weights_checked_at = self.step

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss over ``eval_batches`` global batches of the validation split (all processes).

        A batch holds ``batch_size`` windows whatever the number of processes and micro-batches, each process
        scoring its rows a micro-batch at a time, so the loss covers the same windows however a run is split.
        """
        total = torch.zeros(2, device=self.device, dtype=torch.float64)
        for inputs_BT, targets_BT in self._validation_batches(self.config.eval_batches):
            for inputs, targets in zip(inputs_BT.split(self.micro), targets_BT.split(self.micro)):
                inputs, targets = inputs.to(self.device), targets.to(self.device)
                with self._autocast():
                    loss = self.loss_module(inputs, targets)
                total += torch.stack([loss.double() * targets.numel(),
                                      torch.tensor(targets.numel(), device=self.device)])
        D.all_reduce_sum(total)
        if total[1].item() == 0:
            raise ValueError(self._no_validation_message())
        return (total[0] / total[1]).item()

    def _validation_batches(self, max_batches: int) -> Iterable[tuple[Tensor, Tensor]]:
        return self.data.eval_batches(self.config.seq_len, self.config.batch_size, max_batches, self.dist.rank,
                                      self.dist.world_size, self.loader.tokenizer_fingerprint)

    def _require_a_validation_batch(self) -> None:
        """Refuse to start a run whose first validation would fail, instead of losing its steps to it then.

        Every process draws the same windows, so all of them raise or none does.
        """
        batches = self._validation_batches(1)
        try:
            first = next(iter(batches), None)
        finally:
            getattr(batches, "close", lambda: None)()  # a generator's open shard files go now, not at collection
        if first is None:
            raise ValueError(self._no_validation_message())

    def _no_validation_message(self) -> str:
        # eval_batches cuts a batch to a multiple of the processes: one window is no batch for two
        return (f"the validation split of {self.config.data_dir} gives no batch of seq_len {self.config.seq_len} "
                f"windows for {self.dist.world_size} process(es); prepare more validation text (--val-fraction) "
                "or set eval_interval: 0")

    def save(self) -> Path | None:
        """Write a checkpoint of the current step (rank 0 writes; every rank joins the gather)."""
        self.check_finite()
        self._check_parameters_finite()
        model_state, optim_state = D.full_state(self.model, self.optimizer)
        # the open log window's loss sum, averaged over processes as the log line will be (every rank joins)
        window_loss = float(D.all_reduce_sum(self._loss_sum.clone()) / self.dist.world_size)
        path = None
        if self.dist.is_main:
            train_state = {
                "tokens_seen": self.step * self.config.batch_size * self.config.seq_len,
                "schedule": self.schedule.state_dict(),
                "rng": ckpt.rng_state(),
                "loader": self.loader.state_dict(),
                "tokenizer_fingerprint": self.loader.tokenizer_fingerprint,
                "world_size": self.dist.world_size,
                "train_seconds": self.train_seconds,
                "log_window": {"loss_sum": window_loss, "steps": self._steps_in_window},
            }
            path = ckpt.save_checkpoint(self.ckpt_dir, self.step, model_state, self.model_config, optim_state,
                                        train_state, {"train": self.config.to_dict()}, self.config.keep_last)
        D.barrier()
        self.last_checkpoint = self.ckpt_dir / ckpt.step_dir_name(self.step)
        return path

    def _log_train(self, window_s: float, window_steps: int) -> dict[str, Any]:
        loss_sum = D.all_reduce_sum(self._loss_sum.clone()) / self.dist.world_size
        record: dict[str, Any] = {
            "kind": "train",
            "step": self.step,
            "loss": loss_sum.item() / max(1, self._steps_in_window),
            "lr": self.schedule.lr_at(self.step - 1),
            "grad_norm": self._last_grad_norm.item(),
            "tokens": self.step * self.config.batch_size * self.config.seq_len,
            "train_seconds": self.train_seconds,
        }
        tokens = window_steps * self.config.batch_size * self.config.seq_len
        record.update(throughput(tokens, window_s, self.flops_per_token, self.dist.world_size, self.peak))
        record["peak_mem_gib"] = peak_memory_gib(self.device)
        self._loss_sum.zero_()
        self._steps_in_window = 0
        if self.logger is not None:
            self.logger.log(record)
        return record

    def _write_run_info(self) -> None:
        info = {
            "config": self.config.to_dict(),
            "model": self.model_config.to_dict(),
            "parameters": self.num_parameters,
            "train_flops_per_token": self.flops_per_token,
            "world_size": self.dist.world_size,
            "grad_accum": self.accum,
            "micro_batch_size": self.micro,
            "device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else platform.processor(),
            "peak_tflops": self.peak,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "git_revision": _git_revision(),
            "resumed_from": str(self.resumed_from) if self.resumed_from else None,
        }
        (self.out_dir / "run.json").write_text(json.dumps(info, indent=2, default=str))

    def out_of_time(self) -> bool:
        """True once any process has trained ``max_time_s`` seconds (never without a time limit); syncs."""
        if self.config.max_time_s is None:
            return False
        late = torch.tensor(float(self.train_seconds >= self.config.max_time_s), device=self.device)
        return bool(D.all_reduce_sum(late).item() > 0)

    def _first_compiled_step(self) -> None:
        """The step that compiles, watched for graph breaks: a broken graph can make a compiled model much slower
        than one graph would, and torch says so only in its log. Warned about, and logged as a ``compile`` record."""
        with watch_graph_breaks() as breaks:
            self.train_step()
        if breaks.clean or breaks.count is None or not self.dist.is_main:  # a torch without the records: silent
            return
        warnings.warn(breaks.warning("the compiled training step"), stacklevel=3)
        if self.logger is not None:
            self.logger.log({"kind": "compile", "step": self.step, "graph_breaks": breaks.to_dict()})

    def fit(self) -> dict[str, Any]:
        """Train to ``total_steps`` (or ``max_time_s``); returns the last train record (and validation loss)."""
        cfg = self.config
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._write_run_info()
            self.logger = MetricsLogger(self.out_dir, cfg.tensorboard)
        bar = None
        if cfg.progress and self.dist.is_main:
            from tqdm import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True)

        def say(line: str) -> None:
            if not (cfg.console and self.dist.is_main):
                return
            if bar is not None:
                bar.write(line)  # above the bar, which redraws below it
            else:
                print(line, flush=True)
        if self.resumed_from is not None:
            say(f"resumed from {self.resumed_from} (step {self.step} of {self.total_steps})")
        if cfg.eval_interval:  # its size follows batch_size: said once, as validation time grows with it
            windows = cfg.eval_batches * cfg.batch_size
            say(f"validation: up to {cfg.eval_batches} batches x {cfg.batch_size} windows of {cfg.seq_len} tokens "
                f"({windows * cfg.seq_len:,} tokens) every {cfg.eval_interval} steps")
        last: dict[str, Any] = {"step": self.step}
        window_start, window_steps = time.perf_counter(), 0
        clock = window_start
        time_up = self.out_of_time()
        first = True
        try:
            while self.step < self.total_steps and not time_up:
                if first and cfg.compile:
                    self._first_compiled_step()
                else:
                    self.train_step()
                first = False
                window_steps += 1
                now = time.perf_counter()
                self.train_seconds += now - clock
                clock = now
                for hook in self.step_hooks:
                    hook(self, self.step)
                if bar is not None:
                    bar.update(1)
                # the time limit is checked at log steps only, where processes synchronise anyway
                if cfg.max_time_s is not None and self.step % cfg.log_interval == 0:
                    time_up = self.out_of_time()
                done = self.step == self.total_steps or time_up
                if self.step % cfg.log_interval == 0 or done:
                    self.check_finite()  # syncs, so the window time below is real
                    last = self._log_train(time.perf_counter() - window_start, window_steps)
                    if bar is not None:
                        bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2e}")
                    else:
                        say(_train_line(last, self.total_steps))
                    window_start, window_steps = time.perf_counter(), 0
                eval_now = cfg.eval_interval and (self.step % cfg.eval_interval == 0 or done)
                save_now = (cfg.checkpoint_interval and self.step % cfg.checkpoint_interval == 0) or done
                if eval_now or save_now:
                    paused = time.perf_counter()
                    if eval_now:
                        self.check_finite()
                        self._check_parameters_finite()  # no NaN validation record of weights that will not be saved
                        val = self.evaluate()
                        last["val_loss"] = val
                        say(f"step {self.step}: val loss {val:.4f}, ppl {math.exp(min(val, 50.0)):.2f}")
                        if self.logger is not None:
                            self.logger.log({"kind": "val", "step": self.step, "val_loss": val,
                                             "val_ppl": math.exp(min(val, 50.0))})
                    if save_now:
                        self.save()
                    # validation and saving are not training time
                    paused = time.perf_counter() - paused
                    window_start += paused
                    clock += paused
        finally:
            if bar is not None:
                bar.close()
            if self.logger is not None:
                self.logger.close()
                self.logger = None
        return last


def _no_mark(phase: str) -> None:
    pass


def _train_line(record: dict[str, Any], total_steps: int) -> str:
    """One console line of a train record: step, loss, lr, tokens/s and MFU where known."""
    line = f"step {record['step']}/{total_steps}: loss {record['loss']:.4f}, lr {record['lr']:.2e}, " \
           f"{record['tokens_per_s']:,.0f} tokens/s"
    return line + (f", MFU {record['mfu']:.1%}" if record.get("mfu") is not None else "")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _git_revision() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def train(config: TrainConfig, data: DataSource | None = None) -> dict[str, Any]:
    """Run ``config`` to the end (the ``sasformer train`` entry point); returns the last metrics."""
    trainer = Trainer(config, data)
    try:
        return trainer.fit()
    finally:
        D.shutdown()
