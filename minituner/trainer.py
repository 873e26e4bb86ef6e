"""The training loop both scripts share: `train`, readable top to bottom, and the run's state.

Instruction tuning and fine-tuning differ in their data (which tokens carry loss) and in which
parameters train (LoRA or all); the loop is the same:

    set up: fp32 master weights of what trains (with --fsdp, each process's slices of them:
            minituner/sharding.py), AdamW on them, the fp16 loss scaler
    (resume: load the newest readable checkpoint into all of those and the RNGs)
    evaluate the starting point (step 0)
    for each optimizer step:
        learning rate from the schedule (skipped fp16 steps do not advance it)
        the step's examples, split into this rank's micro-batches (minituner/batching.py)
        one optimizer step (minituner/step.py)
        count it into the run state, log it
        evaluate when due, and keep the best weights / stop early
        honour SIGINT/SIGTERM: every rank stops after the same step
        checkpoint when due (always when stopping)
    end on the best weights when early stopping restored them; the summary

Every process runs this loop on its own share of each step (torchrun); only rank 0 writes files.
The data contract: `train_set` and `val_set` are sequences of examples, each a dict with at
least "input_ids"; `collate(examples)` returns a batch dict of tensors (see minituner/step.py).
"""

import math
import random
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from minituner.atomic import write_json
from minituner.batching import micro_batches, step_examples, steps_per_epoch
from minituner.checkpoint import (CHECKPOINTS, checkpoint_path, list_checkpoints, load_checkpoint, prune_bests,
                                  restore_masters, resume_run, save_run, write_checkpoint)
from minituner.distributed import (Runtime, all_reduce_sum_, broadcast_, peak_memory_mib, peak_reserved_mib,
                                   reset_peak_memory, synchronize)
from minituner.errors import OptionError, UserError, read_json
from minituner.optim import BETAS, DEFAULT_LR, build_optimizer, lr_at
from minituner.precision import LossScaler, MasterWeights, check_policy, compute_dtype
from minituner.runfolder import MetricsLog, begin_run, check_new_run, lock_run, read_marker, release_run
from minituner.sharding import shard_model
from minituner.step import evaluate, train_step

SCHEDULES = ("cosine", "linear", "constant")


@dataclass
class TrainOptions:
    # length: `steps` optimizer steps, or (steps = 0) `epochs` passes over the training set
    steps: int = 0
    epochs: float = 1.0
    # batches: a step is batch_size x grad_accum x world_size examples
    batch_size: int = 4
    grad_accum: int = 1
    # optimizer (AdamW on fp32 masters) and schedule (linear warmup, then decay to lr x min_lr_ratio)
    lr: float = DEFAULT_LR["lora"]
    min_lr_ratio: float = 0.1
    warmup_steps: int = 0
    schedule: str = "cosine"  # one of SCHEDULES
    weight_decay: float = 0.0  # AdamW's decoupled decay, not on norms, biases or embeddings
    decay_embeddings: bool = False  # weight decay on embedding tables too
    betas: tuple[float, float] = BETAS
    max_grad_norm: float = 1.0  # global-norm clipping; 0 = off
    # precision: fp32 | bf16 | fp16; the fp16 loss scale starts at init_scale (see precision.LossScaler)
    precision: str = "fp32"
    init_scale: float = LossScaler.init_scale
    growth_interval: int = LossScaler.growth_interval
    # evaluation and early stopping: evaluate every eval_every steps (0 = only at the end);
    # stop after `patience` evaluations without an improvement over min_delta (0 = never)
    eval_every: int = 0
    patience: int = 0
    min_delta: float = 0.0
    # checkpoints: every save_every steps (0 = only at the end), keeping the newest keep_checkpoints
    save_every: int = 0
    keep_checkpoints: int = 2
    seed: int = 0

    def __post_init__(self):
        at_least = {"batch_size": 1, "grad_accum": 1, "keep_checkpoints": 1, "growth_interval": 1, "steps": 0,
                    "warmup_steps": 0, "eval_every": 0, "save_every": 0, "patience": 0, "seed": 0,
                    "max_grad_norm": 0, "min_delta": 0, "min_lr_ratio": 0}
        for name, low in at_least.items():
            if getattr(self, name) < low:
                raise OptionError(name, f"{getattr(self, name)}: must be >= {low}")
        for name in ("lr", "init_scale") + (("epochs",) if self.steps == 0 else ()):
            if not getattr(self, name) > 0:
                raise OptionError(name, f"{getattr(self, name)}: must be > 0")
        if self.schedule not in SCHEDULES:
            raise OptionError("schedule", f"{self.schedule!r}: must be one of {', '.join(SCHEDULES)}")
        check_policy(self.precision)


