"""Training loop for ClassTokenViT from image-level labels: BCE + lambda * L0(gates).

With ``train.mask_fraction > 0`` that fraction of the training images keeps its masks and adds
the CAMAL alignment loss on their class-token attention (mixed supervision, see
:class:`~attnmaps.engine.objective.WSSSObjective`).

A run directory holds ``config.yaml`` (the resolved config), ``log.jsonl`` (one JSON record per
logged step and per epoch evaluation) and the checkpoint pair ``last.safetensors`` /
``last.state.pt`` written atomically after every epoch; ``resume=True`` continues from it.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..config import Config, ModelConfig, config_to_dict, save_config
from ..data.mask_budget import MaskBudget
from ..data.registry import build_dataset
from ..metrics.report import to_jsonable
from ..models.vit import ClassTokenViT, parse_attn_blocks
from .checkpoint import (
    capture_rng_state,
    checkpoint_paths,
    load_checkpoint,
    load_weights,
    restore_rng_state,
    save_checkpoint,
)
from .evaluate import evaluate
from .objective import WSSSObjective
from .optim import build_optimizer, warmup_cosine

EpochCallback = Callable[[int, dict], None]


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available, else CPU; any other name is passed to torch."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_model(cfg: ModelConfig, num_classes: int) -> ClassTokenViT:
    """A ClassTokenViT shaped by ``cfg`` for ``num_classes`` classes."""
    return ClassTokenViT(
        num_classes=num_classes, in_chans=cfg.in_chans, img_size=cfg.img_size,
        patch_size=cfg.patch_size, embed_dim=cfg.embed_dim, depth=cfg.depth,
        num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias,
        drop_path=cfg.drop_path, num_registers=cfg.num_registers, head=cfg.head, stem=cfg.stem,
        gates=cfg.gates, gate_temperature=cfg.gate_temperature, mask_rate=cfg.mask_rate,
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def append_log(path: Path, record: dict) -> None:
    """Append one JSON line to the run's log."""
    with path.open("a") as f:
        f.write(json.dumps(to_jsonable(record)) + "\n")


def train(cfg: Config, resume: bool = False, on_epoch: EpochCallback | None = None) -> dict:
    """Train ``cfg`` into ``cfg.out_dir``; returns the last epoch's evaluation metrics.

    ``on_epoch(epoch, metrics)`` runs after each epoch's checkpoint is written. Epochs before
    the last are scored without PAMR refinement, which is slow and only changes the masks.
    """
    run_dir = Path(cfg.out_dir)
    weights_path, _ = checkpoint_paths(run_dir)
    if weights_path.exists() and not resume:
        raise FileExistsError(
            f"{run_dir} already holds a checkpoint ({weights_path.name}); pass --resume to continue "
            "it or set out_dir to a new directory"
        )
    if resume and not weights_path.exists():
        raise FileNotFoundError(f"--resume was given but {weights_path} does not exist")
    seed_everything(cfg.train.seed)
    device = resolve_device(cfg.train.device)
    train_set = build_dataset(cfg.data, cfg.data.train_split, train=True)
    val_set = build_dataset(cfg.data, cfg.data.val_split, train=False)
    if cfg.train.mask_fraction > 0:
        # A seed apart from the epoch orders' (seed * 100003 + epoch), or the images with masks
        # would be exactly the first batches of epoch 0.
        train_set = MaskBudget(train_set, cfg.train.mask_fraction, seed=cfg.train.seed + 7_777_777)
    objective = WSSSObjective(cfg.train, parse_attn_blocks(cfg.model.attn_blocks, cfg.model.depth),
                              train_set.has_background)
    model = build_model(cfg.model, train_set.num_classes)
    if cfg.model.init_from and not resume:
        load_weights(cfg.model.init_from, model)
    model = model.to(device)
    batch_size = min(cfg.train.batch_size, len(train_set))
    steps_per_epoch = len(train_set) // batch_size
    total_steps = cfg.train.epochs * steps_per_epoch
    optimizer = build_optimizer(model, cfg.train.lr, cfg.train.weight_decay, tuple(cfg.train.betas))
    scheduler = warmup_cosine(optimizer, total_steps,
                              min(total_steps, round(cfg.train.warmup_epochs * steps_per_epoch)),
                              cfg.train.min_lr / cfg.train.lr)
    start_epoch, step = 0, 0
    if resume:
        state = load_checkpoint(run_dir, model, map_location=device)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        restore_rng_state(state["rng"])
        start_epoch, step = state["epoch"] + 1, state["step"]
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    log_path = run_dir / "log.jsonl"
    metrics: dict = {}
    for epoch in range(start_epoch, cfg.train.epochs):
        model.train()
        order = torch.randperm(len(train_set),
                               generator=torch.Generator().manual_seed(cfg.train.seed * 100003 + epoch))
        loader = DataLoader(train_set, batch_size=batch_size, sampler=order.tolist(),
                            drop_last=True, num_workers=cfg.data.num_workers)
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", leave=False,
                   dynamic_ncols=True, mininterval=2.0)
        started = time.time()
        for batch in bar:
            parts = objective(model, batch, device)
            loss = parts["loss"]
            if not math.isfinite(loss.item()):
                raise FloatingPointError(
                    f"loss became {loss.item()} at step {step}; lower train.lr or set train.grad_clip"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.train.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}",
                            refresh=False)
            if step % cfg.train.log_every == 0:
                append_log(log_path, {"epoch": epoch, "step": step,
                                      **{name: value.item() for name, value in parts.items()},
                                      "lr": scheduler.get_last_lr()[0]})
        images_per_second = steps_per_epoch * batch_size / (time.time() - started)
        last = epoch == cfg.train.epochs - 1
        settings = cfg.pseudo if last else replace(cfg.pseudo, refine_iterations=0)
        metrics = evaluate(model, val_set, settings, cfg.model.attn_blocks, device,
                           batch_size=batch_size, has_background=val_set.has_background)
        metrics["images_per_second"] = images_per_second
        append_log(log_path, {"epoch": epoch, "step": step, "eval": metrics})
        save_checkpoint(run_dir, model, {
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "rng": capture_rng_state(), "epoch": epoch, "step": step,
            "config": config_to_dict(cfg),
        })
        tqdm.write(f"epoch {epoch + 1}/{cfg.train.epochs}: mAP {metrics['map']:.3f}  "
                   f"pseudo-mask mIoU {metrics['miou']:.3f}  heads closed "
                   f"{metrics['head_sparsity']:.0f}%")
        if on_epoch is not None:
            on_epoch(epoch, metrics)
    return metrics
