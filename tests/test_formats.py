import json

import pytest

from conftest import DATA
from minituner.datafile import split_validation
from minituner.errors import UserError
from minituner.formats import read_conversations
from minituner.templates import message_text


def raw(name):
    """The records of a tests/data file, read without minituner."""
    text = (DATA / name).read_text(encoding="utf-8")
    return json.loads(text) if name.endswith(".json") else [json.loads(line) for line in text.splitlines()]


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(*records):
    return "".join(json.dumps(r) + "\n" for r in records)


OK = {"instruction": "Add 2 and 2.", "output": "4"}


# ----------------------------------------------------------------------------- the real files
def test_alpaca_files_read_instruction_input_and_output():
    conversations, report = read_conversations(DATA / "llamafactory_identity.json")
    assert (report["format"], report["records"], report["conversations"], report["warnings"]) == ("alpaca", 4, 4, [])
    for record, conversation in zip(raw("llamafactory_identity.json"), conversations):
        assert conversation == [{"role": "user", "content": record["instruction"]},
                                {"role": "assistant", "content": record["output"]}]  # input "" is left out


def test_gpteacher_response_column_and_input():
    conversations, report = read_conversations(DATA / "gpteacher_codegen_instruct.json")
    assert report["format"] == "alpaca"
    for record, (user, answer) in zip(raw("gpteacher_codegen_instruct.json"), conversations):
        assert answer == {"role": "assistant", "content": record["response"]}
        assert user["content"] == record["instruction"] and user.get("input", "") == record["input"]
    assert "input" not in conversations[2][0]  # the record with an empty input


def test_self_instruct_gives_one_conversation_per_instance(tmp_path):
    conversations, report = read_conversations(DATA / "self_instruct_seed_tasks.jsonl")
    records = raw("self_instruct_seed_tasks.jsonl")
    assert report["conversations"] == len(records) == 4
    assert [c[-1]["content"] for c in conversations] == [r["instances"][0]["output"] for r in records]
    two = dict(records[1], instances=[{"input": "a", "output": "b"}, {"input": "", "output": "c"}])
    conversations, _ = read_conversations(write(tmp_path, "tasks.jsonl", jsonl(two)))
    assert [(c[0].get("input"), c[1]["content"]) for c in conversations] == [("a", "b"), (None, "c")]


def test_dolly_columns_and_a_system_field(tmp_path):
    record = {"instruction": "Summarise.", "context": "A long text.", "response": "Short.", "system": "Be brief."}
    conversations, _ = read_conversations(write(tmp_path, "dolly.jsonl", jsonl(record)))
    assert conversations == [[{"role": "system", "content": "Be brief."},
                              {"role": "user", "content": "Summarise.", "input": "A long text."},
                              {"role": "assistant", "content": "Short."}]]


def test_sharegpt_multi_turn():
    conversations, report = read_conversations(DATA / "fastchat_dummy_conversation.json")
    assert report["format"] == "sharegpt"
    for record, conversation in zip(raw("fastchat_dummy_conversation.json"), conversations):
        roles = {"human": "user", "gpt": "assistant"}
        assert conversation == [{"role": roles[t["from"]], "content": t["value"]} for t in record["conversations"]]
    assert [len(c) for c in conversations] == [4, 2, 6]


