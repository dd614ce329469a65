"""A training set whose items also carry a per-image pseudo mask that can be replaced between
epochs (self-training on the model's own masks, remade every few epochs)."""

from __future__ import annotations

import numpy as np

from .base import ImageDataset
from .transforms import resize_mask
from .wrapper import DatasetWrapper


class WithPseudoMasks(DatasetWrapper):
    """``dataset`` whose items get ``"pseudo_mask"`` [H,W] (long) once :meth:`set_masks` has
    given one uint8 mask per image: resized to the stored image (nearest neighbour) and then
    cropped, resized, rotated, zoomed and flipped with the image and its label mask, so it stays
    aligned with the augmented image. Before that, items are ``dataset``'s own.

    Loader workers copy the dataset when an epoch's iterator is made: set the masks before it.
    """

    def __init__(self, dataset: ImageDataset):
        if not isinstance(dataset, ImageDataset):
            raise TypeError(f"pseudo masks travel with the images of an ImageDataset, got "
                            f"{type(dataset).__name__}")
        super().__init__(dataset)
        self.masks: np.ndarray | None = None

    def set_masks(self, masks: np.ndarray) -> None:
        """Use ``masks`` [N,h,w] (uint8, one per image in the dataset's order) from now on."""
        if masks.dtype != np.uint8 or masks.ndim != 3 or len(masks) != len(self.dataset):
            raise ValueError(f"pseudo masks must be uint8 [{len(self.dataset)}, h, w], one per "
                             f"training image; got {masks.dtype} {list(masks.shape)}")
        self.masks = masks

    def __getitem__(self, i: int) -> dict:
        if self.masks is None:
            return self.dataset[i]
        image = self.dataset.checked_image(i)
        mask, labels = self.dataset.load_target(i, image.shape)
        pseudo_mask = resize_mask(self.masks[i], image.shape[:2])
        return self.dataset.make_sample(i, image, mask, labels, pseudo_mask)
