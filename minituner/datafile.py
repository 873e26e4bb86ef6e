"""Data files as users hand them over: text that must be UTF-8, and JSON records (a JSON array
or JSON lines, told apart by content, since `.json` files often hold JSON lines), each record
with its place, "file:line" or "file: record N", for error messages. Shared by the instruction
data reader (formats.py) and the text-corpus reader (corpus.py), with the validation split both use.
"""

import json
import random
import re
from pathlib import Path

from minituner.errors import OptionError, UserError

MAX_REASONS = 3  # how many skipped records a report quotes
# How compressed files begin (their magic numbers), so that one is not reported as text that is
# not UTF-8: (kind, the command that decompresses it).
COMPRESSED = {rb"\x1f\x8b": ("gzip", "gunzip"), rb"PK\x03\x04": ("zip", "unzip"), rb"\x28\xb5\x2f\xfd": ("zstd", "unzstd"),
              rb"BZh[1-9]1AY&SY": ("bzip2", "bunzip2"), rb"\xfd7zXZ\x00": ("xz", "unxz")}


def read_text(path: Path, expected: str = "a UTF-8 text file") -> str:
    """The file's text with "\\n" line endings; a UserError if it is missing, a folder,
    compressed, not UTF-8 or empty. `expected` says what the file should be, for the errors."""
    if path.is_dir():
        raise UserError(f"{path}: is a folder; expected {expected}")
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    raw = path.read_bytes()
    check_not_compressed(path, raw[:16], expected)
    try:
        text = raw.decode("utf-8-sig")  # -sig: a byte-order mark from Windows editors is not text
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 (byte 0x{raw[e.start]:02x}); convert the file first, "
                        f"e.g. iconv -f latin1 -t utf-8 {path.name} > utf8-{path.name}") from None
    if not text.strip():
        raise UserError(f"{path}: empty file")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def check_not_compressed(path: Path, head: bytes, expected: str) -> None:
    """A UserError naming the compression if the file beginning with `head` is compressed."""
    for magic, (kind, tool) in COMPRESSED.items():
        if re.match(magic, head):
            raise UserError(f"{path}: is a {kind}-compressed file; decompress it first (e.g. {tool} {path.name}); "
                            f"expected {expected}")


def json_records(path: Path, text: str) -> list[tuple[str, object]]:
    """(where, record) for each record of a JSON array or JSON lines. A line that is not valid JSON
    comes back as (where, UserError): the caller raises it, or skips and counts it, in its turn,
    so the first bad record in the file is the one reported."""
    start = text.lstrip()[:1]
    if start == "[":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
        return [(f"{path}: record {i}", record) for i, record in enumerate(data, 1)]
    if start != "{":
        raise UserError(f"{path}: expected a JSON array or JSON lines of objects, found {start!r} first")
    if "\n" in text.strip():  # one object written over several lines is one record, not broken JSON lines
        try:
            return [(f"{path}: record 1", json.loads(text))]
        except json.JSONDecodeError:
            pass
    records = []
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            records.append((f"{path}:{n}", json.loads(line)))
        except json.JSONDecodeError as e:
            records.append((f"{path}:{n}", UserError(f"invalid JSON at column {e.colno}: {e.msg}")))
    return records


def note_skip(report: dict, reason: str) -> None:
    """Count a skipped record in report["skipped_bad"], quoting the first few in report["reasons"]."""
    report["skipped_bad"] += 1
    if len(report["reasons"]) < MAX_REASONS:
        report["reasons"].append(reason)


def type_name(value) -> str:
    """How an error message names a JSON value's type."""
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


def check_fraction(fraction: float) -> None:
    """The share of the data held out for validation: from 0 (none) up to, not including, 1."""
    if not 0 <= fraction < 1:
        raise OptionError("val_fraction", f"{fraction}: must be at least 0 and below 1")


def split_validation(items: list, fraction: float, seed: int, what: str = "examples") -> tuple[list, list]:
    """(train, val): a random `fraction` of `items` held out, the same for the same seed.

    Both keep the items' order. A fraction > 0 holds out at least one item when there are two or
    more, so that asking for validation never silently gives none.
    """
    check_fraction(fraction)
    n_val = round(len(items) * fraction)
    if fraction > 0 and n_val == 0 and len(items) >= 2:
        n_val = 1
    if n_val >= len(items):
        raise UserError(f"holding out {n_val} of {len(items)} {what} for validation leaves none to train on; "
                        "lower the validation fraction or add data")
    held = set(random.Random(seed).sample(range(len(items)), n_val))
    train = [item for i, item in enumerate(items) if i not in held]
    val = [item for i, item in enumerate(items) if i in held]
    return train, val
