"""How good can raw (unrefined) class maps on a patch grid be? The oracle ceiling per patch size.

A perfect class map at patch size p holds, for each patch, the share of its pixels that belong to
the class: each class's true mask average-pooled by p. Those oracle maps go through the same
read-out as a model's maps (bilinear upsampling, min-max normalisation per map, binarisation at
each threshold, the configured merge, classes from the true image labels) and are scored against
the true masks. No model is involved: the figure bounds what raw attention maps at that patch
size can reach, before any refinement (PAMR, CRF).

With ``--run R`` a trained run's raw maps (its own read-out: fused or attention maps, its
test-time scales, no refinement, classes from the true labels) are scored through the same
read-out beside the oracle at the run's patch size, and both get an error breakdown at their
best threshold: of the pixels given to an object class, the shares that are background or
another class in truth; of the object pixels, the shares read as background or as another class.

    python benchmarks/raw_map_ceiling.py --config src/attnmaps/configs/digits.yaml \\
        --set data.root=data/digits --split tune --patch-sizes 4,8,16
    python benchmarks/raw_map_ceiling.py --run runs/d --split val --patch-sizes 8
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path

import _measure as measure
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from attnmaps.config import load_config
from attnmaps.data.registry import build_dataset
from attnmaps.data.synthetic import write_synthetic_voc
from attnmaps.metrics.segmentation import SegmentationMetric
from attnmaps.pipeline import load_run
from attnmaps.pseudo.masks import make_pseudo_masks
from attnmaps.pseudo.tta import tta_predict

THRESHOLDS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
ERROR_COLUMNS = ("predicted_object_on_background", "predicted_object_on_other_class",
                 "true_object_as_background", "true_object_as_other_class")


def oracle_maps(masks: torch.Tensor, num_classes: int, patch: int) -> torch.Tensor:
    """[B,K,H/p,W/p]: the share of each patch's pixels that carry class k (mask value k + 1);
    ignore pixels (255) count as no class."""
    onehot = torch.stack([(masks == k + 1).float() for k in range(num_classes)], 1)
    return F.avg_pool2d(onehot, patch, ceil_mode=True)


def error_shares(confusion: torch.Tensor) -> dict[str, float]:
    """Where the object classes' pixels go wrong, from a confusion matrix [L,L] (rows = truth,
    label 0 = background): of the pixels predicted as an object, the shares that are background
    / another object class in truth (their sum is 1 - precision); of the true object pixels, the
    shares predicted as background / as another object class (their sum is 1 - recall)."""
    cm = confusion.double()
    correct = cm[1:, 1:].diagonal().sum()
    predicted, true = cm[:, 1:].sum(), cm[1:, :].sum()
    on_background, as_background = cm[0, 1:].sum(), cm[1:, 0].sum()
    return {"predicted_object_on_background": float(on_background / predicted),
            "predicted_object_on_other_class": float((predicted - on_background - correct)
                                                     / predicted),
            "true_object_as_background": float(as_background / true),
            "true_object_as_other_class": float((true - as_background - correct) / true)}


def score_maps(loader: DataLoader, num_classes: int, merge: str,
               maps_and_probs: Callable[[dict], tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """mIoU at every threshold of :data:`THRESHOLDS` of the maps ``maps_and_probs(batch)`` gives
    (classes from the true labels), and the error shares at the best threshold."""
    metrics = {t: SegmentationMetric(num_classes + 1) for t in THRESHOLDS}
    for batch in loader:
        masks, labels = batch["mask"], batch["labels"]
        maps, probs = maps_and_probs(batch)
        for threshold, metric in metrics.items():
            metric.update(make_pseudo_masks(maps, probs, tuple(masks.shape[-2:]),
                                            threshold=threshold, has_background=True,
                                            labels=labels, merge=merge), masks)
    scores = {t: m.compute() for t, m in metrics.items()}
    best = max(scores, key=lambda t: scores[t]["miou"])
    return {"miou_by_threshold": {t: s["miou"] for t, s in scores.items()},
            "best_threshold": best, "errors_at_best": error_shares(scores[best]["confusion"])}


def ceiling(loader: DataLoader, num_classes: int, patch: int, merge: str) -> dict:
    """:func:`score_maps` of the oracle maps at patch size ``patch``."""
    return score_maps(loader, num_classes, merge, lambda batch: (
        oracle_maps(batch["mask"], num_classes, patch), batch["labels"]))


@torch.no_grad()
def run_scores(run: Path, loader: DataLoader, num_classes: int) -> dict:
    """:func:`score_maps` of a trained run's raw maps, read out as the run's config says."""
    cfg, model = load_run(run)
    model.eval()
    blocks = model.resolve_attn_blocks(cfg.model.attn_blocks)

    def maps_and_probs(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        logits, maps = tta_predict(model, batch["image"], cfg.pseudo.tta_scales,
                                   cfg.pseudo.tta_flip, blocks, fused=cfg.pseudo.maps == "fused")
        return maps.float(), logits.float().sigmoid()

    return score_maps(loader, num_classes, cfg.pseudo.merge, maps_and_probs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--config", type=Path, default=None)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--split", default="val")
    parser.add_argument("--patch-sizes", default="4,8,16")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/raw_map_ceiling.json"))
    parser.add_argument("--quick", action="store_true",
                        help="a written synthetic set of 16 validation images (64 px)")
    source.add_argument("--run", type=Path, default=None,
                        help="also score this trained run's raw maps (and read its config)")
    args = parser.parse_args()
    overrides = list(args.set)
    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:
            root = write_synthetic_voc(Path(tmp), num_train=1, num_val=16)
            overrides += ["data.name=voc", f"data.root={root}"]
        config = args.run / "config.yaml" if args.run is not None else args.config
        cfg = load_config(config, overrides)
        dataset = build_dataset(cfg.data, args.split, train=False)
        if not dataset.has_background:
            raise SystemExit("the ceiling is defined for sets with a background class")
        loader = DataLoader(dataset, batch_size=50)
        table = {f"oracle, patch {p}": ceiling(loader, dataset.num_classes, p, cfg.pseudo.merge)
                 for p in (int(p) for p in args.patch_sizes.split(","))}
        if args.run is not None:
            table[f"run {args.run.name}"] = run_scores(args.run, loader, dataset.num_classes)
    measure.print_table(["maps", *[f"t={t}" for t in THRESHOLDS], *ERROR_COLUMNS],
                        [[name, *[f"{v:.3f}" for v in row["miou_by_threshold"].values()],
                          *[f"{row['errors_at_best'][k]:.2f}" for k in ERROR_COLUMNS]]
                         for name, row in table.items()])
    measure.write_json(args.out, {
        "config": {**vars(args), "config": str(config), "out": str(args.out),
                   "run": str(args.run)},
        "split": args.split, "num_images": len(dataset), "merge": cfg.pseudo.merge,
        "by_maps": {name: {**row, "miou_by_threshold": {str(t): v for t, v in
                                                        row["miou_by_threshold"].items()}}
                    for name, row in table.items()},
        "best": {name: max(row["miou_by_threshold"].values()) for name, row in table.items()}})


if __name__ == "__main__":
    main()
