"""``attnmaps guide-bench``: does mask guidance move a classifier's attention onto the object and
off a spurious cue, without losing clean accuracy?

Every method of :mod:`attnmaps.guide.methods` trains a :class:`GAPConvNet` on the cue-shapes
training split (mark corner = class) with masks for all images, for several seeds, and is scored
on the test split (mark corner random): accuracy, the alignment metrics of its class activation
maps (:mod:`attnmaps.metrics.alignment`) and their faithfulness
(:mod:`attnmaps.metrics.faithfulness`). Results: a mean ± std table with Welch t-test p-values
against ``none`` and against the best baseline, ``guide_bench.json`` and ``guide_bench.png``.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..atomic import atomic_write
from ..metrics.alignment import AlignmentMetric
from ..metrics.faithfulness import average_drop_increase, deletion_insertion_auc, road
from ..metrics.report import to_jsonable
from ..progress import logger, progress
from .cue_data import CueSplit, make_cue_split
from .gap_net import GAPConvNet
from .methods import BASELINES, METHODS, method_loss, true_class_maps
from .stats import best_method, welch_t_test

# Metric name -> higher is better.
METRICS: dict[str, bool] = {
    "accuracy": True, "cue_accuracy": False,
    "energy_pointing_game": True, "pointing_game": True, "thresholded_iou": True,
    "roc_auc": True, "relevance_rank_accuracy": True,
    "deletion_auc": False, "insertion_auc": True, "road_morf": False, "road_lerf": True,
    "average_drop": False, "increase_in_confidence": True,
}


# Guidance weight per method (the factor of its loss next to the cross-entropy).
DEFAULT_WEIGHTS: dict[str, float] = {"none": 0.0, "camal": 1.0, "camal_energy": 0.5, "rrr": 100.0,
                                     "gain": 5.0, "l1": 5.0}


@dataclass
class BenchConfig:
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    seeds: int = 5
    num_train: int = 1500
    num_test: int = 500
    num_faithfulness: int = 100
    image_size: int = 32
    epochs: int = 6
    batch_size: int = 64
    lr: float = 2e-3
    weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    data_seed: int = 0
    device: str = "cpu"


def train_method(method: str, seed: int, data: CueSplit, cfg: BenchConfig) -> GAPConvNet:
    """A GAPConvNet trained with ``method`` from seed ``seed`` (Adam, cosine schedule)."""
    torch.manual_seed(seed)
    device = torch.device(cfg.device)
    model = GAPConvNet(num_classes=4).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    if len(data) < cfg.batch_size:
        raise ValueError(f"num_train={len(data)} is smaller than batch_size={cfg.batch_size}; "
                         "no training step would run")
    steps = cfg.epochs * (len(data) // cfg.batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    loss_fn = method_loss(method)
    weight = cfg.weights[method]
    order_generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(cfg.epochs):
        order = torch.randperm(len(data), generator=order_generator)
        for start in range(0, len(order) - cfg.batch_size + 1, cfg.batch_size):
            index = order[start:start + cfg.batch_size]
            images, labels = data.images[index].to(device), data.labels[index].to(device)
            masks = data.masks[index].to(device)
            has_mask = torch.ones(len(index), dtype=torch.bool, device=device)
            ce, guide = loss_fn(model, images, labels, masks, has_mask)
            optimizer.zero_grad(set_to_none=True)
            (ce + weight * guide).backward()
            optimizer.step()
            scheduler.step()
    return model.eval()


def _upsampled_true_class_maps(model: GAPConvNet, images: Tensor,
                               labels: Tensor) -> tuple[Tensor, Tensor]:
    """Logits and the true class's map, upsampled to the image and clipped at 0 (no graph)."""
    with torch.no_grad():
        logits, maps = true_class_maps(model, images, labels)
    full = F.interpolate(maps.unsqueeze(1), size=images.shape[-2:], mode="bilinear",
                         align_corners=False)
    return logits, full[:, 0].clamp(min=0)


def score_model(model: GAPConvNet, test: CueSplit, cfg: BenchConfig) -> dict[str, float]:
    """Accuracy, how often the prediction follows the mark, alignment and faithfulness."""
    device = torch.device(cfg.device)
    images, labels, masks = test.images.to(device), test.labels.to(device), test.masks.to(device)
    logits, maps = _upsampled_true_class_maps(model, images, labels)
    prediction = logits.argmax(1).cpu()
    misled = test.cue != test.labels
    result = {"accuracy": (prediction == test.labels).float().mean().item(),
              "cue_accuracy": (prediction[misled] == test.cue[misled]).float().mean().item()}
    alignment = AlignmentMetric(tolerance=1)
    alignment.update(maps, masks)
    result.update(alignment.compute())

    n = cfg.num_faithfulness
    subset_labels = labels[:n]

    def true_class_probability(x: Tensor) -> Tensor:
        return model(x).softmax(1)[torch.arange(len(x)), subset_labels]

    images, maps = images[:n], maps[:n]
    result["deletion_auc"] = deletion_insertion_auc(
        true_class_probability, images, maps, mode="deletion", blur_sigma=2.0).mean().item()
    result["insertion_auc"] = deletion_insertion_auc(
        true_class_probability, images, maps, mode="insertion", blur_sigma=2.0).mean().item()
    fractions = (0.1, 0.3, 0.5, 0.7, 0.9)
    for order in ("morf", "lerf"):
        result[f"road_{order}"] = road(true_class_probability, images, maps, fractions,
                                       order=order).mean().item()
    drop = average_drop_increase(true_class_probability, images, maps)
    result["average_drop"] = drop["average_drop"]
    result["increase_in_confidence"] = drop["increase_in_confidence"]
    return result


