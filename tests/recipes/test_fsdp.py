"""--fsdp (minituner/sharding.py) on two gloo processes: the same training as one process, about
half the training state per process, sharded checkpoints that resume exactly after a kill -9
and on another number of processes (with or without --fsdp), exports that are whole.

Starting processes costs more than these tiny runs, so the two-process runs share two torchrun
launches (tests/fsdp_runs.py), made once for the module."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import DATA, FIXTURES, ROOT, StopAfterTwoSteps
from minituner import step, trainer
from minituner.checkpoint import checkpoint_weights, list_checkpoints
from minituner.errors import OptionError
from minituner.hf.folder import load_pretrained
from minituner.recipes import finetune, instruct
from minituner.sharding import check_fsdp


def fsdp_available() -> bool:
    try:
        check_fsdp()
    except OptionError:
        return False
    return True


pytestmark = [pytest.mark.slow, pytest.mark.skipif(not fsdp_available(), reason="this torch lacks what --fsdp uses")]
BASES = {"llama": FIXTURES / "llama-tiny", "gpt2": FIXTURES / "gpt2-tiny"}
METHODS = {"full": ["--method", "full", "--lr", "2e-3"],
           "lora": ["--method", "lora", "--lora-dropout", "0", "--lr", "2e-3"]}
COMBOS = [(base, method) for base in BASES for method in METHODS]
LOW_PRECISION = [("lora", "bf16"), ("full", "fp16")]  # (method, precision) on llama-tiny


def flags(data, base: str, method: str, out) -> list[str]:
    """A run of 6 steps of a global batch of 4, evaluated every 3, checkpointed every 2."""
    return ["--base", str(BASES[base]), "--data", str(data), "--out", str(out), "--val-fraction", "0.2", "--steps", "6",
            "--eval-every", "3", "--save-every", "2", "--max-len", "64", "--samples", "1", "--max-new-tokens", "4",
            "--no-progress", *METHODS[method]]


def instruct_flags(out) -> list[str]:
    """train_instruct.py, LoRA, on a real ShareGPT file: 3 steps of a global batch of 2."""
    return ["--base", str(BASES["llama"]), "--data", str(DATA / "fastchat_dummy_conversation.json"), "--out", str(out),
            "--steps", "3", "--max-len", "96", "--samples", "1", "--max-new-tokens", "4", "--lora-dropout", "0",
            "--lr", "2e-3", "--no-progress"]


def launch(jobs: list[dict], folder) -> subprocess.CompletedProcess:
    path = folder / f"jobs-{len(list(folder.glob('jobs-*')))}.json"
    path.write_text(json.dumps(jobs))
    env = {"PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "fsdp_runs.py"), str(path)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def final_weights(run) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    return checkpoint_weights(run / "checkpoints" / f"step-{summary['steps']:06d}")


def max_diff(a: dict, b: dict) -> float:
    """The largest difference between two sets of weights, but for attention's key bias (GPT-2):
    a constant added to every key leaves the softmax unchanged, so its gradient is zero but for
    rounding noise, which AdamW divides by its own size. Summed in another order (two processes),
    the noise differs, and so does the bias: by 6e-5 after 6 steps at lr 2e-3."""
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a if not k.endswith("k_proj.bias"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two-process runs: each base and method with --fsdp; the llama full run stopped after step 3
    with and without --fsdp; the benchmark's training state with and without; then a --fsdp run
    killed (-9) after step 5, and resumed with --fsdp on two processes."""
    root = tmp_path_factory.mktemp("fsdp")
    data = root / "domain.txt"
    colours = ["red", "blue", "green", "amber"]
    data.write_text("\n\n".join(f"The {colours[i % 4]} lamp of room {i % 5} is lit at dusk." for i in range(40)) + "\n")
    two = ["--batch-size", "2"]
    bench = ["--train", "--preset", "tiny", "--repeats", "1", "--prompt-len", "32", "--json"]
    jobs = [{"script": "finetune", "argv": flags(data, b, m, root / f"{b}-{m}-fsdp") + two + ["--fsdp"]
             + (["--activation-checkpointing"] if b == "gpt2" else [])} for b, m in COMBOS]
    jobs += [{"script": "finetune", "argv": flags(data, "llama", m, root / f"llama-{m}-{p}-fsdp") + two
              + ["--fsdp", "--precision", p]} for m, p in LOW_PRECISION]
    jobs += [{"script": "finetune", "argv": flags(data, "llama", "full", root / "fused-fsdp") + two + ["--fsdp"],
              "fused": True},
             {"script": "instruct", "argv": instruct_flags(root / "instruct-fsdp") + ["--batch-size", "1", "--fsdp"]},
             {"script": "instruct", "stdout": str(root / "instruct-ddp.txt"),
              "argv": instruct_flags(root / "instruct-ddp") + ["--batch-size", "1", "--steps", "2"]},
             {"script": "finetune", "argv": flags(data, "llama", "full", root / "early-fsdp") + two
              + ["--fsdp", "--eval-every", "1", "--patience", "2", "--min-delta", "10", "--general-eval", str(data)]},
             {"script": "finetune", "argv": flags(data, "llama", "full", root / "stopped-fsdp") + two + ["--fsdp"],
              "stop_after": 3},
             {"script": "finetune", "argv": flags(data, "llama", "full", root / "full-disk") + two + ["--fsdp"],
              "full_disk_on_rank": 1, "expect": 2},
             {"script": "finetune", "argv": flags(data, "llama", "full", root / "stopped-ddp") + two, "stop_after": 3},
             {"script": "bench", "argv": bench, "stdout": str(root / "bench-ddp.json")},
             {"script": "bench", "argv": [*bench, "--fsdp"], "stdout": str(root / "bench-fsdp.json")},
             {"script": "finetune", "argv": flags(data, "llama", "full", root / "killed") + two + ["--fsdp"],
              "kill_after": 5}]
    first = launch(jobs, root)
    (root / "launch-0.err").write_text(first.stderr)
    assert first.returncode != 0 and not (root / "killed" / "summary.json").exists()  # the kill ended the launch
    assert (root / "bench-fsdp.json").is_file(), first.stderr[-3000:]
    for b, m in COMBOS:  # the same runs on one process, a batch of 4, no --fsdp
        assert finetune.main(flags(data, b, m, root / f"{b}-{m}-one") + ["--batch-size", "4"]) == 0
    assert instruct.main(instruct_flags(root / "instruct-one") + ["--batch-size", "2"]) == 0
    step.FUSED_MIN_VOCAB, fused_from = 0, step.FUSED_MIN_VOCAB
    try:
        assert finetune.main(flags(data, "llama", "full", root / "fused-one") + ["--batch-size", "4"]) == 0
    finally:
        step.FUSED_MIN_VOCAB = fused_from
    for m, p in LOW_PRECISION:
        assert finetune.main(flags(data, "llama", m, root / f"llama-{m}-{p}-one") + ["--batch-size", "4",
                                                                                     "--precision", p]) == 0
    trainer.StopRequest, stop = StopAfterTwoSteps, trainer.StopRequest
    try:  # a one-process run (whole checkpoints) stopped after step 2, to continue sharded on two
        assert finetune.main(flags(data, "llama", "full", root / "stopped-one") + ["--batch-size", "4"]) == 130
    finally:
        trainer.StopRequest = stop
    resumed = launch([{"script": "finetune", "argv": ["--resume", str(root / "killed"), "--fsdp", "--no-progress"],
                       "stdout": str(root / "resumed.txt")},
                      {"script": "finetune", "argv": ["--resume", str(root / "stopped-one"), "--fsdp", "--batch-size",
                                                      "2", "--no-progress"], "stdout": str(root / "resharded.txt")}],
                     root)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return root


