"""Training-step throughput of attnmaps' ClassTokenViT against timm's plain ViT at the same shape.

Both take the same step on the same batch: forward, BCE over K labels (attnmaps adds
0.01 * L0 of its head gates and masks the class tokens of absent classes), backward, AdamW. timm's
``vit_base_patch16_224`` is built without pretrained weights, with the shape options below
(default: the CPU shape of ``train_step.py``; ``--img-size 224 --embed-dim 768 --depth 12
--heads 12`` is ViT-B/16). attnmaps carries K class tokens and one register where timm has one
class token: K more tokens. Reported: images/s of each (median of interleaved rounds),
the median of the per-round ratios attnmaps / timm, and on CUDA the peak memory of a step.
timm needs torchvision; where it cannot be imported the script prints why and exits 0.

    python benchmarks/timm_compare.py --quick
    python benchmarks/timm_compare.py --device cuda --img-size 224 --embed-dim 768 --depth 12 \\
        --heads 12 --batch-size 64 --precision bf16 --compile
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import _measure as measure
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from train_step import attnmaps_loss, make_step, voc_like_batch, with_precision

from attnmaps.engine.acceleration import PRECISIONS, compile_module
from attnmaps.models.vit import ClassTokenViT


def timm_loss(model: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
    return F.binary_cross_entropy_with_logits(model(images).float(), labels)


def build(impl: str, args: argparse.Namespace, device: torch.device) -> tuple[nn.Module, object]:
    """The model of ``impl`` in training mode on ``device`` and its loss function."""
    torch.manual_seed(args.seed)
    shape = measure.shape_kwargs(args, args.classes)
    if impl == "attnmaps":
        model, loss = ClassTokenViT(**shape, head="joint", stem="linear"), attnmaps_loss
    else:
        import timm

        model = timm.create_model("vit_base_patch16_224", pretrained=False,
                                  num_classes=args.classes, img_size=args.img_size,
                                  patch_size=args.patch_size, embed_dim=args.embed_dim,
                                  depth=args.depth, num_heads=args.heads)
        loss = timm_loss
    model = model.to(device).train()
    if args.compile:
        model = compile_module(model, device, backend=args.backend)
    return model, with_precision(loss, args.precision, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    measure.add_shape_args(parser)
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--quick", action="store_true",
                        help="batch 8, 1 warm-up, 5 rounds, 1 thread")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/timm_compare.json"))
    args = parser.parse_args()
    if args.quick:
        args.batch_size, args.warmup, args.repeats = 8, 1, 5
    try:
        import timm
    except Exception as error:  # noqa: BLE001 - timm (or the torchvision it imports) is broken
        reason = f"timm cannot be imported here ({type(error).__name__}: {error})"
        print(f"skipped: {reason}; install timm with a torchvision that matches this torch")
        measure.write_json(args.out, {"skipped": reason,
                                      "config": {**vars(args), "out": str(args.out)}})
        return
    measure.apply_threads(args)
    random.seed(args.seed)
    device = torch.device(args.device)
    images, labels = voc_like_batch(args.batch_size, args.classes, args.img_size, device,
                                    args.seed)
    impls = ("attnmaps", "timm")
    built = {impl: build(impl, args, device) for impl in impls}
    counts = {impl: sum(p.numel() for p in model.parameters()) for impl, (model, _) in
              built.items()}
    steps = {impl: make_step(model, loss, images, labels) for impl, (model, loss) in built.items()}
    times = measure.interleaved_times(steps, args.repeats, args.warmup, device)
    peaks = ({impl: measure.peak_memory(steps[impl], device)["peak_bytes"] for impl in impls}
             if device.type == "cuda" else {})
    throughput = {impl: args.batch_size / measure.median(times[impl]) for impl in impls}
    ratio = measure.paired_ratio(times["timm"], times["attnmaps"])
    print(f"K={args.classes}, {args.img_size}px/patch {args.patch_size}, width {args.embed_dim}, "
          f"depth {args.depth}, {args.heads} heads, batch {args.batch_size}, {device}, "
          f"{args.precision}{', compiled' if args.compile else ''}, timm {timm.__version__}")
    measure.print_table(
        ["impl", "parameters (M)", "step ms", "images/s", "peak MiB"],
        [[impl, f"{counts[impl] / 1e6:.2f}", f"{measure.median(times[impl]) * 1e3:.1f}",
          f"{throughput[impl]:.1f}", f"{measure.mib(peaks[impl]):.0f}" if peaks else "-"]
         for impl in impls])
    print(f"attnmaps / timm: throughput x{ratio:.2f} (median of per-round ratios)")
    measure.write_json(args.out, {
        "config": {**vars(args), "out": str(args.out), "timm": timm.__version__},
        "environment": measure.environment(device), "parameters": counts, "step_seconds": times,
        "images_per_second": throughput, "throughput_ratio": ratio, "peak_memory_bytes": peaks,
    })


if __name__ == "__main__":
    main()
