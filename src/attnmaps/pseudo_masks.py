"""Pseudo-mask generation from per-class attention maps.

Pipeline (all batched, on the input tensors' device): select classes per image, upsample the
maps to image size, min-max normalise each map, binarise and merge them into one label map, and
(datasets without background) fill unclaimed pixels from their neighbours.

Output labels follow the project conventions: with background, class ``c`` becomes ``c + 1`` and
unclaimed pixels become ``0``; without background, class ``c`` stays ``c``.

Example:
    >>> maps = torch.rand(2, 3, 14, 14)
    >>> probs = torch.tensor([[0.9, 0.1, 0.6], [0.2, 0.3, 0.1]])
    >>> make_pseudo_masks(maps, probs, (224, 224), has_background=True).shape
    torch.Size([2, 224, 224])
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

UNASSIGNED = -1


def _check_ndim(name: str, tensor: Tensor, ndim: int, layout: str) -> None:
    if tensor.dim() != ndim:
        raise ValueError(f"{name} must have shape {layout}, got {tuple(tensor.shape)}")


def normalize_maps(maps: Tensor) -> Tensor:
    """Min-max normalise each map of ``maps`` [B,K,h,w] to [0, 1]; a constant map becomes zeros."""
    _check_ndim("maps", maps, 4, "[B,K,h,w]")
    low = maps.amin(dim=(-2, -1), keepdim=True)
    span = maps.amax(dim=(-2, -1), keepdim=True) - low
    safe_span = torch.where(span > 0, span, torch.ones_like(span))
    return torch.where(span > 0, (maps - low) / safe_span, torch.zeros_like(maps))


def upsample_maps(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinearly resize ``maps`` [B,K,h,w] to ``size`` (H, W), ``align_corners=False``.

    Maps already at ``size`` are returned unchanged.
    """
    _check_ndim("maps", maps, 4, "[B,K,h,w]")
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)


def merge_masks(
    maps: Tensor, probs: Tensor, selected: Tensor, threshold: float, has_background: bool
) -> Tensor:
    """Merge per-class maps [B,K,H,W] (values in [0, 1]) into one int64 label map [B,H,W].

    A selected class claims every pixel where its map is ``>= threshold``. Where several classes
    claim a pixel, the one with the highest ``probs`` wins (the same result as painting classes
    in order of increasing probability); equal probabilities are won by the lower class index.
    With background, class ``c`` is labelled ``c + 1`` and unclaimed pixels ``0``; without
    background, class ``c`` is labelled ``c`` and unclaimed pixels ``-1`` (see
    :func:`fill_unassigned`).
    """
    _check_ndim("maps", maps, 4, "[B,K,H,W]")
    batch, classes = maps.shape[:2]
    for name, tensor in (("probs", probs), ("selected", selected)):
        if tuple(tensor.shape) != (batch, classes):
            raise ValueError(
                f"{name} must have shape [B,K] = {(batch, classes)}, got {tuple(tensor.shape)}"
            )
    claimed = (maps >= threshold) & selected.bool()[:, :, None, None]
    scores = torch.where(
        claimed,
        probs.to(maps.dtype)[:, :, None, None],
        torch.tensor(float("-inf"), dtype=maps.dtype, device=maps.device),
    )
    winner = scores.argmax(dim=1)
    any_claimed = claimed.any(dim=1)
    if has_background:
        return torch.where(any_claimed, winner + 1, torch.zeros_like(winner))
    return torch.where(any_claimed, winner, torch.full_like(winner, UNASSIGNED))


