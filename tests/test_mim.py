"""SimMIM pretraining: patch layout, loss on hidden patches only, token hiding, the command."""

from __future__ import annotations

import pytest
import torch

from attnmaps.checkpoint import load_weights
from attnmaps.config import load_config
from attnmaps.data.synthetic import write_synthetic_voc
from attnmaps.engine.pretrain import pretrain
from attnmaps.models.factory import create_model
from attnmaps.models.mim import (
    MaskedImageModel,
    masked_patch_l1,
    patchify,
    random_patch_mask,
)
from attnmaps.models.vit import ClassTokenViT


def _encoder() -> ClassTokenViT:
    torch.manual_seed(0)
    return ClassTokenViT(3, img_size=(16, 24), patch_size=8, embed_dim=16, depth=1, num_heads=2,
                         stem="linear")


def test_patchify_matches_a_loop() -> None:
    images = torch.randn(2, 3, 16, 24)
    patches = patchify(images, 8)
    assert patches.shape == (2, 6, 192)
    for b in range(2):
        for n in range(6):
            i, j = divmod(n, 3)
            block = images[b, :, 8 * i:8 * i + 8, 8 * j:8 * j + 8].permute(1, 2, 0).reshape(-1)
            assert torch.equal(patches[b, n], block)


def test_loss_counts_hidden_patches_only() -> None:
    pred, target = torch.randn(2, 4, 5), torch.randn(2, 4, 5)
    mask = torch.tensor([[True, False, False, True], [False, False, True, False]])
    expected = torch.stack([(pred[b, n] - target[b, n]).abs().mean() for b, n in
                            mask.nonzero().tolist()]).mean()
    assert torch.allclose(masked_patch_l1(pred, target, mask), expected)
    changed = pred.clone()
    changed[~mask] += 100.0  # visible patches do not count
    assert torch.allclose(masked_patch_l1(changed, target, mask), expected)


def test_mask_hides_exactly_the_ratio() -> None:
    mask = random_patch_mask(5, (4, 6), 0.6, torch.Generator().manual_seed(0))
    assert mask.shape == (5, 4, 6) and (mask.flatten(1).sum(1) == round(0.6 * 24)).all()
    with pytest.raises(ValueError, match="mask_ratio"):
        random_patch_mask(1, (2, 2), 1.0)


def test_hidden_patches_become_the_mask_token_and_nothing_leaks() -> None:
    torch.manual_seed(0)
    encoder = ClassTokenViT(3, img_size=(16, 24), patch_size=8, embed_dim=16, depth=1,
                            num_heads=2, stem="conv", gates=False)
    mim = MaskedImageModel(encoder).eval()
    captured = []
    encoder.patch_embed.register_forward_hook(lambda m, i, o: captured.append(o))
    images = torch.randn(1, 3, 16, 24)
    mask = torch.zeros(1, 2, 3, dtype=torch.bool)
    mask[0, 1, 2] = True
    with torch.no_grad():
        pred = mim.reconstruct(images, mask)
        assert torch.allclose(captured[-1][0, :, 1, 2], mim.mask_token.flatten())
        other = images.clone()
        other[..., 8:16, 16:24] = 5.0  # change only the hidden patch's pixels
        assert torch.allclose(mim.reconstruct(other, mask), pred, atol=1e-6)  # no leak
        assert mim(images, mask).item() != mim(other, mask).item()  # the target differs
        plain = encoder.forward_features(images)["patch"]  # no mask: the encoder as it is
        mim_free = ClassTokenViT(3, img_size=(16, 24), patch_size=8, embed_dim=16, depth=1,
                                 num_heads=2, stem="conv", gates=False).eval()
        mim_free.load_state_dict(encoder.state_dict())
        assert torch.allclose(plain, mim_free.forward_features(images)["patch"], atol=1e-6)


def test_pretrain_writes_a_checkpoint_that_init_from_loads(tmp_path) -> None:
    data = write_synthetic_voc(tmp_path / "data", num_train=8, num_val=2, size=(16, 16))
    cfg = load_config(None, [f"data.root={data}", f"out_dir={tmp_path / 'mim'}",
                             "model.img_size=16,16", "model.patch_size=8", "model.embed_dim=16",
                             "model.depth=1", "model.num_heads=2", "pretrain.epochs=1",
                             "pretrain.batch_size=4", "train.device=cpu"])
    result = pretrain(cfg)
    assert result["loss"] > 0
    model = create_model(cfg.model, 4)
    load_weights(tmp_path / "mim" / "last.safetensors", model)
    with pytest.raises(FileExistsError):
        pretrain(cfg)
