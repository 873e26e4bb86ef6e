"""Text generation: greedy or sampled decoding (temperature, top-k, top-p) of a batch of prompts
with a KV cache, stopping on end-of-sequence ids or stop strings; and a CLI to try any folder:

    python -m minituner.generate --model PATH --prompt "Once upon a time" [--prompt ...]

Prompts of different lengths are left-padded: every row's next token then sits in the same
column, and the attention mask and position ids make the padding invisible, so a prompt
decodes the same alone or in a batch.
"""

import argparse
import sys

import torch

from minituner.distributed import use_device
from minituner.errors import UserError, run_command
from minituner.hf.folder import load_pretrained
from minituner.model import KVCache, Transformer
from minituner.precision import POLICIES, auto_dtype
from minituner.tokenizer import Tokenizer


@torch.no_grad()
def generate(
    model: Transformer,
    prompts: list[list[int]],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_ids=(),
    stop_strings=(),
    tokenizer: Tokenizer | None = None,
    seed: int | None = None,
    use_cache: bool = True,
) -> list[list[int]]:
    """New token ids for each prompt (a list of ids), ending with the stop id that ended it, if any.

    temperature 0 is greedy; otherwise tokens are sampled from softmax(logits / temperature)
    restricted to the top_k most likely (0 = all) and to the smallest set whose probability
    reaches top_p (1.0 = all). stop_strings need the tokenizer to see text. use_cache=False
    recomputes the whole sequence at every step (a reference for the cached path).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UserError("every prompt needs at least one token")
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer")
    device = model.embed_tokens.weight.device
    B, longest = len(prompts), max(len(p) for p in prompts)
    total = longest + max_new_tokens
    if model.config.positions == "learned" and total > model.config.max_seq_len:
        raise UserError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                        f"{model.config.max_seq_len} learned positions")
    ids, real = left_pad(prompts, device)  # (B, L) each
    mask = None if all(len(p) == longest for p in prompts) else real  # (B, S) while generating, or None
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    cache = KVCache(model.config, B, total, device, model.embed_tokens.weight.dtype) if use_cache else None

    out = torch.zeros(B, max_new_tokens, dtype=torch.long, device=device)  # (B, N) the new tokens
    produced = torch.zeros(B, dtype=torch.long, device=device)  # (B,) how many of them each row keeps
    done = torch.zeros(B, dtype=torch.bool, device=device)
    logits = model(ids, attention_mask=mask, cache=cache, last_only=True)[:, -1]  # (B, V)
    for i in range(max_new_tokens):
        token = next_token(logits.float(), temperature, top_k, top_p, generator)  # (B,)
        out[:, i] = token
        produced += ~done  # a finished row keeps decoding in step with the batch; its tokens are dropped
        done |= torch.isin(token, stop)
        if stop_strings:
            done |= _hit_stop_string(out[:, :i + 1], stop_strings, tokenizer)
        if done.all():  # the loop's one wait for the device per token
            break
        ids = torch.cat([ids, token[:, None]], dim=1)  # (B, S)
        if mask is not None:
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)  # (B, S)
        step_ids = token[:, None] if use_cache else ids  # (B, 1) or (B, S)
        logits = model(step_ids, attention_mask=mask, cache=cache, last_only=True)[:, -1]  # (B, V)
    rows, lengths = out.tolist(), produced.tolist()
    return [row[:n] for row, n in zip(rows, lengths)]


def left_pad(prompts: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts right-aligned in one (B, L) tensor of ids, and the (B, L) mask of real tokens
    (built on the host, then copied to `device` once)."""
    B, L = len(prompts), max(len(p) for p in prompts)
    ids = torch.zeros(B, L, dtype=torch.long)
    real = torch.zeros(B, L, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        ids[row, L - len(prompt):] = torch.tensor(prompt)
        real[row, L - len(prompt):] = True
    return ids.to(device), real.to(device)


def next_token(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator=None) -> torch.Tensor:
    """One token id per row of logits (B, V): argmax if temperature is 0, else a filtered sample."""
    if temperature <= 0:
        return logits.argmax(dim=-1)  # (B,)
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        # Keep the most likely tokens until their probability reaches top_p (the nucleus,
        # Holtzman et al. 2019); the first token is always kept.
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(dim=-1)
        outside = probs.cumsum(dim=-1) - probs > top_p  # probability before this token already reached top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(outside, float("-inf")))
    probs = logits.softmax(dim=-1)  # (B, V)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)


def _hit_stop_string(new: torch.Tensor, stop_strings, tokenizer: Tokenizer) -> torch.Tensor:
    """Rows of the new tokens (B, n) whose text now contains a stop string. Only the recent
    tokens are decoded; a row that has already stopped may hold anything after its end, but it
    is done whatever this says."""
    window = 4 * max(len(s) for s in stop_strings) + 4  # a character spans at most 4 byte-level tokens
    hits = [any(s in tokenizer.decode(row, skip_special_tokens=False) for s in stop_strings)
            for row in new[:, -window:].tolist()]
    return torch.tensor(hits, dtype=torch.bool, device=new.device)


def generate_text(model: Transformer, tokenizer: Tokenizer, prompts: list[str], *, stop_strings=(),
                  stop_on_eos: bool = True, add_special_tokens: bool = True, **options) -> list[str]:
    """Completions of text prompts, cut before any stop string and without the stop token."""
    prompt_ids = [tokenizer.encode(p, add_special_tokens=add_special_tokens) for p in prompts]
    stop_ids = tokenizer.stop_ids if stop_on_eos else ()
    outputs = generate(model, prompt_ids, stop_ids=stop_ids, stop_strings=stop_strings, tokenizer=tokenizer, **options)
    texts = []
    for ids in outputs:
        if ids and ids[-1] in stop_ids:
            ids = ids[:-1]
        text = tokenizer.decode(ids)
        for s in stop_strings:
            text = text.split(s, 1)[0]
        texts.append(text)
    return texts


def greedy_texts(model: Transformer, tokenizer: Tokenizer, prompts: list[list[int]], stops, max_new_tokens: int,
                 batch_size: int = 64) -> list[str]:
    """Greedy continuations of token-id prompts, `batch_size` at a time, as text without the
    token that ended them."""
    texts = []
    for i in range(0, len(prompts), batch_size):
        outputs = generate(model, prompts[i:i + batch_size], max_new_tokens=max_new_tokens, stop_ids=stops)
        texts += [tokenizer.decode(ids[:-1] if ids and ids[-1] in stops else ids) for ids in outputs]
    return texts


# ----------------------------------------------------------------------------- CLI
def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """A --dtype flag's dtype: 'auto' is bf16 on a GPU that computes it, fp16 on an older GPU,
    fp32 on the CPU (precision.auto_dtype)."""
    return auto_dtype(device) if name == "auto" else POLICIES[name]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m minituner.generate", description="Generate text with a model folder.")
    # what to run
    p.add_argument("--model", required=True, help="Hugging Face model folder (config.json, safetensors, tokenizer.json)")
    p.add_argument("--prompt", action="append", required=True, help="a prompt; repeat the flag for a batch")
    p.add_argument("--no-special-tokens", action="store_true", help="do not add the model's BOS to the prompts")
    # decoding
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most per prompt")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="sample within the top-p probability mass (nucleus)")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    p.add_argument("--stop", action="append", default=[], help="stop when this string appears; repeatable")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-sequence tokens")
    # hardware
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", *POLICIES],
                   help="auto = bf16 on GPUs that have it, else fp16; fp32 on CPU")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1:
        p.error("--max-new-tokens must be at least 1")
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
        p.error("--temperature must be >= 0, --top-p in (0, 1], --top-k >= 0")
    if any(not s for s in args.stop):
        p.error("--stop needs a non-empty string")
    return args


def run(argv=None) -> int:
    args = parse_args(argv)
    device = use_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    model, tokenizer = load_pretrained(args.model, device=device, dtype=dtype)
    texts = generate_text(model, tokenizer, args.prompt, stop_strings=args.stop, stop_on_eos=not args.ignore_eos,
                          add_special_tokens=not args.no_special_tokens, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    for prompt, text in zip(args.prompt, texts):
        print(f"{prompt}{text}")
        if len(args.prompt) > 1:
            print("-" * 40)
    return 0


def main(argv=None) -> int:
    return run_command(run, argv)


if __name__ == "__main__":
    sys.exit(main())
