"""The training objective: BCE on image labels + lambda * L0(gates) [+ CAMAL on masked images]."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor

from ..config import TrainConfig
from ..losses import CAMALLoss, class_masks
from ..models.vit import ClassTokenViT


class WSSSObjective:
    """Loss of one batch for :class:`ClassTokenViT`.

    ``loss = BCE(logits, labels) + gate_lambda * L0 + guide_weight * CAMAL`` where the CAMAL term
    (mixed supervision, ``train.mask_fraction > 0``) compares the class-token attention maps of
    the blocks ``attn_blocks`` (a spec such as ``"all"``, or indices) with the masks of the images
    whose ``has_mask`` is set, for the classes present in each image only. Without masks in the
    batch it is exactly 0.
    """

    def __init__(self, cfg: TrainConfig, attn_blocks: str | Sequence[int], has_background: bool):
        self.gate_lambda = cfg.gate_lambda
        self.guide_weight = cfg.guide_weight
        self.guided = cfg.mask_fraction > 0
        self.attn_blocks = attn_blocks
        self.has_background = has_background
        self.guide = CAMALLoss(form=cfg.guide_form)

    def __call__(self, model: ClassTokenViT, batch: dict, device) -> dict[str, Tensor]:
        images, labels = batch["image"].to(device), batch["labels"].to(device)
        blocks = model.resolve_attn_blocks(self.attn_blocks) if self.guided else ()
        out = model.forward_features(images, labels, attn_blocks=blocks)
        logits = model.forward_head(out["cls"])
        bce = F.binary_cross_entropy_with_logits(logits.float(), labels)
        l0 = model.l0_penalty()
        parts = {"bce": bce, "l0": l0, "loss": bce + self.gate_lambda * l0}
        if self.guided:
            maps = model.class_maps(out["attn"], blocks, out["grid"])
            masks = class_masks(batch["mask"].to(device), model.num_classes, self.has_background)
            guided = batch["has_mask"].to(device).view(-1, 1) & (labels > 0)
            parts["guide"] = self.guide(maps, masks, guided)
            parts["loss"] = parts["loss"] + self.guide_weight * parts["guide"]
        return parts
