"""``model.init_from`` takes attnmaps checkpoints as they are and converts foreign ViT ones."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from attnmaps.config import load_config
from attnmaps.models.factory import create_model

OVERRIDES = ["model.img_size=16,16", "model.patch_size=8", "model.embed_dim=24", "model.depth=2",
             "model.num_heads=2", "model.stem=linear"]


def timm_state_dict(dim: int = 24, depth: int = 2, grid: int = 2) -> dict[str, torch.Tensor]:
    """Random weights under timm's ViT key names and shapes (patch 8, 3 channels)."""
    g = torch.Generator().manual_seed(0)
    sd = {"cls_token": torch.randn(1, 1, dim, generator=g),
          "pos_embed": torch.randn(1, 1 + grid * grid, dim, generator=g),
          "patch_embed.proj.weight": torch.randn(dim, 3, 8, 8, generator=g),
          "patch_embed.proj.bias": torch.randn(dim, generator=g),
          "norm.weight": torch.randn(dim, generator=g), "norm.bias": torch.randn(dim, generator=g),
          "head.weight": torch.randn(1000, dim, generator=g), "head.bias": torch.zeros(1000)}
    for i in range(depth):
        shapes = {"norm1.weight": (dim,), "norm1.bias": (dim,), "attn.qkv.weight": (3 * dim, dim),
                  "attn.qkv.bias": (3 * dim,), "attn.proj.weight": (dim, dim),
                  "attn.proj.bias": (dim,), "norm2.weight": (dim,), "norm2.bias": (dim,),
                  "mlp.fc1.weight": (4 * dim, dim), "mlp.fc1.bias": (4 * dim,),
                  "mlp.fc2.weight": (dim, 4 * dim), "mlp.fc2.bias": (dim,)}
        sd.update({f"blocks.{i}.{k}": torch.randn(*s, generator=g) for k, s in shapes.items()})
    return sd


def test_foreign_checkpoint_is_converted(tmp_path: Path) -> None:
    sd = timm_state_dict()
    path = tmp_path / "deit.pth"
    torch.save(sd, path)
    cfg = load_config(None, [*OVERRIDES, f"model.init_from={path}"])
    model = create_model(cfg.model, num_classes=3, init_from=cfg.model.init_from)
    torch.testing.assert_close(model.patch_embed.proj.weight, sd["patch_embed.proj.weight"])
    torch.testing.assert_close(model.blocks[1].mlp.fc2.weight, sd["blocks.1.mlp.fc2.weight"])
    expected_cls = (sd["cls_token"] + sd["pos_embed"][:, :1]).expand(1, 3, 24)
    torch.testing.assert_close(model.cls_token, expected_cls)


def test_own_checkpoint_loads_as_is_and_missing_files_are_named(tmp_path: Path) -> None:
    from safetensors.torch import save_model

    cfg = load_config(None, OVERRIDES)
    source = create_model(cfg.model, num_classes=3)
    path = tmp_path / "own.safetensors"
    save_model(source, str(path))
    cfg = load_config(None, [*OVERRIDES, f"model.init_from={path}"])
    model = create_model(cfg.model, num_classes=3, init_from=cfg.model.init_from)
    for name, value in source.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value)
    cfg = load_config(None, [*OVERRIDES, f"model.init_from={tmp_path / 'nope.pth'}"])
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        create_model(cfg.model, num_classes=3, init_from=cfg.model.init_from)
