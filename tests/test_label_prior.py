"""Prior initialisation of the classifier bias."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from attnmaps.data import base
from attnmaps.engine.label_prior import init_head_bias, label_frequencies, prior_logits
from attnmaps.models.vit import ClassTokenViT


class _Labels(torch.utils.data.Dataset):
    def __init__(self, labels: torch.Tensor):
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"labels": self.labels[i]}


def test_frequencies_and_logits() -> None:
    labels = torch.tensor([[1.0, 0, 0], [1, 1, 0], [0, 0, 0], [1, 0, 0]])
    freq = label_frequencies(_Labels(labels))
    assert torch.allclose(freq, torch.tensor([0.75, 0.25, 0.0]))
    logits = prior_logits(freq)
    assert logits[0].item() == pytest.approx(math.log(3)) and logits[1].item() == pytest.approx(
        -math.log(3))
    assert logits[2].item() == pytest.approx(math.log(1e-3 / (1 - 1e-3)), rel=1e-5)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        prior_logits(torch.tensor([1.5]))


@pytest.mark.parametrize("head", ["joint", "per_token"])
def test_bias_makes_the_first_bce_the_prior_entropy(head: str) -> None:
    torch.manual_seed(0)
    model = ClassTokenViT(3, img_size=(16, 16), patch_size=8, embed_dim=16, depth=1, num_heads=2,
                          head=head).eval()
    freq = torch.tensor([0.2, 0.5, 0.1])
    init_head_bias(model, freq)
    with torch.no_grad():
        if head == "joint":
            model.head.weight.zero_()
        else:
            model.head_weight.zero_()
        logits = model(torch.randn(2, 3, 16, 16))
    assert torch.allclose(torch.sigmoid(logits), freq.expand(2, 3), atol=1e-6)
    labels = torch.tensor([[1.0, 0, 0], [0, 1, 0]])
    assert F.binary_cross_entropy_with_logits(logits, labels).item() == pytest.approx(
        F.binary_cross_entropy(freq.expand(2, 3), labels).item(), rel=1e-5)
    with pytest.raises(ValueError, match="2 class frequencies"):
        init_head_bias(model, torch.tensor([0.1, 0.2]))


def _no_decoding(path: object) -> None:
    raise AssertionError(f"decoded {path}")


def test_frequencies_read_stored_labels_without_augmenting(tmp_path, monkeypatch) -> None:
    import numpy as np
    from PIL import Image

    from attnmaps.config import load_config
    from attnmaps.data.registry import build_dataset
    from attnmaps.data.synthetic import write_synthetic_voc

    root = write_synthetic_voc(tmp_path / "data", num_train=12, num_val=2, size=(32, 32), seed=3)
    cfg = load_config(None, [f"data.root={root}", "data.rotate=30", "data.crop_scale=0.2,0.5"])
    train_set = build_dataset(cfg.data, "train", train=True)
    expected = torch.zeros(train_set.num_classes)
    for image_id in train_set.ids:  # by hand: the classes of each stored mask
        values = np.unique(np.array(Image.open(root / "SegmentationClass" / f"{image_id}.png")))
        for value in values[(values > 0) & (values < 255)]:
            expected[value - 1] += 1
    torch.manual_seed(0)
    state = torch.get_rng_state()
    monkeypatch.setattr(base, "read_image", _no_decoding)
    freq = label_frequencies(train_set)
    assert torch.equal(torch.get_rng_state(), state)  # no augmentation drawn, no image decoded
    torch.testing.assert_close(freq, expected / len(train_set))
