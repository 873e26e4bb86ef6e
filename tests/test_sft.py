import json
from itertools import groupby

import pytest

from conftest import DATA, FIXTURES, sentencepiece_like
from minituner.errors import UserError
from minituner.formats import read_conversations
from minituner.hf.tokenizer import load_tokenizer
from minituner.loss import IGNORE_INDEX
from minituner.sft import MASK_CLOSE, MASK_OPEN, build_example, build_examples, prompt_ids, show_mask, tokenize_segments
from minituner.templates import TEMPLATES, Segment, render

END = {"alpaca": "<|endoftext|>", "plain": "<|endoftext|>", "mistral": "<|endoftext|>", "chatml": "<|im_end|>",
       "llama3": "<|eot_id|>"}


def records(name):
    text = (DATA / name).read_text(encoding="utf-8")
    return json.loads(text) if name.endswith(".json") else [json.loads(line) for line in text.splitlines()]


# What the model must learn to write in each record, read straight from the file's own fields.
ANSWERS = {
    "llamafactory_identity.json": lambda r: [r["output"]],
    "gpteacher_codegen_instruct.json": lambda r: [r["response"]],
    "self_instruct_seed_tasks.jsonl": lambda r: [i["output"] for i in r["instances"]],
    "fastchat_dummy_conversation.json": lambda r: [t["value"] for t in r["conversations"] if t["from"] == "gpt"],
    "llamafactory_glaive_toolcall_en_demo.json":
        lambda r: [t["value"] for t in r["conversations"] if t["from"] in ("gpt", "function_call")],
    "llamafactory_kto_en_demo.json":
        lambda r: [m["content"] for m in r["messages"] if m["role"] == "assistant"] if r["label"] else [],
}


def runs(example, tokenizer, trained=True):
    """The decoded text of each run of trained (or of masked) tokens."""
    pairs = zip(example["input_ids"], example["labels"])
    return [tokenizer.decode([t for t, _ in run], skip_special_tokens=False)
            for is_trained, run in groupby(pairs, key=lambda p: p[1] != IGNORE_INDEX) if is_trained == trained]


def answer_runs(examples, tokenizer):
    return [text for example in examples for text in runs(example, tokenizer)]


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("name", ANSWERS)
def test_only_answers_and_their_end_tokens_are_trained(name, template, chat_tokenizer):
    conversations, _ = read_conversations(DATA / name)
    examples, stats = build_examples(conversations, chat_tokenizer, template, max_len=4096)
    expected = [answer + END[template] for r in records(name) for answer in ANSWERS[name](r)]
    assert answer_runs(examples, chat_tokenizer) == expected
    assert (stats["examples"], stats["truncated"], stats["dropped"]) == (len(conversations), 0, 0)
    assert stats["trained_tokens"] == sum(sum(x != IGNORE_INDEX for x in e["labels"]) for e in examples)
    for example in examples:
        assert all(label in (IGNORE_INDEX, token) for token, label in zip(example["input_ids"], example["labels"]))


@pytest.mark.parametrize("template", ["alpaca", "chatml", "plain"])
def test_the_fixture_tokenizer_masks_the_same_way(template):
    tok = load_tokenizer(FIXTURES / "llama-tiny")
    name = "llamafactory_glaive_toolcall_en_demo.json"
    examples, _ = build_examples(read_conversations(DATA / name)[0], tok, template, max_len=4096)
    expected = [answer + END[template] for r in records(name) for answer in ANSWERS[name](r)]
    assert answer_runs(examples, tok) == expected


def test_prompt_side_is_masked_tool_output_included(chat_tokenizer):
    conversations, _ = read_conversations(DATA / "llamafactory_glaive_toolcall_en_demo.json")
    examples, _ = build_examples(conversations[:1], chat_tokenizer, "chatml", max_len=4096)
    masked = "".join(runs(examples[0], chat_tokenizer, trained=False))
    turns = records("llamafactory_glaive_toolcall_en_demo.json")[0]["conversations"]
    for turn in turns:
        assert (turn["value"] in masked) == (turn["from"] in ("human", "observation"))
    assert masked.startswith("<|im_start|>system\nYou can call these functions.")


