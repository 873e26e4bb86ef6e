"""Training checkpoints, which let an interrupted run resume exactly where it stopped.

    RUN/checkpoints/step-000120/     a resumable checkpoint, written every save_every steps and
        trainable.safetensors        when the run stops: float32 master weights of the trainable
        optimizer.pt                 parameters by name, the optimizer's state (AdamW moments and
        rng.pt                       step counts), the RNG states of torch, CUDA, numpy and Python
        state.json                   (one per rank), and the run's state: step, loss scaler,
                                     early-stopping record, run config
    RUN/checkpoints/best-000100/     trainable.safetensors + state.json of the best evaluation
                                     so far (kept only with early stopping on)

The checkpoint a run writes as it ends (its last step, or where early stopping ended it) holds
only trainable.safetensors and state.json: nothing will train from it again, and the optimizer
state it would carry is twice the weights (two AdamW moments per trainable float32). Resuming
such a run re-exports it; the periodic checkpoints before it keep the full state.

Under --fsdp (minituner/sharding.py) each process writes its own slices of the masters and of
AdamW's state into step-N/sharded/ (minituner/sharded_checkpoint.py), in place of
trainable.safetensors and optimizer.pt; rng.pt and state.json stay (it says "sharded": true).
Either kind resumes either way, on any number of processes: the saved slices are cut to the new
split (resharding), a whole checkpoint is sliced where each process loads it, and a sharded one
is read whole by a run without --fsdp. `checkpoint_weights` reads any checkpoint's weights whole.

Frozen weights are not stored: they are the base model's, which the run config names. Every
checkpoint is written into a temporary folder that is renamed into place only when complete
(minituner/atomic.py), and a newer checkpoint is complete before an older one is deleted, so a
run killed at any moment leaves each checkpoint whole or absent. A checkpoint that cannot be
read on resume (a disk fault after it was written) is set aside, and the run resumes from the
newest one that can be. All ranks read the run folder on resume, so a multi-node run needs it
on a filesystem every node shares.
"""

import errno
import os
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from minituner.atomic import land, new_staging, staged_folder, write_json
from minituner.distributed import Runtime, all_gather_object
from minituner.errors import UserError, read_json
from minituner.sharded_checkpoint import (SHARDED, load_named_optimizer_state, load_sharded_optimizer,
                                          load_sharded_weights, named_optimizer_state, saved_shapes, sharded_keys,
                                          write_sharded)
from minituner.sharding import distribute_like

CHECKPOINTS = "checkpoints"


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
        raise UserError(f"{run_dir}: no such run folder to resume")
    found = list_checkpoints(run_dir)
    if not found:
        raise UserError(f"{run_dir}: the run has no checkpoint to resume from "
                        f"(none in {run_dir / CHECKPOINTS}); start it over instead")
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
    raise UserError(f"{run_dir}: no checkpoint in {Path(run_dir) / CHECKPOINTS} can be read ({reasons})")


def set_aside(path: Path) -> Path:
    """Rename an unreadable checkpoint to unreadable-<name> (or unreadable-<name>.2, ... when one
    was set aside before), kept for a look but no longer one the run resumes from, counts or
    prunes; the run writes that step again when it gets there."""
    aside, n = path.with_name(f"unreadable-{path.name}"), 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"unreadable-{path.name}.{n}")
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
    with staged_folder(Path(path), mode_from="state.json") as tmp:
        save_file({name: t.detach().contiguous() for name, t in weights.items()}, tmp / "trainable.safetensors",
                  metadata={"format": "pt"})
        if optimizer is not None:
            torch.save(optimizer, tmp / "optimizer.pt")
        if rng is not None:
            torch.save(rng, tmp / "rng.pt")
        write_json(tmp / "state.json", state)


