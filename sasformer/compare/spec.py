"""The grid of a comparison: variants x sizes x seeds on one data set and one budget, read from YAML.

Every key is checked at load time: an unknown one is a ValueError naming it (dotted, as it appears in
the YAML) and listing the keys allowed there. See ``docs/compare.md`` for the schema.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

BUDGET_KINDS = ("tokens", "flops", "time")
# keys of the training config that the grid sets per run, so the `train:` section may not
_RUN_OWNED = ("model", "data_dir", "out_dir", "seed", "max_steps", "max_tokens", "max_time_s", "resume")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


def _check_keys(data: Any, cls: type, where: str) -> dict[str, Any]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{where or 'the grid'} must be a mapping of key: value, got {data!r}")  # noqa: TRY004
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(known))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ValueError(f"unknown grid key(s) {[prefix + k for k in unknown]}; known here: {known}")
    return dict(data)


@dataclass
class DataSpec:
    """A prepared data folder, and optionally how to prepare it when it is missing or out of date.

    With ``inputs`` set, the folder is (re)built by ``sasformer.data.prepare`` (a no-op when it is
    already up to date): ``tokenizer`` names one to use, or ``vocab_size`` trains a byte-level BPE.
    Without ``inputs``, ``dir`` must already hold ``sasformer prepare`` output.
    """

    dir: str = "data/compare"
    inputs: list[str] | None = None
    tokenizer: str | None = None
    vocab_size: int | None = None
    val_fraction: float = 0.005
    text_field: str = "text"

    @classmethod
    def from_dict(cls, data: Any) -> DataSpec:
        spec = cls(**_check_keys(data, cls, "data"))
        if spec.inputs is not None:
            if isinstance(spec.inputs, str):
                spec.inputs = [spec.inputs]
            if not spec.inputs:
                raise ValueError("data.inputs is empty; list files/folders/`default`, or leave it out to use data.dir")
            if (spec.tokenizer is None) == (spec.vocab_size is None):
                raise ValueError("data.inputs is set: give exactly one of data.tokenizer (use one) or "
                                 "data.vocab_size (train a BPE)")
        return spec


@dataclass
class BudgetSpec:
    """How long every run trains.

    - ``tokens``: every run sees ``tokens`` tokens.
    - ``flops``: iso-compute; a run sees ``flops / train_flops_per_token`` tokens (its own FLOPs/token).
    - ``time``: every run trains ``seconds`` of wall-clock training time; ``tokens`` is required and
      lays out the learning-rate schedule (and caps the run), so set it near what the fastest variant
      reaches in ``seconds``.
    """

    kind: str = "tokens"
    tokens: int | None = None
    flops: float | None = None
    seconds: float | None = None

    @classmethod
    def from_dict(cls, data: Any) -> BudgetSpec:
        values = _check_keys(data, cls, "budget")
        for key, kind in (("tokens", int), ("flops", float), ("seconds", float)):
            if values.get(key) is not None:
                try:
                    number = float(values[key])
                except (TypeError, ValueError):
                    raise ValueError(f"budget.{key} must be a number, got {values[key]!r}") from None
                if number <= 0:
                    raise ValueError(f"budget.{key}={values[key]} must be > 0")
                values[key] = kind(number)
        spec = cls(**values)
        if spec.kind not in BUDGET_KINDS:
            raise ValueError(f"budget.kind={spec.kind!r}: use one of {list(BUDGET_KINDS)}")
        needed = {"tokens": ["tokens"], "flops": ["flops"], "time": ["seconds", "tokens"]}[spec.kind]
        missing = [k for k in needed if getattr(spec, k) is None]
        if missing:
            raise ValueError(f"budget.kind={spec.kind!r} needs {['budget.' + k for k in missing]}")
        return spec


@dataclass
class VariantSpec:
    """One entry of the grid: an attention variant with its arguments and optional model overrides.

    ``attention_args`` update the preset's parameter-matched arguments (so ``{kernel_size: 1}`` is
    enough for a SAS ablation); ``model`` holds model-section overrides (``size``, ``d_model``, ...).
    """

    name: str
    attention: str
    attention_args: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Any, where: str) -> VariantSpec:
        if isinstance(data, str):
            data = {"name": data, "attention": data}
        values = _check_keys(data, cls, where)
        values.setdefault("attention", values.get("name"))
        if "name" not in values:
            values["name"] = values["attention"]
        if values["name"] is None:
            raise ValueError(f"{where} needs a name or an attention")
        spec = cls(**values)
        if not _NAME.match(str(spec.name)):
            raise ValueError(f"{where}.name={spec.name!r}: use letters, digits and _ . + - (it names a folder)")
        for key in ("attention_args", "model"):
            if not isinstance(getattr(spec, key), dict):
                raise ValueError(f"{where}.{key} must be a mapping, got {getattr(spec, key)!r}")  # noqa: TRY004
        if "attention" in spec.model or "attention_args" in spec.model:
            raise ValueError(f"{where}.model: set attention and attention_args on the entry itself")
        return spec


@dataclass
class MQARSpec:
    """The synthetic recall probe (``sasformer.eval.mqar``): a small fresh model per variant and seed.

    Defaults are the evaluation module's (measured there to learn the default task with MHA).
    """

    enabled: bool = False
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    steps: int = 3000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    num_kv_pairs: int = 8
    num_queries: int = 8
    seq_len: int = 64
    vocab_size: int = 64
    n_test: int = 512

    @classmethod
    def from_dict(cls, data: Any) -> MQARSpec:
        return cls(**_check_keys(data, cls, "eval.mqar"))


@dataclass
class EvalSpec:
    """What is measured after each run besides the validation loss.

    ``zero_shot_dir``: a folder of task JSONL files (``sasformer.eval.read_eval_dir``); null skips.
    ``zero_shot_limit`` caps items per task (null: all of them).
    """

    zero_shot_dir: str | None = None
    zero_shot_tasks: list[str] | None = None
    zero_shot_limit: int | None = None
    zero_shot_batch_size: int = 32
    mqar: MQARSpec = field(default_factory=MQARSpec)

    @classmethod
    def from_dict(cls, data: Any) -> EvalSpec:
        values = _check_keys(data, cls, "eval")
        values["mqar"] = MQARSpec.from_dict(values.get("mqar"))
        return cls(**values)


@dataclass
class GridSpec:
    """A whole comparison. ``train`` holds training-config keys shared by every run (batch, optimiser,
    sequence length, evaluation interval, ...); ``model`` holds model-section keys shared by every run."""

    name: str
    variants: list[VariantSpec]
    seeds: list[int] = field(default_factory=lambda: [0])
    sizes: list[str] | None = None
    out_dir: str | None = None
    data: DataSpec = field(default_factory=DataSpec)
    budget: BudgetSpec = field(default_factory=lambda: BudgetSpec(tokens=1_000_000))
    model: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    eval: EvalSpec = field(default_factory=EvalSpec)
    progress: bool = True

    @classmethod
    def from_dict(cls, data: Any) -> GridSpec:
        values = _check_keys(data, cls, "")
        if "name" not in values or "variants" not in values:
            raise ValueError("a grid needs `name` and `variants` (a list of entries with name and attention)")
        if not isinstance(values["variants"], list) or not values["variants"]:
            raise ValueError("variants must be a non-empty list")
        values["variants"] = [VariantSpec.from_dict(v, f"variants[{i}]") for i, v in enumerate(values["variants"])]
        values["data"] = DataSpec.from_dict(values.get("data"))
        if "budget" in values:
            values["budget"] = BudgetSpec.from_dict(values["budget"])
        values["eval"] = EvalSpec.from_dict(values.get("eval"))
        spec = cls(**values)
        spec.validate()
        return spec

    def validate(self) -> None:
        from sasformer.models.presets import SIZES
        from sasformer.train.config import ModelSection, TrainConfig

        if not _NAME.match(str(self.name)):
            raise ValueError(f"name={self.name!r}: use letters, digits and _ . + -")
        if (not isinstance(self.seeds, list) or not self.seeds
                or not all(isinstance(s, int) and not isinstance(s, bool) for s in self.seeds)):
            raise ValueError(f"seeds={self.seeds!r} must be a non-empty list of integers")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds={self.seeds} repeats a seed")
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variant names must be unique, got {names}")
        if self.sizes is not None:
            unknown = [s for s in self.sizes if s not in SIZES]
            if not self.sizes or unknown:
                raise ValueError(f"sizes={self.sizes}: each must be a preset, one of {list(SIZES)}")
        model_keys = [f.name for f in dataclasses.fields(ModelSection) if f.name not in ("attention", "attention_args")]
        for where, section in [("model", self.model)] + [(f"variants[{i}].model", v.model)
                                                         for i, v in enumerate(self.variants)]:
            unknown = sorted(set(section) - set(model_keys))
            if unknown:
                raise ValueError(f"unknown grid key(s) {[f'{where}.{k}' for k in unknown]}; known here: {model_keys}")
        train_keys = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in _RUN_OWNED]
        owned = sorted(set(self.train) & set(_RUN_OWNED))
        if owned:
            raise ValueError(f"train.{owned[0]} is set by the grid for each run; use budget/seeds/data/model instead")
        unknown = sorted(set(self.train) - set(train_keys))
        if unknown:
            raise ValueError(f"unknown grid key(s) {['train.' + k for k in unknown]}; known here: {train_keys}")
        if self.train.get("eval_interval", 1) == 0:
            raise ValueError("train.eval_interval=0 would leave the runs without a validation loss; set it >= 1")

    def entries(self) -> list[tuple[str, VariantSpec, str | None]]:
        """``(entry name, variant, size)`` for every grid entry; sizes multiply the variants."""
        if self.sizes is None:
            return [(v.name, v, None) for v in self.variants]
        return [(f"{v.name}@{size}", v, size) for size in self.sizes for v in self.variants]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_grid(path: str | Path, overrides: dict[str, Any] | None = None) -> GridSpec:
    """Read a grid YAML file and apply ``{"dotted.key": value}`` overrides (``{"budget.tokens": 2e6}``)."""
    from sasformer.train.config import set_dotted

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"grid file {path} does not exist; see configs/compare_*.yaml for examples")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"grid file {path} must hold a mapping of key: value")  # noqa: TRY004
    for key, value in (overrides or {}).items():
        set_dotted(data, key, value)
    try:
        return GridSpec.from_dict(data)
    except TypeError as err:  # a wrongly typed section that dataclasses reject
        raise ValueError(f"grid file {path}: {err}") from None
