"""Padding and packing: packed rows give every example exactly the loss it has alone."""

import random

import pytest
import torch

from conftest import FIXTURES
from minituner.batching import flat_collate, micro_batches, pack, pad_collate, real_token_fraction, step_examples
from minituner.hf.folder import load_pretrained
from minituner.loss import IGNORE_INDEX, lm_loss_sum, target_count


def make_examples(n: int, vocab: int, seed: int = 0) -> list[dict]:
    """Examples of varied length, each with a masked "prompt" and a trained "response"."""
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        prompt, response = rng.randint(1, 9), rng.randint(1, 9)
        ids = [rng.randrange(vocab) for _ in range(prompt + response)]
        examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return examples


def test_pad_collate_pads_right_with_masked_labels():
    batch = pad_collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}],
                        pad_id=3)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 3, 3]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert set(batch) == {"input_ids", "labels"}


def test_pack_keeps_every_example_whole_and_fits_rows():
    examples = make_examples(40, vocab=50)
    rows = pack(examples, max_len=24)
    assert all(len(r["input_ids"]) <= 24 for r in rows)
    # every example appears exactly once, contiguous, with positions restarting at 0
    found = []
    for r in rows:
        for doc in sorted(set(r["document_ids"])):
            at = [i for i, d in enumerate(r["document_ids"]) if d == doc]
            assert at == list(range(at[0], at[-1] + 1))
            assert [r["position_ids"][i] for i in at] == list(range(len(at)))
            found.append(tuple(r["input_ids"][i] for i in at))
    assert sorted(found) == sorted(tuple(e["input_ids"]) for e in examples)
    # best fit: fewer rows than one example per row, and no two rows that could have been one
    assert len(rows) < len(examples)
    sizes = sorted(len(r["input_ids"]) for r in rows)
    assert sizes[0] + sizes[1] > 24


def test_pack_refuses_an_example_longer_than_a_row():
    with pytest.raises(ValueError):
        pack([{"input_ids": [1] * 10, "labels": [1] * 10}], max_len=8)


def per_example_losses(model, batch) -> list[float]:
    """Mean loss of each example of a batch, found through its document ids or its row."""
    extra = {k: batch[k] for k in ("position_ids", "document_ids") if k in batch}
    logits = model(batch["input_ids"], **extra)
    losses = []
    for b in range(batch["input_ids"].shape[0]):
        docs = batch["document_ids"][b] if "document_ids" in batch else torch.zeros_like(batch["input_ids"][b])
        for doc in sorted(set(docs.tolist()) - {-1}):
            labels = torch.where(docs == doc, batch["labels"][b], IGNORE_INDEX)[None]
            losses.append((lm_loss_sum(logits[b:b + 1], labels) / target_count(labels)).item())
    return losses


@pytest.mark.parametrize("fixture", ["llama-tiny", "gpt2-tiny"])
def test_packing_changes_no_example_loss(fixture):
    model, _ = load_pretrained(FIXTURES / fixture)
    examples = make_examples(12, vocab=model.config.vocab_size, seed=1)
    alone = []
    with torch.no_grad():
        for e in examples:
            alone += per_example_losses(model, pad_collate([e]))
        rows = pack(examples, max_len=32)
        packed = per_example_losses(model, pad_collate(rows))
    # map packed documents back to examples by their tokens
    order = [tuple(e["input_ids"]) for e in examples]
    by_tokens = {}
    for r in rows:
        for doc in sorted(set(r["document_ids"])):
            by_tokens[len(by_tokens)] = tuple(t for t, d in zip(r["input_ids"], r["document_ids"]) if d == doc)
    packed_for = {by_tokens[k]: loss for k, loss in enumerate(packed)}
    assert len(rows) < len(examples)
    for tokens, loss in zip(order, alone):
        assert packed_for[tokens] == pytest.approx(loss, abs=1e-5)


