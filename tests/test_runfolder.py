"""The run folder: only the marker makes a folder a run's, a new run refuses anything else, and
the options a run was started with are read back for --resume (the scripts' side of it:
tests/recipes/test_run_folders.py)."""

import json
import math

import pytest
import torch

import toy_train
from conftest import snapshot
from minituner import trainer
from minituner.atomic import write_json
from minituner.distributed import Runtime
from minituner.errors import UserError
from minituner.runfolder import read_run_config
from minituner.trainer import TrainOptions, train

CPU = Runtime(torch.device("cpu"))


def run_toy(tmp_path, name, *args):
    out = tmp_path / name
    assert toy_train.main(["--out", str(out), *args]) == 0
    return out


def test_a_new_run_refuses_a_folder_of_other_files(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match=r"not a minituner run folder \(it holds config.json, model.safetensors\)"):
        train(toy_train.build_model(0), toy_train.make_examples(32, 0), toy_train.collate,
              options=TrainOptions(steps=2), runtime=CPU, run_dir=tmp_path, progress=False)
    assert (tmp_path / "config.json").read_text() == "{}"


def test_a_new_run_refuses_a_folder_holding_a_run(tmp_path):
    run_toy(tmp_path, "run", "--steps", "2")
    with pytest.raises(UserError, match="already holds a run: resume it, or choose another run folder"):
        train(toy_train.build_model(0), toy_train.make_examples(32, 0), toy_train.collate,
              options=TrainOptions(steps=2), runtime=CPU, run_dir=tmp_path / "run", progress=False)


def test_json_files_hold_no_inf_or_nan(tmp_path):
    write_json(tmp_path / "s.json", {"loss": float("nan"), "norm": float("inf"), "out": tmp_path, "n": [1.0, -math.inf]})

    def refuse(constant):
        raise ValueError(constant)
    data = json.loads((tmp_path / "s.json").read_text(), parse_constant=refuse)  # strict JSON
    assert data == {"loss": None, "norm": None, "out": str(tmp_path), "n": [1.0, None]}


def test_read_run_config(tmp_path):
    out = run_toy(tmp_path, "run", "--steps", "2", "--n-val", "0")
    assert read_run_config(out)["steps"] == 2
    with pytest.raises(UserError, match="no such run folder to resume"):
        read_run_config(tmp_path / "missing")
    with pytest.raises(UserError, match="not a run folder"):
        read_run_config(tmp_path)


def test_files_named_like_a_runs_are_not_a_run(tmp_path):
    """Only the marker makes a folder a run's: names alone (config.json, metrics.jsonl, an empty
    checkpoints/) are someone else's files and are never cleared."""
    folder = tmp_path / "looks-like-a-run"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "metrics.jsonl").write_text("mine\n")
    (folder / "checkpoints").mkdir()
    before = snapshot(folder)
    with pytest.raises(UserError, match="not a minituner run folder"):
        trainer.train(toy_train.build_model(0), toy_train.make_examples(8, 0), toy_train.collate,
                      options=trainer.TrainOptions(steps=1), runtime=trainer.Runtime(torch.device("cpu")),
                      run_dir=folder, progress=False)
    assert snapshot(folder) == before
