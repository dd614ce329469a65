"""Helpers shared by the ViT tests."""

from __future__ import annotations

import torch
from torch import nn


def randomise(model: nn.Module, std: float = 0.3) -> nn.Module:
    """Large random parameters so attention is far from uniform and heads differ."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)
    return model
