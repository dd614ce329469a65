"""``attnmaps segment``: stage-1 run -> seeds -> second-stage network -> scores, in one directory.

``DIR/seeds/`` holds the seeds (indexed PNG) and their scores, ``DIR/stage1_val.json`` the
stage-1 run's validation scores from predicted labels (the column the second stage must beat),
``DIR/config.yaml``, ``log.jsonl`` and the checkpoint as in any run, and ``DIR/metrics.json`` the
three results side by side (``seeds``, ``stage1_val``, ``stage2``) with the wall-clock seconds of
each step. ``resume`` continues whatever is unfinished: seeds already written are kept, training
continues from its checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path

from ..checkpoint import has_checkpoint
from ..config import Config, load_config, save_config
from ..data.registry import build_dataset
from ..engine.distributed import is_main_process
from ..engine.evaluate import eval_options, evaluate
from ..metrics.report import save_metrics
from ..pipeline import load_run
from ..progress import logger
from .seeds import SEEDS_METRICS, write_seeds
from .train import SEEDS_DIR, train_segmenter

STAGE1_VAL = "stage1_val.json"
METRICS = "metrics.json"


def segment_config(stage1_run: Path, out_dir: Path, overrides: Sequence[str] = ()) -> Config:
    """The stage-1 run's config with ``overrides``, ``out_dir`` and ``segment.stage1_run`` set,
    ``segment.window`` defaulting to the training size (``data.image_size`` or
    ``model.img_size``) and ``segment.refine_iterations`` to ``pseudo.refine_iterations``."""
    cfg = load_config(stage1_run / "config.yaml", overrides)
    window = cfg.segment.window or cfg.data.image_size or cfg.model.img_size
    refine = cfg.segment.refine_iterations
    return dataclasses.replace(cfg, out_dir=str(out_dir), segment=dataclasses.replace(
        cfg.segment, stage1_run=str(stage1_run), window=list(window),
        refine_iterations=cfg.pseudo.refine_iterations if refine is None else refine))


def _stage1_scores(cfg: Config, out_dir: Path) -> dict:
    """Write the seeds and the stage-1 validation scores unless they exist; return both."""
    seeds_dir, val_path = out_dir / SEEDS_DIR, out_dir / STAGE1_VAL
    if (seeds_dir / SEEDS_METRICS).is_file() and val_path.is_file():
        return {"seeds": json.loads((seeds_dir / SEEDS_METRICS).read_text()),
                "stage1_val": json.loads(val_path.read_text())}
    stage1_cfg, model = load_run(Path(cfg.segment.stage1_run))
    stage1_cfg = dataclasses.replace(stage1_cfg, pseudo=cfg.pseudo, segment=cfg.segment)
    started = time.time()
    split = cfg.segment.seed_split or cfg.data.train_split
    logger.info("seeds for split %r from %s ...", split, cfg.segment.stage1_run)
    seeds = write_seeds(stage1_cfg, model, build_dataset(cfg.data, split, train=False), seeds_dir)
    seeds["seconds"] = time.time() - started
    logger.info("seeds: mIoU %.3f from true image labels (%.1f%% ignored)",
                seeds["miou_true_labels"], 100 * seeds["ignored_fraction"])
    started = time.time()
    val = evaluate(model, build_dataset(cfg.data, cfg.data.val_split, train=False), cfg.pseudo,
                   **eval_options(stage1_cfg))
    stage1_val = {"miou": val["miou"], "miou_true_labels": val["miou_true_labels"],
                  "per_class_iou": val["per_class_iou"], "map": val["map"],
                  "seconds": time.time() - started}
    if is_main_process():
        save_metrics(seeds_dir / SEEDS_METRICS, seeds)
        save_metrics(val_path, stage1_val)
    return {"seeds": seeds, "stage1_val": stage1_val}


def run_segment(stage1_run: Path | None, out_dir: Path, overrides: Sequence[str] = (),
                resume: bool = False) -> dict:
    """Seeds, stage 2 and scores into ``out_dir`` (module doc); returns ``DIR/metrics.json``'s
    content. ``stage1_run`` may be None when resuming (it is in ``DIR/config.yaml``)."""
    config_path = out_dir / "config.yaml"
    if resume:
        if not config_path.is_file():
            raise FileNotFoundError(f"--resume was given but {config_path} does not exist")
        cfg = load_config(config_path, overrides)
    elif stage1_run is None:
        raise ValueError("give the stage-1 run directory (--run) or --resume an existing one")
    elif config_path.is_file():
        raise FileExistsError(f"{out_dir} already holds a run (config.yaml); pass --resume to "
                              "continue it or choose a new --out")
    else:
        cfg = segment_config(stage1_run, out_dir, overrides)
        if is_main_process():
            save_config(cfg, config_path)
    result = _stage1_scores(cfg, out_dir)
    started = time.time()
    stage2 = train_segmenter(cfg, resume=has_checkpoint(out_dir))
    if not stage2:  # every epoch was done already
        return json.loads((out_dir / METRICS).read_text())
    stage2["seconds"] = time.time() - started
    result.update(stage2=stage2, class_names=stage2.get("class_names")
                  or result["seeds"].get("class_names"))
    if is_main_process():
        save_metrics(out_dir / METRICS, result)
    logger.info("validation mIoU: stage 1 (predicted labels) %.3f, stage 2 (no labels) %.3f; "
                "seeds (training split, true labels) %.3f", result["stage1_val"]["miou"],
                stage2["miou"], result["seeds"]["miou_true_labels"])
    return result
