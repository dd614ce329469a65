"""Training-step throughput and memory: attnmaps' ClassTokenViT against the reference design.

Both models hold the same weights (VOC-like K=20, head="joint", stem="linear", one register
token) and take the same step: forward with class-token masking, BCE + 0.01 * L0, backward,
AdamW. The reference (benchmarks/reference_design.py) computes explicit attention, keeps every
block's [B, heads, N, N] attention and masks tokens in a Python loop; attnmaps runs the fused
attention kernel (on CPU in bfloat16 the explicit one, see benchmarks/attention_kernel.py), runs
the last block for the class tokens only (nothing reads the patch outputs) and masks with one
tensor operation. ``--precision bf16`` runs both under the same bfloat16 autocast; ``--explain``
adds how many graphs and graph breaks ``torch.compile`` makes of attnmaps' step (forward + loss). Reported: images/s (median over
interleaved repeats, and the median of the per-round speed ratios), bytes saved for backward,
and peak memory of the steps (CUDA: max allocated; CPU: peak RSS increase in a fresh process).

The default shape is CPU-sized (128x128 images, patch 16 -> 64 patches + 21 tokens, width 192,
6 blocks, 3 heads, batch 16: a few tenths of a second per step on 2 cores):

    python benchmarks/train_step.py                 # full: 3 warm-up + 20 rounds
    python benchmarks/train_step.py --quick         # about half a minute
    python benchmarks/train_step.py --device cuda --img-size 224 --embed-dim 768 --depth 12 \\
        --heads 12 --batch-size 64                  # ViT-B/16 on a GPU
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from _measure import (
    add_shape_args,
    apply_threads,
    environment,
    interleaved_times,
    median,
    mib,
    paired_ratio,
    peak_memory,
    print_table,
    run_child,
    saved_tensor_bytes,
    shape_kwargs,
    write_json,
)
from reference_design import ReferenceViT, reference_loss
from torch import Tensor, nn

from attnmaps.engine.acceleration import PRECISIONS, autocast, graph_breaks
from attnmaps.models.vit import ClassTokenViT

IMPLEMENTATIONS = ("attnmaps", "reference")
GATE_LAMBDA = 0.01


def voc_like_batch(batch: int, num_classes: int, img_size: int, device: torch.device,
                   seed: int) -> tuple[Tensor, Tensor]:
    """Random images and multi-hot labels with 1 to 3 present classes per image."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, img_size, img_size, generator=gen)
    labels = torch.zeros(batch, num_classes)
    for row in labels:
        present = torch.randperm(num_classes, generator=gen)[:int(torch.randint(1, 4, (1,),
                                                                               generator=gen))]
        row[present] = 1.0
    return images.to(device), labels.to(device)


def optimizer_for(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)


def attnmaps_loss(model: ClassTokenViT, images: Tensor, labels: Tensor) -> Tensor:
    """The loss of attnmaps' training loop (engine/train.py): BCE on logits + lambda * L0."""
    logits = model(images, labels)
    return (F.binary_cross_entropy_with_logits(logits.float(), labels)
            + GATE_LAMBDA * model.l0_penalty())


def reference_step_loss(model: ReferenceViT, images: Tensor, labels: Tensor) -> Tensor:
    logits, _, _ = model(images, labels)
    return reference_loss(model, logits, labels, GATE_LAMBDA)


