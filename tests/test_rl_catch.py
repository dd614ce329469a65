"""The catch environment: exact masks, the spurious mark, seeding and argument checks."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("gymnasium")
pytest.importorskip("stable_baselines3")

from attnmaps.rl.catch import COLORS, GUIDED, LAYERS, CatchEnv, make_catch
from attnmaps.rl.observation import MaskObservation


def _frames(env: CatchEnv, seed: int, actions: list[int]):
    frame, info = env.reset(seed=seed)
    out = [(frame, info)]
    for action in actions:
        frame, _, terminated, _, info = env.step(action)
        out.append((frame, info))
        if terminated:
            break
    return out


def _color_pixels(frame: np.ndarray, kind: str) -> np.ndarray:
    return (frame == np.array(COLORS[kind])[:, None, None]).all(axis=0)


@pytest.mark.parametrize("seed", range(6))
def test_mask_is_exactly_the_target_and_paddle_pixels(seed: int) -> None:
    env = make_catch("train")
    rng = np.random.default_rng(seed)
    frame, info = env.reset(seed=seed)
    terminated = False
    while not terminated:
        # By color in the rendered frame (the colors are distinct and the target is on top).
        by_color = _color_pixels(frame, "target") | _color_pixels(frame, "paddle")
        np.testing.assert_array_equal(info["mask"], by_color)
        # By removing the guided objects and rendering again.
        without = env.draw([k for k in LAYERS if k not in GUIDED])
        np.testing.assert_array_equal(info["mask"], (frame != without).any(axis=0))
        assert _color_pixels(frame, "target").sum() == env.cell ** 2
        assert _color_pixels(frame, "paddle").sum() == 3 * env.cell ** 2
        assert not (info["mask"] & _color_pixels(frame, "mark")).any()
        assert not (info["mask"] & _color_pixels(frame, "distractor")).any()
        frame, _, terminated, _, info = env.step(int(rng.integers(3)))


def test_hand_example_of_a_frame() -> None:
    env = CatchEnv(rows=4, cols=4, cell=1, paddle_width=1, distractors=0)
    env.reset(seed=0)
    env.target, env.paddle, env.mark = (0, 2), 1, 3
    frame = env.draw(LAYERS)
    expected = np.zeros((4, 4), int)
    expected[0, 2], expected[2, 1], expected[3, 3] = 1, 2, 3
    for code, kind in ((1, "target"), (2, "paddle"), (3, "mark")):
        np.testing.assert_array_equal(_color_pixels(frame, kind), expected == code)
    np.testing.assert_array_equal(env.mask(), (expected == 1) | (expected == 2))


def test_catching_pays_one_and_missing_minus_one() -> None:
    env = CatchEnv(distractors=0)
    env.reset(seed=3)
    rewards = []
    for _ in range(env.paddle_row):  # follow the target: always caught
        step = 0 if env.paddle > env.target[1] else 2 if env.paddle < env.target[1] else 1
        _, reward, terminated, _, _ = env.step(step)
        rewards.append(reward)
    assert terminated and rewards[-1] == 1.0 and sum(rewards) == 1.0
    env.reset(seed=3)
    env.target = (0, 0)
    for _ in range(env.paddle_row):
        _, reward, terminated, _, _ = env.step(2)  # run away to the right
    assert terminated and reward == -1.0


def test_mark_follows_the_target_only_in_the_training_variant() -> None:
    train, test = make_catch("train"), make_catch("test")
    follows_train = [train.reset(seed=s)[1]["mark_follows_target"] for s in range(200)]
    follows_test = [test.reset(seed=s)[1]["mark_follows_target"] for s in range(200)]
    assert all(follows_train)
    assert 0.05 < np.mean(follows_test) < 0.25  # a random column of 8 agrees 1 time in 8
    distractor_cols = {c for s in range(50) for c in (train.reset(seed=s) and train.distractors)}
    assert len(distractor_cols) > 1


def test_seeding_gives_identical_episodes() -> None:
    actions = [0, 2, 2, 1, 0, 1, 2, 0, 1, 1]
    a, b = _frames(make_catch("test"), 7, actions), _frames(make_catch("test"), 7, actions)
    c = _frames(make_catch("test"), 8, actions)
    for (fa, ia), (fb, ib) in zip(a, b):
        np.testing.assert_array_equal(fa, fb)
        np.testing.assert_array_equal(ia["mask"], ib["mask"])
    assert any(not np.array_equal(fa, fc) for (fa, _), (fc, _) in zip(a, c))


def test_mask_observation_keeps_the_requested_share_of_masks() -> None:
    env = MaskObservation(make_catch("train"), mask_fraction=0.25)
    obs, info = env.reset(seed=0)
    kept = []
    for _ in range(400):
        obs, _, terminated, _, info = env.step(1)
        assert obs["image"].shape == (3, 20, 16)
        if obs["has_mask"][0]:
            np.testing.assert_array_equal(obs["mask"], info["mask"].astype(np.uint8))
        else:
            assert not obs["mask"].any()
        kept.append(obs["has_mask"][0])
        if terminated:
            env.reset()
    assert 0.15 < np.mean(kept) < 0.35
    full = MaskObservation(make_catch("train"), mask_fraction=1.0)
    assert full.reset(seed=1)[0]["has_mask"][0] == 1


@pytest.mark.parametrize("kwargs, match", [
    ({"paddle_width": 2}, "paddle_width"), ({"distractors": 8}, "distractors"),
    ({"rows": 3}, "rows"), ({"mark_agreement": 1.5}, "mark_agreement"),
])
def test_bad_arguments_are_named(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CatchEnv(**kwargs)


def test_bad_variant_action_and_fraction_are_named() -> None:
    with pytest.raises(ValueError, match="variant"):
        make_catch("val")
    env = make_catch()
    env.reset(seed=0)
    with pytest.raises(ValueError, match="action 3"):
        env.step(3)
    with pytest.raises(ValueError, match="mask_fraction"):
        MaskObservation(env, mask_fraction=-0.1)
