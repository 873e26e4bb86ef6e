"""LoRA: a fresh adapter leaves the model as it was, only adapters train, merging is exact, and
targets name modules as PEFT users write them (PEFT folders: tests/hf/test_peft.py)."""

import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import FIXTURES, adapted, logits, randomize, reference, targets_for
from minituner.distributed import Runtime
from minituner.errors import UserError
from minituner.hf.folder import load_pretrained, save_pretrained
from minituner.hf.peft import load_adapter, save_adapter
from minituner.lora import (LoRALinear, apply_lora, lora_modules, lora_state_dict, merge_and_unload, merge_lora,
                            trainable_report, unmerge_lora)
from minituner.loss import IGNORE_INDEX
from minituner.optim import build_optimizer
from minituner.precision import LossScaler, MasterWeights
from minituner.step import train_step

MODELS = ["llama-tiny", "gpt2-tiny"]


# ----------------------------------------------------------------------------- the module
@pytest.mark.parametrize("rslora", [False, True])
def test_forward_is_the_base_plus_the_scaled_low_rank_product(rslora):
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    lora = LoRALinear(base, rank=4, alpha=8, rslora=rslora)
    assert lora.scale == (8 / math.sqrt(4) if rslora else 8 / 4)
    nn.init.normal_(lora.lora_B.weight)
    x = torch.randn(3, 5, 16)
    expected = F.linear(x, base.weight, base.bias) + lora.scale * (x @ lora.lora_A.weight.T @ lora.lora_B.weight.T)
    assert (lora(x) - expected).abs().max() < 1e-5
    assert dict(lora.named_parameters()).keys() == {"weight", "bias", "lora_A.weight", "lora_B.weight"}
    assert lora.lora_A.weight.shape == (4, 16) and lora.lora_B.weight.shape == (12, 4)


def test_dropout_touches_only_the_low_rank_branch():
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    lora = LoRALinear(base, rank=4, alpha=8, dropout=0.5).train()
    x = torch.randn(8, 16)
    assert torch.equal(lora(x), base(x))  # B = 0: whatever dropout drops, the branch adds nothing
    nn.init.normal_(lora.lora_B.weight)
    assert not torch.equal(lora(x), lora(x))  # two dropout masks
    lora.eval()
    assert torch.equal(lora(x), lora(x))


@pytest.mark.parametrize("name", MODELS)
def test_a_fresh_adapter_changes_nothing_and_keeps_the_base_names(name):
    model, _ = load_pretrained(FIXTURES / name)
    before, base_state = logits(model, name), dict(model.state_dict())
    apply_lora(model, targets=targets_for(name))
    assert torch.equal(logits(model, name), before)  # B = 0
    result = model.load_state_dict(base_state, strict=False)  # a base checkpoint loads unchanged
    assert result.unexpected_keys == []
    assert set(result.missing_keys) == set(lora_state_dict(model))


@pytest.mark.parametrize("name", MODELS)
def test_gradients_reach_only_the_adapters(name):
    model = adapted(name)
    model(reference(name)["input_ids"]).float().pow(2).mean().backward()
    for param_name, p in model.named_parameters():
        is_lora = ".lora_A." in param_name or ".lora_B." in param_name
        assert p.requires_grad == is_lora and (p.grad is not None) == is_lora, param_name
        if is_lora:
            assert p.grad.abs().sum() > 0, param_name


def test_a_training_step_changes_only_the_adapters():
    model = adapted("llama-tiny").train()
    base = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    lora_before = {k: v.clone() for k, v in lora_state_dict(model).items()}
    masters = MasterWeights(model, torch.bfloat16)
    assert len(masters.masters) == len(lora_before)  # float32 masters (and optimizer state) for adapters only
    optimizer = build_optimizer(masters.named_masters(), lr=1e-2, weight_decay=0.0)
    ids = reference("llama-tiny")["input_ids"]
    labels = ids.clone()
    labels[:, 0] = IGNORE_INDEX
    train_step(model, [{"input_ids": ids, "labels": labels}], masters=masters, optimizer=optimizer,
               scaler=LossScaler(enabled=False), lr=1e-2, max_grad_norm=1.0, runtime=Runtime(torch.device("cpu")))
    after = model.state_dict()
    assert all(torch.equal(after[k], v.to(torch.bfloat16)) for k, v in base.items())
    assert all(not torch.equal(after[k].float(), v) for k, v in lora_before.items())


# ----------------------------------------------------------------------------- merging
@pytest.mark.parametrize("name", MODELS)
def test_merge_keeps_the_outputs_and_unmerge_restores_the_base(name):
    model = adapted(name)
    weights = {k: m.weight.detach().clone() for k, m in lora_modules(model).items()}
    unmerged = logits(model, name)
    merge_lora(model)
    assert all(m.merged for m in lora_modules(model).values())
    assert (logits(model, name) - unmerged).abs().max() < 1e-5
    unmerge_lora(model)
    assert max((m.weight - weights[k]).abs().max() for k, m in lora_modules(model).items()) < 1e-6
    assert (logits(model, name) - unmerged).abs().max() < 1e-5


def test_merge_rounds_once_into_the_weights_dtype():
    base = nn.Linear(16, 12, dtype=torch.bfloat16)
    lora = LoRALinear(base, rank=4, alpha=8)
    nn.init.normal_(lora.lora_B.weight)
    expected = (base.weight.float() + lora.delta_weight()).to(torch.bfloat16)
    lora.merge()
    assert lora.weight.dtype == torch.bfloat16 and torch.equal(lora.weight, expected)


