"""Hard-Concrete gates (Louizos et al., 2018): a differentiable relaxation of the L0 norm.

One gate per attention head. In training a gate is sampled from the stretched and clipped
Concrete distribution; in evaluation it is the deterministic value
``clamp(sigmoid(log_alpha) * (zeta - gamma) + gamma, 0, 1)``, which is exactly 0 for a closed head.
The expected L0 penalty of a gate is ``P(g != 0) = sigmoid(log_alpha - beta * log(-gamma / zeta))``.

Example:
    >>> gate = HardConcreteGate(4)
    >>> gate.eval()().shape
    torch.Size([4])
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

GAMMA = -0.1
ZETA = 1.1


class HardConcreteGate(nn.Module):
    """``num_gates`` independent Hard-Concrete gates with learnable ``log_alpha``.

    Args:
        num_gates: number of gates (heads).
        temperature: the Concrete temperature beta (the reference code uses 0.33).
        init_log_alpha: initial ``log_alpha``; the default 3.0 starts every gate fully open
            in evaluation (sigmoid(3) * 1.2 - 0.1 > 1) and open in most training samples.
    """

    def __init__(self, num_gates: int, temperature: float = 0.33, init_log_alpha: float = 3.0):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"gate temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.log_alpha = nn.Parameter(torch.full((num_gates,), float(init_log_alpha)))

    def forward(self) -> Tensor:
        """Gate values [num_gates], sampled in training mode, deterministic in eval mode."""
        if self.training:
            u = torch.rand_like(self.log_alpha).clamp(1e-6, 1 - 1e-6)
            s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / self.temperature)
            return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)
        return self.deterministic()

    def deterministic(self) -> Tensor:
        """The evaluation-time gate values, regardless of mode."""
        return (torch.sigmoid(self.log_alpha) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)

    def l0_penalty(self) -> Tensor:
        """Sum over gates of P(g != 0) = 1 - P(g = 0), the expected number of open gates."""
        shift = self.temperature * math.log(-GAMMA / ZETA)
        return torch.sigmoid(self.log_alpha - shift).sum()
