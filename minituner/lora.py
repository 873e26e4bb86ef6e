"""LoRA: low-rank adapters swapped in for nn.Linear modules (Hu et al. 2021, "LoRA: Low-Rank
Adaptation of Large Language Models").

A frozen weight W (out, in) is adapted by a trainable low-rank product: the layer computes
    y = x W^T + b + scale * (x A^T) B^T,    A (r, in), B (out, r),  r << min(in, out)
so fine-tuning trains r * (in + out) numbers instead of in * out, and the optimizer keeps state
for those only.

Initialisation. A starts like an nn.Linear weight (Kaiming-uniform, a = sqrt(5)) and B at zero,
so B A = 0: a fresh adapter leaves the model exactly as it was, and training starts from the
pretrained function rather than from a random perturbation of it. Only A's gradient is zero at
first (it goes through B); B's, scale * dy^T (x A^T), is not, so B moves first and A follows.

Scaling. The product is multiplied by scale = alpha / r. Adam moves every entry by about the
learning rate whatever the gradient's size, so one step changes B A more the more rank-one
terms it sums; dividing by r is meant to keep the effective step the same as r changes, which
leaves alpha a learning-rate-like knob to set once (the paper sets it to the first r tried and
does not tune it). rsLoRA (Kalajdzievski 2023, "A Rank Stabilization Scaling Factor for
Fine-Tuning with LoRA") shows that 1/r over-corrects: at large r the updates shrink and learning
stalls, whereas scale = alpha / sqrt(r) keeps them the same size at every rank, so a larger r
can actually help.

The swap keeps the base layer's parameters under their own names, `weight` and `bias`, so a
base checkpoint loads into an adapted model unchanged; the adapter adds `lora_A.weight` and
`lora_B.weight`, the names PEFT uses. `merge` folds scale * B A into W for inference without the
extra matmuls; `unmerge` takes it out again.

This module works on any nn.Linear and knows one architecture fact: the Hugging Face names of
GPT-2's linear layers (GPT2_MODULES), so that adapters can be targeted by the names PEFT users
know. Saving and loading PEFT folders is minituner/hf/peft.py's job.
"""

import math
from collections import Counter

import torch
import torch.nn as nn
import torch.nn.functional as F

from minituner.errors import OptionError, UserError

# The modules PEFT users target on Llama-family models; ours carry the same names.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK, ALPHA, DROPOUT = 8, 16.0, 0.0  # apply_lora's defaults, and the scripts'

# GPT-2's Hugging Face module names (under transformer.h.N) and the modules of ours they are
# (minituner/hf/layout.py maps their weights the same way). c_attn is q, k and v fused along the output,
# so it names three of ours; c_proj is a name both in attention and in the MLP, so a bare
# "c_proj" targets both and "attn.c_proj" / "mlp.c_proj" picks one.
GPT2_MODULES = {"attn.c_attn": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                "attn.c_proj": ("self_attn.o_proj",), "mlp.c_fc": ("mlp.up_proj",), "mlp.c_proj": ("mlp.down_proj",)}


