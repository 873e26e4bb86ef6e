"""minituner: instruction tuning and fine-tuning of pretrained language models, every mechanic
written out in plain PyTorch. The README's map gives the order in which to read the modules.

The public API (everything a script needs; each name documented where it is defined):

    model, tokenizer = minituner.load_pretrained("SmolLM2-135M")   # a Hugging Face folder
    minituner.apply_lora(model, rank=8, alpha=16)                    # or load_adapter(model, PEFT_DIR)
    summary = minituner.train(model, examples, collate, options=minituner.TrainOptions(steps=100),
                              runtime=minituner.Runtime(torch.device("cpu")), run_dir="runs/x")
    minituner.save_adapter(model, "adapter/")
    minituner.save_pretrained(minituner.merge_and_unload(model), tokenizer, "model/")
"""

__version__ = "0.1.0"  # before the imports below: minituner.runfolder reads it while they run

from minituner.batching import pack, pad_collate  # noqa: E402
from minituner.config import ModelConfig  # noqa: E402
from minituner.distributed import Runtime, init_runtime  # noqa: E402
from minituner.errors import UserError  # noqa: E402
from minituner.generate import generate_text  # noqa: E402
from minituner.hf.folder import load_pretrained, save_pretrained  # noqa: E402
from minituner.hf.peft import load_adapter, save_adapter  # noqa: E402
from minituner.hf.tokenizer import load_tokenizer, save_tokenizer  # noqa: E402
from minituner.lora import apply_lora, merge_and_unload  # noqa: E402
from minituner.loss import IGNORE_INDEX, lm_loss_sum  # noqa: E402
from minituner.model import Transformer  # noqa: E402
from minituner.tokenizer import Tokenizer  # noqa: E402
from minituner.trainer import TrainOptions, train  # noqa: E402

__all__ = ["IGNORE_INDEX", "ModelConfig", "Runtime", "TrainOptions", "Tokenizer", "Transformer", "UserError",
           "apply_lora", "generate_text", "init_runtime", "lm_loss_sum", "load_adapter",
           "load_pretrained", "load_tokenizer", "merge_and_unload", "pack", "pad_collate", "save_adapter",
           "save_pretrained", "save_tokenizer", "train"]
