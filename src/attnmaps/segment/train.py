"""The second stage's training: the stage-1 loop (:mod:`attnmaps.engine.train`) with another
model, objective and evaluation.

:func:`setup` builds the :class:`~attnmaps.engine.train.Run` (the seed dataset with the
configured aligned augmentations, the network initialised from the stage-1 weights, AdamW with
the backbone at ``segment.backbone_lr_scale`` times the decoder's learning rate, the warm-up +
cosine schedule, resume); :func:`~attnmaps.engine.train.train_one_epoch` runs the steps;
:func:`end_of_epoch` scores the validation split without image labels and writes the checkpoint,
whose metadata rebuilds the network alone (:func:`~attnmaps.segment.model.load_segmenter`).
Checkpoint, resume, DDP and logging are the stage-1 run's.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from ..config import Config, TrainConfig
from ..data.registry import build_dataset
from ..engine.distributed import DistContext, barrier, sync_buffers
from ..engine.optim import adamw, param_groups
from ..engine.train import (
    EpochCallback,
    Run,
    append_log,
    assemble_run,
    check_run_dir,
    ended_without_evaluation,
    save_state,
    train,
)
from ..progress import logger
from ..runtime import seed_everything
from .evaluate import evaluate_segmenter
from .loss import SegmentationObjective, balanced_class_weights
from .model import SegmentationViT, create_segmenter, segmenter_metadata
from .seeds import SeedDataset

SEEDS_DIR = "seeds"
STAGE1_WEIGHTS = "last.safetensors"


def stage2_train_config(cfg: Config) -> TrainConfig:
    """``cfg.train`` with the second stage's schedule from ``cfg.segment``."""
    seg = cfg.segment
    return dataclasses.replace(cfg.train, epochs=seg.epochs, lr=seg.lr, min_lr=seg.min_lr,
                               warmup_epochs=seg.warmup_epochs, batch_size=seg.batch_size,
                               mask_fraction=0.0)


def build_optimizer(model: nn.Module, cfg: Config) -> torch.optim.AdamW:
    """AdamW over the decayed / non-decayed groups of the decoder at ``segment.lr`` and of the
    ViT backbone at ``segment.backbone_lr_scale`` times it (smp networks: one rate)."""
    train_cfg, seg = cfg.train, cfg.segment
    if isinstance(model, SegmentationViT):
        parts = [(model.decoder, seg.lr), (model.backbone, seg.lr * seg.backbone_lr_scale)]
    else:
        parts = [(model, seg.lr)]
    groups = [{**group, "lr": lr} for module, lr in parts
              for group in param_groups(module, train_cfg.weight_decay)]
    return adamw(groups, seg.lr, train_cfg.betas)


def num_labels(dataset) -> int:
    return dataset.num_classes + int(dataset.has_background)


def setup(cfg: Config, ctx: DistContext, resume: bool, allow_changes: bool = False) -> Run:
    """Everything the second stage's run needs (module doc); writes the config on rank 0."""
    cfg = dataclasses.replace(cfg, train=stage2_train_config(cfg))
    run_dir = Path(cfg.out_dir)
    check_run_dir(cfg, resume, allow_changes)
    seed_everything(cfg.train.seed)
    base = build_dataset(cfg.data, cfg.segment.seed_split or cfg.data.train_split, train=True)
    train_set = SeedDataset(base, run_dir / SEEDS_DIR)
    val_set = build_dataset(cfg.data, cfg.data.val_split, train=False)
    init = None if resume or cfg.segment.stage1_run is None else \
        Path(cfg.segment.stage1_run) / STAGE1_WEIGHTS
    model = create_segmenter(cfg.model, cfg.segment, base.num_classes, num_labels(base),
                             init_from=init).to(ctx.device)
    labels = num_labels(val_set)
    metadata = segmenter_metadata(cfg.model, cfg.segment, val_set.num_classes, labels,
                                  getattr(val_set, "class_names", None))
    weight = None
    if cfg.segment.class_weight_power:
        weight = balanced_class_weights(train_set.label_counts(num_labels(base)),
                                        cfg.segment.class_weight_power)
        logger.info("class-balanced cross-entropy, weights %s",
                    " ".join(f"{w:.2f}" for w in weight.tolist()))
        weight = weight.to(ctx.device)  # once here, not a host-to-device copy every step
    return assemble_run(cfg, ctx, resume, model, SegmentationObjective(weight),
                        build_optimizer(model, cfg), train_set, val_set, metadata, allow_changes)


def end_of_epoch(run: Run, epoch: int, images_per_second: float) -> dict:
    """Score the validation split (no image labels; every ``train.eval_every`` epochs and the
    last), log, save the checkpoint (rank 0)."""
    cfg, ctx = run.cfg, run.ctx
    sync_buffers(run.model)
    if ended_without_evaluation(run, epoch, images_per_second):
        return {"images_per_second": images_per_second}
    labels = num_labels(run.val_set)
    # as in stage 1, the refinement (slow, it only changes the masks) scores the last epoch only
    with torch.random.fork_rng(devices=[]):  # no random draws taken from the training
        metrics = evaluate_segmenter(run.scored_model, run.val_set, cfg.segment, labels,
                                     run.batch_size, refine=epoch == cfg.train.epochs - 1)
    metrics["images_per_second"] = images_per_second
    save_state(run, epoch, run.steps_per_epoch)
    if ctx.is_main:
        summary = {key: metrics[key] for key in ("miou", "pixel_acc", "mean_acc", "per_class_iou",
                                                 "images_per_second", "refine_iterations",
                                                 "raw_miou") if key in metrics}
        append_log(run.log_path, {"epoch": epoch, "step": run.step, "eval": summary})
        refined = (f", {metrics['refine_iterations']} PAMR iterations; unrefined "
                   f"{metrics['raw_miou']:.3f}" if "raw_miou" in metrics else "")
        logger.info("segment epoch %d/%d: validation mIoU %.3f (no image labels%s; %.0f "
                    "images/s)", epoch + 1, cfg.train.epochs, metrics["miou"], refined,
                    images_per_second)
    barrier()
    return metrics


def train_segmenter(cfg: Config, resume: bool = False,
                    on_epoch: EpochCallback | None = None) -> dict:
    """Train the second stage of ``cfg`` (seeds already in ``out_dir/seeds``); returns the last
    epoch's validation metrics. ``on_epoch`` as in :func:`~attnmaps.engine.train.train`."""
    return train(cfg, resume, on_epoch, setup_fn=setup, end_fn=end_of_epoch)
