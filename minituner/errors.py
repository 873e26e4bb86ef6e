"""The one exception type for mistakes in what a user gave us (a file, a field, an option), and
the one way every command turns it into a single line on stderr.

Every module may raise UserError; library code names options as Python does (`batch_size`), and
an OptionError carries that name so that a command line can show its flag (`--batch-size`).
Bugs in minituner itself stay ordinary exceptions (or asserts), so that they do show a
traceback. `read_json` lives here because turning a broken file into such an error is all it
adds to json.loads.
"""

import errno
import json
import re
import sys
from pathlib import Path


class UserError(Exception):
    """A user's input is wrong; the message names the file, line, field or option and the problem."""


class OptionError(UserError):
    """A bad value of one named option (a TrainOptions field, a keyword argument); `related`
    names the other options its problem mentions."""

    def __init__(self, option: str, problem: str, related: tuple[str, ...] = ()):
        self.option, self.problem, self.related = option, problem, related
        super().__init__(f"{option} {problem}")

    def as_flag(self, flags: dict[str, str]) -> str:
        """The message with the options shown as their command-line flags (`flags` maps the names
        whose flag is not simply --the-name)."""
        def flag(name):
            return flags.get(name, "--" + name.replace("_", "-"))
        problem = self.problem
        for name in self.related:  # whole words only
            problem = re.sub(rf"\b{re.escape(name)}\b", flag(name), problem)
        return f"{flag(self.option)} {problem}"


def run_command(main, argv=None, flags: dict[str, str] | None = None) -> int:
    """Call main(argv) as a command: a UserError is one line on stderr and exit status 2 (an
    option named as its flag, see OptionError), Ctrl-C outside the training loop (which stops
    at the next step itself) exit status 130, a full disk one line and exit status 1."""
    try:
        return main(argv)
    except OptionError as e:
        print(f"error: {e.as_flag(flags or {})}", file=sys.stderr)
        return 2
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # a full disk while writing a log line or a sample: checkpoints are written atomically
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"error: the disk is full ({e.filename or e}); free some space, then resume the run (or start it "
              "again if it has no checkpoint yet)", file=sys.stderr)
        return 1


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
