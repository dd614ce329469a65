"""Fully connected CRF refinement of pseudo masks (Krähenbühl & Koltun, NeurIPS 2011).

Needs the optional extra ``pydensecrf2`` (``pip install "attnmaps[crf]"``; it installs the module
``pydensecrf`` and builds from source, so a C++ compiler is needed). Imported only when called.

Parameters default to those of the attention/CAM seed refinement in PSA (Ahn & Kwak, CVPR 2018)
and the WSSS code built on it: 10 mean-field iterations, an appearance (bilateral) kernel with
``sxy=80``, ``srgb=13``, ``compat=10`` and a smoothness (Gaussian) kernel with ``sxy=3``,
``compat=3``; colors in 0..255 units. (IRN's label-map CRF uses ``sxy=50``, ``srgb=5``.)

Unary of a pseudo mask (:func:`pseudo_mask_probs`): every label gets a score, the background
the binarisation threshold and each selected class its min-max normalized map (unselected
classes 0); the label the pseudo mask gave the pixel is raised to the pixel's highest score, so
the CRF starts from the pseudo mask; the scores divided by their sum are the probabilities. A
pixel whose map barely clears the threshold is thus a near tie, one deep inside an object or
far from all objects a confident one.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

INSTALL_HINT = 'pip install "attnmaps[crf]"  (the pydensecrf2 package)'
PROB_FLOOR = 1e-5  # probabilities are clipped here before -log, as pydensecrf's utils do


def crf_refine(image: np.ndarray, probs: np.ndarray, iterations: int = 10, *,
               gaussian_sxy: float = 3.0, gaussian_compat: float = 3.0,
               bilateral_sxy: float = 80.0, bilateral_srgb: float = 13.0,
               bilateral_compat: float = 10.0) -> np.ndarray:
    """Labels [H,W] (int64) of a dense CRF with unary ``-log probs`` on ``image``.

    Args:
        image: [H,W,C] colors in 0..255 units (uint8 RGB typically; any channel count).
        probs: [L,H,W] label probabilities (clipped at 1e-5; rows need not sum to one).
        iterations: mean-field steps.
        gaussian_*, bilateral_*: kernel widths (pixels, color units) and weights.
    """
    try:
        import pydensecrf.densecrf as dcrf
    except ImportError:
        raise ImportError(f"Dense-CRF refinement needs the optional extra: {INSTALL_HINT}"
                          ) from None
    if image.ndim != 3 or probs.ndim != 3 or image.shape[:2] != probs.shape[1:]:
        raise ValueError(f"image must be [H,W,C] and probs [L,H,W] with the same H, W; got "
                         f"image {image.shape} and probs {probs.shape}")
    num_labels, height, width = probs.shape
    crf = dcrf.DenseCRF2D(width, height, num_labels)
    unary = -np.log(np.clip(probs, PROB_FLOOR, None)).reshape(num_labels, -1)
    crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    # Features in DenseCRF2D's order (x, y, channels): the permutohedral lattice that filters
    # them is not invariant to the order, and this order gives exactly its RGB kernels.
    ys, xs = np.mgrid[:height, :width].astype(np.float32)
    position = np.stack([xs.ravel(), ys.ravel()])
    colors = image.reshape(-1, image.shape[-1]).T.astype(np.float32)
    for features, compat in ((position / gaussian_sxy, gaussian_compat),
                             (np.concatenate([position / bilateral_sxy,
                                              colors / bilateral_srgb]), bilateral_compat)):
        crf.addPairwiseEnergy(np.ascontiguousarray(features, dtype=np.float32), compat=compat)
    q = np.asarray(crf.inference(iterations)).reshape(num_labels, height, width)
    return q.argmax(0).astype(np.int64)


def pseudo_mask_probs(maps: Tensor, selected: Tensor, masks: Tensor, threshold: float,
                      has_background: bool) -> Tensor:
    """CRF label probabilities [B,L,H,W] of pseudo masks (see the module doc).

    ``maps`` [B,K,H,W] are min-max normalized class maps at mask size, ``selected`` [B,K] the
    classes the masks were built from, ``masks`` [B,H,W] the pseudo masks (labels in 0..L-1,
    ``L = K + 1`` with background). A pixel with all scores 0 gets equal probabilities.
    """
    scores = maps * selected.to(maps.dtype)[:, :, None, None]
    if has_background:
        scores = torch.cat([torch.full_like(scores[:, :1], threshold), scores], 1)
    top = scores.amax(1, keepdim=True)
    scores = scores.scatter(1, masks[:, None].long(), top)
    total = scores.sum(1, keepdim=True)
    return torch.where(total > 0, scores / total.clamp_min(1e-12), 1.0 / scores.shape[1])


def crf_pseudo_masks(images: np.ndarray, maps: Tensor, selected: Tensor, masks: Tensor,
                     threshold: float, has_background: bool, iterations: int = 10) -> Tensor:
    """Refine pseudo masks [B,H,W] with :func:`crf_refine` on ``images`` [B,H,W,C] (0..255).

    Arguments as for :func:`pseudo_mask_probs`. The CRF of an image runs over the labels it can
    take only (background and its selected classes); the result has the dtype and device of
    ``masks``.
    """
    probs = pseudo_mask_probs(maps, selected, masks, threshold, has_background).cpu()
    offset = int(has_background)
    refined = []
    for image, prob, chosen in zip(images, probs, selected.cpu()):
        labels = torch.cat([torch.zeros(offset, dtype=torch.long),
                            chosen.nonzero().flatten() + offset])
        index = crf_refine(image, prob[labels].double().numpy(), iterations)
        refined.append(labels[torch.from_numpy(index)])
    return torch.stack(refined).to(device=masks.device, dtype=masks.dtype)


def images_to_uint8_range(images: Tensor, mean: Tensor, std: Tensor) -> np.ndarray:
    """Normalized images [B,C,H,W] back to colors in 0..255 units, [B,H,W,C] float32.

    ``(x * std + mean) * 255`` clipped to 0..255: the stored image (resized) for 8-bit data,
    whose pixels the datasets scale to [0, 1]. Other data (e.g. GeoTIFF reflectances, used in
    their own units) are mostly clipped to 255 here, which leaves the color kernel blind: the
    CRF is meant for 8-bit images.
    """
    colors = (images.float() * std.to(images.device).view(1, -1, 1, 1)
               + mean.to(images.device).view(1, -1, 1, 1)) * 255.0
    return colors.clamp(0, 255).permute(0, 2, 3, 1).contiguous().cpu().numpy()
