"""Instruction tuning: supervised training on instruction -> response pairs, with the loss on
the response tokens only, so that a pretrained model learns to follow instructions.

    python train_instruct.py                  # the built-in experiment (minituner/experiment/): no download
    python train_instruct.py --base MODEL_DIR --data data.jsonl [--template chatml] [--method lora|full]
    torchrun --nproc_per_node 2 train_instruct.py --base MODEL_DIR --data data.jsonl ...
    python train_instruct.py --resume runs/instruct-...      # continue an interrupted run

The data is Alpaca records, chat `messages` or ShareGPT `conversations` (JSON or JSONL; see
minituner/formats.py). A template (minituner/templates.py) renders each conversation into
prompt and response segments; only response tokens, with their end token, carry loss
(minituner/sft.py). The run folder gets config.json, metrics.jsonl, summary.json, checkpoints/,
samples.json (generations for held-out prompts before and after), model/ (a Hugging Face
folder: the tuned model, LoRA merged in) and, for LoRA, adapter/ (a PEFT folder). With
--eval-exact, held-out sets are scored by exact match of greedy replies before and after.
"""

import argparse
import shlex
import sys
from datetime import datetime
from functools import partial
from pathlib import Path

import torch

from minituner.atomic import write_json
from minituner.batching import pack, steps_per_epoch
from minituner.chat_template import fix_clock, template_source
from minituner.datafile import split_validation
from minituner.distributed import all_gather_object, init_runtime, shutdown
from minituner.errors import OptionError, run_command
from minituner.experiment import builtin, synth
from minituner.experiment.scoring import exact_match, spread
from minituner.formats import FORMATS, read_conversations
from minituner.generate import greedy_texts
from minituner.hf.folder import load_pretrained
from minituner.hf.tokenizer import set_chat_format
from minituner.lora import apply_lora, trainable_report
from minituner.optim import DEFAULT_LR
from minituner.precision import POLICIES
from minituner.recipes.export import export_run, load_final_weights
from minituner.recipes.flags import (FLAGS, add_method_flags, add_training_flags, check_max_len, claim_run_folder,
                                     lora_options, make_collate, model_home, on_device, read_with_validation,
                                     resolve_resume, run_config, save_dtype, settle, train_options)
from minituner.recipes.report import print_outcome, print_table
from minituner.runfolder import release_all
from minituner.sft import build_examples, n_prefix, prompt_ids, show_mask
from minituner.templates import MODEL, TEMPLATES, chat_template, check_template, default_template, stop_ids
from minituner.trainer import train

SCRIPT = "train_instruct"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="train_instruct.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument("--base", help="Hugging Face model folder to tune (config.json, safetensors, tokenizer.json)")
    g.add_argument("--data", help="training data: a JSON or JSONL file of Alpaca, messages or ShareGPT records")
    g.add_argument("--format", choices=["auto", *FORMATS], default="auto", help="the data's format (auto: detect)")
    g.add_argument("--template", choices=["auto", MODEL, *TEMPLATES], default="auto",
                   help="prompt template (model: the folder's own Jinja chat template; auto: that if the folder has "
                        "one, else chatml or llama3 if the tokenizer has their tokens, else alpaca)")
    g.add_argument("--template-date", default=None, metavar="YYYY-MM-DD",
                   help="the date a chat template reads (strftime_now, e.g. Llama 3's 'Today Date'; default: the "
                        "run's start, kept on --resume)")
    g.add_argument("--val-data", help="held-out validation file (default: split --val-fraction off --data)")
    g.add_argument("--val-fraction", type=float, default=0.05, help="share of --data held out (0 = none)")
    g.add_argument("--max-len", type=int, default=None,
                   help="tokens per example; longer ones lose prompt first (default: min(2048, the model's))")
    g.add_argument("--train-on-prompt", action="store_true", help="put loss on prompt tokens too (ablation)")
    g.add_argument("--pack", action="store_true", help="pack several examples per row (isolated from each other)")
    g.add_argument("--skip-bad", action="store_true", help="skip malformed records with a warning instead of stopping")
    g.add_argument("--show-mask", action="store_true", help="print one training example with its trained tokens marked")
    g.add_argument("--eval-exact", action="append", default=[], metavar="PATH",
                   help="held-out conversations (any --format) whose final answers are scored by exact match of "
                        "the greedy reply, before and after training (repeatable)")
    add_method_flags(p, default="lora")
    add_training_flags(p)
    p.set_defaults(builtin=False)
    args = p.parse_args(argv)
    if args.resume is None and not args.base and not args.data:  # the built-in experiment
        p.set_defaults(builtin=True, **builtin.INSTRUCT_OPTIONS)
        args = p.parse_args(argv)
    args = resolve_resume(args, p, SCRIPT, argv)
    if not args.builtin and (not args.base or not args.data):
        p.error("give --base and --data (or neither, for the built-in experiment; or --resume DIR)")
    return args


