"""Where a run executes: the device, and the processes of data-parallel training.

One process per device. Started by `torchrun --nproc_per_node=N script.py ...`, each process
finds its RANK, LOCAL_RANK and WORLD_SIZE in the environment torchrun sets, joins a process
group (NCCL on CUDA, gloo on CPU) and takes GPU LOCAL_RANK. Started plainly, it is rank 0 of 1
and every collective below is a no-op. Data parallelism is written out rather than wrapped in
DistributedDataParallel: the training loop sums the float32 master gradients of all ranks
with `all_reduce_sum_` after its micro-batches, in plain sight of the loss normalisation.
"""

import ctypes
import os
import resource
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from minituner.errors import OptionError, UserError

_IN_PLACE_ELEMENTS = 2**16  # tensors this large are summed where they lie; smaller ones packed together
DIST_TIMEOUT_MINUTES = 60  # how long a collective may wait for a rank busy alone (see init_runtime)


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    sharded: bool = False  # FSDP (minituner/sharding.py): each process holds 1/world_size of the training state

    @property
    def is_main(self) -> bool:
        """Only rank 0 writes files and shows progress."""
        return self.rank == 0


def resolve_device(name: str) -> torch.device:
    """'auto' is CUDA when present, else CPU; asking for CUDA without one is a user error.
    A CUDA device comes back with its index ('cuda' is the current device)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
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
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


# glibc's malloc serves large blocks from its heap once freed ones grow its mmap threshold (up to
# 32 MiB), and that heap keeps what a training step frees, fragmented: measured at Qwen2.5-0.5B's
# shape (LoRA, 2 x 512 tokens, fp32, 2-core CPU, 2 paired rounds), peak resident memory 7.2-7.7 GB that
# way, 5.6-5.75 GB with blocks from 4 MiB on mapped and unmapped by the kernel, at 40.6 against 41.9
# tokens/s (a fixed 64 KiB: 4.6 GB at 32 tokens/s; 32 MiB: 6.3 GB at 42.8 tokens/s).
CPU_MMAP_THRESHOLD = 4 << 20


def limit_cpu_heap() -> None:
    """Fix glibc's mmap threshold at CPU_MMAP_THRESHOLD (mallopt M_MMAP_THRESHOLD), for the whole
    process, unless the user set one (MALLOC_MMAP_THRESHOLD_, or GLIBC_TUNABLES'
    glibc.malloc.mmap_threshold); nothing elsewhere (another C library, macOS, Windows)."""
    user_set = "MALLOC_MMAP_THRESHOLD_" in os.environ or "mmap_threshold" in os.environ.get("GLIBC_TUNABLES", "")
    if user_set or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, CPU_MMAP_THRESHOLD)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc
        pass


def use_device(name: str) -> torch.device:
    """The device of a single-process run (resolve_device), made the current CUDA device, so
    that work naming no device (a capability check, a library's context) lands on it rather
    than on cuda:0. On the CPU, the process's large allocations are set to go back to the system
    when freed (limit_cpu_heap)."""
    device = resolve_device(name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        limit_cpu_heap()
    return device


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work, so that a clock read after it measures the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    """Start the CUDA peak-memory counters afresh (a CPU's peak resident set cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mib(device: torch.device) -> float:
    """Peak allocated CUDA memory on a GPU; the process's peak resident set on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux reports KiB


def peak_reserved_mib(device: torch.device) -> float | None:
    """Peak memory the CUDA caching allocator held (allocated plus its cached free blocks): what
    the GPU really had to have, and what another process could not use. None on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_reserved(device) / 2**20
    return None


def init_runtime(device_name: str = "auto", timeout_minutes: float = DIST_TIMEOUT_MINUTES,
                 fsdp: bool = False) -> Runtime:
    """This process's device, joining torchrun's process group when launched by torchrun.

    fsdp: shard the training state over the processes (minituner/sharding.py) rather than
    replicate it; a single process has nothing to shard over and runs as without it.

    timeout_minutes bounds how long a collective waits for the other ranks before the run is
    aborted. Rank 0 does some work alone while the others wait in their next collective
    (generating samples and scoring before training, training a tokenizer, writing a
    checkpoint of many GB), so the default is an hour rather than NCCL's ten minutes. On the
    CPU, large allocations are set to go back to the system when freed (limit_cpu_heap).
    """
    if not timeout_minutes > 0:
        raise OptionError("dist_timeout", f"{timeout_minutes}: must be > 0 minutes")
    world_size = world_size_from_env()
    if world_size == 1:
        return Runtime(use_device(device_name))
    device = resolve_device(device_name)  # (not made current: each rank takes its own GPU below)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"torchrun started {os.environ.get('LOCAL_WORLD_SIZE', '?')} processes on this node "
                            f"but it has {torch.cuda.device_count()} GPUs; lower --nproc_per_node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        limit_cpu_heap()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size,
                                timeout=timedelta(minutes=timeout_minutes),
                                device_id=device if device.type == "cuda" else None)
    return Runtime(device, rank, world_size, sharded=fsdp)


def world_size_from_env() -> int:
    """How many processes torchrun started (WORLD_SIZE); 1 when started plainly."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def shutdown(runtime: Runtime) -> None:
    if runtime.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum_(tensors: list[torch.Tensor], runtime: Runtime) -> None:
    """Sum each tensor over all ranks, in place. A large contiguous tensor (the flat gradient
    buffer) is reduced where it lies, with no copy; the small ones are packed into one flat
    tensor, so that a few scalars cost one collective rather than one each."""
    if runtime.world_size == 1:
        return
    small = []
    for t in tensors:
        if t.is_contiguous() and t.numel() >= _IN_PLACE_ELEMENTS:
            dist.all_reduce(t)
        else:
            small.append(t)
    if small:
        flat = torch.cat([t.reshape(-1) for t in small])
        dist.all_reduce(flat)
        for t, part in zip(small, flat.split([t.numel() for t in small])):
            t.copy_(part.view_as(t))


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
