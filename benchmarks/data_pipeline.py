"""Data pipeline throughput on VOC-sized JPEGs: decode + augment per worker, the loader end to
end, and a training epoch (loader + step) against the step alone.

A VOC-layout set of ``--images`` JPEGs of 500x375 (VOC's usual size) is written to a temporary
folder: a few distinct synthetic scenes (``attnmaps synth``'s generator, 20 classes), copied under
distinct ids, so every sample is a real JPEG decode. The preset (``--config``, default
``voc_cpu.yaml``) decides crop, resize, batch, model and workers; ``--set key=value`` overrides.

Reported: images/s of ``dataset[i]`` in this process (what one loader worker does: decode only,
and decode + augment + normalise), of the loader end to end at each ``--workers`` count (batches
copied to the device), and of ``train_one_epoch`` fed by the loader (*epoch*) and by the same
batches held in memory (*step*), interleaved; the ratio epoch / step (median of per-round
ratios) is the share of the step's speed that the data pipeline lets through (goal >= 0.9).

    python benchmarks/data_pipeline.py --quick       # 64 images, 2 rounds, 1 thread
    python benchmarks/data_pipeline.py               # 512 images, 5 rounds
    python benchmarks/data_pipeline.py --device cuda --config voc.yaml --workers 0,4,8,12 \\
        --set train.precision=bf16 train.batch_size=64 data.num_workers=12
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import shutil
import tempfile
import time
from pathlib import Path

import _measure as measure
import torch
from torch.utils.data import RandomSampler

import attnmaps
from attnmaps.config import Config, load_config
from attnmaps.data.image_io import read_image, write_image
from attnmaps.data.registry import build_dataset
from attnmaps.data.synthetic import write_synthetic_voc
from attnmaps.engine.distributed import DistContext
from attnmaps.engine.train import (
    Run,
    batch_to_device,
    make_loader,
    pixel_stats,
    setup,
    train_one_epoch,
)

PRESETS = Path(attnmaps.__file__).parent / "configs"
VOC_SIZE = (375, 500)  # H, W of most PASCAL VOC images
DISTINCT = 8  # scenes rendered; the rest are copies under other ids


def write_voc_jpegs(root: Path, num_images: int, seed: int = 0) -> Path:
    """A VOC-layout set at ``root``: ``num_images`` training JPEGs of 500x375 with masks, and
    a validation split of the first few."""
    write_synthetic_voc(root, num_train=DISTINCT, num_val=0, size=VOC_SIZE, seed=seed, colors=5)
    images, masks = root / "JPEGImages", root / "SegmentationClass"
    scenes = sorted(images.glob("*.png"))
    ids = [f"voc_{i:06d}" for i in range(num_images)]
    for i, image_id in enumerate(ids):
        scene = scenes[i % len(scenes)]
        write_image(images / f"{image_id}.jpg", read_image(scene))
        shutil.copyfile(masks / scene.name, masks / f"{image_id}.png")
    for scene in scenes:
        scene.unlink()
    splits = root / "ImageSets" / "Segmentation"
    (splits / "train.txt").write_text("\n".join(ids) + "\n")
    (splits / "val.txt").write_text("\n".join(ids[:4]) + "\n")
    return root


def per_worker_rates(cfg: Config, repeats: int) -> dict[str, float]:
    """Images/s of one process reading the training split: decode only, and full samples."""
    dataset = build_dataset(cfg.data, cfg.data.train_split, train=True)
    work = {"decode": lambda: [read_image(path) for path in dataset.image_paths],
            "decode + augment": lambda: [dataset[i] for i in range(len(dataset))]}
    times = measure.interleaved_times(work, repeats, 1, torch.device("cpu"))
    return {name: len(dataset) / measure.median(seconds) for name, seconds in times.items()}


def loader_rates(cfg: Config, workers: list[int], device: torch.device,
                 repeats: int) -> dict[int, float]:
    """Images/s of the training loader (batches copied to ``device``) at each worker count."""
    dataset = build_dataset(cfg.data, cfg.data.train_split, train=True)
    batch_size = min(cfg.train.batch_size, len(dataset))

    stats = pixel_stats(cfg.data, device)

    def drain(count: int) -> None:
        data = dataclasses.replace(cfg.data, num_workers=count)
        for batch in make_loader(dataset, batch_size, RandomSampler(dataset), data, device):
            batch_to_device(batch, device, stats)

    times = measure.interleaved_times({count: lambda c=count: drain(c) for count in workers},
                                      repeats, 0, device)
    images = len(dataset) // batch_size * batch_size
    return {count: images / measure.median(seconds) for count, seconds in times.items()}


def epoch_and_step(run: Run, repeats: int) -> dict[str, list[float]]:
    """Seconds of one ``train_one_epoch`` fed by the loader and by the same number of batches
    held in memory (on the device), interleaved."""
    loader = run.loader
    held = [batch_to_device(batch, run.ctx.device, run.pixel_stats) for batch in loader]
    rounds = itertools.count()

    def epoch(batches) -> None:
        run.loader = batches
        train_one_epoch(run, next(rounds))

    return measure.interleaved_times({"epoch": lambda: epoch(loader),
                                      "step": lambda: epoch(held)}, repeats, 1, run.ctx.device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="voc_cpu.yaml",
                        help="a preset name in attnmaps/configs or a YAML path")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides, e.g. train.batch_size=64")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--workers", default="0,1,2", help="loader worker counts to measure")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    measure.add_threads_arg(parser)
    parser.add_argument("--quick", action="store_true", help="64 images, 2 rounds, 1 thread")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/data_pipeline.json"))
    args = parser.parse_args()
    if args.quick:
        args.images, args.repeats = 64, 2
    measure.apply_threads(args)
    device = torch.device(args.device)
    preset = PRESETS / args.config if (PRESETS / args.config).is_file() else Path(args.config)
    workers = [int(count) for count in args.workers.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        root = write_voc_jpegs(Path(tmp) / "voc", args.images, args.seed)
        cfg = load_config(preset, [f"data.root={root}", "data.train_split=train",
                                   "data.val_split=val", f"out_dir={tmp}/run",
                                   f"train.device={args.device}", "train.checkpoint_every=0",
                                   f"train.seed={args.seed}", *args.set])
        started = time.perf_counter()
        per_worker = per_worker_rates(cfg, args.repeats)
        loader = loader_rates(cfg, workers, device, args.repeats)
        run = setup(cfg, DistContext(0, 1, 0, device, False), resume=False)
        measure.synchronize(device)
        times = epoch_and_step(run, args.repeats)
        images = run.steps_per_epoch * run.batch_size
        seconds = time.perf_counter() - started
    throughput = {name: images / measure.median(values) for name, values in times.items()}
    ratio = measure.paired_ratio(times["step"], times["epoch"])
    print(f"{args.images} JPEGs {VOC_SIZE[1]}x{VOC_SIZE[0]} -> {cfg.data.image_size}, preset "
          f"{preset.name}, batch {run.batch_size}, {cfg.data.num_workers} workers in the epoch, "
          f"{device}, {cfg.train.precision}, {torch.get_num_threads()} threads")
    measure.print_table(
        ["measure", "images/s"],
        [*[[f"one worker: {name}", f"{rate:.1f}"] for name, rate in per_worker.items()],
         *[[f"loader, {count} workers", f"{rate:.1f}"] for count, rate in loader.items()],
         *[[name, f"{rate:.1f}"] for name, rate in throughput.items()]])
    print(f"epoch / step: {ratio:.2f} (median of per-round ratios; goal >= 0.9)")
    measure.write_json(args.out, {
        "config": {**vars(args), "out": str(args.out), "preset": str(preset),
                   "image_size": cfg.data.image_size, "batch_size": run.batch_size,
                   "epoch_workers": cfg.data.num_workers, "precision": cfg.train.precision,
                   "normalize_on_device": cfg.data.normalize_on_device},
        "environment": measure.environment(device),
        "per_worker_images_per_second": per_worker,
        "loader_images_per_second": {str(count): rate for count, rate in loader.items()},
        "epoch_seconds": times["epoch"], "step_seconds": times["step"],
        "images_per_second": throughput, "epoch_over_step": ratio,
        "wall_seconds": seconds,
    })


if __name__ == "__main__":
    main()
