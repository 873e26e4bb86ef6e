"""Fine-tuning: further training of a model's weights on domain or task text, every token a
target, so that it specialises; or, from random weights and a tokenizer trained on the corpus,
pretraining a small model from scratch.

    python train_finetune.py                  # the built-in experiment (minituner/experiment/): no download
    python train_finetune.py --base MODEL_DIR --data corpus.txt --val-fraction 0.1 --eval-every 50 --patience 3
    python train_finetune.py --base MODEL_DIR --data docs/ --general-eval general.txt    # forgetting in view
    python train_finetune.py --init scratch --preset small --vocab-size 4096 --data corpus.txt --steps 2000
    python train_finetune.py --resume runs/finetune-...      # continue an interrupted run

The data is a .txt/.md file (documents separated by blank lines), a folder of them, or JSONL with
a text field (see minituner/corpus.py). The validation split is by document. The two failure
modes of fine-tuning are measured, not assumed: validation loss against training loss shows
overfitting (and --patience stops at, and restores, the best point); --general-eval measures a
second corpus before and after, whose perplexity rising is forgetting. The run folder gets
config.json, metrics.jsonl, summary.json (perplexities before and after), samples.json
(continuations of held-out text before and after), model/ (a Hugging Face folder) and, for
LoRA, adapter/; a from-scratch run also keeps its tokenizer/. With --cloze, questions about
facts of the domain are scored by exact match of greedy continuations before and after.
"""

import argparse
import sys
from functools import partial
from pathlib import Path

import torch

from minituner.atomic import write_json
from minituner.batching import steps_per_epoch
from minituner.config import SIZE_PRESETS, preset_config
from minituner.corpus import build_blocks, read_documents, sample_prompts, split_documents
from minituner.distributed import all_gather_object, init_runtime, shutdown
from minituner.errors import OptionError, UserError, run_command
from minituner.experiment import builtin, domain
from minituner.experiment.scoring import cloze_accuracy, read_cloze, spread
from minituner.generate import greedy_texts
from minituner.hf.folder import load_pretrained
from minituner.hf.tokenizer import load_tokenizer, save_tokenizer
from minituner.lora import apply_lora, trainable_report
from minituner.model import Transformer
from minituner.optim import DEFAULT_LR
from minituner.precision import POLICIES
from minituner.recipes.export import export_run, load_final_weights
from minituner.recipes.flags import (FLAGS, add_method_flags, add_training_flags, check_max_len, claim_run_folder,
                                     lora_options, make_collate, model_home, on_device, read_with_validation,
                                     resolve_resume, run_config, save_dtype, settle, train_options)
from minituner.recipes.report import print_outcome, print_table
from minituner.runfolder import release_all
from minituner.tokenizer import Tokenizer
from minituner.trainer import train

