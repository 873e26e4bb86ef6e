"""The command line that both training recipes share: the flags both take (their names are a
contract with users' scripts; their defaults are the library's), `--resume`, and the checks
that run before any work, turning the flags into the library's options (TrainOptions, apply_lora's
settings). Each recipe adds its own data flags and keeps its `main` readable top to bottom.
"""

import argparse
import os
import sys
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch

from minituner.batching import check_row_length, flat_collate, pad_collate
from minituner.checkpoint import latest_checkpoint
from minituner.datafile import check_fraction
from minituner.distributed import DIST_TIMEOUT_MINUTES, Runtime, world_size_from_env
from minituner.errors import UserError, read_json
from minituner.hf.folder import read_config, stored_dtype
from minituner.lora import ALPHA, DEFAULT_TARGETS, DROPOUT, RANK, check_lora
from minituner.precision import POLICIES, auto_dtype, slow_cpu_bf16
from minituner.recipes.export import EXPORTS, SAVE_DTYPES, export_folders
from minituner.recipes.report import real_token_share
from minituner.runfolder import check_new_run, check_outside_runs, read_run_config, shown, start_run_folder
from minituner.sharding import check_fsdp
from minituner.trainer import SCHEDULES, TrainOptions, check_early_stopping

# may differ when a run resumes: the machine's flags (activation checkpointing recomputes the same values: it
# trades time for memory), and, when given again, what the run exports (`--resume RUN --export merged` adds
# RUN/model/ to a finished run; a plain --resume keeps the run's own choice)
MACHINE_FLAGS = ("resume", "device", "dist_timeout", "no_progress", "activation_checkpointing", "fsdp")
# may differ when given again on resume, as long as batch_size x grad_accum x processes stays the run's global batch
SPLIT_FLAGS = ("batch_size", "grad_accum")
EXPORT_FLAGS = ("export", "save_dtype")
PATH_FLAGS = ("base", "data", "val_data", "general_eval", "eval_exact", "cloze")  # eval_exact: a list
# Library option names whose flag is not simply --the-name (errors.OptionError.as_flag).
FLAGS = {"rank": "--lora-rank", "alpha": "--lora-alpha", "dropout": "--lora-dropout", "targets": "--lora-targets",
         "run_dir": "--out"}
D = TrainOptions  # the library's defaults are the flags' defaults


def add_method_flags(p: argparse.ArgumentParser, default: str) -> None:
    g = p.add_argument_group("method")
    g.add_argument("--method", choices=["lora", "full"], default=default,
                   help=f"lora: train low-rank adapters, base frozen; full: train every weight (default {default})")
    g.add_argument("--lora-rank", type=int, default=RANK, help="LoRA rank r")
    g.add_argument("--lora-alpha", type=float, default=ALPHA, help="LoRA alpha; the update is scaled by alpha/r")
    g.add_argument("--lora-dropout", type=float, default=DROPOUT, help="dropout on the LoRA branch's input")
    g.add_argument("--lora-targets", default=",".join(DEFAULT_TARGETS),
                   help="comma-separated module names as in the HF checkpoint (GPT-2: c_attn,c_proj,c_fc), or "
                        "all-linear; the default takes the attention and MLP projections the model has")
    g.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(r) instead of alpha/r (rsLoRA)")


