"""Fully connected CRF refinement of pseudo masks (Krähenbühl & Koltun, NeurIPS 2011).

Two backends compute the same CRF (:class:`~attnmaps.pseudo.crf_torch.CRFParams`: 10 mean-field
steps, an appearance (bilateral) kernel with ``sxy=80``, ``srgb=13``, ``compat=10`` and a
smoothness (Gaussian) kernel with ``sxy=3``, ``compat=3``, colors in 0..255 units, the defaults
of PSA's (Ahn & Kwak, CVPR 2018) seed refinement; IRN's label-map CRF uses ``sxy=50``,
``srgb=5``), chosen by ``pseudo.crf_backend``:

* ``torch`` (default): :func:`~attnmaps.pseudo.crf_torch.dense_crf`, plain torch, batched, on the
  masks' device;
* ``pydensecrf``: the optional extra ``pydensecrf2`` (``pip install "attnmaps[crf]"``; it
  installs the module ``pydensecrf`` and builds from source, so a C++ compiler is needed),
  image by image on the CPU, imported only when called.

Unary of a pseudo mask (:func:`pseudo_mask_probs`): every label gets a score, the background
the binarisation threshold and each selected class its min-max normalized map (unselected
classes 0); the label the pseudo mask gave the pixel is raised to the pixel's highest score, so
the CRF starts from the pseudo mask; the scores divided by their sum are the probabilities. A
pixel whose map barely clears the threshold is thus a near tie, one deep inside an object or
far from all objects a confident one. The CRF of an image runs over the labels it can take only
(background and its selected classes).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import Tensor

from ..config import PseudoMaskConfig
from .crf_torch import DEFAULT_PARAMS, PROB_FLOOR, CRFParams, dense_crf

INSTALL_HINT = 'pip install "attnmaps[crf]"  (the pydensecrf2 package)'
BACKENDS = ("torch", "pydensecrf")


def crf_params(settings: PseudoMaskConfig) -> CRFParams:
    """The CRF parameters of the ``pseudo.crf_*`` config keys."""
    return CRFParams(**{field.name: getattr(settings, f"crf_{field.name}")
                        for field in dataclasses.fields(CRFParams)})


def crf_refine(image: np.ndarray, probs: np.ndarray, params: CRFParams = DEFAULT_PARAMS
               ) -> np.ndarray:
    """Labels [H,W] (int64) of ``pydensecrf``'s dense CRF with unary ``-log probs`` on ``image``.

    Args:
        image: [H,W,C] colors in 0..255 units (uint8 RGB typically; any channel count).
        probs: [L,H,W] label probabilities (clipped at 1e-5; rows need not sum to one).
        params: mean-field steps, kernel widths (pixels, color units) and weights.
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
    appearance = np.concatenate([position / params.bilateral_sxy, colors / params.bilateral_srgb])
    for features, compat in ((position / params.gaussian_sxy, params.gaussian_compat),
                             (appearance, params.bilateral_compat)):
        crf.addPairwiseEnergy(np.ascontiguousarray(features, dtype=np.float32), compat=compat)
    q = np.asarray(crf.inference(params.iterations)).reshape(num_labels, height, width)
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


def crf_pseudo_masks(colors: Tensor, maps: Tensor, selected: Tensor, masks: Tensor,
                     threshold: float, has_background: bool, params: CRFParams = DEFAULT_PARAMS,
                     backend: str = "torch") -> Tensor:
    """Refine pseudo masks [B,H,W] with the dense CRF on ``colors`` [B,H,W,C] (0..255).

    Arguments as for :func:`pseudo_mask_probs`; ``backend`` is ``"torch"``
    (:func:`~attnmaps.pseudo.crf_torch.dense_crf`, one call for the batch) or
    ``"pydensecrf"`` (:func:`crf_refine`, image by image). Each image's CRF runs over the labels
    it can take only (background and its selected classes); the result has the dtype and
    device of ``masks``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"pseudo.crf_backend must be one of {BACKENDS}, got {backend!r}")
    probs = pseudo_mask_probs(maps, selected, masks, threshold, has_background)
    allowed = torch.cat([selected.new_ones(len(selected), int(has_background), dtype=torch.bool),
                         selected.bool()], 1)
    # Each image's labels first, in label order, padded with labels it cannot take.
    labels = (~allowed).int().argsort(dim=1, stable=True)[:, :int(allowed.sum(1).max())]
    probs = probs.gather(1, labels[:, :, None, None].expand(-1, -1, *probs.shape[-2:]))
    allowed = allowed.gather(1, labels)
    if backend == "torch":
        index = dense_crf(colors, probs, params, allowed).argmax(1)
    else:
        index = torch.stack([
            torch.from_numpy(crf_refine(image.cpu().numpy(), prob[keep].double().cpu().numpy(),
                                        params))
            for image, prob, keep in zip(colors, probs, allowed)]).to(labels.device)
    refined = labels.gather(1, index.flatten(1)).view_as(index)
    return refined.to(device=masks.device, dtype=masks.dtype)


def images_to_uint8_range(images: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Normalized images [B,C,H,W] back to colors in 0..255 units, [B,H,W,C] float32, on the
    images' device.

    ``(x * std + mean) * 255`` clipped to 0..255: the stored image (resized) for 8-bit data,
    whose pixels the datasets scale to [0, 1]. Other data (e.g. GeoTIFF reflectances, used in
    their own units) are mostly clipped to 255 here, which leaves the color kernel blind: the
    CRF is meant for 8-bit images.
    """
    colors = (images.float() * std.to(images.device).view(1, -1, 1, 1)
               + mean.to(images.device).view(1, -1, 1, 1)) * 255.0
    return colors.clamp(0, 255).permute(0, 2, 3, 1).contiguous()
