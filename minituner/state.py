"""The run folder, and the training checkpoints that let an interrupted run resume exactly.

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

Frozen weights are not stored: they are the base model's, which the run config names.
Every file is written into a temporary folder that is renamed into place only when complete
(a rename is atomic), and a newer checkpoint is complete before an older one is deleted, so a
run killed at any moment leaves each checkpoint whole or absent. All ranks read the run folder
on resume, so a multi-node run needs it on a filesystem every node shares.
"""

import json
import math
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from minituner.errors import UserError, read_json

CHECKPOINTS = "checkpoints"
# Everything a run folder may hold; a new run refuses a folder holding anything else.
RUN_FILES = {"config.json", "metrics.jsonl", "summary.json", CHECKPOINTS, "model", "adapter", "samples.json",
             "tokenizer", "data"}  # data: the built-in experiment's generated data (never overwritten)


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


def read_run_config(run_dir) -> dict:
    """The options saved in RUN/config.json, for `--resume RUN`."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"--resume {run_dir}: no such folder")
    config = read_json(run_dir / "config.json")
    if config is None:
        raise UserError(f"--resume {run_dir}: not a run folder (it has no config.json)")
    return config


def check_new_run(run_dir) -> None:
    """A UserError unless a new run may start in `run_dir`: it must not be a file, hold a run that
    could be resumed (never overwritten), or hold anything that is not a run's (the user's files)."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out {run_dir} is a file, not a folder")
    if list_checkpoints(run_dir):
        raise UserError(f"{run_dir} already holds a run; continue it with --resume {run_dir} "
                        "or choose another --out")
    others = []
    if run_dir.is_dir():
        others = sorted(p.name for p in run_dir.iterdir() if p.name not in RUN_FILES and not p.name.startswith("."))
    if others:
        raise UserError(f"--out {run_dir} holds files that are not a run's ({', '.join(others[:3])}); "
                        "choose a new or empty folder")


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
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"--resume {run_dir}: no such folder")
    found = list_checkpoints(run_dir)
    if not found:
        raise UserError(f"--resume {run_dir}: the run has no checkpoint to resume from "
                        f"(none in {run_dir / CHECKPOINTS}); start it over without --resume")
    return found[-1]


def final_checkpoint(run_dir, summary: dict) -> Path:
    """The checkpoint holding the weights a finished run ended with: its best evaluation's when
    early stopping restored them, else its last step's (always written when a run stops)."""
    if summary.get("restored_best"):
        return checkpoint_path(run_dir, summary["best_step"], "best")
    return checkpoint_path(run_dir, summary["steps"])


def save_checkpoint(path: Path, *, weights: dict[str, torch.Tensor], state: dict, optimizer: dict | None = None,
                    rng: list | None = None) -> None:
    """Write a checkpoint folder atomically (a folder of the same name is replaced)."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving
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
    old = path.with_name(f".old-{path.name}")
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


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


def prune_checkpoints(run_dir, keep: int, kind: str = "step") -> None:
    """Delete all but the newest `keep` checkpoints of one kind."""
    for old in list_checkpoints(run_dir, kind)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def prune_bests(run_dir, *, keep: set, after: int | None = None) -> None:
    """Delete best-N checkpoints that no kept step checkpoint (nor `keep`) refers to, and with
    `after`, those newer than that step (left by a run that died after writing them)."""
    for path in list_checkpoints(run_dir):
        keep.add((read_json(path / "state.json") or {}).get("best_step"))
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