def add_training_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=D.steps, help="optimizer steps (0 = use --epochs)")
    g.add_argument("--epochs", type=float, default=D.epochs, help="passes over the training set when --steps is 0")
    g.add_argument("--batch-size", type=int, default=D.batch_size, help="examples per micro-batch per process")
    g.add_argument("--grad-accum", type=int, default=D.grad_accum, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default 2e-4 for lora, 2e-5 for full, 1e-3 from scratch: optim.DEFAULT_LR)")
    g.add_argument("--min-lr-ratio", type=float, default=D.min_lr_ratio, help="the schedule decays to lr x this")
    g.add_argument("--warmup-steps", type=int, default=D.warmup_steps, help="linear warmup steps")
    g.add_argument("--schedule", choices=SCHEDULES, default=D.schedule, help="decay after warmup")
    g.add_argument("--weight-decay", type=float, default=D.weight_decay,
                   help="AdamW weight decay (not on norms, biases, embeddings)")
    g.add_argument("--max-grad-norm", type=float, default=D.max_grad_norm, help="clip the global gradient norm (0 = off)")
    g.add_argument("--seed", type=int, default=D.seed, help="seed of the data order, the split and the initialisations")
    g.add_argument("--padding-free", action=argparse.BooleanOptionalAction, default=None,
                   help="lay each micro-batch's examples side by side in one row, attention and positions kept "
                        "per example, instead of padding them to the longest: the same losses, no compute on pads "
                        "(default on; off for runs begun before it existed)")
    g = p.add_argument_group("evaluation and checkpoints")
    g.add_argument("--eval-every", type=int, default=D.eval_every,
                   help="evaluate every N steps (0 = at the start and end only)")
    g.add_argument("--patience", type=int, default=D.patience,
                   help="stop after N evaluations without improvement and restore the best weights (0 = off)")
    g.add_argument("--min-delta", type=float, default=D.min_delta, help="smallest validation-loss drop that counts")
    g.add_argument("--save-every", type=int, default=D.save_every, help="checkpoint every N steps (0 = at the end only)")
    g.add_argument("--keep-checkpoints", type=int, default=D.keep_checkpoints, help="how many step checkpoints to keep")
    g.add_argument("--eval-limit", type=int, default=0,
                   help="score at most N items of each held-out set scored before and after (exact match, cloze, "
                        "general text), spread over it (0 = all; validation data is always whole)")
    g = p.add_argument_group("hardware")
    g.add_argument("--precision", choices=["auto", *POLICIES], default="auto",
                   help="compute dtype; weights and optimizer stay fp32 (auto = bf16 on GPUs that have it, else fp16; fp32 on CPU)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (torchrun picks each process's GPU)")
    g.add_argument("--activation-checkpointing", action="store_true",
                   help="keep only each block's input and recompute the block in the backward pass: less memory for "
                        "activations, about a third more compute, the same gradients")
    g.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard weights, gradients and optimizer state over the processes (FSDP2) "
                        "instead of a whole copy in each; with one process there is nothing to shard and it runs "
                        "as without")
    g.add_argument("--dist-timeout", type=float, default=DIST_TIMEOUT_MINUTES, metavar="MINUTES",
                   help="under torchrun: how long a rank waits in a collective for the others (rank 0 works alone "
                        "while generating samples, scoring and writing checkpoints) before the run aborts")
    g = p.add_argument_group("run folder")
    g.add_argument("--out", default=None, help="run folder (default runs/<script>-<date>-<time>)")
    g.add_argument("--resume", metavar="DIR", default=None,
                   help="continue the run in DIR from its newest checkpoint, with the options it was started with")
    g.add_argument("--export", choices=EXPORTS, default=None,
                   help="what a finished run writes: merged (RUN/model/, a LoRA merged into the base), adapter "
                        "(RUN/adapter/, LoRA only), both (the LoRA default; full fine-tuning: merged) or none")
    g.add_argument("--save-dtype", choices=list(SAVE_DTYPES), default=None,
                   help="dtype of RUN/model/'s weights (auto = the base folder's, e.g. bfloat16; float32 from scratch)")
    g.add_argument("--samples", type=int, default=3, help="held-out prompts to generate from before and after")
    g.add_argument("--max-new-tokens", type=int, default=64, help="length of those generations")
    g.add_argument("--no-progress", action="store_true", help="no progress bar (logs stay in metrics.jsonl)")


def resolve_resume(args: argparse.Namespace, parser: argparse.ArgumentParser, script: str,
                   argv=None) -> argparse.Namespace:
    """The options to run with: the command line's, or with --resume DIR those saved in DIR's
    config.json (only the machine's flags may change: a run can move to another machine; and
    the split of its global batch, see fit_split)."""
    if args.resume is None:
        args.out = args.out or default_out(script)
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

    changed = [k for k, v in vars(args).items()  # (an option the run's config lacks, newer than it, is taken)
               if k not in MACHINE_FLAGS + EXPORT_FLAGS + SPLIT_FLAGS and k in saved and v != parser.get_default(k)
               and differs(k, v)]
    if changed:
        print(f"note: --resume uses the run's saved options; ignoring --{changed[0].replace('_', '-')}"
              + (f" and {len(changed) - 1} more" if len(changed) > 1 else ""), file=sys.stderr)
    merged = argparse.Namespace(**{**vars(args), **{k: v for k, v in saved.items() if k in vars(args)}})
    for key in MACHINE_FLAGS:
        setattr(merged, key, getattr(args, key))
    for key in EXPORT_FLAGS:
        setattr(merged, key, getattr(args, key) if getattr(args, key) is not None else saved.get(key))
    merged.out = args.resume
    given = given_flags(parser, argv, SPLIT_FLAGS)
    for key in given:
        setattr(merged, key, getattr(args, key))
    fit_split(merged, given, world_size_from_env())
    return merged


