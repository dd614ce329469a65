"""A plain-PyTorch re-creation of the reference design, the baseline of the speed benchmarks.

The reference implementation of "Know Your Attention Maps" (ICCV 2025) computes attention
explicitly in every block (``q @ k^T``, softmax, ``@ v``), returns every block's full
[B, heads, N, N] attention, stacks them across blocks and keeps the stack for the class maps
(mean over heads, sum over blocks, class-token rows, patch columns); it masks class tokens with
a Python loop over images x classes and reads the logits from all class tokens at once with a
K*D -> K linear layer; the loss is BCE on the sigmoid outputs plus the L0 gate penalty. Pseudo
masks are made image by image: per predicted class in order of increasing probability the map
is upsampled, normalized and thresholded, and unassigned pixels are then filled by a per-pixel
breadth-first search from their assigned neighbours.

:class:`ReferenceViT` has the parameters (names and shapes) of ``attnmaps``' ``ClassTokenViT``
with ``head="joint"``, ``stem="linear"`` and position embeddings on the patches only, so
``ReferenceViT(...).load_state_dict(class_token_vit.state_dict())`` copies a model exactly and
both compute the same function; only the execution differs. Two deliberate simplifications keep
the comparison fair to the reference: its unused convolutional CAM head and the position
embeddings of class and register tokens are left out, and the gates multiply the head outputs
(the reference multiplies the [B, heads, N, N] attention by the gates, the same numbers at the
cost of another N x N tensor per block).
"""

from __future__ import annotations

import math
import random
from collections import OrderedDict, deque
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

GAMMA, ZETA = -0.1, 1.1
UNASSIGNED = -1


class ReferenceGate(nn.Module):
    """Hard-Concrete gate per head: sampled in training, deterministic in evaluation."""

    def __init__(self, num_heads: int, temperature: float = 0.33, init_log_alpha: float = 3.0):
        super().__init__()
        self.temperature = temperature
        self.log_alpha = nn.Parameter(torch.full((num_heads,), init_log_alpha))

    def forward(self) -> Tensor:
        if self.training:
            u = torch.rand_like(self.log_alpha).clamp(1e-6, 1 - 1e-6)
            s = torch.sigmoid((torch.log(u) - torch.log(1 - u) + self.log_alpha) / self.temperature)
        else:
            s = torch.sigmoid(self.log_alpha)
        return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)

    def penalty(self) -> Tensor:
        """Expected number of open gates."""
        return torch.sigmoid(self.log_alpha - self.temperature * math.log(-GAMMA / ZETA)).sum()


