"""One optimizer step: the loss of a step is a sum over its target tokens divided by their count
across all its micro-batches and ranks, so a step trains to the same gradient however it is
split (a mean of micro-batch means would not), and a step with nothing to train is refused."""

import pytest
import torch

import toy_train
from conftest import max_diff
from minituner.distributed import Runtime
from minituner.errors import UserError
from minituner.loss import IGNORE_INDEX
from minituner.optim import build_optimizer
from minituner.precision import LossScaler, MasterWeights
from minituner.step import train_step

CPU = Runtime(torch.device("cpu"))


def sgd_update(batches) -> dict:
    """The weight change of one step with SGD(lr=1), i.e. minus the step's gradient."""
    model = toy_train.build_model(0)
    masters = MasterWeights(model, torch.float32)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(masters.masters, lr=1.0)
    train_step(model, batches, masters=masters, optimizer=optimizer, scaler=LossScaler(enabled=False), lr=1.0,
               max_grad_norm=0.0, runtime=CPU)
    return {n: p.detach() - before[n] for n, p in model.named_parameters()}


def test_step_gradient_does_not_depend_on_the_micro_batch_split():
    examples = toy_train.make_examples(4, seed=3)  # lengths differ, so per-micro-batch means would differ
    assert len({len(e["input_ids"]) for e in examples}) > 1
    whole = sgd_update([toy_train.collate(examples)])
    for size in (1, 2):
        split = sgd_update([toy_train.collate(examples[i:i + size]) for i in range(0, 4, size)])
        assert max_diff(whole, split) < 1e-6


def test_mean_of_micro_batch_means_would_differ():
    """The test above is sensitive: averaging per-micro-batch means changes the gradient."""
    examples = toy_train.make_examples(4, seed=3)
    whole = sgd_update([toy_train.collate(examples)])
    per_example = [sgd_update([toy_train.collate([e])]) for e in examples]
    mean_of_means = {k: sum(u[k] for u in per_example) / 4 for k in whole}
    assert max_diff(whole, mean_of_means) > 1e-4


def test_all_masked_step_is_refused():
    model = toy_train.build_model(0)
    masters = MasterWeights(model, torch.float32)
    batch = toy_train.collate(toy_train.make_examples(2, 0))
    batch["labels"].fill_(IGNORE_INDEX)
    with pytest.raises(UserError, match="no target tokens"):
        train_step(model, [batch], masters=masters, optimizer=torch.optim.SGD(masters.masters, lr=1.0),
                   scaler=LossScaler(enabled=False), lr=1.0, max_grad_norm=1.0, runtime=CPU)


# ----------------------------------------------------------------------------- what a GPU would feel
def _counting(monkeypatch, names) -> list[str]:
    """Patch Tensor methods to record their calls (by name) while still doing their work."""
    calls = []
    for name in names:
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, _name=name, **kwargs):
            calls.append(_name)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return calls


def _step_setup(policy_dtype, scale_enabled):
    model = toy_train.build_model(0)
    masters = MasterWeights(model, policy_dtype)
    optimizer = build_optimizer(masters.named_masters(), lr=1e-3, weight_decay=0.0)  # fused, as in training
    batches = [toy_train.collate(toy_train.make_examples(4, seed=s)) for s in (1, 2)]
    return model, masters, optimizer, LossScaler(enabled=scale_enabled), batches


