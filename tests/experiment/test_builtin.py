"""The built-in experiment: the shipped base model (also after a non-editable install), and both
scripts with no arguments on a cut-down budget (the comparison: test_compare.py)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, StopAfterTwoSteps
from minituner import trainer
from minituner.experiment import builtin, domain, synth
from minituner.generate import greedy_texts
from minituner.hf.folder import load_pretrained
from minituner.recipes import finetune as train_finetune
from minituner.recipes import instruct as train_instruct

QUICK = ["--steps", "2", "--no-progress", "--eval-limit", "10"]


def summary(out) -> dict:
    return json.loads((Path(out) / "summary.json").read_text())


def test_shipped_base_is_small_loads_and_knows_its_corpus():
    size = sum(f.stat().st_size for f in builtin.BASE_MODEL.iterdir())
    assert size <= 10 * 2**20
    model, tokenizer = load_pretrained(builtin.BASE_MODEL)
    assert tokenizer.vocab_size == 259  # bytes and three special tokens: see minituner/experiment/synth.py
    # the general corpus states every pair of opposites: the base continues them (greedy)
    prompts = [tokenizer.encode_text(f"The opposite of {a} is") for a, _ in synth.OPPOSITES]
    texts = greedy_texts(model, tokenizer, prompts, [tokenizer.eos_id], 10)
    right = sum(text.startswith(f" {b}.") for text, (_, b) in zip(texts, synth.OPPOSITES))
    assert right >= 0.8 * len(synth.OPPOSITES), texts


@pytest.mark.slow
def test_train_instruct_with_no_arguments_runs_the_builtin_experiment(tmp_path, capsys):
    out = tmp_path / "run"
    assert train_instruct.main(["--out", str(out), *QUICK]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["builtin"] and Path(config["base"]) == builtin.BASE_MODEL.resolve()
    assert config["method"] == "lora" and config["steps"] == 2  # a flag given still wins
    assert config["lora_rank"] == builtin.INSTRUCT_OPTIONS["lora_rank"] and config["max_len"] == 128
    for name in ("train", "validation", "heldout_inputs", "heldout_phrasings"):
        assert (out / "data" / f"{name}.jsonl").is_file()
    assert config["val_data"].endswith("validation.jsonl")  # the held-out sets are only scored
    scores = summary(out)["exact_match"]
    assert set(scores) == {"heldout_inputs", "heldout_phrasings"}
    for s in scores.values():
        assert s["n"] == 10 and 0 <= s["before"] <= 1 and 0 <= s["after"] <= 1  # --eval-limit 10 of 179
    assert "held-out exact match" in capsys.readouterr().out
    assert (out / "model" / "chat_template.jinja").is_file() and (out / "adapter").is_dir()


@pytest.mark.slow
def test_train_finetune_with_no_arguments_runs_the_builtin_experiment(tmp_path, capsys):
    out = tmp_path / "run"
    assert train_finetune.main(["--out", str(out), *QUICK]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["builtin"] and config["method"] == "full" and config["init"] == "base"
    s = summary(out)
    assert s["cloze"]["n"] == 10 < len(domain.domain_facts()) and s["general_ppl_after"] > 0  # --eval-limit 10
    assert s["first_eval_ppl"] > s["eval_ppl"]  # even two steps learn something of the domain
    assert "cloze accuracy" in capsys.readouterr().out


@pytest.mark.slow
def test_builtin_run_resumes_from_its_own_data(tmp_path, monkeypatch):
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(trainer, "StopRequest", StopAfterTwoSteps)
        assert train_finetune.main(["--out", str(out), "--steps", "4", "--save-every", "1", "--no-progress",
                                    "--eval-limit", "10"]) == 130
    stamp = (out / "data" / "domain.txt").stat().st_mtime_ns
    assert train_finetune.main(["--resume", str(out), "--no-progress"]) == 0
    assert summary(out)["steps"] == 4 and (out / "data" / "domain.txt").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_builtin_run_keeps_the_users_evaluation_files_and_data_folder(tmp_path, capsys):
    cloze = tmp_path / "mine.jsonl"
    cloze.write_text(json.dumps({"prompt": "The opposite of hot is", "answer": "cold"}) + "\n")
    out = tmp_path / "run"
    assert train_finetune.main(["--out", str(out), "--cloze", str(cloze), *QUICK]) == 0
    assert summary(out)["cloze"]["n"] == 1 and summary(out)["cloze"]["before"] == 1.0  # the base knows it
    taken = tmp_path / "taken"
    (taken / "data").mkdir(parents=True)
    assert train_instruct.main(["--out", str(taken), *QUICK]) == 2
    assert "not a minituner run folder (it holds data)" in capsys.readouterr().err
    assert list(taken.iterdir()) == [taken / "data"] and not any((taken / "data").iterdir())
    # a mistake found after the data was written: the same --out works once it is corrected
    retry = tmp_path / "retry"
    assert train_instruct.main(["--out", str(retry), "--batch-size", "100000", *QUICK]) == 2
    assert "there is not one step's worth" in capsys.readouterr().err
    assert (retry / "data" / "train.jsonl").is_file()
    assert train_instruct.main(["--out", str(retry), *QUICK]) == 0


def test_a_half_given_pair_is_still_an_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_instruct.main(["--data", "x.jsonl", "--out", str(tmp_path / "r")])
    assert "give --base and --data" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("pip") is None and not (Path(sys.executable).parent / "pip").exists(),
                    reason="needs pip")
@pytest.mark.slow
def test_non_editable_install_ships_the_base_model_and_the_scripts(tmp_path):
    setuptools = pytest.importorskip("setuptools")
    if tuple(int(x) for x in setuptools.__version__.split(".")[:2]) < (70, 1):
        pytest.importorskip("wheel")  # older setuptools build wheels through the wheel package
    src = tmp_path / "src"
    shutil.copytree(ROOT / "minituner", src / "minituner", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "train_instruct.py", "train_finetune.py"):
        shutil.copy(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "wheel"), str(src)],
                   check=True, capture_output=True)
    wheel = next((tmp_path / "wheel").glob("*.whl"))
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    work = tmp_path / "elsewhere"
    work.mkdir()
    done = subprocess.run([sys.executable, "-m", "minituner.recipes.finetune", "--out", "run", "--steps", "1", "--samples", "1",
                           "--no-progress"], cwd=work, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    config = json.loads((work / "run" / "config.json").read_text())
    assert Path(config["base"]).is_relative_to(site)  # the installed copy, not this checkout
    assert (work / "run" / "model" / "model.safetensors").is_file()
