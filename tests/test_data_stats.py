import numpy as np
import pytest
import torch

from attnmaps.data.base import ImageDataset, multi_hot
from attnmaps.data.image_io import write_image, write_mask
from attnmaps.data.manifest import ManifestDataset
from attnmaps.data.stats import dataset_stats, format_stats


class InMemory(ImageDataset):
    """Images, masks and labels held in lists (no files)."""

    channels = None

    def __init__(self, images, masks, labels, names, has_background=False):
        super().__init__(mean=(0.0,) * images[0].shape[2], std=(1.0,) * images[0].shape[2])
        self.images, self.masks, self.labels = images, masks, labels
        self.ids = [str(i) for i in range(len(images))]
        self.image_paths = [f"memory/{i}" for i in self.ids]
        self.has_background = has_background
        self.num_classes = len(names)
        self.class_names = (["background"] if has_background else []) + names

    def load_image(self, i):
        return self.images[i]

    def load_target(self, i, image_shape):
        return self.masks[i], multi_hot(self.labels[i], self.num_classes)


def test_mean_std_match_numpy_in_float64():
    rng = np.random.default_rng(0)
    # large values with a small spread: a float32 or sum-of-squares accumulation loses it
    images = [(10000 + rng.normal(0, 1, size=(h, w, 4))).astype(np.float64)
              for h, w in ((8, 8), (16, 9), (5, 32))]
    ds = InMemory(images, [None] * 3, [[0], [], [0, 1]], ["a", "b"])
    stats = dataset_stats(ds)
    pixels = np.concatenate([im.reshape(-1, 4) for im in images])
    assert np.allclose(stats["mean"], pixels.mean(0), rtol=0, atol=1e-9)
    assert np.allclose(stats["std"], pixels.std(0), rtol=1e-9, atol=0)
    assert stats["min"] == pixels.min(0).tolist() and stats["max"] == pixels.max(0).tolist()
    assert stats["num_images"] == 3 and stats["channels"] == 4 and stats["num_masks"] == 0
    assert stats["height"] == [5, 16] and stats["width"] == [8, 32]
    assert stats["image_counts"] == [2, 1] and stats["pixel_fraction"] is None
    assert stats["background_fraction"] is None and stats["ignore_fraction"] is None


def test_uint16_is_raw_and_uint8_is_scaled():
    raw = np.array([[[0, 100], [65535, 300]]], dtype=np.uint16)
    stats = dataset_stats(InMemory([raw], [None], [[]], ["a"]))
    assert stats["mean"] == [32767.5, 200.0] and stats["max"] == [65535.0, 300.0]
    eight = np.array([[[0, 255, 51]]], dtype=np.uint8)
    stats = dataset_stats(InMemory([eight], [None], [[]], ["a"]))
    assert np.allclose(stats["mean"], [0.0, 1.0, 0.2]) and stats["std"] == [0.0, 0.0, 0.0]


def test_class_frequencies_from_files(tmp_path):
    (tmp_path / "img").mkdir()
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((4, 6), (8, 8), (6, 3))]
    masks = [np.array([[0, 1, 1, 2, 255, 255]] * 4, dtype=np.uint8), None,
             np.zeros((6, 3), dtype=np.uint8)]
    lines = ["image,labels,mask"]
    for i, (image, mask) in enumerate(zip(images, masks)):
        write_image(tmp_path / "img" / f"{i}.png", image)
        if mask is not None:
            write_mask(tmp_path / "img" / f"{i}_mask.png", mask)
        labels = ["cat;dog", "dog", ""][i]
        lines.append(f"img/{i}.png,{labels},{'' if mask is None else f'img/{i}_mask.png'}")
    (tmp_path / "train.csv").write_text("\n".join(lines) + "\n")
    ds = ManifestDataset(tmp_path, "train")
    stats = dataset_stats(ds)
    pixels = np.concatenate([im.reshape(-1, 3) / 255.0 for im in images])
    assert np.allclose(stats["mean"], pixels.mean(0)) and np.allclose(stats["std"], pixels.std(0))
    assert stats["class_names"] == ["cat", "dog"] and stats["image_counts"] == [1, 2]
    assert stats["num_masks"] == 2
    # labelled pixels: 16 from mask 0 (4 background, 8 cat, 4 dog) + 18 background from mask 2
    assert np.allclose(stats["pixel_fraction"], [8 / 34, 4 / 34])
    assert stats["background_fraction"] == pytest.approx(22 / 34)
    assert stats["ignore_fraction"] == pytest.approx(8 / 42)

    text = format_stats(stats)
    assert text.startswith("images: 3 (2 with masks), channels: 3, height 4..8, width 3..8")
    lines = text.splitlines()
    assert lines[lines.index(next(l for l in lines if l.startswith("class")))
                 + 1].split() == ["background", "-", "-", f"{100 * 22 / 34:.2f}"]
    assert next(l for l in lines if l.startswith("dog")).split() == [
        "dog", "2", "66.67", f"{100 * 4 / 34:.2f}"]
    assert "ignore (255) pixels: 19.05 %" in text
    override = lines[-1]
    assert override.startswith("data.mean=") and " data.std=" in override
    mean = [float(v) for v in override.split()[0].removeprefix("data.mean=").split(",")]
    assert np.allclose(mean, pixels.mean(0), atol=1e-6)


def test_empty_dataset():
    ds = InMemory([np.zeros((2, 2, 1))], [None], [[]], ["a"])
    ds.ids = []
    with pytest.raises(ValueError, match="at least one image"):
        dataset_stats(ds)


def test_in_memory_dataset_item_uses_base_pipeline():
    image = np.full((2, 3, 2), 5.0)
    sample = InMemory([image], [None], [[1]], ["a", "b"])[0]
    assert torch.equal(sample["labels"], torch.tensor([0.0, 1.0]))
    assert sample["image"].shape == (2, 2, 3) and bool((sample["image"] == 5).all())
