"""Pseudo-mask quality with many classes: class tokens in every block vs class attention.

Writes the synthetic set with ``--colors n`` (4 n classes: every shape in n hues, see
``attnmaps.data.synthetic``), trains the demo model from scratch in both designs for each seed
(``model.class_blocks=0``: class tokens in every block; ``model.class_blocks=2``: CaiT-style
class attention in the last 2 blocks) and prints pseudo-mask mIoU from predicted and true labels,
classifier mAP, class-map correlation and training throughput as mean ± std; the all-blocks runs
are also scored with maps from their last 2 blocks only (where class attention reads its maps,
as the demo config averages all blocks' maps); writes
``--out/many_classes.json``. Finished runs are read back, so an interrupted run resumes.

    python benchmarks/many_classes.py --out runs/many --colors 12 --epochs 8 --seeds 2 \
        --equal-time-epochs 13       # + class attention for about the all-blocks training time
    python benchmarks/many_classes.py --out runs/many_quick --colors 3 --epochs 1 --seeds 1 \
        --num-train 200 --num-val 40                           # a minute: checks it runs
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _variants import ensure_data, print_summary, run_dir, run_variants, summarise

from attnmaps.data.registry import build_dataset
from attnmaps.data.synthetic import class_names
from attnmaps.engine.evaluate import eval_options, evaluate
from attnmaps.pipeline import load_run

KEYS = ("miou", "miou_true_labels", "map", "class_map_correlation", "images_per_second")
ALL_BLOCKS = "all blocks (class_blocks=0)"
CLASS_BLOCKS = 2


def variants(epochs: int, equal_time_epochs: int) -> dict[str, list[str]]:
    """Both designs at ``epochs``; with ``equal_time_epochs`` also class attention trained that
    long (about the all-blocks run's wall-clock time)."""
    attention = f"model.class_blocks={CLASS_BLOCKS}"
    found = {ALL_BLOCKS: [f"train.epochs={epochs}"],
             f"class attention (class_blocks={CLASS_BLOCKS})": [attention,
                                                               f"train.epochs={epochs}"]}
    if equal_time_epochs:
        found[f"class attention {equal_time_epochs} epochs (class_blocks={CLASS_BLOCKS})"] = [
            attention, f"train.epochs={equal_time_epochs}"]
    return found


def last_blocks_scores(out: Path, trained: list[dict]) -> list[dict]:
    """The all-blocks runs scored with maps from their last ``CLASS_BLOCKS`` blocks only (the
    blocks a class-attention model reads its maps from), so that the comparison is not about
    which blocks are averaged; throughput is the training run's."""
    scores = []
    for seed, training in enumerate(trained):
        cfg, model = load_run(run_dir(out, ALL_BLOCKS, seed),
                              [f"model.attn_blocks=last{CLASS_BLOCKS}"])
        metrics = evaluate(model, build_dataset(cfg.data, cfg.data.val_split, train=False),
                           cfg.pseudo, **eval_options(cfg))
        scores.append({**{key: metrics[key] for key in KEYS[:-1]},
                       "images_per_second": training["images_per_second"]})
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/many_classes"))
    parser.add_argument("--colors", type=int, default=12, help="hues per shape: 4n classes")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--num-train", type=int, default=6000)
    parser.add_argument("--num-val", type=int, default=600)
    parser.add_argument("--equal-time-epochs", type=int, default=0,
                        help="also train class attention this many epochs (0: no)")
    args = parser.parse_args()
    if args.colors < 1:
        parser.error(f"--colors {args.colors}: need at least 1 hue per shape")
    data = ensure_data(args.out / "data", args.num_train, args.num_val, args.colors)
    results = run_variants(args.out, data, variants(args.epochs, args.equal_time_epochs),
                           args.seeds, KEYS)
    results[f"all blocks, maps of the last {CLASS_BLOCKS} (class_blocks=0)"] = last_blocks_scores(
        args.out, results[ALL_BLOCKS])
    summary = summarise(results, KEYS)
    print(f"{len(class_names(args.colors)) - 1} classes, {args.epochs} epochs, "
          f"{args.seeds} seed(s)")
    print_summary(summary, KEYS)
    payload = {"config": {**vars(args), "out": str(args.out)}, "runs": results,
               "summary": summary}
    (args.out / "many_classes.json").write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
