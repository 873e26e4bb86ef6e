"""Tokenizers: the `tokenizer.json` of a Hugging Face model folder, run by the `tokenizers`
library, together with the special tokens the folder's other files name; and a byte-level BPE
trainer for models built from scratch.

Which special tokens a folder means is spread over several files. We read, in order:
  tokenizer_config.json  bos_token / eos_token / pad_token (strings, or {"content": ...}), and
                         special_tokens_map.json, where older folders keep them;
  generation_config.json bos/eos/pad ids; `eos_token_id` may be a list (Llama 3 instruct stops on
                         <|eot_id|> and <|eom_id|> too): all of them stop generation;
  config.json            the same ids, when the other two are silent.
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
from pathlib import Path

from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, trainers

from minituner.errors import UserError, read_json

ENDOFTEXT = "<|endoftext|>"
# Special tokens of a from-scratch tokenizer: end of text (also the pad), and ChatML's turn
# markers so that chat templates work without resizing the embedding later.
SCRATCH_SPECIAL_TOKENS = (ENDOFTEXT, "<|im_start|>", "<|im_end|>")


class Tokenizer:
    """Text <-> token ids, and the ids with special roles (bos, eos, pad, stop)."""

    def __init__(self, backend: Backend, *, bos_id=None, eos_id=None, pad_id=None, stop_ids=(),
                 tokenizer_config=None, generation_config=None, chat_template_file=None):
        self.backend = backend
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        # Generation ends on any of these: the eos and every eos id of generation_config.json.
        self.stop_ids = sorted(set(stop_ids) | ({eos_id} if eos_id is not None else set()))
        self.tokenizer_config = dict(tokenizer_config or {})  # written back on save, so HF sees the same
        self.generation_config = dict(generation_config or {})
        self.chat_template_file = chat_template_file  # text of chat_template.jinja, if the folder had one
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

    # ------------------------------------------------------------------------- files
    @classmethod
    def from_dir(cls, path) -> "Tokenizer":
        """Read tokenizer.json and the special tokens of a Hugging Face model folder."""
        folder = Path(path)
        file = folder / "tokenizer.json"
        if not file.is_file():
            raise UserError(
                f"{folder}: no tokenizer.json. minituner reads Hugging Face fast-tokenizer files; a folder with only "
                "tokenizer.model can be converted once with transformers: "
                "AutoTokenizer.from_pretrained(path).save_pretrained(path)")
        try:
            backend = Backend.from_file(str(file))
        except Exception as e:  # the Rust library raises its own exception type
            raise UserError(f"{file}: not a readable tokenizer.json ({str(e).splitlines()[0]})") from None
        tok_file, map_file = folder / "tokenizer_config.json", folder / "special_tokens_map.json"
        gen_file, model_file = folder / "generation_config.json", folder / "config.json"
        tok_cfg, map_cfg = read_json(tok_file) or {}, read_json(map_file) or {}  # older folders split the names
        gen_cfg, model_cfg = read_json(gen_file) or {}, read_json(model_file) or {}
        ids = {}
        for role in ("bos", "eos", "pad"):
            named_in = (tok_cfg, tok_file) if f"{role}_token" in tok_cfg else (map_cfg, map_file)
            ids[role] = _special_id(backend, *named_in, role)
            if ids[role] is None:  # the configs' ids, generation_config first as transformers does
                key = f"{role}_token_id"
                ids[role] = (_id_list(gen_cfg, key, gen_file) or _id_list(model_cfg, key, model_file) or [None])[0]
        stop_ids = _id_list(gen_cfg, "eos_token_id", gen_file) or _id_list(model_cfg, "eos_token_id", model_file)
        template_file = folder / "chat_template.jinja"
        template = template_file.read_text(encoding="utf-8") if template_file.is_file() else None
        return cls(backend, bos_id=ids["bos"], eos_id=ids["eos"], pad_id=ids["pad"], stop_ids=stop_ids,
                   tokenizer_config=tok_cfg, generation_config=gen_cfg, chat_template_file=template)

    def set_chat_format(self, chat_template: str, stop_ids: list[int]) -> None:
        """Record the chat format a model was tuned on, so that what is saved says it: the Jinja
        template (chat_template.jinja, which transformers' apply_chat_template renders) and the
        tokens that end an answer (generation_config.json's eos_token_id, where generate stops)."""
        self.chat_template_file = chat_template
        self.tokenizer_config.pop("chat_template", None)  # the base model's own, if it had one, no longer applies
        self.stop_ids = sorted(set(stop_ids))
        if not self.generation_config:
            self.generation_config = {"bos_token_id": self.bos_id, "pad_token_id": self.pad_id}
        self.generation_config["eos_token_id"] = _id_or_list(self.stop_ids)

    def save(self, path) -> None:
        """Write tokenizer.json, tokenizer_config.json and generation_config.json into folder `path`."""
        folder = Path(path)
        self.backend.save(str(folder / "tokenizer.json"))
        tok_cfg = dict(self.tokenizer_config)
        tok_cfg.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        for role in ("bos", "eos", "pad"):
            token_id = getattr(self, f"{role}_id")
            tok_cfg[f"{role}_token"] = self.id_to_token(token_id) if token_id is not None else None
        gen_cfg = dict(self.generation_config)
        if not gen_cfg:
            gen_cfg = {"bos_token_id": self.bos_id, "eos_token_id": _id_or_list(self.stop_ids), "pad_token_id": self.pad_id}
        (folder / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        (folder / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2) + "\n", encoding="utf-8")
        if self.chat_template_file is not None:
            (folder / "chat_template.jinja").write_text(self.chat_template_file, encoding="utf-8")

    # ------------------------------------------------------------------------- training
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


def _special_id(backend: Backend, names: dict, source: Path, role: str) -> int | None:
    """Id of the token that `names` (the dict of file `source`) gives as `{role}_token`; None if none."""
    token = names.get(f"{role}_token")
    if isinstance(token, dict):  # a serialised AddedToken
        token = token.get("content")
    if not token:
        return None
    if not isinstance(token, str):
        raise UserError(f"{source}: {role}_token should be a token string, got {token!r}")
    token_id = backend.token_to_id(token)
    if token_id is None and role != "pad":  # an unknown pad is harmless: we pick our own
        raise UserError(f"{source}: {role}_token {token!r} is not in tokenizer.json's vocabulary")
    return token_id


def _id_list(config: dict, key: str, source: Path) -> list[int]:
    """config[key] as a list of token ids: absent or null is [], one id or a list of ids is allowed."""
    value = config.get(key)
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise UserError(f"{source}: {key} should be a token id or a list of them, got {value!r}")
    return values


def _id_or_list(ids: list[int]):
    return ids[0] if len(ids) == 1 else (list(ids) or None)
