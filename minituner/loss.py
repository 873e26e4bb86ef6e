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
