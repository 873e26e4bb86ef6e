"""Hand-rolled mixed precision: fp32 masters, frozen parameters, and dynamic loss scaling."""

import pytest
import torch
from torch import nn

import minituner.precision as precision
from minituner.distributed import Runtime
from minituner.errors import UserError
from minituner.optim import build_optimizer
from minituner.precision import LossScaler, MasterWeights, compute_dtype
from minituner.step import train_step
from toy_train import build_model, collate, make_examples

CPU = Runtime(torch.device("cpu"))


def test_fp32_master_accumulates_updates_below_bf16_resolution():
    """1e-3 steps on a weight of 1.0 are below half a bf16 ulp (2**-9): applied to the bf16 weight
    they round away; applied to the fp32 master they add up and reach the model."""
    layer = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    masters = MasterWeights(layer, torch.bfloat16)
    naive = torch.ones(1, dtype=torch.bfloat16)
    for _ in range(100):
        masters.masters[0].grad = torch.ones(1, 1)
        with torch.no_grad():
            masters.masters[0].sub_(1e-3 * masters.masters[0].grad)
            naive.sub_(torch.tensor(1e-3, dtype=torch.bfloat16))
        masters.copy_to_model()
    assert naive.item() == 1.0  # the bf16-only update never moved the weight
    assert masters.masters[0].item() == pytest.approx(0.9, abs=1e-5)
    assert layer.weight.dtype == torch.bfloat16
    assert layer.weight.data_ptr() != masters.masters[0].data_ptr()
    assert layer.weight.item() == pytest.approx(0.9, abs=2**-8)


def test_frozen_parameters_get_no_master_and_no_optimizer_state():
    model = build_model(0, frozen="embed_tokens")
    frozen = model.embed_tokens.weight
    masters = MasterWeights(model, torch.bfloat16)
    assert frozen.dtype == torch.bfloat16 and not frozen.requires_grad
    assert "embed_tokens.weight" not in masters.names
    assert all(m.dtype == torch.float32 for m in masters.masters)
    optimizer = build_optimizer(masters.named_masters(), lr=1e-3, weight_decay=0.0)
    batch = collate(make_examples(4, seed=0))
    train_step(model, [batch], masters=masters, optimizer=optimizer, scaler=LossScaler(enabled=False), lr=1e-3,
               max_grad_norm=1.0, runtime=CPU)
    state_bytes = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values())
    trainable = sum(m.numel() for m in masters.masters)
    assert trainable == sum(p.numel() for p in model.parameters()) - frozen.numel()
    # AdamW holds two fp32 moments (plus a step scalar) per trainable parameter and none for the frozen one
    assert 8 * trainable <= state_bytes <= 8 * trainable + 8 * len(masters.masters)
    assert frozen.grad is None


def test_fp32_policy_makes_no_copy():
    model = build_model(0)
    masters = MasterWeights(model, torch.float32)
    assert all(m is p for m, p in zip(masters.masters, model.parameters()))


def test_gradients_accumulate_in_fp32():
    layer = nn.Linear(4, 1, bias=False).to(torch.bfloat16)
    masters = MasterWeights(layer, torch.bfloat16)
    for _ in range(3):
        layer(torch.ones(1, 4, dtype=torch.bfloat16)).float().sum().backward()
        masters.accumulate_grads()
        assert layer.weight.grad is None
    assert masters.masters[0].grad.dtype == torch.float32
    assert torch.equal(masters.masters[0].grad, torch.full((1, 4), 3.0))


def test_loss_scale_sequence_matches_torch_gradscaler():
    """Same overflow pattern, same settings: the same scale after every step (GradScaler is only the oracle)."""
    pattern = [False, False, True, False, False, False, False, True, True, False, False, False]
    ours = LossScaler(init_scale=1024.0, growth_factor=2.0, backoff_factor=0.5, growth_interval=3)
    param = nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([param], lr=0.1)
    oracle = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_factor=2.0, backoff_factor=0.5, growth_interval=3)
    for overflow in pattern:
        oracle.scale(param.sum()).backward()
        if overflow:
            param.grad[0] = float("inf")
        oracle.step(optimizer)
        oracle.update()
        optimizer.zero_grad()
        ours.update(found_inf=overflow)
        assert ours.scale == oracle.get_scale()


