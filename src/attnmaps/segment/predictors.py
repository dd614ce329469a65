"""What a run predicts for a batch of images: the second stage's network, or the stage-1
class-token pseudo masks from the predicted labels. :func:`load_predictor` picks by the run's
weights file.

Both take normalized images [B,C,H,W] of any size and return ``(masks [B,H,W] int64, class maps
[B,K,H,W] in [0, 1])``: the K foreground classes' softmax probabilities (stage 2) or their
PAMR-refined, min-max normalized attention (stage 1), for pictures.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checkpoint import checkpoint_paths, read_metadata
from ..config import Config, SegmentConfig, load_config
from ..data.base import image_to_float
from ..models.vit import ClassTokenViT
from ..pipeline import load_run
from ..pseudo.masks import class_scores, make_pseudo_masks, select_classes
from ..pseudo.tta import tta_predict
from ..runtime import resolve_device
from .model import is_segmenter, load_segmenter
from .predict import infer_probs


class Predictor:
    """Normalization, class names and device shared by both kinds (see the module doc)."""

    kind = ""

    def __init__(self, class_names: Sequence[str], num_classes: int, mean: Sequence[float],
                 std: Sequence[float], device: torch.device):
        self.class_names = list(class_names)
        self.label_offset = len(self.class_names) - num_classes
        self.device = device
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def normalize(self, image: np.ndarray) -> Tensor:
        """uint8 RGB [H,W,3] -> normalized float [3,H,W], as the run's dataset does."""
        return (torch.from_numpy(image_to_float(image)).permute(2, 0, 1) - self.mean) / self.std

    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


class SegmenterPredictor(Predictor):
    """The second stage's network, inferred as its ``segment.inference`` says and refined as its
    ``segment.refine_iterations`` says."""

    kind = "segmentation network (stage 2)"

    def __init__(self, net: nn.Module, seg: SegmentConfig, class_names: Sequence[str],
                 num_classes: int, cfg: Config, device: torch.device):
        super().__init__(class_names, num_classes, cfg.data.mean, cfg.data.std, device)
        self.net, self.seg = net.to(device).eval(), seg

    @torch.no_grad()
    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor]:
        probs = infer_probs(self.net, images.to(self.device), self.seg)
        return probs.argmax(1), probs[:, self.label_offset:]


class ClassTokenPredictor(Predictor):
    """Stage-1 pseudo masks from the predicted labels: the class-token maps of the image resized
    to the training size, upsampled to the image, PAMR-refined on it and binarised with the
    run's ``pseudo`` settings."""

    kind = "class-token masks, predicted labels (stage 1)"

    def __init__(self, model: ClassTokenViT, cfg: Config, class_names: Sequence[str],
                 device: torch.device):
        super().__init__(class_names, model.num_classes, cfg.data.mean, cfg.data.std, device)
        self.model, self.cfg = model.to(device).eval(), cfg
        self.size = tuple(cfg.data.image_size or cfg.model.img_size)

    @torch.no_grad()
    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor]:
        settings = self.cfg.pseudo
        images = images.to(self.device)
        resized = F.interpolate(images, size=self.size, mode="bilinear", align_corners=False)
        logits, maps = tta_predict(self.model, resized, settings.tta_scales, settings.tta_flip,
                                   self.cfg.model.attn_blocks, fused=settings.maps == "fused")
        probs = logits.float().sigmoid()
        selected = select_classes(probs, None, settings.prob_threshold)
        scores = class_scores(images, maps.float(), selected, settings.refine_iterations)
        masks = make_pseudo_masks(scores, probs, tuple(images.shape[-2:]),
                                  threshold=settings.threshold,
                                  has_background=self.label_offset > 0,
                                  prob_threshold=settings.prob_threshold, merge=settings.merge)
        return masks, scores


def load_predictor(run_dir: Path, device: str = "auto", inference: str | None = None,
                   refine_iterations: int | None = None) -> Predictor:
    """The predictor of a run directory: stage 2 when its weights are a second-stage network
    (``inference`` and ``refine_iterations`` replace its ``segment.inference`` and
    ``segment.refine_iterations`` when given), else the stage-1 class-token model (which always
    sees the image resized to its training size)."""
    config_path = run_dir / "config.yaml"
    weights, _ = checkpoint_paths(run_dir)
    for path in (config_path, weights):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found; --model must be a run directory written "
                                    "by 'attnmaps train' or 'attnmaps segment'")
    cfg = load_config(config_path)
    if cfg.model.in_chans != 3:
        raise ValueError(f"attnmaps predict reads RGB image files; the run {run_dir} has "
                         f"model.in_chans={cfg.model.in_chans}")
    target = resolve_device(device)
    if is_segmenter(weights):
        net, seg, names = load_segmenter(weights)
        if inference is not None:
            seg = dataclasses.replace(seg, inference=inference)
        if refine_iterations is not None:
            if refine_iterations < 0:
                raise ValueError(f"--refine-iterations must be 0 or more, got {refine_iterations}")
            seg = dataclasses.replace(seg, refine_iterations=refine_iterations)
        num_classes = int(read_metadata(weights)["num_classes"])
        return SegmenterPredictor(net, seg, names or default_names(num_classes), num_classes,
                                  cfg, target)
    cfg, model = load_run(run_dir)
    names = json.loads(read_metadata(weights).get("class_names", "null"))
    return ClassTokenPredictor(model, cfg, names or default_names(model.num_classes), target)


def default_names(num_classes: int) -> list[str]:
    """``background, class_1 .. class_K`` for runs saved without class names."""
    return ["background"] + [f"class_{c + 1}" for c in range(num_classes)]
