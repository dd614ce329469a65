"""Cross-process reduction of metric states, torchmetrics-style: a metric keeps its local state
and reduces a *copy* inside ``compute``, so ``compute`` is safe to call any number of times.

Without a process group every function returns its input. Inside one, every process must call
them in the same order (they are collectives). Tensors travel on the device the backend needs
(the current CUDA device for NCCL, the CPU otherwise) and come back on their own device.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from ..process_group import in_process_group


def _transport_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(state: Tensor) -> Tensor:
    """The sum of ``state`` over processes, as a new tensor (``state`` is left unchanged)."""
    if not in_process_group():
        return state
    reduced = state.to(_transport_device(), copy=True)
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced.to(state.device)


def all_gather_cat(state: Tensor) -> Tensor:
    """Every process's ``state`` [N_r, ...] concatenated along dim 0 in rank order; the ``N_r``
    may differ between processes (the other dimensions and the dtype may not)."""
    if not in_process_group():
        return state
    device = _transport_device()
    world = dist.get_world_size()
    # bool tensors do not travel on every backend: send bytes and restore the dtype after.
    local = state.to(device=device, dtype=torch.uint8 if state.dtype == torch.bool else None)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([len(local)], device=device))
    longest = int(max(size.item() for size in sizes))
    padded = local.new_zeros((longest, *local.shape[1:]))
    padded[:len(local)] = local
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    parts = [part[:int(size.item())] for part, size in zip(gathered, sizes)]
    return torch.cat(parts).to(device=state.device, dtype=state.dtype)
