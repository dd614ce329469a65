"""Training loop for ClassTokenViT from image-level labels: BCE + lambda * L0(gates).

With ``train.mask_fraction > 0`` that fraction of the training images keeps its masks and adds
the CAMAL alignment loss on their class-token attention (mixed supervision, see
:class:`~attnmaps.engine.objective.WSSSObjective`).

A run directory holds ``config.yaml`` (the resolved config), ``log.jsonl`` (one JSON record per
logged step and per epoch evaluation) and the checkpoint pair ``last.safetensors`` /
``last.state.pt`` written atomically after every epoch; ``resume=True`` continues from it. The
weights file carries the model config, class count and class names in its metadata, so
:func:`~attnmaps.models.factory.load_model` rebuilds the model from it alone.

The loop is split as timm's: :func:`setup` builds everything a run needs (:class:`Run`),
:func:`train_one_epoch` runs the optimisation steps of one epoch, :func:`end_of_epoch`
evaluates, logs and saves the checkpoint.

Under ``torchrun --nproc_per_node=N`` (see :mod:`.distributed`) the model trains in
DistributedDataParallel. ``train.batch_size`` is the global batch: every process takes
``batch_size // N`` images per step from its shard of the same seeded per-epoch permutation
(``DistributedSampler``), so the N shards of a step form the single-process batch. Rank 0 alone
writes the config, the log (losses averaged over processes) and the checkpoints and reports
progress; evaluation is sharded over the processes and its metrics reduced. Each process draws
its own random numbers (gate noise, class-token masking, augmentation); the checkpoint keeps
every rank's RNG state. Progress goes to the ``attnmaps`` logger, one line per epoch; a
progress bar is shown only when stderr is a terminal.

The steps run without waiting for the device: the loss terms stay on it and are read back (one
all-reduce and one copy to the host for all the steps since the last read-back) every
``train.log_every`` steps, before every checkpoint and at the end of the epoch. A non-finite loss
is reported at the next read-back, naming its step; no checkpoint is written before the check.
"""

from __future__ import annotations

import json
import math
import signal
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from tqdm import tqdm

