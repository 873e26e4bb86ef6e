"""config.json of a Hugging Face model folder <-> ModelConfig.

`from_hf_config` reads the keys that hub checkpoints carry (`rope_theta` + `rope_scaling`) as
well as the newer `rope_parameters` of transformers 5, filling absent keys with the defaults of
the transformers config classes (except the keys that fix the weights' shapes, which must be
there), so a folder means here what it means there. `to_hf_config` writes a config.json under
which transformers builds the same model, or refuses a shape that family cannot express.
"""

from minituner.config import SUPPORTED_MODEL_TYPES, ModelConfig
from minituner.errors import UserError

_LLAMA_DEFAULTS = {  # the transformers config classes' defaults, for keys a config.json leaves out
    "llama": dict(max_position_embeddings=2048, sliding_window=None),
    "mistral": dict(max_position_embeddings=131072, sliding_window=4096),
    "qwen2": dict(max_position_embeddings=32768, sliding_window=4096),
}
# Keys that fix the shapes of the weights. transformers fills them with one particular model's
# sizes when absent (Llama 2 7B's hidden_size 4096, ...), which would only fail later as a
# tensor of the wrong shape; here a config.json must name them.
_REQUIRED = {"llama": ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"),
             "gpt2": ("vocab_size", "n_embd", "n_layer", "n_head")}
_GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu": "gelu"}
# Keys we read or rewrite on save. Any other key (token ids, dropout rates, ...) is kept in
# ModelConfig.extra and written back unchanged.
_KNOWN_KEYS = {
    "architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "use_cache", "initializer_range",
    "attention_dropout", "pretraining_tp", "_name_or_path", "vocab_size", "hidden_size", "intermediate_size",
    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings",
    "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters", "tie_word_embeddings", "attention_bias", "mlp_bias",
    "sliding_window", "use_sliding_window", "max_window_layers", "layer_types", "n_positions", "n_embd", "n_layer", "n_head",
    "n_inner", "activation_function", "layer_norm_epsilon", "scale_attn_weights", "scale_attn_by_inverse_layer_idx",
    "reorder_and_upcast_attn", "add_cross_attention", "n_ctx",
}