def check_early_stopping(patience: int, eval_every: int, has_validation: bool) -> None:
    """Early stopping compares evaluations: it needs validation data evaluated every few steps."""
    if patience and (not has_validation or not eval_every):
        raise OptionError("patience", "needs validation data (val_data, or val_fraction > 0) and eval_every > 0",
                          related=("val_data", "val_fraction", "eval_every"))


@dataclass
class RunState:
    """What changes as a run trains; every checkpoint saves it (state.json), and resume loads it."""
    step: int = 0  # optimizer steps taken, fp16 steps skipped for an overflow included
    updates: int = 0  # steps whose update was applied: the learning-rate schedule counts these
    skipped_steps: int = 0  # fp16 steps skipped because the gradients overflowed
    tokens: int = 0  # tokens the steps processed, padding included
    target_tokens: int = 0  # tokens that carried loss
    step_seconds: float = 0.0  # time spent in steps (evaluation excluded): the throughput's denominator
    status: str = "running"  # running, then completed | early_stopped | interrupted
    train_loss: float | None = None  # the last step's loss
    first_eval_loss: float | None = None  # validation loss before any training
    first_extra: dict = field(default_factory=dict)  # the extra evaluation sets' losses before training
    eval_loss: float | None = None  # the last evaluation's validation loss
    best_eval_loss: float | None = None  # the best so far, and its step
    best_step: int | None = None
    bad_evals: int = 0  # evaluations since the best one: early stopping's count
    trajectory: dict = field(default_factory=dict)  # what fixes the sequence of steps (see _trajectory)
    run_config: dict | None = None  # the options the run was started with (the script's)

    @classmethod
    def from_saved(cls, saved: dict) -> "RunState":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in names})

    def account(self, out: dict, *, lr: float, loss_scale: float, seconds: float) -> dict:
        """Count a finished step (train_step's result); return its metrics record."""
        self.step += 1
        self.updates += not out["skipped"]
        self.skipped_steps += out["skipped"]
        self.tokens += out["tokens"]
        self.target_tokens += out["target_tokens"]
        self.train_loss = out["loss"]
        self.step_seconds += seconds
        return {"step": self.step, "loss": out["loss"], "ppl": _ppl(out["loss"]), "lr": lr,
                "grad_norm": out["grad_norm"], "loss_scale": loss_scale, "skipped": out["skipped"],
                "tokens_per_s": out["tokens"] / seconds}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


