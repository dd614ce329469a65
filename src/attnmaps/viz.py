"""Pictures: image | ground truth | pseudo mask | per-class attention, one row per image."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from .data.image_io import VOC_PALETTE


def colorize(mask: np.ndarray) -> np.ndarray:
    """uint8 RGB [H,W,3] of a label mask in the VOC palette (255 = ignore color)."""
    return VOC_PALETTE[mask.astype(np.uint8)]


def save_attention_grid(path: str | Path, images: Sequence[np.ndarray],
                        gt_masks: Sequence[np.ndarray], pseudo_masks: Sequence[np.ndarray],
                        maps: Sequence[np.ndarray], class_names: Sequence[str],
                        label_offset: int = 1, probs: Sequence[np.ndarray] | None = None,
                        row_labels: Sequence[str] | None = None) -> Path:
    """Write a PNG grid; ``maps[i]`` is [K,H,W] at image size, ``class_names`` the mask labels.

    ``label_offset`` is 1 when mask label 0 is background (model class c is label c+1).
    Attention columns are titled with the class name and, when given, its probability;
    ``row_labels`` name the rows beside their first panel.
    """
    rows, k = len(images), maps[0].shape[0]
    cols = 3 + k
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.9 * rows), squeeze=False)
    for r in range(rows):
        panels = [(images[r], "image"), (colorize(gt_masks[r]), "ground truth"),
                  (colorize(pseudo_masks[r]), "pseudo mask")]
        for c, (panel, title) in enumerate(panels):
            axes[r, c].imshow(panel, interpolation="nearest")
            axes[r, c].set_title(title, fontsize=7)
        if row_labels is not None:
            axes[r, 0].set_ylabel(row_labels[r], fontsize=7)
        for c in range(k):
            ax = axes[r, 3 + c]
            ax.imshow(images[r], alpha=0.45)
            ax.imshow(maps[r][c], cmap="jet", alpha=0.55, interpolation="bilinear")
            title = class_names[c + label_offset]
            if probs is not None:
                title += f" {probs[r][c]:.2f}"
            ax.set_title(title, fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout(pad=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_curves(path: str | Path, records: Sequence[dict], keys: Sequence[str]) -> Path:
    """Plot ``keys`` of the per-step log records against the step."""
    fig, ax = plt.subplots(figsize=(5, 3))
    for key in keys:
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            ax.plot(*zip(*points), label=key)
    ax.set_xlabel("step")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
