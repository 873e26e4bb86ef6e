"""Sharded data parallelism (FSDP2): each process keeps 1/N of every trained weight, of its
gradient and of its optimizer state, and holds a block's whole weights only while it computes.

    torchrun --nproc_per_node 4 train_finetune.py --fsdp --base MODEL --data corpus.txt

Without --fsdp, data parallelism is written out in step.py: every process holds the whole
model, its float32 gradients and AdamW's two moments, about 16 bytes per trained parameter
(a 7B model: ~112 GB per process), and the gradients are summed over processes after the
micro-batches. With --fsdp, `shard_model` hands each transformer block, then the model with
what is left (embeddings, final norm, output layer), to torch's `fully_shard`. Each parameter
becomes a DTensor holding this process's slice of its first dimension. Before a block runs
forward (and again before its backward) FSDP all-gathers the slices into whole weights and
frees them after; after its backward it reduce-scatters the gradients, so each process gets
the sum over processes of its own slice's gradient. The optimizer then updates slices only.

Precision is precision.py's scheme (its docstring sets the two side by side): the sharded
float32 parameters are the master weights, and FSDP's MixedPrecisionPolicy casts them to the
compute dtype as it gathers them and reduces the gradients in float32. A LoRA base is frozen:
it stays in the compute dtype and is sharded as it is; the adapters are made float32 first.

Each micro-batch's backward reduce-scatters its gradients into the slices' .grad, where they
add up (FSDP2's default): with --grad-accum A that is A times the traffic of reducing once per
step, as DDP does here, but no process ever holds a whole gradient.

Gradients are summed over processes, never averaged (divide factor 1, sum-only collectives):
the loss is already divided by the step's target-token count over every micro-batch and
process (step.py), so each token weighs the same however the step is split.
"""

import torch
from torch import nn

from minituner.distributed import Runtime, all_reduce_sum_, broadcast_
from minituner.errors import OptionError
from minituner.precision import MasterWeights


def check_fsdp() -> None:
    """An OptionError unless this torch has what --fsdp uses: FSDP2's fully_shard with sum-only
    gradient reduction (tested with torch 2.13; torch 2.5, the floor without --fsdp, lacks it)."""
    try:
        from torch.distributed.fsdp import FSDPModule, fully_shard  # noqa: F401
    except ImportError:
        FSDPModule = None
    if not hasattr(FSDPModule, "set_force_sum_reduction_for_comms"):
        raise OptionError("fsdp", f"this torch ({torch.__version__}) lacks FSDP2's sum-only gradient reduction; "
                                  "install a newer one (tested with 2.13), or train without --fsdp (DDP)")


def shard_model(model: nn.Module, dtype: torch.dtype, runtime: Runtime) -> MasterWeights:
    """Shard `model` over the processes (each block, then the root) to compute in `dtype`; return
    its masters, which are its own sharded float32 trainable parameters. Every process starts
    from rank 0's weights. The model may wait on the CPU (the scripts load it there under
    --fsdp): one block at a time goes whole to the device, to be cut into slices there."""
    check_fsdp()
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
    policy = MixedPrecisionPolicy(param_dtype=None if dtype == torch.float32 else dtype, reduce_dtype=torch.float32,
                                  cast_forward_inputs=False)  # the model casts its own inputs, as without FSDP
    for block in model.layers:
        block.to(runtime.device)
        _prepare(block.parameters(), runtime)
        fully_shard(block, mp_policy=policy)
    for name, child in model.named_children():  # the root's own: embeddings, final norm, output layer
        if name != "layers":
            child.to(runtime.device)
    _prepare([p for p in model.parameters() if not is_sharded(p)], runtime)
    fully_shard(model, mp_policy=policy)
    for module in model.modules():
        if isinstance(module, FSDPModule):  # sum the gradients over processes: see the module docstring
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    return MasterWeights.of_sharded(model)


@torch.no_grad()
def _prepare(params, runtime: Runtime) -> None:
    """Trainable parameters made float32 (the slices are the masters; a LoRA adapter is built in
    its base's bf16) and given rank 0's values: fully_shard cuts each process's own copy."""
    trainable = [p for p in params if p.requires_grad]
    for p in trainable:
        p.data = p.data.float()
    broadcast_(trainable, runtime)


# torch.distributed.tensor is imported where a DTensor is met, not with this module: the import
# costs about a second, and every command (chat, generate, the scripts) imports this module.
def is_sharded(t: torch.Tensor) -> bool:
    """Whether `t` is a DTensor (a sharded parameter, its gradient or its optimizer state)."""
    return hasattr(t, "device_mesh") and hasattr(t, "to_local")


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's slice of a sharded tensor (the same storage); a plain tensor itself."""
    return t.to_local() if is_sharded(t) else t


def global_norm(local_norm: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """The L2 norm over every process's slices, from this process's norm of its own: the slices
    are disjoint, so the squares add up (an inf or nan anywhere reaches every process)."""
    squared = local_norm.double().square().view(1)
    all_reduce_sum_([squared], runtime)
    return squared.sqrt().float().view(())


def distribute_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` (a whole tensor every process has) sharded as `like` is, when `like` is a DTensor
    of its shape; else `full`, unchanged. No communication: each process keeps its own slice."""
    if is_sharded(like) and not is_sharded(full) and tuple(full.shape) == tuple(like.shape):
        from torch.distributed.tensor import distribute_tensor
        return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None)
    return full


def local_bytes(tensors) -> int:
    """Bytes of this process's slices of `tensors` (whole tensors when not sharded)."""
    return sum(local(t).numel() * t.element_size() for t in tensors)
