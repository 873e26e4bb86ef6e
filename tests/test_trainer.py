"""The training loop: exact loss averaging, batch semantics, resume, DDP, early stopping, errors."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import toy_train
from conftest import max_diff
from minituner.distributed import Runtime, resolve_device
from minituner.errors import UserError
from minituner.optim import lr_at
from minituner.step import evaluate
from minituner.trainer import TrainOptions, train

CPU = Runtime(torch.device("cpu"))
TOY = Path(toy_train.__file__)
# Subprocesses import minituner from this checkout, whatever copy is installed.
SUBPROCESS_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TOY.parent.parent), os.environ.get("PYTHONPATH", "")])}


def losses(run_dir) -> list[float]:
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]  # the step-0 record holds only an evaluation


def final_weights(run_dir) -> dict:
    newest = sorted((Path(run_dir) / "checkpoints").glob("step-*"))[-1]
    return load_file(newest / "trainable.safetensors")


def run_toy(tmp_path, name, *args) -> Path:
    out = tmp_path / name
    assert toy_train.main(["--out", str(out), *args]) == 0
    return out


# ----------------------------------------------------------------------------- loss averaging
# ----------------------------------------------------------------------------- batch semantics
def test_4x1_2x2_1x4_train_the_same_model(tmp_path):
    runs = [run_toy(tmp_path, f"b{b}a{a}", "--steps", "6", "--batch-size", str(b), "--grad-accum", str(a))
            for b, a in [(4, 1), (2, 2), (1, 4)]]
    assert max_diff(final_weights(runs[0]), final_weights(runs[1])) < 1e-5
    assert max_diff(final_weights(runs[0]), final_weights(runs[2])) < 1e-5


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path):
    single = run_toy(tmp_path, "single", "--steps", "5", "--batch-size", "4", "--eval-every", "5")
    env = {**SUBPROCESS_ENV, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(TOY),
           "--out", str(tmp_path / "ddp"), "--steps", "5", "--batch-size", "2", "--eval-every", "5"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert max_diff(final_weights(single), final_weights(tmp_path / "ddp")) < 1e-5
    a = json.loads((single / "summary.json").read_text())
    b = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert b["world_size"] == 2 and b["global_batch"] == a["global_batch"] == 4
    assert b["eval_loss"] == pytest.approx(a["eval_loss"], abs=1e-5)  # validation is sharded and summed too


# ----------------------------------------------------------------------------- precision end to end
@pytest.mark.parametrize("policy", ["bf16", "fp16"])
def test_low_precision_follows_the_fp32_loss_curve(tmp_path, policy):
    """Stated tolerance: per-step losses within 0.02 of fp32's over 20 steps (the loss falls ~0.6)."""
    args = ["--steps", "20", "--lr", "3e-3", "--n-val", "0"]
    reference = losses(run_toy(tmp_path, "fp32", *args))
    low = losses(run_toy(tmp_path, policy, *args, "--precision", policy))
    assert reference[0] - reference[-1] > 0.3  # it did learn
    assert max(abs(a - b) for a, b in zip(reference, low)) < 0.02


@pytest.mark.cuda
@pytest.mark.parametrize("policy", ["fp32", "bf16", "fp16"])
def test_training_on_cuda_follows_cpu(tmp_path, policy):
    args = ["--steps", "10", "--lr", "3e-3", "--n-val", "0"]
    cpu = losses(run_toy(tmp_path, "cpu", *args))
    cuda = losses(run_toy(tmp_path, policy, *args, "--device", "cuda", "--precision", policy))
    assert max(abs(a - b) for a, b in zip(cpu, cuda)) < 0.02


def test_training_in_bf16_applies_updates_below_bf16_resolution(tmp_path):
    """Adam moves each weight by about lr per step: 1e-4 is under half a bf16 ulp of the norm gains
    (1.0), so only fp32 masters let those updates accumulate and reach the bf16 model."""
    model = toy_train.build_model(0)
    options = TrainOptions(steps=60, lr=1e-4, schedule="constant", weight_decay=0.0, precision="bf16")
    train(model, toy_train.make_examples(32, 0), toy_train.collate, options=options, runtime=CPU,
          run_dir=tmp_path, progress=False)
    assert model.norm.weight.dtype == torch.bfloat16
    master = final_weights(tmp_path)["norm.weight"]
    assert (master - 1.0).abs().max() > 4e-3  # the masters moved by up to 60 x 1e-4
    assert torch.equal(model.norm.weight, master.to(torch.bfloat16))  # and the model holds them, rounded
    assert (model.norm.weight != 1.0).any()


