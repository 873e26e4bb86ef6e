"""The run folder: what a run writes where, and the rule that it writes only what it owns.

    RUN/run.json          the marker, written before anything else: this folder is a minituner
                          run's (script, run id, start time), and which exports it wrote
    RUN/run.lock          held (flock) by the process that runs the run, for as long as it runs
    RUN/config.json       the run's options, written by the script that started it
    RUN/metrics.jsonl     one JSON object per logged step and per evaluation
    RUN/summary.json      the outcome, written when the run ends
    RUN/checkpoints/      training checkpoints (minituner/checkpoint.py)
    RUN/model/            what the scripts export when training ends: the trained model as a
    RUN/adapter/          Hugging Face folder, and a LoRA run's PEFT adapter
    RUN/samples.json      generations before and after training
    RUN/tokenizer/        a from-scratch run's tokenizer, trained before its first step
    RUN/data/             the built-in experiment's generated data

Write only what you own. A new run starts in a folder that does not exist or is empty, takes
its lock and writes run.json into it first; every later check reads that marker, never the mere
names of files (a user's folder may well hold a config.json). A marked folder whose lock nobody
holds, with no checkpoint and no result, is a run that died before its first checkpoint: its
files are cleared and it starts over; while its process lives the lock refuses a second run.
model/ and adapter/ are replaced only when they are this run's own export, which run.json
records by content (each file's size and a hash of its first and last MiB, so a copied run
folder is still its own), before the export is renamed into place. A run folder from before
the marker (a checkpoint and a config.json naming its script) is adopted when it is resumed.
"""

import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path

from minituner import __version__
from minituner.atomic import json_safe, write_json
from minituner.checkpoint import CHECKPOINTS, list_checkpoints
from minituner.distributed import Runtime, all_gather_object
from minituner.errors import OptionError, UserError, read_json

try:
    import fcntl  # POSIX; without it (Windows) runs are not locked
except ImportError:
    fcntl = None

MARKER = "run.json"
LOCK = "run.lock"
EXPORTS = ("model", "adapter")
RESULTS = ("summary.json", "samples.json", *EXPORTS)  # a run holding any of these has finished
# What a run that died before its first checkpoint may have left, cleared when it starts over
# (data/ only when its own marker says the built-in experiment wrote it).
DEAD_RUN_FILES = ("config.json", "metrics.jsonl", CHECKPOINTS, "tokenizer", "data")
BUILTIN_DATA_MARKER = ".minituner-builtin"  # in RUN/data/: written by the built-in experiment
_HELD = {}  # run folder (resolved) -> the open lock file this process holds


# ----------------------------------------------------------------------------- the marker and the lock
def read_marker(run_dir) -> dict | None:
    """RUN/run.json if `run_dir` carries minituner's marker, else None (a user's own run.json,
    or one that is not JSON, is not a marker)."""
    try:
        marker = read_json(Path(run_dir) / MARKER)
    except UserError:
        return None
    return marker if marker is not None and marker.get("minituner_run") == 1 else None


def is_legacy_run(run_dir) -> bool:
    """A run folder written before the marker existed: a complete training checkpoint, and a
    config.json that names the script that wrote it."""
    if read_marker(run_dir) is not None or not list_checkpoints(run_dir):
        return False
    try:
        return "script" in (read_json(Path(run_dir) / "config.json") or {})
    except UserError:
        return False


def write_marker(run_dir, marker: dict) -> None:
    write_json(Path(run_dir) / MARKER, marker)


def new_marker(script: str) -> dict:
    return {"minituner_run": 1, "script": script, "run_id": uuid.uuid4().hex,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "minituner_version": __version__, "exports": {}}


def lock_run(run_dir) -> bool:
    """Hold RUN/run.lock for this process, for as long as it runs (or until release_run): a UserError
    if another process holds it. True if it was taken now, False if this process held it already."""
    key = Path(run_dir).resolve()
    if key in _HELD or fcntl is None or not key.is_dir():  # (a missing folder is said by the caller)
        return False
    f = open(key / LOCK, "a+", encoding="utf-8")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise OptionError("run_dir", f"{shown(run_dir)} is in use by a run that is still going ({holder}); wait "
                                     "for it, or choose another run folder") from None
    except OSError:  # a filesystem without locks: go on unlocked
        f.close()
        return False
    f.seek(0)
    f.truncate()
    f.write(f"process {os.getpid()} on {os.uname().nodename}\n")
    f.flush()
    _HELD[key] = f
    return True


def release_run(run_dir) -> None:
    """Let go of RUN/run.lock (the end of a run in a process that goes on)."""
    f = _HELD.pop(Path(run_dir).resolve(), None)
    if f is not None:
        f.close()  # closing the file releases its flock


