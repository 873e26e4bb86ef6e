"""train_finetune.py end to end: fine-tuning llama-tiny, overfitting and forgetting in the numbers,
a model from scratch that the rest of the toolkit accepts, resume, and bad input."""

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import DATA, FIXTURES, StopAfterTwoSteps
from minituner import trainer
from minituner.generate import generate_text
from minituner.hf.folder import load_pretrained
from minituner.recipes import finetune as train_finetune
from minituner.recipes import instruct as train_instruct

BASE = str(FIXTURES / "llama-tiny")


def run(out, *flags) -> int:
    return train_finetune.main(["--out", str(out), "--batch-size", "4", "--max-len", "64", "--samples", "2",
                                "--max-new-tokens", "8", "--no-progress", *flags])


def rows(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def write_docs(path: Path, docs: list[str]) -> str:
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture
def domain(tmp_path) -> str:
    """A small, repetitive domain corpus: 40 documents on one pattern."""
    colours = ["red", "blue", "green", "amber"]
    docs = [f"The {colours[i % 4]} lamp of room {i % 5} is lit at dusk." for i in range(40)]
    return write_docs(tmp_path / "domain.txt", docs)


def test_fine_tuning_lowers_validation_perplexity_and_reports_general_text(tmp_path, domain):
    out = tmp_path / "run"
    assert run(out, "--base", BASE, "--data", domain, "--val-fraction", "0.2", "--steps", "30", "--lr", "2e-3",
               "--eval-every", "10", "--general-eval", str(DATA / "tinyshakespeare_head.txt")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_ppl"] < 0.5 * summary["first_eval_ppl"]  # it learned the domain
    first, final = rows(out)[0], rows(out)[-1]
    assert summary["general_ppl_before"] == first["general_ppl"] and summary["general_ppl_after"] == final["general_ppl"]
    assert summary["general_ppl_before"] != summary["general_ppl_after"]
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == "full" and config["lr"] == 2e-3 and config["init"] == "base"
    samples = json.loads((out / "samples.json").read_text())["samples"]
    assert len(samples) == 2 and samples[0]["before"] != samples[0]["after"]
    model, _ = load_pretrained(out / "model")  # the exported weights are the final checkpoint's, in float32
    trained = load_file(out / "checkpoints" / "step-000030" / "trainable.safetensors")
    assert all(torch.equal(p, trained[name]) for name, p in model.named_parameters())


def test_early_stopping_on_an_overfitting_run_restores_the_best(tmp_path):
    """Random strings: the model first learns their letters (validation improves), then memorises
    the 8 training strings (validation worsens)."""
    rng = random.Random(0)
    strings = ["".join(rng.choice("abcdefgh ") for _ in range(40)) for _ in range(24)]
    train = write_docs(tmp_path / "train.txt", strings[:8])
    val = write_docs(tmp_path / "val.txt", strings[8:])
    out = tmp_path / "run"
    assert run(out, "--base", BASE, "--data", train, "--val-data", val, "--steps", "200", "--lr", "1e-2",
               "--batch-size", "8", "--layout", "rows", "--schedule", "constant", "--eval-every", "2",
               "--patience", "3") == 0
    summary = json.loads((out / "summary.json").read_text())
    evals = [(r["step"], r["eval_loss"]) for r in rows(out) if "eval_loss" in r]
    best_step, best = min(evals, key=lambda e: e[1])
    assert summary["status"] == "early_stopped" and summary["steps"] < 200
    assert evals[0][1] > best < evals[-1][1] and summary["best_step"] == best_step and summary["restored_best"]
    # the summary's "after" describes the weights the run ends with, not the last evaluation's
    assert summary["eval_loss"] == best and summary["last_eval_loss"] == evals[-1][1]
    assert summary["weights_of_step"] == best_step
    model, _ = load_pretrained(out / "model")
    kept = load_file(out / "checkpoints" / f"best-{best_step:06d}" / "trainable.safetensors")
    assert all(torch.equal(p, kept[name]) for name, p in model.named_parameters())


def test_a_model_from_scratch_loads_generates_and_instruction_tunes(tmp_path):
    out = tmp_path / "scratch"
    assert run(out, "--init", "scratch", "--preset", "tiny", "--vocab-size", "400", "--steps", "6", "--lr", "3e-3",
               "--data", str(DATA / "tinyshakespeare_head.txt")) == 0
    model, tokenizer = load_pretrained(out / "model")
    assert model.config.vocab_size == tokenizer.vocab_size <= 400 and model.config.max_seq_len == 64
    assert isinstance(generate_text(model, tokenizer, ["First Citizen:"], max_new_tokens=5)[0], str)
    tuned = tmp_path / "tuned"
    assert train_instruct.main(["--base", str(out / "model"), "--data", str(DATA / "fastchat_dummy_conversation_64.json"),
                                "--out", str(tuned), "--steps", "2", "--samples", "1", "--max-new-tokens", "4",
                                "--no-progress"]) == 0
    assert json.loads((tuned / "config.json").read_text())["template"] == "auto"
    assert (tuned / "adapter" / "adapter_config.json").is_file()


def test_an_interrupted_scratch_run_resumes_with_its_own_tokenizer(tmp_path, monkeypatch):
    flags = ["--init", "scratch", "--preset", "tiny", "--vocab-size", "300", "--steps", "4",
             "--data", str(DATA / "tinyshakespeare_head.txt")]
    assert run(tmp_path / "straight", *flags) == 0
    out = tmp_path / "interrupted"
    with monkeypatch.context() as m:
        m.setattr(trainer, "StopRequest", StopAfterTwoSteps)
        assert run(out, *flags) == 130
    assert train_finetune.main(["--resume", str(out), "--no-progress"]) == 0
    assert [r.get("loss") for r in rows(out)] == [r.get("loss") for r in rows(tmp_path / "straight")]
    a, b = (load_file(d / "model" / "model.safetensors") for d in (tmp_path / "straight", out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert run(out, *flags) == 2  # a second fresh run must not overwrite this one's tokenizer


def test_frozen_embeddings_and_blocks_keep_the_base_weights(tmp_path, domain):
    out = tmp_path / "run"
    assert run(out, "--base", BASE, "--data", domain, "--steps", "3", "--lr", "1e-3", "--freeze-embeddings",
               "--freeze-layers", "1") == 0
    base, _ = load_pretrained(BASE)
    tuned, _ = load_pretrained(out / "model")
    before, after = dict(base.named_parameters()), dict(tuned.named_parameters())
    frozen = [n for n in before if n.startswith(("embed_tokens.", "layers.0."))]
    assert frozen and all(torch.equal(before[n], after[n]) for n in frozen)
    assert not torch.equal(before["layers.1.mlp.up_proj.weight"], after["layers.1.mlp.up_proj.weight"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trainable_params"] == sum(p.numel() for n, p in before.items() if n not in frozen)


def test_lora_method_for_comparison(tmp_path, domain):
    out = tmp_path / "run"
    assert run(out, "--base", BASE, "--data", domain, "--steps", "3", "--method", "lora") == 0
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "model" / "config.json").is_file()


def bad_jsonl(tmp_path) -> str:
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "fine"}\n{"body": "no text field"}\n', encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("make, message", [
    (lambda d: write_docs(d / "empty.txt", ["   "]), "empty.txt: empty file"),
    (lambda d: (d / "latin1.txt").write_bytes(b"ok\n\ncaf\xe9\n") and str(d / "latin1.txt"), "latin1.txt:3: not UTF-8"),
    (bad_jsonl, 'docs.jsonl:2: field "text" is missing'),
])
def test_bad_input_is_a_one_line_error(tmp_path, capsys, make, message):
    assert run(tmp_path / "run", "--base", BASE, "--data", make(tmp_path), "--steps", "1") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1] and "Traceback" not in "\n".join(err)


def test_skip_bad_counts_instead_of_stopping(tmp_path, capsys):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"document number {i} " * 5}) + "\n" for i in range(12))
                    + '{"body": 1}\n', encoding="utf-8")
    assert run(tmp_path / "run", "--base", BASE, "--data", str(path), "--steps", "1", "--skip-bad") == 0
    assert "skipped 1" in capsys.readouterr().out


