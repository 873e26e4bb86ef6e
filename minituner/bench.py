"""Benchmarks: throughput and peak memory, measured rather than asserted in tests.

    python -m minituner.bench                      # generation, random-weight SmolLM-135M shape
    python -m minituner.bench --model PATH         # any Hugging Face model folder
    python -m minituner.bench --train --dtype bf16 # full fine-tuning steps, bf16 compute
    python -m minituner.bench --train --dtype bf16 --lora-rank 8   # LoRA steps, base frozen

Generation reports prefill (one forward over the prompts) and cached decoding in tokens per
second. Training reports tokens per second of whole optimizer steps (forward, backward, fp32
master update) through step.train_step, and on CUDA in bf16/fp16 the model FLOPs
utilisation (flops_per_token against the GPU's dense 16-bit peak). Both report the peak memory:
on a GPU the allocated peak and the allocator's reserved peak, on a CPU the process's peak
resident set.

    python -m minituner.bench --gpu-check          # the whole CUDA path, pass or fail (gpucheck.py)
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time

import torch
from torch import nn

from minituner.config import preset_config
from minituner.distributed import (Runtime, all_gather_object, init_runtime, peak_memory_mib, peak_reserved_mib,
                                   reset_peak_memory, shutdown, synchronize, use_device, world_size_from_env)
from minituner.errors import UserError, run_command
from minituner.generate import generate, resolve_dtype
from minituner.hf.folder import load_pretrained
from minituner.lora import ALPHA, apply_lora
from minituner.loss import IGNORE_INDEX, linear_loss_sum, lm_loss_sum
from minituner.model import Transformer
from minituner.optim import build_optimizer
from minituner.precision import POLICIES, LossScaler, MasterWeights, compute_dtype
from minituner.sharding import local_bytes, shard_model
from minituner.step import forward_loss, fused_loss, train_step

# Shapes of real models, built with random weights so the benchmark needs no download.
PRESETS = {  # a size preset's shape with its model's vocabulary and context (tiny: the test models', tests/fixtures)
    "smollm-135m": dict(vocab_size=49152, max_seq_len=2048),
    "tiny": dict(vocab_size=384, max_seq_len=256),
    "d256": dict(vocab_size=4096, max_seq_len=512, tie_embeddings=False),  # ../shared/bench's side-by-side model
    "qwen2.5-0.5b": dict(vocab_size=151936, max_seq_len=32768),  # Qwen2.5-0.5B's shape: 494 M parameters
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
        **memory_report(device),
    }


# Dense bf16/fp16 tensor-core peaks (TFLOP/s), from the vendors' data sheets, by the words of the
# GPU's name: "NVIDIA L40S" is an L40S, not an L40 and not an L4. The most specific entry first.
# (AWS's A10G has no published data sheet, so it gets no MFU rather than a guessed peak.)
PEAK_TFLOPS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0),
               ("H800", 989.0), ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0),
               ("L40", 181.0), ("L4", 121.0), ("A10", 125.0), ("RTX 4090", 165.0),
               ("RTX 3090", 71.0), ("A6000", 155.0), ("V100", 125.0), ("T4", 65.0)]


def peak_tflops(device: torch.device) -> float | None:
    return peak_tflops_of(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def peak_tflops_of(gpu_name: str) -> float | None:
    """The dense 16-bit peak of a GPU by its name, matching whole words only; None if unknown."""
    words = re.findall(r"[A-Za-z0-9]+", gpu_name.upper())
    for key, tflops in PEAK_TFLOPS:
        key_words = key.upper().split()
        if any(words[i:i + len(key_words)] == key_words for i in range(len(words))):
            return tflops
    return None


def flops_per_token(model: Transformer, seq_len: int) -> float:
    """Training FLOPs per token: 6 per trained matmul weight (forward 2, input gradient 2, weight
    gradient 2), 4 per frozen one (no weight gradient), plus attention's 12 x layers x heads x
    head dim x seq_len (PaLM, Chowdhery et al. 2022, appendix B). Only nn.Linear weights are
    matmuls: an input embedding is a table lookup (a tied one counts once, as the output layer)."""
    c, seen, total = model.config, set(), 0
    for module in model.modules():
        if isinstance(module, nn.Linear) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            total += (6 if module.weight.requires_grad else 4) * module.weight.numel()
    return total + 12 * c.n_layers * c.n_heads * c.head_dim * seq_len


def bench_training(model: Transformer, *, policy: str, batch_size: int, seq_len: int, repeats: int,
                   runtime: Runtime | None = None) -> dict:
    """Best-of-`repeats` throughput of training steps on random ids, of the parameters of `model`
    that require grad (all of them, or LoRA's), with float32 masters of those. Under torchrun,
    each process steps on its own batch, replicated (DDP) or sharded (FSDP) as `runtime` says."""
    device = model.embed_tokens.weight.device
    runtime = runtime or Runtime(device)
    dtype = compute_dtype(policy, device)
    if runtime.sharded:
        masters = shard_model(model, dtype, runtime)
    else:
        masters = MasterWeights(model, dtype, device)
    optimizer = build_optimizer(masters.named_masters(), lr=1e-5, weight_decay=0.0)
    scaler = LossScaler(enabled=policy == "fp16")
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
    memory = memory_report(device)  # the steps' peak, before the training state is measured and the loss timed
    memory.update(state_report(model, masters, optimizer, batch))
    loss_s = time_loss(model, batch, repeats) if not runtime.sharded else None  # (a forward gathers with every rank)
    n_params = sum(p.numel() for p in model.parameters())
    n_trained = sum(m.numel() for m in masters.masters)
    tokens_per_s = batch_size * seq_len / best
    peak = peak_tflops(device) if policy != "fp32" else None  # MFU is against the 16-bit peak
    return {
        "params_m": round(n_params / 1e6, 2), "trainable_m": round(n_trained / 1e6, 2),
        "batch_size": batch_size, "seq_len": seq_len, "step_s": round(best, 4),
        "train_tokens_per_s": round(tokens_per_s, 1), "loss_share": round(loss_s / best, 3) if loss_s else None,
        "mfu": round(flops_per_token(model, seq_len) * tokens_per_s / (peak * 1e12), 4) if peak else None,
        **memory,
    }


def time_loss(model: Transformer, batch: dict, repeats: int) -> float:
    """Best-of-`repeats` seconds of the loss alone, forward and backward, as a training step runs it:
    the output layer and the cross-entropy on the final hidden states (held fixed), fused or not
    as step.forward_loss decides, gradients of the hidden states and of a trained output weight."""
    device = model.embed_tokens.weight.device
    ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
    with torch.no_grad():
        hidden = model(ids, hidden_only=True)
    hidden.requires_grad_(True)
    best = float("inf")
    for _ in range(repeats + 1):
        hidden.grad = None
        model.zero_grad(set_to_none=True)
        synchronize(device)
        start = time.perf_counter()
        if fused_loss(model):
            loss = linear_loss_sum(hidden, model.lm_head.weight, labels)
        else:
            loss = lm_loss_sum(model.lm_head(hidden), labels)
        loss.backward()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    return best


def state_report(model: Transformer, masters: MasterWeights, optimizer, batch: dict) -> dict:
    """MiB this process holds of the training state, by the tensors' own bytes (not the resident
    set): the model's parameters (and separate float32 masters), the masters' gradients after a
    backward pass of `batch` (float32, as a step accumulates them), and the optimizer's state.
    Sharded, each is this process's slice."""
    params = local_bytes(model.parameters())
    if masters.masters is not masters.params:
        params += local_bytes(masters.masters)
    forward_loss(model, batch).backward()
    masters.accumulate_grads()
    grads = local_bytes(m.grad for m in masters.masters if m.grad is not None)
    masters.zero_grads()
    states = local_bytes(t for state in optimizer.state.values() for t in state.values() if t.dim() > 0)
    mib = {"params": params / 2**20, "grads": grads / 2**20, "optimizer": states / 2**20}
    return {f"state_{k}_mib": round(v, 3) for k, v in {**mib, "total": sum(mib.values())}.items()}


