"""``attnmaps pretrain``: self-supervised masked image modelling on the training images.

Trains the encoder of the configured ClassTokenViT with SimMIM (:mod:`attnmaps.models.mim`) on
the images of ``data.train_split`` (labels and masks unused) for ``pretrain.epochs`` epochs, then
writes ``last.safetensors`` in ``out_dir``: a complete ClassTokenViT checkpoint whose class tokens
and head are untrained, ready for ``model.init_from=<out_dir>/last.safetensors`` in
``attnmaps train`` with the same model settings. One process; no resume.

Example::

    attnmaps pretrain --config configs/digits.yaml data.root=data/digits out_dir=runs/mim
    attnmaps train --config configs/digits.yaml data.root=data/digits out_dir=runs/ft \\
        model.init_from=runs/mim/last.safetensors
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from torch.utils.data import RandomSampler

from ..checkpoint import checkpoint_paths, has_checkpoint, save_checkpoint
from ..config import Config, config_to_dict, save_config
from ..data.registry import build_dataset
from ..errors import TrainingDiverged
from ..models.factory import checkpoint_metadata, create_model
from ..models.mim import MaskedImageModel, random_patch_mask
from ..progress import logger, progress
from ..runtime import resolve_device, seed_everything
from .optim import build_optimizer, warmup_cosine
from .train import append_log, batch_to_device, make_loader, pixel_stats


def pretrain(cfg: Config) -> dict:
    """Pretrain into ``cfg.out_dir``; returns ``{"loss": last epoch's mean, "seconds": ...}``."""
    run_dir = Path(cfg.out_dir)
    weights, _ = checkpoint_paths(run_dir)
    if has_checkpoint(run_dir):
        raise FileExistsError(f"{run_dir} already holds a checkpoint ({weights.name}); set "
                              "out_dir to a new directory")
    seed_everything(cfg.train.seed)
    device = resolve_device(cfg.train.device)
    dataset = build_dataset(cfg.data, cfg.data.train_split, train=True)
    model = create_model(cfg.model, dataset.num_classes)
    mim = MaskedImageModel(model).to(device)
    settings = cfg.pretrain
    batch_size = min(settings.batch_size, len(dataset))
    loader = make_loader(dataset, batch_size, RandomSampler(dataset), cfg.data, device)
    stats = pixel_stats(cfg.data, device)
    total = settings.epochs * len(loader)
    optimizer = build_optimizer(mim, settings.lr, cfg.train.weight_decay, tuple(cfg.train.betas))
    scheduler = warmup_cosine(optimizer, total, min(total, round(settings.warmup_epochs
                                                               * len(loader))), 0.01)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    grid = model.grid
    started, mean = time.time(), math.nan
    for epoch in range(settings.epochs):
        mim.train()
        losses = []
        for batch in progress(loader, f"pretrain {epoch + 1}/{settings.epochs}"):
            images = batch_to_device(batch, device, stats)["image"]
            mask = random_patch_mask(len(images), grid, settings.mask_ratio).to(device)
            loss = mim(images, mask)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.train.grad_clip:
                torch.nn.utils.clip_grad_norm_(mim.parameters(), cfg.train.grad_clip)
            optimizer.step()
            scheduler.step()
            losses.append(loss.detach())
        values = torch.stack(losses).tolist()  # the epoch's only read-back, before its save
        bad = [(step, value) for step, value in enumerate(values, 1) if not math.isfinite(value)]
        if bad:
            raise TrainingDiverged(f"pretraining loss became {bad[0][1]} at step {bad[0][0]} of "
                                   f"epoch {epoch + 1}; nothing of this epoch was saved; lower "
                                   "pretrain.lr")
        mean = sum(values) / len(values)
        append_log(run_dir / "log.jsonl", {"epoch": epoch, "pretrain_loss": mean})
        save_checkpoint(run_dir, model, {"epoch": epoch, "config": config_to_dict(cfg)},
                        metadata=checkpoint_metadata(cfg.model, dataset.num_classes,
                                                     getattr(dataset, "class_names", None)))
        logger.info("pretrain epoch %d/%d: masked-patch L1 %.4f", epoch + 1, settings.epochs,
                    mean)
    return {"loss": mean, "seconds": time.time() - started}
