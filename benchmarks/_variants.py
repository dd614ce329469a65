"""Shared by the quality benchmarks: train config variants over seeds, summarise mean ± std."""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

from attnmaps.config import load_config
from attnmaps.data.synthetic import write_synthetic_voc
from attnmaps.demo import NUM_VAL, demo_config_path
from attnmaps.engine.train import train


def ensure_data(root: Path, num_train: int, num_val: int = NUM_VAL, colors: int = 0) -> Path:
    """The demo's synthetic set at ``root`` (written once); ``colors`` as in
    :func:`~attnmaps.data.synthetic.write_synthetic_voc`."""
    if not (root / "ImageSets").exists():
        write_synthetic_voc(root, num_train=num_train, num_val=num_val, colors=colors)
    return root


def run_dir(out: Path, variant: str, seed: int) -> Path:
    """The run directory of ``variant`` (its name up to " (") and ``seed`` under ``out``."""
    return out / f"{variant.split(' (')[0].replace(' ', '_').replace('%', 'pct')}_seed{seed}"


def run_variants(out: Path, data: Path, variants: Mapping[str, Sequence[str]], seeds: int,
                 keys: Sequence[str], extra: Sequence[str] = ()) -> dict[str, list[dict]]:
    """Train every variant (demo config + its overrides + ``extra``) for each seed.

    Finished runs are read back from their logs, so an interrupted benchmark resumes.
    """
    results: dict[str, list[dict]] = {name: [] for name in variants}
    for seed in range(seeds):
        for name, overrides in variants.items():
            run = run_dir(out, name, seed)
            cfg = load_config(demo_config_path(), [f"data.root={data}", f"out_dir={run}",
                                                   f"train.seed={seed}", *overrides, *extra])
            metrics = train(cfg, resume=(run / "last.safetensors").exists())
            if not metrics:
                metrics = json.loads((run / "log.jsonl").read_text().splitlines()[-1])["eval"]
            results[name].append({key: metrics[key] for key in keys})
    return results


def summarise(results: Mapping[str, list[dict]], keys: Sequence[str]) -> dict:
    """Mean and sample standard deviation (0 for one seed) of every key per variant."""
    return {name: {key: (statistics.mean(r[key] for r in runs),
                         statistics.stdev(r[key] for r in runs) if len(runs) > 1 else 0.0)
                   for key in keys} for name, runs in results.items()}


def print_summary(summary: Mapping[str, Mapping[str, tuple[float, float]]],
                  keys: Sequence[str], width: int = 28) -> None:
    print(f"{'variant':{width}s}" + "".join(f"{key:>24s}" for key in keys))
    for name, row in summary.items():
        print(f"{name:{width}s}" + "".join(f"{m:>16.3f} ± {s:5.3f}" for m, s in row.values()))
