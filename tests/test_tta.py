"""Multi-scale + flip TTA: scale rounding, un-flipping, per-area scaling, probability averaging,
and its use by evaluate()."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.testing import assert_close

from attnmaps.config import PseudoMaskConfig
from attnmaps.engine.evaluate import evaluate
from attnmaps.models.vit import ClassTokenViT
from attnmaps.pseudo.tta import mean_probability_logits, scaled_size, tta_predict

PATCH = 8


class PoolingModel:
    """Stand-in for ClassTokenViT.predict with maps known by hand: the channel mean pooled per
    patch and divided by the patch count (attention mass spread over the patches); logits
    [left-half mean - right-half mean, global mean]. Records the input sizes it sees."""

    patch_size = PATCH

    def __init__(self) -> None:
        self.sizes: list[tuple[int, ...]] = []

    def predict(self, x: Tensor, attn_blocks: object = "last",
                fused: bool = False) -> tuple[Tensor, Tensor]:
        assert not fused, "this stand-in has no patch head"
        self.sizes.append(tuple(x.shape))
        grey = x.mean(1, keepdim=True)
        pooled = F.avg_pool2d(grey, PATCH)
        maps = pooled / pooled[0, 0].numel()
        half = grey.shape[-1] // 2
        logits = torch.stack([grey[..., :half].mean((1, 2, 3)) - grey[..., half:].mean((1, 2, 3)),
                              grey.mean((1, 2, 3))], 1)
        return logits, maps


def tiny_model() -> ClassTokenViT:
    torch.manual_seed(0)
    return ClassTokenViT(num_classes=3, img_size=(32, 32), patch_size=PATCH, embed_dim=16,
                         depth=2, num_heads=2).eval()


@pytest.mark.parametrize(("size", "scale", "want"), [
    ((224, 224), 0.75, (176, 176)),  # 168 / 16 = 10.5 rounds up
    ((224, 320), 1.25, (288, 400)),
    ((32, 48), 1.0, (32, 48)),
    ((32, 32), 0.1, (16, 16)),  # at least one patch (patch 16)
    ((100, 60), 0.5, (48, 32)),  # 50 -> 48, 30 -> 32
])
def test_scaled_size_rounds_to_patch_multiples(size, scale, want):
    assert scaled_size(size, scale, 16) == want


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan")])
def test_scaled_size_rejects_non_positive_scales(scale):
    with pytest.raises(ValueError, match="positive"):
        scaled_size((32, 32), scale, 8)


def test_single_unflipped_pass_is_predict_exactly():
    model, x = tiny_model(), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model.predict(x, "last2")
        got = tta_predict(model, x, [1.0], False, "last2")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_flipped_pass_is_flipped_back():
    ramp = torch.linspace(0, 1, 32).expand(1, 3, 16, 32).clone()
    logits, maps = tta_predict(PoolingModel(), ramp, [1.0], flip=True)
    # Pooling commutes with mirroring, so the un-flipped map of the mirror image is the map.
    want = F.avg_pool2d(ramp.mean(1, keepdim=True), PATCH) / 8
    assert not torch.allclose(want, want.flip(-1))  # an un-flipped-back average would differ
    assert_close(maps, want)
    # sigmoid(a) and sigmoid(-a) average to 1/2: logit 0; the global mean is unchanged.
    assert_close(logits, torch.tensor([[0.0, ramp.mean().item()]]), atol=1e-6, rtol=1e-6)


def test_scales_resize_input_and_weigh_maps_per_patch_area():
    model = PoolingModel()
    x = torch.full((2, 3, 32, 32), 0.7)
    logits, maps = tta_predict(model, x, (0.5, 0.75, 1.25), flip=True)
    assert model.sizes == [(4, 3, 16, 16), (4, 3, 24, 24), (4, 3, 40, 40)]
    # Each pass's maps are 0.7 / n_pass; times n_pass / 16 they are 0.7 / 16 everywhere.
    assert_close(maps, torch.full((2, 1, 4, 4), 0.7 / 16))
    assert_close(logits, torch.tensor([[0.0, 0.7]] * 2), atol=1e-6, rtol=1e-6)


def test_multi_scale_real_model_shapes():
    model = tiny_model()
    with torch.no_grad():
        logits, maps = tta_predict(model, torch.randn(2, 3, 32, 40), (0.75, 1.0, 1.25), True)
    assert logits.shape == (2, 3) and maps.shape == (2, 3, 4, 5)
    assert torch.isfinite(logits).all() and torch.isfinite(maps).all()


def test_mean_probability_logits():
    logits = torch.tensor([[[2.0, -1.0, 100.0, 100.0]], [[0.5, 3.0, -100.0, 100.0]]])
    got = mean_probability_logits(logits)
    assert_close(got.sigmoid(), logits.sigmoid().mean(0))
    assert_close(got[0, 2:], torch.tensor([0.0, 100.0]))  # finite where sigmoid rounds to 0/1


def test_evaluate_uses_tta_maps():
    model = tiny_model()
    torch.manual_seed(1)
    samples = [{"image": torch.randn(3, 32, 32), "labels": torch.tensor([1.0, 0.0, 1.0]),
                "mask": torch.randint(0, 4, (32, 32)), "has_mask": True, "id": str(i)}
               for i in range(3)]
    seen: list[tuple[Tensor, Tensor]] = []
    settings = PseudoMaskConfig(tta_scales=[0.75, 1.25], tta_flip=True)
    evaluate(model, samples, settings, batch_size=3,
             on_batch=lambda batch, probs, maps, masks: seen.append((probs, maps)))
    images = torch.stack([s["image"] for s in samples])
    with torch.no_grad():
        logits, maps = tta_predict(model, images, [0.75, 1.25], True)
    assert_close(seen[0][0], logits.sigmoid())
    assert_close(seen[0][1], maps)


def test_evaluate_uses_fused_maps_when_configured():
    torch.manual_seed(0)
    model = ClassTokenViT(3, img_size=(32, 32), patch_size=8, embed_dim=16, depth=2,
                          num_heads=2, patch_head=True).eval()
    samples = [{"image": torch.randn(3, 32, 32), "labels": torch.tensor([1.0, 0.0, 1.0]),
                "mask": torch.randint(0, 4, (32, 32)), "has_mask": True, "id": str(i)}
               for i in range(2)]
    seen: list[Tensor] = []
    evaluate(model, samples, PseudoMaskConfig(maps="fused"), batch_size=2,
             on_batch=lambda batch, probs, maps, masks: seen.append(maps))
    with torch.no_grad():
        _, fused = model.predict(torch.stack([s["image"] for s in samples]), "last", fused=True)
    assert_close(seen[0], fused)