class ReferenceAttention(nn.Module):
    """Explicit multi-head attention that returns its full softmax attention [B, heads, N, N]."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.gate = ReferenceGate(num_heads)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        heads = (attn @ v) * self.gate().view(1, -1, 1, 1)
        return self.proj(heads.transpose(1, 2).reshape(batch, tokens, dim)), attn


class ReferenceBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = ReferenceAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(OrderedDict(fc1=nn.Linear(dim, hidden), act=nn.GELU(),
                                             fc2=nn.Linear(hidden, dim)))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out, attn = self.attn(self.norm1(x))
        x = x + out
        return x + self.mlp(self.norm2(x)), attn


class PatchProjection(nn.Module):
    def __init__(self, in_chans: int, dim: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)


class ReferenceViT(nn.Module):
    """K class tokens, patches, R register tokens; every block's attention kept.

    ``forward(x, labels)`` returns ``(logits [B,K], maps [B,K,h,w], attn [depth,B,heads,N,N])``.
    With ``labels`` the output of every absent class's token is zeroed with probability
    ``mask_rate``, decided per image and class by ``random.random()`` in a Python loop.
    """

    def __init__(self, num_classes: int, in_chans: int = 3, img_size: Sequence[int] = (224, 224),
                 patch_size: int = 16, embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
                 mlp_ratio: float = 4.0, num_registers: int = 1, mask_rate: float = 0.5):
        super().__init__()
        self.num_classes = num_classes
        self.mask_rate = mask_rate
        self.grid = (img_size[0] // patch_size, img_size[1] // patch_size)
        self.patch_embed = PatchProjection(in_chans, embed_dim, patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1], embed_dim))
        self.cls_token = nn.Parameter(torch.zeros(1, num_classes, embed_dim))
        self.reg_token = nn.Parameter(torch.zeros(1, num_registers, embed_dim))
        self.blocks = nn.ModuleList(ReferenceBlock(embed_dim, num_heads, mlp_ratio)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(num_classes * embed_dim, num_classes)
        for p in (self.pos_embed, self.cls_token, self.reg_token):
            nn.init.trunc_normal_(p, std=0.02)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        batch, k = x.shape[0], self.num_classes
        patches = self.patch_embed.proj(x).flatten(2).transpose(1, 2) + self.pos_embed
        tokens = torch.cat([self.cls_token.expand(batch, -1, -1), patches,
                            self.reg_token.expand(batch, -1, -1)], dim=1)
        weights = []
        for block in self.blocks:
            tokens, attn = block(tokens)
            weights.append(attn)
        tokens = self.norm(tokens)
        attn = torch.stack(weights)
        n = self.grid[0] * self.grid[1]
        maps = attn.mean(2).sum(0)[:, :k, k:k + n].reshape(batch, k, *self.grid)
        features = tokens[:, :k]
        if labels is not None:
            for b in range(labels.shape[0]):
                for c in range(k):
                    if labels[b, c] == 0 and random.random() < self.mask_rate:
                        features[b, c, :] = torch.zeros_like(features[b, c, :])
        return self.head(features.reshape(batch, -1)), maps, attn

    def l0_penalty(self) -> Tensor:
        return torch.stack([block.attn.gate.penalty() for block in self.blocks]).sum()


def reference_loss(model: ReferenceViT, logits: Tensor, labels: Tensor,
                   gate_lambda: float = 0.01) -> Tensor:
    """BCE on the sigmoid outputs plus ``gate_lambda`` times the L0 penalty."""
    # The official code's BCE(sigmoid(x)), written with logits: the same maths, and allowed under
    # CUDA autocast.
    return (F.binary_cross_entropy_with_logits(logits, labels)
            + gate_lambda * model.l0_penalty())


def bfs_fill(labels: np.ndarray, to_fill: int = UNASSIGNED) -> np.ndarray:
    """Give every ``to_fill`` pixel of ``labels`` [H, W] the label of the assigned pixel that a
    4-neighbour breadth-first search from all assigned pixels reaches it from first (in place).
    """
    rows, cols = labels.shape
    steps = ((-1, 0), (1, 0), (0, -1), (0, 1))
    queue: deque[tuple[int, int, int]] = deque()
    for i in range(rows):
        for j in range(cols):
            if labels[i, j] != to_fill:
                for di, dj in steps:
                    ni, nj = i + di, j + dj
                    if 0 <= ni < rows and 0 <= nj < cols and labels[ni, nj] == to_fill:
                        queue.append((ni, nj, labels[i, j]))
    while queue:
        i, j, value = queue.popleft()
        if labels[i, j] != to_fill:
            continue
        labels[i, j] = value
        for di, dj in steps:
            ni, nj = i + di, j + dj
            if 0 <= ni < rows and 0 <= nj < cols and labels[ni, nj] == to_fill:
                queue.append((ni, nj, value))
    return labels


def reference_pseudo_masks(maps: Tensor, probs: Tensor, image_size: tuple[int, int],
                           threshold: float = 0.3, prob_threshold: float = 0.5) -> Tensor:
    """Pseudo masks [B, H, W] (no background) image by image, class by class.

    Classes with ``probs >= prob_threshold`` (else the most probable one, as in ``attnmaps``)
    are painted in order of increasing probability: bilinear upsampling of the class map,
    min-max normalization, ``>= threshold``. Unpainted pixels are filled by :func:`bfs_fill`;
    pixels still unassigned (nothing painted at all) become 0.
    """
    out = []
    for image_maps, image_probs in zip(maps, probs):
        selected = (image_probs >= prob_threshold).tolist()
        if not any(selected):
            selected[int(image_probs.argmax())] = True
        labels = np.full(tuple(image_size), UNASSIGNED, dtype=np.int64)
        for c in sorted(range(len(selected)), key=lambda c: float(image_probs[c])):
            if not selected[c]:
                continue
            full = F.interpolate(image_maps[c][None, None], size=tuple(image_size),
                                 mode="bilinear", align_corners=False)[0, 0].numpy()
            low, high = full.min(), full.max()
            full = (full - low) / (high - low) if high > low else np.zeros_like(full)
            labels[full >= threshold] = c
        labels = bfs_fill(labels)
        labels[labels == UNASSIGNED] = 0
        out.append(torch.from_numpy(labels))
    return torch.stack(out)
