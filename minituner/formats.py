"""Instruction datasets on disk -> conversations: the three record layouts people publish, read
into one shape, checked, and split into training and validation sets.

A conversation is a list of messages {"role": "system"|"user"|"assistant"|"tool", "content": str}.
A system message may only come first, and the last message is the assistant's (it is what is
trained). An Alpaca user message may also carry "input": str, kept apart so that the alpaca
template can print it under its own "### Input:" header; other templates join the two.
Tool use, in transformers' shapes: the function schemas a record offers ride on its first
message, a system message ("tools": [schema, ...]; its content "" if the record had no system
text); an assistant message that calls functions has "tool_calls": [{"type": "function",
"function": {"name", "arguments"}}] (its content may be ""); a tool's reply is a "tool" message.
A model's own chat template receives them as apply_chat_template does (tools=..., tool_calls);
minituner's templates write them as text (templates.message_text).

Layouts ("formats"), told apart by the first record's keys unless named:
  alpaca    {"instruction", "input"?, "output"}, with the column names of common variants:
            "response" for "output" (GPTeacher, Dolly), "context" for "input" (Dolly), an
            optional "system", and self-instruct's {"instruction", "instances": [{"input",
            "output"}, ...]}, which gives one conversation per instance.
  messages  {"messages": [{"role", "content"}, ...], "tools"?} (OpenAI style). A content may be a
            list of typed parts [{"type": "text", "text": ...}]; its text parts are concatenated,
            as chat templates do. An assistant message may carry "tool_calls" (then its content
            may be empty or null) and "weight": 0 (OpenAI's mark of an answer that is context,
            not trained); other fields ("reasoning_content", a tool's "name" and "tool_call_id")
            are kept for a model's own chat template. KTO data marks
            undesirable answers with "label": false; those records must not be imitated, so
            they are skipped and counted.
  sharegpt  {"conversations": [{"from", "value"}, ...], "system"?, "tools"?}. Tool-calling data
            (glaive, LLaMA-Factory) adds "function_call" (what the assistant writes: trained; a
            JSON {"name", "arguments"} becomes a tool call) and "observation" (what the tool
            answered: a masked "tool" turn). "tools" holds function schemas, often as a
            JSON-encoded string.

A file is a JSON array or JSON lines; which one is decided by its content, since `.json` files
often hold JSON lines. Errors name the file and the JSONL line (or the array's record number).
"""

import json
from pathlib import Path

from minituner.datafile import json_records, note_skip, read_text, type_name
from minituner.errors import UserError

ROLES = ("system", "user", "assistant", "tool")
FORMATS = ("alpaca", "messages", "sharegpt")
# ShareGPT speaker names -> roles. function_call is the assistant calling a tool; observation is
# the tool's reply, which the model must read but not learn to write.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "function_call": "assistant", "observation": "tool", "tool": "tool"}


def _new_report(path, fmt: str, records: int) -> dict:
    """What reading one file gave; "warnings" holds the lines worth printing (none if all was read)."""
    return {"path": str(path), "format": fmt, "records": records,  # records in the file
            "conversations": 0,  # conversations read (self-instruct gives one per instance)
            "skipped_bad": 0,  # malformed records skipped with skip_bad=True
            "skipped_undesirable": 0,  # records with "label": false
            "reasons": [],  # the first few skipped (datafile.MAX_REASONS), with their place
            "warnings": []}


def _warnings(report: dict) -> list[str]:
    """One line per kind of skipped record, naming the file and quoting the first reasons."""
    lines = []
    if report["skipped_bad"]:
        lines.append(f"{report['path']}: skipped {report['skipped_bad']} malformed record(s) "
                     f"({'; '.join(report['reasons'])})")
    if report["skipped_undesirable"]:
        lines.append(f"{report['path']}: skipped {report['skipped_undesirable']} record(s) with "
                     '"label": false (undesirable answers)')
    return lines


# ----------------------------------------------------------------------------- reading the file
def read_conversations(path, format: str = "auto", skip_bad: bool = False) -> tuple[list, dict]:
    """Conversations of the dataset file at `path`, and a report: counts, the first skip reasons,
    and "warnings", the lines to print about skipped records.

    format: "auto" (from the first record's keys) or one of FORMATS. skip_bad: skip and count
    malformed records instead of raising a UserError on the first one.
    """
    if format != "auto" and format not in FORMATS:
        raise UserError(f'data format "{format}" is not one of auto, {", ".join(FORMATS)}')
    path = Path(path)
    records = json_records(path, read_text(path, "a JSON or JSONL file of Alpaca, messages or ShareGPT records"))
    fmt = format if format != "auto" else _detect(records, skip_bad)
    report = _new_report(path, fmt, len(records))
    conversations = []
    for where, record in records:
        try:
            conversations += _convert(fmt, record)
        except UserError as e:
            if not skip_bad:
                raise UserError(f"{where}: {e}") from None
            note_skip(report, f"{where}: {e}")
        except _Undesirable:
            report["skipped_undesirable"] += 1
    if not conversations:
        raise UserError(f"{path}: no usable record ({report['records']} read, {report['skipped_bad']} malformed, "
                        f'{report["skipped_undesirable"]} with "label": false)')
    report["conversations"], report["warnings"] = len(conversations), _warnings(report)
    return conversations, report


