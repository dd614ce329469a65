"""The benchmarks' re-creation of the reference design computes what attnmaps computes.

With weights copied from a ``ClassTokenViT`` the reference model gives the same logits, class
maps, training loss and gradients; its breadth-first fill reaches every pixel from its nearest
assigned pixel; its pseudo masks agree with ``make_pseudo_masks`` wherever a class claimed the
pixel, and wherever the fill is unambiguous.
"""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from attnmaps.conventions import min_max_normalize
from attnmaps.models.vit import ClassTokenViT
from attnmaps.pseudo.masks import fill_unassigned, make_pseudo_masks, merge_masks

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from reference_design import (
    ReferenceViT,
    bfs_fill,
    reference_loss,
    reference_pseudo_masks,
)

K, DEPTH, HEADS = 4, 3, 2
SHAPE = {"num_classes": K, "img_size": (16, 24), "patch_size": 8, "embed_dim": 16,
         "depth": DEPTH, "num_heads": HEADS}


def model_pair(mask_rate: float = 0.5) -> tuple[ClassTokenViT, ReferenceViT]:
    """A ClassTokenViT with random weights and gates strictly inside (0, 1), and its copy."""
    torch.manual_seed(0)
    model = ClassTokenViT(**SHAPE, head="joint", stem="linear", num_registers=1,
                          mask_rate=mask_rate)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("log_alpha"):
                p.copy_(torch.rand(p.shape, generator=gen) * 1.5 - 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    reference = ReferenceViT(**SHAPE, num_registers=1, mask_rate=mask_rate)
    reference.load_state_dict(model.state_dict(), strict=True)
    return model, reference


def test_same_parameters():
    model, reference = model_pair()
    assert {n: p.shape for n, p in model.named_parameters()} == {
        n: p.shape for n, p in reference.named_parameters()}


def test_same_logits_and_class_maps_in_evaluation():
    model, reference = model_pair()
    model.eval(), reference.eval()
    gates = model.gate_values()
    assert ((gates > 0) & (gates < 1)).all()  # the gates scale the heads, none is closed
    x = torch.randn(2, 3, 16, 24)
    with torch.no_grad():
        logits, maps = model.predict(x, attn_blocks="all")
        ref_logits, ref_maps, attn = reference(x)
    assert_close(ref_logits, logits, rtol=0, atol=1e-5)
    # the reference sums the blocks' maps, attnmaps averages them
    assert_close(ref_maps / DEPTH, maps, rtol=0, atol=1e-5)
    assert attn.shape == (DEPTH, 2, HEADS, K + 6 + 1, K + 6 + 1)
    assert maps.std() > 1e-3  # not uniform attention, so the comparison has teeth


def test_same_training_loss_and_gradients():
    """Same seed, same gate samples; mask rate 1 drops every absent class in both."""
    model, reference = model_pair(mask_rate=1.0)
    model.train(), reference.train()
    x = torch.randn(3, 3, 16, 24)
    labels = torch.tensor([[1.0, 0, 0, 1], [0, 1, 0, 0], [0, 0, 0, 0]])
    torch.manual_seed(5)
    logits = model(x, labels)
    loss = F.binary_cross_entropy_with_logits(logits, labels) + 0.01 * model.l0_penalty()
    loss.backward()
    torch.manual_seed(5)
    ref_logits, _, _ = reference(x, labels)
    ref_loss = reference_loss(reference, ref_logits, labels)
    ref_loss.backward()
    assert_close(ref_logits, logits, rtol=0, atol=1e-5)
    assert_close(ref_loss, loss, rtol=0, atol=1e-5)
    grads = dict(model.named_parameters())
    for name, p in reference.named_parameters():
        assert_close(p.grad, grads[name].grad, rtol=1e-4, atol=1e-5, msg=name)


def test_masking_loop_zeroes_exactly_the_absent_classes():
    model, reference = model_pair(mask_rate=1.0)
    model.eval(), reference.eval()  # the reference masks whenever labels are given
    x = torch.randn(2, 3, 16, 24)
    labels = torch.tensor([[1.0, 0, 1, 0], [0, 0, 0, 1]])
    with torch.no_grad():
        masked, _, _ = reference(x, labels)
        expected = model.forward_head(model.forward_features(x)["cls"] * labels[..., None])
        reference.mask_rate = 0.0
        kept, _, _ = reference(x, labels)
        unmasked = model(x)
    assert_close(masked, expected, rtol=0, atol=1e-5)
    assert_close(kept, unmasked, rtol=0, atol=1e-5)
    assert not torch.allclose(masked, unmasked, atol=1e-3)


def nearest_label(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Label of the Manhattan-nearest assigned pixel (brute force) and whether it is unique."""
    rows, cols = np.indices(labels.shape)
    assigned = labels >= 0
    ar, ac, av = rows[assigned], cols[assigned], labels[assigned]
    dist = np.abs(rows.reshape(-1, 1) - ar) + np.abs(cols.reshape(-1, 1) - ac)
    best = dist.min(1, keepdims=True)
    winners = [set(av[row == b[0]]) for row, b in zip(dist, best)]
    nearest = np.array([min(w) for w in winners]).reshape(labels.shape)
    unique = np.array([len(w) == 1 for w in winners]).reshape(labels.shape)
    return nearest, unique


@pytest.mark.parametrize("seed", range(4))
def test_bfs_fill_takes_the_nearest_label(seed):
    rng = np.random.default_rng(seed)
    labels = np.full((9, 11), -1)
    for value in range(3):
        labels[rng.integers(9), rng.integers(11)] = value
    nearest, unique = nearest_label(labels)
    filled = bfs_fill(labels.copy())
    assert (filled >= 0).all()
    assert (filled[unique] == nearest[unique]).all()
    assert unique.mean() > 0.5


def test_bfs_fill_agrees_with_attnmaps_fill_on_an_unambiguous_gap():
    labels = np.full((5, 10), -1)
    labels[:, :2], labels[:, 6:] = 0, 1  # columns 2-5 unassigned: 2, 3 nearer 0; 4, 5 nearer 1
    filled = bfs_fill(labels.copy())
    assert (filled[:, :4] == 0).all() and (filled[:, 4:] == 1).all()
    assert_close(torch.from_numpy(filled), fill_unassigned(torch.from_numpy(labels)[None], 2)[0])


def test_reference_pseudo_masks_agree_where_a_class_claims_the_pixel():
    gen = torch.Generator().manual_seed(0)
    maps = torch.rand(3, 5, 4, 4, generator=gen)
    probs = torch.tensor([[0.9, 0.2, 0.6, 0.1, 0.7], [0.1, 0.2, 0.3, 0.4, 0.45],
                          [0.3, 0.8, 0.1, 0.2, 0.1]])
    ours = make_pseudo_masks(maps, probs, (16, 16), threshold=0.4, has_background=False)
    reference = reference_pseudo_masks(maps, probs, (16, 16), threshold=0.4)
    full = min_max_normalize(F.interpolate(maps, size=(16, 16), mode="bilinear",
                                        align_corners=False))
    selected = torch.tensor([[1, 0, 1, 0, 1], [0, 0, 0, 0, 1], [0, 1, 0, 0, 0]], dtype=torch.bool)
    claimed = merge_masks(full, probs, selected, 0.4, has_background=False) >= 0
    assert 0.3 < claimed.float().mean() < 1  # some pixels claimed, some left to the fill
    assert torch.equal(reference[claimed], ours[claimed])
    assert (reference[2] == 1).all()  # one class selected: the fill can only give that class
