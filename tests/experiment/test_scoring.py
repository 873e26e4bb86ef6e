"""Exact-match scoring: what counts as right (whitespace, sentence end, stop token), and cloze
files' errors."""

import json

import pytest

from minituner.errors import UserError
from minituner.experiment import scoring


class FakeTokenizer:
    prefix_ids, eos_id, stop_ids = [], 0, [0]

    def encode_text(self, text):
        return [1]


def test_exact_match_compares_stripped_replies(monkeypatch, chat_tokenizer):
    replies = iter([[" pmal\n", "pmal.", "PMAL"]])
    monkeypatch.setattr(scoring, "greedy_texts", lambda *a, **k: next(replies))
    convs = [[{"role": "user", "content": "Reverse lamp."}, {"role": "assistant", "content": "pmal"}]] * 3
    result = scoring.exact_match(None, chat_tokenizer, "chatml", convs, max_new_tokens=8)
    assert result["hits"] == [True, False, False] and result["accuracy"] == pytest.approx(1 / 3)


def test_cloze_takes_the_first_sentence_of_the_continuation(monkeypatch):
    monkeypatch.setattr(scoring, "greedy_texts", lambda *a, **k: [" Orlen. Tom keeps a cat.", " Orlen town.",
                                                                  " Orl", "\nOrlen"])
    items = [{"prompt": "Tom lives in", "answer": "Orlen"}] * 4
    result = scoring.cloze_accuracy(None, FakeTokenizer(), items)
    assert result["hits"] == [True, False, False, False] and result["n"] == 4


def test_read_cloze_names_the_line_and_field(tmp_path):
    path = tmp_path / "cloze.jsonl"
    path.write_text(json.dumps({"prompt": "a", "answer": "b"}) + "\n" + json.dumps({"prompt": "a"}) + "\n")
    with pytest.raises(UserError, match=r"cloze.jsonl:2.*\"answer\" must be a non-empty string \(missing\)"):
        scoring.read_cloze(path)
    path.write_text(json.dumps({"prompt": 3, "answer": "b"}) + "\n")
    with pytest.raises(UserError, match=r"\"prompt\" must be a non-empty string \(a number\)"):
        scoring.read_cloze(path)
    path.write_text('{"prompt": "a", "answer": "b"}\n{oops\n')
    with pytest.raises(UserError, match=r"cloze.jsonl:2"):
        scoring.read_cloze(path)
    path.write_text(json.dumps({"prompt": "a", "answer": "b"}) + "\n")
    assert scoring.read_cloze(path) == [{"prompt": "a", "answer": "b"}]


def test_spread_keeps_every_part_of_a_set_written_part_by_part():
    families = [f"{family}-{i}" for family in "abcde" for i in range(4)]  # 5 families of 4, in order
    assert scoring.spread(families, 0) == families and scoring.spread(families, 50) == families
    five = scoring.spread(families, 5)
    assert len(five) == 5 and {item[0] for item in five} == set("abcde")
