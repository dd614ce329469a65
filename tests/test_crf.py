"""Dense-CRF refinement: unary probabilities of pseudo masks (by hand), the optional-extra error,
and (with pydensecrf2 installed) recovery of a clean two-region image from noisy unaries."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from attnmaps.config import PseudoMaskConfig
from attnmaps.conventions import min_max_normalize
from attnmaps.engine.evaluate import evaluate
from attnmaps.models.vit import ClassTokenViT
from attnmaps.pseudo.crf import (
    CRFParams,
    crf_params,
    crf_pseudo_masks,
    crf_refine,
    images_to_uint8_range,
    pseudo_mask_probs,
)
from attnmaps.pseudo.masks import make_pseudo_masks, select_classes, upsample_maps

HEIGHT, WIDTH = 24, 32


def two_regions(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A blue left half and a red right half, its labels, and noisy two-label probabilities
    whose argmax gets about a quarter of the pixels wrong."""
    truth = np.zeros((HEIGHT, WIDTH), np.int64)
    truth[:, WIDTH // 2:] = 1
    image = np.where(truth[..., None] == 1, [200, 40, 40], [30, 60, 200]).astype(np.uint8)
    rng = np.random.default_rng(seed)
    right = (np.where(truth == 1, 0.65, 0.35) + rng.normal(0, 0.25, truth.shape)).clip(0.01, 0.99)
    return image, truth, np.stack([1 - right, right])


def test_pseudo_mask_probs_by_hand():
    maps = torch.tensor([[[[0.1, 0.5, 0.9, 0.5]], [[0.2, 0.8, 0.0, 0.8]]]])  # [1,2,1,4]
    # Pixel 3: class 0 won the merge (higher image probability) though class 1's map is higher.
    masks = torch.tensor([[[0, 2, 1, 1]]])
    probs = pseudo_mask_probs(maps, torch.tensor([[True, True]]), masks, 0.3, True)
    want = torch.tensor([[0.3, 0.1, 0.2], [0.3, 0.5, 0.8], [0.3, 0.9, 0.0], [0.3, 0.8, 0.8]])
    want = want / want.sum(1, keepdim=True)
    assert_close(probs[0, :, 0].T, want)


def test_pseudo_mask_probs_unselected_and_empty_pixels():
    maps = torch.tensor([[[[0.0, 0.6]], [[0.0, 0.9]]]])
    probs = pseudo_mask_probs(maps, torch.tensor([[True, False]]), torch.tensor([[[0, 0]]]), 0.3,
                              has_background=False)
    assert_close(probs[0, :, 0].T, torch.tensor([[0.5, 0.5], [1.0, 0.0]]))


def test_missing_extra_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydensecrf", None)
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    image, _, probs = two_regions()
    with pytest.raises(ImportError, match=r'pip install "attnmaps\[crf\]"'):
        crf_refine(image, probs)


def test_images_to_uint8_range_undoes_normalization():
    colors = torch.tensor([[[[0.0, 255.0]], [[51.0, 102.0]], [[128.0, 300.0]]]])
    mean, std = torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.2, 0.25, 0.5])
    images = (colors / 255 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    got = images_to_uint8_range(images, mean, std)
    assert got.shape == (1, 1, 2, 3)
    np.testing.assert_allclose(got[0, 0], [[0, 51, 128], [255, 102, 255]], atol=1e-3)


def tiny_model() -> ClassTokenViT:
    torch.manual_seed(0)
    return ClassTokenViT(num_classes=3, img_size=(32, 32), patch_size=8, embed_dim=16,
                         depth=2, num_heads=2).eval()


def samples(count: int = 2) -> list[dict]:
    torch.manual_seed(1)
    return [{"image": torch.randn(3, 32, 32), "labels": torch.tensor([1.0, 0.0, 1.0]),
             "mask": torch.randint(0, 4, (32, 32)), "has_mask": True, "id": str(i)}
            for i in range(count)]


class NormalizedSet(list):
    """A list of samples with the per-channel statistics they were normalized with."""

    mean = torch.tensor([0.5, 0.5, 0.5])
    std = torch.tensor([0.25, 0.25, 0.25])


def test_evaluate_crf_needs_the_dataset_statistics():
    with pytest.raises(ValueError, match="pseudo.crf"):
        evaluate(tiny_model(), samples(), PseudoMaskConfig(crf=True))


def test_crf_recovers_two_regions_from_noisy_unaries():
    pytest.importorskip("pydensecrf.densecrf", reason="needs the crf extra (pydensecrf2)")
    image, truth, probs = two_regions()
    assert (probs.argmax(0) != truth).mean() > 0.15
    assert np.array_equal(crf_refine(image, probs), truth)


def test_crf_refine_equals_the_2d_crf_of_psa():
    """The any-channel kernels of crf_refine equal DenseCRF2D's RGB ones, as PSA calls them."""
    dcrf = pytest.importorskip("pydensecrf.densecrf", reason="needs the crf extra (pydensecrf2)")
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    probs = rng.dirichlet(np.ones(4), (HEIGHT, WIDTH)).transpose(2, 0, 1)
    crf = dcrf.DenseCRF2D(WIDTH, HEIGHT, 4)
    crf.setUnaryEnergy(np.ascontiguousarray(-np.log(probs).reshape(4, -1), dtype=np.float32))
    crf.addPairwiseGaussian(sxy=3, compat=3)
    crf.addPairwiseBilateral(sxy=80, srgb=13, rgbim=image, compat=10)
    want = np.asarray(crf.inference(5)).reshape(4, HEIGHT, WIDTH).argmax(0)
    got = crf_refine(image, probs, CRFParams(iterations=5))
    assert (want != probs.argmax(0)).any()
    assert np.array_equal(got, want)


@pytest.mark.parametrize("backend", ["torch", "pydensecrf"])
def test_crf_pseudo_masks_use_only_the_selected_labels(backend):
    if backend == "pydensecrf":
        pytest.importorskip("pydensecrf.densecrf", reason="needs the crf extra (pydensecrf2)")
    image, truth, probs = two_regions()
    maps = torch.zeros(1, 3, HEIGHT, WIDTH)
    maps[0, 2] = torch.from_numpy(probs[1]).float()  # class 2 (label 3) on the right, noisy
    maps[0, 0] = 1.0  # an unselected class with a high map must not appear
    selected = torch.tensor([[False, False, True]])
    masks = torch.where(maps[:, 2] >= 0.5, 3, 0)
    refined = crf_pseudo_masks(torch.from_numpy(image[None]).float(), maps, selected, masks, 0.5,
                               has_background=True, backend=backend)
    assert torch.equal(refined[0], torch.from_numpy(truth) * 3)


def test_evaluate_applies_crf_to_the_pseudo_masks():
    model, data = tiny_model(), NormalizedSet(samples())
    seen = []
    evaluate(model, data, PseudoMaskConfig(crf=True, threshold=0.4),
             on_batch=lambda batch, probs, maps, masks: seen.append(masks))
    images = torch.stack([s["image"] for s in data])
    with torch.no_grad():
        logits, maps = model.predict(images)
    probs = logits.sigmoid()
    full = upsample_maps(maps, (32, 32))
    plain = make_pseudo_masks(full, probs, (32, 32), threshold=0.4, has_background=True)
    want = crf_pseudo_masks(images_to_uint8_range(images, data.mean, data.std),
                            min_max_normalize(full), select_classes(probs), plain, 0.4, True)
    assert not torch.equal(want, plain)  # the CRF changed something, so the check has teeth
    assert torch.equal(seen[0], want)


def test_crf_parameters_come_from_the_config_and_are_checked():
    settings = PseudoMaskConfig(crf_iterations=3, crf_bilateral_srgb=5.0,
                                crf_bilateral_downsample=1)
    assert crf_params(settings) == CRFParams(iterations=3, bilateral_srgb=5.0,
                                             bilateral_downsample=1)
    assert crf_params(PseudoMaskConfig()) == CRFParams()  # every default from CRFParams
    with pytest.raises(ValueError, match="pseudo.crf_bilateral_srgb"):
        crf_params(PseudoMaskConfig(crf_bilateral_srgb=0.0))
    with pytest.raises(ValueError, match="pseudo.crf_backend"):
        crf_pseudo_masks(torch.zeros(1, 2, 2, 3), torch.zeros(1, 1, 2, 2),
                         torch.tensor([[True]]), torch.zeros(1, 2, 2, dtype=torch.long), 0.5,
                         True, backend="cython")
