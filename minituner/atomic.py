"""Writing files so that a crash at any moment leaves the old version or the new one, never a
half-written mixture: a JSON file through a temporary file and a rename; a folder (a model, an
adapter, a training checkpoint) through a temporary folder beside it, whose files are flushed
to disk before two renames put it in place. A rename within one filesystem is atomic.
"""

import json
import math
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path


def json_safe(value):
    """`value` with every non-finite float made None (JSON has no inf or nan; a diverged loss or
    an fp16 overflow's gradient norm is one) and anything else unknown to JSON made a string."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)  # a Path among a script's options, say


def write_json(path, data: dict) -> None:
    """Write `data` as JSON so that `path` holds either the old or the new file, never half."""
    path = Path(path)
    text = json.dumps(json_safe(data), indent=2) + "\n"
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextmanager
def staged_folder(target: Path, mode_from: str | None = None):
    """A fresh temporary folder beside `target` to write into; when the block ends without an
    error it replaces `target` (see _replace_folder), and it is removed either way. With
    `mode_from`, every file gets the mode of that file of the new folder (safetensors writes
    0600; a config.json written with the user's umask says what the folder's files should be)."""
    target = Path(target)
    tmp = new_staging(target)
    try:
        yield tmp
        land(tmp, target, mode_from)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def new_staging(target: Path) -> Path:
    """staged_folder's first half, for writers that span processes: the fresh temporary folder
    beside `target` (what an earlier, killed write left there tidied first)."""
    _clean_leftovers(target)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def land(tmp: Path, target: Path, mode_from: str | None = None) -> None:
    """staged_folder's second half: the complete folder `tmp` put at `target` (see _replace_folder)."""
    _replace_folder(tmp, target, mode_from)


def _clean_leftovers(target: Path) -> None:
    """Tidy what an earlier, killed write left beside `target`: delete its temporary folder, and
    the old folder it had moved aside once the new one reached `target`; if the kill came between
    the two renames, put the old folder back."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(tmp|old)-(\d+)")
    for leftover in target.parent.iterdir() if target.parent.is_dir() else []:
        m = pattern.fullmatch(leftover.name)
        if not m or _process_alive(int(m[2])):
            continue
        if m[1] == "old" and not target.exists():
            os.replace(leftover, target)
        else:
            shutil.rmtree(leftover, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0 checks existence only; PermissionError means another user's process
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _replace_folder(new: Path, target: Path, mode_from: str | None) -> None:
    """Put folder `new` at `target` by renames; a crash leaves the old or the new folder complete."""
    mode = (new / mode_from).stat().st_mode if mode_from else None
    for file in new.rglob("*"):  # the data must be on disk before the rename makes it visible
        if file.is_dir():  # (a sharded checkpoint's folder of slices)
            continue
        if mode is not None:
            os.chmod(file, mode)
        with open(file, "rb") as f:
            os.fsync(f.fileno())
    if not target.exists():
        os.replace(new, target)
        return
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)
    os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)
