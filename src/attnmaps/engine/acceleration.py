"""Speed switches: bf16 autocast (``train.precision``) and ``torch.compile`` (``train.compile``).

Example::

    with autocast("bf16", device):
        parts = objective(model, batch, device)
    step = compile_module(step)  # falls back to eager, with a warning, where compile cannot run
    graph_breaks(step, batch)    # {"graphs": 1, "graph_breaks": 0, "reasons": []}
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn

PRECISIONS = ("fp32", "bf16")
ModuleT = TypeVar("ModuleT", bound=nn.Module)


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to bfloat16 on ``device``'s type for ``"bf16"``; nothing for ``"fp32"``.

    Matrix products and convolutions run in bf16; torch keeps reductions and losses such as
    softmax and BCE-with-logits in float32.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}; expected one of {', '.join(PRECISIONS)} "
                         "(config key train.precision)")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def compile_module(module: ModuleT, device: torch.device,
                   backend: str = "inductor") -> ModuleT | nn.Module:
    """``torch.compile(module, backend=backend)``, or ``module`` itself with a warning when
    compilation cannot run here.

    A tiny function is compiled and run on ``device`` first, so a missing C++ compiler
    (inductor on CPU), an unsupported Python or platform shows up before training instead of
    in the first step. The compiled wrapper shares ``module``'s parameters; save
    ``module.state_dict()`` (not the wrapper's, whose keys carry an ``_orig_mod.`` prefix).
    inductor draws random numbers (gate noise, class-token masking) from its own generator, so
    a compiled run matches an eager one in distribution only;
    ``torch._inductor.config.fallback_random = True`` makes it draw eager's numbers.
    """
    try:
        probe = torch.compile(lambda x: x * 2 + 1, backend=backend)
        probe(torch.ones(2, device=device))
    except Exception as error:  # noqa: BLE001 - any failure means: run eagerly
        warnings.warn(f"train.compile=true but torch.compile(backend={backend!r}) does not work "
                      f"here ({type(error).__name__}: {error}); training runs eagerly. Install a "
                      "C++ compiler for inductor on CPU, or set train.compile=false to silence "
                      "this.", RuntimeWarning, stacklevel=2)
        return module
    return torch.compile(module, backend=backend)


def graph_breaks(fn: Callable[..., object], *args: object) -> dict:
    """What ``torch.compile`` makes of ``fn(*args)`` (a module or a function): the number of
    graphs, of graph breaks and each break's reason (``torch._dynamo.explain``: traces and runs
    the call once, compiles nothing, so it answers the same for every backend)."""
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(fn)(*args)
    return {"graphs": explanation.graph_count, "graph_breaks": explanation.graph_break_count,
            "reasons": [str(reason.reason) for reason in explanation.break_reasons]}