def _detect(records: list, skip_bad: bool) -> str:
    """The format of the first record that shows one; without skip_bad, the first record decides
    (a bad first record is the first error reported, as elsewhere)."""
    for where, record in records:
        try:
            if isinstance(record, UserError):
                raise record
            if not isinstance(record, dict):
                raise UserError(f"expected a JSON object, found {type_name(record)}")
            return detect_format(where, record)
        except UserError as e:
            if not skip_bad:
                raise UserError(e.args[0] if str(e).startswith(where) else f"{where}: {e}") from None
    return FORMATS[0]  # nothing readable: every record is counted as skipped, and that is the error


class _Undesirable(Exception):
    """A KTO record whose answer is marked "label": false: not to be imitated."""


def _convert(fmt: str, record) -> list[list[dict]]:
    """The conversations of one record; a UserError (without its place) if it is malformed."""
    if isinstance(record, UserError):  # a JSONL line that did not parse
        raise record
    if not isinstance(record, dict):
        raise UserError(f"expected a JSON object, found {type_name(record)}")
    if fmt != "alpaca" and record.get("label", True) is False:  # KTO data is chat data; an Alpaca "label" is a column
        raise _Undesirable
    return CONVERTERS[fmt](record)


def detect_format(where: str, record: dict) -> str:
    """The format of a dataset, from the keys of its first record."""
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record:
        return "alpaca"
    keys = ", ".join(f'"{k}"' for k in record) or "none"
    raise UserError(f'{where}: cannot tell the data format from its keys ({keys}); expected "instruction" '
                    '(alpaca), "messages" or "conversations" (sharegpt), or name the format explicitly')


# ----------------------------------------------------------------------------- fields
def _text(record: dict, names: tuple[str, ...], required: bool = True) -> str:
    """The string under the first of `names` present in `record`; "" for an absent optional field.

    A required field must be a non-empty string; an optional one may be empty, absent or null.
    """
    name = next((n for n in names if n in record), None)
    shown = f'"{names[0]}"' + "".join(f' (or "{n}")' for n in names[1:])
    value = record.get(name) if name else None
    if value is None and not required:
        return ""
    if name is None:
        raise UserError(f"field {shown} is missing")
    if not isinstance(value, str):
        raise UserError(f'field "{name}" should be a string, found {type_name(value)}')
    if required and not value.strip():
        raise UserError(f'field "{name}" is empty')
    return value


def _list(record: dict, name: str) -> list:
    if name not in record:
        raise UserError(f'field "{name}" is missing')
    value = record[name]
    if not isinstance(value, list):
        raise UserError(f'field "{name}" should be a list, found {type_name(value)}')
    if not value:
        raise UserError(f'field "{name}" is empty')
    return value


def _in_item(prefix: str, read, item):
    """read(item), with errors about `item` prefixed by its place, e.g. `messages[2]: ...`."""
    if not isinstance(item, dict):
        raise UserError(f"{prefix}: expected an object, found {type_name(item)}")
    try:
        return read(item)
    except UserError as e:
        raise UserError(f"{prefix}: {e}") from None


# ----------------------------------------------------------------------------- formats
def _alpaca(record: dict) -> list[list[dict]]:
    instruction = _text(record, ("instruction",))
    system = _text(record, ("system",), required=False)
    if "instances" in record:  # self-instruct: one task, several input/output pairs
        pairs = [_in_item(f"instances[{i}]", _alpaca_pair, item) for i, item in enumerate(_list(record, "instances"))]
    else:
        pairs = [_alpaca_pair(record)]
    conversations = []
    for input_text, output in pairs:
        user = {"role": "user", "content": instruction}
        if input_text:
            user["input"] = input_text
        head = [{"role": "system", "content": system}] if system else []
        conversations.append(head + [user, {"role": "assistant", "content": output}])
    return conversations


def _alpaca_pair(record: dict) -> tuple[str, str]:
    return _text(record, ("input", "context"), required=False), _text(record, ("output", "response"))


def _messages(record: dict) -> list[list[dict]]:
    label = record.get("label", True)
    if not isinstance(label, bool):
        raise UserError(f'field "label" should be true or false, found {type_name(label)}')
    items = _list(record, "messages")
    messages = [_in_item(f"messages[{i}]", _message, m) for i, m in enumerate(items)]
    return [_checked("messages", _with_tools(messages, "", _tool_list(record)))]


