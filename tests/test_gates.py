"""HardConcreteGate against closed forms, hand-derived probabilities and numerical integration."""

import math

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from attnmaps.models.gates import HardConcreteGate

GAMMA, ZETA = -0.1, 1.1


def closed_form(log_alpha: torch.Tensor) -> torch.Tensor:
    return (torch.sigmoid(log_alpha) * (ZETA - (GAMMA)) + (GAMMA)).clamp(0, 1)


def p_zero(log_alpha: float, beta: float) -> float:
    """P(g = 0): g = 0 iff s <= -gamma/(zeta-gamma), i.e. the logistic noise lies below a bound."""
    return 1 / (1 + math.exp(-(beta * math.log(-GAMMA / ZETA) - log_alpha)))


def p_one(log_alpha: float, beta: float) -> float:
    """P(g = 1): g = 1 iff s >= (1-gamma)/(zeta-gamma)."""
    return 1 / (1 + math.exp(-(log_alpha - beta * math.log((1 - GAMMA) / (ZETA - 1)))))


def expected_gate(log_alpha: float, beta: float, points: int = 1_000_000) -> float:
    """E[g] by the midpoint rule over the uniform noise u."""
    u = (np.arange(points, dtype=np.float64) + 0.5) / points
    s = 1 / (1 + np.exp(-(np.log(u) - np.log1p(-u) + log_alpha) / beta))
    return float(np.clip(s * (ZETA - GAMMA) + GAMMA, 0, 1).mean())


def make_gate(values, temperature: float = 0.33) -> HardConcreteGate:
    values = torch.as_tensor(values, dtype=torch.float32)
    gate = HardConcreteGate(values.numel(), temperature=temperature)
    with torch.no_grad():
        gate.log_alpha.copy_(values)
    return gate


def test_eval_equals_closed_form():
    values = torch.tensor([-10.0, -3.0, -0.5, 0.0, 0.5, 1.0, 2.0, 10.0])
    gate = make_gate(values).eval()
    assert_close(gate(), closed_form(values))
    assert gate()[3].item() == pytest.approx(0.5)  # sigmoid(0) * 1.2 - 0.1
    assert gate()[5].item() == pytest.approx(1.2 / (1 + math.exp(-1)) - 0.1)


def test_eval_deterministic_and_exact_bounds():
    gate = make_gate([-10.0, -50.0, 10.0, 50.0, 0.3]).eval()
    first, second = gate(), gate()
    assert torch.equal(first, second)
    assert first[0].item() == 0.0 and first[1].item() == 0.0
    assert first[2].item() == 1.0 and first[3].item() == 1.0
    assert 0.0 < first[4].item() < 1.0


def test_deterministic_ignores_mode():
    gate = make_gate([-1.0, 0.0, 0.7]).train()
    assert_close(gate.deterministic(), closed_form(gate.log_alpha.detach()))


def test_default_init_is_fully_open_in_eval():
    gate = HardConcreteGate(3).eval()
    assert torch.equal(gate(), torch.ones(3))


def test_training_samples_in_unit_interval_and_hit_both_ends():
    torch.manual_seed(0)
    gate = HardConcreteGate(20000, init_log_alpha=0.0).train()
    g = gate()
    assert g.min().item() >= 0.0 and g.max().item() <= 1.0
    zero, one = (g == 0).float().mean().item(), (g == 1).float().mean().item()
    assert zero == pytest.approx(p_zero(0.0, 0.33), abs=0.02)
    assert one == pytest.approx(p_one(0.0, 0.33), abs=0.02)
    assert zero > 0.2 and one > 0.2
    assert ((g > 0) & (g < 1)).any()


def test_training_samples_are_random():
    torch.manual_seed(1)
    gate = HardConcreteGate(64, init_log_alpha=0.0).train()
    assert not torch.equal(gate(), gate())


@pytest.mark.parametrize("log_alpha,beta", [(0.0, 0.33), (-1.0, 0.33), (1.5, 0.5), (0.5, 2 / 3)])
def test_training_mean_matches_integral(log_alpha, beta):
    torch.manual_seed(2)
    g = HardConcreteGate(20000, temperature=beta, init_log_alpha=log_alpha).train()()
    assert g.mean().item() == pytest.approx(expected_gate(log_alpha, beta), abs=0.015)


def test_p_zero_formula_by_monte_carlo_of_stretched_concrete():
    rng = np.random.default_rng(0)
    beta = 0.33
    for log_alpha in (-1.0, 0.0, 2.0):
        u = rng.uniform(size=200_000)
        s = 1 / (1 + np.exp(-(np.log(u) - np.log1p(-u) + log_alpha) / beta))
        stretched = s * (ZETA - GAMMA) + GAMMA
        assert (stretched <= 0).mean() == pytest.approx(p_zero(log_alpha, beta), abs=0.005)


@pytest.mark.parametrize("log_alpha", [-1.0, 0.0, 2.0])
def test_empirical_open_rate_matches_l0_penalty(log_alpha):
    torch.manual_seed(3)
    gate = HardConcreteGate(20000, init_log_alpha=log_alpha).train()
    open_rate = (gate() > 0).float().mean().item()
    expected = gate.l0_penalty().item() / 20000
    assert expected == pytest.approx(1 - p_zero(log_alpha, 0.33), rel=1e-4)
    assert open_rate == pytest.approx(expected, abs=0.015)


@pytest.mark.parametrize("beta", [0.33, 0.5, 1.0])
def test_l0_penalty_by_hand(beta):
    values = [-4.0, -0.5, 0.0, 1.0, 3.0]
    gate = make_gate(values, temperature=beta)
    shift = beta * math.log(-GAMMA / ZETA)
    expected = sum(1 / (1 + math.exp(-(a - shift))) for a in values)
    assert gate.l0_penalty().item() == pytest.approx(expected, rel=1e-5)
    assert gate.l0_penalty().ndim == 0


def test_gradient_from_sampled_gate():
    torch.manual_seed(4)
    beta = 0.33
    gate = HardConcreteGate(2000, temperature=beta, init_log_alpha=0.0).train()
    g = gate()
    g.sum().backward()
    grad = gate.log_alpha.grad
    interior = (g > 0) & (g < 1)
    assert interior.sum() > 100
    s = (g.detach() - GAMMA) / (ZETA - GAMMA)
    expected = (ZETA - GAMMA) * s * (1 - s) / beta
    assert_close(grad[interior], expected[interior], rtol=1e-3, atol=1e-5)
    assert torch.all(grad[~interior] == 0)
    assert grad[interior].abs().min() > 0


def test_gradient_from_penalty():
    beta = 0.33
    values = torch.tensor([-2.0, 0.0, 1.0, 3.0])
    gate = make_gate(values, temperature=beta)
    gate.l0_penalty().backward()
    p = torch.sigmoid(values - beta * math.log(-GAMMA / ZETA))
    assert_close(gate.log_alpha.grad, p * (1 - p))


@pytest.mark.parametrize("temperature", [0.0, -0.33])
def test_invalid_temperature_raises(temperature):
    with pytest.raises(ValueError, match="temperature"):
        HardConcreteGate(2, temperature=temperature)
