"""Instruction tuning and fine-tuning side by side, on the built-in experiment:

    python -m minituner.compare [--out runs/compare-DATE-TIME] [--scale 1.0] [--eval-limit N]

It trains, each in its own process (so peak memory is each run's own) with the two scripts:
  instruct-lora      LoRA instruction tuning of the shipped base (train_instruct.py's default)
  instruct-full      the same with every weight trained
  finetune           full fine-tuning on the domain corpus (train_finetune.py's default)
  finetune-instruct  the fine-tuned model, then LoRA instruction tuning
  overfit            fine-tuning on a small subset of the domain documents, with early stopping
  size-N             LoRA instruction tuning on the first N training examples (data size)
then scores the base and the first four on one evaluation suite (exact match on held-out inputs
and phrasings, domain perplexity, cloze accuracy, general perplexity) and writes RUN/comparison.md
(one row per claim), RUN/results.json and, where matplotlib is installed, RUN/loss_curves.png.
--scale multiplies every run's steps (a quick look, or the tests' cut-down budget).
"""

import argparse
import json
import math
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch

from minituner.batching import pad_collate
from minituner.corpus import build_blocks, read_documents, split_documents
from minituner.distributed import Runtime
from minituner.errors import UserError, read_json, run_command
from minituner.experiment import builtin
from minituner.experiment.scoring import cloze_accuracy, exact_match, read_cloze, spread
from minituner.formats import read_conversations
from minituner.hf.folder import load_pretrained
from minituner.runfolder import check_outside_runs
from minituner.step import evaluate
from minituner.templates import default_template

INSTRUCT, FINETUNE = "minituner.recipes.instruct", "minituner.recipes.finetune"  # run as python -m
SIZES = (100, 400)  # smaller training sets for (g); the full one is instruct-lora's
OVERFIT_DOCS = 12  # domain documents of the overfitting run
INSTRUCT_FULL_LR = 5e-4  # every weight moves: a smaller step than the adapters' 2e-3


# ----------------------------------------------------------------------------- the runs
def flags(options: dict) -> list[str]:
    """Script flags for an options dict (the builtin module's run options)."""
    out = []
    for key, value in options.items():
        out += [f"--{key.replace('_', '-')}", str(value)]
    return out


def run_script(module: str, out: Path, extra: list[str], log) -> dict:
    """Run `python -m module --out OUT ...` in its own process; its summary, with the wall time."""
    cmd = [sys.executable, "-m", module, "--out", str(out), "--no-progress", *extra]
    log(f"$ {' '.join(cmd[1:])}")
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
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


def train_all(root: Path, scale: float, eval_limit: int, log) -> dict[str, dict]:
    """Every run of the comparison, in RUN/<name>/; {name: summary}."""
    instruct, finetune = scaled(builtin.INSTRUCT_OPTIONS, scale), scaled(builtin.FINETUNE_OPTIONS, scale)
    instruct["eval_limit"] = finetune["eval_limit"] = eval_limit
    runs = {"instruct-lora": run_script(INSTRUCT, root / "instruct-lora", flags(instruct), log)}
    data = root / "instruct-lora" / "data"
    task_flags = ["--val-data", str(data / "validation.jsonl"), "--eval-exact", str(data / "heldout_inputs.jsonl"),
                  "--eval-exact", str(data / "heldout_phrasings.jsonl")]
    runs["instruct-full"] = run_script(INSTRUCT, root / "instruct-full",
                                       flags({**instruct, "method": "full", "lr": INSTRUCT_FULL_LR}), log)
    runs["finetune"] = run_script(FINETUNE, root / "finetune", flags(finetune), log)
    runs["finetune-instruct"] = run_script(
        INSTRUCT, root / "finetune-instruct",
        ["--base", str(root / "finetune" / "model"), "--data", str(data / "train.jsonl"), *task_flags,
         *flags(instruct)], log)
    lines = (data / "train.jsonl").read_text(encoding="utf-8").splitlines(True)
    (root / "data").mkdir(parents=True, exist_ok=True)
    for n in SIZES:
        subset = root / "data" / f"train-{n}.jsonl"
        subset.write_text("".join(lines[:n]), encoding="utf-8")
        runs[f"size-{n}"] = run_script(INSTRUCT, root / f"size-{n}",
                                       ["--base", str(builtin.BASE_MODEL), "--data", str(subset), *task_flags,
                                        *flags(instruct)], log)
    runs["overfit"] = run_script(FINETUNE, root / "overfit", [*overfit_flags(root, scale), "--eval-limit",
                                                               str(eval_limit)], log)
    return runs