def given_flags(parser: argparse.ArgumentParser, argv, names) -> set[str]:
    """Which of the options `names` the command line sets, whatever the value (a default given
    again counts as given)."""
    unset = object()
    probe = parser.parse_args(argv, namespace=argparse.Namespace(**{name: unset for name in names}))
    return {name for name in names if getattr(probe, name) is not unset}


def fit_split(args: argparse.Namespace, given: set[str], processes: int) -> None:
    """A resumed run keeps its global batch, batch_size x grad_accum x processes, so that its steps
    continue the same ones, but may split it otherwise: on another number of processes, or with
    another --batch-size / --grad-accum. When the run's own split does not fit the processes, and
    --grad-accum is not given, it is chosen to keep the global batch (said); a split that cannot
    keep it is refused, naming the numbers."""
    try:
        saved = read_json(latest_checkpoint(args.out) / "state.json") or {}
    except UserError:
        return  # (said by settle: nothing to resume from)
    target = (saved.get("trajectory") or {}).get("global_batch")
    split = args.batch_size * args.grad_accum * processes
    if target is None or split == target:
        return
    per_step = target // processes  # examples per process per step
    if "grad_accum" not in given and target % processes == 0 and per_step % args.batch_size == 0:
        if os.environ.get("RANK", "0") == "0":  # (said once under torchrun)
            print(f"note: the run's global batch is {target} examples; on {processes} process(es) with --batch-size "
                  f"{args.batch_size} that is --grad-accum {per_step // args.batch_size}", file=sys.stderr)
        args.grad_accum = per_step // args.batch_size
        return
    fix = (f"give --batch-size and --grad-accum whose product is {per_step}" if target % processes == 0 else
           f"resume on a number of processes that divides {target}")
    raise UserError(f"--resume {args.out}: the run's global batch is {target} examples (batch size x grad accum x "
                    f"processes), and {args.batch_size} x {args.grad_accum} x {processes} is {split}: {fix}")


def default_out(script: str) -> str:
    """runs/<script>-<date>-<time>, with -2, -3, ... if a run started in the same second has it."""
    out = f"runs/{script}-{time.strftime('%Y%m%d-%H%M%S')}"
    n = 1
    while Path(out if n == 1 else f"{out}-{n}").exists():
        n += 1
    return out if n == 1 else f"{out}-{n}"


def run_config(args: argparse.Namespace, script: str) -> dict:
    """What RUN/config.json records: the script and every option, so that --resume restarts the same run."""
    return {"script": script, **{k: v for k, v in vars(args).items() if k != "resume"}}


def settle(args: argparse.Namespace, device: torch.device, default_lr: float, say=print) -> None:
    """Fill in the options whose default depends on the device or the method, so that
    config.json records what ran and a resumed run (maybe elsewhere) runs the same; and check,
    before any work, what would otherwise fail only after the model and data are loaded."""
    args.precision = resolve_precision(args.precision, device)
    if args.fsdp and world_size_from_env() > 1:
        check_fsdp()
    elif args.fsdp:
        say("note: --fsdp with one process: there is nothing to shard over, so it trains as without --fsdp")
    if args.padding_free is None:  # a run resumed from before the flag keeps the padded batches it began with
        args.padding_free = args.resume is None
    if args.precision == "bf16" and slow_cpu_bf16(device):
        say("note: this CPU has no bfloat16 matmul instructions (AVX-512 BF16 or AMX), so bf16 is emulated and "
            "runs many times slower than fp32 here; --precision fp32 is the fast choice on it")
    if args.lr is None:
        args.lr = default_lr
    check_early_stopping(args.patience, args.eval_every, has_validation=args.val_fraction > 0 or bool(args.val_data))
    check_fraction(args.val_fraction)
    if args.max_len is not None:
        check_row_length(args.max_len)
    if args.method == "lora":
        check_lora(args.lora_rank, args.lora_alpha, args.lora_dropout)
    args.export = args.export or ("both" if args.method == "lora" else "merged")
    args.save_dtype = args.save_dtype or "auto"
    export_folders(args.export, lora=args.method == "lora")  # an adapter of a full fine-tune is said now
    if args.samples < 0 or args.max_new_tokens < 1 or args.eval_limit < 0:
        raise UserError("--samples and --eval-limit must be >= 0, --max-new-tokens >= 1")
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
    if args.base:
        read_config(Path(args.base))  # a folder that is no model (a run folder, a config.json without a shape) is said now
    check_apart(args)  # before any work: inputs are never inside the folder the run writes
    if args.resume is None:
        check_outside_runs(args.out)
        check_new_run(args.out)  # a new or empty folder, never one holding anything of the user's or a run
    else:
        latest_checkpoint(args.out)  # before any work: a run with nothing to resume from


