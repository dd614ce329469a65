"""Mixed supervision: pseudo-mask mIoU against the fraction of training images with masks.

Trains the demo model from scratch on the demo's synthetic data with ``train.mask_fraction`` in
``--fractions`` (CAMAL on the class-token attention of those images, see
``attnmaps.engine.objective``), scores the pseudo masks of the held-out images, prints the
table, writes ``--out/mixed_supervision.json`` and the curve ``--out/mixed_supervision.png``.

    python benchmarks/mixed_supervision.py --out runs/mixed --epochs 5 --seeds 1
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from _variants import ensure_data, print_summary, run_variants, summarise

from attnmaps.demo import NUM_TRAIN

KEYS = ("miou", "miou_true_labels", "map", "class_map_correlation")


def plot(summary: dict, fractions: list[float], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    x = [100 * f for f in fractions]
    for key, label in (("miou", "predicted labels"), ("miou_true_labels", "true labels")):
        means = [summary[f"{f:g}"][key][0] for f in fractions]
        stds = [summary[f"{f:g}"][key][1] for f in fractions]
        ax.errorbar(x, means, yerr=stds, marker="o", capsize=3, label=label)
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xticks(x, [f"{v:g}" for v in x])
    ax.minorticks_off()
    ax.set_xlabel("training images with masks (%)")
    ax.set_ylabel("pseudo-mask mIoU (held-out)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/mixed"))
    parser.add_argument("--fractions", type=float, nargs="+", default=[0, 0.01, 0.05, 0.1, 0.25])
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--num-train", type=int, default=NUM_TRAIN)
    parser.add_argument("--guide-weight", type=float, default=1.0)
    args = parser.parse_args()
    data = ensure_data(args.out / "data", args.num_train)
    variants = {f"{f:g}": [f"train.mask_fraction={f}", f"train.guide_weight={args.guide_weight}"]
                for f in args.fractions}
    results = run_variants(args.out, data, variants, args.seeds, KEYS,
                           [f"train.epochs={args.epochs}"])
    summary = summarise(results, KEYS)
    print_summary(summary, KEYS, width=10)
    (args.out / "mixed_supervision.json").write_text(json.dumps(
        {"fractions": args.fractions, "epochs": args.epochs, "runs": results, "summary": summary},
        indent=2))
    plot(summary, args.fractions, args.out / "mixed_supervision.png")


if __name__ == "__main__":
    main()
