"""A light all-MLP decoder (SegFormer style) over the patch tokens of several ViT blocks.

Each block's tokens [B,N,D] go through LayerNorm + Linear(D, dim); the levels are concatenated
and fused by a 1x1 convolution (BN, ReLU). With ``low_level_dim > 0`` a two-convolution branch
reads the image at half resolution (as DeepLabV3+'s low-level features), and a 3x3 convolution
fuses it with the upsampled token features there; a 1x1 convolution gives the logits, upsampled
bilinearly to the input size.

Example:
    >>> decoder = AllMLPDecoder(in_dim=16, num_levels=2, num_labels=3, dim=8, in_chans=3,
    ...                         low_level_dim=4)
    >>> tokens = [torch.randn(2, 16, 16) for _ in range(2)]  # 2 blocks, 4 x 4 patches, D = 16
    >>> decoder(tokens, (4, 4), torch.randn(2, 3, 16, 16)).shape
    torch.Size([2, 3, 16, 16])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def conv_bn_relu(in_channels: int, out_channels: int, kernel: int, stride: int = 1) -> nn.Sequential:
    """Convolution (no bias, same padding), BatchNorm, ReLU."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2,
                                   bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class AllMLPDecoder(nn.Module):
    """Segmentation logits [B,L,H,W] from ``num_levels`` token maps and the image (see the
    module doc)."""

    def __init__(self, in_dim: int, num_levels: int, num_labels: int, dim: int = 64,
                 in_chans: int = 3, low_level_dim: int = 32, dropout: float = 0.1):
        super().__init__()
        if num_levels < 1:
            raise ValueError(f"the decoder needs the tokens of at least one block, got {num_levels}")
        self.levels = nn.ModuleList(nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, dim))
                                    for _ in range(num_levels))
        self.fuse = conv_bn_relu(num_levels * dim, dim, 1)
        self.low_level = (nn.Sequential(conv_bn_relu(in_chans, low_level_dim, 3, stride=2),
                                        conv_bn_relu(low_level_dim, low_level_dim, 3))
                          if low_level_dim else None)
        self.refine = conv_bn_relu(dim + low_level_dim, dim, 3) if low_level_dim else None
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(dim, num_labels, 1)

    def forward(self, tokens: Sequence[Tensor], grid: tuple[int, int], image: Tensor) -> Tensor:
        if len(tokens) != len(self.levels):
            raise ValueError(f"got the tokens of {len(tokens)} blocks, the decoder was built for "
                             f"{len(self.levels)}")
        maps = [level(t).transpose(1, 2).reshape(t.shape[0], -1, *grid)
                for level, t in zip(self.levels, tokens)]
        x = self.fuse(torch.cat(maps, dim=1))
        if self.low_level is not None:
            low = self.low_level(image)
            x = F.interpolate(x, size=low.shape[-2:], mode="bilinear", align_corners=False)
            x = self.refine(torch.cat([x, low], dim=1))
        logits = self.classifier(self.dropout(x))
        return F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False)
