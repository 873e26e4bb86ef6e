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