def test_sharegpt_tool_calls_and_tool_list():
    conversations, _ = read_conversations(DATA / "llamafactory_glaive_toolcall_en_demo.json")
    records = raw("llamafactory_glaive_toolcall_en_demo.json")
    system, *turns = conversations[0]
    assert [t["role"] for t in turns] == ["user", "assistant", "tool", "assistant"]  # function_call, observation
    call = json.loads(records[0]["conversations"][1]["value"])
    assert turns[1] == {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": call}]}
    # minituner's own templates write the call and the other turns as the record's text
    assert [message_text(t) for t in turns] == [t["value"] for t in records[0]["conversations"]]
    assert system == {"role": "system", "content": "", "tools": json.loads(records[0]["tools"])}
    for tool in json.loads(records[0]["tools"]):
        assert json.dumps(tool) in message_text(system)
    assert records[2]["tools"] == "[]" and conversations[2][0]["role"] == "user"  # no tools: no system message


def test_messages_with_tools_and_tool_calls(tmp_path):
    """OpenAI-style tool use: record-level tools, an assistant message with tool_calls and no content."""
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    call = {"type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}
    messages = [{"role": "user", "content": "1+2?"}, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "content": "3", "name": "add"}, {"role": "assistant", "content": "3"}]
    conversations, _ = read_conversations(write(tmp_path, "t.jsonl", jsonl({"messages": messages, "tools": tools})))
    assert conversations[0] == [{"role": "system", "content": "", "tools": tools}, messages[0],
                                {"role": "assistant", "content": "", "tool_calls": [call]}, messages[2], messages[3]]
    bad = [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [{"function": {}}]},
           {"role": "assistant", "content": "y"}]
    with pytest.raises(UserError, match=r'b\.jsonl:1: messages\[1\]: tool_calls\[0\]: field "name" is missing'):
        read_conversations(write(tmp_path, "b.jsonl", jsonl({"messages": bad})))


def test_messages_skip_undesirable_answers():
    conversations, report = read_conversations(DATA / "llamafactory_kto_en_demo.json")
    records = raw("llamafactory_kto_en_demo.json")
    wanted = [r["messages"] for r in records if r["label"]]
    assert conversations == wanted and len(wanted) == 2 and len(wanted[1]) == 6
    assert (report["format"], report["records"], report["skipped_undesirable"]) == ("messages", 3, 1)
    assert report["warnings"] == [f'{DATA}/llamafactory_kto_en_demo.json: skipped 1 record(s) with "label": false '
                                  "(undesirable answers)"]


def test_typed_content_parts_are_joined(tmp_path):
    record = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
                           {"role": "assistant", "content": "Hello."}]}
    conversations, _ = read_conversations(write(tmp_path, "chat.jsonl", jsonl(record)))
    assert conversations[0][0] == {"role": "user", "content": "Hi there"}
    record["messages"][0]["content"].append({"type": "image_url", "image_url": "x.png"})
    with pytest.raises(UserError, match=r'chat\.jsonl:1: messages\[0\]: content\[2\]: part of type "image_url"'):
        read_conversations(write(tmp_path, "chat.jsonl", jsonl(record)))


# ----------------------------------------------------------------------------- detection
def test_json_lines_and_arrays_are_told_apart_by_content(tmp_path):
    as_lines = write(tmp_path, "data.json", jsonl(OK, OK))  # a .json file holding JSON lines
    as_array = write(tmp_path, "data.jsonl", json.dumps([OK, OK], indent=2))
    one_object = write(tmp_path, "one.json", json.dumps(OK, indent=2))
    for path, count in ((as_lines, 2), (as_array, 2), (one_object, 1)):
        conversations, report = read_conversations(path)
        assert report["format"] == "alpaca" and len(conversations) == count


def test_format_is_detected_or_named(tmp_path):
    path = write(tmp_path, "data.jsonl", jsonl({"question": "q", "answer": "a"}))
    with pytest.raises(UserError, match=r'data\.jsonl:1: cannot tell the data format from its keys \("question", "answer"\)'):
        read_conversations(path)
    path = write(tmp_path, "data.jsonl", jsonl(OK))
    with pytest.raises(UserError, match=r'data\.jsonl:1: field "messages" is missing'):
        read_conversations(path, format="messages")
    with pytest.raises(UserError, match='data format "chatml" is not one of auto, alpaca'):
        read_conversations(path, format="chatml")


