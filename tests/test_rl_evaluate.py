"""Scoring a policy: returns, held-out frames, flip rates and the bench's smoke run."""

from __future__ import annotations

import json
import logging
import math
from functools import partial

import pytest
import torch

pytest.importorskip("gymnasium")
pytest.importorskip("stable_baselines3")

from attnmaps.cli import main
from attnmaps.rl import require
from attnmaps.rl.bench import METRICS, RLBenchConfig, quick_config, run_rl_bench
from attnmaps.rl.catch import make_catch
from attnmaps.rl.evaluate import flip_rate, greedy_returns, held_out_frames


class FirstPixelPolicy(torch.nn.Module):
    """Action 1 when the top-left pixel's red channel is set, else action 0."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        red = images[:, 0, 0, 0]
        return torch.stack([1 - red, red, torch.zeros_like(red)], dim=1)


def test_flip_rate_by_hand() -> None:
    images = torch.zeros(2, 3, 2, 2)
    images[:, 0, 0, 0] = 1.0  # both frames choose action 1
    pointing = torch.zeros(2, 2, 2)
    pointing[0, 0, 0] = 1.0  # frame 0 ranks the decisive pixel first, frame 1 does not
    pointing[1, 1, 1] = 1.0
    assert flip_rate(FirstPixelPolicy(), images, pointing, 0.25) == 0.5
    assert flip_rate(FirstPixelPolicy(), images, pointing, 0.5) == 1.0  # ties go to index 0
    with pytest.raises(ValueError, match="fraction"):
        flip_rate(FirstPixelPolicy(), images, pointing, 1.0)


class StayPolicy(torch.nn.Module):
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.tensor([0.0, 1.0, 0.0]).expand(len(images), 3)


def test_greedy_returns_and_frames_are_seeded() -> None:
    env = partial(make_catch, "train")
    returns = greedy_returns(StayPolicy(), env, 30, first_seed=5)
    assert returns == greedy_returns(StayPolicy(), env, 30, first_seed=5)
    assert set(returns) <= {-1.0, 1.0} and 0 < returns.count(1.0) < 30
    images, masks = held_out_frames(StayPolicy(), env, 3, first_seed=0)
    assert images.shape == (3 * 8, 3, 20, 16) and masks.shape == (3 * 8, 20, 16)
    assert 0.0 <= images.min() and images.max() <= 1.0 and masks.any(dim=(1, 2)).all()


def test_quick_bench_writes_json_table_and_plot(tmp_path, caplog) -> None:
    cfg = quick_config()
    cfg.methods, cfg.timesteps, cfg.eval_episodes = ["none", "camal"], 256, 4
    cfg.frame_episodes, cfg.num_faithfulness = 2, 4
    cfg.n_envs, cfg.n_steps, cfg.batch_size, cfg.widths = 2, 128, 64, (4, 8, 8)
    cfg.workers = 1
    with caplog.at_level(logging.INFO, logger="attnmaps"):
        report = run_rl_bench(cfg, tmp_path)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("rl-bench [")]
    assert len(lines) == 4 and "camal seed 1" in lines[-1]
    saved = json.loads((tmp_path / "rl_bench.json").read_text())
    assert set(saved["summary"]) == {"none", "camal"}
    assert set(saved["summary"]["camal"]) == set(METRICS)
    run = report["runs"]["camal"][0]
    assert -1.0 <= run["train_return"] <= 1.0 and 0.0 <= run["energy_pointing_game"] <= 1.0
    assert not math.isnan(run["deletion_auc"])
    assert (tmp_path / "rl_bench.png").stat().st_size > 0
    assert "| camal |" in (tmp_path / "rl_bench.md").read_text()


def test_bench_and_cli_reject_bad_settings(capsys) -> None:
    with pytest.raises(ValueError, match="unknown guidance method"):
        RLBenchConfig(methods=["none", "cam"]).check()
    with pytest.raises(ValueError, match="timesteps"):
        RLBenchConfig(timesteps=10).check()
    with pytest.raises(ValueError, match="mask_fraction=2"):
        RLBenchConfig(mask_fraction=2).check()
    assert main(["rl-bench", "--methods", "nope", "--out", "/tmp/unused"]) == 2
    assert "unknown guidance method" in capsys.readouterr().err


def test_missing_dependency_names_the_extra() -> None:
    with pytest.raises(ImportError, match=r"attnmaps\[rl\]"):
        require("attnmaps_no_such_package")
