"""Data-parallel training across processes started by torchrun (DistributedDataParallel).

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK (and the rendezvous address) for each process;
without them training is one process and every helper here is the identity. The backend follows
the device: gloo on the CPU, NCCL on CUDA (one GPU per process, `cuda:LOCAL_RANK`).

The layout that keeps a run independent of the number of processes: the training stream is cut
into `global batch = per-process batch x world size` contiguous rows, and process `r` takes rows
`[r * B, (r + 1) * B)` with its own carried state. DDP averages the gradients, so a step equals a
single-process step over all the rows; the data position (epoch, window) and the carried state
gathered over all rows are what a checkpoint stores, whatever the world size.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass(frozen=True)
class Group:
    """This process's place in the run: rank `rank` of `world_size` processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the checkpoint, the metrics, the plot and the progress bar."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_world_size() -> int:
    """The number of processes torchrun started (1 when not started by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def join(device_kind: str) -> tuple[Group, bool]:
    """Join the process group torchrun set up; returns the group and whether this call created it
    (and so must `leave` it)."""
    world_size = launched_world_size()
    if world_size == 1:
        return Group(), False
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    created = False
    if not dist.is_initialized():
        if device_kind == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
        created = True
    return Group(rank=rank, world_size=world_size, local_rank=local_rank), created


def leave(created: bool) -> None:
    if created and dist.is_initialized():
        # Collect the run's reference cycles while the group still exists: left to the
        # interpreter's finalization, gloo objects they hold were destroyed after it and a rank
        # aborted ("terminate called without an active exception") after its checkpoint was
        # written, in 6 of 50 resumed 2-process runs on a loaded 2-core machine (0 of 40 so).
        gc.collect()
        dist.destroy_process_group()


def device_for(group: Group, device_kind: str) -> torch.device:
    if device_kind == "cuda" and group.distributed:
        return torch.device("cuda", group.local_rank)
    return torch.device(device_kind)


def wrap(model: nn.Module, group: Group, device: torch.device) -> nn.Module:
    """The module the training step runs: DDP around `model` in a distributed run, else `model`.

    DDP averages the gradients of all ranks during `backward`, so every rank then clips with the
    same global norm and takes the same optimizer step.
    """
    if not group.distributed:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def own_rows(streams: Tensor, group: Group) -> Tensor:
    """This rank's contiguous block of rows of `[global batch, n]` training streams."""
    rows = streams.size(0) // group.world_size
    return streams[group.rank * rows : (group.rank + 1) * rows]


def eval_rows(streams: Tensor, group: Group) -> Tensor:
    """This rank's share of the evaluation streams (possibly none); the losses are summed after."""
    return torch.tensor_split(streams, group.world_size, dim=0)[group.rank]


def all_sum(values: list[float], group: Group, device: torch.device) -> list[float]:
    """Element-wise sums over the ranks (float64, so token counts stay exact)."""
    if not group.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_rows(state: tuple[Tensor, ...], group: Group) -> tuple[Tensor, ...]:
    """The carried state of all ranks, `[layers, global batch, hidden]`, in row order."""
    if not group.distributed:
        return state
    gathered = []
    for s in state:
        parts = [torch.empty_like(s) for _ in range(group.world_size)]
        dist.all_gather(parts, s.contiguous())
        gathered.append(torch.cat(parts, dim=1))
    return tuple(gathered)


def from_main(obj: Any, group: Group) -> Any:
    """Rank 0's `obj` on every rank (a picklable value such as a tokenizer's JSON)."""
    if not group.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(group: Group) -> None:
    if group.distributed:
        dist.barrier()


@torch.no_grad()
def divergence(model: nn.Module, group: Group) -> float:
    """The largest absolute difference between any rank's parameters and rank 0's (0 in sync)."""
    if not group.distributed:
        return 0.0
    flat = torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])
    reference = flat.clone()
    dist.broadcast(reference, src=0)
    worst = (flat - reference).abs().max().reshape(1)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return float(worst.item())
