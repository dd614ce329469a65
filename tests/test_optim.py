import math

import pytest
import torch
from torch import nn

from attnmaps.engine.optim import build_optimizer, param_groups, set_base_lrs, warmup_cosine


class Gate(nn.Module):
    def __init__(self):
        super().__init__()
        self.log_alpha = nn.Parameter(torch.zeros(4))


class ToyViT(nn.Module):
    def __init__(self):
        super().__init__()
        self.cls_tokens = nn.Parameter(torch.zeros(1, 2, 4))
        self.reg_tokens = nn.Parameter(torch.zeros(1, 1, 4))
        self.pos_embed = nn.Parameter(torch.zeros(1, 9, 4))
        self.patch = nn.Conv2d(3, 4, 2)
        self.norm = nn.LayerNorm(4)
        self.gate = Gate()
        self.inner = nn.Module()
        self.inner.pos_embed = nn.Parameter(torch.zeros(1, 9, 4))  # matches ".pos_embed"
        self.inner.my_pos_embed = nn.Parameter(torch.zeros(1, 9, 4))  # no dotted match
        self.head = nn.Linear(4, 3)
        self.frozen = nn.Parameter(torch.zeros(3, 3), requires_grad=False)

    def no_weight_decay(self) -> set[str]:
        return {"cls_tokens", "reg_tokens", "pos_embed"}


def _names(groups: list[dict]) -> dict[float, set[str]]:
    return {g["weight_decay"]: set(g["param_names"]) for g in groups}


def test_param_groups_split():
    model = ToyViT()
    groups = param_groups(model, 0.05)
    assert _names(groups) == {
        0.05: {"patch.weight", "inner.my_pos_embed", "head.weight"},
        0.0: {"cls_tokens", "reg_tokens", "pos_embed", "inner.pos_embed", "patch.bias",
              "norm.weight", "norm.bias", "gate.log_alpha", "head.bias"},
    }
    named = dict(model.named_parameters())
    for g in groups:
        assert all(p is named[n] for p, n in zip(g["params"], g["param_names"], strict=True))


def test_param_groups_without_no_weight_decay_and_empty_group_dropped():
    model = nn.Sequential(nn.Linear(2, 3), nn.LayerNorm(3))
    assert _names(param_groups(model, 0.1)) == {
        0.1: {"0.weight"},
        0.0: {"0.bias", "1.weight", "1.bias"},
    }
    assert _names(param_groups(nn.LayerNorm(3), 0.1)) == {0.0: {"weight", "bias"}}


def test_build_optimizer_decays_only_matrices():
    torch.manual_seed(0)
    model = ToyViT()
    for p in model.parameters():
        nn.init.normal_(p)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(model, lr=0.1, weight_decay=0.5, betas=[0.8, 0.9])
    assert isinstance(opt, torch.optim.AdamW)
    assert all(g["betas"] == (0.8, 0.9) and g["lr"] == 0.1 for g in opt.param_groups)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # zero gradient: only decoupled weight decay moves parameters
    decayed = {"patch.weight", "inner.my_pos_embed", "head.weight"}
    for name, p in model.named_parameters():
        factor = 1 - 0.1 * 0.5 if name in decayed else 1.0
        torch.testing.assert_close(p.detach(), before[name] * factor)


def test_build_optimizer_rejects_bad_betas():
    with pytest.raises(ValueError, match=r"betas must be two numbers.*\[0\.9\]"):
        build_optimizer(nn.Linear(2, 2), 1e-3, 0.0, [0.9])


def _lrs(total: int, warmup: int, ratio: float, n: int, base: float = 2.0) -> list[float]:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=base)
    sched = warmup_cosine(opt, total, warmup, ratio)
    lrs = []
    for _ in range(n):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_warmup_cosine_hand_computed():
    # total 10, warm-up 2, min ratio 0.1, base lr 2.0
    c = math.cos(math.pi / 4)
    expected_factors = [
        1 / 2, 2 / 2,                      # warm-up: (s+1)/W
        1.0,                               # s=2: cosine start
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 8)),
        0.1 + 0.9 * 0.5 * (1 + c),         # s=4: progress 1/4
        0.1 + 0.9 * 0.5 * (1 + math.cos(3 * math.pi / 8)),
        0.55,                              # s=6: progress 1/2
        0.1 + 0.9 * 0.5 * (1 - math.cos(3 * math.pi / 8)),
        0.1 + 0.9 * 0.5 * (1 - c),
        0.1 + 0.9 * 0.5 * (1 - math.cos(math.pi / 8)),
        0.1, 0.1, 0.1,                     # s >= total: constant
    ]
    assert _lrs(10, 2, 0.1, 13) == pytest.approx([2.0 * f for f in expected_factors])


def test_warmup_cosine_edges():
    assert _lrs(4, 0, 0.0, 5, base=1.0) == pytest.approx([1.0, 0.5 + 0.5 * math.cos(math.pi / 4),
                                                          0.5, 0.5 - 0.5 * math.cos(math.pi / 4),
                                                          0.0])
    assert _lrs(3, 3, 0.2, 5, base=1.0) == pytest.approx([1 / 3, 2 / 3, 1.0, 0.2, 0.2])


def test_warmup_cosine_state_round_trip():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine(opt, 10, 2, 0.1)
    for _ in range(5):
        opt.step()
        sched.step()
    opt2 = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched2 = warmup_cosine(opt2, 10, 2, 0.1)
    sched2.load_state_dict(sched.state_dict())
    opt2.load_state_dict(opt.state_dict())
    opt.step(), sched.step(), opt2.step(), sched2.step()
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


@pytest.mark.parametrize(
    ("args", "pattern"),
    [
        ((0, 0, 0.1), "total_steps must be >= 1, got 0"),
        ((10, 11, 0.1), r"warmup_steps must be in \[0, total_steps=10\], got 11"),
        ((10, -1, 0.1), r"warmup_steps must be in \[0, total_steps=10\], got -1"),
        ((10, 2, 1.5), r"min_lr_ratio must be in \[0, 1\], got 1\.5"),
    ],
)
def test_warmup_cosine_errors(args, pattern):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match=pattern):
        warmup_cosine(opt, *args)


def test_set_base_lrs_rescales_the_schedule_from_the_current_step():
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=1e-3)
    scheduler = warmup_cosine(optimizer, total_steps=10, warmup_steps=2, min_lr_ratio=0.1)
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    factor = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 2 / 8))  # step 4 of 10, warm-up 2
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * factor)
    set_base_lrs(scheduler, [5e-3])
    assert optimizer.param_groups[0]["lr"] == pytest.approx(5e-3 * factor)
    assert scheduler.get_last_lr() == [pytest.approx(5e-3 * factor)]
    optimizer.step()
    scheduler.step()
    factor = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 3 / 8))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(5e-3 * factor)
