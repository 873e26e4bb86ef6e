"""The comparison's report: its rows, one claim each, a measure, and the result read from the runs
and scores of every seed (compare.py gathers them); its tables and figures. With one seed a
number is printed as it is; with more, as the mean and, in brackets, the lowest and highest
seed's value, so a reader can see whether a difference between two numbers is larger than the
runs' own spread.

Each row lists the arms (training runs) it reads, so that --rows trains only those.
"""

import json
from pathlib import Path

from minituner.experiment import builtin, prompting
from minituner.experiment.prompting import SHOTS

SIZES = (100,)  # a smaller training set for (g) (one: the 20-minute budget); the full one is instruct-lora's
OVERFIT_DOCS = 12  # domain documents of the overfitting run
PHRASINGS = (1, 2)  # training phrasings per family for (j); instruct-lora has all 4
WRONG = (10, 30)  # % of wrongly answered training examples for (k); instruct-lora has none
REPLAY_SHARE = 0.25  # of finetune-replay's training documents, general text the base was pretrained on (l)


# ----------------------------------------------------------------------------- numbers over seeds
def values(results: list[dict], path: str) -> list:
    """The value at a dotted path ("scores.base.cloze") of each seed's results."""
    out = []
    for result in results:
        for key in path.split("."):
            result = result[key]
        out.append(result)
    return out


def spread_of(xs: list[float], show) -> str:
    """One seed's value (or the seeds' one value), or the mean with the range of the seeds."""
    if min(xs) == max(xs):
        return show(xs[0])
    return f"{show(sum(xs) / len(xs))} ({show(min(xs))}–{show(max(xs))})"


def pct(xs: list[float]) -> str:
    return spread_of(xs, lambda x: f"{x:.1%}")


def num(xs: list[float], digits: int = 2) -> str:
    return spread_of(xs, lambda x: f"{x:,.{digits}f}")


def at(results: list[dict], path: str, how=pct) -> str:
    return how(values(results, path))


# ----------------------------------------------------------------------------- the rows
def row_a(R):
    return ("(a) instruction following", "exact match, held-out inputs: base → instruction-tuned (LoRA)",
            f"{at(R, 'scores.base.heldout_inputs')} → {at(R, 'scores.instruct-lora.heldout_inputs')}")


def row_b(R):
    return ("(b) generalisation", "exact match, unseen inputs in unseen phrasings: base → LoRA",
            f"{at(R, 'scores.base.heldout_phrasings')} → {at(R, 'scores.instruct-lora.heldout_phrasings')}")


def row_c(R):
    return ("(c) domain adaptation", "domain perplexity; cloze accuracy: base → fine-tuned",
            f"{at(R, 'scores.base.domain_ppl', num)} → {at(R, 'scores.finetune.domain_ppl', num)}; "
            f"{at(R, 'scores.base.cloze')} → {at(R, 'scores.finetune.cloze')}")


def row_d(R):
    curves = values(R, "curve")
    lows = [min(curve, key=lambda p: p[1]) for curve in curves]
    stopped = [r["runs"]["overfit"] for r in R]
    early = sum(s["status"] == "early_stopped" for s in stopped)
    return ("(d) overfitting", f"validation loss, fine-tuning on {OVERFIT_DOCS} documents",
            f"lowest {num([p[1] for p in lows], 3)} at step {num([p[0] for p in lows], 0)}, then "
            f"{num([c[-1][1] for c in curves], 3)} at step {num([c[-1][0] for c in curves], 0)}; early stopping "
            f"stopped {early} of {len(R)} run(s), restoring step {num([s['weights_of_step'] for s in stopped], 0)}")


def row_e(R):
    base = at(R, "scores.base.general_ppl", num)
    return ("(e) forgetting", "general-text perplexity: base → fine-tuned; base → LoRA instruction-tuned",
            f"{base} → {at(R, 'scores.finetune.general_ppl', num)}; {base} → "
            f"{at(R, 'scores.instruct-lora.general_ppl', num)}")


def row_f(R):
    def arm(name):
        return (f"{num(values(R, f'runs.{name}.trainable_params'), 0)} params trained, "
                f"{num(values(R, f'runs.{name}.peak_memory_mib'), 0)} MiB peak, "
                f"{num(values(R, f'runs.{name}.process_wall_s'), 0)} s, {at(R, f'scores.{name}.heldout_inputs')} / "
                f"{at(R, f'scores.{name}.heldout_phrasings')}")
    return ("(f) cost of PEFT", "LoRA vs full instruction tuning: cost; exact match (inputs / phrasings)",
            f"LoRA {arm('instruct-lora')}; full {arm('instruct-full')}")


def row_g(R):
    sizes = [f"{n}: {at(R, f'scores.size-{n}.heldout_inputs')}" for n in SIZES]
    sizes.append(f"{builtin.INSTRUCT_EXAMPLES}: {at(R, 'scores.instruct-lora.heldout_inputs')}")
    return ("(g) data size", "exact match, held-out inputs, by training examples (LoRA, same steps)", ", ".join(sizes))


