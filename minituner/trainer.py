"""The training loop both scripts share: one function, `train`, readable top to bottom.

Instruction tuning and fine-tuning differ in their data (which tokens carry loss) and in which
parameters train (LoRA or all); the mechanics of a step are the same and live here:

    for each optimizer step:
        learning rate from the schedule
        count the step's target tokens over every micro-batch and rank
        per micro-batch: forward, fp32 loss sum / step token count * loss scale, backward,
                         move gradients into the fp32 masters
        sum gradients over ranks; unscale; global norm (inf/nan = fp16 overflow: skip the step)
        clip; optimizer step on the masters; copy masters into the model; zero gradients
        update the loss scale; log; evaluate / early-stop; checkpoint; honour SIGINT/SIGTERM

Batch semantics: `batch_size` is one process's micro-batch, and a step consumes
batch_size x grad_accum x world_size examples. Which examples form step s depends only on the
seed and s (a per-epoch permutation cut into equal global batches; the remainder of an epoch
that does not fill one is left out of that epoch, so every step has the same size). However
a step is split into micro-batches and processes, it trains on the same set, and because the
loss is normalised by the step's total target-token count, to the same gradient.

The data contract: `train_set` and `val_set` are sequences of examples, each a dict with at
least "input_ids"; `collate(examples)` returns a batch dict of tensors with "input_ids" and
"labels" (B, T) and optionally "position_ids" and "document_ids" (packed sequences).
"""

import math
import random
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from minituner.distributed import (Runtime, all_gather_object, all_reduce_sum_, broadcast_, peak_memory_mib,
                                   synchronize)
from minituner.errors import UserError, read_json
from minituner.loss import lm_loss_sum, target_count
from minituner.optim import build_optimizer, clip_grads_, grad_norm, lr_at
from minituner.precision import LossScaler, MasterWeights, compute_dtype
from minituner.state import (CHECKPOINTS, MetricsLog, begin_run, check_new_run, checkpoint_path, list_checkpoints,
                             load_checkpoint, load_latest_readable, prune_bests, prune_checkpoints, read_marker,
                             rng_state, save_checkpoint, set_aside, set_rng_state, write_failure, write_json)


@dataclass
class TrainOptions:
    # length: `steps` optimizer steps, or (steps = 0) `epochs` passes over the training set
    steps: int = 0
    epochs: float = 1.0
    # batches: a step is batch_size x grad_accum x world_size examples
    batch_size: int = 4
    grad_accum: int = 1
    # optimizer (AdamW on fp32 masters) and schedule (linear warmup, then decay to lr x min_lr_ratio)
    lr: float = 2e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 0
    schedule: str = "cosine"  # cosine | linear | constant
    weight_decay: float = 0.01
    decay_embeddings: bool = False  # weight decay on embedding tables too
    betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float = 1.0  # global-norm clipping; 0 = off
    # precision: fp32 | bf16 | fp16; the fp16 loss scale starts at init_scale (see precision.LossScaler)
    precision: str = "fp32"
    init_scale: float = 2.0**16
    growth_interval: int = 2000
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
        if min(self.batch_size, self.grad_accum) < 1:
            raise UserError("--batch-size and --grad-accum must be at least 1")
        if self.steps < 0 or (self.steps == 0 and self.epochs <= 0):
            raise UserError("give --steps > 0 or --epochs > 0")
        if self.lr <= 0 or self.warmup_steps < 0 or self.schedule not in ("cosine", "linear", "constant"):
            raise UserError(f"bad schedule: --lr {self.lr} must be > 0, --warmup-steps {self.warmup_steps} >= 0, "
                            f"--schedule {self.schedule} one of cosine, linear, constant")
        if min(self.eval_every, self.save_every, self.patience, self.seed) < 0 or self.keep_checkpoints < 1:
            raise UserError("--eval-every, --save-every, --patience and --seed must be >= 0, --keep-checkpoints >= 1")
        if self.max_grad_norm < 0 or self.min_delta < 0 or self.init_scale <= 0 or self.growth_interval < 1:
            raise UserError("--max-grad-norm and --min-delta must be >= 0, the initial loss scale > 0 and its "
                            "growth interval >= 1")