# ----------------------------------------------------------------------------- the loop
def train(model, train_set, collate, *, options: TrainOptions, runtime: Runtime, run_dir, val_set=None,
          extra_evals: dict | None = None, resume: bool = False, run_config: dict | None = None,
          progress: bool = True) -> dict:
    """Train the parameters of `model` that require grad, writing the run folder `run_dir`.

    extra_evals {name: examples}: further sets evaluated before the first step and on the final
    weights (e.g. general text, whose perplexity rising is forgetting); the summary reports
    NAME_loss_before/_after and NAME_ppl_before/_after.

    With resume=True, continue from the newest checkpoint in `run_dir` exactly where it left off.
    Returns the run summary (also written to RUN/summary.json), whose "status" is "completed",
    "early_stopped" or "interrupted" (by SIGINT/SIGTERM: resume the run rather than export it).
    The model is left on the device in the compute dtype, holding the last step's weights or,
    with early stopping on, its best evaluation's; their float32 values are in the newest
    checkpoint (RUN/checkpoints/step-N, or best-N).
    """
    o, run_dir, extra_evals = options, Path(run_dir), extra_evals or {}
    if not any(p.requires_grad for p in model.parameters()):
        raise UserError("no parameter of the model is trainable: every weight is frozen")
    check_early_stopping(o.patience, o.eval_every, val_set is not None)
    global_batch = o.batch_size * o.grad_accum * runtime.world_size
    total_steps = o.steps or math.ceil(o.epochs * steps_per_epoch(len(train_set), global_batch))
    locked = runtime.is_main and (lock_run(run_dir) if resume else _start_fresh(run_dir, run_config))

    # What trains: float32 masters of the trainable parameters (the model computes in the policy's
    # dtype and gets the masters copied in after each update), AdamW on the masters, fp16's scaler.
    dtype = compute_dtype(o.precision, runtime.device)
    if runtime.sharded:  # each rank keeps a slice of each master, FSDP gathers and casts (minituner/sharding.py)
        masters = shard_model(model, dtype, runtime)
    else:
        masters = MasterWeights(model, dtype, runtime.device)
        broadcast_(masters.masters, runtime)  # every rank starts from rank 0's weights
        masters.copy_to_model()
    reset_peak_memory(runtime.device)  # the summary's peak is training's: not loading's, nor the whole model's
    optimizer = build_optimizer(masters.named_masters(), lr=o.lr, weight_decay=o.weight_decay, betas=o.betas,
                                decay_embeddings=o.decay_embeddings)
    scaler = LossScaler(enabled=o.precision == "fp16", init_scale=o.init_scale, growth_interval=o.growth_interval)
    seed_everything(o.seed + runtime.rank)  # ranks draw different dropout masks, as they see different data
    run = RunState(trajectory=_trajectory(o, len(train_set), global_batch, total_steps), run_config=run_config)
    if resume:
        run = RunState.from_saved(resume_run(run_dir, run.trajectory, masters, optimizer, scaler, runtime))
        run.status = "running" if run.status == "interrupted" else run.status
    metrics = MetricsLog(run_dir / "metrics.jsonl", enabled=runtime.is_main, resume_step=run.step if resume else None)
    if not resume:
        _evaluate_start(model, val_set, extra_evals, collate, run, masters, o, run_dir, runtime, metrics)
    bar = tqdm(total=total_steps, initial=run.step, unit="step", dynamic_ncols=True,
               disable=not (progress and runtime.is_main))
    session = (time.perf_counter(), run.tokens, run.step_seconds)  # this session's start: wall, tokens, step time
    lengths = [len(example["input_ids"]) for example in train_set]
    model.train()
    with StopRequest() as stop:
        while run.step < total_steps and run.status == "running":
            lr = lr_at(run.updates, lr=o.lr, total_steps=total_steps, warmup_steps=o.warmup_steps,
                       schedule=o.schedule, min_lr=o.lr * o.min_lr_ratio)
            indices = step_examples(run.step, n_examples=len(train_set), global_batch=global_batch, seed=o.seed)
            shares = micro_batches(indices, lengths, rank=runtime.rank, batch_size=o.batch_size,
                                   grad_accum=o.grad_accum)
            batches = [collate([train_set[i] for i in share]) for share in shares]
            out, seconds, loss_scale = _timed_step(model, batches, masters, optimizer, scaler, lr, o, runtime)
            if out["skipped"] and not scaler.enabled:
                raise _diverged(out, run, run_dir, o.precision)
            record = run.account(out, lr=lr, loss_scale=loss_scale, seconds=seconds)
            if val_set is not None and (run.step == total_steps or (o.eval_every and run.step % o.eval_every == 0)):
                record.update(_evaluate_or_save(model, val_set, collate, run, masters, optimizer, scaler, o,
                                                run_dir, runtime))
            metrics.write(record)
            bar.update(1)
            bar.set_postfix(_postfix(record, run), refresh=False)
            if _agreed(stop.requested, runtime) and run.status == "running":
                run.status = "interrupted"
            ends = run.step == total_steps or run.status == "early_stopped"  # (not "interrupted": it goes on later)
            if ends or (o.save_every and run.step % o.save_every == 0) or run.status != "running":
                save_run(run_dir, asdict(run), masters, optimizer, scaler, runtime, keep=o.keep_checkpoints, final=ends)
    bar.close()
    synchronize(runtime.device)  # the last update has reached the weights before they are timed or read
    summary = _finish(model, run, masters, extra_evals, collate, o, run_dir, runtime, metrics, session, total_steps,
                      global_batch)
    if locked:  # taken by this call, not by a script that goes on to export
        release_run(run_dir)
    return summary