def summarise(runs: dict[str, list[dict]], methods: Sequence[str],
              metrics: dict[str, bool] = METRICS,
              baseline_methods: Sequence[str] = BASELINES) -> dict:
    """Mean, std and Welch p-values vs ``none`` and vs the best baseline, per method and metric
    (``metrics``: name -> higher is better)."""
    summary: dict[str, dict] = {}
    baselines = [m for m in baseline_methods if m in methods]
    for metric, higher in metrics.items():
        samples = {m: [r[metric] for r in runs[m]] for m in methods}
        best = best_method(samples, baselines, higher) if baselines else None
        for m in methods:
            values = [v for v in samples[m] if not math.isnan(v)]
            entry = {"mean": statistics.mean(values) if values else math.nan,
                     "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                     "p_vs_none": welch_t_test(samples[m], samples["none"])[1]
                     if "none" in samples and m != "none" else math.nan,
                     "best_baseline": best,
                     "p_vs_best_baseline": welch_t_test(samples[m], samples[best])[1]
                     if best is not None and m != best else math.nan}
            summary.setdefault(m, {})[metric] = entry
    return summary


def format_table(summary: dict, metrics: Sequence[str] = tuple(METRICS)) -> str:
    """Markdown table: one row per method, ``mean ± std`` per metric, p vs none in brackets."""
    header = "| method | " + " | ".join(metrics) + " |"
    lines = [header, "|" + "---|" * (len(metrics) + 1)]
    for method, row in summary.items():
        cells = []
        for metric in metrics:
            e = row[metric]
            p = "" if math.isnan(e["p_vs_none"]) else f" (p={e['p_vs_none']:.2g})"
            cells.append(f"{e['mean']:.3f} ± {e['std']:.3f}{p}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_summary(summary: dict, path: Path,
                 metrics: Sequence[str] = ("accuracy", "energy_pointing_game", "thresholded_iou",
                                           "roc_auc", "deletion_auc", "insertion_auc"),
                 higher: dict[str, bool] = METRICS) -> None:
    """Bar chart (mean ± std over seeds) of the main metrics for every method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(summary)
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.1 * len(metrics), 3.4))
    for ax, metric in zip(axes, metrics):
        means = [summary[m][metric]["mean"] for m in methods]
        stds = [summary[m][metric]["std"] for m in methods]
        ax.bar(range(len(methods)), means, yerr=stds, capsize=3,
               color=["#888888" if m == "none" else "#d62728" if m.startswith("camal")
                      else "#1f77b4" for m in methods])
        ax.set_xticks(range(len(methods)), methods, rotation=45, ha="right")
        arrow = "↑" if higher[metric] else "↓"
        ax.set_title(f"{metric} {arrow}", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_guide_bench(cfg: BenchConfig, out_dir: str | Path) -> dict:
    """Train and score every method for every seed; write JSON, plot and table to ``out_dir``."""
    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown guidance methods {unknown}; expected some of {tuple(METHODS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    train = make_cue_split(cfg.num_train, cfg.image_size, seed=cfg.data_seed, cue_agreement=1.0)
    test = make_cue_split(cfg.num_test, cfg.image_size, seed=cfg.data_seed + 1,
                          cue_agreement=0.0)
    runs: dict[str, list[dict]] = {m: [] for m in cfg.methods}
    jobs = [(seed, m) for seed in range(cfg.seeds) for m in cfg.methods]
    for seed, method in progress(jobs, "guide-bench"):
        run_started = time.time()
        model = train_method(method, seed, train, cfg)
        scores = score_model(model, test, cfg)
        scores["seconds"] = time.time() - run_started
        runs[method].append(scores)
        logger.info("guide-bench: %s, seed %d done in %.0f s", method, seed, scores["seconds"])
    summary = summarise(runs, cfg.methods)
    report = {"config": asdict(cfg), "seconds": time.time() - started, "runs": runs,
              "summary": summary}
    text = json.dumps(to_jsonable(report), indent=2, allow_nan=False)
    table = format_table(summary)
    atomic_write({out_dir / "guide_bench.json": lambda tmp: tmp.write_text(text),
                  out_dir / "guide_bench.md": lambda tmp: tmp.write_text(table + "\n")},
                 durable=False)
    plot_summary(summary, out_dir / "guide_bench.png")
    return report