def test_flag_mistakes(tmp_path, domain, capsys):
    with pytest.raises(SystemExit):
        train_finetune.main(["--data", domain])  # neither --base nor --init scratch
    for flags in (["--layout", "rows", "--isolate-docs"], ["--method", "lora", "--freeze-layers", "1"],
                  ["--vocab-size", "300"], ["--dim", "64"], ["--init", "scratch", "--base", "", "--method", "lora"]):
        with pytest.raises(SystemExit):
            train_finetune.main(["--base", BASE, "--data", domain, *flags])
    err = capsys.readouterr().err
    assert "--freeze-embeddings and --freeze-layers apply to --method full" in err
    assert "--vocab-size shape a model built with --init scratch" in err
    assert "a model from scratch has none: use --method full" in err
    assert run(tmp_path / "run", "--base", BASE, "--data", domain, "--freeze-layers", "9") == 2
    assert "--freeze-layers 9: the model has 2 blocks" in capsys.readouterr().err


def test_a_scratch_run_refuses_a_folder_of_other_files_before_writing_into_it(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert run(tmp_path, "--init", "scratch", "--preset", "tiny", "--vocab-size", "300", "--steps", "1",
               "--data", str(DATA / "tinyshakespeare_head.txt")) == 2
    assert "not a minituner run folder (it holds notes.txt)" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # no tokenizer/ left behind


def test_no_validation_document_to_hold_out_is_said(tmp_path, capsys):
    assert run(tmp_path / "run", "--base", BASE, "--data", write_docs(tmp_path / "one.txt", ["only one " * 20]),
               "--steps", "1", "--batch-size", "1") == 0
    assert "--val-fraction 0.05 holds out nothing from 1 documents" in capsys.readouterr().out


def test_activation_checkpointing_trains_the_same_weights(tmp_path, domain):
    """--activation-checkpointing recomputes blocks in the backward pass: the same run, the same
    weights to the bit (so a run may resume with or without it)."""
    for name, flags in (("plain", []), ("recomputed", ["--activation-checkpointing"])):
        assert run(tmp_path / name, "--base", BASE, "--data", domain, "--steps", "2", "--samples", "0", *flags) == 0
    plain, recomputed = (load_file(tmp_path / n / "model" / "model.safetensors") for n in ("plain", "recomputed"))
    assert plain.keys() == recomputed.keys() and all(torch.equal(plain[k], recomputed[k]) for k in plain)