# ----------------------------------------------------------------------------- data order
def steps_per_epoch(n_examples: int, global_batch: int) -> int:
    if n_examples < global_batch:
        raise UserError(f"the training set has {n_examples} examples, fewer than one step's "
                        f"{global_batch} (batch size x grad accum x processes); lower --batch-size or --grad-accum")
    return n_examples // global_batch


def step_examples(step: int, *, n_examples: int, global_batch: int, seed: int) -> list[int]:
    """Indices of the examples of step `step`, from a permutation seeded by (seed, epoch)."""
    epoch, i = divmod(step, steps_per_epoch(n_examples, global_batch))
    order = np.random.default_rng([seed, epoch]).permutation(n_examples)
    return order[i * global_batch:(i + 1) * global_batch].tolist()


def micro_batches(indices: list[int], lengths: list[int], *, rank: int, batch_size: int,
                  grad_accum: int) -> list[list[int]]:
    """This rank's share of a step, split into micro-batches of similar lengths (less padding)."""
    share = indices[rank * batch_size * grad_accum:(rank + 1) * batch_size * grad_accum]
    share = sorted(share, key=lambda i: -lengths[i])
    return [share[m * batch_size:(m + 1) * batch_size] for m in range(grad_accum)]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


# ----------------------------------------------------------------------------- one step
def forward_loss(model, batch: dict, device: torch.device) -> torch.Tensor:
    """Summed fp32 loss of one batch dict (see the module docstring for its keys)."""
    optional = {k: batch[k].to(device) for k in ("position_ids", "document_ids") if k in batch}
    logits = model(batch["input_ids"].to(device), **optional)  # (B, T, V)
    return lm_loss_sum(logits, batch["labels"])


def train_step(model, batches: list[dict], *, masters: MasterWeights, optimizer, scaler: LossScaler, lr: float,
               max_grad_norm: float, runtime: Runtime) -> dict:
    """One optimizer step over this rank's micro-batches. Returns the step's loss (mean over all
    its target tokens), gradient norm, whether it was skipped, and its token counts."""
    device = runtime.device
    # The step's token counts, over every micro-batch of every rank (float64 counts exactly).
    counts = torch.tensor([sum(target_count(b["labels"]) for b in batches),
                           sum(b["input_ids"].numel() for b in batches)], dtype=torch.float64, device=device)
    all_reduce_sum_([counts], runtime)
    n_targets, n_tokens = counts.tolist()
    if n_targets == 0:
        raise UserError("a training step has no target tokens: every label is masked; check the data's labels")

    loss_sum = torch.zeros((), dtype=torch.float32, device=device)
    for batch in batches:
        loss = forward_loss(model, batch, device)  # fp32 sum over this micro-batch's targets
        (loss * (scaler.scale / n_targets)).backward()  # each token weighs 1/n_targets of the step
        masters.accumulate_grads()  # into fp32, so many micro-batches do not pile up bf16 rounding
        loss_sum += loss.detach()

    grads = masters.grads()
    all_reduce_sum_(grads + [loss_sum.view(1)], runtime)  # ranks hold disjoint tokens: sum, not mean
    inv_scale = 1.0 / scaler.scale
    for g in grads:
        g.mul_(inv_scale)  # unscale before measuring or clipping
    norm = grad_norm(grads)
    finite = bool(torch.isfinite(norm) & torch.isfinite(loss_sum))  # one inf/nan anywhere poisons the norm
    if finite:
        clip_grads_(grads, norm, max_grad_norm)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        masters.copy_to_model()
    masters.zero_grads()
    scaler.update(found_inf=not finite)  # no-op unless fp16
    return {"loss": loss_sum.item() / n_targets, "grad_norm": norm.item(), "skipped": not finite,
            "target_tokens": int(n_targets), "tokens": int(n_tokens)}


