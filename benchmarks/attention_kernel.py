"""Attention kernels: fused ``F.scaled_dot_product_attention`` against explicit matmul + softmax.

Times forward + backward (training) and forward alone without autograd (evaluation) of
``attnmaps.models.vit.attention`` with each kernel on
[B, heads, L, 64] inputs laid out as the model lays them out (a permuted view of one fused qkv
projection), in float32 and bfloat16, for a few sequence lengths, and says which kernel
``"auto"`` picks. This is the measurement behind ``"auto"``: on CPU the fused kernel wins in
float32, the explicit one in bfloat16.

    python benchmarks/attention_kernel.py --threads 1      # about a minute on CPU
    python benchmarks/attention_kernel.py --device cuda
"""

from __future__ import annotations

import argparse
from itertools import product
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

from attnmaps.models.vit import attention, resolve_attention_kernel

KERNELS = ("fused", "explicit")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# (batch, heads, tokens): ViT-Ti/16 at 224 px with K=20; 448 px; one 512x640 tile (Table 7).
SHAPES = ((16, 3, 217), (4, 3, 805), (2, 6, 1301))
HEAD_DIM = 64


MODES = ("train", "eval")


def step(kernel: str, qkv: torch.Tensor, mode: str):
    """Attention of the heads in ``qkv`` [B, L, 3, heads, d]: forward and backward
    (``"train"``) or forward under ``torch.no_grad`` (``"eval"``)."""

    def run() -> None:
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if mode == "train":
            attention(q, k, v, kernel).float().sum().backward()
            return
        with torch.no_grad():
            attention(q, k, v, kernel)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="first shape only, 3 rounds")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/attention_kernel.json"))
    add_threads_arg(parser)
    args = parser.parse_args()
    apply_threads(args)
    shapes = SHAPES[:1] if args.quick else SHAPES
    repeats = 3 if args.quick else args.repeats
    device = torch.device(args.device)
    rows, results = [], []
    for (batch, heads, tokens), (name, dtype), mode in product(shapes, DTYPES.items(), MODES):
        gen = torch.Generator().manual_seed(0)
        qkv = torch.randn(batch, tokens, 3, heads, HEAD_DIM, generator=gen).to(device, dtype)
        qkv.requires_grad_(mode == "train")
        times = interleaved_times({k: step(k, qkv, mode) for k in KERNELS}, repeats,
                                  args.warmup, device)
        ms = {k: median(times[k]) * 1e3 for k in KERNELS}
        ratio = paired_ratio(times["fused"], times["explicit"])
        choice = resolve_attention_kernel("auto", qkv)
        rows.append([f"{batch}x{heads}x{tokens}", name, mode, f"{ms['fused']:.1f}",
                     f"{ms['explicit']:.1f}", f"{ratio:.2f}", choice])
        results.append({"batch": batch, "heads": heads, "tokens": tokens, "dtype": name,
                        "mode": mode, "ms": ms, "fused_over_explicit": ratio, "auto": choice})
    print_table(["B x heads x L", "dtype", "mode", "fused ms", "explicit ms", "fused/explicit",
                 "auto"], rows)
    write_json(args.out, {"config": {**vars(args), "out": str(args.out), "head_dim": HEAD_DIM},
                          "environment": environment(device), "results": results})


if __name__ == "__main__":
    main()