def write_failure(e: OSError, what: Path, run_dir) -> UserError:
    """The one line for a checkpoint that could not be written, naming the last good one."""
    good = [p for p in list_checkpoints(run_dir) if p != Path(what)]
    full = e.errno in (errno.ENOSPC, errno.EDQUOT)
    reason = "the disk is full" if full else (e.strerror or str(e))
    fix = "free some space" if full else "fix that"
    then = (f"the last good checkpoint, {good[-1]}, is intact: {fix}, then resume" if good else
            f"no checkpoint was written before it: {fix}, then start the run again")
    return UserError(f"could not write {what} ({reason}); training stopped and {then}")


def load_checkpoint(path: Path) -> dict:
    """A checkpoint's weights, optimizer state, RNG states and state.json (absent parts None). A
    sharded checkpoint's weights and optimizer state stay on disk, in the DCP folder "sharded"
    (the parts a process needs are read by restore_masters and restore_optimizer)."""
    path = Path(path)
    state = read_json(path / "state.json")
    if state is not None and state.get("sharded"):
        try:
            sharded_keys(path / SHARDED)
            rng = (torch.load(path / "rng.pt", map_location="cpu", weights_only=True)
                   if (path / "rng.pt").is_file() else None)
        except Exception as e:  # a missing or truncated file
            reason = e.strerror if isinstance(e, OSError) and e.strerror else f"{type(e).__name__}: {e}"
            raise UserError(f"{path}: cannot read the checkpoint ({reason})") from None
        return {"weights": None, "optimizer": None, "rng": rng, "state": state, "sharded": path / SHARDED}
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
    return {"weights": weights, "optimizer": optimizer, "rng": rng, "state": state, "sharded": None}


def load_weights_into(path: Path, params: dict[str, torch.Tensor]) -> None:
    """Copy the float32 weights of the checkpoint at `path` (either kind), read whole by this
    process alone, into `params` by name (a fresh model's parameters: no second copy is held)."""
    path = Path(path)
    ckpt = load_checkpoint(path)
    names = set(ckpt["weights"]) if ckpt["sharded"] is None else set(saved_shapes(ckpt["sharded"], "weights"))
    unknown = sorted(names - set(params))
    if unknown:
        raise UserError(f"{path}: holds weights the model does not have (e.g. {unknown[0]}); "
                        "it was trained with another model or method")
    with torch.no_grad():
        if ckpt["sharded"] is None:
            for name, t in ckpt["weights"].items():
                params[name].copy_(t)
        else:
            load_sharded_weights(ckpt["sharded"], {name: params[name].detach() for name in names}, collective=False,
                                 source=path)


def checkpoint_weights(path: Path) -> dict[str, torch.Tensor]:
    """The float32 weights of the checkpoint at `path` (either kind), whole, by name."""
    ckpt = load_checkpoint(path)
    if ckpt["sharded"] is None:
        return ckpt["weights"]
    weights = {name: torch.zeros(shape, dtype=dtype) for name, (shape, dtype) in
               saved_shapes(ckpt["sharded"], "weights").items()}
    load_sharded_weights(ckpt["sharded"], weights, collective=False, source=path)
    return weights


# ----------------------------------------------------------------------------- sharded checkpoints (--fsdp)
def save_sharded_checkpoint(path: Path, *, masters, state: dict, optimizer=None, rng: list | None = None,
                            runtime: Runtime) -> None:
    """Every process writes its slices (sharded_checkpoint.write_sharded) into one temporary
    folder, which rank 0 checks, completes with state.json and rng.pt, and renames into place: as
    atomic as save_checkpoint. Called by every process; what fails on one (staging, a slice, the
    rename) raises the same OSError in every one, so that all stop together."""
    path, tmp, failure = Path(path), None, None
    if runtime.is_main:
        try:
            tmp = new_staging(path)
        except OSError as e:
            failure = e
    tmp, failure = all_gather_object((tmp and str(tmp), failure), runtime)[0]  # rank 0's folder, or its failure
    if failure is not None:
        raise failure
    try:
        write_sharded(Path(tmp) / SHARDED, masters, optimizer)
        if runtime.is_main:
            failure = _complete(Path(tmp), path, {**state, "sharded": True, "optimizer_saved": optimizer is not None},
                                rng)
        failure = all_gather_object(failure, runtime)[0]
        if failure is not None:
            raise failure
    finally:
        if runtime.is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # (gone once landed)


