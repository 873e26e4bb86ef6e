"""The GPU check: minituner's whole CUDA path in one command, each part pass or fail, with its
speed and memory. For the day a GPU is at hand (a user's, or one lent to the project):

    python -m minituner.bench --gpu-check                        # this machine's GPU(s)
    python -m minituner.bench --gpu-check --preset smollm-135m   # a smaller shape for a small GPU
    python -m minituner.bench --gpu-check --device cpu --checks training,packing   # dry run (tests)

The rows of the table it prints:
  train-{full,lora}-{bf16,fp16}  optimizer steps on one fixed batch of random ids, random weights
      at the preset's shape (grouped-query attention): the loss must stay finite and fall.
      Tokens/s, MFU and peak memory (allocated and reserved) of those steps.
  generation  padded batched greedy decoding of grouped-query models, the path that crashed on
      CUDA: fp32 ids equal to Hugging Face's (the test fixtures' references, in a checkout) and
      to each prompt decoded alone; bf16 must run. Decode tokens/s at the preset's shape.
  packing     packed documents (attended one by one, model.attend_documents) on the device: the fp32 loss and gradients
      those of the CPU, bf16 close; peak memory of a packed step at the preset's shape.
  resume      train_finetune.py (built-in experiment) killed with SIGKILL after its first
      checkpoint, then resumed, ends where an uninterrupted run ends.
  torchrun    that run over every visible GPU equals one process with the same global batch;
      torchrun-fsdp, the same with --fsdp (FSDP2 over NCCL).
  cuda-tests  pytest -m cuda, in a checkout (the tests/ folder next to minituner/).
The exit status is 0 when no row failed; a skipped row (bf16 on a GPU without it, one GPU for
torchrun, an installed package without tests/) says why.
"""

import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from minituner.bench import PRESETS, bench_inference, flops_per_token, peak_tflops, random_model
from minituner.checkpoint import checkpoint_weights, list_checkpoints
from minituner.config import preset_config
from minituner.distributed import Runtime, peak_memory_mib, peak_reserved_mib, reset_peak_memory, synchronize
from minituner.errors import OptionError, UserError
from minituner.generate import generate
from minituner.hf.folder import load_pretrained
from minituner.lora import apply_lora
from minituner.loss import IGNORE_INDEX
from minituner.optim import build_optimizer
from minituner.precision import LossScaler, MasterWeights, auto_dtype, compute_dtype
from minituner.step import forward_loss, train_step

CHECKS = ("training", "generation", "packing", "resume", "torchrun", "cuda-tests")
ROOT = Path(__file__).resolve().parents[1]  # in a checkout: the repository (tests/, pyproject.toml)
GQA_FIXTURES = ("llama31-tiny", "mistral-tiny", "qwen2-tiny", "smollm-tiny")  # grouped-query, with HF references


@dataclass
class Row:
    check: str
    result: str  # pass | FAIL | skipped
    tokens_per_s: float | None = None
    mfu: float | None = None
    peak_mib: float | None = None
    reserved_mib: float | None = None
    detail: str = ""


def run_checks(device: torch.device, preset: str, checks=CHECKS, seq_len: int = 1024, batch_size: int = 4) -> list[Row]:
    """Every check asked for, each caught on its own: one failure does not hide the others."""
    rows = []
    plan = {
        "training": [(f"train-{method}-{policy}",
                      lambda m=method, p=policy: _train(device, preset, m, p, seq_len, batch_size))
                     for method in ("full", "lora") for policy in ("bf16", "fp16")],
        "generation": [("generation", lambda: _generation(device, preset))],
        "packing": [("packing", lambda: _packing(device, preset, seq_len))],
        "resume": [("resume", lambda: _resume(device))],
        "torchrun": [("torchrun", lambda: _torchrun(device)), ("torchrun-fsdp", lambda: _torchrun(device, fsdp=True))],
        "cuda-tests": [("cuda-tests", lambda: _cuda_tests(device))],
    }
    for name, check in (row for wanted in checks for row in plan[wanted]):
        try:
            rows.append(check())
        except Exception as e:  # noqa: BLE001 - a row reports any failure of its check
            rows.append(Row(name, "FAIL", detail=_first_line(e)))
        _release(device)
        print(format_row(rows[-1]), file=sys.stderr, flush=True)  # progress: the row just finished
    return rows


