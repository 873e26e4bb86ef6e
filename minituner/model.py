"""The decoder-only transformer that every supported checkpoint runs on, and its KV cache.

One pre-norm block serves both families (see config.py): x + attn(norm(x)), then x + mlp(norm(x)).
Module names follow Hugging Face's Llama (`embed_tokens`, `layers.N.self_attn.q_proj`,
`mlp.gate_proj`, `input_layernorm`, `norm`, `lm_head`), so a Llama-family state dict maps onto
ours by dropping its `model.` prefix, and adapters can be named the way PEFT names them.

Shape legend:
  B batch, T query tokens of this call, S key/value tokens (cached + new), C model dim,
  H query heads, K key/value heads, G = H // K query heads per key/value head, D head dim,
  F MLP hidden dim, V vocabulary.

Numerics: norms run in float32 and hand back the compute dtype; rotary angles are computed in
float32 from the positions (no table, so no length limit and nothing for `.to(dtype)` to round);
softmax happens inside scaled_dot_product_attention, which accumulates in float32.
"""

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from minituner.config import ModelConfig
from minituner.rope import apply_rope, rope_cos_sin, rope_frequencies


class RMSNorm(nn.Module):
    """x / rms(x) * weight (Zhang & Sennrich 2019), computed in float32 as Llama does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)  # cast back before the weight, as the HF reference does


class LayerNorm(nn.Module):
    """LayerNorm with weight and bias (GPT-2), computed in float32 whatever the compute dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.layer_norm(x.float(), x.shape[-1:], self.weight.float(), self.bias.float(), self.eps)
        return out.to(x.dtype)


def make_norm(config: ModelConfig) -> nn.Module:
    return RMSNorm(config.dim, config.norm_eps) if config.norm == "rmsnorm" else LayerNorm(config.dim, config.norm_eps)


# ----------------------------------------------------------------------------- attention
class KVCache:
    """Keys and values of every layer for the tokens seen so far, preallocated to `max_len`.

    `length` tokens are filled. A forward pass writes its new keys/values at positions
    [length, length + T) of every layer, then the model advances `length` by T.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device, dtype: torch.dtype):
        shape = (config.n_layers, batch_size, config.n_kv_heads, max_len, config.head_dim)  # (L, B, K, S_max, D)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this call's k, v (B, K, T, D) and return all keys and values so far, (B, K, S, D)."""
        end = self.length + k.shape[2]
        if end > self.keys.shape[3]:
            raise ValueError(f"KV cache holds {self.keys.shape[3]} tokens, {end} needed")
        self.keys[layer, :, :, self.length:end] = k
        self.values[layer, :, :, self.length:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]


def make_attention_mask(T: int, S: int, device, *, key_padding=None, document_ids=None, window=None):
    """The boolean mask (True = may attend) for T queries over S keys, or None where the kernel's
    own causal flag says it all. Returns (mask, is_causal).

    The queries are the last T of the S positions (the first S - T are cached). key_padding
    (B, S) marks real tokens; document_ids (B, T) isolates packed documents (T == S); window
    limits each query to its `window` most recent keys, itself included.
    """
    plain = key_padding is None and document_ids is None and (window is None or S <= window)
    if plain and T == S:
        return None, True  # causal: flash / efficient kernels without a mask tensor
    if plain and T == 1:
        return None, False  # one new query sees every cached key
    q_pos = torch.arange(S - T, S, device=device)[:, None]  # (T, 1)
    k_pos = torch.arange(S, device=device)[None, :]  # (1, S)
    mask = k_pos <= q_pos  # (T, S)
    if window is not None:
        mask = mask & (k_pos > q_pos - window)
    mask = mask[None, None]  # (1, 1, T, S)
    if key_padding is not None:
        mask = mask & key_padding.bool()[:, None, None, :]  # (B, 1, T, S)
    if document_ids is not None:
        assert T == S, "document isolation is for full sequences, not cached decoding"
        segment = document_starts(document_ids).cumsum(dim=1)  # (B, T): a run of equal ids is one document
        mask = mask & (segment[:, :, None] == segment[:, None, :])[:, None]  # (B, 1, T, S)
    # A query with nothing to attend to (a left-pad token) would softmax over -inf only and
    # produce NaN; let it see everything instead. Its output belongs to a pad and is never read.
    return mask | ~mask.any(dim=-1, keepdim=True), False


