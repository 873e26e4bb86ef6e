"""Training in the model's own chat template renders and tokenises exactly as transformers'
apply_chat_template does, and trains exactly the assistant replies with their end tokens.
transformers is the oracle here (the dev extra installs it); the templates are shaped like those
Instruct models ship (tests/fixtures/chat_templates/)."""

import json
import re
from itertools import groupby

import pytest

from conftest import CHAT_TEMPLATES, DATA, chat_folder, sentencepiece_like
from minituner import chat_template
from minituner.errors import UserError
from minituner.formats import read_conversations
from minituner.hf.tokenizer import load_tokenizer
from minituner.sft import build_examples, prompt_ids
from minituner.templates import MODEL, default_template

transformers = pytest.importorskip("transformers")

SYSTEM = {"role": "system", "content": "Be kind."}
CONVERSATIONS = {  # words the tokenizer merges with their leading space, so a split space would show
    "single": [{"role": "user", "content": "the king"}, {"role": "assistant", "content": "the lord"}],
    "system": [SYSTEM, {"role": "user", "content": "the king"}, {"role": "assistant", "content": "the lord"}],
    "multi": [{"role": "user", "content": "the king"}, {"role": "assistant", "content": "the lord"},
              {"role": "user", "content": "and the king?"}, {"role": "assistant", "content": "And the lord."}],
}


def trained_pieces(example: dict, tokenizer) -> list[str]:
    """The text of each run of trained tokens."""
    runs = groupby(zip(example["input_ids"], example["labels"]), key=lambda pair: pair[1] != -100)
    return [tokenizer.decode([t for t, _ in run], skip_special_tokens=False) for trained, run in runs if trained]


def expected_pieces(name: str, conversation: list[dict]) -> list[str]:
    """Each assistant reply with the template's end token (Mistral's replies start with a space)."""
    lead = " " if name == "mistral-inst" else ""
    return [lead + m["content"] + CHAT_TEMPLATES[name]["end"] for m in conversation if m["role"] == "assistant"]


