"""Where a run executes: the device, and the processes of data-parallel training.

One process per device. Started by `torchrun --nproc_per_node=N script.py ...`, each process
finds its RANK, LOCAL_RANK and WORLD_SIZE in the environment torchrun sets, joins a process
group (NCCL on CUDA, gloo on CPU) and takes GPU LOCAL_RANK. Started plainly, it is rank 0 of 1
and every collective below is a no-op. Data parallelism is written out rather than wrapped in
DistributedDataParallel: the training loop sums the float32 master gradients of all ranks
with `all_reduce_sum_` after its micro-batches, in plain sight of the loss normalisation.
"""

import os
import resource
from dataclasses import dataclass

import torch
import torch.distributed as dist

from minituner.errors import OptionError, UserError

_BUCKET_ELEMENTS = 2**24  # gradients are summed in flat buckets of up to 64 MiB of float32


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Only rank 0 writes files and shows progress."""
        return self.rank == 0


def resolve_device(name: str) -> torch.device:
    """'auto' is CUDA when present, else CPU; asking for CUDA without one is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise OptionError("device", f"{name}: not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise OptionError("device", f"{name}: minituner runs on cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OptionError("device", f"{name}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise OptionError("device", f"{name}: this machine has {torch.cuda.device_count()} GPU(s), "
                                    "numbered from cuda:0")
    return device


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work, so that a clock read after it measures the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mib(device: torch.device) -> float:
    """Peak allocated CUDA memory on a GPU; the process's peak resident set on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux reports KiB


def init_runtime(device_name: str = "auto") -> Runtime:
    """This process's device, joining torchrun's process group when launched by torchrun."""
    device = resolve_device(device_name)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Runtime(device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"torchrun started {os.environ.get('LOCAL_WORLD_SIZE', '?')} processes on this node "
                            f"but it has {torch.cuda.device_count()} GPUs; lower --nproc_per_node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size,
                                device_id=device if device.type == "cuda" else None)
    return Runtime(device, rank, world_size)


def shutdown(runtime: Runtime) -> None:
    if runtime.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum_(tensors: list[torch.Tensor], runtime: Runtime) -> None:
    """Sum each tensor over all ranks, in place, a few large flat buckets at a time."""
    if runtime.world_size == 1:
        return
    bucket: list[torch.Tensor] = []
    for i, t in enumerate(tensors):
        bucket.append(t)
        if i + 1 == len(tensors) or sum(b.numel() for b in bucket) + tensors[i + 1].numel() > _BUCKET_ELEMENTS:
            flat = torch.cat([b.reshape(-1) for b in bucket])
            dist.all_reduce(flat)
            for b, part in zip(bucket, flat.split([b.numel() for b in bucket])):
                b.copy_(part.view_as(b))
            bucket = []


def broadcast_(tensors: list[torch.Tensor], runtime: Runtime) -> None:
    """Give every rank rank 0's values, in place (so all ranks start from the same weights)."""
    if runtime.world_size > 1:
        for t in tensors:
            dist.broadcast(t.data, src=0)


def all_gather_object(obj, runtime: Runtime) -> list:
    """`obj` of every rank, in rank order."""
    if runtime.world_size == 1:
        return [obj]
    out = [None] * runtime.world_size
    dist.all_gather_object(out, obj)
    return out
