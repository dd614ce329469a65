"""Training loop for ClassTokenViT from image-level labels: BCE + lambda * L0(gates).

With ``train.mask_fraction > 0`` that fraction of the training images keeps its masks and adds
the CAMAL alignment loss on their class-token attention (mixed supervision, see
:class:`~attnmaps.engine.objective.WSSSObjective`).

A run directory holds ``config.yaml`` (the resolved config), ``log.jsonl`` (one JSON record per
logged step and per epoch evaluation) and the checkpoint pair ``last.safetensors`` /
``last.state.pt`` written atomically after every epoch; ``resume=True`` continues from it.

Under ``torchrun --nproc_per_node=N`` (see :mod:`.distributed`) the model trains in
DistributedDataParallel. ``train.batch_size`` is the global batch: every process takes
``batch_size // N`` images per step from its shard of the same seeded per-epoch permutation, so
the N shards of a step form the single-process batch. Rank 0 alone writes the config, the log
(losses averaged over processes) and the checkpoints and shows progress; evaluation is sharded
over the processes and its metrics reduced. Each process draws its own random numbers (gate
noise, class-token masking, augmentation); the checkpoint keeps every rank's RNG state.
"""

from __future__ import annotations

import json
import math
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..config import Config, ModelConfig, TrainConfig, config_to_dict, save_config
from ..data.mask_budget import MaskBudget
from ..data.mixing import mix_batch
from ..data.registry import build_dataset
from ..metrics.report import to_jsonable
from ..models.convert import is_attnmaps_checkpoint, load_pretrained
from ..models.vit import ClassTokenViT
from .acceleration import autocast, compile_module
from .checkpoint import (
    capture_rng_state,
    checkpoint_paths,
    load_checkpoint,
    load_weights,
    restore_rng_state,
    save_checkpoint,
)
from .distributed import (
    DistContext,
    ShardedSampler,
    all_reduce_mean,
    barrier,
    cleanup,
    gather_objects,
    init_distributed,
    is_main_process,
    sync_buffers,
)
from .ema import build_ema, ema_state
from .evaluate import evaluate
from .gate_schedule import scale_gate_lr, set_gate_init
from .label_prior import init_head_bias, label_frequencies
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
        class_blocks=cfg.class_blocks, grad_checkpointing=cfg.grad_checkpointing,
        attention_kernel=cfg.attention_kernel,
    )


def init_weights(cfg: ModelConfig, model: ClassTokenViT) -> None:
    """Load ``cfg.init_from``: an attnmaps checkpoint as is, a timm / DeiT / DINO / DINOv2
    checkpoint through :func:`~attnmaps.models.convert.load_pretrained` (report printed)."""
    path = Path(cfg.init_from)
    if not path.is_file():
        raise FileNotFoundError(f"model.init_from={cfg.init_from!r}: no such file")
    if is_attnmaps_checkpoint(path):
        load_weights(path, model)
        return
    report = load_pretrained(path, model, adapt_channels=cfg.adapt_channels,
                             adapt_patch_size=cfg.adapt_patch_size)
    if is_main_process():
        tqdm.write(str(report))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rank_seed(seed: int, rank: int, epoch: int = 0) -> int:
    """Seed of the random streams of process ``rank`` > 0 (rank 0 keeps ``seed``'s stream)."""
    return seed + 1_000_003 * rank + epoch


def append_log(path: Path, record: dict) -> None:
    """Append one JSON line to the run's log."""
    with path.open("a") as f:
        f.write(json.dumps(to_jsonable(record)) + "\n")


class TrainStep(nn.Module):
    """The forward pass of one training step, model and objective, as a single module call.

    DistributedDataParallel synchronises the gradients of what runs inside its ``forward``, and
    the objective uses the model through ``forward_features``, ``forward_head``, ``class_maps``
    and ``l0_penalty``; running the whole objective here lets the wrapped (and compiled) step
    see every use of every parameter. ``precision="bf16"`` runs it under bf16 autocast; the
    returned loss terms are float32.
    """

    def __init__(self, model: ClassTokenViT, objective: WSSSObjective, device: torch.device,
                 precision: str = "fp32"):
        super().__init__()
        self.model = model
        self.objective = objective
        self.device = device
        self.precision = precision

    def forward(self, batch: dict) -> dict[str, Tensor]:
        with autocast(self.precision, self.device):
            parts = self.objective(self.model, batch, self.device)
        return {name: value.float() for name, value in parts.items()}


