"""The model's shape: one flat dataclass for every supported architecture, the size presets of
models built from scratch, and the RoPE scaling variants (their conversion from and to a Hugging
Face config.json is minituner/hf/config.py).

The supported checkpoints are two variations of one decoder-only transformer:
  llama, mistral, qwen2 (Llama 2/3.x, TinyLlama, SmolLM, Mistral, Qwen2/2.5): RMSNorm, SwiGLU MLP,
      rotary positions, grouped-query attention; biases only on Qwen2's q/k/v projections (or
      where a Llama config asks for them); Mistral and Qwen2 may use a sliding attention window;
  gpt2: LayerNorm, GELU MLP, learned positions, a bias on every linear layer, tied embeddings.
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
    "d256": dict(dim=256, n_layers=6, n_heads=8, n_kv_heads=4, ffn_dim=688),  # 4.4 M, ../shared/bench's Llama
    "small": dict(dim=192, n_layers=4, n_heads=6, n_kv_heads=2, ffn_dim=512),  # 1.6 M
    "medium": dict(dim=384, n_layers=8, n_heads=6, n_kv_heads=2, ffn_dim=1024),  # 12.6 M
    "smollm-135m": dict(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536),  # 106 M, SmolLM-135M's shape
    "qwen2.5-0.5b": dict(dim=896, n_layers=24, n_heads=14, n_kv_heads=2, ffn_dim=4864, qkv_bias=True),  # 358 M + embeddings
}


def preset_config(name: str, *, vocab_size: int, max_seq_len: int, **overrides) -> ModelConfig:
    """A from-scratch ModelConfig of size preset `name`, with any field overridden."""
    if name not in SIZE_PRESETS:
        raise UserError(f"size preset {name!r} is not one of {', '.join(SIZE_PRESETS)}")
    fields = {**SIZE_PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}}
    try:
        return ModelConfig(vocab_size=vocab_size, max_seq_len=max_seq_len, **{"tie_embeddings": True, **fields})
    except ValueError as e:  # ModelConfig names the field (dim, n_heads, ...)
        raise UserError(f"model shape (preset {name}, with the overrides given): {e}") from None


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
