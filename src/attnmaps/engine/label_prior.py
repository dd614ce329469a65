"""Start the classifier at the label prior: head bias = log-odds of each class's frequency.

With the bias at zero every logit starts at p = 0.5, and AdamW moves a bias by about ``lr`` per
step, so at lr 1e-3 reaching a class frequency of 0.19 (logit -1.45) alone takes over a thousand
steps: a small-data run can spend its whole schedule above the label-prior entropy. Setting the
bias to ``log(p / (1 - p))`` makes the first step's BCE the prior entropy (Lin et al. 2017, the
"prior" initialisation of focal loss).

Example:
    >>> freq = label_frequencies(train_set)  # doctest: +SKIP
    >>> init_head_bias(model, freq)  # doctest: +SKIP
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..models.vit import ClassTokenViT

MIN_FREQUENCY = 1e-3


def label_frequencies(dataset: Dataset) -> Tensor:
    """Fraction of the images of ``dataset`` that carry each class, float [K]: the stored labels
    (``dataset.image_labels(i)``, no augmentation drawn) where the dataset has them, else
    those of its samples."""
    if len(dataset) == 0:
        raise ValueError("label_frequencies needs a non-empty dataset")
    stored = getattr(dataset, "image_labels", None)
    labels = stored if stored is not None else (lambda i: dataset[i]["labels"])
    total = sum(labels(i).float() for i in range(len(dataset)))
    return total / len(dataset)


def prior_logits(frequencies: Tensor, min_frequency: float = MIN_FREQUENCY) -> Tensor:
    """``log(p / (1 - p))`` of each frequency clamped to [min_frequency, 1 - min_frequency]."""
    if frequencies.ndim != 1 or ((frequencies < 0) | (frequencies > 1)).any():
        raise ValueError(f"frequencies must be a 1-D tensor in [0, 1], got {frequencies}")
    p = frequencies.double().clamp(min_frequency, 1 - min_frequency)
    return (p.log() - (-p).log1p()).float()


@torch.no_grad()
def init_head_bias(model: ClassTokenViT, frequencies: Tensor) -> None:
    """Set the classifier bias of ``model`` (either head type, and the patch head's when it has
    one) to :func:`prior_logits`."""
    if frequencies.shape != (model.num_classes,):
        raise ValueError(f"got {frequencies.numel()} class frequencies (shape "
                         f"{tuple(frequencies.shape)}) for a model with {model.num_classes} classes")
    bias = model.head.bias if model.head_type == "joint" else model.head_bias
    bias.copy_(prior_logits(frequencies).to(bias))
    if getattr(model, "patch_head", None) is not None:
        model.patch_head.bias.copy_(prior_logits(frequencies).to(bias))
