"""Stages that use a finished run: load it, write pseudo masks, score them, sweep the
background threshold."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import safe_open
from torch.utils.data import Dataset

from .checkpoint import checkpoint_paths, load_weights, read_metadata
from .config import Config, apply_overrides, load_config
from .data.registry import build_dataset
from .engine.evaluate import eval_options, evaluate
from .engine.stages import evaluate_stages
from .errors import DataError
from .metrics.report import save_metrics
from .models.factory import create_model
from .models.vit import ClassTokenViT
from .protocol import USES_PIXEL_LABELS, build_protocol
from .pseudo.masks import mask_path, save_pseudo_masks
from .pseudo.threshold import METHOD as LABEL_FREE_METHOD
from .runtime import resolve_device

SWEEP_FILE = "sweep.json"
METRICS_FILE = "metrics.json"


def load_run(run_dir: Path, overrides: Sequence[str] = (),
             device: str | None = None) -> tuple[Config, ClassTokenViT]:
    """The resolved config (plus ``overrides``) and the trained model of a run directory, on
    ``device`` (default: the run's ``train.device``)."""
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found; is {run_dir} a run directory written "
                                "by 'attnmaps train'?")
    cfg = apply_overrides(load_config(config_path), overrides)
    weights, _ = checkpoint_paths(run_dir)
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found; the run has not finished an epoch yet")
    metadata = read_metadata(weights)
    if "num_classes" in metadata:
        num_classes = int(metadata["num_classes"])
    else:  # written before checkpoints carried their metadata: count the class tokens
        with safe_open(str(weights), framework="pt") as f:
            key = "cls_token" if "cls_token" in set(f.keys()) else "cls_tokens"
            num_classes = f.get_slice(key).get_shape()[1]
    model = create_model(cfg.model, num_classes)
    load_weights(weights, model)
    return cfg, model.to(resolve_device(device or cfg.train.device)).eval()


def write_pseudo_masks(run_dir: Path, out_dir: Path, split: str | None = None,
                       overrides: Sequence[str] = ()) -> dict | None:
    """Write ``<id>.png`` pseudo masks for ``split``; returns their metrics when masks exist.

    ``pseudo.use_true_labels=true`` builds the masks from the ground-truth image labels (the
    usual way to score seeds on the training split) instead of the predicted ones. The
    ``pseudo.*`` settings (TTA, PAMR, CRF) apply as in :func:`~attnmaps.engine.evaluate.evaluate`.
    When the split has ground-truth masks, the metrics are also written to
    ``out_dir/metrics.json``: those of :func:`~attnmaps.engine.evaluate.evaluate`, whose
    top-level segmentation ones (``miou``, ``pixel_acc``, ``mean_acc``, ``per_class_iou``,
    ``confusion`` with rows = ground truth) are those of the written masks; ``protocol`` (how
    they were made, :func:`~attnmaps.protocol.build_protocol`) and ``stages`` (raw, then each
    enabled post-processing step, :func:`~attnmaps.engine.stages.evaluate_stages`) come with
    them.
    """
    cfg, model = load_run(run_dir, overrides)
    split = split or cfg.data.val_split
    dataset = build_dataset(cfg.data, split, train=False)
    check_classes(model, dataset, cfg)
    for image_id in getattr(dataset, "ids", ()):  # every path checked before any work
        mask_path(Path(out_dir), image_id)

    def save(batch: dict, probs: torch.Tensor, maps: torch.Tensor, pred: torch.Tensor) -> None:
        save_pseudo_masks(out_dir, list(batch["id"]), pred.cpu())

    metrics = evaluate(model, dataset, cfg.pseudo, **eval_options(cfg), on_batch=save)
    if not _has_masks(dataset):
        return None
    metrics["stages"] = evaluate_stages(model, dataset, cfg.pseudo, final=metrics,
                                        **eval_options(cfg))
    if cfg.pseudo.use_true_labels:
        metrics.update(metrics["true_labels"])
    metrics["masks_from"] = "true image labels" if cfg.pseudo.use_true_labels else "predictions"
    metrics["protocol"] = build_protocol(cfg, split=split, num_images=len(dataset),
                                         weights=checkpoint_paths(run_dir)[0])
    save_metrics(Path(out_dir) / METRICS_FILE, metrics)
    return metrics


