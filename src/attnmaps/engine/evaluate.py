"""Evaluation of a ClassTokenViT: classification, pseudo-mask mIoU and attention diagnostics."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from ..config import PseudoMaskConfig
from ..pseudo.crf import crf_pseudo_masks, images_to_uint8_range
from ..metrics.classification import MultiLabelMetric, head_sparsity
from ..metrics.segmentation import SegmentationMetric
from ..models.vit import ClassTokenViT
from ..pseudo.masks import make_pseudo_masks, normalize_maps, select_classes, upsample_maps
from ..pseudo.pamr import pamr
from ..pseudo.tta import tta_predict
from .acceleration import autocast
from .distributed import is_distributed, shard_indices

BatchCallback = Callable[[dict, Tensor, Tensor, Tensor], None]


def class_map_correlation(maps: Tensor) -> Tensor:
    """Mean Pearson correlation between the K class maps of each image, over all pairs [B].

    Near 1 means the class tokens collapsed onto one class-blind map.
    """
    flat = maps.flatten(2).double()
    flat = flat - flat.mean(-1, keepdim=True)
    flat = flat / flat.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    corr = flat @ flat.transpose(1, 2)
    k = corr.shape[-1]
    return (corr.sum((1, 2)) - corr.diagonal(dim1=1, dim2=2).sum(-1)) / (k * (k - 1))


@torch.no_grad()
def evaluate(model: ClassTokenViT, dataset: Dataset, settings: PseudoMaskConfig,
             attn_blocks: str, device: torch.device, batch_size: int = 64,
             has_background: bool = True, sweep: Sequence[float] = (),
             on_batch: BatchCallback | None = None, precision: str = "fp32") -> dict:
    """Score ``model`` on ``dataset``.

    Returns classifier metrics (``map``, ``exact_match``, ``label_accuracy``, ``f1``), pseudo-mask
    metrics from predicted labels (``miou``, ``pixel_acc``, ``mean_acc``, ``per_class_iou``,
    ``confusion`` [L,L] with rows = ground truth, and ``class_names`` when the dataset names its
    L mask values), from the true image labels (``miou_true_labels``), on images with two or
    more classes (``miou_multi_class``), the mean class-map correlation and the head sparsity
    (% of heads closed). ``sweep`` lists extra binarisation thresholds, scored into
    ``miou_by_threshold`` (from the true labels when ``settings.use_true_labels`` is set, else
    from predicted ones).

    Settings: ``tta_scales`` / ``tta_flip`` average the maps and probabilities over scales and
    mirror images (:func:`~attnmaps.pseudo.tta.tta_predict`); ``refine_iterations`` refines the
    upsampled maps by :func:`pamr`; ``crf`` refines every pseudo mask (swept ones too) by
    :func:`~attnmaps.pseudo.crf.crf_pseudo_masks`, on the images de-normalised with the dataset's
    ``mean`` / ``std`` (needs the ``pydensecrf2`` extra; meant for 8-bit images).
    ``on_batch(batch, probs, maps, pseudo_masks)`` sees every batch, e.g. to save masks; its masks
    come from the true labels when ``settings.use_true_labels`` is set, else from predictions.
    ``precision="bf16"`` runs the model under bf16 autocast (maps and scores are float32 after).

    Inside a torch.distributed process group every process must call this: each scores the
    samples ``rank, rank + W, ...`` (``on_batch`` sees only those) and the confusion matrices,
    the classifier's samples and the correlation sums are reduced, so every process returns
    the single-process result.
    """
    model.eval()
    k = model.num_classes
    num_labels = k + 1 if has_background else k
    blocks = model.resolve_attn_blocks(attn_blocks)
    classifier = MultiLabelMetric(k, threshold=settings.prob_threshold)
    seg_pred, seg_true, seg_multi = (SegmentationMetric(num_labels, device=device)
                                     for _ in range(3))
    swept = {t: SegmentationMetric(num_labels, device=device) for t in sweep}
    corr = torch.zeros(2, dtype=torch.float64, device=device)  # sum, count
    names = getattr(_unwrap(dataset), "class_names", None)
    pixel_stats = _pixel_stats(dataset) if settings.crf else None
    if is_distributed():
        dataset = Subset(dataset, shard_indices(len(dataset)))
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        images, labels = batch["image"].to(device), batch["labels"].to(device)
        masks = batch["mask"].to(device)
        with autocast(precision, device):
            logits, maps = tta_predict(model, images, settings.tta_scales, settings.tta_flip,
                                       blocks)
        probs = logits.float().sigmoid()
        maps = maps.float()
        size = tuple(images.shape[-2:])
        full = upsample_maps(maps, size)
        if settings.refine_iterations:
            needed = (select_classes(probs, None, settings.prob_threshold)
                      | select_classes(probs, labels, settings.prob_threshold))
            full = pamr(images, full, settings.refine_iterations, selected=needed)
        colours = None if pixel_stats is None else images_to_uint8_range(images, *pixel_stats)
        kwargs = {"settings": settings, "has_background": has_background, "colours": colours}
        pred = _pseudo_masks(full, probs, settings.threshold, None, **kwargs)
        true = _pseudo_masks(full, probs, settings.threshold, labels, **kwargs)
        for t, metric in swept.items():
            swept_labels = labels if settings.use_true_labels else None
            metric.update(_pseudo_masks(full, probs, t, swept_labels, **kwargs), masks)
        classifier.update(probs.cpu(), labels.cpu())
        seg_pred.update(pred, masks)
        seg_true.update(true, masks)
        multi = labels.sum(1) >= 2
        if multi.any():
            seg_multi.update(pred[multi], masks[multi])
        if k > 1:
            per_image = class_map_correlation(maps)
            corr += torch.stack([per_image.sum(), per_image.new_tensor(len(per_image))])
        if on_batch is not None:
            on_batch(batch, probs, maps, true if settings.use_true_labels else pred)
    for metric in (classifier, seg_pred, seg_true, seg_multi, *swept.values()):
        metric.all_reduce()
    if is_distributed():
        torch.distributed.all_reduce(corr)
    result = classifier.compute()
    result.update(segmentation_summary(seg_pred.compute()))
    if names is not None and len(names) == num_labels:
        result["class_names"] = list(names)
    result["miou_true_labels"] = seg_true.compute()["miou"]
    result["miou_multi_class"] = seg_multi.compute()["miou"]
    result["class_map_correlation"] = corr[0].item() / max(corr[1].item(), 1.0)
    result["miou_by_threshold"] = {t: metric.compute()["miou"] for t, metric in swept.items()}
    result["head_sparsity"] = head_sparsity(model.gate_values())
    return result


def _pseudo_masks(full: Tensor, probs: Tensor, threshold: float, labels: Tensor | None, *,
                  settings: PseudoMaskConfig, has_background: bool,
                  colours: np.ndarray | None) -> Tensor:
    """Pseudo masks from image-size maps at ``threshold``, CRF-refined on ``colours`` when
    given."""
    masks = make_pseudo_masks(full, probs, tuple(full.shape[-2:]), threshold=threshold,
                              labels=labels, has_background=has_background,
                              prob_threshold=settings.prob_threshold)
    if colours is None:
        return masks
    selected = select_classes(probs, labels, settings.prob_threshold)
    return crf_pseudo_masks(colours, normalize_maps(full), selected, masks, threshold,
                            has_background)


def segmentation_summary(metrics: dict) -> dict:
    """The reported keys of :meth:`SegmentationMetric.compute`, the confusion as nested lists."""
    summary = {key: metrics[key] for key in ("miou", "pixel_acc", "mean_acc", "per_class_iou")}
    summary["confusion"] = metrics["confusion"].tolist()
    return summary


def _unwrap(dataset: Dataset) -> Dataset:
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset


def _pixel_stats(dataset: Dataset) -> tuple[Tensor, Tensor]:
    """The per-channel ``mean`` and ``std`` the dataset normalised its images with."""
    base = _unwrap(dataset)
    mean, std = getattr(base, "mean", None), getattr(base, "std", None)
    if mean is None or std is None:
        raise ValueError(f"pseudo.crf needs the images' colours, but {type(base).__name__} has "
                         "no per-channel mean/std to undo its normalisation; set "
                         "pseudo.crf=false")
    return torch.as_tensor(mean).flatten(), torch.as_tensor(std).flatten()
