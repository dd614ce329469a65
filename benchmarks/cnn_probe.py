"""How fast does a plain CNN learn the scene set? The ViT's convolutional stem + global pooling +
a linear head (bias at the label prior), trained on the image labels; prints train BCE and the
tune split's mAP every ``--every`` steps. A diagnostic for the small-data section of the README.

    python benchmarks/cnn_probe.py --data data/digits --pool max --epochs 3
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
from attnmaps.engine.label_prior import init_head_bias, label_frequencies
from attnmaps.metrics.classification import MultiLabelMetric
from attnmaps.models.vit import ConvStemPatchEmbed

CONFIG = Path(__file__).resolve().parents[1] / "src" / "attnmaps" / "configs" / "digits.yaml"


class PooledCNN(nn.Module):
    """Convolutional stem, global average or max pooling, linear head (``head_type`` "joint"
    so that :func:`init_head_bias` finds ``head.bias``)."""

    head_type = "joint"

    def __init__(self, num_classes: int, dim: int, patch_size: int, pool: str):
        super().__init__()
        self.num_classes = num_classes
        self.stem = ConvStemPatchEmbed(3, dim, patch_size)
        self.head = nn.Linear(dim, num_classes)
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.stem(x)
        pooled = features.amax((2, 3)) if self.pool == "max" else features.mean((2, 3))
        return self.head(pooled)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="scene set (attnmaps synth)")
    parser.add_argument("--pool", choices=("mean", "max"), default="mean")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--every", type=int, default=47)
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = load_config(CONFIG, [f"data.root={args.data}"])
    train_set = build_dataset(cfg.data, "train", train=True)
    tune_set = build_dataset(cfg.data, "tune", train=False)
    model = PooledCNN(train_set.num_classes, cfg.model.embed_dim, cfg.model.patch_size, args.pool)
    init_head_bias(model, label_frequencies(train_set))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95),
                                  weight_decay=cfg.train.weight_decay)
    loader = torch.utils.data.DataLoader(train_set, batch_size=cfg.train.batch_size,
                                         shuffle=True, drop_last=True)
    step, started = 0, time.time()
    for _ in range(args.epochs):
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
