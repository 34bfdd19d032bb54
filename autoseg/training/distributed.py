"""DDP under torchrun: process group, rank-aware sharding and batch split; only rank 0 writes.

``torchrun --nproc_per_node=N -m autoseg train D CONFIG FOLD`` sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``;
torch.distributed reads them itself (so this module reads no environment variables). NCCL on CUDA, gloo on
CPU (so DDP is testable without GPUs).
"""
from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """True when torch.distributed's elastic launcher set up this process (it exports TORCHELASTIC_RUN_ID)."""
    return dist.is_available() and dist.is_torchelastic_launched()


def init_distributed(device: torch.device) -> DistributedContext:
    """Join the process group when launched by torchrun; otherwise a single-process context."""
    if dist.is_available() and dist.is_initialized():
        return DistributedContext(dist.get_rank(), dist.get_world_size(), dist.get_rank())
    if not launched_by_torchrun():
        return DistributedContext()
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = rank % max(1, torch.cuda.device_count()) if device.type == "cuda" else rank
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
    log.info("DDP: rank %d of %d (%s)", rank, world, backend)
    return DistributedContext(rank, world, local_rank)


def shard(items: Sequence[str], context: DistributedContext) -> list[str]:
    """This rank's share of ``items`` (round robin). A rank never gets nothing: with fewer items than ranks
    every rank sees all items (sampling is random anyway)."""
    if not context.enabled or len(items) < context.world_size:
        return list(items)
    return list(items)[context.rank::context.world_size]


def split_batch(batch_size: int, context: DistributedContext) -> int:
    """This rank's part of the global batch: sizes differ by at most one and sum to ``batch_size``
    (at least 1 per rank)."""
    if not context.enabled:
        return batch_size
    base, extra = divmod(batch_size, context.world_size)
    return max(1, base + (1 if context.rank < extra else 0))


def all_reduce_sum(tensor: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    """Sum ``tensor`` over ranks (no-op without DDP)."""
    if context.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_flag(value: bool, context: DistributedContext, device: torch.device) -> bool:
    """Rank 0's decision (e.g. "stop now, the time budget is used") for every rank."""
    if not context.enabled:
        return value
    flag = torch.tensor([1.0 if value else 0.0], device=device)
    dist.broadcast(flag, src=0)
    return bool(flag.item())


def barrier(context: DistributedContext) -> None:
    if context.enabled:
        dist.barrier()


def shutdown(context: DistributedContext) -> None:
    if context.enabled and dist.is_initialized():
        dist.destroy_process_group()
