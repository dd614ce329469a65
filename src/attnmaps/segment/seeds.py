"""Seeds for the second stage: pseudo masks of the training split from the true image labels.

The WSSS protocol knows the image labels of the training images, so the seeds are the stage-1
run's pseudo masks with ``pseudo.use_true_labels=true`` and the run's refinements (PAMR, CRF,
TTA), made by :func:`~attnmaps.engine.evaluate.evaluate`. An optional band marks uncertain
pixels as ignore (255), as ToCo's and DuPL's dual thresholds do (see :func:`uncertain_pixels`).

Example:
    >>> scores = torch.tensor([[[[0.45, 0.9]], [[0.0, 0.85]]]])  # [B=1, K=2, H=1, W=2]
    >>> uncertain_pixels(scores, torch.tensor([[True, True]]), threshold=0.4,
    ...                  ignore_margin=0.1, class_margin=0.1).tolist()
    [[[True, True]]]
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

from ..config import Config
from ..conventions import IGNORE_INDEX, min_max_normalize
from ..data.base import ImageDataset, check_mask
from ..data.image_io import read_mask
from ..data.transforms import resize_mask
from ..engine.distributed import barrier
from ..engine.evaluate import eval_options, evaluate, segmentation_summary
from ..metrics.segmentation import SegmentationMetric
from ..metrics.sync import all_reduce_sum
from ..models.vit import ClassTokenViT
from ..pseudo.masks import save_pseudo_masks, select_classes

SEEDS_METRICS = "metrics.json"


def uncertain_pixels(scores: Tensor, selected: Tensor, threshold: float, ignore_margin: float,
                     class_margin: float) -> Tensor:
    """Boolean [B,H,W]: the pixels a seed leaves as ignore.

    ``scores`` [B,K,H,W] are the min-max normalized class maps the masks were binarised from,
    ``selected`` [B,K] the classes of each image. With ``s1 >= s2`` the two best selected
    scores of a pixel, it is uncertain when ``|s1 - threshold| < ignore_margin`` (close to the
    background threshold) or when ``s2 >= threshold`` and ``s1 - s2 < class_margin`` (two classes
    claim it almost equally). Margins of 0 mark nothing. The margins compare the maps themselves
    whatever ``pseudo.merge`` is: a pixel that two classes' maps claim almost equally is doubtful
    under every merge rule.
    """
    if scores.dim() != 4 or tuple(selected.shape) != tuple(scores.shape[:2]):
        raise ValueError(f"scores must be [B,K,H,W] and selected [B,K], got "
                         f"{tuple(scores.shape)} and {tuple(selected.shape)}")
    masked = scores.masked_fill(~selected.bool()[:, :, None, None], float("-inf"))
    top = masked.topk(min(2, scores.shape[1]), dim=1).values
    uncertain = (top[:, 0] - threshold).abs() < ignore_margin
    if top.shape[1] == 2:
        uncertain |= (top[:, 1] >= threshold) & (top[:, 0] - top[:, 1] < class_margin)
    return uncertain


def seed_subset(size: int, max_images: int, seed: int) -> list[int]:
    """Sorted indices of a seeded random subset of ``max_images`` of ``size`` items (all of
    them when ``max_images`` is 0 or at least ``size``).

    Example:
        >>> seed_subset(5, 0, seed=0), len(seed_subset(100, 10, seed=0))
        ([0, 1, 2, 3, 4], 10)
    """
    if not max_images or max_images >= size:
        return list(range(size))
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(size, generator=generator)[:max_images].tolist())


def write_seeds(cfg: Config, model: ClassTokenViT, dataset: ImageDataset, out_dir: Path) -> dict:
    """Write ``out_dir/<id>.png`` seeds for ``dataset`` (its seeded subset of
    ``segment.max_images`` images, see :func:`seed_subset`) from ``model`` (the stage-1 run
    ``cfg``) and return their scores.

    The scores: ``miou_true_labels`` (the seeds before the ignore band, the paper's "seeds"
    column), and ``labelled`` (metrics of the written seeds over their non-ignore pixels) with
    ``ignored_fraction``; NaN where the split has no masks. The caller saves them.
    """
    settings = replace(cfg.pseudo, use_true_labels=True)
    seg = cfg.segment
    labelled = SegmentationMetric(dataset.num_classes + int(dataset.has_background))
    ignored = torch.zeros(2, dtype=torch.float64)  # ignored pixels, all pixels

    def save(batch: dict, probs: Tensor, maps: Tensor, masks: Tensor, scores: Tensor) -> None:
        if seg.ignore_margin or seg.class_margin:
            selected = select_classes(probs, batch["labels"].to(maps.device))
            band = uncertain_pixels(min_max_normalize(scores), selected, settings.threshold,
                                    seg.ignore_margin, seg.class_margin)
            masks = masks.masked_fill(band, IGNORE_INDEX)
        masks = masks.cpu()
        save_pseudo_masks(out_dir, list(batch["id"]), masks)
        truth = batch["mask"].masked_fill(masks == IGNORE_INDEX, IGNORE_INDEX)
        labelled.update(masks.masked_fill(masks == IGNORE_INDEX, 0), truth)
        ignored.add_(torch.tensor([(masks == IGNORE_INDEX).sum().item(), masks.numel()],
                                  dtype=torch.float64))

    subset = Subset(dataset, seed_subset(len(dataset), seg.max_images, cfg.train.seed))
    metrics = evaluate(model, subset, settings, **eval_options(cfg), on_batch=save,
                       with_scores=True)
    ignored = all_reduce_sum(ignored)
    result = {"miou_true_labels": metrics["miou_true_labels"],
              "true_labels": metrics["true_labels"],
              "labelled": segmentation_summary(labelled.compute()),
              "ignored_fraction": (ignored[0] / ignored[1].clamp_min(1)).item(),
              "ignore_margin": seg.ignore_margin, "class_margin": seg.class_margin,
              "class_names": getattr(dataset, "class_names", None)}
    barrier()
    return result


class SeedDataset(Dataset):
    """The images of ``base`` that have a seed ``seed_dir/<id>.png``, with their labels and the
    seed as mask, augmented together by ``base``'s aligned augmentations (``data.crop_scale``,
    ``hflip``, ...).

    Seeds written at ``data.image_size`` are resized (nearest) back to the stored image first.
    """

    def __init__(self, base: ImageDataset, seed_dir: Path):
        self.indices = [i for i, image_id in enumerate(base.ids)
                        if (seed_dir / f"{image_id}.png").is_file()]
        if not self.indices:
            raise FileNotFoundError(f"no seed <id>.png in {seed_dir} for any image of the "
                                    "split; write them with 'attnmaps segment'")
        self.base = base
        self.seed_dir = seed_dir
        self.num_classes = base.num_classes
        self.has_background = base.has_background
        self.class_names = base.class_names

    def __len__(self) -> int:
        return len(self.indices)

    def label_counts(self, num_labels: int) -> Tensor:
        """Pixels per label [num_labels] over every seed, ignore (255) left out."""
        counts = torch.zeros(num_labels, dtype=torch.float64)
        for i in self.indices:
            seed = torch.from_numpy(read_mask(self.seed_dir / f"{self.base.ids[i]}.png")).long()
            seed = seed[seed != IGNORE_INDEX]
            counts += torch.bincount(seed.flatten(), minlength=num_labels)[:num_labels]
        return counts

    def __getitem__(self, index: int) -> dict:
        i = self.indices[index]
        image = self.base.checked_image(i)
        _, labels = self.base.load_target(i, image.shape)
        path = self.seed_dir / f"{self.base.ids[i]}.png"
        seed = resize_mask(read_mask(path), image.shape[:2])
        check_mask(seed, path, self.base.image_paths[i], image.shape, self.base.max_label)
        return self.base.make_sample(i, image, seed, labels)
