"""Multi-scale + horizontal-flip test-time augmentation (TTA) for class maps.

Each pass resizes the batch (bilinear) to ``scale`` times its size, rounded to a multiple of the
patch size, and runs :meth:`ClassTokenViT.predict`; the flipped pass runs on the mirrored batch
and its maps are mirrored back. The passes are combined as follows:

* Maps are averaged on the **map grid of the unscaled input** (``H / patch x W / patch``), each
  pass's maps resized there bilinearly. Not at image size: that would hold ``K`` full-resolution
  maps per pass, and the pseudo-mask step upsamples only the selected classes' maps anyway.
* Softmax attention spreads over all ``n`` patches of a pass, so a pass at scale ``s`` has about
  ``s**2`` times the patches and maps about ``1 / s**2`` as large. Each pass's maps are
  multiplied by ``n_pass / n_unscaled`` before averaging (attention per unscaled patch area), so
  every scale weighs the same.
* Classifier outputs are combined by averaging the sigmoid probabilities, as the field does; the
  returned logits are the logits of that mean, ``sigmoid(logits) == mean_s sigmoid(logits_s)``.

One pass (``scales=(1.0,)``, ``flip=False``) returns ``model.predict`` unchanged.

Example:
    >>> model = ClassTokenViT(num_classes=2, img_size=(32, 32), patch_size=8, embed_dim=16,
    ...                       depth=1, num_heads=2).eval()
    >>> logits, maps = tta_predict(model, torch.randn(1, 3, 32, 32), (0.75, 1.0, 1.25), True)
    >>> logits.shape, maps.shape
    (torch.Size([1, 2]), torch.Size([1, 2, 4, 4]))
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.vit import ClassTokenViT
from .masks import upsample_maps


def scaled_size(size: Sequence[int], scale: float, patch_size: int) -> tuple[int, int]:
    """``size`` (H, W) times ``scale``, each side rounded to the nearest multiple of
    ``patch_size`` (halves up; at least one patch).

    Example:
        >>> scaled_size((224, 224), 0.75, 16), scaled_size((224, 320), 1.25, 16)
        ((176, 176), (288, 400))
    """
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"TTA scales (pseudo.tta_scales) must be positive numbers, got {scale}")
    return tuple(max(1, math.floor(side * scale / patch_size + 0.5)) * patch_size for side in size)


def mean_probability_logits(logits: Tensor) -> Tensor:
    """Logits of the mean sigmoid probability over dim 0 of ``logits`` [P,B,K].

    ``log(mean sigmoid) - log(mean (1 - sigmoid))`` through log-sum-exp of log-sigmoids, so it
    stays finite where a probability rounds to 0 or 1.
    """
    return (torch.logsumexp(F.logsigmoid(logits), 0) - torch.logsumexp(F.logsigmoid(-logits), 0))


def tta_predict(model: ClassTokenViT, images: Tensor, scales: Sequence[float] = (1.0,),
                flip: bool = False, attn_blocks: str | Sequence[int] = "last",
                fused: bool = False) -> tuple[Tensor, Tensor]:
    """Logits [B,K] and class maps [B,K,H/p,W/p] of ``images`` [B,C,H,W] averaged over
    ``scales`` and, with ``flip``, their horizontal mirror images (see the module doc);
    ``fused`` maps as :meth:`~attnmaps.models.vit.ClassTokenViT.predict` makes them.

    ``images`` must be divisible by the patch size ``p``. The flipped pass runs in the same
    forward as the unflipped one (a batch of 2B images).
    """
    scales = list(scales)
    if not scales:
        raise ValueError("TTA needs at least one scale (pseudo.tta_scales), e.g. [1.0]")
    base = tuple(images.shape[-2:])
    patch = model.patch_size
    grid = (base[0] // patch, base[1] // patch)
    if scales == [1.0] and not flip:
        return model.predict(images, attn_blocks, fused=fused)
    all_logits, all_maps = [], []
    for scale in scales:
        size = scaled_size(base, scale, patch)
        x = images if size == base else F.interpolate(images, size=size, mode="bilinear",
                                                      align_corners=False)
        if flip:
            x = torch.cat([x, x.flip(-1)])
        logits, maps = model.predict(x, attn_blocks, fused=fused)
        maps = maps.float()
        if flip:
            maps = torch.cat([maps[: len(images)], maps[len(images):].flip(-1)])
        density = (size[0] // patch) * (size[1] // patch) / (grid[0] * grid[1])
        maps = upsample_maps(maps, grid) * density
        all_logits += logits.float().chunk(2 if flip else 1)
        all_maps += maps.chunk(2 if flip else 1)
    return mean_probability_logits(torch.stack(all_logits)), torch.stack(all_maps).mean(0)
