"""Instruction datasets on disk -> conversations: the three record layouts people publish, read
into one shape, checked, and split into training and validation sets.

A conversation is a list of messages {"role": "system"|"user"|"assistant"|"tool", "content": str}.
A system message may only come first, and the last message is the assistant's (it is what is
trained). An Alpaca user message may also carry "input": str, kept apart so that the alpaca
template can print it under its own "### Input:" header; other templates join the two.

Layouts ("formats"), told apart by the first record's keys unless named:
  alpaca    {"instruction", "input"?, "output"}, with the column names of common variants:
            "response" for "output" (GPTeacher, Dolly), "context" for "input" (Dolly), an
            optional "system", and self-instruct's {"instruction", "instances": [{"input",
            "output"}, ...]}, which gives one conversation per instance.
  messages  {"messages": [{"role", "content"}, ...]} (OpenAI style). A content may be a list of
            typed parts [{"type": "text", "text": ...}]; its text parts are concatenated, as
            chat templates do. KTO data marks undesirable answers with "label": false; those
            records must not be imitated, so they are skipped and counted.
  sharegpt  {"conversations": [{"from", "value"}, ...], "system"?, "tools"?}. Tool-calling data
            (glaive, LLaMA-Factory) adds "function_call" (what the assistant writes: trained) and
            "observation" (what the tool answered: a masked "tool" turn). "tools" holds function
            schemas, often as a JSON-encoded string; they are described in the system message so
            that the model sees which functions exist.

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
    return [_checked("messages", [_in_item(f"messages[{i}]", _message, m) for i, m in enumerate(items)])]


def _message(item: dict) -> dict:
    role = _text(item, ("role",))
    if role not in ROLES:
        raise UserError(f'role "{role}" is not one of {", ".join(ROLES)}')
    if "content" not in item:
        raise UserError('field "content" is missing')
    content = item["content"]
    if isinstance(content, list):  # typed parts: only text can be trained on here
        content = "".join(_in_item(f"content[{i}]", _text_part, part) for i, part in enumerate(content))
    elif not isinstance(content, str):
        raise UserError(f'field "content" should be a string or a list of text parts, found {type_name(content)}')
    return {"role": role, "content": content}


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
    tools = _tool_list(record)
    if tools:  # the model can only call functions it was told about
        if turns[0]["role"] != "system":
            turns.insert(0, {"role": "system", "content": system})
        turns[0]["content"] = describe_tools(turns[0]["content"], tools)
    elif system:
        turns.insert(0, {"role": "system", "content": system})
    return [turns]


def _turn(item: dict) -> dict:
    speaker = _text(item, ("from",))
    if speaker not in SHAREGPT_ROLES:
        raise UserError(f'speaker "{speaker}" is not one of {", ".join(SHAREGPT_ROLES)}')
    return {"role": SHAREGPT_ROLES[speaker], "content": _text(item, ("value",), required=False)}


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
    if tools is not None and not isinstance(tools, list):
        raise UserError(f'field "tools" should be a list of function schemas, found {type_name(tools)}')
    return tools or []


def describe_tools(system: str, tools: list) -> str:
    """`system` followed by a description of the callable functions, one JSON schema a line."""
    listing = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)
    intro = ('You can call these functions. To call one, answer with a JSON object '
             '{"name": <function name>, "arguments": <its arguments>}:\n')
    return (system + "\n\n" if system else "") + intro + listing


def _checked(key: str, messages: list[dict]) -> list[dict]:
    """`messages` (read from record[key]) if they make a training conversation; else a UserError."""
    for i, message in enumerate(messages):
        if message["role"] == "system" and i > 0:
            raise UserError(f"{key}[{i}]: a system message may only come first")
        if message["role"] == "assistant" and not message["content"].strip():
            raise UserError(f"{key}[{i}]: the assistant's content is empty")
    if messages[-1]["role"] != "assistant":
        raise UserError(f'the last message is from "{messages[-1]["role"]}"; a training conversation '
                        "must end with the assistant's answer")
    return messages


CONVERTERS = {"alpaca": _alpaca, "messages": _messages, "sharegpt": _sharegpt}