def from_hf_config(hf: dict, source: str = "config.json") -> ModelConfig:
    """Build a ModelConfig from the dict of a Hugging Face config.json; `source` names it in errors."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(f"{source}: model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    if hf.get("quantization_config"):
        raise UserError(f"{source}: quantized checkpoints (quantization_config) are not supported; use the unquantized weights")
    missing = [key for key in _REQUIRED["gpt2" if model_type == "gpt2" else "llama"] if hf.get(key) is None]
    if missing:
        raise UserError(f"{source}: required key {missing[0]!r} is missing"
                        + (f" (and {', '.join(map(repr, missing[1:]))})" if missing[1:] else "")
                        + f"; a {model_type} config.json gives the model's shape")
    reader = _Fields(hf, source)
    try:
        fields = _gpt2_fields(reader) if model_type == "gpt2" else _llama_fields(reader, model_type)
        extra = {k: v for k, v in hf.items() if k not in _KNOWN_KEYS}
        return ModelConfig(model_type=model_type, extra=extra, **fields)
    except ValueError as e:
        raise UserError(f"{source}: {e}") from None


class _Fields:
    """Typed access to config.json keys, with errors that name the file and the key."""

    def __init__(self, hf: dict, source: str):
        self.hf, self.source = hf, source

    def get(self, key: str, default, kind=int, nullable: bool = False):
        """hf[key] checked to be of `kind`; `default` when absent; None when null and `nullable`."""
        if self.hf.get(key) is None:
            return None if key in self.hf and nullable else default
        value = self.hf[key]
        kinds = (int, float) if kind is float else kind
        if not isinstance(value, kinds) or (kind is not bool and isinstance(value, bool)):
            raise UserError(f"{self.source}: field {key!r} should be {getattr(kind, '__name__', kind)}, got {value!r}")
        return value


def _llama_fields(f: _Fields, model_type: str) -> dict:
    defaults = _LLAMA_DEFAULTS[model_type]
    act = f.get("hidden_act", "silu", str)
    if act not in ("silu", "swish"):
        raise UserError(f"{f.source}: hidden_act {act!r} is not supported for {model_type} (only 'silu')")
    dim, n_heads = f.get("hidden_size", None), f.get("num_attention_heads", None)
    max_len = f.get("max_position_embeddings", defaults["max_position_embeddings"])
    theta, scaling = _hf_rope(f, max_len)
    bias = f.get("attention_bias", False, bool) if model_type == "llama" else model_type == "qwen2"
    window, window_from = _hf_sliding_window(f, model_type, defaults["sliding_window"])
    return dict(
        vocab_size=f.get("vocab_size", None), dim=dim, n_layers=f.get("num_hidden_layers", None), n_heads=n_heads,
        n_kv_heads=f.get("num_key_value_heads", 8 if model_type == "mistral" else None, nullable=True),
        head_dim=f.get("head_dim", None), ffn_dim=f.get("intermediate_size", None),
        norm="rmsnorm", norm_eps=f.get("rms_norm_eps", 1e-6, float), mlp="swiglu", positions="rope",
        rope_theta=theta, rope_scaling=scaling, qkv_bias=bias, out_bias=bias and model_type == "llama",
        mlp_bias=f.get("mlp_bias", False, bool) if model_type == "llama" else False,
        tie_embeddings=f.get("tie_word_embeddings", False, bool), max_seq_len=max_len,
        sliding_window=window, sliding_window_from=window_from,
    )


def _hf_rope(f: _Fields, max_len: int) -> tuple[float, dict | None]:
    """rope_theta and scaling from either `rope_parameters` (transformers 5) or the classic keys."""
    # transformers gives the classic rope_scaling priority over rope_parameters when both are set
    params = f.get("rope_scaling", None, dict) or f.get("rope_parameters", None, dict) or {}
    if any(isinstance(v, dict) for v in params.values()):
        raise UserError(f"{f.source}: per-layer rope_parameters are not supported")
    theta = params.get("rope_theta", f.get("rope_theta", 10000.0, float))
    if f.hf.get("partial_rotary_factor", 1.0) != 1.0:
        raise UserError(f"{f.source}: partial_rotary_factor != 1 is not supported")
    return theta, dict(params) if params else None


def _hf_sliding_window(f: _Fields, model_type: str, default: int | None) -> tuple[int | None, int]:
    if model_type == "llama":
        return None, 0
    window = f.get("sliding_window", default, nullable=True)
    if model_type == "mistral":
        return window, 0
    layer_types = f.get("layer_types", None, list)
    if layer_types is None:  # qwen2 before transformers 5: the window is off unless switched on
        if not f.get("use_sliding_window", False, bool) or window is None:
            return None, 0
        return window, f.get("max_window_layers", 28)
    n_full = layer_types.index("sliding_attention") if "sliding_attention" in layer_types else len(layer_types)
    if any(t != "sliding_attention" for t in layer_types[n_full:]) or any(t != "full_attention" for t in layer_types[:n_full]):
        raise UserError(f"{f.source}: layer_types must be full_attention layers then sliding_attention layers")
    return (window, n_full) if n_full < len(layer_types) and window is not None else (None, 0)


def _gpt2_fields(f: _Fields) -> dict:
    act = f.get("activation_function", "gelu_new", str)
    if act not in _GPT2_ACTIVATIONS:
        raise UserError(f"{f.source}: activation_function {act!r} is not supported; supported: {', '.join(_GPT2_ACTIVATIONS)}")
    if not f.get("scale_attn_weights", True, bool) or f.get("scale_attn_by_inverse_layer_idx", False, bool):
        raise UserError(f"{f.source}: only the standard 1/sqrt(head_dim) attention scaling is supported")
    if f.get("add_cross_attention", False, bool):
        raise UserError(f"{f.source}: cross-attention (add_cross_attention) is not supported")
    dim = f.get("n_embd", None)
    return dict(
        vocab_size=f.get("vocab_size", None), dim=dim, n_layers=f.get("n_layer", None), n_heads=f.get("n_head", None),
        ffn_dim=f.get("n_inner", None) or 4 * dim, norm="layernorm", norm_eps=f.get("layer_norm_epsilon", 1e-5, float),
        mlp=_GPT2_ACTIVATIONS[act], positions="learned", qkv_bias=True, out_bias=True, mlp_bias=True,
        tie_embeddings=f.get("tie_word_embeddings", True, bool), max_seq_len=f.get("n_positions", 1024),
    )


def to_hf_config(config: ModelConfig) -> dict:
    """The config.json dict under which transformers builds the same model (no token ids, no dtype)."""
    problem = _hf_incompatibility(config)
    if problem:
        raise UserError(f"this model cannot be saved as a Hugging Face {config.model_type!r} checkpoint: {problem}")
    if config.model_type == "gpt2":
        activation = {"gelu_tanh": "gelu_new", "gelu": "gelu"}[config.mlp]
        hf = dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", vocab_size=config.vocab_size,
                  n_positions=config.max_seq_len, n_embd=config.dim, n_layer=config.n_layers, n_head=config.n_heads,
                  n_inner=config.ffn_dim, activation_function=activation, layer_norm_epsilon=config.norm_eps,
                  tie_word_embeddings=config.tie_embeddings)
        return _with_extra(hf, config.extra)
    architecture = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
    hf = dict(architectures=[architecture[config.model_type]], model_type=config.model_type,
              vocab_size=config.vocab_size, hidden_size=config.dim, intermediate_size=config.ffn_dim,
              num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
              num_key_value_heads=config.n_kv_heads, head_dim=config.head_dim, hidden_act="silu",
              max_position_embeddings=config.max_seq_len, rms_norm_eps=config.norm_eps,
              rope_theta=config.rope_theta, rope_scaling=config.rope_scaling,
              tie_word_embeddings=config.tie_embeddings)
    if config.model_type == "llama":
        hf.update(attention_bias=config.qkv_bias, mlp_bias=config.mlp_bias)
    elif config.model_type == "mistral":
        hf.update(sliding_window=config.sliding_window)
    else:
        use_window = config.sliding_window is not None
        hf.update(use_sliding_window=use_window, sliding_window=config.sliding_window,
                  max_window_layers=config.sliding_window_from if use_window else config.n_layers)
    return _with_extra(hf, config.extra)


def _with_extra(hf: dict, extra: dict) -> dict:
    return {**hf, **{key: value for key, value in extra.items() if key not in hf}}


def _hf_incompatibility(c: ModelConfig) -> str | None:
    """Why `c` has no exact Hugging Face equivalent for its model_type, or None."""
    if c.model_type == "gpt2":
        wanted = dict(norm="layernorm", positions="learned", qkv_bias=True, out_bias=True, mlp_bias=True,
                      n_kv_heads=c.n_heads, head_dim=c.dim // c.n_heads, sliding_window=None)
        if c.mlp == "swiglu":
            return "gpt2 has no gated (swiglu) MLP"
    else:
        bias = c.model_type == "qwen2" or (c.model_type == "llama" and c.qkv_bias)
        wanted = dict(norm="rmsnorm", positions="rope", mlp="swiglu", qkv_bias=bias,
                      out_bias=bias and c.model_type == "llama", mlp_bias=c.mlp_bias if c.model_type == "llama" else False)
        if c.model_type == "llama":
            wanted["sliding_window"] = None
        if c.model_type == "mistral":
            wanted["sliding_window_from"] = 0
    for name, value in wanted.items():
        if getattr(c, name) != value:
            return f"{name} is {getattr(c, name)!r}, {c.model_type} needs {value!r}"
    return None
