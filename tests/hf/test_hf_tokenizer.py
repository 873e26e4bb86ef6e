"""The tokenizer files of a Hugging Face folder: special tokens from tokenizer_config.json,
special_tokens_map.json, generation_config.json and config.json; BOS from the post-processor;
what save writes and reload reads back; broken files named."""

import json
import shutil

import pytest
from tokenizers import processors

from conftest import FIXTURES
from minituner.errors import UserError
from minituner.hf.tokenizer import load_tokenizer, save_tokenizer

TEXT = "Hello world! Ünïcödé, emoji 🙂 and\ttabs\n\nnew lines."


def copy_fixture(tmp_path, name="llama-tiny"):
    folder = tmp_path / name
    shutil.copytree(FIXTURES / name, folder)
    return folder


def edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_bos_comes_from_the_post_processor(tmp_path):
    """Llama tokenizer.json files add <s> / <|begin_of_text|> with a TemplateProcessing step."""
    folder = copy_fixture(tmp_path)
    tok = load_tokenizer(folder)
    tok.backend.post_processor = processors.TemplateProcessing(single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)])
    tok.backend.save(str(folder / "tokenizer.json"))
    edit_json(folder / "tokenizer_config.json", bos_token="<|im_start|>")
    tok = load_tokenizer(folder)
    assert tok.bos_id == 1 and tok.prefix_ids == [1]
    assert tok.encode("hi") == [1] + tok.encode("hi", add_special_tokens=False)


def test_without_post_processor_add_bos_token_is_honoured(tmp_path):
    folder = copy_fixture(tmp_path)
    edit_json(folder / "tokenizer_config.json", bos_token="<|im_start|>", add_bos_token=True, add_eos_token=True)
    tok = load_tokenizer(folder)
    assert tok.encode("hi") == [1] + tok.encode("hi", add_special_tokens=False) + [0]


def test_every_eos_of_generation_config_stops(tmp_path):
    """Llama 3 instruct: eos <|eot_id|> in the tokenizer, several eos ids in generation_config.json."""
    folder = copy_fixture(tmp_path)
    edit_json(folder / "generation_config.json", eos_token_id=[0, 2])
    edit_json(folder / "tokenizer_config.json", eos_token={"content": "<|im_end|>", "special": True})
    tok = load_tokenizer(folder)
    assert tok.eos_id == 2 and tok.stop_ids == [0, 2]


def test_special_tokens_map_is_read_when_tokenizer_config_is_silent(tmp_path):
    folder = copy_fixture(tmp_path)
    (folder / "tokenizer_config.json").write_text("{}")
    (folder / "special_tokens_map.json").write_text('{"eos_token": {"content": "<|im_end|>"}, "bos_token": "<|im_start|>"}')
    tok = load_tokenizer(folder)
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    (folder / "special_tokens_map.json").write_text('{"eos_token": "<nope>"}')
    with pytest.raises(UserError, match=r"special_tokens_map\.json: eos_token '<nope>' is not in"):
        load_tokenizer(folder)


def test_ids_fall_back_to_config_json(tmp_path):
    folder = copy_fixture(tmp_path)
    edit_json(folder / "tokenizer_config.json", eos_token=None, pad_token=None)
    (folder / "generation_config.json").unlink()
    edit_json(folder / "config.json", eos_token_id=2, pad_token_id=1)
    tok = load_tokenizer(folder)
    assert (tok.eos_id, tok.pad_id, tok.stop_ids) == (2, 1, [2])


def test_save_and_reload_keep_special_tokens_and_chat_template(tmp_path):
    folder = copy_fixture(tmp_path)
    (folder / "chat_template.jinja").write_text("{{ messages }}")
    edit_json(folder / "tokenizer_config.json", chat_template="{{ inline }}", bos_token="<|im_start|>")
    tok = load_tokenizer(folder)
    out = tmp_path / "out"
    out.mkdir()
    save_tokenizer(tok, out)
    again = load_tokenizer(out)
    assert (again.bos_id, again.eos_id, again.pad_id, again.stop_ids) == (tok.bos_id, tok.eos_id, tok.pad_id, tok.stop_ids)
    assert again.encode(TEXT) == tok.encode(TEXT)
    assert (out / "chat_template.jinja").read_text() == "{{ messages }}"
    assert again.tokenizer_config["chat_template"] == "{{ inline }}"


def test_missing_tokenizer_json_says_what_to_do(tmp_path):
    folder = copy_fixture(tmp_path)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(UserError, match=r"llama-tiny: no tokenizer\.json.*save_pretrained"):
        load_tokenizer(folder)


@pytest.mark.parametrize("file, content, message", [
    ("generation_config.json", '{"eos_token_id": 2.0}', r"generation_config\.json: eos_token_id should be a token id or a list"),
    ("generation_config.json", "[1, 2]", r"generation_config\.json: expected a JSON object, found a list"),
    ("tokenizer_config.json", '{"bos_token": 5}', r"tokenizer_config\.json: bos_token should be a token string, got 5"),
])
def test_wrong_types_in_token_configs_name_file_and_field(tmp_path, file, content, message):
    folder = copy_fixture(tmp_path)
    (folder / file).write_text(content)
    with pytest.raises(UserError, match=message):
        load_tokenizer(folder)


def test_broken_tokenizer_files_name_the_file(tmp_path):
    folder = copy_fixture(tmp_path)
    (folder / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(UserError, match=r"tokenizer_config\.json: invalid JSON at line 1"):
        load_tokenizer(folder)
    (folder / "tokenizer_config.json").write_text('{"eos_token": "<nope>"}')
    with pytest.raises(UserError, match=r"tokenizer_config\.json: eos_token '<nope>' is not in tokenizer\.json"):
        load_tokenizer(folder)
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    with pytest.raises(UserError, match=r"tokenizer\.json: not a readable tokenizer\.json"):
        load_tokenizer(folder)
