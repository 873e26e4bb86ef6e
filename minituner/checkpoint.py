"""Hugging Face model folders: `load_pretrained` reads one into our Transformer and Tokenizer,
`save_pretrained` writes one that transformers loads as the same model. PEFT adapter folders:
`load_adapter` adds a LoRA adapter to a model, `save_adapter` writes one that PEFT loads.

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
import math
import os
import re
import shutil
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from minituner.config import ModelConfig, from_hf_config, to_hf_config
from minituner.errors import UserError, read_json
from minituner.lora import LoRALinear, apply_lora, linear_modules, lora_modules
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

    with _staged(target, mode_from="config.json") as tmp:
        _write_weights(hf_state, tmp, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")
        tokenizer.save(tmp)


# What save_pretrained writes, in any of its layouts: a folder holding anything else (a run's
# metrics, a model card, the user's notes) is never replaced.
_MODEL_FILES = re.compile(r"(config|generation_config|tokenizer|tokenizer_config|special_tokens_map)\.json"
                          r"|chat_template\.jinja|model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json")


def _save_target(path: Path, files: re.Pattern = _MODEL_FILES, kind: str = "model") -> Path:
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


@contextmanager
def _staged(target: Path, mode_from: str):
    """A fresh temporary folder beside `target` to write into; when the block ends without an
    error it replaces `target` (see _replace_folder), and it is removed either way."""
    _remove_stale_temporaries(target)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        _replace_folder(tmp, target, mode_from)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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


def _replace_folder(new: Path, target: Path, mode_from: str) -> None:
    """Put folder `new` at `target` by renames; a crash leaves the old or the new folder complete.
    Every file gets the mode of `new / mode_from`, a file written with the umask's mode."""
    mode = (new / mode_from).stat().st_mode  # safetensors writes 0600
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


# ----------------------------------------------------------------------------- PEFT adapter folders
# A LoRA adapter as PEFT saves it: adapter_config.json (PEFT's LoraConfig) and
# adapter_model.safetensors with base_model.model.<HF module name>.lora_A.weight (r, in) and
# .lora_B.weight (out, r) per adapted module. The tensors have nn.Linear's layout even on GPT-2's
# Conv1D modules; fan_in_fan_out only tells PEFT to transpose when it merges.
#
# GPT-2's c_attn is one module there and three here (q, k, v stacked along its output):
#   load  its B (3C, R) splits along the output into q, k and v rows, each paired with the whole
#         A (R, C): the same three products, exactly. Where B is block-diagonal in thirds (as
#         `save` writes it), each part takes only its own R/3 rows of A, restoring our ranks.
#   save  q, k and v (rank r each) become one LoRA of rank 3r: A = cat(A_q, A_k, A_v) and B
#         block-diagonal, so that B A stacks B_q A_q, B_k A_k, B_v A_v. PEFT divides by the
#         fused rank, so c_attn's alpha goes into alpha_pattern scaled to keep the scale:
#         3 alpha / 3r = alpha / r, or alpha sqrt(3) / sqrt(3r) with rsLoRA. q, k and v are
#         adapted together or not at all (apply_lora's target "c_attn" does that).
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the transformers model
_ADAPTER_FILES = re.compile(r"adapter_config\.json|adapter_model\.safetensors")
# LoraConfig fields that change what an adapter computes, with the values (besides null) that
# mean "not used". An adapter that uses one is refused rather than loaded as something else.
_PEFT_OFF = {"bias": ("none",), "use_dora": (False,), "lora_bias": (False,), "modules_to_save": ([],),
             "layers_to_transform": ([],), "target_parameters": ([],), "trainable_token_indices": ([], {}),
             "exclude_modules": ([], ""), "layer_replication": ([],), "alora_invocation_tokens": ([],),
             "use_qalora": (False,), "use_bdlora": (), "arrow_config": (), "kasa_config": (),
             "monteclora_config": (), "velora_config": ()}
# Initialisations that leave the base weights alone. The others change them (PiSSA, OLoRA, CorDA
# and LoRA-GA subtract the adapter's starting product from W; LoftQ quantises W), so such an
# adapter is wrong on the unchanged base.
_PEFT_INITS = (True, False, None, "gaussian", "eva")


def _hf_module_name(name: str, model_type: str) -> str:
    """The Hugging Face name of our linear module `name` (on GPT-2, q/k/v all name c_attn)."""
    if name == "lm_head":
        return name
    if model_type != "gpt2":
        return f"model.{name}"
    layer, inner = re.fullmatch(r"layers\.(\d+)\.(.+)", name).groups()
    hf = "attn.c_attn" if re.fullmatch(r"self_attn\.[qkv]_proj", inner) else _GPT2_LAYER[inner]
    return f"transformer.h.{layer}.{hf}"


