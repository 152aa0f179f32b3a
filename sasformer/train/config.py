"""Training configuration: nested dataclasses loaded from YAML, with ``--dotted.key value`` overrides.

Imports no torch, so the command line stays fast to build.

Every key is checked: an unknown one is a ValueError naming it and listing the known keys, so a typo
never trains silently with a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

if typing.TYPE_CHECKING:
    from sasformer.models.config import ModelConfig


@dataclass
class ModelSection:
    """Which model to train: a preset size and attention variant, plus optional field overrides.

    ``vocab_size`` is not set here: it comes from the prepared data (its tokenizer), rounded up to a
    multiple of ``pad_vocab_to`` so the embedding and LM-head matmuls use fast tile sizes (50257 ->
    50304); the extra ids never occur as targets. Fields left None keep the preset's value;
    ``max_seq_len`` None means max(preset, ``seq_len``).
    """

    size: str = "tiny"
    attention: str = "mha"
    attention_args: dict[str, Any] = field(default_factory=dict)
    d_model: int | None = None
    n_layers: int | None = None
    max_seq_len: int | None = None
    mlp_hidden: int | None = None
    rope_theta: float | None = None
    norm_eps: float | None = None
    tie_embeddings: bool | None = None
    init_std: float | None = None
    pad_vocab_to: int = 64

    def build(self, vocab_size: int, seq_len: int) -> ModelConfig:
        """The model config for data with ``vocab_size`` tokens trained at ``seq_len``."""
        from sasformer.models.presets import SIZES, preset

        if self.size not in SIZES:
            raise ValueError(f"model.size={self.size!r} is not a preset; choose one of {list(SIZES)}")
        if self.pad_vocab_to < 1:
            raise ValueError(f"model.pad_vocab_to={self.pad_vocab_to} must be >= 1 (1: no padding)")
        own = ("size", "attention", "attention_args", "pad_vocab_to")
        overrides = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in own and getattr(self, f.name) is not None
        }
        vocab_size = -(-vocab_size // self.pad_vocab_to) * self.pad_vocab_to
        overrides.setdefault("max_seq_len", max(SIZES[self.size].max_seq_len, seq_len))
        return preset(
            self.size, self.attention, attention_args=dict(self.attention_args), vocab_size=vocab_size, **overrides
        )


@dataclass
class OptimSection:
    """AdamW with linear warmup then cosine decay to ``min_lr`` at the last step.

    Weight decay applies to matrices (linear and simulation weights, dim >= 2) except the token
    embedding (tied to the LM head); norms, biases and the embedding get none.
    """

    lr: float = 3e-4
    min_lr: float = 3e-5
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    warmup_steps: int = 100
    grad_clip: float | None = 1.0


# the choices of sasformer.ops.cross_entropy.IMPLS (not imported: this module imports no torch)
LOSS_IMPLS = ("chunked", "chunked_torch", "chunked_triton", "naive")

# CUDA graphs are left out: the trainer's step changes the learning rate and reuses no static buffers
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")


@dataclass
class TrainConfig:
    """One training run. ``batch_size`` is the global batch in sequences, whatever the world size.

    ``micro_batch_size`` is per process; gradient accumulation makes up the rest:
    ``accum = batch_size / (micro_batch_size * world_size)``. None means no accumulation.
    Exactly one of ``max_steps`` / ``max_tokens`` sets the length (tokens are rounded up to steps).
    """

    model: ModelSection = field(default_factory=ModelSection)
    optim: OptimSection = field(default_factory=OptimSection)
    data_dir: str = "data/tiny"
    seq_len: int = 256
    batch_size: int = 8
    micro_batch_size: int | None = None
    max_steps: int | None = 1000
    max_tokens: int | None = None
    # stop after this many seconds of training (validation and checkpoints excluded), whichever of this and
    # the step/token limit comes first; the learning-rate schedule still spans max_steps / max_tokens
    max_time_s: float | None = None
    dtype: str = "auto"  # auto: bfloat16 autocast on CUDA, float32 on CPU
    compile: bool = False
    compile_mode: str = "default"  # torch.compile mode: default | max-autotune-no-cudagraphs
    # Inductor options for torch.compile (its ``options``, e.g. {coordinate_descent_tuning: true}), instead of
    # a compile_mode other than default; names are checked against torch._inductor.list_options()
    compile_options: dict[str, Any] = field(default_factory=dict)
    # what one torch.compile covers: model (the model with its loss, one graph), block (each decoder block, and
    # the final norm, head and loss, on their own: faster to compile, and the graphs FSDP2 runs), auto (block
    # under FSDP2, whose hooks sit between the blocks, else model)
    compile_scope: str = "auto"
    # chunked: fused LM head + cross-entropy without full logits (Triton kernel on CUDA when installed, else
    # PyTorch) | chunked_triton | chunked_torch (either forced) | naive (full logits, the reference)
    loss_impl: str = "chunked"
    loss_chunk_size: int = 8192  # tokens per chunk of the chunked loss
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    parallel: str = "ddp"  # ddp | fsdp (used when launched with torchrun on more than one process)
    # FSDP2: free each block's gathered parameters after its forward (ZeRO-3) and gather them again for
    # its backward; false keeps them until the backward (ZeRO-2: less communication, more memory)
    fsdp_reshard_after_forward: bool = True
    # FSDP2: consecutive blocks per sharded unit (0: the whole model one unit); each unit costs host
    # time per step, which a small model's short steps may not hide
    fsdp_blocks_per_unit: int = 1
    # FSDP2 under bf16 autocast: float32 gathers the fp32 parameters and lets autocast cast per op, the
    # arithmetic of one process and of DDP (fp32 embeddings, norms and residual stream); compute gathers them
    # in the autocast dtype (FSDP2's mixed precision: half the all-gather bytes, less activation memory, but
    # the residual stream and norms then run in bf16, so the loss curve departs from one process's)
    fsdp_param_dtype: str = "float32"
    # dtype of the residual stream under autocast: float32 (the embedding's dtype: the blocks' bf16 outputs are
    # added in fp32) or compute (the autocast dtype, as FSDP2's compute parameters give: the norms, residual
    # adds and their gradients move half the bytes; each addition rounds to bf16). No effect in fp32 runs.
    residual_dtype: str = "float32"
    eval_interval: int = 200  # 0 disables periodic validation
    eval_batches: int = 20
    log_interval: int = 10
    checkpoint_interval: int = 500  # 0: only the final checkpoint
    keep_last: int = 3
    out_dir: str = "runs/tiny"
    resume: str = "auto"  # auto | none | path to a checkpoint directory
    mfu_peak_tflops: float | None = None  # per-device bf16 dense peak; None: look the device up
    tensorboard: bool = True
    progress: bool = True
    # without the bar, one line per log_interval on the console; validation losses are printed either way
    console: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)

        need(self.seq_len >= 1, f"seq_len={self.seq_len} must be >= 1")
        need(self.batch_size >= 1, f"batch_size={self.batch_size} must be >= 1")
        need(self.micro_batch_size is None or self.micro_batch_size >= 1,
             f"micro_batch_size={self.micro_batch_size} must be >= 1 or null")
        need((self.max_steps is None) != (self.max_tokens is None),
             f"set exactly one of max_steps={self.max_steps} and max_tokens={self.max_tokens} (the other null)")
        need(self.max_steps is None or self.max_steps >= 1, f"max_steps={self.max_steps} must be >= 1")
        need(self.max_tokens is None or self.max_tokens >= 1, f"max_tokens={self.max_tokens} must be >= 1")
        need(self.max_time_s is None or self.max_time_s > 0, f"max_time_s={self.max_time_s} must be > 0 or null")
        need(self.dtype in ("auto", "bfloat16", "float32"), f"dtype={self.dtype!r}: use auto, bfloat16 or float32")
        need(self.device in ("auto", "cpu", "cuda"), f"device={self.device!r}: use auto, cpu or cuda")
        need(self.compile_mode in COMPILE_MODES, f"compile_mode={self.compile_mode!r}: use one of {COMPILE_MODES}")
        need(not (self.compile_options and self.compile_mode != "default"),
             f"set compile_mode={self.compile_mode!r} or compile_options, not both (torch.compile takes one of them)")
        need(self.compile_scope in ("auto", "model", "block"),
             f"compile_scope={self.compile_scope!r}: use auto, model or block")
        need(not (self.compile_scope == "model" and self.parallel == "fsdp"),
             "compile_scope='model' cannot run under parallel='fsdp' (FSDP2's hooks sit between the blocks); "
             "use auto or block")
        need(self.loss_impl in LOSS_IMPLS, f"loss_impl={self.loss_impl!r}: use one of {LOSS_IMPLS}")
        need(self.loss_chunk_size >= 1, f"loss_chunk_size={self.loss_chunk_size} must be >= 1")
        need(self.parallel in ("ddp", "fsdp"), f"parallel={self.parallel!r}: use ddp or fsdp")
        need(self.fsdp_param_dtype in ("float32", "compute"),
             f"fsdp_param_dtype={self.fsdp_param_dtype!r}: use float32 or compute")
        need(self.residual_dtype in ("float32", "compute"),
             f"residual_dtype={self.residual_dtype!r}: use float32 or compute")
        need(self.fsdp_blocks_per_unit >= 0,
             f"fsdp_blocks_per_unit={self.fsdp_blocks_per_unit} must be >= 0 (0: the whole model one unit)")
        for name in ("eval_interval", "checkpoint_interval"):
            need(getattr(self, name) >= 0, f"{name}={getattr(self, name)} must be >= 0 (0 disables)")
        for name in ("eval_batches", "log_interval", "keep_last"):
            need(getattr(self, name) >= 1, f"{name}={getattr(self, name)} must be >= 1")
        o = self.optim
        need(o.lr > 0 and 0 <= o.min_lr <= o.lr, f"optim.lr={o.lr}, optim.min_lr={o.min_lr}: need 0 <= min_lr <= lr")
        need(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), f"optim.betas={o.betas}: two values in [0, 1)")
        need(o.eps > 0, f"optim.eps={o.eps} must be > 0")
        need(o.weight_decay >= 0, f"optim.weight_decay={o.weight_decay} must be >= 0")
        need(o.warmup_steps >= 0, f"optim.warmup_steps={o.warmup_steps} must be >= 0")
        need(o.grad_clip is None or o.grad_clip > 0, f"optim.grad_clip={o.grad_clip} must be > 0 or null")
        need(self.mfu_peak_tflops is None or self.mfu_peak_tflops > 0,
             f"mfu_peak_tflops={self.mfu_peak_tflops} must be > 0 or null")

    def total_steps(self) -> int:
        if self.max_steps is not None:
            return self.max_steps
        return -(-self.max_tokens // (self.batch_size * self.seq_len))

    def grad_accum(self, world_size: int) -> int:
        """Micro-steps per optimiser step on each process; raises if the batch does not split evenly."""
        micro = self.micro_batch_size or -(-self.batch_size // world_size)
        if self.batch_size % (micro * world_size):
            raise ValueError(
                f"batch_size={self.batch_size} must be a multiple of micro_batch_size={micro} x world_size="
                f"{world_size}; change one of them"
            )
        return self.batch_size // (micro * world_size)

    def micro_batch(self, world_size: int) -> int:
        return self.batch_size // (self.grad_accum(world_size) * world_size)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return _build(cls, data, "")


def _known_keys(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _build(cls: type, data: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "config"
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a mapping, got {type(data).__name__}")  # noqa: TRY004 - bad user input
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(_known_keys(cls)))
    if unknown:
        keys = ", ".join(prefix + k for k in _known_keys(cls))
        raise ValueError(f"unknown config key(s) {[prefix + k for k in unknown]}; known keys: {keys}")
    values = {key: _coerce(value, hints[key], prefix + key) for key, value in data.items()}
    return cls(**values)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the field's type, or raise a ValueError naming the key."""
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".")
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key)
    if hint is Any:
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ValueError(f"{key} must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{key} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = None
        if number is None or not number.is_integer() or isinstance(value, bool):
            raise ValueError(f"{key} must be an integer, got {value!r}")
        return int(number)
    if hint is float:
        try:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key} must be a number, got {value!r}") from None
    if hint is str:
        if isinstance(value, (dict, list)):
            raise ValueError(f"{key} must be a string, got {value!r}")
        return str(value)
    raise TypeError(f"no conversion for {key} of type {hint}")