def test_overflowing_fp16_steps_leave_the_schedule_where_it_was(tmp_path):
    out = run_toy(tmp_path, "fp16", "--steps", "30", "--precision", "fp16", "--init-scale", str(2.0**30),
                  "--warmup-steps", "5", "--n-val", "0")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    skipped = [r for r in records if r["skipped"]]
    assert len(skipped) >= 3 and all(r["skipped"] for r in records[:3])
    updates = 0
    for r in records:  # each step's lr is the schedule's value at the number of updates made so far
        assert r["lr"] == pytest.approx(lr_at(updates, lr=1e-2, total_steps=30, warmup_steps=5, min_lr=1e-3))
        updates += not r["skipped"]
    assert [r["loss_scale"] for r in records[:3]] == [2.0**30, 2.0**29, 2.0**28]
    assert skipped[0]["grad_norm"] is None  # inf is written as null: JSON has no inf
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_steps"] == len(skipped) and summary["optimizer_steps"] == 30 - len(skipped)


# ----------------------------------------------------------------------------- resume
def test_sigterm_saves_and_resume_continues_exactly(tmp_path):
    args = ["--steps", "8", "--save-every", "3", "--eval-every", "2", "--precision", "bf16"]
    straight = run_toy(tmp_path, "straight", *args)
    # collate calls: eval at step 0 (2 calls), steps 1-2, eval, steps 3-4, eval, step 5: SIGTERM during step 5
    stopped = run_toy(tmp_path, "stopped", *args, "--term-at", "11")
    summary = json.loads((stopped / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["steps"] == 5
    assert (stopped / "checkpoints" / "step-000005").is_dir()
    run_toy(tmp_path, "stopped", *args, "--resume")
    assert losses(stopped) == losses(straight)  # bitwise: same data order, RNG, optimizer state
    assert max_diff(final_weights(stopped), final_weights(straight)) == 0.0


@pytest.mark.slow
def test_resume_after_kill_9_from_the_last_periodic_checkpoint(tmp_path):
    args = ["--steps", "8", "--save-every", "3", "--n-val", "0"]
    straight = run_toy(tmp_path, "straight", *args)
    out = str(tmp_path / "killed")
    killed = subprocess.run([sys.executable, str(TOY), "--out", out, *args, "--kill-at", "8"], timeout=120,
                            env=SUBPROCESS_ENV)
    assert killed.returncode == -9
    assert [p.name for p in sorted((tmp_path / "killed" / "checkpoints").glob("step-*"))] == ["step-000003",
                                                                                            "step-000006"]
    assert len(losses(out)) == 7  # step 8's record never got written
    resumed = subprocess.run([sys.executable, str(TOY), "--out", out, *args, "--resume"], timeout=120,
                             env=SUBPROCESS_ENV)
    assert resumed.returncode == 0
    assert losses(out) == losses(straight)
    assert max_diff(final_weights(out), final_weights(straight)) == 0.0


def test_checkpoints_keep_the_last_k_and_the_run_folder_is_complete(tmp_path):
    out = run_toy(tmp_path, "run", "--steps", "7", "--save-every", "2", "--eval-every", "3")
    assert [p.name for p in sorted((out / "checkpoints").glob("*"))] == ["step-000006", "step-000007"]
    assert not list((out / "checkpoints").glob(".*"))  # no temporaries left behind
    config = json.loads((out / "config.json").read_text())
    assert config["steps"] == 7
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 7 and summary["tokens"] > 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(0, 8))  # step 0: the evaluation before training
    assert {"loss", "lr", "grad_norm", "loss_scale", "tokens_per_s"} <= records[1].keys()
    assert [r["step"] for r in records if "eval_loss" in r] == [0, 3, 6, 7]


# ----------------------------------------------------------------------------- early stopping
def noise_examples(n: int, seed: int) -> list[dict]:
    """Sequences of independent tokens from a skewed distribution over 16 ids: nothing to learn
    beyond the unigram frequencies, so whatever else a model learns is memorisation."""
    g = torch.Generator().manual_seed(seed)
    weights = 1.0 / torch.arange(1, 17)
    ids = torch.multinomial(weights, n * 24, replacement=True, generator=g).view(n, 24).tolist()
    return [{"input_ids": x, "labels": x} for x in ids]


def test_early_stopping_stops_at_the_patience_limit_and_restores_the_best(tmp_path):
    """Memorising 8 sequences of random tokens: validation loss on other such sequences first falls
    (the model learns the unigram frequencies) and then rises. The run must stop `patience` evaluations after its
    best one and end with the best weights."""
    model = toy_train.build_model(0)
    val = noise_examples(8, seed=1)
    options = TrainOptions(steps=200, batch_size=8, lr=1e-2, eval_every=2, patience=3, schedule="constant",
                           weight_decay=0.0)
    summary = train(model, noise_examples(8, seed=0), toy_train.collate, options=options, runtime=CPU,
                    run_dir=tmp_path, val_set=val, extra_evals={"again": val}, progress=False)
    evals = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # an extra set is measured before the first step and on the weights the run ends with: the best
    assert summary["again_loss_before"] == evals[0]["eval_loss"] == evals[0]["again_loss"]
    assert evals[-1]["final"] and summary["again_loss_after"] == evals[-1]["again_loss"]
    assert summary["again_ppl_after"] == pytest.approx(math.exp(summary["again_loss_after"]))
    evals = [(r["step"], r["eval_loss"]) for r in evals if "eval_loss" in r]
    best_step, best = min(evals, key=lambda e: e[1])
    assert summary["status"] == "early_stopped"
    assert evals[0][1] > best < evals[-1][1]  # it improved first, then overfitted
    assert summary["steps"] == best_step + 3 * 2 == evals[-1][0]  # three evaluations without improvement
    assert summary["best_step"] == best_step and summary["restored_best"]
    assert evaluate(model, val, toy_train.collate, batch_size=8, runtime=CPU) == pytest.approx(best, abs=1e-6)
    assert summary["again_loss_after"] == pytest.approx(best, abs=1e-6)


# ----------------------------------------------------------------------------- failures
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    model = toy_train.build_model(0)
    calls = 0

    def poisoning_collate(examples):
        nonlocal calls
        calls += 1
        if calls == 4:  # before step 4: a NaN weight, as a diverged update would leave
            with torch.no_grad():
                model.norm.weight[0] = float("nan")
        return toy_train.collate(examples)
    options = TrainOptions(steps=6, save_every=3)
    with pytest.raises(UserError, match=r"step 4: the loss or gradients became non-finite .*step-000003"):
        train(model, toy_train.make_examples(16, 0), poisoning_collate, options=options, runtime=CPU,
              run_dir=tmp_path, progress=False)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000003"]


def test_resume_of_a_missing_or_empty_folder_is_a_user_error(tmp_path):
    args = ["--out", str(tmp_path / "nowhere"), "--resume"]
    with pytest.raises(UserError, match="no such run folder to resume"):
        train(toy_train.build_model(0), toy_train.make_examples(8, 0), toy_train.collate, options=TrainOptions(),
              runtime=CPU, run_dir=tmp_path / "nowhere", resume=True, progress=False)
    assert toy_train.main(args) == 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no checkpoint to resume from"):
        train(toy_train.build_model(0), toy_train.make_examples(8, 0), toy_train.collate, options=TrainOptions(),
              runtime=CPU, run_dir=tmp_path / "empty", resume=True, progress=False)


def test_resume_with_a_different_model_is_a_user_error(tmp_path, capsys):
    out = run_toy(tmp_path, "run", "--steps", "2")
    assert toy_train.main(["--out", str(out), "--steps", "2", "--freeze", "embed_tokens", "--resume"]) == 2
    assert "holds weights of a different model or method (missing []" in capsys.readouterr().err


def test_resume_with_another_global_batch_is_a_user_error_but_another_split_is_fine(tmp_path):
    straight = run_toy(tmp_path, "straight", "--steps", "4", "--n-val", "0")
    out = run_toy(tmp_path, "run", "--steps", "4", "--n-val", "0", "--term-at", "2")  # stops after step 2
    assert toy_train.main(["--out", str(out), "--steps", "4", "--n-val", "0", "--batch-size", "2", "--resume"]) == 2
    run_toy(tmp_path, "run", "--steps", "4", "--n-val", "0", "--batch-size", "2", "--grad-accum", "2", "--resume")
    assert max_diff(final_weights(out), final_weights(straight)) < 1e-5


def test_resume_with_other_steps_is_a_user_error(tmp_path, capsys):
    out = run_toy(tmp_path, "run", "--steps", "4", "--n-val", "0", "--term-at", "2")
    assert toy_train.main(["--out", str(out), "--steps", "6", "--n-val", "0", "--resume"]) == 2
    assert "started with total_steps = 4, this one has 6" in capsys.readouterr().err


@pytest.mark.slow
def test_a_run_killed_before_its_first_checkpoint_can_start_over(tmp_path):
    """Early stopping writes best-000000 at the step-0 evaluation; the dead run still has no
    resumable checkpoint, so it must be possible to start it over."""
    args = ["--out", str(tmp_path / "run"), "--steps", "6", "--save-every", "4", "--eval-every", "2",
            "--patience", "2"]
    killed = subprocess.run([sys.executable, str(TOY), *args, "--kill-at", "4"], timeout=120, env=SUBPROCESS_ENV)
    assert killed.returncode == -9 and len(losses(tmp_path / "run")) == 1
    assert toy_train.main([*args, "--resume"]) == 2  # nothing to resume
    assert toy_train.main(args) == 0  # starting over replaces the dead run's files
    assert len(losses(tmp_path / "run")) == 6


@pytest.mark.slow
def test_resume_with_early_stopping_after_kill_9_matches_the_straight_run(tmp_path):
    """Killed in step 7, after the evaluation at step 6 wrote a best checkpoint that the newest
    resumable checkpoint (step 4) knows nothing of: the resumed run must redo steps 5-7 and end
    exactly as the straight run, with the same best step and restored weights."""
    args = ["--steps", "10", "--save-every", "4", "--eval-every", "2", "--patience", "10", "--lr", "3e-3"]
    straight = run_toy(tmp_path, "straight", *args)
    out = str(tmp_path / "killed")
    # collate calls: eval 0 (1-2), steps 1-2 (3-4), eval 2 (5-6), 3-4 (7-8), eval 4 (9-10), 5-6 (11-12),
    # eval 6 (13-14), step 7 (15)
    killed = subprocess.run([sys.executable, str(TOY), "--out", out, *args, "--kill-at", "15"], timeout=120,
                            env=SUBPROCESS_ENV)
    assert killed.returncode == -9
    assert (tmp_path / "killed" / "checkpoints" / "best-000006").is_dir()
    assert toy_train.main(["--out", out, *args, "--resume"]) == 0
    assert losses(out) == losses(straight)
    a = json.loads((straight / "summary.json").read_text())
    b = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert (b["best_step"], b["best_eval_loss"], b["restored_best"]) == (a["best_step"], a["best_eval_loss"],
                                                                      a["restored_best"])
    bests = sorted(p.name for p in (tmp_path / "killed" / "checkpoints").glob("best-*"))
    assert bests == sorted(p.name for p in (straight / "checkpoints").glob("best-*"))


def test_a_failed_evaluation_keeps_the_trained_step(tmp_path):
    calls = 0

    def failing_collate(examples):
        nonlocal calls
        calls += 1
        if calls == 8:  # eval 0 (1-2), steps 1-4 (3-6), final eval (7-8): fails, as an out-of-memory would
            raise RuntimeError("CUDA out of memory (simulated)")
        return toy_train.collate(examples)
    with pytest.raises(RuntimeError, match="simulated"):
        train(toy_train.build_model(0), toy_train.make_examples(32, 0), failing_collate,
              options=TrainOptions(steps=4), runtime=CPU, run_dir=tmp_path, val_set=toy_train.make_examples(8, 1),
              progress=False)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000004"]


def test_bad_options_are_user_errors(tmp_path, capsys):
    with pytest.raises(UserError, match="device tpu: not a device"):
        resolve_device("tpu")
    with pytest.raises(UserError, match="batch_size 0: must be >= 1"):
        TrainOptions(batch_size=0)
    with pytest.raises(UserError, match="there is not one step.s worth"):
        train(toy_train.build_model(0), toy_train.make_examples(3, 0), toy_train.collate,
              options=TrainOptions(batch_size=4), runtime=CPU, run_dir=tmp_path / "small", progress=False)
    assert toy_train.main(["--out", str(tmp_path / "x"), "--precision", "fp8"]) == 2
    assert "error: --precision 'fp8': must be one of fp32, bf16, fp16" in capsys.readouterr().err


def test_frozen_model_empty_validation_and_negative_seed_are_user_errors(tmp_path):
    model = toy_train.build_model(0, frozen=".")
    with pytest.raises(UserError, match="every weight is frozen"):
        train(model, toy_train.make_examples(8, 0), toy_train.collate, options=TrainOptions(), runtime=CPU,
              run_dir=tmp_path / "a", progress=False)
    with pytest.raises(UserError, match="validation set has no target tokens"):
        train(toy_train.build_model(0), toy_train.make_examples(8, 0), toy_train.collate, options=TrainOptions(),
              runtime=CPU, run_dir=tmp_path / "b", val_set=[], progress=False)
    assert not (tmp_path / "b" / "checkpoints").exists()  # refused before the first step
    with pytest.raises(UserError, match="seed -1: must be >= 0"):
        TrainOptions(seed=-1)
    with pytest.raises(UserError, match="growth_interval 0: must be >= 1"):
        TrainOptions(growth_interval=0)
    with pytest.raises(UserError, match=r"patience needs validation data \(val_data, or val_fraction > 0\) and eval_every > 0"):
        train(toy_train.build_model(0), toy_train.make_examples(8, 0), toy_train.collate,
              options=TrainOptions(patience=2), runtime=CPU, run_dir=tmp_path / "c",
              val_set=toy_train.make_examples(4, 1), progress=False)
