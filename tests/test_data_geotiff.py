import sys

import numpy as np
import pytest
import torch
from PIL import Image

from attnmaps.data.geotiff import DFC2020_CLASSES, DFC2020_LABEL_MAP, GeoTIFFDataset

tifffile = pytest.importorskip("tifffile")

BANDS = 13
MEAN = tuple(float(1000 + 100 * b) for b in range(BANDS))
STD = tuple(float(500 + 10 * b) for b in range(BANDS))


def _raw_labels() -> np.ndarray:
    raw = np.zeros((8, 10), dtype=np.uint8)  # row 0: 0 = no data
    raw[1:5] = 1  # forest -> class 0, 40 pixels
    raw[5:7] = 10  # water -> class 7, 20 pixels
    raw[7, :5] = 3  # savanna -> ignored
    raw[7, 5:] = 2  # shrubland -> class 1, 5 of 65 valid pixels (< 10%)
    return raw


def _bands(seed: int, bands: int = BANDS) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 10000, (bands, 8, 10), dtype=np.uint16)


@pytest.fixture
def scenes(tmp_path):
    for sub in ("images", "masks", "splits"):
        (tmp_path / sub).mkdir()
    tifffile.imwrite(tmp_path / "images" / "planar.tif", _bands(0), planarconfig="separate")
    tifffile.imwrite(tmp_path / "images" / "interleaved.tif",
                     np.moveaxis(_bands(1), 0, -1), planarconfig="contig")
    tifffile.imwrite(tmp_path / "masks" / "planar.tif", _raw_labels())
    Image.fromarray(_raw_labels()).save(tmp_path / "masks" / "interleaved.png")
    (tmp_path / "splits" / "train.txt").write_text("planar\ninterleaved\n")
    (tmp_path / "classes.txt").write_text("\n".join(DFC2020_CLASSES) + "\n")
    return tmp_path


def _dataset(root, **kwargs) -> GeoTIFFDataset:
    kwargs = {"mean": MEAN, "std": STD, "label_map": DFC2020_LABEL_MAP, **kwargs}
    return GeoTIFFDataset(root, "train", **kwargs)


def test_bands_masks_and_labels(scenes):
    ds = _dataset(scenes, label_min_fraction=0.1)
    assert ds.num_classes == 8 and ds.class_names == list(DFC2020_CLASSES)
    assert not ds.has_background and ds.ids == ["planar", "interleaved"]
    expected_mask = np.array(DFC2020_LABEL_MAP)[_raw_labels()]
    for i, seed in enumerate((0, 1)):
        sample = ds[i]
        expected = (_bands(seed) - np.array(MEAN)[:, None, None]) / np.array(STD)[:, None, None]
        assert sample["image"].shape == (BANDS, 8, 10)
        assert np.allclose(sample["image"].numpy(), expected, atol=1e-5)
        assert np.array_equal(sample["mask"].numpy(), expected_mask)
        assert torch.equal(sample["labels"], torch.tensor([1.0, 0, 0, 0, 0, 0, 0, 1]))
        assert torch.equal(ds.image_labels(i), sample["labels"])  # the planar and band layouts
    assert expected_mask[0, 0] == 255 and expected_mask[7, 0] == 255 and expected_mask[7, 9] == 1
    assert torch.equal(_dataset(scenes)[0]["labels"], torch.tensor([1.0, 1, 0, 0, 0, 0, 0, 1]))
    raw = ds.raw_image(0)
    assert raw.dtype == np.uint16 and np.array_equal(raw, np.moveaxis(_bands(0), 0, -1))


def test_resize_keeps_band_values(scenes):
    tifffile.imwrite(scenes / "images" / "planar.tif", np.full((BANDS, 8, 10), 1234, np.uint16))
    sample = _dataset(scenes, image_size=(4, 5))[0]
    assert sample["image"].shape == (BANDS, 4, 5) and sample["mask"].shape == (4, 5)
    expected = (1234 - np.array(MEAN)) / np.array(STD)
    assert np.allclose(sample["image"][:, 2, 3].numpy(), expected, atol=1e-5)


def test_uint8_bands_are_scaled_and_background_option(scenes):
    tifffile.imwrite(scenes / "images" / "planar.tif", np.full((3, 8, 10), 51, np.uint8),
                     planarconfig="separate", photometric="minisblack")
    labels = np.zeros((8, 10), np.uint8)
    labels[2:4, 2:4] = 8
    tifffile.imwrite(scenes / "masks" / "planar.tif", labels)
    ds = GeoTIFFDataset(scenes, "train", has_background=True, mean=(0, 0, 0), std=(1, 1, 1))
    assert ds.class_names == ["background", *DFC2020_CLASSES] and ds.has_background
    sample = ds[0]
    assert np.allclose(sample["image"].numpy(), 0.2) and np.array_equal(sample["mask"], labels)
    assert torch.equal(sample["labels"], torch.tensor([0.0, 0, 0, 0, 0, 0, 0, 1]))


def test_band_count_error_names_file(scenes):
    tifffile.imwrite(scenes / "images" / "interleaved.tif", _bands(2, bands=12),
                     planarconfig="separate")
    ds = _dataset(scenes)
    with pytest.raises(ValueError, match=r"interleaved\.tif has 12 channels, expected 13"):
        ds[1]
    with pytest.raises(ValueError, match=r"mean and std need 13 values"):
        GeoTIFFDataset(scenes, "train", mean=MEAN, std=STD[:3])


def test_label_errors(scenes):
    with pytest.raises(ValueError, match=r"planar\.tif has values \[10\] outside 0\.\.7"):
        GeoTIFFDataset(scenes, "train", mean=MEAN, std=STD)[0]
    with pytest.raises(ValueError, match=r"planar\.tif has values \[10\] that data\.label_map "
                                         r"\(values 0\.\.9\) does not map"):
        _dataset(scenes, label_map=DFC2020_LABEL_MAP[:10])[0]
    with pytest.raises(ValueError, match=r"data\.label_map must list labels in 0\.\.255"):
        _dataset(scenes, label_map=[0, 256])
    with pytest.raises(ValueError, match=r"data\.label_min_fraction must be in \[0, 1\]"):
        _dataset(scenes, label_min_fraction=1.5)
    (scenes / "masks" / "planar.tif").unlink()
    with pytest.raises(FileNotFoundError, match=r"'planar' has no label raster.*planar\.png"):
        _dataset(scenes)[0]


def test_missing_files(scenes):
    with pytest.raises(FileNotFoundError, match=r"splits/val\.txt; split files present: "
                                                r"\['train\.txt'\]"):
        GeoTIFFDataset(scenes, "val", mean=MEAN, std=STD)
    (scenes / "images" / "planar.tif").unlink()
    with pytest.raises(FileNotFoundError, match=r"no image for id 'planar'.*planar\.tiff"):
        _dataset(scenes)
    (scenes / "classes.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"class list not found: expected .*classes\.txt"):
        _dataset(scenes)


def test_tifffile_missing(scenes, monkeypatch):
    monkeypatch.setitem(sys.modules, "tifffile", None)
    with pytest.raises(ImportError, match=r"pip install tifffile"):
        _dataset(scenes)
