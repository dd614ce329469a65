"""Evaluation of a ClassTokenViT: classification, pseudo-mask mIoU and attention diagnostics."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..config import PseudoMaskConfig
from ..metrics.classification import MultiLabelMetric, head_sparsity
from ..metrics.segmentation import SegmentationMetric
from ..models.vit import ClassTokenViT, parse_attn_blocks
from ..pseudo_masks import make_pseudo_masks, upsample_maps
from ..refine import pamr

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
             on_batch: BatchCallback | None = None) -> dict:
    """Score ``model`` on ``dataset``.

    Returns classifier metrics (``map``, ``exact_match``, ``label_accuracy``, ``f1``), pseudo-mask
    metrics from predicted labels (``miou``, ``pixel_acc``, ``per_class_iou``), from the true image
    labels (``miou_true_labels``), on images with two or more classes (``miou_multi_class``),
    the mean class-map correlation and the head sparsity (% of heads closed). With
    ``settings.refine_iterations`` the upsampled maps are refined by :func:`pamr` first.
    ``sweep`` lists extra binarisation thresholds, scored into ``miou_by_threshold`` (from the
    true labels when ``settings.use_true_labels`` is set, else from predicted ones).
    ``on_batch(batch, probs, maps, pseudo_masks)`` sees every batch, e.g. to save masks; its masks
    come from the true labels when ``settings.use_true_labels`` is set, else from predictions.
    """
    model.eval()
    k = model.num_classes
    num_labels = k + 1 if has_background else k
    blocks = parse_attn_blocks(attn_blocks, len(model.blocks))
    classifier = MultiLabelMetric(k, threshold=settings.prob_threshold)
    seg_pred, seg_true, seg_multi = (SegmentationMetric(num_labels, device=device) for _ in range(3))
    swept = {t: SegmentationMetric(num_labels, device=device) for t in sweep}
    corr_sum, corr_count = 0.0, 0
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        images, labels = batch["image"].to(device), batch["labels"].to(device)
        masks = batch["mask"].to(device)
        logits, maps = model.predict(images, blocks)
        probs = logits.float().sigmoid()
        maps = maps.float()
        size = tuple(images.shape[-2:])
        full = upsample_maps(maps, size)
        if settings.refine_iterations:
            full = pamr(images, full, settings.refine_iterations)
        kwargs = {"threshold": settings.threshold, "has_background": has_background,
                  "prob_threshold": settings.prob_threshold}
        pred = make_pseudo_masks(full, probs, size, **kwargs)
        true = make_pseudo_masks(full, probs, size, labels=labels, **kwargs)
        for t, metric in swept.items():
            swept_labels = labels if settings.use_true_labels else None
            metric.update(make_pseudo_masks(full, probs, size, labels=swept_labels,
                                            **{**kwargs, "threshold": t}), masks)
        classifier.update(probs.cpu(), labels.cpu())
        seg_pred.update(pred, masks)
        seg_true.update(true, masks)
        multi = labels.sum(1) >= 2
        if multi.any():
            seg_multi.update(pred[multi], masks[multi])
        if k > 1:
            corr = class_map_correlation(maps)
            corr_sum, corr_count = corr_sum + float(corr.sum()), corr_count + len(corr)
        if on_batch is not None:
            on_batch(batch, probs, maps, true if settings.use_true_labels else pred)
    result = classifier.compute()
    result.update(_segmentation_summary(seg_pred.compute()))
    result["miou_true_labels"] = seg_true.compute()["miou"]
    result["miou_multi_class"] = seg_multi.compute()["miou"]
    result["class_map_correlation"] = corr_sum / max(corr_count, 1)
    result["miou_by_threshold"] = {t: metric.compute()["miou"] for t, metric in swept.items()}
    result["head_sparsity"] = head_sparsity(model.gate_values())
    return result


def _segmentation_summary(metrics: dict) -> dict:
    return {key: metrics[key] for key in ("miou", "pixel_acc", "mean_acc", "per_class_iou")}