# ----------------------------------------------------------------------------- the checks
def _train(device, preset: str, method: str, policy: str, seq_len: int, batch_size: int, steps: int = 8) -> Row:
    name = f"train-{method}-{policy}"
    try:
        dtype = compute_dtype(policy, device)
    except OptionError as e:
        return Row(name, "skipped", detail=str(e))
    _release(device)
    # Full training keeps fp32 masters, made from an fp32 model; a LoRA base is built in the compute dtype.
    model = random_model(preset_config(preset, **PRESETS[preset]), device, torch.float32 if method == "full" else dtype)
    if method == "lora":
        apply_lora(model, rank=16, alpha=32)
    model.train()
    reset_peak_memory(device)
    masters = MasterWeights(model, dtype, device)
    optimizer = build_optimizer(masters.named_masters(), lr=1e-3, weight_decay=0.0)
    scaler = LossScaler(enabled=policy == "fp16")
    ids = torch.randint(0, model.config.vocab_size, (batch_size, seq_len), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, 0] = IGNORE_INDEX
    batch = {"input_ids": ids, "labels": labels}
    losses, times = [], []
    for _ in range(steps):
        synchronize(device)
        start = time.perf_counter()
        out = train_step(model, [batch], masters=masters, optimizer=optimizer, scaler=scaler, lr=1e-3,
                         max_grad_norm=1.0, runtime=Runtime(device))
        synchronize(device)
        times.append(time.perf_counter() - start)
        if not out["skipped"]:
            losses.append(out["loss"])
    step_s = sorted(times[2:] or times)[len(times[2:] or times) // 2]  # the median after two warm-up steps
    tokens_per_s = batch_size * seq_len / step_s
    peak = peak_tflops(device)
    mfu = flops_per_token(model, seq_len) * tokens_per_s / (peak * 1e12) if peak else None
    ok = len(losses) >= steps // 2 and all(map(math.isfinite, losses)) and losses[-1] < losses[0]
    detail = (f"loss {losses[0]:.3f} -> {losses[-1]:.3f}" if losses else "every step skipped") + \
             f", {steps - len(losses)} skipped, {sum(m.numel() for m in masters.masters) / 1e6:.1f} M trained"
    row = Row(name, "pass" if ok else "FAIL", tokens_per_s, mfu, *_peaks(device), detail=detail)
    del model, masters, optimizer
    return row


def _generation(device, preset: str) -> Row:
    _release(device)
    fixtures = ROOT / "tests" / "fixtures"
    checked, problems, agree = [], [], []
    if _checkout():
        for name in GQA_FIXTURES:
            ref = load_file(fixtures / name / "reference.safetensors")
            prompt = ref["prompt_ids"][0].tolist()
            prompts = [prompt, prompt[3:], prompt[:2]]  # left padding: a mask in every decode step
            n_new = ref["greedy_ids"].shape[1] - len(prompt)
            cpu, _ = load_pretrained(fixtures / name, device="cpu")
            gpu, _ = load_pretrained(fixtures / name, device=device)
            batched = generate(gpu, prompts, max_new_tokens=n_new)
            if prompt + batched[0] != ref["greedy_ids"][0].tolist():
                problems.append(f"{name}: fp32 ids differ from transformers'")
            if batched != [generate(cpu, [p], max_new_tokens=n_new)[0] for p in prompts]:
                problems.append(f"{name}: a padded row differs from its prompt decoded alone on the CPU")
            low = load_pretrained(fixtures / name, device=device, dtype=auto_dtype(device))[0]
            low_ids = generate(low, prompts, max_new_tokens=n_new)  # must run (it crashed); may pick other tokens
            agree += [a == b for row, low_row in zip(batched, low_ids) for a, b in zip(row, low_row)]
            checked.append(name)
    else:
        model = random_model(preset_config("tiny", **PRESETS["tiny"]), device, torch.float32)
        prompts = [list(range(5, 40)), list(range(9, 30)), [7, 8]]
        if generate(model, prompts, max_new_tokens=12) != [generate(model, [p], max_new_tokens=12)[0]
                                                             for p in prompts]:
            problems.append("a padded row differs from its prompt decoded alone")
        checked.append("a random tiny GQA model (no tests/fixtures here)")
    _release(device)
    model = random_model(preset_config(preset, **PRESETS[preset]), device, auto_dtype(device))
    reset_peak_memory(device)
    speed = bench_inference(model, batch_size=8, prompt_len=256, new_tokens=64, repeats=2)
    del model
    detail = "; ".join(problems) or f"padded batches decode right: {', '.join(checked)}"
    if agree:
        low_name = str(auto_dtype(device)).removeprefix("torch.")
        detail += f"; {low_name} picks fp32's token {sum(agree) / len(agree):.0%} of the time"
    return Row("generation", "FAIL" if problems else "pass", speed["decode_tokens_per_s"], None, *_peaks(device),
               detail=f"{detail}; decode batch 8 after 256-token prompts, prefill "
                      f"{speed['prefill_tokens_per_s']:,.0f} tok/s")


def _packed_batch(vocab_size: int, rows: int, seq_len: int, documents: int) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab_size, (rows, seq_len), generator=g)
    cuts = torch.arange(seq_len) * documents // seq_len  # `documents` runs of equal ids per row
    labels = ids.clone()
    labels[:, 0] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels, "document_ids": cuts.expand(rows, seq_len).contiguous()}


