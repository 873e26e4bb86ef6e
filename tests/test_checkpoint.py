"""Training checkpoints: resume skips an unreadable newest checkpoint (setting it aside, deleting
nothing) and continues exactly; a checkpoint that cannot be written stops the run in one line
and keeps the last good one."""

import errno
from pathlib import Path

import pytest
import torch

import toy_train
from conftest import snapshot
from minituner import checkpoint
from minituner.checkpoint import load_checkpoint, load_latest_readable
from minituner.errors import UserError


def test_resume_skips_an_unreadable_newest_checkpoint_and_deletes_nothing(tmp_path, capsys):
    straight = tmp_path / "straight"
    assert toy_train.main(["--out", str(straight), "--steps", "6", "--save-every", "2", "--n-val", "0"]) == 0
    out = tmp_path / "run"
    assert toy_train.main(["--out", str(out), "--steps", "6", "--save-every", "2", "--n-val", "0",
                           "--term-at", "5"]) == 0  # stops after step 5, saving it
    newest = out / "checkpoints" / "step-000005"
    (newest / "trainable.safetensors").write_bytes(b"\0" * 100)  # a disk fault after it was written
    path, _, skipped = load_latest_readable(out)
    assert path == out / "checkpoints" / "step-000004" and skipped[0][0] == newest
    before = snapshot(newest)
    capsys.readouterr()
    assert toy_train.main(["--out", str(out), "--steps", "6", "--save-every", "2", "--n-val", "0", "--resume"]) == 0
    err = capsys.readouterr().err
    assert "warning: skipped step-000005, which cannot be read" in err and "resuming from step-000004" in err
    assert snapshot(out / "checkpoints" / "unreadable-step-000005") == before  # set aside, not deleted
    a = load_checkpoint(out / "checkpoints" / "step-000006")["weights"]
    b = load_checkpoint(straight / "checkpoints" / "step-000006")["weights"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_no_readable_checkpoint_is_one_line(tmp_path):
    out = tmp_path / "run"
    assert toy_train.main(["--out", str(out), "--steps", "2", "--n-val", "0"]) == 0
    (out / "checkpoints" / "step-000002" / "state.json").write_text("{ broken")
    with pytest.raises(UserError, match=r"no checkpoint in .* can be read \(step-000002: .*invalid JSON"):
        load_latest_readable(out)


def test_a_full_disk_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    real, calls = checkpoint.save_file, []

    def full_disk(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            Path(filename).write_bytes(b"\0" * 10)  # part of it was written
            raise OSError(errno.ENOSPC, "No space left on device", str(filename))
        return real(tensors, filename, metadata=metadata)
    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    out = tmp_path / "run"
    assert toy_train.main(["--out", str(out), "--steps", "6", "--save-every", "2", "--n-val", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the disk is full" in err and "step-000002, is intact" in err, err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002"]  # no half checkpoint left
    assert load_checkpoint(out / "checkpoints" / "step-000002")["state"]["step"] == 2
    monkeypatch.setattr(checkpoint, "save_file", real)
    assert toy_train.main(["--out", str(out), "--steps", "6", "--save-every", "2", "--n-val", "0", "--resume"]) == 0
