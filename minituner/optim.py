"""The optimizer and its schedule: AdamW over the float32 masters, warmup then decay, clipping.

Weight decay pulls weights toward zero. It is meant for the matrices of linear layers; on norm
gains and biases (vectors) it only fights their purpose, and on embeddings it shrinks the rows
of rare tokens, which get few gradient updates to push back. So by default those are excluded,
as in GPT-2/nanoGPT and most fine-tuning recipes; `decay_embeddings=True` puts the embedding
tables back in.
"""

import math

import torch
from torch import nn

# Peak learning rates that usually work, by what trains: adapters tolerate (and need) a larger
# step than a pretrained model's full weights; random weights need larger steps still.
DEFAULT_LR = {"lora": 2e-4, "full": 2e-5, "scratch": 1e-3}
BETAS = (0.9, 0.999)  # AdamW's moment decay rates, torch's defaults


def param_groups(named_params: list[tuple[str, nn.Parameter]], weight_decay: float,
                 decay_embeddings: bool = False) -> list[dict]:
    """Split parameters into a decayed group (matrices) and an undecayed one (the rest)."""
    decay, no_decay = [], []
    for name, p in named_params:
        is_embedding = "embed_" in name
        (decay if p.ndim >= 2 and (decay_embeddings or not is_embedding) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(named_params: list[tuple[str, nn.Parameter]], *, lr: float, weight_decay: float,
                    betas: tuple[float, float] = BETAS, eps: float = 1e-8,
                    decay_embeddings: bool = False) -> torch.optim.AdamW:
    """torch's AdamW, fused into one kernel per step where the device supports it."""
    groups = param_groups(named_params, weight_decay, decay_embeddings)
    device = named_params[0][1].device
    fused = device.type in ("cuda", "cpu") and all(p.dtype == torch.float32 for _, p in named_params)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)


def lr_at(step: int, *, lr: float, total_steps: int, warmup_steps: int = 0, schedule: str = "cosine",
          min_lr: float = 0.0) -> float:
    """The learning rate of optimizer step `step` (0-based): linear warmup from lr/warmup_steps
    to lr, then cosine or linear decay reaching `min_lr` at the last step; 'constant' stays."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    decay_steps = total_steps - warmup_steps
    progress = 1.0 if decay_steps <= 1 else min(1.0, (step - warmup_steps) / (decay_steps - 1))
    if schedule == "cosine":
        return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return lr - (lr - min_lr) * progress
    raise ValueError(f"unknown schedule {schedule!r}")


def grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The global L2 norm of all gradients together, as a float32 scalar tensor (inf/nan kept):
    the norm of the per-tensor norms, which _foreach_norm computes in a few kernels."""
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0).float()


def clip_grads_(grads: list[torch.Tensor], total_norm: torch.Tensor, max_norm: float) -> None:
    """Scale all gradients by one factor so their global norm is at most `max_norm` (0 = no clip).
    The factor stays on the device: clipping needs no host sync."""
    if max_norm > 0:
        coef = (max_norm / (total_norm + 1e-6)).clamp(max=1.0)  # never scales up
        torch._foreach_mul_(grads, coef)