# ----------------------------------------------------------------------------- steps of the loop
def _trajectory(o: TrainOptions, n_examples: int, global_batch: int, total_steps: int) -> dict:
    """What fixes the sequence of steps; a resumed run must match it to continue exactly (the
    split of the global batch into micro-batches and processes may change)."""
    return {"examples": n_examples, "global_batch": global_batch, "total_steps": total_steps, "seed": o.seed,
            "precision": o.precision, "lr": o.lr, "warmup_steps": o.warmup_steps, "schedule": o.schedule,
            "min_lr_ratio": o.min_lr_ratio, "eval_every": o.eval_every, "patience": o.patience,
            "min_delta": o.min_delta, "weight_decay": o.weight_decay}


def _start_fresh(run_dir: Path, run_config: dict | None) -> bool:
    """Begin a new run in `run_dir`: a new or empty folder, which gets the run's lock and marker
    first, or one the caller has already taken for this run (a script, before writing its data),
    or the remains of a marked run that died before its first checkpoint (cleared: nothing of it
    could be resumed). True if the lock was taken here (see runfolder.lock_run)."""
    if read_marker(run_dir) is None:
        taken = begin_run(run_dir, script=(run_config or {}).get("script", "train"))
    else:  # marked: by the caller, or by a run that died before its first checkpoint (lock_run refuses one
        taken = lock_run(run_dir)  # still going)
    check_new_run(run_dir)
    shutil.rmtree(run_dir / CHECKPOINTS, ignore_errors=True)  # best-N of the dead run, temporaries
    for stale in ("metrics.jsonl", "summary.json"):
        (run_dir / stale).unlink(missing_ok=True)
    if run_config is not None:
        write_json(run_dir / "config.json", run_config)
    return taken


def _evaluate_start(model, val_set, extra_evals: dict, collate, run: RunState, masters: MasterWeights,
                    o: TrainOptions, run_dir: Path, runtime: Runtime, metrics: MetricsLog) -> None:
    """The starting point (step 0): validation and extra sets before any training, which also
    checks the data before the first step."""
    if val_set is None and not extra_evals:
        return
    record = {"step": 0}
    if val_set is not None:
        record.update(_evaluate_and_track(model, val_set, collate, run, masters, o, run_dir, runtime))
        run.first_eval_loss = record["eval_loss"]  # the summary's comparison
    run.first_extra = _evaluate_extra(model, extra_evals, collate, o, runtime)
    metrics.write({**record, **run.first_extra})


def _timed_step(model, batches, masters, optimizer, scaler, lr: float, o: TrainOptions,
                runtime: Runtime) -> tuple[dict, float, float]:
    """train_step, its time and the loss scale it ran with. No synchronize: train_step waits for
    the device once, mid-step, and leaves its update queued while the loop collates the next
    batches; that update's device time is counted in the next step's (the loop syncs at its end)."""
    loss_scale = scaler.scale
    t0 = time.perf_counter()
    out = train_step(model, batches, masters=masters, optimizer=optimizer, scaler=scaler, lr=lr,
                     max_grad_norm=o.max_grad_norm, runtime=runtime)
    return out, time.perf_counter() - t0, loss_scale


