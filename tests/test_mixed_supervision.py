"""Mixed supervision: mask subsets, the guided objective, and training with a mask fraction."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from attnmaps.config import TrainConfig, load_config
from attnmaps.data.mask_budget import MaskBudget, masked_subset
from attnmaps.data.synthetic import write_synthetic_voc
from attnmaps.engine.objective import WSSSObjective
from attnmaps.engine.train import train
from attnmaps.losses import max_normalize
from attnmaps.models.vit import ClassTokenViT


def test_masked_subset_size_determinism_and_nesting() -> None:
    small, large = masked_subset(200, 0.05, seed=4), masked_subset(200, 0.25, seed=4)
    assert int(small.sum()) == 10 and int(large.sum()) == 50
    assert torch.equal(small, masked_subset(200, 0.05, seed=4))
    assert not (small & ~large).any()
    assert not masked_subset(200, 0.05, seed=5).equal(small)
    assert int(masked_subset(7, 0.0, 0).sum()) == 0 and bool(masked_subset(7, 1.0, 0).all())
    with pytest.raises(ValueError, match="1.5"):
        masked_subset(7, 1.5, 0)


class Items(torch.utils.data.Dataset):
    has_background = True
    num_classes = 2

    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int) -> dict:
        return {"image": torch.full((3, 4, 4), float(i)), "labels": torch.tensor([1.0, 0.0]),
                "mask": torch.ones(4, 4, dtype=torch.long), "has_mask": True, "id": str(i)}


def test_mask_budget_hides_masks_outside_the_subset() -> None:
    budget = MaskBudget(Items(), 0.3, seed=1)
    items = [budget[i] for i in range(len(budget))]
    kept = [item["has_mask"] for item in items]
    assert sum(kept) == 3 == budget.num_masked and budget.num_classes == 2
    for item, keep in zip(items, kept):
        assert bool((item["mask"] == 1).all()) is keep
        assert bool((item["mask"] == 255).all()) is (not keep)
        assert item["image"][0, 0, 0] == float(item["id"])


def small_model() -> ClassTokenViT:
    torch.manual_seed(0)
    return ClassTokenViT(num_classes=3, img_size=(16, 16), patch_size=4, embed_dim=16, depth=2,
                         num_heads=2, head="per_token", mask_rate=0.0).eval()


def batch_with_masks(has_mask: list[bool]) -> dict:
    torch.manual_seed(1)
    mask = torch.zeros(2, 16, 16, dtype=torch.long)
    mask[0, :8, :8] = 1
    mask[1, 8:, 4:12] = 3
    return {"image": torch.randn(2, 3, 16, 16), "labels": torch.tensor([[1.0, 0, 0], [0, 0, 1.0]]),
            "mask": mask, "has_mask": torch.tensor(has_mask)}


def test_objective_without_masks_is_bce_plus_l0() -> None:
    model, batch = small_model(), batch_with_masks([True, True])
    parts = WSSSObjective(TrainConfig(gate_lambda=0.5), [1], has_background=True)(
        model, batch, "cpu")
    logits = model(batch["image"])
    expected = F.binary_cross_entropy_with_logits(logits, batch["labels"])
    assert "guide" not in parts
    torch.testing.assert_close(parts["loss"], expected + 0.5 * model.l0_penalty())


def test_objective_adds_camal_on_present_classes_of_masked_images() -> None:
    model, batch = small_model(), batch_with_masks([True, False])
    cfg = TrainConfig(gate_lambda=0.0, mask_fraction=0.5, guide_weight=2.0)
    parts = WSSSObjective(cfg, [0, 1], has_background=True)(model, batch, "cpu")
    _, maps = model.predict(batch["image"], [0, 1])
    # Only image 0 has a mask and only class 0 is present there: its mask is the top-left block.
    full = F.interpolate(maps[:1, :1], size=(16, 16), mode="bilinear", align_corners=False)
    a = max_normalize(full)[0, 0]
    inside = torch.zeros(16, 16, dtype=torch.bool)
    inside[:8, :8] = True
    expected = (1 - a[inside]).mean() + a[~inside].mean()
    torch.testing.assert_close(parts["guide"], expected)
    bce = F.binary_cross_entropy_with_logits(model(batch["image"]), batch["labels"])
    torch.testing.assert_close(parts["loss"], bce + 2.0 * expected)
    parts["loss"].backward()
    assert model.cls_token.grad is not None and model.cls_token.grad.abs().sum() > 0


def test_objective_is_zero_when_no_image_in_the_batch_has_a_mask() -> None:
    model, batch = small_model(), batch_with_masks([False, False])
    parts = WSSSObjective(TrainConfig(mask_fraction=0.1), [1], True)(model, batch, "cpu")
    assert parts["guide"].item() == 0.0


def test_training_with_a_mask_fraction_logs_the_guide_loss(tmp_path: Path) -> None:
    root = write_synthetic_voc(tmp_path / "data", num_train=16, num_val=4, size=(32, 32), seed=2)
    cfg = load_config(None, [
        "model.img_size=32,32", "model.patch_size=8", "model.embed_dim=16", "model.depth=2",
        "model.num_heads=2", "train.batch_size=8", "train.epochs=1", "train.log_every=1",
        "train.mask_fraction=0.5", f"data.root={root}", f"out_dir={tmp_path / 'run'}"])
    train(cfg)
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    guides = [r["guide"] for r in records if "guide" in r]
    assert len(guides) == 2 and all(g > 0 for g in guides)


def test_present_classes_without_mask_pixels_and_ignore_pixels_are_left_out() -> None:
    model, batch = small_model(), batch_with_masks([True, True])
    batch["labels"] = torch.tensor([[1.0, 1.0, 0], [0, 0, 1.0]])  # class 1 absent from mask 0
    batch["mask"][1, 8:, :4] = 255  # ignore band next to image 1's object
    cfg = TrainConfig(gate_lambda=0.0, mask_fraction=0.5)
    parts = WSSSObjective(cfg, [0, 1], has_background=True)(model, batch, "cpu")
    _, maps = model.predict(batch["image"], [0, 1])
    full = max_normalize(F.interpolate(maps, size=(16, 16), mode="bilinear", align_corners=False))
    expected = []
    for image, cls in ((0, 0), (1, 2)):
        a, mask = full[image, cls], batch["mask"][image]
        inside, outside = mask == cls + 1, (mask != cls + 1) & (mask != 255)
        expected.append((1 - a[inside]).mean() + a[outside].mean())
    torch.testing.assert_close(parts["guide"], torch.stack(expected).mean())


def test_guide_is_scaled_so_that_ddp_averaging_gives_the_global_mean(monkeypatch) -> None:
    from attnmaps.engine import objective

    model, batch = small_model(), batch_with_masks([True, False])
    cfg = TrainConfig(gate_lambda=0.0, mask_fraction=0.5)
    single = WSSSObjective(cfg, [1], True)(model, batch, "cpu")["guide"]
    # Two ranks: this one holds the only guided map, the other none (global count stays 1).
    monkeypatch.setattr(objective.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(objective.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(objective.dist, "all_reduce", lambda tensor: None)
    scaled = WSSSObjective(cfg, [1], True)(model, batch, "cpu")["guide"]
    torch.testing.assert_close(scaled, 2 * single)  # DDP halves it when averaging two ranks


def test_a_mask_fraction_on_a_split_without_masks_is_an_error() -> None:
    class NoMasks(Items):
        def __getitem__(self, i: int) -> dict:
            return {**super().__getitem__(i), "has_mask": False}

    MaskBudget(Items(), 0.5).require_masks()
    with pytest.raises(ValueError, match="train.mask_fraction"):
        MaskBudget(NoMasks(), 0.5).require_masks()
