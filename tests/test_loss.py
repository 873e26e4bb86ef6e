"""The loss convention: labels are aligned with the inputs and shifted here (position t predicts
token t + 1), IGNORE_INDEX positions carry no loss, and the loss is a float32 sum with its
token count, so that sums over any split of the tokens add up to the whole. (That it equals
transformers' masked loss on every fixture model: tests/test_model.py.)"""

import math

import pytest
import torch
import torch.nn.functional as F

import minituner
from conftest import FIXTURES
from minituner import loss, step
from minituner.hf.folder import load_pretrained
from minituner.lora import apply_lora
from minituner.loss import IGNORE_INDEX, linear_loss_sum, lm_loss_sum, target_count
from minituner.step import forward_loss


def plain_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """The same sum written out position by position: -log p(labels[b, t + 1] | logits[b, t])."""
    total, count = 0.0, 0
    B, T, _ = logits.shape
    for b in range(B):
        for t in range(T - 1):
            target = int(labels[b, t + 1])
            if target != IGNORE_INDEX:
                total -= F.log_softmax(logits[b, t].double(), dim=-1)[target].item()
                count += 1
    return total, count


def test_the_shift_and_the_ignore_index_match_a_position_by_position_sum():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=g)
    labels = torch.randint(0, 11, (3, 7), generator=g)
    labels[0, :3] = IGNORE_INDEX  # a prompt
    labels[2, 5:] = IGNORE_INDEX  # padding
    total, count = plain_loss(logits, labels)
    assert target_count(labels) == count == 3 * 6 - 2 - 2  # position 0 is never a target
    assert math.isclose(lm_loss_sum(logits, labels).item(), total, rel_tol=1e-6)


def test_the_first_label_is_never_a_target():
    """Position 0 has no previous token to predict it from: changing its label changes nothing."""
    logits = torch.randn(1, 5, 7)
    labels = torch.tensor([[3, 1, 4, 1, 5]])
    other = labels.clone()
    other[0, 0] = IGNORE_INDEX
    assert torch.equal(lm_loss_sum(logits, labels), lm_loss_sum(logits, other))
    assert target_count(labels) == target_count(other) == 4


