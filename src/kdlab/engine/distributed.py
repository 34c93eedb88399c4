"""Distributed data parallel (torchrun) plumbing: process group from the environment, rank helpers, reductions.

Launch with `torchrun --nproc_per_node=N train_advanced.py ...`: torchrun sets RANK, LOCAL_RANK and
WORLD_SIZE; kdlab joins the process group (nccl on CUDA, gloo on CPU), wraps only the student in
DistributedDataParallel (the frozen teacher runs locally on each rank), shards the data, reduces
metrics across ranks and lets rank 0 alone write files. Without torchrun everything here is a no-op.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    group: bool = False  # a process group is joined (torchrun), even one of a single process

    @property
    def enabled(self) -> bool:
        """Whether this process trains under DDP and reduces across ranks: under torchrun, one process
        included (`--nproc_per_node 1` runs the same NCCL path as eight)."""
        return self.group or self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = DistContext()


def launched_by_torchrun() -> bool:
    """torchrun (torch.distributed.run) sets TORCHELASTIC_RUN_ID for its workers, and WORLD_SIZE; a launcher
    that sets only WORLD_SIZE > 1 (srun with the env:// variables) counts too."""
    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device_type: str) -> DistContext:
    """Join the process group torchrun describes (once); a plain launch returns the single-process context."""
    if not launched_by_torchrun():
        return SINGLE
    ctx = DistContext(
        int(os.environ["RANK"]),
        int(os.environ.get("LOCAL_RANK", 0)),
        int(os.environ["WORLD_SIZE"]),
        group=True,
    )
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(ctx.local_rank)
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
        log.info("DDP: rank %d of %d (%s)", ctx.rank, ctx.world_size, backend)
    return ctx


def current() -> DistContext:
    if dist.is_available() and dist.is_initialized():
        return DistContext(
            dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0)), dist.get_world_size(), group=True
        )
    return SINGLE


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (no-op without a process group). gloo cannot reduce int64 on every
    version, so integer tensors travel as float64 (exact for counts below 2**53)."""
    if not (dist.is_available() and dist.is_initialized()):
        return tensor
    if tensor.is_floating_point():
        dist.all_reduce(tensor)
        return tensor
    as_float = tensor.double()
    dist.all_reduce(as_float)
    tensor.copy_(as_float.round().to(tensor.dtype))
    return tensor


def all_reduce_max_(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
