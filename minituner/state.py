"""The run folder, and the training checkpoints that let an interrupted run resume exactly.

    RUN/run.json                     the marker, written before anything else: this folder is a
                                     minituner run's (script, run id, start time), and which
                                     exports it wrote (see below)
    RUN/config.json                  the run's options, written by the script that started it
    RUN/metrics.jsonl                one JSON object per logged step and per evaluation
    RUN/summary.json                 the outcome, written when the run ends
    RUN/checkpoints/step-000120/     a resumable checkpoint:
        trainable.safetensors        float32 master weights of the trainable parameters, by name
        optimizer.pt                 the optimizer's state (AdamW moments and step counts)
        rng.pt                       RNG states of torch, CUDA, numpy and Python, one per rank
        state.json                   step, loss scaler, early-stopping record, run config
    RUN/checkpoints/best-000100/     trainable.safetensors + state.json of the best evaluation
                                     so far (kept only with early stopping on)
    RUN/model/                       what the scripts export when training ends: the trained model
    RUN/adapter/                     as a Hugging Face folder, a LoRA run's PEFT adapter, and
    RUN/samples.json                 generations before and after training
    RUN/tokenizer/                   a from-scratch run's tokenizer, trained before its first step
    RUN/data/                        the built-in experiment's generated data

Write only what you own. A new run starts in a folder that does not exist or is empty, and
writes run.json into it first; every later check reads that marker, never the mere names of
files (a user's folder may well hold a config.json). A folder with the marker but no checkpoint
and no result is a run that died before its first checkpoint: its files are cleared and it
starts over. model/ and adapter/ are replaced only when they are this run's own earlier export,
which run.json records by the names, sizes and modification times of their files.

Frozen weights are not stored: they are the base model's, which the run config names.
Every file is written into a temporary folder that is renamed into place only when complete
(a rename is atomic), and a newer checkpoint is complete before an older one is deleted, so a
run killed at any moment leaves each checkpoint whole or absent. All ranks read the run folder
on resume, so a multi-node run needs it on a filesystem every node shares.
"""

import errno
import json
import math
import os
import random
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from minituner import __version__
from minituner.errors import UserError, read_json

MARKER = "run.json"
CHECKPOINTS = "checkpoints"
EXPORTS = ("model", "adapter")
RESULTS = ("summary.json", "samples.json", *EXPORTS)  # a run holding any of these has finished
# What a run that died before its first checkpoint may have left, cleared when it starts over
# (data/ only when its own marker says the built-in experiment wrote it).
DEAD_RUN_FILES = ("config.json", "metrics.jsonl", CHECKPOINTS, "tokenizer", "data")
BUILTIN_DATA_MARKER = ".minituner-builtin"  # in RUN/data/: written by the built-in experiment


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


# ----------------------------------------------------------------------------- the marker
def read_marker(run_dir) -> dict | None:
    """RUN/run.json if `run_dir` carries minituner's marker, else None (a user's own run.json,
    or one that is not JSON, is not a marker)."""
    try:
        marker = read_json(Path(run_dir) / MARKER)
    except UserError:
        return None
    return marker if marker is not None and marker.get("minituner_run") == 1 else None


def is_legacy_run(run_dir) -> bool:
    """A run folder written before the marker existed: it has a complete training checkpoint."""
    return read_marker(run_dir) is None and bool(list_checkpoints(run_dir))


def write_marker(run_dir, marker: dict) -> None:
    write_json(Path(run_dir) / MARKER, marker)


def new_marker(script: str) -> dict:
    return {"minituner_run": 1, "script": script, "run_id": uuid.uuid4().hex,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "minituner_version": __version__, "exports": {}}


def _entries(folder: Path, n: int = 3) -> str:
    """A few entries of `folder` by name, for an error message."""
    names = sorted(p.name for p in folder.iterdir())
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


# ----------------------------------------------------------------------------- starting and resuming
def read_run_config(run_dir) -> dict:
    """The options saved in RUN/config.json, for `--resume RUN`."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"--resume {run_dir}: no such folder")
    config = read_json(run_dir / "config.json")
    if config is None or (read_marker(run_dir) is None and not is_legacy_run(run_dir)):
        raise UserError(f"--resume {run_dir}: not a run folder (it has no {MARKER} and no config.json "
                        "with checkpoints)")
    return config


def check_new_run(run_dir) -> None:
    """A UserError unless a new run may start in `run_dir`: a folder that does not exist, an empty
    one, or one whose marker shows a run that died before its first checkpoint. A folder holding
    a run that can be resumed or has finished is never overwritten, nor one without the marker."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"run folder {run_dir} is a file, not a folder")
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return
    if list_checkpoints(run_dir):
        raise UserError(f"{run_dir} already holds a run; continue it with --resume {run_dir} "
                        "or choose another --out")
    if read_marker(run_dir) is None:
        raise UserError(f"{run_dir} is not empty and is not a minituner run folder (it holds {_entries(run_dir)}); "
                        "choose a new or empty folder")
    results = [name for name in RESULTS if (run_dir / name).exists()]
    if results:
        raise UserError(f"{run_dir} holds a finished run's results ({', '.join(results)}); choose another --out")


