"""The command line that train_instruct.py and train_finetune.py share: the flags both take
(their names are a contract with users' scripts), turning them into TrainOptions, `--resume`,
and how a run ends (a user's mistake is one line on stderr and exit status 2, no traceback).

Each script adds its own data flags and keeps its `main` readable top to bottom; this module
only holds what would otherwise be written twice.
"""

import argparse
import errno
import math
import sys
import time
from pathlib import Path

import torch

from minituner.batching import real_token_fraction
from minituner.distributed import Runtime, all_gather_object
from minituner.errors import UserError
from minituner.lora import DEFAULT_TARGETS
from minituner.precision import POLICIES
from minituner.state import (EXPORTS, adopt_legacy_run, begin_run, check_export_target, check_new_run,
                             check_outside_runs, latest_checkpoint, read_run_config)
from minituner.trainer import TrainOptions, micro_batches, step_examples

PATH_FLAGS = ("base", "data", "val_data", "general_eval", "eval_exact", "cloze")  # eval_exact: a list
# learning rates that usually work: adapters tolerate (and need) a larger step than full weights
DEFAULT_LR = {"lora": 2e-4, "full": 2e-5}


def add_method_flags(p: argparse.ArgumentParser, default: str) -> None:
    g = p.add_argument_group("method")
    g.add_argument("--method", choices=["lora", "full"], default=default,
                   help=f"lora: train low-rank adapters, base frozen; full: train every weight (default {default})")
    g.add_argument("--lora-rank", type=int, default=8, help="LoRA rank r")
    g.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA alpha; the update is scaled by alpha/r")
    g.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA branch's input")
    g.add_argument("--lora-targets", default=",".join(DEFAULT_TARGETS),
                   help="comma-separated module names as in the HF checkpoint (GPT-2: c_attn,c_proj,c_fc), or "
                        "all-linear; the default takes the attention and MLP projections the model has")
    g.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(r) instead of alpha/r (rsLoRA)")


def add_training_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=0, help="optimizer steps (0 = use --epochs)")
    g.add_argument("--epochs", type=float, default=1.0, help="passes over the training set when --steps is 0")
    g.add_argument("--batch-size", type=int, default=4, help="examples per micro-batch per process")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default 2e-4 for lora, 2e-5 for full, 1e-3 from scratch)")
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="the schedule decays to lr x this")
    g.add_argument("--warmup-steps", type=int, default=0, help="linear warmup steps")
    g.add_argument("--schedule", choices=["cosine", "linear", "constant"], default="cosine", help="decay after warmup")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (not on norms, biases, embeddings)")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the global gradient norm (0 = off)")
    g.add_argument("--seed", type=int, default=0, help="seed of the data order, the split and the initialisations")
    g = p.add_argument_group("evaluation and checkpoints")
    g.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0 = at the start and end only)")
    g.add_argument("--patience", type=int, default=0,
                   help="stop after N evaluations without improvement and restore the best weights (0 = off)")
    g.add_argument("--min-delta", type=float, default=0.0, help="smallest validation-loss drop that counts")
    g.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0 = at the end only)")
    g.add_argument("--keep-checkpoints", type=int, default=2, help="how many step checkpoints to keep")
    g = p.add_argument_group("hardware")
    g.add_argument("--precision", choices=["auto", *POLICIES], default="auto",
                   help="compute dtype; weights and optimizer stay fp32 (auto = bf16 on CUDA, fp32 on CPU)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (torchrun picks each process's GPU)")
    g = p.add_argument_group("run folder")
    g.add_argument("--out", default=None, help="run folder (default runs/<script>-<date>-<time>)")
    g.add_argument("--resume", metavar="DIR", default=None,
                   help="continue the run in DIR from its newest checkpoint, with the options it was started with")
    g.add_argument("--samples", type=int, default=3, help="held-out prompts to generate from before and after")
    g.add_argument("--max-new-tokens", type=int, default=64, help="length of those generations")
    g.add_argument("--no-progress", action="store_true", help="no progress bar (logs stay in metrics.jsonl)")


