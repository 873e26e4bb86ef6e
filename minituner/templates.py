"""Prompt templates: how a conversation is written out as text for the model, and which parts of
that text it is trained to produce. This is the one place that decides what is trained.

A template renders a conversation into segments (text, trained, kind):
  trained  True for what the model must learn to write: every assistant message's content and
           the token that ends it (EOS, or the template's end-of-turn token, so that the model
           learns to stop). Everything else (system, user and tool text, role headers, BOS, the
           newline after an end-of-turn token) is prompt and is masked.
  kind     CONTENT  a message's text: encoded so that special-token strings written in it stay
                    plain text (a user typing "<|im_end|>" must not end the turn);
           MARKUP   the template's scaffolding: special-token strings in it are the control tokens;
           EOS      the tokenizer's end-of-sequence token, resolved to tokenizer.eos_id when
                    tokenised, so it is that exact id whatever its name (</s>, <|endoftext|>, ...).

Templates:
  alpaca  Stanford Alpaca's prompt ("### Instruction:" / "### Input:" / "### Response:"), a
          system message replacing its opening sentence; more turns add more blocks. Each
          response ends with EOS.
  chatml  <|im_start|>role\\n...<|im_end|>\\n (Qwen, SmolLM, many fine-tunes). A tool turn is role "tool".
  llama3  <|start_header_id|>role<|end_header_id|>\\n\\n...<|eot_id|>. A tool turn is role "ipython".
          No <|begin_of_text|> here: the BOS is the tokenizer's prefix_ids, added once.
  mistral [INST] user [/INST]answer</s> (Mistral Instruct, and the Llama 2 chat family without its
          <<SYS>> block): a system message opens the first user turn; a tool turn is a user turn.
          The answer ends with EOS; the BOS is the tokenizer's prefix_ids, added once.
  plain   The prompt's text, a newline, the response, EOS: the least scaffolding that works.

model   The model folder's own Jinja chat template (chat_template.jinja, or "chat_template" in
          tokenizer_config.json), rendered as transformers renders it: minituner/chat_template.py,
          which also derives what trains from the rendering. Instruct models' default.

`default_template` picks model when the folder has a chat template (one written by minituner, which
names its format in a Jinja comment, gives that format back); without one, chatml or llama3 if the
tokenizer has their special tokens, else alpaca (a base model such as GPT-2).

A tokenizer that lacks a template's special tokens is refused (check_template) rather than
extended: adding tokens means resizing the embedding and output layers and training new rows from
random initialisation, which a small fine-tune does badly and which makes the checkpoint differ in
shape from its base model. Pick a template the tokenizer has tokens for, e.g. alpaca.
"""

import json
import re
from typing import NamedTuple

from minituner.chat_template import compile_template, end_of_turn_ids, template_source, template_text
from minituner.errors import UserError
from minituner.formats import trains

CONTENT, MARKUP, EOS = "content", "markup", "eos"
TEMPLATES = ("alpaca", "chatml", "llama3", "mistral", "plain")  # minituner's own renderers
MODEL = "model"  # the model folder's own chat template
# Tokens each template's scaffolding needs, each as one token of the vocabulary.
SPECIAL_TOKENS = {"alpaca": (), "plain": (), "mistral": (), "chatml": ("<|im_start|>", "<|im_end|>"),
                  "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")}
# The token that ends an assistant turn; None: the tokenizer's EOS.
END_TOKEN = {"alpaca": None, "plain": None, "mistral": None, "chatml": "<|im_end|>", "llama3": "<|eot_id|>"}

ALPACA_INTRO = ("Below is an instruction that describes a task. "
                "Write a response that appropriately completes the request.")
ALPACA_INTRO_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides "
                           "further context. Write a response that appropriately completes the request.")


class Segment(NamedTuple):
    text: str  # "" for an EOS segment
    trained: bool  # the model learns to write it
    kind: str = CONTENT  # CONTENT, MARKUP or EOS: how it is tokenised (see the module docstring)


def render(conversation: list[dict], template: str) -> list[Segment]:
    """The segments of `conversation` written out in `template`."""
    if template not in RENDERERS:
        raise UserError(f'template "{template}" is not one of {", ".join(TEMPLATES)}')
    segments = []
    for segment in RENDERERS[template](conversation):
        _append(segments, segment)
    return segments


def _append(segments: list[Segment], segment: Segment) -> None:
    """Add `segment`, joined to the previous one when both tokenise alike, so that each piece of
    text is encoded in as few calls as possible (the same way at training and generation)."""
    if segment.kind != EOS and not segment.text:
        return
    last = segments[-1] if segments else None
    if last and segment.kind != EOS and (last.trained, last.kind) == (segment.trained, segment.kind):
        segments[-1] = Segment(last.text + segment.text, last.trained, last.kind)
    else:
        segments.append(segment)


