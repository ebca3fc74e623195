"""SGD and the warm-up + step learning-rate schedule (docs/conventions.md#solver, ``mega_core/solver/*``).

* SGD, momentum 0.9, weight decay 1e-4; **biases get lr x 2 and no weight decay** (``BIAS_LR_FACTOR``,
  ``WEIGHT_DECAY_BIAS``). The authors make one param group per tensor; two groups (weights, biases)
  give the same update.
* ``WarmupMultiStepLR``: over the first ``warmup_iters`` iterations the factor rises linearly from
  ``warmup_factor`` (1/3) to 1, ``lr * (wf * (1 - it / W) + it / W)``; then x ``gamma`` (0.1) at each
  step (80k).
* ``attention_lr_factor`` (ours, default 1 = the authors) multiplies the lr of the relation modules'
  attention parameters (``Wq``, ``Wk``, ``u``, ``Wg``; not the value projection ``Wv``). Their gradients
  pass through ``Wv``, which starts near zero (std 0.01, docs/conventions.md#relation-module): on a budget
  tens of times shorter than the authors' 120k iterations, ``Wq``/``Wk`` never leave their initialisation at
  the detector's lr (measured on the synthetic benchmark: 5% relative change in 9,000 iterations, most of it
  weight decay). Raising the whole module's lr instead inflates ``Wv`` and with it the relation term, which
  raised the training loss (README "Synthetic Table 3").
* The base lr is for ``reference_batch`` images per iteration (4 GPUs x 1 image); it scales linearly
  with the images one iteration actually sees, ``world_size * images_per_process`` (B key frames per
  process count as B images for every method, docs/conventions.md#key-frames-per-process).
"""

from __future__ import annotations

import bisect

import torch
from torch import nn

from megavod.config import SolverConfig
from megavod.models.relation import RelationModule


def scaled_lr(cfg: SolverConfig, world_size: int) -> float:
    """Linear scaling rule: ``base_lr * world_size * images_per_process / reference_batch``."""
    return cfg.base_lr * world_size * cfg.images_per_process / cfg.reference_batch


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    bias_lr_factor: float = 2.0,
    weight_decay_bias: float = 0.0,
    attention_lr_factor: float = 1.0,
) -> list[dict]:
    """Trainable parameters split into weights and biases (a name containing ``bias``, as the authors),
    and, when ``attention_lr_factor`` is not 1, the relation modules' attention weights and biases apart."""
    relation = set()
    if attention_lr_factor != 1.0:
        relation = {id(p) for m in model.modules() if isinstance(m, RelationModule)
                    for name, p in m.named_parameters() if not name.startswith("Wv.")}
    groups: dict[str, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_bias = "bias" in name
        factor = (bias_lr_factor if is_bias else 1.0) * (attention_lr_factor if id(p) in relation else 1.0)
        key = ("attention_" if id(p) in relation else "") + ("biases" if is_bias else "weights")
        group = groups.setdefault(key, {"params": [], "lr": lr * factor,
                                        "weight_decay": weight_decay_bias if is_bias else weight_decay, "name": key})
        group["params"].append(p)
    order = ("weights", "biases", "attention_weights", "attention_biases")
    return [groups[k] for k in order if k in groups]


def make_optimizer(cfg: SolverConfig, model: nn.Module, world_size: int = 1) -> torch.optim.SGD:
    lr = scaled_lr(cfg, world_size)
    groups = param_groups(model, lr, cfg.weight_decay, cfg.bias_lr_factor, cfg.weight_decay_bias,
                          cfg.attention_lr_factor)
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