@pytest.mark.parametrize("name", MODELS)
def test_merge_and_unload_saves_an_ordinary_checkpoint(tmp_path, name):
    model, tokenizer = load_pretrained(FIXTURES / name)
    base_keys = set(model.state_dict())
    apply_lora(model, targets=targets_for(name))
    randomize(model)
    expected = logits(model, name)
    with pytest.raises(UserError, match="still has LoRA adapters; merge_and_unload it first"):
        save_pretrained(model, tokenizer, tmp_path / "merged")
    merge_and_unload(model)
    assert not lora_modules(model) and set(model.state_dict()) == base_keys
    save_pretrained(model, tokenizer, tmp_path / "merged")
    again, _ = load_pretrained(tmp_path / "merged")
    assert (logits(again, name) - expected).abs().max() < 1e-5


# ----------------------------------------------------------------------------- choosing modules
@pytest.mark.parametrize("target, ours", [
    ("c_attn", {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"}),
    ("c_proj", {"self_attn.o_proj", "mlp.down_proj"}),  # GPT-2 uses the name in attention and in the MLP
    ("attn.c_proj", {"self_attn.o_proj"}),
    ("mlp.c_proj", {"mlp.down_proj"}),
    ("c_fc", {"mlp.up_proj"}),
    ("k_proj,v_proj,q_proj", {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"}),  # Llama names too
])
def test_gpt2_targets_map_to_our_modules(target, ours):
    model, _ = load_pretrained(FIXTURES / "gpt2-tiny")
    names = apply_lora(model, targets=tuple(target.split(",")))
    assert sorted(names) == sorted(f"layers.{i}.{m}" for i in range(model.config.n_layers) for m in ours)


def test_default_targets_adapt_what_gpt2_has():
    """GPT-2 has no gate_proj: the default list adapts its other six projections, not an error."""
    model, _ = load_pretrained(FIXTURES / "gpt2-tiny")
    names = apply_lora(model)
    ours = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")
    assert sorted(n.rsplit(".", 1)[-1] for n in names) == sorted(ours * model.config.n_layers)
    with pytest.raises(UserError, match="'gate_proj' matches none"):  # named explicitly, it must exist
        apply_lora(load_pretrained(FIXTURES / "gpt2-tiny")[0], targets=("q_proj", "gate_proj"))


def test_an_unknown_target_is_a_user_error_and_changes_nothing():
    model, _ = load_pretrained(FIXTURES / "llama-tiny")
    with pytest.raises(UserError, match=r"target 'qkv_proj' matches none of the model's linear modules, "
                                        r"which are named down_proj, .*q_proj"):
        apply_lora(model, targets=("q_proj", "qkv_proj"))
    assert not lora_modules(model)
    with pytest.raises(UserError, match=r"rank override 'c_attn' matches none of the adapted modules"):
        apply_lora(model, ranks={"c_attn": 2})


def test_a_tied_lm_head_is_refused():
    model, _ = load_pretrained(FIXTURES / "gpt2-tiny")  # lm_head shares the token embedding
    with pytest.raises(UserError, match="'lm_head' shares its weight"):
        apply_lora(model, targets=("lm_head",))


def test_ranks_and_alphas_per_module_round_trip(tmp_path):
    model, _ = load_pretrained(FIXTURES / "llama-tiny")
    apply_lora(model, rank=4, alpha=8, ranks={"down_proj": 2, "layers.1.self_attn.q_proj": 6}, alphas={"q_proj": 3})
    randomize(model)
    modules = lora_modules(model)
    assert modules["layers.0.mlp.down_proj"].lora_A.weight.shape == (2, 176)
    assert modules["layers.1.self_attn.q_proj"].rank == 6 and modules["layers.0.self_attn.q_proj"].rank == 4
    assert modules["layers.1.self_attn.q_proj"].alpha == 3 and modules["layers.0.self_attn.k_proj"].alpha == 8
    save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 8)
    assert config["rank_pattern"] == {"down_proj": 2, "model.layers.1.self_attn.q_proj": 6}
    assert config["alpha_pattern"] == {"q_proj": 3}
    again, _ = load_pretrained(FIXTURES / "llama-tiny")
    load_adapter(again, tmp_path / "adapter")
    assert {k: (m.rank, m.alpha) for k, m in lora_modules(again).items()} == {
        k: (m.rank, m.alpha) for k, m in modules.items()}
    assert torch.equal(logits(again, "llama-tiny"), logits(model, "llama-tiny"))


def test_trainable_report_counts_the_adapters_once():
    model, _ = load_pretrained(FIXTURES / "llama-tiny")
    total = sum(p.numel() for p in model.parameters())
    apply_lora(model, rank=4)
    lora = sum(m.rank * (m.in_features + m.out_features) for m in lora_modules(model).values())
    assert sum(t.numel() for t in lora_state_dict(model).values()) == lora
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in lora_state_dict(model))
    assert trainable_report(model) == (f"trainable params: {lora:,} || all params: {total + lora:,} || "
                                       f"trainable%: {100 * lora / (total + lora):.2f}")


def test_all_linear_adapts_every_linear_layer_but_the_output_layer():
    model, _ = load_pretrained(FIXTURES / "llama-tiny")
    names = apply_lora(model, targets=("all-linear",))
    assert len(names) == 7 * model.config.n_layers and "lm_head" not in names
