"""Mask-guided losses on tiny hand-made maps and masks with hand-computed values."""

import math

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from attnmaps.losses import (
    CAMALLoss,
    GAINLoss,
    L1MapLoss,
    NoGuidance,
    RRRLoss,
    attention_mining_loss,
    class_masks,
    input_gradient,
)

YES = torch.tensor([True])


def corner_mask() -> torch.Tensor:
    """[1, 4, 4] bool mask: the top-left 2x2 block (4 of 16 pixels)."""
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, :2, :2] = True
    return mask


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def inside_share(maps: torch.Tensor, mask: torch.Tensor) -> float:
    positive = maps.clamp_min(0)
    return float((positive * mask).sum() / positive.sum())


@pytest.mark.parametrize("form", ["contrast", "energy"])
def test_camal_zero_when_map_is_the_mask(form):
    mask = corner_mask()
    loss = CAMALLoss(form=form)
    assert loss(mask.float(), mask, YES).item() == 0.0
    assert loss(3 * mask.float(), mask, YES).item() == 0.0


def test_camal_map_entirely_outside():
    mask = corner_mask()
    outside = (~mask).float()
    assert_close(CAMALLoss(2.0, 0.5)(outside, mask, YES), torch.tensor(2.5))
    assert CAMALLoss(form="energy")(outside, mask, YES).item() == 1.0


def test_camal_contrast_hand_value():
    mask = corner_mask()
    maps = torch.zeros(1, 4, 4)
    maps[0, 0, 0], maps[0, 0, 1], maps[0, 1, 0] = 4.0, 2.0, 2.0
    maps[0, 3, 3], maps[0, 2, 2] = 1.0, -3.0
    # normalized inside: 1, .5, .5, 0 -> mean(1 - A) = .5; outside: .25 once in 12 pixels
    expected = 1.5 * 0.5 + 0.7 * 0.25 / 12
    assert_close(CAMALLoss(1.5, 0.7)(maps, mask, YES), torch.tensor(expected))


def test_camal_energy_half_mass_inside():
    mask = corner_mask()
    maps = torch.zeros(1, 4, 4)
    maps[0, 0, 0], maps[0, 1, 1] = 1.0, 2.0
    maps[0, 3, 0], maps[0, 2, 3], maps[0, 3, 3] = 2.5, 0.5, -5.0
    assert_close(CAMALLoss(form="energy")(maps, mask, YES), torch.tensor(0.5))


@pytest.mark.parametrize("form", ["contrast", "energy"])
def test_camal_gradient_step_moves_mass_inside(form):
    torch.manual_seed(0)
    mask = corner_mask()
    maps = (torch.rand(1, 4, 4) + 0.1).requires_grad_(True)
    CAMALLoss(form=form)(maps, mask, YES).backward()
    stepped = maps.detach() - 0.05 * maps.grad
    assert inside_share(stepped, mask) > inside_share(maps.detach(), mask)


def test_maps_without_mask_contribute_nothing():
    torch.manual_seed(1)
    masks = torch.rand(2, 3, 4, 4) > 0.5
    maps = torch.rand(2, 3, 4, 4, requires_grad=True)
    loss = CAMALLoss()
    both = loss(maps, masks, torch.tensor([True, False]))
    first = loss(maps[:1], masks[:1], YES)
    assert_close(both, first)
    both.backward()
    assert maps.grad[1].abs().sum() == 0 and maps.grad[0].abs().sum() > 0


@pytest.mark.parametrize("loss", [CAMALLoss(), CAMALLoss(form="energy"), GAINLoss(), L1MapLoss()])
def test_no_mask_gives_exact_zero_with_grad(loss):
    maps = torch.rand(2, 3, 4, 4, requires_grad=True)
    value = loss(maps, torch.rand(2, 3, 4, 4) > 0.5, torch.tensor([False, False]))
    assert value.item() == 0.0 and value.requires_grad
    value.backward()
    assert maps.grad.abs().sum() == 0


def test_per_class_has_mask_selects_maps():
    mask = corner_mask()
    good, bad = mask.float(), (~mask).float()
    maps = torch.stack([good, bad, good], dim=1)  # [1, 3, 4, 4]
    masks = mask.unsqueeze(1).expand(1, 3, 4, 4)
    energy = CAMALLoss(form="energy")
    assert_close(energy(maps, masks, torch.tensor([[True, True, True]])), torch.tensor(1 / 3))
    assert energy(maps, masks, torch.tensor([[True, False, True]])).item() == 0.0


def test_maps_are_resized_to_the_mask():
    mask = corner_mask()
    maps = torch.full((1, 2, 2), 2.0)
    assert_close(CAMALLoss(form="energy")(maps, mask, YES), torch.tensor(0.75))


def test_bad_inputs_raise():
    maps = torch.rand(1, 4, 4)
    with pytest.raises(ValueError, match="class_masks"):
        CAMALLoss()(maps, corner_mask().long(), YES)
    with pytest.raises(ValueError, match="masks"):
        CAMALLoss()(maps, torch.ones(1, 2, 4, 4, dtype=torch.bool), YES)
    with pytest.raises(ValueError, match="has_mask"):
        CAMALLoss()(maps, corner_mask(), torch.tensor([True, True]))
    with pytest.raises(ValueError, match="form"):
        CAMALLoss(form="bogus")


def test_class_masks_follow_label_convention():
    labels = torch.tensor([[[0, 1], [2, 255]]])
    with_bg = class_masks(labels, 2, has_background=True)
    assert with_bg.tolist() == [[[[False, True], [False, False]], [[False, False], [True, False]]]]
    without_bg = class_masks(labels, 2, has_background=False)
    assert without_bg.tolist() == [[[[True, False], [False, False]], [[False, True], [False, False]]]]