SCRIPT = "train_finetune"
SHAPE_FLAGS = ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim")  # ModelConfig fields, as --dim etc.


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="train_finetune.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--init", choices=["base", "scratch"], default="base",
                   help="base: start from --base; scratch: random weights and a BPE tokenizer trained on --data")
    g.add_argument("--base", help="Hugging Face model folder to fine-tune (with --init base)")
    g.add_argument("--preset", choices=sorted(SIZE_PRESETS), default="small", help="model shape with --init scratch")
    for name in SHAPE_FLAGS:
        g.add_argument(f"--{name.replace('_', '-')}", type=int, default=None, help=f"override the preset's {name}")
    g.add_argument("--vocab-size", type=int, default=4096, help="size of the tokenizer trained with --init scratch")
    g.add_argument("--freeze-embeddings", action="store_true",
                   help="do not train the token (and position) embeddings; with tied embeddings (GPT-2, SmolLM, "
                        "from scratch) that is the output layer too")
    g.add_argument("--freeze-layers", type=int, default=0, help="do not train the first N transformer blocks")
    g = p.add_argument_group("data")
    g.add_argument("--data", help="a .txt/.md file, a folder of them, or a JSONL file with a text field")
    g.add_argument("--text-field", default="text", help="the JSONL field holding each document's text")
    g.add_argument("--val-data", help="held-out validation text (default: split --val-fraction of --data's documents)")
    g.add_argument("--val-fraction", type=float, default=0.05, help="share of documents held out (0 = none)")
    g.add_argument("--general-eval", metavar="PATH",
                   help="a second corpus (e.g. general text) evaluated before and after: the cost of specialising")
    g.add_argument("--max-len", type=int, default=None,
                   help="tokens per training row (default: min(1024, the model's context); scratch: 256)")
    g.add_argument("--layout", choices=["concat", "rows"], default="concat",
                   help="concat: documents joined into full rows; rows: one document per row, padded")
    g.add_argument("--isolate-docs", action="store_true",
                   help="with concat: a token attends only within its own document, and no token is "
                        "predicted across a document boundary")
    g.add_argument("--skip-bad", action="store_true", help="skip unreadable files or records with a warning")
    g.add_argument("--cloze", metavar="PATH",
                   help='JSONL of {"prompt", "answer"} cloze questions, scored by exact match of the greedy '
                        "continuation's first sentence, before and after")
    add_method_flags(p, default="full")
    add_training_flags(p)
    p.set_defaults(builtin=False)
    args = p.parse_args(argv)
    if args.resume is None and not args.base and not args.data and args.init == "base":  # the built-in experiment
        p.set_defaults(builtin=True, **builtin.FINETUNE_OPTIONS)
        args = p.parse_args(argv)
    args = resolve_resume(args, p, SCRIPT, argv)
    if args.isolate_docs and args.layout != "concat":
        p.error("--isolate-docs applies to --layout concat (rows hold one document each already)")
    if args.method == "lora" and args.init == "scratch":
        p.error("--method lora trains adapters on a frozen base; a model from scratch has none: use --method full")
    if args.method == "lora" and (args.freeze_embeddings or args.freeze_layers):
        p.error("--freeze-embeddings and --freeze-layers apply to --method full (LoRA freezes the whole base)")
    scratch_only = [f"--{name}" for name in ("preset", "vocab_size", *SHAPE_FLAGS)
                    if getattr(args, name) != p.get_default(name)]
    if args.init == "base" and scratch_only and args.resume is None:
        p.error(f"{', '.join(scratch_only).replace('_', '-')} shape a model built with --init scratch, not --base")
    if (not args.data and not args.builtin) or (args.init == "base") != bool(args.base or args.builtin):
        p.error("give --data, and --base (to fine-tune) or --init scratch (to pretrain), not both; "
                "or --resume DIR")
    return args


