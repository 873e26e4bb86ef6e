"""The one exception type for mistakes in what a user gave us: a file, a field, a flag.

Every module may raise it; the command-line entry points catch it and print its message as a
single line without a traceback. Bugs in minituner itself stay ordinary exceptions (or
asserts) so that they do show a traceback. `read_json` lives here because turning a broken
file into such an error is all it adds to json.loads.
"""

import json
from pathlib import Path


class UserError(Exception):
    """A user's input is wrong; the message names the file, line, field or flag and the problem."""


def read_json(path) -> dict | None:
    """The JSON object in the file at `path`, or None if there is no such file. Bad JSON, or JSON
    that is not an object (every model-folder file is one), is a UserError."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot be read ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object, found a {type(data).__name__}")
    return data
