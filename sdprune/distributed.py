"""torchrun integration: process group set-up and rank helpers.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them training runs as a
single process and these helpers report rank 0 of 1.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from sdprune.errors import ReplicaMismatchError


@dataclass(frozen=True)
class Context:
    """Where this process sits in a (possibly single-process) job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def initialize(device: torch.device) -> Context:
    """Join the process group torchrun prepared: nccl on CUDA, gloo on CPU.

    On CUDA each process first selects the GPU of its LOCAL_RANK, so NCCL never
    puts two ranks on one device.
    """
    if not launched_by_torchrun():
        return Context()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
            dist.init_process_group(backend="nccl", device_id=torch.device("cuda", local_rank))
        else:
            dist.init_process_group(backend="gloo")
    return Context(rank=dist.get_rank(), local_rank=local_rank, world_size=dist.get_world_size())


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(context: Context) -> None:
    if context.distributed:
        dist.barrier()


def parameter_digest(module: nn.Module) -> bytes:
    """Return the SHA-256 of `module`'s parameters: names, shapes, dtypes and bytes, in order.

    Buffers are left out on purpose: each rank updates batch-norm running
    statistics from its own images, and DDP copies rank 0's at the next forward.
    """
    digest = hashlib.sha256()
    for name, parameter in module.named_parameters():
        tensor = parameter.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.digest()


def check_replicas_agree(module: nn.Module, context: Context, device: torch.device) -> bytes:
    """Raise ReplicaMismatchError unless every rank has bit-identical parameters.

    Returns the parameter digest, which all ranks share when this returns.
    Identical gates on every rank and DDP's gradient averaging keep replicas
    equal; a mismatch means the ranks trained different models.
    """
    digest = parameter_digest(module)
    if not context.distributed:
        return digest
    local = torch.tensor(list(digest), dtype=torch.int64, device=device)
    gathered = [torch.empty_like(local) for _ in range(context.world_size)]
    dist.all_gather(gathered, local)
    digests = [bytes(tensor.tolist()) for tensor in gathered]
    differing = [rank for rank, other in enumerate(digests) if other != digests[0]]
    if differing:
        raise ReplicaMismatchError(
            f"ranks {differing} hold different weights from rank 0 (parameter SHA-256 "
            f"{digests[differing[0]].hex()[:12]} vs {digests[0].hex()[:12]}): the replicas diverged; "
            "check that every rank runs the same sdprune version and settings"
        )
    return digest


def sum_across_ranks(values: list[float], context: Context, device: torch.device) -> list[float]:
    """Add `values` element-wise over all ranks (identity for one process)."""
    if not context.distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()