def _packing(device, preset: str, seq_len: int) -> Row:
    tiny = preset_config("tiny", **PRESETS["tiny"])
    batch = _packed_batch(tiny.vocab_size, 2, 128, 5)
    results = []
    for where, dtype in ((torch.device("cpu"), torch.float32), (device, torch.float32), (device, auto_dtype(device))):
        model = random_model(tiny, torch.device("cpu"), torch.float32).to(where, dtype).train()  # the same weights
        loss = forward_loss(model, batch, where) / (batch["labels"] != IGNORE_INDEX).sum()
        loss.backward()
        grads = torch.cat([p.grad.float().reshape(-1).cpu() for p in model.parameters()])
        results.append((loss.item(), grads))
    (cpu_loss, cpu_grads), (dev_loss, dev_grads), (low_loss, _) = results
    problems = []
    if abs(cpu_loss - dev_loss) > 1e-4 or (cpu_grads - dev_grads).abs().max() > 1e-3:
        problems.append(f"fp32 on {device} differs from the CPU (loss {dev_loss:.6f} vs {cpu_loss:.6f})")
    if abs(low_loss - cpu_loss) > 0.05:
        problems.append(f"{auto_dtype(device)} loss {low_loss:.4f} vs fp32 {cpu_loss:.4f}")
    # A packed step at the real shape: each document attends on its own (model.attend_documents).
    _release(device)
    model = random_model(preset_config(preset, **PRESETS[preset]), device, auto_dtype(device)).train()
    big = _packed_batch(model.config.vocab_size, 2, seq_len, 8)
    forward_loss(model, big, device).backward()  # warm-up
    model.zero_grad(set_to_none=True)
    reset_peak_memory(device)
    synchronize(device)
    start = time.perf_counter()
    forward_loss(model, big, device).backward()
    synchronize(device)
    seconds = time.perf_counter() - start
    del model
    detail = "; ".join(problems) or "fp32 loss and gradients equal the CPU's, bf16 close"
    return Row("packing", "FAIL" if problems else "pass", 2 * seq_len / seconds, None, *_peaks(device),
               detail=f"{detail}; forward+backward of 2 x {seq_len} packed tokens (8 documents a row, weights only "
                      "in the compute dtype)")


FINETUNE = [sys.executable, "-m", "minituner.recipes.finetune"]


RUN_STEPS = 20  # the short fine-tuning runs of the resume and torchrun checks, checkpointed halfway


