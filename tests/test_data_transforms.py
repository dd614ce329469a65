import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance

from attnmaps.data.image_io import write_image, write_mask
from attnmaps.data.transforms import (
    Augment,
    adjust_color,
    affine_image,
    affine_mask,
    random_crop_box,
    resize_image,
    resize_mask,
)
from attnmaps.data.voc import VOCDataset


def affine_pair(image: np.ndarray, mask: np.ndarray, degrees: float = 0.0,
                scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    return affine_image(image, degrees, scale), affine_mask(mask, degrees, scale)


def _stripes(size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Channel 0 = vertical stripes, channel 1 = horizontal stripes (period 8), channel 2 = 0;
    the mask encodes both: 1 + stripe_x + 2 * stripe_y."""
    yy, xx = np.mgrid[0:size, 0:size]
    sx, sy = (xx // 4) % 2, (yy // 4) % 2
    image = np.stack([255 * sx, 255 * sy, np.zeros_like(sx)], axis=-1).astype(np.uint8)
    return image, (1 + sx + 2 * sy).astype(np.uint8)


def _check_aligned(image: np.ndarray, mask: np.ndarray) -> int:
    """Assert the mask equals the thresholded stripe channels away from 50% blends; returns the
    number of pixels checked. Bilinear upsampling of a stripe thresholds to the nearest sample."""
    x, y = image[..., 0] / 255.0, image[..., 1] / 255.0
    clear = (np.abs(x - 0.5) > 0.1) & (np.abs(y - 0.5) > 0.1)
    expected = 1 + (x > 0.5) + 2 * (y > 0.5)
    assert np.array_equal(mask[clear], expected[clear])
    return int(clear.sum())


def test_resize_image_per_channel_matches_pil():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(13, 17, 3), dtype=np.uint8)
    out = resize_image(rgb, (7, 9))
    assert out.dtype == np.uint8 and out.shape == (7, 9, 3)
    assert np.array_equal(out, np.asarray(Image.fromarray(rgb).resize((9, 7),
                                                                      Image.Resampling.BILINEAR)))
    bands = rng.uniform(0, 5000, size=(13, 17, 5)).astype(np.uint16)
    out = resize_image(bands, (20, 30))
    assert out.dtype == np.float32 and out.shape == (20, 30, 5)
    band3 = Image.fromarray(bands[..., 3].astype(np.float32)).resize((30, 20),
                                                                     Image.Resampling.BILINEAR)
    assert np.array_equal(out[..., 3], np.asarray(band3))
    assert resize_image(bands, None) is bands
    mask = np.kron(np.arange(6, dtype=np.uint8).reshape(2, 3), np.ones((3, 3), np.uint8))
    assert np.array_equal(resize_mask(mask, (2, 3)), np.arange(6).reshape(2, 3))


def test_random_crop_box_area_ratio_and_bounds():
    torch.manual_seed(0)
    for _ in range(200):
        top, left, h, w = random_crop_box(40, 60, (0.25, 0.5))
        assert 0 <= top and top + h <= 40 and 0 <= left and left + w <= 60
        assert 0.2 <= h * w / 2400 <= 0.55 and 0.6 <= w / h <= 1.45
    # no crop with aspect ratio in [3/4, 4/3] covers 90% of a 1x100 image: whole image
    assert random_crop_box(1, 100, (0.9, 1.0)) == (0, 0, 1, 100)


def test_crop_resize_flip_keep_image_and_mask_aligned():
    image, mask = _stripes()
    augment = Augment(size=(32, 32), crop_scale=(0.3, 0.6), hflip=True)
    torch.manual_seed(0)
    outputs = []
    for _ in range(20):
        out_image, out_mask = augment(image, mask)
        assert out_image.shape == (32, 32, 3) and out_mask.shape == (32, 32)
        assert _check_aligned(out_image, out_mask) > 32 * 32 // 2
        outputs.append(out_mask)
    assert len({m.tobytes() for m in outputs}) == 20  # every draw is a different crop


def test_flip_alone_flips_both():
    image, mask = _stripes(16)
    augment = Augment(hflip=True)
    torch.manual_seed(1)
    seen = set()
    for _ in range(20):
        out_image, out_mask = augment(image, mask)
        flipped = not np.array_equal(out_mask, mask)
        reference = (image[:, ::-1], mask[:, ::-1]) if flipped else (image, mask)
        assert np.array_equal(out_image, reference[0]) and np.array_equal(out_mask, reference[1])
        seen.add(flipped)
    assert seen == {True, False}


def test_rotation():
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, size=(6, 6, 4), dtype=np.uint8)
    mask = rng.integers(0, 5, size=(6, 6), dtype=np.uint8)
    out_image, out_mask = affine_pair(image, mask, 90)
    assert np.array_equal(out_image, np.rot90(image)) and np.array_equal(out_mask, np.rot90(mask))
    out_image, out_mask = affine_pair(image.astype(np.float32), mask, 45)
    assert out_mask[0, 0] == 255 and out_image[0, 0].tolist() == [0, 0, 0, 0]
    assert out_mask[3, 3] != 255

    yy, xx = np.mgrid[0:32, 0:32]
    disk = ((yy - 12) ** 2 + (xx - 18) ** 2 < 40).astype(np.uint8)
    blob = np.repeat(255 * disk[..., None], 3, axis=-1).astype(np.uint8)
    torch.manual_seed(0)
    masks = []
    for _ in range(5):
        out_image, out_mask = Augment(rotate=60.0)(blob, disk)
        inside = out_mask != 255
        agree = (out_image[..., 0] > 127) == (out_mask == 1)
        assert agree[inside].mean() > 0.97 and (out_image[~inside] == 0).all()
        masks.append(out_mask)
    assert len({m.tobytes() for m in masks}) == 5 and any((m == 255).any() for m in masks)


def test_zoom_about_the_centre():
    mask = np.arange(64, dtype=np.uint8).reshape(8, 8)
    image = np.full((8, 8, 3), 200, dtype=np.uint8)
    _, enlarged = affine_pair(image, mask, scale=2.0)  # the central 4x4, each pixel twice
    assert np.array_equal(enlarged, mask[2:6, 2:6].repeat(2, 0).repeat(2, 1))
    out_image, shrunk = affine_pair(image, mask, scale=0.5)  # every second pixel, void around
    expected = np.full((8, 8), 255, dtype=np.uint8)
    expected[2:6, 2:6] = mask[1::2, 1::2]
    assert np.array_equal(shrunk, expected)
    assert (out_image[shrunk == 255] == 0).all() and (out_image[3:5, 3:5] == 200).all()
    torch.manual_seed(0)
    scales = set()
    for _ in range(4):
        _, zoomed = Augment(zoom=(0.5, 0.9))(image, mask)
        scales.add(int((zoomed != 255).sum()))
        assert (zoomed[0] == 255).all()  # shrunk by at least 0.9: the border is void
    assert len(scales) > 1


def test_adjust_color_matches_pil_enhance():
    rgb = np.random.default_rng(3).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    pil = Image.fromarray(rgb)
    for enhancer, factor in ((ImageEnhance.Brightness, 1.3), (ImageEnhance.Contrast, 0.6),
                             (ImageEnhance.Color, 1.4)):
        pil = enhancer(pil).enhance(factor)
    tensor = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    ours = adjust_color(tensor, 1.3, 0.6, 1.4).permute(1, 2, 0).numpy()
    assert np.abs(ours - np.asarray(pil) / 255).max() < 3 / 255


def test_photometric_only_for_rgb():
    image = torch.rand(3, 5, 5)
    assert torch.equal(Augment().photometric(image), image)
    torch.manual_seed(0)
    jittered = Augment(color_jitter=0.4).photometric(image)
    assert not torch.allclose(jittered, image) and 0 <= jittered.min() <= jittered.max() <= 1
    with pytest.raises(ValueError, match=r"color_jitter applies to RGB images only.*13 channels"):
        Augment(color_jitter=0.4).photometric(torch.rand(13, 5, 5))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"crop_scale": (0.6, 0.3)}, r"data\.crop_scale must be \[low, high\].*\(0\.6, 0\.3\)"),
    ({"crop_scale": (0.0, 1.0)}, r"data\.crop_scale"),
    ({"rotate": 200.0}, r"data\.rotate must be .*\[0, 180\].*200"),
    ({"zoom": (1.2, 0.8)}, r"data\.zoom must be \[low, high\].*\(1\.2, 0\.8\)"),
    ({"zoom": (0.0, 1.0)}, r"data\.zoom"),
    ({"color_jitter": 1.0}, r"data\.color_jitter must be in \[0, 1\)"),
    ({"size": (4,)}, r"image_size must be \(H, W\)"),
])
def test_invalid_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Augment(**kwargs)


def test_dataset_augmentation_keeps_alignment(tmp_path):
    image, mask = _stripes()
    (tmp_path / "JPEGImages").mkdir()
    (tmp_path / "SegmentationClass").mkdir()
    (tmp_path / "ImageSets" / "Segmentation").mkdir(parents=True)
    (tmp_path / "ImageSets" / "Segmentation" / "train.txt").write_text("s\n")
    (tmp_path / "classes.txt").write_text("bg\na\nb\nc\nd\n")
    write_image(tmp_path / "JPEGImages" / "s.png", image)
    write_mask(tmp_path / "SegmentationClass" / "s.png", mask)
    ds = VOCDataset(tmp_path, image_size=(24, 24), mean=(0, 0, 0), std=(1, 1, 1), hflip=True,
                    crop_scale=(0.4, 0.7))
    evaluation = VOCDataset(tmp_path, image_size=(24, 24), mean=(0, 0, 0), std=(1, 1, 1))
    torch.manual_seed(0)
    for _ in range(10):
        sample = ds[0]
        pixels = (sample["image"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        assert _check_aligned(pixels, sample["mask"].numpy()) > 24 * 24 // 2
    assert torch.equal(evaluation[0]["image"], evaluation[0]["image"])
    assert torch.equal(evaluation[0]["mask"], torch.tensor(resize_mask(mask, (24, 24))).long())


def curriculum_config(tmp_path, *overrides: str):
    """A 3-epoch run of a tiny conv-stem ViT on 16 written 32x32 images (batches of 8)."""
    from attnmaps.config import load_config
    from attnmaps.data.synthetic import write_synthetic_voc

    root = write_synthetic_voc(tmp_path / "data", num_train=16, num_val=4, size=(32, 32), seed=2)
    return load_config(None, ["model.img_size=32,32", "model.patch_size=8", "model.embed_dim=16",
                              "model.depth=1", "model.num_heads=2", "model.stem=conv",
                              "train.batch_size=8", "train.epochs=3", *overrides,
                              f"data.root={root}", f"out_dir={tmp_path / 'run'}"])


def test_rotation_and_zoom_start_at_their_epochs(tmp_path, monkeypatch):
    from attnmaps.config import load_config
    from attnmaps.data import transforms
    from attnmaps.engine.train import train

    cfg = curriculum_config(tmp_path, "data.rotate=10", "data.rotate_start_epoch=2",
                            "data.zoom=0.8,0.9", "data.zoom_start_epoch=1")
    calls: list[tuple[float, float]] = []
    original = transforms.affine_mask

    def recording(mask, degrees, scale):
        calls.append((degrees, scale))
        return original(mask, degrees, scale)

    monkeypatch.setattr(transforms, "affine_mask", recording)
    per_epoch: list[int] = []
    train(cfg, on_epoch=lambda epoch, metrics: per_epoch.append(len(calls)))
    assert per_epoch == [0, 16, 32]  # epoch 0 untouched, every image of epochs 1 and 2 zoomed
    assert all(d == 0 and 0.8 <= s <= 0.9 for d, s in calls[:16])  # zoom alone in epoch 1
    angles = [d for d, _ in calls[16:]]
    assert all(abs(a) <= 10 for a in angles) and len(set(angles)) > 1
    for key in ("rotate_start_epoch", "zoom_start_epoch"):
        with pytest.raises(ValueError, match=f"data.{key}.*persistent_workers"):
            load_config(None, [f"data.{key}=2", "data.persistent_workers=true"])


def test_early_size_trains_on_smaller_images_first(tmp_path):
    from torch import nn

    from attnmaps.config import load_config
    from attnmaps.engine.train import train
    from attnmaps.models.vit import ConvStemPatchEmbed

    cfg = curriculum_config(tmp_path, "data.zoom=0.8,0.9", "data.early_size=16,24",
                            "data.early_size_epochs=2")
    seen: list[tuple[bool, tuple[int, ...]]] = []

    def record(module, inputs):
        if isinstance(module, ConvStemPatchEmbed):
            seen.append((module.training, tuple(inputs[0].shape[-2:])))

    per_epoch: list[list] = []
    hook = nn.modules.module.register_module_forward_pre_hook(record)
    try:
        train(cfg, on_epoch=lambda epoch, metrics: per_epoch.append(list(seen)) or seen.clear())
    finally:
        hook.remove()
    training = [[size for is_training, size in epoch if is_training] for epoch in per_epoch]
    assert training == [[(16, 24)] * 2, [(16, 24)] * 2, [(32, 32)] * 2]  # two batches an epoch
    evaluated = {size for epoch in per_epoch for is_training, size in epoch if not is_training}
    assert evaluated == {(32, 32)}  # evaluation always at the full size
    with pytest.raises(ValueError, match="'data.early_size_epochs' is 2 but 'data.early_size'"):
        load_config(None, ["data.early_size_epochs=2"])
    assert load_config(None, ["data.early_size=16,16"]).data.early_size_epochs == 0  # off
    with pytest.raises(ValueError, match="multiples of model.patch_size=8"):
        load_config(None, ["model.patch_size=8", "data.early_size=20,32",
                           "data.early_size_epochs=2"])
    with pytest.raises(ValueError, match="data.early_size_epochs.*persistent_workers"):
        load_config(None, ["data.early_size=32,32", "data.early_size_epochs=2",
                           "data.persistent_workers=true"])


def test_set_geometry_reaches_a_wrapped_dataset():
    from attnmaps.data.transforms import Augment, set_geometry

    class Inner:
        augment = Augment(rotate=10.0)

    class Wrapper:
        dataset = Inner()

    assert set_geometry(Wrapper(), 0.0, [0.8, 1.2])
    assert Inner.augment.rotate == 0.0 and Inner.augment.zoom == (0.8, 1.2)
    assert set_geometry(Wrapper(), 5.0, None) and Inner.augment.zoom is None
    assert not set_geometry(object(), 5.0, None)


def test_set_geometry_sets_the_early_size_and_restores_the_constructed_one():
    from attnmaps.data.transforms import Augment, set_geometry

    class Data:
        augment = Augment(size=(40, 40))

    image, mask = np.zeros((32, 32, 3), np.float32), np.zeros((32, 32), np.uint8)
    assert set_geometry(Data(), 0.0, None, [24, 16]) and Data.augment.size == (24, 16)
    assert [a.shape for a in Data.augment(image, mask)] == [(24, 16, 3), (24, 16)]
    assert set_geometry(Data(), 0.0, None)  # no early size: back to the constructed (40, 40)
    assert [a.shape for a in Data.augment(image, mask)] == [(40, 40, 3), (40, 40)]
