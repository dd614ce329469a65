"""Score a trained policy: greedy returns, and the alignment and faithfulness of its action maps
on held-out frames with exact masks.

Faithfulness uses the map of the greedy action on each frame: deletion / insertion AUC
(:func:`~attnmaps.metrics.faithfulness.deletion_insertion_auc`, background-colored zeros as the
baseline) of that action's probability and of the state value, ROAD MoRF / LeRF of the action's
probability, and how often the greedy action changes when the ``flip_fraction`` most attended
pixels (``action_flip``) or as many random pixels (``action_flip_random``) are set to zero.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..metrics.alignment import AlignmentMetric
from ..metrics.faithfulness import deletion_insertion_auc, road
from .policy import PolicyMaps

EnvFactory = Callable[[], object]


def to_images(frames: np.ndarray | list[np.ndarray]) -> Tensor:
    """uint8 frames [N, C, H, W] as float images in [0, 1]."""
    return torch.from_numpy(np.asarray(frames)).float() / 255.0


def greedy_actions(net: PolicyMaps, images: Tensor) -> Tensor:
    with torch.no_grad():
        return net(images).argmax(1)


def greedy_returns(net: PolicyMaps, make_env: EnvFactory, episodes: int,
                   first_seed: int) -> list[float]:
    """Undiscounted return of each of ``episodes`` greedy episodes, reset with seeds
    ``first_seed, first_seed + 1, ...``."""
    env, returns = make_env(), []
    for episode in range(episodes):
        frame, _ = env.reset(seed=first_seed + episode)
        total, done = 0.0, False
        while not done:
            action = int(greedy_actions(net, to_images(frame[None]))[0])
            frame, reward, terminated, truncated, _ = env.step(action)
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    return returns


def held_out_frames(net: PolicyMaps, make_env: EnvFactory, episodes: int,
                    first_seed: int) -> tuple[Tensor, Tensor]:
    """Float images [N, C, H, W] and bool masks [N, H, W] of every non-terminal frame met by
    the greedy policy in ``episodes`` episodes."""
    env, frames, masks = make_env(), [], []
    for episode in range(episodes):
        frame, info = env.reset(seed=first_seed + episode)
        done = False
        while not done:
            frames.append(frame)
            masks.append(info["mask"])
            action = int(greedy_actions(net, to_images(frame[None]))[0])
            frame, _, terminated, truncated, info = env.step(action)
            done = terminated or truncated
    return to_images(frames), torch.from_numpy(np.stack(masks))


def greedy_maps(net: PolicyMaps, images: Tensor) -> tuple[Tensor, Tensor]:
    """Greedy actions [N] and their maps upsampled to the image and clipped at 0, [N, H, W]."""
    with torch.no_grad():
        logits, _, maps = net.maps(images)
    actions = logits.argmax(1)
    chosen = maps[torch.arange(len(actions)), actions].unsqueeze(1)
    full = F.interpolate(chosen, size=images.shape[-2:], mode="bilinear", align_corners=False)
    return actions, full[:, 0].clamp(min=0)


def flip_rate(net: PolicyMaps, images: Tensor, ranking: Tensor, fraction: float) -> float:
    """Share of frames whose greedy action changes when the ``fraction`` of pixels ranked first
    by ``ranking`` [N, H, W] (highest first, ties to the lower index) are set to zero."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"flip fraction={fraction} must lie in (0, 1)")
    flat = ranking.flatten(1)
    count = max(1, round(fraction * flat.shape[1]))
    top = flat.argsort(dim=1, descending=True, stable=True)[:, :count]
    keep = torch.ones_like(flat).scatter_(1, top, 0.0).view_as(ranking)
    before = greedy_actions(net, images)
    after = greedy_actions(net, images * keep[:, None])
    return (before != after).float().mean().item()


def score_frames(net: PolicyMaps, images: Tensor, masks: Tensor, num_faithfulness: int,
                 flip_fraction: float = 0.1, seed: int = 0) -> dict[str, float]:
    """Alignment of the greedy action's map on all frames; faithfulness on the first
    ``num_faithfulness``."""
    actions, maps = greedy_maps(net, images)
    alignment = AlignmentMetric(tolerance=1)
    alignment.update(maps, masks)
    result = alignment.compute()

    images, maps = images[:num_faithfulness], maps[:num_faithfulness]
    actions = actions[:num_faithfulness]
    rows = torch.arange(len(actions))

    def probability(x: Tensor) -> Tensor:
        return net(x).softmax(1)[rows, actions]

    for name, score in (("", probability), ("value_", net.values)):
        for mode in ("deletion", "insertion"):
            result[f"{name}{mode}_auc"] = deletion_insertion_auc(
                score, images, maps, mode=mode, baseline="zeros").mean().item()
    for order in ("morf", "lerf"):
        result[f"road_{order}"] = road(probability, images, maps, (0.1, 0.3, 0.5),
                                       order=order).mean().item()
    generator = torch.Generator().manual_seed(seed)
    result["action_flip"] = flip_rate(net, images, maps, flip_fraction)
    result["action_flip_random"] = flip_rate(
        net, images, torch.rand(maps.shape, generator=generator), flip_fraction)
    return result
