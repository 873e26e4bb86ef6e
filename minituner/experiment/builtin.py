"""The built-in experiment: what `python train_instruct.py` and `python train_finetune.py` do
with no arguments. It needs no download: the base model ships inside the package, and the data
is generated (minituner/experiment/synth.py) into the run folder, RUN/data/, where it can be read.

  instruct  LoRA instruction tuning of the shipped base on the synthetic task families; scored
            by exact match on held-out inputs and on held-out phrasings, before and after.
  finetune  full fine-tuning of the shipped base on the fictional-island corpus; scored by
            domain perplexity (held-out documents), cloze accuracy on facts in a wording no
            document uses for them, and general-text perplexity (forgetting), before and after.

The shipped base (BASE_MODEL) was pretrained by minituner itself on the general corpus; the
README gives the command that rebuilds it. Its general text was generated with seed 0;
GENERAL_EVAL_SEED gives different documents, held out from that pretraining.
"""

import argparse
import json
from pathlib import Path

from minituner.distributed import Runtime, all_gather_object
from minituner.errors import UserError, run_command
from minituner.experiment import domain, synth
from minituner.runfolder import BUILTIN_DATA_MARKER

BASE_MODEL = Path(__file__).parent / "base_model"
GENERAL_EVAL_SEED = 1000
GENERAL_EVAL_DOCS = 300
INSTRUCT_EXAMPLES = 4000  # training examples of the task families
# Options of the built-in runs, applied as the scripts' defaults (a flag given still wins).
INSTRUCT_OPTIONS = {"steps": 300, "batch_size": 16, "lr": 4e-3, "lora_rank": 8, "lora_alpha": 16.0,
                    "max_len": 128, "max_new_tokens": 32, "samples": 3, "warmup_steps": 20}
FINETUNE_OPTIONS = {"steps": 300, "batch_size": 8, "lr": 3e-3, "max_len": 256, "val_fraction": 0.1,
                    "max_new_tokens": 24, "samples": 3, "warmup_steps": 20, "eval_every": 50}


def check_base_model() -> Path:
    """The shipped base model's folder (an error naming it if the installation lacks it)."""
    if not (BASE_MODEL / "config.json").is_file():
        raise UserError(f"{BASE_MODEL}: the shipped base model is missing; reinstall minituner")
    return BASE_MODEL


def prepare(run_dir, make, *, seed: int, runtime: Runtime) -> dict[str, Path]:
    """The data files of a new built-in run, made by `make` (instruct_data or finetune_data) in
    RUN/data/ on rank 0; every rank gets their (absolute) paths. The run folder is this run's
    already (a dead attempt's data/ was cleared with it); a data/ folder there now is not the
    run's, and is never overwritten."""
    folder = Path(run_dir).resolve() / "data"
    if folder.exists():
        raise UserError(f"{folder} already exists; the built-in experiment writes its data there: "
                        "choose a new --out")
    all_gather_object(None, runtime)  # every rank has checked before rank 0 writes
    if runtime.is_main:  # the marker first: a run killed while writing leaves data/ known as its own
        folder.mkdir()
        (folder / BUILTIN_DATA_MARKER).write_text("written by minituner's built-in experiment\n", encoding="utf-8")
    paths = make(folder, seed=seed, write=runtime.is_main)
    all_gather_object(None, runtime)  # the other ranks wait until the files are written
    return paths


def instruct_data(folder, *, n_train: int = INSTRUCT_EXAMPLES, n_eval: int = 20, seed: int = 0,
                  write: bool = True) -> dict[str, Path]:
    """The task splits as `messages` JSONL files in `folder` (written if `write`): {"train",
    "validation", "heldout_inputs", "heldout_phrasings"} -> path."""
    folder = Path(folder)
    paths = {name: folder / f"{name}.jsonl" for name in ("train", "validation", "heldout_inputs", "heldout_phrasings")}
    if write:
        splits = synth.task_splits(n_train=n_train, n_eval=n_eval, seed=seed)
        for name, path in paths.items():
            write_jsonl(path, map(synth.as_messages, splits[name]))
    return paths


def finetune_data(folder, *, seed: int = 0, write: bool = True) -> dict[str, Path]:
    """The domain corpus, its cloze questions and held-out general text in `folder` (written if
    `write`): {"domain", "cloze", "general"} -> path."""
    folder = Path(folder)
    paths = {"domain": folder / "domain.txt", "cloze": folder / "cloze.jsonl", "general": folder / "general_eval.txt"}
    if write:
        facts = domain.domain_facts(seed=seed)
        write_documents(paths["domain"], domain.domain_corpus(facts, seed=seed))
        write_jsonl(paths["cloze"], domain.cloze_items(facts))
        write_documents(paths["general"], synth.general_corpus(GENERAL_EVAL_DOCS, seed=GENERAL_EVAL_SEED))
    return paths


# ----------------------------------------------------------------------------- files
def write_jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_documents(path: Path, docs: list[str]) -> Path:
    """Documents as a .txt file, one paragraph each (minituner/corpus.py reads them back)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- command line
def synth_command(argv=None) -> int:
    """Write a set to a new file, to read it or to pretrain on it:
    python -m minituner.synth general --docs 30000 --out general.txt"""
    p = argparse.ArgumentParser(prog="python -m minituner.synth", description=synth_command.__doc__.split("\n")[0])
    p.add_argument("set", choices=["general", "tasks", "domain"])
    p.add_argument("--docs", type=int, default=30000, help="documents of the general corpus")
    p.add_argument("--seed", type=int, default=0, help="seed of the generator")
    p.add_argument("--out", required=True, help="file to write (.txt for corpora, .jsonl for tasks); must not exist")
    args = p.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        raise UserError(f"--out {out} already exists; minituner writes only new files here")
    if args.set == "general":
        write_documents(out, synth.general_corpus(args.docs, args.seed))
    elif args.set == "domain":
        write_documents(out, domain.domain_corpus(domain.domain_facts(seed=args.seed), args.seed))
    else:
        write_jsonl(out, [synth.as_messages(item) for item in synth.task_splits(seed=args.seed)["train"]])
    print(f"wrote {out}")
    return 0


def synth_main(argv=None) -> int:
    """`python -m minituner.synth`."""
    return run_command(synth_command, argv)


