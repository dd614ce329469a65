"""``attnmaps demo``: synthetic data -> training from image labels -> pseudo masks -> scores."""

from __future__ import annotations

import time
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from .baselines import border_distance_mask
from .checkpoint import checkpoint_paths, has_checkpoint
from .config import load_config
from .conventions import min_max_normalize
from .data.registry import build_dataset
from .data.synthetic import write_synthetic_voc
from .engine.evaluate import eval_options, evaluate
from .engine.stages import evaluate_stages, format_stages
from .engine.train import train
from .metrics.report import format_iou_table, save_metrics
from .metrics.segmentation import SegmentationMetric
from .pipeline import load_run
from .progress import logger
from .protocol import build_protocol, format_protocol
from .pseudo.masks import upsample_maps
from .viz import save_attention_grid

DEMO_CONFIG = "demo.yaml"
SHIPPED_CHECKPOINT = "demo_vit.safetensors"
NUM_TRAIN, NUM_VAL, GRID_ROWS = 6000, 300, 6
SWEEP = (0.2, 0.3, 0.4, 0.5, 0.6)
# Starting from the shipped checkpoint, the demo fine-tunes briefly at a lower learning rate.
FINETUNE = ("train.epochs=2", "train.lr=2e-4", "train.warmup_epochs=0.2")
# From random weights the demo adds the auxiliary patch head, without which the classifier does
# not learn within the demo's budget, and PatchDropout, which spreads the raw maps over the
# objects and shortens the steps (README, "Small data").
FROM_SCRATCH = ("model.patch_head=true", "train.patch_dropout=0.5")


def demo_config_path() -> Path:
    return Path(str(resources.files("attnmaps") / "configs" / DEMO_CONFIG))


def shipped_checkpoint_path() -> Path:
    """The checkpoint trained by the command in the README (see docs), shipped in the package."""
    return Path(str(resources.files("attnmaps") / "assets" / SHIPPED_CHECKPOINT))


def floor_miou(dataset) -> float:
    """mIoU of the no-learning floor (:mod:`attnmaps.baselines`) on ``dataset``."""
    metric = SegmentationMetric(dataset.num_classes + 1)
    for i in range(len(dataset)):
        sample = dataset[i]
        classes = np.flatnonzero(sample["labels"].numpy() > 0.5)
        pred = border_distance_mask(dataset.raw_image(i), classes)
        metric.update(torch.from_numpy(pred), sample["mask"])
    return metric.compute()["miou"]


def run_demo(out: Path, overrides: Sequence[str] = (), num_train: int = NUM_TRAIN,
             num_val: int = NUM_VAL, from_scratch: bool = False) -> dict:
    """Run the whole demo into ``out``; returns the metrics written to ``out/metrics.json``.

    By default the model starts from the shipped checkpoint and is fine-tuned briefly;
    ``from_scratch`` trains the demo config from random weights instead, with the auxiliary
    patch head and PatchDropout (``FROM_SCRATCH``).
    """
    started = time.time()
    data_root = out / "data"
    if not (data_root / "ImageSets").exists():
        logger.info("writing synthetic shapes to %s ...", data_root)
        write_synthetic_voc(data_root, num_train=num_train, num_val=num_val)
    start = (list(FROM_SCRATCH) if from_scratch
             else [f"model.init_from={shipped_checkpoint_path()}", *FINETUNE])
    cfg = load_config(demo_config_path(),
                      [f"data.root={data_root}", f"out_dir={out / 'run'}", *start, *overrides])
    weights, _ = checkpoint_paths(cfg.out_dir)
    train(cfg, resume=has_checkpoint(cfg.out_dir))
    train_seconds = time.time() - started
    cfg, model = load_run(Path(cfg.out_dir), overrides)
    val = build_dataset(cfg.data, cfg.data.val_split, train=False)
    shown: dict[str, list] = {"maps": [], "probs": [], "pseudo": []}

    def keep(batch: dict, probs: torch.Tensor, maps: torch.Tensor, pred: torch.Tensor) -> None:
        room = GRID_ROWS - len(shown["pseudo"])
        if room > 0:
            full = min_max_normalize(upsample_maps(maps[:room], tuple(pred.shape[-2:])))
            shown["maps"] += list(full.cpu().numpy())
            shown["probs"] += list(probs[:room].cpu().numpy())
            shown["pseudo"] += list(pred[:room].cpu().numpy())

    metrics = evaluate(model, val, cfg.pseudo, **eval_options(cfg), sweep=SWEEP, on_batch=keep)
    metrics["stages"] = evaluate_stages(model, val, cfg.pseudo, final=metrics, **eval_options(cfg))
    metrics["protocol"] = build_protocol(
        cfg, split=cfg.data.val_split, num_images=len(val), weights=weights,
        threshold_choice="fixed in the demo config (chosen on the shipped checkpoint's own "
                         "validation split, seed 1, with the paper's merge rule)")
    metrics["floor_miou"] = floor_miou(val)
    metrics["start"] = "from scratch" if from_scratch else f"shipped checkpoint {SHIPPED_CHECKPOINT}"
    metrics["class_names"] = val.class_names
    metrics["train_seconds"] = train_seconds
    metrics["total_seconds"] = time.time() - started
    picture = save_attention_grid(
        out / "attention_grid.png", [val.raw_image(i) for i in range(len(shown['pseudo']))],
        [val[i]["mask"].numpy() for i in range(len(shown['pseudo']))], shown["pseudo"], shown["maps"],
        val.class_names, probs=shown["probs"])
    save_metrics(out / "metrics.json", metrics)
    logger.info("%s\n%s\n%s", format_protocol(metrics["protocol"]), format_stages(metrics["stages"]),
                format_iou_table(metrics))
    logger.info("model: %s, %d epochs here\n"
                "pseudo-mask mIoU from predicted labels: %.3f\n"
                "  from true image labels:               %.3f\n"
                "  on images with >= 2 classes:          %.3f\n"
                "  no-learning floor (border color):     %.3f\n"
                "classifier mAP %.3f, class-map correlation %.2f, heads closed %.0f%%\n"
                "picture: %s\nmetrics: %s  (%.1f min)",
                metrics["start"], cfg.train.epochs, metrics["miou"], metrics["miou_true_labels"],
                metrics["miou_multi_class"], metrics["floor_miou"], metrics["map"],
                metrics["class_map_correlation"], metrics["head_sparsity"], picture,
                out / "metrics.json", metrics["total_seconds"] / 60)
    return metrics
