"""``attnmaps rl-bench``: does mask guidance put a PPO agent's attention on the target and the
paddle, and off the spurious mark, without costing return?

Every method of :mod:`attnmaps.rl.guidance` trains a :class:`~attnmaps.rl.guided_ppo.GuidedPPO`
agent with a GAP-CNN policy (:mod:`attnmaps.rl.policy`) on the training variant of
:class:`~attnmaps.rl.catch.CatchEnv` (the mark follows the target), for several seeds. Each agent
is scored by its greedy return on the training and the test variant (mark random), and by the
alignment and faithfulness of its action maps on held-out frames (:mod:`attnmaps.rl.evaluate`).
Results: mean ± std, Welch t-test p-values against ``none`` and against the best baseline,
``rl_bench.json``, ``rl_bench.md`` and ``rl_bench.png``.
"""

from __future__ import annotations

import json
import multiprocessing
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch

from ..atomic import atomic_write
from ..guide.bench import format_table, plot_summary, summarise
from ..metrics.report import to_jsonable
from ..progress import logger
from . import require
from .catch import make_catch
from .evaluate import greedy_returns, held_out_frames, score_frames
from .guidance import BASELINES, check_method
from .guided_ppo import GuidedPPO
from .observation import MaskObservation
from .policy import PolicyMaps, policy_kwargs

DummyVecEnv = require("stable_baselines3.common.vec_env").DummyVecEnv

# Metric name -> higher is better.
METRICS: dict[str, bool] = {
    "train_return": True, "test_return": True,
    "energy_pointing_game": True, "pointing_game": True, "thresholded_iou": True,
    "roc_auc": True, "relevance_rank_accuracy": True,
    "deletion_auc": False, "insertion_auc": True,
    "value_deletion_auc": False, "value_insertion_auc": True,
    "road_morf": False, "road_lerf": True,
    "action_flip": True, "action_flip_random": False,
}
TABLE_METRICS = ("train_return", "test_return", "energy_pointing_game", "thresholded_iou",
                 "pointing_game", "roc_auc", "deletion_auc", "insertion_auc",
                 "value_deletion_auc", "road_morf", "road_lerf", "action_flip")
PLOT_METRICS = ("train_return", "test_return", "energy_pointing_game", "thresholded_iou",
                "deletion_auc", "action_flip")

# Guidance weight per method (the factor of its term next to PPO's loss).
# CAMAL's was piloted on seeds 100-102 (0.01, 0.02, 0.03, 0.1; 0.03 and above stopped PPO from
# learning); the other map losses share it; RRR's was not piloted.
DEFAULT_WEIGHTS: dict[str, float] = {"none": 0.0, "camal": 0.02, "camal_energy": 0.02,
                                     "rrr": 1.0, "gain": 0.02, "l1": 0.02}
# Seeds of evaluation episodes, far from the training seeds.
TRAIN_EVAL_SEED, TEST_EVAL_SEED, FRAMES_SEED = 1_000_000, 2_000_000, 3_000_000


@dataclass
class RLBenchConfig:
    methods: list[str] = field(default_factory=lambda: ["none", "camal", "l1"])
    seeds: int = 5
    first_seed: int = 0
    timesteps: int = 50_000
    n_envs: int = 8
    n_steps: int = 64
    batch_size: int = 128
    n_epochs: int = 4
    learning_rate: float = 2.5e-3
    ent_coef: float = 0.01
    widths: tuple[int, ...] = (8, 16, 16)
    mask_fraction: float = 1.0
    weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    eval_episodes: int = 200
    frame_episodes: int = 40
    num_faithfulness: int = 64
    workers: int = 2

    def check(self) -> None:
        for method in self.methods:
            check_method(method)
        missing = [m for m in self.methods if m not in self.weights]
        if missing:
            raise ValueError(f"no guidance weight for methods {missing}; weights has "
                             f"{sorted(self.weights)}")
        if self.seeds < 1 or self.timesteps < self.n_envs * self.n_steps:
            raise ValueError(f"need seeds >= 1 and timesteps >= n_envs * n_steps = "
                             f"{self.n_envs * self.n_steps}, got seeds={self.seeds}, "
                             f"timesteps={self.timesteps}")
        if self.workers < 1:
            raise ValueError(f"workers={self.workers} must be >= 1")
        if not 0.0 <= self.mask_fraction <= 1.0:
            raise ValueError(f"mask_fraction={self.mask_fraction} must lie in [0, 1]")


