"""Text generation: greedy or sampled decoding (temperature, top-k, top-p) of a batch of prompts
with a KV cache, stopping on end-of-sequence ids or stop strings, at once or streamed token by
token; and a CLI to try any folder:

    python -m minituner.generate --model PATH --prompt "Once upon a time" [--prompt ...] [--stream]
    python -m minituner.generate --model RUN/model --chat --prompt "What is lamp spelled backwards?"

Prompts of different lengths are left-padded: every row's next token then sits in the same
column, and the attention mask and position ids make the padding invisible, so a prompt
decodes the same alone or in a batch.

--chat makes each prompt a user turn (after --system, if given) in the folder's chat template,
tokenised exactly as sft.py tokenises the prompt part of a training example, and prints only
the reply, which ends at the template's end-of-turn token. An interactive conversation is
minituner/chat.py. The CLI decodes each prompt on its own, seeded with --seed, so that its text
is the same streamed or not; --stream prints each piece once it is final (detokenize.py).
"""

import argparse
import sys
from collections.abc import Iterator

import torch

from minituner.chat_template import template_text
from minituner.detokenize import TextStream, decode_after
from minituner.distributed import use_device
from minituner.errors import UserError, run_command
from minituner.hf.folder import load_pretrained
from minituner.model import KVCache, Transformer
from minituner.precision import POLICIES, auto_dtype
from minituner.sft import prompt_ids
from minituner.templates import MODEL, TEMPLATES, check_template, default_template, stop_ids
from minituner.tokenizer import Tokenizer

CONTEXT_TOKENS = 4  # a prompt's last tokens, decoded with its continuation (detokenize.decode_after)


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
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> list[list[int]]:
    """New token ids for each prompt (a list of ids), ending with the stop id that ended it, if any.

    temperature 0 is greedy; otherwise tokens are sampled from softmax(logits / temperature)
    restricted to the top_k most likely (0 = all) and to the smallest set whose probability
    reaches top_p (1.0 = all), drawn from `generator`, or one seeded with `seed`. stop_strings
    need the tokenizer to see text. use_cache=False recomputes the whole sequence at every step
    (a reference for the cached path).
    """
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer")
    steps = decode_steps(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                         top_p=top_p, generator=_generator(model, seed, generator), use_cache=use_cache)
    device = model.embed_tokens.weight.device
    B = len(prompts)
    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    out = torch.zeros(B, max_new_tokens, dtype=torch.long, device=device)  # (B, N) the new tokens
    produced = torch.zeros(B, dtype=torch.long, device=device)  # (B,) how many of them each row keeps
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for i, token in enumerate(steps):
        out[:, i] = token
        produced += ~done  # a finished row keeps decoding in step with the batch; its tokens are dropped
        done |= torch.isin(token, stop)
        if stop_strings:
            recent = out[:, max(0, i + 1 - _stop_window(stop_strings)):i + 1].tolist()
            done |= torch.tensor([_hit_stop_string(row, stop_strings, tokenizer) for row in recent], device=device)
        if done.all():  # the loop's one wait for the device per token
            break
    rows, lengths = out.tolist(), produced.tolist()
    return [row[:n] for row, n in zip(rows, lengths)]


