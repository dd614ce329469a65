import numpy as np
import pytest
import torch
from dataset_helpers import assert_labels_read_without
from PIL import Image
from torch.utils.data import DataLoader

from attnmaps.data.folder import FolderDataset
from attnmaps.data.image_io import write_image, write_mask


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


def _object() -> np.ndarray:
    """A 6x9 object mask: rows 1..3, columns 2..5."""
    mask = np.zeros((6, 9), dtype=bool)
    mask[1:4, 2:6] = True
    return mask


def _save(path, array: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path)


def _mask_file(root, name: str):
    return root / "masks" / "train" / name


def _sample(root, image_id: str, **options) -> dict:
    ds = FolderDataset(root, "train", **options)
    return ds[ds.ids.index(image_id)]


@pytest.mark.parametrize("write", ["L255", "L1", "palette01", "rgb", "jpeg"])
def test_binary_mask_marks_the_image_class(folders, write):
    obj = _object()
    if write == "L255":
        _save(_mask_file(folders, "polyp/p1.png"), np.where(obj, 255, 0).astype(np.uint8))
    elif write == "L1":
        _save(_mask_file(folders, "polyp/p1.png"), obj.astype(np.uint8))
    elif write == "palette01":  # an index-like {0, 1} mask is binary, not class 'normal' (= 1)
        _mask_file(folders, "polyp").mkdir(parents=True)
        write_mask(_mask_file(folders, "polyp/p1.png"), obj.astype(np.uint8))
    elif write == "rgb":
        _save(_mask_file(folders, "polyp/p1.png"), np.repeat(obj[..., None] * 255, 3,
                                                            axis=2).astype(np.uint8))
    else:  # lossy JPEG: grey levels near the edges are thresholded at 128
        _save(_mask_file(folders, "polyp/p1.jpg"), np.where(obj, 255, 0).astype(np.uint8))
    expected = np.where(obj, 2, 0)  # polyp is class 1 of [normal, polyp, ulcer]: value 2
    sample = _sample(folders, "polyp/p1")
    assert sample["has_mask"] is True
    assert np.array_equal(sample["mask"].numpy(), expected)
    assert torch.equal(sample["labels"], torch.tensor([0.0, 1.0, 0.0]))
    no_background = _sample(folders, "polyp/p1", has_background=False)
    assert np.array_equal(no_background["mask"].numpy(), np.where(obj, 1, 255))


def test_bit_mask_is_read(folders):
    _save(_mask_file(folders, "normal/n0.png"), _object())  # bool array: a 1-bit PNG
    assert Image.open(_mask_file(folders, "normal/n0.png")).mode == "1"
    assert np.array_equal(_sample(folders, "normal/n0")["mask"].numpy(), np.where(_object(), 1, 0))


def test_index_mask_used_as_is(folders):
    mask = np.where(_object(), 2, 0).astype(np.uint8)
    mask[0, :] = 255
    _mask_file(folders, "polyp").mkdir(parents=True)
    write_mask(_mask_file(folders, "polyp/p0.png"), mask)
    sample = _sample(folders, "polyp/p0")
    assert sample["has_mask"] is True and np.array_equal(sample["mask"].numpy(), mask)
    assert not _sample(folders, "polyp/p1")["has_mask"]
    mask = np.where(mask == 2, 1, 255).astype(np.uint8)  # without background polyp is 1
    write_mask(_mask_file(folders, "polyp/p0.png"), mask)
    assert np.array_equal(_sample(folders, "polyp/p0", has_background=False)["mask"].numpy(), mask)


