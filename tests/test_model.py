"""The transformer computes what Hugging Face transformers computes for the same checkpoint."""

import dataclasses
import math

import pytest
import torch

from conftest import CHECKPOINTS, FIXTURES, reference
from minituner.config import ModelConfig
from minituner.generate import generate
from minituner.hf.folder import load_pretrained
from minituner.loss import lm_loss_sum, target_count
from minituner.model import KVCache, Transformer, default_position_ids


def causal_lm_loss(logits, labels):
    """Mean loss over the target tokens, from minituner's own loss (position t predicts labels[t + 1])."""
    return lm_loss_sum(logits, labels).item() / target_count(labels)


@pytest.fixture(scope="module", params=CHECKPOINTS)
def checkpoint(request):
    model, tokenizer = load_pretrained(FIXTURES / request.param)
    return request.param, model, reference(request.param)


def test_logits_and_loss_match_transformers(checkpoint):
    name, model, ref = checkpoint
    with torch.no_grad():
        logits = model(ref["input_ids"])
    assert logits.shape == ref["logits"].shape
    assert (logits - ref["logits"]).abs().max() < 1e-4
    assert abs(causal_lm_loss(logits, ref["labels"]) - ref["loss"].item()) < 1e-5


def test_greedy_ids_match_transformers(checkpoint):
    name, model, ref = checkpoint
    prompt = ref["prompt_ids"][0].tolist()
    new = generate(model, [prompt], max_new_tokens=12)[0]
    assert prompt + new == ref["greedy_ids"][0].tolist()


@pytest.mark.parametrize("name", [n for n in CHECKPOINTS if "padded_ids" in reference(n)])
def test_left_padded_batch_matches_transformers(name):
    model, _ = load_pretrained(FIXTURES / name)
    ref = reference(name)
    with torch.no_grad():
        logits = model(ref["padded_ids"], attention_mask=ref["padded_mask"])
    real = ref["padded_mask"].bool()
    assert (logits[real] - ref["padded_logits"][real]).abs().max() < 1e-4


def test_cached_decoding_equals_full_forward(checkpoint):
    """Prefill 10 tokens, then feed the rest one at a time (past mistral's 8-token window)."""
    name, model, ref = checkpoint
    ids = ref["input_ids"]
    B, T = ids.shape
    cache = KVCache(model.config, B, T, "cpu", torch.float32)
    with torch.no_grad():
        full = model(ids)
        steps = [model(ids[:, :10], cache=cache)]
        steps += [model(ids[:, t:t + 1], cache=cache) for t in range(10, T)]
    assert (torch.cat(steps, dim=1) - full).abs().max() < 1e-5


def test_padded_cached_decoding_equals_unpadded(checkpoint):
    """A short prompt decoded inside a left-padded batch gives the logits it gets alone."""
    name, model, ref = checkpoint
    long, short = ref["input_ids"][0, :12], ref["input_ids"][1, :5]
    ids = torch.stack([long, torch.cat([torch.zeros(7, dtype=torch.long), short])])  # (2, 12)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :7] = 0
    cache = KVCache(model.config, 2, 16, "cpu", torch.float32)
    nxt = torch.tensor([[5], [6]])
    with torch.no_grad():
        model(ids, attention_mask=mask, cache=cache)
        batched = model(nxt, attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1), cache=cache)
        alone = model(torch.cat([short, torch.tensor([6])])[None])[:, -1:]
    assert (batched[1:] - alone).abs().max() < 1e-5


def test_packed_documents_do_not_see_each_other(checkpoint):
    name, model, ref = checkpoint
    a, b, c = ref["input_ids"][0, :9], ref["input_ids"][1, :15], ref["input_ids"][1, 15:20]
    packed = torch.cat([a, b, c])[None]  # (1, 29)
    documents = torch.tensor([[0] * 9 + [1] * 15 + [0] * 5])  # an id may come back: runs are documents
    with torch.no_grad():
        together = model(packed, document_ids=documents)
        apart = torch.cat([model(a[None]), model(b[None]), model(c[None])], dim=1)
    assert (together - apart).abs().max() < 1e-5


def test_positions_restart_per_document_and_skip_left_padding():
    documents = torch.tensor([[0, 0, 0, 1, 1, 0]])
    assert default_position_ids(1, 6, 0, "cpu", document_ids=documents).tolist() == [[0, 1, 2, 0, 1, 0]]
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert default_position_ids(2, 4, 0, "cpu", attention_mask=mask).tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]
    assert default_position_ids(1, 2, 5, "cpu").tolist() == [[5, 6]]


