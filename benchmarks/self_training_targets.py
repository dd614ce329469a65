"""How far can self-training take a run's raw maps? Its targets, read out as maps, beside the
run's own attention and fused maps.

For a trained run, on the first ``--images`` images of a split, single scale, refinement off,
true labels: the pseudo-mask mIoU of (a) the run's class-token attention maps, (b) its fused maps
(with a patch head), (c) the self-training targets (:func:`refined_patch_targets`: the run's own
maps refined and binarised, as patch shares) for each ``ITERATIONS:CELL`` setting. Also the
cross-entropy from the first setting's targets to the attention (what
``train.self_train_attention_weight`` minimises) beside the targets' own entropy, its floor.

    python benchmarks/self_training_targets.py --run runs/d --split tune --settings 10:4 40:8
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from attnmaps.data.registry import build_dataset
from attnmaps.engine.evaluate import PseudoMaskEvaluator
from attnmaps.engine.self_training import attention_target_loss, refined_patch_targets
from attnmaps.pipeline import load_run


@torch.no_grad()
def target_scores(run: Path, split: str, images: int, settings: list[tuple[int, int]],
                  batch_size: int = 50) -> dict:
    """The scores above for ``run`` on the first ``images`` images of ``split``."""
    cfg, model = load_run(run)
    dataset = build_dataset(cfg.data, split, train=False)
    subset = Subset(dataset, range(min(images, len(dataset))))
    blocks = model.resolve_attn_blocks(cfg.model.attn_blocks)
    raw = replace(cfg.pseudo, refine_iterations=0, tta_scales=[1.0])
    names = ["attention", *(["fused"] if model.patch_head is not None else []),
             *(f"targets {iterations}:{cell}" for iterations, cell in settings)]
    evaluators = {name: PseudoMaskEvaluator(dataset.num_classes, raw) for name in names}
    sums = torch.zeros(3)
    for batch in DataLoader(subset, batch_size=batch_size):
        images_, labels, masks = batch["image"], batch["labels"], batch["mask"]
        out = model.forward_features(images_, attn_blocks=blocks)
        attention = model.class_maps(out["attn"], blocks, out["grid"])
        probs = model.forward_head(out["cls"]).sigmoid()
        maps = {"attention": attention}
        if model.patch_head is not None:
            maps["fused"] = model.fused_maps(attention, out["patch"])
        for iterations, cell in settings:
            targets = refined_patch_targets(model, images_, labels, cfg.pseudo, iterations,
                                            blocks, dataset.has_background, cell)
            maps[f"targets {iterations}:{cell}"] = targets.reshape(attention.shape)
            if (iterations, cell) == settings[0]:  # means over the present classes' maps
                present = (labels > 0.5) & (targets.sum(-1) > 0)
                count = present.sum().item()
                sums += torch.tensor([  # a distribution's cross-entropy to itself: its entropy
                    attention_target_loss(attention.flatten(2), targets, present) * count,
                    attention_target_loss(targets, targets, present) * count, count])
        for name, evaluator in evaluators.items():
            evaluator.update(images_, labels, masks, probs, maps[name])
    scores = {name: evaluator.compute()["miou_true_labels"] for name, evaluator in
              evaluators.items()}
    cross, entropy, count = sums.tolist()
    return {"miou_true_labels": scores, "cross_entropy": cross / max(count, 1),
            "target_entropy": entropy / max(count, 1), "images": len(subset)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--split", default="tune")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--settings", nargs="+", default=["10:4", "40:8"],
                        help="ITERATIONS:CELL of the targets (PAMR iterations, pixels per patch)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/self_training_targets.json"))
    args = parser.parse_args()
    try:
        settings = [tuple(int(part) for part in item.split(":")) for item in args.settings]
        if any(len(item) != 2 for item in settings):
            raise ValueError(args.settings)
    except ValueError:
        parser.error(f"--settings {args.settings}: expected ITERATIONS:CELL pairs such as 10:4")
    result = target_scores(args.run, args.split, args.images, settings)
    for name, score in result["miou_true_labels"].items():
        print(f"{name:16s} raw mIoU from true labels {score:.3f}")
    print(f"cross-entropy targets -> attention {result['cross_entropy']:.3f}; targets' entropy "
          f"{result['target_entropy']:.3f} ({result['images']} {args.split} images)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"run": str(args.run), "split": args.split,
                                    "settings": args.settings, **result}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
