"""The synthetic shapes set: deterministic, exact masks, class not given away by color."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from attnmaps.data.synthetic import (
    CLASS_NAMES,
    HUE_JITTER,
    MAX_COLORS,
    SHAPE_NAMES,
    render_sample,
    write_synthetic_voc,
)
from attnmaps.data.voc import VOCDataset


def test_same_seed_same_image_other_seed_other_image() -> None:
    a_image, a_mask = render_sample(seed=4, index=7)
    b_image, b_mask = render_sample(seed=4, index=7)
    c_image, _ = render_sample(seed=5, index=7)
    assert np.array_equal(a_image, b_image) and np.array_equal(a_mask, b_mask)
    assert not np.array_equal(a_image, c_image)


def test_masks_hold_one_to_three_known_shapes_on_background() -> None:
    counts = []
    for index in range(200):
        image, mask = render_sample(seed=0, index=index, size=(48, 64))
        assert image.shape == (48, 64, 3) and mask.shape == (48, 64)
        values = set(np.unique(mask).tolist())
        assert values <= set(range(len(CLASS_NAMES))) and 0 in values
        counts.append(len(values) - 1)
    assert min(counts) >= 1 and max(counts) <= 3
    assert {1, 2, 3} <= set(counts)


def test_shape_geometry_matches_its_name() -> None:
    # A filled disc covers ~pi/4 of its bounding box, a square (at any rotation) ~1/2 to 1.
    from attnmaps.data.synthetic import shape_mask

    yy, xx = np.mgrid[-40:40, -40:40].astype(np.float32) + 0.5
    circle = shape_mask("circle", yy, xx, radius=30.0, angle=0.3)
    assert abs(circle.sum() - np.pi * 30**2) / (np.pi * 30**2) < 0.01
    square = shape_mask("square", yy, xx, radius=30.0, angle=0.0)
    assert square.sum() == (2 * 24) ** 2
    triangle = shape_mask("triangle", yy, xx, radius=30.0, angle=0.0)
    assert abs(triangle.sum() - 3 * np.sqrt(3) / 4 * 30**2) / (3 * np.sqrt(3) / 4 * 30**2) < 0.02


def test_color_does_not_give_the_class_away() -> None:
    means = {c: [] for c in range(1, len(SHAPE_NAMES) + 1)}
    for index in range(300):
        image, mask = render_sample(seed=1, index=index)
        for c, colors in means.items():
            if (mask == c).sum() > 20:
                colors.append(image[mask == c].mean(0))
    centres = np.array([np.mean(v, 0) for v in means.values()])
    spread = np.mean([np.std(v, 0).mean() for v in means.values()])
    # Class mean colors differ far less than colors vary within a class.
    assert np.abs(centres - centres.mean(0)).max() < 0.25 * spread * 3


def test_written_voc_layout_reads_back(tmp_path) -> None:
    root = write_synthetic_voc(tmp_path / "s", num_train=5, num_val=3, size=(32, 32), seed=2)
    train = VOCDataset(root, "train")
    val = VOCDataset(root, "val")
    assert len(train) == 5 and len(val) == 3
    assert train.class_names == list(CLASS_NAMES)
    sample = val[0]
    _, mask = render_sample(2, 5, (32, 32))
    assert np.array_equal(sample["mask"].numpy(), mask)
    expected = np.zeros(len(SHAPE_NAMES), np.float32)
    expected[np.unique(mask[mask > 0]) - 1] = 1
    assert np.array_equal(sample["labels"].numpy(), expected)


def test_hue_color_matches_colorsys() -> None:
    import colorsys

    from attnmaps.data.synthetic import hue_color

    for hue in np.linspace(0.0, 0.95, 20):
        expected = colorsys.hsv_to_rgb(hue, 0.7, 0.8)
        assert np.allclose(hue_color(hue, 0.7, 0.8), expected, atol=1e-9)


def test_color_classes_combine_shape_and_hue() -> None:
    """With colors=n, value s*n+j+1 is shape s (same geometry as the shape-only set's class
    s+1 under the same draws would be) drawn in hue j: mean hue of its pixels near j/n."""
    import colorsys

    from attnmaps.data.synthetic import class_names

    colors = 6
    names = class_names(colors)
    assert len(names) == 1 + 4 * colors and names[1] == "circle_h000"
    assert names[colors + 2] == "square_h060"
    errors, seen = [], set()
    for index in range(120):
        image, mask = render_sample(seed=3, index=index, colors=colors)
        for value in np.unique(mask[mask > 0]):
            pixels = image[mask == value]
            if len(pixels) < 30:
                continue
            seen.add(int(value))
            hues = np.array([colorsys.rgb_to_hsv(*p)[0] for p in pixels / 255.0])
            target = ((value - 1) % colors) / colors
            diff = np.abs((hues - target + 0.5) % 1.0 - 0.5)
            errors.append(np.median(diff))
    assert len(seen) > 18 and max(errors) < 0.5 / colors


def test_shape_only_set_is_unchanged_by_the_color_option() -> None:
    """The demo's set is byte-identical to the one rendered before the color option existed
    (hash recorded from that version), so published demo numbers stay reproducible."""
    image, mask = render_sample(seed=2, index=9)
    digest = hashlib.sha256(image.tobytes() + mask.tobytes()).hexdigest()[:16]
    assert digest == "c27737a6085260dd"


def test_synth_command_writes_the_color_set(tmp_path) -> None:
    from attnmaps.cli import main
    from attnmaps.data.synthetic import class_names

    assert main(["synth", "--out", str(tmp_path / "s"), "--num-train", "2", "--num-val", "1",
                 "--size", "32", "--colors", "3"]) == 0
    assert (tmp_path / "s" / "classes.txt").read_text().split() == list(class_names(3))


def test_color_set_writes_its_class_list(tmp_path) -> None:
    from attnmaps.data.synthetic import class_names

    root = write_synthetic_voc(tmp_path / "c", num_train=3, num_val=2, size=(32, 32), colors=5)
    train = VOCDataset(root, "train")
    assert train.class_names == list(class_names(5)) and train[0]["labels"].shape == (20,)


@pytest.mark.parametrize("colors", [-1, MAX_COLORS + 1])
def test_out_of_range_colors_are_refused_before_anything_is_written(tmp_path, colors) -> None:
    with pytest.raises(ValueError, match=rf"colors={colors} must lie in 0\.\.{MAX_COLORS}"):
        write_synthetic_voc(tmp_path / "bad", num_train=1, num_val=1, colors=colors)
    assert not (tmp_path / "bad").exists()


def test_neighbouring_hues_cannot_overlap_at_the_largest_count() -> None:
    assert 1 / MAX_COLORS > 2 * HUE_JITTER