def release_all() -> None:
    """Let go of every run folder this process holds: a command that ends, but not its process
    (a test, a notebook), leaves no lock behind, whatever stopped it."""
    for key in list(_HELD):
        release_run(key)


def _in_use(run_dir: Path) -> bool:
    """Whether another process holds the run folder's lock."""
    if fcntl is None or Path(run_dir).resolve() in _HELD or not (run_dir / LOCK).is_file():
        return False
    with open(run_dir / LOCK, "a+", encoding="utf-8") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:
            return False
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


def shown(name) -> str:
    """A file name as an error message shows it: on one line, whatever characters it holds."""
    name = str(name)
    return name if name.isprintable() else ascii(name)


def _entries(folder: Path, n: int = 3) -> str:
    """A few entries of `folder` by name, for an error message."""
    names = sorted(shown(p.name) for p in folder.iterdir())
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


# ----------------------------------------------------------------------------- starting and resuming
def read_run_config(run_dir) -> dict:
    """The options saved in RUN/config.json, for `--resume RUN`."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{shown(run_dir)}: no such run folder to resume")
    config = read_json(run_dir / "config.json")
    if config is None and read_marker(run_dir) is not None:
        raise UserError(f"{shown(run_dir)}: the run stopped before it started training (no config.json); "
                        "start it over instead")
    if config is None or (read_marker(run_dir) is None and not is_legacy_run(run_dir)):
        raise UserError(f"{shown(run_dir)}: not a run folder to resume (it has no {MARKER}, and no config.json "
                        "with checkpoints)")
    return config


def check_new_run(run_dir) -> None:
    """A UserError unless a new run may start in `run_dir`: a folder that does not exist, an empty
    one, or one whose marker shows a run that died before its first checkpoint. A folder holding
    a run that can be resumed, has finished or is still going is never taken over, nor one
    without the marker."""
    run_dir = Path(run_dir)
    for folder in (run_dir, *run_dir.parents):
        if folder.is_symlink() and not folder.exists():
            raise OptionError("run_dir", f"{shown(run_dir)}: {shown(folder)} is a symbolic link to nothing; choose "
                                         "another run folder")
        if folder.exists() and not folder.is_dir():
            raise OptionError("run_dir", f"{shown(run_dir)}: {shown(folder)} is a file, not a folder; choose another "
                                         "run folder")
    if not run_dir.exists() or not [p for p in run_dir.iterdir() if p.name != LOCK]:
        return
    if list_checkpoints(run_dir):
        raise OptionError("run_dir", f"{shown(run_dir)} already holds a run: resume it, or choose another run "
                                     "folder")
    if read_marker(run_dir) is None:
        raise OptionError("run_dir", f"{shown(run_dir)} is not empty and is not a minituner run folder (it holds "
                                     f"{_entries(run_dir)}); choose a new or empty folder")
    if _in_use(run_dir):
        raise OptionError("run_dir", f"{shown(run_dir)} is in use by a run that is still going; choose another "
                                     "run folder")
    results = [name for name in RESULTS if (run_dir / name).exists()]
    if results:
        raise OptionError("run_dir", f"{shown(run_dir)} holds a finished run's results ({', '.join(results)}); "
                                     "choose another run folder")


def check_outside_runs(run_dir) -> None:
    """A UserError if `run_dir` lies inside another run's folder (whose files are that run's)."""
    for parent in Path(run_dir).resolve().parents:
        if read_marker(parent) is not None or is_legacy_run(parent):
            raise OptionError("run_dir", f"{shown(run_dir)} lies inside the run folder {shown(parent)} of another "
                                         "run; choose a folder outside it")


def begin_run(run_dir, *, script: str) -> bool:
    """Make `run_dir` this new run's own: create it, take its lock, check again under the lock that
    a new run may start there, clear what a dead run left, and write the marker, before anything
    else is written into it. True if the lock was taken now (see lock_run)."""
    run_dir = Path(run_dir)
    check_new_run(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        taken = lock_run(run_dir)
        check_new_run(run_dir)  # again, now that no other run can start here
        if read_marker(run_dir) is not None:  # a run that died before its first checkpoint
            _clear_dead_run(run_dir)
        write_marker(run_dir, new_marker(script))
    except OSError as e:  # not allowed to write there, a read-only or full disk
        raise UserError(f"{shown(run_dir)}: cannot write the run folder ({e.strerror or e})") from None
    return taken


def _clear_dead_run(run_dir: Path) -> None:
    for name in DEAD_RUN_FILES:
        path = run_dir / name
        if name == "data" and not (path / BUILTIN_DATA_MARKER).is_file():
            continue  # not the built-in experiment's: leave it (the built-in run refuses it)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def adopt_legacy_run(run_dir, *, script: str) -> None:
    """Give a run folder from before the marker its marker, on resume: its exports (if any) are
    recorded as its own, since only that run could have written them there."""
    run_dir = Path(run_dir)
    if read_marker(run_dir) is not None:
        return
    marker = {**new_marker(script), "adopted": True}
    for name in EXPORTS:
        try:
            marker["exports"][name] = [folder_fingerprint(run_dir / name)]
        except OSError:  # absent, or holding what cannot be read: not recorded, so never replaced
            continue
    write_marker(run_dir, marker)


def start_run_folder(run_dir, *, resume: bool, script: str, exports: tuple[str, ...], runtime: Runtime) -> None:
    """Make `run_dir` this run's before anything is written into it (rank 0; the others wait): a new
    run takes and marks it (see begin_run); a resumed one takes its lock, and must find the
    `exports` it will write (model, adapter) absent or its own; a run folder from before the
    marker gets one."""
    all_gather_object(None, runtime)  # a barrier: every rank has checked the folder before rank 0 takes it
    if runtime.is_main and Path(run_dir).resolve() not in _HELD:  # (taken already: a second call is a no-op)
        if resume:
            lock_run(run_dir)
            adopt_legacy_run(run_dir, script=script)
        else:
            begin_run(run_dir, script=script)
    all_gather_object(None, runtime)  # a barrier: every rank sees the marked folder
    if resume:
        for name in exports:  # before training, not after it
            check_export_target(run_dir, name)


# ----------------------------------------------------------------------------- exports it owns
def folder_fingerprint(folder: Path) -> dict:
    """{path in the folder: [size, sha256 of its first and last MiB]} of every file below `folder`
    (a subfolder is "folder"): what was written there, told by content (a copy of the folder has
    the same fingerprint) at little cost."""
    out = {}
    for p in sorted(Path(folder).rglob("*")):
        name = str(p.relative_to(folder))
        if p.is_dir() and not p.is_symlink():
            out[name] = "folder"
            continue
        size, digest = p.lstat().st_size, hashlib.sha256()
        if not p.is_symlink():
            with open(p, "rb") as f:
                digest.update(f.read(2**20))
                if size > 2**21:
                    f.seek(size - 2**20)
                digest.update(f.read(2**20))
        out[name] = [size, digest.hexdigest()]
    return out


def check_export_target(run_dir, name: str) -> Path:
    """RUN/<name>, which an export may replace only if it is absent or is this run's own earlier
    export, unchanged (a UserError otherwise, naming what is there)."""
    path = Path(run_dir) / name
    if not path.exists() and not path.is_symlink():
        return path
    recorded = ((read_marker(run_dir) or {}).get("exports") or {}).get(name) or []
    try:
        ours = not path.is_symlink() and path.is_dir() and folder_fingerprint(path) in recorded
    except OSError as e:  # a file in it that cannot be read is not one the run wrote
        raise UserError(f"{shown(path)}: cannot be read ({e.strerror or e}); move it away, then resume the run") from None
    if not ours:
        raise UserError(f"{shown(path)} exists and was not written by this run's export (it holds "
                        f"{_entries(path) if path.is_dir() else 'a file'}); move it away, then resume the run")
    return path


def record_export(run_dir, name: str, fingerprint: dict, *, landed: bool) -> None:
    """Note in the marker an export of RUN/<name> with this fingerprint: before it is renamed into
    place (landed=False: the one there and the new one are both the run's), and after (only the
    new one), so that a kill at any moment leaves RUN/<name> known as the run's."""
    marker = read_marker(run_dir)
    assert marker is not None, f"{run_dir} has no {MARKER}"
    exports = marker.setdefault("exports", {})
    exports[name] = [fingerprint] if landed else [*(exports.get(name) or []), fingerprint]
    write_marker(run_dir, marker)


class MetricsLog:
    """Appends one JSON object per line to RUN/metrics.jsonl (rank 0 only)."""

    def __init__(self, path, *, enabled: bool = True, resume_step: int | None = None):
        self.path, self.enabled = Path(path), enabled
        if enabled and resume_step is not None and self.path.is_file():
            self._truncate_after(resume_step)

    def _truncate_after(self, step: int) -> None:
        """Drop lines logged after the checkpoint we resume from: those steps run again."""
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
        os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        """Append `record` (non-finite numbers become null, see json_safe)."""
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(json_safe(record)) + "\n")
