"""CAM, token CAM, class-token maps and Grad-CAM against the logits of tiny hand-built models and
analytic gradients."""

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from attnmaps.cam import cam, grad_cam, token_cam
from attnmaps.models.vit import ClassTokenViT

TOL = {"rtol": 1e-10, "atol": 1e-12}


class GapCNN(nn.Module):
    """conv -> ReLU -> global average pooling -> linear."""

    def __init__(self, in_chans: int = 2, channels: int = 4, classes: int = 3):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_chans, channels, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean(dim=(2, 3)))


def test_cam_spatial_mean_equals_logits():
    torch.manual_seed(0)
    model = GapCNN().double()
    images = torch.randn(2, 2, 5, 6, dtype=torch.float64)
    features = model.body(images)
    logits = model(images)
    maps = cam(features, model.head.weight)
    assert maps.shape == (2, 3, 5, 6)
    assert_close(maps.mean(dim=(2, 3)) + model.head.bias, logits, **TOL)
    assert_close(cam(features, model.head.weight, model.head.bias).mean(dim=(2, 3)), logits, **TOL)
    b, k, i, j = 1, 2, 3, 4
    assert_close(maps[b, k, i, j], (model.head.weight[k] * features[b, :, i, j]).sum(), **TOL)


def test_cam_rejects_mismatched_weight():
    with pytest.raises(ValueError, match="weight"):
        cam(torch.randn(1, 4, 2, 2), torch.randn(3, 5))


def test_token_cam_matches_mean_pooled_head_and_layout():
    torch.manual_seed(1)
    grid, dim, classes = (2, 3), 5, 4
    norm = nn.LayerNorm(dim).double()
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    head = nn.Linear(dim, classes).double()
    tokens = torch.randn(2, grid[0] * grid[1], dim, dtype=torch.float64)
    logits = head(norm(tokens).mean(1))
    maps = token_cam(tokens, grid, head.weight, norm)
    assert maps.shape == (2, classes, *grid)
    assert_close(maps.mean(dim=(2, 3)) + head.bias, logits, **TOL)
    i, j = 1, 2
    assert_close(maps[0, :, i, j], head.weight @ norm(tokens[0, i * grid[1] + j]), **TOL)
    with pytest.raises(ValueError, match="grid"):
        token_cam(tokens, (3, 3), head.weight, norm)


def make_vit() -> ClassTokenViT:
    torch.manual_seed(2)
    return ClassTokenViT(num_classes=3, img_size=(16, 16), patch_size=8, embed_dim=16, depth=2,
                         num_heads=2)


def test_predict_train_mode_gradient_reaches_the_class_tokens():
    model = make_vit().train()
    images = torch.randn(2, 3, 16, 16)
    logits, maps = model.predict(images, labels=torch.tensor([[1.0, 0, 0], [0, 1, 1]]))
    assert logits.shape == (2, 3) and maps.shape == (2, 3, 2, 2)
    (maps[:, 0] ** 2).sum().backward()
    assert model.cls_token.grad is not None
    assert model.cls_token.grad[0, 0].abs().sum() > 0


def test_predict_with_labels_masks_absent_class_tokens_in_training_only():
    torch.manual_seed(2)
    model = ClassTokenViT(num_classes=3, img_size=(16, 16), patch_size=8, embed_dim=16, depth=2,
                          num_heads=2, gates=False, mask_rate=1.0)
    images, labels = torch.randn(2, 3, 16, 16), torch.tensor([[1.0, 0, 0], [0, 1, 1]])
    model.train()
    cls = model.forward_features(images, patch_outputs=False)["cls"]
    expected = model.forward_head(cls * (labels > 0).unsqueeze(-1))
    assert_close(model.predict(images, labels=labels)[0], expected)
    assert not torch.allclose(model.predict(images)[0], expected)
    model.eval()
    assert_close(model.predict(images, labels=labels)[0], model.predict(images)[0])


class LinearCNN(nn.Module):
    """1x1 conv (the Grad-CAM layer) -> global average pooling -> linear: d score / d F is
    ``W[c] / (h * w)`` everywhere."""

    def __init__(self, in_chans: int = 2, channels: int = 3, classes: int = 2):
        super().__init__()
        self.features = nn.Conv2d(in_chans, channels, 1)
        self.head = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def hand_grad_cam(model: LinearCNN, images: torch.Tensor, class_idx: torch.Tensor,
                  head_weight: torch.Tensor) -> torch.Tensor:
    feats = model.features(images)
    area = feats.shape[2] * feats.shape[3]
    weights = head_weight[class_idx] / area
    return torch.relu(torch.einsum("bchw,bc->bhw", feats, weights))


def test_grad_cam_matches_analytic_weights():
    torch.manual_seed(3)
    model = LinearCNN().double()
    images = torch.randn(2, 2, 3, 4, dtype=torch.float64)
    class_idx = torch.tensor([1, 0])
    maps = grad_cam(model, model.features, images, class_idx)
    assert maps.shape == (2, 3, 4)
    assert_close(maps, hand_grad_cam(model, images, class_idx, model.head.weight), **TOL)
    assert (maps > 0).any() and (maps == 0).any()
    assert not model.features._forward_hooks


def test_grad_cam_second_order_gradient_reaches_head():
    torch.manual_seed(4)
    model = LinearCNN().double()
    images = torch.randn(2, 2, 3, 4, dtype=torch.float64)
    class_idx = torch.tensor([0, 1])
    grad_cam(model, model.features, images, class_idx, create_graph=True).sum().backward()
    head_weight = model.head.weight.detach().clone().requires_grad_(True)
    hand_loss = hand_grad_cam(model, images, class_idx, head_weight).sum()
    (expected,) = torch.autograd.grad(hand_loss, head_weight)
    assert expected.abs().sum() > 0
    assert_close(model.head.weight.grad, expected, **TOL)

    model.zero_grad(set_to_none=True)
    grad_cam(model, model.features, images, class_idx, create_graph=False).sum().backward()
    assert model.head.weight.grad is None
    assert model.features.weight.grad.abs().sum() > 0


def test_grad_cam_rejects_token_layer_output():
    model = nn.Sequential(nn.Flatten(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match=r"\[B, C, h, w\]"):
        grad_cam(model, model[0], torch.randn(1, 2, 2, 2), torch.tensor([0]))
