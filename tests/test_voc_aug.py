"""VOC's SBD-augmented set: ``train_aug`` reads index masks from ``SegmentationClassAug/``."""

import numpy as np
import pytest
import torch
from PIL import Image

from attnmaps.config import Config, apply_overrides
from attnmaps.data.image_io import write_image, write_mask
from attnmaps.data.registry import build_dataset
from attnmaps.data.voc import VOCDataset

SIZE = (6, 8)


def _labels(*classes: int) -> torch.Tensor:
    out = torch.zeros(20)
    out[list(classes)] = 1
    return out


def _masks() -> dict[str, np.ndarray]:
    """a: the official palette mask (aeroplane) and a different SBD mask (aeroplane, dog), both
    with a 255 border; b: SBD mask without foreground (background and border only)."""
    official = np.zeros(SIZE, np.uint8)
    official[1:4, 1:4] = 1
    aug = official.copy()
    aug[3:5, 5:7] = 12
    for mask in (official, aug):
        mask[0, :], mask[:, -1] = 255, 255
    empty = np.zeros(SIZE, np.uint8)
    empty[:, 0] = 255
    return {"official_a": official, "aug_a": aug, "aug_b": empty}


@pytest.fixture
def voc(tmp_path):
    """ids a, b, c; c has no mask in either folder but an XML annotation (cat)."""
    root = tmp_path / "voc"
    masks = _masks()
    for seed, image_id in enumerate("abc"):
        image = np.random.default_rng(seed).integers(0, 256, (*SIZE, 3), dtype=np.uint8)
        write_image(root / "JPEGImages" / f"{image_id}.png", image)
    write_mask(root / "SegmentationClass" / "a.png", masks["official_a"])
    (root / "SegmentationClassAug").mkdir()
    for image_id in "ab":
        Image.fromarray(masks[f"aug_{image_id}"]).save(root / "SegmentationClassAug" /
                                                       f"{image_id}.png")
    (root / "Annotations").mkdir()
    (root / "Annotations" / "c.xml").write_text(
        "<annotation><object><name>cat</name></object></annotation>")
    splits = root / "ImageSets" / "Segmentation"
    splits.mkdir(parents=True)
    (splits / "train.txt").write_text("a\n")
    (splits / "train_aug.txt").write_text("a\nb\nc\n")
    return root, masks


def test_fixture_has_both_mask_formats(voc):
    root, _ = voc
    with Image.open(root / "SegmentationClass" / "a.png") as official, \
            Image.open(root / "SegmentationClassAug" / "a.png") as aug:
        assert (official.mode, aug.mode) == ("P", "L")


def test_train_reads_official_palette_masks(voc):
    root, masks = voc
    ds = VOCDataset(root, "train")
    assert ds.mask_dir == root / "SegmentationClass"
    sample = ds[0]
    assert np.array_equal(sample["mask"].numpy(), masks["official_a"])
    assert torch.equal(sample["labels"], _labels(0))


def test_train_aug_reads_sbd_index_masks(voc):
    root, masks = voc
    ds = VOCDataset(root, "train_aug")
    assert ds.mask_dir == root / "SegmentationClassAug" and ds.ids == ["a", "b", "c"]
    a, b, c = ds[0], ds[1], ds[2]
    assert np.array_equal(a["mask"].numpy(), masks["aug_a"])
    assert torch.equal(a["labels"], _labels(0, 11)) and a["has_mask"]
    assert np.array_equal(b["mask"].numpy(), masks["aug_b"])
    assert torch.equal(b["labels"], _labels()) and b["has_mask"]
    assert not c["has_mask"] and bool((c["mask"] == 255).all())
    assert torch.equal(c["labels"], _labels(7))


def test_train_aug_falls_back_without_aug_folder(voc):
    root, masks = voc
    for path in (root / "SegmentationClassAug").iterdir():
        path.unlink()
    (root / "SegmentationClassAug").rmdir()
    ds = VOCDataset(root, "train_aug")
    assert ds.mask_dir == root / "SegmentationClass"
    assert np.array_equal(ds[0]["mask"].numpy(), masks["official_a"])
    with pytest.raises(ValueError, match="'b' has neither an annotation file nor a mask"):
        ds[1]


def test_explicit_mask_dir_wins(voc):
    root, masks = voc
    aug = VOCDataset(root, "train", mask_dir="SegmentationClassAug")
    assert np.array_equal(aug[0]["mask"].numpy(), masks["aug_a"])
    official = VOCDataset(root, "train_aug", mask_dir="SegmentationClass")
    assert np.array_equal(official[0]["mask"].numpy(), masks["official_a"])
    with pytest.raises(FileNotFoundError, match="SegmentationClassAugX"):
        VOCDataset(root, "train", mask_dir="SegmentationClassAugX")


def test_bad_aug_mask_names_file(voc):
    root, _ = voc
    bad = np.zeros(SIZE, np.uint8)
    bad[2, 2] = 21
    Image.fromarray(bad).save(root / "SegmentationClassAug" / "b.png")
    ds = VOCDataset(root, "train_aug")
    with pytest.raises(ValueError, match=r"SegmentationClassAug/b\.png has values \[21\]"):
        ds[1]


def test_registry_train_aug_split(voc):
    root, masks = voc
    cfg = apply_overrides(Config(), ["data.name=voc", f"data.root={root}",
                                     "data.train_split=train_aug"]).data
    ds = build_dataset(cfg, cfg.train_split, train=False)
    assert ds.mask_dir == root / "SegmentationClassAug"
    assert np.array_equal(ds[0]["mask"].numpy(), masks["aug_a"])
