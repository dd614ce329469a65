"""A small CNN ending in global average pooling + linear, whose class activation maps are exact."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ..cam import cam


class GAPConvNet(nn.Module):
    """Stages of two 3x3 conv + BN + ReLU (each stage after the first halves the resolution),
    global average pooling and a linear classifier; ``cam`` maps average exactly to the logits.

    >>> import torch
    >>> net = GAPConvNet(num_classes=4)
    >>> logits, maps = net.forward_with_maps(torch.randn(2, 3, 32, 32))
    >>> logits.shape, maps.shape
    (torch.Size([2, 4]), torch.Size([2, 4, 8, 8]))
    """

    def __init__(self, num_classes: int, in_chans: int = 3, widths: Sequence[int] = (16, 32, 64)):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_chans
        for i, width in enumerate(widths):
            layers += [nn.Conv2d(channels, width, 3, stride=1 if i == 0 else 2, padding=1,
                                 bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                       nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                       nn.ReLU()]
            channels = width
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))

    def forward_with_maps(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Logits [B,K] and exact class activation maps [B,K,h,w] (in the autograd graph)."""
        features = self.features(x)
        return self.fc(features.mean(dim=(2, 3))), cam(features, self.fc.weight, self.fc.bias)
