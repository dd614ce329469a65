"""The raw class maps of several trained runs on the same images, one row per (image, run).

Each run is read out as its config says (``pseudo.maps``, threshold, merge; ``--maps NAME=KIND``
overrides ``pseudo.maps``), but with refinement off and one scale: the maps the network itself makes. The pseudo mask of each row comes from the
true image labels; each of the K map panels is one class's map, min-max normalised. Also the
scores of the runs on those images (raw-map mIoU from true labels, class-map correlation), so
the picture and the numbers describe the same images.

    python benchmarks/class_maps_side_by_side.py --split tune --images 4 \\
        --run "recipe=runs/recipe_seed0" --run "self-training=runs/st_seed0" \\
        --maps self-training=attention --out docs/bench/class_maps_side_by_side.png
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Subset

from attnmaps.conventions import min_max_normalize
from attnmaps.data.registry import build_dataset
from attnmaps.engine.evaluate import eval_options, evaluate
from attnmaps.pipeline import load_run
from attnmaps.pseudo.masks import upsample_maps
from attnmaps.viz import save_attention_grid


def raw_read_out(run: Path, split: str, images: int, maps: str | None = None) -> dict:
    """The first ``images`` images of ``split`` through ``run``'s own read-out (``maps``, if
    given, replaces its ``pseudo.maps``) without refinement: true-label pseudo masks,
    image-size maps [K,H,W], the dataset and the scores."""
    cfg, model = load_run(run, [f"pseudo.maps={maps}"] if maps else [], device="cpu")
    dataset = build_dataset(cfg.data, split, train=False)
    subset = Subset(dataset, range(min(images, len(dataset))))
    settings = replace(cfg.pseudo, refine_iterations=0, tta_scales=[1.0], tta_flip=False,
                       crf=False, use_true_labels=True)
    kept: dict[str, list] = {"masks": [], "maps": []}

    def keep(batch: dict, probs: torch.Tensor, maps: torch.Tensor, masks: torch.Tensor) -> None:
        full = min_max_normalize(upsample_maps(maps, tuple(masks.shape[-2:])))
        kept["maps"] += list(full.numpy())
        kept["masks"] += list(masks.numpy())

    metrics = evaluate(model, subset, settings, **eval_options(cfg), on_batch=keep)
    return {**kept, "dataset": dataset, "read_out": cfg.pseudo.maps,
            "scores": {"raw_miou_true_labels": metrics["miou_true_labels"],
                       "class_map_correlation": metrics["class_map_correlation"]}}


def side_by_side(runs: dict[str, Path], split: str, images: int, out: Path,
                 maps: dict[str, str] | None = None) -> dict:
    """Draw the grid to ``out`` and write the scores next to it (``.json``); returns them.
    ``maps`` gives some runs another ``pseudo.maps``."""
    maps = maps or {}
    unknown = set(maps) - set(runs)
    if unknown:
        raise ValueError(f"--maps names {sorted(unknown)}, which no --run has; runs: {list(runs)}")
    read = {name: raw_read_out(path, split, images, maps.get(name))
            for name, path in runs.items()}
    dataset = next(iter(read.values()))["dataset"]
    rows: dict[str, list] = {"images": [], "gt": [], "masks": [], "maps": [], "labels": []}
    for i in range(len(next(iter(read.values()))["masks"])):
        for name, result in read.items():
            rows["images"].append(dataset.raw_image(i))
            rows["gt"].append(dataset[i]["mask"].numpy().astype(np.uint8))
            rows["masks"].append(result["masks"][i])
            rows["maps"].append(result["maps"][i])
            rows["labels"].append(f"{name} ({result['read_out']})")
    save_attention_grid(out, rows["images"], rows["gt"], rows["masks"], rows["maps"],
                        dataset.class_names, row_labels=rows["labels"])
    report = {"split": split, "images": images,
              "runs": {name: {"path": str(runs[name]), "read_out": result["read_out"],
                              **result["scores"]} for name, result in read.items()}}
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", required=True, metavar="NAME=DIR",
                        help="a run directory and the name its rows get (repeat)")
    parser.add_argument("--maps", action="append", default=[], metavar="NAME=KIND",
                        help="read run NAME out with pseudo.maps=KIND (attention or fused)")
    parser.add_argument("--split", default="tune")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    args = parser.parse_args()
    runs, maps = {}, {}
    for option, items, into in (("--run", args.run, runs), ("--maps", args.maps, maps)):
        for item in items:
            name, sep, value = item.partition("=")
            if not sep or not name or not value:
                parser.error(f"{option} {item!r}: expected NAME=VALUE")
            into[name] = value
    report = side_by_side({name: Path(path) for name, path in runs.items()}, args.split,
                          args.images, args.out, maps)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