@torch.no_grad()
def evaluate(model, val_set, collate, *, batch_size: int, runtime: Runtime) -> float:
    """Mean loss over every target token of `val_set` (each rank takes every world_size-th batch)."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(val_set)), key=lambda i: -len(val_set[i]["input_ids"]))
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    totals = torch.zeros(2, dtype=torch.float64, device=runtime.device)  # loss sum, target count
    for chunk in chunks[runtime.rank::runtime.world_size]:
        batch = collate([val_set[i] for i in chunk])
        totals[0] += forward_loss(model, batch, runtime.device).double()
        totals[1] += target_count(batch["labels"])
    all_reduce_sum_([totals], runtime)
    model.train(was_training)
    if totals[1] == 0:
        raise UserError("the validation set has no target tokens")
    return (totals[0] / totals[1]).item()


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
    t = torch.tensor([float(flag)], device=runtime.device)
    all_reduce_sum_([t], runtime)
    return bool(t.item() > 0)


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
    o, run_dir = options, Path(run_dir)
    dtype = compute_dtype(o.precision, runtime.device)
    if not any(p.requires_grad for p in model.parameters()):
        raise UserError("no parameter of the model is trainable: every weight is frozen")
    if o.patience and (val_set is None or not o.eval_every):
        raise UserError("early stopping (--patience) needs validation data and --eval-every > 0")
    global_batch = o.batch_size * o.grad_accum * runtime.world_size
    per_epoch = steps_per_epoch(len(train_set), global_batch)
    total_steps = o.steps or math.ceil(o.epochs * per_epoch)
    if not resume and runtime.is_main:
        _start_fresh(run_dir, run_config)
    masters = MasterWeights(model, dtype, runtime.device)  # fp32 copies of what trains; the model in `dtype`
    broadcast_(masters.masters, runtime)  # every rank starts from rank 0's weights
    masters.copy_to_model()
    optimizer = build_optimizer(masters.named_masters(), lr=o.lr, weight_decay=o.weight_decay, betas=o.betas,
                                decay_embeddings=o.decay_embeddings)
    scaler = LossScaler(enabled=o.precision == "fp16", init_scale=o.init_scale, growth_interval=o.growth_interval)
    lengths = [len(example["input_ids"]) for example in train_set]
    seed_everything(o.seed + runtime.rank)  # ranks draw different dropout masks, as they see different data
    # What fixes the sequence of steps; a resumed run must match it to continue exactly.
    trajectory = {"examples": len(train_set), "global_batch": global_batch, "total_steps": total_steps,
                  "seed": o.seed, "precision": o.precision, "lr": o.lr, "warmup_steps": o.warmup_steps,
                  "schedule": o.schedule, "min_lr_ratio": o.min_lr_ratio, "eval_every": o.eval_every,
                  "patience": o.patience, "min_delta": o.min_delta}
    state = {"step": 0, "updates": 0, "skipped_steps": 0, "tokens": 0, "target_tokens": 0, "status": "running",
             "train_loss": None, "first_eval_loss": None, "first_extra": {}, "eval_loss": None, "best_eval_loss": None,
             "best_step": None, "bad_evals": 0, "trajectory": trajectory, "run_config": run_config}
    if resume:
        state = _resume(run_dir, trajectory, masters, optimizer, scaler, runtime)
    metrics = MetricsLog(run_dir / "metrics.jsonl", enabled=runtime.is_main,
                         resume_step=state["step"] if resume else None)
    extra_evals = extra_evals or {}
    if (val_set is not None or extra_evals) and not resume:  # the starting point, and a check of the data
        record = {"step": 0}
        if val_set is not None:
            record.update(_evaluate_and_track(model, val_set, collate, state, masters, o, run_dir, runtime))
            state["first_eval_loss"] = record["eval_loss"]  # before any training: the summary's comparison
        state["first_extra"] = _evaluate_extra(model, extra_evals, collate, o, runtime)
        metrics.write({**record, **state["first_extra"]})
    bar = tqdm(total=total_steps, initial=state["step"], unit="step", dynamic_ncols=True,
               disable=not (progress and runtime.is_main))
    start, tokens_before, seconds_before = time.perf_counter(), state["tokens"], state.get("step_seconds", 0.0)
    model.train()
    with StopRequest() as stop:
        while state["step"] < total_steps and state["status"] == "running":
            lr = lr_at(state["updates"], lr=o.lr, total_steps=total_steps, warmup_steps=o.warmup_steps,
                       schedule=o.schedule, min_lr=o.lr * o.min_lr_ratio)  # skipped steps do not advance it
            indices = step_examples(state["step"], n_examples=len(train_set), global_batch=global_batch, seed=o.seed)
            shares = micro_batches(indices, lengths, rank=runtime.rank, batch_size=o.batch_size,
                                   grad_accum=o.grad_accum)
            batches = [collate([train_set[i] for i in share]) for share in shares]
            loss_scale = scaler.scale
            synchronize(runtime.device)
            t0 = time.perf_counter()
            out = train_step(model, batches, masters=masters, optimizer=optimizer, scaler=scaler, lr=lr,
                             max_grad_norm=o.max_grad_norm, runtime=runtime)
            synchronize(runtime.device)
            if out["skipped"] and not scaler.enabled:
                raise _diverged(out, state, run_dir, o.precision)
            record = _account(state, out, lr=lr, loss_scale=loss_scale, seconds=time.perf_counter() - t0)
            done = state["step"] == total_steps
            if val_set is not None and (done or (o.eval_every and state["step"] % o.eval_every == 0)):
                try:
                    record.update(_evaluate_and_track(model, val_set, collate, state, masters, o, run_dir, runtime))
                except BaseException:  # out of memory, a second Ctrl-C: keep the step that was trained
                    _save(run_dir, state, masters, optimizer, scaler, runtime, keep=o.keep_checkpoints)
                    raise
            metrics.write(record)
            bar.update(1)
            bar.set_postfix(_postfix(record, state), refresh=False)
            if _agreed(stop.requested, runtime) and state["status"] == "running":
                state["status"] = "interrupted"
            if done or (o.save_every and state["step"] % o.save_every == 0) or state["status"] != "running":
                _save(run_dir, state, masters, optimizer, scaler, runtime, keep=o.keep_checkpoints)
    bar.close()
    if state["status"] == "running":
        state["status"] = "completed"
    restored = _restore_best(run_dir, state, masters, o, runtime)
    saved = read_json(run_dir / "summary.json")
    if state["tokens"] == tokens_before and saved and saved.get("status") != "interrupted":
        return saved  # a finished run resumed: nothing new happened, its summary stands
    summary = _summary(state, model, masters, o, runtime, restored=restored, total_steps=total_steps,
                       global_batch=global_batch, wall=time.perf_counter() - start,
                       throughput=(state["tokens"] - tokens_before, state.get("step_seconds", 0.0) - seconds_before))
    if extra_evals and state["status"] != "interrupted":  # on the weights the run ends with
        final = _evaluate_extra(model, extra_evals, collate, o, runtime)
        metrics.write({"step": state["step"], "final": True, "weights_of_step": summary["weights_of_step"], **final})
        for key, value in final.items():  # NAME_loss -> NAME_loss_before, NAME_loss_after
            summary.update({f"{key}_before": state.get("first_extra", {}).get(key), f"{key}_after": value})
    if runtime.is_main:
        write_json(run_dir / "summary.json", summary)
    return summary


# ----------------------------------------------------------------------------- loop helpers
def _account(state: dict, out: dict, *, lr: float, loss_scale: float, seconds: float) -> dict:
    """Count a finished step into the run state; return its metrics record."""
    state["step"] += 1
    state["updates"] += not out["skipped"]
    state["skipped_steps"] += out["skipped"]
    state["tokens"] += out["tokens"]
    state["target_tokens"] += out["target_tokens"]
    state["train_loss"] = out["loss"]
    state["step_seconds"] = state.get("step_seconds", 0.0) + seconds  # training time, evaluation not included
    return {"step": state["step"], "loss": out["loss"], "ppl": _ppl(out["loss"]), "lr": lr, "grad_norm": out["grad_norm"],
            "loss_scale": loss_scale, "skipped": out["skipped"], "tokens_per_s": out["tokens"] / seconds}


def _summary(state: dict, model, masters: MasterWeights, o: TrainOptions, runtime: Runtime, *, restored: bool,
             total_steps: int, global_batch: int, wall: float, throughput: tuple[int, float]) -> dict:
    """The run's outcome. eval_loss is that of the weights the run ends with (the best evaluation's
    when early stopping restored them; last_eval_loss is then the last evaluation's). tokens_per_s
    is this session's training throughput (tokens, padding included, over the steps' own time)."""
    final_loss = state["best_eval_loss"] if restored else state["eval_loss"]
    tokens, seconds = throughput
    return {"status": state["status"], "steps": state["step"], "total_steps": total_steps,
            "optimizer_steps": state["updates"], "skipped_steps": state["skipped_steps"],
            "weights_of_step": state["best_step"] if restored else state["step"],
            "train_loss": state["train_loss"], "first_eval_loss": state.get("first_eval_loss"),
            "first_eval_ppl": _ppl(state.get("first_eval_loss")),
            "eval_loss": final_loss, "eval_ppl": _ppl(final_loss), "last_eval_loss": state["eval_loss"],
            "best_eval_loss": state["best_eval_loss"], "best_step": state["best_step"], "restored_best": restored,
            "tokens": state["tokens"], "target_tokens": state["target_tokens"], "wall_time_s": round(wall, 3),
            "tokens_per_s": round(tokens / seconds, 1) if seconds > 0 else None,
            "peak_memory_mib": round(peak_memory_mib(runtime.device), 1), "precision": o.precision,
            "trainable_params": sum(m.numel() for m in masters.masters),
            "total_params": sum(p.numel() for p in model.parameters()),
            "global_batch": global_batch, "world_size": runtime.world_size}


def _ppl(loss: float | None) -> float | None:
    return None if loss is None else math.exp(min(loss, 700.0))  # exp overflows past ~709


def _postfix(record: dict, state: dict) -> dict:
    """The bar's fields: train and validation loss and perplexity side by side (overfitting shows
    as the two drifting apart), then the learning rate, throughput and fp16 loss scale."""
    shown = {"loss": f"{record['loss']:.4f}", "ppl": f"{record['ppl']:.2f}"}
    if state["eval_loss"] is not None:
        shown.update(val=f"{state['eval_loss']:.4f}", val_ppl=f"{_ppl(state['eval_loss']):.2f}")
    shown.update({"lr": f"{record['lr']:.2e}", "tok/s": f"{record['tokens_per_s']:.0f}"})
    if record["loss_scale"] != 1.0:
        shown["scale"] = f"{record['loss_scale']:.0f}"
    return shown


def _start_fresh(run_dir: Path, run_config: dict | None) -> None:
    """Begin a new run in `run_dir`: a new or empty folder, which gets the run marker first, or
    one the caller has already marked for this run (a script, before writing its data), or the
    remains of a marked run that died before its first checkpoint (cleared: nothing of it could
    be resumed)."""
    check_new_run(run_dir)
    if read_marker(run_dir) is None:
        begin_run(run_dir, script=(run_config or {}).get("script", "train"))
    shutil.rmtree(run_dir / CHECKPOINTS, ignore_errors=True)  # best-N of the dead run, temporaries
    for stale in ("metrics.jsonl", "summary.json"):
        (run_dir / stale).unlink(missing_ok=True)
    if run_config is not None:
        write_json(run_dir / "config.json", run_config)


def _diverged(out: dict, state: dict, run_dir: Path, precision: str) -> UserError:
    found = list_checkpoints(run_dir)
    kept = f"the last good checkpoint is {found[-1]}" if found else "no checkpoint was written yet"
    return UserError(f"step {state['step'] + 1}: the loss or gradients became non-finite (loss {out['loss']}, "
                     f"gradient norm {out['grad_norm']}) in {precision}; training stopped and {kept}. "
                     "Lower --lr, keep --max-grad-norm on, or use --precision fp32")


def _write_checkpoint(path: Path, run_dir: Path, **parts) -> None:
    """save_checkpoint, with a failed write (a full disk) said in one line naming the last good one."""
    try:
        save_checkpoint(path, **parts)
    except OSError as e:
        raise write_failure(e, path, run_dir) from None


def _save(run_dir: Path, state: dict, masters: MasterWeights, optimizer, scaler: LossScaler, runtime: Runtime,
          *, keep: int) -> None:
    """A resumable checkpoint of the step just finished; every rank contributes its RNG state."""
    rngs = all_gather_object(rng_state(runtime.device), runtime)
    if runtime.is_main:
        t = state["trajectory"]  # the data position follows from the step; written out for readers
        position = {"epoch": state["step"] // (t["examples"] // t["global_batch"]),
                    "examples_seen": state["step"] * t["global_batch"]}
        _write_checkpoint(checkpoint_path(run_dir, state["step"]), run_dir,
                          weights=masters.state_dict(),
                          state={**state, "scaler": scaler.state_dict(), "data_position": position},
                          optimizer=optimizer.state_dict(), rng=rngs)
        prune_checkpoints(run_dir, keep)
        prune_bests(run_dir, keep={state["best_step"]})


def _resume(run_dir: Path, trajectory: dict, masters: MasterWeights, optimizer, scaler: LossScaler,
            runtime: Runtime) -> dict:
    """Load the newest readable checkpoint of `run_dir` into the masters, optimizer, scaler and RNGs."""
    path, ckpt, skipped = load_latest_readable(run_dir)
    _agreed(False, runtime)  # a barrier: every rank has read before rank 0 sets the unreadable ones aside
    if runtime.is_main:
        for unreadable, reason in skipped:
            aside = set_aside(unreadable)
            print(f"warning: skipped {unreadable.name}, which cannot be read ({reason}); resuming from {path.name} "
                  f"(the unreadable one is kept as {aside.name})", file=sys.stderr)
    state = ckpt["state"]
    for key, value in trajectory.items():
        saved = state.get("trajectory", {}).get(key)
        if saved != value:
            raise UserError(f"{path}: the run was started with {key} = {saved}, this one has {value}; resume "
                            "with the run's own options (its config.json), or the steps would not continue it")
    masters.load_state_dict(ckpt["weights"], source=str(path))
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: the optimizer state does not fit this model ({e})") from None
    scaler.load_state_dict(state.pop("scaler"))
    state.pop("data_position", None)
    if runtime.is_main:
        prune_bests(run_dir, keep={state["best_step"]}, after=state["step"])
    if ckpt["rng"] and runtime.rank < len(ckpt["rng"]):
        set_rng_state(ckpt["rng"][runtime.rank], runtime.device)
    if state["status"] == "interrupted":
        state["status"] = "running"
    return state


def _evaluate_extra(model, sets: dict, collate, o: TrainOptions, runtime: Runtime) -> dict:
    """{NAME_loss, NAME_ppl} of each extra evaluation set."""
    out = {}
    for name, examples in sets.items():
        loss = evaluate(model, examples, collate, batch_size=o.batch_size, runtime=runtime)
        out.update({f"{name}_loss": loss, f"{name}_ppl": _ppl(loss)})
    return out


def _evaluate_and_track(model, val_set, collate, state: dict, masters: MasterWeights, o: TrainOptions,
                        run_dir: Path, runtime: Runtime) -> dict:
    """Evaluate, keep the best weights (when early stopping is on) and decide whether to stop."""
    loss = evaluate(model, val_set, collate, batch_size=o.batch_size, runtime=runtime)
    state["eval_loss"] = loss
    if state["best_eval_loss"] is None or loss < state["best_eval_loss"] - o.min_delta:
        state.update(best_eval_loss=loss, best_step=state["step"], bad_evals=0)
        if o.patience and runtime.is_main:
            _write_checkpoint(checkpoint_path(run_dir, state["step"], "best"), run_dir,
                              weights=masters.state_dict(), state={"step": state["step"], "eval_loss": loss})
            prune_bests(run_dir, keep={state["step"]})  # once the new one is complete
    else:
        state["bad_evals"] += 1
        if o.patience and state["bad_evals"] >= o.patience:
            state["status"] = "early_stopped"
    return {"eval_loss": loss, "eval_ppl": _ppl(loss)}


def _restore_best(run_dir: Path, state: dict, masters: MasterWeights, o: TrainOptions, runtime: Runtime) -> bool:
    """With early stopping on, end on the best evaluation's weights. True if they were loaded."""
    if not o.patience or state["status"] == "interrupted" or state["best_step"] in (None, state["step"]):
        return False
    _agreed(False, runtime)  # a barrier: rank 0 has finished writing the best checkpoint
    path = checkpoint_path(run_dir, state["best_step"], "best")
    masters.load_state_dict(load_checkpoint(path)["weights"], source=str(path))
    return True