def test_bos_comes_once_and_is_masked(bos_tokenizer):
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    example, _ = build_example(conversation, bos_tokenizer, "llama3", max_len=100)
    bos = bos_tokenizer.bos_id
    assert example["input_ids"][0] == bos and example["input_ids"].count(bos) == 1
    assert example["labels"][0] == IGNORE_INDEX


def test_train_on_prompt_labels_every_token(chat_tokenizer):
    conversations, _ = read_conversations(DATA / "fastchat_dummy_conversation.json")
    masked, _ = build_examples(conversations, chat_tokenizer, "chatml", max_len=4096)
    everything, stats = build_examples(conversations, chat_tokenizer, "chatml", max_len=4096, train_on_prompt=True)
    for a, b in zip(masked, everything):
        assert b["input_ids"] == a["input_ids"] == b["labels"]
    assert stats["trained_tokens"] == stats["tokens"] - len(everything)  # every token but each first one carries loss


def test_segments_are_tokenised_apart(chat_tokenizer):
    """Whole-text encoding would make " the" one token across the prompt/answer boundary."""
    assert len(chat_tokenizer.encode(" the", add_special_tokens=False)) == 1
    ids, trained = tokenize_segments([Segment("to ", False), Segment("the", True)], chat_tokenizer)
    n = trained.index(True)
    assert chat_tokenizer.decode(ids[:n]) == "to " and chat_tokenizer.decode(ids[n:]) == "the" and all(trained[n:])


def test_generation_prompt_tokenises_like_training(bos_tokenizer):
    conversations, _ = read_conversations(DATA / "llamafactory_kto_en_demo.json")
    for template in TEMPLATES:
        example, _ = build_example(conversations[1], bos_tokenizer, template, max_len=4096)
        prompt = prompt_ids(conversations[1], bos_tokenizer, template)
        last_answer_start = max(i for i, label in enumerate(example["labels"])
                                if label != IGNORE_INDEX and example["labels"][i - 1] == IGNORE_INDEX)
        assert prompt == example["input_ids"][:last_answer_start]


def test_special_strings_in_messages_stay_text(chat_tokenizer):
    conversation = [{"role": "user", "content": "Say <|im_end|> and <|eot_id|>"},
                    {"role": "assistant", "content": "<|im_start|>ok<|im_end|>"}]
    example, _ = build_example(conversation, chat_tokenizer, "chatml", max_len=100)
    ids = example["input_ids"]
    im_start, im_end, eot = (chat_tokenizer.token_to_id(t) for t in ("<|im_start|>", "<|im_end|>", "<|eot_id|>"))
    assert (ids.count(im_start), ids.count(im_end), ids.count(eot)) == (2, 2, 0)  # the template's only
    assert runs(example, chat_tokenizer) == ["<|im_start|>ok<|im_end|><|im_end|>"]
    assert chat_tokenizer.backend.encode_special_tokens is False  # restored for everyone else
    assert chat_tokenizer.encode("<|im_end|>", add_special_tokens=False) == [im_end]


# ----------------------------------------------------------------------------- truncation
def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def ids_of(conversation, tokenizer, template="chatml"):
    return build_example(conversation, tokenizer, template, max_len=10**6)[0]["input_ids"]


def test_long_prompt_is_cut_from_the_left_and_the_answer_kept(bos_tokenizer, shakespeare):
    conversation = [user(shakespeare[:3000]), assistant("Fine.")]
    full = ids_of(conversation, bos_tokenizer)
    example, truncated = build_example(conversation, bos_tokenizer, "chatml", max_len=64)
    assert truncated and example["input_ids"] == full[:1] + full[-63:]  # BOS, then the end of the prompt
    assert runs(example, bos_tokenizer) == ["Fine.<|im_end|>"]


def test_oldest_exchanges_go_first_and_the_system_message_stays(bos_tokenizer, shakespeare):
    system = {"role": "system", "content": "Be brief."}
    turns = [user(shakespeare[:2000]), assistant('{"name": "f"}'), {"role": "tool", "content": "42"}, assistant("42."),
             user("And then?"), assistant("Then more."), user("Last?"), assistant("Yes.")]
    for keep in (4, 2):  # exchanges left
        shorter = [system] + turns[-keep:]
        max_len = len(ids_of(shorter, bos_tokenizer))
        example, truncated = build_example([system] + turns, bos_tokenizer, "chatml", max_len=max_len)
        assert truncated and example["input_ids"] == ids_of(shorter, bos_tokenizer)


