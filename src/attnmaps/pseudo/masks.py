"""Pseudo-mask generation from per-class attention maps.

Pipeline (all batched, on the input tensors' device): select classes per image, gather the maps
of the selected classes only, upsample them to image size, min-max normalize each map, binarise
and merge them into one label map, and (datasets without background) give unclaimed pixels the
label of the nearest claimed pixel.

Output labels follow the project conventions: with background, class ``c`` becomes ``c + 1`` and
unclaimed pixels become ``0``; without background, class ``c`` stays ``c``.

Example:
    >>> maps = torch.rand(2, 3, 14, 14)
    >>> probs = torch.tensor([[0.9, 0.1, 0.6], [0.2, 0.3, 0.1]])
    >>> make_pseudo_masks(maps, probs, (224, 224), has_background=True).shape
    torch.Size([2, 224, 224])
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path, PurePosixPath

import torch
import torch.nn.functional as F
from torch import Tensor

from ..conventions import min_max_normalize
from .pamr import DILATIONS, pamr

UNASSIGNED = -1


def _check_ndim(name: str, tensor: Tensor, ndim: int, layout: str) -> None:
    if tensor.dim() != ndim:
        raise ValueError(f"{name} must have shape {layout}, got {tuple(tensor.shape)}")


def upsample_maps(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinearly resize ``maps`` [B,K,h,w] to ``size`` (H, W), ``align_corners=False``.

    Maps already at ``size`` are returned unchanged.
    """
    _check_ndim("maps", maps, 4, "[B,K,h,w]")
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)


def class_scores(images: Tensor, maps: Tensor, selected: Tensor, refine_iterations: int,
                 dilations: Sequence[int] = DILATIONS) -> Tensor:
    """The min-max normalized image-size class scores [B,K,H,W] of ``maps`` [B,K,h,w]: upsampled
    to the size of ``images`` and refined by PAMR (at ``dilations``) for the ``selected``
    classes, as :func:`~attnmaps.engine.evaluate.evaluate` scores them before binarising."""
    full = upsample_maps(maps, tuple(images.shape[-2:]))
    if refine_iterations:
        full = pamr(images, full, refine_iterations, dilations, selected=selected)
    return min_max_normalize(full)


MERGE_RULES = ("probability", "map", "weighted")


