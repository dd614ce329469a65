"""``attnmaps predict``: masks and overlays for image files of any size, one error per bad file.

Each readable image (greyscale, palette and RGBA files are converted to RGB) gives
``OUT/<name>.png`` (indexed PNG mask, VOC palette) and ``OUT/<name>_overlay.png`` (the image
blended with the mask, with a class legend). Images of equal size are batched together.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..data.image_io import read_image, write_image, write_mask
from ..progress import logger, progress
from ..report.overlay import with_legend
from .predictors import Predictor

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def list_images(inputs: Sequence[Path]) -> list[Path]:
    """The files of ``inputs``: a directory gives its image files (by suffix, sorted), any other
    path is kept as it is (a missing or unreadable one is reported when read)."""
    paths: list[Path] = []
    for path in inputs:
        if path.is_dir():
            paths += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            paths.append(path)
    return paths


def predict_files(predictor: Predictor, inputs: Sequence[Path], out_dir: Path,
                  batch_size: int = 8) -> dict:
    """Write the mask and overlay of every image in ``inputs`` (files or directories) to
    ``out_dir``; returns ``{"written": [names], "failed": {path: error}}``. A file that cannot be
    read is logged and skipped; the others are still predicted."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    failed: dict[str, str] = {}
    pending: dict[tuple[int, int], list[tuple[Path, np.ndarray]]] = defaultdict(list)

    def flush(size: tuple[int, int]) -> None:
        items = pending.pop(size)
        images = torch.stack([predictor.normalize(image) for _, image in items])
        masks, _ = predictor(images)
        for (path, image), mask in zip(items, masks.cpu().numpy().astype(np.uint8)):
            write_mask(out_dir / f"{path.stem}.png", mask)
            write_image(out_dir / f"{path.stem}_overlay.png",
                        with_legend(image, mask, predictor.class_names))
            written.append(path.stem)

    for path in progress(list_images(inputs), "predict"):
        try:
            image = read_image(path)
        except (OSError, ValueError) as error:
            logger.error("skipped %s: %s", path, error)
            failed[str(path)] = str(error)
            continue
        pending[image.shape[:2]].append((path, image))
        if len(pending[image.shape[:2]]) == batch_size:
            flush(image.shape[:2])
    for size in list(pending):
        flush(size)
    return {"written": written, "failed": failed}
