"""minituner: instruction tuning and fine-tuning of pretrained language models, every mechanic
written out in plain PyTorch. The README's map gives the order in which to read the modules.

The public API (each name documented where it is defined):

    model, tokenizer = minituner.load_pretrained("SmolLM2-135M")   # a Hugging Face folder
    minituner.apply_lora(model, rank=8, alpha=16)                    # or load_adapter(model, PEFT_DIR)
    summary = minituner.train(model, examples, minituner.pad_collate, options=minituner.TrainOptions(steps=100),
                              runtime=minituner.Runtime(torch.device("cpu")), run_dir="runs/x")
    minituner.save_adapter(model, "adapter/")
    minituner.save_pretrained(minituner.merge_and_unload(model), tokenizer, "model/")

The names are imported when first used, so that `import minituner.<module>` (and
`python -m minituner.generate`) loads only what that module needs.
"""

import importlib

__version__ = "0.1.0"

_PUBLIC = {  # name: the module that defines it
    "IGNORE_INDEX": "loss", "lm_loss_sum": "loss", "forward_loss": "step", "ModelConfig": "config",
    "Transformer": "model", "Tokenizer": "tokenizer", "apply_lora": "lora", "merge_and_unload": "lora",
    "pack": "batching", "pad_collate": "batching", "flat_collate": "batching", "TrainOptions": "trainer", "train": "trainer",
    "Runtime": "distributed", "init_runtime": "distributed", "generate_text": "generate", "UserError": "errors",
    "load_pretrained": "hf.folder", "save_pretrained": "hf.folder", "load_adapter": "hf.peft",
    "save_adapter": "hf.peft", "load_tokenizer": "hf.tokenizer", "save_tokenizer": "hf.tokenizer",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'minituner' has no attribute {name!r}")
    return getattr(importlib.import_module(f"minituner.{_PUBLIC[name]}"), name)


def __dir__():
    return sorted([*globals(), *_PUBLIC])
