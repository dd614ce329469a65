"""Training-step time and memory as the class count K grows: class tokens in every block
against class attention in the last blocks only.

"all blocks" is ``ClassTokenViT(..., class_blocks=0)``: the K class tokens join every block, so
every block's attention and MLP run on K + N + 1 tokens. "class attention" is
``ClassTokenViT(..., class_blocks=2)`` (CaiT-style): the first depth-2 blocks see the patches and
the register only, and the last 2 update the class tokens alone, at a cost linear in K. Both use
``head="per_token"`` by default (the joint head alone has K*D*K weights, 192M at K=1000). Every
round times one step (forward with masking, BCE + 0.01 * L0, backward, AdamW) of every
(design, K) in rotating order; reported are the median step times, the median over rounds of
each step time divided by the same design's K=20 step time in that round, the bytes saved for
backward, and the peak memory of the steps (CUDA: max allocated; CPU: peak RSS increase in a
fresh process).

The default shape follows the paper's depth and input (12 blocks, 224x224 images, patch 16:
196 patches) at a CPU-sized width (192, 3 heads, batch 8). How much K costs in class-attention
mode depends on the ratio of the class-attention work (class_blocks x K queries) to the patch
work ((depth - class_blocks) x N tokens), so small images or shallow models show a steeper
growth; the --quick shape (64x64 images, 4 blocks) is a smoke test, not a measurement.

    python benchmarks/num_classes_scaling.py            # K 20, 80, 151, 1000; 2 warm-up + 10 rounds
    python benchmarks/num_classes_scaling.py --quick    # K 20, 151; 64x64 images, batch 2, 3 rounds
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from _measure import (
    add_shape_args,
    apply_threads,
    environment,
    interleaved_times,
    median,
    mib,
    paired_ratio,
    print_table,
    run_child,
    saved_tensor_bytes,
    shape_kwargs,
    write_json,
)
from train_step import attnmaps_loss, make_step, measured_peak, voc_like_batch

from attnmaps.models.vit import ClassTokenViT

DESIGNS = {"all blocks": 0, "class attention": 2}


def build(design: str, classes: int, args: argparse.Namespace,
          device: torch.device) -> ClassTokenViT:
    torch.manual_seed(args.seed)
    model = ClassTokenViT(**shape_kwargs(args, classes), head=args.head, stem="linear",
                          class_blocks=DESIGNS[design])
    return model.to(device).train()


def child(args: argparse.Namespace) -> None:
    """Peak memory of ``args.steps`` steps of one (design, K), printed as a JSON line."""
    design, classes = args.child.rsplit(":", 1)
    print(json.dumps(config_peak(design, int(classes), args, torch.device(args.device))))


def config_peak(design: str, classes: int, args: argparse.Namespace, device: torch.device) -> dict:
    images, labels = voc_like_batch(args.batch_size, classes, args.img_size, device, args.seed)
    return measured_peak(build(design, classes, args, device), attnmaps_loss, images, labels,
                         args.steps, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_args(parser)
    parser.set_defaults(img_size=224, depth=12, batch_size=8)
    parser.add_argument("--classes", type=int, nargs="+", default=[20, 80, 151, 1000])
    parser.add_argument("--head", choices=("per_token", "joint"), default="per_token")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="steps in each peak-memory run")
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--quick", action="store_true",
                        help="K 20 and 151, 64x64 images, 4 blocks, batch 2, 1 warm-up + 3 rounds")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/num_classes_scaling.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.classes, args.img_size, args.depth, args.batch_size = [20, 151], 64, 4, 2
        args.warmup, args.repeats, args.steps = 1, 3, 1
    apply_threads(args)
    if args.child:
        child(args)
        return
    if 20 not in args.classes:
        raise SystemExit(f"--classes {args.classes} must include 20, the baseline of the ratios")
    device = torch.device(args.device)
    configs = [(design, k) for design in DESIGNS for k in args.classes]
    steps, saved = {}, {}
    for design, k in configs:
        model = build(design, k, args, device)
        images, labels = voc_like_batch(args.batch_size, k, args.img_size, device, args.seed)
        saved[design, k] = saved_tensor_bytes(
            lambda m=model, x=images, y=labels: attnmaps_loss(m, x, y),
            exclude=list(model.parameters()))
        steps[f"{design}:{k}"] = make_step(model, attnmaps_loss, images, labels)
    times = interleaved_times(steps, args.repeats, args.warmup, device)
    del steps
    peaks = {}
    if not args.no_rss:
        forwarded = [a for a in sys.argv[1:] if a != "--quick"]
        extra = ["--img-size", str(args.img_size), "--depth", str(args.depth),
                 "--batch-size", str(args.batch_size), "--steps", str(args.steps),
                 "--threads", str(torch.get_num_threads())]
        for design, k in configs:
            if device.type == "cuda":
                peaks[f"{design}:{k}"] = config_peak(design, k, args, device)
            else:
                peaks[f"{design}:{k}"] = run_child(
                    Path(__file__), [*forwarded, *extra, "--child", f"{design}:{k}"])
    ratios = {f"{design}:{k}": paired_ratio(times[f"{design}:{k}"], times[f"{design}:20"])
              for design, k in configs}
    patches = (args.img_size // args.patch_size) ** 2
    print(f"{args.img_size}px/patch {args.patch_size} ({patches} patches), width "
          f"{args.embed_dim}, depth {args.depth}, {args.heads} heads, head={args.head}, batch "
          f"{args.batch_size}, {torch.get_num_threads()} threads, {device}")
    print_table(
        ["design", "K", "step ms", "vs K=20", "saved MiB", "peak MiB"],
        [[design, k, f"{median(times[f'{design}:{k}']) * 1e3:.1f}",
          f"{ratios[f'{design}:{k}']:.2f}", f"{mib(saved[design, k]):.1f}",
          f"{mib(peaks[f'{design}:{k}']['peak_bytes']):.1f}" if peaks else "-"]
         for design, k in configs])
    if 151 in args.classes:
        print(f"class attention: step time at K=151 is x{ratios['class attention:151']:.2f} "
              f"that at K=20 (all blocks: x{ratios['all blocks:151']:.2f})")
    write_json(args.out, {
        "config": {**vars(args), "out": str(args.out), "patches": patches,
                   "class_blocks": DESIGNS},
        "environment": environment(device), "step_seconds": times,
        "ratio_to_k20": ratios,
        "saved_for_backward_bytes": {f"{d}:{k}": v for (d, k), v in saved.items()},
        "peak_memory": peaks,
    })


if __name__ == "__main__":
    main()