def overfit_flags(root: Path, scale: float) -> list[str]:
    """Fine-tuning on OVERFIT_DOCS training documents, validated on the finetune run's held-out
    documents, evaluated often, stopping after 3 evaluations without improvement."""
    docs = read_documents(root / "finetune" / "data" / "domain.txt")[0]
    train_docs, val_docs = split_documents(docs, builtin.FINETUNE_OPTIONS["val_fraction"], seed=0)
    folder = root / "data"
    small = builtin.write_documents(folder / "overfit_train.txt", train_docs[:OVERFIT_DOCS])
    val = builtin.write_documents(folder / "overfit_val.txt", val_docs)
    options = scaled({**builtin.FINETUNE_OPTIONS, "steps": 400, "eval_every": 10, "patience": 3, "batch_size": 4},
                     scale)
    options.pop("val_fraction")
    return ["--base", str(builtin.BASE_MODEL), "--data", str(small), "--val-data", str(val), *flags(options)]


# ----------------------------------------------------------------------------- the evaluation suite
def suite_data(root: Path, limit: int) -> dict:
    """The evaluation suite's items, read once from the runs' data: the held-out task sets, the
    cloze questions, the finetune run's validation documents and the general text (at most
    `limit` of each, see --eval-limit)."""
    tasks, domain = root / "instruct-lora" / "data", root / "finetune" / "data"
    docs = read_documents(domain / "domain.txt")[0]
    held_out = {name: read_conversations(tasks / f"{name}.jsonl")[0]
                for name in ("heldout_inputs", "heldout_phrasings")}
    sets = {**held_out, "cloze": read_cloze(domain / "cloze.jsonl"),
            "domain": split_documents(docs, builtin.FINETUNE_OPTIONS["val_fraction"], seed=0)[1],
            "general": read_documents(domain / "general_eval.txt")[0]}
    return {name: spread(items, limit) for name, items in sets.items()}


def suite(model_dir, data: dict) -> dict:
    """The same measures for any model folder: exact match on held-out inputs and phrasings (in
    the template the model's folder names: chatml for the base and all tuned here), cloze
    accuracy, domain and general perplexity."""
    model, tokenizer = load_pretrained(model_dir, device="cpu", dtype=torch.float32)
    model.eval()
    template = default_template(tokenizer)
    out = {name: exact_match(model, tokenizer, template, data[name],
                             max_new_tokens=builtin.INSTRUCT_OPTIONS["max_new_tokens"])["accuracy"]
           for name in ("heldout_inputs", "heldout_phrasings")}
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


# ----------------------------------------------------------------------------- the report
def pct(x: float) -> str:
    return f"{x:.1%}"


def claims(scores: dict, runs: dict, curve: list[tuple[int, float]]) -> list[tuple[str, str, str]]:
    """(claim, measure, result) rows (a)-(h)."""
    base, lora, full, ft, fti = (scores[k] for k in ("base", "instruct-lora", "instruct-full", "finetune",
                                                     "finetune-instruct"))
    o = runs["overfit"]
    low = min(curve, key=lambda p: p[1]) if curve else (None, float("nan"))
    last = curve[-1] if curve else (None, float("nan"))
    sizes = [f"{n}: {pct(exact(runs[f'size-{n}']))}" for n in SIZES]
    sizes.append(f"{builtin.INSTRUCT_EXAMPLES}: {pct(exact(runs['instruct-lora']))}")
    return [
        ("(a) instruction following", "exact match, held-out inputs: base → instruction-tuned (LoRA)",
         f"{pct(base['heldout_inputs'])} → {pct(lora['heldout_inputs'])}"),
        ("(b) generalisation", "exact match, unseen inputs in unseen phrasings: base → LoRA",
         f"{pct(base['heldout_phrasings'])} → {pct(lora['heldout_phrasings'])}"),
        ("(c) domain adaptation", "domain perplexity; cloze accuracy: base → fine-tuned",
         f"{base['domain_ppl']:.2f} → {ft['domain_ppl']:.2f}; {pct(base['cloze'])} → {pct(ft['cloze'])}"),
        ("(d) overfitting", f"validation loss, fine-tuning on {OVERFIT_DOCS} documents",
         f"lowest {low[1]:.3f} at step {low[0]}, then {last[1]:.3f} at step {last[0]}; "
         + (f"early stopping stopped at step {o['steps']} and restored step {o['weights_of_step']}"
            if o["status"] == "early_stopped" else f"no early stop in {o['steps']} steps")),
        ("(e) forgetting", "general-text perplexity: base → fine-tuned; base → LoRA instruction-tuned",
         f"{base['general_ppl']:.2f} → {ft['general_ppl']:.2f}; "
         f"{base['general_ppl']:.2f} → {lora['general_ppl']:.2f}"),
        ("(f) cost of PEFT", "LoRA vs full instruction tuning: cost; exact match (inputs / phrasings)",
         f"LoRA {cost(runs['instruct-lora'])}, {pct(lora['heldout_inputs'])} / {pct(lora['heldout_phrasings'])}; "
         f"full {cost(runs['instruct-full'])}, {pct(full['heldout_inputs'])} / {pct(full['heldout_phrasings'])}"),
        ("(g) data size", "exact match, held-out inputs, by training examples (LoRA, same steps; "
         "each run's own scoring)", ", ".join(sizes)),
        ("(h) not interchangeable", "cloze accuracy of the instruction-tuned model; exact match of the fine-tuned; "
         "both, fine-tuned then instruction-tuned",
         f"{pct(lora['cloze'])}; {pct(ft['heldout_inputs'])}; {pct(fti['cloze'])} cloze and "
         f"{pct(fti['heldout_inputs'])} exact match"),
    ]


