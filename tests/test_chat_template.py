"""The model's own chat template (minituner/chat_template.py): sandboxed, as transformers runs it,
and what trains derived from its rendering. transformers itself is the oracle in
tests/hf/test_hf_chat_templates.py; these tests need only minituner."""

import pytest

from conftest import chat_folder
from minituner.chat_template import end_of_turn_ids, render, template_text
from minituner.errors import UserError
from minituner.hf.tokenizer import load_tokenizer
from minituner.sft import build_examples, show_mask
from minituner.templates import MODEL, check_template, stop_ids
from minituner.tokenizer import Tokenizer

CANARY = "minituner-canary"


def tokenizer_with(base: Tokenizer, template: str, **config) -> Tokenizer:
    return Tokenizer(base.backend, eos_id=base.eos_id, tokenizer_config=config, chat_template_file=template)


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('touch CANARY').read() }}",
    "{{ joiner.__init__.__globals__['__builtins__']['open']('CANARY', 'w').write('x') }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{% set x = messages.append({'role': 'x'}) %}{{ x }}",  # the data passed in cannot be changed
    "{{ namespace.__init__.__globals__ }}",
    "{% include 'CANARY' %}",
    "{% import 'CANARY' as m %}{{ m }}",
    "{% extends 'CANARY' %}",
    "{% set ns = namespace() %}{% set ns.__html__ = 'CANARY'.upper %}{{ ns | escape }}",  # called unchecked
])
def test_a_malicious_template_is_refused_in_one_line_and_runs_nothing(tmp_path, monkeypatch, chat_tokenizer, template):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "CANARY").write_text("a file the template must not read")
    template = template.replace("CANARY", str(tmp_path / CANARY))
    tok = tokenizer_with(chat_tokenizer, template)
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    with pytest.raises(UserError) as e:
        check_template(MODEL, tok)
        build_examples([conversation], tok, MODEL, max_len=64, source="chat.json")
    assert "\n" not in str(e.value) and str(e.value).startswith(("chat_template.jinja", "chat.json: conversation 1"))
    assert "refused" in str(e.value) or "unsafe" in str(e.value)
    assert not (tmp_path / CANARY).exists()


def test_template_syntax_errors_and_a_folder_without_a_template(chat_tokenizer):
    with pytest.raises(UserError, match=r"^chat_template\.jinja: line 2: not a valid Jinja template \(.*\)$"):
        check_template(MODEL, tokenizer_with(chat_tokenizer, "{{ messages }}\n{% for m in messages %}"))
    for wrong in ("{{ messages | no_such_filter }}", "{% break %}"):  # found when compiled, not parsed
        with pytest.raises(UserError, match=r"^chat_template\.jinja: not a valid Jinja template \(.*\)$"):
            check_template(MODEL, tokenizer_with(chat_tokenizer, wrong))
    with pytest.raises(UserError, match="--template model: the model folder has no chat template"):
        check_template(MODEL, chat_tokenizer)


def test_named_templates_pick_tool_use_for_conversations_with_tools(chat_tokenizer):
    listed = [{"name": "default", "template": "plain"}, {"name": "tool_use", "template": "with tools"}]
    tok = Tokenizer(chat_tokenizer.backend, tokenizer_config={"chat_template": listed})
    assert template_text(tok) == "plain" and template_text(tok, tools=True) == "with tools"
    tok = Tokenizer(chat_tokenizer.backend, tokenizer_config={"chat_template": [{"name": "tool_use", "template": "x"}]})
    with pytest.raises(UserError, match='named tool_use; none is "default"'):
        template_text(tok)