def make_step(model: nn.Module, loss_fn: Callable[[nn.Module, Tensor, Tensor], Tensor],
              images: Tensor, labels: Tensor) -> Callable[[], float]:
    """One optimisation step per call, as a training loop takes it (loss read back each step)."""
    optimizer = optimizer_for(model)

    def step() -> float:
        loss = loss_fn(model, images, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def measured_peak(model: nn.Module, loss_fn: Callable[[nn.Module, Tensor, Tensor], Tensor],
                  images: Tensor, labels: Tensor, steps: int, device: torch.device) -> dict:
    """Peak memory (see ``_measure.peak_memory``) of ``steps`` steps after a warm-up step, so
    that the optimizer state and allocator caches exist before the measurement starts."""
    step = make_step(model, loss_fn, images, labels)
    step()

    def run() -> None:
        for _ in range(steps):
            step()

    return peak_memory(run, device)


def with_precision(loss_fn: Callable[[nn.Module, Tensor, Tensor], Tensor], precision: str,
                   device: torch.device) -> Callable[[nn.Module, Tensor, Tensor], Tensor]:
    """``loss_fn`` run under the trainer's autocast for ``precision`` (nothing for fp32)."""

    def run(model: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
        with autocast(precision, device):
            return loss_fn(model, images, labels)

    return run


def build(impl: str, args: argparse.Namespace, device: torch.device) -> tuple[nn.Module, Callable]:
    """The attnmaps model or its reference copy (same weights) and its loss function."""
    torch.manual_seed(args.seed)
    model = ClassTokenViT(**shape_kwargs(args, args.classes), head="joint", stem="linear")
    if impl == "attnmaps":
        return model.to(device).train(), with_precision(attnmaps_loss, args.precision, device)
    reference = ReferenceViT(**shape_kwargs(args, args.classes))
    reference.load_state_dict(model.state_dict())
    return (reference.to(device).train(),
            with_precision(reference_step_loss, args.precision, device))


def child(args: argparse.Namespace) -> None:
    """Peak memory of ``args.steps`` steps of one implementation, printed as a JSON line."""
    device = torch.device(args.device)
    images, labels = voc_like_batch(args.batch_size, args.classes, args.img_size, device,
                                    args.seed)
    print(json.dumps(measured_peak(*build(args.child, args, device), images, labels, args.steps,
                                   device)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_args(parser)
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="autocast of both implementations (as train.precision)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="steps in the peak-memory run")
    parser.add_argument("--quick", action="store_true", help="batch 8, 1 warm-up, 5 rounds, 1 thread")
    parser.add_argument("--explain", action="store_true",
                        help="report torch.compile's graph breaks in attnmaps' step")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/train_step.json"))
    parser.add_argument("--child", choices=IMPLEMENTATIONS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.batch_size, args.warmup, args.repeats, args.steps = 8, 1, 5, 2
    apply_threads(args)
    random.seed(args.seed)
    if args.child:
        child(args)
        return
    device = torch.device(args.device)
    images, labels = voc_like_batch(args.batch_size, args.classes, args.img_size, device,
                                    args.seed)
    built = {impl: build(impl, args, device) for impl in IMPLEMENTATIONS}
    counts = {impl: sum(p.numel() for p in model.parameters()) for impl, (model, _) in built.items()}
    if counts["attnmaps"] != counts["reference"]:
        raise RuntimeError(f"parameter counts differ: {counts}")
    saved = {impl: saved_tensor_bytes(lambda m=model, f=loss_fn: f(m, images, labels),
                                      exclude=list(model.parameters()))
             for impl, (model, loss_fn) in built.items()}
    explained = graph_breaks(built["attnmaps"][1], built["attnmaps"][0], images, labels) \
        if args.explain else None
    steps = {impl: make_step(model, loss_fn, images, labels)
             for impl, (model, loss_fn) in built.items()}
    times = interleaved_times(steps, args.repeats, args.warmup, device)
    del built, steps
    if device.type == "cuda":
        peaks = {impl: measured_peak(*build(impl, args, device), images, labels, args.steps,
                                     device) for impl in IMPLEMENTATIONS}
    else:
        forwarded = [a for a in sys.argv[1:] if a != "--quick"]
        extra = ["--batch-size", str(args.batch_size), "--steps", str(args.steps),
                 "--threads", str(torch.get_num_threads())]
        peaks = {impl: run_child(Path(__file__), [*forwarded, *extra, "--child", impl])
                 for impl in IMPLEMENTATIONS}
    throughput = {impl: args.batch_size / median(times[impl]) for impl in IMPLEMENTATIONS}
    speedup = paired_ratio(times["reference"], times["attnmaps"])
    rows = [[impl, f"{median(times[impl]) * 1e3:.1f}", f"{throughput[impl]:.1f}",
             f"{mib(saved[impl]):.1f}", f"{mib(peaks[impl]['peak_bytes']):.1f}"]
            for impl in IMPLEMENTATIONS]
    tokens = (args.img_size // args.patch_size) ** 2 + args.classes + 1
    print(f"K={args.classes}, {args.img_size}px/patch {args.patch_size} ({tokens} tokens), "
          f"width {args.embed_dim}, depth {args.depth}, {args.heads} heads, batch "
          f"{args.batch_size}, {counts['attnmaps'] / 1e6:.2f}M parameters, {device}, "
          f"{args.precision}")
    print_table(["impl", "step ms", "images/s", "saved MiB", "peak MiB"], rows)
    if explained is not None:
        print(f"torch.compile of attnmaps' step: {explained['graphs']} graph(s), "
              f"{explained['graph_breaks']} graph break(s) {explained['reasons'] or ''}")
    memory_ratio = peaks["attnmaps"]["peak_bytes"] / max(peaks["reference"]["peak_bytes"], 1)
    print(f"attnmaps / reference: throughput x{speedup:.2f} (median of per-round ratios), saved "
          f"for backward x{saved['attnmaps'] / saved['reference']:.2f}, peak memory "
          f"x{memory_ratio:.2f} ({peaks['attnmaps']['method']})")
    write_json(args.out, {
        "config": {**vars(args), "out": str(args.out), "tokens": tokens,
                   "parameters": counts["attnmaps"]},
        "environment": environment(device),
        "step_seconds": times, "images_per_second": throughput,
        "throughput_ratio": speedup, "saved_for_backward_bytes": saved,
        "peak_memory": peaks, "peak_memory_ratio": memory_ratio, "compile_graphs": explained,
    })


if __name__ == "__main__":
    main()
