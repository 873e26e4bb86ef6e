"""The comparison: every arm trains in its own process, one evaluation suite scores five models,
and comparison.md has one row per claim; run on a cut-down budget (a few steps, 10 items)."""

import importlib.util
import json
import os

import pytest

from conftest import ROOT
from minituner.experiment import compare


@pytest.mark.slow
def test_compare_writes_one_row_per_claim(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "compare"
    assert compare.main(["--out", str(out), "--scale", "0.005", "--eval-limit", "10"]) == 0
    text = (out / "comparison.md").read_text()
    for claim in "abcdefgh":
        assert f"| ({claim}) " in text
    results = json.loads((out / "results.json").read_text())
    assert set(results["scores"]) == {"base", "instruct-lora", "instruct-full", "finetune", "finetune-instruct"}
    lora, full = results["runs"]["instruct-lora"], results["runs"]["instruct-full"]
    assert lora["trainable_params"] < full["trainable_params"] / 5
    assert results["runs"]["overfit"]["restored_best"] in (True, False)
    assert (out / "loss_curves.png").is_file() == (importlib.util.find_spec("matplotlib") is not None)
