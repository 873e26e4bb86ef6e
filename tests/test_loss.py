"""The loss convention: labels are aligned with the inputs and shifted here (position t predicts
token t + 1), IGNORE_INDEX positions carry no loss, and the loss is a float32 sum with its
token count, so that sums over any split of the tokens add up to the whole. (That it equals
transformers' masked loss on every fixture model: tests/test_model.py.)"""

import math

import torch
import torch.nn.functional as F

from minituner.loss import IGNORE_INDEX, lm_loss_sum, target_count


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