def resolve_resume(args: argparse.Namespace, parser: argparse.ArgumentParser, script: str) -> argparse.Namespace:
    """The options to run with: the command line's, or with --resume DIR those saved in DIR's
    config.json (only --device and --no-progress may change: a run can move to another machine)."""
    if args.resume is None:
        args.out = args.out or f"runs/{script}-{time.strftime('%Y%m%d-%H%M%S')}"
        return args
    saved = read_run_config(args.resume)
    if saved.get("script") != script:
        raise UserError(f"--resume {args.resume}: its config.json was not written by {script}.py")
    def differs(key, value) -> bool:  # a path given again, relative, is the same path
        if key in PATH_FLAGS and value and saved.get(key):
            if isinstance(value, list):
                return [Path(v).resolve() for v in value] != [Path(v).resolve() for v in saved[key]]
            return Path(value).resolve() != Path(saved[key]).resolve()
        return value != saved.get(key)

    changed = [k for k, v in vars(args).items()
               if k not in ("resume", "device", "no_progress") and v != parser.get_default(k) and differs(k, v)]
    if changed:
        print(f"note: --resume uses the run's saved options; ignoring --{changed[0].replace('_', '-')}"
              + (f" and {len(changed) - 1} more" if len(changed) > 1 else ""), file=sys.stderr)
    merged = argparse.Namespace(**{**vars(args), **{k: v for k, v in saved.items() if k in vars(args)}})
    merged.resume, merged.device, merged.no_progress, merged.out = args.resume, args.device, args.no_progress, args.resume
    return merged


def run_config(args: argparse.Namespace, script: str) -> dict:
    """What RUN/config.json records: the script and every option, so that --resume restarts the same run."""
    return {"script": script, **{k: v for k, v in vars(args).items() if k != "resume"}}


def settle(args: argparse.Namespace, device: torch.device, default_lr: float | None = None) -> None:
    """Fill in the options whose default depends on the device or the method, so that
    config.json records what ran and a resumed run (maybe elsewhere) runs the same; and check
    early what would otherwise fail only after the model and data are loaded."""
    args.precision = resolve_precision(args.precision, device)
    if args.lr is None:
        args.lr = default_lr or DEFAULT_LR[args.method]
    if args.patience and (not args.eval_every or (args.val_fraction == 0 and not args.val_data)):
        raise UserError("--patience needs validation data (--val-fraction > 0 or --val-data) and --eval-every > 0")
    if not 0 <= args.val_fraction < 1:
        raise UserError(f"--val-fraction {args.val_fraction} must be in [0, 1)")
    if args.max_len is not None and args.max_len < 3:
        raise UserError(f"--max-len {args.max_len}: a row needs at least 3 tokens")
    if args.samples < 0 or args.max_new_tokens < 1:
        raise UserError("--samples must be >= 0 and --max-new-tokens >= 1")
    for flag in PATH_FLAGS:  # absolute, so that config.json (and --resume) work from any folder
        value = getattr(args, flag, None)
        paths = value if isinstance(value, list) else [value] if value else []
        for path in paths:
            if not Path(path).exists():
                raise UserError(f"--{flag.replace('_', '-')} {path}: no such file or folder")
        resolved = [str(Path(path).resolve()) for path in paths]
        if value:
            setattr(args, flag, resolved if isinstance(value, list) else resolved[0])
    if args.val_data and args.val_data == args.data:
        raise UserError("--val-data is the --data file itself: validation must be held out")
    check_apart(args)  # before any work: inputs are never inside the folder the run writes
    if args.resume is None:
        check_outside_runs(args.out)
        check_new_run(args.out)  # a new or empty folder, never one holding anything of the user's or a run
    else:
        latest_checkpoint(args.out)  # before any work: a run with nothing to resume from