def run(argv=None) -> int:
    args = parse_args(argv)
    runtime = init_runtime(args.device, args.dist_timeout, fsdp=args.fsdp)
    say = print if runtime.is_main else (lambda *a, **k: None)
    args.out = all_gather_object(args.out, runtime)[0]  # ranks that started on another second named another default
    if args.builtin:
        args.base = str(builtin.check_base_model())
    settle(args, runtime.device, default_lr=DEFAULT_LR["scratch" if args.init == "scratch" else args.method], say=say)
    options = train_options(args)
    lora = lora_options(args) if args.method == "lora" else None
    if args.freeze_layers < 0:
        raise OptionError("freeze_layers", f"{args.freeze_layers}: must be >= 0 (the number of first blocks to freeze)")
    if args.builtin and args.resume is None:
        claim_run_folder(args, runtime, SCRIPT)  # the built-in experiment writes its data into it
        builtin_data(args, runtime, say)

    # Documents, split by document so that no held-out text is ever trained on
    read = partial(read_documents, text_field=args.text_field, skip_bad=args.skip_bad)
    train_docs, val_docs = read_with_validation(read, split_documents, args, say, "documents")
    # Model and tokenizer: a pretrained folder, or fresh ones (the tokenizer learns the training documents)
    if args.init == "base":
        load_dtype = POLICIES[args.precision] if lora else torch.float32  # a frozen base trains in the compute dtype
        model, tokenizer = load_pretrained(args.base, device=model_home(runtime), dtype=load_dtype)
        max_len = args.max_len or min(1024, model.config.max_seq_len)
        check_max_len(max_len, model.config, say, args.max_new_tokens if args.samples or args.cloze else 0)
    else:
        max_len = args.max_len or 256
        claim_run_folder(args, runtime, SCRIPT)  # its tokenizer is kept in it
        tokenizer = scratch_tokenizer(args, train_docs, max_len, runtime)
        model = scratch_model(args, tokenizer, max_len).to(model_home(runtime))
    say(f"model: {model_line(model)}")
    freeze(model, embeddings=args.freeze_embeddings, layers=args.freeze_layers)
    if lora:  # the adapters, before the data, so that a wrong --lora-targets is said at once
        torch.manual_seed(args.seed)  # their initialisation follows --seed
        apply_lora(model, **lora)
    say(trainable_report(model))
    model.activation_checkpointing = args.activation_checkpointing

    # Token blocks (every token a target), validation and general-text sets
    blocks = partial(build_blocks, tokenizer=tokenizer, max_len=max_len, layout=args.layout, isolate=args.isolate_docs)
    train_set, stats = blocks(train_docs)
    say(f"data: {stats['documents']} documents, {stats['examples']} rows of at most {max_len} tokens, "
        f"{stats['target_tokens']:,} target tokens")
    val_set = blocks(val_docs)[0] if val_docs else None
    extra = {}
    if args.general_eval:
        general_docs, report = read_documents(args.general_eval, text_field=args.text_field, skip_bad=args.skip_bad)
        for line in report["warnings"]:
            say(f"warning: {line}")
        extra["general"] = blocks(spread(general_docs, args.eval_limit))[0]
    collate = make_collate(args, tokenizer, train_set, options, runtime.world_size, say,
                           padded_rows=args.layout == "rows")
    steps_per_epoch(len(train_set), options.batch_size * options.grad_accum * runtime.world_size)  # enough data?

    claim_run_folder(args, runtime, SCRIPT)  # every check has passed: from here on the run writes into it

    # Samples before training (a fresh adapter has B = 0: the outputs are still the base's)
    prompts = sample_prompts(val_docs or train_docs, tokenizer, args.samples)
    stops = [tokenizer.eos_id]
    cloze = spread(read_cloze(args.cloze), args.eval_limit) if args.cloze else None
    before, cloze_before = [], None
    if runtime.is_main:
        with on_device(model, runtime, needed=bool(prompts or cloze)):
            before = greedy_texts(model, tokenizer, prompts, stops, args.max_new_tokens)
            cloze_before = cloze_accuracy(model, tokenizer, cloze) if cloze else None

    summary = train(model, train_set, collate, options=options, runtime=runtime, run_dir=args.out, val_set=val_set,
                    extra_evals=extra, resume=args.resume is not None, run_config=run_config(args, SCRIPT),
                    progress=not args.no_progress)
    if summary["status"] == "interrupted":
        say(f"interrupted at step {summary['steps']}; continue with: python train_finetune.py --resume {args.out}")
        shutdown(runtime)
        return 130
    if runtime.is_main and runtime.sharded:  # rank 0 cannot run a sharded model alone: a whole copy, trained weights
        model = fresh_model(args, tokenizer, max_len, lora)
        load_final_weights(args.out, summary, model)
        model.to(runtime.device, POLICIES[args.precision])  # as training left it: in the compute dtype
    if runtime.is_main:
        after = greedy_texts(model, tokenizer, prompts, stops, args.max_new_tokens)
        samples = [{"prompt": tokenizer.decode(p), "before": b, "after": a} for p, b, a in zip(prompts, before, after)]
        write_json(Path(args.out) / "samples.json", {"samples": samples})
        if cloze_before:
            summary["cloze"] = {"n": cloze_before["n"], "before": cloze_before["accuracy"],
                                "after": cloze_accuracy(model, tokenizer, cloze)["accuracy"]}
            write_json(Path(args.out) / "summary.json", summary)
        written = []
        if args.export != "none":
            del model  # the export rebuilds the model in float32 on the CPU and loads the checkpoint's weights
            fresh = fresh_model(args, tokenizer, max_len, lora)
            base_name = str(Path(args.base).resolve()) if args.base else None
            written = export_run(args.out, summary, fresh, tokenizer, lora=lora is not None, base_name=base_name,
                                 export=args.export, dtype=save_dtype(args))
        print_outcome(summary, samples, written, args.out)
        print_table("before and after", outcome_rows(summary))
    shutdown(runtime)
    return 0


