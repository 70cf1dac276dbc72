"""Multi-process facts shared by training, log-prob caching and generation.

Launched by ``torchrun`` or ``accelerate launch``, every process sees ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in its environment; :func:`init_from_env`
starts the default process group from them (gloo on CPU, NCCL on CUDA). Without those variables
everything here degrades to a single process: rank 0 of 1, gathers return their input.

With ``training.sharding: none`` training replicates the model on every process and all-reduces
the gradients of the trainable parameters (:func:`all_reduce_gradients`) once per optimizer step,
after gradient accumulation: DDP's semantics without its wrapper, whose hooks pyalign's fused
lm_head path would bypass (it calls the decoder and the lm_head weight separately, not the wrapped
module's forward). With ``sharding: fsdp`` torch's FSDP2 shards the model
(:mod:`pyalign.train.sharding`); ``accelerate launch`` with an FSDP config means the same.
DeepSpeed and Megatron-LM launches are refused (:func:`check_launch`).

Sharding is by position, strided: rank ``r`` of ``w`` takes items ``r, r + w, r + 2w, ...``
(:func:`shard_indices`), so shards differ in size by at most one and :func:`gather_in_order`
restores the original order from the per-rank lists without any index bookkeeping.
"""

from __future__ import annotations

import os
import time
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


_TRUE = ("1", "true", "yes")
UNSUPPORTED_LAUNCHES = {
    "ACCELERATE_USE_DEEPSPEED": "DeepSpeed (accelerate launch --use_deepspeed / a DeepSpeed accelerate config)",
    "ACCELERATE_USE_MEGATRON_LM": "Megatron-LM (accelerate launch --use_megatron_lm)",
}


MPI_SIZE_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")


def check_launch() -> None:
    """Refuse, with a clear message, launches pyalign's trainer does not implement."""
    if (os.environ.get("ACCELERATE_USE_CPU", "").lower() in _TRUE and "MASTER_ADDR" in os.environ
            and "WORLD_SIZE" not in os.environ):
        # accelerate sets MASTER_ADDR only when asked for several processes; with --cpu and no
        # mpirun it then starts ONE process, which would train alone without a word.
        how = ("under mpirun (accelerate launch --cpu --mpirun_hostfile ...), which pyalign does not read"
               if any(v in os.environ for v in MPI_SIZE_VARIABLES)
               else "but `accelerate launch --cpu --num_processes N` started a single process (accelerate's "
                    "multi-CPU mode needs mpirun)")
        raise ValueError(
            f"ACCELERATE_USE_CPU: several processes were asked for {how}. On CPU use "
            "`accelerate launch --multi_gpu --num_processes N ...` (it runs torchrun; pyalign then uses gloo "
            "on CPU) or `torchrun --nproc_per_node N ...`; see docs/integrations.md#multi-process-training"
        )
    for variable, what in UNSUPPORTED_LAUNCHES.items():
        if os.environ.get(variable, "").lower() in _TRUE:
            raise ValueError(
                f"{variable}: {what} is not an engine pyalign's trainer runs on. It shards with torch's "
                "FSDP2 (training.sharding: fsdp, under torchrun or accelerate launch with an FSDP config) "
                "or replicates the model (sharding: none); see docs/distributed.md"
            )
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in _TRUE and os.environ.get("FSDP_VERSION", "2") != "2":
        raise ValueError(
            f"FSDP_VERSION: accelerate was configured for FSDP version {os.environ['FSDP_VERSION']}; pyalign shards "
            "with FSDP2 (fully_shard): set fsdp_version: 2 in the accelerate config (docs/distributed.md)"
        )


def launcher_shards() -> bool:
    """Whether the launcher asked for FSDP (``accelerate launch`` with an FSDP config)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() in _TRUE


def launcher_offloads() -> bool:
    """Whether an accelerate FSDP config asked to offload parameters to the CPU."""
    return launcher_shards() and os.environ.get("FSDP_OFFLOAD_PARAMS", "").lower() in _TRUE


def init_from_env(device: torch.device | str | None = None, *, timeout_s: float = 1800) -> bool:
    """Start the default process group when launched and not started yet; returns whether this is
    a multi-process run. Backend: NCCL for CUDA devices, gloo otherwise. On CUDA each process
    takes the GPU ``LOCAL_RANK``."""
    check_launch()
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


# How long shutdown() lets go of the GIL after ending the process group; see shutdown().
GIL_HANDOFF_S = 0.2


def shutdown(*, wait_for_others: bool = True) -> None:
    """End the process group (no-op when none was started), by default after a barrier, so that no
    process tears gloo down while another still talks to it. ``wait_for_others=False`` skips the
    barrier: for a process that failed, which must not leave the others waiting.

    Then this thread sleeps :data:`GIL_HANDOFF_S`: gloo's worker thread frees a finished
    collective's tensors after the caller has woken, and freeing a tensor Python has seen takes
    the GIL. If the interpreter starts shutting down first, CPython ends that waiting thread inside
    a C++ destructor: ``terminate called without an active exception``, SIGABRT, a failed exit
    after a finished run (measured: 1 run in 7 of ``bench.sharded_head``'s test before this). The
    sleep hands the GIL over while nothing is finalizing.
    """
    if not is_initialized():
        return
    try:
        if wait_for_others:
            dist.barrier()
    finally:
        dist.destroy_process_group()
        time.sleep(GIL_HANDOFF_S)


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


def process_device(device: torch.device | str) -> torch.device:
    """The device this process uses for ``device``: a CUDA device without an index becomes
    ``cuda:LOCAL_RANK`` in a multi-process run (one GPU per process); anything else is kept."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and launched():
        return torch.device("cuda", local_rank())
    return device


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
    """Sum ``tensor`` over ranks in place (no-op in a single process); returns it. A CPU tensor
    under NCCL (which reduces CUDA tensors only) travels through this process's GPU."""
    if is_initialized() and world_size() > 1:
        if tensor.device.type == "cpu" and dist.get_backend() == "nccl":
            on_gpu = tensor.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(on_gpu, op=dist.ReduceOp.SUM)
            tensor.copy_(on_gpu.cpu())
        else:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not is_initialized() or world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (pickled: small things only)."""
    return gather_in_order([obj])


def all_reduce_gradients(parameters: Sequence[torch.nn.Parameter], *, bucket_elements: int = 1 << 24) -> None:
    """Sum the gradients of ``parameters`` over ranks, in place (no-op in a single process).

    A parameter without a gradient on this rank (e.g. a rank that had no examples this step)
    takes part with zeros and ends with the others' sum, so every rank calls the same collectives
    in the same order and none waits forever. Gradients travel flattened in buckets of at most
    ``bucket_elements`` elements per dtype and device (a LoRA's fit in one)."""
    if not is_initialized() or world_size() == 1:
        return
    for param in parameters:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
    groups: dict[tuple, list[torch.nn.Parameter]] = {}
    for param in parameters:
        groups.setdefault((param.grad.dtype, param.grad.device), []).append(param)
    for params in groups.values():
        bucket: list[torch.nn.Parameter] = []
        size = 0
        for param in params + [None]:
            if param is not None and (not bucket or size + param.numel() <= bucket_elements):
                bucket.append(param)
                size += param.numel()
                continue
            flat = torch.cat([p.grad.reshape(-1) for p in bucket])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            offset = 0
            for p in bucket:
                p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
                offset += p.numel()
            bucket, size = ([param], param.numel()) if param is not None else ([], 0)
