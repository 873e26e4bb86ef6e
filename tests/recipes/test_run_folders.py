"""Write only what you own: a run folder proves it is one (run.json), exports replace only the
run's own earlier export, inputs and outputs never overlap, resume skips an unreadable newest
checkpoint, a failed checkpoint write keeps the last good one, and mistakes name their cause.

Every refusal is checked the way a user would meet it: exit status 2, one line on stderr, and
the user's files byte for byte as they were."""

import bz2
import errno
import gzip
import json
import lzma
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import toy_train
from conftest import DATA, FIXTURES, StopAfterTwoSteps, snapshot
from minituner import generate, runfolder, trainer
from minituner.checkpoint import load_checkpoint
from minituner.errors import UserError
from minituner.recipes import finetune, flags, instruct
from minituner.recipes import finetune as train_finetune
from minituner.recipes import instruct as train_instruct
from minituner.runfolder import MARKER, new_marker, read_marker

BASE = FIXTURES / "llama-tiny"
INSTRUCT = ["--template", "chatml", "--batch-size", "4", "--max-len", "64", "--samples", "1", "--max-new-tokens", "4",
            "--no-progress"]


def user_project(root: Path) -> Path:
    """A user's project folder: their own config.json, a data/ folder, and the base model they tune."""
    root.mkdir()
    (root / "config.json").write_text('{"learning_rate": 0.1, "notes": "mine"}\n')
    (root / "data").mkdir()
    (root / "data" / "train.json").write_text(json.dumps([{"instruction": "Say hi.", "output": "hi"}] * 8))
    shutil.copytree(BASE, root / "model")
    return root


@pytest.fixture
def alpaca(tmp_path) -> Path:
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps([{"instruction": f"Say {n % 3}.", "output": f"{n % 3}"} for n in range(16)]))
    return path


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if a script loads a model or reads data: the refusal must come first."""
    def forbidden(*args, **kwargs):
        raise AssertionError("the run started working before refusing")
    for module in (instruct, finetune):
        monkeypatch.setattr(module, "load_pretrained", forbidden)
    monkeypatch.setattr(instruct, "read_conversations", forbidden)
    monkeypatch.setattr(finetune, "read_documents", forbidden)


def refused(main, argv, capsys, *expected: str) -> str:
    """Run a script's main, which must refuse with exit status 2 and one line naming `expected`."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    for text in expected:
        assert text in err, err
    return err


# ----------------------------------------------------------------------------- a run folder proves it is one
@pytest.mark.parametrize("main, flags", [
    (train_instruct.main, ["--base", str(BASE), "--data", "DATA"]),
    (train_finetune.main, ["--base", str(BASE), "--data", str(DATA / "tinyshakespeare_head.txt")]),
])
def test_a_folder_holding_the_users_config_json_is_refused_before_any_work(tmp_path, alpaca, capsys, no_work,
                                                                           main, flags):
    project = user_project(tmp_path / "project")
    shutil.rmtree(project / "model")
    before = snapshot(project)
    argv = [alpaca if f == "DATA" else f for f in flags]
    refused(main, [*map(str, argv), "--out", str(project), "--steps", "1", "--no-progress"], capsys,
            f"{project} is not empty and is not a minituner run folder (it holds config.json, data)")
    assert snapshot(project) == before and not (project / MARKER).exists()


def test_the_base_model_inside_the_run_folder_is_refused_before_any_work(tmp_path, capsys, no_work):
    project = user_project(tmp_path / "project")
    before = snapshot(project)
    refused(train_instruct.main, ["--base", str(project / "model"), "--data", str(project / "data" / "train.json"),
                                  "--out", str(project), *INSTRUCT], capsys,
            f"--out {project} contains --base {project / 'model'}")
    assert snapshot(project) == before


@pytest.mark.parametrize("where, relation", [("base", "lies inside --base"), ("data", "contains --data"),
                                             ("val", "contains --val-data"), ("eval", "contains --eval-exact"),
                                             ("same", "is --base")])
