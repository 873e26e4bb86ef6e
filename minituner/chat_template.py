"""A model folder's own chat template: the Jinja program that Instruct models ship
(chat_template.jinja, or "chat_template" in tokenizer_config.json), run as transformers'
apply_chat_template runs it, so that training sees exactly the text every server will render
(transformers, vLLM, TGI, llama.cpp) and the loss mask shows which of its characters train.

Rendering. A sandboxed Jinja environment (jinja2's ImmutableSandboxedEnvironment: no access to
underscore attributes such as __class__ or __globals__, no mutation of the data passed in, no
loader, so no {% include %} of files), trim_blocks and lstrip_blocks, the loopcontrols
extension, and transformers' names: raise_exception, strftime_now (the run's start time, see
fix_clock), a tojson that keeps non-ASCII
text as it is, bos_token / eos_token / pad_token / unk_token, messages, tools, documents,
add_generation_prompt. Templates are programs from downloaded folders: anything one does wrong
(a syntax error, raise_exception, an unsafe attribute) is a one-line UserError naming it.

What trains (`spans`), as character ranges of the rendered text:
  1. a template with {% generation %} ... {% endgeneration %} blocks says it: their text trains;
  2. otherwise, for each assistant turn i, render the conversation up to it with
     add_generation_prompt=True (P) and through it (Q): the characters Q adds to P are the turn.
     Its content and its end-of-turn token train, nothing after that token (ChatML's "\n" before
     the next turn, an EOS some templates write after the last message only). The end-of-turn
     token is the special token the template writes right after a reply (found once by rendering
     a one-exchange conversation); a turn without it ends at its last special token, or without
     any, at its last non-space character. Where Q does not start with P (DeepSeek-R1's distills
     prompt with "<think>\n" but write past answers without it), the turn starts where they part,
     and such turns are counted.
  A template that writes a trained turn otherwise once later turns follow (the whole rendering
  does not start with Q up to the turn's end; e.g. reasoning dropped from past turns) is handled
  per turn: each assistant turn becomes its own example, the conversation up to it, with only
  that turn trained (the earlier answers marked "weight": 0).

Tokens. The rendered text is tokenised once, as apply_chat_template(..., tokenize=True) does
(add_special_tokens=False: the template writes BOS itself; special-token strings anywhere in the
text, message text included, become their control ids). A token is trained when its characters
overlap a trained span (transformers' assistant_masks rule): a token straddling a boundary, e.g.
"ĠParis" where the prompt ends in "Answer: " and the reply is "Paris", trains, and is counted.
"""

import json
import re
from contextvars import ContextVar
from datetime import datetime
from functools import lru_cache
from typing import NamedTuple

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from minituner.errors import UserError
from minituner.formats import trains

GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


# ----------------------------------------------------------------------------- the template's text
def template_text(tokenizer, tools: bool = False) -> str | None:
    """The model's own chat template, or None: chat_template.jinja (additional_chat_templates/
    tool_use.jinja for a conversation with tools, if there is one), else tokenizer_config.json's
    "chat_template" (a string, or a list of {"name", "template"}: "tool_use" for a conversation
    with tools if there is one, else "default"), as transformers picks it."""
    if tokenizer.chat_template_file is not None:
        if tools and "tool_use" in tokenizer.named_templates:  # additional_chat_templates/tool_use.jinja
            return tokenizer.named_templates["tool_use"]
        return tokenizer.chat_template_file
    own = tokenizer.tokenizer_config.get("chat_template")
    if own is None or isinstance(own, str):
        return own
    if not isinstance(own, list) or not all(isinstance(t, dict) and isinstance(t.get("template"), str) for t in own):
        raise UserError(f'{template_source(tokenizer)} should be a string or a list of '
                        '{"name": ..., "template": ...}')
    named = {t.get("name"): t["template"] for t in own}
    chosen = named.get("tool_use") if tools and "tool_use" in named else named.get("default")
    if chosen is None:
        raise UserError(f'{template_source(tokenizer)}: the templates are named {", ".join(map(str, named))}; '
                        'none is "default"')
    return chosen


