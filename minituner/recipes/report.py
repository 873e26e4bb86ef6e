"""What the training recipes print: the real-token share of the batches before training, and
the outcome after it (losses and perplexities before and after, cost, samples, a markdown
table of the measures a run was scored on)."""

import math

from minituner.batching import micro_batches, real_token_fraction, step_examples
from minituner.trainer import TrainOptions


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


def print_outcome(summary: dict, samples: list[dict], written, run_dir) -> None:
    """A finished run on stdout: losses and perplexities before and after, cost, samples, and the
    folders written, as (path, bytes, seconds)."""
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
    reserved = summary.get("peak_reserved_mib")
    reserved = f" ({reserved:,.0f} MiB reserved by the allocator)" if reserved else ""
    print(f"trained {summary['trainable_params']:,} of {summary['total_params']:,} parameters; "
          f"{speed}peak memory {summary['peak_memory_mib']:,.0f} MiB{reserved}")
    for s in samples:
        print(f"\n--- prompt\n{s['prompt']}\n--- before\n{s['before']}\n--- after\n{s['after']}")
    if written:
        print("\nwritten: " + ", ".join(f"{path} ({size / 1e6:,.1f} MB in {seconds:.1f} s)"
                                        for path, size, seconds in written))
    else:
        print(f"\nnothing exported (--export none): the trained weights are in {run_dir}/checkpoints; "
              f"--resume {run_dir} --export merged (a LoRA run: or adapter, both) writes them out")


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