class LoRALinear(nn.Module):
    """An nn.Linear plus a trainable low-rank update: base(x) + scale * B(A(dropout(x))).

    rank   r, the inner width of the update; A is (r, in) and B is (out, r).
    alpha  the update's scale numerator: scale = alpha / r, or alpha / sqrt(r) with rslora.
           Keep alpha fixed while tuning r and the effective step size stays comparable.
    dropout  probability of zeroing an input of the low-rank branch only (the base path sees
           the whole input), PEFT's lora_dropout: a regulariser for small data sets.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        super().__init__()
        assert rank > 0 and 0.0 <= dropout < 1.0, f"rank {rank} must be positive and dropout {dropout} in [0, 1)"
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # the same Parameter objects: names, storage and any tying kept
        self.bias = base.bias
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, **factory)  # weight (r, in)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, **factory)  # weight (out, r)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.rank, self.alpha, self.rslora, self.dropout_p = rank, alpha, rslora, dropout
        self.scale = alpha / (math.sqrt(rank) if rslora else rank)
        self.merged = False
        self.reset_lora_parameters()
        self.train(base.training)  # an adapter swapped into an eval-mode model must not start dropping out

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """A as nn.Linear initialises its weight (Kaiming-uniform, a = sqrt(5)); B = 0, so B A = 0."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)  # (..., out)
        if self.merged:
            return out  # W already holds scale * B A
        return out + self.scale * self.lora_B(self.lora_A(self.dropout(x)))  # (..., r) -> (..., out)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """scale * B A, (out, in), in float32 whatever the weights' dtype."""
        return self.scale * (self.lora_B.weight.float() @ self.lora_A.weight.float())

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into W. The sum is formed in float32 and rounded once to W's dtype."""
        if not self.merged:
            self.weight.copy_(self.weight.float() + self.delta_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update out of W again: exact up to float32 rounding for a float32 W; a bf16 W
        keeps the error of rounding twice."""
        if self.merged:
            self.weight.copy_(self.weight.float() - self.delta_weight())
            self.merged = False

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"alpha={self.alpha}, rslora={self.rslora}, merged={self.merged}")


# ----------------------------------------------------------------------------- finding modules
def linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every nn.Linear of `model` by name, with an adapted one as its LoRALinear (whose own
    lora_A/lora_B are parts of it, not targets)."""
    found = {}
    for name, module in model.named_modules():  # a parent comes before its children
        inside_adapter = isinstance(found.get(name.rpartition(".")[0]), LoRALinear)
        if isinstance(module, (nn.Linear, LoRALinear)) and not inside_adapter:
            found[name] = module
    return found


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """The LoRALinear modules of `model` by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _ends_with(name: str, key: str) -> bool:
    return name == key or name.endswith(f".{key}")


def _resolve_targets(key: str, names, model_type: str | None) -> list[str]:
    """The names among `names` (our module names) that target `key` means: those equal to it or
    ending in "." + key; on GPT-2, its Hugging Face names (c_attn, c_proj, c_fc) as well."""
    keys = [key]
    if model_type == "gpt2":
        keys += [ours for hf, modules in GPT2_MODULES.items() if _ends_with(hf, key) for ours in modules]
    return [name for name in names if any(_ends_with(name, k) for k in keys)]


def _no_match(what: str, key: str, names, among: str) -> UserError:
    short = sorted({name.rsplit(".", 1)[-1] for name in names})
    return UserError(f"LoRA {what} {key!r} matches none of {among}, which are named {', '.join(short)}")


# ----------------------------------------------------------------------------- applying
def check_lora(rank: int, alpha: float, dropout: float) -> None:
    """The settings of one LoRA: an integer rank > 0, alpha > 0, a dropout probability in [0, 1)."""
    if not (isinstance(rank, int) and rank > 0):
        raise OptionError("rank", f"{rank}: must be an integer > 0")
    if not alpha > 0:
        raise OptionError("alpha", f"{alpha}: must be > 0")
    if not 0.0 <= dropout < 1.0:
        raise OptionError("dropout", f"{dropout}: must be in [0, 1)")


def apply_lora(model: nn.Module, rank: int = RANK, alpha: float = ALPHA, targets=DEFAULT_TARGETS,
               dropout: float = DROPOUT, rslora: bool = False, *, ranks: dict | None = None,
               alphas: dict | None = None) -> list[str]:
    """Swap each targeted nn.Linear of `model` for a LoRALinear and freeze everything else.

    targets  module names as PEFT users write them: a target matches a module whose name is it or
             ends in "." + it ("q_proj", "self_attn.o_proj"); on GPT-2 also c_attn, c_proj, c_fc.
             Each target must match at least one module (of the default targets, at least one);
             ("all-linear",) adapts every linear layer but lm_head, as in PEFT.
    rank, alpha, dropout, rslora  see LoRALinear; one setting for every adapted module, except
    ranks, alphas  per-module overrides {key: value}, keys matched like targets and among the
             adapted modules (a later key wins), as PEFT's rank_pattern/alpha_pattern.
    Afterwards only lora_A/lora_B parameters require grad. Returns the adapted modules' names.
    """
    check_lora(rank, alpha, dropout)
    if not tuple(targets):
        raise OptionError("targets", "is empty: name at least one linear module, or all-linear")
    linears = linear_modules(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    # The default list names every attention and MLP projection of the Llama family; a model
    # without some of them (GPT-2 has no gate_proj) adapts those it has. Named targets must exist.
    optional = set(DEFAULT_TARGETS) if tuple(targets) == DEFAULT_TARGETS else set()
    if tuple(targets) == ("all-linear",):  # PEFT's spelling: every linear layer but the output layer
        targets = tuple(name for name in linears if name != "lm_head")
    chosen = []
    for key in targets:
        matched = _resolve_targets(key, linears, model_type)
        if not matched and key not in optional:
            raise _no_match("target", key, linears, "the model's linear modules")
        chosen += [name for name in matched if name not in chosen]
    if not chosen:
        raise _no_match("target", ",".join(targets), linears, "the model's linear modules")
    rank_of = _overrides(ranks, rank, chosen, model_type, "rank")
    alpha_of = _overrides(alphas, alpha, chosen, model_type, "alpha")
    _check_adaptable(model, {name: linears[name] for name in chosen})
    if model_type == "gpt2":
        _check_fused_qkv(chosen)
    for name in chosen:
        parent, _, child = name.rpartition(".")
        lora = LoRALinear(linears[name], rank_of[name], alpha_of[name], dropout, rslora)
        setattr(model.get_submodule(parent), child, lora)
    for p in model.parameters():
        p.requires_grad_(False)
    for module in lora_modules(model).values():
        module.lora_A.weight.requires_grad_(True)
        module.lora_B.weight.requires_grad_(True)
    return chosen


def _overrides(pattern: dict | None, default, chosen: list[str], model_type, what: str) -> dict:
    """{module name: value} for the adapted modules, `default` unless a key of `pattern` matches."""
    values = dict.fromkeys(chosen, default)
    for key, value in (pattern or {}).items():
        matched = _resolve_targets(key, chosen, model_type)
        if not matched:
            raise _no_match(f"{what} override", key, chosen, "the adapted modules")
        kind = int if what == "rank" else (int, float)
        if not isinstance(value, kind) or isinstance(value, bool) or value <= 0:
            raise UserError(f"LoRA {what} override {key!r}: {value!r} is not a positive {what}")
        values.update(dict.fromkeys(matched, value))
    return values


def _check_adaptable(model: nn.Module, chosen: dict) -> None:
    """Refuse modules already adapted, and weights shared with another module: merging into a
    tied lm_head would change the token embedding too."""
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    for name, module in chosen.items():
        if isinstance(module, LoRALinear):
            raise UserError(f"LoRA target {name!r} already has an adapter")
        if uses[id(module.weight)] > 1:
            raise UserError(f"LoRA target {name!r} shares its weight with another module (tied embeddings); "
                            "leave it out of the targets")


def _check_fused_qkv(chosen: list[str]) -> None:
    """On GPT-2, q, k and v are one module (c_attn) in Hugging Face checkpoints and PEFT adapters:
    adapting some of them could be trained but not saved as a PEFT adapter, so refuse it now."""
    fused = GPT2_MODULES["attn.c_attn"]
    for name in chosen:
        block, _, inner = name.partition(".self_attn.")
        if f"self_attn.{inner}" in fused and any(f"{block}.{other}" not in chosen for other in fused):
            raise UserError(f"LoRA on GPT-2: {block} has q, k and v as one module (c_attn) in Hugging Face "
                            "checkpoints; adapt all three (target c_attn) or none")


# ----------------------------------------------------------------------------- merging and exporting
def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight (outputs unchanged, the low-rank matmuls skipped)."""
    for module in lora_modules(model).values():
        module.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Undo merge_lora."""
    for module in lora_modules(model).values():
        module.unmerge()


@torch.no_grad()
def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear with a plain nn.Linear holding the merged weight, so the model is
    the base architecture again (save_pretrained then writes an ordinary checkpoint). Returns `model`."""
    for name, module in lora_modules(model).items():
        module.merge()
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        linear.weight, linear.bias = module.weight, module.bias  # the merged Parameters themselves, no copy
        linear.train(module.training)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, linear)
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors only, by our names (e.g. layers.0.self_attn.q_proj.lora_A.weight)."""
    out = {}
    for name, module in lora_modules(model).items():
        out[f"{name}.lora_A.weight"] = module.lora_A.weight.detach()
        out[f"{name}.lora_B.weight"] = module.lora_B.weight.detach()
    return out


def trainable_report(model: nn.Module) -> str:
    """'trainable params: N || all params: M || trainable%: P', counting a tied weight once."""
    params = list(model.parameters())  # de-duplicated: a tied weight appears once
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    share = 100 * trainable / max(total, 1)
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {share:.2f}"
