import json

import pytest

from conftest import FIXTURES
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
