"""MiniGrid with exact masks of the key, door and goal."""

from __future__ import annotations

import numpy as np
import pytest

gymnasium = pytest.importorskip("gymnasium")
pytest.importorskip("stable_baselines3")
pytest.importorskip("minigrid")

from minigrid.core.constants import COLORS
from minigrid.core.grid import Grid

from attnmaps.rl.minigrid_masks import MiniGridMasks

TILE = 6


def _env() -> MiniGridMasks:
    return MiniGridMasks(gymnasium.make("MiniGrid-DoorKey-5x5-v0"), tile_size=TILE)


def _expected_mask(env: MiniGridMasks) -> np.ndarray:
    """Independently, tile by tile: the object's tile against the empty tile at its cell."""
    base = env.unwrapped
    expected = np.zeros((base.height * TILE, base.width * TILE), bool)
    for j in range(base.grid.height):
        for i in range(base.grid.width):
            cell = base.grid.get(i, j)
            if cell is None or cell.type not in env.objects:
                continue
            here = tuple(base.agent_pos) == (i, j)
            direction = base.agent_dir if here else None
            tile = Grid.render_tile(cell, agent_dir=direction, tile_size=TILE)
            empty = Grid.render_tile(None, agent_dir=direction, tile_size=TILE)
            expected[j * TILE:(j + 1) * TILE, i * TILE:(i + 1) * TILE] = (tile != empty).any(-1)
    return expected


def test_masks_match_the_rendered_key_door_and_goal_pixel_for_pixel() -> None:
    env = _env()
    rng = np.random.default_rng(0)
    frame, info = env.reset(seed=0)
    base = env.unwrapped
    for _ in range(60):
        assert frame.shape == env.observation_space.shape == (3, 5 * TILE, 5 * TILE)
        np.testing.assert_array_equal(info["mask"], _expected_mask(env))
        np.testing.assert_array_equal(frame.transpose(1, 2, 0), base.grid.render(
            TILE, base.agent_pos, base.agent_dir))
        frame, _, terminated, truncated, info = env.step(int(rng.integers(6)))
        if terminated or truncated:
            frame, info = env.reset()


def test_mask_pixels_carry_the_objects_colors() -> None:
    env = _env()
    frame, info = env.reset(seed=1)
    base = env.unwrapped
    key = next((i, j) for j in range(5) for i in range(5)
               if (c := base.grid.get(i, j)) is not None and c.type == "key")
    tile = info["mask"][key[1] * TILE:(key[1] + 1) * TILE, key[0] * TILE:(key[0] + 1) * TILE]
    pixels = frame[:, key[1] * TILE:(key[1] + 1) * TILE, key[0] * TILE:(key[0] + 1) * TILE]
    assert tile.sum() > 3
    # The renderer anti-aliases: the key's pixels are yellow blended with the floor and grid
    # lines (grey), so they are all yellowish, and no yellowish pixel lies outside the mask.
    red, green, blue = pixels.astype(int)
    yellowish = (red == green) & (red > blue)
    np.testing.assert_array_equal(yellowish, tile)
    goal_color = (frame == np.array(COLORS["green"])[:, None, None]).all(0)
    assert goal_color.any() and not (goal_color & ~info["mask"]).any()


def test_seeding_gives_identical_episodes_and_arguments_are_checked() -> None:
    a, b = _env(), _env()
    fa, _ = a.reset(seed=4)
    fb, _ = b.reset(seed=4)
    np.testing.assert_array_equal(fa, fb)
    for action in [0, 2, 2, 1, 2, 3, 2]:
        fa, _, _, _, ia = a.step(action)
        fb, _, _, _, ib = b.step(action)
        np.testing.assert_array_equal(fa, fb)
        np.testing.assert_array_equal(ia["mask"], ib["mask"])
    with pytest.raises(ValueError, match="tile_size"):
        MiniGridMasks(gymnasium.make("MiniGrid-DoorKey-5x5-v0"), tile_size=2)
    with pytest.raises(ValueError, match="MiniGrid"):
        MiniGridMasks(gymnasium.make("CartPole-v1"))
