"""What we save loads in Hugging Face transformers as the same model, and our LoRA adapters in PEFT.
Runs only where transformers (and, for the adapter tests, peft) is installed; neither is a minituner
dependency, but the dev extra installs both, so the suite runs these (pytest tests/hf/test_hf_interop.py)."""

import pytest
import torch

from conftest import CHECKPOINTS, FIXTURES, reference, sentencepiece_like
from minituner.config import ModelConfig
from minituner.hf.folder import load_pretrained, save_pretrained
from minituner.hf.peft import load_adapter, save_adapter
from minituner.hf.tokenizer import load_tokenizer, save_tokenizer, set_chat_format
from minituner.lora import apply_lora, lora_modules, merge_and_unload
from minituner.model import Transformer
from minituner.sft import tokenize_segments
from minituner.templates import EOS, TEMPLATES, chat_template, default_template, generation_prompt, render, stop_ids
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


# ----------------------------------------------------------------------------- LoRA adapters and PEFT
# Per family: the usual targets, and rank/alpha patterns in that family's module names.
LORA = {"llama-tiny": dict(targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                           ranks={"down_proj": 2}, alphas={"v_proj": 3}),
        "gpt2-tiny": dict(targets=("c_attn", "c_proj", "c_fc"), ranks={"c_fc": 2}, alphas={"c_attn": 3})}


def _adapted(name: str, patterns: bool, **options):
    """A fixture model with LoRA whose B is non-zero, so that the adapter changes the logits."""
    model, tokenizer = load_pretrained(FIXTURES / name)
    family = LORA[name] if patterns else {"targets": LORA[name]["targets"]}
    apply_lora(model, **family, **options)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)
    return model.eval(), tokenizer


@pytest.mark.parametrize("name", list(LORA))
@pytest.mark.parametrize("patterns, options", [(False, {}), (True, {"rslora": True, "rank": 3, "alpha": 5})])
def test_peft_loads_our_adapter_as_the_same_model(tmp_path, name, patterns, options):
    peft = pytest.importorskip("peft")
    model, _ = _adapted(name, patterns, **options)
    save_adapter(model, tmp_path / "adapter", base_model=str(FIXTURES / name))
    ids = reference(name)["input_ids"]
    base = transformers.AutoModelForCausalLM.from_pretrained(FIXTURES / name).eval()
    with torch.no_grad():
        base_logits = base(ids).logits
        hf = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
        ours, theirs = model(ids), hf(ids).logits
    assert (ours - base_logits).abs().max() > 1e-2  # the adapter matters
    assert (theirs - ours).abs().max() < 1e-5


@pytest.mark.parametrize("name", list(LORA))
def test_we_load_an_adapter_peft_trained_as_the_same_model(tmp_path, name):
    peft = pytest.importorskip("peft")
    rank_pattern = {"c_attn": 6} if name.startswith("gpt2") else {"down_proj": 2}  # c_attn: one LoRA over q, k, v
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(LORA[name]["targets"]), use_rslora=True,
                             rank_pattern=rank_pattern, alpha_pattern={k: 3 for k in rank_pattern},
                             init_lora_weights=False,  # random B: the adapter changes the output
                             fan_in_fan_out=name.startswith("gpt2"))
    torch.manual_seed(0)
    hf = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(FIXTURES / name), config).eval()
    hf.save_pretrained(tmp_path / "adapter")
    model, _ = load_pretrained(FIXTURES / name)
    load_adapter(model, tmp_path / "adapter")
    ids = reference(name)["input_ids"]
    with torch.no_grad():
        assert (model.eval()(ids) - hf(ids).logits).abs().max() < 1e-5


@pytest.mark.parametrize("name", list(LORA))
def test_transformers_loads_our_merged_model(tmp_path, name):
    model, tokenizer = _adapted(name, patterns=False)
    ids = reference(name)["input_ids"]
    with torch.no_grad():
        expected = model(ids)
    save_pretrained(merge_and_unload(model), tokenizer, tmp_path / "merged")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert (hf(ids).logits - expected).abs().max() < 1e-5


@pytest.mark.parametrize("system", [False, True])
@pytest.mark.parametrize("kind", ["byte-level", "byte-level+bos", "prepend", "first", "always"])
@pytest.mark.parametrize("template", TEMPLATES)
def test_exported_chat_template_writes_what_was_trained(tmp_path, chat_tokenizer, bos_tokenizer, shakespeare,
                                                         template, kind, system):
    """apply_chat_template of the folder we export renders exactly our training text and ids, and
    generation stops on the template's end token: for byte-level BPE (with and without BOS) and
    SentencePiece-style tokenizers (a "▁" before text: Llama 2's Prepend, Metaspace first/always)."""
    tokenizer = {"byte-level": chat_tokenizer, "byte-level+bos": bos_tokenizer}.get(kind)
    tokenizer = tokenizer or sentencepiece_like(shakespeare, kind)
    tokenizer = Tokenizer(tokenizer.backend, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    set_chat_format(tokenizer, chat_template(template, bos=bool(tokenizer.prefix_ids)), stop_ids(template, tokenizer))
    save_tokenizer(tokenizer, tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    eos = tokenizer.id_to_token(tokenizer.eos_id)
    prefix = tokenizer.decode(tokenizer.prefix_ids, skip_special_tokens=False)
    # words the tokenizer has merged with their leading space ("Ġthe"): a space split off by the
    # template's scaffolding would show as different token ids
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "the king"},
                {"role": "assistant", "content": "the lord"}, {"role": "user", "content": "and the king?"},
                {"role": "assistant", "content": "and the lord."}][0 if system else 1:]
    ours = "".join(eos if s.kind == EOS else s.text for s in render(messages, template))
    assert hf.apply_chat_template(messages, tokenize=False) == prefix + ours
    prompt = "".join(eos if s.kind == EOS else s.text for s in generation_prompt(messages, template))
    assert hf.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True) == prefix + prompt
    ids = hf.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert ids == tokenize_segments(render(messages, template), tokenizer)[0]  # the same token ids, not only text
    assert default_template(load_tokenizer(tmp_path)) == template  # and a later run recognises the format
    config = transformers.GenerationConfig.from_pretrained(tmp_path)
    ends = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    assert set(ends) == set(stop_ids(template, tokenizer))