def memory_report(device: torch.device) -> dict:
    reserved = peak_reserved_mib(device)
    return {"peak_memory_mib": round(peak_memory_mib(device), 1),
            **({"peak_reserved_mib": round(reserved, 1)} if reserved is not None else {})}


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
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="model shape without --model (default smollm-135m; qwen2.5-0.5b for --gpu-check)")
    p.add_argument("--batch-size", type=int, default=None, help="prompts per batch (default 1; 4 for --gpu-check)")
    p.add_argument("--prompt-len", type=int, default=None,
                   help="tokens per prompt (default 256; 1024 for --gpu-check's training and packing)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per prompt")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds after one warm-up; the best is reported")
    p.add_argument("--train", action="store_true",
                   help="measure training steps (batch of --batch-size x --prompt-len tokens; full fine-tuning, or "
                        "LoRA with --lora-rank) instead of generation; --dtype is then the precision policy, with "
                        "fp32 master weights")
    p.add_argument("--freeze", default="", help="with --train: comma-separated name fragments of parameters to "
                                                "freeze, e.g. 'layers.' (frozen weights get no master, no state)")
    # LoRA
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="with --train: recompute each block in the backward pass instead of keeping its activations")
    p.add_argument("--lora-rank", type=int, default=0,
                   help="adapt the usual targets (q/k/v/o, gate/up/down) with LoRA of this rank before measuring, "
                        "base frozen and adapters unmerged (0 = no LoRA)")
    p.add_argument("--lora-alpha", type=float, default=ALPHA, help="LoRA alpha; the update is scaled by alpha / rank")
    # hardware
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", *POLICIES],
                   help="auto = bf16 on GPUs that have it, else fp16; fp32 on CPU")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
    p.add_argument("--processes", type=int, default=1,
                   help="with --train: run the steps on N processes under torchrun, once replicated (DDP) and once "
                        "sharded (FSDP), and report both side by side, per process (a GPU each, or CPU processes)")
    p.add_argument("--fsdp", action="store_true", help="under torchrun, with --train: shard the training state (FSDP2)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    g = p.add_argument_group("the GPU check (minituner/gpucheck.py)")
    g.add_argument("--gpu-check", action="store_true",
                   help="check the whole CUDA path (training full and LoRA in bf16 and fp16, padded batched "
                        "generation, packing, kill and resume, torchrun over every visible GPU, pytest -m cuda) and "
                        "print a pass/fail table with tokens/s, MFU and peak memory; --preset sets the training "
                        "shape (default qwen2.5-0.5b)")
    g.add_argument("--checks", default=None, help="with --gpu-check: which checks, comma-separated (default all: "
                                                  "training, generation, packing, resume, torchrun, cuda-tests)")
    args = p.parse_args(argv)
    args.batch_size = args.batch_size or (4 if args.gpu_check else 1)
    args.prompt_len = args.prompt_len or (1024 if args.gpu_check else 256)
    if min(args.batch_size, args.prompt_len, args.repeats) < 1 or args.new_tokens < 2:
        p.error("--batch-size, --prompt-len and --repeats must be >= 1, --new-tokens >= 2")
    if args.lora_rank and args.freeze:
        p.error("--freeze and --lora-rank exclude each other: LoRA freezes every base weight")
    if args.processes < 1 or (args.processes > 1 and not args.train):
        p.error("--processes N (N >= 1) measures training: give --train")
    if args.fsdp and (not args.train or world_size_from_env() == 1):
        p.error("--fsdp shards training over the processes torchrun starts; --train --processes N runs DDP and "
                "FSDP side by side")
    return args


def run(argv=None) -> int:
    args = parse_args(argv)
    if args.processes > 1 and world_size_from_env() == 1:
        return compare_sharding(args, sys.argv[1:] if argv is None else list(argv))
    if args.threads:
        torch.set_num_threads(args.threads)
    runtime = init_runtime(args.device, fsdp=args.fsdp) if world_size_from_env() > 1 else None
    device = runtime.device if runtime else use_device(args.device)
    if args.gpu_check:
        from minituner.gpucheck import main_check  # the check builds on this module
        return main_check(device, args.preset or "qwen2.5-0.5b", args.checks, args.json,
                          allow_cpu=args.device.startswith("cpu"), seq_len=args.prompt_len, batch_size=args.batch_size)
    args.preset = args.preset or "smollm-135m"
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
    model.activation_checkpointing = args.activation_checkpointing
    reset_peak_memory(device)
    if args.train:
        policy = next(name for name, d in POLICIES.items() if d == dtype)
        if not args.lora_rank:  # with LoRA, apply_lora has frozen all but the adapters
            fragments = [f for f in args.freeze.split(",") if f]
            for name, p in model.named_parameters():
                p.requires_grad_(not any(f in name for f in fragments))
        result = bench_training(model.train(), policy=policy, batch_size=args.batch_size,
                                seq_len=args.prompt_len, repeats=args.repeats, runtime=runtime)
        if runtime is not None:
            result = across_processes(result, runtime)
    else:
        result = bench_inference(model, batch_size=args.batch_size, prompt_len=args.prompt_len,
                                 new_tokens=args.new_tokens, repeats=args.repeats)
    result = {"model": args.model or args.preset, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
              "threads": torch.get_num_threads(), "lora_rank": args.lora_rank, **result}
    if runtime is not None:
        shutdown(runtime)
        if not runtime.is_main:
            return 0
    if args.json:
        print(json.dumps(result))
    else:
        width = max(len(k) for k in result)
        print("\n".join(f"{k:<{width}}  {v}" for k, v in result.items()))
    return 0


def across_processes(result: dict, runtime: Runtime) -> dict:
    """One process's training result made the run's: throughput summed over the processes, and
    each memory figure the largest any process had (a run needs that much per process)."""
    results = all_gather_object(result, runtime)
    out = {**results[0], "processes": runtime.world_size, "fsdp": runtime.sharded,
           "train_tokens_per_s": round(sum(r["train_tokens_per_s"] for r in results), 1)}
    for key in results[0]:
        if key.endswith("_mib"):
            out[key] = max(r[key] for r in results)
    return out


def compare_sharding(args: argparse.Namespace, argv: list[str]) -> int:
    """--processes N: the same training steps under torchrun on N processes, replicated (DDP) and
    sharded (FSDP), side by side. Each process gets an equal share of the CPU cores (OMP_NUM_THREADS)
    unless --threads or OMP_NUM_THREADS says otherwise."""
    child = [a for i, a in enumerate(argv) if a != "--processes" and not a.startswith("--processes=")
             and (i == 0 or argv[i - 1] != "--processes")]
    env = {**os.environ}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.processes)))
    results = {}
    for name, flags in (("ddp", []), ("fsdp", ["--fsdp"])):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.processes}",
               "-m", "minituner.bench", *child, *flags, "--json"]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode != 0 or not lines:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise UserError(f"--processes {args.processes}: the {name} run failed ({last})")
        results[name] = json.loads(lines[-1])
    if args.json:
        print(json.dumps(results))
    else:
        keys = list(results["fsdp"])
        width = max(len(k) for k in keys)
        print(f"{'':<{width}}  {'ddp':>12}  {'fsdp':>12}")
        print("\n".join(f"{k:<{width}}  {results['ddp'].get(k)!s:>12}  {results['fsdp'].get(k)!s:>12}" for k in keys))
    return 0


def main(argv=None) -> int:
    return run_command(run, argv, {"rank": "--lora-rank", "alpha": "--lora-alpha"})


if __name__ == "__main__":
    sys.exit(main())