def merge_masks(
    maps: Tensor, probs: Tensor, selected: Tensor, threshold: float, has_background: bool,
    rule: str = "probability",
) -> Tensor:
    """Merge per-class maps [B,K,H,W] (values in [0, 1]) into one int64 label map [B,H,W].

    A selected class claims every pixel where its map is ``>= threshold``. Where several classes
    claim a pixel, ``rule="probability"`` (the paper's) gives it to the one with the highest
    ``probs`` (the same result as painting classes in order of increasing probability);
    ``rule="map"`` gives it to the one whose map is highest at that pixel (the per-pixel argmax
    of CAM methods); ``rule="weighted"`` to the one with the highest map x probability (a
    doubtful class keeps only the pixels where its map clearly wins). Ties are won by the lower
    class index.
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
    if rule not in MERGE_RULES:
        raise ValueError(f"merge rule {rule!r} is not one of {MERGE_RULES} (pseudo.merge)")
    claimed = (maps >= threshold) & selected.bool()[:, :, None, None]
    # float32 keys: no ties made by bf16 rounding; only the rule's own key is computed
    weights = probs.float()[:, :, None, None]
    if rule == "probability":
        key = weights
    elif rule == "map":
        key = maps.float()
    else:
        key = maps.float() * weights
    scores = torch.where(claimed, key, torch.tensor(float("-inf"), device=maps.device))
    # max(dim).indices: the first maximum, like argmax, but far faster on CPU over a short dim
    winner = scores.max(dim=1).indices
    any_claimed = claimed.any(dim=1)
    if has_background:
        return torch.where(any_claimed, winner + 1, torch.zeros_like(winner))
    return torch.where(any_claimed, winner, torch.full_like(winner, UNASSIGNED))


def _nearest_along(keys: Tensor, dim: int, step: int) -> Tensor:
    """``min_j keys[..., j, ...] + step * |i - j|`` along ``dim`` (-1 or -2), for every ``i``.

    Two running minima (forward, and backward on the flipped tensor) give it exactly, with no
    loop over ``j``: ``step * i + cummin_{j <= i}(keys_j - step * j)`` and its mirror image.
    """
    length = keys.shape[dim]
    ramp = (torch.arange(length, device=keys.device) * step).view(length, *[1] * (-dim - 1))
    forward = (keys - ramp).cummin(dim).values + ramp
    backward = (keys + ramp).flip(dim).cummin(dim).values.flip(dim) - ramp
    return torch.minimum(forward, backward)


def fill_unassigned(labels: Tensor, num_labels: int) -> Tensor:
    """Give every ``-1`` pixel of ``labels`` [B,H,W] the label of its nearest assigned pixel.

    Nearest in city-block distance ``|dy| + |dx|``, i.e. the assigned pixel that a 4-neighbour
    breadth-first search from all assigned pixels reaches the pixel from first; among equally
    near assigned pixels the smallest label wins. Images are independent; an image with no
    assigned pixel at all becomes label ``0``. Assigned pixels are kept. The result has the
    dtype and device of ``labels``.

    Exact, batched and independent of ``num_labels`` in cost: each pixel's key
    ``distance * num_labels + label`` is minimised by running minima along the rows, then
    along the columns (the city-block distance is separable), about 20 tensor operations.

    Example:
        >>> fill_unassigned(torch.tensor([[[0, -1, 1, -1, -1]]]), num_labels=2)
        tensor([[[0, 0, 1, 1, 1]]])
    """
    _check_ndim("labels", labels, 3, "[B,H,W]")
    if num_labels < 1:
        raise ValueError(f"num_labels must be >= 1, got {num_labels}")
    if labels.numel() and (labels.min() < UNASSIGNED or labels.max() >= num_labels):
        raise ValueError(
            f"labels must lie in [-1, {num_labels - 1}] (num_labels={num_labels}), got values in "
            f"[{int(labels.min())}, {int(labels.max())}]"
        )
    unassigned = labels == UNASSIGNED
    if not unassigned.any():
        return labels.clone()
    # Every real key is below (H + W - 1) * num_labels; keys from no assigned pixel stay above.
    unreachable = (sum(labels.shape[-2:]) - 1) * num_labels
    keys = torch.where(unassigned, unreachable, labels.long())
    keys = _nearest_along(_nearest_along(keys, -1, num_labels), -2, num_labels)
    filled = torch.where(keys < unreachable, keys % num_labels, 0)
    return filled.to(labels.dtype)


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


def selected_indices(selected: Tensor) -> tuple[Tensor, Tensor]:
    """Per-image list of the selected classes of a boolean [B,K] selection, padded to the most
    selected by any image: ``(classes [B,M] int64, valid [B,M] bool)``.

    Each row lists its selected classes in increasing order, then padding (class ``0``,
    ``valid`` False).

    Example:
        >>> classes, valid = selected_indices(torch.tensor([[False, True, True], [True, False, False]]))
        >>> classes.tolist(), valid.tolist()
        ([[1, 2], [0, 0]], [[True, True], [True, False]])
    """
    _check_ndim("selected", selected, 2, "[B,K]")
    selected = selected.bool()
    width = int(selected.sum(dim=1).max()) if len(selected) else min(1, selected.shape[1])
    classes = torch.argsort((~selected).to(torch.uint8), dim=1, stable=True)[:, :width]
    valid = selected.gather(1, classes)
    return torch.where(valid, classes, torch.zeros_like(classes)), valid


def make_pseudo_masks(
    maps: Tensor,
    probs: Tensor,
    image_size: tuple[int, int],
    *,
    threshold: float = 0.3,
    has_background: bool,
    labels: Tensor | None = None,
    prob_threshold: float = 0.5,
    merge: str = "probability",
) -> Tensor:
    """Turn class attention maps [B,K,h,w] into int64 pseudo-masks [B,H,W].

    Classes are selected by :func:`select_classes` (ground-truth ``labels`` for "seeds"
    scoring, else predicted ``probs``); only the selected classes' maps are gathered (see
    :func:`selected_indices`), upsampled to ``image_size`` (skipped when they are already full
    resolution), min-max normalized per map and merged by :func:`merge_masks`; without
    background, unclaimed pixels are then completed by :func:`fill_unassigned`. The result equals
    merging all K maps with the unselected ones masked out, at the cost of the selected ones
    only. The default ``threshold`` of 0.3 is a starting point only: the value used in practice
    is picked by a sweep on validation pseudo-mask mIoU and passed in explicitly.
    """
    _check_ndim("maps", maps, 4, "[B,K,h,w]")
    classes, valid = selected_indices(select_classes(probs, labels, prob_threshold))
    picked = maps.gather(1, classes[:, :, None, None].expand(-1, -1, *maps.shape[-2:]))
    full = min_max_normalize(upsample_maps(picked, image_size))
    slots = merge_masks(full, probs.gather(1, classes), valid, threshold, has_background=False,
                        rule=merge)
    claimed = slots != UNASSIGNED
    winners = classes.gather(1, slots.clamp(min=0).flatten(1)).view_as(slots)
    merged = torch.where(claimed, winners, torch.full_like(winners, UNASSIGNED))
    if has_background:
        return merged + 1
    return fill_unassigned(merged, num_labels=maps.shape[1])


def mask_path(out_dir: Path, image_id: str) -> Path:
    """``out_dir/<image_id>.png``; an id may name subfolders (``2008/000123``) but never leave
    ``out_dir`` (absolute ids, ``..`` parts and empty ids are refused), so no mask can overwrite
    a file outside it.

    >>> mask_path(Path("out"), "2008/000123").as_posix()
    'out/2008/000123.png'
    """
    parts = PurePosixPath(image_id.replace("\\", "/")).parts
    if not image_id or image_id.startswith(("/", "\\")) or ":" in image_id or any(
            part in ("..", ".") for part in parts):
        raise ValueError(f"sample id {image_id!r} cannot name a file inside the output folder "
                         f"{out_dir}; ids must be relative paths without '..'")
    return out_dir.joinpath(*parts).with_name(f"{parts[-1]}.png")


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
    paths = [mask_path(out_dir, image_id) for image_id in ids]
    out_dir.mkdir(parents=True, exist_ok=True)
    arrays = masks.to(device="cpu", dtype=torch.uint8).numpy()
    for path, array in zip(paths, arrays):
        write_mask(path, array)
    return paths
