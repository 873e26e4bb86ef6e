"""Shared test helpers: the tiny Hugging Face checkpoints in tests/fixtures/ and their references.

llama-tiny and gpt2-tiny come from the project's shared fixtures; the other folders were built by
tests/fixtures/make_references.py with transformers 5.x. Every reference.safetensors holds what
transformers computed in float32 for the same weights.
"""

from pathlib import Path

import pytest
from safetensors.torch import load_file
from tokenizers import Tokenizer as Backend
from tokenizers import processors

from minituner import trainer
from minituner.tokenizer import Tokenizer

FIXTURES = Path(__file__).parent / "fixtures"
DATA = Path(__file__).parent / "data"
CHECKPOINTS = sorted(p.name for p in FIXTURES.iterdir() if (p / "config.json").is_file() and (p / "reference.safetensors").is_file())


def reference(name: str) -> dict:
    return load_file(FIXTURES / name / "reference.safetensors")


@pytest.fixture(scope="session")
def shakespeare() -> str:
    return (DATA / "tinyshakespeare_head.txt").read_text(encoding="utf-8")


# The special tokens of the chat tokenizers below: eos, ChatML's and Llama 3's.
CHAT_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>",
                       "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


@pytest.fixture(scope="session")
def chat_tokenizer(shakespeare):
    """A throwaway byte-level BPE that knows every template's special tokens; no BOS."""
    return Tokenizer.train_bpe([shakespeare], vocab_size=400, special_tokens=CHAT_SPECIAL_TOKENS)


@pytest.fixture(scope="session")
def bos_tokenizer(chat_tokenizer):
    """chat_tokenizer whose encode() puts <|begin_of_text|> first, as Llama 3's does."""
    backend = Backend.from_str(chat_tokenizer.backend.to_str())
    bos = backend.token_to_id("<|begin_of_text|>")
    backend.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                           special_tokens=[("<|begin_of_text|>", bos)])
    return Tokenizer(backend, bos_id=bos, eos_id=chat_tokenizer.eos_id, pad_id=chat_tokenizer.pad_id)


class StopAfterTwoSteps(trainer.StopRequest):
    """Patched over trainer.StopRequest: a SIGTERM arriving during the second step (the loop
    checks `requested` once per step), without the timing of a real signal."""

    def __init__(self):
        super().__init__()
        self.checks = 0

    @property
    def requested(self):
        self.checks += 1
        return self.checks >= 2

    @requested.setter
    def requested(self, value):
        pass
