"""Stages that use a finished run: load it, write pseudo masks, score them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open

from .config import Config, apply_overrides, load_config
from .data.registry import build_dataset
from .engine.checkpoint import checkpoint_paths, load_weights
from .engine.evaluate import evaluate
from .engine.train import build_model, resolve_device
from .models.vit import ClassTokenViT
from .pseudo_masks import save_pseudo_masks


def load_run(run_dir: Path, overrides: Sequence[str] = ()) -> tuple[Config, ClassTokenViT]:
    """The resolved config (plus ``overrides``) and the trained model of a run directory."""
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found; is {run_dir} a run directory written "
                                "by 'attnmaps train'?")
    cfg = apply_overrides(load_config(config_path), overrides)
    weights, _ = checkpoint_paths(run_dir)
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found; the run has not finished an epoch yet")
    with safe_open(str(weights), framework="pt") as f:
        num_classes = f.get_slice("cls_tokens").get_shape()[1]
    model = build_model(cfg.model, num_classes)
    load_weights(weights, model)
    return cfg, model.to(resolve_device(cfg.train.device)).eval()


def write_pseudo_masks(run_dir: Path, out_dir: Path, split: str | None = None,
                       overrides: Sequence[str] = ()) -> dict | None:
    """Write ``<id>.png`` pseudo masks for ``split``; returns their metrics when masks exist.

    ``pseudo.use_true_labels=true`` builds the masks from the ground-truth image labels (the
    usual way to score seeds on the training split) instead of the predicted ones.
    """
    cfg, model = load_run(run_dir, overrides)
    dataset = build_dataset(cfg.data, split or cfg.data.val_split, train=False)
    device = next(model.parameters()).device

    def save(batch: dict, probs: torch.Tensor, maps: torch.Tensor, pred: torch.Tensor) -> None:
        save_pseudo_masks(out_dir, list(batch["id"]), pred.cpu())

    metrics = evaluate(model, dataset, cfg.pseudo, cfg.model.attn_blocks, device,
                       batch_size=cfg.train.batch_size, has_background=dataset.has_background,
                       on_batch=save)
    has_masks = any(dataset[i]["has_mask"] for i in range(min(len(dataset), 8)))
    return metrics if has_masks else None
