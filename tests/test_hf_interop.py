"""What we save loads in Hugging Face transformers as the same model. Runs only where transformers
is installed (it is not a minituner dependency): pip install transformers && pytest tests/test_hf_interop.py"""

import pytest
import torch

from conftest import CHECKPOINTS, FIXTURES, reference
from minituner.checkpoint import load_pretrained, save_pretrained
from minituner.config import ModelConfig
from minituner.model import Transformer
from minituner.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "gpt2": "GPT2LMHeadModel"}


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_saved_folder_is_the_same_model_in_transformers(tmp_path, name):
    model, tokenizer = load_pretrained(FIXTURES / name)
    save_pretrained(model, tokenizer, tmp_path / "out")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(hf).__name__ == ARCHITECTURES[model.config.model_type]
    ids = reference(name)["input_ids"]
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max() < 1e-5
    if model.config.model_type == "qwen2":
        return  # transformers 5 swaps in Qwen2Tokenizer's own pre-tokenizer for qwen2 folders; ours is GPT-2's
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    text = "Hello <|im_start|>world, 123!"
    assert hf_tok(text)["input_ids"] == tokenizer.encode(text)


def test_from_scratch_folder_works_in_transformers(tmp_path, shakespeare):
    tokenizer = Tokenizer.train_bpe([shakespeare], vocab_size=300)
    config = ModelConfig(vocab_size=300, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, tie_embeddings=True)
    model = Transformer(config).eval()
    save_pretrained(model, tokenizer, tmp_path / "scratch")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "scratch").eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "scratch")
    ids = hf_tok(shakespeare[:200], return_tensors="pt")["input_ids"]
    assert ids[0].tolist() == tokenizer.encode(shakespeare[:200])
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max() < 1e-5
    assert hf_tok.eos_token == "<|endoftext|>"


@pytest.mark.parametrize("name", [n for n in CHECKPOINTS if not n.startswith("gpt2")])
def test_rope_frequencies_are_bitwise_those_of_transformers(name):
    """Equal to the last bit, so angles at 100k-token positions match too."""
    model, _ = load_pretrained(FIXTURES / name)
    hf = transformers.AutoModelForCausalLM.from_pretrained(FIXTURES / name)
    assert torch.equal(model.inv_freq, hf.model.rotary_emb.inv_freq)
    assert model.rope_scale == pytest.approx(hf.model.rotary_emb.attention_scaling, rel=1e-12)


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_bfloat16_logits_round_like_transformers(name):
    """Same casts in the same places: bf16 logits agree to within one bf16 rounding step."""
    model, _ = load_pretrained(FIXTURES / name, dtype=torch.bfloat16)
    hf = transformers.AutoModelForCausalLM.from_pretrained(FIXTURES / name, dtype=torch.bfloat16).eval()
    ids = reference(name)["input_ids"]
    with torch.no_grad():
        assert (model(ids).float() - hf(ids).logits.float()).abs().max() < 1e-2
