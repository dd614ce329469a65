"""Scores of a segmentation network on labelled images, without image labels: it predicts
every pixel. Per-class IoU and the confusion matrix over the whole set, and each image's mIoU
(for the report's best / worst gallery); with ``segment.refine_iterations`` the refined
prediction's, and the unrefined network's mIoU beside them."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..config import SegmentConfig
from ..engine.distributed import gather_objects, shard_indices
from ..engine.evaluate import segmentation_summary
from ..metrics.segmentation import SegmentationMetric, confusion_matrix, metrics_from_confusion
from ..process_group import is_distributed
from .predict import infer_logits, refine_probs


@torch.no_grad()
def evaluate_segmenter(model: nn.Module, dataset: Dataset, seg: SegmentConfig,
                       num_labels: int, batch_size: int = 32, refine: bool = True) -> dict:
    """``miou``, ``pixel_acc``, ``mean_acc``, ``per_class_iou``, ``confusion`` (rows = ground
    truth) and ``per_image`` ``{id: miou}`` of ``model`` on ``dataset``, inferred as
    ``seg.inference`` says and refined when ``refine`` and ``seg.refine_iterations`` say so
    (:func:`~attnmaps.segment.predict.refine_probs`); ``refine_iterations`` (0 when unrefined)
    and, for a refined score, ``raw_miou``: the same network without the refinement. Inside a
    process group each process scores its shard and every process returns the whole set's
    metrics."""
    model.eval()
    device = next(model.parameters()).device
    iterations = (seg.refine_iterations or 0) if refine else 0
    metric = SegmentationMetric(num_labels, device=device)
    raw = SegmentationMetric(num_labels, device=device) if iterations else None
    per_image: dict[str, float] = {}
    if is_distributed():
        dataset = Subset(dataset, shard_indices(len(dataset)))
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        masks = batch["mask"].to(device)
        images = batch["image"].to(device)
        unrefined = infer_logits(model, images, seg).softmax(1)
        pred = refine_probs(images, unrefined, iterations).argmax(1)
        metric.update(pred, masks)
        if raw is not None:
            raw.update(unrefined.argmax(1), masks)
        for image_id, p, m in zip(batch["id"], pred, masks):
            per_image[image_id] = metrics_from_confusion(confusion_matrix(p, m, num_labels))["miou"]
    result = segmentation_summary(metric.compute())
    result["refine_iterations"] = iterations
    if raw is not None:
        result["raw_miou"] = segmentation_summary(raw.compute())["miou"]
    result["per_image"] = {k: v for part in gather_objects(per_image) for k, v in part.items()}
    return result