def parse_value(text: str) -> Any:
    """A command-line value as YAML (``1e-3``, ``true``, ``null``, ``[0.9, 0.95]``, ``{a: 1}``)."""
    value = yaml.safe_load(text) if text.strip() else ""
    if isinstance(value, str):
        try:  # YAML 1.1 reads "1e-3" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    return value


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """``set_dotted(d, "model.attention_args.kernel_size", 1)`` creates missing mappings on the way."""
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"cannot set {dotted}: {part} is {child!r}, not a mapping")  # noqa: TRY004
        node = child
    node[parts[-1]] = value


def parse_overrides(argv: list[str]) -> dict[str, Any]:
    """``["--optim.lr", "1e-3", "--compile=true"]`` -> ``{"optim.lr": 0.001, "compile": True}``."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ValueError(f"expected --key value, got {arg!r}; keys: {', '.join(all_keys())}")
        if "=" in arg:
            key, text = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(argv):
                raise ValueError(f"{arg} needs a value")
            key, text = arg[2:], argv[i + 1]
            i += 2
        out[key] = parse_value(text)
    return out


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Load ``path`` (YAML; None = defaults) and apply ``{"dotted.key": value}`` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {path} does not exist; see configs/ for examples")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"config file {path} must hold a mapping of key: value")
    for key, value in (overrides or {}).items():
        set_dotted(data, key, value)
    return TrainConfig.from_dict(data)


def all_keys(cls: type = TrainConfig, prefix: str = "") -> list[str]:
    """Every dotted key of the config tree (mappings such as attention_args appear once)."""
    keys: list[str] = []
    hints = typing.get_type_hints(cls)
    for name in _known_keys(cls):
        if dataclasses.is_dataclass(hints[name]):
            keys += all_keys(hints[name], f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys
