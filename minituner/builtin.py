"""The built-in experiment: what `python train_instruct.py` and `python train_finetune.py` do
with no arguments. It needs no download: the base model ships inside the package, and the data
is generated (minituner/synth.py) into the run folder, RUN/data/, where it can be read.

  instruct  LoRA instruction tuning of the shipped base on the synthetic task families; scored
            by exact match on held-out inputs and on held-out phrasings, before and after.
  finetune  full fine-tuning of the shipped base on the fictional-island corpus; scored by
            domain perplexity (held-out documents), cloze accuracy on facts in a wording no
            document uses for them, and general-text perplexity (forgetting), before and after.

The shipped base (BASE_MODEL) was pretrained by minituner itself on the general corpus; the
README gives the command that rebuilds it. Its general text was generated with seed 0;
GENERAL_EVAL_SEED gives different documents, held out from that pretraining.
"""

from pathlib import Path

from minituner import synth
from minituner.errors import UserError

BASE_MODEL = Path(__file__).parent / "base_model"
GENERAL_EVAL_SEED = 1000
GENERAL_EVAL_DOCS = 300
INSTRUCT_EXAMPLES = 4000  # training examples of the task families
# Options of the built-in runs, applied as the scripts' defaults (a flag given still wins).
INSTRUCT_OPTIONS = {"steps": 300, "batch_size": 16, "lr": 2e-3, "lora_rank": 8, "lora_alpha": 16.0,
                    "max_len": 128, "max_new_tokens": 32, "samples": 3, "warmup_steps": 20}
FINETUNE_OPTIONS = {"steps": 300, "batch_size": 8, "lr": 1e-3, "max_len": 256, "val_fraction": 0.1,
                    "max_new_tokens": 24, "samples": 3, "warmup_steps": 20, "eval_every": 50}


def check_base_model() -> Path:
    """The shipped base model's folder (an error naming it if the installation lacks it)."""
    if not (BASE_MODEL / "config.json").is_file():
        raise UserError(f"{BASE_MODEL}: the shipped base model is missing; reinstall minituner")
    return BASE_MODEL


def instruct_data(folder, n_train: int = INSTRUCT_EXAMPLES, n_eval: int = 20, seed: int = 0) -> dict[str, Path]:
    """Write the task splits as `messages` JSONL into `folder`: {"train", "heldout_inputs",
    "heldout_phrasings"} -> path."""
    splits = synth.task_splits(n_train=n_train, n_eval=n_eval, seed=seed)
    return {name: synth.write_jsonl(Path(folder) / f"{name}.jsonl", map(synth.as_messages, items))
            for name, items in splits.items()}


def finetune_data(folder, seed: int = 0) -> dict[str, Path]:
    """Write the domain corpus, its cloze questions and held-out general text into `folder`:
    {"domain", "cloze", "general"} -> path."""
    facts = synth.domain_facts(seed=seed)
    folder = Path(folder)
    return {"domain": synth.write_documents(folder / "domain.txt", synth.domain_corpus(facts, seed=seed)),
            "cloze": synth.write_jsonl(folder / "cloze.jsonl", synth.cloze_items(facts)),
            "general": synth.write_documents(folder / "general_eval.txt",
                                             synth.general_corpus(GENERAL_EVAL_DOCS, seed=GENERAL_EVAL_SEED))}