# ----------------------------------------------------------------------------- malformed records
@pytest.mark.parametrize("record, message", [
    ({"instruction": "x"}, r'data\.jsonl:2: field "output" \(or "response"\) is missing'),
    ({"instruction": "x", "output": ""}, r'data\.jsonl:2: field "output" is empty'),
    ({"instruction": "x", "output": 4}, r'data\.jsonl:2: field "output" should be a string, found a number'),
    ({"instruction": ["x"], "output": "y"}, r'data\.jsonl:2: field "instruction" should be a string, found a list'),
    ({"instruction": "x", "instances": [{"input": "y"}]}, r'data\.jsonl:2: instances\[0\]: field "output" .* is missing'),
    ([1, 2], r"data\.jsonl:2: expected a JSON object, found a list"),
])
def test_malformed_alpaca_records_name_line_and_field(tmp_path, record, message):
    with pytest.raises(UserError, match=message):
        read_conversations(write(tmp_path, "data.jsonl", jsonl(OK, record)))


@pytest.mark.parametrize("messages, message", [
    ([{"role": "robot", "content": "x"}], r'record 2: messages\[0\]: role "robot" is not one of system, user, assistant, tool'),
    ([{"role": "user", "content": 3}], r'record 2: messages\[0\]: field "content" should be a string or a list'),
    ([{"role": "user"}], r'record 2: messages\[0\]: field "content" is missing'),
    ([{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}],
     r'record 2: the last message is from "user"; a training conversation must end with the assistant'),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, {"role": "assistant", "content": "c"}],
     r"record 2: messages\[1\]: a system message may only come first"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": " "}], r"record 2: messages\[1\]: the assistant's content is empty"),
])
def test_malformed_messages_records_name_record_and_field(tmp_path, messages, message):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path = write(tmp_path, "chat.json", json.dumps([good, {"messages": messages}]))
    with pytest.raises(UserError, match=r"chat\.json: " + message):
        read_conversations(path)


def test_malformed_sharegpt_records(tmp_path):
    turns = [{"from": "human", "value": "hi"}, {"from": "bot", "value": "hello"}]
    with pytest.raises(UserError, match=r'sg\.jsonl:1: conversations\[1\]: speaker "bot" is not one of human'):
        read_conversations(write(tmp_path, "sg.jsonl", jsonl({"conversations": turns})))
    turns[1]["from"] = "gpt"
    with pytest.raises(UserError, match=r'sg\.jsonl:1: field "tools" is a string but not JSON'):
        read_conversations(write(tmp_path, "sg.jsonl", jsonl({"conversations": turns, "tools": "[{"})))


def test_invalid_json_names_line_and_column(tmp_path):
    with pytest.raises(UserError, match=r"data\.jsonl:2: invalid JSON at column 17"):
        read_conversations(write(tmp_path, "data.jsonl", jsonl(OK) + '{"instruction": ,}\n'))
    with pytest.raises(UserError, match=r"data\.json: invalid JSON at line 3, column 1"):
        read_conversations(write(tmp_path, "data.json", '[\n  {"instruction": "a", "output": "b"},\n]'))


def test_unreadable_files(tmp_path):
    with pytest.raises(UserError, match=r"empty\.json: empty file"):
        read_conversations(write(tmp_path, "empty.json", " \n"))
    with pytest.raises(UserError, match=r"none\.json: no usable record \(0 read"):
        read_conversations(write(tmp_path, "none.json", "[]"))
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(jsonl(OK).encode() + '{"instruction": "café", "output": "x"}\n'.encode("latin-1"))
    with pytest.raises(UserError, match=r"latin1\.jsonl:2: not UTF-8 \(byte 0xe9\); convert the file"):
        read_conversations(path)
    with pytest.raises(UserError, match=r"missing\.json: no such file"):
        read_conversations(tmp_path / "missing.json")


