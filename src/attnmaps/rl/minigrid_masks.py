"""MiniGrid with pixel observations and exact masks of the decision-relevant objects.

:class:`MiniGridMasks` wraps a MiniGrid environment (e.g. ``MiniGrid-DoorKey-5x5-v0``): its
observation is the full grid rendered at ``tile_size`` pixels per cell (uint8 [3, H, W], no
highlighting) and ``info["mask"]`` (bool [H, W]) marks the pixels where the objects of the given
types (default key, door and goal) are visible: those that change when the objects are taken off
the grid and it is rendered again. A key the agent carries is not on the grid, hence not in the
mask. Combine with :class:`~attnmaps.rl.observation.MaskObservation` for guided training.

Example:
    >>> env = MiniGridMasks(gymnasium.make("MiniGrid-DoorKey-5x5-v0"))  # doctest: +SKIP
    >>> frame, info = env.reset(seed=0)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from . import require

gym = require("gymnasium")
require("minigrid")
spaces = gym.spaces

DEFAULT_OBJECTS = ("key", "door", "goal")


class MiniGridMasks(gym.Wrapper):
    """Full-grid RGB observations and ``info["mask"]`` of the objects of types ``objects``."""

    def __init__(self, env: gym.Env, objects: Sequence[str] = DEFAULT_OBJECTS,
                 tile_size: int = 4):
        super().__init__(env)
        base = env.unwrapped
        if not hasattr(base, "grid") or not hasattr(base, "agent_pos"):
            raise ValueError(f"MiniGridMasks needs a MiniGrid environment, got {type(base)}")
        if tile_size < 3:
            raise ValueError(f"tile_size={tile_size} is too small; expected >= 3")
        if not objects:
            raise ValueError("objects must name at least one MiniGrid object type")
        self.objects = tuple(objects)
        self.tile_size = tile_size
        shape = (3, base.height * tile_size, base.width * tile_size)
        self.observation_space = spaces.Box(0, 255, shape, np.uint8)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        _, info = self.env.reset(seed=seed, options=options)
        return self._frame_and_info(info)

    def step(self, action):
        _, reward, terminated, truncated, info = self.env.step(action)
        frame, info = self._frame_and_info(info)
        return frame, reward, terminated, truncated, info

    def render_grid(self, without: Sequence[str] = ()) -> np.ndarray:
        """The full grid as uint8 [H, W, 3], with the objects of types ``without`` left out."""
        base = self.env.unwrapped
        grid = base.grid
        removed = [(i, j, cell) for j in range(grid.height) for i in range(grid.width)
                   if (cell := grid.get(i, j)) is not None and cell.type in without]
        for i, j, _ in removed:
            grid.set(i, j, None)
        try:
            return grid.render(self.tile_size, base.agent_pos, base.agent_dir)
        finally:
            for i, j, cell in removed:
                grid.set(i, j, cell)

    def _frame_and_info(self, info: dict) -> tuple[np.ndarray, dict]:
        full = self.render_grid()
        mask = (full != self.render_grid(self.objects)).any(axis=-1)
        return np.ascontiguousarray(full.transpose(2, 0, 1)), {**info, "mask": mask}