def test_inputs_and_outputs_never_overlap(tmp_path, alpaca, capsys, no_work, where, relation):
    base = tmp_path / "base"
    shutil.copytree(BASE, base)
    out = {"base": base / "run", "same": base}.get(where, tmp_path / "run")
    inputs = {"data": alpaca, "val": shutil.copy(alpaca, tmp_path / "val.json"),
              "eval": shutil.copy(alpaca, tmp_path / "eval.json")}
    if where in inputs:  # the file lies in the folder chosen as --out
        out.mkdir()
        inputs[where] = shutil.copy(alpaca, out / "mine.json")
    before = snapshot(tmp_path)
    refused(train_instruct.main, ["--base", str(base), "--data", str(inputs["data"]), "--val-data", str(inputs["val"]),
                                  "--eval-exact", str(inputs["eval"]), "--out", str(out), *INSTRUCT], capsys,
            f"--out {out} {relation}")
    assert snapshot(tmp_path) == before and not (out / MARKER).exists()


def test_a_corpus_folder_may_not_hold_the_run_folder(tmp_path, capsys, no_work):
    corpus = tmp_path / "docs"
    corpus.mkdir()
    (corpus / "a.txt").write_text("One document.\n")
    refused(train_finetune.main, ["--base", str(BASE), "--data", str(corpus), "--out", str(corpus / "run")], capsys,
            f"--out {corpus / 'run'} lies inside --data {corpus}")
    assert sorted(p.name for p in corpus.iterdir()) == ["a.txt"]


def test_a_run_folder_inside_another_runs_folder_is_refused(tmp_path, alpaca, capsys):
    first = tmp_path / "first"
    assert train_instruct.main(["--base", str(BASE), "--data", str(alpaca), "--out", str(first), "--steps", "1",
                                *INSTRUCT]) == 0
    before = snapshot(first)
    refused(train_instruct.main, ["--base", str(BASE), "--data", str(alpaca), "--out", str(first / "model" / "again"),
                                  "--steps", "1", *INSTRUCT], capsys, f"lies inside the run folder {first}")
    assert snapshot(first) == before


def test_a_marked_run_that_died_early_is_started_over_and_a_finished_one_is_kept(tmp_path, alpaca, capsys):
    out = tmp_path / "run"
    flags = ["--base", str(BASE), "--data", str(alpaca), "--out", str(out), "--steps", "1", *INSTRUCT]
    out.mkdir()
    (out / MARKER).write_text(json.dumps(new_marker("train_instruct")))
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')  # what a run killed before saving leaves
    (out / "notes.txt").write_text("mine")
    assert train_instruct.main(flags) == 0
    assert (out / "notes.txt").read_text() == "mine"  # not one of the run's files: left as it was
    assert '"loss": 9.0' not in (out / "metrics.jsonl").read_text()
    shutil.rmtree(out / "checkpoints")  # a finished run whose checkpoints were deleted to save space
    before = snapshot(out)
    refused(train_instruct.main, flags, capsys, "holds a finished run's results")
    assert snapshot(out) == before


# ----------------------------------------------------------------------------- exports it owns
def interrupted(out, alpaca, monkeypatch, *flags) -> list[str]:
    """A LoRA run stopped by a SIGTERM in its second step (a checkpoint, no export)."""
    argv = ["--base", str(BASE), "--data", str(alpaca), "--out", str(out), "--steps", "4", *INSTRUCT, *flags]
    with monkeypatch.context() as m:
        m.setattr(trainer, "StopRequest", StopAfterTwoSteps)
        assert train_instruct.main(argv) == 130
    return argv


def test_resume_refuses_a_model_folder_it_did_not_write_before_training(tmp_path, alpaca, capsys, monkeypatch):
    out = tmp_path / "run"
    interrupted(out, alpaca, monkeypatch)
    shutil.copytree(BASE, out / "model")  # the user keeps a model there
    before, metrics = snapshot(out / "model"), (out / "metrics.jsonl").read_text()
    refused(train_instruct.main, ["--resume", str(out), "--no-progress"], capsys,
            f"{out / 'model'} exists and was not written by this run's export")
    assert snapshot(out / "model") == before
    assert (out / "metrics.jsonl").read_text() == metrics  # refused before training