def fill_unassigned(labels: Tensor, num_labels: int, max_iters: int | None = None) -> Tensor:
    """Fill ``-1`` pixels of ``labels`` [B,H,W] by an iterated 3x3 majority filter.

    Each iteration, every unassigned pixel with at least one assigned pixel in its 3x3
    neighbourhood takes the most common label among those neighbours (ties go to the lowest
    label); all pixels are updated from the previous iteration's labels. Iteration stops when
    nothing is unassigned, nothing changed, or ``max_iters`` iterations ran. Pixels still
    unassigned then (e.g. every pixel of an image where nothing was assigned) get label ``0``.

    Counting uses a one-hot tensor [B, num_labels, H, W] in float32, i.e. ``4 * B * L * H * W``
    bytes per iteration (about 160 MB for B=1, L=151, 512x512).

    Example:
        >>> fill_unassigned(torch.tensor([[[0, -1, 1, -1]]]), num_labels=2)
        tensor([[[0, 0, 1, 1]]])
    """
    _check_ndim("labels", labels, 3, "[B,H,W]")
    if num_labels < 1:
        raise ValueError(f"num_labels must be >= 1, got {num_labels}")
    if labels.numel() and (labels.min() < UNASSIGNED or labels.max() >= num_labels):
        raise ValueError(
            f"labels must lie in [-1, {num_labels - 1}] (num_labels={num_labels}), got values in "
            f"[{int(labels.min())}, {int(labels.max())}]"
        )
    labels = labels.long()
    iteration = 0
    while max_iters is None or iteration < max_iters:
        unassigned = labels == UNASSIGNED
        if not unassigned.any():
            break
        one_hot = F.one_hot(labels.clamp(min=0), num_labels).permute(0, 3, 1, 2).float()
        one_hot = one_hot * (~unassigned).unsqueeze(1)
        counts = F.avg_pool2d(one_hot, 3, stride=1, padding=1, divisor_override=1)
        reachable = unassigned & (counts.amax(dim=1) > 0)
        if not reachable.any():
            break
        labels = torch.where(reachable, counts.argmax(dim=1), labels)
        iteration += 1
    return labels.clamp(min=0)


def select_classes(
    probs: Tensor, labels: Tensor | None = None, prob_threshold: float = 0.5
) -> Tensor:
    """Boolean [B,K] selection: ``labels > 0.5`` if ``labels`` is given, else
    ``probs >= prob_threshold``. An image with no selected class gets its highest-probability
    class (first one on ties) so that every pseudo-mask contains at least one class.
    """
    _check_ndim("probs", probs, 2, "[B,K]")
    if labels is not None and labels.shape != probs.shape:
        raise ValueError(
            f"labels must have the shape of probs {tuple(probs.shape)}, got {tuple(labels.shape)}"
        )
    selected = labels > 0.5 if labels is not None else probs >= prob_threshold
    fallback = F.one_hot(probs.argmax(dim=1), probs.shape[1]).bool()
    return torch.where(selected.any(dim=1, keepdim=True), selected, fallback)


def make_pseudo_masks(
    maps: Tensor,
    probs: Tensor,
    image_size: tuple[int, int],
    *,
    threshold: float = 0.3,
    has_background: bool,
    labels: Tensor | None = None,
    prob_threshold: float = 0.5,
) -> Tensor:
    """Turn class attention maps [B,K,h,w] into int64 pseudo-masks [B,H,W].

    Classes are selected by :func:`select_classes` (ground-truth ``labels`` for "seeds"
    scoring, else predicted ``probs``); maps are upsampled to ``image_size`` (skipped when they
    are already full resolution), min-max normalised per map, merged by :func:`merge_masks` and,
    without background, completed by :func:`fill_unassigned`. The default ``threshold`` of 0.3 is
    a starting point only: the value used in practice is picked by a sweep on validation
    pseudo-mask mIoU and passed in explicitly.
    """
    _check_ndim("maps", maps, 4, "[B,K,h,w]")
    selected = select_classes(probs, labels, prob_threshold)
    full = normalize_maps(upsample_maps(maps, image_size))
    merged = merge_masks(full, probs, selected, threshold, has_background)
    if has_background:
        return merged
    return fill_unassigned(merged, num_labels=maps.shape[1])


def save_pseudo_masks(out_dir: str | Path, ids: list[str], masks: Tensor) -> list[Path]:
    """Write each mask of ``masks`` [B,H,W] to ``out_dir/<id>.png`` (indexed PNG, VOC palette).

    Returns the written paths. Mask values must lie in [0, 255].
    """
    from attnmaps.data.image_io import write_mask

    _check_ndim("masks", masks, 3, "[B,H,W]")
    if len(ids) != masks.shape[0]:
        raise ValueError(f"got {len(ids)} ids for {masks.shape[0]} masks; expected one id per mask")
    if masks.numel() and (masks.min() < 0 or masks.max() > 255):
        raise ValueError(
            f"mask values must lie in [0, 255] to be saved as uint8 PNG, got values in "
            f"[{int(masks.min())}, {int(masks.max())}]"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    arrays = masks.to(device="cpu", dtype=torch.uint8).numpy()
    paths = [out_dir / f"{image_id}.png" for image_id in ids]
    for path, array in zip(paths, arrays):
        write_mask(path, array)
    return paths
