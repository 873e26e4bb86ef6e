"""One optimizer step, and an evaluation: the mechanics that both kinds of training share.

    count the step's target tokens over every micro-batch and rank
    per micro-batch: forward, fp32 loss sum / step token count * loss scale, backward,
                     move gradients into the fp32 masters
    sum gradients over ranks; unscale; global norm (inf/nan = fp16 overflow: skip the step)
    clip; optimizer step on the masters; copy masters into the model; zero gradients
    update the loss scale

Because the loss is a sum over the step's target tokens divided by their count over all its
micro-batches and ranks, however a step is split into micro-batches and processes it trains to
the same gradient (each token weighs the same; a mean of micro-batch means would not).

A batch is a dict of tensors: "input_ids" and "labels" (B, T), and optionally "position_ids"
and "document_ids" (packed sequences; minituner/batching.py).
"""

import math

import torch

from minituner.distributed import Runtime, all_reduce_sum_
from minituner.errors import UserError
from minituner.loss import linear_loss_sum, lm_loss_sum, target_count
from minituner.model import document_spans
from minituner.optim import clip_grads_, grad_norm
from minituner.precision import LossScaler, MasterWeights
from minituner.sharding import global_norm


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors on `device`, labels included. To a GPU they go from pinned memory
    without blocking: a copy from ordinary memory makes the host wait for every queued kernel,
    which would stall the GPU once per tensor per micro-batch."""
    def moved(t: torch.Tensor) -> torch.Tensor:
        if device.type == "cuda" and t.device.type == "cpu":
            return t.pin_memory().to(device, non_blocking=True)
        return t.to(device)  # no copy where it already is

    return {k: moved(v) for k, v in batch.items()}


# From this vocabulary size on, the loss is fused with the output layer (loss.linear_loss_sum): every
# real tokenizer's (GPT-2's 50,257 words, Llama 3's 128,256, Qwen2.5's 151,936), and already at 4,096
# words it is no slower than the plain path while holding no (tokens x vocabulary) logits. Below it,
# the built-in model's 259 words and the test models' 384, whole logits are small (2 MB for a 16 x 128
# batch in float32), and the plain path, the reference, keeps their results bit for bit.
FUSED_MIN_VOCAB = 1024


def forward_loss(model, batch: dict, device: torch.device | None = None, fused: bool | None = None,
                 spans: list | None = None) -> torch.Tensor:
    """Summed fp32 loss of one batch dict (see the module docstring for its keys; the shift inside,
    as in loss.py), on `device` (default: the model's). fused: through loss.linear_loss_sum, which
    never holds the whole (tokens x vocabulary) logits, possible where the output layer is a plain
    linear map (not one LoRA adapts); else lm_loss_sum. None: fused from FUSED_MIN_VOCAB words on.
    spans: model.document_spans of the batch's document_ids where the caller has read them (train_step
    does, on the host before the batch moves, so that packed rows cost a GPU no wait)."""
    if spans is None and "document_ids" in batch:  # packed documents, read where the batch is (the host: no wait)
        spans = document_spans(batch["document_ids"])
    batch = to_device(batch, device or next(model.parameters()).device)
    optional = {k: batch[k] for k in ("position_ids", "document_ids") if k in batch}
    if spans is not None:
        optional["spans"] = spans
    if fused_loss(model, fused):
        hidden = model(batch["input_ids"], hidden_only=True, **optional)  # (B, T, C)
        return linear_loss_sum(hidden, model.lm_head.weight, batch["labels"])
    logits = model(batch["input_ids"], **optional)  # (B, T, V)
    return lm_loss_sum(logits, batch["labels"])


def fused_loss(model, fused: bool | None = None) -> bool:
    """Whether forward_loss fuses the loss with `model`'s output layer: where asked to (None: from
    FUSED_MIN_VOCAB words on) and the layer is a plain linear map without bias."""
    head = model.lm_head
    if fused is None:
        fused = head.weight.shape[0] >= FUSED_MIN_VOCAB
    return fused and type(head) is torch.nn.Linear and head.bias is None


def train_step(model, batches: list[dict], *, masters: MasterWeights, optimizer, scaler: LossScaler, lr: float,
               max_grad_norm: float, runtime: Runtime) -> dict:
    """One optimizer step over this rank's micro-batches. Returns the step's loss (mean over all
    its target tokens), gradient norm, whether it was skipped, and its token counts.

    In one process the host waits for the device once, to read the loss and norm that decide
    whether to step (batches go over without blocking, see to_device); the update itself is left
    queued, so the caller can prepare the next batches meanwhile.
    """
    device = runtime.device
    # The step's token counts, over every micro-batch of every rank (float64 counts exactly).
    n_targets = sum(target_count(b["labels"]) for b in batches)
    n_tokens = sum(b["input_ids"].numel() for b in batches)
    if runtime.world_size > 1:
        counts = torch.tensor([n_targets, n_tokens], dtype=torch.float64, device=device)
        all_reduce_sum_([counts], runtime)
        n_targets, n_tokens = counts.tolist()
    if n_targets == 0:
        raise UserError("a training step has no target tokens: every label is masked; check the data's labels")

    spans = [document_spans(b["document_ids"]) if "document_ids" in b else None for b in batches]  # on the host
    batches = [to_device(b, device) for b in batches]  # every copy queued before the first forward
    masters.begin_step(flat=runtime.world_size > 1)  # (sharded: FSDP reduce-scatters each backward's gradients)
    loss_sum = torch.zeros((), dtype=torch.float32, device=device)
    for batch, batch_spans in zip(batches, spans):
        loss = forward_loss(model, batch, device, spans=batch_spans)  # fp32 sum over this micro-batch's targets
        (loss * (scaler.scale / n_targets)).backward()  # each token weighs 1/n_targets of the step
        masters.accumulate_grads()  # into fp32, so many micro-batches do not pile up bf16 rounding
        loss_sum += loss.detach()

    grads = masters.grads()  # (views into one flat buffer under bf16/fp16, or fp32 with several ranks; sharded: slices)
    if runtime.world_size > 1:  # ranks hold disjoint tokens: sum (sharded, FSDP has summed the gradients already)
        summed = [loss_sum.view(1)] if runtime.sharded else [masters.grad_buffer, loss_sum.view(1)]
        all_reduce_sum_(summed, runtime)
    if scaler.scale != 1.0:
        torch._foreach_mul_(grads, 1.0 / scaler.scale)  # unscale before measuring or clipping
    norm = grad_norm(grads)
    if runtime.sharded:  # the norm of this rank's slices: combined with the others' into the global norm
        norm = global_norm(norm, runtime)
    norm_value, loss_value = torch.stack([norm, loss_sum]).tolist()  # the step's one wait for the device
    finite = math.isfinite(norm_value) and math.isfinite(loss_value)  # one inf/nan anywhere poisons the norm
    if finite:
        clip_grads_(grads, norm, max_grad_norm)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        masters.copy_to_model()
    masters.zero_grads()
    scaler.update(found_inf=not finite)  # no-op unless fp16
    return {"loss": loss_value / n_targets, "grad_norm": norm_value, "skipped": not finite,
            "target_tokens": int(n_targets), "tokens": int(n_tokens)}


@torch.no_grad()
def evaluate(model, val_set, collate, *, batch_size: int, runtime: Runtime) -> float:
    """Mean loss over every target token of `val_set` (each rank takes every world_size-th batch;
    sharded, every rank runs as many forwards, each of which gathers weights with the others)."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(val_set)), key=lambda i: -len(val_set[i]["input_ids"]))
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    totals = torch.zeros(2, dtype=torch.float64, device=runtime.device)  # loss sum, target count
    mine = chunks[runtime.rank::runtime.world_size]
    if runtime.sharded:  # a rank short of a chunk runs one again, not counted
        rounds = -(-len(chunks) // runtime.world_size)
        mine = mine + [None] * (rounds - len(mine))
    for chunk in mine:
        batch = collate([val_set[i] for i in chunk or (mine[0] or chunks[0])])
        loss = forward_loss(model, batch, runtime.device).double()
        if chunk is not None:
            totals[0] += loss
            totals[1] += target_count(batch["labels"])
    all_reduce_sum_([totals], runtime)
    if runtime.sharded:  # FSDP keeps the root's gathered weights after a forward without backward: free them, so
        model.reshard()  # that no later forward reads them after the slices change (a restored best checkpoint)
    model.train(was_training)
    if totals[1] == 0:
        raise UserError("the validation set has no target tokens")
    return (totals[0] / totals[1]).item()
