"""A no-learning floor for pseudo masks: color distance from the image border + true labels.

Foreground = pixels whose color differs from the median border color by more than a
threshold (Otsu's method on the distance histogram). Each connected foreground component is
given one of the image's true classes: with one class, all components get it; with several, the
components are taken largest first and matched to the classes in a fixed cyclic order (the floor
knows which classes are present, not where). Anything a trained model cannot beat is not learning.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def otsu_threshold(values: np.ndarray, bins: int = 64) -> float:
    """Otsu's threshold of a 1-D sample: the cut maximising the between-class variance."""
    hist, edges = np.histogram(values, bins=bins)
    centers = (edges[:-1] + edges[1:]) / 2
    weight0 = np.cumsum(hist)
    weight1 = weight0[-1] - weight0
    mean0 = np.cumsum(hist * centers) / np.maximum(weight0, 1)
    mean1 = ((hist * centers).sum() - np.cumsum(hist * centers)) / np.maximum(weight1, 1)
    between = weight0 * weight1 * (mean0 - mean1) ** 2
    return float(edges[1:][np.argmax(between)])


def border_distance_mask(image: np.ndarray, classes: np.ndarray, label_offset: int = 1) -> np.ndarray:
    """Label mask [H,W] for one uint8 image [H,W,C] given its true class indices ``classes``."""
    pixels = image.astype(np.float32)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    distance = np.linalg.norm(pixels - np.median(border, axis=0), axis=-1)
    foreground = distance > otsu_threshold(distance.ravel())
    mask = np.zeros(image.shape[:2], np.int64)
    if len(classes) == 0:
        return mask
    components, count = ndimage.label(foreground)
    sizes = ndimage.sum(foreground, components, index=np.arange(1, count + 1))
    for rank, component in enumerate(np.argsort(-sizes)):
        mask[components == component + 1] = classes[rank % len(classes)] + label_offset
    return mask