def test_loss_scale_floor_is_a_clear_error():
    scaler = LossScaler(init_scale=4.0, min_scale=1.0)
    scaler.update(found_inf=True)
    scaler.update(found_inf=True)
    with pytest.raises(UserError, match="below its floor"):
        scaler.update(found_inf=True)


def test_fp16_overflow_skips_the_step_and_backs_off():
    model = build_model(0)
    masters = MasterWeights(model, torch.float16)
    optimizer = build_optimizer(masters.named_masters(), lr=1e-2, weight_decay=0.0)
    scaler = LossScaler(init_scale=2.0**10, growth_interval=2)
    batch = collate(make_examples(4, seed=0))
    kw = dict(masters=masters, optimizer=optimizer, scaler=scaler, lr=1e-2, max_grad_norm=1.0, runtime=CPU)

    assert not train_step(model, [batch], **kw)["skipped"]  # a clean step at scale 1024
    before = {n: m.detach().clone() for n, m in masters.named_masters()}
    model_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    moments = [s["exp_avg"].clone() for s in optimizer.state.values()]
    steps = [s["step"].clone() for s in optimizer.state.values()]
    scaler.scale = 2.0**40  # far past fp16's 65504: the scaled gradients overflow
    out = train_step(model, [batch], **kw)
    assert out["skipped"]
    assert scaler.scale == 2.0**39 and scaler.good_steps == 0
    assert all(torch.equal(m, before[n]) for n, m in masters.named_masters())
    assert all(torch.equal(p, model_before[n]) for n, p in model.named_parameters())
    assert all(torch.equal(s["exp_avg"], m) for s, m in zip(optimizer.state.values(), moments))
    assert all(torch.equal(s["step"], t) for s, t in zip(optimizer.state.values(), steps))

    scaler.scale = 2.0**10
    for _ in range(2):  # growth_interval clean steps double the scale
        assert not train_step(model, [batch], **kw)["skipped"]
    assert scaler.scale == 2.0**11


def test_unknown_precision_is_a_user_error():
    with pytest.raises(UserError, match="precision .fp8.: must be one of"):
        compute_dtype("fp8", torch.device("cpu"))


def test_precision_the_device_cannot_run_is_a_user_error(monkeypatch):
    def no_fp16(dtype, device):
        raise RuntimeError('"addmm_impl_cpu_" not implemented for \'Half\'')
    monkeypatch.setattr(precision, "_probe", no_fp16)
    with pytest.raises(UserError, match="cannot train in torch.float16"):
        compute_dtype("fp16", torch.device("cpu"))
    assert compute_dtype("fp32", torch.device("cpu")) == torch.float32  # fp32 needs no probe


def test_scaler_state_round_trips():
    a = LossScaler(init_scale=8.0, growth_interval=5)
    a.update(found_inf=False)
    b = LossScaler(init_scale=8.0, growth_interval=5)
    b.load_state_dict(a.state_dict())
    assert (b.scale, b.good_steps) == (8.0, 1)


def test_a_cpu_without_bf16_instructions_is_told_apart(tmp_path):
    from minituner.precision import slow_cpu_bf16
    cpu = torch.device("cpu")
    for flags, slow in (("fpu avx2 avx512f", True), ("fpu avx512f avx512_bf16", False), ("fpu amx_bf16 amx_tile", False)):
        (tmp_path / "cpuinfo").write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        assert slow_cpu_bf16(cpu, str(tmp_path / "cpuinfo")) == slow
    assert not slow_cpu_bf16(cpu, str(tmp_path / "absent"))  # flags unknown: nothing said