def test_rope_frequencies_survive_a_cast_to_bfloat16():
    model, _ = load_pretrained(FIXTURES / "llama31-tiny")
    before = model.inv_freq.clone()
    model.to(torch.bfloat16)
    assert model.inv_freq.dtype == torch.float32 and torch.equal(model.inv_freq, before)


def test_low_precision_forward_stays_close_to_float32():
    model, _ = load_pretrained(FIXTURES / "llama-tiny", dtype=torch.bfloat16)
    ref = reference("llama-tiny")
    with torch.no_grad():
        logits = model(ref["input_ids"])
    assert logits.dtype == torch.bfloat16
    assert (logits.float() - ref["logits"]).abs().max() < 0.1


def test_from_scratch_model_starts_near_uniform():
    """At init the logits are small, so the loss is close to ln V: no token is favoured."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=512, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=128)
    model = Transformer(config)
    ids = torch.randint(0, 512, (2, 32))
    with torch.no_grad():
        logits = model(ids)
    assert logits.shape == (2, 32, 512)
    assert abs(causal_lm_loss(logits, ids) - math.log(512)) < 0.05


def test_from_scratch_init_scales_residual_projections():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, dim=256, n_layers=8, n_heads=4, ffn_dim=512))
    q_std = model.layers[0].self_attn.q_proj.weight.std().item()
    o_std = model.layers[0].self_attn.o_proj.weight.std().item()
    assert abs(q_std - 0.02) < 0.002 and abs(o_std - 0.02 / math.sqrt(16)) < 0.001
    assert torch.equal(model.layers[0].input_layernorm.weight, torch.ones(256))


def test_tied_embeddings_share_one_matrix():
    model = Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, ffn_dim=64, tie_embeddings=True))
    assert model.lm_head.weight is model.embed_tokens.weight


def test_gqa_paths_agree_with_repeated_heads():
    """The shared-head kernels give what explicitly repeated key/value heads give."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=1, ffn_dim=64)
    gqa = Transformer(config)
    mha = Transformer(dataclasses.replace(config, n_kv_heads=4))
    state = gqa.state_dict()
    for i in range(config.n_layers):
        for proj in ("k_proj", "v_proj"):
            key = f"layers.{i}.self_attn.{proj}.weight"
            state[key] = state[key].repeat(4, 1)  # one head's rows, four times
    mha.load_state_dict(state)
    ids = torch.randint(0, 64, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, :3] = 0
    with torch.no_grad():
        for kwargs in ({}, {"attention_mask": mask}):
            assert (gqa(ids, **kwargs) - mha(ids, **kwargs)).abs().max() < 1e-5


@pytest.mark.cuda
def test_cuda_matches_cpu():
    ref = reference("llama31-tiny")
    model, _ = load_pretrained(FIXTURES / "llama31-tiny", device="cuda")
    with torch.no_grad():
        logits = model(ref["input_ids"].cuda())
    assert (logits.cpu() - ref["logits"]).abs().max() < 1e-4
    model, _ = load_pretrained(FIXTURES / "llama31-tiny", device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        assert (model(ref["input_ids"].cuda()).float().cpu() - ref["logits"]).abs().max() < 0.1


# ----------------------------------------------------------------------------- the CUDA kernels' ways, on CPU
def _gqa_prompts():
    ids = reference("llama31-tiny")["prompt_ids"][0].tolist()
    return [ids, ids[3:], ids[:2]]  # different lengths: left padding, a mask in every decode step


def test_batched_decoding_survives_outputs_laid_out_as_cuda_returns_them(monkeypatch):
    """CUDA's memory-efficient kernel returns its (B, N, T, D) output laid out as (B, T, N, D);
    grouped-query decoding with padding must not assume contiguous outputs."""
    model, _ = load_pretrained(FIXTURES / "llama31-tiny")  # 4 query heads, 2 key/value heads
    expected = generate(model, _gqa_prompts(), max_new_tokens=6)
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def cuda_strides(*args, **kwargs):
        return sdpa(*args, **kwargs).transpose(1, 2).contiguous().transpose(1, 2)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", cuda_strides)
    assert generate(model, _gqa_prompts(), max_new_tokens=6) == expected


def _record_sdpa(monkeypatch) -> list[dict]:
    calls, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, is_causal=False, enable_gqa=False, **rest):
        calls.append({"q_heads": q.shape[1], "kv_heads": k.shape[1], "mask": attn_mask, "enable_gqa": enable_gqa,
                      "length": q.shape[2], "causal": is_causal})
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=enable_gqa, **rest)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    return calls