@pytest.mark.parametrize("shape", CONVERSATIONS)
@pytest.mark.parametrize("name", [n for n in CHAT_TEMPLATES if n not in ("chatml-reasoning", "answer-after-space")])
def test_training_ids_are_apply_chat_templates(tmp_path, template_tokenizer, name, shape):
    folder = chat_folder(tmp_path, name, template_tokenizer, in_config=name == "chatml-tools")
    tokenizer, hf = load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(folder)
    assert default_template(tokenizer) == MODEL
    conversation = CONVERSATIONS[shape]
    if name == "turns-no-system" and shape == "system":  # the template's own raise_exception, as one line
        with pytest.raises(UserError, match=f"^chat.json: conversation 1: {re.escape(str(folder))}/chat_template.jinja: "
                                            "the template refuses this conversation: System role not supported$"):
            build_examples([conversation], tokenizer, MODEL, max_len=4096, source="chat.json")
        return
    (example,), stats = build_examples([conversation], tokenizer, MODEL, max_len=4096)
    hf_out = hf.apply_chat_template(conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert example["input_ids"] == hf_out["input_ids"]
    assert trained_pieces(example, tokenizer) == expected_pieces(name, conversation)
    assert stats["straddling"] == 0
    if name == "chatml-generation":  # marked by the template: the same tokens as transformers' assistant mask
        assert [label != -100 for label in example["labels"]] == [bool(m) for m in hf_out["assistant_masks"]]
    prompt = hf.apply_chat_template(conversation[:-1], tokenize=True, add_generation_prompt=True)
    assert prompt_ids(conversation, tokenizer, MODEL) == list(getattr(prompt, "input_ids", prompt))


@pytest.mark.parametrize("style", ["first", "always"])
def test_sentencepiece_style_tokenizer(tmp_path, shakespeare, style):
    """Mistral's template with a "▁"-prefixed tokenizer (Metaspace): the "▁" of the reply's first
    word is the space the template wrote before it, inside the reply's characters."""
    folder = chat_folder(tmp_path, "mistral-inst", sentencepiece_like(shakespeare, style))
    tokenizer, hf = load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(folder)
    conversation = CONVERSATIONS["multi"]
    (example,), stats = build_examples([conversation], tokenizer, MODEL, max_len=4096)
    assert example["input_ids"] == hf.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"]
    pieces = [p.replace(" ", "").replace("▁", " ") for p in trained_pieces(example, tokenizer)]  # it has no decoder
    assert pieces == expected_pieces("mistral-inst", conversation) and stats["straddling"] == 0


def test_a_token_straddling_prompt_and_reply_trains_and_is_counted(tmp_path, template_tokenizer):
    """"Answer: " + reply: byte-level BPE writes the prompt's last space and the reply's first word
    as one token ("Ġthe"). It overlaps the reply, so it trains (transformers' assistant-mask rule),
    and each such token is counted."""
    folder = chat_folder(tmp_path, "answer-after-space", template_tokenizer)
    tokenizer, hf = load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(folder)
    conversation = CONVERSATIONS["multi"][:3] + [{"role": "assistant", "content": "the lord too"}]
    (example,), stats = build_examples([conversation], tokenizer, MODEL, max_len=4096)
    assert example["input_ids"] == hf.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"]
    assert tokenizer.backend.token_to_id("Ġthe") in example["input_ids"]
    assert trained_pieces(example, tokenizer) == [" the lord<|endoftext|>", " the lord too<|endoftext|>"]
    assert stats["straddling"] == 2


def test_tool_calls_reach_the_template_as_transformers_passes_them(tmp_path, template_tokenizer):
    """A ShareGPT tool-calling record (glaive, via LLaMA-Factory): its tools become the template's
    `tools` and its function_call an assistant tool call, rendered by the template's own tool
    section; the call and the final answer train, the tool's reply does not."""
    folder = chat_folder(tmp_path, "chatml-tools", template_tokenizer)
    tokenizer, hf = load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(folder)
    record = json.loads((DATA / "llamafactory_glaive_toolcall_en_demo.json").read_text())[0]
    conversations, _ = read_conversations(DATA / "llamafactory_glaive_toolcall_en_demo.json")
    (example,), _ = build_examples(conversations[:1], tokenizer, MODEL, max_len=4096)
    turns = record["conversations"]
    messages = [{"role": "user", "content": turns[0]["value"]},
                {"role": "assistant", "tool_calls": [{"type": "function", "function": json.loads(turns[1]["value"])}]},
                {"role": "tool", "content": turns[2]["value"]}, {"role": "assistant", "content": turns[3]["value"]}]
    tools = [{"type": "function", "function": schema} for schema in json.loads(record["tools"])]
    text = hf.apply_chat_template(messages, tools=tools, tokenize=False)
    assert "<tools>" in text and '"calculate_tip"' in text and "<tool_response>" in text
    assert example["input_ids"] == hf.apply_chat_template(messages, tools=tools, tokenize=True,
                                                          return_dict=True)["input_ids"]
    call = json.dumps(json.loads(turns[1]["value"])["arguments"], ensure_ascii=False)
    assert trained_pieces(example, tokenizer) == [
        f'<tool_call>\n{{"name": "calculate_tip", "arguments": {call}}}\n</tool_call><|im_end|>',
        turns[3]["value"] + "<|im_end|>"]


def test_template_that_rewrites_past_turns_trains_each_turn_as_served(tmp_path, template_tokenizer):
    """A template that drops past turns' reasoning: each assistant turn is its own example, the
    conversation up to it exactly as apply_chat_template renders it, only that turn trained."""
    folder = chat_folder(tmp_path, "chatml-reasoning", template_tokenizer)
    tokenizer, hf = load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(folder)
    conversation = [{"role": "user", "content": "the king"},
                    {"role": "assistant", "content": "<think>\nthe crown\n</think>\n\nthe lord"},
                    {"role": "user", "content": "and the king?"},
                    {"role": "assistant", "content": "<think>\nagain\n</think>\n\nAnd the lord."}]
    examples, stats = build_examples([conversation], tokenizer, MODEL, max_len=4096)
    assert stats["per_turn"] == 1 and len(examples) == 2
    for example, end in zip(examples, (2, 4)):
        assert example["input_ids"] == hf.apply_chat_template(conversation[:end], tokenize=True,
                                                              return_dict=True)["input_ids"]
        assert trained_pieces(example, tokenizer) == [conversation[end - 1]["content"] + "<|im_end|>"]
    assert "the crown" not in tokenizer.decode(examples[1]["input_ids"])  # served without past reasoning


def test_what_a_template_reads_is_what_transformers_passes(tmp_path, template_tokenizer):
    """Special-token names from tokenizer_config.json and special_tokens_map.json only (a BOS id in
    config.json is no bos_token), a message's reasoning under its names, tool-call fields as given,
    and transformers 5's additional_chat_templates/tool_use.jinja for a conversation with tools."""
    folder = chat_folder(tmp_path, "chatml-tools", template_tokenizer)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["bos_token"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "special_tokens_map.json").write_text(json.dumps({"unk_token": "<s>"}))
    (folder / "config.json").write_text(json.dumps({"bos_token_id": template_tokenizer.token_to_id("<bos>")}))
    (folder / "chat_template.jinja").write_text(
        "{{ bos_token }}|{{ eos_token }}|{{ unk_token }}{% for m in messages %}|{{ m.role }}:{{ m.content }}"
        "/{{ m.reasoning_content }}/{{ m.thinking }}/{% if m.tool_calls %}{{ m.tool_calls | tojson }}{% endif %}"
        "{% endfor %}")
    (folder / "additional_chat_templates").mkdir()
    (folder / "additional_chat_templates" / "tool_use.jinja").write_text("TOOLS {{ tools | tojson }}")
    record = {"messages": [{"role": "user", "content": "the king"},
                           {"role": "assistant", "content": "the lord", "reasoning": "who rules?"},
                           {"role": "user", "content": "and?"},
                           {"role": "assistant", "content": None, "tool_calls": [
                               {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]}
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps(record) + "\n" + json.dumps({**record, "tools": [{"name": "f"}]}) + "\n")
    conversations, _ = read_conversations(data)
    tokenizer, hf = load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(folder)
    assert tokenizer.bos_id is not None  # minituner knows the BOS id, and still passes no bos_token
    ours = []
    for conversation in conversations:
        messages, tools = chat_template.hf_messages(conversation)
        ours.append(chat_template.render(tokenizer, messages, tools=tools))
    tools = [{"type": "function", "function": {"name": "f"}}]  # a bare schema, wrapped as transformers makes them
    assert ours == [hf.apply_chat_template(record["messages"], tokenize=False),
                    hf.apply_chat_template(record["messages"], tools=tools, tokenize=False)]
    assert ours[0].startswith("|<|im_end|>|<s>|user:the king") and ours[1].startswith("TOOLS")
