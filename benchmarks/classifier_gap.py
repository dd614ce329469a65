"""Where does a trained run's classifier stand? For each split: the mean BCE and mAP of the class
tokens' logits, of the auxiliary patch head's max-pooled logits and of their ensemble (the mean
of the two probabilities), each from one pass and averaged over ``--scales`` (test-time
scales, as ``pseudo.tta_scales``). Training images against held-out ones measure over-fitting
(the generalisation gap); the heads side by side measure whether a second classifier would add
anything. A diagnostic for the small-data section of the README.

    python benchmarks/classifier_gap.py --run runs/d --splits train tune --limit 500
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from attnmaps.data.registry import build_dataset
from attnmaps.metrics.classification import MultiLabelMetric
from attnmaps.models.vit import ClassTokenViT
from attnmaps.pipeline import load_run
from attnmaps.pseudo.tta import mean_probability_logits, scaled_size


def head_logits(model: ClassTokenViT, images: Tensor, scale: float) -> dict[str, Tensor]:
    """Logits [B,K] of the class tokens (and, with a patch head, of the patch head and of the
    two heads' mean probability) for ``images`` resized by ``scale``."""
    size = scaled_size(images.shape[-2:], scale, model.patch_size)
    if size != tuple(images.shape[-2:]):
        images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
    out = model.forward_features(images, patch_outputs=model.patch_head is not None)
    logits = {"class tokens": model.forward_head(out["cls"])}
    if model.patch_head is not None:
        logits["patch head"] = model.patch_logits(out["patch"])
        logits["ensemble"] = mean_probability_logits(torch.stack(list(logits.values())))
    return logits


@torch.no_grad()
def classifier_scores(model: ClassTokenViT, dataset, scales: list[float],
                      batch_size: int = 64) -> dict[str, dict[str, float]]:
    """``{"<head>, 1 scale" | "<head>, N scales": {"bce", "map"}}`` of ``model`` on
    ``dataset``; the N-scale logits are the logits of the mean probability over ``scales``."""
    model.eval()
    metrics: dict[str, MultiLabelMetric] = {}
    losses: dict[str, float] = {}
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        per_scale = {scale: head_logits(model, batch["image"], scale)
                     for scale in dict.fromkeys([1.0, *scales])}
        read_outs = {f"{head}, 1 scale": logits for head, logits in per_scale[1.0].items()}
        for head in per_scale[1.0]:
            stacked = torch.stack([per_scale[scale][head] for scale in scales])
            read_outs[f"{head}, {len(scales)} scales"] = mean_probability_logits(stacked)
        for name, logits in read_outs.items():
            metrics.setdefault(name, MultiLabelMetric(model.num_classes)).update(
                logits.sigmoid(), batch["labels"])
            losses[name] = losses.get(name, 0.0) + F.binary_cross_entropy_with_logits(
                logits, batch["labels"], reduction="sum").item()
    count = len(dataset) * model.num_classes
    return {name: {"bce": losses[name] / count, "map": metric.compute()["map"]}
            for name, metric in metrics.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a run directory (attnmaps train)")
    parser.add_argument("--splits", nargs="+", default=["train", "tune"])
    parser.add_argument("--limit", type=int, default=500, help="first N images of each split")
    parser.add_argument("--scales", type=float, nargs="+", default=[0.75, 1.0, 1.25])
    parser.add_argument("--out", type=Path, default=None, help="JSON (default RUN/classifier_gap.json)")
    args = parser.parse_args()
    cfg, model = load_run(args.run, device="cpu")
    report = {"run": str(args.run), "limit": args.limit, "scales": args.scales, "splits": {}}
    for split in args.splits:
        dataset = build_dataset(cfg.data, split, train=False)
        dataset = Subset(dataset, range(min(args.limit, len(dataset))))
        report["splits"][split] = classifier_scores(model, dataset, args.scales)
        for name, score in report["splits"][split].items():
            print(f"{split:8s} {name:26s} BCE {score['bce']:.3f}  mAP {score['map']:.3f}")
    out = args.out or args.run / "classifier_gap.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
