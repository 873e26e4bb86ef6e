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
