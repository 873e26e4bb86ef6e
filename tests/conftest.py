"""Shared test helpers: the tiny Hugging Face checkpoints in tests/fixtures/ and their references.

llama-tiny and gpt2-tiny come from the project's shared fixtures; the other folders were built by
tests/fixtures/make_references.py with transformers 5.x. Every reference.safetensors holds what
transformers computed in float32 for the same weights.
"""

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer as Backend
from tokenizers import models, normalizers, pre_tokenizers, processors, trainers

from minituner import trainer
from minituner.hf.folder import load_pretrained
from minituner.lora import DEFAULT_TARGETS, apply_lora, lora_modules
from minituner.tokenizer import Tokenizer

ROOT = Path(__file__).parent.parent  # the repository: train_instruct.py, train_finetune.py, minituner/
FIXTURES = Path(__file__).parent / "fixtures"
DATA = Path(__file__).parent / "data"
GQA_CHECKPOINTS = ["llama31-tiny", "mistral-tiny", "qwen2-tiny", "smollm-tiny"]  # fewer key/value heads than query heads
CHECKPOINTS = sorted(p.name for p in FIXTURES.iterdir() if (p / "config.json").is_file() and (p / "reference.safetensors").is_file())


def snapshot(folder: Path) -> dict:
    """Every file under `folder` by relative path, with its bytes: what must not change."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def max_diff(a: dict, b: dict) -> float:
    """The largest difference between two state dicts with the same names."""
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def reference(name: str) -> dict:
    return load_file(FIXTURES / name / "reference.safetensors")


@pytest.fixture
def data(tmp_path) -> str:
    """The recipe tests' instruction file: a small, repetitive Alpaca file that a tiny model
    learns in a few steps."""
    records = [{"instruction": f"Say the number {n % 4}.", "input": "", "output": f"{n % 4} {n % 4} {n % 4}"}
               for n in range(24)]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    return str(path)


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


# Chat templates shaped like those Instruct models ship (tests/fixtures/chat_templates/), with the
# special tokens each names as bos and eos, and the token that ends an assistant turn.
CHAT_TEMPLATES = {
    "chatml-tools": {"bos": None, "eos": "<|im_end|>", "end": "<|im_end|>"},  # Qwen2.5-like: default system, tools
    "llama3-dated": {"bos": "<|begin_of_text|>", "eos": "<|eot_id|>", "end": "<|eot_id|>"},  # Llama 3.2-like
    "mistral-inst": {"bos": "<s>", "eos": "</s>", "end": "</s>"},  # Mistral Instruct-like [INST]
    "chatml-generation": {"bos": None, "eos": "<|endoftext|>", "end": "<|im_end|>"},  # {% generation %} markers
    "turns-no-system": {"bos": "<bos>", "eos": "<eos>", "end": "<end_of_turn>"},  # Gemma-like: refuses a system role
    "chatml-reasoning": {"bos": None, "eos": "<|im_end|>", "end": "<|im_end|>"},  # drops past turns' reasoning
    "answer-after-space": {"bos": None, "eos": "<|endoftext|>", "end": "<|endoftext|>"},  # "Answer: " + reply
}
TEMPLATE_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
                           "<|end_header_id|>", "<|eot_id|>", "<s>", "</s>", "<bos>", "<eos>", "<start_of_turn>",
                           "<end_of_turn>")


@pytest.fixture(scope="session")
def template_tokenizer(shakespeare):
    """A throwaway byte-level BPE with the special tokens of every template in CHAT_TEMPLATES."""
    return Tokenizer.train_bpe([shakespeare], vocab_size=420, special_tokens=TEMPLATE_SPECIAL_TOKENS)


def chat_folder(folder: Path, name: str, tokenizer: Tokenizer, in_config: bool = False) -> Path:
    """A tokenizer folder (tokenizer.json, tokenizer_config.json) with chat template `name` as
    chat_template.jinja, or in_config, as tokenizer_config.json's "chat_template"."""
    from minituner.hf.tokenizer import save_tokenizer
    case, text = CHAT_TEMPLATES[name], (FIXTURES / "chat_templates" / f"{name}.jinja").read_text()
    ids = {role: tokenizer.token_to_id(case[role]) if case[role] else None for role in ("bos", "eos")}
    config = {"chat_template": text} if in_config else {}
    tokenizer = Tokenizer(tokenizer.backend, bos_id=ids["bos"], eos_id=ids["eos"], pad_id=ids["eos"],
                          tokenizer_config=config, chat_template_file=None if in_config else text)
    folder.mkdir(parents=True, exist_ok=True)
    save_tokenizer(tokenizer, folder)
    return folder


def stop_request_after(n: int, kill: bool = False) -> type:
    """A class to patch over trainer.StopRequest: a SIGTERM arriving during step n (the loop
    checks `requested` once per step), without the timing of a real signal; with kill, a SIGKILL
    the process sends itself there instead (before any checkpoint of that step)."""

    class StopAfter(trainer.StopRequest):
        def __init__(self):
            super().__init__()
            self.checks = 0

        @property
        def requested(self):
            self.checks += 1
            if kill and self.checks >= n:
                os.kill(os.getpid(), signal.SIGKILL)
            return self.checks >= n

        @requested.setter
        def requested(self, value):
            pass

    return StopAfter


StopAfterTwoSteps = stop_request_after(2)


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


# ----------------------------------------------------------------------------- LoRA
def targets_for(name: str) -> tuple:
    return ("c_attn", "c_proj", "c_fc") if name.startswith("gpt2") else DEFAULT_TARGETS


def randomize(model, seed: int = 0) -> None:
    """Non-zero B everywhere, so that the adapters change the output and every test is sensitive."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)


def adapted(name: str, **options):
    model, _ = load_pretrained(FIXTURES / name)
    apply_lora(model, targets=targets_for(name), **options)
    randomize(model)
    return model


def logits(model, name: str) -> torch.Tensor:
    with torch.no_grad():
        return model(reference(name)["input_ids"])


def deltas(model) -> dict:
    return {name: m.delta_weight() for name, m in lora_modules(model).items()}


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` need a GPU: skipped without one (pytest -m cuda runs only them)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)
