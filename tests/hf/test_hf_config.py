import dataclasses
import json

import pytest
import torch

from conftest import CHECKPOINTS, FIXTURES
from minituner.config import ModelConfig
from minituner.errors import UserError
from minituner.hf.config import from_hf_config, to_hf_config
from minituner.rope import rope_frequencies

LLAMA31_CLASSIC = {  # how Llama-3.1 checkpoints on the hub spell rope scaling
    "model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 24,
    "intermediate_size": 128, "num_hidden_layers": 2, "vocab_size": 384, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
}


def hf_config(name: str) -> dict:
    return json.loads((FIXTURES / name / "config.json").read_text())


def test_classic_rope_keys_and_rope_parameters_mean_the_same():
    modern = from_hf_config(hf_config("llama31-tiny"))  # written by transformers 5: rope_parameters
    classic = from_hf_config(LLAMA31_CLASSIC)
    assert modern.rope_scaling["rope_type"] == "llama3" and modern.rope_theta == 500000.0
    assert dataclasses.replace(classic, extra={}) == dataclasses.replace(modern, extra={})
    assert torch.equal(rope_frequencies(classic)[0], rope_frequencies(modern)[0])


def test_old_type_key_of_rope_scaling_is_read():
    config = from_hf_config({**LLAMA31_CLASSIC, "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert config.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    plain = from_hf_config({**LLAMA31_CLASSIC, "rope_scaling": None})
    both = from_hf_config({**LLAMA31_CLASSIC, "rope_scaling": {"type": "linear", "rope_type": "default", "factor": 2.0}})
    assert both.rope_scaling is None  # as in transformers, rope_type wins over the old type
    assert torch.equal(rope_frequencies(config)[0], rope_frequencies(plain)[0] / 2)


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_hf_config_round_trip(name):
    config = from_hf_config(hf_config(name))
    assert from_hf_config(to_hf_config(config)) == config


SHAPE = {"vocab_size": 100, "intermediate_size": 128, "num_hidden_layers": 2}  # keys every config.json must name


def test_head_dim_and_kv_heads_are_derived():
    config = from_hf_config({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, **SHAPE})
    assert (config.head_dim, config.n_kv_heads) == (16, 4)
    assert from_hf_config(hf_config("llama31-tiny")).head_dim == 24  # explicit, != 64 / 4


def test_sliding_window_defaults_follow_transformers():
    mistral = {"model_type": "mistral", "hidden_size": 64, "num_attention_heads": 8, **SHAPE}
    assert from_hf_config(mistral).sliding_window == 4096  # MistralConfig's default
    assert from_hf_config({**mistral, "sliding_window": None}).sliding_window is None  # Mistral v0.2+
    qwen = {"model_type": "qwen2", "hidden_size": 64, "num_attention_heads": 4, "sliding_window": 32, **SHAPE}
    assert from_hf_config(qwen).sliding_window is None  # use_sliding_window defaults to false
    on = from_hf_config({**qwen, "use_sliding_window": True, "max_window_layers": 3, "num_hidden_layers": 4})
    assert (on.sliding_window, on.sliding_window_from) == (32, 3)


def test_qwen2_has_qkv_bias_and_gpt2_has_all_biases():
    qwen = from_hf_config(hf_config("qwen2-tiny"))
    assert qwen.qkv_bias and not qwen.out_bias and not qwen.mlp_bias and qwen.tie_embeddings
    gpt2 = from_hf_config(hf_config("gpt2-tiny"))
    assert gpt2.qkv_bias and gpt2.out_bias and gpt2.mlp_bias
    assert (gpt2.norm, gpt2.mlp, gpt2.positions, gpt2.ffn_dim) == ("layernorm", "gelu_tanh", "learned", 256)


def test_unknown_keys_are_kept_for_saving():
    config = from_hf_config({**LLAMA31_CLASSIC, "eos_token_id": [1, 2], "some_new_key": "x"})
    hf = to_hf_config(config)
    assert hf["eos_token_id"] == [1, 2] and hf["some_new_key"] == "x"


def test_unsupported_model_type_lists_what_is_supported():
    with pytest.raises(UserError, match=r"cfg\.json: model_type 'bert' is not supported; supported: llama, mistral, qwen2, gpt2"):
        from_hf_config({"model_type": "bert"}, source="cfg.json")


@pytest.mark.parametrize("change, message", [
    ({"hidden_size": "64"}, r"field 'hidden_size' should be int"),
    ({"num_key_value_heads": 3}, r"n_heads 4 is not a multiple of n_kv_heads 3"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, r"rope type 'dynamic' is not supported"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, r"llama3 rope scaling needs a number 'low_freq_factor'"),
    ({"hidden_act": "gelu"}, r"hidden_act 'gelu' is not supported"),
    ({"quantization_config": {"quant_method": "gptq"}}, r"quantized checkpoints"),
    ({"num_attention_heads": 0}, r"n_heads must be positive, got 0"),
    ({"rope_theta": 0}, r"rope_theta must be positive"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "beta_fast": "32"}}, r"rope scaling 'beta_fast' must be a positive number"),
    ({"model_type": "qwen2", "layer_types": [1, 2]}, r"layer_types must be full_attention layers then sliding_attention"),
])
def test_bad_config_values_name_the_file_and_field(change, message):
    with pytest.raises(UserError, match=r"^c\.json: " + message):
        from_hf_config({**LLAMA31_CLASSIC, **change}, source="c.json")


def test_null_original_context_falls_back_to_max_position_embeddings():
    config = from_hf_config({**LLAMA31_CLASSIC, "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                                                 "original_max_position_embeddings": None}})
    assert config.rope_scaling["original_max_position_embeddings"] == 256


def test_configs_transformers_cannot_express_are_refused_on_save():
    config = ModelConfig(model_type="gpt2", dim=32, n_layers=1, n_heads=4, vocab_size=64)  # swiglu, rope
    with pytest.raises(UserError, match="cannot be saved as a Hugging Face 'gpt2' checkpoint"):
        to_hf_config(config)