def run(argv=None) -> int:
    args = parse_args(argv)
    runtime = init_runtime(args.device, args.dist_timeout, fsdp=args.fsdp)
    say = print if runtime.is_main else (lambda *a, **k: None)
    # ranks that started on another second named another default folder and date: rank 0's hold
    now = datetime.now().isoformat(timespec="seconds")
    args.out, args.template_date = all_gather_object((args.out, args.template_date or now), runtime)[0]
    if args.builtin:
        args.base = str(builtin.check_base_model())
    settle(args, runtime.device, default_lr=DEFAULT_LR[args.method], say=say)
    fix_clock(template_date(args))
    options = train_options(args)
    lora = lora_options(args) if args.method == "lora" else None
    if args.builtin and args.resume is None:
        claim_run_folder(args, runtime, SCRIPT)  # the built-in experiment writes its data into it
        builtin_data(args, runtime, say)

    # Model: a LoRA base is frozen, so it can live in the compute dtype from the start; full
    # fine-tuning needs the float32 weights, of which the trainer makes its masters.
    load_dtype = POLICIES[args.precision] if lora else torch.float32
    model, tokenizer = load_pretrained(args.base, device=model_home(runtime), dtype=load_dtype)
    template = default_template(tokenizer) if args.template == "auto" else args.template
    check_template(template, tokenizer)
    max_len = args.max_len or min(2048, model.config.max_seq_len)
    check_max_len(max_len, model.config, say, args.max_new_tokens if args.samples or args.eval_exact else 0)
    if lora:  # the adapters, before the data, so that a wrong --lora-targets is said at once
        torch.manual_seed(args.seed)  # their initialisation follows --seed
        apply_lora(model, **lora)
    say(trainable_report(model))
    model.activation_checkpointing = args.activation_checkpointing

    # Data: conversations -> (validation split) -> token ids with the loss mask -> (packing)
    read = partial(read_conversations, format=args.format, skip_bad=args.skip_bad)
    train_convs, val_convs = read_with_validation(read, split_validation, args, say, "conversations")
    build = partial(build_examples, tokenizer=tokenizer, template=template, max_len=max_len,
                    train_on_prompt=args.train_on_prompt)
    train_set, stats = build(train_convs, source=args.data)
    say(f"data: {stats_line(stats)}; template {template_name(template, tokenizer)}, max length {max_len}")
    val_set = None
    if val_convs:
        val_set, val_stats = build(val_convs, source=args.val_data or f"{args.data} (validation split)")
        say(f"validation: {stats_line(val_stats)}")
    if args.show_mask:
        say(show_mask(train_set[0], tokenizer))
    if args.pack:
        n = len(train_set)
        train_set = pack(train_set, max_len)
        say(f"packing: {n} examples in {len(train_set)} rows of at most {max_len} tokens")
    collate = make_collate(args, tokenizer, train_set, options, runtime.world_size, say)
    steps_per_epoch(len(train_set), options.batch_size * options.grad_accum * runtime.world_size)  # enough data?

    claim_run_folder(args, runtime, SCRIPT)  # every check has passed: from here on the run writes into it

    # Samples before training (a fresh adapter has B = 0: the outputs are still the base's)
    held_out = (val_convs or train_convs)[:args.samples]
    prompts = [prompt_ids(conv, tokenizer, template) for conv in held_out]
    prompts = [fit_prompt(ids, n_prefix(ids, tokenizer), max_len - args.max_new_tokens) for ids in prompts]
    stops = stop_ids(template, tokenizer)
    eval_sets = read_eval_sets(args.eval_exact, args.eval_limit)
    score = partial(score_sets, eval_sets=eval_sets, tokenizer=tokenizer, template=template,
                    max_new_tokens=args.max_new_tokens)
    before, scores_before = [], {}
    if runtime.is_main:
        with on_device(model, runtime, needed=bool(prompts or eval_sets)):
            before, scores_before = greedy_texts(model, tokenizer, prompts, stops, args.max_new_tokens), score(model)

    summary = train(model, train_set, collate, options=options, runtime=runtime, run_dir=args.out, val_set=val_set,
                    resume=args.resume is not None, run_config=run_config(args, SCRIPT),
                    progress=not args.no_progress)
    if summary["status"] == "interrupted":
        say(f"interrupted at step {summary['steps']}; continue with: python train_instruct.py --resume {args.out}")
        shutdown(runtime)
        return 130
    if runtime.is_main and runtime.sharded:  # rank 0 cannot run a sharded model alone: a whole copy, trained weights
        model = fresh_model(args, lora)
        load_final_weights(args.out, summary, model)
        model.to(runtime.device, POLICIES[args.precision])  # as training left it: in the compute dtype
    if runtime.is_main:
        after = greedy_texts(model, tokenizer, prompts, stops, args.max_new_tokens)
        samples = [{"prompt": tokenizer.decode(p, skip_special_tokens=False), "reference": conv[-1]["content"],
                    "before": b, "after": a} for p, b, a, conv in zip(prompts, before, after, held_out)]
        write_json(f"{args.out}/samples.json", {"samples": samples})
        if scores_before:
            summary["exact_match"] = {name: {"n": before["n"], "before": before["accuracy"],
                                             "after": after["accuracy"]}
                                      for (name, before), after in zip(scores_before.items(), score(model).values())}
            write_json(f"{args.out}/summary.json", summary)
        # the exported folder says how it was tuned: apply_chat_template writes the trained format (the
        # model's own template, unchanged, when that was used), and generation stops on its end-of-turn token
        trained_format = None if template == MODEL else chat_template(template, bos=bool(tokenizer.prefix_ids))
        set_chat_format(tokenizer, trained_format, stops)
        written = []
        if args.export != "none":
            del model  # the export rebuilds the model in float32 on the CPU from the base and the checkpoint
            written = export_run(args.out, summary, fresh_model(args, lora), tokenizer, lora=lora is not None,
                                 base_name=str(Path(args.base).resolve()), export=args.export, dtype=save_dtype(args))
        print_outcome(summary, samples, written, args.out)
        if scores_before:
            print_table("held-out exact match", [(f"{name} ({s['n']})", f"{s['before']:.1%}", f"{s['after']:.1%}")
                                                 for name, s in summary["exact_match"].items()])
        for path, _, _ in written:
            if Path(path).name == "model":
                print(f"\nchat with it: python -m minituner.chat --model {shlex.quote(str(path))}")
    shutdown(runtime)
    return 0


