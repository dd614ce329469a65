"""Self-training targets remade once every few epochs instead of every step.

With ``train.self_train_refresh_epochs`` = E > 0 the model that is evaluated and saved (the
weight average when there is one) makes the pseudo masks of every training image
(:func:`~attnmaps.engine.self_training.refined_masks`: its own maps of the true classes,
PAMR, binarised) at the start of epochs ``start, start + E, ...``; the masks travel with the
images through the augmentations (:class:`~attnmaps.data.pseudo_mask_dataset.WithPseudoMasks`)
and the self-training terms read their patch shares. One pass without gradient over the training
images every E epochs replaces a forward pass without gradient and a refinement in every step.
The masks are written atomically to the run directory, so a resumed run trains on the masks it
was trained on before the interruption.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from ..atomic import atomic_write
from ..config import Config
from ..data.base import ImageDataset
from ..data.pseudo_mask_dataset import WithPseudoMasks
from ..data.registry import build_dataset
from ..models.vit import ClassTokenViT
from ..process_group import is_distributed
from ..progress import logger, progress
from .acceleration import autocast
from .distributed import gather_objects, shard_indices
from .self_training import refined_masks

MASKS_FILE = "self_training_masks.npz"


def refresh_epoch(epoch: int, start: int, every: int) -> int | None:
    """The epoch whose masks ``epoch`` trains on: the last of ``start, start + every, ...`` not
    after ``epoch``; None before ``start``."""
    if epoch < start:
        return None
    return start + (epoch - start) // every * every


@torch.no_grad()
def training_set_masks(model: ClassTokenViT, dataset: ImageDataset, cfg: Config,
                       attn_blocks: str | Sequence[int], batch_size: int,
                       show_progress: bool = True) -> np.ndarray:
    """uint8 [N, h*cell, w*cell]: :func:`refined_masks` of every image of ``dataset`` (not
    augmented, in its order) with the true labels and the ``cfg.pseudo`` read-out. Under
    torch.distributed each process makes a share and all get the whole array."""
    device = next(model.parameters()).device
    indices = list(shard_indices(len(dataset)))
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False)
    made: list[np.ndarray] = []
    for batch in progress(loader, "self-training masks", show_progress):
        with autocast(cfg.train.precision, device):
            masks = refined_masks(model, batch["image"].to(device), batch["labels"].to(device),
                                  cfg.pseudo, cfg.train.self_train_refine_iterations,
                                  attn_blocks, dataset.has_background, cfg.train.self_train_cell)
        made.append(masks.cpu().numpy())
    local = np.concatenate(made) if made else np.zeros((0, 1, 1), np.uint8)
    if not is_distributed():
        return local
    shares = gather_objects((indices, local))
    size = next(share[1].shape[1:] for share in shares if len(share[1]))
    masks = np.empty((len(dataset), *size), np.uint8)
    for share_indices, share in shares:
        masks[share_indices] = share
    return masks


class PseudoMaskRefresh:
    """Keeps ``train_set``'s pseudo masks those of the epoch :func:`refresh_epoch` names:
    loaded from ``run_dir`` when they were made there before (a resumed run), else made by
    :func:`training_set_masks` over ``source`` (the same split without augmentation) and
    written there by the main process."""

    def __init__(self, cfg: Config, train_set: WithPseudoMasks, run_dir: Path, is_main: bool,
                 batch_size: int):
        self.cfg = cfg
        self.train_set = train_set
        self.source = build_dataset(cfg.data, cfg.data.train_split, train=False)
        if list(self.source.ids) != list(train_set.ids):
            raise ValueError(f"split {cfg.data.train_split!r} lists its images in another order "
                             "without augmentation; self-training masks need one order")
        self.path = Path(run_dir) / MASKS_FILE
        self.is_main = is_main
        self.batch_size = batch_size
        self.made_at: int | None = None

    def __call__(self, model: ClassTokenViT, epoch: int) -> None:
        """Make (or load) the masks ``epoch`` trains on, if they are not the current ones."""
        train = self.cfg.train
        due = refresh_epoch(epoch, train.self_train_start_epoch, train.self_train_refresh_epochs)
        if due is None or due == self.made_at:
            return
        masks = self.stored(due)
        if masks is None:
            started = time.time()
            with torch.random.fork_rng(devices=[]):  # the training's random stream is the same
                masks = training_set_masks(model, self.source, self.cfg,
                                           model.resolve_attn_blocks(self.cfg.model.attn_blocks),
                                           self.batch_size, self.is_main)
            if self.is_main:
                atomic_write({self.path: lambda tmp: _save(tmp, due, masks)})
                logger.info("epoch %d: self-training masks of %d images made in %.0f s",
                            due + 1, len(masks), time.time() - started)
        self.train_set.set_masks(masks)
        self.made_at = due

    def stored(self, epoch: int) -> np.ndarray | None:
        """The masks written for ``epoch``, if the run directory holds them."""
        if not self.path.is_file():
            return None
        with np.load(self.path) as stored:
            if int(stored["epoch"]) != epoch:
                return None
            masks = stored["masks"]
        if len(masks) != len(self.train_set):
            raise ValueError(f"{self.path} holds {len(masks)} masks for "
                             f"{len(self.train_set)} training images; delete it to remake them")
        return masks


def _save(path: Path, epoch: int, masks: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.savez_compressed(f, epoch=np.int64(epoch), masks=masks)
