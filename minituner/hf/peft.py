"""PEFT adapter folders: `load_adapter` adds a LoRA adapter to a model, `save_adapter` writes one
that PEFT loads onto the same base (and `PeftModel.merge_and_unload` merges exactly as ours does).

A LoRA adapter as PEFT saves it: adapter_config.json (PEFT's LoraConfig) and
adapter_model.safetensors with base_model.model.<HF module name>.lora_A.weight (r, in) and
.lora_B.weight (out, r) per adapted module. The tensors have nn.Linear's layout even on GPT-2's
Conv1D modules; fan_in_fan_out only tells PEFT to transpose when it merges.

GPT-2's c_attn is one module there and three here (q, k, v stacked along its output):
  load  its B (3C, R) splits along the output into q, k and v rows, each paired with the whole
        A (R, C): the same three products, exactly. Where B is block-diagonal in thirds (as
        `save` writes it), each part takes only its own R/3 rows of A, restoring our ranks.
  save  q, k and v (rank r each) become one LoRA of rank 3r: A = cat(A_q, A_k, A_v) and B
        block-diagonal, so that B A stacks B_q A_q, B_k A_k, B_v A_v. PEFT divides by the
        fused rank, so c_attn's alpha goes into alpha_pattern scaled to keep the scale:
        3 alpha / 3r = alpha / r, or alpha sqrt(3) / sqrt(3r) with rsLoRA. q, k and v are
        adapted together or not at all (apply_lora's target "c_attn" does that).
"""

import json
import math
import re
from collections import Counter
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from minituner.atomic import staged_folder
from minituner.errors import UserError, read_json
from minituner.hf.folder import check_replaceable
from minituner.hf.layout import hf_module_name
from minituner.lora import LoRALinear, apply_lora, linear_modules, lora_modules
from minituner.model import Transformer

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


def _hf_linear_groups(model: Transformer) -> dict[str, list[str]]:
    """Each Hugging Face linear module of `model` -> our modules it is made of, in output order
    (q, k, v for c_attn: Attention registers them in that order)."""
    groups = {}
    for name in linear_modules(model):
        groups.setdefault(hf_module_name(name, model.config.model_type), []).append(name)
    return groups


def save_adapter(model: Transformer, path, *, base_model: str | None = None) -> None:
    """Write the LoRA adapters of `model` as a PEFT adapter folder at `path`, atomically like
    save_pretrained; `base_model` is recorded as base_model_name_or_path."""
    target = check_replaceable(Path(path), _ADAPTER_FILES, "adapter")
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
    with staged_folder(target, mode_from=ADAPTER_CONFIG) as tmp:
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
