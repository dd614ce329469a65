"""The GAP-CNN policy's exact action maps, the guidance term and GuidedPPO."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("gymnasium")
pytest.importorskip("stable_baselines3")

from stable_baselines3 import PPO
from stable_baselines3.common.vec_env import DummyVecEnv

from attnmaps.losses import CAMALLoss
from attnmaps.rl.catch import make_catch
from attnmaps.rl.guidance import METHODS, guidance_loss
from attnmaps.rl.guided_ppo import GuidedPPO
from attnmaps.rl.observation import MaskObservation
from attnmaps.rl.policy import GAPCNN, PolicyMaps, coordinate_channels, policy_kwargs

PPO_ARGS = {"n_steps": 32, "batch_size": 32, "n_epochs": 2, "device": "cpu", "verbose": 0}


def _env(n: int = 2, mask_fraction: float = 1.0) -> DummyVecEnv:
    return DummyVecEnv([lambda: MaskObservation(make_catch("train"), mask_fraction)
                        for _ in range(n)])


def _model(cls=GuidedPPO, seed: int = 0, **kwargs):
    return cls("MultiInputPolicy", _env(), policy_kwargs=policy_kwargs((4, 8, 8)), seed=seed,
               **PPO_ARGS, **kwargs)


def _batch(n: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    env = MaskObservation(make_catch("train"))
    frames = [env.reset(seed=seed + i)[0] for i in range(n)]
    return {k: torch.as_tensor(np.stack([f[k] for f in frames])) for k in frames[0]}


def test_coordinate_channels_by_hand() -> None:
    out = coordinate_channels(torch.zeros(1, 1, 3, 2))
    torch.testing.assert_close(out[0, 1], torch.tensor([[-1.0, -1.0], [0.0, 0.0], [1.0, 1.0]]))
    torch.testing.assert_close(out[0, 2], torch.tensor([[-1.0, 1.0]] * 3))


def test_action_maps_decompose_the_logits_over_space() -> None:
    torch.manual_seed(0)
    model = _model(cls=PPO)
    net = PolicyMaps(model.policy)
    observations = _batch()
    images = net.preprocess(observations)["image"]
    logits, values, maps = net.maps(images)
    torch.testing.assert_close(maps.mean(dim=(2, 3)), logits, rtol=1e-5, atol=1e-6)
    # Brute force: each location's contribution is the head applied to its feature vector.
    features = model.policy.features_extractor.feature_maps(images)
    head = model.policy.action_net
    by_hand = torch.stack([torch.stack([head(features[:, :, i, j]) for j in range(maps.shape[3])],
                                       -1) for i in range(maps.shape[2])], -2)
    torch.testing.assert_close(maps, by_hand, rtol=1e-5, atol=1e-6)
    # The same logits and values as SB3's own forward pass on the stored observations.
    distribution = model.policy.get_distribution(observations)
    torch.testing.assert_close(distribution.distribution.probs, logits.softmax(1))
    torch.testing.assert_close(model.policy.predict_values(observations)[:, 0], values)


def test_policy_never_sees_the_mask() -> None:
    net = PolicyMaps(_model(cls=PPO).policy)
    observations = _batch()
    flipped = {**observations, "mask": 1 - observations["mask"],
               "has_mask": 1 - observations["has_mask"]}
    a = net.policy.get_distribution(observations).distribution.logits
    b = net.policy.get_distribution(flipped).distribution.logits
    torch.testing.assert_close(a, b)


def test_policy_maps_refuses_hidden_layers() -> None:
    kwargs = {**policy_kwargs((4, 8, 8)), "net_arch": [16]}
    model = PPO("MultiInputPolicy", _env(), policy_kwargs=kwargs, **PPO_ARGS)
    with pytest.raises(ValueError, match="net_arch"):
        PolicyMaps(model.policy)
    with pytest.raises(ValueError, match="image"):
        GAPCNN(MaskObservation(make_catch()).observation_space["mask"])


@pytest.mark.parametrize("method", [m for m in METHODS if m != "none"])
def test_guidance_reaches_the_weights_only_through_frames_with_masks(method: str) -> None:
    torch.manual_seed(0)
    net = PolicyMaps(_model(cls=PPO).policy)
    observations, actions = _batch(6), torch.tensor([0, 1, 2, 0, 1, 2])
    has = torch.tensor([1, 0, 1, 0, 1, 0], dtype=torch.uint8).view(-1, 1)
    observations["has_mask"] = has

    def gradients(obs):
        net.zero_grad()
        guidance_loss(net, obs, actions, method).backward()
        return [p.grad.clone() for p in net.parameters() if p.grad is not None]

    reference = gradients(observations)
    assert any(g.abs().sum() > 0 for g in reference)
    # Changing the frames without masks (image, mask, action) changes nothing.
    changed = {k: v.clone() for k, v in observations.items()}
    changed["image"][1::2] = torch.randint(0, 256, changed["image"][1::2].shape, dtype=torch.uint8)
    changed["mask"][1::2] = 1
    for a, b in zip(reference, gradients(changed)):
        torch.testing.assert_close(a, b)
    # The same as the term computed on the masked frames alone.
    alone = {k: v[::2] for k, v in observations.items()}
    loss_all = guidance_loss(net, observations, actions, method)
    loss_alone = guidance_loss(net, alone, actions[::2], method)
    torch.testing.assert_close(loss_all, loss_alone)
    observations["has_mask"] = torch.zeros_like(has)
    assert guidance_loss(net, observations, actions, method) is None


def test_camal_term_equals_camal_loss_on_the_taken_actions_map() -> None:
    net = PolicyMaps(_model(cls=PPO).policy)
    observations, actions = _batch(4), torch.tensor([2, 0, 1, 1])
    images = net.preprocess(observations)["image"]
    _, _, maps = net.maps(images)
    expected = CAMALLoss()(maps[torch.arange(4), actions], observations["mask"].bool(),
                           torch.ones(4, dtype=torch.bool))
    torch.testing.assert_close(guidance_loss(net, observations, actions, "camal"), expected)


def _parameters(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.policy.parameters()]


def test_guided_ppo_is_plain_ppo_without_masked_frames_and_repeats_with_its_seed() -> None:
    def make(cls, mask_fraction: float, **kwargs):
        return cls("MultiInputPolicy", _env(mask_fraction=mask_fraction), seed=3,
                   policy_kwargs=policy_kwargs((4, 8, 8)), **PPO_ARGS, **kwargs).learn(64)

    plain = make(PPO, 1.0)
    unmasked = make(GuidedPPO, 0.0, guidance="camal")
    camal = make(GuidedPPO, 1.0, guidance="camal", guidance_weight=0.5)
    again = make(GuidedPPO, 1.0, guidance="camal", guidance_weight=0.5)
    for a, b in zip(_parameters(plain), _parameters(unmasked)):
        torch.testing.assert_close(a, b)
    for a, b in zip(_parameters(again), _parameters(camal)):
        torch.testing.assert_close(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(_parameters(plain), _parameters(camal)))
    assert "evaluate_actions" not in vars(camal.policy)  # the per-train wrapper is gone
    assert not camal.policy.optimizer._optimizer_step_pre_hooks


def test_guided_ppo_checks_its_arguments() -> None:
    with pytest.raises(ValueError, match="unknown guidance method 'cam'"):
        _model(guidance="cam")
    with pytest.raises(ValueError, match="guidance_weight"):
        _model(guidance="camal", guidance_weight=-1.0)