def row_h(R):
    return ("(h) not interchangeable", "cloze accuracy of the instruction-tuned model; exact match of the "
            "fine-tuned; both, fine-tuned then instruction-tuned",
            f"{at(R, 'scores.instruct-lora.cloze')}; {at(R, 'scores.finetune.heldout_inputs')}; "
            f"{at(R, 'scores.finetune-instruct.cloze')} cloze and {at(R, 'scores.finetune-instruct.heldout_inputs')} "
            "exact match")


def row_i(R):
    def wording(name):
        cells = [f"{k}: {at(R, f'prompting.{name}.{k}.heldout_inputs.accuracy')} / "
                 f"{at(R, f'prompting.{name}.{k}.heldout_phrasings.accuracy')}, "
                 f"{at(R, f'prompting.{name}.{k}.heldout_inputs.tokens', lambda x: num(x, 0))} tokens"
                 + (f" ({at(R, f'prompting.{name}.{k}.heldout_inputs.shots', lambda x: num(x, 1))} fit)" if k else "")
                 for k in SHOTS]
        return "; ".join(cells)
    return ("(i) prompting instead of tuning", "exact match (inputs / phrasings) and prompt tokens per query of the "
            f"base with k examples (at most {prompting.ITEMS} items a set): in its pretraining wording "
            "(\"Question: ... Answer:\"); in the chat template; against the instruction-tuned model (every item)",
            f"pretraining wording, k = {wording('pretraining')}. Chat template, k = {wording('chat')}. "
            f"Tuned (LoRA): {at(R, 'scores.instruct-lora.heldout_inputs')} / "
            f"{at(R, 'scores.instruct-lora.heldout_phrasings')}, "
            f"{at(R, 'prompting.chat.0.heldout_inputs.tokens', lambda x: num(x, 0))} tokens")


def row_n(R):
    def blocks(name):  # block by block, the mean over seeds
        per_block = zip(*values(R, f"weights.{name}.relative"))
        return "/".join(f"{sum(b) / len(b):.3f}" for b in per_block)
    arms = (("instruct-full", "full instruction tuning"), ("finetune", "fine-tuning"), ("instruct-lora", "LoRA"))
    return ("(n) what each method changes", "per block, ‖ΔW‖ / ‖W‖ of the linear layers; effective rank of "
            "ΔW (mean over matrices; LoRA's is at most its rank)",
            "; ".join(f"{label}: {blocks(name)}, rank {at(R, f'weights.{name}.rank', lambda x: num(x, 1))}"
                      for name, label in arms) + f" (LoRA r = {builtin.INSTRUCT_OPTIONS['lora_rank']})")


def exact(R, arm: str) -> str:
    """An arm's exact match, held-out inputs / phrasings."""
    return f"{at(R, f'scores.{arm}.heldout_inputs')} / {at(R, f'scores.{arm}.heldout_phrasings')}"


def row_j(R):
    cells = [f"{p}: {exact(R, f'phrasings-{p}')}" for p in PHRASINGS] + [f"4: {exact(R, 'instruct-lora')}"]
    return ("(j) diversity", f"exact match (held-out inputs / held-out phrasings) by training phrasings per family, "
            f"{builtin.INSTRUCT_EXAMPLES:,} examples (LoRA)", ", ".join(cells))


def row_k(R):
    cells = [f"0 %: {exact(R, 'instruct-lora')}"] + [f"{w} %: {exact(R, f'wrong-{w}')}" for w in WRONG]
    return ("(k) quality", f"exact match (inputs / phrasings) with a share of the {builtin.INSTRUCT_EXAMPLES:,} "
            "training answers wrong (another item's answer; LoRA)", ", ".join(cells))


def row_l(R):
    def arm(name, label):
        return f"{label} {at(R, f'scores.{name}.cloze')}, {at(R, f'scores.{name}.general_ppl', num)}"
    return ("(l) forgetting held back", "cloze accuracy, general-text perplexity (base "
            f"{at(R, 'scores.base.cloze')}, {at(R, 'scores.base.general_ppl', num)}) after domain fine-tuning",
            "; ".join([arm("finetune", "full weights"), arm("finetune-lora", "LoRA"),
                       arm("finetune-replay", f"full weights with {REPLAY_SHARE:.0%} general text replayed")]))


def row_m(R):
    def arm(name):
        return (f"{at(R, f'scores.{name}.cloze')} cloze, {at(R, f'scores.{name}.heldout_inputs')} / "
                f"{at(R, f'scores.{name}.heldout_phrasings')} exact match")
    return ("(m) complementary", "fine-tuned, then LoRA instruction-tuned: as in (h), and fine-tuned with general "
            "text replayed as in (l) first; cloze accuracy, exact match (inputs / phrasings)",
            f"as in (h): {arm('finetune-instruct')}; replayed first: {arm('complementary')}; fine-tuned alone: "
            f"{at(R, 'scores.finetune.cloze')} cloze, with replay {at(R, 'scores.finetune-replay.cloze')}")


