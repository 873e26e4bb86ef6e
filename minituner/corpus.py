"""Plain text for fine-tuning on a domain: documents read from files, a validation split by
document, and the token blocks every token of which is trained.

Where documents come from:
  .txt / .md     paragraphs: a document ends at one or more blank lines (lines holding only
                 whitespace count as blank; Windows and old Mac line endings are read as "\\n").
                 One file has to be cut somewhere to hold documents out for validation.
  a folder       one document per .txt or .md file below it, recursively, in sorted path order:
                 an article, a chapter or a README stays whole (headings and code blocks are not
                 documents of their own), and the validation split holds out whole files. Hidden
                 files and folders (a name starting with ".") are left out.
  .jsonl / .json one document per record, the string under a named field ("text" by default); a
                 file is a JSON array of objects or JSON lines, told apart by its first character.

How documents become examples (`build_blocks`): each document is the tokenizer's prefix (BOS, if
it adds one), its text, and EOS, so the model learns where a document ends. Then either
  concat  the documents run on as one stream cut into blocks of max_len tokens, as in Hugging
          Face's run_clm (`group_texts`). Nothing is padded; the model sees EOS followed by the
          next document and learns to start afresh, as in pretraining. The first token of each
          block is context only (nothing before it predicts it): 1 token in max_len. (Should the
          last block hold a single token, the one before it gives up its last token to it.)
          With isolation, each block also carries "document_ids" and "position_ids", as a packed
          row does (minituner/batching.py): a token attends only to its own document, positions
          restart at 0, and no token is predicted from the document before it.
  rows    one document per row, a long document split over consecutive rows of at most max_len
          (no text is thrown away); pad_collate pads the rows of a batch.
"""

import random
import re
from collections import Counter
from pathlib import Path

from minituner.batching import check_row_length
from minituner.datafile import check_fraction, check_not_compressed, json_records, note_skip, read_text, type_name
from minituner.errors import UserError
from minituner.loss import IGNORE_INDEX

TEXT_SUFFIXES = (".txt", ".md")
JSON_SUFFIXES = (".jsonl", ".json")
LAYOUTS = ("concat", "rows")
_BLANK_LINES = re.compile(r"\n\s*\n")  # greedy: any run of blank lines is one break; the next line keeps its indent


