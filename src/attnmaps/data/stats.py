"""Dataset statistics: per-channel mean/std, sizes, class frequencies.

Pixels are read as stored (original size, no resizing or augmentation) and in the units the
loaders normalize, i.e. uint8 images divided by 255 and other dtypes (e.g. uint16 GeoTIFF bands)
raw, so the ``mean``/``std`` found can be given as ``data.mean``/``data.std`` directly.

>>> stats = dataset_stats(build_dataset(cfg.data, "train", train=False))  # doctest: +SKIP
>>> print(format_stats(stats))  # doctest: +SKIP
"""

from __future__ import annotations

import numpy as np

from ..conventions import IGNORE_INDEX
from .base import ImageDataset, image_to_float


def dataset_stats(dataset: ImageDataset) -> dict:
    """Statistics of all images of ``dataset`` as a JSON-serialisable dict.

    Keys: ``num_images``, ``num_masks`` (images with a mask), ``channels``; per channel ``mean``,
    ``std`` (population std over all pixels of all images, accumulated in float64 by merging
    per-image means and squared deviations), ``min``, ``max``; ``height`` and ``width`` as
    [smallest, largest]; ``class_names`` (the K classes); ``image_counts`` (images labelled with
    each class); from the masks, ``pixel_fraction`` (share of each class among non-ignore pixels),
    ``background_fraction`` (None without background) and ``ignore_fraction`` (share of 255
    pixels), all None when no image has a mask.
    """
    if len(dataset) == 0:
        raise ValueError("dataset_stats needs a dataset with at least one image")
    count, mean, m2 = 0, np.float64(0.0), np.float64(0.0)
    low, high, heights, widths = np.float64(np.inf), np.float64(-np.inf), [], []
    image_counts = np.zeros(dataset.num_classes, dtype=np.int64)
    label_counts = np.zeros(IGNORE_INDEX + 1, dtype=np.int64)
    num_masks = 0
    for i in range(len(dataset)):
        stored = dataset.checked_image(i)
        mask, labels = dataset.load_target(i, stored.shape)
        pixels = image_to_float(stored, np.float64).reshape(-1, stored.shape[2])
        n, image_mean = pixels.shape[0], pixels.mean(axis=0)
        image_m2 = ((pixels - image_mean) ** 2).sum(axis=0)
        delta, total = image_mean - mean, count + n
        mean = mean + delta * (n / total)
        m2 = m2 + image_m2 + delta**2 * (count * n / total)
        count = total
        low, high = np.minimum(low, pixels.min(axis=0)), np.maximum(high, pixels.max(axis=0))
        heights.append(stored.shape[0])
        widths.append(stored.shape[1])
        image_counts += labels.numpy() > 0.5
        if mask is not None:
            num_masks += 1
            label_counts += np.bincount(mask.ravel(), minlength=IGNORE_INDEX + 1)
    offset = 1 if dataset.has_background else 0
    names = dataset.class_names[offset:]
    pixel_fraction = background_fraction = ignore_fraction = None
    if num_masks:
        labelled = max(int(label_counts[:IGNORE_INDEX].sum()), 1)
        pixel_fraction = (label_counts[offset:offset + dataset.num_classes] / labelled).tolist()
        if offset:
            background_fraction = float(label_counts[0] / labelled)
        ignore_fraction = float(label_counts[IGNORE_INDEX] / label_counts.sum())
    return {
        "num_images": len(dataset),
        "num_masks": num_masks,
        "channels": int(mean.shape[0]),
        "mean": mean.tolist(),
        "std": np.sqrt(m2 / count).tolist(),
        "min": low.tolist(),
        "max": high.tolist(),
        "height": [min(heights), max(heights)],
        "width": [min(widths), max(widths)],
        "class_names": list(names),
        "image_counts": image_counts.tolist(),
        "pixel_fraction": pixel_fraction,
        "background_fraction": background_fraction,
        "ignore_fraction": ignore_fraction,
    }


def format_stats(stats: dict) -> str:
    """A text report of :func:`dataset_stats`: sizes, a channel table, a class table and the
    ``data.mean=... data.std=...`` overrides."""
    lines = [(f"images: {stats['num_images']} ({stats['num_masks']} with masks), channels: "
              f"{stats['channels']}, height {stats['height'][0]}..{stats['height'][1]}, "
              f"width {stats['width'][0]}..{stats['width'][1]}"),
             "",
             f"{'channel':>7} {'mean':>10} {'std':>10} {'min':>10} {'max':>10}"]
    for c in range(stats["channels"]):
        values = (stats[key][c] for key in ("mean", "std", "min", "max"))
        lines.append(f"{c:>7} " + " ".join(f"{v:>10.4f}" for v in values))
    width = max(len("background"), *(len(n) for n in stats["class_names"]))
    lines += ["", f"{'class':<{width}} {'images':>7} {'% images':>9} {'% pixels':>9}"]
    pixels = stats["pixel_fraction"]
    if stats["background_fraction"] is not None:
        lines.append(f"{'background':<{width}} {'-':>7} {'-':>9} "
                     f"{100 * stats['background_fraction']:>9.2f}")
    for k, name in enumerate(stats["class_names"]):
        share = f"{100 * pixels[k]:>9.2f}" if pixels is not None else f"{'-':>9}"
        images = stats["image_counts"][k]
        lines.append(f"{name:<{width}} {images:>7} {100 * images / stats['num_images']:>9.2f} "
                     f"{share}")
    if stats["ignore_fraction"] is not None:
        lines.append(f"ignore (255) pixels: {100 * stats['ignore_fraction']:.2f} %")
    mean = ",".join(f"{v:.6g}" for v in stats["mean"])
    std = ",".join(f"{v:.6g}" for v in stats["std"])
    lines += ["", f"data.mean={mean} data.std={std}"]
    return "\n".join(lines)
