"""Self-training on the model's own refined maps (``train.self_train_*``): patch shares, the two
losses against hand computations, the targets against the pseudo-mask read-out, the objective's
wiring (start epoch, kept patches) and config."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from attnmaps.config import ConfigError, PseudoMaskConfig, TrainConfig, load_config
from attnmaps.engine.objective import WSSSObjective
from attnmaps.engine.self_training import (
    absent_attention_loss,
    attention_target_loss,
    dense_patch_bce,
    patch_shares,
    refined_patch_targets,
)
from attnmaps.models.vit import ClassTokenViT
from attnmaps.pseudo.masks import make_pseudo_masks
from attnmaps.pseudo.pamr import pamr

SETTINGS = PseudoMaskConfig(threshold=0.4, merge="weighted", maps="fused")


def small_model() -> ClassTokenViT:
    torch.manual_seed(0)
    return ClassTokenViT(3, img_size=(16, 16), patch_size=4, embed_dim=16, depth=2, num_heads=2,
                         head="per_token", gates=False, mask_rate=0.0, patch_head=True,
                         class_blocks=1)


def test_patch_shares_count_each_class_per_patch_by_brute_force() -> None:
    generator = torch.Generator().manual_seed(0)
    masks = torch.randint(0, 4, (2, 8, 12), generator=generator)
    masks[0, 0, :3] = 255
    shares = patch_shares(masks, num_classes=3, has_background=True, grid=(2, 3))
    assert shares.shape == (2, 3, 6)
    for b in range(2):
        for c in range(3):
            for i in range(2):
                for j in range(3):
                    block = masks[b, 4 * i:4 * i + 4, 4 * j:4 * j + 4]
                    expected = (block == c + 1).sum().item() / 16
                    assert shares[b, c, 3 * i + j].item() == pytest.approx(expected)


def test_patch_shares_without_background_and_a_bad_grid() -> None:
    masks = torch.tensor([[[0, 1], [1, 255]]])
    assert patch_shares(masks, 2, has_background=False, grid=(1, 1)).tolist() == [[[0.25],
                                                                                    [0.5]]]
    with pytest.raises(ValueError, match="3x3 patch grid"):
        patch_shares(torch.zeros(1, 4, 4, dtype=torch.long), 2, True, (3, 3))


def test_dense_patch_bce_is_the_mean_elementwise_bce() -> None:
    scores = torch.tensor([[[2.0, -1.0], [0.0, 3.0]]])  # [B=1, N=2, K=2]
    targets = torch.tensor([[[1.0, 0.25], [0.0, 0.5]]])  # [B, K, N]
    by_hand = []
    for n in range(2):
        for k in range(2):
            p = 1 / (1 + math.exp(-scores[0, n, k].item()))
            t = targets[0, k, n].item()
            by_hand.append(-(t * math.log(p) + (1 - t) * math.log(1 - p)))
    assert dense_patch_bce(scores, targets).item() == pytest.approx(sum(by_hand) / 4)


def test_attention_target_loss_by_hand() -> None:
    attention = torch.tensor([[[0.2, 0.1, 0.1], [0.3, 0.3, 0.3]]])  # [B=1, K=2, N=3]
    targets = torch.tensor([[[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]])
    present = torch.tensor([[True, True]])  # class 1 has no target: left out
    by_hand = -(0.5 * math.log(0.2 / 0.4) + 0.5 * math.log(0.1 / 0.4))
    assert attention_target_loss(attention, targets, present).item() == pytest.approx(by_hand)
    absent = torch.tensor([[False, True]])
    assert attention_target_loss(attention, targets, absent).item() == 0.0


def test_attention_target_loss_is_lowest_when_attention_follows_the_target() -> None:
    targets = torch.tensor([[[0.0, 1.0, 1.0, 0.5]]])
    present = torch.tensor([[True]])
    matched = attention_target_loss(targets * 0.1, targets, present)
    peaked = attention_target_loss(torch.tensor([[[0.01, 0.3, 0.01, 0.01]]]), targets, present)
    assert matched < peaked


@pytest.mark.parametrize(("iterations", "cell"), [(0, 4), (3, 4), (3, 2)])
def test_targets_are_the_patch_shares_of_the_refined_read_out(iterations: int, cell: int) -> None:
    model = small_model().train()
    images = torch.randn(2, 3, 16, 16)
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    targets = refined_patch_targets(model, images, labels, SETTINGS, iterations, [1], True, cell)
    assert model.training and not targets.requires_grad
    with torch.no_grad():
        model.eval()
        out = model.forward_features(images, attn_blocks=[1])
        attention = model.class_maps(out["attn"], [1], out["grid"])
        maps = attention * model.patch_head_scores(out["patch"]).transpose(1, 2).reshape(
            attention.shape).sigmoid()
    side = 4 * cell  # a 4x4 patch grid
    small = images if cell == 4 else images.reshape(2, 3, side, 2, side, 2).mean((3, 5))
    full = F.interpolate(maps, size=(side, side), mode="bilinear", align_corners=False)
    if iterations:
        dilations = (1, 2, 4, 8, 12, 24) if cell == 4 else (1, 2, 4, 6, 12)
        full = pamr(small, full, iterations, dilations)
    low = full.amin(dim=(2, 3), keepdim=True)
    full = (full - low) / (full.amax(dim=(2, 3), keepdim=True) - low).clamp_min(1e-12)
    masks = make_pseudo_masks(full, labels, (side, side), threshold=0.4, has_background=True,
                              labels=labels, merge="weighted")
    for b in range(2):
        for c in range(3):
            for i in range(4):
                for j in range(4):
                    block = masks[b, cell * i:cell * (i + 1), cell * j:cell * (j + 1)]
                    share = (block == c + 1).float().mean().item()
                    assert targets[b, c, 4 * i + j].item() == pytest.approx(share, abs=1e-6)
    assert targets[0, 1].sum() == 0 and targets[1, 0].sum() == 0  # absent classes: no target


def test_objective_adds_the_terms_from_the_start_epoch_on() -> None:
    model = small_model().train()
    images = torch.randn(2, 3, 16, 16)
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    cfg = TrainConfig(gate_lambda=0.0, self_train_weight=0.5, self_train_attention_weight=2.0,
                      self_train_start_epoch=3, self_train_refine_iterations=2)
    objective = WSSSObjective(cfg, [1], True, SETTINGS)
    batch = {"image": images, "labels": labels}
    before = objective(model, batch, "cpu")
    assert "self_train" not in before and "self_train_attention" not in before
    objective.set_epoch(3)
    parts = objective(model, batch, "cpu")
    targets = refined_patch_targets(model, images, labels, SETTINGS, 2, [1], True)
    out = model.forward_features(images, attn_blocks=[1])
    dense = dense_patch_bce(model.patch_head_scores(out["patch"]), targets)
    attention = attention_target_loss(model.class_patch_attention(out["attn"], [1]), targets,
                                      labels > 0)
    torch.testing.assert_close(parts["self_train"], dense)
    torch.testing.assert_close(parts["self_train_attention"], attention)
    torch.testing.assert_close(parts["loss"], before["loss"] + 0.5 * dense + 2.0 * attention)
    parts["loss"].backward()
    assert model.patch_head.weight.grad.abs().sum() > 0


def test_objective_reads_the_targets_at_the_kept_patches() -> None:
    model = small_model().train()
    images = torch.randn(2, 3, 16, 16)
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    cfg = TrainConfig(gate_lambda=0.0, patch_dropout=0.5, self_train_weight=1.0,
                      self_train_attention_weight=1.0)
    torch.manual_seed(4)
    parts = WSSSObjective(cfg, [1], True, SETTINGS)(model, {"image": images, "labels": labels},
                                                    "cpu")
    targets = refined_patch_targets(model, images, labels, SETTINGS, 10, [1], True)
    torch.manual_seed(4)
    out = model.forward_features(images, attn_blocks=[1], patch_dropout=0.5)
    kept = out["kept"]
    assert kept.shape == (2, 8)
    at_kept = torch.stack([targets[b][:, kept[b]] for b in range(2)])
    torch.testing.assert_close(parts["self_train"],
                               dense_patch_bce(model.patch_head_scores(out["patch"]), at_kept))
    attention = model.class_patch_attention(out["attn"], [1])
    torch.testing.assert_close(parts["self_train_attention"],
                               attention_target_loss(attention, at_kept, labels > 0))


def test_training_turns_self_training_on_at_its_epoch(tmp_path) -> None:
    import json

    from attnmaps.data.synthetic import write_synthetic_voc
    from attnmaps.engine.train import train

    root = write_synthetic_voc(tmp_path / "data", num_train=16, num_val=4, size=(32, 32), seed=2)
    cfg = load_config(None, ["model.img_size=32,32", "model.patch_size=8", "model.embed_dim=16",
                             "model.depth=1", "model.num_heads=2", "model.patch_head=true",
                             "train.batch_size=8", "train.epochs=2", "train.log_every=1",
                             "train.self_train_weight=1", "train.self_train_start_epoch=1",
                             f"data.root={root}", f"out_dir={tmp_path / 'run'}"])
    train(cfg)
    log = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in log]
    steps = [record for record in records if "bce" in record]
    assert [("self_train" in record) for record in steps] == [False, False, True, True]


def test_config_refuses_the_dense_term_without_a_patch_head() -> None:
    with pytest.raises(ConfigError, match="'train.self_train_weight' is 1.0"):
        load_config(None, ["train.self_train_weight=1", "model.patch_head=false"])
    load_config(None, ["train.self_train_attention_weight=1", "model.patch_head=false"])


def test_absent_attention_loss_is_the_kl_from_even_attention_by_hand() -> None:
    attention = torch.tensor([[[1.0, 1.0, 1.0], [2.0, 1.0, 1.0]],
                              [[0.2, 0.3, 0.5], [4.0, 4.0, 4.0]]])
    absent = torch.tensor([[False, True], [True, False]])
    third = 1.0 / 3.0
    kl_first = third * (math.log(third / 0.5) + 2 * math.log(third / 0.25))
    kl_second = third * (math.log(third / 0.2) + math.log(third / 0.3) + math.log(third / 0.5))
    assert absent_attention_loss(attention, absent).item() == pytest.approx(
        (kl_first + kl_second) / 2, abs=1e-6)
    even = torch.tensor([[True, False], [False, True]])  # the evenly spread maps: no divergence
    assert absent_attention_loss(attention, even).item() == pytest.approx(0.0, abs=1e-6)


def test_objective_adds_the_absent_term_without_making_targets(monkeypatch) -> None:
    from attnmaps.engine import objective as objective_module

    def no_targets(*args, **kwargs):
        raise AssertionError("the absent-class term needs no targets")

    monkeypatch.setattr(objective_module, "refined_patch_targets", no_targets)
    model = small_model().train()
    images = torch.randn(2, 3, 16, 16)
    labels = torch.tensor([[1.0, 0.0, 0.3], [0.0, 1.0, 0.0]])  # 0.3: a CutMix share, present
    cfg = TrainConfig(gate_lambda=0.0, self_train_absent_weight=0.5)
    parts = WSSSObjective(cfg, [1], True, SETTINGS)(model, {"image": images, "labels": labels},
                                                    "cpu")
    out = model.forward_features(images, attn_blocks=[1])
    absent = torch.tensor([[False, True, False], [True, False, True]])
    expected = absent_attention_loss(model.class_patch_attention(out["attn"], [1]), absent)
    torch.testing.assert_close(parts["self_train_absent"], expected)
    plain = WSSSObjective(TrainConfig(gate_lambda=0.0), [1], True, SETTINGS)(
        model, {"image": images, "labels": labels}, "cpu")
    torch.testing.assert_close(parts["loss"], plain["loss"] + 0.5 * expected)
