"""What a finished run leaves for the wider ecosystem: its trained weights as a Hugging Face
model folder (RUN/model/) and, for a LoRA run, the adapter as a PEFT folder (RUN/adapter/).

The weights come from the run's final checkpoint, where they are float32, not from the model
the loop trained: that one is in the compute dtype (bf16 would round every weight). Frozen
weights are not in a checkpoint, so they come from `model`, which the caller builds afresh in
float32 the way the run built it before training (the base folder, or a from-scratch init).
A LoRA model is saved twice: the adapter alone, and merged into the base as an ordinary model.
RUN/model/ and RUN/adapter/ are replaced only when they are this run's own earlier export (a
resumed run that had finished exports again); run.json records each export before it is
renamed into place (minituner/runfolder.py).
"""

import errno
from pathlib import Path

import torch

from minituner.atomic import staged_folder
from minituner.checkpoint import final_checkpoint, load_checkpoint
from minituner.errors import UserError
from minituner.hf.folder import save_pretrained
from minituner.hf.peft import save_adapter
from minituner.lora import merge_and_unload
from minituner.model import Transformer
from minituner.runfolder import check_export_target, folder_fingerprint, record_export
from minituner.tokenizer import Tokenizer


def export_run(run_dir, summary: dict, model: Transformer, tokenizer: Tokenizer, *, lora: bool,
               base_name: str | None = None) -> list[Path]:
    """Load the run's final trained weights into `model` (float32, on the CPU, LoRA applied as
    in training) and write RUN/model/ (and RUN/adapter/). Returns the folders written."""
    run_dir = Path(run_dir)
    for name in ("adapter", "model") if lora else ("model",):
        check_export_target(run_dir, name)
    path = final_checkpoint(run_dir, summary)
    weights = load_checkpoint(path)["weights"]
    params = dict(model.named_parameters())
    unknown = sorted(set(weights) - set(params))
    if unknown:
        raise UserError(f"{path}: holds weights the model does not have (e.g. {unknown[0]}); "
                        "it was trained with another model or method")
    with torch.no_grad():
        for name, t in weights.items():
            params[name].copy_(t)
    written = []
    try:
        if lora:
            written.append(_export(run_dir, "adapter", lambda folder: save_adapter(model, folder, base_model=base_name)))
            model = merge_and_unload(model)
        written.append(_export(run_dir, "model", lambda folder: save_pretrained(model, tokenizer, folder)))
    except OSError as e:  # a full disk: the checkpoint the export is made from is intact
        reason = "the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else (e.strerror or str(e))
        raise UserError(f"could not export into {run_dir} ({reason}); the run's checkpoint {path} is intact: "
                        f"free some space, then --resume {run_dir} to export again") from None
    return written


def _export(run_dir: Path, name: str, write) -> Path:
    """RUN/<name> written by write(folder) into a staged folder, recorded as the run's before it
    is renamed into place."""
    target = run_dir / name
    with staged_folder(target) as tmp:
        write(tmp)
        record_export(run_dir, name, folder_fingerprint(tmp), landed=False)
    record_export(run_dir, name, folder_fingerprint(target), landed=True)
    return target