def message_text(message: dict) -> str:
    """A message's text as minituner's templates write it: an Alpaca "input" after the instruction
    and a blank line; the functions a system message carries described after its text; an
    assistant's tool calls as JSON objects {"name": ..., "arguments": ...} on lines of their own."""
    text = message["content"] + ("\n\n" + message["input"] if message.get("input") else "")
    if message.get("tools") is not None:
        text = describe_tools(text, message["tools"])
    calls = [call.get("function", call) for call in message.get("tool_calls") or ()]
    lines = [json.dumps({"name": c.get("name"), "arguments": _decoded(c.get("arguments"))}, ensure_ascii=False)
             for c in calls]
    return "\n".join(([text] if text else []) + lines)


def _decoded(arguments):
    """Tool-call arguments as an object: OpenAI's data gives them as a JSON string."""
    try:
        return json.loads(arguments) if isinstance(arguments, str) else arguments
    except json.JSONDecodeError:
        return arguments


def describe_tools(system: str, tools: list) -> str:
    """`system` followed by a description of the callable functions, one JSON schema a line."""
    listing = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)
    intro = ('You can call these functions. To call one, answer with a JSON object '
             '{"name": <function name>, "arguments": <its arguments>}:\n')
    return (system + "\n\n" if system else "") + intro + listing


# ----------------------------------------------------------------------------- the templates
def _alpaca(conversation: list[dict]):
    messages = list(conversation)
    if messages and messages[0]["role"] == "system":
        intro = message_text(messages.pop(0))
    else:
        first_user = next((m for m in messages if m["role"] == "user"), {})
        intro = ALPACA_INTRO_WITH_INPUT if first_user.get("input") else ALPACA_INTRO
    yield Segment(intro, False, MARKUP)
    for message in messages:
        yield Segment("\n\n", False, MARKUP)
        if message["role"] == "user":
            yield Segment("### Instruction:\n", False, MARKUP)
            yield Segment(message["content"], False)
            if message.get("input"):
                yield Segment("\n\n### Input:\n", False, MARKUP)
                yield Segment(message["input"], False)
        elif message["role"] == "tool":
            yield Segment("### Tool output:\n", False, MARKUP)
            yield Segment(message["content"], False)
        else:
            yield Segment("### Response:\n", False, MARKUP)
            yield Segment(message_text(message), trains(message))
            yield Segment("", trains(message), EOS)


def _chatml(conversation: list[dict]):
    for message in conversation:
        trained = trains(message)
        yield Segment(f"<|im_start|>{message['role']}\n", False, MARKUP)
        yield Segment(message_text(message), trained)
        yield Segment("<|im_end|>", trained, MARKUP)
        yield Segment("\n", False, MARKUP)  # scaffolding before the next turn: not the model's to write


def _llama3(conversation: list[dict]):
    for message in conversation:
        trained = trains(message)
        role = "ipython" if message["role"] == "tool" else message["role"]
        yield Segment(f"<|start_header_id|>{role}<|end_header_id|>\n\n", False, MARKUP)
        yield Segment(message_text(message), trained)
        yield Segment("<|eot_id|>", trained, MARKUP)


def _mistral(conversation: list[dict]):
    messages = list(conversation)
    system = message_text(messages.pop(0)) + "\n\n" if messages and messages[0]["role"] == "system" else ""
    for message in messages:
        if message["role"] == "assistant":
            yield Segment(message_text(message), trains(message))
            yield Segment("", trains(message), EOS)
        else:  # the space goes with the text, where a tokenizer reading the whole string merges it
            yield Segment("[INST]", False, MARKUP)
            yield Segment(" " + system + message_text(message), False)
            yield Segment(" [/INST]", False, MARKUP)
            system = ""


def _plain(conversation: list[dict]):
    for message in conversation:
        if message["role"] == "assistant":
            yield Segment(message_text(message), trains(message))
            yield Segment("", trains(message), EOS)
        else:
            yield Segment(message_text(message), False)
            yield Segment("\n\n" if message["role"] == "system" else "\n", False, MARKUP)


RENDERERS = {"alpaca": _alpaca, "chatml": _chatml, "llama3": _llama3, "mistral": _mistral, "plain": _plain}


# ----------------------------------------------------------------------------- generation
def generation_prompt(conversation: list[dict], template: str) -> list[Segment]:
    """The segments a model continues to write the conversation's final answer: every message
    before it, then the assistant's header. A conversation that does not end with an assistant
    message is prompted for the next one."""
    if conversation and conversation[-1]["role"] == "assistant":
        conversation = conversation[:-1]
    # Render with a stand-in answer and cut where its text starts, so that the prompt ends with
    # exactly the header the template writes in training.
    segments = render(conversation + [{"role": "assistant", "content": "-"}], template)
    start = max(i for i, s in enumerate(segments) if s.trained and s.kind == CONTENT)
    return segments[:start]


