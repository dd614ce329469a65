"""Evaluation of a ClassTokenViT: classification, pseudo-mask mIoU and attention diagnostics.

:class:`PseudoMaskEvaluator` holds the state (update / compute, as a torchmetrics metric, synced
across processes inside ``compute``); :func:`evaluate` runs a model over a dataset into one. It is
the one evaluation path: training, the demo and every command call :func:`evaluate`.

Example:
    >>> evaluator = PseudoMaskEvaluator(num_classes=2, settings=PseudoMaskConfig())
    >>> maps = torch.zeros(1, 2, 2, 2)
    >>> maps[0, 0, 0] = 1.0  # class 0 attends to the top row
    >>> masks = torch.tensor([[[1, 1], [0, 0]]])
    >>> _ = evaluator.update(torch.zeros(1, 3, 2, 2), torch.tensor([[1.0, 0.0]]), masks,
    ...                      torch.tensor([[0.9, 0.1]]), maps)
    >>> evaluator.compute()["miou"]
    1.0
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from ..config import Config, PseudoMaskConfig
from ..conventions import min_max_normalize
from ..metrics.classification import MultiLabelMetric, head_sparsity
from ..metrics.segmentation import SegmentationMetric
from ..metrics.sync import all_reduce_sum
from ..models.vit import ClassTokenViT
from ..process_group import is_distributed
from ..pseudo.crf import crf_params, crf_pseudo_masks, images_to_uint8_range
from ..pseudo.masks import make_pseudo_masks, select_classes, upsample_maps
from ..pseudo.pamr import pamr
from ..pseudo.threshold import MapHistogram
from ..pseudo.tta import tta_predict
from .acceleration import autocast
from .distributed import shard_indices

BatchCallback = Callable[[dict, Tensor, Tensor, Tensor], None]
SEGMENTATION_KEYS = ("miou", "pixel_acc", "mean_acc", "per_class_iou")
SWEEP_NOTE = ("uses pixel labels: a threshold picked by this is tuned on ground-truth masks, "
              "not weakly supervised")


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


def segmentation_summary(metrics: dict) -> dict:
    """The reported keys of :meth:`SegmentationMetric.compute`, the confusion as nested lists."""
    summary = {key: metrics[key] for key in SEGMENTATION_KEYS}
    summary["confusion"] = metrics["confusion"].tolist()
    return summary


class PseudoMaskEvaluator:
    """Scores of a class-token model's outputs on labelled images, accumulated batch by batch.

    ``update(images, labels, masks, probs, maps)`` takes a batch's normalized images [B,C,H,W],
    multi-hot image labels [B,K], ground-truth label masks [B,H,W] (255 = ignore), class
    probabilities [B,K] and class maps [B,K,h,w]; it makes the pseudo masks from the predicted
    and from the true image labels (``settings``: PAMR, binarisation threshold, CRF), scores
    both, and returns them as ``{"predicted": [B,H,W], "true": [B,H,W]}`` with ``"scores"``, the
    image-size maps [B,K,H,W] they were binarised from (PAMR-refined for the classes of either,
    before min-max normalization).

    ``compute()`` returns classifier metrics (``map``, ``per_class_ap``, ``exact_match``,
    ``label_accuracy``, ``f1``); the pseudo-mask metrics from predicted labels at the top level
    (``miou``, ``pixel_acc``, ``mean_acc``, ``per_class_iou``, ``confusion`` [L,L] with rows =
    ground truth) and the same from the true image labels under ``true_labels`` (its mIoU also
    as ``miou_true_labels``); ``miou_multi_class`` (predicted labels, images with two or more
    classes); ``class_map_correlation``; ``miou_by_threshold`` for each ``sweep`` threshold (from
    the true labels when ``settings.use_true_labels`` is set, else from predicted ones), with
    ``miou_by_threshold_note`` saying that it uses pixel labels; ``label_free_threshold``, the background threshold that
    :class:`~attnmaps.pseudo.threshold.MapHistogram` picks, without pixel labels, from the maps
    of the same classes; and ``class_names`` when given for the L mask labels.

    ``pixel_stats`` = the per-channel (mean, std) the images were normalized with; the CRF
    (``settings.crf``) needs it to recover their colors. Inside a process group every process
    updates with its own samples and ``compute`` reduces them all (safe to call twice).
    """

    def __init__(self, num_classes: int, settings: PseudoMaskConfig, *,
                 has_background: bool = True, class_names: Sequence[str] | None = None,
                 sweep: Sequence[float] = (), pixel_stats: tuple[Tensor, Tensor] | None = None,
                 device: torch.device | str | None = None):
        if settings.crf and pixel_stats is None:
            raise ValueError("pseudo.crf needs the images' colors, but the dataset has no "
                             "per-channel mean/std to undo its normalization; set "
                             "pseudo.crf=false")
        self.settings = settings
        self.crf = crf_params(settings) if settings.crf else None
        self.has_background = has_background
        num_labels = num_classes + int(has_background)
        self.class_names = (list(class_names) if class_names is not None
                            and len(class_names) == num_labels else None)
        self.pixel_stats = pixel_stats
        self.classifier = MultiLabelMetric(num_classes, threshold=settings.prob_threshold)
        self.predicted, self.true, self.multi_class = (SegmentationMetric(num_labels, device=device)
                                                      for _ in range(3))
        self.swept = {float(t): SegmentationMetric(num_labels, device=device) for t in sweep}
        self.correlation = torch.zeros(2, dtype=torch.float64, device=device)  # sum, count
        self.histogram = MapHistogram(device=device)

    def update(self, images: Tensor, labels: Tensor, masks: Tensor, probs: Tensor,
               maps: Tensor) -> dict[str, Tensor]:
        settings = self.settings
        full = upsample_maps(maps, tuple(images.shape[-2:]))
        if settings.refine_iterations:
            needed = (select_classes(probs, None, settings.prob_threshold)
                      | select_classes(probs, labels, settings.prob_threshold))
            full = pamr(images, full, settings.refine_iterations, selected=needed)
        colors = (None if self.pixel_stats is None
                  else images_to_uint8_range(images, *self.pixel_stats))
        made = {"predicted": self._pseudo_masks(full, probs, settings.threshold, None, colors),
                "true": self._pseudo_masks(full, probs, settings.threshold, labels, colors),
                "scores": full}
        swept_labels = labels if settings.use_true_labels else None
        self.histogram.update(full, select_classes(probs, swept_labels, settings.prob_threshold))
        for threshold, metric in self.swept.items():
            metric.update(self._pseudo_masks(full, probs, threshold, swept_labels, colors), masks)
        self.classifier.update(probs, labels)
        self.predicted.update(made["predicted"], masks)
        self.true.update(made["true"], masks)
        multi = labels.sum(1) >= 2
        if multi.any():
            self.multi_class.update(made["predicted"][multi], masks[multi])
        if maps.shape[1] > 1:
            per_image = class_map_correlation(maps).to(self.correlation.device)
            self.correlation += torch.stack([per_image.sum(),
                                             per_image.new_tensor(len(per_image))])
        return made

    def _pseudo_masks(self, full: Tensor, probs: Tensor, threshold: float,
                      labels: Tensor | None, colors: Tensor | None) -> Tensor:
        """Pseudo masks from image-size maps at ``threshold``, CRF-refined on ``colors`` when
        given."""
        prob_threshold = self.settings.prob_threshold
        masks = make_pseudo_masks(full, probs, tuple(full.shape[-2:]), threshold=threshold,
                                  labels=labels, has_background=self.has_background,
                                  prob_threshold=prob_threshold, merge=self.settings.merge)
        if colors is None:
            return masks
        selected = select_classes(probs, labels, prob_threshold)
        return crf_pseudo_masks(colors, min_max_normalize(full), selected, masks, threshold,
                                self.has_background, self.crf, self.settings.crf_backend)

    def compute(self) -> dict:
        result = self.classifier.compute()
        result.update(segmentation_summary(self.predicted.compute()))
        result["true_labels"] = segmentation_summary(self.true.compute())
        result["miou_true_labels"] = result["true_labels"]["miou"]
        result["miou_multi_class"] = self.multi_class.compute()["miou"]
        correlation = all_reduce_sum(self.correlation)
        result["class_map_correlation"] = correlation[0].item() / max(correlation[1].item(), 1.0)
        result["miou_by_threshold"] = {t: metric.compute()["miou"]
                                       for t, metric in self.swept.items()}
        if self.swept:
            result["miou_by_threshold_note"] = SWEEP_NOTE
        result["label_free_threshold"] = self.histogram.threshold()
        if self.class_names is not None:
            result["class_names"] = self.class_names
        return result


def eval_options(cfg: Config) -> dict:
    """The run-level :func:`evaluate` options of a config: map blocks, batch size, precision."""
    return {"attn_blocks": cfg.model.attn_blocks, "batch_size": cfg.train.batch_size,
            "precision": cfg.train.precision}


@torch.no_grad()
def evaluate(model: ClassTokenViT, dataset: Dataset, settings: PseudoMaskConfig, *,
             attn_blocks: str | Sequence[int] = "last", batch_size: int = 64,
             precision: str = "fp32", sweep: Sequence[float] = (),
             on_batch: BatchCallback | None = None, with_scores: bool = False) -> dict:
    """Score ``model`` on ``dataset`` with :class:`PseudoMaskEvaluator`; also ``head_sparsity``
    (% of heads closed).

    What the dataset knows is read from it: ``has_background`` (default True),
    ``class_names`` and, for ``settings.crf``, the ``mean`` / ``std`` its images were
    normalized with. The model runs on its own device, under bf16 autocast with
    ``precision="bf16"`` (maps and scores are float32 after), with ``settings.tta_scales`` /
    ``tta_flip`` test-time augmentation (:func:`~attnmaps.pseudo.tta.tta_predict`).
    ``on_batch(batch, probs, maps, pseudo_masks)`` sees every batch, e.g. to save masks; its
    masks come from the true labels when ``settings.use_true_labels`` is set, else from
    predictions; ``with_scores`` adds a fifth argument, the image-size maps the masks were
    binarised from (see :meth:`PseudoMaskEvaluator.update`). Pass a config's run-level options
    with ``**eval_options(cfg)``.

    Inside a torch.distributed process group every process must call this: each scores the
    samples ``rank, rank + W, ...`` (``on_batch`` sees only those) and the metrics are reduced,
    so every process returns the single-process result.
    """
    model.eval()
    device = next(model.parameters()).device
    base = _unwrap(dataset)
    evaluator = PseudoMaskEvaluator(
        model.num_classes, settings, has_background=getattr(base, "has_background", True),
        class_names=getattr(base, "class_names", None), sweep=sweep,
        pixel_stats=_pixel_stats(base) if settings.crf else None, device=device)
    blocks = model.resolve_attn_blocks(attn_blocks)
    if is_distributed():
        dataset = Subset(dataset, shard_indices(len(dataset)))
    kept = "true" if settings.use_true_labels else "predicted"
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        images, labels = batch["image"].to(device), batch["labels"].to(device)
        with autocast(precision, device):
            logits, maps = tta_predict(model, images, settings.tta_scales, settings.tta_flip,
                                       blocks, fused=settings.maps == "fused")
        probs, maps = logits.float().sigmoid(), maps.float()
        made = evaluator.update(images, labels, batch["mask"].to(device), probs, maps)
        if on_batch is not None:
            on_batch(batch, probs, maps, made[kept], *((made["scores"],) if with_scores else ()))
    result = evaluator.compute()
    result["head_sparsity"] = head_sparsity(model.gate_values())
    return result


def _unwrap(dataset: Dataset) -> Dataset:
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset


def _pixel_stats(dataset: Dataset) -> tuple[Tensor, Tensor] | None:
    """The per-channel ``mean`` and ``std`` the dataset normalized its images with, if known."""
    mean, std = getattr(dataset, "mean", None), getattr(dataset, "std", None)
    if mean is None or std is None:
        return None
    return torch.as_tensor(mean).flatten(), torch.as_tensor(std).flatten()
