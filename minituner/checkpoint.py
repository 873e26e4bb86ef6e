"""Hugging Face model folders: `load_pretrained` reads one into our Transformer and Tokenizer,
`save_pretrained` writes one that transformers loads as the same model.

A folder holds config.json, the weights (model.safetensors, or shards listed in
model.safetensors.index.json) and the tokenizer files. Weight names and layouts per family:
  llama, mistral, qwen2: our names with a `model.` prefix (lm_head.weight has none), same layout;
  gpt2: GPT-2's own names, with or without a `transformer.` prefix. Its linear layers are
        Conv1D modules that store W transposed, (in, out), and `c_attn` is q, k and v fused along
        the output; we keep separate q/k/v projections and convert on the way in and out.
Buffers some checkpoints carry (GPT-2's causal `attn.bias`, old Llama `rotary_emb.inv_freq`)
are not parameters and are skipped.
"""

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from minituner.config import ModelConfig, from_hf_config, to_hf_config
from minituner.errors import UserError, read_json
from minituner.model import Transformer
from minituner.tokenizer import Tokenizer

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_SHARD_BYTES = 5 * 1000**3  # shards of at most ~5 GB, as transformers writes them
_BUFFERS = re.compile(r"(\.attn\.(masked_)?bias|rotary_emb\.inv_freq)$")
_GPT2_LAYER = {"input_layernorm": "ln_1", "post_attention_layernorm": "ln_2", "self_attn.o_proj": "attn.c_proj",
               "mlp.up_proj": "mlp.c_fc", "mlp.down_proj": "mlp.c_proj"}
_GPT2_TOP = {"embed_tokens": "wte", "embed_positions": "wpe", "norm": "ln_f"}


# ----------------------------------------------------------------------------- name and layout mapping
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


def _canonical_name(name: str, model_type: str) -> str:
    """A file's tensor name with the prefix to_hf_state uses (files saved from the bare model lack it)."""
    if name.startswith("lm_head."):
        return name
    prefix = "transformer." if model_type == "gpt2" else "model."
    return name if name.startswith(prefix) else prefix + name


