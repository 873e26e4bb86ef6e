"""A tiny end-to-end training run on synthetic data, for the training-engine tests.

Run in-process (`main([...])`) or as a process (`python tests/toy_train.py ...`, also under
torchrun). Examples are counting sequences modulo the vocabulary with a random start and stride,
the first `prompt_len` tokens masked as a prompt: learnable, varied in length, cheap.
--kill-at / --term-at send SIGKILL / SIGTERM to this process when the collate function is
called for the N-th time, to simulate a crash or a Ctrl-C in the middle of a run.
"""

import argparse
import json
import os
import signal
import sys

import torch

from minituner.config import ModelConfig
from minituner.distributed import init_runtime, shutdown
from minituner.errors import run_command
from minituner.loss import IGNORE_INDEX
from minituner.model import Transformer
from minituner.trainer import TrainOptions, train

CONFIG = dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64)


def make_examples(n: int, seed: int, prompt_len: int = 3) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(6, 20, (1,), generator=g))
        start, stride = torch.randint(0, 64, (2,), generator=g).tolist()
        ids = [(start + i * (stride % 5 + 1)) % 64 for i in range(length)]
        labels = [IGNORE_INDEX] * prompt_len + ids[prompt_len:]
        out.append({"input_ids": ids, "labels": labels})
    return out


def collate(examples: list[dict]) -> dict:
    T = max(len(e["input_ids"]) for e in examples)
    ids = torch.zeros(len(examples), T, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    for b, e in enumerate(examples):
        ids[b, :len(e["input_ids"])] = torch.tensor(e["input_ids"])
        labels[b, :len(e["labels"])] = torch.tensor(e["labels"])
    return {"input_ids": ids, "labels": labels}


def signalling_collate(kill_at: int, term_at: int):
    calls = 0

    def wrapped(examples):
        nonlocal calls
        calls += 1
        if calls == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if calls == term_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return collate(examples)
    return wrapped


def build_model(seed: int, frozen: str = "") -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**CONFIG))
    for name, p in model.named_parameters():
        p.requires_grad_(not (frozen and frozen in name))
    return model


def parse_args(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--n-train", type=int, default=32)
    p.add_argument("--n-val", type=int, default=8)
    p.add_argument("--freeze", default="", help="freeze parameters whose name contains this")
    p.add_argument("--kill-at", type=int, default=0)
    p.add_argument("--term-at", type=int, default=0)
    for name, default in [("steps", 6), ("batch-size", 4), ("grad-accum", 1), ("eval-every", 0), ("save-every", 0),
                          ("patience", 0), ("seed", 0), ("warmup-steps", 0)]:
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--init-scale", type=float, default=2.0**16)
    return p.parse_args(argv)


def run(argv=None) -> int:
    args = parse_args(argv)
    runtime = init_runtime(args.device)
    options = TrainOptions(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                           warmup_steps=args.warmup_steps, precision=args.precision, eval_every=args.eval_every,
                           save_every=args.save_every, patience=args.patience, seed=args.seed,
                           max_grad_norm=args.max_grad_norm, init_scale=args.init_scale)
    model = build_model(args.seed, args.freeze)
    val = make_examples(args.n_val, seed=1000 + args.seed) if args.n_val else None
    summary = train(model, make_examples(args.n_train, seed=args.seed), signalling_collate(args.kill_at, args.term_at),
                    options=options, runtime=runtime, run_dir=args.out, val_set=val, resume=args.resume,
                    run_config=vars(args), progress=False)
    shutdown(runtime)
    if runtime.is_main:
        print(json.dumps(summary))
    return 0


def main(argv=None) -> int:
    return run_command(run, argv)


if __name__ == "__main__":
    sys.exit(main())
