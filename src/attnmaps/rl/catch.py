"""Catch with a spurious cue: a falling target to catch with a paddle, similar-looking
distractors, and a mark under the paddle row.

The grid has ``rows`` x ``cols`` cells of ``cell`` x ``cell`` pixels. One episode is one drop:
the target starts in row 0 and falls one row per step, as do the distractors (same shape, a
different color, never in the target's column); the paddle (``paddle_width`` cells, row
``rows - 2``) moves left, stays or moves right. When the target reaches the paddle row the
episode ends with reward +1 if the paddle is under it and -1 otherwise. The mark sits in the
bottom row: in the target's column with probability ``mark_agreement`` per episode (1 in the
training variant, so it predicts where to go), in a uniformly random column otherwise (0 in the
test variant). ``info["mask"]`` (bool [H, W]) holds exactly the target's and the paddle's
pixels. Everything random comes from the ``reset`` seed.

Example:
    >>> env = CatchEnv()
    >>> obs, info = env.reset(seed=0)
    >>> obs.shape, obs.dtype.name, info["mask"].shape
    ((3, 20, 16), 'uint8', (20, 16))
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

import numpy as np

from . import require

gym = require("gymnasium")
spaces = gym.spaces

BACKGROUND = (0, 0, 0)
COLORS: dict[str, tuple[int, int, int]] = {
    "distractor": (250, 130, 90),
    "paddle": (70, 150, 250),
    "mark": (220, 60, 220),
    "target": (250, 250, 90),
}
# Drawing order: later objects cover earlier ones.
LAYERS = ("distractor", "paddle", "mark", "target")
GUIDED = ("target", "paddle")
LEFT, STAY, RIGHT = 0, 1, 2
VARIANTS = {"train": 1.0, "test": 0.0}


class CatchEnv(gym.Env):
    """Catch on pixels (uint8 [3, rows*cell, cols*cell]); actions 0 left, 1 stay, 2 right."""

    metadata: ClassVar[dict] = {"render_modes": ["rgb_array"]}

    def __init__(self, rows: int = 10, cols: int = 8, cell: int = 2, paddle_width: int = 3,
                 distractors: int = 2, mark_agreement: float = 1.0,
                 render_mode: str | None = None):
        if rows < 4 or cell < 1:
            raise ValueError(f"CatchEnv needs rows >= 4 and cell >= 1, got rows={rows}, "
                             f"cell={cell}")
        if paddle_width < 1 or paddle_width % 2 == 0 or paddle_width > cols:
            raise ValueError(f"paddle_width={paddle_width} must be odd and between 1 and "
                             f"cols={cols}")
        if not 0 <= distractors < cols:
            raise ValueError(f"distractors={distractors} must lie in [0, cols={cols})")
        if not 0.0 <= mark_agreement <= 1.0:
            raise ValueError(f"mark_agreement={mark_agreement} must lie in [0, 1]")
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode={render_mode!r}; expected None or 'rgb_array'")
        self.rows, self.cols, self.cell = rows, cols, cell
        self.half = paddle_width // 2
        self.num_distractors = distractors
        self.mark_agreement = mark_agreement
        self.render_mode = render_mode
        self.paddle_row = rows - 2
        self.observation_space = spaces.Box(0, 255, (3, rows * cell, cols * cell), np.uint8)
        self.action_space = spaces.Discrete(3)
        self.target = (0, 0)
        self.distractors: list[tuple[int, int]] = []
        self.paddle = self.half
        self.mark = 0

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        rng = self.np_random
        target_col = int(rng.integers(self.cols))
        self.target = (0, target_col)
        others = [c for c in range(self.cols) if c != target_col]
        columns = rng.choice(others, size=self.num_distractors, replace=False)
        self.distractors = [(int(rng.integers(3)), int(c)) for c in columns]
        self.paddle = int(rng.integers(self.half, self.cols - self.half))
        agrees = rng.random() < self.mark_agreement
        self.mark = target_col if agrees else int(rng.integers(self.cols))
        return self._observation(), self._info()

    def step(self, action: int):
        if not self.action_space.contains(action):
            raise ValueError(f"action {action!r} is not one of 0 (left), 1 (stay), 2 (right)")
        self.paddle = int(np.clip(self.paddle + int(action) - 1, self.half,
                                  self.cols - 1 - self.half))
        self.target = (self.target[0] + 1, self.target[1])
        self.distractors = [(r + 1, c) for r, c in self.distractors]
        terminated = self.target[0] == self.paddle_row
        reward = 0.0
        if terminated:
            reward = 1.0 if abs(self.target[1] - self.paddle) <= self.half else -1.0
        return self._observation(), reward, terminated, False, self._info()

    def render(self) -> np.ndarray:
        """The current frame as an RGB array [H, W, 3]."""
        return self.draw(LAYERS).transpose(1, 2, 0)

    def cells(self, kind: str) -> list[tuple[int, int]]:
        """(row, column) of every cell covered by objects of ``kind`` (see :data:`LAYERS`)."""
        if kind == "target":
            return [self.target]
        if kind == "distractor":
            return [(r, c) for r, c in self.distractors if r < self.paddle_row]
        if kind == "paddle":
            return [(self.paddle_row, c)
                    for c in range(self.paddle - self.half, self.paddle + self.half + 1)]
        if kind == "mark":
            return [(self.rows - 1, self.mark)]
        raise ValueError(f"unknown object kind {kind!r}; expected one of {LAYERS}")

    def draw(self, kinds: Iterable[str]) -> np.ndarray:
        """uint8 [3, H, W] with only the objects of ``kinds`` drawn, in :data:`LAYERS` order."""
        kinds = set(kinds)
        image = np.zeros(self.observation_space.shape, np.uint8)
        image[:] = np.array(BACKGROUND, np.uint8)[:, None, None]
        for kind in LAYERS:
            if kind in kinds:
                self._fill(image, self.cells(kind), np.array(COLORS[kind])[:, None, None])
        return image

    def mask(self) -> np.ndarray:
        """bool [H, W]: the pixels of the target and the paddle."""
        out = np.zeros(self.observation_space.shape[1:], bool)
        for kind in GUIDED:
            self._fill(out, self.cells(kind), True)
        return out

    def _fill(self, image: np.ndarray, cells: list[tuple[int, int]], value) -> None:
        """Set the pixels of ``cells`` in ``image`` [..., H, W] to ``value``."""
        size = self.cell
        for row, col in cells:
            image[..., row * size:(row + 1) * size, col * size:(col + 1) * size] = value

    def _observation(self) -> np.ndarray:
        return self.draw(LAYERS)

    def _info(self) -> dict:
        return {"mask": self.mask(), "mark_follows_target": self.mark == self.target[1]}


def make_catch(variant: str = "train", **kwargs) -> CatchEnv:
    """The training (mark follows the target) or test (mark random) variant of :class:`CatchEnv`."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown catch variant {variant!r}; expected one of {tuple(VARIANTS)}")
    return CatchEnv(mark_agreement=VARIANTS[variant], **kwargs)