def attend(q, k, v, mask, is_causal: bool) -> torch.Tensor:
    """Scaled dot-product attention of q (B, H, T, D) over k, v (B, K, S, D), sharing each key/value
    head among G = H // K query heads without copying it where the kernels allow.

    On CUDA only the flash kernel honours enable_gqa; wherever it cannot run (a mask, fp32, a
    GPU before Ampere, a head dim it does not take) SDPA would quietly fall back to the math
    kernel, which keeps a T x S score matrix per head. There, decoding (T == 1) folds the G
    query heads of a group into G "time steps" over the group's keys, and longer queries get
    each key/value head repeated G times, so that the memory-efficient kernel takes the call.
    """
    B, H, T, D = q.shape
    G = H // k.shape[1]
    if q.is_cuda:
        _guard_cudnn_attention()
    if G == 1 or (mask is None and _kernel_shares_heads(q, k, is_causal)):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=G > 1)
    if T == 1:
        # (B, K, G, D): kernels may hand the output back with other strides (the CUDA memory-
        # efficient kernel's is laid out as (B, G, K, D)), so reshape, which copies if it must.
        out = F.scaled_dot_product_attention(q.view(B, -1, G, D), k, v, attn_mask=mask)
        return out.reshape(B, H, 1, D)
    k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)  # (B, H, S, D)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)


def _kernel_shares_heads(q: torch.Tensor, k: torch.Tensor, is_causal: bool) -> bool:
    """Whether SDPA, given no mask, runs grouped-query attention in a fused kernel for q.

    On CUDA that is the flash kernel, and PyTorch's own check decides whether it takes the call
    (dtype, GPU generation, head dim, with or without gradients, flash switched on); its answer
    is kept per combination of those."""
    if not q.is_cuda:
        return True  # the CPU kernels handle enable_gqa themselves
    training = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    key = (q.device, q.dtype, q.shape[-1], training, is_causal, torch.backends.cuda.flash_sdp_enabled())
    if key not in _FLASH_TAKES:
        params = torch.backends.cuda.SDPAParams(q, k, k, None, 0.0, is_causal, True)
        _FLASH_TAKES[key] = torch.backends.cuda.can_use_flash_attention(params, False)
    return _FLASH_TAKES[key]


_FLASH_TAKES: dict[tuple, bool] = {}


# cuDNN's attention kernel, which recent PyTorch may prefer on sm90/sm100, corrupts grouped-query
# decoding on some GPUs (pytorch/pytorch#193893, open): minituner turns that backend off, for
# the whole process, the first time attention runs on a GPU. Set this True before then to keep it.
CUDNN_ATTENTION = False
_cudnn_checked = False


def _guard_cudnn_attention() -> None:
    global _cudnn_checked
    if not _cudnn_checked:
        _cudnn_checked = True
        if not CUDNN_ATTENTION and hasattr(torch.backends.cuda, "enable_cudnn_sdp"):
            torch.backends.cuda.enable_cudnn_sdp(False)


def document_spans(document_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """[(start, end), ...] of each row's packed documents, for document_ids (B, T) (one read from
    the device per forward pass). A run of equal ids is one document, as in make_attention_mask."""
    B, T = document_ids.shape
    starts = [[] for _ in range(B)]
    for b, t in document_starts(document_ids).nonzero().tolist():
        starts[b].append(t)
    return [list(zip(row, row[1:] + [T])) for row in starts]


class Documents(NamedTuple):
    """What a layer's attention needs of packed rows: each row's document spans (document_spans),
    and the sliding window of the layer, if it has one."""
    spans: list[list[tuple[int, int]]]
    window: int | None = None


def attend_documents(q, k, v, documents: Documents) -> torch.Tensor:
    """Causal attention of packed rows q (B, H, T, D) over k, v (B, K, T, D), each document on its
    own: one kernel call per document instead of a (T x T) mask over the row, so no row-wide mask
    is made or kept, the fused causal kernels run, and the work is the documents' own (sum of
    length^2, not T^2). A document longer than the layer's window gets its own window mask. The
    same values as the masked call. Returns a (B, H, T, D) view of a (B, T, H, D) tensor, which
    the output projection then reads without a copy."""
    rows = []
    for b, row in enumerate(documents.spans):
        pieces = []
        for s, e in row:
            mask = None
            if documents.window is not None and e - s > documents.window:
                mask = additive_mask(make_attention_mask(e - s, e - s, q.device, window=documents.window)[0], q.dtype)
            out = attend(q[b:b + 1, :, s:e], k[b:b + 1, :, s:e], v[b:b + 1, :, s:e], mask, mask is None)
            pieces.append(out.transpose(1, 2))  # (1, L, H, D)
        rows.append(pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1))  # (1, T, H, D)
    return (rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)).transpose(1, 2)  # (B, H, T, D)