def test_missing_mask_and_masks_folder_is_no_split(folders):
    _save(_mask_file(folders, "polyp/p1.png"), np.zeros((6, 9), np.uint8))
    _save(folders / "masks" / "val" / "ulcer" / "u0.png", np.zeros((6, 9), np.uint8))
    ds = FolderDataset(folders, "train")
    assert ds.class_names == ["background", "normal", "polyp", "ulcer"]
    assert [m is not None for m in ds.mask_paths] == [False, False, True]
    sample = ds[0]
    assert sample["has_mask"] is False and bool((sample["mask"] == 255).all())
    assert ds[2]["has_mask"] is True and bool((ds[2]["mask"] == 0).all())
    with pytest.raises(FileNotFoundError, match=r"split 'masks' not found.*\['train', 'val'\]"):
        FolderDataset(folders, "masks")


def test_mask_resized_with_image(folders):
    mask = np.zeros((6, 9), np.uint8)
    mask[:, :3] = 255
    _save(_mask_file(folders, "polyp/p1.png"), mask)
    sample = _sample(folders, "polyp/p1", image_size=(3, 3))
    # nearest from 9 to 3 columns samples columns 1, 4, 7: only the first lies in 0..2
    assert np.array_equal(sample["mask"].numpy(), [[2, 0, 0]] * 3)


@pytest.mark.parametrize("values, has_background", [((0, 1, 2), True), ((0, 3), True),
                                                   ((0, 2, 7), True), ((0, 1, 255), False),
                                                   ((1, 2), False)])
def test_bad_mask_values_name_the_file(folders, values, has_background):
    mask = np.full((6, 9), values[0], np.uint8)
    mask.ravel()[1:len(values)] = values[1:]
    _save(_mask_file(folders, "polyp/p1.png"), mask)
    ds = FolderDataset(folders, "train", has_background=has_background)
    with pytest.raises(ValueError, match=rf"mask .*p1\.png has values \[{', '.join(map(str, values))}"
                                         rf"\]; expected .* 'polyp'"):
        ds[2]


def test_mask_errors(folders):
    _save(_mask_file(folders, "polyp/p1.png"), np.zeros((9, 6), np.uint8))
    ds = FolderDataset(folders, "train")
    with pytest.raises(ValueError, match=r"mask .*masks/train/polyp/p1\.png has size 6x9 \(WxH\) "
                                         r"but image .*train/polyp/p1\.png has size 9x6"):
        ds[2]
    _save(_mask_file(folders, "polyp/p1.png"), np.full((6, 9, 3), (255, 0, 0), np.uint8))
    with pytest.raises(ValueError, match=r"mask .*p1\.png is neither grey nor in VOC palette"):
        ds[2]
    _save(_mask_file(folders, "polyp/p1.jpg"), np.zeros((6, 9), np.uint8))
    with pytest.raises(ValueError, match=r"several masks with id 'polyp/p1'"):
        FolderDataset(folders, "train")
    _mask_file(folders, "polyp/p1.jpg").unlink()
    _save(_mask_file(folders, "normal/p1.png"), np.zeros((6, 9), np.uint8))
    with pytest.raises(ValueError, match=r"mask .*masks/train/normal/p1\.png has no image "
                                         r".*train/normal/p1\.\*"):
        FolderDataset(folders, "train")


def test_loader_collates_mixed_masks(folders):
    _save(_mask_file(folders, "polyp/p0.png"), np.where(_object(), 255, 0).astype(np.uint8))
    ds = FolderDataset(folders, "train", image_size=(4, 6))
    batch = next(iter(DataLoader(ds, batch_size=3)))
    assert torch.equal(batch["has_mask"], torch.tensor([False, True, False]))
    assert batch["mask"].shape == (3, 4, 6) and batch["mask"].dtype == torch.int64
    assert bool((batch["mask"][0] == 255).all()) and set(batch["mask"][1].unique().tolist()) == {0, 2}
    assert batch["id"] == ["normal/n0", "polyp/p0", "polyp/p1"]


def test_image_labels_read_nothing(folders, monkeypatch):
    dataset = FolderDataset(folders, "train", mean=(0, 0, 0), std=(1, 1, 1))
    assert_labels_read_without(dataset, monkeypatch, ("load_target", "load_image"))