def _evaluate_or_save(model, val_set, collate, run: RunState, masters, optimizer, scaler, o: TrainOptions,
                      run_dir: Path, runtime: Runtime) -> dict:
    """An evaluation during training; if it fails (out of memory, a second Ctrl-C), the step just
    trained is checkpointed before the error goes on."""
    try:
        return _evaluate_and_track(model, val_set, collate, run, masters, o, run_dir, runtime)
    except BaseException:
        save_run(run_dir, asdict(run), masters, optimizer, scaler, runtime, keep=o.keep_checkpoints)
        raise


def _evaluate_and_track(model, val_set, collate, run: RunState, masters: MasterWeights, o: TrainOptions,
                        run_dir: Path, runtime: Runtime) -> dict:
    """Evaluate, keep the best weights (when early stopping is on) and decide whether to stop."""
    loss = evaluate(model, val_set, collate, batch_size=o.batch_size, runtime=runtime)
    run.eval_loss = loss
    if run.best_eval_loss is None or loss < run.best_eval_loss - o.min_delta:
        run.best_eval_loss, run.best_step, run.bad_evals = loss, run.step, 0
        if o.patience:
            write_checkpoint(checkpoint_path(run_dir, run.step, "best"), run_dir, runtime, masters=masters,
                             state={"step": run.step, "eval_loss": loss})
            if runtime.is_main:
                prune_bests(run_dir, keep={run.step})  # once the new one is complete
    else:
        run.bad_evals += 1
        if o.patience and run.bad_evals >= o.patience:
            run.status = "early_stopped"
    return {"eval_loss": loss, "eval_ppl": _ppl(loss)}


def _evaluate_extra(model, sets: dict, collate, o: TrainOptions, runtime: Runtime) -> dict:
    """{NAME_loss, NAME_ppl} of each extra evaluation set."""
    out = {}
    for name, examples in sets.items():
        loss = evaluate(model, examples, collate, batch_size=o.batch_size, runtime=runtime)
        out.update({f"{name}_loss": loss, f"{name}_ppl": _ppl(loss)})
    return out


def _diverged(out: dict, run: RunState, run_dir: Path, precision: str) -> UserError:
    found = list_checkpoints(run_dir)
    kept = f"the last good checkpoint is {found[-1]}" if found else "no checkpoint was written yet"
    return UserError(f"step {run.step + 1}: the loss or gradients became non-finite (loss {out['loss']}, "
                     f"gradient norm {out['grad_norm']}) in {precision}; training stopped and {kept}. "
                     "Lower the learning rate, keep gradient clipping on, or train in fp32")


# ----------------------------------------------------------------------------- the end
def _finish(model, run: RunState, masters: MasterWeights, extra_evals: dict, collate, o: TrainOptions,
            run_dir: Path, runtime: Runtime, metrics: MetricsLog, session: tuple, total_steps: int,
            global_batch: int) -> dict:
    """End on the right weights and write the summary (a finished run resumed keeps its own)."""
    if run.status == "running":
        run.status = "completed"
    restored = _restore_best(run_dir, run, masters, o, runtime)
    start, tokens_before, seconds_before = session
    saved = read_json(run_dir / "summary.json")
    if run.tokens == tokens_before and saved and saved.get("status") != "interrupted":
        return saved  # a finished run resumed: nothing new happened, its summary stands
    summary = _summary(run, model, masters, o, runtime, restored=restored, total_steps=total_steps,
                       global_batch=global_batch, wall=time.perf_counter() - start,
                       throughput=(run.tokens - tokens_before, run.step_seconds - seconds_before))
    if extra_evals and run.status != "interrupted":  # on the weights the run ends with
        final = _evaluate_extra(model, extra_evals, collate, o, runtime)
        metrics.write({"step": run.step, "final": True, "weights_of_step": summary["weights_of_step"], **final})
        for key, value in final.items():  # NAME_loss -> NAME_loss_before, NAME_loss_after
            summary.update({f"{key}_before": run.first_extra.get(key), f"{key}_after": value})
    if runtime.is_main:
        write_json(run_dir / "summary.json", summary)
    return summary


