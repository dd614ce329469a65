"""PPO (stable-baselines3) with a mask-guidance term.

:class:`GuidedPPO` runs SB3's own ``PPO.train`` and, for every minibatch it optimises, adds
``guidance_weight * guidance_loss(...)`` (:func:`~attnmaps.rl.guidance.guidance_loss`, on the
minibatch's frames with masks and their taken actions) to the gradients just before the optimiser
step, i.e. after SB3's gradient-norm clipping of the PPO loss. With ``method="none"`` it is
plain PPO.
"""

from __future__ import annotations

from torch import Tensor

from . import require
from .guidance import check_method, guidance_loss
from .policy import PolicyMaps

PPO = require("stable_baselines3").PPO


class GuidedPPO(PPO):
    """``PPO(..., guidance="camal", guidance_weight=1.0)``; the policy must be built with
    :func:`attnmaps.rl.policy.policy_kwargs` on :class:`~attnmaps.rl.observation.MaskObservation`
    observations."""

    def __init__(self, *args, guidance: str = "none", guidance_weight: float = 1.0, **kwargs):
        self.guidance = check_method(guidance)
        if guidance_weight < 0:
            raise ValueError(f"guidance_weight={guidance_weight} must be >= 0")
        self.guidance_weight = guidance_weight
        super().__init__(*args, **kwargs)

    def train(self) -> None:
        if self.guidance == "none" or self.guidance_weight == 0:
            super().train()
            return
        net = PolicyMaps(self.policy)
        evaluate = self.policy.evaluate_actions
        batch: dict[str, object] = {}
        losses: list[float] = []

        def evaluate_and_keep(observations: dict[str, Tensor], actions: Tensor):
            batch["observations"], batch["actions"] = observations, actions
            return evaluate(observations, actions)

        def add_guidance(optimizer, args, kwargs) -> None:
            loss = guidance_loss(net, batch["observations"], batch["actions"], self.guidance)
            if loss is not None:
                (self.guidance_weight * loss).backward()
                losses.append(loss.item())

        self.policy.evaluate_actions = evaluate_and_keep
        handle = self.policy.optimizer.register_step_pre_hook(add_guidance)
        try:
            super().train()
        finally:
            handle.remove()
            del self.policy.evaluate_actions
        if losses:
            self.logger.record("train/guidance_loss", sum(losses) / len(losses))
