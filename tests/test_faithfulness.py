import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from attnmaps.metrics.faithfulness import (
    average_drop_increase,
    deletion_insertion_auc,
    deletion_insertion_curve,
    gaussian_blur,
    impute_linear,
    road,
)


def pixel_sum(images: torch.Tensor) -> torch.Tensor:
    return images.sum(dim=(1, 2, 3))


def recorder(store: list):
    def predict(images: torch.Tensor) -> torch.Tensor:
        store.append(images.clone())
        return pixel_sum(images)

    return predict


def random_batch(seed: int = 0, batch: int = 3, channels: int = 2, size: int = 8):
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, channels, size, size, generator=gen)
    maps = torch.rand(batch, size, size, generator=gen)
    return images, maps


def test_deletion_and_insertion_hand_example():
    images = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    maps = torch.tensor([[[0.1, 0.4], [0.3, 0.2]]])  # order: 2, 3, 4, 1
    fractions, scores = deletion_insertion_curve(pixel_sum, images, maps, 4, "zeros")
    assert fractions.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert scores.tolist() == [[10.0, 8.0, 5.0, 1.0, 0.0]]
    deletion = deletion_insertion_auc(pixel_sum, images, maps, 4, "zeros")
    insertion = deletion_insertion_auc(pixel_sum, images, maps, 4, "zeros", mode="insertion")
    assert deletion.item() == pytest.approx(0.25 * (9 + 6.5 + 3 + 0.5))
    assert insertion.item() == pytest.approx(0.25 * (1 + 3.5 + 7 + 9.5))
    tied = torch.ones(1, 2, 2)  # ties go to the lower index first
    assert deletion_insertion_curve(pixel_sum, images, tied, 4, "zeros")[1].tolist() == [
        [10.0, 9.0, 7.0, 4.0, 0.0]
    ]
    uneven = deletion_insertion_curve(pixel_sum, images, maps, 3, "zeros")[0]
    assert uneven.tolist() == [0.0, 0.25, 0.75, 1.0]  # k = round(4/3) = 1, round(8/3) = 3


def test_constant_score_gives_that_auc():
    images, maps = random_batch()

    def constant(x: torch.Tensor) -> torch.Tensor:
        return torch.full((x.shape[0],), 0.7)

    for mode in ("deletion", "insertion"):
        auc = deletion_insertion_auc(constant, images, maps, steps=7, mode=mode)
        assert torch.allclose(auc, torch.full((3,), 0.7, dtype=torch.float64))


def test_faithful_map_beats_random_map():
    gen = torch.Generator().manual_seed(5)
    weight = torch.rand(10, 10, generator=gen) ** 3
    images = 0.5 + 0.5 * torch.rand(3, 2, 10, 10, generator=gen)

    def weighted(x: torch.Tensor) -> torch.Tensor:
        return (x * weight).sum(dim=(1, 2, 3))

    random_map = torch.rand(3, 10, 10, generator=gen)
    blur_contribution = (weight * (images - gaussian_blur(images, 1.0))).sum(dim=1)
    for baseline, faithful in (("zeros", weight.expand(3, 10, 10)), ("blur", blur_contribution)):
        scores = {
            (name, mode): deletion_insertion_auc(
                weighted, images, maps, steps=10, baseline=baseline, mode=mode, blur_sigma=1.0
            )
            for name, maps in (("faithful", faithful), ("random", random_map))
            for mode in ("deletion", "insertion")
        }
        assert (scores["faithful", "deletion"] < scores["random", "deletion"]).all(), baseline
        assert (scores["faithful", "insertion"] > scores["random", "insertion"]).all(), baseline


def test_baseline_tensor_and_invalid_arguments():
    images, maps = random_batch()
    seen: list = []
    deletion_insertion_curve(recorder(seen), images, maps, 2, baseline=torch.tensor(7.0))
    assert torch.equal(seen[0], images) and (seen[-1] == 7).all()
    with pytest.raises(ValueError, match="baseline"):
        deletion_insertion_auc(pixel_sum, images, maps, baseline="noise")
    with pytest.raises(ValueError, match="broadcast"):
        deletion_insertion_auc(pixel_sum, images, maps, baseline=torch.zeros(5, 8, 8))
    with pytest.raises(ValueError, match="mode"):
        deletion_insertion_auc(pixel_sum, images, maps, mode="both")
    with pytest.raises(ValueError, match="maps"):
        deletion_insertion_auc(pixel_sum, images, maps[:, :4])
    with pytest.raises(ValueError, match="predict_fn"):
        deletion_insertion_auc(lambda x: x.sum(dim=(2, 3)), images, maps)


def test_gaussian_blur_matches_scipy():
    images, _ = random_batch(size=9)
    images = images.double()
    for sigma in (0.7, 1.5, 5.0):
        blurred = gaussian_blur(images, sigma)
        for got, image in zip(blurred.flatten(0, 1), images.flatten(0, 1)):
            expected = gaussian_filter(image.numpy(), sigma, mode="nearest", truncate=3.0)
            assert np.allclose(got.numpy(), expected, atol=1e-12), sigma


def test_batch_equals_per_image():
    images, maps = random_batch(seed=1)
    for mode in ("deletion", "insertion"):
        batched = deletion_insertion_auc(pixel_sum, images, maps, steps=5, mode=mode)
        single = torch.cat(
            [
                deletion_insertion_auc(pixel_sum, i[None], m[None], steps=5, mode=mode)
                for i, m in zip(images, maps)
            ]
        )
        assert torch.allclose(batched, single, rtol=1e-6)
    for order in ("morf", "lerf"):
        batched = road(pixel_sum, images, maps, (0.25, 0.6), order=order, noise_std=0.0)
        single = torch.cat(
            [
                road(pixel_sum, i[None], m[None], (0.25, 0.6), order=order, noise_std=0.0)
                for i, m in zip(images, maps)
            ]
        )
        assert torch.allclose(batched, single, rtol=1e-6)


