"""Settings that let Hard-Concrete head gates actually close within a short schedule.

A head's evaluation gate is 0 once ``log_alpha <= -log(-zeta / gamma) = -ln 11 = -2.40``; the gates
start at ``log_alpha = 3``, 5.4 units away. AdamW moves a parameter by at most about ``lr`` per
step whatever the size of its gradient (so ``train.gate_lambda`` decides the direction, hardly the
speed), and a warm-up + cosine schedule of ``T`` steps at peak ``lr`` travels about
``lr * T / 2`` in total: 0.65 for the demo's 1,300 steps at 1e-3. No gate can close in such a run.
Two remedies, each a config key: a larger learning rate for the gates alone
(``train.gate_lr_scale``) and a lower starting ``log_alpha`` (``model.gate_init``). And a later
start (``train.gate_start_epoch``): the gates stay where they are until the classifier has
learned, then move with the rest of the schedule.

Example:
    >>> set_gate_init(model, 1.0)  # doctest: +SKIP
    >>> scale_gate_lr(optimizer, 10.0)  # before the scheduler is built  # doctest: +SKIP
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.gates import HardConcreteGate

GATE_PARAM = "log_alpha"


@torch.no_grad()
def set_gate_init(model: nn.Module, log_alpha: float) -> int:
    """Set every Hard-Concrete gate's ``log_alpha`` to ``log_alpha``; returns the gate count."""
    gates = [m for m in model.modules() if isinstance(m, HardConcreteGate)]
    for gate in gates:
        gate.log_alpha.fill_(log_alpha)
    return sum(g.log_alpha.numel() for g in gates)


def scale_gate_lr(optimizer: torch.optim.Optimizer, scale: float) -> None:
    """Move the gate parameters (named ``*.log_alpha`` in the groups' ``param_names``) into their
    own group with ``scale`` times their group's learning rate and no weight decay.

    Call it before the LR scheduler is built, which records each group's starting rate.
    """
    if scale <= 0:
        raise ValueError(f"train.gate_lr_scale must be > 0, got {scale}")
    moved: dict = {"params": [], "param_names": [], "weight_decay": 0.0}
    for group in optimizer.param_groups:
        names = group.get("param_names")
        if names is None:
            raise ValueError("scale_gate_lr needs parameter groups with 'param_names' "
                             "(build the optimizer with attnmaps.engine.optim.build_optimizer)")
        keep = [i for i, n in enumerate(names) if not n.endswith(GATE_PARAM)]
        gates = [i for i, n in enumerate(names) if n.endswith(GATE_PARAM)]
        if gates:
            moved["lr"] = group["lr"] * scale
        moved["params"] += [group["params"][i] for i in gates]
        moved["param_names"] += [names[i] for i in gates]
        group["params"] = [group["params"][i] for i in keep]
        group["param_names"] = [names[i] for i in keep]
    optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]
    if moved["params"]:
        optimizer.add_param_group(moved)


def gate_groups(optimizer: torch.optim.Optimizer) -> list[int]:
    """Indices of the parameter groups that hold gate parameters only (see :func:`scale_gate_lr`)."""
    return [i for i, group in enumerate(optimizer.param_groups)
            if group.get("param_names") and all(n.endswith(GATE_PARAM)
                                                for n in group["param_names"])]


def delay_gates(scheduler: torch.optim.lr_scheduler.LambdaLR, start_step: int) -> None:
    """Hold the gate groups' learning rate at 0 for the steps before ``start_step``, then follow
    their schedule as before (no restart: the factor at step ``s`` is the original one).

    Needs the gates in a group of their own (:func:`scale_gate_lr`, any scale); works on a fresh
    or a resumed scheduler (the groups' current rate is set for its current step).
    """
    groups = gate_groups(scheduler.optimizer)
    if not groups:
        raise ValueError("delay_gates needs the gates in their own parameter group: call "
                         "scale_gate_lr first")
    for i in groups:
        original = scheduler.lr_lambdas[i]

        def delayed(step: int, original=original) -> float:
            return 0.0 if step < start_step else original(step)

        scheduler.lr_lambdas[i] = delayed
        scheduler.optimizer.param_groups[i]["lr"] = (scheduler.base_lrs[i]
                                                     * delayed(scheduler.last_epoch))