def check_apart(args: argparse.Namespace) -> None:
    """--out is neither an input path, nor inside one, nor around one: a run replaces files in its
    folder, and a corpus folder holding the run would read the run's own files as text. The
    built-in experiment's data, which it generates into RUN/data/, is the run's own."""
    out = Path(args.out).resolve()
    own = out / "data" if args.builtin else None
    for flag in PATH_FLAGS:
        value = getattr(args, flag, None)
        for path in value if isinstance(value, list) else [value] if value else []:
            p = Path(path).resolve()
            if own is not None and (p == own or own in p.parents):
                continue
            relation = ("is" if p == out else "contains" if out in p.parents else
                        "lies inside" if p in out.parents else None)
            if relation:
                raise UserError(f"--out {args.out} {relation} --{flag.replace('_', '-')} {path}: the run folder "
                                "must be apart from the inputs; choose another --out")


def start_run_folder(args: argparse.Namespace, runtime: Runtime, script: str) -> None:
    """Make the run folder this run's before anything is written into it (rank 0; the others
    wait): a new run marks it (see state.py); a resumed one must find its exports its own, and
    a run folder from before the marker gets one."""
    if runtime.is_main:
        if args.resume is None:
            begin_run(args.out, script=script)
        else:
            adopt_legacy_run(args.out, script=script)
    all_gather_object(None, runtime)  # a barrier: every rank sees the marked folder
    if args.resume is not None:
        for name in EXPORTS:  # before training, not after it
            check_export_target(args.out, name)


def read_with_validation(read, split, args: argparse.Namespace, say, unit: str) -> tuple[list, list]:
    """Training and validation items: --data split by --val-fraction (split(items, fraction, seed)),
    or --data and --val-data, each read by read(path) -> (items, report)."""
    items, report = read(args.data)
    for line in report["warnings"]:
        say(f"warning: {line}")
    if args.val_data:
        val, val_report = read(args.val_data)
        for line in val_report["warnings"]:
            say(f"warning: {line}")
        return items, val
    train, val = split(items, args.val_fraction, seed=args.seed)
    if args.val_fraction > 0 and not val:
        say(f"warning: --val-fraction {args.val_fraction} holds out nothing from {len(items)} {unit}: "
            "training without validation (give --val-data, or more data)")
    return train, val


def check_max_len(max_len: int, config, say, max_new_tokens: int = 0) -> None:
    """A row longer than the model's context: impossible with learned positions (GPT-2), and
    with rotary positions a stretch beyond what the model was trained on (said, not refused).
    Generations (samples, scoring) are prompts of fewer than max_len tokens plus max_new_tokens;
    pass 0 when nothing will be generated."""
    if config.positions == "learned" and max_new_tokens and max_new_tokens >= min(max_len, config.max_seq_len):
        raise UserError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the model's "
                        f"{min(max_len, config.max_seq_len)} positions")
    if max_len <= config.max_seq_len:
        return
    if config.positions == "learned":
        raise UserError(f"--max-len {max_len} exceeds the model's {config.max_seq_len} learned positions; "
                        f"use --max-len {config.max_seq_len} or less")
    say(f"note: --max-len {max_len} exceeds the model's context ({config.max_seq_len} tokens): it will be "
        "trained on positions it has not seen")


def train_options(args: argparse.Namespace) -> TrainOptions:
    return TrainOptions(steps=args.steps, epochs=args.epochs, batch_size=args.batch_size, grad_accum=args.grad_accum,
                        lr=args.lr,
                        min_lr_ratio=args.min_lr_ratio, warmup_steps=args.warmup_steps, schedule=args.schedule,
                        weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm, precision=args.precision,
                        eval_every=args.eval_every, patience=args.patience, min_delta=args.min_delta,
                        save_every=args.save_every, keep_checkpoints=args.keep_checkpoints, seed=args.seed)