# ----------------------------------------------------------------------------- reading documents
def read_documents(path, *, text_field: str = "text", skip_bad: bool = False) -> tuple[list[str], dict]:
    """Documents of a .txt/.md file (paragraphs, split at blank lines), a folder of them, or a
    .jsonl/.json file (the field `text_field` of each record); and a report: counts, the first
    skip reasons and "warnings", the lines to print about what was skipped.

    skip_bad: skip and count a malformed record (JSON) or an unreadable file (in a folder)
    instead of raising a UserError on the first one.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    report = {"path": str(path), "files": 0, "documents": 0,
              "skipped_bad": 0,  # malformed records, or unreadable files of a folder
              "skipped_unit": "file" if path.is_dir() else "record",
              "reasons": [],  # the first few skipped (datafile.MAX_REASONS), with their place
              "warnings": []}
    docs = _read_folder(path, skip_bad, report) if path.is_dir() else _read_file(path, text_field, skip_bad, report)
    skipped = f"{report['skipped_bad']} bad {report['skipped_unit']}(s) ({'; '.join(report['reasons'])})"
    if not docs:
        raise UserError(f"{path}: no documents" + (f"; skipped {skipped}" if report["skipped_bad"] else ""))
    report["documents"] = len(docs)
    report["warnings"] = [f"{path}: skipped {skipped}"] if report["skipped_bad"] else []
    return docs, report


def _read_folder(folder: Path, skip_bad: bool, report: dict) -> list[str]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not files:
        raise UserError(f"{folder}: no .txt or .md files in this folder")
    docs = []
    for file in files:
        try:
            docs.append(read_text(file).strip("\n"))
        except UserError as e:
            if not skip_bad:
                raise
            note_skip(report, str(e))
        else:
            report["files"] += 1
    return docs


def _read_file(path: Path, text_field: str, skip_bad: bool, report: dict) -> list[str]:
    suffix = path.suffix.lower()
    expected = "a .txt, .md, .jsonl or .json file, or a folder of .txt/.md files"
    if suffix not in TEXT_SUFFIXES + JSON_SUFFIXES:
        if path.is_file():
            with open(path, "rb") as f:
                check_not_compressed(path, f.read(16), expected)
        raise UserError(f"{path}: expected {expected}")
    text = read_text(path, expected)
    report["files"] = 1
    if suffix in TEXT_SUFFIXES:
        return paragraphs(text)
    docs = []
    for where, record in json_records(path, text):
        try:
            docs.append(_record_text(record, text_field))
        except UserError as e:
            if not skip_bad:
                raise UserError(f"{where}: {e}") from None
            note_skip(report, f"{where}: {e}")
    return docs


def paragraphs(text: str) -> list[str]:
    """The paragraphs of `text` ("\\n" line endings): runs of lines between blank lines."""
    # Blank lines opening the text are dropped, but not the indent of its first line.
    pieces = (re.sub(r"^\s*\n", "", piece).rstrip() for piece in _BLANK_LINES.split(text))
    return [piece for piece in pieces if piece]


def _record_text(record, field: str) -> str:
    """The document under `field` of one record; a UserError (without its place) if there is none."""
    if isinstance(record, UserError):  # a line that did not parse
        raise record
    if not isinstance(record, dict):
        raise UserError(f"expected a JSON object, found {type_name(record)}")
    if field not in record:
        raise UserError(f'field "{field}" is missing (name the field that holds the text: text_field, --text-field)')
    value = record[field]
    if not isinstance(value, str):
        raise UserError(f'field "{field}" should be a string, found {type_name(value)}')
    if not value.strip():
        raise UserError(f'field "{field}" is empty')
    return value.replace("\r\n", "\n").replace("\r", "\n")  # as in text files


# ----------------------------------------------------------------------------- validation split
def split_documents(docs: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train_docs, val_docs): about `fraction` of the documents held out, the same for the same
    seed, both in corpus order.

    The split is by document text: every copy of a held-out text is held out, so no validation
    text is ever trained on even when a corpus repeats a paragraph. Texts are taken in a seeded
    order while their copies fit the share asked for, so a text repeated 500 times (a footer)
    is not held out on its own. A fraction > 0 holds out at least one text when there are two
    or more, so that asking for validation never gives none.
    """
    counts = Counter(docs)  # distinct texts, first occurrence first
    texts = list(counts)
    check_fraction(fraction)
    order = list(texts)
    random.Random(seed).shuffle(order)
    target = round(len(docs) * fraction)
    held, n_held = set(), 0
    for text in order:
        if n_held + counts[text] <= target:
            held.add(text)
            n_held += counts[text]
    if fraction > 0 and not held and len(texts) >= 2:
        held.add(min(texts, key=lambda t: counts[t]))  # the least repeated text, not nothing
    if len(held) == len(texts):
        raise UserError(f"holding out all {len(texts)} distinct documents for validation leaves none to train on; "
                        "lower the validation fraction or add documents")
    return [d for d in docs if d not in held], [d for d in docs if d in held]


# ----------------------------------------------------------------------------- token blocks
def document_tokens(doc: str, tokenizer) -> list[int]:
    """The tokens one document trains on: the tokenizer's prefix (BOS, if any), the text, EOS."""
    return tokenizer.prefix_ids + tokenizer.encode_text(doc) + [tokenizer.eos_id]