def _finetune_args(out: Path, device: str, *extra: str) -> list[str]:
    """A short run of the built-in fine-tuning experiment, checkpointing halfway through its RUN_STEPS steps."""
    return ["--out", str(out), "--steps", str(RUN_STEPS), "--save-every", str(RUN_STEPS // 2), "--batch-size", "4",
            "--eval-limit", "8", "--samples", "0", "--no-progress", "--device", device, *extra]


def _resume(device) -> Row:
    """SIGKILL after the first checkpoint, resume, and compare with an uninterrupted run; on a
    GPU, two uninterrupted runs give the noise floor (0 where its kernels are deterministic; a
    CPU's are)."""
    with tempfile.TemporaryDirectory(prefix="minituner-gpucheck-") as tmp:
        whole, again, killed = Path(tmp) / "whole", Path(tmp) / "again", Path(tmp) / "killed"
        _run(FINETUNE + _finetune_args(whole, str(device)))
        if device.type == "cuda":
            _run(FINETUNE + _finetune_args(again, str(device)))
        process = subprocess.Popen(FINETUNE + _finetune_args(killed, str(device)), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        half = RUN_STEPS // 2
        first = killed / "checkpoints" / f"step-{half:06d}"
        deadline = time.time() + 300
        while not first.is_dir() and process.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        if process.poll() is not None:
            return Row("resume", "FAIL", detail=f"the run ended (exit {process.returncode}) before it could be killed")
        process.send_signal(signal.SIGKILL)
        process.wait()
        said = _run(FINETUNE + ["--resume", str(killed), "--no-progress", "--device", str(device)])
        floor = _weight_diff(whole, again) if device.type == "cuda" else 0.0
        diff = _weight_diff(whole, killed)
        loss_diff = max(abs(a - b) for a, b in zip(_losses(whole), _losses(killed)))
        status = json.loads((killed / "summary.json").read_text())["status"]
    resumed_at = next((line.split("step ")[-1] for line in said.splitlines() if line.startswith("resuming from")), "")
    problems = []
    if not resumed_at.startswith(tuple(f"{half + k} " for k in range(3))):  # the checkpoint halfway, or one after
        problems.append(f"the resumed run did not start from the killed run's checkpoint ({resumed_at or 'no word'})")
    if diff > 4 * floor or status != "completed":
        problems.append(f"it ended {status} and {diff:.2e} away from an uninterrupted run (noise floor {floor:.2e})")
    how = "bit for bit" if diff == 0 else f"{diff:.2e} from an uninterrupted run (two of those differ by {floor:.2e})"
    return Row("resume", "FAIL" if problems else "pass",
               detail="; ".join(problems) or f"killed after step {half}, resumed at step {resumed_at.split()[0]}, "
                                             f"ended {how}; losses within {loss_diff:.1e}")


def _torchrun(device, fsdp: bool = False) -> Row:
    name = "torchrun-fsdp" if fsdp else "torchrun"
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    if gpus < 2:
        return Row(name, "skipped", detail=f"{gpus} GPU visible: data parallelism needs two or more")
    with tempfile.TemporaryDirectory(prefix="minituner-gpucheck-") as tmp:
        single, multi = Path(tmp) / "single", Path(tmp) / "multi"
        # The same global batch: one process accumulating `gpus` micro-batches, or `gpus` processes.
        _run(FINETUNE + _finetune_args(single, "cuda", "--grad-accum", str(gpus)))
        _run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
              "-m", "minituner.recipes.finetune", *_finetune_args(multi, "cuda"), *(["--fsdp"] if fsdp else [])])
        diff = _weight_diff(single, multi)
        loss_diff = max(abs(a - b) for a, b in zip(_losses(single), _losses(multi)))
        summary = json.loads((multi / "summary.json").read_text())
    ok = loss_diff < 0.02 and summary["world_size"] == gpus  # sums in another order: close, not equal
    ok = ok and summary.get("fsdp", False) == fsdp
    return Row(name, "pass" if ok else "FAIL", summary["tokens_per_s"], None, summary["peak_memory_mib"],
               summary.get("peak_reserved_mib"),
               detail=f"{gpus} processes{' sharded' if fsdp else ''} vs one with {gpus} micro-batches: "
                      f"losses within {loss_diff:.1e}, "
                      f"weights within {diff:.1e}")


def _cuda_tests(device) -> Row:
    if device.type != "cuda":
        return Row("cuda-tests", "skipped", detail="needs a GPU")
    if not _checkout():
        return Row("cuda-tests", "skipped", detail="minituner is installed, not checked out: no tests/ to run")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests"], cwd=ROOT,
                            capture_output=True, text=True)
    last = (result.stdout.strip().splitlines() or ["no output"])[-1]
    return Row("cuda-tests", "pass" if result.returncode == 0 else "FAIL", detail=f"pytest -m cuda: {last}")


