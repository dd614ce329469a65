"""PatchDropout (``train.patch_dropout``) and the map decorrelation term: which tokens are kept,
what the encoder sees, the similarity against hand examples, config."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnmaps.config import ConfigError, TrainConfig, load_config
from attnmaps.engine.objective import WSSSObjective, map_similarity
from attnmaps.models.vit import ClassTokenViT, drop_patches


def small_model() -> ClassTokenViT:
    torch.manual_seed(0)
    return ClassTokenViT(3, img_size=(16, 16), patch_size=4, embed_dim=16, depth=2, num_heads=2,
                         head="per_token", gates=False, mask_rate=0.0, patch_head=True)


@pytest.mark.parametrize(("n", "rate", "kept"), [(16, 0.5, 8), (16, 0.75, 4), (10, 0.25, 8),
                                                 (3, 0.9, 1), (5, 0.0, 5)])
def test_drop_patches_keeps_a_sorted_subset_of_the_rounded_size(n: int, rate: float,
                                                                kept: int) -> None:
    patches = torch.randn(4, n, 6)
    out, index = drop_patches(patches, rate)
    assert index.shape == (4, kept) and out.shape == (4, kept, 6)
    for b in range(4):
        rows = index[b].tolist()
        assert rows == sorted(set(rows)) and all(0 <= r < n for r in rows)
        torch.testing.assert_close(out[b], patches[b, rows])


def test_drop_patches_draws_different_subsets() -> None:
    torch.manual_seed(0)
    _, index = drop_patches(torch.zeros(64, 16, 2), 0.5)
    assert len({tuple(row.tolist()) for row in index}) > 32


def test_drop_patches_refuses_a_rate_outside_0_1() -> None:
    with pytest.raises(ValueError, match="rate 1.0"):
        drop_patches(torch.zeros(1, 4, 2), 1.0)


def test_the_encoder_sees_only_the_kept_tokens() -> None:
    """The class tokens' outputs equal a manual pass of [CLS | kept patches | REG] through the
    blocks (position embeddings added before the choice)."""
    model = small_model().train()
    images = torch.randn(2, 3, 16, 16)
    torch.manual_seed(5)
    out = model.forward_features(images, patch_dropout=0.5)
    index = out["kept"]
    patches = model.patch_embed(images).flatten(2).transpose(1, 2) + model.pos_embed
    kept = torch.stack([patches[b, index[b]] for b in range(2)])
    x = torch.cat([model.cls_token.expand(2, -1, -1), kept, model.reg_token.expand(2, -1, -1)], 1)
    for block in model.blocks:
        x, _ = block(x)
    x = model.norm(x)
    torch.testing.assert_close(out["cls"], x[:, :3])
    torch.testing.assert_close(out["patch"], x[:, 3:3 + 8])


def test_no_dropout_in_evaluation() -> None:
    model = small_model().eval()
    out = model.forward_features(torch.randn(2, 3, 16, 16), patch_dropout=0.5)
    assert out["patch"].shape[1] == 16 and "kept" not in out


def test_objective_trains_on_the_kept_patches() -> None:
    model = small_model().train()
    images, labels = torch.randn(2, 3, 16, 16), torch.tensor([[1.0, 0, 0], [0, 1.0, 1.0]])
    torch.manual_seed(3)
    parts = WSSSObjective(TrainConfig(gate_lambda=0.0, patch_dropout=0.5), [1], True)(
        model, {"image": images, "labels": labels}, "cpu")
    torch.manual_seed(3)
    out = model.forward_features(images, patch_dropout=0.5)
    assert out["patch"].shape[1] == 8
    bce = F.binary_cross_entropy_with_logits(model.forward_head(out["cls"]), labels)
    patch_bce = F.binary_cross_entropy_with_logits(model.patch_logits(out["patch"]), labels)
    torch.testing.assert_close(parts["loss"], bce + patch_bce)


@pytest.mark.parametrize("key", ["train.mask_fraction=0.5", "train.attention_pool_weight=1",
                                 "train.self_guide_weight=1"])
def test_patch_dropout_refuses_losses_on_full_maps(key: str) -> None:
    with pytest.raises(ConfigError, match="train.patch_dropout"):
        load_config(None, ["train.patch_dropout=0.5", key])
    assert load_config(None, ["train.patch_dropout=0.5"]).train.patch_dropout == 0.5


def test_map_similarity_against_a_hand_example() -> None:
    maps = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]])  # classes 0, 1, 2 over 2 patches
    labels = torch.tensor([[1.0, 0.0, 0.0]])
    # present class 0 against 1 (cos 45 deg) and 2 (orthogonal)
    torch.testing.assert_close(map_similarity(maps, labels), torch.tensor(0.5 ** 0.5 / 2))
    both = torch.tensor([[1.0, 0.0, 1.0]])  # pairs (0,1) (0,2) (2,0) (2,1)
    torch.testing.assert_close(map_similarity(maps, both), torch.tensor(2 * 0.5 ** 0.5 / 4))
    assert map_similarity(maps, torch.zeros(1, 3)) == 0


def test_map_similarity_of_present_pairs_against_a_hand_example() -> None:
    maps = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]])
    both = torch.tensor([[1.0, 0.0, 1.0]])  # present pairs (0,2) (2,0): orthogonal
    assert map_similarity(maps, both, "present") == 0
    first_two = torch.tensor([[1.0, 1.0, 0.0]])  # (0,1) (1,0): cos 45 deg each
    torch.testing.assert_close(map_similarity(maps, first_two, "present"),
                               torch.tensor(0.5 ** 0.5))
    assert map_similarity(maps, torch.tensor([[0.0, 1.0, 0.0]]), "present") == 0  # one class


def test_map_similarity_equals_a_loop_over_pairs() -> None:
    torch.manual_seed(0)
    maps, labels = torch.rand(4, 5, 7), (torch.rand(4, 5) < 0.5).float()
    for pairs in ("all", "present"):
        values = [F.cosine_similarity(maps[b, c], maps[b, d], dim=0)
                  for b in range(4) for c in range(5) for d in range(5)
                  if c != d and labels[b, c] > 0 and (pairs == "all" or labels[b, d] > 0)]
        torch.testing.assert_close(map_similarity(maps, labels, pairs), torch.stack(values).mean())
    with pytest.raises(ValueError, match="pairs='absent'"):
        map_similarity(maps, labels, "absent")


@pytest.mark.parametrize("pairs", ["all", "present"])
def test_objective_adds_the_weighted_map_similarity_with_patch_dropout(pairs: str) -> None:
    model = small_model().train()
    images, labels = torch.randn(2, 3, 16, 16), torch.tensor([[1.0, 0, 0], [0, 1.0, 1.0]])
    cfg = TrainConfig(gate_lambda=0.0, patch_dropout=0.5, map_decorrelation_weight=0.7,
                      map_decorrelation_pairs=pairs)
    torch.manual_seed(3)
    parts = WSSSObjective(cfg, "all", True)(model, {"image": images, "labels": labels}, "cpu")
    torch.manual_seed(3)
    out = model.forward_features(images, attn_blocks=[0, 1], patch_dropout=0.5)
    rows = [a[..., 3:3 + 8].mean(1) for a in out["attn"]]  # heads averaged, kept patches only
    expected = map_similarity((rows[0] + rows[1]) / 2, labels, pairs)
    torch.testing.assert_close(parts["decorrelation"], expected)
    bce = F.binary_cross_entropy_with_logits(model.forward_head(out["cls"]), labels)
    patch_bce = F.binary_cross_entropy_with_logits(model.patch_logits(out["patch"]), labels)
    torch.testing.assert_close(parts["loss"], bce + patch_bce + 0.7 * expected)