def quick_config() -> RLBenchConfig:
    """A smoke run: two methods, two seeds, a few thousand steps."""
    return RLBenchConfig(methods=["none", "camal"], seeds=2, timesteps=2048, eval_episodes=10,
                         frame_episodes=4, num_faithfulness=8)


def _training_env(cfg: RLBenchConfig) -> DummyVecEnv:
    return DummyVecEnv([lambda: MaskObservation(make_catch("train"), cfg.mask_fraction)
                        for _ in range(cfg.n_envs)])


def train_agent(method: str, seed: int, cfg: RLBenchConfig) -> GuidedPPO:
    """A GuidedPPO agent trained with ``method`` from ``seed`` on the training variant."""
    model = GuidedPPO("MultiInputPolicy", _training_env(cfg), guidance=method,
                      guidance_weight=cfg.weights[method], n_steps=cfg.n_steps,
                      batch_size=cfg.batch_size, n_epochs=cfg.n_epochs,
                      learning_rate=cfg.learning_rate, ent_coef=cfg.ent_coef,
                      policy_kwargs=policy_kwargs(cfg.widths), seed=seed, device="cpu",
                      verbose=0)
    return model.learn(cfg.timesteps)


def run_one(job: tuple[str, int], cfg: RLBenchConfig) -> dict[str, float]:
    """Train and score one (method, seed) job, single-threaded."""
    torch.set_num_threads(1)
    method, seed = job
    started = time.time()
    net = PolicyMaps(train_agent(method, seed, cfg).policy).eval()
    scores = {}
    for name, variant, first in (("train_return", "train", TRAIN_EVAL_SEED),
                                 ("test_return", "test", TEST_EVAL_SEED)):
        returns = greedy_returns(net, partial(make_catch, variant), cfg.eval_episodes, first)
        scores[name] = sum(returns) / len(returns)
    images, masks = held_out_frames(net, partial(make_catch, "train"), cfg.frame_episodes,
                                    FRAMES_SEED)
    scores.update(score_frames(net, images, masks, cfg.num_faithfulness, seed=seed))
    scores["seconds"] = time.time() - started
    return scores


def run_rl_bench(cfg: RLBenchConfig, out_dir: str | Path) -> dict:
    """Train and score every method for every seed; write JSON, table and plot to ``out_dir``."""
    cfg.check()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    jobs = [(m, seed) for seed in range(cfg.first_seed, cfg.first_seed + cfg.seeds)
            for m in cfg.methods]
    runs: dict[str, list[dict]] = {m: [] for m in cfg.methods}
    with ExitStack() as stack:
        if cfg.workers == 1:
            threads = torch.get_num_threads()
            stack.callback(torch.set_num_threads, threads)
            results = map(partial(run_one, cfg=cfg), jobs)
        else:
            pool = stack.enter_context(multiprocessing.get_context("spawn").Pool(cfg.workers))
            results = pool.imap(partial(run_one, cfg=cfg), jobs)
        for index, ((method, seed), scores) in enumerate(zip(jobs, results), start=1):
            runs[method].append(scores)
            logger.info("rl-bench [%d/%d] %s seed %d: train return %+.2f, test return %+.2f, "
                        "EPG %.3f, IoU %.3f (%.0f s)", index, len(jobs), method, seed,
                        scores["train_return"], scores["test_return"],
                        scores["energy_pointing_game"], scores["thresholded_iou"],
                        scores["seconds"])
    summary = summarise(runs, cfg.methods, METRICS, BASELINES)
    report = {"config": asdict(cfg), "seconds": time.time() - started, "runs": runs,
              "summary": summary}
    text = json.dumps(to_jsonable(report), indent=2, allow_nan=False)
    table = format_table(summary, TABLE_METRICS)
    atomic_write({out_dir / "rl_bench.json": lambda tmp: tmp.write_text(text),
                  out_dir / "rl_bench.md": lambda tmp: tmp.write_text(table + "\n")},
                 durable=False)
    plot_summary(summary, out_dir / "rl_bench.png", PLOT_METRICS, METRICS)
    return report

