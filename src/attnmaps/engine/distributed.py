"""Multi-process (torchrun) helpers: process-group setup, collectives and evaluation shards.

Under ``torchrun --nproc_per_node=N`` every process finds ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in its environment; :func:`init_distributed`
joins the process group (NCCL on CUDA, gloo on CPU) and picks the device ``cuda:LOCAL_RANK``.
Without those variables (or with ``WORLD_SIZE=1``) everything here is a single-process no-op.

Example::

    ctx = init_distributed(torch.device("cuda"))
    try:
        ...  # DistributedDataParallel(model, device_ids=[ctx.device.index])
        if is_main_process():
            save(...)
        barrier()
    finally:
        if ctx.owns_group:
            cleanup()
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..process_group import get_rank, get_world_size, in_process_group, is_distributed


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: global ``rank`` of ``world_size``, ``local_rank`` on its node,
    its ``device``, and whether :func:`init_distributed` created the process group (and so the
    caller should :func:`cleanup` it)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer; it is set "
                         "by torchrun (RANK, WORLD_SIZE, LOCAL_RANK)") from None


def is_main_process() -> bool:
    """True on rank 0, the process that logs and writes files. Outside a process group (before
    training joins it or after it leaves) the rank torchrun gave this process (``RANK``)
    decides, so that only one process prints a run's summary."""
    if in_process_group():
        return dist.get_rank() == 0
    return _env_int("RANK", 0) == 0


def barrier() -> None:
    """Wait until every process gets here (no-op in a single process)."""
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    """Leave and destroy the process group (no-op without one)."""
    if in_process_group():
        dist.destroy_process_group()


def _device_for_rank(device: torch.device, local_rank: int) -> torch.device:
    if device.type != "cuda":
        return device
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ValueError(f"LOCAL_RANK={local_rank} but only {count} CUDA device(s) are visible; "
                         "start at most one process per GPU (torchrun --nproc_per_node)")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_distributed(device: torch.device, timeout: timedelta | None = None) -> DistContext:
    """Join the torchrun process group when ``WORLD_SIZE > 1``; return this process's context.

    ``device`` is the configured device: under several processes a CUDA device becomes
    ``cuda:LOCAL_RANK`` (NCCL backend) and a CPU device stays CPU (gloo backend). A process group
    that is already initialised (by the caller) is used as it is, with ``owns_group=False``.
    ``timeout`` bounds every collective (torch's default when None).
    """
    if in_process_group():
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = _env_int("LOCAL_RANK", rank)
        return DistContext(rank, world, local_rank, _device_for_rank(device, local_rank), False)
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return DistContext(0, 1, 0, device, False)
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed support")
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE={world} but {', '.join(missing)} not set; launch with "
                         "torchrun, which sets RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT")
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    device = _device_for_rank(device, local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {} if timeout is None else {"timeout": timeout}
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world, **kwargs)
    return DistContext(rank, world, local_rank, device, True)


def all_reduce_mean(values: Tensor) -> Tensor:
    """The mean of ``values`` over processes (``values`` itself in a single process)."""
    if not is_distributed():
        return values
    values = values.clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values / dist.get_world_size()


@torch.no_grad()
def sync_buffers(module: nn.Module) -> None:
    """Make ``module``'s buffers equal on every process: floating-point ones (BatchNorm running
    statistics) become their mean over processes, others are copied from rank 0."""
    if not is_distributed():
        return
    for buffer in module.buffers():
        if buffer.is_floating_point():
            buffer.copy_(all_reduce_mean(buffer))
        else:
            dist.broadcast(buffer, src=0)


def shard_indices(size: int, rank: int | None = None, world_size: int | None = None) -> range:
    """Indices ``rank, rank + W, ...`` of ``size`` samples (all of them in a single process):
    disjoint across ranks and covering every index once, for evaluation."""
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    return range(rank, size, world_size)


def gather_objects(obj: object) -> list:
    """Every process's ``obj`` (picklable), in rank order (``[obj]`` in a single process)."""
    if not is_distributed():
        return [obj]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered
