"""The training objective: BCE on image labels + lambda * L0(gates) [+ BCE of the auxiliary patch
head] [+ CAMAL on masked images]."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from ..config import PseudoMaskConfig, TrainConfig
from ..conventions import IGNORE_INDEX, min_max_normalize
from ..losses import CAMALLoss
from ..models.vit import ClassTokenViT
from ..process_group import get_world_size, in_process_group
from .self_training import (
    absent_attention_loss,
    attention_target_loss,
    dense_patch_bce,
    patch_shares,
    refined_patch_targets,
)


def map_similarity(maps: Tensor, labels: Tensor, pairs: str = "all") -> Tensor:
    """Mean cosine similarity between the attention map [N] of each present class (``labels``
    [B,K] > 0) and the map of every other class (``pairs="all"``) or of every other *present*
    class of the same image (``pairs="present"``), over ``maps`` [B,K,N]; 0 without such a
    pair. Low when each class token looks at its own region."""
    if pairs not in ("all", "present"):
        raise ValueError(f"pairs={pairs!r}; expected 'all' or 'present'")
    unit = F.normalize(maps.float(), dim=-1)
    cosine = unit @ unit.transpose(1, 2)
    present = labels > 0
    partners = present.unsqueeze(1) if pairs == "present" else torch.ones_like(present)[:, None]
    chosen = (present.unsqueeze(2) & partners
              & ~torch.eye(maps.shape[1], dtype=torch.bool, device=maps.device))
    return (cosine * chosen).sum() / chosen.sum().clamp_min(1)


class WSSSObjective:
    """Loss of one batch for :class:`ClassTokenViT`.

    ``loss = BCE(logits, labels) + gate_lambda * L0 [+ patch_loss_weight * BCE(patch_logits,
    labels)] [+ guide_weight * CAMAL]``. The patch term is there when the model has a patch head
    (``model.patch_head``): the same BCE on the max-pooled logits of a classifier over the final
    patch tokens (:meth:`ClassTokenViT.patch_logits`). With ``attention_pool_weight > 0`` a
    further BCE reads the same patch scores pooled by each class token's own attention map
    (:meth:`ClassTokenViT.attention_pooled_logits`), which rewards a class token for attending
    to the patches that show its class. With ``self_guide_weight > 0`` the class-token maps of
    the present classes are pulled by CAMAL towards the patch head's own class regions
    (:meth:`self_guide_loss`; labels only, no pixel labels). With ``patch_dropout > 0`` each
    step sees a random share of each image's patch tokens only (PatchDropout; not with the map
    terms, which need every patch). With ``map_decorrelation_weight > 0`` the mean cosine
    similarity of each present class's map with the other classes' maps (or, with
    ``map_decorrelation_pairs="present"``, with the other present classes' maps) is added
    (:func:`map_similarity`; works with patch dropout). The CAMAL term
    (mixed supervision, ``train.mask_fraction > 0``) compares the class-token attention maps of
    the blocks ``attn_blocks`` (a spec such as ``"all"``, or indices) with the masks of the images
    whose ``has_mask`` is set, for the classes present in each image whose mask is not empty
    (labels can outlive a random crop); ignore pixels (255) count neither inside nor outside.
    It is the mean over all guided (image, class) maps of the global batch: under
    DistributedDataParallel each rank scales its sum by ``world_size / global count``, so that
    averaging the ranks' gradients gives that mean. Without masks in the batch it is exactly 0.
    With ``self_train_weight`` or ``self_train_attention_weight`` > 0, from epoch
    ``self_train_start_epoch`` on (:meth:`set_epoch`), the patch head's per-patch scores and the
    class tokens' attention are trained towards the model's own refined pseudo masks, read out
    with the ``pseudo`` settings (:mod:`~attnmaps.engine.self_training`; works with patch
    dropout), made from each batch or, with ``self_train_refresh_epochs``, read from the
    batch's ``pseudo_mask`` (:mod:`~attnmaps.engine.self_training_refresh`).
    """

    def __init__(self, cfg: TrainConfig, attn_blocks: str | Sequence[int], has_background: bool,
                 pseudo: PseudoMaskConfig | None = None):
        self.gate_lambda = cfg.gate_lambda
        self.patch_loss_weight = cfg.patch_loss_weight
        self.attention_pool_weight = cfg.attention_pool_weight
        self.self_guide_weight = cfg.self_guide_weight
        self.guide_weight = cfg.guide_weight
        self.guided = cfg.mask_fraction > 0
        self.patch_dropout = cfg.patch_dropout
        self.decorrelation_weight = cfg.map_decorrelation_weight
        self.decorrelation_pairs = cfg.map_decorrelation_pairs
        self.attn_blocks = attn_blocks
        self.label_offset = 1 if has_background else 0
        self.guide = CAMALLoss(form=cfg.guide_form)
        self.self_train_weight = cfg.self_train_weight
        self.self_train_attention_weight = cfg.self_train_attention_weight
        self.self_train_absent_weight = cfg.self_train_absent_weight
        self.self_train_start_epoch = cfg.self_train_start_epoch
        self.self_train_refine_iterations = cfg.self_train_refine_iterations
        self.self_train_cell = cfg.self_train_cell
        self.self_train_refresh_epochs = cfg.self_train_refresh_epochs
        self.pseudo = pseudo or PseudoMaskConfig()
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Tell the objective which epoch the next steps belong to (self-training's start)."""
        self.epoch = epoch

    @property
    def self_training(self) -> bool:
        """Whether the self-training terms are on for the current epoch."""
        weights = (self.self_train_weight + self.self_train_attention_weight
                   + self.self_train_absent_weight)
        return weights > 0 and self.epoch >= self.self_train_start_epoch

    def __call__(self, model: ClassTokenViT, batch: dict, device) -> dict[str, Tensor]:
        images, labels = batch["image"].to(device), batch["labels"].to(device)
        has_patch_head = model.patch_head is not None
        pooled = has_patch_head and self.attention_pool_weight > 0
        self_guided = has_patch_head and self.self_guide_weight > 0
        decorrelated = self.decorrelation_weight > 0
        self_trained = self.self_training
        attention_trained = self_trained and (self.self_train_attention_weight > 0
                                              or self.self_train_absent_weight > 0)
        needs_maps = self.guided or pooled or self_guided or decorrelated or attention_trained
        blocks = model.resolve_attn_blocks(self.attn_blocks) if needs_maps else []
        out = model.forward_features(images, labels, attn_blocks=blocks,
                                     patch_outputs=has_patch_head,
                                     patch_dropout=self.patch_dropout)
        bce = F.binary_cross_entropy_with_logits(model.forward_head(out["cls"]).float(), labels)
        l0 = model.l0_penalty()
        parts = {"bce": bce, "l0": l0, "loss": bce + self.gate_lambda * l0}
        flat = model.class_patch_attention(out["attn"], blocks) if blocks else None
        full = flat is not None and "kept" not in out  # maps over the whole patch grid
        maps = flat.reshape(-1, model.num_classes, *out["grid"]) if full else None
        if has_patch_head:
            patch_logits = model.patch_logits(out["patch"]).float()
            parts["patch_bce"] = F.binary_cross_entropy_with_logits(patch_logits, labels)
            parts["loss"] = parts["loss"] + self.patch_loss_weight * parts["patch_bce"]
        if pooled:
            pooled_logits = model.attention_pooled_logits(out["patch"], maps).float()
            parts["pool_bce"] = F.binary_cross_entropy_with_logits(pooled_logits, labels)
            parts["loss"] = parts["loss"] + self.attention_pool_weight * parts["pool_bce"]
        if self_guided:
            parts["self_guide"] = self.self_guide_loss(model, out["patch"], maps, labels)
            parts["loss"] = parts["loss"] + self.self_guide_weight * parts["self_guide"]
        if decorrelated:
            parts["decorrelation"] = map_similarity(flat, labels, self.decorrelation_pairs)
            parts["loss"] = parts["loss"] + self.decorrelation_weight * parts["decorrelation"]
        if self.guided:
            parts["guide"] = self.guide_loss(maps, batch, labels)
            parts["loss"] = parts["loss"] + self.guide_weight * parts["guide"]
        if self_trained:
            terms = self.self_training_losses(model, batch, images, labels, out, flat)
            weights = {"self_train": self.self_train_weight,
                       "self_train_attention": self.self_train_attention_weight,
                       "self_train_absent": self.self_train_absent_weight}
            parts.update(terms)
            parts["loss"] = parts["loss"] + sum(weights[name] * term
                                                for name, term in terms.items())
        return parts

    def self_training_losses(self, model: ClassTokenViT, batch: dict, images: Tensor,
                             labels: Tensor, out: dict,
                             flat: Tensor | None) -> dict[str, Tensor]:
        """The self-training terms with a weight (:mod:`~attnmaps.engine.self_training`) on the
        patches the forward ``out`` kept; ``flat`` [B,K,M] is its class-to-patch attention."""
        terms = {}
        if self.self_train_absent_weight > 0:
            # label 0 only: a class CutMix pasted in keeps a share below 1 but is there
            terms["self_train_absent"] = absent_attention_loss(flat, labels == 0)
        if not (self.self_train_weight > 0 or self.self_train_attention_weight > 0):
            return terms
        targets = self.self_training_targets(model, batch, images, labels, out)
        if self.self_train_weight > 0:
            terms["self_train"] = dense_patch_bce(model.patch_head_scores(out["patch"]), targets)
        if self.self_train_attention_weight > 0:
            terms["self_train_attention"] = attention_target_loss(flat, targets, labels > 0.5)
        return terms

    def self_training_targets(self, model: ClassTokenViT, batch: dict, images: Tensor,
                              labels: Tensor, out: dict) -> Tensor:
        """Targets [B,K,M] at the kept patches of ``out``: the shares of the batch's stored
        ``pseudo_mask`` with ``self_train_refresh_epochs``, else made from the batch now."""
        if self.self_train_refresh_epochs:
            if "pseudo_mask" not in batch:
                raise RuntimeError("train.self_train_refresh_epochs is set but the batch has no "
                                   "'pseudo_mask': the training set must be WithPseudoMasks "
                                   "with its masks made (engine/self_training_refresh.py)")
            targets = patch_shares(batch["pseudo_mask"].to(images.device), model.num_classes,
                                   self.label_offset == 1, tuple(out["grid"]))
        else:
            targets = refined_patch_targets(model, images, labels, self.pseudo,
                                            self.self_train_refine_iterations, self.attn_blocks,
                                            self.label_offset == 1, self.self_train_cell)
        if "kept" in out:
            kept = out["kept"].unsqueeze(1).expand(-1, targets.shape[1], -1)
            targets = targets.gather(2, kept)
        return targets

    def self_guide_loss(self, model: ClassTokenViT, patch: Tensor, maps: Tensor,
                        labels: Tensor) -> Tensor:
        """CAMAL between each present class's token map and the region where the patch head's
        own (detached) class score is at least half-way between its minimum and maximum."""
        scores = model.patch_head_scores(patch).detach().float().transpose(1, 2)
        cam = min_max_normalize(scores.reshape(*maps.shape))
        return self.guide(maps, (cam >= 0.5).float(), labels > 0)

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
