"""Pixel-adaptive mask refinement (PAMR; Araslanov & Roth, CVPR 2020).

Attention peaks on the most discriminative parts of an object (corners, tips). PAMR spreads
each class map to neighbouring pixels of similar appearance: every pixel repeatedly takes the
affinity-weighted mean of its 8 neighbours at several dilations, with affinities from the image
itself, ``softmax_p(-mean_c |x_p - x| / (0.1 * std_p(x_p)))``. Single-stage WSSS methods (AFA,
ToCo) refine their maps the same way. Batched, on the tensors' device.

Example:
    >>> maps = torch.zeros(1, 2, 8, 8); maps[0, 0, 2, 2] = 1.0
    >>> pamr(torch.rand(1, 3, 8, 8), maps, iterations=3).shape
    torch.Size([1, 2, 8, 8])
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

DILATIONS = (1, 2, 4, 8, 12, 24)


def neighbour_offsets(dilations: Sequence[int]) -> list[tuple[int, int]]:
    """The (dy, dx) offsets of the 8 neighbours of a pixel at each dilation, in order."""
    return [(dy, dx) for d in dilations for dy in (-d, 0, d) for dx in (-d, 0, d) if dy or dx]


def neighbour_views(x: Tensor, dilations: Sequence[int]) -> Iterator[Tensor]:
    """Each neighbour of every pixel, one [..., H, W] view per offset of
    :func:`neighbour_offsets`; borders replicate the edge pixels.

    Views of one padded copy: the refinement sums over them one at a time instead of stacking
    all 8 x len(dilations) shifted copies (several times faster on CPU)."""
    height, width = x.shape[-2:]
    pad = max(dilations)
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    for dy, dx in neighbour_offsets(dilations):
        yield padded[..., pad + dy:pad + dy + height, pad + dx:pad + dx + width]


def pamr(images: Tensor, maps: Tensor, iterations: int = 20,
         dilations: Sequence[int] = DILATIONS, selected: Tensor | None = None) -> Tensor:
    """Refine ``maps`` [B,K,H,W] with the affinities of ``images`` [B,C,H,W] (same H, W).

    Every map is refined on its own, so ``selected`` (bool [B,K]) refines only the selected
    maps, at their cost alone (many classes, few present), and returns the others unchanged.
    """
    if images.shape[0] != maps.shape[0] or images.shape[-2:] != maps.shape[-2:]:
        raise ValueError(f"images {tuple(images.shape)} and maps {tuple(maps.shape)} must share "
                         "batch size and height x width")
    affinity = pixel_affinity(images.to(maps.dtype), dilations)
    if selected is None:
        return _propagate(maps, affinity, iterations, dilations)
    if selected.shape != maps.shape[:2]:
        raise ValueError(f"selected {tuple(selected.shape)} must be [B,K] = "
                         f"{tuple(maps.shape[:2])}, one flag per map")
    selected = selected.bool()
    image_of_map = selected.nonzero()[:, 0]
    refined = maps.clone()
    refined[selected] = _propagate(maps[selected].unsqueeze(1), affinity[image_of_map],
                                   iterations, dilations).squeeze(1)
    return refined


def pixel_affinity(images: Tensor, dilations: Sequence[int]) -> Tensor:
    """Affinity of every pixel to its neighbours, [B,1,8*len(dilations),H,W], summing to 1."""
    count = 8 * len(dilations)
    mean = sum(neighbour_views(images, dilations)) / count
    squares = sum((view - mean).square() for view in neighbour_views(images, dilations))
    scale = 1.0 / (1e-8 + 0.1 * (squares / (count - 1)).sqrt())  # std over the neighbours
    logits = torch.stack([-((view - images).abs() * scale).mean(dim=1)
                          for view in neighbour_views(images, dilations)], dim=1)
    return logits.softmax(dim=1).unsqueeze(1)


def _propagate(maps: Tensor, affinity: Tensor, iterations: int,
               dilations: Sequence[int]) -> Tensor:
    for _ in range(iterations):
        refined = torch.zeros_like(maps)
        for index, view in enumerate(neighbour_views(maps, dilations)):
            refined.addcmul_(view, affinity[:, :, index])
        maps = refined
    return maps