def test_a_finished_run_replaces_its_own_export_but_not_one_changed_since(tmp_path, alpaca, capsys):
    out = tmp_path / "run"
    flags = ["--base", str(BASE), "--data", str(alpaca), "--out", str(out), "--steps", "2", *INSTRUCT]
    assert train_instruct.main(flags) == 0
    assert set(read_marker(out)["exports"]) == {"model", "adapter"}
    assert train_instruct.main(["--resume", str(out), "--no-progress"]) == 0  # its own export: written again
    (out / "adapter" / "README.md").write_text("my model card")
    before = snapshot(out / "adapter")
    refused(train_instruct.main, ["--resume", str(out), "--no-progress"], capsys, "adapter exists and was not written by this run")
    assert snapshot(out / "adapter") == before


LEGACY_TORCH = "2.13."  # the torch that wrote tests/fixtures/legacy-run


def test_a_run_folder_from_before_the_marker_still_resumes(tmp_path):
    """tests/fixtures/legacy-run was written by minituner before run.json existed: resumed with
    today's code it is adopted (run.json, adopted) and ends exactly as a run started today."""
    old = tmp_path / "old"
    shutil.copytree(FIXTURES / "legacy-run", old, ignore=shutil.ignore_patterns("alpaca.json", "make.py", "README.md"))
    data = shutil.copy(FIXTURES / "legacy-run" / "alpaca.json", tmp_path / "alpaca.json")
    config = json.loads((old / "config.json").read_text())
    config.update(base=str(BASE), data=str(data))  # it was made elsewhere
    (old / "config.json").write_text(json.dumps(config))
    assert not (old / MARKER).exists()
    assert train_instruct.main(["--resume", str(old), "--no-progress"]) == 0
    assert read_marker(old)["adopted"] is True and (old / "model").is_dir()
    straight = tmp_path / "straight"
    flags = ["--template", "chatml", "--batch-size", "4", "--max-len", "64", "--samples", "1",
             "--max-new-tokens", "4", "--no-progress"]
    assert train_instruct.main(["--base", str(BASE), "--data", str(data), "--out", str(straight),
                                "--steps", "4", *flags]) == 0
    a = load_checkpoint(old / "checkpoints" / "step-000004")["weights"]
    b = load_checkpoint(straight / "checkpoints" / "step-000004")["weights"]
    if torch.__version__.startswith(LEGACY_TORCH):
        assert all(torch.equal(a[k], b[k]) for k in a)
    else:  # its first two steps ran on another torch's kernels, which may round differently
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


# ----------------------------------------------------------------------------- unreadable and unwritable checkpoints
# ----------------------------------------------------------------------------- errors that name the real cause
def test_a_data_folder_is_said_to_be_a_folder(tmp_path, capsys):
    folder = tmp_path / "alpaca"
    folder.mkdir()
    refused(train_instruct.main, ["--base", str(BASE), "--data", str(folder), "--out", str(tmp_path / "run"),
                                  *INSTRUCT], capsys, f"{folder}: is a folder; expected a JSON or JSONL file")


COMPRESSED = {"gzip": gzip.compress(b"{}"), "bzip2": bz2.compress(b"{}"), "xz": lzma.compress(b"{}"),
              "zstd": b"\x28\xb5\x2f\xfd" + bytes(8), "zip": b"PK\x03\x04" + bytes(26)}


@pytest.mark.parametrize("main, name", [(train_instruct.main, "data.json.gz"), (train_finetune.main, "corpus.txt.gz"),
                                        (train_finetune.main, "corpus.txt")])
@pytest.mark.parametrize("kind", sorted(COMPRESSED))
def test_a_compressed_file_is_said_to_be_compressed(tmp_path, capsys, main, name, kind):
    path = tmp_path / name
    path.write_bytes(COMPRESSED[kind])
    flags = INSTRUCT if main is train_instruct.main else ["--no-progress"]
    refused(main, ["--base", str(BASE), "--data", str(path), "--out", str(tmp_path / "run"), *flags], capsys,
            f"{path}: is a {kind}-compressed file; decompress it first")
    assert path.read_bytes() == COMPRESSED[kind]


