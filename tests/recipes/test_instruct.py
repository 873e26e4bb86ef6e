"""train_instruct.py end to end on llama-tiny: the run folder, the exports, resume, torchrun, errors."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES, ROOT, StopAfterTwoSteps
from minituner import chat_template, trainer
from minituner.hf.folder import load_pretrained
from minituner.hf.peft import load_adapter
from minituner.hf.tokenizer import load_tokenizer
from minituner.recipes import instruct as train_instruct
from minituner.runfolder import new_marker, write_marker

BASE = str(FIXTURES / "llama-tiny")


def run(out, data, *flags) -> int:
    return train_instruct.main(["--base", BASE, "--data", data, "--out", str(out), "--template", "chatml",
                                "--batch-size", "4", "--lr", "3e-3", "--max-len", "128", "--samples", "2",
                                "--max-new-tokens", "8", "--no-progress", *flags])


def rows(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def logits(model, ids):
    with torch.no_grad():
        return model(ids).float()


def test_lora_run_writes_a_complete_run_folder(tmp_path, data, capsys):
    out = tmp_path / "run"
    assert run(out, data, "--steps", "12", "--eval-every", "6", "--val-fraction", "0.2") == 0
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == "lora" and config["lr"] == 3e-3 and config["precision"] == "fp32"
    records = rows(out)
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3]) - 0.5  # the loss falls
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert len(evals) == 3 and evals[-1] < evals[0]  # steps 0, 6, 12
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["first_eval_loss"] == evals[0]
    samples = json.loads((out / "samples.json").read_text())["samples"]
    assert len(samples) == 2 and all({"prompt", "reference", "before", "after"} <= set(s) for s in samples)

    # the merged model and base + adapter are the same model
    merged, _ = load_pretrained(out / "model")
    base, _ = load_pretrained(BASE)
    load_adapter(base, out / "adapter")
    ids = torch.randint(0, merged.config.vocab_size, (2, 16))
    assert (logits(merged, ids) - logits(base, ids)).abs().max() < 1e-5
    assert (logits(merged, ids) - logits(load_pretrained(BASE)[0], ids)).abs().max() > 1e-3  # and it trained
    generation = json.loads((out / "model" / "generation_config.json").read_text())
    assert set(generation["eos_token_id"]) == {0, 2}  # <|endoftext|> and chatml's <|im_end|>, trained to end a turn
    assert (out / "model" / "chat_template.jinja").read_text().startswith("{# minituner template: chatml #}")
    printed = capsys.readouterr().out
    assert "trainable params:" in printed and "validation loss" in printed and "--- after" in printed
    assert printed.rstrip().endswith(f"chat with it: python -m minituner.chat --model {out / 'model'}")


def test_full_run_exports_the_float32_weights_of_its_last_checkpoint(tmp_path, data):
    out = tmp_path / "run"
    assert run(out, data, "--method", "full", "--steps", "3", "--lr", "1e-3") == 0
    assert not (out / "adapter").exists()
    trained = load_file(out / "checkpoints" / "step-000003" / "trainable.safetensors")
    model, _ = load_pretrained(out / "model")
    params = dict(model.named_parameters())
    assert set(trained) == set(params)
    assert all(torch.equal(params[name], t) for name, t in trained.items())


def test_packed_run_and_show_mask(tmp_path, data, capsys):
    assert run(tmp_path / "run", data, "--steps", "2", "--pack", "--show-mask") == 0
    printed = capsys.readouterr().out
    assert "packing: 23 examples in 8 rows of at most 128 tokens" in printed  # 3 examples of 35 tokens per row
    assert "<|im_start|>assistant\n⟦0 0 0<|im_end|>⟧" in printed


def test_an_interrupted_run_resumes_to_the_same_result(tmp_path, data, monkeypatch):
    straight = tmp_path / "straight"
    assert run(straight, data, "--steps", "4") == 0
    out = tmp_path / "interrupted"
    with monkeypatch.context() as m:
        m.setattr(trainer, "StopRequest", StopAfterTwoSteps)
        assert run(out, data, "--steps", "4") == 130
    assert not (out / "model").exists()  # an interrupted run is resumed, not exported
    assert train_instruct.main(["--resume", str(out), "--no-progress", "--lr", "1"]) == 0  # --lr is ignored
    assert [r["step"] for r in rows(out)] == [0, 1, 2, 3, 4]
    assert [r.get("loss") for r in rows(out)] == [r.get("loss") for r in rows(straight)]
    a, b = (load_file(run_dir / "model" / "model.safetensors") for run_dir in (straight, out))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_folder_of_another_kind(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"script": "train_finetune"}))
    assert train_instruct.main(["--resume", str(tmp_path)]) == 2  # a config.json alone is not a run
    assert "not a run folder to resume (it has no run.json" in capsys.readouterr().err
    write_marker(tmp_path, new_marker("train_finetune"))
    assert train_instruct.main(["--resume", str(tmp_path)]) == 2
    assert "not written by train_instruct.py" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--data", "missing.json"], "missing.json"),
    (["--template", "llama3"], 'needs "<|start_header_id|>"'),
    (["--template", "model"], "--template model: the model folder has no chat template"),
    (["--base", "MALICIOUS"], "chat_template.jinja: refused, the template reached for something unsafe"),
    (["--max-len", "1"], "--max-len 1: a row needs at least 3 tokens"),
    (["--base", str(FIXTURES / "gpt2-tiny"), "--max-len", "4096"], "--max-len 4096 exceeds the model's 128 learned"),
    (["--patience", "2"], "--patience needs validation data (--val-data, or --val-fraction > 0) and --eval-every > 0"),
    (["--samples", "-1"], "--samples and --eval-limit must be >= 0"),
    (["--base", str(FIXTURES / "gpt2-tiny"), "--lora-targets", "q_proj"], "adapt all three (target c_attn)"),
    (["--base", str(FIXTURES / "gpt2-tiny"), "--max-new-tokens", "128"], "--max-new-tokens 128 leaves no room"),
    (["--val-fraction", "1.5"], "--val-fraction"),
    (["--lora-targets", "qkv"], "'qkv' matches none"),
])
def test_user_mistakes_are_one_line_errors(tmp_path, data, capsys, flags, message):
    if "MALICIOUS" in flags:  # a downloaded folder whose chat template reaches for Python's internals
        shutil.copytree(BASE, tmp_path / "base")
        (tmp_path / "base" / "chat_template.jinja").write_text("{{ cycler.__init__.__globals__.os.getcwd() }}")
        flags = ["--base", str(tmp_path / "base")]
    argv = ["--base", BASE, "--data", data, "--out", str(tmp_path / "run"), "--steps", "1", "--no-progress", *flags]
    assert train_instruct.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]
    assert "Traceback" not in "\n".join(err)


def test_a_folder_holding_a_run_is_refused_before_any_work(tmp_path, data, capsys):
    out = tmp_path / "run"
    assert run(out, data, "--steps", "1") == 0
    assert run(out, data, "--steps", "1") == 2
    assert f"error: --out {out} already holds a run: resume it, or choose another run folder" in capsys.readouterr().err
    assert train_instruct.main(["--resume", str(tmp_path / "nothing")]) == 2


def test_the_seed_fixes_the_adapters_initialisation(tmp_path, data):
    for name in ("a", "b"):
        assert run(tmp_path / name, data, "--steps", "1", "--seed", "7") == 0
    a, b = (load_file(tmp_path / name / "adapter" / "adapter_model.safetensors") for name in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_config_records_absolute_paths_so_resume_works_from_elsewhere(tmp_path, data, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "run"
    argv = ["--base", "tests/fixtures/llama-tiny", "--data", data, "--out", str(out), "--steps", "1", "--no-progress"]
    assert train_instruct.main(argv) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["base"] == BASE and Path(config["data"]).is_absolute()


def test_eval_limit_scores_a_spread_subset_and_zero_scores_all(tmp_path, data):
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("".join(json.dumps({"instruction": f"Say {n}.", "output": f"{n}"}) + "\n" for n in range(6)))
    for limit, n in ((0, 6), (4, 4)):
        out = tmp_path / f"run-{limit}"
        assert run(out, data, "--steps", "1", "--eval-exact", str(held_out), "--eval-limit", str(limit)) == 0
        assert json.loads((out / "summary.json").read_text())["exact_match"]["held_out"]["n"] == n


def test_a_model_with_its_own_chat_template_is_trained_and_exported_in_it(tmp_path, data, capsys):
    """--template auto picks the folder's own chat template: the data is rendered with it (its
    default system prompt included), --show-mask shows the reply and end token trained, and the
    export keeps the template unchanged, generation stopping at its end-of-turn token."""
    base = tmp_path / "base"
    shutil.copytree(BASE, base)
    template = (FIXTURES / "chat_templates" / "chatml-tools.jinja").read_text()
    (base / "chat_template.jinja").write_text(template)
    out = tmp_path / "run"
    assert train_instruct.main(["--base", str(base), "--data", data, "--out", str(out), "--steps", "2",
                                "--batch-size", "4", "--max-len", "128", "--samples", "1", "--max-new-tokens", "4",
                                "--show-mask", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert f"template model ({base}/chat_template.jinja)" in printed
    assert "<|im_start|>system\nYou are Quill, a helpful assistant.<|im_end|>" in printed
    assert "<|im_start|>assistant\n⟦" in printed and "<|im_end|>⟧" in printed
    assert (out / "model" / "chat_template.jinja").read_text() == template
    im_end = json.loads((base / "tokenizer.json").read_text())["added_tokens"][2]
    assert im_end["content"] == "<|im_end|>"
    eos = json.loads((out / "model" / "generation_config.json").read_text())["eos_token_id"]
    assert im_end["id"] in (eos if isinstance(eos, list) else [eos])
    samples = json.loads((out / "samples.json").read_text())["samples"]
    assert samples[0]["prompt"].startswith("<|im_start|>system\nYou are Quill")
    assert samples[0]["prompt"].endswith("<|im_start|>assistant\n")


def test_a_dated_chat_template_renders_the_runs_date(tmp_path, data, capsys, monkeypatch):
    """Llama 3's template writes "Today Date: ..." (strftime_now): a run renders --template-date, or
    its start, and records it, so that a resumed run renders the same text on another day."""
    base = tmp_path / "base"
    shutil.copytree(BASE, base)
    shutil.copy(FIXTURES / "chat_templates" / "llama3-dated.jinja", base / "chat_template.jinja")
    out = tmp_path / "run"
    monkeypatch.setattr(trainer, "StopRequest", StopAfterTwoSteps)
    assert train_instruct.main(["--base", str(base), "--data", data, "--out", str(out), "--steps", "4",
                                "--batch-size", "4", "--max-len", "256", "--samples", "0", "--show-mask",
                                "--template-date", "2025-03-14", "--no-progress"]) == 130
    assert "Today Date: 14 Mar 2025" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["template_date"] == "2025-03-14"
    monkeypatch.undo()
    assert train_instruct.main(["--resume", str(out), "--no-progress"]) == 0
    assert "Today Date: 14 Mar 2025" in capsys.readouterr().out
    today = chat_template.render(load_tokenizer(base), [{"role": "user", "content": "x"}])  # the clock again
    assert "Today Date: 14 Mar 2025" not in today and "Today Date: " in today
    assert train_instruct.main(["--base", str(base), "--data", data, "--out", str(tmp_path / "bad"),
                                "--template-date", "July", "--no-progress"]) == 2
    assert "--template-date 'July' is not a date (YYYY-MM-DD)" in capsys.readouterr().err


def test_bf16_on_a_cpu_that_only_emulates_it_is_said(tmp_path, data, capsys, monkeypatch):
    from minituner.recipes import flags
    for slow in (True, False):
        monkeypatch.setattr(flags, "slow_cpu_bf16", lambda device, slow=slow: slow)
        assert run(tmp_path / f"run-{slow}", data, "--steps", "1", "--samples", "0", "--precision", "bf16",
                   "--export", "none") == 0
        said = "note: this CPU has no bfloat16 matmul instructions" in capsys.readouterr().out
        assert said == slow


def test_padding_free_batches_by_default_and_runs_from_before_keep_padding(tmp_path, data, capsys, monkeypatch):
    """New runs lay each micro-batch out in one row without pads, with the padded run's losses; a run
    begun before --padding-free existed (no such key in its config.json) resumes padded, as it began."""
    records = [{"instruction": f"Count to {n % 6}.", "input": "", "output": " ".join(str(i) for i in range(n % 6 + 1))}
               for n in range(24)]  # answers of different lengths: padded rows would hold pads
    data = tmp_path / "counts.json"
    data.write_text(json.dumps(records), encoding="utf-8")
    data = str(data)
    free, padded = tmp_path / "free", tmp_path / "padded"
    assert run(free, data, "--steps", "3", "--samples", "0") == 0
    assert "padding-free batches: padded to their longest, the first steps' rows would be" in capsys.readouterr().out
    assert run(padded, data, "--steps", "3", "--samples", "0", "--no-padding-free") == 0
    assert "real (non-pad) tokens:" in capsys.readouterr().out
    assert json.loads((free / "config.json").read_text())["padding_free"] is True
    for a, b in zip(rows(free), rows(padded)):
        assert a.get("loss", 0) == pytest.approx(b.get("loss", 0), rel=1e-4)
    assert json.loads((free / "summary.json").read_text())["tokens"] < json.loads((padded / "summary.json")
                                                                                  .read_text())["tokens"]
    old = tmp_path / "old"
    with monkeypatch.context() as m:
        m.setattr(trainer, "StopRequest", StopAfterTwoSteps)
        assert run(old, data, "--steps", "3", "--samples", "0", "--no-padding-free") == 130
    config = json.loads((old / "config.json").read_text())
    del config["padding_free"]  # as a run from before the flag wrote it
    (old / "config.json").write_text(json.dumps(config))
    assert train_instruct.main(["--resume", str(old), "--no-progress"]) == 0
    assert [r.get("loss") for r in rows(old)] == [r.get("loss") for r in rows(padded)]  # padded all along