def exact(summary: dict) -> float:
    """A training run's own exact match on the held-out inputs, after training."""
    return summary["exact_match"]["heldout_inputs"]["after"]


def cost(summary: dict) -> str:
    return (f"{summary['trainable_params']:,} params trained, {summary['peak_memory_mib']:,.0f} MiB peak, "
            f"{summary['process_wall_s']:.0f} s")


def markdown(rows, scores: dict, command: str) -> str:
    lines = [f"# minituner: instruction tuning vs fine-tuning\n\n`{command}`\n",
             "| claim | measure | result |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    lines += ["", "| model | exact match, held-out inputs | held-out phrasings | cloze accuracy | domain ppl | "
              "general ppl |", "|---|---:|---:|---:|---:|---:|"]
    for name, s in scores.items():
        lines.append(f"| {name} | {pct(s['heldout_inputs'])} | {pct(s['heldout_phrasings'])} | {pct(s['cloze'])} | "
                     f"{s['domain_ppl']:.2f} | {s['general_ppl']:.2f} |")
    return "\n".join(lines) + "\n"


def metrics(run_dir: Path) -> list[dict]:
    """The records of a run's metrics.jsonl."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


def eval_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(step, validation loss) of a run's metrics.jsonl."""
    return [(r["step"], r["eval_loss"]) for r in metrics(run_dir) if "eval_loss" in r]


def plot(root: Path, runs: dict) -> Path | None:
    """Loss curves as a PNG, where matplotlib is installed (pip install minituner[plot])."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name in ("instruct-lora", "instruct-full", "finetune", "finetune-instruct"):
        steps = [r for r in metrics(root / name) if "loss" in r]
        left.plot([r["step"] for r in steps], [r["loss"] for r in steps], label=name)
    left.set(title="training loss", xlabel="step", ylabel="loss", yscale="log")
    left.legend()
    train = [r for r in metrics(root / "overfit") if "loss" in r]
    right.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    curve = eval_curve(root / "overfit")
    right.plot([s for s, _ in curve], [v for _, v in curve], marker="o", label="validation")
    right.axvline(runs["overfit"]["weights_of_step"], color="gray", linestyle="--", label="restored")
    right.set(title=f"fine-tuning on {OVERFIT_DOCS} documents", xlabel="step", ylabel="loss")
    right.legend()
    fig.tight_layout()
    path = root / "loss_curves.png"
    fig.savefig(path, dpi=100)
    return path


# ----------------------------------------------------------------------------- entry point
def run(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m minituner.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=f"runs/compare-{time.strftime('%Y%m%d-%H%M%S')}", help="folder of all the runs")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every run's steps by this (a quick look)")
    p.add_argument("--eval-limit", type=int, default=0,
                   help="score at most N items of each evaluation set, spread over it (0 = all; a quick look)")
    args = p.parse_args(argv)
    root = Path(args.out)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise UserError(f"--out {root}: not a new or empty folder; the comparison writes its runs there")
    check_outside_runs(root)
    if args.scale <= 0:
        raise UserError(f"--scale {args.scale} must be > 0")
    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    runs = train_all(root, args.scale, args.eval_limit, print)
    data = suite_data(root, args.eval_limit)
    scores = {"base": suite(builtin.BASE_MODEL, data)}
    for name in ("instruct-lora", "instruct-full", "finetune", "finetune-instruct"):
        scores[name] = suite(root / name / "model", data)
    command = ("python -m minituner.compare" + (f" --scale {args.scale}" if args.scale != 1.0 else "")
               + (f" --eval-limit {args.eval_limit}" if args.eval_limit else ""))
    text = markdown(claims(scores, runs, eval_curve(root / "overfit")), scores, command)
    (root / "comparison.md").write_text(text, encoding="utf-8")
    (root / "results.json").write_text(json.dumps({"scores": scores, "runs": runs}, indent=2), encoding="utf-8")
    png = plot(root, runs)
    print("\n" + text)
    print(f"written: {root / 'comparison.md'}, {root / 'results.json'}" + (f", {png}" if png else "")
          + f" ({time.perf_counter() - start:.0f} s)")
    return 0


def main(argv=None) -> int:
    return run_command(run, argv)


if __name__ == "__main__":
    sys.exit(main())
