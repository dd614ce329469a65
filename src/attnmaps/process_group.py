"""Where this process stands in a torch.distributed process group; every query is a
single-process answer when there is no group (or no distributed support)."""

from __future__ import annotations

import torch.distributed as dist


def in_process_group() -> bool:
    """True once a torch.distributed process group is initialised (even with one process)."""
    return dist.is_available() and dist.is_initialized()


def is_distributed() -> bool:
    """True inside an initialised process group with more than one process."""
    return in_process_group() and dist.get_world_size() > 1


def get_rank() -> int:
    """Global rank of this process (0 without a process group)."""
    return dist.get_rank() if in_process_group() else 0


def get_world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if in_process_group() else 1