def template_source(tokenizer) -> str:
    """Where the model's chat template comes from, for messages."""
    folder = f"{tokenizer.folder}/" if tokenizer.folder else ""
    if tokenizer.chat_template_file is not None:
        return folder + "chat_template.jinja"
    return folder + 'tokenizer_config.json "chat_template"'


# ----------------------------------------------------------------------------- the sandbox
# {% generation %} blocks record where their text lands; the record is per render (see render()).
_RECORD: ContextVar[dict | None] = ContextVar("generation_record", default=None)


class _GenerationBlocks(Extension):
    """{% generation %} ... {% endgeneration %}: renders its body and notes the characters it wrote."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_note"), [], [], body).set_lineno(lineno)

    def _note(self, caller):
        text = caller()
        record = _RECORD.get()
        if record is not None:  # the text already yielded ends where this block starts
            record["spans"].append((record["length"], record["length"] + len(text), text))
        return text


class _Namespace(jinja2.utils.Namespace):
    """namespace(...) without underscore names: {% set ns.__html__ = ... %} would have Jinja call
    what a template put there outside the sandbox's checks (transformers refuses them too)."""

    def __init__(*args, **kwargs):  # Jinja's signature trick: `self` may also be a keyword
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        super(_Namespace, self).__init__(attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)  # (a Namespace answers attribute lookups from its own items)
        super().__setitem__(name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a namespace attribute may not start with '_' ({name!r})")


def _dict(*args, **kwargs) -> dict:  # dict(...) without the type itself (its methods, its subclasses)
    return dict(*args, **kwargs)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes <, >, & and ' for HTML; chat templates want the plain JSON
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


# The time strftime_now reads; None: the clock. A run fixes it to its start (fix_clock), so that a
# template that writes the date (Llama 3's "Today Date: ...") renders the same text when it resumes.
_NOW: ContextVar[datetime | None] = ContextVar("template_now", default=None)


def fix_clock(when: datetime | None) -> None:
    """Make strftime_now read `when` from now on in this context (None: the clock again)."""
    _NOW.set(when)


def _strftime_now(fmt):
    return (_NOW.get() or datetime.now()).strftime(fmt)


@lru_cache(maxsize=8)
def compile_template(text: str, source: str = "chat template") -> jinja2.Template:
    """`text` compiled in the sandbox; a syntax error is a UserError naming `source` and the line."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlocks, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, namespace=_Namespace, dict=_dict)
    try:
        tree = env.parse(text)
    except jinja2.TemplateSyntaxError as e:
        raise UserError(f"{source}: line {e.lineno}: not a valid Jinja template ({_one_line(e.message)})") from None
    for node in tree.find_all((nodes.Include, nodes.Import, nodes.FromImport, nodes.Extends)):
        raise UserError(f"{source}: line {node.lineno}: refused, a chat template may not include, import or "
                        "extend other templates (it would read files)")
    try:
        return env.from_string(tree)
    except (jinja2.TemplateError, SyntaxError) as e:  # an unknown filter or test; {% break %} outside a loop
        raise UserError(f"{source}: not a valid Jinja template ({_one_line(e)})") from None


def special_tokens(tokenizer) -> dict[str, str]:
    """The special-token names a template may read ({{ bos_token }}), as transformers passes them:
    those the folder's tokenizer_config.json (or special_tokens_map.json) states; for a tokenizer
    made in Python, the tokens of its bos/eos/pad ids."""
    if tokenizer.special_names is not None:
        return {name: token for name, token in tokenizer.special_names.items() if token is not None}
    ids = {"bos_token": tokenizer.bos_id, "eos_token": tokenizer.eos_id, "pad_token": tokenizer.pad_id}
    return {name: tokenizer.id_to_token(i) for name, i in ids.items() if i is not None}


def render(tokenizer, messages: list[dict], *, tools: list | None = None, add_generation_prompt: bool = False,
           with_spans: bool = False):
    """The model's chat template applied to `messages` (Hugging Face form: see hf_messages):
    the text, or with_spans, (text, [(start, end)] of its {% generation %} blocks)."""
    source = template_source(tokenizer)
    template = compile_template(template_text(tokenizer, tools=tools is not None), source)
    variables = {**special_tokens(tokenizer), "messages": messages, "tools": tools, "documents": None,
                 "add_generation_prompt": add_generation_prompt}
    record = {"length": 0, "spans": []}
    token = _RECORD.set(record)
    try:
        chunks = []
        for chunk in template.generate(**variables):
            chunks.append(chunk)
            record["length"] += len(chunk)
    except jinja2.exceptions.SecurityError as e:
        raise UserError(f"{source}: refused, the template reached for something unsafe ({_one_line(e)})") from None
    except jinja2.TemplateError as e:
        raise UserError(f"{source}: the template refuses this conversation: {_one_line(e)}") from None
    except Exception as e:  # the template's own program failed (a type error in its expressions, ...)
        raise UserError(f"{source}: the template failed on this conversation ({type(e).__name__}: "
                        f"{_one_line(e)})") from None
    finally:
        _RECORD.reset(token)
    text = "".join(chunks)
    if not with_spans:
        return text
    for start, end, written in record["spans"]:
        if text[start:end] != written:  # a block inside a macro or a {% set %}: its place is unknown
            raise UserError(f"{source}: a {{% generation %}} block whose text is not written where it is rendered "
                            "(inside a macro or a set block); cannot tell which characters it marks")
    return text, [(start, end) for start, end, _ in record["spans"] if end > start]


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


# ----------------------------------------------------------------------------- conversations
_REASONING = ("reasoning_content", "thinking", "reasoning")  # a message's reasoning, by its names in data
def hf_messages(conversation: list[dict]) -> tuple[list[dict], list | None]:
    """(messages, tools) as transformers' apply_chat_template takes them, from a conversation as
    minituner/formats.py reads it: an Alpaca input joins its instruction; the function schemas a
    system message carries become `tools` (each {"type": "function", "function": schema}), and a
    system message that carried only them is left out (the template writes its own); an assistant
    message's tool calls stay "tool_calls", without a "content" when it has none; its reasoning is
    given as "reasoning_content" and "thinking" whichever name the data used."""
    messages, tools = [], None
    for message in conversation:
        out = {key: value for key, value in message.items()
               if key not in ("input", "tools", "weight") and value is not None}
        if message.get("input"):
            out["content"] = message["content"] + "\n\n" + message["input"]
        if message.get("tools") is not None:
            tools = [t if "function" in t or "type" in t else {"type": "function", "function": t}
                     for t in message["tools"]]
            if not message["content"]:
                continue
        if message.get("tool_calls") and not message.get("content"):
            out.pop("content", None)
        reasoning = next((out[k] for k in _REASONING if out.get(k) is not None), None)
        if reasoning is not None:  # under every name templates read it by, as transformers passes it
            out = {"thinking": reasoning, **out, "reasoning_content": reasoning}
        messages.append(out)
    return messages, tools


class TurnsRewritten(UserError):
    """The template writes an earlier turn otherwise once later turns follow: take the conversation per turn."""


class Rendering(NamedTuple):
    text: str  # the conversation as the template writes it
    spans: list[tuple[int, int]]  # the (start, end) characters that train
    unprompted: int  # turns whose generation prompt is not how the template starts them (see trained_text)
    unended: int  # turns with no special token after the reply: nothing teaches the model to stop


def trained_text(tokenizer, conversation: list[dict]) -> Rendering:
    """The conversation rendered by the model's template, with the characters that train (see the
    module docstring). Assistant messages marked "weight": 0 are context only. Raises
    TurnsRewritten when a trained turn is written otherwise once later turns follow."""
    messages, tools = hf_messages(conversation)
    if GENERATION_TAG.search(template_text(tokenizer, tools=tools is not None)):
        text, spans = render(tokenizer, messages, tools=tools, with_spans=True)
        if not spans:
            raise UserError(f"{template_source(tokenizer)}: its {{% generation %}} blocks mark nothing in this "
                            "conversation")
        return Rendering(text, spans, 0, 0)
    full, spans, unprompted, unended = render(tokenizer, messages, tools=tools), [], 0, 0
    end_token = _end_of_turn(tokenizer, tools)
    dropped = len(conversation) - len(messages)  # a leading system message that carried only tools
    for i, message in enumerate(messages):
        if not trains(conversation[i + dropped]):
            continue
        prompt = render(tokenizer, messages[:i], tools=tools, add_generation_prompt=True)
        through = render(tokenizer, messages[:i + 1], tools=tools) if i < len(messages) - 1 else full
        start = _common_prefix(prompt, through)
        unprompted += start < len(prompt)
        end, ended = _turn_end(tokenizer, through, start, end_token)
        unended += not ended
        if full[:end] != through[:end]:
            raise TurnsRewritten(f"{template_source(tokenizer)}: message {i + 1} is written otherwise once "
                                 "later turns follow")
        spans.append((start, end))
    return Rendering(full, spans, unprompted, unended)


def per_turn(conversation: list[dict]) -> list[list[dict]]:
    """One conversation per assistant turn: the conversation up to it, earlier answers untrained
    ("weight": 0, as OpenAI's fine-tuning format marks them)."""
    turns = [i for i, m in enumerate(conversation) if m["role"] == "assistant"]
    return [[{**m, "weight": 0} if m["role"] == "assistant" and i < end else m
             for i, m in enumerate(conversation[:end + 1])] for end in turns]


def _common_prefix(a: str, b: str) -> int:
    """The length of the longest common prefix of a and b."""
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def _turn_end(tokenizer, text: str, start: int, end_token: str | None) -> tuple[int, bool]:
    """(end, ended): where the trained part of the assistant turn text[start:] ends: after the
    template's end-of-turn token, its first in the turn; without one there, after the last special
    token; without any (ended False), at the turn's end less trailing whitespace."""
    if end_token is not None and text.find(end_token, start) >= 0:
        return text.find(end_token, start) + len(end_token), True
    ends = [m.end() for m in tokenizer.special_pattern.finditer(text, start)]
    return (ends[-1], True) if ends else (max(start, len(text.rstrip())), False)


_PROBE_REPLY = "Hello"
_END_OF_TURN: dict[tuple, str | None] = {}  # what _end_of_turn found, by template and special tokens


def _end_of_turn(tokenizer, tools) -> str | None:
    """The special token the template writes right after an assistant's reply (<|im_end|>,
    <|eot_id|>, </s>, <end_of_turn>, ...), found by rendering a one-exchange conversation; None
    if the template will not render one or writes no special token there."""
    key = (template_text(tokenizer, tools=tools is not None), tools is not None,
           tuple(special_tokens(tokenizer).items()), tokenizer.special_pattern.pattern)
    if key not in _END_OF_TURN:
        _END_OF_TURN[key] = _probe_end_of_turn(tokenizer, tools)
    return _END_OF_TURN[key]


def _probe_end_of_turn(tokenizer, tools) -> str | None:
    exchange = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE_REPLY}]
    for probe in (exchange, [{"role": "system", "content": "Be brief."}] + exchange):  # some templates need one
        try:
            prompt = render(tokenizer, probe[:-1], tools=tools, add_generation_prompt=True)
            text = render(tokenizer, probe, tools=tools)
        except UserError:
            continue
        reply = text.find(_PROBE_REPLY, _common_prefix(prompt, text))
        found = tokenizer.special_pattern.search(text, reply + len(_PROBE_REPLY)) if reply >= 0 else None
        return found.group() if found else None
    return None


def encode(tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[bool], int]:
    """(ids, trained, straddling): `text` tokenised as apply_chat_template does, each token trained
    if it overlaps a span, and how many trained tokens reach over a span's boundary."""
    ids, offsets = tokenizer.encode_with_offsets(text)
    trained, straddling = [], 0
    for start, end in offsets:
        # a token of no characters (a "▁" of its own, at times) goes with the character after it
        inside = [(s, e) for s, e in spans if (start < e and end > s if end > start else s <= start < e)]
        trained.append(bool(inside))
        straddling += any(start < s or end > e for s, e in inside)
    return ids, trained, straddling


def end_of_turn_ids(tokenizer) -> set[int]:
    """Id of the special token the template ends an assistant turn with; empty if none is found."""
    token = _end_of_turn(tokenizer, None)
    return {tokenizer.token_to_id(token)} if token is not None else set()
