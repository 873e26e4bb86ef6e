import json

import pytest
import torch

from conftest import FIXTURES
from minituner import gpucheck
from minituner.bench import main


def test_bench_reports_throughput_and_memory(capsys):
    assert main(["--model", str(FIXTURES / "llama-tiny"), "--prompt-len", "16", "--new-tokens", "4",
                 "--repeats", "1", "--batch-size", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["params_m"] == 0.14 and result["batch_size"] == 2
    assert result["prefill_tokens_per_s"] > 0 and result["decode_tokens_per_s"] > 0 and result["peak_memory_mib"] > 0


def test_bench_names_the_flags_that_exceed_learned_positions(capsys):
    assert main(["--model", str(FIXTURES / "gpt2-tiny"), "--prompt-len", "120", "--new-tokens", "16"]) == 2
    assert "--prompt-len 120 + --new-tokens 16 exceeds the model's 128 positions" in capsys.readouterr().err


def test_bench_measures_training_steps(capsys):
    assert main(["--train", "--preset", "tiny", "--dtype", "bf16", "--prompt-len", "32", "--repeats", "1",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["dtype"] == "bfloat16" and result["trainable_m"] == result["params_m"]
    assert result["train_tokens_per_s"] > 0 and result["peak_memory_mib"] > 0
    assert result["mfu"] is None  # only computed against a GPU's known peak
    assert 0 < result["loss_share"] < 1  # the output layer and cross-entropy, timed alone, against the step
    assert main(["--train", "--preset", "tiny", "--freeze", "layers.", "--prompt-len", "32", "--repeats", "1",
                 "--json"]) == 0
    frozen = json.loads(capsys.readouterr().out)
    assert 0 < frozen["trainable_m"] < frozen["params_m"]


def test_bench_measures_lora_training_steps(capsys):
    assert main(["--train", "--preset", "tiny", "--dtype", "bf16", "--prompt-len", "32", "--repeats", "1",
                 "--lora-rank", "4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["lora_rank"] == 4 and 0 < result["trainable_m"] < result["params_m"] / 10
    assert result["train_tokens_per_s"] > 0 and result["peak_memory_mib"] > 0
    with pytest.raises(SystemExit):  # argparse: LoRA freezes the base itself
        main(["--train", "--preset", "tiny", "--lora-rank", "4", "--freeze", "layers."])
    assert "--freeze and --lora-rank exclude each other" in capsys.readouterr().err


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA L40", 181.0), ("NVIDIA L40S", 362.0), ("NVIDIA L4", 121.0), ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0), ("Tesla T4", 65.0),
    ("NVIDIA GeForce RTX 4090", 165.0), ("NVIDIA A10", 125.0), ("NVIDIA A10G", None), ("NVIDIA H200", 989.0),
    ("Some Future GPU", None),
])
def test_gpu_peaks_match_whole_words_of_the_name(name, tflops):
    """A substring match gave an L40 the L4's peak."""
    from minituner.bench import peak_tflops_of
    assert peak_tflops_of(name) == tflops


@pytest.mark.parametrize("name", ["gpt2-untied-tiny", "gpt2-tiny", "llama-tiny"])
def test_flops_count_matmul_weights_only(name):
    """An input embedding is a lookup (no FLOPs); a tied one counts once, as the output layer;
    position embeddings, norms and biases are not matmuls either."""
    from minituner.bench import flops_per_token
    from minituner.hf.folder import load_pretrained
    model, _ = load_pretrained(FIXTURES / name)
    c = model.config
    matmul = sum(p.numel() for n, p in model.named_parameters()
                 if n.endswith("proj.weight") or n == "lm_head.weight")
    if c.tie_embeddings:
        matmul += model.embed_tokens.weight.numel()  # the shared matrix appears once, as embed_tokens
    attention = 12 * c.n_layers * c.n_heads * c.head_dim * 64
    assert flops_per_token(model, 64) == 6 * matmul + attention
    model.requires_grad_(False)
    assert flops_per_token(model, 64) == 4 * matmul + attention


# ----------------------------------------------------------------------------- the GPU check, dry-run on the CPU
def gpu_check(*args) -> int:
    return main(["--gpu-check", "--device", "cpu", "--preset", "tiny", "--prompt-len", "32", "--batch-size", "2",
                 "--json", *args])


def test_the_gpu_check_runs_its_rows_on_the_cpu_as_a_dry_run(capsys):
    assert gpu_check("--checks", "training,generation,packing,torchrun,cuda-tests") == 0
    report = json.loads(capsys.readouterr().out)
    results = {row["check"]: row["result"] for row in report["rows"]}
    assert results == {"train-full-bf16": "pass", "train-full-fp16": "pass", "train-lora-bf16": "pass",
                       "train-lora-fp16": "pass", "generation": "pass", "packing": "pass",
                       "torchrun": "skipped", "torchrun-fsdp": "skipped", "cuda-tests": "skipped"}
    generation = next(row for row in report["rows"] if row["check"] == "generation")
    assert "llama31-tiny" in generation["detail"] and generation["tokens_per_s"] > 0  # checked against HF's ids


def test_a_failing_check_fails_the_command_and_says_why(capsys, monkeypatch):
    monkeypatch.setattr(gpucheck, "generate", lambda model, prompts, **kw: [[0] for _ in prompts])
    assert gpu_check("--checks", "generation") == 1
    row = json.loads(capsys.readouterr().out)["rows"][0]
    assert row["result"] == "FAIL" and "differ from transformers'" in row["detail"]


def test_the_gpu_check_needs_a_gpu_or_an_explicit_dry_run(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["--gpu-check"]) == 2
    assert "--gpu-check needs a GPU; --device cpu runs it" in capsys.readouterr().err
    assert gpu_check("--checks", "training,bogus") == 2
    assert "--checks bogus: not a check" in capsys.readouterr().err


@pytest.mark.slow
def test_the_gpu_checks_kill_and_resume_row(capsys, monkeypatch):
    monkeypatch.setattr(gpucheck, "RUN_STEPS", 8)  # (20 on a GPU; the same check, shorter)
    assert gpu_check("--checks", "resume") == 0
    row = json.loads(capsys.readouterr().out)["rows"][0]
    assert row["result"] == "pass" and "bit for bit" in row["detail"]  # on a CPU, exactly
