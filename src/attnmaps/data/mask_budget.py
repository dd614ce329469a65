"""Mixed supervision: keep the masks of a fixed fraction of the training images, hide the rest."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from ..conventions import IGNORE_INDEX
from .wrapper import DatasetWrapper


def masked_subset(num_images: int, fraction: float, seed: int) -> torch.Tensor:
    """Bool [num_images]: ``round(fraction * num_images)`` images drawn by ``seed`` keep masks.

    The subsets are nested: for one seed, a larger fraction keeps a superset of the images.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"mask fraction {fraction} must lie in [0, 1]")
    order = torch.randperm(num_images, generator=torch.Generator().manual_seed(seed))
    chosen = torch.zeros(num_images, dtype=torch.bool)
    chosen[order[:round(fraction * num_images)]] = True
    return chosen


class MaskBudget(DatasetWrapper):
    """``dataset`` whose items report ``has_mask`` only for the chosen fraction of the images.

    Items outside the subset keep their image and labels; their mask is set to ignore (255) so
    that nothing downstream can use it by accident.
    """

    def __init__(self, dataset: Dataset, fraction: float, seed: int = 0, ignore_index: int = IGNORE_INDEX):
        super().__init__(dataset)
        self.keep = masked_subset(len(dataset), fraction, seed)
        self.ignore_index = ignore_index

    def __getitem__(self, i: int) -> dict:
        item = dict(self.dataset[i])
        if not self.keep[i]:
            item["has_mask"] = False
            item["mask"] = torch.full_like(item["mask"], self.ignore_index)
        return item

    @property
    def num_masked(self) -> int:
        """How many images are chosen to keep their masks."""
        return int(self.keep.sum())

    def require_masks(self, sample: int = 8) -> None:
        """Raise ValueError when none of the first ``sample`` chosen images has a mask (a split
        without masks would otherwise train with a guidance term that is always 0)."""
        chosen = self.keep.nonzero()[:sample, 0].tolist()
        if chosen and not any(self.dataset[i]["has_mask"] for i in chosen):
            raise ValueError(
                f"train.mask_fraction > 0 but none of {len(chosen)} chosen training images has a "
                "mask; give a training split with masks or set train.mask_fraction=0")