def build_blocks(docs: list[str], tokenizer, *, max_len: int, layout: str = "concat",
                 isolate: bool = False) -> tuple[list[dict], dict]:
    """Training examples of `docs` (see the module docstring for the layouts), and their stats.

    Every token is a target (labels == input_ids; the loss does the shift), except, with
    isolate=True, the first token of each document inside a block, which would be predicted from
    the document before it. stats: documents, examples, tokens, and target_tokens, the positions
    the loss counts (labels[1:] not IGNORE_INDEX).
    """
    if tokenizer.eos_id is None:
        raise UserError("the tokenizer has no end-of-text token; name one as eos_token in tokenizer_config.json")
    if layout not in LAYOUTS:
        raise UserError(f'layout "{layout}" is not one of {", ".join(LAYOUTS)}')
    check_row_length(max_len)  # see _spans: a piece shortened by one token must keep a target
    if isolate and layout != "concat":
        raise UserError('isolating documents applies to the "concat" layout; "rows" holds one document per row')
    tokenised = [document_tokens(doc, tokenizer) for doc in docs]
    examples = _concat_blocks(tokenised, max_len, isolate) if layout == "concat" else _rows(tokenised, max_len)
    tokens = sum(len(e["input_ids"]) for e in examples)
    assert tokens == sum(map(len, tokenised)), "every token of every document is in exactly one example"
    stats = {"documents": len(docs), "examples": len(examples), "tokens": tokens,
             "target_tokens": sum(label != IGNORE_INDEX for e in examples for label in e["labels"][1:])}
    return examples, stats


def _spans(n: int, max_len: int) -> list[tuple[int, int]]:
    """(start, end) of consecutive pieces of n >= 2 tokens, each at most max_len >= 3 long and at
    least 2: a lone last token would have nothing in its piece to be predicted from, so the piece
    before it ends one token early and the two go together."""
    starts = list(range(0, n, max_len))
    if len(starts) > 1 and n - starts[-1] == 1:
        starts[-1] -= 1
    return list(zip(starts, starts[1:] + [n]))


def _concat_blocks(tokenised: list[list[int]], max_len: int, isolate: bool) -> list[dict]:
    stream = [t for ids in tokenised for t in ids]
    owner = [d for d, ids in enumerate(tokenised) for _ in ids]  # which document each token of the stream is from
    blocks = []
    for start, end in _spans(len(stream), max_len):
        ids = stream[start:end]
        blocks.append(_isolated(ids, owner[start:end]) if isolate else {"input_ids": ids, "labels": list(ids)})
    return blocks


def _isolated(ids: list[int], owner: list[int]) -> dict:
    """A block whose document pieces do not see each other: numbered documents, positions from 0
    for each piece, and no target at a piece's first token (position 0 is never a target anyway)."""
    block = {"input_ids": ids, "labels": [], "document_ids": [], "position_ids": []}
    position = 0
    for j, token in enumerate(ids):
        starts = j == 0 or owner[j] != owner[j - 1]
        position = 0 if starts else position + 1
        block["labels"].append(IGNORE_INDEX if starts and j > 0 else token)
        block["document_ids"].append(owner[j] - owner[0])  # 0, 1, ... within the block
        block["position_ids"].append(position)
    return block


def _rows(tokenised: list[list[int]], max_len: int) -> list[dict]:
    rows = []
    for ids in tokenised:
        for start, end in _spans(len(ids), max_len):  # consecutive pieces: a long document is split, not cut
            rows.append({"input_ids": ids[start:end], "labels": ids[start:end]})
    return rows


# ----------------------------------------------------------------------------- prompts for samples
def sample_prompts(docs: list[str], tokenizer, n: int, prompt_tokens: int = 16) -> list[list[int]]:
    """Prompts to continue before and after training: the prefix (BOS, if any) and the first
    `prompt_tokens` text tokens of each of the first `n` documents."""
    return [tokenizer.prefix_ids + tokenizer.encode_text(doc)[:prompt_tokens]
            for doc in docs[:n]]
