"""Text corpora for fine-tuning: documents read with located errors, a split by document, and
blocks in which every token of every document trains (and nothing crosses a boundary when
isolated)."""

import json

import pytest
import torch

from conftest import DATA, FIXTURES
from minituner.batching import pad_collate
from minituner.corpus import build_blocks, document_tokens, paragraphs, read_documents, sample_prompts, split_documents
from minituner.errors import UserError
from minituner.hf.folder import load_pretrained
from minituner.loss import IGNORE_INDEX, lm_loss_sum, target_count
from minituner.tokenizer import Tokenizer

EOS = "<|endoftext|>"
BOS = "<|begin_of_text|>"


@pytest.fixture(scope="module")
def docs():
    return read_documents(DATA / "tinyshakespeare_head.txt")[0]


@pytest.fixture(params=["chat_tokenizer", "bos_tokenizer"])
def tokenizer(request):
    """Both kinds of tokenizer: without a BOS, and with one that encode() puts first."""
    return request.getfixturevalue(request.param)


def write(tmp_path, name, text):
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(*records):
    return "".join(json.dumps(r) + "\n" for r in records)


def expected_text(docs, tokenizer):
    """What the blocks of `docs` decode to: each document after its BOS (if any) and before EOS."""
    bos = BOS if tokenizer.prefix_ids else ""
    return "".join(bos + doc + EOS for doc in docs)


def decoded(examples, tokenizer):
    return tokenizer.decode([t for e in examples for t in e["input_ids"]], skip_special_tokens=False)


# ----------------------------------------------------------------------------- reading
def test_text_file_documents_are_paragraphs(tmp_path):
    text = "\r\n\r\nFirst line\r\nsame paragraph\r\n\r\n \t\r\n\r\n  indented second\r\nmore  \r\n\r\nthird\r\n"
    path = tmp_path / "notes.txt"
    path.write_bytes(text.encode("utf-8"))
    docs, report = read_documents(path)
    assert docs == ["First line\nsame paragraph", "  indented second\nmore", "third"]
    assert (report["files"], report["documents"], report["skipped_bad"], report["warnings"]) == (1, 3, 0, [])


def test_shakespeare_speeches_are_documents(docs, shakespeare):
    assert docs[0] == "First Citizen:\nBefore we proceed any further, hear me speak."
    assert docs[1] == "All:\nSpeak, speak."
    assert docs == paragraphs(shakespeare)
    assert all(doc in shakespeare for doc in docs)


def test_folder_reads_text_files_recursively_in_path_order(tmp_path):
    write(tmp_path, "b.txt", "bee\n\nbee two\n")
    write(tmp_path, "a.md", "# A\n")
    write(tmp_path, "sub/c.txt", "sea\n")
    write(tmp_path, "notes.csv", "not,read\n")
    write(tmp_path, ".hidden/d.txt", "hidden\n")
    docs, report = read_documents(tmp_path)
    assert docs == ["# A", "bee\n\nbee two", "sea"]  # one document per file: a file's paragraphs stay together
    assert report["files"] == 3


def test_jsonl_documents_come_from_the_named_field():
    records = [json.loads(line) for line in (DATA / "gsm8k_head.jsonl").read_text(encoding="utf-8").splitlines()]
    docs, report = read_documents(DATA / "gsm8k_head.jsonl", text_field="question")
    assert docs == [r["question"] for r in records]
    assert (report["documents"], report["warnings"]) == (20, [])


def test_json_array_of_objects(tmp_path):
    path = write(tmp_path, "data.json", json.dumps([{"text": "one"}, {"text": "two\n\nstill two"}]))
    assert read_documents(path)[0] == ["one", "two\n\nstill two"]  # a record is never split at blank lines


# ----------------------------------------------------------------------------- reading errors
def error_of(path, **kwargs) -> str:
    with pytest.raises(UserError) as e:
        read_documents(path, **kwargs)
    return str(e.value)


def test_empty_file(tmp_path):
    assert error_of(write(tmp_path, "notes.txt", "  \n\n\t\n")) == f"{tmp_path / 'notes.txt'}: empty file"