def test_a_config_json_missing_a_shape_key_names_it(tmp_path, capsys, no_work):
    base = tmp_path / "base"
    shutil.copytree(BASE, base)
    config = json.loads((base / "config.json").read_text())
    del config["hidden_size"]
    (base / "config.json").write_text(json.dumps(config))
    refused(train_finetune.main, ["--base", str(base), "--data", str(DATA / "tinyshakespeare_head.txt"),
                                  "--out", str(tmp_path / "run")], capsys, "required key 'hidden_size' is missing")
    assert not (tmp_path / "run").exists()  # said before the run folder was made


def test_a_run_folder_given_as_a_model_points_to_its_model(tmp_path, alpaca, capsys):
    out = tmp_path / "run"
    assert train_instruct.main(["--base", str(BASE), "--data", str(alpaca), "--out", str(out), "--steps", "1",
                                *INSTRUCT]) == 0
    capsys.readouterr()
    refused(train_instruct.main, ["--base", str(out), "--data", str(alpaca), "--out", str(tmp_path / "next"),
                                  *INSTRUCT], capsys, f"{out}: is a minituner run folder, not a model folder; "
                                                      f"its trained model is {out / 'model'}")
    assert not (tmp_path / "next").exists()  # said before the run folder was made
    assert generate.main(["--model", str(out), "--prompt", "hi"]) == 2
    assert f"its trained model is {out / 'model'}" in capsys.readouterr().err


def test_negative_freeze_layers_must_be_at_least_zero(tmp_path, capsys, no_work):
    refused(train_finetune.main, ["--base", str(BASE), "--data", str(DATA / "tinyshakespeare_head.txt"),
                                  "--out", str(tmp_path / "run"), "--freeze-layers", "-1", "--no-progress"], capsys,
            "--freeze-layers -1: must be >= 0")
    assert not (tmp_path / "run").exists()


def test_max_new_tokens_is_checked_only_when_something_is_generated(tmp_path, capsys):
    corpus = str(DATA / "tinyshakespeare_head.txt")
    flags = ["--base", str(FIXTURES / "gpt2-tiny"), "--data", corpus, "--max-len", "64", "--steps", "1",
             "--no-progress"]
    assert train_finetune.main([*flags, "--out", str(tmp_path / "quiet"), "--samples", "0"]) == 0
    refused(train_finetune.main, [*flags, "--out", str(tmp_path / "loud")], capsys,
            "--max-new-tokens 64 leaves no room for a prompt")


# ----------------------------------------------------------------------------- a run that is still going
LOCK_HOLDER = """
import fcntl, sys, time
f = open(sys.argv[1], "a+")
fcntl.flock(f, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(120)
"""


def test_a_run_still_going_is_never_taken_for_a_dead_one(tmp_path, alpaca, capsys):
    """A marked folder with no checkpoint yet is a dead run only if no process holds its lock: a
    second run (or a resume) on the folder of a run still going is refused, and the first run's
    files stay as they are; once that process is gone, the folder may be started over."""
    out = tmp_path / "run"
    out.mkdir()
    (out / MARKER).write_text(json.dumps(new_marker("train_instruct")))
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(out / "run.lock")], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(out)
        flags = ["--base", str(BASE), "--data", str(alpaca), "--out", str(out), "--steps", "1", *INSTRUCT]
        refused(train_instruct.main, flags, capsys, f"{out} is in use by a run that is still going")
        assert snapshot(out) == before
    finally:
        holder.kill()
        holder.wait()
    assert train_instruct.main(flags) == 0  # the process is gone: a dead run, started over


def test_two_runs_started_in_the_same_second_get_their_own_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(flags.time, "strftime", lambda fmt: "20261129-120000")
    first = flags.default_out("train_instruct")
    Path(first).mkdir(parents=True)
    assert (first, flags.default_out("train_instruct")) == ("runs/train_instruct-20261129-120000",
                                                            "runs/train_instruct-20261129-120000-2")


def test_a_copied_run_folder_is_still_its_own(tmp_path, alpaca):
    out = tmp_path / "run"
    assert train_instruct.main(["--base", str(BASE), "--data", str(alpaca), "--out", str(out), "--steps", "2",
                                *INSTRUCT]) == 0
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)  # new modification times, as cp, scp or rsync without -t give
    for path in copy.rglob("*"):
        os.utime(path, (1, 1))
    assert train_instruct.main(["--resume", str(copy), "--no-progress"]) == 0


