"""Tokenizer: text round-trips, special-token strings become single ids, a byte-level BPE trained
on a corpus is lossless (reading and writing a folder's files: tests/hf/test_hf_tokenizer.py)."""


import pytest

from conftest import FIXTURES
from minituner.errors import UserError
from minituner.hf.tokenizer import load_tokenizer, save_tokenizer
from minituner.tokenizer import Tokenizer

TEXT = "Hello world! Ünïcödé, emoji 🙂 and\ttabs\n\nnew lines."


def test_fixture_tokenizer_round_trips_text():
    tok = load_tokenizer(FIXTURES / "llama-tiny")
    assert tok.vocab_size == 384
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert tok.encode(TEXT) == tok.encode(TEXT, add_special_tokens=False)  # its post-processor adds nothing
    assert (tok.eos_id, tok.stop_ids) == (0, [0])


def test_special_tokens_in_text_become_single_ids():
    tok = load_tokenizer(FIXTURES / "llama-tiny")
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == tok.token_to_id("<|im_start|>") == 1 and ids[-1] == tok.token_to_id("<|im_end|>") == 2
    assert tok.decode(ids) == "user\nhi"
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>"


def test_trained_bpe_is_lossless_and_reloads(tmp_path, shakespeare):
    tok = Tokenizer.train_bpe([shakespeare], vocab_size=400)
    assert tok.vocab_size == 400
    assert [tok.id_to_token(i) for i in range(3)] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert (tok.eos_id, tok.pad_id, tok.bos_id) == (0, 0, None)
    for text in (TEXT, shakespeare[:500], "unseen words: zyxwvq 12345"):
        assert tok.decode(tok.encode(text)) == text  # byte-level: nothing is out of vocabulary
    assert len(tok.encode(shakespeare)) < len(shakespeare.encode()) * 0.6  # merges were learned
    save_tokenizer(tok, tmp_path)
    again = load_tokenizer(tmp_path)
    assert again.encode(shakespeare[:2000]) == tok.encode(shakespeare[:2000]) and again.stop_ids == [0]


def test_too_small_bpe_vocabulary_is_refused():
    with pytest.raises(UserError, match="vocab size 100 is too small: a byte-level BPE needs at least 259"):
        Tokenizer.train_bpe(["abc"], vocab_size=100)


def test_from_dir_reads_a_model_folders_tokenizer_as_load_tokenizer_does():
    folder = FIXTURES / "llama-tiny"
    text = "Hello <|im_start|>world"
    assert Tokenizer.from_dir(folder).encode(text) == load_tokenizer(folder).encode(text)
