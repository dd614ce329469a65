"""Component ablation at the demo's budget: full method vs masking off, gates off, no register.

Trains every variant from scratch on the demo's synthetic data for each seed and prints the
pseudo-mask mIoU (predicted and true labels), classifier mAP and class-map correlation as
mean ± std; writes everything to ``--out/ablation.json``.

    python benchmarks/ablation.py --out runs/ablation              # the demo budget, 3 seeds
    python benchmarks/ablation.py --out runs/abl --epochs 2 --seeds 1   # a quick look
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from attnmaps.config import load_config
from attnmaps.data.synthetic import write_synthetic_voc
from attnmaps.demo import NUM_TRAIN, NUM_VAL, demo_config_path
from attnmaps.engine.train import train

VARIANTS = {
    "full method": [],
    "no masking (mask_rate=0)": ["model.mask_rate=0"],
    "no gates": ["model.gates=false"],
    "no register token": ["model.num_registers=0"],
}
KEYS = ("miou", "miou_true_labels", "map", "class_map_correlation", "head_sparsity")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/ablation"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=None, help="default: the demo config's")
    parser.add_argument("--num-train", type=int, default=NUM_TRAIN)
    args = parser.parse_args()
    data = args.out / "data"
    if not (data / "ImageSets").exists():
        write_synthetic_voc(data, num_train=args.num_train, num_val=NUM_VAL)
    results: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    for seed in range(args.seeds):
        for name, overrides in VARIANTS.items():
            run = args.out / f"{name.split(' (')[0].replace(' ', '_')}_seed{seed}"
            extra = [f"train.epochs={args.epochs}"] if args.epochs else []
            cfg = load_config(demo_config_path(), [f"data.root={data}", f"out_dir={run}",
                                                   f"train.seed={seed}", *overrides, *extra])
            metrics = train(cfg, resume=(run / "last.safetensors").exists())
            if not metrics:
                metrics = json.loads((run / "log.jsonl").read_text().splitlines()[-1])["eval"]
            results[name].append({key: metrics[key] for key in KEYS})
    summary = {name: {key: (statistics.mean(r[key] for r in runs),
                            statistics.stdev(r[key] for r in runs) if len(runs) > 1 else 0.0)
                      for key in KEYS} for name, runs in results.items()}
    header = f"{'variant':28s}" + "".join(f"{key:>24s}" for key in KEYS)
    print(header)
    for name, row in summary.items():
        print(f"{name:28s}" + "".join(f"{m:>16.3f} ± {s:5.3f}" for m, s in row.values()))
    (args.out / "ablation.json").write_text(json.dumps({"runs": results, "summary": summary},
                                                       indent=2))


if __name__ == "__main__":
    main()
