import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from attnmaps.data.image_io import write_image, write_mask
from attnmaps.data.voc import VOC_CLASSES, VOCDataset

MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(8, 10, 3), dtype=np.uint8)


def _xml(root, image_id: str, names: list[str]) -> None:
    objects = "".join(f"<object><name>{n}</name><difficult>0</difficult></object>" for n in names)
    (root / "Annotations").mkdir(exist_ok=True)
    (root / "Annotations" / f"{image_id}.xml").write_text(
        f"<annotation><filename>{image_id}.jpg</filename>{objects}</annotation>")


def _split(root, name: str, ids: list[str]) -> None:
    (root / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Segmentation" / f"{name}.txt").write_text("\n".join(ids) + "\n")


@pytest.fixture
def voc(tmp_path):
    """a: palette mask (aeroplane, person, 255 border); b: index mask + XML (dog, cat);
    c: JPEG, no mask, XML (person); d: no mask, XML without objects (no foreground)."""
    root = tmp_path / "voc"
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClass").mkdir()
    for seed, image_id in enumerate("abd"):
        write_image(root / "JPEGImages" / f"{image_id}.png", _image(seed))
    write_image(root / "JPEGImages" / "c.jpg", np.full((8, 10, 3), 120, dtype=np.uint8))
    mask_a = np.zeros((8, 10), dtype=np.uint8)
    mask_a[2:5, 1:4], mask_a[5:7, 6:9] = 1, 15
    mask_a[0, :], mask_a[:, -1] = 255, 255
    write_mask(root / "SegmentationClass" / "a.png", mask_a)
    mask_b = np.zeros((8, 10), dtype=np.uint8)
    mask_b[3:6, 3:6] = 8
    Image.fromarray(mask_b).save(root / "SegmentationClass" / "b.png")
    _xml(root, "b", ["dog", "cat", "dog"])
    _xml(root, "c", ["person"])
    _xml(root, "d", [])
    _split(root, "train", ["a", "b", "c", "d"])
    return root, {"a": mask_a, "b": mask_b}


def _labels(*classes: int, k: int = 20) -> torch.Tensor:
    out = torch.zeros(k)
    out[list(classes)] = 1
    return out


def test_default_classes_and_samples(voc):
    root, masks = voc
    ds = VOCDataset(root)
    assert ds.class_names == list(VOC_CLASSES) and ds.num_classes == 20 and ds.has_background
    assert ds.ids == ["a", "b", "c", "d"] and len(ds) == 4
    a = ds[0]
    expected = ((_image(0) / 255.0 - MEAN) / STD).transpose(2, 0, 1)
    assert a["image"].dtype == torch.float32 and a["image"].shape == (3, 8, 10)
    assert np.allclose(a["image"].numpy(), expected, atol=1e-5)
    assert a["mask"].dtype == torch.int64 and np.array_equal(a["mask"].numpy(), masks["a"])
    assert torch.equal(a["labels"], _labels(0, 14)) and a["has_mask"] is True and a["id"] == "a"
    b = ds[1]
    assert torch.equal(b["labels"], _labels(11, 7)) and np.array_equal(b["mask"], masks["b"])
    c = ds[2]
    assert torch.equal(c["labels"], _labels(14)) and c["has_mask"] is False
    assert c["mask"].shape == (8, 10) and bool((c["mask"] == 255).all())
    assert np.allclose(c["image"][:, 4, 5].numpy(), (120 / 255 - MEAN) / STD, atol=0.05)
    d = ds[3]
    assert torch.equal(d["labels"], _labels()) and d["has_mask"] is False


def test_classes_txt_and_index_labels(tmp_path):
    root = tmp_path / "voc"
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClass").mkdir()
    (root / "classes.txt").write_text("bg\nfoo\nbar\n\n")
    write_image(root / "JPEGImages" / "x.png", _image(3))
    mask = np.zeros((8, 10), dtype=np.uint8)
    mask[1:3, 1:3] = 2
    write_mask(root / "SegmentationClass" / "x.png", mask)
    _split(root, "val", ["x"])
    ds = VOCDataset(root, split="val")
    assert ds.class_names == ["bg", "foo", "bar"] and ds.num_classes == 2
    assert torch.equal(ds[0]["labels"], torch.tensor([0.0, 1.0]))
    _xml(root, "x", ["foo", "cat"])
    with pytest.raises(ValueError, match=r"x\.xml.*'cat'"):
        ds[0]


def test_resize_and_raw_image(voc):
    root, _ = voc
    blocks = np.kron(np.arange(20, dtype=np.uint8).reshape(4, 5) % 16, np.ones((2, 2), np.uint8))
    write_mask(root / "SegmentationClass" / "a.png", blocks)
    write_image(root / "JPEGImages" / "a.png", np.full((8, 10, 3), 51, dtype=np.uint8))
    ds = VOCDataset(root, image_size=(4, 5))
    a = ds[0]
    assert a["image"].shape == (3, 4, 5) and a["mask"].shape == (4, 5)
    assert np.array_equal(a["mask"].numpy(), np.arange(20).reshape(4, 5) % 16)
    assert np.allclose(a["image"].numpy(), ((0.2 - MEAN) / STD)[:, None, None], atol=1e-5)
    assert ds[2]["mask"].shape == (4, 5)
    raw = ds.raw_image(0)
    assert raw.dtype == np.uint8 and raw.shape == (4, 5, 3) and (raw == 51).all()
    assert VOCDataset(root).raw_image(0).shape == (8, 10, 3)


def test_hflip_flips_image_and_mask_together(voc):
    root, _ = voc
    plain = VOCDataset(root)[0]
    ds = VOCDataset(root, hflip=True)
    torch.manual_seed(0)
    flipped = []
    for _ in range(20):
        s = ds[0]
        is_flipped = not torch.equal(s["mask"], plain["mask"])
        ref_image = plain["image"].flip(-1) if is_flipped else plain["image"]
        ref_mask = plain["mask"].flip(-1) if is_flipped else plain["mask"]
        assert torch.equal(s["image"], ref_image) and torch.equal(s["mask"], ref_mask)
        flipped.append(is_flipped)
    assert 0 < sum(flipped) < 20


def test_missing_root_and_split(tmp_path, voc):
    root, _ = voc
    with pytest.raises(FileNotFoundError, match="nowhere"):
        VOCDataset(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"expected .*Segmentation/val\.txt.*train\.txt"):
        VOCDataset(root, split="val")


def test_missing_image(voc):
    root, _ = voc
    _split(root, "train", ["a", "zz"])
    with pytest.raises(FileNotFoundError, match=r"'zz'.*zz\.jpg"):
        VOCDataset(root)


def test_size_mismatch(voc):
    root, _ = voc
    write_mask(root / "SegmentationClass" / "a.png", np.zeros((8, 9), dtype=np.uint8))
    ds = VOCDataset(root)
    with pytest.raises(ValueError, match=r"a\.png has size 9x8.*a\.png has size 10x8"):
        ds[0]


def test_mask_values_out_of_range(voc):
    root, masks = voc
    bad = masks["a"].copy()
    bad[3, 3], bad[4, 4] = 25, 21
    write_mask(root / "SegmentationClass" / "a.png", bad)
    with pytest.raises(ValueError, match=r"a\.png has values \[21, 25\] outside 0\.\.20"):
        VOCDataset(root)[0]
    lenient = VOCDataset(root, num_classes_check=False)[0]["mask"].numpy()
    expected = masks["a"].copy()
    expected[3, 3], expected[4, 4] = 255, 255
    assert np.array_equal(lenient, expected)


def test_unreadable_image_and_missing_labels(voc):
    root, _ = voc
    (root / "Annotations" / "c.xml").unlink()
    (root / "JPEGImages" / "d.png").write_bytes(b"\x89PNG\r\n\x1a\ngarbage")
    ds = VOCDataset(root)
    with pytest.raises(ValueError, match=r"id 'c' has neither an annotation file nor a mask"):
        ds[2]
    with pytest.raises(ValueError, match=r"d\.png"):
        ds[3]


def test_missing_classes_txt_outside_a_voc_folder_warns(voc, tmp_path):
    root, _ = voc
    other = root.rename(tmp_path / "shapes")
    with pytest.warns(UserWarning, match="classes.txt not found: using the 21 PASCAL VOC"):
        VOCDataset(other)
    named = other.rename(tmp_path / "VOC2012")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        VOCDataset(named)
