"""Benchmarks: throughput and peak memory, measured rather than asserted in tests.

    python -m minituner.bench                      # generation, random-weight SmolLM-135M shape
    python -m minituner.bench --model PATH         # any Hugging Face model folder
    python -m minituner.bench --train --dtype bf16 # full fine-tuning steps, bf16 compute
    python -m minituner.bench --train --dtype bf16 --lora-rank 8   # LoRA steps, base frozen

Generation reports prefill (one forward over the prompts) and cached decoding in tokens per
second. Training reports tokens per second of whole optimizer steps (forward, backward, fp32
master update) through trainer.train_step, and on CUDA in bf16/fp16 the model FLOPs
utilisation: 6 FLOPs per token per trained weight (forward 2, backward 4; a frozen weight 4)
plus attention's 12 x layers x dim x seq_len (PaLM, Chowdhery et al. 2022, appendix B),
against the GPU's dense peak. Both report the peak
memory: allocated CUDA memory on a GPU, the process's peak resident set on a CPU.
"""

import argparse
import json
import sys
import time

import torch

from minituner.config import preset_config
from minituner.distributed import Runtime, peak_memory_mib, resolve_device, synchronize
from minituner.errors import UserError, run_command
from minituner.generate import generate, resolve_dtype
from minituner.hf.folder import load_pretrained
from minituner.lora import ALPHA, apply_lora
from minituner.loss import IGNORE_INDEX
from minituner.model import Transformer
from minituner.optim import build_optimizer
from minituner.precision import POLICIES, LossScaler, MasterWeights, compute_dtype
from minituner.step import train_step

# Shapes of real models, built with random weights so the benchmark needs no download.
PRESETS = {  # SmolLM-135M's vocabulary and context with its shape; the tiny test models' (tests/fixtures)
    "smollm-135m": dict(vocab_size=49152, max_seq_len=2048),
    "tiny": dict(vocab_size=384, max_seq_len=256),
}


def bench_inference(model: Transformer, *, batch_size: int, prompt_len: int, new_tokens: int, repeats: int) -> dict:
    """Best-of-`repeats` prefill and decode throughput of `model` on random token ids."""
    device = model.embed_tokens.weight.device
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch_size, prompt_len), generator=generator).to(device)
    prefill, total = float("inf"), float("inf")
    for _ in range(repeats + 1):  # the first round warms up kernels and allocators
        synchronize(device)
        start = time.perf_counter()
        with torch.no_grad():
            model(ids, last_only=True)
        synchronize(device)
        middle = time.perf_counter()
        generate(model, ids.tolist(), max_new_tokens=new_tokens)
        synchronize(device)
        end = time.perf_counter()
        prefill, total = min(prefill, middle - start), min(total, end - middle)
    decode = max(total - prefill, 1e-9)  # generate() prefills once, then decodes new_tokens - 1 steps
    return {
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "batch_size": batch_size, "prompt_len": prompt_len, "new_tokens": new_tokens,
        "prefill_tokens_per_s": round(batch_size * prompt_len / prefill, 1),
        "decode_tokens_per_s": round(batch_size * (new_tokens - 1) / decode, 1),
        "peak_memory_mib": round(peak_memory_mib(device), 1),
    }


# Dense bf16/fp16 tensor-core peaks (TFLOP/s) by GPU name, from the vendors' data sheets.
PEAK_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0,
               "L4": 121.0, "RTX 4090": 165.0, "V100": 125.0, "T4": 65.0}


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def bench_training(model: Transformer, *, policy: str, batch_size: int, seq_len: int, repeats: int) -> dict:
    """Best-of-`repeats` throughput of training steps on random ids, of the parameters of `model`
    that require grad (all of them, or LoRA's), with float32 masters of those."""
    device = model.embed_tokens.weight.device
    masters = MasterWeights(model, compute_dtype(policy, device), device)
    optimizer = build_optimizer(masters.named_masters(), lr=1e-5, weight_decay=0.0)
    scaler = LossScaler(enabled=policy == "fp16")
    runtime = Runtime(device)
    ids = torch.randint(0, model.config.vocab_size, (batch_size, seq_len), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids.clone()}
    batch["labels"][:, 0] = IGNORE_INDEX
    best = float("inf")
    for _ in range(repeats + 1):  # the first step warms up kernels and allocates optimizer state
        synchronize(device)
        start = time.perf_counter()
        train_step(model, [batch], masters=masters, optimizer=optimizer, scaler=scaler, lr=1e-5, max_grad_norm=1.0,
                   runtime=runtime)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    n_params = sum(p.numel() for p in model.parameters())
    n_trained = sum(m.numel() for m in masters.masters)
    tokens_per_s = batch_size * seq_len / best
    c = model.config
    # A trained weight costs 6 FLOPs per token (forward, input gradient, weight gradient), a frozen
    # one 4 (no weight gradient). MFU is against the dense bf16/fp16 peak, so not given for fp32.
    flops_per_token = 6 * n_trained + 4 * (n_params - n_trained) + 12 * c.n_layers * c.n_heads * c.head_dim * seq_len
    peak = peak_tflops(device) if policy != "fp32" else None
    return {
        "params_m": round(n_params / 1e6, 2), "trainable_m": round(n_trained / 1e6, 2),
        "batch_size": batch_size, "seq_len": seq_len, "step_s": round(best, 4),
        "train_tokens_per_s": round(tokens_per_s, 1),
        "mfu": round(flops_per_token * tokens_per_s / (peak * 1e12), 4) if peak else None,
        "peak_memory_mib": round(peak_memory_mib(device), 1),
    }


