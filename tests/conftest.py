"""Shared test helpers: the tiny Hugging Face checkpoints in tests/fixtures/ and their references.

llama-tiny and gpt2-tiny come from the project's shared fixtures; the other folders were built by
tests/fixtures/make_references.py with transformers 5.x. Every reference.safetensors holds what
transformers computed in float32 for the same weights.
"""

from pathlib import Path

import pytest
from safetensors.torch import load_file

FIXTURES = Path(__file__).parent / "fixtures"
DATA = Path(__file__).parent / "data"
CHECKPOINTS = sorted(p.name for p in FIXTURES.iterdir() if (p / "config.json").is_file() and (p / "reference.safetensors").is_file())


def reference(name: str) -> dict:
    return load_file(FIXTURES / name / "reference.safetensors")


@pytest.fixture(scope="session")
def shakespeare() -> str:
    return (DATA / "tinyshakespeare_head.txt").read_text(encoding="utf-8")
