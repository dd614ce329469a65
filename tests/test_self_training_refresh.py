"""Self-training masks remade every few epochs (``train.self_train_refresh_epochs``): the refresh
schedule, masks that travel with the augmented images, the pass over the training set against
per-batch read-outs, the objective reading stored masks, resuming on the stored masks, config."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from attnmaps.config import ConfigError, PseudoMaskConfig, TrainConfig, load_config
from attnmaps.data.mixing import mix_batch
from attnmaps.data.pseudo_mask_dataset import WithPseudoMasks
from attnmaps.data.registry import build_dataset
from attnmaps.data.synthetic import write_synthetic_voc
from attnmaps.engine import self_training_refresh
from attnmaps.engine.objective import WSSSObjective
from attnmaps.engine.self_training import attention_target_loss, patch_shares, refined_masks
from attnmaps.engine.self_training_refresh import (
    MASKS_FILE,
    PseudoMaskRefresh,
    refresh_epoch,
    training_set_masks,
)
from attnmaps.models.vit import ClassTokenViT

SETTINGS = PseudoMaskConfig(threshold=0.4, merge="weighted", maps="fused")


def tiny_config(tmp_path, *overrides: str):
    root = tmp_path / "data"
    if not root.exists():
        write_synthetic_voc(root, num_train=16, num_val=4, size=(32, 32), seed=2)
    return load_config(None, ["model.img_size=32,32", "model.patch_size=8", "model.embed_dim=16",
                              "model.depth=1", "model.num_heads=2", "model.patch_head=true",
                              "train.batch_size=8", "train.log_every=1",
                              "train.self_train_attention_weight=1",
                              f"data.root={root}", f"out_dir={tmp_path / 'run'}", *overrides])


def test_refresh_epoch_is_the_last_refresh_not_after_the_epoch() -> None:
    assert [refresh_epoch(e, 3, 4) for e in range(12)] == [None] * 3 + [3] * 4 + [7] * 4 + [11]
    assert [refresh_epoch(e, 0, 1) for e in range(3)] == [0, 1, 2]


def test_pseudo_masks_travel_with_the_augmented_images(tmp_path) -> None:
    cfg = tiny_config(tmp_path, "data.rotate=30", "data.zoom=0.7,1.3", "data.crop_scale=0.5,1",
                      "data.hflip=true")
    train_set = WithPseudoMasks(build_dataset(cfg.data, "train", train=True))
    assert "pseudo_mask" not in train_set[0]
    stored = np.stack([train_set.load_target(i, (32, 32))[0] for i in range(len(train_set))])
    train_set.set_masks(stored)  # the label masks themselves: both must come out the same
    torch.manual_seed(0)
    for i in range(len(train_set)):
        item = train_set[i]
        assert torch.equal(item["pseudo_mask"], item["mask"])
    moved = sum(not np.array_equal(train_set[i]["mask"].numpy(), stored[i]) for i in range(16))
    assert moved >= 12  # the augmentations did move the masks
    train_set.set_masks(stored[:, ::2, ::2].copy())  # half size: resized to the image first
    torch.manual_seed(1)
    item = train_set[3]
    torch.manual_seed(1)
    _, expected = train_set.augment(train_set.checked_image(3), stored[3][::2, ::2].repeat(
        2, 0).repeat(2, 1))
    assert torch.equal(item["pseudo_mask"], torch.from_numpy(expected.astype(np.int64)))
    with pytest.raises(ValueError, match=r"uint8 \[16, h, w\].*int64 \[16, 32, 32\]"):
        train_set.set_masks(stored.astype(np.int64))
    with pytest.raises(ValueError, match=r"got uint8 \[15, 32, 32\]"):
        train_set.set_masks(stored[:15])


def test_cutmix_pastes_the_pseudo_masks_with_the_images() -> None:
    torch.manual_seed(3)
    batch = {"image": torch.rand(4, 3, 8, 8), "labels": torch.eye(4)[:, :3],
             "mask": torch.randint(0, 4, (4, 8, 8)), "pseudo_mask": torch.randint(0, 4, (4, 8, 8))}
    torch.manual_seed(5)
    mixed = mix_batch(batch, "cutmix")
    pasted = (mixed["image"] != batch["image"]).any(1)
    assert pasted.any()
    torch.manual_seed(5)
    perm_source = mix_batch({**batch, "pseudo_mask": batch["mask"]}, "cutmix")["pseudo_mask"]
    torch.testing.assert_close(perm_source, mixed["mask"])
    assert torch.equal(mixed["pseudo_mask"][~pasted], batch["pseudo_mask"][~pasted])


def test_training_set_masks_are_the_read_out_of_each_image(tmp_path) -> None:
    cfg = tiny_config(tmp_path, "pseudo.maps=fused", "pseudo.threshold=0.4",
                      "train.self_train_refine_iterations=3", "train.self_train_cell=2")
    torch.manual_seed(0)
    model = ClassTokenViT(4, img_size=(32, 32), patch_size=8, embed_dim=16, depth=1, num_heads=2,
                          head="per_token", gates=False, mask_rate=0.0, patch_head=True)
    source = build_dataset(cfg.data, "train", train=False)
    masks = training_set_masks(model, source, cfg, [0], batch_size=5, show_progress=False)
    assert masks.dtype == np.uint8 and masks.shape == (16, 8, 8)
    for i in (0, 7, 15):
        item = source[i]
        one = refined_masks(model, item["image"][None], item["labels"][None], cfg.pseudo, 3, [0],
                            True, 2)
        assert np.array_equal(masks[i], one[0].numpy())


def test_objective_reads_the_stored_masks_and_refuses_a_batch_without() -> None:
    torch.manual_seed(0)
    model = ClassTokenViT(3, img_size=(16, 16), patch_size=4, embed_dim=16, depth=2, num_heads=2,
                          head="per_token", gates=False, mask_rate=0.0, patch_head=True,
                          class_blocks=1).train()
    images = torch.randn(2, 3, 16, 16)
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    pseudo = torch.randint(0, 4, (2, 16, 16))
    cfg = TrainConfig(gate_lambda=0.0, self_train_attention_weight=1.0,
                      self_train_refresh_epochs=2)
    objective = WSSSObjective(cfg, [1], True, SETTINGS)
    parts = objective(model, {"image": images, "labels": labels, "pseudo_mask": pseudo}, "cpu")
    out = model.forward_features(images, attn_blocks=[1])
    expected = attention_target_loss(model.class_patch_attention(out["attn"], [1]),
                                     patch_shares(pseudo, 3, True, (4, 4)), labels > 0)
    torch.testing.assert_close(parts["self_train_attention"], expected)
    with pytest.raises(RuntimeError, match="no 'pseudo_mask'"):
        objective(model, {"image": images, "labels": labels}, "cpu")


def test_training_remakes_the_masks_on_schedule_and_a_resume_reads_them(tmp_path,
                                                                        monkeypatch) -> None:
    from attnmaps.engine.train import train

    made: list[tuple[int, int]] = []
    original = self_training_refresh.training_set_masks

    def recording(model, dataset, cfg, attn_blocks, batch_size, *args):
        made.append((len(dataset), batch_size))
        return original(model, dataset, cfg, attn_blocks, batch_size, *args)

    monkeypatch.setattr(self_training_refresh, "training_set_masks", recording)
    cfg = tiny_config(tmp_path, "train.epochs=4", "train.self_train_start_epoch=1",
                      "train.self_train_refresh_epochs=2", "train.ema_decay=0.9",
                      "train.patch_dropout=0.5")
    train(cfg)
    assert made == [(16, 8), (16, 8)]  # epochs 1 and 3, in batches of the training's size
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    steps = [record for record in records if "bce" in record]
    assert [("self_train_attention" in record) for record in steps] == [False] * 2 + [True] * 6
    with np.load(tmp_path / "run" / MASKS_FILE) as stored:
        assert int(stored["epoch"]) == 3 and stored["masks"].shape == (16, 16, 16)
        masks = stored["masks"]

    train_set = WithPseudoMasks(build_dataset(cfg.data, "train", train=True))
    refresh = PseudoMaskRefresh(cfg, train_set, tmp_path / "run", True, 8)
    refresh(None, 3)  # epoch 3's masks are stored: read back, not remade (no model needed)
    assert len(made) == 2 and np.array_equal(train_set.masks, masks)
    refresh(None, 4)  # still epoch 3's
    assert len(made) == 2


def test_config_refuses_refresh_with_mixup_or_persistent_workers() -> None:
    with pytest.raises(ConfigError, match="Mixup"):
        load_config(None, ["train.self_train_refresh_epochs=2", "train.mix=mixup"])
    with pytest.raises(ConfigError, match="persistent_workers=false"):
        load_config(None, ["train.self_train_refresh_epochs=2", "data.num_workers=1",
                           "data.persistent_workers=true"])
    load_config(None, ["train.self_train_refresh_epochs=2", "train.mix=cutmix"])
