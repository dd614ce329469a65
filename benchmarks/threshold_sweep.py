"""Pick the pseudo-mask settings of a run: mIoU per binarisation threshold and attention blocks.

Runs ``attnmaps.pipeline.sweep_thresholds`` (the ``attnmaps sweep`` command) for every block
choice, from predicted and from true labels, on the run's validation split (not the demo's
held-out images), prints the grid and writes ``sweep_blocks.json`` in the run directory.

    python benchmarks/threshold_sweep.py --run runs/demo_ckpt
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from attnmaps.pipeline import sweep_thresholds

THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--blocks", nargs="+", default=["last", "last2", "last3", "all"])
    args = parser.parse_args()
    table: dict[str, dict] = {}
    for blocks in args.blocks:
        row = {}
        for source, flag in (("pred", "false"), ("true", "true")):
            result = sweep_thresholds(args.run, THRESHOLDS, overrides=[
                f"model.attn_blocks={blocks}", f"pseudo.use_true_labels={flag}"])
            row[source] = result["miou_by_threshold"]
            print(f"{blocks:>6s} {source} " + "  ".join(
                f"{float(t):.1f}:{m:.3f}" for t, m in row[source].items()))
        table[blocks] = row
    best = max((m, b, float(t)) for b, row in table.items() for t, m in row["pred"].items())
    print(f"best from predicted labels: mIoU {best[0]:.3f} with attn_blocks={best[1]} "
          f"threshold={best[2]}")
    (args.run / "sweep_blocks.json").write_text(json.dumps({"table": table, "best": best},
                                                           indent=2))


if __name__ == "__main__":
    main()