def _complete(tmp: Path, path: Path, state: dict, rng: list | None) -> OSError | None:
    """Rank 0's part of a sharded checkpoint, once every process has written its slices: check
    they are all there to read (every process must write into the one run folder: on several
    machines, a filesystem they share), add rng.pt and state.json, and put the folder at `path`.
    The failure as an OSError (to be raised by every process), or None."""
    try:
        sharded_keys(tmp / SHARDED)
    except Exception as e:  # a file missing or cut short, a .metadata that cannot be read
        reason = e.strerror if isinstance(e, OSError) and e.strerror else f"{type(e).__name__}: {e}"
        return OSError(errno.EIO, f"{reason} where rank 0 reads it: every process must write into the same "
                                  "run folder (on several machines, a filesystem they all share)")
    try:
        if rng is not None:
            torch.save(rng, tmp / "rng.pt")
        write_json(tmp / "state.json", state)
        land(tmp, path, mode_from="state.json")
    except OSError as e:
        return e
    return None


def restore_masters(ckpt: dict, masters, source, runtime: Runtime) -> None:
    """Load a checkpoint's float32 weights (either kind, from load_checkpoint) into the masters,
    whole or sharded, then refresh the model. Called by every process."""
    if ckpt["sharded"] is None:  # whole tensors, sliced where the masters are sharded
        by_name = dict(masters.named_masters())
        weights = {name: distribute_like(t, by_name[name]) if name in by_name else t
                   for name, t in ckpt["weights"].items()}
        masters.load_state_dict(weights, source=str(source))
        return
    masters.check_shapes({name: shape for name, (shape, _) in saved_shapes(ckpt["sharded"], "weights").items()},
                         source=str(source))
    load_sharded_weights(ckpt["sharded"], {name: m.detach() for name, m in masters.named_masters()},
                         collective=runtime.world_size > 1, source=source)
    masters.copy_to_model()


def restore_optimizer(ckpt: dict, optimizer, masters, source, runtime: Runtime) -> bool:
    """Load AdamW's state of a checkpoint (either kind, from load_checkpoint) into `optimizer`,
    whole or sharded as the masters are; False if the checkpoint has none. Called by every process."""
    if ckpt["sharded"] is None:
        saved = ckpt["optimizer"]
        if saved is None:
            return False
        if masters.sharded:
            load_named_optimizer_state(optimizer, masters, named_optimizer_state(optimizer, masters, saved))
        else:
            optimizer.load_state_dict(saved)
        return True
    if not ckpt["state"].get("optimizer_saved"):
        return False
    load_sharded_optimizer(ckpt["sharded"], optimizer, masters, collective=runtime.world_size > 1, source=source)
    return True


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


def _resplit(saved: dict, runtime: Runtime) -> str:
    """What a resume says when the checkpoint was written by another number of processes, or
    sharded where this run is not (or the reverse): its state is cut anew for this run."""
    before = (saved.get("processes", runtime.world_size), bool(saved.get("sharded")))
    if before == (runtime.world_size, runtime.sharded):
        return ""
    def kind(n, sharded):
        return f"{n} process{'es' if n > 1 else ''}" + (", sharded" if sharded else "")
    return f" (written by {kind(*before)}; resharded for {kind(runtime.world_size, runtime.sharded)})"


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


