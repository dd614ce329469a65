import json

import numpy as np
import pytest
import torch
from dataset_helpers import assert_labels_read_without

from attnmaps.data.image_io import write_image, write_mask
from attnmaps.data.manifest import ManifestDataset


def _mask() -> np.ndarray:
    mask = np.zeros((5, 7), dtype=np.uint8)
    mask[1:3, 1:3] = 1  # class 0 with background (bird in the label union), 1 without
    mask[3:5, 4:7] = 2
    mask[0, 6] = 255
    return mask


@pytest.fixture
def data(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "masks").mkdir()
    write_image(tmp_path / "img" / "a.png", np.full((5, 7, 3), 51, np.uint8))
    write_image(tmp_path / "img" / "b.png", np.full((5, 7, 3), 102, np.uint8))
    write_mask(tmp_path / "masks" / "a.png", _mask())
    (tmp_path / "train.csv").write_text("image,labels,mask\n"
                                        "img/a.png,dog; cat,masks/a.png\n"
                                        "img/b.png,,\n")
    rows = [{"image": "img/b.png", "labels": ["bird"]},
            {"image": "img/a.png", "labels": "cat;dog", "mask": "masks/a.png"}]
    (tmp_path / "val.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    return tmp_path


def test_csv_manifest(data):
    ds = ManifestDataset(data, "train", mean=(0, 0, 0), std=(1, 1, 1))
    assert ds.class_names == ["background", "bird", "cat", "dog"] and ds.num_classes == 3
    assert ds.ids == ["img/a", "img/b"]
    a, b = ds[0], ds[1]
    assert torch.equal(a["labels"], torch.tensor([0.0, 1.0, 1.0])) and a["has_mask"] is True
    assert np.array_equal(a["mask"].numpy(), _mask()) and np.allclose(a["image"].numpy(), 0.2)
    assert torch.equal(b["labels"], torch.zeros(3)) and b["has_mask"] is False
    assert bool((b["mask"] == 255).all()) and np.allclose(b["image"].numpy(), 0.4)


def test_jsonl_manifest_and_classes_txt(data):
    (data / "classes.txt").write_text("cat\ndog\nbird\nfish\n")
    ds = ManifestDataset(data, "val", has_background=False)
    assert ds.class_names == ["cat", "dog", "bird", "fish"] and not ds.has_background
    assert torch.equal(ds[0]["labels"], torch.tensor([0.0, 0.0, 1.0, 0.0]))
    assert torch.equal(ds[1]["labels"], torch.tensor([1.0, 1.0, 0.0, 0.0]))
    assert np.array_equal(ds[1]["mask"].numpy(), _mask())  # values 1, 2 = dog, bird without bg


def test_unknown_label_and_mask_values(data):
    (data / "classes.txt").write_text("cat\ndog\n")
    with pytest.raises(ValueError, match=r"val\.jsonl:1: unknown class 'bird'; expected one of "
                                         r"\['cat', 'dog'\] \(from .*classes\.txt\)"):
        ManifestDataset(data, "val")
    ds = ManifestDataset(data, "train", has_background=False)
    with pytest.raises(ValueError, match=r"masks/a\.png has values \[2\] outside 0\.\.1"):
        ds[0]


@pytest.mark.parametrize(("name", "text", "message"), [
    ("bad.csv", "path,labels\nimg/a.png,cat\n",
     r"bad\.csv must have a header with columns 'image', 'labels'.*\['path', 'labels'\]"),
    ("bad.jsonl", '{"image": "img/a.png"}\n', r"bad\.jsonl:1 must be an object with keys"),
    ("bad.jsonl", '\n{"image": "img/a.png", "labels": 3}\n', r"bad\.jsonl:2: 'labels' must be"),
    ("bad.jsonl", '{"image": ', r"bad\.jsonl:1 is not valid JSON"),
    ("bad.csv", "image,labels\n,cat\n", r"bad\.csv:2: the 'image' path is empty"),
    ("bad.csv", "image,labels\nimg/a.png,cat\nimg/a.jpg,dog\n", r"lists id 'img/a' more than"),
])
def test_malformed_manifests(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    with pytest.raises(ValueError, match=message):
        ManifestDataset(tmp_path, "bad")


def test_missing_manifest(data):
    with pytest.raises(FileNotFoundError, match=r"test\.csv or .*test\.jsonl; manifests present: "
                                                r"\['train\.csv', 'val\.jsonl'\]"):
        ManifestDataset(data, "test")


def test_image_labels_read_nothing(data, monkeypatch):
    dataset = ManifestDataset(data, "train", mean=(0, 0, 0), std=(1, 1, 1))
    assert_labels_read_without(dataset, monkeypatch, ("load_target", "load_image"))
