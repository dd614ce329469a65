"""Gate settings for short schedules: starting log-alpha and a separate gate learning rate."""

from __future__ import annotations

import math

import pytest
import torch

from attnmaps.engine.gate_schedule import scale_gate_lr, set_gate_init
from attnmaps.engine.optim import build_optimizer, warmup_cosine
from attnmaps.models.gates import GAMMA, ZETA
from attnmaps.models.vit import ClassTokenViT


def _model() -> ClassTokenViT:
    torch.manual_seed(0)
    return ClassTokenViT(3, img_size=(16, 16), patch_size=8, embed_dim=16, depth=2, num_heads=2)


def test_gate_init_sets_every_log_alpha() -> None:
    model = _model()
    assert set_gate_init(model, -1.5) == 4
    assert torch.allclose(model.gate_values(), torch.full((2, 2), 1 / (1 + math.exp(1.5))
                                                       * (ZETA - GAMMA) + GAMMA).clamp(0, 1))


def test_gates_get_their_own_scaled_group_that_the_schedule_follows() -> None:
    model = _model()
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.05, betas=(0.9, 0.95))
    before = sum(len(g["params"]) for g in optimizer.param_groups)
    scale_gate_lr(optimizer, 10.0)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == before
    gate_group = optimizer.param_groups[-1]
    assert all(n.endswith("log_alpha") for n in gate_group["param_names"])
    assert len(gate_group["params"]) == 2 and gate_group["lr"] == pytest.approx(1e-2)
    assert not any(n.endswith("log_alpha") for g in optimizer.param_groups[:-1]
                   for n in g["param_names"])
    scheduler = warmup_cosine(optimizer, total_steps=10, warmup_steps=2, min_lr_ratio=0.0)
    assert [g["lr"] for g in optimizer.param_groups][-1] == pytest.approx(1e-2 / 2)
    # one Adam step moves a gate by about its group's rate, whatever the gradient's size
    start = model.blocks[0].attn.gate.log_alpha.detach().clone()
    (0.01 * model.l0_penalty()).backward()  # lambda = 0.01: a gradient of about 2e-4
    optimizer.step()
    scheduler.step()
    moved = start - model.blocks[0].attn.gate.log_alpha.detach()
    assert torch.allclose(moved, torch.full_like(moved, 1e-2 / 2), rtol=1e-3)
    with pytest.raises(ValueError, match="gate_lr_scale"):
        scale_gate_lr(optimizer, 0.0)
