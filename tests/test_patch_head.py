"""The auxiliary patch head: max-pooled patch logits, its loss term, its prior bias, its config."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnmaps.config import ModelConfig, TrainConfig
from attnmaps.engine.label_prior import init_head_bias, prior_logits
from attnmaps.engine.objective import WSSSObjective
from attnmaps.models.factory import create_model
from attnmaps.models.vit import ClassTokenViT


def model_with_patch_head(**overrides) -> ClassTokenViT:
    torch.manual_seed(0)
    options = {"img_size": (16, 16), "patch_size": 4, "embed_dim": 16, "depth": 2,
               "num_heads": 2, "head": "per_token", "mask_rate": 0.0, "patch_head": True}
    options.update(overrides)
    return ClassTokenViT(3, **options)


def test_patch_logits_are_the_per_class_maximum_over_patches() -> None:
    model = model_with_patch_head().eval()
    patch = torch.randn(2, 5, 16)
    scores = patch @ model.patch_head.weight.T + model.patch_head.bias
    expected = torch.tensor([[max(scores[b, :, c].tolist()) for c in range(3)] for b in range(2)])
    torch.testing.assert_close(model.patch_logits(patch), expected)


def test_patch_logits_need_the_head() -> None:
    with pytest.raises(ValueError, match="model.patch_head=true"):
        model_with_patch_head(patch_head=False).patch_logits(torch.randn(1, 4, 16))


def test_objective_adds_the_weighted_patch_bce() -> None:
    model = model_with_patch_head().eval()
    images = torch.randn(2, 3, 16, 16)
    labels = torch.tensor([[1.0, 0, 0], [0, 1.0, 1.0]])
    parts = WSSSObjective(TrainConfig(gate_lambda=0.5, patch_loss_weight=0.3), [1], True)(
        model, {"image": images, "labels": labels}, "cpu")
    out = model.forward_features(images)
    patch_scores = model.patch_head(out["patch"]).amax(1)
    patch_bce = F.binary_cross_entropy_with_logits(patch_scores, labels)
    bce = F.binary_cross_entropy_with_logits(model(images), labels)
    torch.testing.assert_close(parts["patch_bce"], patch_bce)
    torch.testing.assert_close(parts["loss"], bce + 0.5 * model.l0_penalty() + 0.3 * patch_bce)
    parts["loss"].backward()
    assert model.patch_head.weight.grad.abs().sum() > 0


def test_objective_without_patch_head_has_no_patch_term() -> None:
    model = model_with_patch_head(patch_head=False)
    parts = WSSSObjective(TrainConfig(), [1], True)(
        model, {"image": torch.randn(1, 3, 16, 16), "labels": torch.tensor([[1.0, 0, 0]])}, "cpu")
    assert "patch_bce" not in parts


def test_prior_bias_covers_the_patch_head() -> None:
    model = model_with_patch_head()
    freq = torch.tensor([0.2, 0.5, 0.1])
    init_head_bias(model, freq)
    torch.testing.assert_close(model.patch_head.bias.detach(), prior_logits(freq))
    torch.testing.assert_close(model.head_bias.detach(), prior_logits(freq))


def test_config_key_builds_the_head() -> None:
    cfg = ModelConfig(img_size=[16, 16], patch_size=4, embed_dim=16, depth=1, num_heads=2,
                      patch_head=True)
    assert create_model(cfg, 4).patch_head.out_features == 4
    assert create_model(ModelConfig(img_size=[16, 16], patch_size=4, embed_dim=16, depth=1,
                                    num_heads=2), 4).patch_head is None


def test_attention_pooled_logits_weight_patch_scores_by_each_class_map() -> None:
    model = model_with_patch_head().eval()
    patch = torch.randn(1, 4, 16)
    maps = torch.rand(1, 3, 2, 2)
    scores = patch[0] @ model.patch_head.weight.T + model.patch_head.bias
    expected = torch.tensor([[sum(maps[0, c].flatten()[j].item() * scores[j, c].item()
                                  for j in range(4)) / maps[0, c].sum().item()
                              for c in range(3)]])
    torch.testing.assert_close(model.attention_pooled_logits(patch, maps), expected)


def objective_run(blocks: str, **weights: float) -> tuple:
    """(model, parts, patch tokens, class maps of ``blocks``, labels) for one two-image batch
    under an objective with only the BCE and ``weights``."""
    model = model_with_patch_head().eval()
    images = torch.randn(2, 3, 16, 16)
    labels = torch.tensor([[1.0, 0, 0], [0, 1.0, 1.0]])
    cfg = TrainConfig(gate_lambda=0.0, patch_loss_weight=0.0, **weights)
    parts = WSSSObjective(cfg, blocks, True)(model, {"image": images, "labels": labels}, "cpu")
    _, maps = model.predict(images, blocks)
    return model, parts, model.forward_features(images)["patch"], maps, labels


def test_objective_adds_the_attention_pooled_bce() -> None:
    model, parts, patch, maps, labels = objective_run("last", attention_pool_weight=2.0)
    pooled = model.attention_pooled_logits(patch, maps)
    expected = F.binary_cross_entropy_with_logits(pooled, labels)
    torch.testing.assert_close(parts["pool_bce"], expected)
    torch.testing.assert_close(parts["loss"], parts["bce"] + 2.0 * expected)
    parts["loss"].backward()
    assert model.blocks[-1].attn.qkv.weight.grad.abs().sum() > 0


def test_self_guide_pulls_present_maps_to_the_patch_head_regions() -> None:
    model, parts, patch, maps, _ = objective_run("all", self_guide_weight=0.5)
    scores = model.patch_head(patch).transpose(1, 2).reshape(2, 3, 4, 4)
    low = scores.amin((2, 3), keepdim=True)
    region = (scores - low) / (scores.amax((2, 3), keepdim=True) - low) >= 0.5
    normalized = maps / maps.amax((2, 3), keepdim=True)
    losses = [(1 - normalized[b, c][region[b, c]]).mean() + normalized[b, c][~region[b, c]].mean()
              for b, c in ((0, 0), (1, 1), (1, 2))]
    torch.testing.assert_close(parts["self_guide"], torch.stack(losses).mean())
    torch.testing.assert_close(parts["loss"], parts["bce"] + 0.5 * parts["self_guide"])
    parts["loss"].backward()
    assert model.patch_head.weight.grad.abs().sum() == 0
    assert model.cls_token.grad.abs().sum() > 0


@pytest.mark.parametrize("class_blocks", [0, 1])
def test_fused_maps_weigh_each_patch_by_the_patch_head_sigmoid(class_blocks: int) -> None:
    model = model_with_patch_head(class_blocks=class_blocks).eval()
    images = torch.randn(2, 3, 16, 24)
    logits, attention = model.predict(images, "last")
    fused_logits, fused = model.predict(images, "last", fused=True)
    out = model.forward_features(images)
    scores = out["patch"] @ model.patch_head.weight.T + model.patch_head.bias  # [B,N,K]
    h, w = out["grid"]
    for b in range(2):
        for c in range(3):
            for n in range(h * w):
                expected = attention[b, c, n // w, n % w] / (1 + torch.exp(-scores[b, n, c]))
                torch.testing.assert_close(fused[b, c, n // w, n % w], expected)
    torch.testing.assert_close(fused_logits, logits)


def test_fused_maps_through_tta_and_the_config_check() -> None:
    from attnmaps.config import ConfigError, load_config
    from attnmaps.pseudo.tta import tta_predict

    model = model_with_patch_head().eval()
    images = torch.randn(1, 3, 16, 16)
    _, fused = model.predict(images, "last", fused=True)
    _, attention = model.predict(images, "last")
    _, through_tta = tta_predict(model, images, (1.0,), False, "last", fused=True)
    torch.testing.assert_close(through_tta, fused)
    assert not torch.allclose(fused, attention)
    _, flipped = tta_predict(model, images, (1.0,), True, "last", fused=True)
    _, mirrored = model.predict(images.flip(-1), "last", fused=True)
    torch.testing.assert_close(flipped, (fused + mirrored.flip(-1)) / 2)
    with pytest.raises(ValueError, match="model.patch_head=true"):
        model_with_patch_head(patch_head=False).predict(images, "last", fused=True)
    with pytest.raises(ConfigError, match="model.patch_head"):
        load_config(None, ["pseudo.maps=fused"])
    assert load_config(None, ["pseudo.maps=fused", "model.patch_head=true"]).pseudo.maps == "fused"