def _message(item: dict) -> dict:
    role = _text(item, ("role",))
    if role not in ROLES:
        raise UserError(f'role "{role}" is not one of {", ".join(ROLES)}')
    calls = item.get("tool_calls") if role == "assistant" else None
    if calls is not None and (not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls)):
        raise UserError(f'field "tool_calls" should be a list of objects, found {type_name(calls)}')
    if "content" not in item and not calls:
        raise UserError('field "content" is missing')
    content = item.get("content")
    if isinstance(content, list):  # typed parts: only text can be trained on here
        content = "".join(_in_item(f"content[{i}]", _text_part, part) for i, part in enumerate(content))
    elif content is None and calls:
        content = ""
    elif not isinstance(content, str):
        raise UserError(f'field "content" should be a string or a list of text parts, found {type_name(content)}')
    weight = item.get("weight", 1)
    if role == "assistant" and (weight not in (0, 1) or isinstance(weight, bool)):
        raise UserError(f'field "weight" should be 0 or 1, found {json.dumps(weight)}')
    # every other field (reasoning_content, name, tool_call_id, ...) goes to a model's own chat
    # template as transformers passes it; null ones are left out, as transformers does ("input" and
    # "tools" mean something else inside a conversation: see the module docstring)
    kept = {k: v for k, v in item.items() if v is not None and k not in ("input", "tools")}
    message = {**kept, "role": role, "content": content}
    if calls:
        message["tool_calls"] = [_in_item(f"tool_calls[{i}]", _tool_call, c) for i, c in enumerate(calls)]
    return message


def _tool_call(call: dict) -> dict:
    """A tool call in OpenAI's shape {"type": "function", "function": {"name", "arguments"}}, as
    given; a bare {"name", "arguments"} is wrapped."""
    if "function" not in call:
        call = {"type": "function", "function": call}
    if not isinstance(call["function"], dict):
        raise UserError(f'field "function" should be an object, found {type_name(call["function"])}')
    _text(call["function"], ("name",))
    return call


def _text_part(part: dict) -> str:
    if part.get("type") != "text":
        raise UserError(f'part of type {json.dumps(part.get("type"))}: only "text" parts are supported')
    return _text(part, ("text",), required=False)


def _sharegpt(record: dict) -> list[list[dict]]:
    items = _list(record, "conversations")
    turns = _checked("conversations", [_in_item(f"conversations[{i}]", _turn, t) for i, t in enumerate(items)])
    system = _text(record, ("system",), required=False)
    if system and turns[0]["role"] == "system":
        raise UserError('both a "system" field and a system turn: keep one')
    return [_with_tools(turns, system, _tool_list(record))]


def _with_tools(messages: list[dict], system: str, tools: list) -> list[dict]:
    """`messages` opened by a system message (theirs, or one of `system` text) carrying `tools`, the
    function schemas the model may call; unchanged if both are empty."""
    if not tools and not system:
        return messages
    if messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}] + messages
    return [{**messages[0], "tools": tools} if tools else messages[0]] + messages[1:]


def _turn(item: dict) -> dict:
    speaker = _text(item, ("from",))
    if speaker not in SHAREGPT_ROLES:
        raise UserError(f'speaker "{speaker}" is not one of {", ".join(SHAREGPT_ROLES)}')
    value = _text(item, ("value",), required=False)
    if speaker == "function_call":  # {"name": ..., "arguments": ...}: a tool call, if it reads as one
        try:
            call = json.loads(value)
        except json.JSONDecodeError:
            call = None
        if isinstance(call, dict) and isinstance(call.get("name"), str) and "arguments" in call:
            return {"role": "assistant", "content": "", "tool_calls": [_tool_call(call)]}
    return {"role": SHAREGPT_ROLES[speaker], "content": value}


def _tool_list(record: dict) -> list:
    """The function schemas of record["tools"]: a list, or a JSON string of one ("[]" is none)."""
    tools = record.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools) if tools.strip() else []
        except json.JSONDecodeError as e:
            raise UserError(f'field "tools" is a string but not JSON ({e.msg} at column {e.colno})') from None
    if isinstance(tools, dict):
        tools = [tools]
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise UserError(f'field "tools" should be a list of function schemas, found {type_name(tools)}')
    return tools or []


def trains(message: dict) -> bool:
    """Whether a message is trained: an assistant's, unless marked "weight": 0 (context only)."""
    return message["role"] == "assistant" and message.get("weight", 1) != 0


def _checked(key: str, messages: list[dict]) -> list[dict]:
    """`messages` (read from record[key]) if they make a training conversation; else a UserError."""
    for i, message in enumerate(messages):
        if message["role"] == "system" and i > 0:
            raise UserError(f"{key}[{i}]: a system message may only come first")
        if message["role"] == "assistant" and not message["content"].strip() and not message.get("tool_calls"):
            raise UserError(f"{key}[{i}]: the assistant's content is empty")
    if not any(trains(m) for m in messages):
        raise UserError('every assistant message has "weight": 0; a training conversation needs one to train')
    if messages[-1]["role"] != "assistant":
        raise UserError(f'the last message is from "{messages[-1]["role"]}"; a training conversation '
                        "must end with the assistant's answer")
    return messages


CONVERTERS = {"alpaca": _alpaca, "messages": _messages, "sharegpt": _sharegpt}