def _hf_linear_groups(model: Transformer) -> dict[str, list[str]]:
    """Each Hugging Face linear module of `model` -> our modules it is made of, in output order
    (q, k, v for c_attn: Attention registers them in that order)."""
    groups = {}
    for name in linear_modules(model):
        groups.setdefault(_hf_module_name(name, model.config.model_type), []).append(name)
    return groups


def save_adapter(model: Transformer, path, *, base_model: str | None = None) -> None:
    """Write the LoRA adapters of `model` as a PEFT adapter folder at `path`, atomically like
    save_pretrained; `base_model` is recorded as base_model_name_or_path."""
    target = _save_target(Path(path), _ADAPTER_FILES, "adapter")
    adapters = lora_modules(model)
    if not adapters:
        raise UserError(f"{path}: the model has no LoRA adapters to save; apply_lora or load_adapter first")
    settings = {(m.rslora, m.dropout_p) for m in adapters.values()}
    if len(settings) > 1:
        raise UserError(f"{path}: {ADAPTER_CONFIG} holds one use_rslora and one lora_dropout, but the model's "
                        "adapters differ in them")
    tensors, ranks, alphas = {}, {}, {}
    for hf, parts in _hf_linear_groups(model).items():
        adapted = [adapters[name] for name in parts if name in adapters]
        if adapted and len(adapted) < len(parts):
            raise UserError(f"{path}: {hf} is q, k and v in one module, but only {len(adapted)} of them have an "
                            "adapter; adapt all three (target c_attn) or none")
        if adapted:
            A, B, ranks[hf], alphas[hf] = _fuse_lora(adapted)
            tensors[f"{_PEFT_PREFIX}{hf}.lora_A.weight"], tensors[f"{_PEFT_PREFIX}{hf}.lora_B.weight"] = A, B
    rslora, dropout = settings.pop()
    config = _adapter_config(model, ranks, alphas, rslora=rslora, dropout=dropout, base_model=base_model)
    with _staged(target, mode_from=ADAPTER_CONFIG) as tmp:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def _fuse_lora(parts: list[LoRALinear]) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """One LoRA (A, B, rank, alpha) computing the products of `parts` stacked along the output:
    A (R, in) their A's stacked, B (sum out, R) block-diagonal, alpha keeping the first part's
    scale at rank R. A part with another scale has the ratio folded into its B."""
    first = parts[0]
    A = torch.cat([m.lora_A.weight.detach() for m in parts])  # (R, in)
    B = torch.block_diag(*[m.lora_B.weight.detach() * (m.scale / first.scale) for m in parts])  # (sum out, R)
    R = A.shape[0]
    alpha = first.alpha * (math.sqrt(R / first.rank) if first.rslora else R / first.rank)
    return A.cpu().contiguous(), B.cpu().contiguous(), R, alpha


def _adapter_config(model: Transformer, ranks: dict, alphas: dict, *, rslora: bool, dropout: float,
                    base_model: str | None) -> dict:
    """adapter_config.json for adapters of the given {HF module: rank/alpha}: the commonest pair is
    r and lora_alpha, and the others go into rank_pattern/alpha_pattern."""
    (r, alpha), _ = Counter(zip(ranks.values(), alphas.values())).most_common(1)[0]
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": r, "lora_alpha": _plain_number(alpha), "lora_dropout": dropout, "use_rslora": rslora,
        "target_modules": _target_names(list(ranks), list(_hf_linear_groups(model))),
        "rank_pattern": _patterns(ranks, r),
        "alpha_pattern": {k: _plain_number(v) for k, v in _patterns(alphas, alpha).items()},
        "fan_in_fan_out": model.config.model_type == "gpt2",  # HF GPT-2's linear layers are Conv1D
        "bias": "none", "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "layers_to_transform": None, "layers_pattern": None, "use_dora": False,
    }


def _plain_number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x  # alpha 16, not 16.0, as PEFT users write it


def _target_names(adapted: list[str], every: list[str]) -> list[str]:
    """target_modules for the `adapted` HF modules: the short name (q_proj) where every module of
    that name is adapted, else the full names."""
    by_short = {}
    for name in every:
        by_short.setdefault(name.rsplit(".", 1)[-1], []).append(name)
    adapted, out = set(adapted), set()
    for short, names in by_short.items():
        chosen = [name for name in names if name in adapted]
        out.update([short] if len(chosen) == len(names) else chosen)
    return sorted(out)