def test_skip_bad_counts_and_quotes_the_first_reasons(tmp_path):
    lines = jsonl(OK, {"instruction": "x"}) + "not json\n" + jsonl(OK, {"instruction": "x", "output": ""}, [1], {"output": "y"})
    conversations, report = read_conversations(write(tmp_path, "data.jsonl", lines), skip_bad=True)
    assert len(conversations) == 2 and (report["records"], report["skipped_bad"]) == (7, 5)
    assert report["reasons"] == [f'{tmp_path}/data.jsonl:2: field "output" (or "response") is missing',
                                 f"{tmp_path}/data.jsonl:3: invalid JSON at column 1: Expecting value",
                                 f'{tmp_path}/data.jsonl:5: field "output" is empty']
    assert report["warnings"] == [f"{tmp_path}/data.jsonl: skipped 5 malformed record(s) ({'; '.join(report['reasons'])})"]
    with pytest.raises(UserError, match=r"no usable record \(2 read, 2 malformed"):
        read_conversations(write(tmp_path, "bad.jsonl", jsonl({"instruction": "x"}, [])), skip_bad=True)


# ----------------------------------------------------------------------------- validation split
def test_validation_split_is_deterministic_and_disjoint():
    items = list(range(50))
    train, val = split_validation(items, 0.2, seed=3)
    assert (train, val) == split_validation(items, 0.2, seed=3)
    assert len(val) == 10 and sorted(train + val) == items and not set(train) & set(val)
    assert train == sorted(train) and val == sorted(val)  # order kept
    assert split_validation(items, 0.2, seed=4)[1] != val


def test_validation_split_edges():
    assert split_validation([1, 2, 3], 0.0, seed=0) == ([1, 2, 3], [])
    train, val = split_validation([1, 2, 3], 0.01, seed=0)  # rounds to 0: one is held out anyway
    assert len(val) == 1 and len(train) == 2
    with pytest.raises(UserError, match="holding out 1 of 1 examples for validation leaves none to train on"):
        split_validation([1], 0.9, seed=0)
    with pytest.raises(UserError, match="val_fraction 1.5: must be at least 0 and below 1"):
        split_validation([1, 2], 1.5, seed=0)


def test_the_first_bad_record_is_the_one_reported(tmp_path):
    lines = jsonl(OK, {"instruction": "x"}) + "not json\n"
    with pytest.raises(UserError, match=r"data\.jsonl:2: field \"output\""):
        read_conversations(write(tmp_path, "data.jsonl", lines))


def test_an_alpaca_label_column_is_data_not_a_kto_signal(tmp_path):
    records = [{"instruction": "Is it spam?", "input": "Win now", "output": "yes", "label": False}, OK]
    conversations, report = read_conversations(write(tmp_path, "data.jsonl", jsonl(*records)))
    assert len(conversations) == 2 and report["skipped_undesirable"] == 0


def test_format_detection_reports_the_first_bad_record_or_skips_it(tmp_path):
    lines = "{bad\n" + jsonl({"foo": "a"}, OK)
    with pytest.raises(UserError, match=r"data\.jsonl:1: invalid JSON"):
        read_conversations(write(tmp_path, "data.jsonl", lines))
    conversations, report = read_conversations(write(tmp_path, "data.jsonl", lines), skip_bad=True)
    assert len(conversations) == 1 and report["format"] == "alpaca" and report["skipped_bad"] == 2


def test_openai_weight_marks_answers_as_context(tmp_path):
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 0},
                {"role": "user", "content": "c"}, {"role": "assistant", "content": "d", "weight": 1}]
    conversations, _ = read_conversations(write(tmp_path, "w.jsonl", jsonl({"messages": messages})))
    assert conversations[0] == messages
    for weight, message in ((2, "should be 0 or 1, found 2"), (True, "should be 0 or 1, found true")):
        bad = [messages[0], {**messages[1], "weight": weight}, messages[3]]
        with pytest.raises(UserError, match=rf'b\.jsonl:1: messages\[1\]: field "weight" {message}'):
            read_conversations(write(tmp_path, "b.jsonl", jsonl({"messages": bad})))
    with pytest.raises(UserError, match='z.jsonl:1: every assistant message has "weight": 0'):
        read_conversations(write(tmp_path, "z.jsonl", jsonl({"messages": [messages[0], messages[1]]})))