# ----------------------------------------------------------------------------- steps of run()
def builtin_data(args, runtime, say) -> None:
    """The built-in experiment's inputs: the shipped base, and the domain corpus, its cloze
    questions and held-out general text written into RUN/data/ (a --cloze or --general-eval
    given is used instead)."""
    paths = builtin.prepare(args.out, builtin.finetune_data, seed=args.seed, runtime=runtime)
    args.data = str(paths["domain"])
    args.cloze, args.general_eval = args.cloze or str(paths["cloze"]), args.general_eval or str(paths["general"])
    say(f"built-in experiment: full fine-tuning of {args.base} on documents about the fictional island "
        f"of {domain.ISLAND}; data in {paths['domain'].parent}")


def outcome_rows(summary: dict) -> list[tuple[str, str, str]]:
    """The table a run ends with: (measure, before, after) for what was measured."""
    rows = []
    if summary.get("first_eval_ppl") is not None and summary.get("eval_ppl") is not None:
        rows.append(("validation (domain) perplexity", f"{summary['first_eval_ppl']:.2f}", f"{summary['eval_ppl']:.2f}"))
    if summary.get("cloze"):
        c = summary["cloze"]
        rows.append((f"cloze accuracy ({c['n']})", f"{c['before']:.1%}", f"{c['after']:.1%}"))
    if summary.get("general_ppl_after") is not None:
        rows.append(("general-text perplexity", f"{summary['general_ppl_before']:.2f}",
                     f"{summary['general_ppl_after']:.2f}"))
    return rows


def scratch_tokenizer(args, train_docs: list[str], max_len: int, runtime) -> Tokenizer:
    """A byte-level BPE trained on the training documents by rank 0 and kept in RUN/tokenizer/, so
    that every process and a resumed run use exactly the same one."""
    folder = Path(args.out) / "tokenizer"
    if args.resume is None:  # (settle has checked that the folder holds no run whose tokenizer this would replace)
        if runtime.is_main:
            tokenizer = Tokenizer.train_bpe(train_docs, vocab_size=args.vocab_size, max_len=max_len)
            folder.mkdir(parents=True, exist_ok=True)
            save_tokenizer(tokenizer, folder)
        all_gather_object(None, runtime)  # a barrier: the other processes read what rank 0 wrote
    if not (folder / "tokenizer.json").is_file():
        raise UserError(f"--resume {args.out}: the from-scratch run has no tokenizer/ folder")
    return load_tokenizer(folder)


def fresh_model(args, tokenizer: Tokenizer, max_len: int, lora: dict | None) -> Transformer:
    """The model as the run built it before training, in float32 on the CPU (the base or the
    from-scratch initialisation, frozen parts, adapters), for its trained weights to be loaded into."""
    model = (load_pretrained(args.base, device="cpu", dtype=torch.float32)[0] if args.init == "base"
             else scratch_model(args, tokenizer, max_len))
    freeze(model, embeddings=args.freeze_embeddings, layers=args.freeze_layers)
    if lora:
        apply_lora(model, **lora)
    return model


def scratch_model(args, tokenizer: Tokenizer, max_len: int) -> Transformer:
    """Random weights of the --preset shape (with overrides), the same for the same --seed."""
    config = preset_config(args.preset, vocab_size=tokenizer.vocab_size, max_seq_len=max_len,
                           **{name: getattr(args, name) for name in SHAPE_FLAGS})
    torch.manual_seed(args.seed)
    return Transformer(config)  # initialised by Transformer.init_weights


def freeze(model, *, embeddings: bool, layers: int) -> None:
    """Stop gradients to the embeddings and/or the first `layers` blocks (before LoRA is applied)."""
    if layers > model.config.n_layers:
        raise OptionError("freeze_layers", f"{layers}: the model has {model.config.n_layers} blocks")
    frozen = [f"layers.{i}." for i in range(layers)] + (["embed_tokens.", "embed_positions."] if embeddings else [])
    for name, p in model.named_parameters():
        if name.startswith(tuple(frozen)):
            p.requires_grad_(False)


def model_line(model) -> str:
    c = model.config
    n = sum(p.numel() for p in model.parameters())
    return (f"{c.model_type}, {n / 1e6:.2f} M parameters, {c.n_layers} layers, dim {c.dim}, "
            f"vocabulary {c.vocab_size}, context {c.max_seq_len}")


# ----------------------------------------------------------------------------- entry point
def main(argv=None) -> int:
    try:
        return run_command(run, argv, FLAGS)
    finally:
        release_all()  # the run folder's lock, when the run ends in a process that goes on


if __name__ == "__main__":
    sys.exit(main())