def build_train_step(model: ClassTokenViT, objective: WSSSObjective, cfg: TrainConfig,
                     ctx: DistContext) -> nn.Module:
    """:class:`TrainStep`, wrapped in DistributedDataParallel under several processes and
    compiled with ``cfg.compile``. Its parameters are ``model``'s; save ``model`` itself."""
    step: nn.Module = TrainStep(model, objective, ctx.device, cfg.precision)
    if ctx.world_size > 1:
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        step = DistributedDataParallel(step, device_ids=device_ids)
    if cfg.compile:
        step = compile_module(step, ctx.device)
    return step


def batch_layout(batch_size: int, num_samples: int, world_size: int) -> tuple[int, int]:
    """``(per-process batch, steps per epoch)`` for the global ``batch_size`` (capped at
    ``num_samples``) shared by ``world_size`` processes; incomplete last batches are dropped."""
    global_batch = min(batch_size, num_samples)
    per_rank = global_batch // world_size
    if per_rank < 1:
        raise ValueError(f"train.batch_size={batch_size} is the global batch (capped at the "
                         f"{num_samples} training images) and must be at least the number of "
                         f"processes, {world_size}")
    if global_batch % world_size and world_size > 1:
        warnings.warn(f"train.batch_size={global_batch} is not divisible by the {world_size} "
                      f"processes; each takes {per_rank} images, a global batch of "
                      f"{per_rank * world_size}", stacklevel=2)
    return per_rank, num_samples // (per_rank * world_size)


def restore_rank_rng(state: dict, ctx: DistContext, seed: int, epoch: int) -> None:
    """Restore this process's RNG state from a checkpoint's ``state``.

    With as many processes as saved it, each restores its own state (``rng_by_rank``), so the
    run continues exactly. Otherwise every process restores rank 0's state (``rng``) and ranks
    > 0 are re-seeded from ``(seed, rank, epoch)``: the run continues, not bit-identically.
    """
    by_rank = state.get("rng_by_rank", [state["rng"]])
    if len(by_rank) == ctx.world_size:
        restore_rng_state(by_rank[ctx.rank])
        return
    restore_rng_state(state["rng"])
    if ctx.is_main:
        warnings.warn(f"the checkpoint was written by {len(by_rank)} process(es) and is resumed "
                      f"by {ctx.world_size}; random streams are re-seeded, so the run does not "
                      "continue bit-identically", stacklevel=2)
    if ctx.rank:
        seed_everything(rank_seed(seed, ctx.rank, epoch))


def train(cfg: Config, resume: bool = False, on_epoch: EpochCallback | None = None) -> dict:
    """Train ``cfg`` into ``cfg.out_dir``; returns the last epoch's evaluation metrics.

    ``on_epoch(epoch, metrics)`` runs after each epoch's checkpoint is written (on every
    process; the metrics are the same on all). Epochs before the last are scored without PAMR,
    CRF and test-time augmentation, which are slow and only change the masks. Under torchrun
    the process group is created from the environment and destroyed on return or on an
    exception; a process group that the caller already initialised is used and left open.
    """
    ctx = init_distributed(resolve_device(cfg.train.device))
    try:
        return _train(cfg, ctx, resume, on_epoch)
    finally:
        if ctx.owns_group:
            cleanup()


