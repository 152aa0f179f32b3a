"""AdamW with decoupled weight decay on matrices only, and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from sasformer.train.config import OptimSection


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed matrices, and everything else (norms, biases, the tied embedding).

    The embedding is excluded because it is also the LM head when tied: decaying it shrinks rare
    tokens' rows toward zero between their updates. Shared parameters are listed once.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for param in model.parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        (decay if param.dim() >= 2 and id(param) not in embeddings else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def execution_flags(device: torch.device) -> dict[str, bool | None]:
    """How AdamW runs on ``device``: fused (one kernel for all parameters) on CUDA, foreach elsewhere."""
    fused = device.type == "cuda"
    return {"fused": fused or None, "foreach": None if fused else True}


def build_optimizer(model: nn.Module, cfg: OptimSection, device: torch.device) -> torch.optim.AdamW:
    """AdamW, fused (one kernel for all parameters) on CUDA, foreach elsewhere."""
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             **execution_flags(device))


def apply_hyperparameters(optimizer: torch.optim.AdamW, cfg: OptimSection, device: torch.device | None = None) -> None:
    """Set betas, eps and weight decay from ``cfg``, and with ``device`` how AdamW runs there (after loading a
    checkpoint, whose values they replace: one written on the CPU would otherwise run unfused on a GPU)."""
    flags = execution_flags(device) if device is not None else {}
    for group in optimizer.param_groups:
        group["betas"], group["eps"] = tuple(cfg.betas), cfg.eps
        group.update(flags)
        if group.get("fused") or group.get("capturable"):
            # where load_state_dict puts it for such a group: the fused kernel reads the step on the parameter's
            # device, and a checkpoint written without fusing left it on the CPU
            for param in group["params"]:
                state = optimizer.state.get(param, {})
                if torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].to(device=param.device, dtype=torch.float32)
    optimizer.param_groups[0]["weight_decay"] = cfg.weight_decay  # the decayed group (see param_groups)


class CosineSchedule:
    """Linear warmup from 0 to ``lr`` over ``warmup_steps``, then cosine to ``min_lr`` at ``total_steps``.

    ``lr_at(step)`` is the rate for optimiser step ``step`` (0-based). It is a pure function of the
    config and the step, so a resumed run rebuilds it from its config (raising ``max_steps`` on
    resume stretches the decay); ``state_dict`` is saved with checkpoints as a record.
    """

    def __init__(self, lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> None:
        self.lr, self.min_lr, self.warmup_steps, self.total_steps = lr, min_lr, warmup_steps, total_steps

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        decay_steps = max(1, self.total_steps - 1 - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        lr = self.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def state_dict(self) -> dict:
        return {"lr": self.lr, "min_lr": self.min_lr, "warmup_steps": self.warmup_steps,
                "total_steps": self.total_steps}
