"""Faithfulness of relevance maps to a model: deletion/insertion, ROAD, average drop/increase.

`predict_fn` maps images float [B,C,H,W] to the target-class score [B] of each image (the caller
closes over the class); maps are float [B,H,W] with higher = more relevant. The model is called
under `torch.no_grad()`, once per step for the whole batch. Pixels are ordered by relevance with a
stable sort, so ties go to the lower row-major index first; a fraction f of the H*W pixels means
floor(f*H*W + 1/2) of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import scipy.sparse
import scipy.sparse.linalg
import torch
import torch.nn.functional as F
from torch import Tensor

from attnmaps.conventions import min_max_normalize

PredictFn = Callable[[Tensor], Tensor]

# ROAD's noisy linear imputation: a removed pixel is the weighted mean of its 8 neighbours.
NEIGHBOUR_WEIGHTS = (
    ((-1, 0), 1 / 6),
    ((1, 0), 1 / 6),
    ((0, -1), 1 / 6),
    ((0, 1), 1 / 6),
    ((-1, -1), 1 / 12),
    ((-1, 1), 1 / 12),
    ((1, -1), 1 / 12),
    ((1, 1), 1 / 12),
)


def _check(images: Tensor, maps: Tensor) -> Tensor:
    """Validate shapes; return the maps on the images' device."""
    if images.dim() != 4 or not images.dtype.is_floating_point:
        raise ValueError(
            f"images must be a float tensor [B,C,H,W], got {images.dtype} {tuple(images.shape)}"
        )
    expected = (images.shape[0], *images.shape[2:])
    if maps.dim() != 3 or tuple(maps.shape) != expected:
        raise ValueError(f"maps must have shape [B,H,W] = {expected}, got {tuple(maps.shape)}")
    return maps.detach().to(images.device)


def _predict(predict_fn: PredictFn, images: Tensor) -> Tensor:
    with torch.no_grad():
        scores = predict_fn(images)
    if not isinstance(scores, Tensor) or tuple(scores.shape) != (images.shape[0],):
        shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise ValueError(f"predict_fn must return scores of shape [{images.shape[0]}], got {shape}")
    return scores.detach().double()


def _count(fraction: float, num_pixels: int) -> int:
    return math.floor(fraction * num_pixels + 0.5)


def _ranks(maps: Tensor, descending: bool) -> Tensor:
    """Position [B,H*W] of every pixel in its map's stable relevance order."""
    order = maps.flatten(1).argsort(dim=1, descending=descending, stable=True)
    positions = torch.arange(order.shape[1], device=maps.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, positions)


def gaussian_blur(images: Tensor, sigma: float = 5.0, truncate: float = 3.0) -> Tensor:
    """Separable Gaussian blur of images [B,C,H,W] with edge replication; the kernel radius is
    floor(truncate*sigma + 1/2), as in scipy.ndimage.gaussian_filter(mode="nearest")."""
    if sigma <= 0:
        raise ValueError(f"blur sigma must be > 0, got {sigma}")
    radius = math.floor(truncate * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = images.shape[1]
    rows = kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
    cols = kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1)
    blurred = F.conv2d(
        F.pad(images, (0, 0, radius, radius), mode="replicate"), rows, groups=channels
    )
    return F.conv2d(F.pad(blurred, (radius, radius, 0, 0), mode="replicate"), cols, groups=channels)


def _baseline(images: Tensor, baseline: str | Tensor, blur_sigma: float) -> Tensor:
    if isinstance(baseline, Tensor):
        try:
            return baseline.to(images).expand_as(images)
        except RuntimeError as error:
            raise ValueError(
                f"baseline tensor of shape {tuple(baseline.shape)} does not broadcast to the "
                f"images' shape {tuple(images.shape)}"
            ) from error
    if baseline == "blur":
        return gaussian_blur(images, blur_sigma)
    if baseline == "zeros":
        return torch.zeros_like(images)
    raise ValueError(f"baseline must be 'blur', 'zeros' or a tensor, got {baseline!r}")


def deletion_insertion_curve(
    predict_fn: PredictFn,
    images: Tensor,
    maps: Tensor,
    steps: int = 20,
    baseline: str | Tensor = "blur",
    mode: str = "deletion",
    blur_sigma: float = 5.0,
) -> tuple[Tensor, Tensor]:
    """Scores along the RISE deletion or insertion path (Petsiuk et al. 2018).

    At step i = 0..steps the k_i = floor(i*H*W/steps + 1/2) most relevant pixels are replaced by
    the baseline ("deletion") or are the only ones taken from the image, the rest being baseline
    ("insertion"). Returns the fractions k_i/(H*W) [steps+1] and the scores [B, steps+1] (float64).
    """
    maps = _check(images, maps)
    images = images.detach()
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode must be 'deletion' or 'insertion', got {mode!r}")
    num_pixels = maps.shape[1] * maps.shape[2]
    ranks = _ranks(maps, descending=True).view_as(maps)[:, None]
    fill = _baseline(images, baseline, blur_sigma)
    source, target = (images, fill) if mode == "deletion" else (fill, images)
    counts = [_count(step / steps, num_pixels) for step in range(steps + 1)]
    scores = [_predict(predict_fn, torch.where(ranks < k, target, source)) for k in counts]
    fractions = torch.tensor(counts, dtype=torch.float64, device=images.device) / num_pixels
    return fractions, torch.stack(scores, dim=1)


def deletion_insertion_auc(
    predict_fn: PredictFn,
    images: Tensor,
    maps: Tensor,
    steps: int = 20,
    baseline: str | Tensor = "blur",
    mode: str = "deletion",
    blur_sigma: float = 5.0,
) -> Tensor:
    """Area [B] (float64) under `deletion_insertion_curve` by the trapezoid rule over the removed
    or inserted fraction in [0, 1]. Lower deletion / higher insertion AUC = more faithful."""
    fractions, scores = deletion_insertion_curve(
        predict_fn, images, maps, steps, baseline, mode, blur_sigma
    )
    return torch.trapezoid(scores, fractions, dim=1)


