import json

import numpy as np
import pytest
import torch
from dataset_helpers import assert_labels_read_without

from attnmaps.data.coco import COCODataset, decode_rle_counts, rle_to_mask
from attnmaps.data.image_io import write_image

CATEGORIES = [{"id": 18, "name": "dog"}, {"id": 1, "name": "person"}, {"id": 3, "name": "car"}]


def _uncompressed(mask: np.ndarray) -> list[int]:
    """Run lengths over the column-major pixels, zeros first (written out by hand)."""
    counts, current, run = [], 0, 0
    for value in mask.T.ravel():
        if value != current:
            counts.append(run)
            current, run = value, 0
        run += 1
    return [*counts, run]


def _crowd_region() -> np.ndarray:
    region = np.zeros((10, 12), dtype=np.uint8)
    region[4:10, 0:3] = 1
    return region


def _write(root, split: str, image_dir, annotations: list[dict]) -> None:
    image_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    write_image(image_dir / "000000000007.png", rng.integers(0, 256, (10, 12, 3), np.uint8))
    write_image(image_dir / "000000000003.png", rng.integers(0, 256, (8, 8, 3), np.uint8))
    (root / "annotations").mkdir(exist_ok=True)
    data = {"images": [{"id": 7, "file_name": "000000000007.png", "height": 10, "width": 12},
                       {"id": 3, "file_name": "000000000003.png", "height": 8, "width": 8}],
            "annotations": annotations, "categories": CATEGORIES}
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))


def _annotations() -> list[dict]:
    return [
        {"id": 1, "image_id": 7, "category_id": 18, "iscrowd": 0,
         "segmentation": [[4, 3, 8, 3, 8, 7, 4, 7]]},
        {"id": 2, "image_id": 7, "category_id": 1, "iscrowd": 0,
         "segmentation": [[1, 1, 6, 1, 6, 5, 1, 5], [0, 0, 2, 0]]},
        {"id": 3, "image_id": 7, "category_id": 3, "iscrowd": 1,
         "segmentation": {"counts": _uncompressed(_crowd_region()), "size": [10, 12]}},
        {"id": 4, "image_id": 7, "category_id": 3, "iscrowd": 0,
         "segmentation": {"counts": "T3`04", "size": [10, 12]}},
    ]


@pytest.fixture
def coco(tmp_path):
    _write(tmp_path, "val2017", tmp_path / "val2017", _annotations())
    return tmp_path


def test_decode_hand_encoded_strings():
    assert decode_rle_counts("253LN") == [2, 5, 3, 1, 1]  # 1 - 5 = -4 -> 'L', 1 - 3 -> 'N'
    assert decode_rle_counts("T3`04") == [100, 16, 4]  # 100 = 4 + 3 * 32 -> 'T' (4 | 0x20), '3'
    assert decode_rle_counts("3X12mN") == [3, 40, 2, 5]  # 5 - 40 = -35: two groups 'm', 'N'
    expected = np.array([[0, 1, 1, 0], [0, 1, 0, 1], [1, 1, 0, 0]], dtype=bool)
    assert np.array_equal(rle_to_mask([2, 5, 3, 1, 1], 3, 4), expected)
    with pytest.raises(ValueError, match=r"ends inside a count"):
        decode_rle_counts("T")
    with pytest.raises(ValueError, match=r"sum to 3x4=12 pixels, got sum 11"):
        rle_to_mask([2, 5, 3, 1], 3, 4)


def test_rle_matches_pycocotools():
    mask_api = pytest.importorskip("pycocotools.mask")
    rng = np.random.default_rng(1)
    for shape in ((1, 1), (7, 5), (40, 33)):
        mask = (rng.random(shape) < 0.3).astype(np.uint8)
        mask[: shape[0] // 2, : shape[1] // 2] = 1  # some long runs
        encoded = mask_api.encode(np.asfortranarray(mask))
        counts = decode_rle_counts(encoded["counts"].decode())
        assert np.array_equal(rle_to_mask(counts, *shape), mask.astype(bool))
        compressed = mask_api.frPyObjects({"counts": _uncompressed(mask), "size": list(shape)},
                                          *shape)
        assert compressed["counts"] == encoded["counts"]


def test_classes_labels_and_rendered_masks(coco):
    ds = COCODataset(coco, split="val2017", mean=(0, 0, 0), std=(1, 1, 1))
    assert ds.class_names == ["background", "person", "car", "dog"] and ds.num_classes == 3
    assert ds.ids == ["000000000003", "000000000007"] and ds.has_background
    empty = ds[0]
    assert torch.equal(empty["labels"], torch.zeros(3)) and empty["has_mask"] is True
    assert empty["mask"].shape == (8, 8) and bool((empty["mask"] == 0).all())
    sample = ds[1]
    expected = np.zeros((10, 12), dtype=np.int64)
    expected[4:10, 0:3] = 255  # crowd car: ignore ...
    expected[1:6, 1:7] = 1  # ... except under the person (outline pixels included)
    expected[3:8, 4:9] = 3  # the smaller dog is on top although listed first
    expected[:, 10], expected[0:6, 11] = 2, 2  # compressed RLE: pixels 100..115 column-major
    assert np.array_equal(sample["mask"].numpy(), expected)
    assert torch.equal(sample["labels"], torch.ones(3)) and sample["id"] == "000000000007"
    assert sample["image"].shape == (3, 10, 12)


def test_image_labels_from_the_annotations_alone(coco, monkeypatch):
    ds = COCODataset(coco, split="val2017", mean=(0, 0, 0), std=(1, 1, 1))
    assert_labels_read_without(ds, monkeypatch, ("load_image", "_instance_mask"))


def test_images_folder_layout(tmp_path):
    _write(tmp_path, "train", tmp_path / "images" / "train", _annotations()[:1])
    ds = COCODataset(tmp_path, split="train")
    assert torch.equal(ds[1]["labels"], torch.tensor([0.0, 0.0, 1.0]))
    assert int((ds[1]["mask"] == 3).sum()) == 25


def test_missing_files(coco):
    with pytest.raises(FileNotFoundError, match=r"instances_train2017\.json.*instances_val2017"):
        COCODataset(coco, split="train2017")
    (coco / "val2017").rename(coco / "elsewhere")
    with pytest.raises(FileNotFoundError, match=r"image folder.*val2017 or .*images/val2017"):
        COCODataset(coco, split="val2017")


@pytest.mark.parametrize(("change", "message"), [
    (lambda a: a[0].update(category_id=99), r"annotation 1 has category_id 99"),
    (lambda a: a[0].update(image_id=5), r"annotation 1 refers to image_id 5"),
    (lambda a: a[3]["segmentation"].update(size=[12, 10]),
     r"annotation 4 has RLE size \[12, 10\], expected .* \[10, 12\]"),
    (lambda a: a[1].update(segmentation="oops"), r"annotation 2 has segmentation of type str"),
    (lambda a: a[0].pop("category_id"), r"lacks \['category_id'\]"),
])
def test_bad_annotations(tmp_path, change, message):
    annotations = _annotations()
    change(annotations)
    _write(tmp_path, "val2017", tmp_path / "val2017", annotations)
    with pytest.raises(ValueError, match=message):
        COCODataset(tmp_path, split="val2017")[1]


def test_image_size_differs_from_json(coco):
    write_image(coco / "val2017" / "000000000007.png", np.zeros((10, 11, 3), np.uint8))
    with pytest.raises(ValueError, match=r"000000000007\.png has size 11x10 .* gives 12x10"):
        COCODataset(coco, split="val2017")[1]
