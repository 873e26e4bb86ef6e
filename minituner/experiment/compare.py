"""Instruction tuning and fine-tuning side by side, on the built-in experiment:

    python -m minituner.compare [--out runs/compare-DATE-TIME] [--rows abc] [--seeds N] [--jobs 2] [--scale 1.0]

It trains, each in its own process (so peak memory is each run's own), --jobs at a time, with the
two scripts:
  instruct-lora      LoRA instruction tuning of the shipped base (train_instruct.py's default)
  instruct-full      the same with every weight trained
  finetune           full fine-tuning on the domain corpus (train_finetune.py's default)
  finetune-instruct  the fine-tuned model, then LoRA instruction tuning
  overfit            fine-tuning on a small subset of the domain documents, with early stopping
  size-N             LoRA instruction tuning on the first N training examples (data size)
  phrasings-P        LoRA instruction tuning on as many examples, each family in P phrasings (diversity)
  wrong-S            the same examples with S % of them answered wrongly (quality)
  finetune-lora      domain fine-tuning through LoRA (forgetting held back)
  finetune-replay    full domain fine-tuning with general text replayed among the documents
  complementary      finetune-replay's model, then LoRA instruction tuning (both skills kept?)
then scores the base and the SCORED arms' models on one evaluation suite (exact match on held-out inputs
and phrasings, domain perplexity, cloze accuracy, general perplexity; the other arms' models on the
exact match alone: the runs themselves score nothing), asks the base with worked
examples in its prompt (prompting.py), measures what each method changed in the weights
(weights.py), and writes RUN/comparison.md (one row per claim, report.py), RUN/results.json and,
where matplotlib is installed, RUN/loss_curves.png, RUN/forgetting.png and RUN/weight_change.png.

--rows trains only the arms the chosen rows read. --seeds N repeats every arm with seeds 0 to
N - 1 (in RUN/seed-K/; the data is drawn from the seed too) and reports each number as the mean
and range over them. --scale multiplies every run's steps (a quick look, or the tests' budget).
"""

import argparse
import json
import math
import os
import random
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from functools import partial
from pathlib import Path

import torch

from minituner.batching import pad_collate
from minituner.corpus import build_blocks, read_documents, split_documents
from minituner.distributed import Runtime
from minituner.errors import UserError, read_json, run_command
from minituner.experiment import builtin, prompting, synth
from minituner.experiment.report import (OVERFIT_DOCS, PHRASINGS, REPLAY_SHARE, ROWS, SIZES, WRONG, eval_curve,
                                         markdown, plot)
from minituner.experiment.scoring import cloze_accuracy, exact_match, read_cloze, spread
from minituner.experiment.weights import weight_change
from minituner.formats import read_conversations
from minituner.hf.folder import load_pretrained
from minituner.runfolder import check_outside_runs
from minituner.step import evaluate
from minituner.templates import default_template

INSTRUCT, FINETUNE = "minituner.recipes.instruct", "minituner.recipes.finetune"  # run as python -m
INSTRUCT_FULL_LR = 1e-3  # every weight moves: a smaller step than the adapters' 4e-3 (at 2e-3: 53 % exact match, not 71 %)
SCORED = ("instruct-lora", "instruct-full", "finetune", "finetune-instruct", "finetune-lora", "finetune-replay",
          "complementary")  # arms whose models the whole suite scores (the others: exact match only)
JOBS = 2  # arms trained at once by default: on 2 cores, two 1-thread runs train 1.4x as fast as one 2-thread run
NEEDS = {"finetune-instruct": "finetune", "complementary": "finetune-replay"}  # an arm built on another's model


# ----------------------------------------------------------------------------- the runs
def flags(options: dict) -> list[str]:
    """Script flags for an options dict (the builtin module's run options)."""
    out = []
    for key, value in options.items():
        out += [f"--{key.replace('_', '-')}", str(value)]
    return out


