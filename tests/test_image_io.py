import numpy as np
import pytest
from PIL import Image

from attnmaps.data.image_io import (
    VOC_PALETTE,
    read_image,
    read_image_size,
    read_mask,
    write_image,
    write_mask,
)


def test_palette_known_colors():
    assert VOC_PALETTE.shape == (256, 3) and VOC_PALETTE.dtype == np.uint8
    assert VOC_PALETTE[0].tolist() == [0, 0, 0]
    assert VOC_PALETTE[1].tolist() == [128, 0, 0]
    assert VOC_PALETTE[2].tolist() == [0, 128, 0]
    assert VOC_PALETTE[15].tolist() == [192, 128, 128]
    assert VOC_PALETTE[255].tolist() == [224, 224, 192]
    assert len({tuple(c) for c in VOC_PALETTE.tolist()}) == 256


def test_write_read_mask_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    mask = rng.integers(0, 256, size=(8, 10)).astype(np.int64)
    path = tmp_path / "sub" / "m.png"
    write_mask(path, mask)
    with Image.open(path) as im:
        assert im.mode == "P"
        assert np.array_equal(np.array(im.getpalette()[:768]).reshape(256, 3), VOC_PALETTE)
    out = read_mask(path)
    assert out.dtype == np.uint8 and np.array_equal(out, mask)
    assert [p.name for p in path.parent.iterdir()] == ["m.png"]


@pytest.mark.parametrize(
    "mask, match",
    [(np.zeros((4, 4), np.float32), "2-D integer"), (np.zeros((2, 4, 4), np.uint8), "2-D integer"),
     (np.full((4, 4), 256, np.int16), "0..255"), (np.full((4, 4), -1, np.int16), "0..255")],
)
def test_write_mask_validates(tmp_path, mask, match):
    with pytest.raises(ValueError, match=match):
        write_mask(tmp_path / "m.png", mask)
    assert list(tmp_path.iterdir()) == []


def test_read_mask_index_and_rgb(tmp_path):
    mask = np.array([[0, 1, 15], [255, 20, 3]], dtype=np.uint8)
    Image.fromarray(mask).save(tmp_path / "l.png")
    assert np.array_equal(read_mask(tmp_path / "l.png"), mask)
    rgb = np.array([[[0, 0, 0], [128, 0, 0], [192, 128, 128]],
                    [[224, 224, 192], [0, 64, 128], [128, 128, 0]]], dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    assert np.array_equal(read_mask(tmp_path / "rgb.png"), mask)


def test_read_mask_rejects_foreign_color(tmp_path):
    rgb = np.zeros((2, 3, 3), dtype=np.uint8)
    rgb[1, 2] = (1, 2, 3)
    Image.fromarray(rgb).save(tmp_path / "bad.png")
    with pytest.raises(ValueError, match=r"bad\.png.*\(1, 2, 3\)"):
        read_mask(tmp_path / "bad.png")


def test_read_image_converts_modes(tmp_path):
    gray = np.arange(80, dtype=np.uint8).reshape(8, 10)
    Image.fromarray(gray).save(tmp_path / "g.png")
    out = read_image(tmp_path / "g.png")
    assert out.shape == (8, 10, 3) and out.dtype == np.uint8
    assert all(np.array_equal(out[..., c], gray) for c in range(3))
    rgba = np.zeros((8, 10, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255
    Image.fromarray(rgba).save(tmp_path / "a.png")
    assert read_image(tmp_path / "a.png")[..., 0].min() == 200


def test_read_image_size_from_the_header(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (7, 11), np.uint8)).save(tmp_path / "g.png")
    Image.fromarray(rng.integers(0, 256, (9, 5, 4), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(rng.integers(0, 256, (13, 6, 3), np.uint8)).save(tmp_path / "c.jpg")
    Image.fromarray(rng.integers(0, 65536, (4, 3)).astype(np.uint16)).save(tmp_path / "w.png")
    for name in ("g.png", "a.png", "c.jpg", "w.png"):
        assert read_image_size(tmp_path / name) == read_image(tmp_path / name).shape[:2]
    (tmp_path / "corrupt.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="corrupt.png"):
        read_image_size(tmp_path / "corrupt.png")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        read_image_size(tmp_path / "missing.png")


def test_read_image_errors(tmp_path):
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ValueError, match="corrupt.jpg"):
        read_image(tmp_path / "corrupt.jpg")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        read_image(tmp_path / "missing.png")


def test_write_image_png_and_jpeg(tmp_path):
    image = np.zeros((8, 10, 3), dtype=np.uint8)
    image[:, 5:] = (10, 200, 90)
    write_image(tmp_path / "x.png", image)
    assert np.array_equal(read_image(tmp_path / "x.png"), image)
    write_image(tmp_path / "x.jpg", image)
    with Image.open(tmp_path / "x.jpg") as im:
        assert im.format == "JPEG"
    assert np.abs(read_image(tmp_path / "x.jpg").astype(int) - image).mean() < 8
    with pytest.raises(ValueError, match="suffix"):
        write_image(tmp_path / "x.bmp", image)
    with pytest.raises(ValueError, match="uint8"):
        write_image(tmp_path / "y.png", image.astype(np.float32))


def test_16_bit_grey_png_is_scaled_not_clipped(tmp_path):
    values = (np.arange(12).reshape(3, 4) * 5000).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    image = read_image(tmp_path / "deep.png")
    assert image.shape == (3, 4, 3)
    assert np.array_equal(image[..., 0], np.round(values / 257).astype(np.uint8))
    assert len(np.unique(image)) == 12  # not flattened to 255
