"""Shared measuring helpers for the benchmarks: interleaved timing, saved-for-backward bytes,
peak memory (CUDA allocator, or resident set size of a fresh subprocess on CPU), tables, JSON.

Timings of the implementations being compared are taken in alternating order within every
round, so that load from other processes on a shared machine hits all of them alike; compare
medians, or the median of the per-round ratios (:func:`paired_ratio`).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels on CUDA; nothing on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_times(fns: Mapping[str, Callable[[], object]], repeats: int, warmup: int,
                      device: torch.device) -> dict[str, list[float]]:
    """Seconds per call of every function in ``fns``, ``repeats`` rounds after ``warmup`` rounds.

    Each round calls every function once; the order rotates from round to round so no function
    always runs first (or right after a particular other one).
    """
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(warmup + repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            synchronize(device)
            start = time.perf_counter()
            fns[name]()
            synchronize(device)
            if round_index >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Median over rounds of ``numerator[i] / denominator[i]`` (times from the same round)."""
    if len(numerator) != len(denominator) or not numerator:
        raise ValueError(f"need two equally long, non-empty series, got {len(numerator)} and "
                         f"{len(denominator)} values")
    return median([a / b for a, b in zip(numerator, denominator)])


def saved_tensor_bytes(fn: Callable[[], object], exclude: Iterable[Tensor] = ()) -> int:
    """Bytes of the tensors autograd saves for backward while ``fn()`` runs.

    Every storage is counted once (by its data pointer), whatever number of views of it are
    saved; storages of the ``exclude`` tensors (e.g. the model's parameters) are not counted.
    The result of ``fn`` is kept alive until the count is taken, then dropped.
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    storages: dict[int, int] = {}

    def pack(tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in skip:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = fn()
    del result
    return sum(storages.values())


def current_rss_bytes() -> int:
    """Resident set size of this process now."""
    match = re.search(r"VmRSS:\s+(\d+) kB", STATUS.read_text())
    return int(match.group(1)) * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (``VmHWM``) to the current RSS; False if refused."""
    try:
        CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def peak_rss_bytes() -> int:
    """RSS high-water mark of this process (``VmHWM``, which ``ru_maxrss`` also reports)."""
    match = re.search(r"VmHWM:\s+(\d+) kB", STATUS.read_text())
    if match:
        return int(match.group(1)) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_memory(fn: Callable[[], object], device: torch.device) -> dict:
    """Peak memory increase while ``fn()`` runs, over the memory in use just before.

    CUDA: ``torch.cuda.max_memory_allocated`` after a reset of the peak statistics. CPU: the RSS
    high-water mark after resetting it through ``/proc/self/clear_refs``; where the reset is
    refused, the high-water mark of the whole process (``ru_maxrss``) is used, which is only
    meaningful in a fresh process whose earlier peak (imports, model building) was lower; the
    returned ``method`` says which one was used. Run it in a fresh subprocess
    (:func:`run_child`) so that earlier allocations of other implementations do not linger.
    """
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return {"peak_bytes": torch.cuda.max_memory_allocated(device) - before,
                "method": "torch.cuda.max_memory_allocated"}
    method = "VmHWM after clear_refs reset" if reset_peak_rss() else "ru_maxrss (no reset)"
    before = current_rss_bytes()
    fn()
    return {"peak_bytes": peak_rss_bytes() - before, "method": method}


def run_child(script: Path, args: Sequence[str]) -> dict:
    """Run ``python script *args`` in a fresh process; return the JSON object of its last line.

    The child's glibc serves every allocation above 128 KiB by ``mmap`` and unmaps it when freed
    (a fixed ``MALLOC_MMAP_THRESHOLD_`` turns off the adaptive threshold), so freed tensors leave
    the resident set at once and a warm-up step does not leave reusable memory behind that would
    hide part of the measured peak.
    """
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                          check=False, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"child run `{script.name} {' '.join(args)}` failed with exit code "
                           f"{proc.returncode}:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def growth_exponent(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of log(y) against log(x): y ~ x^slope."""
    return float(np.polyfit(np.log(np.asarray(xs, float)), np.log(np.asarray(ys, float)), 1)[0])


def mib(num_bytes: float) -> float:
    return num_bytes / 2**20


def print_table(columns: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """Print ``rows`` under ``columns``, right-aligned; floats with 3 significant decimals."""
    cells = [[f"{v:.3f}" if isinstance(v, float) else str(v) for v in row] for row in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


def environment(device: torch.device) -> dict:
    """Machine facts that a timing depends on."""
    info = {"torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "device": str(device),
            "load_average": os.getloadavg()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def write_json(path: Path, payload: dict) -> None:
    """Write ``payload`` as indented JSON, creating parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))
    print(f"wrote {path}")


def add_shape_args(parser: argparse.ArgumentParser, img_size: int | None = 128,
                   batch_size: int = 16) -> None:
    """Model and batch shape options shared by the benchmarks (``--img-size`` only when
    ``img_size`` is given), plus ``--device``, ``--seed`` and ``--threads``."""
    if img_size is not None:
        parser.add_argument("--img-size", type=int, default=img_size)
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--embed-dim", type=int, default=192)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--heads", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    add_threads_arg(parser)


def add_threads_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; 1 with --quick)")


def apply_threads(args: argparse.Namespace) -> None:
    """Set torch's CPU threads from ``--threads``; ``--quick`` defaults them to 1."""
    if args.quick and args.threads is None:
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)


def shape_kwargs(args: argparse.Namespace, num_classes: int, img_size: int | None = None) -> dict:
    """ClassTokenViT / ReferenceViT keyword arguments for the shape options (square images of
    ``img_size``, default ``--img-size``)."""
    side = img_size if img_size is not None else args.img_size
    return {"num_classes": num_classes, "img_size": (side, side), "patch_size": args.patch_size,
            "embed_dim": args.embed_dim, "depth": args.depth, "num_heads": args.heads,
            "num_registers": 1}