def check_outside_runs(run_dir) -> None:
    """A UserError if `run_dir` lies inside another run's folder (whose files are that run's)."""
    for parent in Path(run_dir).resolve().parents:
        if read_marker(parent) is not None or is_legacy_run(parent):
            raise UserError(f"{run_dir} lies inside the run folder {parent} of another run; "
                            "choose a folder outside it")


def begin_run(run_dir, *, script: str) -> None:
    """Make `run_dir` this new run's own (call check_new_run first): clear what a dead run left,
    create the folder and write the marker, before anything else is written into it."""
    run_dir = Path(run_dir)
    if read_marker(run_dir) is not None:  # a run that died before its first checkpoint
        for name in DEAD_RUN_FILES:
            path = run_dir / name
            if name == "data" and not (path / BUILTIN_DATA_MARKER).is_file():
                continue  # not the built-in experiment's: leave it (the built-in run refuses it)
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    write_marker(run_dir, new_marker(script))


def adopt_legacy_run(run_dir, *, script: str) -> None:
    """Give a run folder from before the marker its marker, on resume: its exports (if any) are
    recorded as its own, since only that run could have written them there."""
    run_dir = Path(run_dir)
    if read_marker(run_dir) is not None:
        return
    marker = {**new_marker(script), "adopted": True}
    marker["exports"] = {name: folder_fingerprint(run_dir / name) for name in EXPORTS if (run_dir / name).is_dir()}
    write_marker(run_dir, marker)


# ----------------------------------------------------------------------------- exports it owns
def folder_fingerprint(folder: Path) -> dict:
    """{file name: [size, modification time in ns]} of a folder's files: what the run wrote there."""
    return {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(Path(folder).iterdir())}


def check_export_target(run_dir, name: str) -> Path:
    """RUN/<name>, which an export may replace only if it is absent or is this run's own earlier
    export, unchanged (a UserError otherwise, naming what is there)."""
    path = Path(run_dir) / name
    if not path.exists() and not path.is_symlink():
        return path
    recorded = ((read_marker(run_dir) or {}).get("exports") or {}).get(name)
    if path.is_symlink() or not path.is_dir() or recorded != folder_fingerprint(path):
        raise UserError(f"{path} exists and was not written by this run's export (it holds "
                        f"{_entries(path) if path.is_dir() else 'a file'}); move it away, then --resume")
    return path


def record_export(run_dir, name: str) -> None:
    """Note in the marker that RUN/<name> is this run's export, as it is now."""
    marker = read_marker(run_dir)
    assert marker is not None, f"{run_dir} has no {MARKER}"
    marker.setdefault("exports", {})[name] = folder_fingerprint(Path(run_dir) / name)
    write_marker(run_dir, marker)


# ----------------------------------------------------------------------------- checkpoints
def checkpoint_path(run_dir, step: int, kind: str = "step") -> Path:
    """RUN/checkpoints/step-NNNNNN (periodic) or best-NNNNNN (best evaluation)."""
    return Path(run_dir) / CHECKPOINTS / f"{kind}-{step:06d}"


def list_checkpoints(run_dir, kind: str = "step") -> list[Path]:
    """Complete checkpoints of one kind, oldest first."""
    folder = Path(run_dir) / CHECKPOINTS
    if not folder.is_dir():
        return []
    prefix = len(kind) + 1
    found = [p for p in folder.glob(f"{kind}-*") if p.name[prefix:].isdigit() and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[prefix:]))


