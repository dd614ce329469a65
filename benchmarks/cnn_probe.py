"""How fast does a plain CNN learn the scene set? The ViT's convolutional stem (``--arch stem``)
or a small residual network (``--arch resnet``) + global pooling + a linear head (bias at the
label prior), trained on the image labels with the config's rotation and zoom curriculum
(``data.rotate`` / ``data.zoom`` from ``data.rotate_start_epoch`` / ``data.zoom_start_epoch``);
prints train BCE and the tune split's mAP every ``--every`` steps. A diagnostic for the small-data section of the README (would a CNN
teacher learn faster than the ViT?).

    python benchmarks/cnn_probe.py --data data/digits --pool max --epochs 3
    python benchmarks/cnn_probe.py --data data/digits --arch resnet --pool max --epochs 12
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from attnmaps.config import load_config
from attnmaps.data.registry import build_dataset
from attnmaps.data.transforms import set_geometry_at_epoch
from attnmaps.engine.label_prior import init_head_bias, label_frequencies
from attnmaps.metrics.classification import MultiLabelMetric
from attnmaps.models.vit import ConvStemPatchEmbed

CONFIG = Path(__file__).resolve().parents[1] / "src" / "attnmaps" / "configs" / "digits.yaml"


class ResidualBlock(nn.Module):
    """Two 3x3 conv + BN (the first with ``stride``), ReLU, and a 1x1 projection shortcut where
    the shape changes (He et al. 2016)."""

    def __init__(self, in_chans: int, out_chans: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_chans, out_chans, 3, stride, 1, bias=False), nn.BatchNorm2d(out_chans),
            nn.ReLU(inplace=True), nn.Conv2d(out_chans, out_chans, 3, 1, 1, bias=False),
            nn.BatchNorm2d(out_chans))
        same = in_chans == out_chans and stride == 1
        self.shortcut = nn.Identity() if same else nn.Sequential(
            nn.Conv2d(in_chans, out_chans, 1, stride, bias=False), nn.BatchNorm2d(out_chans))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


def residual_features(width: int) -> nn.Sequential:
    """A 3x3 conv at full resolution, then residual blocks of width w, 2w, 4w (each halving the
    resolution) and 4w: an 8x smaller feature grid with 4w channels."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
        ResidualBlock(width, width, 2), ResidualBlock(width, 2 * width, 2),
        ResidualBlock(2 * width, 4 * width, 2), ResidualBlock(4 * width, 4 * width, 1))


class PooledCNN(nn.Module):
    """Convolutional features, global average or max pooling, linear head (``head_type``
    "joint" so that :func:`init_head_bias` finds ``head.bias``)."""

    head_type = "joint"

    def __init__(self, num_classes: int, features: nn.Module, channels: int, pool: str):
        super().__init__()
        self.num_classes = num_classes
        self.stem = features
        self.head = nn.Linear(channels, num_classes)
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.stem(x)
        pooled = features.amax((2, 3)) if self.pool == "max" else features.mean((2, 3))
        return self.head(pooled)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="scene set (attnmaps synth)")
    parser.add_argument("--pool", choices=("mean", "max"), default="mean")
    parser.add_argument("--arch", choices=("stem", "resnet"), default="stem",
                        help="the ViT's conv stem, or a residual CNN of --width (16: 152k weights)")
    parser.add_argument("--width", type=int, default=16, help="--arch resnet's first width")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--every", type=int, default=47)
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = load_config(CONFIG, [f"data.root={args.data}", "data.early_size_epochs=0"])
    train_set = build_dataset(cfg.data, "train", train=True)
    tune_set = build_dataset(cfg.data, "tune", train=False)
    if args.arch == "stem":
        features = ConvStemPatchEmbed(3, cfg.model.embed_dim, cfg.model.patch_size)
        channels = cfg.model.embed_dim
    else:
        features, channels = residual_features(args.width), 4 * args.width
    model = PooledCNN(train_set.num_classes, features, channels, args.pool)
    init_head_bias(model, label_frequencies(train_set))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95),
                                  weight_decay=cfg.train.weight_decay)
    loader = torch.utils.data.DataLoader(train_set, batch_size=cfg.train.batch_size,
                                         shuffle=True, drop_last=True)
    step, started = 0, time.time()
    for epoch in range(args.epochs):
        set_geometry_at_epoch(train_set, cfg.data, epoch)
        for batch in loader:
            model.train()
            loss = F.binary_cross_entropy_with_logits(model(batch["image"]), batch["labels"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if step % args.every == 0:
                model.eval()
                metric = MultiLabelMetric(train_set.num_classes)
                with torch.no_grad():
                    for held in torch.utils.data.DataLoader(tune_set, batch_size=100):
                        metric.update(torch.sigmoid(model(held["image"])), held["labels"])
                print(f"step {step}: train BCE {loss.item():.3f}  tune mAP "
                      f"{metric.compute()['map']:.3f}  ({time.time() - started:.0f} s)",
                      flush=True)


if __name__ == "__main__":
    main()
