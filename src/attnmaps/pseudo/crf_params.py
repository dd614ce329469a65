"""The dense CRF's parameters, kept free of torch so that the config can take its defaults
from them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CRFParams:
    """Mean-field steps and kernel parameters (pixels, color units 0..255, weights).

    The defaults are those of the attention/CAM seed refinement in PSA (Ahn & Kwak, CVPR 2018)
    and the WSSS code built on it.
    """

    iterations: int = 10
    gaussian_sxy: float = 3.0
    gaussian_compat: float = 3.0
    bilateral_sxy: float = 80.0
    bilateral_srgb: float = 13.0
    bilateral_compat: float = 10.0
    # The torch backend's appearance kernel on a grid of factor x factor pixel blocks (their
    # mean positions and colors); 1: on every pixel, as pydensecrf.
    bilateral_downsample: int = 2

    def __post_init__(self) -> None:
        if self.bilateral_downsample < 1:
            raise ValueError(f"CRF pseudo.crf_bilateral_downsample must be >= 1, got "
                             f"{self.bilateral_downsample}")
        if self.iterations < 0:
            raise ValueError(f"CRF iterations (pseudo.crf_iterations) must be >= 0, got "
                             f"{self.iterations}")
        for name in ("gaussian_sxy", "bilateral_sxy", "bilateral_srgb"):
            if not getattr(self, name) > 0:
                raise ValueError(f"CRF kernel width pseudo.crf_{name} must be > 0, got "
                                 f"{getattr(self, name)}")