def test_packed_batch_total_loss_equals_unpacked():
    """What the trainer sees: the summed loss and the target count of a packed batch equal the
    padded batch's, so a step's gradient does not depend on packing."""
    model, _ = load_pretrained(FIXTURES / "llama-tiny")
    examples = make_examples(10, vocab=model.config.vocab_size, seed=2)
    padded, packed = pad_collate(examples), pad_collate(pack(examples, max_len=40))
    with torch.no_grad():
        loss_padded = lm_loss_sum(model(padded["input_ids"]), padded["labels"])
        loss_packed = lm_loss_sum(model(packed["input_ids"], position_ids=packed["position_ids"],
                                        document_ids=packed["document_ids"]), packed["labels"])
    assert target_count(packed["labels"]) == target_count(padded["labels"])
    assert loss_packed.item() == pytest.approx(loss_padded.item(), rel=1e-5)


def test_real_token_fraction():
    assert real_token_fraction([4, 2, 3, 3], [[0, 1], [2, 3]]) == pytest.approx(12 / 14)
    assert real_token_fraction([5, 5], [[0, 1]]) == 1.0


def test_a_step_has_the_same_examples_however_it_is_split():
    lengths = [i % 7 for i in range(40)]
    for step in range(12):  # crosses epoch boundaries (40 // 8 = 5 steps per epoch)
        indices = step_examples(step, n_examples=40, global_batch=8, seed=5)
        for world, batch, accum in [(1, 8, 1), (1, 2, 4), (2, 4, 1), (2, 1, 4), (4, 2, 1)]:
            parts = [mb for r in range(world) for mb in micro_batches(indices, lengths, rank=r, batch_size=batch,
                                                                    grad_accum=accum)]
            assert all(len(mb) == batch for mb in parts)
            assert sorted(i for mb in parts for i in mb) == sorted(indices)


def test_an_epoch_sees_each_example_once_and_epochs_reshuffle():
    epoch0 = [i for s in range(5) for i in step_examples(s, n_examples=40, global_batch=8, seed=1)]
    epoch1 = [i for s in range(5, 10) for i in step_examples(s, n_examples=40, global_batch=8, seed=1)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(40))
    assert epoch0 != epoch1


@pytest.mark.parametrize("fixture", ["llama-tiny", "gpt2-tiny", "qwen2-window-tiny"])
def test_a_padding_free_batch_has_the_padded_loss_and_gradients(fixture):
    """flat_collate: the micro-batch's examples side by side in one row, no pad among them; the
    loss sum, the target count and every gradient are the padded batch's (float rounding apart)."""
    model, _ = load_pretrained(FIXTURES / fixture)
    examples = make_examples(6, vocab=model.config.vocab_size, seed=3)
    padded, flat = pad_collate(examples), flat_collate(examples)
    n = sum(len(e["input_ids"]) for e in examples)
    assert flat["input_ids"].shape == (1, n) and padded["input_ids"].numel() > n
    assert flat["position_ids"][0, :len(examples[0]["input_ids"]) + 1].tolist()[-2:] == [
        len(examples[0]["input_ids"]) - 1, 0]  # positions restart with the second example
    assert target_count(flat["labels"]) == target_count(padded["labels"])
    grads = []
    for batch in (padded, flat):
        model.zero_grad()
        extra = {k: batch[k] for k in ("position_ids", "document_ids") if k in batch}
        loss = lm_loss_sum(model(batch["input_ids"], **extra), batch["labels"])
        loss.backward()
        grads.append((loss.item(), {name: p.grad.clone() for name, p in model.named_parameters()}))
    (loss_padded, g_padded), (loss_flat, g_flat) = grads
    assert loss_flat == pytest.approx(loss_padded, rel=1e-5)
    for name in g_padded:
        assert torch.allclose(g_flat[name], g_padded[name], rtol=1e-4, atol=1e-6), name
    rows = pack(examples, max_len=40)
    assert torch.equal(flat_collate(rows)["input_ids"], pad_collate(rows)["input_ids"])  # packed rows stay rows
    same = [dict(e, input_ids=e["input_ids"][:2], labels=e["labels"][:2]) for e in examples]
    assert flat_collate(same)["input_ids"].shape == (6, 2) and "document_ids" not in flat_collate(same)