def stop_ids(template: str, tokenizer) -> list[int]:
    """Token ids that end a generated answer: the template's end-of-turn token and the tokenizer's."""
    ids = set(tokenizer.stop_ids)
    if template == MODEL:
        ids |= end_of_turn_ids(tokenizer) | {tokenizer.eos_id}
    else:
        end = END_TOKEN[template]
        ids.add(tokenizer.token_to_id(end) if end else tokenizer.eos_id)
    return sorted(i for i in ids if i is not None)


# ----------------------------------------------------------------------------- the same, for Hugging Face
# Each template as a Jinja chat template, so that an exported model's apply_chat_template writes
# what it was trained on (checked against render() with transformers in tests/hf/test_hf_interop.py).
# Hugging Face messages have no Alpaca "input": a user message is its content.
_JINJA = {
    "chatml": ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
               "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"),
    "llama3": ("{% for message in messages %}{% set role = 'ipython' if message['role'] == 'tool' else message['role'] %}"
               "{{ '<|start_header_id|>' + role + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
               "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
               "{% endif %}"),
    "mistral": ("{% set ns = namespace(system='') %}{% for message in messages %}"
                "{% if message['role'] == 'system' %}{% set ns.system = message['content'] + '\\n\\n' %}"
                "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
                "{% else %}{{ '[INST] ' + ns.system + message['content'] + ' [/INST]' }}{% set ns.system = '' %}"
                "{% endif %}{% endfor %}"),
    "alpaca": ("{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}{% set rest = messages[1:] %}"
               "{% else %}{{ '" + ALPACA_INTRO + "' }}{% set rest = messages %}{% endif %}"
               "{% for message in rest %}{% if message['role'] == 'user' %}{{ '\\n\\n### Instruction:\\n' + message['content'] }}"
               "{% elif message['role'] == 'tool' %}{{ '\\n\\n### Tool output:\\n' + message['content'] }}"
               "{% else %}{{ '\\n\\n### Response:\\n' + message['content'] + eos_token }}{% endif %}{% endfor %}"
               "{% if add_generation_prompt %}{{ '\\n\\n### Response:\\n' }}{% endif %}"),
    "plain": ("{% for message in messages %}{% if message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
              "{% elif message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
              "{% else %}{{ message['content'] + '\\n' }}{% endif %}{% endfor %}"),
}


def chat_template(template: str, bos: bool) -> str:
    """`template` as a Jinja chat template for Hugging Face tokenizers; bos: start with the BOS
    token, as training does when the tokenizer adds one (Llama), since apply_chat_template
    adds no special tokens of its own. A Jinja comment names the template, for default_template."""
    return f"{{# minituner template: {template} #}}" + ("{{ bos_token }}" if bos else "") + _JINJA[template]


# ----------------------------------------------------------------------------- tokenizer checks
def _is_single_token(tokenizer, token: str) -> bool:
    token_id = tokenizer.token_to_id(token)
    return token_id is not None and tokenizer.encode(token, add_special_tokens=False) == [token_id]


def check_template(template: str, tokenizer) -> None:
    """A UserError if `tokenizer` cannot write `template`: a special token it lacks, or no EOS;
    for model, no chat template in the folder, or one that does not compile."""
    if template == MODEL:
        text = template_text(tokenizer)
        if text is None:
            raise UserError("--template model: the model folder has no chat template (chat_template.jinja, or "
                            f'"chat_template" in tokenizer_config.json); use one of {", ".join(TEMPLATES)}')
        compile_template(text, template_source(tokenizer))
        return
    if template not in RENDERERS:
        raise UserError(f'template "{template}" is not one of {MODEL}, {", ".join(TEMPLATES)}')
    for token in SPECIAL_TOKENS[template]:
        if not _is_single_token(tokenizer, token):
            raise UserError(f'the {template} template needs "{token}" as one token, and this tokenizer has none; '
                            "use the alpaca template (minituner does not add tokens to a model)")
    if END_TOKEN[template] is None and tokenizer.eos_id is None:
        raise UserError(f"the {template} template ends each response with the EOS token, and this tokenizer has "
                        "none; set eos_token in the model's tokenizer_config.json")


def default_template(tokenizer) -> str:
    """model if the folder has a chat template (the named format if minituner wrote it); else
    chatml if the tokenizer has ChatML's tokens, llama3 if it has Llama 3's, else alpaca."""
    own = template_text(tokenizer)
    named = re.match(r"\{# minituner template: (\w+) #\}", own) if own is not None else None
    if named and named[1] in RENDERERS:  # a model tuned here: the format it was tuned on
        return named[1]
    if own is not None:
        return MODEL
    if all(_is_single_token(tokenizer, t) for t in SPECIAL_TOKENS["chatml"]):
        return "chatml"
    if all(_is_single_token(tokenizer, t) for t in SPECIAL_TOKENS["llama3"]):
        return "llama3"
    return "alpaca"