@pytest.mark.parametrize("base, method", COMBOS)
def test_fsdp_on_two_processes_trains_what_one_process_trains(runs, base, method):
    sharded, one = runs / f"{base}-{method}-fsdp", runs / f"{base}-{method}-one"
    summary = json.loads((sharded / "summary.json").read_text())
    assert summary["fsdp"] and summary["world_size"] == 2 and summary["global_batch"] == 4
    assert (sharded / "checkpoints" / "step-000004" / "sharded" / ".metadata").is_file()
    assert not (sharded / "checkpoints" / "step-000004" / "trainable.safetensors").exists()  # each process its slices
    assert max_diff(final_weights(sharded), final_weights(one)) < 1e-5
    loaded, _ = load_pretrained(sharded / "model")
    exported = {name: p.detach() for name, p in loaded.named_parameters()}
    if method == "full":  # the export is the gathered weights, bit for bit
        gathered = final_weights(sharded)
        assert all(torch.equal(exported[name], t) for name, t in gathered.items())
    else:  # merged into the base, and the adapters as PEFT keeps them: those one process trained
        merged, _ = load_pretrained(one / "model")
        assert max_diff(exported, {n: p.detach() for n, p in merged.named_parameters()}) < 1e-5
        adapters = [load_file(run / "adapter" / "adapter_model.safetensors") for run in (sharded, one)]
        assert max_diff(*adapters) < 1e-5
    samples = [json.loads((run / "samples.json").read_text())["samples"] for run in (sharded, one)]
    assert len(samples[0]) == 1 and samples[0][0]["after"] == samples[1][0]["after"]  # rank 0 from a whole copy