def impute_linear(image: Tensor, removed_mask: Tensor) -> Tensor:
    """Fill the removed pixels of `image` [C,H,W] by ROAD's linear imputation (Rong et al. 2022).

    Each removed pixel equals the weighted mean of its in-image 8 neighbours (weight 1/6 for the
    4 direct, 1/12 for the diagonal ones), kept pixels fixed: one sparse linear system per image
    with the channels as right-hand sides, solved by scipy's spsolve in float64.
    """
    if image.dim() != 3:
        raise ValueError(f"image must be [C,H,W], got shape {tuple(image.shape)}")
    if removed_mask.shape != image.shape[1:] or removed_mask.dtype != torch.bool:
        raise ValueError(
            f"removed_mask must be a bool tensor of shape {tuple(image.shape[1:])}, "
            f"got {removed_mask.dtype} {tuple(removed_mask.shape)}"
        )
    removed = removed_mask.cpu().numpy()
    if removed.all():
        raise ValueError("impute_linear needs at least one kept pixel, but every pixel is removed")
    values = image.detach().cpu().double().numpy().copy()  # never write into the input
    channels, height, width = values.shape
    rows, cols = np.nonzero(removed)
    num_unknown = len(rows)
    if num_unknown == 0:
        return image.clone()
    unknown = np.full((height, width), -1)
    unknown[rows, cols] = np.arange(num_unknown)
    entry_rows, entry_cols, entry_values = [unknown[rows, cols]], [unknown[rows, cols]], []
    diagonal = np.zeros(num_unknown)
    rhs = np.zeros((num_unknown, channels))
    for (dy, dx), weight in NEIGHBOUR_WEIGHTS:
        ny, nx = rows + dy, cols + dx
        inside = (ny >= 0) & (ny < height) & (nx >= 0) & (nx < width)
        diagonal += weight * inside
        own, ny, nx = unknown[rows[inside], cols[inside]], ny[inside], nx[inside]
        neighbour = unknown[ny, nx]
        free = neighbour >= 0
        entry_rows.append(own[free])
        entry_cols.append(neighbour[free])
        entry_values.append(np.full(int(free.sum()), -weight))
        np.add.at(rhs, own[~free], weight * values[:, ny[~free], nx[~free]].T)
    system = scipy.sparse.csc_matrix(
        (
            np.concatenate([diagonal, *entry_values]),
            (np.concatenate(entry_rows), np.concatenate(entry_cols)),
        ),
        shape=(num_unknown, num_unknown),
    )
    solution = scipy.sparse.linalg.spsolve(system, rhs).reshape(num_unknown, channels)
    values[:, rows, cols] = solution.T
    return torch.from_numpy(values).to(image)


def road(
    predict_fn: PredictFn,
    images: Tensor,
    maps: Tensor,
    fractions: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
    order: str = "morf",
    noise_std: float = 0.01,
    generator: torch.Generator | None = None,
) -> Tensor:
    """ROAD scores [B, len(fractions)] (float64) (Rong et al. 2022).

    For each fraction the most ("morf") or least ("lerf") relevant pixels are removed and filled
    by `impute_linear`, plus Gaussian noise of std `noise_std` on the filled pixels only. Noise
    [B,C,H,W] is drawn per fraction from `generator`, by default a CPU generator seeded with 0
    (repeated calls agree). A faithful map gives low MoRF and high LeRF scores.
    """
    maps = _check(images, maps)
    if order not in ("morf", "lerf"):
        raise ValueError(f"order must be 'morf' or 'lerf', got {order!r}")
    if noise_std < 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std}")
    for fraction in fractions:
        if not 0 <= fraction < 1:
            raise ValueError(f"ROAD fractions must lie in [0, 1), got {fraction}")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    ranks = _ranks(maps, descending=order == "morf").view_as(maps)
    num_pixels = maps.shape[1] * maps.shape[2]
    scores = []
    for fraction in fractions:
        removed = ranks < _count(fraction, num_pixels)
        imputed = torch.stack([impute_linear(image, mask) for image, mask in zip(images, removed)])
        noise = torch.randn(imputed.shape, generator=generator, device=generator.device)
        noisy = imputed + noise_std * noise.to(imputed) * removed[:, None]
        scores.append(_predict(predict_fn, noisy))
    return torch.stack(scores, dim=1)


def average_drop_increase(predict_fn: PredictFn, images: Tensor, maps: Tensor) -> dict:
    """Grad-CAM++'s Average Drop and Increase in Confidence (Chattopadhay et al. 2018), in %.

    Y is the score of an image and O that of the image multiplied by its `min_max_normalize`d map
    (over all channels). Returns `average_drop` = mean(max(0, Y - O) / Y) * 100 and
    `increase_in_confidence` = mean(O > Y) * 100 as floats, plus their per-image terms `drop`
    [B] and `increase` [B] (float64, in %) for pooling over batches. Scores must be positive.
    """
    maps = _check(images, maps)
    full = _predict(predict_fn, images)
    if (full <= 0).any():
        raise ValueError(
            f"average drop needs positive scores on the unmasked images, got {full.tolist()}"
        )
    masked = _predict(predict_fn, images * min_max_normalize(maps)[:, None].to(images))
    drop = (full - masked).clamp(min=0) / full * 100
    increase = (masked > full).double() * 100
    return {
        "average_drop": drop.mean().item(),
        "increase_in_confidence": increase.mean().item(),
        "drop": drop,
        "increase": increase,
    }