def lora_options(args: argparse.Namespace) -> dict:
    """apply_lora's keyword arguments from the LoRA flags."""
    targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
    if args.lora_rank < 1 or args.lora_alpha <= 0 or not 0 <= args.lora_dropout < 1 or not targets:
        raise UserError("--lora-rank must be >= 1, --lora-alpha > 0, --lora-dropout in [0, 1), "
                        "--lora-targets non-empty")
    return {"rank": args.lora_rank, "alpha": args.lora_alpha, "targets": targets, "dropout": args.lora_dropout,
            "rslora": args.rslora}


def run_main(run, argv=None) -> int:
    """Call run(argv); a UserError is one line on stderr and exit status 2."""
    try:
        return run(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before or after the training loop, which handles Ctrl-C itself
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # a full disk while writing a log line or a sample: the checkpoints are intact
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"error: the disk is full ({e.filename or e}); free some space, then --resume", file=sys.stderr)
        return 1


def resolve_precision(name: str, device) -> str:
    """'auto' is bf16 on a GPU that computes it natively, fp16 on an older GPU, fp32 on the CPU."""
    if name != "auto":
        return name
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"


# ----------------------------------------------------------------------------- reporting
def real_token_share(train_set: list, options: TrainOptions, world_size: int) -> float | None:
    """The real (non-pad) share of the tokens of the first (up to) 100 steps' micro-batches,
    batched exactly as the trainer will."""
    lengths = [len(e["input_ids"]) for e in train_set]
    global_batch = options.batch_size * options.grad_accum * world_size
    batches = []
    steps = min(100, len(train_set) // global_batch)
    if steps == 0:
        return None
    for step in range(steps):
        indices = step_examples(step, n_examples=len(train_set), global_batch=global_batch, seed=options.seed)
        for rank in range(world_size):
            batches += micro_batches(indices, lengths, rank=rank, batch_size=options.batch_size,
                                     grad_accum=options.grad_accum)
    return real_token_fraction(lengths, batches)


def print_outcome(summary: dict, samples: list[dict], written) -> None:
    """A finished run on stdout: losses and perplexities before and after, cost, samples, folders."""
    print(f"\n{summary['status']} after {summary['steps']} steps; train loss {summary['train_loss']:.4f}")
    if summary["eval_loss"] is not None and summary.get("first_eval_loss") is not None:
        print(f"validation loss {summary['first_eval_loss']:.4f} -> {summary['eval_loss']:.4f} "
              f"(perplexity {_ppl(summary['first_eval_ppl'])} -> {_ppl(summary['eval_ppl'])})")
    if summary.get("general_loss_after") is not None:
        print(f"general text loss {summary['general_loss_before']:.4f} -> {summary['general_loss_after']:.4f} "
              f"(perplexity {_ppl(summary['general_ppl_before'])} -> {_ppl(summary['general_ppl_after'])}): "
              "the cost of specialising")
    if summary.get("restored_best"):
        print(f"early stopping restored the weights of step {summary['best_step']}")
    speed = f"{summary['tokens_per_s']:,.0f} tokens/s, " if summary.get("tokens_per_s") else ""
    print(f"trained {summary['trainable_params']:,} of {summary['total_params']:,} parameters; "
          f"{speed}peak memory {summary['peak_memory_mib']:,.0f} MiB")
    for s in samples:
        print(f"\n--- prompt\n{s['prompt']}\n--- before\n{s['before']}\n--- after\n{s['after']}")
    print("\nwritten: " + ", ".join(str(p) for p in written))


def print_table(title: str, rows: list[tuple[str, str, str]]) -> None:
    """A before/after table in markdown, so it can be pasted into notes as it is."""
    if not rows:
        return
    width = max(len(r[0]) for r in rows)
    print(f"\n{title}:\n| {'':{width}} | before | after |\n|{'-' * (width + 2)}|-------:|------:|")
    for name, before, after in rows:
        print(f"| {name:{width}} | {before:>6} | {after:>5} |")


def _ppl(value: float | None) -> str:
    """A perplexity for people: 2 decimals, or powers of ten once it is astronomic (diverged)."""
    if value is None or not math.isfinite(value):
        return "inf"
    return f"{value:.2f}" if value < 1e6 else f"{value:.2e}"
