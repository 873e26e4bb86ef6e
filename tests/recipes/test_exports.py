"""What a run costs at its end: the final checkpoint without optimizer state, --export's choices,
RUN/model/ in the base's dtype or --save-dtype's."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import FIXTURES
from minituner.checkpoint import checkpoint_path
from minituner.errors import UserError
from minituner.hf.folder import load_pretrained, save_pretrained, stored_dtype
from minituner.hf.peft import load_adapter
from minituner.lora import merge_and_unload
from minituner.recipes import finetune as train_finetune
from minituner.recipes import instruct as train_instruct
from minituner.recipes.export import _cast

BASE = str(FIXTURES / "llama-tiny")


def run(out, data, *flags) -> int:  # (data: the Alpaca file of tests/conftest.py)
    return train_instruct.main(["--base", BASE, "--data", data, "--out", str(out), "--template", "chatml",
                                "--batch-size", "4", "--lr", "3e-3", "--max-len", "64", "--samples", "0",
                                "--no-progress", *flags])


def tensor_dtypes(folder) -> set[str]:
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        return {f.get_slice(name).get_dtype() for name in f.keys()}


def test_a_completed_run_ends_on_a_checkpoint_without_optimizer_state(tmp_path, data):
    out = tmp_path / "run"
    assert run(out, data, "--steps", "4", "--save-every", "2", "--keep-checkpoints", "2") == 0
    periodic, final = checkpoint_path(out, 2), checkpoint_path(out, 4)
    assert (periodic / "optimizer.pt").is_file() and (periodic / "rng.pt").is_file()  # a run may go on from it
    assert sorted(p.name for p in final.iterdir()) == ["state.json", "trainable.safetensors"]
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert run(out, data, "--resume", str(out)) == 0  # a finished run resumed exports again from it
    again = load_file(out / "adapter" / "adapter_model.safetensors")
    assert adapter.keys() == again.keys() and all(torch.equal(adapter[k], again[k]) for k in adapter)


def test_a_checkpoint_mid_run_without_optimizer_state_is_refused_on_resume(tmp_path, data, capsys):
    out = tmp_path / "run"
    assert run(out, data, "--steps", "4", "--save-every", "2", "--keep-checkpoints", "2") == 0
    (checkpoint_path(out, 2) / "optimizer.pt").unlink()
    shutil.rmtree(checkpoint_path(out, 4))  # as if the run had stopped after step 2
    capsys.readouterr()
    assert run(out, data, "--resume", str(out)) == 2
    err = capsys.readouterr().err.strip()
    assert "step-000002: has no optimizer state (optimizer.pt), so training cannot continue from it" in err
    assert len(err.splitlines()) == 1


def test_export_adapter_none_and_merged_later_on_resume(tmp_path, data, capsys):
    adapter_only, nothing = tmp_path / "adapter-only", tmp_path / "nothing"
    assert run(adapter_only, data, "--steps", "2", "--export", "adapter") == 0
    assert (adapter_only / "adapter" / "adapter_model.safetensors").is_file() and not (adapter_only / "model").exists()
    assert run(nothing, data, "--steps", "2", "--export", "none") == 0
    assert not (nothing / "adapter").exists() and not (nothing / "model").exists()
    assert f"--resume {nothing} --export merged" in capsys.readouterr().out
    # the choice may change on resume: the finished run writes its merged model now
    assert run(nothing, data, "--resume", str(nothing), "--export", "merged") == 0
    assert not (nothing / "adapter").exists()
    exported, _ = load_pretrained(nothing / "model")
    expected, _ = load_pretrained(BASE)  # the other run trained the same adapter (same seed, data, steps)
    load_adapter(expected, adapter_only / "adapter")
    expected = merge_and_unload(expected)
    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(exported.parameters(), expected.parameters()))


def test_model_is_written_in_the_base_dtype_or_save_dtype(tmp_path, data):
    bf16_base = tmp_path / "bf16-base"
    model, tokenizer = load_pretrained(BASE)
    save_pretrained(model.to(torch.bfloat16), tokenizer, bf16_base)
    assert stored_dtype(bf16_base) == torch.bfloat16 and stored_dtype(BASE) == torch.float32
    docs = tmp_path / "docs.txt"
    docs.write_text("\n\n".join(f"The lamp of room {i} is lit at dusk." for i in range(20)) + "\n", encoding="utf-8")
    for name, base, flags, expected in [("auto", bf16_base, [], "BF16"), ("f32", bf16_base, ["--save-dtype", "float32"], "F32"),
                                        ("half", BASE, ["--save-dtype", "float16"], "F16")]:
        out = tmp_path / name
        assert train_finetune.main(["--base", str(base), "--data", str(docs), "--out", str(out), "--steps", "2",
                                    "--batch-size", "2", "--max-len", "32", "--samples", "0", "--no-progress",
                                    *flags]) == 0
        assert tensor_dtypes(out / "model") == {expected}
        config = json.loads((out / "model" / "config.json").read_text())
        assert config["torch_dtype"] == {"BF16": "bfloat16", "F32": "float32", "F16": "float16"}[expected]
        trained = load_file(out / "checkpoints" / "step-000002" / "trainable.safetensors")  # float32 masters
        exported, _ = load_pretrained(out / "model", dtype=None)
        dtype = next(exported.parameters()).dtype
        assert all(torch.equal(p, trained[n].to(dtype)) for n, p in exported.named_parameters())  # rounded once


def test_export_choices_a_full_run_cannot_make_are_refused(tmp_path, capsys):
    docs = tmp_path / "docs.txt"
    docs.write_text("One lamp.\n\nTwo lamps.\n", encoding="utf-8")
    code = train_finetune.main(["--base", BASE, "--data", str(docs), "--out", str(tmp_path / "run"), "--export",
                                "adapter"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.endswith("--export adapter: a full fine-tune has no adapter; use --export merged (or none)")
    assert not (tmp_path / "run").exists()


def test_float16_refuses_weights_it_cannot_hold():
    model, _ = load_pretrained(BASE)
    with torch.no_grad():
        model.layers[0].mlp.up_proj.weight[0, 0] = 1e5
    with pytest.raises(UserError, match=r"--save-dtype float16: layers.0.mlp.up_proj.weight has values it cannot hold"):
        _cast(model, torch.float16)
    assert _cast(model, torch.bfloat16).layers[0].mlp.up_proj.weight.dtype == torch.bfloat16


def test_a_plain_resume_keeps_the_runs_own_export_choices(tmp_path, data, monkeypatch):
    from conftest import StopAfterTwoSteps
    from minituner import trainer
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(trainer, "StopRequest", StopAfterTwoSteps)
        assert run(out, data, "--steps", "4", "--export", "adapter", "--save-dtype", "float16") == 130
    assert train_instruct.main(["--resume", str(out), "--no-progress"]) == 0
    assert (out / "adapter").is_dir() and not (out / "model").exists()  # not the default's merged model too
    config = json.loads((out / "config.json").read_text())
    assert config["export"] == "adapter" and config["save_dtype"] == "float16"
    assert train_instruct.main(["--resume", str(out), "--no-progress", "--export", "merged"]) == 0
    assert tensor_dtypes(out / "model") == {"F16"}  # the run's --save-dtype, kept
