"""Weight EMA: the update formula, the decay warm-up, frozen copy, checkpoint round trip."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attnmaps.engine.ema import ModelEMA, build_ema, ema_decay, ema_state


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def test_decay_warms_up_then_saturates() -> None:
    assert ema_decay(0.99, 0) == pytest.approx(1 / 10)
    assert ema_decay(0.99, 5) == pytest.approx(6 / 15)
    assert ema_decay(0.99, 10_000) == 0.99


def test_update_is_the_exponential_average() -> None:
    model = _net()
    ema = ModelEMA(model, decay=0.9)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model[1].num_batches_tracked.fill_(7)
    ema.update(model)
    d = 1 / 10  # first update: min(0.9, 1 / 10)
    for name, value in ema.module.state_dict().items():
        current = model.state_dict()[name]
        if value.is_floating_point():
            assert torch.allclose(value, d * start[name] + (1 - d) * current)
        else:
            assert torch.equal(value, current)
    assert ema.updates == 1
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_resume_restores_raw_weights_and_count() -> None:
    model = _net()
    ema = ModelEMA(model, decay=0.99)
    with torch.no_grad():
        model[0].weight.add_(3.0)
    ema.update(model)
    saved = ema_state(ema, model)
    resumed = _net()
    resumed.load_state_dict(ema.module.state_dict())  # what last.safetensors holds
    again = build_ema(resumed, 0.99, saved)
    assert torch.equal(resumed[0].weight, model[0].weight)
    assert torch.equal(again.module[0].weight, ema.module[0].weight)
    assert again.updates == 1
    assert build_ema(model, 0.0) is None and ema_state(None, model) == {}
    with pytest.raises(ValueError, match="no raw weights"):
        build_ema(model, 0.99, {})
    with pytest.raises(ValueError, match="ema_decay"):
        ModelEMA(model, 1.0)
