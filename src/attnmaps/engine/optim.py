"""AdamW with decoupled weight decay on matrices only, and a per-step warm-up + cosine schedule.

On CUDA the optimiser runs torch's fused AdamW kernel; elsewhere torch's default implementation.
:func:`load_optimizer_state` keeps that choice when a state saved on another device is loaded.

Example::

    opt = build_optimizer(model, lr=1e-3, weight_decay=0.05, betas=(0.9, 0.95))
    sched = warmup_cosine(opt, total_steps=1000, warmup_steps=100, min_lr_ratio=0.01)
    ...  # after each optimizer.step(): sched.step()
"""

import math
from collections.abc import Sequence

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split trainable parameters into a decayed and a non-decayed group.

    Not decayed: parameters with ``ndim <= 1`` (norms, biases, gate log-alphas) and those named
    by ``model.no_weight_decay()`` (a set of names; a parameter matches when its full name equals
    a listed name or ends with ``"." + name``). Each group carries its ``param_names``; empty
    groups are left out.
    """
    no_decay_names = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay: dict[str, nn.Parameter] = {}
    no_decay: dict[str, nn.Parameter] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        listed = any(name == n or name.endswith("." + n) for n in no_decay_names)
        (no_decay if param.ndim <= 1 or listed else decay)[name] = param
    groups = [
        {"params": list(d.values()), "param_names": list(d), "weight_decay": wd}
        for d, wd in ((decay, weight_decay), (no_decay, 0.0))
    ]
    return [g for g in groups if g["params"]]


IMPLEMENTATION_FLAGS = ("fused", "foreach")


def adamw(groups: list[dict], lr: float, betas: Sequence[float]) -> torch.optim.AdamW:
    """AdamW over parameter ``groups``: fused (one kernel for all parameters) when every
    parameter is a CUDA tensor, torch's default implementation otherwise."""
    if len(betas) != 2:
        raise ValueError(f"betas must be two numbers (beta1, beta2), got {list(betas)}")
    params = [param for group in groups for param in group["params"]]
    fused = bool(params) and all(param.is_cuda for param in params)
    return torch.optim.AdamW(groups, lr=lr, betas=(float(betas[0]), float(betas[1])),
                             fused=True if fused else None)


def build_optimizer(
    model: nn.Module, lr: float, weight_decay: float, betas: Sequence[float]
) -> torch.optim.AdamW:
    """AdamW (:func:`adamw`) over :func:`param_groups` of ``model``."""
    return adamw(param_groups(model, weight_decay), lr, betas)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """``optimizer.load_state_dict(state)`` keeping the optimizer's own implementation (fused or
    not, which follows the device the state is resumed on, not the one it was saved on); fused
    groups get their step counts on their parameters' device, as the fused kernel needs."""
    kept = [{key: group[key] for key in IMPLEMENTATION_FLAGS if key in group}
            for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, flags in zip(optimizer.param_groups, kept):
        group.update(flags)
        if not group.get("fused"):
            continue
        for param in group["params"]:
            steps = optimizer.state.get(param, {}).get("step")
            if isinstance(steps, torch.Tensor):
                optimizer.state[param]["step"] = steps.to(param.device, torch.float32)


def set_base_lrs(scheduler: torch.optim.lr_scheduler.LambdaLR, base_lrs: list[float]) -> None:
    """Make ``base_lrs`` (one per parameter group) the peak learning rates of ``scheduler`` from
    its current step on (e.g. after loading a state saved with other ones): base rates and the
    groups' current rates."""
    if len(base_lrs) != len(scheduler.base_lrs):
        raise ValueError(f"got {len(base_lrs)} learning rates for "
                         f"{len(scheduler.base_lrs)} parameter groups")
    scheduler.base_lrs = list(base_lrs)
    for group, lr, factor in zip(scheduler.optimizer.param_groups, base_lrs,
                                 scheduler.lr_lambdas):
        group["lr"] = lr * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


def warmup_cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, min_lr_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-iteration LR factor: linear warm-up, cosine decay to ``min_lr_ratio``, then constant.

    Step ``s`` gets ``(s + 1) / warmup_steps`` while ``s < warmup_steps``, then
    ``r + (1 - r) * (1 + cos(pi * (s - W) / (T - W))) / 2`` while ``s < T`` (``r`` the min
    ratio, ``W``/``T`` the warm-up/total steps), then ``r``.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(
            f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}"
        )
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if step >= total_steps:
            return min_lr_ratio
        progress = (step - warmup_steps) / (total_steps - warmup_steps)
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
