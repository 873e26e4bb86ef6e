"""The language-modelling loss: next-token cross-entropy over the tokens that carry loss.

Conventions every module shares:
- `labels` has the same shape as `input_ids` (B, T), as in Hugging Face; `labels[b, t]` is the
  token at position t, or IGNORE_INDEX where position t is not trained (a prompt token, a pad,
  the first token of a packed document). The shift that makes position t predict token t + 1
  happens here and nowhere else.
- The loss is returned as a *sum* with its token count, never as a mean: the training loop
  divides by the number of target tokens of the whole optimizer step (every micro-batch, every
  rank), so a step's gradient does not depend on how its tokens are split into micro-batches.
  (A mean of per-micro-batch means weights a token in a short micro-batch more than one in a
  long one: the gradient-accumulation bug fixed in transformers 4.46.)
"""

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def target_count(labels: torch.Tensor) -> int:
    """How many positions of `labels` (B, T) are predicted and trained."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of logits (B, T, V) against labels (B, T), in float32."""
    V = logits.shape[-1]
    logits = logits[:, :-1].float()  # (B, T-1, V): the softmax runs in fp32 whatever the compute dtype
    targets = labels[:, 1:].to(logits.device)  # (B, T-1)
    return F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")


# ----------------------------------------------------------------------------- fused with the output layer
# The plain path above needs the logits (tokens x vocabulary) whole: with Qwen2.5's 151,936-word
# vocabulary, one 2,048-token row is 0.6 GB in bf16 and 1.2 GB once in float32, and as much again for
# log_softmax's output and for the gradient. The fused path never holds more than CHUNK_ELEMENTS of
# them: per chunk of target positions it computes the logits, their log-sum-exp, the loss, and at
# once the gradient of the loss with respect to those logits (softmax - one_hot), which it turns
# into the gradients of the hidden states and of the output weight before the next chunk. The
# backward pass only scales what the forward pass kept. (The same idea as Liger Kernel's fused
# linear cross-entropy and Wijmans et al. 2024's Cut Cross-Entropy, written here in plain PyTorch.)
CHUNK_ELEMENTS = 2**25  # logits per chunk (128 MB in float32), so the loss's own memory does not grow with V


class LinearCrossEntropySum(torch.autograd.Function):
    """sum over rows of cross_entropy(hidden @ weight.T, targets), float32, for rows that all carry a
    target (the caller drops IGNORE_INDEX rows first). hidden (N, C) and weight (V, C) in the compute
    dtype; the logits of each chunk are upcast to float32 as in lm_loss_sum, and their gradient cast
    back to the compute dtype before the matmuls, as autograd does on the plain path."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int,
                grads: bool):
        N = hidden.shape[0]
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        # (the gradients are made only where a backward pass will ask for them: not in evaluation)
        grad_hidden = torch.empty_like(hidden) if grads and ctx.needs_input_grad[0] else None  # (N, C)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if grads and ctx.needs_input_grad[1] else None  # (V, C), summed over chunks in float32
        for start in range(0, N, chunk_rows):
            h = hidden[start:start + chunk_rows]  # (n, C)
            t = targets[start:start + chunk_rows]  # (n,)
            logits = (h @ weight.T).float()  # (n, V)
            lse = torch.logsumexp(logits, dim=-1)  # (n,)
            loss += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if grad_hidden is None and grad_weight is None:
                continue
            grad = torch.exp(logits.sub_(lse[:, None]))  # (n, V) softmax, in place of the logits
            grad[torch.arange(len(t), device=t.device), t] -= 1.0  # d loss / d logits
            grad = grad.to(hidden.dtype)
            if grad_hidden is not None:
                grad_hidden[start:start + chunk_rows] = grad @ weight  # (n, C)
            if grad_weight is not None:
                grad_weight += (grad.T @ h).float()  # (V, C)
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None


def linear_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                    chunk_rows: int | None = None) -> torch.Tensor:
    """lm_loss_sum(hidden @ weight.T, labels) without the logits: hidden (B, T, C), the output layer's
    weight (V, C), labels (B, T); the shift and IGNORE_INDEX as in lm_loss_sum. Positions without a
    target cost nothing. chunk_rows: target positions per chunk (default: CHUNK_ELEMENTS // V, so
    4,096 rows at a 8,192-word vocabulary, 220 at Qwen2.5's 151,936)."""
    chunk_rows = chunk_rows or max(1, CHUNK_ELEMENTS // weight.shape[0])
    C = hidden.shape[-1]
    targets = labels[:, 1:].to(hidden.device).reshape(-1)  # (B*(T-1),)
    keep = (targets != IGNORE_INDEX).nonzero().squeeze(1)  # rows that carry a target
    rows = hidden[:, :-1].reshape(-1, C).index_select(0, keep)  # (N, C)
    grads = torch.is_grad_enabled() and (rows.requires_grad or weight.requires_grad)
    return LinearCrossEntropySum.apply(rows, weight, targets.index_select(0, keep), chunk_rows, grads)