ROWS = {  # letter: (row, the arms it reads)
    "a": (row_a, {"instruct-lora"}), "b": (row_b, {"instruct-lora"}), "c": (row_c, {"finetune"}),
    "d": (row_d, {"overfit"}), "e": (row_e, {"finetune", "instruct-lora"}),
    "f": (row_f, {"instruct-lora", "instruct-full"}), "g": (row_g, {"instruct-lora", *(f"size-{n}" for n in SIZES)}),
    "h": (row_h, {"instruct-lora", "finetune", "finetune-instruct"}), "i": (row_i, {"instruct-lora"}),
    "j": (row_j, {"instruct-lora", *(f"phrasings-{p}" for p in PHRASINGS)}),
    "k": (row_k, {"instruct-lora", *(f"wrong-{w}" for w in WRONG)}),
    "l": (row_l, {"finetune", "finetune-lora", "finetune-replay"}),
    "m": (row_m, {"finetune", "finetune-instruct", "finetune-replay", "complementary"}),
    "n": (row_n, {"instruct-lora", "instruct-full", "finetune"}),
}


# ----------------------------------------------------------------------------- tables and figures
def markdown(rows: list[tuple[str, str, str]], results: list[dict], command: str) -> str:
    lines = [f"# minituner: instruction tuning vs fine-tuning\n\n`{command}`\n",
             "| claim | measure | result |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    lines += ["", "| model | exact match, held-out inputs | held-out phrasings | cloze accuracy | domain ppl | "
              "general ppl |", "|---|---:|---:|---:|---:|---:|"]
    for name in (name for name, scores in results[0]["scores"].items() if "cloze" in scores):  # the whole suite
        def at(measure, how=pct):
            return how(values(results, f"scores.{name}.{measure}"))
        lines.append(f"| {name} | {at('heldout_inputs')} | {at('heldout_phrasings')} | {at('cloze')} | "
                     f"{at('domain_ppl', num)} | {at('general_ppl', num)} |")
    if "weights" in results[0]:
        arms = list(results[0]["weights"])
        lines += ["", "‖ΔW‖ / ‖W‖ of each block's linear layers:", "",
                  "| block | " + " | ".join(arms) + " |", "|---|" + "---:|" * len(arms)]
        for block in range(len(results[0]["weights"][arms[0]]["relative"])):
            lines.append(f"| {block} | " + " | ".join(num([r["weights"][arm]["relative"][block] for r in results], 3)
                                                     for arm in arms) + " |")
    return "\n".join(lines) + "\n"


def metrics(run_dir: Path) -> list[dict]:
    """The records of a run's metrics.jsonl."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


def eval_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(step, validation loss) of a run's metrics.jsonl."""
    return [(r["step"], r["eval_loss"]) for r in metrics(run_dir) if "eval_loss" in r]


def plot(root: Path, result: dict, out: Path) -> list[Path]:
    """Loss curves and the weight changes of the seed whose runs are in ROOT, as PNGs in OUT, where
    matplotlib is installed (pip install minituner[plot]) and the arms ran."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    if {"instruct-lora", "finetune", "overfit"} <= set(result["runs"]):
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
        for name in (arm for arm in ("instruct-lora", "instruct-full", "finetune", "finetune-instruct")
                     if arm in result["runs"]):
            steps = [r for r in metrics(root / name) if "loss" in r]
            left.plot([r["step"] for r in steps], [r["loss"] for r in steps], label=name)
        left.set(title="training loss", xlabel="step", ylabel="loss", yscale="log")
        left.legend()
        train = [r for r in metrics(root / "overfit") if "loss" in r]
        right.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
        right.plot([s for s, _ in result["curve"]], [v for _, v in result["curve"]], marker="o", label="validation")
        right.axvline(result["runs"]["overfit"]["weights_of_step"], color="gray", linestyle="--", label="restored")
        right.set(title=f"fine-tuning on {OVERFIT_DOCS} documents", xlabel="step", ylabel="loss")
        right.legend()
        written.append(_save(fig, out / "loss_curves.png"))
    forgetting = [arm for arm in ("finetune", "finetune-lora", "finetune-replay") if arm in result["scores"]]
    if len(forgetting) == 3:  # row (l): what each way of fine-tuning costs in general text, for what it learns
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for arm in ["base", *forgetting]:
            score = result["scores"][arm]
            ax.scatter(score["general_ppl"], score["cloze"], label=arm)
        ax.set(title="domain knowledge against forgetting", xlabel="general-text perplexity (log)",
               ylabel="cloze accuracy", xscale="log")
        ax.legend()
        written.append(_save(fig, out / "forgetting.png"))
    if "weights" in result:
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
        for arm, change in result["weights"].items():
            left.plot(range(len(change["relative"])), change["relative"], marker="o", label=arm)
            right.bar([f"{arm}\n{kind}" for kind in change["ranks"]], list(change["ranks"].values()), label=arm)
        left.set(title="‖ΔW‖ / ‖W‖ per block", xlabel="block", ylabel="relative change", yscale="log")
        left.legend()
        right.set(title="effective rank of ΔW by matrix", ylabel="effective rank", yscale="log")
        right.tick_params(axis="x", labelrotation=90, labelsize=6)
        written.append(_save(fig, out / "weight_change.png"))
    return written


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
