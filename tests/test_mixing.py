"""CutMix / Mixup for multi-label batches: mixed labels, pasted boxes, masks."""

from __future__ import annotations

import pytest
import torch

from attnmaps.data.mixing import cutmix_box, mix_batch


def _batch() -> dict:
    images = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 3, 8, 8).clone()
    labels = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]])
    masks = torch.arange(4).view(4, 1, 1).expand(4, 8, 8).clone()
    return {"image": images, "labels": labels, "mask": masks,
            "has_mask": torch.ones(4, dtype=torch.bool)}


def test_cutmix_pastes_a_box_and_weights_labels_by_area() -> None:
    torch.manual_seed(3)
    batch = _batch()
    out = mix_batch(batch, "cutmix", alpha=1.0)
    for i in range(4):
        source = out["image"][i, 0]
        own = source == i
        kept = own.float().mean().item()
        if kept < 1.0:  # the partner is the one other value present
            other = int(source[~own][0].item())
            expected = kept * batch["labels"][i] + (1 - kept) * batch["labels"][other]
            assert torch.allclose(out["labels"][i], expected)
            assert torch.equal(out["mask"][i], source.long())  # mask box == image box
        # the mixed labels of image i sum to kept * |y_i| + (1 - kept) * |y_partner|
        assert 0 < out["labels"][i].sum() <= 2 + 1e-6
    assert torch.equal(batch["image"], _batch()["image"])  # input untouched


def test_mixup_blends_images_and_labels_with_one_weight() -> None:
    batch = _batch()
    torch.manual_seed(0)
    out = mix_batch(batch, "mixup", alpha=0.4)
    torch.manual_seed(0)  # replay the draws: lam ~ Beta(0.4, 0.4), then the partner permutation
    lam = torch.distributions.Beta(torch.tensor(0.4), torch.tensor(0.4)).sample().item()
    perm = torch.randperm(4)
    assert torch.allclose(out["image"], lam * batch["image"] + (1 - lam) * batch["image"][perm])
    expected = lam * batch["labels"] + (1 - lam) * batch["labels"][perm]
    assert torch.allclose(out["labels"], expected)
    assert torch.allclose(out["labels"].sum(1), lam * batch["labels"].sum(1)
                          + (1 - lam) * batch["labels"][perm].sum(1))
    assert not out["has_mask"].any()


def test_box_area_and_bounds() -> None:
    torch.manual_seed(1)
    for lam in (0.0, 0.3, 0.9, 1.0):
        top, left, h, w = cutmix_box(20, 30, lam)
        assert 0 <= top and top + h <= 20 and 0 <= left and left + w <= 30
        assert h * w <= round(20 * (1 - lam) ** 0.5 + 1) * round(30 * (1 - lam) ** 0.5 + 1)


def test_none_and_bad_modes() -> None:
    batch = _batch()
    assert mix_batch(batch, "none") is batch
    with pytest.raises(ValueError, match="train.mix='mosaic'"):
        mix_batch(batch, "mosaic")
    with pytest.raises(ValueError, match="mix_alpha"):
        mix_batch(batch, "cutmix", alpha=0.0)