def sweep_thresholds(run_dir: Path, thresholds: Sequence[float], split: str | None = None,
                     overrides: Sequence[str] = (), label_free: bool = False) -> dict:
    """Pseudo-mask mIoU of ``split`` (default: the validation split) at each background
    threshold, and the best; saved to ``run_dir/sweep.json``.

    Masks come from the predicted image labels, or from the true ones with
    ``pseudo.use_true_labels=true`` (the usual way to pick the threshold of training-set
    seeds); the other ``pseudo.*`` settings apply as in
    :func:`~attnmaps.engine.evaluate.evaluate`. Returns ``{"split", "use_true_labels",
    "miou_by_threshold": {threshold: miou}, "best_threshold", "best_miou", "best_chosen_by",
    "protocol"}``; ties go to the lowest threshold. The best threshold is chosen with the
    split's pixel labels, which ``best_chosen_by`` and the protocol say.

    ``label_free`` adds ``"label_free": {"method", "threshold", "miou", "gap_to_best"}``: the
    threshold :class:`~attnmaps.pseudo.threshold.MapHistogram` picks without pixel labels, and
    its mIoU (one more pass over the split).
    """
    thresholds = sorted({float(t) for t in thresholds})
    if not thresholds or not all(0.0 <= t <= 1.0 for t in thresholds):
        raise ValueError(f"thresholds must be one or more values in [0, 1] (the maps are min-max "
                         f"normalized), got {thresholds}")
    run_dir = Path(run_dir)
    cfg, model = load_run(run_dir, overrides)
    split = split or cfg.data.val_split
    dataset = build_dataset(cfg.data, split, train=False)
    check_classes(model, dataset, cfg)
    if not _has_masks(dataset):
        raise ValueError(f"split {split!r} of {cfg.data.root} has no ground-truth masks to "
                         "score thresholds on; pick a split with masks")
    metrics = evaluate(model, dataset, cfg.pseudo, **eval_options(cfg), sweep=thresholds)
    by_threshold = metrics["miou_by_threshold"]
    scored = [t for t in thresholds if not math.isnan(by_threshold[t])]
    best = max(scored, key=by_threshold.__getitem__) if scored else None
    chosen_by = f"pixel-label sweep of {thresholds} on split {split!r} ({USES_PIXEL_LABELS})"
    result = {"split": split, "use_true_labels": cfg.pseudo.use_true_labels,
              "miou_by_threshold": by_threshold, "best_threshold": best,
              "best_miou": by_threshold[best] if best is not None else math.nan,
              "best_chosen_by": chosen_by}
    if label_free:
        threshold = metrics["label_free_threshold"]
        key = "miou_true_labels" if cfg.pseudo.use_true_labels else "miou"
        miou = evaluate(model, dataset, replace(cfg.pseudo, threshold=threshold),
                        **eval_options(cfg))[key]
        result["label_free"] = {"method": LABEL_FREE_METHOD, "threshold": threshold,
                                "miou": miou, "gap_to_best": result["best_miou"] - miou}
    result["protocol"] = build_protocol(cfg, split=split, num_images=len(dataset),
                                        weights=checkpoint_paths(run_dir)[0],
                                        threshold_choice=chosen_by, threshold=best)
    save_metrics(run_dir / SWEEP_FILE, result)
    return result


def check_classes(model: ClassTokenViT, dataset: Dataset, cfg: Config) -> None:
    """Raise when ``dataset`` has another number of classes than the run's model."""
    if dataset.num_classes != model.num_classes:
        raise DataError(f"the run's model has {model.num_classes} classes but data.root="
                        f"{cfg.data.root} (data.name={cfg.data.name}) has {dataset.num_classes}: "
                        f"{getattr(dataset, 'class_names', '')}; score a run on its own classes")


def _has_masks(dataset: Dataset) -> bool:
    """Whether the first items of ``dataset`` (up to 8) have ground-truth masks."""
    return any(dataset[i]["has_mask"] for i in range(min(len(dataset), 8)))