def _patterns(values: dict, default) -> dict:
    """rank_pattern/alpha_pattern entries for the modules whose value is not `default`: the short
    name where all modules of that name share a value, else each full name (PEFT matches a key
    against the end of a module's name)."""
    by_short = {}
    for name, v in values.items():
        by_short.setdefault(name.rsplit(".", 1)[-1], {})[name] = v
    out = {}
    for short, group in by_short.items():
        distinct = set(group.values())
        if len(distinct) == 1 and distinct != {default}:
            out[short] = distinct.pop()
        elif len(distinct) > 1:
            out.update({name: v for name, v in group.items() if v != default})
    return out


def load_adapter(model: Transformer, path) -> list[str]:
    """Read a PEFT LoRA adapter folder into `model`: apply_lora as its adapter_config.json says,
    then its weights, checked strictly by name and shape. Returns the adapted modules' names;
    their lora_A/lora_B stay trainable and everything else is frozen."""
    folder = Path(path)
    config_file = folder / ADAPTER_CONFIG
    cfg = read_json(config_file)
    if cfg is None:
        raise UserError(f"{folder}: no {ADAPTER_CONFIG}, so this is not a PEFT adapter folder")
    _check_peft_features(cfg, config_file)
    _check_peft_numbers(cfg, config_file)
    linears, groups = linear_modules(model), _hf_linear_groups(model)
    targeted = [hf for hf in groups if _peft_targets(cfg["target_modules"], hf, config_file)]
    if not targeted:
        raise UserError(f"{config_file}: target_modules {cfg['target_modules']!r} matches no linear module of this "
                        f"{model.config.model_type} model")
    expected = {}
    for hf in targeted:
        r = _peft_pattern(cfg, "rank_pattern", hf, cfg["r"], config_file)
        parts = [linears[name] for name in groups[hf]]
        expected[f"{_PEFT_PREFIX}{hf}.lora_A.weight"] = (r, parts[0].in_features)
        expected[f"{_PEFT_PREFIX}{hf}.lora_B.weight"] = (sum(m.out_features for m in parts), r)
    tensors = _read_adapter_tensors(folder / ADAPTER_WEIGHTS, expected)
    rslora, weights, ranks, alphas = cfg.get("use_rslora") or False, {}, {}, {}
    for hf in targeted:
        alpha = _peft_pattern(cfg, "alpha_pattern", hf, cfg["lora_alpha"], config_file)
        A, B = tensors[f"{_PEFT_PREFIX}{hf}.lora_A.weight"], tensors[f"{_PEFT_PREFIX}{hf}.lora_B.weight"]
        sizes = [linears[name].out_features for name in groups[hf]]
        for name, (a, b, rank, part_alpha) in zip(groups[hf], _split_lora(A, B, sizes, alpha, rslora)):
            weights[name], ranks[name], alphas[name] = (a, b), rank, part_alpha
    adapted = apply_lora(model, cfg["r"], cfg["lora_alpha"], targets=list(weights),
                         dropout=cfg.get("lora_dropout") or 0.0, rslora=rslora, ranks=ranks, alphas=alphas)
    with torch.no_grad():
        for name in adapted:
            module = model.get_submodule(name)
            module.lora_A.weight.copy_(weights[name][0])
            module.lora_B.weight.copy_(weights[name][1])
    return adapted


def _split_lora(A: torch.Tensor, B: torch.Tensor, out_sizes: list[int], alpha: float, rslora: bool) -> list[tuple]:
    """The inverse of _fuse_lora: (A, B, rank, alpha) per part of B's output, with the same
    products and scale. A block-diagonal B (in equal column blocks) gives each part its own rows
    of A; any other B gives every part the whole A."""
    R, n = A.shape[0], len(out_sizes)
    blocks = B.split(out_sizes)  # each (out_i, R)
    r = R // n
    diagonal = n > 1 and R % n == 0 and all(
        torch.count_nonzero(b[:, :i * r]) + torch.count_nonzero(b[:, (i + 1) * r:]) == 0 for i, b in enumerate(blocks))
    if not diagonal:
        return [(A, b, R, alpha) for b in blocks]
    part_alpha = alpha / math.sqrt(n) if rslora else alpha / n  # the same scale at rank R / n
    return [(A[i * r:(i + 1) * r], b[:, i * r:(i + 1) * r], r, part_alpha) for i, b in enumerate(blocks)]


