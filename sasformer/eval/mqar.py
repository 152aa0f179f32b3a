"""Multi-query associative recall (MQAR; Arora et al. 2023, "Zoology").

A sequence first lists ``num_kv_pairs`` key-value pairs, then, in the remaining positions, asks
``num_queries`` of the keys again; at each query the model must output the value that followed
that key in the list. Everything else is filler and carries no target::

    k3 v7 | k1 v2 | k9 v4 |  0  0 k1 v2  0 k9 v4  0 ...
    -100 everywhere except:          ^v2     ^v4      (targets at the query-key positions)

Token 0 is the filler; keys are drawn from ``[1, 1 + K)`` and values from ``[1 + K, vocab_size)``
with ``K = (vocab_size - 1) // 2``. Keys in one sequence are distinct, values are drawn with
replacement, queried keys are distinct, and a query occupies two positions (the key, then its value
as the next input token, as in a natural "key value" mention).

Targets follow :func:`sasformer.lm_loss`: ``targets[t]`` is the token to predict at position ``t``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from sasformer.models.config import ModelConfig

IGNORE = -100
# test sequences come from seeds no training run uses (training: seed * 1e6 + step)
TEST_SEED_OFFSET = 2**48


@dataclass(frozen=True)
class MQARConfig:
    """Knobs of the task. ``seq_len`` must hold the pairs (2 per pair) and the queries (2 per query)."""

    num_kv_pairs: int = 8
    seq_len: int = 64
    vocab_size: int = 64
    num_queries: int = 8

    def __post_init__(self) -> None:
        n_keys = (self.vocab_size - 1) // 2
        if self.vocab_size < 5:
            raise ValueError(f"vocab_size={self.vocab_size} must be >= 5 (filler, keys, values)")
        if not 1 <= self.num_kv_pairs <= n_keys:
            raise ValueError(
                f"num_kv_pairs={self.num_kv_pairs} must be in [1, {n_keys}] for vocab_size={self.vocab_size}"
            )
        if not 1 <= self.num_queries <= self.num_kv_pairs:
            raise ValueError(f"num_queries={self.num_queries} must be in [1, num_kv_pairs={self.num_kv_pairs}]")
        need = 2 * self.num_kv_pairs + 2 * self.num_queries
        if self.seq_len < need:
            raise ValueError(f"seq_len={self.seq_len} is too short: pairs and queries need {need} positions")

    @property
    def n_keys(self) -> int:
        return (self.vocab_size - 1) // 2


def mqar_batch(config: MQARConfig, batch_size: int, seed: int) -> tuple[Tensor, Tensor]:
    """(inputs, targets), each (batch_size, seq_len) int64; the same seed gives the same batch."""
    g = torch.Generator().manual_seed(seed)
    B, N, Q, K = batch_size, config.num_kv_pairs, config.num_queries, config.n_keys
    keys_BN = 1 + torch.rand(B, K, generator=g).argsort(-1)[:, :N]
    values_BN = 1 + K + torch.randint(0, config.vocab_size - 1 - K, (B, N), generator=g)
    inputs = torch.zeros(B, config.seq_len, dtype=torch.long)
    targets = torch.full((B, config.seq_len), IGNORE, dtype=torch.long)
    inputs[:, 0: 2 * N: 2] = keys_BN
    inputs[:, 1: 2 * N: 2] = values_BN
    # queries: Q distinct pairs, placed in Q distinct two-token slots after the list, in order
    which_BQ = torch.rand(B, N, generator=g).argsort(-1)[:, :Q]
    n_slots = (config.seq_len - 2 * N) // 2
    slots_BQ = torch.rand(B, n_slots, generator=g).argsort(-1)[:, :Q].sort(-1).values
    pos_BQ = 2 * N + 2 * slots_BQ
    qkeys_BQ = keys_BN.gather(1, which_BQ)
    qvalues_BQ = values_BN.gather(1, which_BQ)
    inputs.scatter_(1, pos_BQ, qkeys_BQ)
    inputs.scatter_(1, pos_BQ + 1, qvalues_BQ)
    targets.scatter_(1, pos_BQ, qvalues_BQ)
    return inputs, targets


@dataclass(frozen=True)
class MQARResult:
    """Outcome of one training run: query accuracy on held-out sequences and the loss curve."""

    accuracy: float
    final_loss: float
    losses: list[float]
    steps: int
    seconds: float
    n_params: int

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def mqar_accuracy(model: Callable[[Tensor], Tensor], inputs: Tensor, targets: Tensor, batch_size: int = 256) -> float:
    """Fraction of query positions where the argmax of the logits is the target value."""
    hits, total = 0, 0
    for x, y in zip(inputs.split(batch_size), targets.split(batch_size)):
        pred = model(x).argmax(-1)
        mask = y != IGNORE
        hits += int((pred[mask] == y[mask]).sum())
        total += int(mask.sum())
    return hits / total


def train_mqar(
    model_config: ModelConfig,
    task: MQARConfig,
    steps: int = 3000,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    n_test: int = 512,
    seed: int = 0,
    device: torch.device | str = "cpu",
    log: Callable[[str], None] | None = None,
) -> MQARResult:
    """Train a fresh ``DecoderLM(model_config)`` on MQAR and measure accuracy on unseen sequences.

    AdamW with a linear warm-up over the first 10% of steps and cosine decay to 10% of ``lr``;
    every step draws a new batch (training never repeats a sequence), the test set has its own seed.
    """
    from sasformer.models.decoder import DecoderLM, lm_loss

    if model_config.vocab_size < task.vocab_size:
        raise ValueError(f"model vocab_size={model_config.vocab_size} < task vocab_size={task.vocab_size}")
    if model_config.max_seq_len < task.seq_len:
        raise ValueError(f"model max_seq_len={model_config.max_seq_len} < task seq_len={task.seq_len}")
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    torch.manual_seed(seed)
    model = DecoderLM(model_config).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    warmup = max(1, steps // 10)

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    losses = []
    start = time.perf_counter()
    model.train()
    for step in range(steps):
        x, y = mqar_batch(task, batch_size, seed=seed * 1_000_000 + step)
        x, y = x.to(device), y.to(device)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = lm_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if log is not None and (step + 1) % max(1, steps // 10) == 0:
            log(f"step {step + 1}/{steps} loss {losses[-1]:.4f}")
    model.eval()
    x_test, y_test = mqar_batch(task, n_test, seed=TEST_SEED_OFFSET + seed)
    accuracy = mqar_accuracy(model, x_test.to(device), y_test.to(device))
    tail = losses[-max(1, steps // 20):]
    seconds = time.perf_counter() - start
    return MQARResult(accuracy, sum(tail) / len(tail), losses, steps, seconds, model.num_parameters())


def _resolved_base(size: Any, attention: str) -> dict[str, Any]:
    from sasformer.models.config import ModelConfig
    from sasformer.models.presets import matched_attention_args

    config = ModelConfig(vocab_size=size.vocab_size, d_model=size.d_model, n_layers=size.n_layers,
                         max_seq_len=size.max_seq_len, attention=attention,
                         attention_args=matched_attention_args(size, attention))
    return config.resolved_attention_args().to_dict()


def probe_attention_args(attention: str, overrides: dict[str, Any], main: Any, probe: Any) -> dict[str, Any]:
    """Attention overrides written for a model of size ``main``, carried to the probe's size ``probe``
    (both :class:`~sasformer.models.presets.Size`).

    A size given in absolute numbers means something else on the probe: 16 heads of 32 on an 8-head,
    d=512 model is "twice the heads at half the size", but on the 4-head, d=64 probe it would be an
    attention 8x wider than the probe's. So each integer override is scaled by the ratio of that
    argument's value without overrides, probe over main (16 heads -> 8 on the 4-head probe; a head size
    of 32 -> 8); an argument equal at both sizes (a kernel size) and every non-integer (flags, modes)
    passes as it is.
    """
    base_main, base_probe = _resolved_base(main, attention), _resolved_base(probe, attention)
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        a, b = base_main.get(key), base_probe.get(key)
        numeric = all(isinstance(v, int) and not isinstance(v, bool) for v in (value, a, b))
        out[key] = max(1, round(value * b / a)) if numeric and a else value
    # rounding each alone can break what ties them: head counts must stay multiples (query heads of the
    # key/value heads, simulated heads of the heads), and feature sizes even (RoPE rotates pairs)
    kv = out.get("n_kv_heads", base_probe.get("n_kv_heads"))
    if isinstance(out.get("n_heads"), int) and isinstance(kv, int) and kv > 0:
        out["n_heads"] = max(kv, round(out["n_heads"] / kv) * kv)
    heads = out.get("n_heads", base_probe.get("n_heads"))
    if isinstance(out.get("n_sim_heads"), int) and isinstance(heads, int) and heads > 0:
        out["n_sim_heads"] = max(heads, round(out["n_sim_heads"] / heads) * heads)
    for key, value in list(out.items()):
        if key.endswith("_dim") and key in base_probe and isinstance(value, int) and value != overrides[key]:
            out[key] = max(2, 2 * round(value / 2))
    return out


def variant_configs(
    variants: Sequence[str],
    task: MQARConfig,
    d_model: int = 64,
    n_layers: int = 2,
    n_heads: int = 4,
    attention_args: dict[str, dict] | None = None,
) -> dict[str, ModelConfig]:
    """Tiny model configs for each variant, attention parameters matched to MHA as in the presets."""
    from sasformer.models.config import ModelConfig
    from sasformer.models.presets import Size, matched_attention_args

    size = Size(d_model=d_model, n_layers=n_layers, n_heads=n_heads, max_seq_len=task.seq_len,
                vocab_size=task.vocab_size)
    out = {}
    for name in variants:
        args = {**matched_attention_args(size, name), **(attention_args or {}).get(name, {})}
        out[name] = ModelConfig(vocab_size=task.vocab_size, d_model=d_model, n_layers=n_layers,
                                max_seq_len=task.seq_len, attention=name, attention_args=args)
    return out


def compare_mqar(
    configs: dict[str, ModelConfig],
    task: MQARConfig,
    seeds: Sequence[int] = (0,),
    log: Callable[[str], None] | None = None,
    **train_kwargs: Any,
) -> list[dict]:
    """Train every named config on ``task`` for each seed; one row per (name, seed)."""
    rows = []
    for name, config in configs.items():
        for seed in seeds:
            result = train_mqar(config, task, seed=seed, log=log, **train_kwargs)
            rows.append({"variant": name, "seed": seed, "accuracy": result.accuracy, "final_loss": result.final_loss,
                         "params": result.n_params, "seconds": result.seconds})
            if log is not None:
                log(f"{name} seed {seed}: accuracy {result.accuracy:.3f}")
    return rows


def markdown_table(rows: Sequence[dict]) -> str:
    """Rows from :func:`compare_mqar` as a Markdown table."""
    lines = ["| variant | seed | accuracy | final loss | params | seconds |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['seed']} | {r['accuracy']:.3f} | {r['final_loss']:.4f} | "
                     f"{r['params']:,} | {r['seconds']:.1f} |")
    return "\n".join(lines)
