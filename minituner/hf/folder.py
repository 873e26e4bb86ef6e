"""Hugging Face model folders: `load_pretrained` reads one into our Transformer and Tokenizer,
`save_pretrained` writes one that transformers loads as the same model.

A folder holds config.json (minituner/hf/config.py), the weights (model.safetensors, or shards
listed in model.safetensors.index.json; names and layouts in minituner/hf/layout.py) and the
tokenizer files (minituner/hf/tokenizer.py). Weights are read one tensor at a time, checked by
name and shape against what config.json implies, so no second copy of the model is ever held.
"""

import json
import re
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from minituner.atomic import staged_folder
from minituner.config import ModelConfig
from minituner.errors import UserError, read_json
from minituner.hf.config import from_hf_config, to_hf_config
from minituner.hf.layout import BUFFERS, canonical_name, from_hf_state, to_hf_state
from minituner.hf.tokenizer import load_tokenizer, save_tokenizer
from minituner.lora import lora_modules
from minituner.model import Transformer
from minituner.tokenizer import Tokenizer

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_SHARD_BYTES = 5 * 1000**3  # shards of at most ~5 GB, as transformers writes them


# ----------------------------------------------------------------------------- loading
def load_pretrained(path, device="cpu", dtype=torch.float32) -> tuple[Transformer, Tokenizer]:
    """Read a Hugging Face model folder: the model (in `dtype`, on `device`, eval mode) and its tokenizer.

    dtype=None keeps the dtype the weights are stored in.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such model folder" if not folder.exists() else f"{folder}: not a folder")
    config = read_config(folder)
    tokenizer = load_tokenizer(folder)
    if tokenizer.vocab_size > config.vocab_size:
        raise UserError(f"{folder / 'tokenizer.json'}: the tokenizer has {tokenizer.vocab_size} tokens but the "
                        f"model's embedding has only {config.vocab_size} rows (config.json vocab_size)")
    with torch.device("meta"), _skip_init():  # shapes only: the weights come from the file
        model = Transformer(config)
    expected = {name: t.shape for name, t in to_hf_state(model.state_dict(), config).items()}
    state = _read_weights(folder, config, expected, device, dtype)
    if config.tie_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    return model.eval(), tokenizer


@contextmanager
def _skip_init():
    """torch.nn.init's random initialisers as no-ops while the model is built on the meta device:
    they would only be thrown away, and on meta tensors torch routes them through torch._dynamo,
    whose first import costs seconds."""
    saved = {name: getattr(torch.nn.init, name) for name in _INITS}
    for name in _INITS:
        setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, f in saved.items():
            setattr(torch.nn.init, name, f)


_INITS = ("uniform_", "normal_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
          "xavier_normal_", "constant_", "zeros_", "ones_")


def read_config(folder: Path) -> ModelConfig:
    file = folder / "config.json"
    hf = read_json(file)
    if hf is None:
        raise UserError(f"{folder}: no config.json, so this is not a Hugging Face model folder")
    if "model_type" not in hf and "script" in hf:  # the options of a minituner run, not a model's config
        model = folder / "model"
        found = (f"its trained model is {model}" if (model / "config.json").is_file()
                 else "it has no model/ yet: the run has not finished (--resume it)")
        raise UserError(f"{folder}: is a minituner run folder, not a model folder; {found}")
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
                    canonical = canonical_name(name, config.model_type)
                    if BUFFERS.search(name) or (canonical == "lm_head.weight" and canonical not in expected):
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


def stored_dtype(folder) -> torch.dtype:
    """The dtype a model folder keeps its weights in: its config.json's `dtype` (transformers 5) or
    `torch_dtype`, else that of its first floating-point tensor; float32 if neither says."""
    folder = Path(folder)
    hf = read_json(folder / "config.json") or {}
    for key in ("dtype", "torch_dtype"):
        value = getattr(torch, str(hf.get(key)), None)
        if isinstance(value, torch.dtype) and value.is_floating_point:
            return value
    try:
        with safe_open(_weight_files(folder)[0][0], framework="pt", device="cpu") as f:
            for name in f.keys():
                value = getattr(torch, _SAFETENSORS_DTYPES.get(f.get_slice(name).get_dtype(), ""), None)
                if isinstance(value, torch.dtype) and value.is_floating_point:
                    return value
    except (UserError, SafetensorError, OSError):
        pass
    return torch.float32


_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


# ----------------------------------------------------------------------------- saving
def save_pretrained(model: Transformer, tokenizer: Tokenizer, path, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Write `model` and `tokenizer` as a Hugging Face folder at `path`, atomically.

    Everything is written to a temporary folder beside `path`, which then replaces it, so `path`
    holds either the old complete checkpoint or the new complete one, never a half-written one.
    An existing `path` is replaced only if it holds nothing but model files.
    """
    target = check_replaceable(Path(path))
    if lora_modules(model):  # their lora_A/lora_B would be written as tensors no transformers model has
        raise UserError(f"{path}: the model still has LoRA adapters; merge_and_unload it first, or save_adapter")
    config = model.config
    hf_config = to_hf_config(config)
    state = {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()}
    hf_state = to_hf_state(state, config)
    dtype = next(t.dtype for t in hf_state.values() if t.is_floating_point())
    hf_config["torch_dtype"] = str(dtype).removeprefix("torch.")
    for role in ("bos", "eos", "pad"):
        hf_config.setdefault(f"{role}_token_id", getattr(tokenizer, f"{role}_id"))

    with staged_folder(target, mode_from="config.json") as tmp:
        _write_weights(hf_state, tmp, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")
        save_tokenizer(tokenizer, tmp)


# What save_pretrained writes, in any of its layouts: a folder holding anything else (a run's
# metrics, a model card, the user's notes) is never replaced.
_MODEL_FILES = re.compile(r"(config|generation_config|tokenizer|tokenizer_config|special_tokens_map)\.json"
                          r"|chat_template\.jinja|additional_chat_templates|model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json")


def check_replaceable(path: Path, files: re.Pattern = _MODEL_FILES, kind: str = "model") -> Path:
    """The real folder to write (symlinks followed), checked to be safe to replace: it may hold
    only names that `files` matches (what a save of this `kind` writes)."""
    target = path.resolve()
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        raise UserError(f"{path}: is the current folder or one above it; save into a subfolder")
    if target.exists():
        if not target.is_dir():
            raise UserError(f"{path}: exists and is not a folder")
        others = sorted(p.name for p in target.iterdir() if not files.fullmatch(p.name))
        if others:
            article = "an" if kind[0] in "aeiou" else "a"
            raise UserError(f"{path}: holds {others[0]!r}, which is not {article} {kind} file; refusing to replace the "
                            f"folder (save into a new folder, or one with only a saved {kind})")
    return target


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
