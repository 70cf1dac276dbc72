"""Multi-process facts shared by training, log-prob caching and generation.

Launched by ``torchrun`` or ``accelerate launch``, every process sees ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in its environment; :func:`init_from_env`
starts the default process group from them (gloo on CPU, NCCL on CUDA). Without those variables
everything here degrades to a single process: rank 0 of 1, gathers return their input.

Sharding is by position, strided: rank ``r`` of ``w`` takes items ``r, r + w, r + 2w, ...``
(:func:`shard_indices`), so shards differ in size by at most one and :func:`gather_in_order`
restores the original order from the per-rank lists without any index bookkeeping.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def launched() -> bool:
    """Whether this process was started by a multi-process launcher (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def init_from_env(device: torch.device | str | None = None, *, timeout_s: float = 1800) -> bool:
    """Start the default process group when launched and not started yet; returns whether this is
    a multi-process run. Backend: NCCL for CUDA devices, gloo otherwise. On CUDA each process
    takes the GPU ``LOCAL_RANK``."""
    if is_initialized():
        return world_size() > 1
    if not launched():
        return False
    device = torch.device(device) if device is not None else None
    use_cuda = device is not None and device.type == "cuda"
    if use_cuda:
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    return True


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Rank 0 (the only process of a single-process run): the one that writes shared files."""
    return rank() == 0


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def shard_indices(count: int, *, rank_: int | None = None, world: int | None = None) -> list[int]:
    """The positions ``0 .. count-1`` this rank handles: ``rank, rank + world, ...``."""
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    return list(range(rank_, count, world))


def shard(items: Sequence[T]) -> list[T]:
    return [items[i] for i in shard_indices(len(items))]


def gather_in_order(local: Sequence[Any]) -> list[Any]:
    """Every rank's shard (made with :func:`shard`), gathered on every rank in the original order.
    Items are pickled (``all_gather_object``): use it for results, not for large tensors."""
    if not is_initialized() or world_size() == 1:
        return list(local)
    shards: list[list[Any]] = [None] * world_size()  # type: ignore[list-item]
    dist.all_gather_object(shards, list(local))
    merged: list[Any] = [None] * sum(len(s) for s in shards)
    for r, items in enumerate(shards):
        merged[r :: world_size()] = items
    return merged


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (no-op in a single process); returns it."""
    if is_initialized() and world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not is_initialized() or world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
