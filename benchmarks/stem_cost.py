"""Cost of the convolutional stem's depth: one training step of a config's model (its objective:
BCE, gates, patch head, PatchDropout) with ``model.stem_convs_per_stage`` = 1, 2 and 3, timed
side by side (interleaved rounds), plus the stem's and the linear layers' multiply-adds per image;
depths 2 and 3 also with the stem in the contiguous memory format (the default is channels-last)
and on the smaller images of progressive resizing (``--early-size``, default 64 px).

Reported: seconds per step (median), each depth's time as a ratio to depth 2 (the default; median
of the per-round ratios), multiply-adds and stem parameters. Writes ``--out`` (JSON).

    python benchmarks/stem_cost.py                      # configs/digits.yaml, batch 32, 1 thread
    python benchmarks/stem_cost.py --quick              # a few rounds
    python benchmarks/stem_cost.py --early-size 48      # the small-image steps at 48 x 48
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from _measure import environment, interleaved_times, median, paired_ratio, print_table, write_json
from torch import nn

from attnmaps.config import load_config
from attnmaps.engine.objective import WSSSObjective
from attnmaps.models.factory import create_model

CONFIG = Path(__file__).resolve().parents[1] / "src" / "attnmaps" / "configs" / "digits.yaml"
DEPTHS = (1, 2, 3)
CONTIGUOUS_DEPTHS = (2, 3)


def multiply_adds(model: nn.Module, image: torch.Tensor) -> dict[str, float]:
    """Multiply-adds of one eval-mode forward pass of ``image`` [1,C,H,W]: of the convolutions
    (the stem) and of the linear layers, counted from each layer's output size."""
    counts = {"stem": 0.0, "linear": 0.0}

    def conv(module: nn.Conv2d, _inputs, output: torch.Tensor) -> None:
        kernel = module.kernel_size[0] * module.kernel_size[1]
        counts["stem"] += output.numel() * module.in_channels * kernel / module.groups

    def linear(module: nn.Linear, _inputs, output: torch.Tensor) -> None:
        counts["linear"] += output.numel() * module.in_features

    hooks = [m.register_forward_hook(conv if isinstance(m, nn.Conv2d) else linear)
             for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model.eval()(image)
    for hook in hooks:
        hook.remove()
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="3 rounds after 1 warm-up")
    parser.add_argument("--early-size", type=int, default=64,
                        help="side of the small images of progressive resizing (data.early_size)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/stem_cost.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    num_classes = 10
    steps, counts, params = {}, {}, {}
    torch.manual_seed(0)
    base = load_config(args.config)
    full = tuple(base.model.img_size)
    small = (args.early_size, args.early_size)
    if small == full or args.early_size % base.model.patch_size:
        raise SystemExit(f"--early-size {args.early_size}: expected a side other than the full "
                         f"{full} and a multiple of the patch size {base.model.patch_size}")
    labels = (torch.rand(args.batch_size, num_classes) < 0.2).float()
    images = {size: torch.randn(args.batch_size, base.model.in_chans, *size)
              for size in (full, small)}
    variants = ([(depth, True, full) for depth in DEPTHS]
                + [(depth, False, full) for depth in CONTIGUOUS_DEPTHS]
                + [(depth, True, small) for depth in CONTIGUOUS_DEPTHS])
    for depth, channels_last, size in variants:
        cfg = load_config(args.config, [f"model.stem_convs_per_stage={depth}"])
        model = create_model(cfg.model, num_classes)
        model.patch_embed.channels_last = channels_last
        name = (f"{depth} per stage" + ("" if channels_last else ", contiguous")
                + ("" if size == full else f", {size[0]}x{size[1]} images"))
        counts[name] = multiply_adds(model, images[size][:1])
        params[name] = sum(p.numel() for p in model.patch_embed.parameters())
        objective = WSSSObjective(cfg.train, model.resolve_attn_blocks(cfg.model.attn_blocks),
                                  has_background=True)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        batch = {"image": images[size], "labels": labels}

        def step(model=model, objective=objective, optimizer=optimizer, batch=batch) -> None:
            model.train()
            loss = objective(model, batch, device)["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        steps[name] = step
    repeats, warmup = (3, 1) if args.quick else (args.repeats, 3)
    times = interleaved_times(steps, repeats, warmup, device)
    reference = times["2 per stage"]
    rows, results = [], {}
    for name in steps:
        results[name] = {"seconds_per_step": median(times[name]),
                         "ratio_to_2": paired_ratio(times[name], reference),
                         "stem_multiply_adds_M": counts[name]["stem"] / 1e6,
                         "linear_multiply_adds_M": counts[name]["linear"] / 1e6,
                         "stem_parameters": params[name]}
        r = results[name]
        rows.append([name, f"{r['seconds_per_step']:.3f}", f"{r['ratio_to_2']:.2f}",
                     f"{r['stem_multiply_adds_M']:.1f}", f"{r['linear_multiply_adds_M']:.1f}",
                     r["stem_parameters"]])
    print_table(["stem convolutions", "s/step", "× depth 2", "stem MACs (M)", "linear MACs (M)",
                 "stem params"], rows)
    write_json(args.out, {"config": str(args.config), "batch_size": args.batch_size,
                          "image_size": list(full), "early_size": list(small),
                          "repeats": repeats, "environment": environment(device),
                          "results": results})


if __name__ == "__main__":
    main()