def _restore_best(run_dir: Path, run: RunState, masters: MasterWeights, o: TrainOptions, runtime: Runtime) -> bool:
    """With early stopping on, end on the best evaluation's weights. True if they were loaded."""
    if not o.patience or run.status == "interrupted" or run.best_step in (None, run.step):
        return False
    _agreed(False, runtime)  # a barrier: rank 0 has finished writing the best checkpoint
    path = checkpoint_path(run_dir, run.best_step, "best")
    restore_masters(load_checkpoint(path), masters, path, runtime)
    return True


def _summary(run: RunState, model, masters: MasterWeights, o: TrainOptions, runtime: Runtime, *, restored: bool,
             total_steps: int, global_batch: int, wall: float, throughput: tuple[int, float]) -> dict:
    """The run's outcome. eval_loss is that of the weights the run ends with (the best evaluation's
    when early stopping restored them; last_eval_loss is then the last evaluation's). tokens_per_s
    is this session's training throughput (tokens, padding included, over the steps' own time)."""
    final_loss = run.best_eval_loss if restored else run.eval_loss
    tokens, seconds = throughput
    return {"status": run.status, "steps": run.step, "total_steps": total_steps,
            "optimizer_steps": run.updates, "skipped_steps": run.skipped_steps,
            "weights_of_step": run.best_step if restored else run.step,
            "train_loss": run.train_loss, "first_eval_loss": run.first_eval_loss,
            "first_eval_ppl": _ppl(run.first_eval_loss),
            "eval_loss": final_loss, "eval_ppl": _ppl(final_loss), "last_eval_loss": run.eval_loss,
            "best_eval_loss": run.best_eval_loss, "best_step": run.best_step, "restored_best": restored,
            "tokens": run.tokens, "target_tokens": run.target_tokens, "wall_time_s": round(wall, 3),
            "tokens_per_s": round(tokens / seconds, 1) if seconds > 0 else None,
            "peak_memory_mib": round(peak_memory_mib(runtime.device), 1),
            "peak_reserved_mib": _rounded(peak_reserved_mib(runtime.device)), "precision": o.precision,
            "trainable_params": sum(m.numel() for m in masters.masters),
            "total_params": sum(p.numel() for p in model.parameters()),
            "global_batch": global_batch, "world_size": runtime.world_size, "fsdp": runtime.sharded}


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _ppl(loss: float | None) -> float | None:
    return None if loss is None else math.exp(min(loss, 700.0))  # exp overflows past ~709


def _postfix(record: dict, run: RunState) -> dict:
    """The bar's fields: train and validation loss and perplexity side by side (overfitting shows
    as the two drifting apart), then the learning rate, throughput and fp16 loss scale."""
    shown = {"loss": f"{record['loss']:.4f}", "ppl": f"{record['ppl']:.2f}"}
    if run.eval_loss is not None:
        shown.update(val=f"{run.eval_loss:.4f}", val_ppl=f"{_ppl(run.eval_loss):.2f}")
    shown.update({"lr": f"{record['lr']:.2e}", "tok/s": f"{record['tokens_per_s']:.0f}"})
    if record["loss_scale"] != 1.0:
        shown["scale"] = f"{record['loss_scale']:.0f}"
    return shown


# ----------------------------------------------------------------------------- stopping by signal
class StopRequest:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step, so it can save first."""

    def __init__(self):
        self.requested = False
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested:  # a second Ctrl-C means now
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _agreed(flag: bool, runtime: Runtime) -> bool:
    """True on every rank if it is true on any (all ranks must stop at the same step)."""
    if runtime.world_size == 1:
        return flag  # no collective, so no wait for the device
    t = torch.tensor([float(flag)], device=runtime.device)
    all_reduce_sum_([t], runtime)
    return bool(t.item() > 0)
