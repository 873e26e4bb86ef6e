"""The tokenizer files of a Hugging Face model folder: tokenizer.json (run by the `tokenizers`
library exactly as written) and the files that say which tokens are special.

Which special tokens a folder means is spread over several files. We read, in order:
  tokenizer_config.json  bos_token / eos_token / pad_token (strings, or {"content": ...}), and
                         special_tokens_map.json, where older folders keep them;
  generation_config.json bos/eos/pad ids; `eos_token_id` may be a list (Llama 3 instruct stops on
                         <|eot_id|> and <|eom_id|> too): all of them stop generation;
  config.json            the same ids, when the other two are silent.
A chat_template.jinja (and transformers 5's additional_chat_templates/*.jinja) is kept as it is
and written back on save, with the special-token names as the folder states them, which chat
templates read ({{ bos_token }}).
"""

import json
from pathlib import Path

from tokenizers import Tokenizer as Backend

from minituner.errors import UserError, read_json
from minituner.tokenizer import SPECIAL_NAMES, Tokenizer


def load_tokenizer(path) -> Tokenizer:
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
    named = {file.stem: file.read_text(encoding="utf-8")  # transformers 5 keeps e.g. tool_use.jinja there
             for file in sorted((folder / "additional_chat_templates").glob("*.jinja"))}
    # the names as the files state them (null included): what transformers passes to chat templates
    names = {name: _token_name(cfg[name]) for name in SPECIAL_NAMES
             for cfg in (tok_cfg if name in tok_cfg else map_cfg,) if name in cfg}
    return Tokenizer(backend, bos_id=ids["bos"], eos_id=ids["eos"], pad_id=ids["pad"], stop_ids=stop_ids,
                     tokenizer_config=tok_cfg, generation_config=gen_cfg, chat_template_file=template,
                     named_templates=named, special_names=names, folder=str(folder))


def set_chat_format(tokenizer: Tokenizer, chat_template: str | None, stop_ids: list[int]) -> None:
    """Record the chat format a model was tuned on, so that what is saved says it: the Jinja
    template (chat_template.jinja, which transformers' apply_chat_template renders; None: the
    folder's own, kept as it is) and the tokens that end an answer (generation_config.json's
    eos_token_id, where generate stops)."""
    if chat_template is not None:
        tokenizer.chat_template_file = chat_template
        tokenizer.tokenizer_config.pop("chat_template", None)  # the base model's own no longer applies
    tokenizer.stop_ids = sorted(set(stop_ids))
    if not tokenizer.generation_config:
        tokenizer.generation_config = {"bos_token_id": tokenizer.bos_id, "pad_token_id": tokenizer.pad_id}
    tokenizer.generation_config["eos_token_id"] = _id_or_list(tokenizer.stop_ids)


def save_tokenizer(tokenizer: Tokenizer, path) -> None:
    """Write tokenizer.json, tokenizer_config.json and generation_config.json into folder `path`."""
    folder = Path(path)
    tokenizer.backend.save(str(folder / "tokenizer.json"))
    tok_cfg = dict(tokenizer.tokenizer_config)
    tok_cfg.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    if tokenizer.special_names is not None:  # read from a folder: as it stated them (chat templates read them)
        tok_cfg.update(tokenizer.special_names)
    else:  # made here: its ids name them
        for role in ("bos", "eos", "pad"):
            token_id = getattr(tokenizer, f"{role}_id")
            tok_cfg[f"{role}_token"] = tokenizer.id_to_token(token_id) if token_id is not None else None
    gen_cfg = dict(tokenizer.generation_config)
    if not gen_cfg:
        gen_cfg = {"bos_token_id": tokenizer.bos_id, "eos_token_id": _id_or_list(tokenizer.stop_ids),
                   "pad_token_id": tokenizer.pad_id}
    text = json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n"
    (folder / "tokenizer_config.json").write_text(text, encoding="utf-8")
    (folder / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2) + "\n", encoding="utf-8")
    if tokenizer.chat_template_file is not None:
        (folder / "chat_template.jinja").write_text(tokenizer.chat_template_file, encoding="utf-8")
    if tokenizer.named_templates:
        (folder / "additional_chat_templates").mkdir(exist_ok=True)
        for name, text in tokenizer.named_templates.items():
            (folder / "additional_chat_templates" / f"{name}.jinja").write_text(text, encoding="utf-8")


def _token_name(token) -> str | None:
    """A special token as tokenizer files write it: a string, a serialised AddedToken, or null."""
    token = token.get("content") if isinstance(token, dict) else token
    return token if isinstance(token, str) else None


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
