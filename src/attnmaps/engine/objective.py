"""The training objective: BCE on image labels + lambda * L0(gates) [+ CAMAL on masked images]."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from ..config import TrainConfig
from ..conventions import IGNORE_INDEX
from ..losses import CAMALLoss
from ..models.vit import ClassTokenViT
from ..process_group import get_world_size, in_process_group


class WSSSObjective:
    """Loss of one batch for :class:`ClassTokenViT`.

    ``loss = BCE(logits, labels) + gate_lambda * L0 + guide_weight * CAMAL`` where the CAMAL term
    (mixed supervision, ``train.mask_fraction > 0``) compares the class-token attention maps of
    the blocks ``attn_blocks`` (a spec such as ``"all"``, or indices) with the masks of the images
    whose ``has_mask`` is set, for the classes present in each image whose mask is not empty
    (labels can outlive a random crop); ignore pixels (255) count neither inside nor outside.
    It is the mean over all guided (image, class) maps of the global batch: under
    DistributedDataParallel each rank scales its sum by ``world_size / global count``, so that
    averaging the ranks' gradients gives that mean. Without masks in the batch it is exactly 0.
    """

    def __init__(self, cfg: TrainConfig, attn_blocks: str | Sequence[int], has_background: bool):
        self.gate_lambda = cfg.gate_lambda
        self.guide_weight = cfg.guide_weight
        self.guided = cfg.mask_fraction > 0
        self.attn_blocks = attn_blocks
        self.label_offset = 1 if has_background else 0
        self.guide = CAMALLoss(form=cfg.guide_form)

    def __call__(self, model: ClassTokenViT, batch: dict, device) -> dict[str, Tensor]:
        images, labels = batch["image"].to(device), batch["labels"].to(device)
        if self.guided:
            logits, maps = model.predict(images, self.attn_blocks, labels)
        else:
            logits = model(images, labels)
        bce = F.binary_cross_entropy_with_logits(logits.float(), labels)
        l0 = model.l0_penalty()
        parts = {"bce": bce, "l0": l0, "loss": bce + self.gate_lambda * l0}
        if self.guided:
            parts["guide"] = self.guide_loss(maps, batch, labels)
            parts["loss"] = parts["loss"] + self.guide_weight * parts["guide"]
        return parts

    def guide_loss(self, maps: Tensor, batch: dict, labels: Tensor) -> Tensor:
        """CAMAL over the guided (image, class) pairs only, [M, h, w] maps vs [M, H, W] masks."""
        label_masks = batch["mask"].to(maps.device)
        pairs = (batch["has_mask"].to(maps.device).view(-1, 1) & (labels > 0)).nonzero()
        image, cls = pairs.unbind(1)
        masks = label_masks[image] == (cls + self.label_offset).view(-1, 1, 1)
        keep = masks.flatten(1).any(1)
        image, cls, masks = image[keep], cls[keep], masks[keep]
        count = torch.tensor(float(len(image)), device=maps.device)
        world = get_world_size()
        if in_process_group():
            dist.all_reduce(count)
        if len(image) == 0:
            return maps.sum() * 0.0
        valid = label_masks[image] != IGNORE_INDEX
        every_map = torch.ones(len(image), dtype=torch.bool, device=maps.device)
        local_mean = self.guide(maps[image, cls], masks, every_map, valid)
        return local_mean * len(image) * world / count.clamp_min(1.0)
