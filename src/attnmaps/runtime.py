"""Where and how reproducibly a process runs: device choice and seeding."""

from __future__ import annotations

import random

import numpy as np
import torch

from .errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available, else CPU; any other name is passed to torch."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but this machine has no usable CUDA device "
                          f"(torch {torch.__version__}); use train.device=cpu or auto")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"train.device={name!r} but only {torch.cuda.device_count()} CUDA "
                          "device(s) are visible")
    return device


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
