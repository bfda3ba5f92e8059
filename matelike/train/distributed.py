"""Process-group setup from torchrun's environment, DDP/FSDP2 wrapping and small collectives.

One process (no torchrun) is world size 1 and needs no process group. Under torchrun the backend is NCCL when
the process owns a GPU and gloo on CPU; multi-node works through torchrun's rendezvous unchanged.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from matelike.device import resolve_device


@dataclass
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto") -> DistInfo:
    """Read RANK/WORLD_SIZE/LOCAL_RANK (set by torchrun) and start the process group when world size > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"backend": backend}
        if dev.type == "cuda":
            kwargs["device_id"] = dev
        dist.init_process_group(**kwargs)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world, device=dev)


def teardown() -> None:
    """Destroy the process group; call it once the wrapped model is unreachable (after the command returns).

    FSDP2 modules sit in reference cycles that hold the process group. Left to the interpreter's last
    collection, they free gloo's worker threads mid-shutdown and the process now and then aborts with
    "terminate called without an active exception"; collecting them first frees the group while Python is whole.
    """
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def wrap(model: nn.Module, info: DistInfo, *, fsdp: bool, param_dtype: torch.dtype | None = None) -> nn.Module:
    """DDP by default; with `fsdp`, FSDP2's fully_shard on each transformer block, then on the root.

    Under FSDP with bf16/fp16 training, parameters are all-gathered in `param_dtype` (half the traffic) while
    the sharded master weights and the gradient reduction stay fp32.
    """
    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if not info.enabled:
            raise ValueError("--fsdp needs torchrun with more than one process")
        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
        for block in _blocks(model):
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        return model
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [info.device.index] if info.device.type == "cuda" else None
    return DDP(model, device_ids=ids)


def _blocks(model: nn.Module) -> list[nn.Module]:
    """Transformer blocks to shard one by one: the children of the first ModuleList found."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            return list(module)
    return []


def all_reduce_tensor(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks; gloo reduces on CPU, NCCL on the GPU the tensor lives on."""
    on_cpu = dist.get_backend() != "nccl"
    work = t.cpu() if on_cpu else t
    dist.all_reduce(work)
    return work


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's value on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_over_ranks(values: list[float]) -> list[float]:
    """Sum floats over all ranks when a process group is running (for a Task's `evaluate`), else unchanged."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(values)
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=dev)
    dist.all_reduce(t)
    return t.tolist()
