"""Evaluation of a ClassTokenViT: classification, pseudo-mask mIoU and attention diagnostics."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from ..config import PseudoMaskConfig
from ..metrics.classification import MultiLabelMetric, head_sparsity
from ..metrics.segmentation import SegmentationMetric
from ..models.vit import ClassTokenViT
from ..pseudo_masks import make_pseudo_masks, upsample_maps
from ..refine import pamr
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
    metrics from predicted labels (``miou``, ``pixel_acc``, ``per_class_iou``), from the true image
    labels (``miou_true_labels``), on images with two or more classes (``miou_multi_class``),
    the mean class-map correlation and the head sparsity (% of heads closed). With
    ``settings.refine_iterations`` the upsampled maps are refined by :func:`pamr` first.
    ``sweep`` lists extra binarisation thresholds, scored into ``miou_by_threshold`` (from the
    true labels when ``settings.use_true_labels`` is set, else from predicted ones).
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
    seg_pred, seg_true, seg_multi = (SegmentationMetric(num_labels, device=device) for _ in range(3))
    swept = {t: SegmentationMetric(num_labels, device=device) for t in sweep}
    corr = torch.zeros(2, dtype=torch.float64, device=device)  # sum, count
    if is_distributed():
        dataset = Subset(dataset, shard_indices(len(dataset)))
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        images, labels = batch["image"].to(device), batch["labels"].to(device)
        masks = batch["mask"].to(device)
        with autocast(precision, device):
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
            per_image = class_map_correlation(maps)
            corr += torch.stack([per_image.sum(), per_image.new_tensor(len(per_image))])
        if on_batch is not None:
            on_batch(batch, probs, maps, true if settings.use_true_labels else pred)
    for metric in (classifier, seg_pred, seg_true, seg_multi, *swept.values()):
        metric.all_reduce()
    if is_distributed():
        torch.distributed.all_reduce(corr)
    result = classifier.compute()
    result.update(_segmentation_summary(seg_pred.compute()))
    result["miou_true_labels"] = seg_true.compute()["miou"]
    result["miou_multi_class"] = seg_multi.compute()["miou"]
    result["class_map_correlation"] = corr[0].item() / max(corr[1].item(), 1.0)
    result["miou_by_threshold"] = {t: metric.compute()["miou"] for t, metric in swept.items()}
    result["head_sparsity"] = head_sparsity(model.gate_values())
    return result


def _segmentation_summary(metrics: dict) -> dict:
    return {key: metrics[key] for key in ("miou", "pixel_acc", "mean_acc", "per_class_iou")}
