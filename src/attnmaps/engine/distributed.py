"""Multi-process (torchrun) helpers: process-group setup, rank queries and a sharded sampler.

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
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import Sampler

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


def epoch_permutation(size: int, seed: int, epoch: int) -> Tensor:
    """The shuffled order of ``size`` indices for ``epoch``: ``randperm`` seeded with
    ``seed * 100003 + epoch``."""
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed * 100003 + epoch))


class ShardedSampler(Sampler[int]):
    """Rank ``rank``'s share of one seeded per-epoch permutation: positions ``rank``,
    ``rank + world_size``, ... of :func:`epoch_permutation`, ``size // world_size`` of them.

    Every rank yields the same count (the last ``size % world_size`` positions are left out),
    the shards are disjoint, and with per-rank batches of ``b`` the ranks' ``s``-th batches
    together are positions ``s*b*W .. (s+1)*b*W - 1`` of the permutation, i.e. the single-process
    batch of size ``b*W``. With ``world_size=1`` it yields the whole permutation. Call
    :meth:`set_epoch` before each epoch.
    """

    def __init__(self, size: int, seed: int, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must lie in 0..world_size-1={world_size - 1}")
        if size < world_size:
            raise ValueError(f"{size} samples cannot be shared by {world_size} processes")
        self.size, self.seed, self.rank, self.world_size = size, seed, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size // self.world_size

    def __iter__(self) -> Iterator[int]:
        order = epoch_permutation(self.size, self.seed, self.epoch)
        return iter(order[self.rank:len(self) * self.world_size:self.world_size].tolist())


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