def run_script(module: str, out: Path, extra: list[str], log, threads: str | None = None) -> dict:
    """Run `python -m module --out OUT ...` in its own process (with `threads` CPU threads, if
    given); its summary, with the wall time."""
    cmd = [sys.executable, "-m", module, "--out", str(out), "--no-progress", *extra]
    log(f"$ {' '.join(cmd[1:])}")
    env = {**os.environ, "OMP_NUM_THREADS": threads} if threads else None
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    (out.parent / f"{out.name}.log").write_text(done.stdout + done.stderr, encoding="utf-8")
    if done.returncode != 0:
        raise UserError(f"{module} failed (exit {done.returncode}); its output is in {out}.log: "
                        f"{(done.stderr.strip().splitlines() or ['?'])[-1]}")
    summary = read_json(out / "summary.json")
    if summary is None:
        raise UserError(f"{module} wrote no {out / 'summary.json'}; its output is in {out}.log")
    summary["process_wall_s"] = round(wall, 1)
    return summary


def scaled(options: dict, scale: float) -> dict:
    """Options with their steps (and the steps counted in them) multiplied by `scale`."""
    out = {**options, "steps": max(2, round(options["steps"] * scale))}
    for key in ("warmup_steps", "eval_every"):
        if options.get(key):
            out[key] = min(out["steps"], max(1, round(options[key] * scale)))
    out["warmup_steps"] = min(out.get("warmup_steps", 0), out["steps"] // 2)
    return out


def arms_for(rows: str) -> list[str]:
    """The arms the rows read, with those they build on, in training order."""
    wanted = set().union(*(ROWS[row][1] for row in rows))
    wanted |= {NEEDS[arm] for arm in wanted if arm in NEEDS}
    # the longest runs and those other arms build on first, so that no core idles at the end
    order = ["finetune", "finetune-replay", "finetune-lora", "instruct-lora", "finetune-instruct", "complementary",
             "instruct-full", *(f"size-{n}" for n in SIZES), *(f"phrasings-{p}" for p in PHRASINGS),
             *(f"wrong-{w}" for w in WRONG), "overfit"]
    return [arm for arm in order if arm in wanted]


def write_data(root: Path, seed: int) -> dict[str, Path]:
    """The built-in data of `seed` in ROOT/data/, as the built-in runs draw it for themselves: the
    arms given data read it from here, and the evaluation suite too."""
    folder = root / "data"
    return {**builtin.instruct_data(folder, seed=seed), **builtin.finetune_data(folder, seed=seed)}


def train_all(root: Path, arms: list[str], data: dict, *, seed: int, scale: float, log,
              jobs: int = 1) -> dict[str, dict]:
    """The arms' runs, in ROOT/<arm>/, `jobs` at a time (an arm built on another's model waits
    for it); {arm: summary}."""
    commands = {arm: arm_command(root, arm, data, seed=seed, scale=scale) for arm in arms}
    threads = None if jobs == 1 else str(max(1, (os.cpu_count() or 1) // jobs))  # the cores, shared out
    runs, running = {}, {}
    with ThreadPoolExecutor(jobs) as pool:
        while len(runs) < len(arms):
            for arm in arms:
                ready = arm not in NEEDS or NEEDS[arm] in runs
                if arm not in runs and arm not in running.values() and ready and len(running) < jobs:
                    running[pool.submit(run_script, *commands[arm], log, threads=threads)] = arm
            if not running:
                raise RuntimeError("an arm waits for one that is not among the arms")
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                runs[running.pop(future)] = future.result()
    return {arm: runs[arm] for arm in arms}


def arm_command(root: Path, arm: str, data: dict, *, seed: int, scale: float) -> tuple:
    """(module, out, flags) of an arm's run, its data files written. The runs neither score nor
    write samples: the evaluation suite scores every model once, and the comparison reads the
    runs' summaries."""
    instruct, finetune = scaled(builtin.INSTRUCT_OPTIONS, scale), scaled(builtin.FINETUNE_OPTIONS, scale)
    for options in (instruct, finetune):
        options.update(seed=seed, samples=0)
    out, train = root / arm, data["train"]
    base = builtin.BASE_MODEL
    if arm in NEEDS:
        base = root / NEEDS[arm] / "model"
    elif arm == "instruct-full":
        instruct = {**instruct, "method": "full", "lr": INSTRUCT_FULL_LR}
    elif arm.startswith("size-"):
        lines = train.read_text(encoding="utf-8").splitlines(True)
        train = root / "data" / f"train-{arm}.jsonl"
        train.write_text("".join(lines[:int(arm.split("-")[1])]), encoding="utf-8")
    elif arm.startswith(("phrasings-", "wrong-")):
        train = task_variant(root, arm, seed)
    elif arm == "overfit":
        return FINETUNE, out, overfit_flags(root, data, scale, seed)
    elif arm in ("finetune", "finetune-lora", "finetune-replay"):
        return FINETUNE, out, finetune_flags(root, arm, data, finetune, seed)
    return INSTRUCT, out, ["--base", str(base), "--data", str(train), "--val-data", str(data["validation"]),
                           *flags(instruct)]


def task_variant(root: Path, arm: str, seed: int) -> Path:
    """The training file of a phrasings-P or wrong-S arm: as many examples as the built-in's, each
    family in its first P phrasings, or with S % answered wrongly."""
    kind, value = arm.split("-")
    rng = random.Random(seed)
    if kind == "phrasings":
        items = synth.training_items(rng, builtin.INSTRUCT_EXAMPLES, phrasings=int(value))
    else:
        items = synth.with_wrong_answers(synth.training_items(rng, builtin.INSTRUCT_EXAMPLES), int(value) / 100,
                                         seed=seed)
    return builtin.write_jsonl(root / "data" / f"train-{arm}.jsonl", map(synth.as_messages, items))


def finetune_flags(root: Path, arm: str, data: dict, options: dict, seed: int) -> list[str]:
    """Flags of domain fine-tuning (finetune: as train_finetune.py's built-in run), through LoRA
    (finetune-lora), or with general text replayed (finetune-replay): the built-in's training and
    validation documents, split as its run splits them."""
    train_docs, val_docs = domain_split(data, seed)
    if arm == "finetune-replay":  # pretraining text (the base's own corpus) among the domain documents
        general = synth.general_corpus(round(len(train_docs) * REPLAY_SHARE / (1 - REPLAY_SHARE)), seed=seed)
        train_docs = train_docs + general
    train = builtin.write_documents(root / "data" / f"{arm}_train.txt", train_docs)
    val = builtin.write_documents(root / "data" / "domain_val.txt", val_docs)
    options = {**options, **({"method": "lora"} if arm == "finetune-lora" else {})}
    options.pop("val_fraction")
    return ["--base", str(builtin.BASE_MODEL), "--data", str(train), "--val-data", str(val), *flags(options)]


def domain_split(data: dict, seed: int) -> tuple[list[str], list[str]]:
    """The domain documents as the finetune run splits them (its --val-fraction and --seed):
    (training, validation)."""
    docs = read_documents(data["domain"])[0]
    return split_documents(docs, builtin.FINETUNE_OPTIONS["val_fraction"], seed=seed)


def overfit_flags(root: Path, data: dict, scale: float, seed: int) -> list[str]:
    """Fine-tuning on OVERFIT_DOCS training documents, validated on the finetune run's held-out
    documents, evaluated often, stopping after 3 evaluations without improvement."""
    train_docs, val_docs = domain_split(data, seed)
    small = builtin.write_documents(root / "data" / "overfit_train.txt", train_docs[:OVERFIT_DOCS])
    val = builtin.write_documents(root / "data" / "overfit_val.txt", val_docs)
    options = scaled({**builtin.FINETUNE_OPTIONS, "steps": 400, "lr": 2e-3, "eval_every": 10, "patience": 3,
                      "batch_size": 4, "seed": seed, "samples": 0}, scale)
    options.pop("val_fraction")
    return ["--base", str(builtin.BASE_MODEL), "--data", str(small), "--val-data", str(val), *flags(options)]


# ----------------------------------------------------------------------------- the evaluation suite
def suite_data(data: dict, seed: int, limit: int) -> dict:
    """The evaluation suite's items, read once from the seed's data: the held-out task sets, the
    cloze questions, the finetune run's validation documents and the general text (at most
    `limit` of each, see --eval-limit)."""
    sets = {name: read_conversations(data[name])[0] for name in ("heldout_inputs", "heldout_phrasings")}
    sets |= {"cloze": read_cloze(data["cloze"]), "general": read_documents(data["general"])[0],
             "domain": domain_split(data, seed)[1]}
    return {name: spread(items, limit) for name, items in sets.items()}


def suite(model_dir, data: dict, tasks_only: bool = False) -> dict:
    """The same measures for any model folder: exact match on held-out inputs and phrasings (in
    the template the model's folder names: chatml for the base and all tuned here), cloze
    accuracy, domain and general perplexity; only the first two if `tasks_only`."""
    model, tokenizer = load_pretrained(model_dir, device="cpu", dtype=torch.float32)
    model.eval()
    template = default_template(tokenizer)
    out = {name: exact_match(model, tokenizer, template, data[name],
                             max_new_tokens=builtin.INSTRUCT_OPTIONS["max_new_tokens"])["accuracy"]
           for name in ("heldout_inputs", "heldout_phrasings")}
    if tasks_only:
        return out
    out["cloze"] = cloze_accuracy(model, tokenizer, data["cloze"])["accuracy"]
    out["domain_ppl"] = perplexity(model, tokenizer, data["domain"])
    out["general_ppl"] = perplexity(model, tokenizer, data["general"])
    return out


def perplexity(model, tokenizer, docs: list[str]) -> float:
    """exp(mean loss) over every token of `docs`, as the fine-tuning run measures it."""
    blocks = build_blocks(docs, tokenizer, max_len=builtin.FINETUNE_OPTIONS["max_len"])[0]
    collate = partial(pad_collate, pad_id=tokenizer.pad_id if tokenizer.pad_id is not None else 0)
    loss = evaluate(model, blocks, collate, batch_size=8, runtime=Runtime(torch.device("cpu")))
    return math.exp(loss)


def prompt_the_base(data: dict, limit: int) -> dict:
    """{wording: {k: {held-out set: few_shot's measures}}} of the base model (row i)."""
    model, tokenizer = load_pretrained(builtin.BASE_MODEL, device="cpu", dtype=torch.float32)
    train, template = prompting.read_items(data["train"]), default_template(tokenizer)
    limit = min(limit or prompting.ITEMS, prompting.ITEMS)
    held_out = {name: spread(prompting.read_items(data[name]), limit)
                for name in ("heldout_inputs", "heldout_phrasings")}
    out = {}
    for wording in prompting.WORDINGS:
        for k in prompting.SHOTS:
            shots = prompting.examples_by_family(train, k)
            out.setdefault(wording, {})[str(k)] = {
                name: prompting.few_shot(model, tokenizer, items, shots, wording=wording, template=template,
                                         max_new_tokens=builtin.INSTRUCT_OPTIONS["max_new_tokens"])
                for name, items in held_out.items()}
    return out


def measure(root: Path, arms: list[str], rows: list[str], data: dict, *, seed: int, runs: dict, limit: int) -> dict:
    """One seed's results: the runs' summaries, the suite's scores of the base and of the arms'
    models, the overfitting run's validation curve, the base prompted, the weight changes."""
    items = suite_data(data, seed, limit)
    result = {"seed": seed, "runs": runs, "scores": {"base": suite(builtin.BASE_MODEL, items)}}
    for arm in arms:
        if arm != "overfit":  # the variants of the task data are read for their exact match alone
            result["scores"][arm] = suite(root / arm / "model", items, tasks_only=arm not in SCORED)
    if "overfit" in arms:
        result["curve"] = eval_curve(root / "overfit")
    if "i" in rows:
        result["prompting"] = prompt_the_base(data, limit)
    if "n" in rows:
        result["weights"] = {arm: weight_change(builtin.BASE_MODEL, root / arm / "model")
                             for arm in ("instruct-full", "finetune", "instruct-lora")}
    return result


# ----------------------------------------------------------------------------- entry point
def run(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m minituner.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=f"runs/compare-{time.strftime('%Y%m%d-%H%M%S')}", help="folder of all the runs")
    p.add_argument("--rows", default="".join(ROWS), help=f"the rows to measure, as letters (default: all, "
                                                        f"{''.join(ROWS)})")
    p.add_argument("--seeds", type=int, default=1, help="repeat every arm with this many seeds; mean and range")
    p.add_argument("--jobs", type=int, default=JOBS,
                   help="arms trained at once, sharing the CPU cores (an arm's numbers depend on its thread count)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every run's steps by this (a quick look)")
    p.add_argument("--eval-limit", type=int, default=0,
                   help="score at most N items of each evaluation set, spread over it (0 = all; a quick look)")
    args = p.parse_args(argv)
    root = Path(args.out)
    unknown = sorted(set(args.rows) - set(ROWS) - {","})
    if unknown or not args.rows.strip(","):
        raise UserError(f"--rows {args.rows}: rows are letters among {''.join(ROWS)}")
    if args.seeds < 1 or args.jobs < 1:
        raise UserError(f"--seeds {args.seeds}, --jobs {args.jobs}: each must be at least 1")
    if args.scale <= 0:
        raise UserError(f"--scale {args.scale} must be > 0")
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise UserError(f"--out {root}: not a new or empty folder; the comparison writes its runs there")
    check_outside_runs(root)
    rows = [row for row in ROWS if row in args.rows]
    arms = arms_for(rows)
    root.mkdir(parents=True, exist_ok=True)
    start, results = time.perf_counter(), []
    for seed in range(args.seeds):
        folder = root if args.seeds == 1 else root / f"seed-{seed}"
        data = write_data(folder, seed)
        runs = train_all(folder, arms, data, seed=seed, scale=args.scale, log=print, jobs=args.jobs)
        results.append(measure(folder, arms, rows, data, seed=seed, runs=runs, limit=args.eval_limit))
    command = " ".join(["python -m minituner.compare", *argv_shown(args)])
    table = [ROWS[row][0](results) for row in rows]
    text = markdown(table, results, command)
    (root / "comparison.md").write_text(text, encoding="utf-8")
    (root / "results.json").write_text(json.dumps({"command": command, "rows": table, "results": results}, indent=2),
                                       encoding="utf-8")
    pngs = plot(root if args.seeds == 1 else root / "seed-0", results[0], root)
    print("\n" + text)
    print("written: " + ", ".join(map(str, [root / "comparison.md", root / "results.json", *pngs]))
          + f" ({time.perf_counter() - start:.0f} s)")
    return 0


def argv_shown(args) -> list[str]:
    """The flags that differ from the defaults, as the command to repeat the comparison."""
    shown = [] if args.rows == "".join(ROWS) else [f"--rows {args.rows}"]
    shown += [f"--seeds {args.seeds}"] if args.seeds != 1 else []
    shown += [f"--scale {args.scale}"] if args.scale != 1.0 else []
    shown += [f"--jobs {args.jobs}"] if args.jobs != JOBS else []
    return shown + ([f"--eval-limit {args.eval_limit}"] if args.eval_limit else [])


def main(argv=None) -> int:
    return run_command(run, argv)


if __name__ == "__main__":
    sys.exit(main())