def additive_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean mask as the float one SDPA would make of it (0 where a query may attend, -inf
    where not), made once per forward pass: handed a bool mask, SDPA converts it in every
    layer, and the memory-efficient kernel's backward keeps each layer's copy. Its rows start
    16 elements apart (the last dim is padded, then sliced off), as that kernel needs; with
    any other row stride, SDPA would pad a copy in every layer again."""
    if mask is None:
        return None
    S = mask.shape[-1]
    rows = torch.zeros(*mask.shape[:-1], -(-S // 16) * 16, dtype=dtype, device=mask.device)
    return rows[..., :S].masked_fill_(~mask, float("-inf"))


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        C, HD, KD = config.dim, config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
        self.q_proj = nn.Linear(C, HD, bias=config.qkv_bias)
        self.k_proj = nn.Linear(C, KD, bias=config.qkv_bias)
        self.v_proj = nn.Linear(C, KD, bias=config.qkv_bias)
        self.o_proj = nn.Linear(HD, C, bias=config.out_bias)
        self.uses_window = config.sliding_window is not None and layer >= config.sliding_window_from

    def forward(self, x, cos_sin, mask, is_causal, cache: KVCache | None) -> torch.Tensor:
        """mask: a float mask (B, 1, T, S) or None with is_causal, as attend takes them; or, for
        packed rows, their Documents (see attend_documents)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        if cos_sin is not None:
            q, k = apply_rope(q, *cos_sin), apply_rope(k, *cos_sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, K, S, D)
        if isinstance(mask, Documents):
            out = attend_documents(q, k, v, mask)  # (B, H, T, D)
        else:
            out = attend(q, k, v, mask, is_causal)  # (B, H, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))  # (B, T, C)


