import pytest

from conftest import FIXTURES
from minituner.errors import UserError
from minituner.hf.tokenizer import load_tokenizer
from minituner.templates import (CONTENT, EOS, MARKUP, TEMPLATES, Segment, chat_template, check_template,
                                 default_template, generation_prompt, message_text, render, stop_ids)
from minituner.tokenizer import Tokenizer

SYSTEM = {"role": "system", "content": "Be kind."}
TURNS = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
         {"role": "user", "content": "Weather?"}, {"role": "assistant", "content": '{"name": "weather"}'},
         {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}]


def text(segments, eos="<EOS>"):
    return "".join(eos if s.kind == EOS else s.text for s in segments)


def trained(segments, eos="<EOS>"):
    return [eos if s.kind == EOS else s.text for s in segments if s.trained]


def test_alpaca_is_stanford_alpacas_prompt():
    with_input = [{"role": "user", "content": "Sort.", "input": "b a"}, {"role": "assistant", "content": "a b"}]
    assert text(render(with_input, "alpaca")) == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nSort.\n\n### Input:\nb a\n\n### Response:\na b<EOS>")
    without = [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]
    assert text(render(without, "alpaca")) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nSay hi.\n\n### Response:\nhi<EOS>")
    segments = render([SYSTEM] + TURNS, "alpaca")
    assert text(segments).startswith("Be kind.\n\n### Instruction:\nHi\n\n### Response:\nHello!<EOS>\n\n### Instruction:")
    assert "### Tool output:\nsunny\n\n### Response:\nSunny.<EOS>" in text(segments)
    assert trained(segments) == ["Hello!", "<EOS>", '{"name": "weather"}', "<EOS>", "Sunny.", "<EOS>"]


def test_chatml_trains_the_answer_and_its_end_not_the_newline():
    segments = render([SYSTEM] + TURNS, "chatml")
    assert text(segments) == (
        "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nWeather?<|im_end|>\n"
        '<|im_start|>assistant\n{"name": "weather"}<|im_end|>\n<|im_start|>tool\nsunny<|im_end|>\n'
        "<|im_start|>assistant\nSunny.<|im_end|>\n")
    assert trained(segments) == ["Hello!", "<|im_end|>", '{"name": "weather"}', "<|im_end|>", "Sunny.", "<|im_end|>"]
    assert segments[-1] == Segment("\n", False, MARKUP)
    assert all(s.kind == CONTENT for s in segments if s.text in ("Be kind.", "Hi", "Hello!", "sunny"))


def test_llama3_has_no_bos_and_calls_the_tool_ipython():
    segments = render([SYSTEM] + TURNS[:2] + TURNS[4:], "llama3")
    assert text(segments) == (
        "<|start_header_id|>system<|end_header_id|>\n\nBe kind.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>ipython<|end_header_id|>\n\nsunny<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nSunny.<|eot_id|>")
    assert trained(segments) == ["Hello!", "<|eot_id|>", "Sunny.", "<|eot_id|>"]


def test_mistral_wraps_user_turns_in_inst_and_ends_answers_with_eos():
    segments = render([SYSTEM] + TURNS, "mistral")
    assert text(segments) == ("[INST] Be kind.\n\nHi [/INST]Hello!<EOS>[INST] Weather? [/INST]"
                              '{"name": "weather"}<EOS>[INST] sunny [/INST]Sunny.<EOS>')
    assert trained(segments) == ["Hello!", "<EOS>", '{"name": "weather"}', "<EOS>", "Sunny.", "<EOS>"]


def test_plain_and_the_alpaca_input_in_other_templates():
    conversation = [SYSTEM, {"role": "user", "content": "Sort.", "input": "b a"}, {"role": "assistant", "content": "a b"}]
    assert text(render(conversation, "plain")) == "Be kind.\n\nSort.\n\nb a\na b<EOS>"
    assert "<|im_start|>user\nSort.\n\nb a<|im_end|>" in text(render(conversation, "chatml"))


@pytest.mark.parametrize("template", TEMPLATES)
def test_generation_prompt_is_the_training_text_before_the_last_answer(template):
    full = text(render([SYSTEM] + TURNS, template))
    prompt = text(generation_prompt([SYSTEM] + TURNS, template))
    assert full.startswith(prompt) and full[len(prompt):].startswith("Sunny.")
    assert prompt == text(generation_prompt([SYSTEM] + TURNS[:-1], template))  # ends with the tool turn: same
    assert not any(s.trained for s in generation_prompt([SYSTEM] + TURNS[:2], template))