def test_imputation_reproduces_a_linear_gradient():
    ys, xs = torch.meshgrid(torch.arange(12.0), torch.arange(11.0), indexing="ij")
    image = torch.stack([0.3 * xs - 0.2 * ys + 1.5, -1.1 * xs + 0.7 * ys - 2.0]).double()
    removed = torch.zeros(12, 11, dtype=torch.bool)
    removed[2:9, 3:8] = True
    removed[9, 1] = removed[5, 9] = True
    damaged = image.masked_fill(removed, 100.0)
    imputed = impute_linear(damaged, removed)
    assert torch.allclose(imputed, image, atol=1e-6, rtol=0)
    seen: list = []
    noise = torch.rand(1, 12, 11, generator=torch.Generator().manual_seed(0))
    maps = removed.double()[None] + 0.01 * noise  # removed pixels rank first
    road(recorder(seen), damaged[None], maps, (removed.sum().item() / 132,), noise_std=0.0)
    assert torch.allclose(seen[0][0], image, atol=1e-6, rtol=0)


def brute_force_imputation(image: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """Solve the dense weighted-mean equations pixel by pixel."""
    height, width = removed.shape
    unknowns = [(y, x) for y in range(height) for x in range(width) if removed[y, x]]
    index = {pixel: i for i, pixel in enumerate(unknowns)}
    system = np.zeros((len(unknowns), len(unknowns)))
    rhs = np.zeros((len(unknowns), image.shape[0]))
    for (y, x), row in index.items():
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                ny, nx = y + dy, x + dx
                if (dy, dx) == (0, 0) or not (0 <= ny < height and 0 <= nx < width):
                    continue
                weight = 1 / 12 if dy and dx else 1 / 6
                system[row, row] += weight
                if removed[ny, nx]:
                    system[row, index[ny, nx]] -= weight
                else:
                    rhs[row] += weight * image[:, ny, nx]
    result = image.copy()
    for (y, x), values in zip(unknowns, np.linalg.solve(system, rhs)):
        result[:, y, x] = values
    return result


def test_imputation_matches_dense_solution_including_borders():
    gen = torch.Generator().manual_seed(2)
    image = torch.rand(3, 6, 7, generator=gen, dtype=torch.float64)
    removed = torch.rand(6, 7, generator=gen) < 0.6
    removed[0, 0] = removed[5, 6] = True
    expected = brute_force_imputation(image.numpy(), removed.numpy())
    assert np.allclose(impute_linear(image, removed).numpy(), expected, atol=1e-10)
    assert torch.equal(impute_linear(image, torch.zeros(6, 7, dtype=torch.bool)), image)
    with pytest.raises(ValueError, match="every pixel"):
        impute_linear(image, torch.ones(6, 7, dtype=torch.bool))


def test_road_removes_the_right_pixels_and_adds_noise_only_there():
    images, maps = random_batch(seed=3, batch=2)
    for order, pick in (("morf", torch.topk), ("lerf", lambda v, k: torch.topk(-v, k))):
        seen: list = []
        scores = road(recorder(seen), images, maps, (0.0, 0.25), order=order, noise_std=1.0)
        assert scores.shape == (2, 2) and scores.dtype == torch.float64
        assert torch.equal(seen[0], images)
        assert torch.allclose(scores[:, 1], pixel_sum(seen[1]).double())
        changed = (seen[1] != images).any(dim=1).flatten(1)
        for index in range(2):
            expected = torch.zeros(64, dtype=torch.bool)
            expected[pick(maps[index].flatten(), 16).indices] = True
            assert torch.equal(changed[index], expected), order
    again = road(pixel_sum, images, maps, (0.25,), noise_std=1.0)
    assert torch.equal(again, road(pixel_sum, images, maps, (0.25,), noise_std=1.0))
    with pytest.raises(ValueError, match="fractions"):
        road(pixel_sum, images, maps, (1.0,))


def test_average_drop_and_increase_hand_example():
    images = torch.tensor([[[[1.0, 0.5]]], [[[0.5, 0.25]]]])
    maps = torch.tensor([[[0.3, 0.1]], [[0.0, 2.0]]])  # normalized: [1, 0] and [0, 1]

    def score(x: torch.Tensor) -> torch.Tensor:
        return 1 + x[:, 0, 0, 0] - x[:, 0, 0, 1]

    # Y = (1.5, 1.25); O = (2, 0.75): an increase, then a drop of 0.5 / 1.25 = 40 %
    result = average_drop_increase(score, images, maps)
    assert result["average_drop"] == pytest.approx(20.0)
    assert result["increase_in_confidence"] == pytest.approx(50.0)
    assert result["drop"].tolist() == pytest.approx([0.0, 40.0])
    with pytest.raises(ValueError, match="positive"):
        average_drop_increase(lambda x: score(x) - 2, images, maps)


def test_imputation_never_writes_into_its_input():
    """A float64 CPU input shares memory with its numpy view: it must come back unchanged."""
    torch.manual_seed(3)
    image = torch.rand(2, 6, 7, dtype=torch.float64)
    kept = image.clone()
    removed = torch.zeros(6, 7, dtype=torch.bool)
    removed[2:4, 3:5] = True
    impute_linear(image, removed)
    assert torch.equal(image, kept)
