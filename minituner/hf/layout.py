"""Our parameter names and tensor layouts <-> those of Hugging Face checkpoints.

  llama, mistral, qwen2: our names with a `model.` prefix (lm_head.weight has none), same layout;
  gpt2: GPT-2's own names, with or without a `transformer.` prefix. Its linear layers are
        Conv1D modules that store W transposed, (in, out), and `c_attn` is q, k and v fused along
        the output; we keep separate q/k/v projections and convert on the way in and out.
Buffers some checkpoints carry (GPT-2's causal `attn.bias`, old Llama `rotary_emb.inv_freq`)
are not parameters and are skipped.
"""

import re

import torch

from minituner.config import ModelConfig

BUFFERS = re.compile(r"(\.attn\.(masked_)?bias|rotary_emb\.inv_freq)$")
_GPT2_LAYER = {"input_layernorm": "ln_1", "post_attention_layernorm": "ln_2", "self_attn.o_proj": "attn.c_proj",
               "mlp.up_proj": "mlp.c_fc", "mlp.down_proj": "mlp.c_proj"}
_GPT2_TOP = {"embed_tokens": "wte", "embed_positions": "wpe", "norm": "ln_f"}


def to_hf_state(state: dict, config: ModelConfig) -> dict:
    """Our state dict in the Hugging Face names and layout of config.model_type; a tied lm_head is left out."""
    out = {}
    for name, t in state.items():
        if name == "lm_head.weight":
            if not config.tie_embeddings:
                out[name] = t
        elif config.model_type != "gpt2":
            out[f"model.{name}"] = t
        elif m := re.fullmatch(r"layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", name):
            if m[2] == "q":  # fuse q, k, v into c_attn once, when we meet q
                fused = torch.cat([state[f"layers.{m[1]}.self_attn.{x}_proj.{m[3]}"] for x in "qkv"])  # (3C, C) or (3C,)
                out[f"transformer.h.{m[1]}.attn.c_attn.{m[3]}"] = fused.t() if m[3] == "weight" else fused
        elif m := re.fullmatch(r"layers\.(\d+)\.(.+)\.(weight|bias)", name):
            out[f"transformer.h.{m[1]}.{_GPT2_LAYER[m[2]]}.{m[3]}"] = t.t() if name.endswith("proj.weight") else t
        else:
            module, param = name.rsplit(".", 1)
            out[f"transformer.{_GPT2_TOP[module]}.{param}"] = t
    return out


def from_hf_state(hf_state: dict, config: ModelConfig) -> dict:
    """The inverse of to_hf_state: Hugging Face names and layout to ours (names already canonical).
    Each tensor converts on its own, so a state dict may be converted one tensor at a time."""
    if config.model_type != "gpt2":
        return {name.removeprefix("model."): t for name, t in hf_state.items()}
    layer_names = {hf: ours for ours, hf in _GPT2_LAYER.items()}
    top_names = {hf: ours for ours, hf in _GPT2_TOP.items()}
    out = {}
    for hf_name, t in hf_state.items():
        name = hf_name.removeprefix("transformer.")
        if m := re.fullmatch(r"h\.(\d+)\.attn\.c_attn\.(weight|bias)", name):
            fused = t.t() if m[2] == "weight" else t  # (3C, C) or (3C,)
            for x, part in zip("qkv", fused.chunk(3)):
                out[f"layers.{m[1]}.self_attn.{x}_proj.{m[2]}"] = part.contiguous()
        elif m := re.fullmatch(r"h\.(\d+)\.(.+)\.(weight|bias)", name):
            ours = f"layers.{m[1]}.{layer_names[m[2]]}.{m[3]}"
            out[ours] = t.t().contiguous() if ours.endswith("proj.weight") else t
        elif name == "lm_head.weight":
            out[name] = t
        else:
            module, param = name.rsplit(".", 1)
            out[f"{top_names[module]}.{param}"] = t
    return out


def canonical_name(name: str, model_type: str) -> str:
    """A file's tensor name with the prefix to_hf_state uses (files saved from the bare model lack it)."""
    if name.startswith("lm_head."):
        return name
    prefix = "transformer." if model_type == "gpt2" else "model."
    return name if name.startswith(prefix) else prefix + name


def hf_module_name(name: str, model_type: str) -> str:
    """The Hugging Face name of our linear module `name` (on GPT-2, q/k/v all name c_attn)."""
    if name == "lm_head":
        return name
    if model_type != "gpt2":
        return f"model.{name}"
    layer, inner = re.fullmatch(r"layers\.(\d+)\.(.+)", name).groups()
    hf = "attn.c_attn" if re.fullmatch(r"self_attn\.[qkv]_proj", inner) else _GPT2_LAYER[inner]
    return f"transformer.h.{layer}.{hf}"
