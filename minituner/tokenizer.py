"""Tokenizers: a `tokenizers` library tokenizer with the ids that have special roles (bos, eos,
pad, the stop ids that end generation), text <-> ids for data and for chat-template scaffolding,
and a byte-level BPE trainer for models built from scratch. Reading and writing the files of a
Hugging Face folder is minituner/hf/tokenizer.py.

Whether `encode(..., add_special_tokens=True)` adds a BOS (Llama) or nothing (GPT-2, Qwen2) is
decided by tokenizer.json's post-processor. Only a tokenizer.json without one falls back to
tokenizer_config.json's add_bos_token / add_eos_token (transformers 5 ignores those flags then).

tokenizer.json is run exactly as written, as the `tokenizers` library runs it. transformers 5
rebuilds some tokenizers from the class named in tokenizer_config.json instead: for Llama-2-style
files (a Prepend("▁") normalizer) its ids differ from the file's in the "▁" before a leading
space or after a special token in the middle of a text.
"""

import json
import re
from functools import cached_property

from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, trainers

from minituner.errors import UserError

ENDOFTEXT = "<|endoftext|>"
# Special tokens of a from-scratch tokenizer: end of text (also the pad), and ChatML's turn
# markers so that chat templates work without resizing the embedding later.
SCRATCH_SPECIAL_TOKENS = (ENDOFTEXT, "<|im_start|>", "<|im_end|>")
# The special-token names of Hugging Face tokenizer files (tokenizer_config.json), which chat templates read.
SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


class Tokenizer:
    """Text <-> token ids, and the ids with special roles (bos, eos, pad, stop)."""

    def __init__(self, backend: Backend, *, bos_id=None, eos_id=None, pad_id=None, stop_ids=(),
                 tokenizer_config=None, generation_config=None, chat_template_file=None, named_templates=None,
                 special_names=None, folder=None):
        self.backend = backend
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        # Generation ends on any of these: the eos and every eos id of generation_config.json.
        self.stop_ids = sorted(set(stop_ids) | ({eos_id} if eos_id is not None else set()))
        self.tokenizer_config = dict(tokenizer_config or {})  # written back on save, so HF sees the same
        self.generation_config = dict(generation_config or {})
        self.chat_template_file = chat_template_file  # text of chat_template.jinja, if the folder had one
        self.folder = folder  # the folder it was read from, for messages
        self.named_templates = dict(named_templates or {})  # name -> additional_chat_templates/<name>.jinja
        # SPECIAL_NAMES as the folder's files state them (null included); None: made here, named by its ids
        self.special_names = special_names
        self.prefix_ids, self.suffix_ids = self._special_affixes()

    @cached_property
    def _prefix(self) -> tuple[str | None, Backend | None]:
        return _prefix_space(self.backend)  # serialises the whole tokenizer: once, and only when needed

    @property
    def prefix_space(self) -> str | None:
        """Where the tokenizer puts a "▁" before text: "each", "first" or None (see _prefix_space)."""
        return self._prefix[0]

    @property
    def _joined(self) -> Backend | None:
        return self._prefix[1]  # the same tokenizer without the prefix space

    @cached_property
    def _added(self) -> tuple[set, re.Pattern]:
        """Ids and a splitting pattern of the added tokens, at which a text is split before it is normalised."""
        added = self.backend.get_added_tokens_decoder()
        contents = sorted((t.content for t in added.values()), key=len, reverse=True)
        return set(added), re.compile("(" + "|".join(map(re.escape, contents)) + ")" if contents else "(?!)")

    @cached_property
    def special_pattern(self) -> re.Pattern:
        """A pattern matching the special tokens (added tokens marked special: <|im_end|>, </s>, ...)."""
        added = self.backend.get_added_tokens_decoder().values()
        contents = sorted((t.content for t in added if t.special), key=len, reverse=True)
        return re.compile("|".join(map(re.escape, contents)) if contents else "(?!)")

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included: the embedding needs at least this many rows."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with add_special_tokens, the model's BOS (and EOS, if it wants one).

        Special tokens written in the text (e.g. "<|im_start|>") always become their single id.
        """
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return self.prefix_ids + ids + self.suffix_ids if add_special_tokens else ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of `text` (special-token strings in it become their ids, no BOS/EOS added) and
        each token's (start, end) characters in it."""
        encoding = self.backend.encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets

    def encode_text(self, text: str, *, specials_as_text: bool = True, previous: int | None = None) -> list[int]:
        """Token ids of data text, no BOS/EOS added.

        specials_as_text: special-token strings written in it (a document quoting "<|endoftext|>",
            a user typing "<|im_end|>") stay the characters they are, so data can never smuggle in
            a control token; False for a template's own scaffolding.
        previous: the last id before the text, when it continues a longer string tokenised piece by
            piece (a chat template's segments; a BOS counts, as apply_chat_template writes it).
            SentencePiece-style tokenizers put a "▁" before the start of a text; for a continuation
            it is left out wherever encoding the whole string would leave it out (_prefix_space).
        """
        joined = previous is not None and self.prefix_space is not None and (
            self.prefix_space == "first" or previous not in self._added[0])
        if joined and self.prefix_space == "each" and not specials_as_text:
            return self._encode_continued_markup(text)
        return self._encode(self._joined if joined else self.backend, text, specials_as_text)

    def _encode_continued_markup(self, text: str) -> list[int]:
        """Scaffolding that continues a text, for a tokenizer that puts "▁" after every special
        token: no "▁" before its first piece, one before each piece after a special token in it."""
        ids = []
        for i, piece in enumerate(self._added[1].split(text)):
            if i % 2:  # the split's captured separators: the special tokens
                ids.append(self.backend.token_to_id(piece))
            elif piece:
                ids += self._encode(self._joined if i == 0 else self.backend, piece, True)
        return ids

    @staticmethod
    def _encode(backend: Backend, text: str, specials_as_text: bool) -> list[int]:
        before = backend.encode_special_tokens
        backend.encode_special_tokens = specials_as_text
        try:
            return backend.encode(text, add_special_tokens=False).ids
        finally:
            backend.encode_special_tokens = before

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def _special_affixes(self) -> tuple[list[int], list[int]]:
        """The ids that encode(add_special_tokens=True) puts before and after the text."""
        if self.backend.post_processor is None:
            cfg = self.tokenizer_config
            prefix = [self.bos_id] if cfg.get("add_bos_token") and self.bos_id is not None else []
            suffix = [self.eos_id] if cfg.get("add_eos_token") and self.eos_id is not None else []
            return prefix, suffix
        plain = self.backend.encode("a", add_special_tokens=False).ids
        full = self.backend.encode("a", add_special_tokens=True).ids
        for start in range(len(full) - len(plain) + 1):  # where the plain ids sit inside the full ones
            if full[start:start + len(plain)] == plain:
                return full[:start], full[start + len(plain):]
        raise UserError("tokenizer.json: its post-processor changes the text's own tokens; not supported")

    # ------------------------------------------------------------------------- training
    @classmethod
    def from_dir(cls, path) -> "Tokenizer":
        """The tokenizer of a Hugging Face model folder: minituner.hf.tokenizer.load_tokenizer(path),
        kept under this name for the scripts written against it (../shared/bench's mask check)."""
        from minituner.hf.tokenizer import load_tokenizer  # (hf/ builds on this module: imported when called)
        return load_tokenizer(path)

    @classmethod
    def train_bpe(cls, texts, vocab_size: int, special_tokens=SCRATCH_SPECIAL_TOKENS, min_frequency: int = 2,
                  max_len: int | None = None) -> "Tokenizer":
        """Train a byte-level BPE (GPT-2's scheme: every byte is a base token, so no text is ever
        out of vocabulary) on an iterable of strings. The first special token is eos and pad."""
        minimum = 256 + len(special_tokens)
        if vocab_size < minimum:
            raise UserError(f"vocab size {vocab_size} is too small: a byte-level BPE needs at least {minimum} "
                            f"(256 bytes + {len(special_tokens)} special tokens)")
        backend = Backend(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                      special_tokens=list(special_tokens),
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        backend.train_from_iterator(texts, trainer)
        eos = backend.token_to_id(special_tokens[0])
        tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": special_tokens[0],
                   "pad_token": special_tokens[0]}
        if max_len is not None:
            tok_cfg["model_max_length"] = max_len
        return cls(backend, eos_id=eos, pad_id=eos, tokenizer_config=tok_cfg)


