"""A GAP-CNN actor-critic for stable-baselines3 whose action maps are exact.

:class:`GAPCNN` is a features extractor: 3x3 convolutions (on the image plus two coordinate
channels, so that a sum of local evidence can still tell where things are) ending in global
average pooling. With ``net_arch=[]`` SB3's action and value heads are linear layers on the
pooled features, so the class activation map ``A_a = w_a . F + b_a`` of action ``a`` averages
exactly to its logit (:func:`attnmaps.cam.cam`). :class:`PolicyMaps` exposes the logits,
values and maps of a trained policy as functions of float images in [0, 1].

Example:
    >>> model = PPO("MultiInputPolicy", env, policy_kwargs=policy_kwargs())  # doctest: +SKIP
    >>> logits, values, maps = PolicyMaps(model.policy).maps(images)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..cam import cam
from . import require

spaces = require("gymnasium").spaces
torch_layers = require("stable_baselines3.common.torch_layers")
sb3_policies = require("stable_baselines3.common.policies")
preprocessing = require("stable_baselines3.common.preprocessing")


def image_space(observation_space) -> spaces.Box:
    """The image part of an observation space (a Box [C, H, W] or a Dict with ``"image"``)."""
    if isinstance(observation_space, spaces.Dict):
        if "image" not in observation_space.spaces:
            raise ValueError(f"dict observations need an 'image' key, got "
                             f"{list(observation_space.spaces)}")
        observation_space = observation_space["image"]
    if not isinstance(observation_space, spaces.Box) or len(observation_space.shape) != 3:
        raise ValueError(f"expected image observations [C, H, W], got {observation_space}")
    return observation_space


def coordinate_channels(images: Tensor) -> Tensor:
    """``images`` [B, C, H, W] with two channels appended: row and column in [-1, 1]."""
    batch, _, height, width = images.shape
    rows = torch.linspace(-1, 1, height, device=images.device, dtype=images.dtype)
    cols = torch.linspace(-1, 1, width, device=images.device, dtype=images.dtype)
    grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij")).expand(batch, 2, height, width)
    return torch.cat([images, grid], dim=1)


class GAPCNN(torch_layers.BaseFeaturesExtractor):
    """Conv layers (the first at stride 1, the second at stride 2) + ReLU, then global average
    pooling; ``features_dim = widths[-1]``. Reads only the ``"image"`` of dict observations."""

    def __init__(self, observation_space, widths: Sequence[int] = (16, 32, 32)):
        channels = image_space(observation_space).shape[0]
        super().__init__(observation_space, features_dim=widths[-1])
        layers: list[nn.Module] = []
        previous = channels + 2
        for i, width in enumerate(widths):
            layers += [nn.Conv2d(previous, width, 3, stride=2 if i == 1 else 1, padding=1),
                       nn.ReLU()]
            previous = width
        self.convs = nn.Sequential(*layers)

    def feature_maps(self, images: Tensor) -> Tensor:
        """Last feature maps [B, C, h, w] of float images [B, C_in, H, W]."""
        return self.convs(coordinate_channels(images))

    def forward(self, observations: Tensor | dict[str, Tensor]) -> Tensor:
        images = observations["image"] if isinstance(observations, dict) else observations
        return self.feature_maps(images).mean(dim=(2, 3))


def policy_kwargs(widths: Sequence[int] = (16, 32, 32)) -> dict:
    """``policy_kwargs`` for an SB3 actor-critic with a :class:`GAPCNN` and linear heads."""
    return {"features_extractor_class": GAPCNN, "features_extractor_kwargs": {"widths": widths},
            "net_arch": [], "share_features_extractor": True}


class PolicyMaps(nn.Module):
    """Logits, values and exact action maps of an SB3 actor-critic built with
    :func:`policy_kwargs`, as functions of float images [B, C, H, W] in [0, 1].

    ``forward(images)`` gives the action logits, so the module can be passed where a classifier
    is expected (:func:`attnmaps.losses.input_gradient`, faithfulness metrics).
    """

    def __init__(self, policy):
        super().__init__()
        if not isinstance(policy, sb3_policies.ActorCriticPolicy):
            raise TypeError(f"PolicyMaps needs an SB3 ActorCriticPolicy, got {type(policy)}")
        extractor = policy.features_extractor
        if not isinstance(extractor, GAPCNN) or not policy.share_features_extractor:
            raise ValueError("PolicyMaps needs one shared GAPCNN features extractor; build the "
                             "policy with attnmaps.rl.policy.policy_kwargs()")
        mlp = policy.mlp_extractor
        if len(mlp.policy_net) or len(mlp.value_net):
            raise ValueError("the action maps are exact only with linear heads: net_arch=[]")
        if not isinstance(policy.action_space, spaces.Discrete):
            raise TypeError(f"PolicyMaps needs a discrete action space, got "
                             f"{policy.action_space}")
        self.policy = policy

    def maps(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Logits [B, A], values [B] and action maps [B, A, h, w] (all in the graph);
        ``maps.mean((2, 3)) == logits``."""
        features = self.policy.features_extractor.feature_maps(images)
        pooled = features.mean(dim=(2, 3))
        head = self.policy.action_net
        logits = head(pooled)
        values = self.policy.value_net(pooled)[:, 0]
        return logits, values, cam(features, head.weight, head.bias)

    def forward(self, images: Tensor) -> Tensor:
        return self.maps(images)[0]

    def values(self, images: Tensor) -> Tensor:
        """State values [B]."""
        return self.maps(images)[1]

    def preprocess(self, observations: dict[str, Tensor]) -> dict[str, Tensor]:
        """SB3's preprocessing of stored observations (images scaled to [0, 1])."""
        return preprocessing.preprocess_obs(observations, self.policy.observation_space,
                                            normalize_images=self.policy.normalize_images)
