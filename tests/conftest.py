"""Shared test helpers: the tiny Hugging Face checkpoints in tests/fixtures/ and their references.

llama-tiny and gpt2-tiny come from the project's shared fixtures; the other folders were built by
tests/fixtures/make_references.py with transformers 5.x. Every reference.safetensors holds what
transformers computed in float32 for the same weights.
"""

from pathlib import Path

import pytest
from safetensors.torch import load_file
from tokenizers import Tokenizer as Backend
from tokenizers import models, normalizers, pre_tokenizers, processors, trainers

from minituner import trainer
from minituner.tokenizer import Tokenizer

ROOT = Path(__file__).parent.parent  # the repository: train_instruct.py, train_finetune.py, minituner/
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


SP_SPECIALS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def sentencepiece_like(shakespeare: str, style: str) -> Tokenizer:
    """A BPE that writes spaces as "▁" and puts one before a text, as Llama 2 (a Prepend("▁")
    normalizer) or Mistral/Llama converted later (Metaspace, prepend_scheme first or always) do;
    and a Llama-style post-processor adding <s>."""
    backend = Backend(models.BPE())
    if style == "prepend":
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        backend.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    else:
        backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme=style)
    # learned without newlines, "\n" stays a token of its own, as SentencePiece's byte token <0x0A> does
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SP_SPECIALS, initial_alphabet=["\n"],
                                  show_progress=False)
    backend.train_from_iterator([shakespeare.replace("\n", " ")], trainer)
    bos = backend.token_to_id("<s>")
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    return Tokenizer(backend, bos_id=bos, eos_id=backend.token_to_id("</s>"), pad_id=backend.token_to_id("</s>"))
