"""The public API at the package top, used as the README shows it: load a Hugging Face folder,
add LoRA, train on loss-masked examples, save the adapter and the merged model, generate."""

import torch

import minituner
from conftest import FIXTURES
from minituner.sft import build_examples

CONVERSATIONS = [[{"role": "user", "content": f"Say {n}."}, {"role": "assistant", "content": f"{n} {n}"}]
                 for n in range(16)]


def test_the_readme_example_trains_saves_and_reloads(tmp_path):
    model, tokenizer = minituner.load_pretrained(FIXTURES / "llama-tiny", device="cpu", dtype=torch.float32)
    minituner.apply_lora(model, rank=8, alpha=16)
    examples, stats = build_examples(CONVERSATIONS, tokenizer=tokenizer, template="chatml", max_len=64)
    assert stats["examples"] == 16 and all(minituner.IGNORE_INDEX in e["labels"] for e in examples)
    summary = minituner.train(model, examples, minituner.pad_collate,
                              options=minituner.TrainOptions(steps=4, batch_size=4, lr=3e-3),
                              runtime=minituner.Runtime(torch.device("cpu")), run_dir=tmp_path / "run",
                              progress=False)
    assert summary["status"] == "completed" and summary["steps"] == 4
    assert summary["trainable_params"] == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)

    minituner.save_adapter(model, tmp_path / "adapter")
    merged = minituner.merge_and_unload(model)
    minituner.save_pretrained(merged, tokenizer, tmp_path / "model")
    again, _ = minituner.load_pretrained(tmp_path / "model")
    base, _ = minituner.load_pretrained(FIXTURES / "llama-tiny")
    minituner.load_adapter(base, tmp_path / "adapter")
    ids = torch.tensor([tokenizer.encode("Say 3.")])
    with torch.no_grad():
        assert (again(ids) - merged.float()(ids)).abs().max() < 1e-5
        assert (base(ids) - again(ids)).abs().max() < 1e-5  # base + adapter == the merged model
    text = minituner.generate_text(again, tokenizer, ["Say 3."], max_new_tokens=4)
    assert isinstance(text, list) and len(text) == 1


def test_the_public_names_are_there():
    for name in ("load_pretrained", "save_pretrained", "load_adapter", "save_adapter", "apply_lora",
                 "merge_and_unload", "Transformer", "ModelConfig", "Tokenizer", "train", "TrainOptions",
                 "generate_text"):
        assert name in minituner.__all__ and hasattr(minituner, name)