def test_check_template_names_the_missing_token():
    tok = load_tokenizer(FIXTURES / "llama-tiny")  # <|endoftext|>, <|im_start|>, <|im_end|>
    for template in ("chatml", "alpaca", "plain"):
        check_template(template, tok)
    with pytest.raises(UserError, match=r'the llama3 template needs "<\|start_header_id\|>" as one token.*use the alpaca template'):
        check_template("llama3", tok)
    scratch = Tokenizer.train_bpe(["some text to learn from"], vocab_size=300, special_tokens=("<|endoftext|>",))
    with pytest.raises(UserError, match=r'the chatml template needs "<\|im_start\|>" as one token'):
        check_template("chatml", scratch)
    no_eos = Tokenizer(scratch.backend)
    with pytest.raises(UserError, match="the alpaca template ends each response with the EOS token, and this tokenizer has none"):
        check_template("alpaca", no_eos)
    with pytest.raises(UserError, match='template "vicuna" is not one of model, alpaca, chatml, llama3, mistral, plain'):
        check_template("vicuna", tok)


def test_default_template_follows_the_tokenizers_special_tokens(chat_tokenizer):
    assert default_template(load_tokenizer(FIXTURES / "llama-tiny")) == "chatml"
    assert default_template(chat_tokenizer) == "chatml"
    llama3 = Tokenizer.train_bpe(["text"], vocab_size=300, special_tokens=(
        "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"))
    assert default_template(llama3) == "llama3"
    assert default_template(Tokenizer.train_bpe(["text"], vocab_size=300, special_tokens=("</s>",))) == "alpaca"


@pytest.mark.parametrize("jinja, expected", [
    ("{% for m in messages %}{{ '[INST] ' + m['content'] + ' [/INST]' }}{% endfor %}", "model"),
    ("{{ '<|im_start|>' + messages[0]['content'] }}", "model"),  # even one minituner could write: the model's own
    (chat_template("llama3", bos=False), "llama3"),  # written by minituner: the format it names
])
def test_default_template_is_the_models_own_chat_template(chat_tokenizer, jinja, expected):
    """A folder's chat template, wherever it is kept (tokenizer_config.json, its named-list form,
    chat_template.jinja), is the default; one minituner wrote names the format trained on."""
    tok = Tokenizer(chat_tokenizer.backend, eos_id=chat_tokenizer.eos_id, tokenizer_config={"chat_template": jinja})
    assert default_template(tok) == expected
    listed = Tokenizer(chat_tokenizer.backend, eos_id=chat_tokenizer.eos_id,
                       tokenizer_config={"chat_template": [{"name": "tool_use", "template": "x"},
                                                          {"name": "default", "template": jinja}]})
    assert default_template(listed) == expected
    from_file = Tokenizer(chat_tokenizer.backend, eos_id=chat_tokenizer.eos_id, chat_template_file=jinja)
    assert default_template(from_file) == expected


def test_stop_ids_are_the_templates_end_token_and_the_tokenizers(chat_tokenizer):
    eos, im_end, eot = (chat_tokenizer.token_to_id(t) for t in ("<|endoftext|>", "<|im_end|>", "<|eot_id|>"))
    assert stop_ids("chatml", chat_tokenizer) == sorted([eos, im_end])
    assert stop_ids("llama3", chat_tokenizer) == sorted([eos, eot])
    assert stop_ids("alpaca", chat_tokenizer) == stop_ids("plain", chat_tokenizer) == stop_ids("mistral", chat_tokenizer) == [eos]


@pytest.mark.parametrize("template", TEMPLATES)
def test_weight_zero_answers_are_rendered_and_not_trained(template):
    conversation = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 0},
                    {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    trained = [s.text for s in render(conversation, template) if s.trained and s.kind == CONTENT]
    assert trained == ["d"] and any("b" in s.text for s in render(conversation, template))


def test_tool_calls_are_written_as_json_objects():
    """OpenAI's data gives arguments as a JSON string: written as the object it holds."""
    call = {"type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    assert message_text({"role": "assistant", "content": "", "tool_calls": [call]}) == '{"name": "f", "arguments": {"a": 1}}'