# ----------------------------------------------------------------------------- steps of run()
def fresh_model(args, lora: dict | None):
    """The model as the run built it before training, in float32 on the CPU: the base, with the
    adapters (their initial values, which the trained ones replace)."""
    model, _ = load_pretrained(args.base, device="cpu", dtype=torch.float32)
    if lora:
        apply_lora(model, **lora)
    return model


def builtin_data(args, runtime, say) -> None:
    """The built-in experiment's inputs: the shipped base, and the task splits written into
    RUN/data/ (validation for the loss; the held-out sets scored by exact match, before any
    --eval-exact of the user's)."""
    paths = builtin.prepare(args.out, builtin.instruct_data, seed=args.seed, runtime=runtime)
    args.data, args.val_data = str(paths["train"]), args.val_data or str(paths["validation"])
    args.eval_exact = [str(paths["heldout_inputs"]), str(paths["heldout_phrasings"]), *args.eval_exact]
    say(f"built-in experiment: LoRA instruction tuning of {args.base} on {len(synth.FAMILIES)} synthetic task "
        f"families ({', '.join(synth.FAMILIES)}); data in {paths['train'].parent}")


def read_eval_sets(paths: list[str], limit: int) -> dict[str, list]:
    """{name: conversations} of the --eval-exact files (any format; at most `limit` of each, see
    --eval-limit), each named by its file name without suffix (made unique by its position if two
    files share a name)."""
    sets = {}
    for i, path in enumerate(paths):
        name = Path(path).stem if Path(path).stem not in sets else f"{Path(path).stem}-{i + 1}"
        sets[name] = spread(read_conversations(path)[0], limit)
    return sets


