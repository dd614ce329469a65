"""Fuzzing the readers of untrusted input: image and mask files of random bytes, modes, sizes
and values, and random config overrides. Each must give a valid result or the project's own
error type (DataError / ConfigError), never another exception."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from attnmaps.config import load_config
from attnmaps.data.image_io import read_image, read_mask
from attnmaps.errors import ConfigError, DataError

FUZZ = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
MODES = {"L": np.uint8, "P": np.uint8, "RGB": np.uint8, "RGBA": np.uint8, "LA": np.uint8,
         "I;16": np.uint16, "I": np.int32, "F": np.float32, "1": bool}


def _read(data: bytes, suffix: str, reader) -> np.ndarray | None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"x{suffix}"
        path.write_bytes(data)
        try:
            return reader(path)
        except DataError as error:
            assert str(path) in str(error)
            return None


def _encoded(mode: str, height: int, width: int, seed: int, fmt: str) -> bytes:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "LA": 2}.get(mode)
    shape = (height, width) if channels is None else (height, width, channels)
    dtype = MODES[mode]
    if dtype is bool:
        values = rng.integers(0, 2, shape).astype(bool)
    elif np.issubdtype(dtype, np.floating):
        values = rng.normal(size=shape).astype(dtype)
    else:
        info = np.iinfo(dtype)
        values = rng.integers(max(info.min, -70000), min(info.max, 70000), shape).astype(dtype)
    image = Image.fromarray(values, mode=None if mode in ("P", "LA", "1") else mode)
    if mode in ("P", "LA", "1"):
        image = image.convert(mode) if mode != "P" else Image.fromarray(values).convert("P")
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@FUZZ
@given(st.binary(max_size=400), st.sampled_from([".png", ".jpg", ".tif"]))
def test_random_bytes_give_an_image_or_a_data_error(data: bytes, suffix: str) -> None:
    for reader in (read_image, read_mask):
        result = _read(data, suffix, reader)
        assert result is None or result.dtype == np.uint8


@FUZZ
@given(st.sampled_from(sorted(MODES)), st.integers(1, 40), st.integers(1, 40),
       st.integers(0, 2**16), st.sampled_from(["PNG", "TIFF"]), st.integers(0, 60))
def test_random_images_give_a_valid_sample_or_a_data_error(mode, height, width, seed, fmt,
                                                           cut) -> None:
    try:
        data = _encoded(mode, height, width, seed, fmt)
    except (OSError, KeyError, TypeError, ValueError):  # PIL cannot write this mode/format
        return
    if cut:  # a truncated file
        data = data[:max(len(data) - cut, 1)]
    suffix = ".png" if fmt == "PNG" else ".tif"
    image = _read(data, suffix, read_image)
    if image is not None:
        assert image.shape == (height, width, 3) and image.dtype == np.uint8
    mask = _read(data, suffix, read_mask)
    if mask is not None:
        assert mask.shape == (height, width) and mask.dtype == np.uint8


KEYS = ["train.lr", "train.epochs", "model.patch_size", "pseudo.threshold", "data.mean",
        "train.betas", "model.stem", "train.device", "model.img_size", "nope", "train",
        "pseudo.tta_scales", "data.crop_scale", "train.grad_clip"]


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(KEYS) | st.text(max_size=12),
                          st.text(max_size=16) | st.sampled_from(
                              ["1", "-1", "0", "1e9", ".nan", "[1,2]", "null", "true",
                               "auto", "[0.5,0.5,0.5]", "{a: 1}", "'x'"])),
                max_size=4))
def test_random_overrides_give_a_config_or_a_config_error(pairs) -> None:
    try:
        cfg = load_config(None, [f"{key}={value}" for key, value in pairs])
    except ConfigError:
        return
    assert cfg.train.lr > 0 and cfg.train.epochs >= 1 and 0 <= cfg.pseudo.threshold <= 1
