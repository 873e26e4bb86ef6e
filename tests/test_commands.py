"""Every command a user types starts: `python -m minituner.<command> --help` exits 0 and prints
nothing on stderr (no warning of a module imported twice, no traceback)."""

import subprocess
import sys

import pytest

from conftest import ROOT

COMMANDS = ["minituner.generate", "minituner.bench", "minituner.compare", "minituner.synth"]  # the recipes: below


@pytest.mark.slow
@pytest.mark.parametrize("module", COMMANDS)
def test_each_command_starts_cleanly(module):
    done = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stderr == "" and "usage:" in done.stdout, done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("script", ["train_instruct.py", "train_finetune.py"])
def test_each_script_starts_cleanly(script):
    done = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stderr == "" and "--resume" in done.stdout, done.stderr
