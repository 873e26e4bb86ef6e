"""Turning tokenised examples into batches: which examples form each optimizer step, how a step
is split into micro-batches and processes, and how the examples of a micro-batch become
tensors, padded to the longest row or packed several to a row.

Batch semantics: `batch_size` is one process's micro-batch, and a step consumes
batch_size x grad_accum x world_size examples. Which examples form step s depends only on the
seed and s (a per-epoch permutation cut into equal global batches; the remainder of an epoch
that does not fill one is left out of that epoch, so every step has the same size). However
a step is split into micro-batches and processes, it trains on the same set.

An example is a dict with "input_ids" and "labels", two equal-length lists of ints (labels are
IGNORE_INDEX where a token is not trained; the input/target shift happens in the loss).

Padding goes on the right and is never attended to by a real token (attention is causal, and
pads come last), so it needs no attention mask; its labels are IGNORE_INDEX.

Padding-free batches (`flat_collate`) lay a micro-batch's examples side by side in one row, as
a packed row holds them, so no compute goes to pads while every example keeps its own loss;
unlike packing, each micro-batch holds the same examples as its padded version.

Packing (`pack`) places whole examples side by side in rows of at most `max_len` tokens, best
fit first, longest example first. A packed row carries "document_ids" (which example each token
belongs to), so the model restricts attention to the token's own example, and "position_ids"
that restart at 0 for each example. The first label of every example is masked: its prediction
would come from the last token of the previous example. With both, each token sees exactly what
it would see alone in its own row, so packing changes throughput, not the loss.
"""

import bisect

import numpy as np
import torch

from minituner.errors import OptionError
from minituner.loss import IGNORE_INDEX

MIN_ROW = 3  # tokens a training row needs at least: a document cut into rows keeps a target in each (corpus._spans)


# ----------------------------------------------------------------------------- which examples, where
def steps_per_epoch(n_examples: int, global_batch: int) -> int:
    if n_examples < global_batch:
        raise OptionError("batch_size", f"x grad_accum x processes is {global_batch}, more than the training set's "
                                        f"{n_examples} examples: there is not one step's worth; lower them",
                          related=("grad_accum",))
    return n_examples // global_batch


def step_examples(step: int, *, n_examples: int, global_batch: int, seed: int) -> list[int]:
    """Indices of the examples of step `step`, from a permutation seeded by (seed, epoch)."""
    epoch, i = divmod(step, steps_per_epoch(n_examples, global_batch))
    order = np.random.default_rng([seed, epoch]).permutation(n_examples)
    return order[i * global_batch:(i + 1) * global_batch].tolist()


def micro_batches(indices: list[int], lengths: list[int], *, rank: int, batch_size: int,
                  grad_accum: int) -> list[list[int]]:
    """This rank's share of a step, split into micro-batches of similar lengths (less padding)."""
    share = indices[rank * batch_size * grad_accum:(rank + 1) * batch_size * grad_accum]
    share = sorted(share, key=lambda i: -lengths[i])
    return [share[m * batch_size:(m + 1) * batch_size] for m in range(grad_accum)]


def check_row_length(max_len: int) -> None:
    if max_len < MIN_ROW:
        raise OptionError("max_len", f"{max_len}: a row needs at least {MIN_ROW} tokens")


# ----------------------------------------------------------------------------- tensors


def pad_collate(examples: list[dict], pad_id: int = 0) -> dict:
    """A batch dict of (B, T) tensors, T the longest example; packed rows keep their documents."""
    B, T = len(examples), max(len(e["input_ids"]) for e in examples)
    batch = {"input_ids": torch.full((B, T), pad_id, dtype=torch.long),
             "labels": torch.full((B, T), IGNORE_INDEX, dtype=torch.long)}
    packed = "document_ids" in examples[0]
    if packed:  # padding is one more document of its own, numbered apart from the real ones
        batch["document_ids"] = torch.full((B, T), -1, dtype=torch.long)
        batch["position_ids"] = torch.zeros((B, T), dtype=torch.long)
    for b, e in enumerate(examples):
        n = len(e["input_ids"])
        for key in batch:
            batch[key][b, :n] = torch.tensor(e[key], dtype=torch.long)
        if packed:
            batch["position_ids"][b, n:] = torch.arange(T - n)
    return batch


def flat_collate(examples: list[dict], pad_id: int = 0) -> dict:
    """A batch dict of one (1, N) row, N the examples' total length: the examples side by side,
    isolated and positioned as in a packed row (see pack), so each gets the loss it gets padded
    and no token is padding. Examples of one length (a corpus cut into full rows) need no padding,
    and rows packed already (carrying document_ids) are full: both are padded (pad_collate) instead,
    which keeps one attention call for the batch."""
    if "document_ids" in examples[0] or len({len(e["input_ids"]) for e in examples}) == 1:
        return pad_collate(examples, pad_id)
    return pad_collate([_packed_row(examples)], pad_id)


def pack(examples: list[dict], max_len: int) -> list[dict]:
    """Rows of at most `max_len` tokens, each holding whole examples (best-fit decreasing)."""
    if any(len(e["input_ids"]) > max_len for e in examples):
        raise ValueError("pack: an example is longer than max_len; truncate before packing")
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    rows: list[list[int]] = []  # example indices per row
    free: list[tuple[int, int]] = []  # (free space, row index), sorted: the tightest fit is found by bisection
    for i in order:
        n = len(examples[i]["input_ids"])
        at = bisect.bisect_left(free, (n, -1))
        if at == len(free):
            rows.append([i])
            space, row = max_len - n, len(rows) - 1
        else:
            space, row = free.pop(at)
            rows[row].append(i)
            space -= n
        bisect.insort(free, (space, row))
    return [_packed_row([examples[i] for i in row]) for row in rows]


def _packed_row(examples: list[dict]) -> dict:
    row = {"input_ids": [], "labels": [], "document_ids": [], "position_ids": []}
    for doc, e in enumerate(examples):
        n = len(e["input_ids"])
        row["input_ids"] += e["input_ids"]
        row["labels"] += [IGNORE_INDEX] + list(e["labels"][1:])  # never predicted across examples
        row["document_ids"] += [doc] * n
        row["position_ids"] += list(range(n))
    return row


def real_token_fraction(lengths: list[int], batches: list[list[int]]) -> float:
    """Share of real (non-pad) tokens when the examples of each batch (indices into `lengths`)
    are padded to the batch's longest."""
    real = sum(lengths[i] for batch in batches for i in batch)
    padded = sum(len(batch) * max(lengths[i] for i in batch) for batch in batches if batch)
    return real / padded if padded else 1.0
