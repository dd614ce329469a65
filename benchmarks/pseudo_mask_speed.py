"""Pseudo-mask generation speed: attnmaps' batched ``make_pseudo_masks`` against the reference
design's image-by-image, class-by-class loop with a per-pixel breadth-first fill.

Same inputs for both: smooth random class maps (one Gaussian blob per class on a low-resolution
grid, plus noise) and class probabilities with 1 to 3 predicted classes per image; no background
class, so unclaimed pixels are filled. Reported: images/s of each (median over interleaved
repeats), the median of the per-round speed ratios, and how often the two label maps agree
(on claimed pixels they must agree exactly; both fills give an unclaimed pixel the label of the
nearest claimed pixel in city-block distance and differ only in how ties are broken: queue order
in the reference's breadth-first search, the smaller label in attnmaps). The row
"attnmaps merge only" runs attnmaps without the fill (``has_background=True``) to show where the
time goes.

    python benchmarks/pseudo_mask_speed.py            # 16 images, K=20, 14x14 -> 224x224
    python benchmarks/pseudo_mask_speed.py --quick    # 8 images, 14x14 -> 112x112
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
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
from reference_design import reference_pseudo_masks
from torch import Tensor

from attnmaps.conventions import min_max_normalize
from attnmaps.pseudo.masks import (
    make_pseudo_masks,
    merge_masks,
    select_classes,
    upsample_maps,
)


def blob_maps(batch: int, classes: int, grid: int, seed: int) -> Tensor:
    """[B, K, grid, grid] maps: a Gaussian blob at a random place and width, plus 5% noise."""
    gen = torch.Generator().manual_seed(seed)
    coords = torch.arange(grid, dtype=torch.float32)
    centre = torch.rand(batch, classes, 2, generator=gen) * grid
    width = 1.0 + torch.rand(batch, classes, 1, 1, generator=gen) * grid / 4
    dy = (coords.view(1, 1, -1, 1) - centre[..., 0, None, None]) ** 2
    dx = (coords.view(1, 1, 1, -1) - centre[..., 1, None, None]) ** 2
    blobs = torch.exp(-(dy + dx) / (2 * width**2))
    return blobs + 0.05 * torch.rand(blobs.shape, generator=gen)


def predicted_probs(batch: int, classes: int, seed: int) -> Tensor:
    """[B, K] probabilities: 1 to 3 classes per image above 0.5, the others below."""
    gen = torch.Generator().manual_seed(seed + 1)
    probs = torch.rand(batch, classes, generator=gen) * 0.5
    for row in probs:
        count = int(torch.randint(1, 4, (1,), generator=gen))
        present = torch.randperm(classes, generator=gen)[:count]
        row[present] = 0.5 + 0.5 * torch.rand(count, generator=gen)
    return probs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--grid", type=int, default=14)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--threshold", type=float, default=0.3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="attnmaps' device (the reference: CPU)")
    add_threads_arg(parser)
    parser.add_argument("--quick", action="store_true", help="8 images at 112x112, 3 rounds")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/pseudo_mask_speed.json"))
    args = parser.parse_args()
    if args.quick:
        args.images, args.image_size, args.repeats = 8, 112, 3
    apply_threads(args)
    device = torch.device(args.device)
    size = (args.image_size, args.image_size)
    maps = blob_maps(args.images, args.classes, args.grid, args.seed)
    probs = predicted_probs(args.images, args.classes, args.seed)
    maps_on, probs_on = maps.to(device), probs.to(device)
    run = {
        "attnmaps": lambda: make_pseudo_masks(maps_on, probs_on, size, threshold=args.threshold,
                                              has_background=False),
        "reference": lambda: reference_pseudo_masks(maps, probs, size, args.threshold),
        "attnmaps merge only": lambda: make_pseudo_masks(maps_on, probs_on, size,
                                                         threshold=args.threshold,
                                                         has_background=True),
    }
    times = interleaved_times(run, args.repeats, args.warmup, device)
    ours, theirs = run["attnmaps"]().cpu(), run["reference"]()
    claimed = merge_masks(min_max_normalize(upsample_maps(maps, size)), probs, select_classes(probs),
                          args.threshold, has_background=False) >= 0
    agreement = {
        "all_pixels": (ours == theirs).float().mean().item(),
        "claimed_pixels": (ours == theirs)[claimed].float().mean().item(),
        "filled_pixels": (ours == theirs)[~claimed].float().mean().item(),
        "filled_fraction": (~claimed).float().mean().item(),
    }
    speed = {impl: args.images / median(times[impl]) for impl in run}
    speedup = paired_ratio(times["reference"], times["attnmaps"])
    print(f"{args.images} images, K={args.classes}, {args.grid}x{args.grid} maps -> "
          f"{args.image_size}x{args.image_size}, threshold {args.threshold}, no background, "
          f"{torch.get_num_threads()} threads")
    print_table(["impl", "seconds", "images/s"],
                [[impl, f"{median(times[impl]):.3f}", f"{speed[impl]:.1f}"] for impl in run])
    print(f"attnmaps / reference: x{speedup:.2f} images/s (median of per-round ratios)")
    print(f"label agreement: {agreement['all_pixels']:.4f} of all pixels, "
          f"{agreement['claimed_pixels']:.4f} of claimed pixels, "
          f"{agreement['filled_pixels']:.4f} of the {agreement['filled_fraction']:.1%} filled")
    write_json(args.out, {"config": {**vars(args), "out": str(args.out)},
                          "environment": environment(device), "seconds": times,
                          "images_per_second": speed, "speed_ratio": speedup,
                          "agreement": agreement})


if __name__ == "__main__":
    main()