def test_every_layer_gets_one_float_mask_made_once_per_forward(monkeypatch):
    """A bool mask would be turned into a float one inside each layer's SDPA call (and kept by
    each layer's backward); one float mask, made once with rows aligned as the memory-efficient
    kernel needs, is shared by all layers."""
    model, _ = load_pretrained(FIXTURES / "llama31-tiny")
    calls = _record_sdpa(monkeypatch)
    ids = reference("llama31-tiny")["input_ids"][:1, :12]
    model(ids, document_ids=torch.tensor([[0] * 5 + [1] * 7]), attention_mask=torch.ones(1, 12))  # packed + mask
    model(ids.expand(2, 12), attention_mask=torch.tensor([[0, 0] + [1] * 10, [1] * 12]))  # padded
    for forward in (calls[:model.config.n_layers], calls[model.config.n_layers:]):
        assert len(forward) == model.config.n_layers
        assert all(c["mask"] is forward[0]["mask"] for c in forward)
        assert forward[0]["mask"].dtype == torch.float32 and forward[0]["mask"].isneginf().any()
        assert forward[0]["mask"].stride(-2) % 16 == 0  # else the memory-efficient kernel pads a copy per layer


@pytest.mark.parametrize("name", ["llama31-tiny", "qwen2-window-tiny"])
def test_packed_rows_attend_document_by_document_without_a_mask(name, monkeypatch):
    """Packed rows (document_ids, no padding mask) take one causal kernel call per document and
    layer, no (T x T) mask, with the masked path's values; a document longer than a sliding
    window (qwen2-window-tiny's 8 tokens) gets a window mask of its own length on windowed layers."""
    model, _ = load_pretrained(FIXTURES / name)
    ids = reference(name)["input_ids"][:2, :12]
    documents = torch.tensor([[0] * 5 + [1] * 7, [0] * 3 + [1] * 2 + [-1] * 7])  # the second row ends in padding
    calls = _record_sdpa(monkeypatch)
    with torch.no_grad():
        apart = model(ids, document_ids=documents)
        masked = model(ids, document_ids=documents, attention_mask=torch.ones(2, 12))  # forces the (T x T) mask
    L = model.config.n_layers
    assert (apart - masked).abs().max() < 1e-5
    assert len(calls) == 5 * L + L and all(c["mask"] is None and c["causal"] for c in calls[:5 * L])
    assert [c["length"] for c in calls[:5]] == [5, 7, 3, 2, 7]
    documents = torch.tensor([[0] * 10 + [1] * 2, [0] * 12])  # 10 and 12 tokens: past qwen2-window-tiny's window
    calls.clear()
    with torch.no_grad():
        apart = model(ids, document_ids=documents)
        masked = model(ids, document_ids=documents, attention_mask=torch.ones(2, 12))
    assert (apart - masked).abs().max() < 1e-5
    window = model.config.sliding_window
    windowed = [layer.self_attn.uses_window for layer in model.layers]
    per_layer = [calls[3 * i:3 * i + 3] for i in range(L)]  # 3 documents a layer on the spans path
    for uses_window, layer_calls in zip(windowed, per_layer):  # a window mask only for a document longer than it
        assert [c["mask"] is not None for c in layer_calls] == [uses_window and n > window for n in (10, 2, 12)]


@pytest.mark.parametrize("name", ["llama31-tiny", "mistral-tiny", "qwen2-window-tiny"])
def test_without_flash_grouped_heads_reach_kernels_that_need_equal_heads(name, monkeypatch):
    """Where flash cannot run (a mask, fp32, an old GPU), enable_gqa would send SDPA to the math
    kernel; every call must then have as many key/value heads as query heads, or decode as a
    group, and compute the same logits."""
    import minituner.model as model_module
    model, _ = load_pretrained(FIXTURES / name)
    ids = reference(name)["input_ids"]
    padded = torch.ones_like(ids)
    padded[0, :3] = 0
    with torch.no_grad():
        expected = [model(ids), model(ids, attention_mask=padded)]
        expected_ids = generate(model, _gqa_prompts(), max_new_tokens=4)
        monkeypatch.setattr(model_module, "_kernel_shares_heads", lambda q, k, is_causal: False)
        calls = _record_sdpa(monkeypatch)
        got = [model(ids), model(ids, attention_mask=padded)]
        assert generate(model, _gqa_prompts(), max_new_tokens=4) == expected_ids
    assert all(not c["enable_gqa"] and c["q_heads"] in (c["kv_heads"], model.config.n_kv_heads) for c in calls)
    assert any(c["q_heads"] != model.config.n_heads for c in calls)  # the decoding fold was used
    for a, b in zip(got, expected):
        assert (a - b).abs().max() < 1e-5


