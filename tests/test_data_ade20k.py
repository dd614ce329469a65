import numpy as np
import pytest
import torch
from PIL import Image

from attnmaps.data.ade20k import ADE20K_CLASSES, ADE20KDataset
from attnmaps.data.image_io import write_image


def _annotation() -> np.ndarray:
    mask = np.zeros((6, 8), dtype=np.uint8)  # 0 = other
    mask[1:3, 1:4] = 1  # wall
    mask[3:6, 5:8] = 150  # flag
    mask[0, 7] = 13  # person
    return mask


@pytest.fixture
def ade(tmp_path):
    for split in ("training", "validation"):
        (tmp_path / "images" / split).mkdir(parents=True)
        (tmp_path / "annotations" / split).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, mask in (("ADE_val_00000002", _annotation()),
                       ("ADE_val_00000001", np.zeros((6, 8), np.uint8))):
        write_image(tmp_path / "images" / "validation" / f"{name}.jpg",
                    rng.integers(0, 256, (6, 8, 3), np.uint8))
        Image.fromarray(mask).save(tmp_path / "annotations" / "validation" / f"{name}.png")
    return tmp_path


def _labels(*classes: int, k: int = 150) -> torch.Tensor:
    out = torch.zeros(k)
    out[list(classes)] = 1
    return out


def test_builtin_names():
    assert len(ADE20K_CLASSES) == 150 == len(set(ADE20K_CLASSES))
    assert ADE20K_CLASSES[:3] == ("wall", "building", "sky") and ADE20K_CLASSES[-1] == "flag"
    assert ADE20K_CLASSES[12] == "person"


def test_other_is_ignore_by_default(ade):
    ds = ADE20KDataset(ade, split="val")
    assert ds.ids == ["ADE_val_00000001", "ADE_val_00000002"]
    assert ds.num_classes == 150 and ds.class_names == list(ADE20K_CLASSES)
    assert not ds.has_background
    no_objects = ds[0]
    assert bool((no_objects["mask"] == 255).all()) and torch.equal(no_objects["labels"], _labels())
    sample = ds[1]
    expected = np.where(_annotation() == 0, 255, _annotation().astype(np.int64) - 1)
    assert np.array_equal(sample["mask"].numpy(), expected)
    assert expected[0, 7] == 12 and expected[0, 0] == 255
    assert torch.equal(sample["labels"], _labels(0, 12, 149)) and sample["has_mask"]


def test_other_as_background(ade):
    ds = ADE20KDataset(ade, split="validation", has_background=True)
    assert ds.has_background and ds.class_names[0] == "other" and len(ds.class_names) == 151
    sample = ds[1]
    assert np.array_equal(sample["mask"].numpy(), _annotation())
    assert torch.equal(sample["labels"], _labels(0, 12, 149))


def test_object_info_csv(ade):
    rows = ["Idx,Ratio,Train,Val,Name"] + [
        f"{i},0.1,1,1,{'building;edifice' if i == 2 else f'c{i}'}" for i in range(1, 151)]
    (ade / "objectInfo150.csv").write_text("\n".join(rows) + "\n")
    ds = ADE20KDataset(ade, split="validation")
    assert ds.class_names[:3] == ["c1", "building", "c3"] and len(ds.class_names) == 150
    (ade / "objectInfo150.csv").write_text("Idx,Name\n2,wall\n")
    with pytest.raises(ValueError, match=r"objectInfo150\.csv: column 'Idx' must run 1\.\.N"):
        ADE20KDataset(ade, split="validation")
    (ade / "objectInfo150.csv").write_text("Index,Label\n1,wall\n")
    with pytest.raises(ValueError, match=r"must have columns 'Idx' and 'Name'"):
        ADE20KDataset(ade, split="validation")


def test_errors(ade):
    with pytest.raises(FileNotFoundError,
                       match=r"images/testing; folders present: \['training', 'validation'\]"):
        ADE20KDataset(ade, split="testing")
    with pytest.raises(ValueError, match=r"images/training holds no images"):
        ADE20KDataset(ade, split="training")
    bad = _annotation()
    bad[2, 2] = 151
    Image.fromarray(bad).save(ade / "annotations" / "validation" / "ADE_val_00000002.png")
    with pytest.raises(ValueError, match=r"ADE_val_00000002\.png has values \[151\] outside "
                                         r"0\.\.150"):
        ADE20KDataset(ade, split="validation")[1]
    (ade / "annotations" / "validation" / "ADE_val_00000001.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 images .* expected .*ADE_val_00000001\.png"):
        ADE20KDataset(ade, split="validation")
