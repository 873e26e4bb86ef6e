"""PEFT adapter folders: ours reload identically and carry PEFT's names and shapes, PEFT's load
into ours (tests/fixtures/llama-tiny-lora is one PEFT wrote), GPT-2's fused c_attn both ways,
PEFT's target and pattern rules, and bad folders refused by name."""


import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import FIXTURES, adapted, deltas, logits, randomize
from minituner.errors import UserError
from minituner.hf.folder import load_pretrained
from minituner.hf.peft import load_adapter, save_adapter
from minituner.lora import apply_lora, lora_modules, lora_state_dict

MODELS = ["llama-tiny", "gpt2-tiny"]
PEFT_FIXTURE = FIXTURES / "llama-tiny-lora"


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