def test_a_step_waits_for_the_device_once(monkeypatch):
    """Every host read of a device tensor stalls the GPU's queue: a step makes one (loss and norm
    together, which decide whether to update) and leaves its update queued."""
    import minituner.step as step_module
    model, masters, optimizer, scaler, batches = _step_setup(torch.bfloat16, True)
    monkeypatch.setattr(step_module, "target_count", lambda labels: int((labels.numpy() != IGNORE_INDEX).sum()))
    reads = _counting(monkeypatch, ["item", "tolist", "__bool__", "__float__", "__int__"])
    out = train_step(model, batches, masters=masters, optimizer=optimizer, scaler=scaler, lr=1e-3,
                     max_grad_norm=1.0, runtime=CPU)
    assert reads == ["tolist"] and not out["skipped"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unscale_clip_and_copy_back_are_not_per_tensor_loops(dtype, monkeypatch):
    """One kernel per tensor per operation idles a GPU on launches; the _foreach ops take the
    whole list at once. No Python-level mul_/copy_/add_ per parameter is left in a step."""
    model, masters, optimizer, scaler, batches = _step_setup(dtype, dtype != torch.float32)
    calls = _counting(monkeypatch, ["mul_", "copy_", "add_", "div_"])
    train_step(model, batches, masters=masters, optimizer=optimizer, scaler=scaler, lr=1e-3,
               max_grad_norm=1e-3, runtime=CPU)  # a tiny max norm: clipping happens
    assert len(masters.masters) > 5 and calls.count("mul_") + calls.count("copy_") + calls.count("div_") == 0
    assert calls.count("add_") <= len(batches)  # the loss sum, once per micro-batch


def test_gradients_live_in_one_flat_buffer_that_ranks_sum_in_place(monkeypatch):
    """Summing gradients over ranks copies nothing: the masters' .grad are views into one float32
    buffer (under fp32 only with several ranks, set up before the backward pass, so that
    autograd accumulates into it), and a large contiguous tensor is all-reduced where it lies."""
    import minituner.distributed as dist_module
    for dtype in (torch.float32, torch.bfloat16):
        model, masters, optimizer, scaler, batches = _step_setup(dtype, False)
        masters.begin_step(flat=True)
        for batch in batches:
            model(batch["input_ids"]).float().sum().backward()
            masters.accumulate_grads()
        buffer = masters.grad_buffer
        start, end = buffer.data_ptr(), buffer.data_ptr() + 4 * buffer.numel()
        assert all(start <= g.data_ptr() < end for g in masters.grads())
        assert buffer.abs().sum() > 0  # autograd (fp32) or accumulate_grads (bf16) wrote there
    reduced = []
    monkeypatch.setattr(dist_module.dist, "all_reduce", lambda t: reduced.append(t.data_ptr()))
    monkeypatch.setattr(dist_module, "_IN_PLACE_ELEMENTS", 1000)  # the toy's buffer counts as large
    small = torch.zeros(3)
    dist_module.all_reduce_sum_([buffer, small], Runtime(torch.device("cpu"), 0, 2))
    assert reduced[0] == buffer.data_ptr() and len(reduced) == 2  # the buffer itself; the rest packed


def test_no_gradient_memory_is_held_before_a_backward_pass_in_one_process():
    """A buffer made before the backward pass would sit beside the activations at their peak:
    alone, an fp32 run keeps autograd's own gradients, and none survives a step."""
    for dtype in (torch.float32, torch.bfloat16):
        model, masters, optimizer, scaler, batches = _step_setup(dtype, False)
        masters.begin_step(flat=False)
        assert masters.grad_buffer is None and all(p.grad is None for p in model.parameters())
        train_step(model, batches, masters=masters, optimizer=optimizer, scaler=scaler, lr=1e-3, max_grad_norm=1.0,
                   runtime=CPU)
        assert masters.grad_buffer is None and all(m.grad is None for m in masters.masters)


def test_the_step_runs_on_the_oldest_supported_torch(monkeypatch):
    """torch.nn.utils.get_total_norm first shipped in 2.6, and pyproject allows 2.5."""
    model, masters, optimizer, scaler, batches = _step_setup(torch.float32, False)
    for name in ("get_total_norm", "clip_grads_with_norm_"):
        monkeypatch.delattr(torch.nn.utils, name, raising=False)
    out = train_step(model, batches, masters=masters, optimizer=optimizer, scaler=scaler, lr=1e-3,
                     max_grad_norm=1.0, runtime=CPU)
    grads = torch.cat([p.detach().reshape(-1) for p in masters.masters])
    assert out["grad_norm"] > 0 and not out["skipped"] and grads.isfinite().all()


def test_no_unscaling_at_scale_one(monkeypatch):
    """bf16 and fp32 steps have no loss scale: dividing every gradient by 1 is a wasted pass."""
    model, masters, optimizer, scaler, batches = _step_setup(torch.bfloat16, False)
    multiplied = []
    real = torch._foreach_mul_
    monkeypatch.setattr(torch, "_foreach_mul_", lambda tensors, factor: (multiplied.append(factor),
                                                                         real(tensors, factor))[1])
    train_step(model, batches, masters=masters, optimizer=optimizer, scaler=scaler, lr=1e-3, max_grad_norm=0.0,
               runtime=CPU)
    assert multiplied == []  # no clipping asked for either
    scaler = LossScaler(enabled=True, init_scale=1024.0)
    train_step(model, batches, masters=masters, optimizer=optimizer, scaler=scaler, lr=1e-3, max_grad_norm=0.0,
               runtime=CPU)
    assert multiplied == [1 / 1024.0]


def test_packed_rows_spans_are_read_before_the_batch_moves(monkeypatch):
    """A padding-free or packed batch's document spans come from its host copy, handed to the model,
    so a GPU is not made to wait for them in the forward pass."""
    from minituner.batching import flat_collate
    from minituner.model import document_spans
    model, masters, optimizer, scaler, _ = _step_setup(torch.float32, False)
    batches = [flat_collate(toy_train.make_examples(4, seed=s)) for s in (1, 2)]
    seen, forward = [], model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: seen.append(k.get("spans")) or forward(*a, **k))
    train_step(model, batches, masters=masters, optimizer=optimizer, scaler=scaler, lr=1e-3, max_grad_norm=1.0,
               runtime=CPU)
    assert seen == [document_spans(b["document_ids"]) for b in batches] and all(len(s[0]) == 4 for s in seen)
