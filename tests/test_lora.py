"""LoRA: a fresh adapter leaves the model as it was, only adapters train, merging is exact, and
adapters round-trip through PEFT folders (tests/fixtures/llama-tiny-lora is one PEFT wrote)."""

import json
import math
import shutil

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import FIXTURES, reference
from safetensors.torch import load_file, save_file

from minituner.distributed import Runtime
from minituner.errors import UserError
from minituner.hf.folder import load_pretrained, save_pretrained
from minituner.hf.peft import load_adapter, save_adapter
from minituner.lora import (
    DEFAULT_TARGETS,
    LoRALinear,
    apply_lora,
    lora_modules,
    lora_state_dict,
    merge_and_unload,
    merge_lora,
    trainable_report,
    unmerge_lora,
)
from minituner.loss import IGNORE_INDEX
from minituner.optim import build_optimizer
from minituner.precision import LossScaler, MasterWeights
from minituner.step import train_step

MODELS = ["llama-tiny", "gpt2-tiny"]
PEFT_FIXTURE = FIXTURES / "llama-tiny-lora"


def targets_for(name: str) -> tuple:
    return ("c_attn", "c_proj", "c_fc") if name.startswith("gpt2") else DEFAULT_TARGETS


def randomize(model, seed: int = 0) -> None:
    """Non-zero B everywhere, so that the adapters change the output and every test is sensitive."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)


def adapted(name: str, **options):
    model, _ = load_pretrained(FIXTURES / name)
    apply_lora(model, targets=targets_for(name), **options)
    randomize(model)
    return model


def logits(model, name: str) -> torch.Tensor:
    with torch.no_grad():
        return model(reference(name)["input_ids"])


def deltas(model) -> dict:
    return {name: m.delta_weight() for name, m in lora_modules(model).items()}


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


# ----------------------------------------------------------------------------- PEFT adapter folders
def test_the_peft_fixture_gives_peft_logits():
    model, _ = load_pretrained(FIXTURES / "llama-tiny")
    names = load_adapter(model, PEFT_FIXTURE)
    assert len(names) == 7 * model.config.n_layers
    assert all(m.rank == 4 and m.scale == 2.0 for m in lora_modules(model).values())
    ref = load_file(PEFT_FIXTURE / "reference.safetensors")
    with torch.no_grad():
        assert (model(ref["input_ids"]) - ref["logits"]).abs().max() < 1e-4


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("options", [{}, {"rslora": True, "dropout": 0.1, "rank": 2, "alpha": 5}])
def test_a_saved_adapter_reloads_identically(tmp_path, name, options):
    model = adapted(name, **options).eval()
    save_adapter(model, tmp_path / "adapter", base_model=f"tests/fixtures/{name}")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["use_rslora"] == options.get("rslora", False)
    assert config["lora_dropout"] == options.get("dropout", 0.0)
    assert config["base_model_name_or_path"] == f"tests/fixtures/{name}"
    again, _ = load_pretrained(FIXTURES / name)
    load_adapter(again, tmp_path / "adapter")
    first, second = lora_modules(model), lora_modules(again)
    assert first.keys() == second.keys()
    for k, m in first.items():
        assert (m.rank, m.rslora, m.dropout_p) == (second[k].rank, second[k].rslora, second[k].dropout_p)
        assert second[k].scale == pytest.approx(m.scale, rel=1e-12)
    state, state_again = lora_state_dict(model), lora_state_dict(again)
    assert all(torch.equal(state[k], state_again[k]) for k in state)
    assert (logits(again, name) - logits(model, name)).abs().max() < 1e-6


def test_a_saved_llama_adapter_has_the_names_and_shapes_peft_writes(tmp_path):
    model, _ = load_pretrained(FIXTURES / "llama-tiny")
    apply_lora(model, rank=4, alpha=8)
    save_adapter(model, tmp_path / "adapter")
    ours = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    peft = load_file(PEFT_FIXTURE / "adapter_model.safetensors")
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in peft.items()}
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    peft_config = json.loads((PEFT_FIXTURE / "adapter_config.json").read_text())
    for field in ("peft_type", "task_type", "r", "lora_alpha", "bias", "fan_in_fan_out", "rank_pattern",
                  "alpha_pattern"):
        assert config[field] == peft_config[field], field
    assert sorted(config["target_modules"]) == sorted(peft_config["target_modules"])


@pytest.mark.parametrize("rslora", [False, True])
def test_gpt2_c_attn_is_saved_as_the_stacked_q_k_v_update(tmp_path, rslora):
    model = adapted("gpt2-tiny", rank=4, alpha=8, rslora=rslora)
    save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert config["fan_in_fan_out"] is True and config["target_modules"] == ["c_attn", "c_fc", "c_proj"]
    assert (config["r"], config["lora_alpha"], config["rank_pattern"]) == (4, 8, {"c_attn": 12})
    R, alpha = 12, config["alpha_pattern"]["c_attn"]
    ours = deltas(model)
    for i in range(model.config.n_layers):
        A = tensors[f"base_model.model.transformer.h.{i}.attn.c_attn.lora_A.weight"]  # (3r, C)
        B = tensors[f"base_model.model.transformer.h.{i}.attn.c_attn.lora_B.weight"]  # (3C, 3r)
        assert A.shape == (R, 64) and B.shape == (3 * 64, R)
        peft_delta = alpha / (math.sqrt(R) if rslora else R) * (B @ A)  # what PEFT adds to c_attn
        stacked = torch.cat([ours[f"layers.{i}.self_attn.{x}_proj"] for x in "qkv"])
        assert (peft_delta - stacked).abs().max() < 1e-6


def write_peft_gpt2_adapter(folder, r: int, seed: int = 0) -> dict:
    """A c_attn-only adapter as PEFT trains it: one LoRA over q, k and v, a full (not block) B."""
    folder.mkdir()
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(2):
        prefix = f"base_model.model.transformer.h.{i}.attn.c_attn"
        tensors[f"{prefix}.lora_A.weight"] = torch.randn(r, 64, generator=g) * 0.1
        tensors[f"{prefix}.lora_B.weight"] = torch.randn(3 * 64, r, generator=g) * 0.1
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 16, "lora_dropout": 0.0,
              "target_modules": ["c_attn"], "fan_in_fan_out": True, "bias": "none", "use_rslora": False}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return tensors


@pytest.mark.parametrize("r", [4, 6])
def test_a_peft_c_attn_adapter_splits_into_q_k_v_exactly(tmp_path, r):
    tensors = write_peft_gpt2_adapter(tmp_path / "adapter", r)
    model, _ = load_pretrained(FIXTURES / "gpt2-tiny")
    assert len(load_adapter(model, tmp_path / "adapter")) == 3 * model.config.n_layers
    ours = deltas(model)
    for i in range(2):
        prefix = f"base_model.model.transformer.h.{i}.attn.c_attn"
        peft_delta = 16 / r * (tensors[f"{prefix}.lora_B.weight"] @ tensors[f"{prefix}.lora_A.weight"])
        assert (peft_delta - torch.cat([ours[f"layers.{i}.self_attn.{x}_proj"] for x in "qkv"])).abs().max() < 1e-6
        assert all(lora_modules(model)[f"layers.{i}.self_attn.{x}_proj"].rank == r for x in "qkv")


def test_gpt2_q_k_v_are_adapted_together_or_not_at_all(tmp_path):
    """Refused when applied, not after training, when saving could not write it as PEFT's c_attn."""
    model, _ = load_pretrained(FIXTURES / "gpt2-tiny")
    with pytest.raises(UserError, match=r"layers\.0 has q, k and v as one module \(c_attn\).*target c_attn"):
        apply_lora(model, targets=("q_proj", "v_proj"))
    assert not lora_modules(model)
    apply_lora(model, targets=("q_proj", "k_proj", "v_proj"))  # all three: as c_attn
    save_adapter(model, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["target_modules"] == ["c_attn"]


def test_all_linear_adapts_every_linear_layer_but_the_output_layer():
    model, _ = load_pretrained(FIXTURES / "llama-tiny")
    names = apply_lora(model, targets=("all-linear",))
    assert len(names) == 7 * model.config.n_layers and "lm_head" not in names


def test_target_modules_may_be_a_regex(tmp_path):
    folder = tmp_path / "adapter"
    shutil.copytree(PEFT_FIXTURE, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["target_modules"] = r".*\.(q|k|v|o|gate|up|down)_proj"
    (folder / "adapter_config.json").write_text(json.dumps(config))
    model, _ = load_pretrained(FIXTURES / "llama-tiny")
    load_adapter(model, folder)
    ref = load_file(PEFT_FIXTURE / "reference.safetensors")
    with torch.no_grad():
        assert (model(ref["input_ids"]) - ref["logits"]).abs().max() < 1e-4


def test_peft_patterns_match_the_end_of_module_names(tmp_path):
    folder = tmp_path / "adapter"
    shutil.copytree(PEFT_FIXTURE, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["alpha_pattern"] = {r"layers\.1\.mlp\.down_proj": 2, "q_proj": 1}  # regexes, first match wins
    (folder / "adapter_config.json").write_text(json.dumps(config))
    model, _ = load_pretrained(FIXTURES / "llama-tiny")
    load_adapter(model, folder)
    alphas = {k: m.alpha for k, m in lora_modules(model).items()}
    assert alphas["layers.1.mlp.down_proj"] == 2 and alphas["layers.0.mlp.down_proj"] == 8
    assert alphas["layers.0.self_attn.q_proj"] == 1 and alphas["layers.0.self_attn.k_proj"] == 8


def _edit_config(**changes):
    def edit(folder):
        config = json.loads((folder / "adapter_config.json").read_text())
        config.update(changes)
        (folder / "adapter_config.json").write_text(json.dumps(config))
    return edit


def _edit_tensors(drop=None, add=None, reshape=None):
    def edit(folder):
        tensors = load_file(folder / "adapter_model.safetensors")
        if drop:
            del tensors[drop]
        if add:
            tensors[add] = torch.zeros(4, 64)
        if reshape:
            tensors[reshape] = torch.zeros(8, 64)
        save_file(tensors, str(folder / "adapter_model.safetensors"))
    return edit


PREFIX = "base_model.model.model.layers.0"


@pytest.mark.parametrize("edit, message", [
    (_edit_tensors(drop=f"{PREFIX}.mlp.down_proj.lora_A.weight"),
     r"adapter_model\.safetensors: tensor '.*layers\.0\.mlp\.down_proj\.lora_A\.weight' missing"),
    (_edit_tensors(add=f"{PREFIX}.mlp.extra.lora_A.weight"), r"adapter_model\.safetensors: unexpected tensor '.*extra"),
    (_edit_tensors(reshape=f"{PREFIX}.self_attn.q_proj.lora_A.weight"), r"has shape \(8, 64\), but .* imply \(4, 64\)"),
    (_edit_config(r=8), r"lora_A\.weight' has shape \(4, \d+\), but .* imply \(8, \d+\)"),
    (_edit_config(use_dora=True), r"adapter_config\.json: use_dora = true is not supported"),
    (_edit_config(modules_to_save=["lm_head"]), r"adapter_config\.json: modules_to_save = \[\"lm_head\"\] is not"),
    (_edit_config(bias="all"), r"bias = \"all\" is not supported"),
    (_edit_config(layers_to_transform=[0]), r"layers_to_transform = \[0\] is not supported"),
    (_edit_config(target_parameters=["mlp.experts"]), r"target_parameters"),
    (_edit_config(peft_type="IA3"), r"peft_type 'IA3' is not supported"),
    (_edit_config(init_lora_weights="pissa"), r"init_lora_weights 'pissa' is not supported"),
    (_edit_config(target_modules=None), r"target_modules = null; expected a list"),
    (_edit_config(target_modules=["c_attn"]), r"target_modules \['c_attn'\] matches no linear module of this llama"),
    (_edit_config(lora_alpha="8"), r"lora_alpha = \"8\"; expected a number > 0"),
    (lambda folder: (folder / "adapter_config.json").unlink(), r"no adapter_config\.json, so this is not a PEFT"),
])
def test_bad_adapter_folders_are_user_errors(tmp_path, edit, message):
    folder = tmp_path / "adapter"
    shutil.copytree(PEFT_FIXTURE, folder)
    edit(folder)
    model, _ = load_pretrained(FIXTURES / "llama-tiny")
    with pytest.raises(UserError, match=message) as error:
        load_adapter(model, folder)
    assert str(folder) in str(error.value) and "\n" not in str(error.value)


def test_save_adapter_replaces_an_adapter_folder_but_nothing_else(tmp_path):
    model = adapted("llama-tiny")
    save_adapter(model, tmp_path / "adapter")
    randomize(model, seed=1)
    save_adapter(model, tmp_path / "adapter")  # an adapter folder is replaced whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert torch.equal(saved[f"{PREFIX}.self_attn.q_proj.lora_B.weight"],
                       lora_modules(model)["layers.0.self_attn.q_proj"].lora_B.weight)
    (tmp_path / "adapter" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds 'notes.txt', which is not an adapter file"):
        save_adapter(model, tmp_path / "adapter")