from ..checkpoint import (
    capture_rng_state,
    checkpoint_paths,
    has_checkpoint,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from ..config import Config, DataConfig, TrainConfig, config_to_dict, save_config
from ..data.base import normalize_images
from ..data.mask_budget import MaskBudget
from ..data.mixing import mix_batch
from ..data.pseudo_mask_dataset import WithPseudoMasks
from ..data.registry import build_dataset
from ..data.transforms import set_geometry_at_epoch
from ..errors import TrainingDiverged
from ..metrics.report import to_jsonable
from ..models.factory import checkpoint_metadata, create_model
from ..progress import logger, progress
from ..runtime import resolve_device, seed_everything
from .acceleration import autocast, compile_module
from .distributed import (
    DistContext,
    all_reduce_mean,
    barrier,
    cleanup,
    gather_objects,
    init_distributed,
    sync_buffers,
)
from .ema import ModelEMA, build_ema, ema_state
from .evaluate import eval_options, evaluate
from .gate_schedule import delay_gates, scale_gate_lr, set_gate_init
from .interrupt import Interrupted, StopRequest
from .label_prior import init_head_bias, label_frequencies
from .objective import WSSSObjective
from .optim import build_optimizer, load_optimizer_state, set_base_lrs, warmup_cosine
from .resume import (
    SkipSampler,
    check_masks,
    check_resume_config,
    keep_previous_config,
    truncate_log,
)
from .run_lock import run_lock
from .self_training_refresh import PseudoMaskRefresh

EpochCallback = Callable[[int, dict], None]
SetupFn = Callable[["Config", "DistContext", bool, bool], "Run"]
EndOfEpochFn = Callable[["Run", int, float], dict]
Objective = Callable[[nn.Module, dict, torch.device], dict[str, Tensor]]


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

    def __init__(self, model: nn.Module, objective: Objective, device: torch.device,
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


def build_train_step(model: nn.Module, objective: Objective, cfg: TrainConfig,
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


def training_sampler(dataset: Dataset, seed: int, ctx: DistContext) -> DistributedSampler:
    """This process's share of one seeded per-epoch permutation of ``dataset``: positions
    ``rank, rank + W, ...`` of ``randperm(len, seed * 100003 + epoch)``, the last
    ``len % W`` positions left out so that every rank takes as many steps."""
    return DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                              seed=seed * 100003, drop_last=True)


def make_loader(dataset: Dataset, batch_size: int, sampler: Sampler, cfg: DataConfig,
                device: torch.device) -> DataLoader:
    """The training DataLoader: complete batches in ``sampler``'s order, ``cfg.num_workers``
    workers each keeping ``cfg.prefetch_factor`` batches ready (and alive between epochs with
    ``cfg.persistent_workers``), pinned host memory when ``device`` is CUDA so that
    :func:`batch_to_device` copies without blocking."""
    workers = {"prefetch_factor": cfg.prefetch_factor,
               "persistent_workers": cfg.persistent_workers} if cfg.num_workers else {}
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                      num_workers=cfg.num_workers, pin_memory=device.type == "cuda", **workers)


def pixel_stats(cfg: DataConfig, device: torch.device) -> tuple[Tensor, Tensor]:
    """``cfg.mean`` and ``cfg.std`` as float32 [C,1,1] tensors on ``device``."""
    return tuple(torch.tensor(values, dtype=torch.float32, device=device).view(-1, 1, 1)
                 for values in (cfg.mean, cfg.std))


def batch_to_device(batch: dict, device: torch.device,
                    stats: tuple[Tensor, Tensor] | None = None) -> dict:
    """``batch`` with its tensors on ``device`` (copies that do not block the host when the
    loader pinned them); uint8 images (``data.normalize_on_device``) are scaled and normalised
    there with ``stats`` = (mean, std) from :func:`pixel_stats`."""
    moved = {key: value.to(device, non_blocking=True) if isinstance(value, Tensor) else value
             for key, value in batch.items()}
    if moved["image"].dtype == torch.uint8:
        if stats is None:
            raise ValueError("a batch of uint8 images needs the mean and std to normalise it")
        moved["image"] = normalize_images(moved["image"], *stats)
    return moved


@dataclass
class Run:
    """Everything a training run holds between epochs; built by :func:`setup` (or another
    stage's setup through :func:`assemble_run`)."""

    cfg: Config
    ctx: DistContext
    run_dir: Path
    model: nn.Module
    train_step: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loader: DataLoader
    sampler: DistributedSampler
    val_set: Dataset
    class_names: list[str] | None
    batch_size: int
    steps_per_epoch: int
    start_epoch: int
    step: int
    metadata: dict[str, str] = field(default_factory=dict)  # goes into every weights file
    stop: StopRequest = field(default_factory=StopRequest)  # set by :func:`train`
    skip_batches: int = 0  # batches of start_epoch done before a mid-epoch resume
    resumed_rng: dict | None = None  # restored once the resumed epoch's iterator exists
    last_saved: str = "none (no checkpoint was written)"
    ema: ModelEMA | None = None  # weight average (train.ema_decay), evaluated and saved
    # data.mean / data.std as [C,1,1] on the device, for uint8 batches (data.normalize_on_device)
    pixel_stats: tuple[Tensor, Tensor] | None = None
    objective: Objective | None = None  # told each epoch, when it has a ``set_epoch``
    # (model, epoch) -> None before each epoch's batches: remakes the self-training masks
    refresh_masks: Callable[[nn.Module, int], None] | None = None

    @property
    def scored_model(self) -> nn.Module:
        """The weights that are evaluated and saved: the average when there is one."""
        return self.model if self.ema is None else self.ema.module

    @property
    def log_path(self) -> Path:
        return self.run_dir / "log.jsonl"


def train(cfg: Config, resume: bool = False, on_epoch: EpochCallback | None = None,
          allow_changes: bool = False, *, setup_fn: SetupFn | None = None,
          end_fn: EndOfEpochFn | None = None) -> dict:
    """Train ``cfg`` into ``cfg.out_dir``; returns the last epoch's evaluation metrics.

    ``setup_fn`` / ``end_fn`` replace :func:`setup` / :func:`end_of_epoch` for another model
    and objective (the second stage, :mod:`attnmaps.segment.train`); :func:`train_one_epoch`
    serves both.

    ``on_epoch(epoch, metrics)`` runs after each epoch's checkpoint is written (on every
    process; the metrics are the same on all). Epochs before the last are scored without PAMR,
    CRF and test-time augmentation, which are slow and only change the masks. Under torchrun
    the process group is created from the environment and destroyed on return or on an
    exception; a process group that the caller already initialised is used and left open.

    Ctrl-C or SIGTERM stops at the next step boundary after saving a checkpoint there
    (:class:`~attnmaps.engine.interrupt.Interrupted`); under several processes the stop flag
    travels with the losses' read-back, so all ranks stop together at the next read-back (within
    ``train.log_every`` steps, or at a checkpoint step) after a signal reaches any of them.
    ``train.checkpoint_every`` steps also save inside an epoch, so ``resume`` repeats no step.
    ``resume`` refuses a config that differs from the run's stored one (see
    :func:`~attnmaps.engine.resume.check_resume_config`) unless ``allow_changes``.
    """
    ctx = init_distributed(resolve_device(cfg.train.device))
    try:
        with run_lock(cfg.out_dir) if ctx.is_main else nullcontext(), StopRequest() as stop:
            run = (setup_fn or setup)(cfg, ctx, resume, allow_changes)
            run.stop = stop
            metrics: dict = {}
            for epoch in range(run.start_epoch, run.cfg.train.epochs):
                images_per_second = train_one_epoch(run, epoch)
                metrics = (end_fn or end_of_epoch)(run, epoch, images_per_second)
                if on_epoch is not None:
                    on_epoch(epoch, metrics)
            return metrics
    finally:
        if ctx.owns_group:
            cleanup()


def setup(cfg: Config, ctx: DistContext, resume: bool, allow_changes: bool = False) -> Run:
    """Data, model (from ``model.init_from`` unless resuming), optimiser, schedule and the
    resumed state of a run; writes the resolved config on rank 0."""
    check_run_dir(cfg, resume, allow_changes)
    seed_everything(cfg.train.seed)
    train_set = build_dataset(cfg.data, cfg.data.train_split, train=True)
    val_set = build_dataset(cfg.data, cfg.data.val_split, train=False)
    check_masks(val_set, cfg.data.val_split)
    with_pseudo_masks = None
    if cfg.train.self_train_refresh_epochs:
        train_set = with_pseudo_masks = WithPseudoMasks(train_set)
    if cfg.train.mask_fraction > 0:
        # A seed apart from the epoch orders' (seed * 100003 + epoch), or the images with masks
        # would be exactly the first batches of epoch 0.
        train_set = MaskBudget(train_set, cfg.train.mask_fraction, seed=cfg.train.seed + 7_777_777)
        train_set.require_masks()
    model = create_model(cfg.model, train_set.num_classes,
                         init_from=None if resume else cfg.model.init_from)
    if cfg.model.gate_init is not None and not resume:
        set_gate_init(model, cfg.model.gate_init)
    if cfg.train.prior_bias and not resume:
        init_head_bias(model, label_frequencies(train_set))
    model = model.to(ctx.device)
    objective = WSSSObjective(cfg.train, model.resolve_attn_blocks(cfg.model.attn_blocks),
                              train_set.has_background, cfg.pseudo)
    optimizer = build_optimizer(model, cfg.train.lr, cfg.train.weight_decay, tuple(cfg.train.betas))
    if cfg.train.gate_lr_scale != 1.0 or cfg.train.gate_start_epoch > 0:
        scale_gate_lr(optimizer, cfg.train.gate_lr_scale)
    metadata = checkpoint_metadata(cfg.model, model.num_classes,
                                   getattr(val_set, "class_names", None))
    run = assemble_run(cfg, ctx, resume, model, objective, optimizer, train_set, val_set,
                       metadata, allow_changes)
    if cfg.train.gate_start_epoch > 0:
        delay_gates(run.scheduler, round(cfg.train.gate_start_epoch * run.steps_per_epoch))
    if with_pseudo_masks is not None:
        run.refresh_masks = PseudoMaskRefresh(cfg, with_pseudo_masks, run.run_dir, ctx.is_main,
                                              run.batch_size)
    return run


def assemble_run(cfg: Config, ctx: DistContext, resume: bool, model: nn.Module,
                 objective: Objective, optimizer: torch.optim.Optimizer, train_set: Dataset,
                 val_set: Dataset, metadata: dict[str, str], allow_changes: bool = False) -> Run:
    """The :class:`Run` of a model, objective (``objective(model, batch, device) -> {"loss":
    ..., other logged terms}``), optimiser and datasets: batch layout, warm-up + cosine
    schedule, resumed state, sampler and loader; ``metadata`` goes into every weights file.
    Writes the resolved config on rank 0."""
    run_dir = Path(cfg.out_dir)
    batch_size, steps_per_epoch = batch_layout(cfg.train.batch_size, len(train_set),
                                               ctx.world_size)
    total_steps = cfg.train.epochs * steps_per_epoch
    scheduler = warmup_cosine(optimizer, total_steps,
                              min(total_steps, round(cfg.train.warmup_epochs * steps_per_epoch)),
                              cfg.train.min_lr / cfg.train.lr)
    sampler = training_sampler(train_set, cfg.train.seed, ctx)
    loader = make_loader(train_set, batch_size, sampler, cfg.data, ctx.device)
    run = Run(cfg, ctx, run_dir, model, build_train_step(model, objective, cfg.train, ctx),
              optimizer, scheduler, loader, sampler, val_set,
              getattr(val_set, "class_names", None), batch_size, steps_per_epoch, 0, 0, metadata,
              pixel_stats=pixel_stats(cfg.data, ctx.device), objective=objective)
    if resume:
        restore_run(run, allow_changes)
    else:
        run.ema = build_ema(model, cfg.train.ema_decay)
        if ctx.rank:
            seed_everything(rank_seed(cfg.train.seed, ctx.rank))
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    return run


def check_run_dir(cfg: Config, resume: bool, allow_changes: bool = False) -> None:
    """Check that ``cfg.out_dir`` is a directory that holds a checkpoint exactly when resuming,
    and that a resumed run keeps its settings (see
    :func:`~attnmaps.engine.resume.check_resume_config`)."""
    run_dir = Path(cfg.out_dir)
    weights_path, _ = checkpoint_paths(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise FileExistsError(f"out_dir={str(run_dir)!r} is a file; set out_dir to a directory")
    if has_checkpoint(run_dir) and not resume:
        raise FileExistsError(
            f"{run_dir} already holds a checkpoint ({weights_path.name}); pass --resume to continue "
            "it or set out_dir to a new directory"
        )
    if resume and not has_checkpoint(run_dir):
        raise FileNotFoundError(f"--resume was given but {weights_path} does not exist")
    if resume:
        check_resume_config(run_dir, cfg, allow_changes)


def restore_run(run: Run, allow_changes: bool) -> None:
    """Load the run's checkpoint into ``run``: weights, optimiser, schedule (at the learning
    rates of ``run.cfg``, so a rate changed with ``allow_changes`` applies), step and position in
    the epoch; this rank's RNG now or, mid-epoch, once that epoch's iterator exists. Cuts the
    log back to the checkpoint's step."""
    ctx, seed = run.ctx, run.cfg.train.seed
    configured = list(run.scheduler.base_lrs)
    state = load_checkpoint(run.run_dir, run.model, map_location=ctx.device)
    load_optimizer_state(run.optimizer, state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    set_base_lrs(run.scheduler, configured)
    run.ema = build_ema(run.model, run.cfg.train.ema_decay, state)
    run.step = state["step"]
    done = state.get("batches_done", run.steps_per_epoch)
    if done >= run.steps_per_epoch:  # the saved epoch was complete
        run.start_epoch = state["epoch"] + 1
        restore_rank_rng(state, ctx, seed, run.start_epoch)
    else:
        run.start_epoch, run.skip_batches, run.resumed_rng = state["epoch"], done, state
    run.last_saved = checkpoint_label(run, state["epoch"], done)
    if ctx.is_main:
        truncate_log(run.log_path, run.step)
        if allow_changes:
            keep_previous_config(run.run_dir)


def train_one_epoch(run: Run, epoch: int) -> float:
    """The optimisation steps of ``epoch`` (after the batches a mid-epoch resume already did);
    returns the training throughput in images/s. Saves every ``train.checkpoint_every`` steps,
    and on a stop signal saves and raises :class:`~attnmaps.engine.interrupt.Interrupted`."""
    cfg = run.cfg
    run.train_step.train()
    run.sampler.set_epoch(epoch)
    set_objective_epoch = getattr(run.objective, "set_epoch", None)
    if set_objective_epoch is not None:
        set_objective_epoch(epoch)
    if (cfg.data.rotate_start_epoch or cfg.data.zoom_start_epoch
            or cfg.data.early_size_epochs):  # workers copy the dataset at iter()
        set_geometry_at_epoch(run.loader.dataset, cfg.data, epoch)
    if run.refresh_masks is not None:  # before the workers copy the dataset
        run.refresh_masks(run.scored_model, epoch)
    skip, run.skip_batches = run.skip_batches, 0
    loader = run.loader if not skip else make_loader(
        run.loader.dataset, run.batch_size, SkipSampler(run.sampler, skip * run.batch_size),
        cfg.data, run.ctx.device)
    batches = iter(loader)  # draws the loader's base seed from the global RNG
    if run.resumed_rng is not None:  # after that draw, as in the run that saved the state
        restore_rank_rng(run.resumed_rng, run.ctx, cfg.train.seed, epoch)
        run.resumed_rng = None
    bar = progress(batches, f"epoch {epoch + 1}/{cfg.train.epochs}", run.ctx.is_main,
                   total=run.steps_per_epoch - skip)
    pending: list[StepRecord] = []
    started = time.time()
    for done, batch in enumerate(bar, start=skip + 1):
        batch = batch_to_device(batch, run.ctx.device, run.pixel_stats)
        if cfg.train.mix != "none" and torch.rand(()).item() < cfg.train.mix_prob:
            batch = mix_batch(batch, cfg.train.mix, cfg.train.mix_alpha)
        parts = run.train_step(batch)
        run.optimizer.zero_grad(set_to_none=True)
        parts["loss"].backward()
        if cfg.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.train.grad_clip)
        run.optimizer.step()
        run.scheduler.step()
        if run.ema is not None:
            run.ema.update(run.model)
        run.step += 1
        pending.append(StepRecord(run.step, run.scheduler.get_last_lr()[0],
                                  {name: value.detach() for name, value in parts.items()}))
        every = cfg.train.checkpoint_every
        save_due = bool(every) and run.step % every == 0 and done < run.steps_per_epoch
        local_stop = run.ctx.world_size == 1 and run.stop.signal > 0
        if not (save_due or local_stop or done == run.steps_per_epoch
                or run.step % cfg.train.log_every == 0):
            continue
        stopping = read_back(run, epoch, pending, bar)
        pending = []
        if stopping or save_due:
            save_state(run, epoch, done)
        if stopping:
            raise Interrupted(run.stop.signal or signal.SIGTERM,
                              f"stopped at step {run.step} (epoch {epoch + 1}, batch {done}) "
                              f"after saving {run.last_saved}; continue with the same command "
                              "and --resume")
    return ((run.steps_per_epoch - skip) * run.batch_size * run.ctx.world_size
            / max(time.time() - started, 1e-9))


@dataclass
class StepRecord:
    """One step's loss terms, still on the device, and its learning rate."""

    step: int
    lr: float
    parts: dict[str, Tensor]


def read_back(run: Run, epoch: int, pending: list[StepRecord], bar: tqdm) -> bool:
    """Fetch the loss terms of the ``pending`` steps and every process's stop flag in one
    all-reduce and one copy to the host; log the steps that are multiples of
    ``train.log_every`` and show the last step's loss on the progress bar. Raises
    :class:`~attnmaps.errors.TrainingDiverged` naming the first step whose loss is not finite;
    returns whether any process was asked to stop."""
    names = list(pending[0].parts)
    stacked = torch.stack([torch.stack([record.parts[name] for name in names])
                           for record in pending])
    flag = stacked.new_tensor([float(run.stop.signal > 0)])
    reduced = all_reduce_mean(torch.cat([stacked.flatten(), flag])).tolist()
    rows = [dict(zip(names, reduced[i * len(names):(i + 1) * len(names)]))
            for i in range(len(pending))]
    for record, values in zip(pending, rows):
        if not math.isfinite(values["loss"]):
            raise TrainingDiverged(
                f"loss became {values['loss']} at step {record.step} (found when steps "
                f"{pending[0].step}-{pending[-1].step} were read back); the last good checkpoint "
                f"is kept ({run.last_saved}); lower train.lr or set train.grad_clip")
        if run.ctx.is_main and record.step % run.cfg.train.log_every == 0:
            append_log(run.log_path, {"epoch": epoch, "step": record.step, **values,
                                      "lr": record.lr})
    bar.set_postfix(loss=f"{rows[-1]['loss']:.4f}", lr=f"{pending[-1].lr:.2e}", refresh=False)
    return reduced[-1] > 0


def save_state(run: Run, epoch: int, batches_done: int) -> None:
    """Checkpoint the run after ``batches_done`` batches of ``epoch`` (rank 0 writes; every
    process takes part). Non-finite weights are never saved over the last good state."""
    weights = run.scored_model
    bad = [name for name, value in weights.state_dict().items()
           if value.is_floating_point() and not torch.isfinite(value).all()]
    if bad:
        raise TrainingDiverged(
            f"weights became NaN/inf by step {run.step} ({', '.join(bad[:3])}"
            f"{' ...' if len(bad) > 3 else ''}); not saved, the last good checkpoint is kept "
            f"({run.last_saved}); lower train.lr or set train.grad_clip")
    rng_by_rank = gather_objects(capture_rng_state())
    if run.ctx.is_main:
        extra = {"rng_by_rank": rng_by_rank} if run.ctx.world_size > 1 else {}
        save_checkpoint(run.run_dir, weights, {
            "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
            "rng": rng_by_rank[0], "epoch": epoch, "batches_done": batches_done,
            "step": run.step, "config": config_to_dict(run.cfg), **extra,
            **ema_state(run.ema, run.model),
        }, metadata=run.metadata)
    run.last_saved = checkpoint_label(run, epoch, batches_done)


def checkpoint_label(run: Run, epoch: int, batches_done: int) -> str:
    """How messages name the checkpoint taken after ``batches_done`` batches of ``epoch``."""
    where = "" if batches_done >= run.steps_per_epoch else f", batch {batches_done}"
    return f"epoch {epoch + 1}{where}, step {run.step}, in {run.run_dir}"


def ended_without_evaluation(run: Run, epoch: int, images_per_second: float) -> bool:
    """Ends ``epoch`` when ``train.eval_every`` does not score it (every N-th epoch and the last
    are scored): saves the checkpoint, logs the throughput, returns True. False otherwise."""
    cfg = run.cfg
    if (epoch + 1) % cfg.train.eval_every == 0 or epoch == cfg.train.epochs - 1:
        return False
    save_state(run, epoch, run.steps_per_epoch)
    if run.ctx.is_main:
        logger.info("epoch %d/%d: not evaluated (train.eval_every=%d)  (%.0f images/s)",
                    epoch + 1, cfg.train.epochs, cfg.train.eval_every, images_per_second)
    barrier()
    return True


def end_of_epoch(run: Run, epoch: int, images_per_second: float) -> dict:
    """Evaluate (without PAMR, CRF and TTA before the last epoch; only every
    ``train.eval_every`` epochs), log the metrics and save the checkpoint (rank 0); returns the
    metrics, equal on every process ({"images_per_second"} alone for an epoch not evaluated)."""
    cfg, ctx = run.cfg, run.ctx
    sync_buffers(run.model)
    if ended_without_evaluation(run, epoch, images_per_second):
        return {"images_per_second": images_per_second}
    last = epoch == cfg.train.epochs - 1
    settings = cfg.pseudo if last else replace(cfg.pseudo, refine_iterations=0, crf=False,
                                               tta_scales=[1.0], tta_flip=False)
    with torch.random.fork_rng(devices=[]):  # the training's random stream is the same
        metrics = evaluate(run.scored_model, run.val_set, settings,  # whatever eval_every is
                           **{**eval_options(cfg), "batch_size": run.batch_size})
    metrics["images_per_second"] = images_per_second
    save_state(run, epoch, run.steps_per_epoch)
    if ctx.is_main:
        summary = {key: value for key, value in metrics.items()
                   if key not in ("confusion", "true_labels")}
        append_log(run.log_path, {"epoch": epoch, "step": run.step, "eval": summary})
        logger.info("epoch %d/%d: mAP %.3f  pseudo-mask mIoU %.3f  heads closed %.0f%%  "
                    "(%.0f images/s)", epoch + 1, cfg.train.epochs, metrics["map"],
                    metrics["miou"], metrics["head_sparsity"], images_per_second)
    barrier()
    return metrics
