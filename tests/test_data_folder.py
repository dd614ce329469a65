import numpy as np
import pytest
import torch

from attnmaps.data.folder import FolderDataset
from attnmaps.data.image_io import write_image


def _image(value: int) -> np.ndarray:
    return np.full((6, 9, 3), value, dtype=np.uint8)


@pytest.fixture
def folders(tmp_path):
    for split, cls, name, value in (("train", "polyp", "p1.png", 10),
                                    ("train", "polyp", "p0.jpg", 20),
                                    ("train", "normal", "n0.png", 30),
                                    ("val", "ulcer", "u0.png", 40)):
        (tmp_path / split / cls).mkdir(parents=True, exist_ok=True)
        write_image(tmp_path / split / cls / name, _image(value))
    (tmp_path / "train" / "polyp" / "notes.txt").write_text("not an image")
    return tmp_path


def test_classes_from_all_splits(folders):
    ds = FolderDataset(folders, "train", mean=(0, 0, 0), std=(1, 1, 1))
    assert ds.class_names == ["background", "normal", "polyp", "ulcer"] and ds.num_classes == 3
    assert ds.ids == ["normal/n0", "polyp/p0", "polyp/p1"] and len(ds) == 3
    sample = ds[2]
    assert torch.equal(sample["labels"], torch.tensor([0.0, 1.0, 0.0]))
    assert sample["has_mask"] is False and sample["mask"].shape == (6, 9)
    assert bool((sample["mask"] == 255).all()) and sample["id"] == "polyp/p1"
    assert np.allclose(sample["image"].numpy(), 10 / 255, atol=1e-6)
    val = FolderDataset(folders, "val", has_background=False)
    assert val.class_names == ["normal", "polyp", "ulcer"] and not val.has_background
    assert torch.equal(val[0]["labels"], torch.tensor([0.0, 0.0, 1.0]))


def test_classes_txt(folders):
    (folders / "classes.txt").write_text("polyp\nnormal\nulcer\nother\n")
    ds = FolderDataset(folders, "train")
    assert ds.class_names[1:] == ["polyp", "normal", "ulcer", "other"]
    assert torch.equal(ds[0]["labels"], torch.tensor([0.0, 1.0, 0.0, 0.0]))
    (folders / "classes.txt").write_text("polyp\n")
    with pytest.raises(ValueError, match=r"class folder .*train/normal is not listed in "
                                         r".*classes\.txt; expected one of \['polyp'\]"):
        FolderDataset(folders, "train")


def test_errors(folders):
    with pytest.raises(FileNotFoundError, match=r"split 'test' not found.*\['train', 'val'\]"):
        FolderDataset(folders, "test")
    write_image(folders / "train" / "polyp" / "p1.jpg", _image(0))
    with pytest.raises(ValueError, match=r"several images with id 'polyp/p1'"):
        FolderDataset(folders, "train")
    (folders / "empty" / "polyp").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"empty holds no images"):
        FolderDataset(folders, "empty")