# ----------------------------------------------------------------------------- a run's checkpoints
def save_run(run_dir: Path, state: dict, masters, optimizer, scaler, runtime: Runtime, *, keep: int,
             final: bool = False) -> None:
    """A resumable checkpoint of the step just finished, the run's `state` (trainer.RunState as a
    dict) with the masters, the optimizer and the loss scaler; every rank contributes its RNG
    state. Only the newest `keep` are kept. final: the run ends at this step, so the optimizer
    and RNG states, which only further steps would need, are left out."""
    rngs = None if final else all_gather_object(rng_state(runtime.device), runtime)
    step, t = state["step"], state["trajectory"]  # the data position follows from the step; written for readers
    position = {"epoch": step // (t["examples"] // t["global_batch"]), "examples_seen": step * t["global_batch"]}
    write_checkpoint(checkpoint_path(run_dir, step), run_dir, runtime, masters=masters,
                     state={**state, "scaler": scaler.state_dict(), "data_position": position,
                            "processes": runtime.world_size},
                     optimizer=None if final else optimizer, rng=rngs)
    if runtime.is_main:
        prune_checkpoints(run_dir, keep)
        prune_bests(run_dir, keep={state["best_step"]})


def write_checkpoint(path: Path, run_dir: Path, runtime: Runtime, *, masters, state: dict, optimizer=None,
                     rng: list | None = None) -> None:
    """A checkpoint of the masters (and the optimizer): written by rank 0 (save_checkpoint), or by
    every process when they are sharded (save_sharded_checkpoint); called by every process. A
    failed write (a full disk) is said in one line naming the last good checkpoint."""
    try:
        if masters.sharded:
            save_sharded_checkpoint(path, masters=masters, state=state, optimizer=optimizer, rng=rng, runtime=runtime)
        elif runtime.is_main:
            save_checkpoint(path, weights=masters.state_dict(), state=state,
                            optimizer=None if optimizer is None else optimizer.state_dict(), rng=rng)
    except OSError as e:
        raise write_failure(e, path, run_dir) from None


def resume_run(run_dir: Path, trajectory: dict, masters, optimizer, scaler, runtime: Runtime) -> dict:
    """Load the newest readable checkpoint of `run_dir` (rank 0's choice: every rank resumes from
    the same step) into the masters, optimizer, loss scaler and RNGs; return the run's saved
    state. `trajectory` (what fixes the sequence of steps) must be the one the run started with."""
    path, ckpt, skipped = load_latest_readable(run_dir)
    chosen = all_gather_object(path.name, runtime)[0]
    if chosen != path.name:  # this rank read one that rank 0 could not: take rank 0's
        path = run_dir / CHECKPOINTS / chosen
        ckpt = load_checkpoint(path)
    saved = ckpt["state"]
    started = saved.get("trajectory", {})
    for key, value in trajectory.items():  # (a key an older minituner did not record is not checked)
        if key in started and started[key] != value:
            raise UserError(f"{path}: the run was started with {key} = {started[key]}, this one has {value}; "
                            "resume with the run's own options (its config.json), or the steps would not continue it")
    restore_masters(ckpt, masters, path, runtime)
    ended = saved["step"] >= trajectory.get("total_steps", saved["step"] + 1) or saved.get("status") == "early_stopped"
    try:
        has_optimizer = restore_optimizer(ckpt, optimizer, masters, path, runtime)
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: the optimizer state does not fit this model ({e})") from None
    if not has_optimizer and not ended:  # (a run's final checkpoint has none: no step follows it)
        raise UserError(f"{path}: has no optimizer state (optimizer.pt), so training cannot continue from it; "
                        "move it out of the folder to resume from the checkpoint before it, or start the run over")
    scaler.load_state_dict(saved["scaler"])
    if runtime.is_main:
        for unreadable, reason in skipped:
            aside = set_aside(unreadable)
            print(f"warning: skipped {unreadable.name}, which cannot be read ({reason}); resuming from {path.name} "
                  f"(the unreadable one is kept as {aside.name})", file=sys.stderr)
        prune_bests(run_dir, keep={saved["best_step"]}, after=saved["step"])
        print(f"resuming from {path.name}: step {saved['step']} of {trajectory.get('total_steps', '?')}"
              + _resplit(saved, runtime))
    if ckpt["rng"] and runtime.rank < len(ckpt["rng"]):
        set_rng_state(ckpt["rng"][runtime.rank], runtime.device)
    return saved