def decode_steps(model: Transformer, prompts: list[list[int]], *, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, generator: torch.Generator | None = None,
                 use_cache: bool = True) -> Iterator[torch.Tensor]:
    """Each step's next token of every prompt, a (B,) tensor on the model's device, for up to
    max_new_tokens steps; the model runs for the next step only when it is asked for, so a
    caller stops decoding by stopping the iteration."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UserError("every prompt needs at least one token")
    device = model.embed_tokens.weight.device
    B, longest = len(prompts), max(len(p) for p in prompts)
    total = longest + max_new_tokens
    if model.config.positions == "learned" and total > model.config.max_seq_len:
        raise UserError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                        f"{model.config.max_seq_len} learned positions")
    ids, real = left_pad(prompts, device)  # (B, L) each
    mask = None if all(len(p) == longest for p in prompts) else real  # (B, S) while generating, or None
    cache = KVCache(model.config, B, total, device, model.embed_tokens.weight.dtype) if use_cache else None
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, cache=cache, last_only=True)[:, -1]  # (B, V)
    for i in range(max_new_tokens):
        token = next_token(logits.float(), temperature, top_k, top_p, generator)  # (B,)
        yield token
        if i == max_new_tokens - 1:
            return
        ids = torch.cat([ids, token[:, None]], dim=1)  # (B, S)
        if mask is not None:
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)  # (B, S)
        step_ids = token[:, None] if use_cache else ids  # (B, 1) or (B, S)
        with torch.no_grad():
            logits = model(step_ids, attention_mask=mask, cache=cache, last_only=True)[:, -1]  # (B, V)


def _generator(model: Transformer, seed: int | None, generator: torch.Generator | None) -> torch.Generator | None:
    """`generator` if given, else one seeded with `seed` on the model's device, else None (torch's global one)."""
    if generator is not None or seed is None:
        return generator
    return torch.Generator(model.embed_tokens.weight.device).manual_seed(seed)


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


def _stop_window(stop_strings) -> int:
    """How many of the newest tokens can hold a stop string: a character spans at most 4
    byte-level tokens."""
    return 4 * max(len(s) for s in stop_strings) + 4


def _hit_stop_string(recent: list[int], stop_strings, tokenizer: Tokenizer) -> bool:
    """Whether the text of a row's newest tokens contains a stop string (special tokens written
    out, so that a stop string may name one). A row that has already stopped may hold anything
    after its end, but it is done whatever this says."""
    text = tokenizer.decode(recent, skip_special_tokens=False)
    return any(s in text for s in stop_strings)


def cut_at_stop(text: str, stop_strings) -> str:
    """`text` up to the first stop string in it."""
    for s in stop_strings:
        text = text.split(s, 1)[0]
    return text


def completions(model: Transformer, tokenizer: Tokenizer, prompts: list[list[int]], *, stop_ids=(),
                stop_strings=(), after_prompt: bool = False, **options) -> list[str]:
    """The text each token-id prompt is continued with, without the stop token that ended it and
    cut before any stop string; after_prompt: as the continuation of the prompt's text (plain
    text), not as a text of its own (a reply after a chat template's header)."""
    outputs = generate(model, prompts, stop_ids=stop_ids, stop_strings=stop_strings, tokenizer=tokenizer, **options)
    texts = []
    for prompt, ids in zip(prompts, outputs):
        ids = ids[:-1] if ids and ids[-1] in stop_ids else ids
        text = decode_after(tokenizer, prompt[-CONTEXT_TOKENS:], ids) if after_prompt else tokenizer.decode(ids)
        texts.append(cut_at_stop(text, stop_strings))
    return texts


def generate_text(model: Transformer, tokenizer: Tokenizer, prompts: list[str], *, stop_strings=(),
                  stop_on_eos: bool = True, add_special_tokens: bool = True, **options) -> list[str]:
    """Completions of text prompts, cut before any stop string and without the stop token."""
    prompt_ids = [tokenizer.encode(p, add_special_tokens=add_special_tokens) for p in prompts]
    return completions(model, tokenizer, prompt_ids, stop_ids=tokenizer.stop_ids if stop_on_eos else (),
                       stop_strings=stop_strings, after_prompt=True, **options)


def greedy_texts(model: Transformer, tokenizer: Tokenizer, prompts: list[list[int]], stops, max_new_tokens: int,
                 batch_size: int = 64) -> list[str]:
    """Greedy continuations of token-id prompts, `batch_size` at a time, as text without the
    token that ended them."""
    return [text for i in range(0, len(prompts), batch_size)
            for text in completions(model, tokenizer, prompts[i:i + batch_size], stop_ids=stops,
                                    max_new_tokens=max_new_tokens)]


# ----------------------------------------------------------------------------- streaming
def stream_text(model: Transformer, tokenizer: Tokenizer, prompt: list[int], *, stop_ids=(), stop_strings=(),
                after_prompt: bool = False, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                top_p: float = 1.0, seed: int | None = None,
                generator: torch.Generator | None = None) -> Iterator[str]:
    """completions() of one prompt, piece by piece as it is generated: the pieces join to the same
    text for the same settings (a seeded sample included). Stopping the iteration stops decoding."""
    stop_ids = set(stop_ids)
    text, recent = TextStream(tokenizer, stop_strings, prompt[-CONTEXT_TOKENS:] if after_prompt else ()), []
    for token in decode_steps(model, [prompt], max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                              top_p=top_p, generator=_generator(model, seed, generator)):
        token_id = token.item()  # the host needs each id to print it
        if token_id in stop_ids:
            break
        piece = text.push(token_id)
        if piece:
            yield piece
        if stop_strings:  # as generate() stops: the newest tokens' text, special tokens written out
            recent = (recent + [token_id])[-_stop_window(stop_strings):]
            if _hit_stop_string(recent, stop_strings, tokenizer):
                break
        if text.stopped:
            break
    rest = text.finish()
    if rest:
        yield rest


# ----------------------------------------------------------------------------- chat turns
def chat_format(tokenizer: Tokenizer, template: str | None) -> str:
    """The template a conversation with this model is written in: `template` if given (one of
    minituner's, or "model"), else the folder's own chat template, which for a model tuned here
    names the format it was tuned in (templates.default_template)."""
    if template is None:
        if template_text(tokenizer) is None:
            folder = tokenizer.folder or "the model folder"
            raise UserError(f"{folder}: no chat template (chat_template.jinja, or \"chat_template\" in "
                            f"tokenizer_config.json) to write a chat turn in; choose one with --template "
                            f"({', '.join(TEMPLATES)})")
        template = default_template(tokenizer)
    check_template(template, tokenizer)
    return template


def chat_conversation(message: str, system: str | None = None) -> list[dict]:
    """One user turn, after a system message if there is one."""
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": message}]


# ----------------------------------------------------------------------------- CLI
def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """A --dtype flag's dtype: 'auto' is bf16 on a GPU that computes it, fp16 on an older GPU,
    fp32 on the CPU (precision.auto_dtype)."""
    return auto_dtype(device) if name == "auto" else POLICIES[name]


def add_decoding_flags(p: argparse.ArgumentParser, max_new_tokens: int | None, help_default: str = "") -> None:
    """The flags generate and chat share: sampling, stops, hardware."""
    g = p.add_argument_group("decoding")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                   help=f"tokens to generate at most per reply{help_default}")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    g.add_argument("--top-p", type=float, default=1.0, help="sample within the top-p probability mass (nucleus)")
    g.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    g.add_argument("--stop", action="append", default=[], help="stop when this string appears; repeatable")
    g.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-sequence or end-of-turn tokens")
    g = p.add_argument_group("hardware")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--dtype", default="auto", choices=["auto", *POLICIES],
                   help="auto = bf16 on GPUs that have it, else fp16; fp32 on CPU")