def model_home(runtime: Runtime) -> torch.device:
    """Where a script loads the model: its device, or under --fsdp the CPU, from which the
    sharding takes one block at a time to the device (sharding.shard_model), so that no process
    holds the whole model there."""
    return torch.device("cpu") if runtime.sharded else runtime.device


@contextmanager
def on_device(model, runtime: Runtime, needed: bool = True):
    """Rank 0's generations and scores before training run on its device: under --fsdp the model
    waits on the CPU (model_home), so it visits the device for them, whole (needed: anything to
    generate); a model too large for that is said in one line."""
    visit = needed and runtime.sharded and runtime.device.type != "cpu"
    try:
        if visit:
            model.to(runtime.device)
        yield
    except torch.OutOfMemoryError:
        raise UserError(f"{runtime.device} cannot hold the whole model to generate the samples before training "
                        "(--fsdp shards it only for training): give --samples 0, and no --eval-exact or --cloze"
                        ) from None
    finally:
        if visit:
            model.to("cpu")
            torch.cuda.empty_cache()  # (its blocks back: training's peak memory is its own)


def claim_run_folder(args: argparse.Namespace, runtime: Runtime, script: str) -> None:
    """The run folder becomes this run's (see runfolder.start_run_folder) where the run first writes
    into it, after the checks that need the model and the data: a mistake found before leaves no
    folder behind. Calling it again is a no-op."""
    exports = export_folders(args.export, lora=args.method == "lora")
    start_run_folder(args.out, resume=args.resume is not None, script=script, exports=exports, runtime=runtime)


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
                raise UserError(f"--out {shown(args.out)} {relation} --{flag.replace('_', '-')} {shown(path)}: the run "
                                "folder must be apart from the inputs; choose another --out")


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


def make_collate(args: argparse.Namespace, tokenizer, train_set: list, options: TrainOptions, world_size: int,
                 say, padded_rows: bool = True):
    """The micro-batches' collate function (padding-free or padded, see batching.py), saying what
    share of padded rows would be real tokens (padded_rows: whether examples differ in length)."""
    share = real_token_share(train_set, options, world_size) if padded_rows else None
    if share is not None and args.padding_free:
        say(f"padding-free batches: padded to their longest, the first steps' rows would be {share:.1%} real tokens")
    elif share is not None:
        say(f"real (non-pad) tokens: {share:.1%} of the first steps' batches")
    return partial(flat_collate if args.padding_free else pad_collate,
                   pad_id=tokenizer.pad_id if tokenizer.pad_id is not None else 0)


def train_options(args: argparse.Namespace) -> TrainOptions:
    return TrainOptions(steps=args.steps, epochs=args.epochs, batch_size=args.batch_size, grad_accum=args.grad_accum,
                        lr=args.lr,
                        min_lr_ratio=args.min_lr_ratio, warmup_steps=args.warmup_steps, schedule=args.schedule,
                        weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm, precision=args.precision,
                        eval_every=args.eval_every, patience=args.patience, min_delta=args.min_delta,
                        save_every=args.save_every, keep_checkpoints=args.keep_checkpoints, seed=args.seed)


def lora_options(args: argparse.Namespace) -> dict:
    """apply_lora's keyword arguments from the LoRA flags (settle has checked them; apply_lora checks the targets)."""
    targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
    return {"rank": args.lora_rank, "alpha": args.lora_alpha, "targets": targets, "dropout": args.lora_dropout,
            "rslora": args.rslora}


def save_dtype(args: argparse.Namespace) -> torch.dtype:
    """RUN/model/'s dtype: --save-dtype, or (auto) the one the base folder stores, float32 from scratch."""
    chosen = SAVE_DTYPES[args.save_dtype]
    return chosen or (stored_dtype(args.base) if getattr(args, "base", None) else torch.float32)


def resolve_precision(name: str, device) -> str:
    """'auto' is bf16 on a GPU that computes it natively, fp16 on an older GPU, fp32 on the CPU."""
    if name != "auto":
        return name
    return next(policy for policy, dtype in POLICIES.items() if dtype == auto_dtype(device))