def _check_peft_features(cfg: dict, file: Path) -> None:
    """Refuse adapters that are not plain LoRA: another PEFT method, or a LoRA variant we do not implement."""
    if cfg.get("peft_type") != "LORA":
        raise UserError(f"{file}: peft_type {cfg.get('peft_type')!r} is not supported; minituner loads LORA adapters")
    if cfg.get("task_type") not in (None, "CAUSAL_LM"):
        raise UserError(f"{file}: task_type {cfg['task_type']!r} is not supported; minituner loads CAUSAL_LM adapters")
    for field, off in _PEFT_OFF.items():
        value = cfg.get(field)
        if value is not None and value not in off:
            raise UserError(f"{file}: {field} = {json.dumps(value)} is not supported by minituner's LoRA")
    if cfg.get("init_lora_weights", True) not in _PEFT_INITS:
        raise UserError(f"{file}: init_lora_weights {cfg['init_lora_weights']!r} is not supported (it changes the "
                        "base weights); convert the adapter to plain LoRA first")


def _check_peft_numbers(cfg: dict, file: Path) -> None:
    """Check the fields load_adapter reads have the types PEFT gives them."""
    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    def integer(v):
        return isinstance(v, int) and not isinstance(v, bool)

    targets, dropout = cfg.get("target_modules"), cfg.get("lora_dropout")
    ranks, alphas = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    checks = {  # field: (valid, what it should be)
        "r": (integer(cfg.get("r")) and cfg["r"] > 0, "an integer > 0"),
        "lora_alpha": (number(cfg.get("lora_alpha")) and cfg["lora_alpha"] > 0, "a number > 0"),
        "lora_dropout": (dropout is None or (number(dropout) and 0 <= dropout < 1), "a number in [0, 1)"),
        "use_rslora": (cfg.get("use_rslora") in (None, True, False), "true or false"),
        "target_modules": (isinstance(targets, str) or (isinstance(targets, list)
                                                        and all(isinstance(t, str) for t in targets)),
                           "a list of module names or a regular expression"),
        "rank_pattern": (isinstance(ranks, dict) and all(integer(v) and v > 0 for v in ranks.values()),
                         "an object of name: integer > 0"),
        "alpha_pattern": (isinstance(alphas, dict) and all(number(v) and v > 0 for v in alphas.values()),
                          "an object of name: number > 0"),
    }
    for field, (ok, want) in checks.items():
        if not ok:
            raise UserError(f"{file}: {field} = {json.dumps(cfg.get(field))}; expected {want}")


def _peft_targets(target_modules, name: str, file: Path) -> bool:
    """PEFT's rule: a regex string must match the whole module name; a list entry must be the name
    or its end after a dot."""
    if isinstance(target_modules, list):
        return any(name == t or name.endswith(f".{t}") for t in target_modules)
    try:
        return re.fullmatch(target_modules, name) is not None
    except re.error as e:
        raise UserError(f"{file}: target_modules {target_modules!r} is not a valid regular expression ({e})") from None


def _peft_pattern(cfg: dict, field: str, name: str, default, file: Path):
    """The value of rank_pattern/alpha_pattern for module `name`: PEFT takes the first key that
    matches the end of the name as a regex (after a dot), else the default."""
    for key, value in (cfg.get(field) or {}).items():
        try:
            if re.match(rf"(.*\.)?({key})$", name):
                return value
        except re.error as e:
            raise UserError(f"{file}: {field} key {key!r} is not a valid regular expression ({e})") from None
    return default


def _read_adapter_tensors(file: Path, expected: dict) -> dict:
    """The tensors of adapter_model.safetensors, exactly the `expected` names with their shapes."""
    if not file.is_file():
        raise UserError(f"{file}: missing; a PEFT adapter folder holds {ADAPTER_WEIGHTS} (minituner reads no .bin)")
    try:
        state = load_file(file)
    except (SafetensorError, OSError) as e:
        raise UserError(f"{file}: not a readable safetensors file ({e})") from None
    for name, t in state.items():
        if name not in expected:
            raise UserError(f"{file}: unexpected tensor {name!r}; is this adapter for this model, and does "
                            f"{ADAPTER_CONFIG}'s target_modules list its module?")
        if tuple(t.shape) != expected[name]:
            raise UserError(f"{file}: tensor {name!r} has shape {tuple(t.shape)}, but {ADAPTER_CONFIG} and the "
                            f"model imply {expected[name]}")
    missing = [name for name in expected if name not in state]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise UserError(f"{file}: tensor {missing[0]!r}{more} missing ({ADAPTER_CONFIG}'s target_modules asks for it)")
    return state
