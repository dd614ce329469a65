"""The ``attnmaps`` command: demo, synth, train, pseudo-masks, evaluate, stats, guide-bench,
segment, predict, report."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .progress import log_to_stdout


def _demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(Path(args.out), overrides=args.overrides, num_train=args.num_train,
             num_val=args.num_val, from_scratch=args.from_scratch)


def _synth(args: argparse.Namespace) -> None:
    from .data.synthetic import write_synthetic_voc

    root = write_synthetic_voc(args.out, num_train=args.num_train, num_val=args.num_val,
                               size=(args.size, args.size), seed=args.seed,
                               colors=args.colors)
    print(f"wrote {args.num_train} train and {args.num_val} val images to {root}")


def _train(args: argparse.Namespace) -> None:
    from .config import load_config
    from .engine.distributed import is_main_process
    from .engine.train import train

    cfg = load_config(args.config, args.overrides)
    metrics = train(cfg, resume=args.resume)
    if is_main_process():
        print(f"run directory: {cfg.out_dir}  "
              f"pseudo-mask mIoU {metrics.get('miou', float('nan')):.3f}")


def _pseudo_masks(args: argparse.Namespace) -> None:
    from .pipeline import write_pseudo_masks

    metrics = write_pseudo_masks(Path(args.run), Path(args.out), split=args.split,
                                 overrides=args.overrides)
    if metrics is not None:
        print(f"pseudo-mask mIoU {metrics['miou']:.3f} (pixel accuracy {metrics['pixel_acc']:.3f})")
    print(f"pseudo masks written to {args.out}")


def _evaluate(args: argparse.Namespace) -> None:
    from .metrics.report import evaluate_directories, format_iou_table, save_metrics

    names = None
    if args.classes:
        names = [n.strip() for n in Path(args.classes).read_text().splitlines() if n.strip()]
    metrics = evaluate_directories(args.pred, args.gt, class_names=names)
    print(format_iou_table(metrics))
    out = Path(args.out) if args.out else Path(args.pred) / "metrics.json"
    save_metrics(out, metrics)
    print(f"metrics written to {out}")


def _sweep(args: argparse.Namespace) -> None:
    from .pipeline import sweep_thresholds

    thresholds = [float(t) for t in args.thresholds.split(",")]
    result = sweep_thresholds(Path(args.run), thresholds, split=args.split,
                              overrides=args.overrides)
    for threshold, miou in result["miou_by_threshold"].items():
        marker = "  <- best" if float(threshold) == result["best_threshold"] else ""
        print(f"threshold {float(threshold):.2f}: mIoU {miou:.3f}{marker}")
    print(f"written to {Path(args.run) / 'sweep.json'}")


def _stats(args: argparse.Namespace) -> None:
    from .config import load_config
    from .data.registry import build_dataset
    from .data.stats import dataset_stats, format_stats
    from .metrics.report import save_metrics

    cfg = load_config(args.config, args.overrides)
    split = args.split or cfg.data.train_split
    stats = dataset_stats(build_dataset(cfg.data, split, train=False))
    print(format_stats(stats))
    if args.out:
        save_metrics(args.out, stats)
        print(f"statistics written to {args.out}")


def _guide_bench(args: argparse.Namespace) -> None:
    from .guide.bench import BenchConfig, run_guide_bench

    cfg = BenchConfig(seeds=args.seeds, epochs=args.epochs, num_train=args.num_train,
                      device=args.device)
    if args.methods:
        cfg.methods = args.methods
    report = run_guide_bench(cfg, args.out)
    print((Path(args.out) / "guide_bench.md").read_text())
    print(f"{report['seconds'] / 60:.1f} min; results in {args.out}/guide_bench.json and "
          f"{args.out}/guide_bench.png")


def _segment(args: argparse.Namespace) -> None:
    from .segment.pipeline import run_segment

    result = run_segment(Path(args.run) if args.run else None, Path(args.out), args.overrides,
                         resume=args.resume)
    print(f"validation mIoU, stage 1 from predicted labels: {result['stage1_val']['miou']:.3f}\n"
          f"validation mIoU, stage 2 (no image labels):     {result['stage2']['miou']:.3f}\n"
          f"seeds on the training split (true labels):      "
          f"{result['seeds']['miou_true_labels']:.3f}\nrun directory: {args.out}")


def _predict(args: argparse.Namespace) -> None:
    from .segment.images import predict_files
    from .segment.predictors import load_predictor

    predictor = load_predictor(Path(args.model), args.device, args.inference)
    result = predict_files(predictor, [Path(p) for p in args.images], Path(args.out),
                           batch_size=args.batch_size)
    print(f"{predictor.kind}: {len(result['written'])} masks and overlays written to {args.out}"
          + (f"; {len(result['failed'])} file(s) could not be read" if result["failed"] else ""))


def _report(args: argparse.Namespace) -> None:
    from .report.html import write_report

    print(f"report written to {write_report(Path(args.run), Path(args.out) if args.out else None)}")


def add_stage2_commands(sub: argparse._SubParsersAction) -> None:
    """The ``segment``, ``predict`` and ``report`` sub-commands."""
    segment = sub.add_parser("segment", help="seeds from a stage-1 run, then train and score a "
                                             "segmentation network on them")
    segment.add_argument("--run", help="stage-1 run directory written by 'attnmaps train'")
    segment.add_argument("--out", required=True, help="directory of the second-stage run")
    segment.add_argument("--resume", action="store_true", help="continue the run in --out")
    segment.add_argument("overrides", nargs="*",
                         help="overrides, e.g. segment.epochs=6 segment.ignore_margin=0.05")
    segment.set_defaults(func=_segment)

    predict = sub.add_parser("predict", help="masks and overlays for image files")
    predict.add_argument("--model", required=True,
                         help="run directory of 'attnmaps segment' (stage 2) or 'attnmaps train'")
    predict.add_argument("--images", nargs="+", required=True, help="image files or directories")
    predict.add_argument("--out", required=True, help="directory for masks and overlays")
    predict.add_argument("--batch-size", type=int, default=8)
    predict.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    predict.add_argument("--inference", choices=("slide", "whole", "resize"),
                         help="stage 2: replaces the run's segment.inference")
    predict.set_defaults(func=_predict)

    report = sub.add_parser("report", help="one self-contained HTML page for a second-stage run")
    report.add_argument("run", help="run directory of 'attnmaps segment'")
    report.add_argument("--out", help="HTML path (default: RUN/report.html)")
    report.set_defaults(func=_report)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnmaps", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="generate synthetic data, train, make and score pseudo masks")
    demo.add_argument("--out", default="attnmaps_demo", help="output directory")
    demo.add_argument("--num-train", type=int, default=6000, help="synthetic training images")
    demo.add_argument("--num-val", type=int, default=300, help="synthetic held-out images")
    demo.add_argument("--from-scratch", action="store_true",
                      help="train from random weights instead of the shipped checkpoint")
    demo.add_argument("overrides", nargs="*", help="config overrides key=value")
    demo.set_defaults(func=_demo)

    synth = sub.add_parser("synth", help="write the synthetic shapes dataset in the VOC layout")
    synth.add_argument("--out", required=True)
    synth.add_argument("--num-train", type=int, default=4000)
    synth.add_argument("--num-val", type=int, default=200)
    synth.add_argument("--size", type=int, default=64)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--colors", type=int, default=0,
                       help="n >= 1: every shape in n hues, 4n classes (0: the 4 shapes)")
    synth.set_defaults(func=_synth)

    train = sub.add_parser("train", help="train a class-token ViT from image-level labels")
    train.add_argument("--config", help="YAML config file")
    train.add_argument("--resume", action="store_true", help="continue the run in out_dir")
    train.add_argument("overrides", nargs="*", help="config overrides key=value")
    train.set_defaults(func=_train)

    pseudo = sub.add_parser("pseudo-masks", help="write pseudo masks from a trained run")
    pseudo.add_argument("--run", required=True, help="run directory written by 'attnmaps train'")
    pseudo.add_argument("--out", required=True, help="directory for the indexed PNG masks")
    pseudo.add_argument("--split", default=None, help="dataset split (default: data.val_split)")
    pseudo.add_argument("overrides", nargs="*",
                        help="overrides, e.g. pseudo.threshold=0.4 pseudo.use_true_labels=true")
    pseudo.set_defaults(func=_pseudo_masks)

    evaluate = sub.add_parser("evaluate", help="score predicted masks against ground truth")
    evaluate.add_argument("--pred", required=True, help="directory of predicted PNG masks")
    evaluate.add_argument("--gt", required=True, help="directory of ground-truth PNG masks")
    evaluate.add_argument("--classes", help="classes.txt with one name a line")
    evaluate.add_argument("--out", help="metrics.json path (default: PRED/metrics.json)")
    evaluate.set_defaults(func=_evaluate)

    sweep = sub.add_parser("sweep", help="pseudo-mask mIoU for several background thresholds")
    sweep.add_argument("--run", required=True, help="run directory written by 'attnmaps train'")
    sweep.add_argument("--thresholds", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7",
                       help="comma-separated thresholds in [0, 1]")
    sweep.add_argument("--split", default=None, help="dataset split (default: data.val_split)")
    sweep.add_argument("overrides", nargs="*", help="overrides, e.g. pseudo.use_true_labels=true")
    sweep.set_defaults(func=_sweep)

    stats = sub.add_parser("stats", help="per-channel mean/std and class frequencies of a dataset")
    stats.add_argument("--config", help="YAML config file (its data section is used)")
    stats.add_argument("--split", default=None, help="dataset split (default: data.train_split)")
    stats.add_argument("--out", help="also write the statistics as JSON here")
    stats.add_argument("overrides", nargs="*", help="config overrides, e.g. data.name=coco")
    stats.set_defaults(func=_stats)

    bench = sub.add_parser("guide-bench",
                           help="mask-guided attention benchmark on shapes with a spurious cue")
    bench.add_argument("--out", default="runs/guide_bench", help="output directory")
    bench.add_argument("--seeds", type=int, default=5)
    bench.add_argument("--epochs", type=int, default=6)
    bench.add_argument("--num-train", type=int, default=1500)
    bench.add_argument("--methods", nargs="+", default=None,
                       help="subset of: none camal camal_energy rrr gain l1 (default: all)")
    bench.add_argument("--device", default="cpu")
    bench.set_defaults(func=_guide_bench)
    add_stage2_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log_to_stdout()
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as error:
        print(f"attnmaps {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
