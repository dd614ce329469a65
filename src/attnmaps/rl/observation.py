"""Carry each frame's mask into the observation, so that the learner stores it with the frame.

:class:`MaskObservation` turns an environment with ``info["mask"]`` (bool [H, W]) into one with
dict observations ``{"image", "mask" (uint8 [H, W]), "has_mask" (uint8 [1])}``. Each frame keeps
its mask with probability ``mask_fraction`` (drawn from the wrapper's own generator, seeded by
``reset(seed=...)``); the others get ``has_mask = 0`` and an all-zero mask. The policy of
:mod:`.policy` reads only ``"image"``.
"""

from __future__ import annotations

import numpy as np

from . import require

gym = require("gymnasium")
spaces = gym.spaces


class MaskObservation(gym.Wrapper):
    """Dict observations with the frame's mask; ``mask_fraction`` of the frames keep it."""

    def __init__(self, env: gym.Env, mask_fraction: float = 1.0):
        super().__init__(env)
        if not 0.0 <= mask_fraction <= 1.0:
            raise ValueError(f"mask_fraction={mask_fraction} must lie in [0, 1]")
        image_space = env.observation_space
        if not isinstance(image_space, spaces.Box) or len(image_space.shape) != 3:
            raise ValueError(f"MaskObservation needs image observations [C, H, W], got "
                             f"{image_space}")
        self.mask_fraction = mask_fraction
        height, width = image_space.shape[1:]
        self.observation_space = spaces.Dict({
            "image": image_space,
            "mask": spaces.Box(0, 1, (height, width), np.uint8),
            "has_mask": spaces.Box(0, 1, (1,), np.uint8),
        })
        self._rng = np.random.default_rng()

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        image, info = self.env.reset(seed=seed, options=options)
        return self._observation(image, info), info

    def step(self, action):
        image, reward, terminated, truncated, info = self.env.step(action)
        return self._observation(image, info), reward, terminated, truncated, info

    def _observation(self, image: np.ndarray, info: dict) -> dict[str, np.ndarray]:
        if "mask" not in info:
            raise ValueError("MaskObservation needs info['mask'] from the wrapped environment")
        mask = np.asarray(info["mask"])
        if mask.shape != image.shape[1:] or mask.dtype != bool:
            raise ValueError(f"info['mask'] must be bool {image.shape[1:]}, got {mask.dtype} "
                             f"{mask.shape}")
        keep = bool(self._rng.random() < self.mask_fraction)
        return {"image": image, "mask": (mask & keep).astype(np.uint8),
                "has_mask": np.array([keep], np.uint8)}
