"""Gate settings for short schedules: starting log-alpha, a separate gate learning rate and a
later start."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from attnmaps.config import load_config
from attnmaps.data.synthetic import write_synthetic_voc
from attnmaps.engine.gate_schedule import delay_gates, scale_gate_lr, set_gate_init
from attnmaps.engine.optim import build_optimizer, warmup_cosine
from attnmaps.engine.train import train
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


def test_delayed_gates_hold_still_then_follow_the_schedule() -> None:
    model = _model()
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.05, betas=(0.9, 0.95))
    scale_gate_lr(optimizer, 4.0)
    scheduler = warmup_cosine(optimizer, total_steps=10, warmup_steps=2, min_lr_ratio=0.1)
    delay_gates(scheduler, start_step=3)
    gate_group = optimizer.param_groups[-1]
    start = model.blocks[0].attn.gate.log_alpha.detach().clone()
    rates = []
    for step in range(10):
        rates.append((optimizer.param_groups[0]["lr"], gate_group["lr"]))
        if step == 3:  # the last step at rate 0 was step 2
            assert torch.equal(model.blocks[0].attn.gate.log_alpha.detach(), start)
        optimizer.zero_grad()
        (0.01 * model.l0_penalty()).backward()
        optimizer.step()
        scheduler.step()
    # by hand: warm-up (s + 1) / 2, then 0.1 + 0.9 * (1 + cos(pi * (s - 2) / 8)) / 2
    factor = [(s + 1) / 2 if s < 2 else 0.1 + 0.9 * (1 + math.cos(math.pi * (s - 2) / 8)) / 2
              for s in range(10)]
    assert [r[0] for r in rates] == pytest.approx([1e-3 * f for f in factor])
    assert [r[1] for r in rates] == pytest.approx([0.0] * 3 + [4e-3 * f for f in factor[3:]])
    assert not torch.equal(model.blocks[0].attn.gate.log_alpha.detach(), start)
    with pytest.raises(ValueError, match="scale_gate_lr"):
        fresh = build_optimizer(_model(), lr=1e-3, weight_decay=0.05, betas=(0.9, 0.95))
        delay_gates(warmup_cosine(fresh, 10, 2, 0.1), start_step=3)


def test_training_keeps_the_gates_until_gate_start_epoch(tmp_path) -> None:
    root = write_synthetic_voc(tmp_path / "data", num_train=16, num_val=4, size=(32, 32), seed=1)
    cfg = load_config(None, ["model.img_size=32,32", "model.patch_size=8", "model.embed_dim=16",
                             "model.depth=2", "model.num_heads=2", "train.batch_size=8",
                             "train.epochs=2", "train.gate_start_epoch=1",
                             "train.gate_lr_scale=10", f"data.root={root}",
                             f"out_dir={tmp_path / 'run'}"])
    weights = []

    def record(epoch: int, metrics: dict) -> None:
        saved = load_file(tmp_path / "run" / "last.safetensors")
        weights.append({k: v for k, v in saved.items() if k.endswith(("log_alpha", "head.weight"))})

    train(cfg, on_epoch=record)
    start = torch.full((2,), 3.0)  # the gates' starting log alpha
    for name, value in weights[0].items():
        if name.endswith("log_alpha"):
            assert torch.equal(value, start), name  # epoch 1: the gates did not move
            assert (weights[1][name] < start).all(), name  # epoch 2: the penalty pulls them
        else:
            assert not torch.equal(value, weights[1][name])  # the rest learns all along