def _prefix_space(backend: Backend) -> tuple[str | None, Backend | None]:
    """Whether the tokenizer puts a prefix space ("▁") before text, and where; and a copy without it.

    "each": at the start of the text and after every special token, where the text is split and
    each piece normalised on its own (Llama 2's Prepend("▁") normalizer, Metaspace "always");
    "first": only at the very start (Metaspace "first"); None: never (byte-level BPE, as GPT-2,
    Llama 3, Qwen2). Encoding one piece of a longer string, "each" adds the space only after a
    special token, "first" never.
    """
    spec = json.loads(backend.to_str())
    found = []

    def strip(node):
        if isinstance(node, dict):
            if node.get("type") == "Prepend":
                found.append("each")
                return None
            if node.get("type") == "Metaspace" and node.get("prepend_scheme", "always") != "never":
                found.append("first" if node.get("prepend_scheme") == "first" else "each")
                return {**node, "prepend_scheme": "never", "add_prefix_space": False}
            if node.get("type") == "ByteLevel" and node.get("add_prefix_space"):
                found.append("each")
                return {**node, "add_prefix_space": False}
            return {k: strip(v) for k, v in node.items()}
        if isinstance(node, list):
            return [x for x in (strip(v) for v in node) if x is not None]
        return node

    spec["normalizer"], spec["pre_tokenizer"] = strip(spec.get("normalizer")), strip(spec.get("pre_tokenizer"))
    if not found:
        return None, None
    return found[0], Backend.from_str(json.dumps(spec))
