"""CutMix and Mixup for multi-label batches: every image is mixed with another of the batch.

``mixup`` (Zhang et al. 2018): ``x = lam * x_a + (1 - lam) * x_b``. ``cutmix`` (Yun et al. 2019): a
box of area ``(1 - lam)`` of the image is taken from ``x_b`` (``lam`` is then the exact kept area).
Labels are mixed with the same weight, ``y = lam * y_a + (1 - lam) * y_b``, so a class in both
images keeps label 1, and a class in one of them gets the share of the image it came from (still
"present" for class-token masking, which drops only classes with label 0). ``lam`` is drawn
from Beta(alpha, alpha) once per batch, from torch's global generator. CutMix also pastes the
box into the masks (and the self-training ``pseudo_mask``); Mixup leaves no valid mask, so mixed
images lose ``has_mask``.

Example:
    >>> batch = mix_batch(batch, "cutmix", alpha=1.0)  # doctest: +SKIP
"""

from __future__ import annotations

import math

import torch

MIX_MODES = ("none", "mixup", "cutmix")


def cutmix_box(height: int, width: int, lam: float) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a box of about ``(1 - lam)`` of the area, centred uniformly and
    clipped to the image (Yun et al.'s sampling)."""
    cut = math.sqrt(1.0 - lam)
    cy, cx = int(torch.randint(height, ())), int(torch.randint(width, ()))
    half_h, half_w = round(height * cut / 2), round(width * cut / 2)
    top, bottom = max(cy - half_h, 0), min(cy + half_h, height)
    left, right = max(cx - half_w, 0), min(cx + half_w, width)
    return top, left, bottom - top, right - left


def mix_batch(batch: dict, mode: str, alpha: float = 1.0) -> dict:
    """A copy of ``batch`` (``image`` [B,C,H,W], ``labels`` [B,K], optional ``mask`` and
    ``pseudo_mask`` [B,H,W] and ``has_mask`` [B]) with each image mixed with the image at a random permutation of the batch."""
    if mode not in MIX_MODES:
        raise ValueError(f"train.mix={mode!r}; expected one of {MIX_MODES}")
    if alpha <= 0:
        raise ValueError(f"train.mix_alpha must be > 0, got {alpha}")
    if mode == "none":
        return batch
    images, labels = batch["image"], batch["labels"]
    concentration = torch.tensor(float(alpha))
    lam = float(torch.distributions.Beta(concentration, concentration).sample())
    perm = torch.randperm(images.shape[0])
    out = dict(batch)
    if mode == "mixup":
        out["image"] = lam * images + (1.0 - lam) * images[perm]
        if "has_mask" in batch:
            out["has_mask"] = torch.zeros_like(torch.as_tensor(batch["has_mask"]))
    else:
        top, left, h, w = cutmix_box(*images.shape[-2:], lam)
        window = (..., slice(top, top + h), slice(left, left + w))
        out["image"] = images.clone()
        out["image"][window] = images[perm][window]
        for key in ("mask", "pseudo_mask"):
            if key in batch:
                out[key] = batch[key].clone()
                out[key][window] = batch[key][perm][window]
        lam = 1.0 - h * w / (images.shape[-2] * images.shape[-1])
    out["labels"] = lam * labels + (1.0 - lam) * labels[perm]
    return out
