"""PAMR speed: attnmaps' refinement (a sum over views of one padded copy) against the stacked
form of the published PAMR (all 8 x len(dilations) shifted copies stacked into one tensor, as
attnmaps did until the twelfth round), on the same images and maps.

Reported: seconds of each (median over interleaved repeats), the median of the per-round time
ratios, and the largest difference between the two refined maps.

    python benchmarks/pamr_speed.py --threads 1         # 32 images of 96x96, 56 maps, 40 iterations
    python benchmarks/pamr_speed.py --quick             # 4 images of 32x32, 5 iterations
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from _measure import (
    add_threads_arg,
    apply_threads,
    environment,
    interleaved_times,
    median,
    paired_ratio,
    print_table,
    write_json,
)
from torch import Tensor

from attnmaps.pseudo.pamr import DILATIONS, pamr


def stacked_neighbours(x: Tensor, dilations: Sequence[int]) -> Tensor:
    """[B,C,H,W] -> [B,C,8*len(dilations),H,W]: every shifted copy, padded per dilation."""
    height, width = x.shape[-2:]
    shifted = []
    for d in dilations:
        padded = F.pad(x, (d, d, d, d), mode="replicate")
        for dy in (-d, 0, d):
            for dx in (-d, 0, d):
                if dy or dx:
                    shifted.append(padded[..., d + dy:d + dy + height, d + dx:d + dx + width])
    return torch.stack(shifted, dim=2)


def stacked_pamr(images: Tensor, maps: Tensor, iterations: int,
                 dilations: Sequence[int] = DILATIONS) -> Tensor:
    """PAMR with the neighbours of every pixel stacked (the published form)."""
    near = stacked_neighbours(images, dilations)
    distance = (near - images.unsqueeze(2)).abs() / (1e-8 + 0.1 * near.std(dim=2, keepdim=True))
    affinity = (-distance.mean(dim=1)).softmax(dim=1).unsqueeze(1)
    for _ in range(iterations):
        maps = (stacked_neighbours(maps, dilations) * affinity).sum(dim=2)
    return maps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--maps", type=int, default=56, help="refined maps (selected classes)")
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    add_threads_arg(parser)
    parser.add_argument("--quick", action="store_true", help="4 images of 32x32, 5 iterations")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/pamr_speed.json"))
    args = parser.parse_args()
    if args.quick:
        args.images, args.size, args.maps, args.iterations, args.repeats = 4, 32, 6, 5, 2
    apply_threads(args)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(args.images, 3, args.size, args.size, generator=gen)
    maps = torch.rand(args.images, 1, args.size, args.size, generator=gen)
    owner = torch.arange(args.maps) % args.images  # the image of each refined map
    run = {"attnmaps": lambda: pamr(images[owner], maps[owner], args.iterations),
           "stacked": lambda: stacked_pamr(images[owner], maps[owner], args.iterations)}
    times = interleaved_times(run, args.repeats, args.warmup, torch.device("cpu"))
    difference = (run["attnmaps"]() - run["stacked"]()).abs().max().item()
    ratio = paired_ratio(times["attnmaps"], times["stacked"])
    print(f"{args.maps} maps of {args.images} images, {args.size}x{args.size}, "
          f"{args.iterations} iterations, {torch.get_num_threads()} threads")
    print_table(["impl", "seconds"], [[impl, f"{median(times[impl]):.3f}"] for impl in run])
    print(f"attnmaps / stacked time: x{ratio:.2f} (median of per-round ratios); largest "
          f"difference {difference:.1e}")
    write_json(args.out, {"config": {**vars(args), "out": str(args.out)},
                          "environment": environment(torch.device("cpu")), "seconds": times,
                          "time_ratio": ratio, "max_difference": difference})


if __name__ == "__main__":
    main()