def _train(cfg: Config, ctx: DistContext, resume: bool, on_epoch: EpochCallback | None) -> dict:
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
    device = ctx.device
    train_set = build_dataset(cfg.data, cfg.data.train_split, train=True)
    val_set = build_dataset(cfg.data, cfg.data.val_split, train=False)
    if cfg.train.mask_fraction > 0:
        # A seed apart from the epoch orders' (seed * 100003 + epoch), or the images with masks
        # would be exactly the first batches of epoch 0.
        train_set = MaskBudget(train_set, cfg.train.mask_fraction, seed=cfg.train.seed + 7_777_777)
        train_set.require_masks()
    model = build_model(cfg.model, train_set.num_classes)
    objective = WSSSObjective(cfg.train, model.resolve_attn_blocks(cfg.model.attn_blocks),
                              train_set.has_background)
    if cfg.model.init_from and not resume:
        init_weights(cfg.model, model)
    if cfg.model.gate_init is not None and not resume:
        set_gate_init(model, cfg.model.gate_init)
    if cfg.train.prior_bias and not resume:
        init_head_bias(model, label_frequencies(train_set))
    model = model.to(device)
    batch_size, steps_per_epoch = batch_layout(cfg.train.batch_size, len(train_set),
                                               ctx.world_size)
    total_steps = cfg.train.epochs * steps_per_epoch
    optimizer = build_optimizer(model, cfg.train.lr, cfg.train.weight_decay, tuple(cfg.train.betas))
    if cfg.train.gate_lr_scale != 1.0:
        scale_gate_lr(optimizer, cfg.train.gate_lr_scale)
    scheduler = warmup_cosine(optimizer, total_steps,
                              min(total_steps, round(cfg.train.warmup_epochs * steps_per_epoch)),
                              cfg.train.min_lr / cfg.train.lr)
    start_epoch, step = 0, 0
    if resume:
        state = load_checkpoint(run_dir, model, map_location=device)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, step = state["epoch"] + 1, state["step"]
        restore_rank_rng(state, ctx, cfg.train.seed, start_epoch)
    elif ctx.rank:
        seed_everything(rank_seed(cfg.train.seed, ctx.rank))
    ema = build_ema(model, cfg.train.ema_decay, state if resume else None)
    train_step = build_train_step(model, objective, cfg.train, ctx)
    sampler = ShardedSampler(len(train_set), cfg.train.seed, ctx.rank, ctx.world_size)
    loader = DataLoader(train_set, batch_size=batch_size, sampler=sampler, drop_last=True,
                        num_workers=cfg.data.num_workers)
    log_path = run_dir / "log.jsonl"
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    metrics: dict = {}
    for epoch in range(start_epoch, cfg.train.epochs):
        train_step.train()
        sampler.set_epoch(epoch)
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", leave=False,
                   dynamic_ncols=True, mininterval=2.0, disable=not ctx.is_main)
        started = time.time()
        for batch in bar:
            if cfg.train.mix != "none" and torch.rand(()).item() < cfg.train.mix_prob:
                batch = mix_batch(batch, cfg.train.mix, cfg.train.mix_alpha)
            parts = train_step(batch)
            means = all_reduce_mean(torch.stack([value.detach() for value in parts.values()]))
            values = dict(zip(parts, means.tolist()))
            if not math.isfinite(values["loss"]):
                raise FloatingPointError(
                    f"loss became {values['loss']} at step {step}; lower train.lr or set "
                    "train.grad_clip"
                )
            optimizer.zero_grad(set_to_none=True)
            parts["loss"].backward()
            if cfg.train.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            optimizer.step()
            scheduler.step()
            if ema is not None:
                ema.update(model)
            step += 1
            bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}",
                            refresh=False)
            if ctx.is_main and step % cfg.train.log_every == 0:
                append_log(log_path, {"epoch": epoch, "step": step, **values,
                                      "lr": scheduler.get_last_lr()[0]})
        images_per_second = (steps_per_epoch * batch_size * ctx.world_size
                             / (time.time() - started))
        sync_buffers(model)
        scored = model if ema is None else ema.module
        last = epoch == cfg.train.epochs - 1
        settings = cfg.pseudo if last else replace(cfg.pseudo, refine_iterations=0, crf=False,
                                                   tta_scales=[1.0], tta_flip=False)
        metrics = evaluate(scored, val_set, settings, cfg.model.attn_blocks, device,
                           batch_size=batch_size, has_background=val_set.has_background,
                           precision=cfg.train.precision)
        metrics["images_per_second"] = images_per_second
        rng_by_rank = gather_objects(capture_rng_state())
        if ctx.is_main:
            summary = {key: value for key, value in metrics.items() if key != "confusion"}
            append_log(log_path, {"epoch": epoch, "step": step, "eval": summary})
            extra = {"rng_by_rank": rng_by_rank} if ctx.world_size > 1 else {}
            save_checkpoint(run_dir, scored, {
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": rng_by_rank[0], "epoch": epoch, "step": step,
                "config": config_to_dict(cfg), **extra, **ema_state(ema, model),
            })
            tqdm.write(f"epoch {epoch + 1}/{cfg.train.epochs}: mAP {metrics['map']:.3f}  "
                       f"pseudo-mask mIoU {metrics['miou']:.3f}  heads closed "
                       f"{metrics['head_sparsity']:.0f}%")
        barrier()
        if on_epoch is not None:
            on_epoch(epoch, metrics)
    return metrics
