"""Component ablation at the demo's budget: full method vs masking off, gates off, no register,
and the class-attention design (class tokens in the last 2 blocks only).

Trains every variant from scratch on the demo's synthetic data for each seed and prints the
pseudo-mask mIoU (predicted and true labels), classifier mAP and class-map correlation as
mean ± std; writes everything to ``--out/ablation.json``.

    python benchmarks/ablation.py --out runs/ablation              # the demo budget, 3 seeds
    python benchmarks/ablation.py --out runs/abl --epochs 2 --seeds 1   # a quick look
    python benchmarks/ablation.py --out runs/ca --epochs 5 --seeds 1 --variants "full method" \
        "class attention (class_blocks=2)"                             # two designs only
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _variants import ensure_data, print_summary, run_variants, summarise

from attnmaps.demo import NUM_TRAIN

VARIANTS = {
    "full method": [],
    "no masking (mask_rate=0)": ["model.mask_rate=0"],
    "no gates": ["model.gates=false"],
    "no register token": ["model.num_registers=0"],
    "class attention (class_blocks=2)": ["model.class_blocks=2"],
}
KEYS = ("miou", "miou_true_labels", "map", "class_map_correlation", "head_sparsity")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/ablation"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=None, help="default: the demo config's")
    parser.add_argument("--num-train", type=int, default=NUM_TRAIN)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    args = parser.parse_args()
    data = ensure_data(args.out / "data", args.num_train)
    extra = [f"train.epochs={args.epochs}"] if args.epochs else []
    variants = {name: VARIANTS[name] for name in args.variants}
    results = run_variants(args.out, data, variants, args.seeds, KEYS, extra)
    summary = summarise(results, KEYS)
    print_summary(summary, KEYS)
    (args.out / "ablation.json").write_text(json.dumps({"runs": results, "summary": summary},
                                                       indent=2))


if __name__ == "__main__":
    main()
