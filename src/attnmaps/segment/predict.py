"""Inference on images of any size and aspect, and ``attnmaps predict`` over image files.

:func:`infer_logits` runs a segmentation network (``forward(images) -> logits`` at input size,
attribute ``size_multiple``) in one of three ways (``segment.inference``):

* ``slide`` (default): windows of ``segment.window`` (the training size) with ``segment.overlap``
  pixels of overlap, the last window of a row or column flush with the border; each window's
  logits count except for the ``overlap // 2`` pixels next to an edge that another window
  covers, and pixels covered by several windows average them. Along a side shorter than the
  window, the window shrinks to the image (zero-padded to the network's ``size_multiple``). A
  network whose receptive field reaches no further than ``overlap // 2`` pixels gives exactly
  its whole-image logits.
* ``whole``: the image at its own size, zero-padded at the bottom and right to a multiple of
  ``size_multiple`` (the ViT resamples its position embeddings to the grid).
* ``resize``: the image resized (bilinear) to the window, the logits resized back.

Example:
    >>> import torch
    >>> net = torch.nn.Conv2d(3, 2, 3, padding=1)
    >>> net.size_multiple = 1
    >>> images = torch.randn(1, 3, 20, 27)
    >>> torch.allclose(sliding_window_logits(net, images, (8, 8), 4), net(images), atol=1e-6)
    True
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import SegmentConfig
from ..pseudo.pamr import pamr


def tile_starts(length: int, size: int, stride: int) -> list[int]:
    """Starts of windows of ``size`` every ``stride`` pixels covering ``length`` (>= ``size``),
    the last one flush with the end.

    Example:
        >>> tile_starts(20, 8, 4)
        [0, 4, 8, 12]
    """
    starts = list(range(0, length - size, stride))
    return starts + [length - size]


def pad_to(images: Tensor, height: int, width: int) -> Tensor:
    """``images`` [B,C,H,W] zero-padded at the bottom and right to at least ``height`` x
    ``width``."""
    return F.pad(images, (0, max(0, width - images.shape[-1]), 0, max(0, height - images.shape[-2])))


def _check_window(window: Sequence[int], overlap: int, multiple: int) -> tuple[int, int]:
    if len(window) != 2 or any(w % multiple or w < 1 for w in window):
        raise ValueError(f"segment.window={list(window)} must be (H, W), each a positive "
                         f"multiple of the network's input multiple {multiple}")
    if not 0 <= overlap < min(window):
        raise ValueError(f"segment.overlap={overlap} must be in [0, {min(window)}) for "
                         f"segment.window={list(window)}")
    return int(window[0]), int(window[1])


def sliding_window_logits(model: nn.Module, images: Tensor, window: Sequence[int],
                          overlap: int) -> Tensor:
    """Logits [B,L,H,W] of ``images`` [B,C,H,W] from overlapping windows (see the module doc)."""
    height, width = images.shape[-2:]
    multiple = getattr(model, "size_multiple", 1)
    win_h, win_w = _check_window(window, overlap, multiple)
    win_h, win_w = min(win_h, round_up(height, multiple)), min(win_w, round_up(width, multiple))
    overlap = min(overlap, win_h - 1, win_w - 1)
    padded = pad_to(images, win_h, win_w)
    full_h, full_w = padded.shape[-2:]
    margin = overlap // 2
    total = counts = None
    for top in tile_starts(full_h, win_h, win_h - overlap):
        for left in tile_starts(full_w, win_w, win_w - overlap):
            logits = model(padded[..., top:top + win_h, left:left + win_w])
            if total is None:
                total = logits.new_zeros(*logits.shape[:2], full_h, full_w)
                counts = logits.new_zeros(full_h, full_w)
            keep_top = margin if top > 0 else 0
            keep_left = margin if left > 0 else 0
            keep_bottom = win_h - (margin if top + win_h < full_h else 0)
            keep_right = win_w - (margin if left + win_w < full_w else 0)
            rows = slice(top + keep_top, top + keep_bottom)
            cols = slice(left + keep_left, left + keep_right)
            total[..., rows, cols] += logits[..., keep_top:keep_bottom, keep_left:keep_right]
            counts[rows, cols] += 1
    return (total / counts)[..., :height, :width]


def round_up(length: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is at least ``length``."""
    return -(-length // multiple) * multiple


def whole_logits(model: nn.Module, images: Tensor) -> Tensor:
    """Logits of ``images`` at their own size, padded to the network's ``size_multiple``."""
    multiple = getattr(model, "size_multiple", 1)
    height, width = images.shape[-2:]
    padded = pad_to(images, round_up(height, multiple), round_up(width, multiple))
    return model(padded)[..., :height, :width]


def resize_logits(model: nn.Module, images: Tensor, window: Sequence[int]) -> Tensor:
    """Logits of ``images`` resized to ``window``, resized back to the input size."""
    size = _check_window(window, 0, getattr(model, "size_multiple", 1))
    logits = model(F.interpolate(images, size=size, mode="bilinear", align_corners=False))
    return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


def infer_probs(model: nn.Module, images: Tensor, seg: SegmentConfig) -> Tensor:
    """Class probabilities [B,L,H,W]: the softmax of :func:`infer_logits`, then (with
    ``seg.refine_iterations`` > 0) PAMR on ``images`` (:func:`refine_probs`) — the refinement
    the seeds had, as DeepLab's dense CRF refines its output."""
    probs = infer_logits(model, images, seg).softmax(1)
    return refine_probs(images, probs, seg.refine_iterations or 0)


def refine_probs(images: Tensor, probs: Tensor, iterations: int) -> Tensor:
    """``probs`` [B,L,H,W] after ``iterations`` PAMR iterations on ``images`` (none: as given).

    Only the labels that win at least one pixel of an image are refined, the others set to 0 (as
    stage 1 refines only the selected classes' maps): the cost and memory follow the labels in
    the image, not all L (150 on ADE20K)."""
    if not iterations:
        return probs
    winners = torch.zeros(probs.shape[:2], dtype=torch.bool, device=probs.device)
    winners.scatter_(1, probs.argmax(1).flatten(1), True)
    return pamr(images, probs * winners[..., None, None], iterations, selected=winners)


def infer_logits(model: nn.Module, images: Tensor, seg: SegmentConfig) -> Tensor:
    """Logits [B,L,H,W] of ``images`` [B,C,H,W] as ``seg.inference`` says (module doc)."""
    if seg.inference == "whole":
        return whole_logits(model, images)
    if seg.window is None:
        raise ValueError(f"segment.inference={seg.inference} needs segment.window (H, W)")
    if seg.inference == "resize":
        return resize_logits(model, images, seg.window)
    return sliding_window_logits(model, images, seg.window, seg.overlap)