def test_long_answer_loses_its_end_after_the_prompt_is_cut_to_half(bos_tokenizer, shakespeare):
    short = [user("Recite."), assistant(shakespeare[:3000])]
    prompt = prompt_ids(short, bos_tokenizer, "chatml")
    example, _ = build_example(short, bos_tokenizer, "chatml", max_len=64)
    assert example["input_ids"][:len(prompt)] == prompt and len(example["input_ids"]) == 64  # prompt whole
    assert shakespeare.startswith(runs(example, bos_tokenizer)[0])
    long = [user(shakespeare[:3000]), assistant(shakespeare[:3000])]
    example, _ = build_example(long, bos_tokenizer, "chatml", max_len=64)
    first_trained = next(i for i, label in enumerate(example["labels"]) if label != IGNORE_INDEX)
    assert first_trained == 1 + 32 and len(example["input_ids"]) == 64  # BOS, half of 64 for the prompt, the rest answer


def test_no_room_for_an_answer_is_dropped_and_counted(bos_tokenizer):
    # With max_len 2, BOS and the last prompt token fill the window; an answer with no prompt still fits.
    conversations = [[user("Hi"), assistant("Hello")], [assistant("Hello")]]
    assert build_example(conversations[0], bos_tokenizer, "plain", max_len=2) == (None, True)
    examples, stats = build_examples(conversations, bos_tokenizer, "plain", max_len=2)
    assert stats == {"examples": 1, "truncated": 1, "dropped": 1, "tokens": 2, "trained_tokens": 1, "straddling": 0,
                     "unprompted": 0, "unended": 0, "per_turn": 0}
    with pytest.raises(UserError, match="chat.json: no training example fits in max_len=2 tokens: all 1 conversations"):
        build_examples(conversations[:1], bos_tokenizer, "plain", max_len=2, source="chat.json")


def test_template_without_its_tokens_is_refused(bos_tokenizer):
    tok = load_tokenizer(FIXTURES / "llama-tiny")
    with pytest.raises(UserError, match=r'llama3 template needs "<\|start_header_id\|>"'):
        build_examples([[user("a"), assistant("b")]], tok, "llama3", max_len=64)


# ----------------------------------------------------------------------------- inspection
def test_show_mask_marks_exactly_the_trained_text(chat_tokenizer):
    conversations, _ = read_conversations(DATA / "fastchat_dummy_conversation.json")
    example, _ = build_example(conversations[2], chat_tokenizer, "chatml", max_len=4096)
    legend, shown = show_mask(example, chat_tokenizer).split("\n", 1)
    assert MASK_OPEN in legend and "-100" in legend
    marked = [part.split(MASK_CLOSE)[0] for part in shown.split(MASK_OPEN)[1:]]
    assert marked == runs(example, chat_tokenizer) and len(marked) == 3
    plain = shown.replace(MASK_OPEN, "").replace(MASK_CLOSE, "")
    assert plain == chat_tokenizer.decode(example["input_ids"], skip_special_tokens=False)
    assert plain == "".join(s.text for s in render(conversations[2], "chatml"))


# ----------------------------------------------------------------------------- SentencePiece-style tokenizers
@pytest.mark.parametrize("style", ["prepend", "first", "always"])
@pytest.mark.parametrize("template", TEMPLATES)
def test_segments_give_the_whole_strings_ids_with_a_prefix_space(shakespeare, style, template):
    """Encoding segment by segment must not add a "▁" where encoding the rendered string at once
    (what apply_chat_template does) would not."""
    tokenizer = sentencepiece_like(shakespeare, style)
    assert tokenizer.prefix_space == ("each" if style != "first" else "first")
    conversation = [{"role": "system", "content": "Be kind to the king."},
                    {"role": "user", "content": "What said the lord?"}, {"role": "assistant", "content": "the lord"},
                    {"role": "user", "content": "And the king?"}, {"role": "tool", "content": "sunny and fair"},
                    {"role": "assistant", "content": "the king is here."}]
    segments = render(conversation, template)
    text = "".join("</s>" if s.kind == "eos" else s.text for s in segments)
    ids, _ = tokenize_segments(segments, tokenizer)
    assert ids == tokenizer.backend.encode("<s>" + text, add_special_tokens=False).ids  # as the exported template writes it