def test_the_fused_loss_and_instruction_tuning_under_fsdp_train_what_one_process_trains(runs):
    """The loss fused with the output layer (real vocabularies: it reads the root's output weight
    outside the model's forward), and train_instruct.py with LoRA on a real ShareGPT file."""
    assert max_diff(final_weights(runs / "fused-fsdp"), final_weights(runs / "fused-one")) < 1e-5
    sharded, one = runs / "instruct-fsdp", runs / "instruct-one"
    assert json.loads((sharded / "summary.json").read_text())["fsdp"]
    assert max_diff(final_weights(sharded), final_weights(one)) < 1e-5
    adapters = [load_file(run / "adapter" / "adapter_model.safetensors") for run in (sharded, one)]
    assert max_diff(*adapters) < 1e-5
    samples = [json.loads((run / "samples.json").read_text())["samples"][0]["after"] for run in (sharded, one)]
    assert samples[0] == samples[1]


def test_real_sharegpt_file_under_torchrun(runs):
    """Two gloo processes without --fsdp: one run folder, written once, from a real ShareGPT file."""
    summary = json.loads((runs / "instruct-ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["status"] == "completed" and not summary["fsdp"]
    assert json.loads((runs / "instruct-ddp" / "config.json").read_text())["template"] == "auto"
    assert (runs / "instruct-ddp.txt").read_text().count("written:") == 1  # rank 0's output
    assert "written:" not in (runs / "instruct-ddp.txt.rank1").read_text()  # and not rank 1's
    assert (runs / "instruct-ddp" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("method, precision", LOW_PRECISION)
def test_fsdp_computes_in_bf16_and_fp16_as_one_process_does(runs, method, precision):
    """FSDP gathers the float32 slices as bf16/fp16 and reduces the gradients in float32; fp16
    with the loss scaler. Stated tolerance: each step's loss within 0.02 of one process's run in
    the same precision (rounding differs with the split), and so the final validation loss."""
    sharded, one = (runs / f"llama-{method}-{precision}-{kind}" for kind in ("fsdp", "one"))
    summary = json.loads((sharded / "summary.json").read_text())
    assert summary["precision"] == precision and summary["fsdp"] and summary["skipped_steps"] == 0
    losses = [[row["loss"] for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
               if "loss" in row] for run in (sharded, one)]
    assert len(losses[0]) == len(losses[1]) == 6
    assert max(abs(a - b) for a, b in zip(*losses)) < 0.02
    assert summary["eval_loss"] == pytest.approx(json.loads((one / "summary.json").read_text())["eval_loss"], abs=0.02)
    assert losses[0][-1] < losses[0][0] - 0.1  # it trained


def test_early_stopping_under_fsdp_ends_on_the_best_weights(runs):
    """--min-delta 10: no evaluation improves on the first (step 0), so the run stops after two and
    ends on the step-0 weights, the base's own, read back from a sharded best checkpoint."""
    summary = json.loads((runs / "early-fsdp" / "summary.json").read_text())
    assert summary["status"] == "early_stopped" and summary["restored_best"] and summary["best_step"] == 0
    # measured on the restored weights, whole: no gathered copy of the last step's is left to be read
    assert summary["general_loss_after"] == pytest.approx(summary["general_loss_before"], abs=1e-6)
    assert (runs / "early-fsdp" / "checkpoints" / "best-000000" / "sharded" / ".metadata").is_file()
    base = load_file(BASES["llama"] / "model.safetensors")
    exported = load_file(runs / "early-fsdp" / "model" / "model.safetensors")
    assert all(torch.equal(exported[name], t) for name, t in base.items())


def test_each_process_holds_about_half_the_training_state(runs):
    ddp = json.loads((runs / "bench-ddp.json").read_text())
    fsdp = json.loads((runs / "bench-fsdp.json").read_text())
    assert ddp["processes"] == fsdp["processes"] == 2 and fsdp["fsdp"] and not ddp["fsdp"]
    for part in ("params", "grads", "optimizer", "total"):
        assert 0.45 < fsdp[f"state_{part}_mib"] / ddp[f"state_{part}_mib"] < 0.56, part


def test_a_killed_fsdp_run_resumes_bit_for_bit(runs):
    assert "resuming from step-000004: step 4 of 6\n" in (runs / "resumed.txt").read_text()
    killed, straight = final_weights(runs / "killed"), final_weights(runs / "llama-full-fsdp")
    assert all(torch.equal(killed[name], t) for name, t in straight.items())


@pytest.mark.parametrize("run, split", [("stopped-fsdp", ["--batch-size", "2", "--grad-accum", "2"]),
                                        ("stopped-ddp", [])])
def test_a_two_process_run_continues_on_one(runs, tmp_path, capsys, run, split):
    """Started on two processes (batch 2 each), continued on one: 2 x 2 x 1 keeps the global batch
    of 4, given, or (no flags) by --grad-accum chosen so."""
    copy = tmp_path / run
    shutil.copytree(runs / run, copy)
    assert [p.name for p in list_checkpoints(copy)][-1] == "step-000003"
    assert finetune.main(["--resume", str(copy), "--no-progress", *split]) == 0
    out, err = capsys.readouterr()
    kind = "2 processes, sharded" if run == "stopped-fsdp" else "2 processes"
    assert f"resuming from step-000003: step 3 of 6 (written by {kind}; resharded for 1 process)" in out
    if not split:
        assert "with --batch-size 2 that is --grad-accum 2" in err
    assert max_diff(final_weights(copy), final_weights(runs / "llama-full-one")) < 1e-5


def test_a_one_process_run_continues_sharded_on_two(runs):
    text = (runs / "resharded.txt").read_text()
    assert "resuming from step-000002: step 2 of 6 (written by 1 process; resharded for 2 processes, sharded)" in text
    assert max_diff(final_weights(runs / "stopped-one"), final_weights(runs / "llama-full-one")) < 1e-5


def test_a_sharded_checkpoint_missing_a_slice_is_set_aside(runs, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(runs / "stopped-fsdp", copy)
    (copy / "checkpoints" / "step-000003" / "sharded" / "__1_0.distcp").unlink()  # one process's slices lost
    assert finetune.main(["--resume", str(copy), "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert "warning: skipped step-000003, which cannot be read" in err and "__1_0.distcp is missing" in err
    assert "resuming from step-000002: step 2 of 6" in out
    assert (copy / "checkpoints" / "unreadable-step-000003").is_dir()
    assert max_diff(final_weights(copy), final_weights(runs / "llama-full-one")) < 1e-5


def test_a_full_disk_on_one_process_stops_every_process_in_one_line(runs):
    """Rank 1 cannot write its slices of the first checkpoint (step 2): both processes stop with
    write_failure's line, and no checkpoint, whole or partial, is left."""
    expected = (f"error: could not write {runs / 'full-disk' / 'checkpoints' / 'step-000002'} (the disk is full); "
                "training stopped and no checkpoint was written before it: free some space, then start the run again")
    lines = (runs / "launch-0.err").read_text().splitlines()
    assert sum(line == expected for line in lines) == 2  # one per process
    assert list((runs / "full-disk" / "checkpoints").iterdir()) == []


def test_a_split_that_breaks_the_global_batch_is_refused(runs, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(runs / "stopped-ddp", copy)
    assert finetune.main(["--resume", str(copy), "--batch-size", "3", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"error: --resume {copy}: the run's global batch is 4 examples (batch size x grad accum x "
                       "processes), and 3 x 1 x 1 is 3: give --batch-size and --grad-accum whose product is 4")


def test_fsdp_on_one_process_trains_as_without(runs, tmp_path, capsys):
    data = runs / "domain.txt"
    assert finetune.main(flags(data, "llama", "full", tmp_path / "run") + ["--batch-size", "4", "--fsdp"]) == 0
    assert "note: --fsdp with one process: there is nothing to shard over" in capsys.readouterr().out
    assert torch.equal(load_file(tmp_path / "run" / "model" / "model.safetensors")["lm_head.weight"],
                       load_file(runs / "llama-full-one" / "model" / "model.safetensors")["lm_head.weight"])
