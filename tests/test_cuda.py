"""What only a GPU can check (skipped without one; `python -m minituner.bench --gpu-check`
runs these with the rest of the CUDA path): the kernels PyTorch picks for minituner's attention
calls, padded grouped-query decoding, and padded logits, against Hugging Face's references."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from conftest import FIXTURES, GQA_CHECKPOINTS, reference
from minituner.distributed import use_device
from minituner.generate import generate
from minituner.hf.folder import load_pretrained
from minituner.precision import auto_dtype

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("name", GQA_CHECKPOINTS)
def test_padded_grouped_query_decoding_matches_transformers(name):
    ref = reference(name)
    prompt = ref["prompt_ids"][0].tolist()
    prompts = [prompt, prompt[3:], prompt[:2]]
    n_new = ref["greedy_ids"].shape[1] - len(prompt)
    gpu, _ = load_pretrained(FIXTURES / name, device="cuda")
    cpu, _ = load_pretrained(FIXTURES / name)
    batched = generate(gpu, prompts, max_new_tokens=n_new)
    assert prompt + batched[0] == ref["greedy_ids"][0].tolist()
    assert batched == [generate(cpu, [p], max_new_tokens=n_new)[0] for p in prompts]
    low, _ = load_pretrained(FIXTURES / name, device="cuda", dtype=auto_dtype(torch.device("cuda")))
    assert [len(row) for row in generate(low, prompts, max_new_tokens=n_new)] == [n_new] * 3


@pytest.mark.parametrize("name", GQA_CHECKPOINTS)
def test_padded_logits_match_transformers(name):
    ref = reference(name)
    for dtype, tolerance in ((torch.float32, 1e-4), (auto_dtype(torch.device("cuda")), 0.1)):
        model, _ = load_pretrained(FIXTURES / name, device="cuda", dtype=dtype)
        with torch.no_grad():
            logits = model(ref["padded_ids"].cuda(), attention_mask=ref["padded_mask"].cuda())
        real = ref["padded_mask"].bool()
        assert (logits.float().cpu()[real] - ref["padded_logits"][real]).abs().max() < tolerance


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", GQA_CHECKPOINTS)
def test_attention_never_needs_the_math_kernel(name, dtype):
    """With the math kernel switched off, every attention call minituner makes (plain, padded,
    packed, cached decoding with padding; forward and backward) still finds a fused kernel:
    grouped-query attention does not quietly fall back to T x S memory per head."""
    if dtype == torch.bfloat16 and auto_dtype(torch.device("cuda")) != torch.bfloat16:
        pytest.skip("no native bf16 on this GPU")
    model, _ = load_pretrained(FIXTURES / name, device="cuda", dtype=dtype)
    ids = reference(name)["input_ids"].cuda()
    padded = torch.ones_like(ids)
    padded[0, :3] = 0
    documents = (torch.arange(ids.shape[1], device="cuda") >= ids.shape[1] // 2).long().expand_as(ids)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        for options in ({}, {"attention_mask": padded}, {"document_ids": documents}):
            model(ids, **options).float().sum().backward()
        prompt = reference(name)["prompt_ids"][0].tolist()
        generate(model, [prompt, prompt[:3]], max_new_tokens=4)


def test_a_plain_cuda_device_comes_back_with_its_index_and_current():
    device = use_device("cuda")
    assert device.index == torch.cuda.current_device()


def _syncs(fn) -> int:
    """How many synchronizing CUDA calls `fn` makes (PyTorch's sync debug mode warns on each)."""
    import warnings
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(w.message) for w in caught)


def test_a_training_step_and_a_decoded_token_wait_for_the_gpu_once():
    """Host reads and copies from pageable memory each stall the GPU's queue: a step makes one
    (its loss and norm), decoding one per token (are all rows done?)."""
    import toy_train
    from minituner.distributed import Runtime
    from minituner.optim import build_optimizer
    from minituner.precision import LossScaler, MasterWeights
    from minituner.step import train_step
    model = toy_train.build_model(0)
    masters = MasterWeights(model, torch.bfloat16, torch.device("cuda"))
    optimizer = build_optimizer(masters.named_masters(), lr=1e-3, weight_decay=0.0)
    batches = [toy_train.collate(toy_train.make_examples(4, seed=s)) for s in (1, 2)]
    options = dict(masters=masters, optimizer=optimizer, scaler=LossScaler(enabled=False), lr=1e-3, max_grad_norm=1.0,
                   runtime=Runtime(torch.device("cuda", torch.cuda.current_device())))
    train_step(model, batches, **options)  # warm-up: optimizer state
    assert _syncs(lambda: train_step(model, batches, **options)) == 1
    gpu, _ = load_pretrained(FIXTURES / "llama31-tiny", device="cuda")
    prompt = reference("llama31-tiny")["prompt_ids"][0].tolist()
    decode = [_syncs(lambda n=n: generate(gpu, [prompt, prompt[3:]], max_new_tokens=n, stop_ids=[-1])) for n in (5, 15)]
    assert decode[1] - decode[0] == 10  # one per token (setting up and reading out happen once a call)


def test_fsdp_shards_a_model_waiting_on_the_cpu_onto_the_gpu(tmp_path):
    """The scripts load the model on the CPU under --fsdp; sharding moves it to the GPU block by
    block (one process, NCCL): every slice lands there, float32, and a step trains what the
    unsharded step trains. Rank 0's visit of the GPU before training brings the model back intact."""
    import torch.distributed as dist

    from minituner.distributed import Runtime
    from minituner.optim import build_optimizer
    from minituner.precision import LossScaler, MasterWeights
    from minituner.recipes.flags import on_device
    from minituner.sharding import local, shard_model
    from minituner.step import train_step

    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        runtime = Runtime(torch.device("cuda", 0), sharded=True)
        ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(0))
        batch = {"input_ids": ids, "labels": ids.clone()}
        losses = []
        for sharded in (True, False):
            model, _ = load_pretrained(FIXTURES / "llama-tiny", device="cpu")
            if sharded:
                before = {n: p.detach().clone() for n, p in model.named_parameters()}
                with on_device(model, runtime):
                    assert next(model.parameters()).is_cuda
                assert all(torch.equal(p, before[n]) and not p.is_cuda for n, p in model.named_parameters())
                masters = shard_model(model, torch.float32, runtime)
                assert all(local(p).is_cuda and p.dtype == torch.float32 for p in model.parameters())
            else:
                masters = MasterWeights(model, torch.float32, runtime.device)
            optimizer = build_optimizer(masters.named_masters(), lr=1e-3, weight_decay=0.0)
            out = train_step(model, [batch], masters=masters, optimizer=optimizer, scaler=LossScaler(enabled=False),
                             lr=1e-3, max_grad_norm=1.0, runtime=runtime if sharded else Runtime(runtime.device))
            losses.append(out["loss"])
        assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    finally:
        dist.destroy_process_group()