class MLP(nn.Module):
    """SwiGLU, down(silu(gate(x)) * up(x)) (Shazeer 2020), or GELU, down(gelu(up(x))) (GPT-2)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.kind = config.mlp
        if self.kind == "swiglu":
            self.gate_proj = nn.Linear(config.dim, config.ffn_dim, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.dim, config.ffn_dim, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.ffn_dim, config.dim, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            h = SwiGLU.apply(self.gate_proj(x), self.up_proj(x))  # (B, T, F)
        elif self.kind == "gelu_tanh":
            h = gelu_tanh(self.up_proj(x))  # (B, T, F)
        else:
            h = F.gelu(self.up_proj(x))  # (B, T, F)
        return self.down_proj(h)  # (B, T, C)


class SwiGLU(torch.autograd.Function):
    """silu(gate) * up, keeping only gate and up for the backward pass, where silu(gate) is
    computed again: autograd would keep silu(gate) too, one more (tokens x F) activation per layer
    (F = 4,864 floats a token in Qwen2.5-0.5B). The backward is autograd's own, op for op
    (MulBackward's products, silu_backward), so the values and gradients are the same bits."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        grad_up = grad * F.silu(gate) if ctx.needs_input_grad[1] else None
        return grad_gate, grad_up


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU's tanh approximation (Hendrycks & Gimpel 2016) as GPT-2 wrote it. Spelled out rather
    than F.gelu(approximate="tanh"), which rounds differently in bf16, to match HF's gelu_new."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = make_norm(config)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, cos_sin, masks, cache) -> torch.Tensor:
        mask, is_causal = masks[self.self_attn.uses_window]
        x = x + self.self_attn(self.input_layernorm(x), cos_sin, mask, is_causal, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


# ----------------------------------------------------------------------------- the model
class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        if config.positions == "learned":
            self.embed_positions = nn.Embedding(config.max_seq_len, config.dim)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = make_norm(config)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.tie_weights()
        if config.positions == "rope":
            # A plain attribute, not a buffer: model.to(bfloat16) must not round the frequencies.
            self.inv_freq, self.rope_scale = rope_frequencies(config)  # (D/2,) float32
        # Activation checkpointing: in training, keep only each block's input and recompute the block
        # in the backward pass (memory of one block's activations instead of all of them, for about a
        # third more compute). The recomputation is the same computation: the gradients do not change.
        self.activation_checkpointing = False
        self.init_weights()

    def tie_weights(self) -> None:
        """Make lm_head use the embedding matrix when the config ties them (call after moving weights)."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """From-scratch init: N(0, init_std) weights, zero biases, unit norms; the projections that
        write into the residual stream scaled by 1/sqrt(2 * n_layers) (GPT-2, Radford et al. 2019)
        so the stream's variance does not grow with depth."""
        std = self.config.init_std
        for name, p in self.named_parameters():
            if p.is_meta:
                continue
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                p.normal_(0.0, std / math.sqrt(2 * self.config.n_layers))
            else:
                p.normal_(0.0, std)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
        hidden_only: bool = False,
        spans: list | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, V) for input_ids (B, T), in the weights' dtype.

        position_ids (B, T): positions of the tokens; by default they count from the cache's
            length, restart at each document (document_ids) or skip left padding (attention_mask).
        attention_mask (B, S): 1 for real tokens, 0 for padding, over the cached and new tokens;
            leave it None when nothing is padded (or only the end is): without a mask tensor
            the causal kernels are faster.
        document_ids (B, T): packed sequences; a token attends only within its own document.
        cache: keys/values of earlier tokens; this call's are appended to it.
        last_only: compute logits for the last position only, (B, 1, V) (generation).
        hidden_only: return the final hidden states (B, T, C), normed, before the output layer (the
            fused loss, loss.linear_loss_sum, applies lm_head itself chunk by chunk).
        spans: document_spans(document_ids), when the caller has them already (read from a copy of
            document_ids on the host, they cost the GPU no wait).
        """
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = default_position_ids(B, T, past, input_ids.device, attention_mask, document_ids)
        x = self.embed_tokens(input_ids)  # (B, T, C)
        cos_sin = None
        if self.config.positions == "learned":
            x = x + self.embed_positions(position_ids)  # (B, T, C)
        else:
            if self.inv_freq.device != input_ids.device:
                self.inv_freq = self.inv_freq.to(input_ids.device)
            cos_sin = rope_cos_sin(self.inv_freq, self.rope_scale, position_ids, x.dtype)  # 2 x (B, T, D)
        S = past + T
        window = self.config.sliding_window
        if document_ids is None or cache is not None or attention_mask is not None:
            spans = None
        elif spans is None:
            spans = document_spans(document_ids)
        if spans is not None:  # packed rows: each document attends on its own
            masks = ((Documents(spans), True), (Documents(spans, window), True))
        else:
            full = make_attention_mask(T, S, x.device, key_padding=attention_mask, document_ids=document_ids)
            local = full if window is None else make_attention_mask(
                T, S, x.device, key_padding=attention_mask, document_ids=document_ids, window=window)
            full = (additive_mask(full[0], x.dtype), full[1])
            local = full if window is None else (additive_mask(local[0], x.dtype), local[1])
            masks = (full, local)  # indexed by Attention.uses_window; every layer shares these tensors
        recompute = self.activation_checkpointing and torch.is_grad_enabled() and cache is None
        for block in self.layers:
            if recompute:
                x = torch.utils.checkpoint.checkpoint(block, x, cos_sin, masks, cache, use_reentrant=False)
            else:
                x = block(x, cos_sin, masks, cache)
        if cache is not None:
            cache.length = S
        if last_only:
            x = x[:, -1:]  # (B, 1, C)
        if hidden_only:
            return self.norm(x)  # (B, T, C)
        return self.lm_head(self.norm(x))  # (B, T, V)


def default_position_ids(B: int, T: int, past: int, device, attention_mask=None, document_ids=None) -> torch.Tensor:
    """Positions (B, T) when the caller gives none: restarting at 0 in each packed document,
    counting only real tokens under left padding, else past, past+1, ..."""
    if document_ids is not None:
        index = torch.arange(T, device=device).expand(B, T)
        start_index = torch.where(document_starts(document_ids), index, 0).cummax(dim=1).values  # (B, T)
        return index - start_index
    if attention_mask is not None:
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]  # (B, T)
    return torch.arange(past, past + T, device=device).expand(B, T)


def document_starts(document_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) True where a packed document begins: the first token and wherever the id changes.
    Documents are runs of equal ids, so [0, 0, 1, 1, 0] holds three documents, not two."""
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    return starts
