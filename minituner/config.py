"""The model's shape: one flat dataclass for every supported architecture, and its conversion
from and to a Hugging Face `config.json`.

The supported checkpoints are two variations of one decoder-only transformer:
  llama, mistral, qwen2 (Llama 2/3.x, TinyLlama, SmolLM, Mistral, Qwen2/2.5): RMSNorm, SwiGLU MLP,
      rotary positions, grouped-query attention; biases only on Qwen2's q/k/v projections (or
      where a Llama config asks for them); Mistral and Qwen2 may use a sliding attention window;
  gpt2: LayerNorm, GELU MLP, learned positions, a bias on every linear layer, tied embeddings.

`from_hf_config` reads the keys that hub checkpoints carry (`rope_theta` + `rope_scaling`) as
well as the newer `rope_parameters` of transformers 5, filling absent keys with the defaults of
the transformers config classes, so a folder means here what it means there.
"""

from dataclasses import dataclass, field

from minituner.errors import UserError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "gpt2")
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
NORMS = ("rmsnorm", "layernorm")
MLPS = ("swiglu", "gelu_tanh", "gelu")
POSITIONS = ("rope", "learned")


@dataclass
class ModelConfig:
    model_type: str = "llama"  # Hugging Face family whose file layout the weights follow
    vocab_size: int = 32000  # V: rows of the embedding (may exceed the tokenizer's vocabulary)
    dim: int = 512  # C: width of the residual stream
    n_layers: int = 8  # transformer blocks
    n_heads: int = 8  # H: query heads
    n_kv_heads: int | None = None  # K: key/value heads; None = n_heads (MHA), 1 = MQA, else GQA
    head_dim: int | None = None  # D: width of one head; None = dim // n_heads
    ffn_dim: int = 1408  # F: hidden width of the MLP
    norm: str = "rmsnorm"  # "rmsnorm" (llama family) or "layernorm" (gpt2)
    norm_eps: float = 1e-5  # epsilon inside the norm's square root
    mlp: str = "swiglu"  # "swiglu" (gated SiLU), "gelu_tanh" (gpt2's gelu_new) or "gelu" (exact erf)
    positions: str = "rope"  # "rope" (rotary, rotate-half layout) or "learned" (gpt2's wpe table)
    rope_theta: float = 10000.0  # rotary base; the frequencies are theta^(-2i/D)
    rope_scaling: dict | None = None  # {"rope_type": "linear"|"llama3"|"yarn", ...} as in HF; None = plain
    qkv_bias: bool = False  # bias on the q/k/v projections (qwen2, gpt2)
    out_bias: bool = False  # bias on the attention output projection (gpt2)
    mlp_bias: bool = False  # bias on the MLP projections (gpt2)
    tie_embeddings: bool = False  # lm_head shares the token-embedding matrix
    max_seq_len: int = 2048  # context the model was trained for; a hard limit for learned positions
    sliding_window: int | None = None  # each query sees at most this many most recent keys (mistral)
    sliding_window_from: int = 0  # first layer that uses the window (qwen2's max_window_layers)
    init_std: float = 0.02  # std of the normal init of a model built from scratch
    extra: dict = field(default_factory=dict, compare=False)  # unknown HF keys, written back on save

    def __post_init__(self):
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "ffn_dim", "max_seq_len"):
            _require(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            _require(self.dim % self.n_heads == 0, f"dim {self.dim} is not a multiple of n_heads {self.n_heads}; set head_dim")
            self.head_dim = self.dim // self.n_heads
        _require(self.model_type in SUPPORTED_MODEL_TYPES, f"model_type {self.model_type!r} is not one of {SUPPORTED_MODEL_TYPES}")
        _require(self.norm in NORMS, f"norm {self.norm!r} is not one of {NORMS}")
        _require(self.mlp in MLPS, f"mlp {self.mlp!r} is not one of {MLPS}")
        _require(self.positions in POSITIONS, f"positions {self.positions!r} is not one of {POSITIONS}")
        _require(self.n_kv_heads > 0 and self.head_dim > 0, "n_kv_heads and head_dim must be positive")
        _require(self.n_heads % self.n_kv_heads == 0, f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        _require(self.positions != "rope" or self.head_dim % 2 == 0, f"rotary positions need an even head_dim, got {self.head_dim}")
        _require(self.rope_theta > 0, f"rope_theta must be positive, got {self.rope_theta}")
        _require(self.norm_eps >= 0, f"norm_eps must not be negative, got {self.norm_eps}")
        _require(self.sliding_window is None or self.sliding_window > 0, f"sliding_window must be positive, got {self.sliding_window}")
        if self.rope_scaling is not None:
            self.rope_scaling = _normalize_rope_scaling(self.rope_scaling, self.max_seq_len)


# Shapes for models built from scratch (Llama layout, tied embeddings); the vocabulary and the
# context come from the tokenizer and the data. The comments count the parameters besides the
# embedding (which adds vocab_size x dim).
SIZE_PRESETS = {
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=176),  # 0.09 M
    "small": dict(dim=192, n_layers=4, n_heads=6, n_kv_heads=2, ffn_dim=512),  # 1.6 M
    "medium": dict(dim=384, n_layers=8, n_heads=6, n_kv_heads=2, ffn_dim=1024),  # 12.6 M
    "smollm-135m": dict(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536),  # 106 M, SmolLM-135M's shape
}


def preset_config(name: str, *, vocab_size: int, max_seq_len: int, **overrides) -> ModelConfig:
    """A from-scratch ModelConfig of size preset `name`, with any field overridden."""
    if name not in SIZE_PRESETS:
        raise UserError(f"size preset {name!r} is not one of {', '.join(SIZE_PRESETS)}")
    fields = {**SIZE_PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}}
    try:
        return ModelConfig(vocab_size=vocab_size, max_seq_len=max_seq_len, tie_embeddings=True, **fields)
    except ValueError as e:  # ModelConfig names its fields; the flags are --dim, --n-heads, ...
        raise UserError(f"model shape ({name} with --dim/--n-layers/--n-heads/--n-kv-heads/--ffn-dim): {e}") from None


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