def test_gain_loss_hand_value():
    maps = torch.tensor([[[0.0, 1.0, 2.0, 4.0]]])  # min-max: 0, .25, .5, 1
    masks = torch.tensor([[[0.0, 0.0, 1.0, 1.0]]])
    expected = (sigmoid(-5) ** 2 + sigmoid(-2.5) ** 2 + 0.25 + sigmoid(-5) ** 2) / 4
    assert_close(GAINLoss()(maps, masks, YES), torch.tensor(expected))
    mask = corner_mask()
    assert_close(GAINLoss()(mask.float(), mask, YES), torch.tensor(sigmoid(-5) ** 2))


def test_attention_mining_loss_hand_value():
    scores = torch.tensor([[0.0, math.log(3)], [-math.log(3), 5.0]])
    labels = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    assert_close(attention_mining_loss(scores, labels), torch.tensor(0.5))  # (.5 + .75 + .25) / 3
    assert attention_mining_loss(scores, torch.zeros(2, 2)).item() == 0.0


def test_l1_map_loss_hand_value():
    maps = torch.tensor([[[0.0, 1.0, 2.0, 4.0, -2.0]]])  # normalized: 0, .25, .5, 1, 0
    masks = torch.tensor([[[0.0, 0.0, 1.0, 1.0, 0.0]]])
    assert_close(L1MapLoss()(maps, masks, YES), torch.tensor(0.75 / 5))


def test_rrr_loss_hand_values():
    grads = torch.zeros(2, 2, 2, 2)
    grads[0, :, 0, 0] = torch.tensor([3.0, 4.0])
    grads[0, 1, 1, 1] = 2.0
    grads[1, 0, 0, 1] = 1.0
    masks = torch.zeros(2, 2, 2, dtype=torch.bool)
    masks[:, 0, 0] = True
    # image 0: outside energy 2^2 = 4; image 1: 1
    assert_close(RRRLoss(0.5)(grads, masks, torch.tensor([True, True])), torch.tensor(0.5 * 5 / 2))
    assert_close(RRRLoss()(grads, masks, torch.tensor([True, False])), torch.tensor(4.0))
    inside_only = torch.zeros(1, 2, 2, 2)
    inside_only[0, :, 0, 0] = 7.0
    assert RRRLoss()(inside_only, masks[:1], YES).item() == 0.0
    with pytest.raises(ValueError, match="same size"):
        RRRLoss()(grads, torch.zeros(2, 3, 3), torch.tensor([True, True]))


def linear_model() -> nn.Sequential:
    torch.manual_seed(2)
    return nn.Sequential(nn.Flatten(), nn.Linear(8, 3)).double()


@pytest.mark.parametrize("multilabel", [True, False])
def test_input_gradient_matches_analytic(multilabel):
    model = linear_model()
    weight = model[1].weight.detach()
    images = torch.randn(2, 2, 2, 2, dtype=torch.float64)
    logits = model(images).detach()
    if multilabel:  # d sum_k logsigmoid(z_k) / dz_k = 1 - sigmoid(z_k)
        coeffs = 1 - torch.sigmoid(logits)
    else:  # d sum_k log_softmax_k / dz_j = 1 - K p_j
        coeffs = 1 - 3 * torch.softmax(logits, dim=1)
    expected = (coeffs @ weight).view(2, 2, 2, 2)
    grads = input_gradient(model, images, multilabel=multilabel)
    assert_close(grads, expected, rtol=1e-10, atol=1e-12)


def test_rrr_loss_trains_the_model_through_input_gradients():
    model = linear_model()
    images = torch.randn(2, 2, 2, 2, dtype=torch.float64)
    grads = input_gradient(model, images, create_graph=True)
    masks = torch.zeros(2, 2, 2, dtype=torch.bool)
    masks[:, 0, 0] = True
    RRRLoss()(grads, masks, torch.tensor([True, True])).backward()
    assert model[1].weight.grad.abs().sum() > 0


def test_no_guidance_is_zero_with_grad():
    maps = torch.rand(2, 3, 4, 4, requires_grad=True)
    value = NoGuidance()(maps, torch.ones(2, 3, 4, 4, dtype=torch.bool), torch.tensor([True, True]))
    assert value.item() == 0.0 and value.requires_grad
    value.backward()
    assert maps.grad.abs().sum() == 0


def test_invalid_pixels_are_left_out_of_every_term() -> None:
    from attnmaps.losses import CAMALLoss, L1MapLoss

    maps = torch.tensor([[[1.0, 0.5], [0.0, 1.0]]])  # max 1, so A = map
    masks = torch.tensor([[[True, False], [False, False]]])
    valid = torch.tensor([[[True, True], [True, False]]])  # the bright pixel (1, 1) is ignored
    has = torch.tensor([True])
    # inside {(0,0)}: 1 - 1 = 0; outside {(0,1), (1,0)}: (0.5 + 0) / 2
    assert CAMALLoss()(maps, masks, has, valid).item() == pytest.approx(0.25)
    assert CAMALLoss()(maps, masks, has).item() == pytest.approx(0.5)
    assert CAMALLoss(form="energy")(maps, masks, has, valid).item() == pytest.approx(1 - 1 / 1.5)
    assert L1MapLoss()(maps, masks, has, valid).item() == pytest.approx((0 + 0.5 + 0) / 3)
    with pytest.raises(ValueError, match="valid must have shape"):
        CAMALLoss()(maps, masks, has, valid[0])