def test_sums_over_a_split_add_up_to_the_whole():
    """The reason the loss is a sum: split a batch any way, and sums and counts add up exactly
    (means of means would not), so a step divides once by its total count."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 9, 13, generator=g)
    labels = torch.randint(0, 13, (4, 9), generator=g)
    labels[1, :6] = IGNORE_INDEX
    whole = lm_loss_sum(logits, labels) / target_count(labels)
    parts = [(lm_loss_sum(logits[i:i + 1], labels[i:i + 1]), target_count(labels[i:i + 1])) for i in range(4)]
    assert torch.allclose(sum(s for s, _ in parts) / sum(n for _, n in parts), whole)
    mean_of_means = sum(s / n for s, n in parts) / 4
    assert not torch.allclose(mean_of_means, whole)


def test_low_precision_logits_are_summed_in_float32():
    logits = (torch.randn(2, 6, 50) * 4).to(torch.bfloat16)
    labels = torch.randint(0, 50, (2, 6))
    loss = lm_loss_sum(logits, labels)
    assert loss.dtype == torch.float32
    assert torch.allclose(loss, lm_loss_sum(logits.float(), labels))


def test_an_all_ignored_batch_counts_nothing():
    labels = torch.full((2, 5), IGNORE_INDEX)
    assert target_count(labels) == 0 and lm_loss_sum(torch.randn(2, 5, 3), labels).item() == 0.0



# ----------------------------------------------------------------------------- the fused loss
def gradients(model, loss_of) -> tuple[float, dict]:
    model.zero_grad()
    loss = loss_of()
    loss.backward()
    return loss.item(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}


def agree(plain: dict, fused: dict, tol: float) -> bool:
    """Every gradient within tol of the plain path's, relative to the whole gradient's size (a
    k_proj bias has a gradient of zero but for rounding: relative to itself, noise would dominate)."""
    scale = math.sqrt(sum(g.norm() ** 2 for g in plain.values()))
    return plain.keys() == fused.keys() and all(
        (plain[n] - fused[n]).norm() <= tol * max(plain[n].norm(), 1e-3 * scale) for n in plain)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny", "gpt2-untied-tiny", "qwen2-tiny"])  # untied and tied heads
@pytest.mark.parametrize("chunk_rows", [7, 1024])  # chunks that split sequences; one chunk for all
def test_the_fused_loss_equals_the_plain_one_with_every_gradient(name, dtype, tol, chunk_rows):
    """Padding at the end, a masked prompt, and a packed row (documents, positions restarting):
    the loss and the gradient of every weight (the output layer, shared with the embedding when
    tied) as the reference lm_loss_sum on whole logits computes them."""
    model, _ = load_pretrained(FIXTURES / name, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 300, (3, 40), generator=g)
    labels = ids.clone()
    labels[0, :12] = IGNORE_INDEX  # a prompt
    labels[1, 29:] = IGNORE_INDEX  # padding
    documents = torch.tensor([0] * 15 + [1] * 25).expand(3, 40)
    positions = torch.cat([torch.arange(15), torch.arange(25)]).expand(3, 40)
    labels[2, 15] = IGNORE_INDEX  # a document's first token is not predicted from the one before
    extra = {"document_ids": documents, "position_ids": positions}
    plain = gradients(model, lambda: lm_loss_sum(model(ids, **extra), labels))
    fused = gradients(model, lambda: linear_loss_sum(model(ids, hidden_only=True, **extra), model.lm_head.weight,
                                                     labels, chunk_rows=chunk_rows))
    assert math.isclose(plain[0], fused[0], rel_tol=tol / 10)
    assert agree(plain[1], fused[1], tol)


def test_forward_loss_fuses_for_large_vocabularies_unless_lora_adapts_the_output_layer(monkeypatch):
    """forward_loss takes the fused path from FUSED_MIN_VOCAB words on where lm_head is a plain
    linear map, the plain one where LoRA adapts it; evaluation (no grad) makes no gradients."""
    model, _ = load_pretrained(FIXTURES / "llama-tiny")  # 384 words
    batch = {"input_ids": torch.randint(3, 300, (2, 16)), "labels": torch.randint(3, 300, (2, 16))}
    cpu = torch.device("cpu")
    plain = forward_loss(model, batch, cpu)
    assert plain.grad_fn.name().startswith("NllLoss")  # a small vocabulary: whole logits are cheap
    monkeypatch.setattr(step, "FUSED_MIN_VOCAB", 384)
    fused = forward_loss(model, batch, cpu)
    assert fused.grad_fn.name().endswith("LinearCrossEntropySumBackward")
    assert math.isclose(fused.item(), plain.item(), rel_tol=1e-6)
    with torch.no_grad():
        assert math.isclose(forward_loss(model, batch, cpu).item(), plain.item(), rel_tol=1e-6)
    apply_lora(model, targets=("q_proj", "lm_head"))
    assert forward_loss(model, batch, cpu).grad_fn.name().startswith("NllLoss")


def test_the_fused_loss_keeps_no_logits_for_the_backward_pass():
    """What it keeps for the backward pass is the gradients of the hidden rows and of the weight,
    never a (tokens x vocabulary) block as the plain path's log_softmax does."""
    V, C, N = 4096, 32, 600
    hidden = torch.randn(1, N + 1, C, requires_grad=True)
    weight = torch.randn(V, C, requires_grad=True)
    labels = torch.randint(0, V, (1, N + 1))
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        linear_loss_sum(hidden, weight, labels, chunk_rows=64).backward()
    assert sizes and max(sizes) <= max(N * C, V * C) < N * V


def test_forward_loss_is_public_and_takes_the_models_device():
    model, _ = load_pretrained(FIXTURES / "gpt2-tiny")
    batch = {"input_ids": torch.randint(3, 300, (2, 16)), "labels": torch.randint(3, 300, (2, 16))}
    loss = minituner.forward_loss(model, batch)
    assert loss.dtype == torch.float32 and torch.equal(loss, lm_loss_sum(model(batch["input_ids"]), batch["labels"]))


def test_the_fused_loss_takes_as_many_rows_per_chunk_as_fit_a_fixed_budget(monkeypatch):
    """Its own memory is a chunk of CHUNK_ELEMENTS logits whatever the vocabulary: fewer rows per
    chunk for a larger one."""
    taken = []
    monkeypatch.setattr(loss.LinearCrossEntropySum, "apply", lambda *args: taken.append(args[3]) or args[0].sum())
    for V in (4096, 151936):
        loss.linear_loss_sum(torch.randn(1, 9, 8), torch.randn(V, 8), torch.randint(0, V, (1, 9)))
    assert taken == [loss.CHUNK_ELEMENTS // 4096, loss.CHUNK_ELEMENTS // 151936]
