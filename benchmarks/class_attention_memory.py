"""Memory of class-attention extraction as the patch count N and class count K grow.

attnmaps computes only the K class-token rows of each block's attention
(``forward_features(x, attn_blocks="all")["attn"]``: [B, heads, K, K+N+R] per block); the
reference design keeps every block's full attention ([B, heads, K+N+R, K+N+R], stacked across
blocks). For each grid side (N = side^2) and K this reports the bytes of attention each one
returns per block (measured on the returned tensors, one inference forward each, same weights),
their ratio, the fitted growth exponents (bytes ~ N^p over the measured range, and ~ T^q in the
token count T = K + N + 1, where q is 1 for attnmaps and 2 for the reference), and, for the
largest grid, the peak memory increase of the extraction forward in a fresh process (CPU: peak
RSS; CUDA: max allocated).

    python benchmarks/class_attention_memory.py           # sides 8..32 (N 64..1024), K 20 and 151
    python benchmarks/class_attention_memory.py --quick   # sides 8, 16; batch 1
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
    growth_exponent,
    mib,
    peak_memory,
    print_table,
    run_child,
    shape_kwargs,
    write_json,
)
from reference_design import ReferenceViT
from torch import nn

from attnmaps.models.vit import ClassTokenViT

IMPLEMENTATIONS = ("attnmaps", "reference")


def build_pair(classes: int, side: int, args: argparse.Namespace,
               device: torch.device) -> tuple[ClassTokenViT, ReferenceViT]:
    """An attnmaps model for a side x side patch grid and its reference copy, in eval mode."""
    shape = shape_kwargs(args, classes, img_size=side * args.patch_size)
    torch.manual_seed(args.seed)
    model = ClassTokenViT(**shape, head="joint", stem="linear")
    reference = ReferenceViT(**shape)
    reference.load_state_dict(model.state_dict())
    return model.to(device).eval(), reference.to(device).eval()


def extract(impl: str, model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """The attention tensors each implementation returns for map extraction, one per block
    (views into the reference's stacked tensor)."""
    with torch.no_grad():
        if impl == "attnmaps":
            return model.forward_features(images, attn_blocks="all")["attn"]
        _, _, attn = model(images)
        return list(attn.unbind(0))


def kept_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def child(args: argparse.Namespace) -> None:
    """Peak memory of one extraction forward, printed as a JSON line."""
    impl, classes, side = args.child.split(":")
    device = torch.device(args.device)
    models = dict(zip(IMPLEMENTATIONS, build_pair(int(classes), int(side), args, device)))
    model = models[impl]
    del models
    images = torch.randn(args.batch_size, 3, int(side) * args.patch_size,
                         int(side) * args.patch_size, device=device)
    extract(impl, model, images)  # allocator caches and lazy initialisation
    kept: list[list[torch.Tensor]] = []
    print(json.dumps(peak_memory(lambda: kept.append(extract(impl, model, images)), device)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sides", type=int, nargs="+", default=[8, 12, 16, 24, 32])
    parser.add_argument("--classes", type=int, nargs="+", default=[20, 151])
    add_shape_args(parser, img_size=None, batch_size=2)
    parser.add_argument("--quick", action="store_true", help="sides 8 and 16, batch 1")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/class_attention_memory.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.sides, args.batch_size = [8, 16], 1
    apply_threads(args)
    if args.child:
        child(args)
        return
    device = torch.device(args.device)
    rows, results = [], []
    for classes in args.classes:
        for side in args.sides:
            pair = dict(zip(IMPLEMENTATIONS, build_pair(classes, side, args, device)))
            images = torch.randn(args.batch_size, 3, side * args.patch_size,
                                 side * args.patch_size, device=device)
            per_block = {impl: kept_bytes(extract(impl, model, images)) / args.depth
                         for impl, model in pair.items()}
            tokens = classes + side * side + 1
            results.append({"classes": classes, "side": side, "patches": side * side,
                            "tokens": tokens, "bytes_per_block": per_block})
            rows.append([classes, side * side, tokens, f"{mib(per_block['attnmaps']):.3f}",
                         f"{mib(per_block['reference']):.3f}",
                         f"{per_block['reference'] / per_block['attnmaps']:.1f}"])
    print(f"attention kept per block for map extraction, batch {args.batch_size}, "
          f"{args.heads} heads, depth {args.depth}, fp32")
    print_table(["K", "N", "tokens", "attnmaps MiB", "reference MiB", "reference/attnmaps"], rows)
    exponents = {}
    for classes in args.classes:
        points = [r for r in results if r["classes"] == classes]
        exponents[classes] = {
            f"{impl}_{axis}": growth_exponent([r[axis] for r in points],
                                              [r["bytes_per_block"][impl] for r in points])
            for impl in IMPLEMENTATIONS for axis in ("patches", "tokens")}
        fit = exponents[classes]
        print(f"K={classes}: bytes ~ N^p with p = {fit['attnmaps_patches']:.2f} (attnmaps), "
              f"{fit['reference_patches']:.2f} (reference); ~ T^q with q = "
              f"{fit['attnmaps_tokens']:.2f} (attnmaps), {fit['reference_tokens']:.2f} (reference)")
    side = max(args.sides)
    forwarded = [a for a in sys.argv[1:] if a != "--quick"]
    extra = ["--batch-size", str(args.batch_size), "--threads", str(torch.get_num_threads())]
    peaks = {}
    for classes in args.classes:
        for impl in IMPLEMENTATIONS:
            key = f"{impl}:{classes}:{side}"
            peaks[key] = run_child(Path(__file__), [*forwarded, *extra, "--child", key])
    print(f"peak memory increase of one extraction forward (N={side * side}):")
    print_table(["K", "attnmaps MiB", "reference MiB", "method"],
                [[classes, f"{mib(peaks[f'attnmaps:{classes}:{side}']['peak_bytes']):.1f}",
                  f"{mib(peaks[f'reference:{classes}:{side}']['peak_bytes']):.1f}",
                  peaks[f"attnmaps:{classes}:{side}"]["method"]] for classes in args.classes])
    write_json(args.out, {"config": {**vars(args), "out": str(args.out)},
                          "environment": environment(device), "points": results,
                          "growth_exponent": exponents, "peak_memory": peaks})


if __name__ == "__main__":
    main()