def test_the_cudnn_attention_backend_is_turned_off_once_unless_asked_for(monkeypatch):
    import minituner.model as model_module
    seen = []
    monkeypatch.setattr(torch.backends.cuda, "enable_cudnn_sdp", seen.append)
    monkeypatch.setattr(model_module, "_cudnn_checked", False)
    model_module._guard_cudnn_attention()
    model_module._guard_cudnn_attention()
    assert seen == [False]
    monkeypatch.setattr(model_module, "_cudnn_checked", False)
    monkeypatch.setattr(model_module, "CUDNN_ATTENTION", True)
    model_module._guard_cudnn_attention()
    assert seen == [False]


@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny", "mistral-tiny"])
@pytest.mark.parametrize("lora", [False, True])
def test_activation_checkpointing_recomputes_the_same_gradients(name, lora, monkeypatch):
    """Blocks recomputed in the backward pass (packed documents, so masks and positions travel into
    the recomputation too) give the same loss and gradients, to the bit; without gradients
    (generation, evaluation) nothing is recomputed."""
    from minituner.lora import apply_lora
    model, _ = load_pretrained(FIXTURES / name)
    if lora:
        apply_lora(model, targets=("c_attn",) if name.startswith("gpt2") else ("q_proj", "v_proj"))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 300, (2, 24), generator=g)
    documents = torch.tensor([0] * 10 + [1] * 14).expand(2, 24)

    def run():
        model.zero_grad()
        loss = lm_loss_sum(model(ids, document_ids=documents), ids)
        loss.backward()
        return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain_loss, plain = run()
    model.activation_checkpointing = True
    original, calls = torch.utils.checkpoint.checkpoint, []
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or original(*a, **k))
    recomputed_loss, recomputed = run()
    assert len(calls) == model.config.n_layers  # every block was checkpointed
    assert torch.equal(plain_loss, recomputed_loss) and plain.keys() == recomputed.keys()
    assert all(torch.equal(plain[n], recomputed[n]) for n in plain)
    def refuse(*args, **kwargs):
        raise AssertionError("checkpointed without gradients")
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", refuse)
    with torch.no_grad():
        model(ids)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_keeps_two_activations_and_gives_autograds_bits(dtype):
    """model.SwiGLU keeps gate and up for the backward pass (autograd's silu(gate) * up keeps
    silu(gate) as well) and computes the same output and gradients to the bit."""
    from minituner.model import SwiGLU
    torch.manual_seed(0)
    gate, up, w = (torch.randn(16, 40, dtype=dtype, requires_grad=i < 2) for i in range(3))
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        out = SwiGLU.apply(gate, up)
    (out * w).sum().backward()
    fused = (out, gate.grad.clone(), up.grad.clone())
    gate.grad = up.grad = None
    plain = torch.nn.functional.silu(gate) * up
    (plain * w).sum().backward()
    assert len(kept) == 2 and all(torch.equal(a, b) for a, b in zip(fused, (plain, gate.grad, up.grad)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_rotation_written_into_halves_is_the_rotate_half_formula_to_the_bit(dtype):
    """apply_rope computes x * cos + cat(-x2, x1) * sin (HF's rotate_half) without the
    concatenation or the negation: the same output and gradient bits."""
    from minituner.rope import apply_rope, rope_cos_sin
    torch.manual_seed(0)
    x = torch.randn(2, 16, 4, 32, dtype=dtype).transpose(1, 2).requires_grad_()  # (B, H, T, D), strided as q is
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 32, 2).float() / 32))
    cos, sin = rope_cos_sin(inv_freq, 1.0, torch.arange(16).expand(2, 16), dtype)
    grad = torch.randn(2, 4, 16, 32, dtype=dtype)
    x1, x2 = x.chunk(2, dim=-1)
    reference = x * cos[:, None] + torch.cat((-x2, x1), dim=-1) * sin[:, None]
    reference.backward(grad)
    reference_grad, x.grad = x.grad.clone(), None
    out = apply_rope(x, cos, sin)
    out.backward(grad)
    assert torch.equal(out, reference) and torch.equal(x.grad, reference_grad)