# ----------------------------------------------------------------------------- loading
def load_pretrained(path, device="cpu", dtype=torch.float32) -> tuple[Transformer, Tokenizer]:
    """Read a Hugging Face model folder: the model (in `dtype`, on `device`, eval mode) and its tokenizer.

    dtype=None keeps the dtype the weights are stored in.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such model folder" if not folder.exists() else f"{folder}: not a folder")
    config = read_config(folder)
    tokenizer = Tokenizer.from_dir(folder)
    if tokenizer.vocab_size > config.vocab_size:
        raise UserError(f"{folder / 'tokenizer.json'}: the tokenizer has {tokenizer.vocab_size} tokens but the "
                        f"model's embedding has only {config.vocab_size} rows (config.json vocab_size)")
    with torch.device("meta"):  # shapes only: the weights come from the file, not from an init
        model = Transformer(config)
    expected = {name: t.shape for name, t in to_hf_state(model.state_dict(), config).items()}
    state = _read_weights(folder, config, expected, device, dtype)
    if config.tie_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    return model.eval(), tokenizer


def read_config(folder: Path) -> ModelConfig:
    file = folder / "config.json"
    hf = read_json(file)
    if hf is None:
        raise UserError(f"{folder}: no config.json, so this is not a Hugging Face model folder")
    return from_hf_config(hf, source=str(file))


def _read_weights(folder: Path, config: ModelConfig, expected: dict, device, dtype: torch.dtype | None) -> dict:
    """Our state dict from the folder's files: every expected tensor checked by name and shape,
    then converted and moved one at a time, so no second copy of the model is ever held."""
    files, source = _weight_files(folder)
    state, seen = {}, set()
    for file in files:
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                for name in f.keys():
                    canonical = _canonical_name(name, config.model_type)
                    if _BUFFERS.search(name) or (canonical == "lm_head.weight" and canonical not in expected):
                        continue  # a buffer, or an lm_head duplicating the tied embedding
                    if canonical not in expected:
                        raise UserError(f"{file}: unexpected tensor {name!r}; does config.json "
                                        f"(model_type {config.model_type!r}) describe this checkpoint?")
                    t = f.get_tensor(name)
                    if t.shape != expected[canonical]:
                        raise UserError(f"{file}: tensor {name!r} has shape {tuple(t.shape)}, but config.json "
                                        f"implies {tuple(expected[canonical])}")
                    t = t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype)
                    state.update(from_hf_state({canonical: t}, config))
                    seen.add(canonical)
        except (SafetensorError, OSError) as e:
            raise UserError(f"{file}: not a readable safetensors file ({e})") from None
    missing = [name for name in expected if name not in seen]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise UserError(f"{source}: tensor {missing[0]!r}{more} missing from the weights")
    return state


def _weight_files(folder: Path) -> tuple[list[Path], Path]:
    """The safetensors files of a folder, and the file that lists them (for error messages)."""
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE], folder / SINGLE_FILE
    index_file = folder / INDEX_FILE
    index = read_json(index_file)
    if index is None:
        other = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
        hint = f" (found {', '.join(sorted(other))}: minituner reads only safetensors)" if other else ""
        raise UserError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise UserError(f"{index_file}: no 'weight_map' from tensor names to shard file names")
    files = [folder / name for name in sorted(set(weight_map.values()))]
    for file in files:
        if not file.is_file():
            raise UserError(f"{index_file}: lists shard {file.name}, which is not in {folder}")
    return files, index_file


# ----------------------------------------------------------------------------- saving
def save_pretrained(model: Transformer, tokenizer: Tokenizer, path, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Write `model` and `tokenizer` as a Hugging Face folder at `path`, atomically.

    Everything is written to a temporary folder beside `path`, which then replaces it, so `path`
    holds either the old complete checkpoint or the new complete one, never a half-written one.
    An existing `path` is replaced only if it holds nothing but model files.
    """
    target = _save_target(Path(path))
    config = model.config
    hf_config = to_hf_config(config)
    state = {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()}
    hf_state = to_hf_state(state, config)
    dtype = next(t.dtype for t in hf_state.values() if t.is_floating_point())
    hf_config["torch_dtype"] = str(dtype).removeprefix("torch.")
    for role in ("bos", "eos", "pad"):
        hf_config.setdefault(f"{role}_token_id", getattr(tokenizer, f"{role}_id"))

    _remove_stale_temporaries(target)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _write_weights(hf_state, tmp, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")
        tokenizer.save(tmp)
        _replace_folder(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# What save_pretrained writes, in any of its layouts: a folder holding anything else (a run's
# metrics, a model card, the user's notes) is never replaced.
_MODEL_FILES = re.compile(r"(config|generation_config|tokenizer|tokenizer_config|special_tokens_map)\.json"
                          r"|chat_template\.jinja|model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json")


def _save_target(path: Path) -> Path:
    """The real folder to write (symlinks followed), checked to be safe to replace."""
    target = path.resolve()
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        raise UserError(f"{path}: is the current folder or one above it; save into a subfolder")
    if target.exists():
        if not target.is_dir():
            raise UserError(f"{path}: exists and is not a folder")
        others = sorted(p.name for p in target.iterdir() if not _MODEL_FILES.fullmatch(p.name))
        if others:
            raise UserError(f"{path}: holds {others[0]!r}, which is not a model file; refusing to replace the "
                            "folder (save into a new folder, or one with only a saved model)")
    return target


def _remove_stale_temporaries(target: Path) -> None:
    """Delete what an earlier, killed save left beside `target`: its temporary folder, and the old
    checkpoint it had moved aside if the new one did reach `target`."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(tmp|old)-(\d+)")
    for leftover in target.parent.iterdir():
        m = pattern.fullmatch(leftover.name)
        if m and not _process_alive(int(m[2])) and (m[1] == "tmp" or target.exists()):
            shutil.rmtree(leftover, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0 checks existence only; PermissionError means another user's process
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _write_weights(hf_state: dict, folder: Path, max_shard_bytes: int) -> None:
    """model.safetensors, or numbered shards plus the index transformers reads."""
    shards, size = [{}], 0
    for name, t in hf_state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.contiguous()
        size += nbytes
    metadata = {"format": "pt"}  # transformers refuses safetensors files without it
    if len(shards) == 1:
        save_file(shards[0], str(folder / SINGLE_FILE), metadata=metadata)
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata=metadata)
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in hf_state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def _replace_folder(new: Path, target: Path) -> None:
    """Put folder `new` at `target` by renames; a crash leaves the old or the new folder complete."""
    mode = (new / "config.json").stat().st_mode  # safetensors writes 0600; give every file the umask's mode
    for file in new.iterdir():  # the data must be on disk before the rename makes it visible
        os.chmod(file, mode)
        with open(file, "rb") as f:
            os.fsync(f.fileno())
    if not target.exists():
        os.replace(new, target)
        return
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)
    os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)