def test_a_full_run_ignores_an_adapter_folder_it_never_writes(tmp_path, alpaca, monkeypatch):
    out = tmp_path / "run"
    interrupted(out, alpaca, monkeypatch, "--method", "full", "--lr", "1e-4")
    (out / "adapter").mkdir()
    (out / "adapter" / "notes.txt").write_text("mine")
    assert train_instruct.main(["--resume", str(out), "--no-progress"]) == 0
    assert (out / "adapter" / "notes.txt").read_text() == "mine"


# ----------------------------------------------------------------------------- odd --out values
def test_odd_names_and_paths_give_one_line(tmp_path, alpaca, capsys):
    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / "a\nb").write_text("mine")
    flags = ["--base", str(BASE), "--data", str(alpaca), "--steps", "1", *INSTRUCT]
    refused(train_instruct.main, [*flags, "--out", str(folder)], capsys, "it holds 'a\\nb'")
    (tmp_path / "nowhere").symlink_to(tmp_path / "missing")
    refused(train_instruct.main, [*flags, "--out", str(tmp_path / "nowhere")], capsys, "is a symbolic link to nothing")
    (tmp_path / "file").write_text("mine")
    refused(train_instruct.main, [*flags, "--out", str(tmp_path / "file" / "run")], capsys,
            f"{tmp_path / 'file'} is a file, not a folder")
    assert (tmp_path / "file").read_text() == "mine" and not (tmp_path / "missing").exists()


def test_a_folder_it_may_not_write_gives_one_line(tmp_path, alpaca, capsys, monkeypatch):
    def read_only(run_dir, marker):
        raise OSError(errno.EROFS, "Read-only file system", str(run_dir))
    monkeypatch.setattr(runfolder, "write_marker", read_only)
    refused(train_instruct.main, ["--base", str(BASE), "--data", str(alpaca), "--steps", "1", *INSTRUCT,
                                  "--out", str(tmp_path / "run")], capsys,
            "cannot write the run folder (Read-only file system)")


def test_a_mistake_found_after_the_checks_leaves_no_run_folder(tmp_path, alpaca, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"foo": 1}]))
    flags = ["--base", str(BASE), "--steps", "1", *INSTRUCT]
    refused(train_instruct.main, [*flags, "--data", str(bad), "--out", str(tmp_path / "a")], capsys,
            "cannot tell the data format")
    refused(train_instruct.main, [*flags, "--data", str(alpaca), "--lora-targets", "nope", "--out",
                                  str(tmp_path / "b")], capsys, "'nope' matches none")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_marked_folder_without_options_is_said_to_have_never_started(tmp_path, capsys):
    (tmp_path / MARKER).write_text(json.dumps(new_marker("train_instruct")))
    refused(train_instruct.main, ["--resume", str(tmp_path)], capsys, "stopped before it started training")


def test_an_export_folder_with_a_subfolder_is_checked_whole(tmp_path, alpaca, capsys):
    """model/ may hold subfolders (huggingface-cli leaves .cache/huggingface/ there): the check reads
    them instead of failing, and one that is not the run's refuses the export in one line."""
    out = tmp_path / "run"
    assert train_instruct.main(["--base", str(BASE), "--data", str(alpaca), "--out", str(out), "--steps", "1",
                                *INSTRUCT]) == 0
    (out / "model" / ".cache" / "huggingface").mkdir(parents=True)
    (out / "model" / ".cache" / "huggingface" / "upload.lock").write_text("")
    before = snapshot(out / "model")
    refused(train_instruct.main, ["--resume", str(out), "--no-progress"], capsys,
            "model exists and was not written by this run's export (it holds .cache")
    assert snapshot(out / "model") == before


def test_the_library_refuses_a_dead_looking_folder_whose_run_is_still_going(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / MARKER).write_text(json.dumps(new_marker("train")))
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(out / "run.lock")], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match="in use by a run that is still going"):
            trainer.train(toy_train.build_model(0), toy_train.make_examples(8, 0), toy_train.collate,
                          options=trainer.TrainOptions(steps=1), runtime=trainer.Runtime(torch.device("cpu")),
                          run_dir=out, progress=False)
    finally:
        holder.kill()
        holder.wait()
