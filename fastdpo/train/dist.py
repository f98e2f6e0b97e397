"""Which process am I, and where do I compute: one answer for the trainer and the ``fastdpo`` command.

A process is one rank of a ``torch.distributed`` process group once one is initialised (``torchrun``
plus :func:`init_distributed`, or the caller's own ``init_process_group``), else the only one.
"""

from __future__ import annotations

import contextlib
import os
import pickle
from dataclasses import dataclass

import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)`` of the initialised process group, else ``(0, 1)``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed() -> None:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1): NCCL on CUDA, else gloo."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def close_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def rank0_outcome(error: Exception | None) -> Exception | None:
    """Rank 0's ``error`` (None: it succeeded), on every rank; the other ranks' argument is ignored.

    Collective: every rank calls it at the same point. Only rank 0 checks some things (the output
    directory, which only it writes), and the others must not go on where it stopped. An error
    that cannot be pickled reaches the other ranks as a RuntimeError with its type and message.
    """
    rank, world = rank_and_world()
    if world == 1:
        return error
    sent = error if rank == 0 else None
    if sent is not None:
        try:
            pickle.dumps(sent)
        except Exception:
            sent = RuntimeError(f"{type(error).__name__}: {error}")
    box = [sent]
    dist.broadcast_object_list(box, src=0)
    return error if rank == 0 else box[0]


def default_device(world: int) -> str:
    """cuda (the local rank's under torchrun) when available, else cpu."""
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if world > 1 else "cuda"
    return "cpu"


@dataclass
class Runtime:
    """This process: its device, rank and world size, and whether it autocasts to bfloat16."""

    device: torch.device
    rank: int = 0
    world: int = 1
    bf16: bool = False

    @classmethod
    def detect(cls, device: str | None = None, bf16: bool | None = None) -> Runtime:
        """``device`` None: :func:`default_device`; ``bf16`` None: on where CUDA supports it (not on CPU)."""
        rank, world = rank_and_world()
        device = torch.device(device or default_device(world))
        if bf16 is None:
            bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return cls(device, rank, world, bf16)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def shard(self, n: int) -> list[int]:
        """This rank's share of ``n`` items: every ``world``-th index from ``rank``."""
        return list(range(self.rank, n, self.world))

    def all_reduce(self, values: torch.Tensor) -> torch.Tensor:
        """The sum over the ranks, on the CPU."""
        if self.world > 1:
            values = values.to(self.device)
            dist.all_reduce(values)
        return values.cpu()

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()