def test_undecodable_bytes_name_the_line(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes(b"fine\n\nstill fine\ncaf\xe9\n")
    message = error_of(path)
    assert message.startswith(f"{path}:4: not UTF-8 (byte 0xe9)") and "iconv" in message


def test_missing_field_names_the_line_and_the_flag(tmp_path):
    path = write(tmp_path, "data.jsonl", jsonl({"text": "a"}, {"content": "b"}))
    assert error_of(path) == f'{path}:2: field "text" is missing (name the field that holds the text: text_field, --text-field)'


def test_field_not_a_string(tmp_path):
    path = write(tmp_path, "data.jsonl", jsonl({"text": ["a", "b"]}))
    assert error_of(path) == f'{path}:1: field "text" should be a string, found a list'


def test_empty_field(tmp_path):
    path = write(tmp_path, "data.jsonl", jsonl({"body": "a"}, {"body": " "}))
    assert error_of(path, text_field="body") == f'{path}:2: field "body" is empty'


def test_invalid_json_line(tmp_path):
    path = write(tmp_path, "data.jsonl", jsonl({"text": "a"}) + '{"text": "b",}\n')
    assert error_of(path).startswith(f"{path}:2: invalid JSON at column 14")


def test_record_not_an_object(tmp_path):
    path = write(tmp_path, "data.jsonl", jsonl({"text": "a"}, "just a string"))
    assert error_of(path) == f"{path}:2: expected a JSON object, found a string"


def test_folder_without_text_files(tmp_path):
    write(tmp_path, "data.csv", "a,b\n")
    assert error_of(tmp_path) == f"{tmp_path}: no .txt or .md files in this folder"


def test_missing_path_and_unknown_suffix(tmp_path):
    assert error_of(tmp_path / "nope.txt") == f"{tmp_path / 'nope.txt'}: no such file or folder"
    assert "expected a .txt, .md, .jsonl or .json file" in error_of(write(tmp_path, "data.csv", "a\n"))


def test_skip_bad_counts_records_and_quotes_the_first_reasons(tmp_path):
    lines = jsonl({"text": "one"}, {"x": 1}, {"text": 2}, {"text": "two"}, {"text": ""}) + "{oops\n"
    path = write(tmp_path, "data.jsonl", lines)
    docs, report = read_documents(path, skip_bad=True)
    assert docs == ["one", "two"]
    assert (report["documents"], report["skipped_bad"], len(report["reasons"])) == (2, 4, 3)
    assert report["reasons"][0] == f'{path}:2: field "text" is missing (name the field that holds the text: text_field, --text-field)'
    assert report["warnings"] == [f"{path}: skipped 4 bad record(s) ({'; '.join(report['reasons'])})"]


def test_skip_bad_skips_unreadable_files_of_a_folder(tmp_path):
    write(tmp_path, "a.txt", "alpha\n")
    write(tmp_path, "b.txt", "\n\n")
    (tmp_path / "c.txt").write_bytes(b"\xff\n")
    docs, report = read_documents(tmp_path, skip_bad=True)
    assert docs == ["alpha"]
    assert (report["files"], report["skipped_bad"]) == (1, 2)
    assert report["warnings"][0].startswith(f"{tmp_path}: skipped 2 bad file(s) ({tmp_path / 'b.txt'}: empty file; ")
    with pytest.raises(UserError, match="b.txt: empty file"):
        read_documents(tmp_path)


def test_skip_bad_with_nothing_left_is_an_error(tmp_path):
    path = write(tmp_path, "data.jsonl", jsonl({"x": 1}, {"x": 2}))
    assert error_of(path, skip_bad=True).startswith(f"{path}: no documents; skipped 2 bad record(s) ({path}:1: ")
    assert error_of(write(tmp_path, "empty.json", "[]")) == f"{tmp_path / 'empty.json'}: no documents"


# ----------------------------------------------------------------------------- validation split
def test_split_is_by_document_deterministic_and_disjoint(docs):
    train, val = split_documents(docs, 0.1, seed=3)
    assert (train, val) == split_documents(docs, 0.1, seed=3)
    assert split_documents(docs, 0.1, seed=4)[1] != val
    assert len(val) == round(len(docs) * 0.1) and not set(train) & set(val)
    assert sorted(train + val) == sorted(docs)
    assert train == [d for d in docs if d in set(train)]  # corpus order kept


def test_split_edges():
    assert split_documents(["a", "b", "c"], 0.0, seed=0) == (["a", "b", "c"], [])
    assert len(split_documents(["a", "b"], 0.01, seed=0)[1]) == 1  # asked for validation: get some
    with pytest.raises(UserError, match="leaves none to train on"):
        split_documents(["a", "b"], 0.9, seed=0)
    with pytest.raises(UserError, match="below 1"):
        split_documents(["a", "b"], 1.0, seed=0)


def test_split_holds_out_every_copy_of_a_repeated_document():
    docs = ["same", "other", "same", "third", "same"]
    for seed in range(10):
        train, val = split_documents(docs, 0.34, seed=seed)
        assert not set(train) & set(val)
        assert sorted(train + val) == sorted(docs)


def test_no_validation_text_is_trained_on(docs, tokenizer):
    train, val = split_documents(docs, 0.2, seed=0)
    for layout in ("concat", "rows"):
        trained = EOS + decoded(build_blocks(train, tokenizer, max_len=64, layout=layout)[0], tokenizer)
        for doc in val:
            assert doc + EOS not in trained  # not as a whole document,
            assert len(doc) < 200 or doc not in trained  # nor, when it is distinctive, anywhere


# ----------------------------------------------------------------------------- blocks
def test_concat_trains_every_token_and_loses_nothing(docs, tokenizer):
    blocks, stats = build_blocks(docs, tokenizer, max_len=64)
    assert all(b["labels"] == b["input_ids"] for b in blocks)
    assert all(len(b["input_ids"]) == 64 for b in blocks[:-1]) and 2 <= len(blocks[-1]["input_ids"]) <= 64
    assert set(blocks[0]) == {"input_ids", "labels"}
    assert decoded(blocks, tokenizer) == expected_text(docs, tokenizer)
    batch = pad_collate(blocks)
    assert stats == {"documents": len(docs), "examples": len(blocks), "tokens": int((batch["labels"] != -100).sum()),
                     "target_tokens": target_count(batch["labels"])}
    assert stats["target_tokens"] == stats["tokens"] - len(blocks)  # only each block's first token is context


def test_each_document_is_bos_text_eos(tokenizer):
    blocks, _ = build_blocks(["To be", "or not"], tokenizer, max_len=100)
    ids = blocks[0]["input_ids"]
    bos = tokenizer.prefix_ids
    assert ids == (bos + tokenizer.encode("To be", add_special_tokens=False) + [tokenizer.eos_id]
                   + bos + tokenizer.encode("or not", add_special_tokens=False) + [tokenizer.eos_id])


@pytest.mark.parametrize("layout", ["concat", "rows"])
def test_no_piece_is_a_lone_token(chat_tokenizer, layout):
    """A split leaving the EOS alone would leave it untrained: the piece before gives it company."""
    ids = chat_tokenizer.encode("Speak, speak.", add_special_tokens=False) + [chat_tokenizer.eos_id]
    blocks, stats = build_blocks(["Speak, speak."], chat_tokenizer, max_len=len(ids) - 1, layout=layout)
    assert [b["input_ids"] for b in blocks] == [ids[:-2], ids[-2:]]
    assert (stats["tokens"], stats["target_tokens"]) == (len(ids), len(ids) - 2)


def test_isolation_masks_exactly_the_document_starts_inside_blocks(docs, tokenizer):
    plain, _ = build_blocks(docs, tokenizer, max_len=48)
    blocks, stats = build_blocks(docs, tokenizer, max_len=48, isolate=True)
    assert [b["input_ids"] for b in blocks] == [b["input_ids"] for b in plain]
    starts = 0
    for b in blocks:
        for j, (token, label, doc, position) in enumerate(zip(b["input_ids"], b["labels"], b["document_ids"],
                                                               b["position_ids"])):
            starts_here = j == 0 or doc != b["document_ids"][j - 1]
            assert position == (0 if starts_here else b["position_ids"][j - 1] + 1)
            assert label == (IGNORE_INDEX if starts_here and j > 0 else token)
            starts += starts_here and j > 0
        assert b["document_ids"][0] == 0 and sorted(set(b["document_ids"])) == list(range(b["document_ids"][-1] + 1))
    assert stats["target_tokens"] == stats["tokens"] - len(blocks) - starts
    assert starts > len(docs) // 2  # the test saw documents starting inside blocks


def test_rows_split_long_documents_and_train_every_token(docs, tokenizer):
    rows, stats = build_blocks(docs, tokenizer, max_len=40, layout="rows")
    assert all(r["labels"] == r["input_ids"] and 2 <= len(r["input_ids"]) <= 40 for r in rows)
    assert decoded(rows, tokenizer) == expected_text(docs, tokenizer)
    longest = max(docs, key=len)
    pieces, _ = build_blocks([longest], tokenizer, max_len=40, layout="rows")
    assert len(pieces) > 2 and decoded(pieces, tokenizer) == expected_text([longest], tokenizer)
    assert all(len(p["input_ids"]) >= 39 for p in pieces[:-1])
    assert stats["examples"] == len(rows) > len(docs)
    batch = pad_collate(rows, pad_id=tokenizer.pad_id)
    assert stats["target_tokens"] == target_count(batch["labels"])


def test_bad_block_requests(chat_tokenizer):
    no_eos = Tokenizer(chat_tokenizer.backend)
    with pytest.raises(UserError, match="no end-of-text token"):
        build_blocks(["a"], no_eos, max_len=8)
    with pytest.raises(UserError, match='layout "stream"'):
        build_blocks(["a"], chat_tokenizer, max_len=8, layout="stream")
    with pytest.raises(UserError, match="a row needs at least 3 tokens"):
        build_blocks(["a"], chat_tokenizer, max_len=1)
    with pytest.raises(UserError, match="concat"):
        build_blocks(["a"], chat_tokenizer, max_len=8, layout="rows", isolate=True)


def test_isolated_blocks_give_each_piece_its_loss_alone():
    """With isolation, a document piece inside a block is scored exactly as the same tokens in a
    row of their own: nothing leaks across a boundary through attention or positions."""
    model, tok = load_pretrained(FIXTURES / "llama-tiny")
    corpus = read_documents(DATA / "tinyshakespeare_head.txt")[0][:10]
    blocks, _ = build_blocks(corpus, tok, max_len=32, isolate=True)
    batch = pad_collate(blocks[:6], pad_id=tok.pad_id)
    checked = 0
    with torch.no_grad():
        logits = model(batch["input_ids"], position_ids=batch["position_ids"], document_ids=batch["document_ids"])
        for b, block in enumerate(blocks[:6]):
            for doc in sorted(set(block["document_ids"])):
                mask = batch["document_ids"][b] == doc
                labels = torch.where(mask, batch["labels"][b], IGNORE_INDEX)[None]  # (1, T)
                piece = batch["input_ids"][b][mask][None]  # (1, n)
                if target_count(labels) == 0:
                    continue
                packed = lm_loss_sum(logits[b:b + 1], labels) / target_count(labels)
                alone = lm_loss_sum(model(piece), piece) / target_count(piece)
                assert packed.item() == pytest.approx(alone.item(), abs=1e-5)
                checked += 1
    assert checked > len(blocks[:6])  # several pieces per block


def test_sample_prompts(tokenizer):
    prompts = sample_prompts(["To be, or not to be, that is the question", "Speak"], tokenizer, n=1, prompt_tokens=3)
    assert prompts == [tokenizer.prefix_ids + tokenizer.encode("To be, or not to be", add_special_tokens=False)[:3]]


def test_special_token_strings_in_a_document_stay_text(chat_tokenizer):
    """A document quoting "<|endoftext|>" gets exactly one EOS: its own, at the end."""
    ids = document_tokens("before <|endoftext|> after", chat_tokenizer)
    assert ids.count(chat_tokenizer.eos_id) == 1 and ids[-1] == chat_tokenizer.eos_id
    assert chat_tokenizer.decode(ids[:-1], skip_special_tokens=False) == "before <|endoftext|> after"


def test_a_repeated_text_does_not_swallow_the_validation_split():
    """500 copies of a footer and 19 articles: 5 % held out means about 26 documents, so the
    footer (all copies go together) stays in training and articles are held out."""
    docs = ["Thanks for reading!"] * 500 + [f"article {i} body text" for i in range(19)]
    for seed in range(5):
        train, val = split_documents(docs, 0.05, seed)
        assert 1 <= len(val) <= 26 and "Thanks for reading!" not in val
        assert not set(train) & set(val)


def test_jsonl_line_endings_are_normalised_like_text_files(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "a\r\nb\rc"}) + "\n", encoding="utf-8")
    assert read_documents(path)[0] == ["a\nb\nc"]


def test_the_first_bad_record_is_the_one_reported(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "fine"}\n{"body": "x"}\nnot json\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"docs\.jsonl:2: field \"text\" is missing"):
        read_documents(path)
