"""Mask-guided attention for reinforcement-learning agents (``pip install 'attnmaps[rl]'``).

Environments whose ``info["mask"]`` marks the decision-relevant pixels exactly
(:mod:`.catch`, :mod:`.minigrid_masks`), a GAP-CNN policy with exact class activation maps of its
action logits (:mod:`.policy`), PPO with a mask-guidance term (:mod:`.guided_ppo`) and the
``attnmaps rl-bench`` benchmark (:mod:`.bench`).
"""

from __future__ import annotations

from importlib import import_module
from types import ModuleType

EXTRA_HINT = "install the RL extra: pip install 'attnmaps[rl]'"


def require(module: str) -> ModuleType:
    """Import ``module`` or raise an ImportError that names the ``rl`` extra."""
    try:
        return import_module(module)
    except ImportError as error:
        raise ImportError(f"attnmaps.rl needs the package {module!r}; {EXTRA_HINT}") from error
