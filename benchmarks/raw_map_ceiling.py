"""How good can raw (unrefined) class maps on a patch grid be? The oracle ceiling per patch size.

A perfect class map at patch size p holds, for each patch, the share of its pixels that belong to
the class: each class's true mask average-pooled by p. Those oracle maps go through the same
read-out as a model's maps (bilinear upsampling, min-max normalisation per map, binarisation at
each threshold, the configured merge, classes from the true image labels) and are scored against
the true masks. No model is involved: the figure bounds what raw attention maps at that patch
size can reach, before any refinement (PAMR, CRF).

    python benchmarks/raw_map_ceiling.py --config src/attnmaps/configs/digits.yaml \\
        --set data.root=data/digits --split tune --patch-sizes 4,8,16
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import _measure as measure
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from attnmaps.config import load_config
from attnmaps.data.registry import build_dataset
from attnmaps.data.synthetic import write_synthetic_voc
from attnmaps.metrics.segmentation import SegmentationMetric
from attnmaps.pseudo.masks import make_pseudo_masks

THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)


def oracle_maps(masks: torch.Tensor, num_classes: int, patch: int) -> torch.Tensor:
    """[B,K,H/p,W/p]: the share of each patch's pixels that carry class k (mask value k + 1);
    ignore pixels (255) count as no class."""
    onehot = torch.stack([(masks == k + 1).float() for k in range(num_classes)], 1)
    return F.avg_pool2d(onehot, patch, ceil_mode=True)


def ceiling(loader: DataLoader, num_classes: int, patch: int, merge: str) -> dict[float, float]:
    """mIoU of the oracle maps at every threshold of :data:`THRESHOLDS`."""
    metrics = {t: SegmentationMetric(num_classes + 1) for t in THRESHOLDS}
    for batch in loader:
        masks, labels = batch["mask"], batch["labels"]
        maps = oracle_maps(masks, num_classes, patch)
        for threshold, metric in metrics.items():
            metric.update(make_pseudo_masks(maps, labels, tuple(masks.shape[-2:]),
                                            threshold=threshold, has_background=True,
                                            labels=labels, merge=merge), masks)
    return {t: m.compute()["miou"] for t, m in metrics.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--split", default="val")
    parser.add_argument("--patch-sizes", default="4,8,16")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/raw_map_ceiling.json"))
    parser.add_argument("--quick", action="store_true",
                        help="a written synthetic set of 16 validation images (64 px)")
    args = parser.parse_args()
    overrides = list(args.set)
    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:
            root = write_synthetic_voc(Path(tmp), num_train=1, num_val=16)
            overrides += ["data.name=voc", f"data.root={root}"]
        cfg = load_config(args.config, overrides)
        dataset = build_dataset(cfg.data, args.split, train=False)
        if not dataset.has_background:
            raise SystemExit("the ceiling is defined for sets with a background class")
        loader = DataLoader(dataset, batch_size=50)
        table = {patch: ceiling(loader, dataset.num_classes, patch, cfg.pseudo.merge)
                 for patch in (int(p) for p in args.patch_sizes.split(","))}
    measure.print_table(["patch", *[f"t={t}" for t in THRESHOLDS]],
                        [[p, *[f"{v:.3f}" for v in row.values()]] for p, row in table.items()])
    measure.write_json(args.out, {
        "config": {**vars(args), "config": str(args.config), "out": str(args.out)},
        "split": args.split, "num_images": len(dataset), "merge": cfg.pseudo.merge,
        "miou_by_patch_and_threshold": {str(p): {str(t): v for t, v in row.items()}
                                        for p, row in table.items()},
        "best_by_patch": {str(p): max(row.values()) for p, row in table.items()}})


if __name__ == "__main__":
    main()