def score_sets(model, *, eval_sets: dict, tokenizer, template: str, max_new_tokens: int) -> dict[str, dict]:
    """Exact match of greedy replies on each evaluation set: {name: scoring.exact_match's result}."""
    return {name: exact_match(model, tokenizer, template, convs, max_new_tokens=max_new_tokens, source=name)
            for name, convs in eval_sets.items()}


def fit_prompt(ids: list[int], n_prefix: int, room: int) -> list[int]:
    """A prompt cut to `room` tokens: its BOS and its end, where the question is, are kept."""
    if len(ids) <= room:
        return ids
    return ids[:n_prefix] + ids[len(ids) - max(1, room - n_prefix):]


def template_date(args) -> datetime:
    """The time the run's chat templates read: --template-date, else the run's start (recorded in
    config.json, so that a resumed run renders the same text)."""
    try:
        return datetime.fromisoformat(args.template_date)
    except ValueError:
        raise OptionError("template_date", f"{args.template_date!r} is not a date (YYYY-MM-DD)") from None


def template_name(template: str, tokenizer) -> str:
    return f"{MODEL} ({template_source(tokenizer)})" if template == MODEL else template


def stats_line(stats: dict) -> str:
    parts = [f"{stats['examples']} examples", f"{stats['tokens']:,} tokens ({stats['trained_tokens']:,} trained)"]
    if stats.get("per_turn"):
        parts.append(f"{stats['per_turn']} conversations taken one assistant turn per example (the template "
                     "rewrites earlier turns)")
    if stats.get("unprompted"):
        parts.append(f"{stats['unprompted']} answers not starting with the template's generation prompt (trained "
                     "from where they differ)")
    if stats.get("straddling"):
        parts.append(f"{stats['straddling']} trained tokens straddle a prompt/answer boundary")
    if stats.get("unended"):
        parts.append(f"{stats['unended']} answers followed by no special token (the template writes no end-of-turn "
                     "token to learn to stop on)")
    if stats.get("truncated"):
        parts.append(f"{stats['truncated']} truncated")
    if stats.get("dropped"):
        parts.append(f"{stats['dropped']} dropped (no response token fits --max-len)")
    return ", ".join(parts)


# ----------------------------------------------------------------------------- entry point
def main(argv=None) -> int:
    try:
        return run_command(run, argv, FLAGS)
    finally:
        release_all()  # the run folder's lock, when the run ends in a process that goes on
        fix_clock(None)  # and the date its chat templates read


if __name__ == "__main__":
    sys.exit(main())