# ----------------------------------------------------------------------------- helpers
def _checkout() -> bool:
    """Whether minituner runs from a checkout of its repository (its tests and fixtures at hand),
    not from an installed copy whose parent folder holds other packages."""
    pyproject = ROOT / "pyproject.toml"
    return (pyproject.is_file() and 'name = "minituner"' in pyproject.read_text(encoding="utf-8")
            and (ROOT / "tests" / "conftest.py").is_file())


def _run(command: list[str]) -> str:
    """Run a command to its end; its standard output, or an error with the last line it wrote."""
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if result.returncode != 0:
        tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{' '.join(command[1:5])} ... exited {result.returncode}: {tail}")
    return result.stdout


def _losses(run: Path) -> list[float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [record["loss"] for record in map(json.loads, lines) if "loss" in record]


def _weight_diff(a: Path, b: Path) -> float:
    """Largest difference between the newest step checkpoints' weights of two run folders."""
    newest = [checkpoint_weights(list_checkpoints(run)[-1]) for run in (a, b)]  # (either kind: sharded or whole)
    return max((newest[0][k].float() - newest[1][k].float()).abs().max().item() for k in newest[0])


def _peaks(device) -> tuple[float, float | None]:
    return peak_memory_mib(device), peak_reserved_mib(device)


def _release(device) -> None:
    """Hand the previous check's cached blocks back, so that each row's reserved peak is its own."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _first_line(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"


# ----------------------------------------------------------------------------- the table
COLUMNS = ("check", "result", "tokens/s", "MFU", "peak MiB", "reserved MiB", "detail")


def format_row(row: Row) -> str:
    def number(value, spec):
        return "-" if value is None else format(value, spec)
    return " | ".join([row.check, row.result, number(row.tokens_per_s, ",.0f"), number(row.mfu, ".1%"),
                       number(row.peak_mib, ",.0f"), number(row.reserved_mib, ",.0f"), row.detail])


def report(rows: list[Row], device: torch.device, as_json: bool) -> str:
    if as_json:
        return json.dumps({"device": describe(device), "rows": [asdict(r) for r in rows]})
    lines = [f"GPU check on {describe(device)}", "", "| " + " | ".join(COLUMNS) + " |",
             "|" + "---|" * len(COLUMNS)]
    return "\n".join(lines + [f"| {format_row(r)} |" for r in rows])


def describe(device: torch.device) -> str:
    torch_version = f"torch {torch.__version__}"
    if device.type != "cuda":
        return f"{device} ({torch_version})"
    major, minor = torch.cuda.get_device_capability(device)
    return (f"{torch.cuda.get_device_name(device)} (sm{major}{minor}, {torch.cuda.device_count()} visible; "
            f"{torch_version}, CUDA {torch.version.cuda})")


def main_check(device: torch.device, preset: str, checks: str | None, as_json: bool, allow_cpu: bool,
               seq_len: int = 1024, batch_size: int = 4) -> int:
    """`python -m minituner.bench --gpu-check`: run the checks, print the table, 1 if any failed."""
    if device.type != "cuda" and not allow_cpu:
        raise UserError("--gpu-check needs a GPU; --device cpu runs it on the CPU as a dry run of the check itself")
    wanted = [c.strip() for c in (checks or ",".join(CHECKS)).split(",") if c.strip()]
    unknown = [c for c in wanted if c not in CHECKS]
    if unknown:
        raise OptionError("checks", f"{unknown[0]}: not a check; choose from {', '.join(CHECKS)}")
    started = time.perf_counter()
    rows = run_checks(device, preset, wanted, seq_len=seq_len, batch_size=batch_size)
    print(report(rows, device, as_json))
    if not as_json:
        print(f"\n{len(rows)} rows in {time.perf_counter() - started:.0f} s; "
              f"{sum(r.result == 'FAIL' for r in rows)} failed")
    return 1 if any(r.result == "FAIL" for r in rows) else 0