def check_decoding_flags(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        p.error("--max-new-tokens must be at least 1")
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
        p.error("--temperature must be >= 0, --top-p in (0, 1], --top-k >= 0")
    if any(not s for s in args.stop):
        p.error("--stop needs a non-empty string")


def sampling(args: argparse.Namespace) -> dict:
    """The decoding flags as keyword arguments of generate() and stream_text()."""
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, stop_strings=args.stop)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m minituner.generate", description="Generate text with a model folder.")
    # what to run
    p.add_argument("--model", required=True, help="Hugging Face model folder (config.json, safetensors, tokenizer.json)")
    p.add_argument("--prompt", action="append", required=True, help="a prompt; repeat the flag for more")
    p.add_argument("--no-special-tokens", action="store_true", help="do not add the model's BOS to the prompts")
    p.add_argument("--stream", action="store_true", help="print the text as it is generated, one prompt at a time")
    # chat
    p.add_argument("--chat", action="store_true",
                   help="each prompt is a user turn in the model's chat template; print only the reply")
    p.add_argument("--system", default=None, metavar="TEXT", help="with --chat: a system message before the turn")
    p.add_argument("--template", default=None, metavar="NAME",
                   help=f"with --chat: write the turn in this template ({MODEL}, {', '.join(TEMPLATES)}) instead of "
                        "the folder's own")
    add_decoding_flags(p, max_new_tokens=64)
    args = p.parse_args(argv)
    check_decoding_flags(p, args)
    if not args.chat and (args.system is not None or args.template is not None):
        p.error("--system and --template are for chat turns: add --chat")
    if args.chat and args.no_special_tokens:
        p.error("--no-special-tokens is for plain prompts: a chat template writes its own special tokens")
    return args


def run(argv=None) -> int:
    args = parse_args(argv)
    if args.chat and not all(p.strip() for p in args.prompt):
        raise UserError("--prompt: an empty chat turn; give the message to answer")
    device = use_device(args.device)
    model, tokenizer = load_pretrained(args.model, device=device, dtype=resolve_dtype(args.dtype, device))
    if args.chat:
        template = chat_format(tokenizer, args.template)
        prompts = [prompt_ids(chat_conversation(p, args.system), tokenizer, template) for p in args.prompt]
        stops = stop_ids(template, tokenizer)
        check_context(model, max(map(len, prompts)), args.max_new_tokens)
    else:
        prompts = [tokenizer.encode(p, add_special_tokens=not args.no_special_tokens) for p in args.prompt]
        stops = tokenizer.stop_ids
    options = dict(stop_ids=() if args.ignore_eos else stops, after_prompt=not args.chat, seed=args.seed,
                   **sampling(args))
    for n, (text, prompt) in enumerate(zip(args.prompt, prompts)):
        # each prompt alone, seeded alike, so that its text is the same streamed or not
        print(("-" * 40 + "\n" if n else "") + ("" if args.chat else text), end="", flush=True)
        if args.stream:
            for piece in stream_text(model, tokenizer, prompt, **options):
                print(piece, end="", flush=True)
            print()
        else:
            print(completions(model, tokenizer, [prompt], **options)[0])
    return 0


def check_context(model: Transformer, prompt_tokens: int, max_new_tokens: int) -> None:
    """A UserError if a prompt and its reply would not fit in the model's context."""
    if prompt_tokens + max_new_tokens > model.config.max_seq_len:
        raise UserError(f"the chat turn takes {prompt_tokens} tokens; with --max-new-tokens {max_new_tokens} it does "
                        f"not fit in the model's context of {model.config.max_seq_len}")


def main(argv=None) -> int:
    return run_command(run, argv)


if __name__ == "__main__":
    sys.exit(main())