def random_model(config, device: torch.device, dtype: torch.dtype) -> Transformer:
    """A randomly initialised model built directly in `dtype` on `device` (no float32 copy first,
    which would inflate the measured peak memory)."""
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return Transformer(config).eval()
    finally:
        torch.set_default_dtype(default)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m minituner.bench", description="Measure throughput and peak memory.")
    # what to measure
    p.add_argument("--model", help="Hugging Face model folder (default: random weights of --preset)")
    p.add_argument("--preset", default="smollm-135m", choices=sorted(PRESETS), help="model shape without --model")
    p.add_argument("--batch-size", type=int, default=1, help="prompts per batch")
    p.add_argument("--prompt-len", type=int, default=256, help="tokens per prompt")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per prompt")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds after one warm-up; the best is reported")
    p.add_argument("--train", action="store_true",
                   help="measure training steps (batch of --batch-size x --prompt-len tokens; full fine-tuning, or "
                        "LoRA with --lora-rank) instead of generation; --dtype is then the precision policy, with "
                        "fp32 master weights")
    p.add_argument("--freeze", default="", help="with --train: comma-separated name fragments of parameters to "
                                                "freeze, e.g. 'layers.' (frozen weights get no master, no state)")
    # LoRA
    p.add_argument("--lora-rank", type=int, default=0,
                   help="adapt the usual targets (q/k/v/o, gate/up/down) with LoRA of this rank before measuring, "
                        "base frozen and adapters unmerged (0 = no LoRA)")
    p.add_argument("--lora-alpha", type=float, default=ALPHA, help="LoRA alpha; the update is scaled by alpha / rank")
    # hardware
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", *POLICIES], help="auto = bf16 on CUDA, fp32 on CPU")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = p.parse_args(argv)
    if min(args.batch_size, args.prompt_len, args.repeats) < 1 or args.new_tokens < 2:
        p.error("--batch-size, --prompt-len and --repeats must be >= 1, --new-tokens >= 2")
    if args.lora_rank and args.freeze:
        p.error("--freeze and --lora-rank exclude each other: LoRA freezes every base weight")
    return args


def run(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    # Full training keeps float32 masters of every weight; a LoRA base is frozen, so it is built
    # in the compute dtype directly (as the instruction recipe does) and only the adapters get masters.
    load_dtype = torch.float32 if args.train and not args.lora_rank else dtype
    if args.model:
        model, _ = load_pretrained(args.model, device=device, dtype=load_dtype)
    else:
        model = random_model(preset_config(args.preset, **PRESETS[args.preset]), device, load_dtype)
    if model.config.positions == "learned" and args.prompt_len + args.new_tokens > model.config.max_seq_len:
        raise UserError(f"--prompt-len {args.prompt_len} + --new-tokens {args.new_tokens} exceeds the model's "
                        f"{model.config.max_seq_len} positions")
    if args.lora_rank != 0:
        apply_lora(model, rank=args.lora_rank, alpha=args.lora_alpha)  # checks them; freezes all but the adapters
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if args.train:
        policy = next(name for name, d in POLICIES.items() if d == dtype)
        if not args.lora_rank:  # with LoRA, apply_lora has frozen all but the adapters
            fragments = [f for f in args.freeze.split(",") if f]
            for name, p in model.named_parameters():
                p.requires_grad_(not any(f in name for f in fragments))
        result = bench_training(model.train(), policy=policy, batch_size=args.batch_size,
                                seq_len=args.prompt_len, repeats=args.repeats)
    else:
        result = bench_inference(model, batch_size=args.batch_size, prompt_len=args.prompt_len,
                                 new_tokens=args.new_tokens, repeats=args.repeats)
    result = {"model": args.model or args.preset, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
              "threads": torch.get_num_threads(), "lora_rank": args.lora_rank, **result}
    if args.json:
        print(json.dumps(result))
    else:
        width = max(len(k) for k in result)
        print("\n".join(f"{k:<{width}}  {v}" for k, v in result.items()))
    return 0


def main(argv=None) -> int:
    return run_command(run, argv, {"rank": "--lora-rank", "alpha": "--lora-alpha"})


if __name__ == "__main__":
    sys.exit(main())
