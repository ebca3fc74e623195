"""SGD and the warm-up + step learning-rate schedule (spec §5.3, ``mega_core/solver/*``).

* SGD, momentum 0.9, weight decay 1e-4; **biases get lr x 2 and no weight decay** (``BIAS_LR_FACTOR``,
  ``WEIGHT_DECAY_BIAS``). The authors make one param group per tensor; two groups (weights, biases)
  give the same update.
* ``WarmupMultiStepLR``: over the first ``warmup_iters`` iterations the factor rises linearly from
  ``warmup_factor`` (1/3) to 1, ``lr * (wf * (1 - it / W) + it / W)``; then x ``gamma`` (0.1) at each
  step (80k).
* The base lr is for ``reference_batch`` images per iteration (4 GPUs x 1 image); it scales linearly
  with the images one iteration actually sees, ``world_size * images_per_process``.
"""

from __future__ import annotations

import bisect

import torch
from torch import nn

from megavod.config import SolverConfig


def scaled_lr(cfg: SolverConfig, world_size: int) -> float:
    """Linear scaling rule: ``base_lr * world_size * images_per_process / reference_batch``."""
    return cfg.base_lr * world_size * cfg.images_per_process / cfg.reference_batch


def param_groups(
    model: nn.Module, lr: float, weight_decay: float, bias_lr_factor: float = 2.0, weight_decay_bias: float = 0.0
) -> list[dict]:
    """Trainable parameters split into weights and biases (a name containing ``bias``, as the authors)."""
    weights, biases = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (biases if "bias" in name else weights).append(p)
    groups = [
        {"params": weights, "lr": lr, "weight_decay": weight_decay, "name": "weights"},
        {"params": biases, "lr": lr * bias_lr_factor, "weight_decay": weight_decay_bias, "name": "biases"},
    ]
    return [g for g in groups if g["params"]]


def make_optimizer(cfg: SolverConfig, model: nn.Module, world_size: int = 1) -> torch.optim.SGD:
    lr = scaled_lr(cfg, world_size)
    groups = param_groups(model, lr, cfg.weight_decay, cfg.bias_lr_factor, cfg.weight_decay_bias)
    if not groups:
        raise ValueError("make_optimizer: the model has no trainable parameters")
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def warmup_multistep_factor(
    iteration: int, steps: tuple[int, ...] | list[int], gamma: float, warmup_factor: float, warmup_iters: int
) -> float:
    """The factor applied to each group's base lr at (0-based) ``iteration``."""
    warmup = 1.0
    if iteration < warmup_iters:
        alpha = iteration / warmup_iters
        warmup = warmup_factor * (1 - alpha) + alpha
    return warmup * gamma ** bisect.bisect_right(list(steps), iteration)


class WarmupMultiStepLR(torch.optim.lr_scheduler.LRScheduler):
    """Linear warm-up then a multi-step decay; ``last_epoch`` counts iterations, not epochs.

    The lr in force while iteration ``i`` (0-based) updates the weights is
    ``base_lr * warmup_multistep_factor(i, ...)``: step the scheduler once after every iteration.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        steps: tuple[int, ...] | list[int],
        gamma: float = 0.1,
        warmup_factor: float = 1.0 / 3,
        warmup_iters: int = 500,
        last_epoch: int = -1,
    ) -> None:
        if list(steps) != sorted(steps):
            raise ValueError(f"steps must be increasing, got {list(steps)}")
        self.steps = [int(s) for s in steps]
        self.gamma = gamma
        self.warmup_factor = warmup_factor
        self.warmup_iters = warmup_iters
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        f = warmup_multistep_factor(self.last_epoch, self.steps, self.gamma, self.warmup_factor, self.warmup_iters)
        return [base * f for base in self.base_lrs]


def make_scheduler(cfg: SolverConfig, optimizer: torch.optim.Optimizer) -> WarmupMultiStepLR:
    return WarmupMultiStepLR(optimizer, cfg.steps, cfg.gamma, cfg.warmup_factor, cfg.warmup_iters)
