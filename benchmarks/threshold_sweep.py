"""Pick the pseudo-mask settings of a run: mIoU per binarisation threshold and attention blocks.

Scores the run's validation split (not the demo's held-out images) for every combination and
writes ``sweep.json`` in the run directory.

    python benchmarks/threshold_sweep.py --run runs/demo_ckpt
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from attnmaps.data.registry import build_dataset
from attnmaps.engine.evaluate import evaluate
from attnmaps.pipeline import load_run

THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--blocks", nargs="+", default=["last", "last2", "last3", "all"])
    args = parser.parse_args()
    cfg, model = load_run(args.run)
    val = build_dataset(cfg.data, cfg.data.val_split, train=False)
    device = next(model.parameters()).device
    table: dict[str, dict] = {}
    for blocks in args.blocks:
        metrics = evaluate(model, val, cfg.pseudo, blocks, device, sweep=THRESHOLDS)
        true_labels = evaluate(model, val, replace(cfg.pseudo, use_true_labels=True), blocks,
                               device, sweep=THRESHOLDS)
        table[blocks] = {"pred": metrics["miou_by_threshold"],
                         "true": true_labels["miou_by_threshold"],
                         "class_map_correlation": metrics["class_map_correlation"]}
        print(f"{blocks:>6s} pred " + "  ".join(f"{t}:{m:.3f}" for t, m in
                                                table[blocks]["pred"].items()))
        print(f"{blocks:>6s} true " + "  ".join(f"{t}:{m:.3f}" for t, m in
                                                table[blocks]["true"].items()))
    best = max((m, b, t) for b, row in table.items() for t, m in row["pred"].items())
    print(f"best from predicted labels: mIoU {best[0]:.3f} with attn_blocks={best[1]} "
          f"threshold={best[2]}")
    (args.run / "sweep.json").write_text(json.dumps({"table": table, "best": best}, indent=2))


if __name__ == "__main__":
    main()