# ----------------------------------------------------------------------------- rope scaling
_ROPE_NUMBERS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings",
                 "beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim")


def _normalize_rope_scaling(scaling: dict, max_seq_len: int) -> dict | None:
    """Validate an HF rope-scaling dict and fill HF's defaults; returns None for plain RoPE."""
    scaling = dict(scaling)
    legacy_type = scaling.pop("type", None)
    rope_type = scaling.get("rope_type") or legacy_type or "default"  # transformers: rope_type wins
    scaling["rope_type"] = rope_type
    scaling.pop("rope_theta", None)  # kept in ModelConfig.rope_theta
    if rope_type == "default":
        return None
    _require(rope_type in ROPE_TYPES, f"rope type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
    _require(scaling.get("partial_rotary_factor", 1.0) == 1.0, "partial_rotary_factor != 1 is not supported")
    for key in _ROPE_NUMBERS:
        value = scaling.get(key)
        _require(value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0),
                 f"rope scaling {key!r} must be a positive number, got {value!r}")
    if rope_type in ("llama3", "yarn") and scaling.get("original_max_position_embeddings") is None:
        scaling["original_max_position_embeddings"] = max_seq_len
    if rope_type == "yarn" and scaling.get("factor") is None:
        scaling["factor"] = max_seq_len / scaling["original_max_position_embeddings"]
    _require(scaling.get("factor") is not None and scaling["factor"] >= 1,
             f"rope scaling 'factor' must be a number >= 1, got {scaling.get('factor')!r}")
    if rope_type == "llama3":
        for key in ("low_freq_factor", "high_freq_factor"):
            _require(scaling.get(key) is not None, f"llama3 rope scaling needs a number {key!r}")
        _require(scaling["high_freq_factor"] > scaling["low_freq_factor"], "llama3 rope scaling needs high_freq_factor > low_freq_factor")
    return scaling


# ----------------------------------------------------------------------------- HF config.json
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
