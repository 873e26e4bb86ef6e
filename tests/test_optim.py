"""The optimizer set-up, the learning-rate schedule, clipping, and the loss."""

import math

import pytest
import torch
import torch.nn.functional as F

from minituner.loss import IGNORE_INDEX, lm_loss_sum, target_count
from minituner.optim import clip_grads_, grad_norm, lr_at, param_groups
from toy_train import build_model


def test_no_weight_decay_on_norms_biases_and_embeddings():
    model = build_model(0)
    model.layers[0].self_attn.q_proj.bias = torch.nn.Parameter(torch.zeros(32))
    named = list(model.named_parameters())
    decay, no_decay = param_groups(named, 0.1)
    names = {id(p): n for n, p in named}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    undecayed = {names[id(p)] for p in no_decay["params"]}
    assert "embed_tokens.weight" in undecayed and "norm.weight" in undecayed
    assert "layers.0.self_attn.q_proj.bias" in undecayed
    assert all(p.ndim >= 2 and "embed" not in names[id(p)] for p in decay["params"])
    decay, no_decay = param_groups(named, 0.1, decay_embeddings=True)
    assert "embed_tokens.weight" in {names[id(p)] for p in decay["params"]}


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_schedule_warms_up_then_decays_to_the_floor(schedule):
    lrs = [lr_at(s, lr=1.0, total_steps=20, warmup_steps=5, schedule=schedule, min_lr=0.1) for s in range(20)]
    assert lrs[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))  # never rises after warmup
    assert lrs[-1] == pytest.approx(0.1)
    middle = lr_at(11, lr=1.0, total_steps=21, warmup_steps=2, schedule=schedule, min_lr=0.0)
    assert middle == pytest.approx(0.5)  # halfway through the decay, for both shapes


def test_constant_schedule_and_no_warmup():
    assert lr_at(0, lr=3e-4, total_steps=10) == pytest.approx(3e-4)
    assert lr_at(7, lr=3e-4, total_steps=10, warmup_steps=2, schedule="constant") == 3e-4


def test_clipping_scales_to_max_norm_and_never_up():
    grads = [torch.full((3,), 3.0), torch.full((4,), 4.0)]
    norm = grad_norm(grads)
    assert norm.item() == pytest.approx(math.sqrt(27 + 64))
    clip_grads_(grads, norm, 1.0)
    assert grad_norm(grads).item() == pytest.approx(1.0, rel=1e-5)
    small = [torch.full((2,), 0.1)]
    clip_grads_(small, grad_norm(small), 1.0)
    assert torch.equal(small[0], torch.full((2,), 0.1))


def test_grad_norm_sees_a_single_inf():
    assert not torch.isfinite(grad_norm([torch.ones(5), torch.tensor([1.0, float("inf")])]))


def test_loss_is_a_float32_sum_over_target_tokens_only():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11, dtype=torch.bfloat16)
    labels = torch.randint(0, 11, (2, 6))
    labels[0, :3] = IGNORE_INDEX
    labels[1, 5] = IGNORE_INDEX
    total = lm_loss_sum(logits, labels)
    assert total.dtype == torch.float32
    assert target_count(labels) == 2 * 5 - 2 - 1  # column 0 is never a target
    expected = F.cross_entropy(logits[:, :-1].float().reshape(-1, 11), labels[:, 1:].reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")
    assert total.item() == pytest.approx(expected.item())