def test_transformers_globals_and_filters(chat_tokenizer):
    """tojson keeps non-ASCII text and takes transformers' options; strftime_now and raise_exception
    exist; the special tokens are named; loop controls work; undefined names render empty."""
    text = ("{{ bos_token }}|{{ eos_token }}|{{ {'é': 1} | tojson }}|{{ [1, 2] | tojson(indent=1) }}|"
            "{{ strftime_now('%Y') | length }}|{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
            "{{ m.content }}{% endfor %}|{{ not_passed }}|{{ tools }}")
    tok = Tokenizer(chat_tokenizer.backend, eos_id=chat_tokenizer.eos_id, bos_id=chat_tokenizer.token_to_id("<|begin_of_text|>"),
                    chat_template_file=text)
    out = render(tok, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    assert out == '<|begin_of_text|>|<|endoftext|>|{"é": 1}|[\n 1,\n 2\n]|4|a||None'
    refusing = tokenizer_with(chat_tokenizer, "{{ raise_exception('Only user and assistant roles') }}")
    with pytest.raises(UserError, match="the template refuses this conversation: Only user and assistant roles$"):
        render(refusing, [])


def test_end_of_turn_token_stops_generation(tmp_path, template_tokenizer):
    """The token that ends an assistant turn in the template stops generation, with the eos."""
    tok = load_tokenizer(chat_folder(tmp_path, "turns-no-system", template_tokenizer))
    end, eos = tok.token_to_id("<end_of_turn>"), tok.token_to_id("<eos>")
    assert end_of_turn_ids(tok) == {end}
    assert stop_ids(MODEL, tok) == sorted({end, eos})


def test_truncation_keeps_the_templates_bos_and_the_reply(tmp_path, template_tokenizer):
    tok = load_tokenizer(chat_folder(tmp_path, "llama3-dated", template_tokenizer))
    conversation = [{"role": "user", "content": "the king " * 60}, {"role": "assistant", "content": "the lord"}]
    (example,), stats = build_examples([conversation], tok, MODEL, max_len=48)
    assert stats["truncated"] == 1 and len(example["input_ids"]) == 48
    assert example["input_ids"][0] == tok.bos_id
    trained = [t for t, label in zip(example["input_ids"], example["labels"]) if label != -100]
    assert tok.decode(trained, skip_special_tokens=False) == "the lord<|eot_id|>"


def test_show_mask_marks_the_reply_and_its_end_token(tmp_path, template_tokenizer):
    tok = load_tokenizer(chat_folder(tmp_path, "chatml-tools", template_tokenizer))
    conversation = [{"role": "user", "content": "the king"}, {"role": "assistant", "content": "the lord"}]
    (example,), _ = build_examples([conversation], tok, MODEL, max_len=256)
    shown = show_mask(example, tok).splitlines()
    assert shown[1:] == ["<|im_start|>system", "You are Quill, a helpful assistant.<|im_end|>", "<|im_start|>user",
                         "the king<|im_end|>", "<|im_start|>assistant", "⟦the lord<|im_end|>⟧"]


def test_an_answer_that_does_not_follow_the_generation_prompt_trains_from_where_they_differ(chat_tokenizer):
    """DeepSeek-R1's distills prompt with "<｜Assistant｜><think>\n" but write past answers without
    it: the turn trains from where the two renderings part, and such turns are counted."""
    template = ("{% for m in messages %}{{ m.role + ':' + (' ' + m.content + '<|im_end|>' if m.role == 'assistant' "
                "else m.content) + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ 'assistant:\n' }}{% endif %}")
    tok = tokenizer_with(chat_tokenizer, template)
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    (example,), stats = build_examples([conversation], tok, MODEL, max_len=64)
    trained = [t for t, label in zip(example["input_ids"], example["labels"]) if label != -100]
    assert tok.decode(trained, skip_special_tokens=False) == " Hello<|im_end|>"  # not the "\n" after it
    assert stats["unprompted"] == 1


def test_the_end_of_turn_token_ends_the_trained_span(chat_tokenizer):
    """Phi-4-mini's template writes EOS after the last message only: the last turn trains through
    its end-of-turn token, as every other turn, and the conversation stays one example."""
    template = ("{% for m in messages %}{{ '<|im_start|>' + m.role + m.content + '<|im_end|>' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|im_start|>assistant' }}{% else %}{{ eos_token }}{% endif %}")
    tok = tokenizer_with(chat_tokenizer, template)
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                    {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Farewell"}]
    examples, stats = build_examples([conversation], tok, MODEL, max_len=64)
    assert len(examples) == 1 and stats["per_turn"] == 0
    shown = show_mask(examples[0], tok).splitlines()[1]
    assert shown.endswith("assistant⟦Hello<|im_end|>⟧<|im_start|>userBye<|im_end|><|im_start|>assistant"
                          "⟦Farewell<|im_end|>⟧<|endoftext|>")


def test_eos_after_the_last_message_and_no_end_token_at_all(chat_tokenizer):
    """A template ending each reply with EOS and writing one more after the last message trains one
    EOS per reply; a template that writes no special token after a reply trains none, and every
    such answer is counted (the model would not learn to stop)."""
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                    {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Farewell"}]
    twice = ("{% for m in messages %}{{ m.role + ': ' + m.content }}{% if m.role == 'assistant' %}{{ eos_token }}"
             "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% else %}{{ eos_token }}"
             "{% endif %}")
    (example,), stats = build_examples([conversation], tokenizer_with(chat_tokenizer, twice), MODEL, max_len=64)
    assert show_mask(example, chat_tokenizer).endswith("assistant: ⟦Farewell<|endoftext|>⟧<|endoftext|>")
    assert stats["per_turn"] == stats["unended"] == 0
    bare = ("{% for m in messages %}{{ m.role + ': ' + m.content + '\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    (example,), stats = build_examples([conversation], tokenizer_with(chat_tokenizer, bare), MODEL, max_len=64)
    assert show_mask(example, chat_tokenizer).endswith("assistant: ⟦Farewell⟧\n") and stats["unended"] == 2


def test_weight_zero_answers_are_context(tmp_path, template_tokenizer):
    """OpenAI's "weight": 0 marks an answer as context: it is rendered and not trained."""
    tok = load_tokenizer(chat_folder(tmp_path, "chatml-tools", template_tokenizer))
    conversation = [{"role": "user", "content": "the king"}, {"role": "assistant", "content": "the lord", "weight": 0},
                    {"role": "user", "content": "and?"}, {"role": "assistant", "content": "the lord too"}]
    (example,), _ = build_examples([conversation], tok, MODEL, max_len=256)
    shown = show_mask(example, tok).splitlines()[1:]  # under the legend
    assert "⟦the lord too<|im_end|>⟧" in shown and "".join(shown).count("⟦") == 1


def test_a_tool_use_template_beside_chat_template_jinja(tmp_path, template_tokenizer):
    """transformers 5's layout: additional_chat_templates/tool_use.jinja renders conversations with
    tools, and is saved back with the folder."""
    from minituner.hf.tokenizer import save_tokenizer
    folder = chat_folder(tmp_path / "base", "chatml-generation", template_tokenizer)
    (folder / "additional_chat_templates").mkdir()
    tool_use = folder / "additional_chat_templates" / "tool_use.jinja"
    tool_use.write_text("TOOLS {{ tools | length }}{% for m in messages %}|{{ m.content }}{% endfor %}")
    tok = load_tokenizer(folder)
    assert template_text(tok, tools=True) == tool_use.read_text()
    assert render(tok, [{"role": "user", "content": "hi"}], tools=[{"type": "function", "function": {}}]) == "TOOLS 1|hi"
    (tmp_path / "saved").mkdir()
    save_tokenizer(tok, tmp_path / "saved")
    assert (tmp_path / "saved" / "additional_chat_templates" / "tool_use.jinja").read_text() == tool_use.read_text()


def test_special_token_names_are_the_folders_as_transformers_reads_them(tmp_path, chat_tokenizer):
    """llama-tiny's tokenizer_config.json says "bos_token": null, while config.json names a BOS id:
    a template's {{ bos_token }} is empty, as in transformers, and an export keeps the null."""
    from conftest import FIXTURES
    from minituner.hf.tokenizer import save_tokenizer
    tok = load_tokenizer(FIXTURES / "llama-tiny")
    assert tok.bos_id is not None and tok.tokenizer_config["bos_token"] is None
    tok.chat_template_file = "[{{ bos_token }}|{{ eos_token }}]"
    assert render(tok, []) == "[|<|endoftext|>]"
    save_tokenizer(tok, tmp_path)
    assert render(load_tokenizer(tmp_path), []) == "[|<|endoftext|>]"
