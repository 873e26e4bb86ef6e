"""Talk to a model: a multi-turn conversation in the terminal, each reply streamed as it is
generated.

    python -m minituner.chat --model RUN/model [--system TEXT] [--temperature 0.7 --top-p 0.9]

Each turn is written in the folder's chat template (or --template NAME) exactly as
`python -m minituner.generate --chat` and training write it (sft.prompt_ids), and a reply ends
at the template's end-of-turn token. Commands: /reset forgets the conversation, /system TEXT sets
the system message (/system alone removes it), /exit ends the chat, as does Ctrl-D; Ctrl-C stops
the reply being written (what was printed stays in the conversation), not the chat.

The whole conversation is the prompt of the next reply. When it and --max-new-tokens would not
fit in the model's context, the oldest exchanges are dropped (the system message is kept), as
in training (sft.without_first_exchange); a message that does not fit even alone is refused.
Sampling draws from one generator seeded with --seed for the whole chat, so a chat replays
exactly, and its first reply is `generate --chat`'s with the same flags.
"""

import argparse
import sys

import torch

from minituner.distributed import use_device
from minituner.errors import UserError, run_command
from minituner.generate import (add_decoding_flags, chat_format, check_decoding_flags, resolve_dtype, sampling,
                                stream_text)
from minituner.hf.folder import load_pretrained
from minituner.model import Transformer
from minituner.sft import prompt_ids, without_first_exchange
from minituner.templates import MODEL, TEMPLATES, stop_ids
from minituner.tokenizer import Tokenizer

MAX_NEW_TOKENS = 256  # a reply's length at most, unless the context is shorter than twice that
COMMANDS = "/reset forgets the conversation, /system TEXT sets the system message, /exit ends the chat"


class Chat:
    """A conversation with a model: its messages and how each reply is generated."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, template: str, *, system: str | None = None,
                 ignore_eos: bool = False, seed: int = 0, **options):
        self.model, self.tokenizer, self.template, self.options = model, tokenizer, template, options
        self.stops = () if ignore_eos else stop_ids(template, tokenizer)
        self.generator = torch.Generator(model.embed_tokens.weight.device).manual_seed(seed)
        self.budget = model.config.max_seq_len - options["max_new_tokens"]  # prompt tokens a reply leaves room for
        if self.budget < 1:
            raise UserError(f"--max-new-tokens {options['max_new_tokens']} leaves no room for a prompt in the "
                            f"model's context of {model.config.max_seq_len} tokens")
        self.system, self.messages = system, []

    def conversation(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.messages

    def reply(self, message: str, write) -> str:
        """Answer `message`, each piece passed to write() as it comes; the answer, as far as it got
        if Ctrl-C stopped it (it then re-raises KeyboardInterrupt). The message and the answer join
        the conversation; a message the context cannot hold is refused with a UserError, and a
        turn stopped before any text leaves the conversation as it was."""
        before, pieces = list(self.messages), []
        self.messages.append({"role": "user", "content": message})
        try:
            prompt = self._fit()
            for piece in stream_text(self.model, self.tokenizer, prompt, stop_ids=self.stops, generator=self.generator,
                                     **self.options):
                write(piece)
                pieces.append(piece)
        except BaseException:
            if not pieces:
                self.messages = before
                raise
            self.messages.append({"role": "assistant", "content": "".join(pieces)})  # what was printed was said
            raise
        self.messages.append({"role": "assistant", "content": "".join(pieces)})
        return "".join(pieces)

    def _fit(self) -> list[int]:
        """The next reply's prompt, the oldest exchanges dropped while it is over budget (and
        nothing dropped if the last message does not fit even alone)."""
        conversation = self.conversation()
        ids = prompt_ids(conversation, self.tokenizer, self.template)
        while len(ids) > self.budget:
            conversation = without_first_exchange(conversation)
            if conversation is None:
                alone = "with the system message" if self.system else "alone"
                raise UserError(f"the message does not fit: {alone} it takes {len(ids)} tokens, and the model's "
                                f"context of {self.model.config.max_seq_len} leaves {self.budget} beside "
                                f"--max-new-tokens {self.options['max_new_tokens']}")
            ids = prompt_ids(conversation, self.tokenizer, self.template)
        self.messages = conversation[1:] if self.system else conversation
        return ids


def session(chat: Chat, read, write, note) -> None:
    """The chat loop: read() gives the user's next line (EOFError at the end), write() prints reply
    text, note() prints what is not the model's (errors, a stopped reply)."""
    while True:
        try:
            line = read().strip()
        except EOFError:  # Ctrl-D
            return
        except KeyboardInterrupt:  # at the prompt: a fresh line, the chat goes on
            write("\n")
            note("(Ctrl-D or /exit ends the chat)")
            continue
        if not line:
            continue
        if line.startswith("/"):
            command, _, rest = line.partition(" ")
            if command == "/exit":
                return
            if command == "/reset":
                chat.messages = []
            elif command == "/system":
                chat.system = rest.strip() or None
            else:
                note(f"unknown command {command}: {COMMANDS}")
            continue
        try:
            chat.reply(line, write)
            write("\n")
        except KeyboardInterrupt:
            write("\n")
            note("(stopped)")
        except UserError as e:
            note(f"error: {e}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m minituner.chat", description="Chat with a model in the terminal.")
    p.add_argument("--model", required=True, help="Hugging Face model folder with a chat template (a run's RUN/model)")
    p.add_argument("--system", default=None, metavar="TEXT", help="the system message (also /system TEXT in the chat)")
    p.add_argument("--template", default=None, metavar="NAME",
                   help=f"write the turns in this template ({MODEL}, {', '.join(TEMPLATES)}), not the folder's own")
    add_decoding_flags(p, max_new_tokens=None, help_default=f" (default: {MAX_NEW_TOKENS}, at most half the context)")
    args = p.parse_args(argv)
    check_decoding_flags(p, args)
    return args


def run(argv=None) -> int:
    args = parse_args(argv)
    device = use_device(args.device)
    model, tokenizer = load_pretrained(args.model, device=device, dtype=resolve_dtype(args.dtype, device))
    if args.max_new_tokens is None:
        args.max_new_tokens = min(MAX_NEW_TOKENS, model.config.max_seq_len // 2)
    chat = Chat(model, tokenizer, chat_format(tokenizer, args.template), system=args.system,
                ignore_eos=args.ignore_eos, seed=args.seed, **sampling(args))
    interactive = sys.stdin.isatty()
    if interactive:
        import readline  # noqa: F401  (line editing and history for input())
        print(f"chatting with {args.model} ({chat.template}); {COMMANDS}; Ctrl-C stops a reply, Ctrl-D ends")

    def write(text):
        print(text, end="", flush=True)

    def note(text):
        print(text, file=sys.stderr, flush=True)

    session(chat, lambda: input("> " if interactive else ""), write, note)
    if interactive:
        print()  # after Ctrl-D, the shell's prompt on a line of its own
    return 0


def main(argv=None) -> int:
    return run_command(run, argv)


if __name__ == "__main__":
    sys.exit(main())