def latest_checkpoint(run_dir) -> Path:
    """The newest complete step checkpoint of `run_dir` (a UserError if it has none)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"--resume {run_dir}: no such folder")
    found = list_checkpoints(run_dir)
    if not found:
        raise UserError(f"--resume {run_dir}: the run has no checkpoint to resume from "
                        f"(none in {run_dir / CHECKPOINTS}); start it over without --resume")
    return found[-1]


def load_latest_readable(run_dir) -> tuple[Path, dict, list[tuple[Path, str]]]:
    """The newest step checkpoint that can be read, loaded; and (path, reason) for each newer one
    that could not be (a disk fault after it was written)."""
    latest_checkpoint(run_dir)  # there is one
    skipped = []
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return path, load_checkpoint(path), skipped
        except UserError as e:
            skipped.append((path, str(e)))
    reasons = "; ".join(f"{path.name}: {reason}" for path, reason in skipped)
    raise UserError(f"--resume {run_dir}: no checkpoint in {Path(run_dir) / CHECKPOINTS} can be read ({reasons})")


def set_aside(path: Path) -> Path:
    """Rename an unreadable checkpoint to unreadable-<name>, kept for a look but no longer one
    the run resumes from, counts or prunes (the run writes that step again when it gets there)."""
    aside = path.with_name(f"unreadable-{path.name}")
    shutil.rmtree(aside, ignore_errors=True)  # set aside by an earlier resume, and written again since
    os.replace(path, aside)
    return aside


def final_checkpoint(run_dir, summary: dict) -> Path:
    """The checkpoint holding the weights a finished run ended with: its best evaluation's when
    early stopping restored them, else its last step's (always written when a run stops)."""
    if summary.get("restored_best"):
        return checkpoint_path(run_dir, summary["best_step"], "best")
    return checkpoint_path(run_dir, summary["steps"])


def save_checkpoint(path: Path, *, weights: dict[str, torch.Tensor], state: dict, optimizer: dict | None = None,
                    rng: list | None = None) -> None:
    """Write a checkpoint folder atomically (a folder of the same name is replaced). A write that
    fails (a full disk) leaves what was there before and raises the OSError."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving
    try:
        tmp.mkdir(parents=True)
        save_file({name: t.detach().contiguous() for name, t in weights.items()}, tmp / "trainable.safetensors",
                  metadata={"format": "pt"})
        if optimizer is not None:
            torch.save(optimizer, tmp / "optimizer.pt")
        if rng is not None:
            torch.save(rng, tmp / "rng.pt")
        write_json(tmp / "state.json", state)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # the space it took, and no half checkpoint
        raise
    old = path.with_name(f".old-{path.name}")
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def write_failure(e: OSError, what: Path, run_dir) -> UserError:
    """The one line for a checkpoint that could not be written, naming the last good one."""
    good = [p for p in list_checkpoints(run_dir) if p != Path(what)]
    kept = f"the last good checkpoint, {good[-1]}, is intact" if good else "no checkpoint was written before it"
    reason = "the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else (e.strerror or str(e))
    return UserError(f"could not write {what} ({reason}); training stopped and {kept}. "
                     "Free some space, then --resume")


def load_checkpoint(path: Path) -> dict:
    """A checkpoint's weights, optimizer state, RNG states and state.json (absent parts None)."""
    path = Path(path)
    state = read_json(path / "state.json")
    if state is None or not (path / "trainable.safetensors").is_file():
        raise UserError(f"{path}: incomplete checkpoint (state.json or trainable.safetensors missing)")
    try:
        weights = load_file(path / "trainable.safetensors")
        # map_location: a run saved on GPUs may resume elsewhere; load_state_dict moves state to its params
        optimizer = (torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
                     if (path / "optimizer.pt").is_file() else None)
        rng = torch.load(path / "rng.pt", map_location="cpu", weights_only=True) if (path / "rng.pt").is_file() else None
    except Exception as e:  # a truncated or foreign file: safetensors and torch raise various types
        raise UserError(f"{path}: cannot read the checkpoint ({type(e).__name__}: {e})") from None
    return {"weights": weights, "optimizer": optimizer, "rng": rng, "state": state}


def prune_checkpoints(run_dir, keep: int) -> None:
    """Delete all but the newest `keep` step checkpoints."""
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def prune_bests(run_dir, *, keep: set, after: int | None = None) -> None:
    """Delete best-N checkpoints that no kept step checkpoint (nor `keep`) refers to, and with
    `after`, those newer than that step (left by a run that died after writing them)."""
    for path in list_checkpoints(run_dir):
        try:
            keep.add((read_json(path / "state.json") or {}).get("best_step"))
        except UserError:  # an unreadable checkpoint, skipped on resume: it refers to nothing
            continue
    for path in list_checkpoints(run_dir, "best"):
        step = int(path.name[len("best-"):])
        if step not in keep or (after is not None and step > after):
            shutil.rmtree(path, ignore_errors=True)


def rng_state(device: torch.device) -> dict:
    """Every random generator a step may draw from (dropout, shuffles, sampling): the CPU's, and
    this process's GPU's when it trains on one (asking a CPU run for it would start CUDA)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss,
                      "cached": cached}  # tensors and plain numbers, so torch.load(weights_only=True) reads it
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


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
