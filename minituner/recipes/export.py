"""What a finished run leaves for the wider ecosystem: its trained weights as a Hugging Face
model folder (RUN/model/) and, for a LoRA run, the adapter as a PEFT folder (RUN/adapter/).

The weights come from the run's final checkpoint, where they are float32, not from the model
the loop trained: that one is in the compute dtype (bf16 would round every weight). Frozen
weights are not in a checkpoint, so they come from `model`, which the caller builds afresh in
float32 the way the run built it before training (the base folder, or a from-scratch init).
What is written is --export's choice: `merged` (RUN/model/, the adapter merged into the base for
a LoRA run), `adapter` (RUN/adapter/ alone, LoRA only), `both` (the LoRA default) or `none` (the
run folder's checkpoint only; `--resume RUN --export ...` writes them later). RUN/model/ is
written in --save-dtype, by default the dtype the base folder keeps its weights in (a bfloat16
base gives a bfloat16 model, half the bytes of float32), after merging in float32; the adapter
stays float32, as PEFT keeps it. RUN/model/ and RUN/adapter/ are replaced only when they are this
run's own earlier export (a resumed run that had finished exports again); run.json records each
export before it is renamed into place (minituner/runfolder.py).
"""

import errno
import time
from pathlib import Path

import torch

from minituner.atomic import staged_folder
from minituner.checkpoint import final_checkpoint, load_weights_into
from minituner.errors import UserError
from minituner.hf.folder import save_pretrained
from minituner.hf.peft import save_adapter
from minituner.lora import merge_and_unload
from minituner.model import Transformer
from minituner.runfolder import check_export_target, folder_fingerprint, record_export
from minituner.tokenizer import Tokenizer

EXPORTS = ("merged", "adapter", "both", "none")
SAVE_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export_folders(export: str, lora: bool) -> tuple[str, ...]:
    """The run folder's subfolders that an --export choice writes (a UserError for an adapter of a
    full fine-tune, which has none)."""
    if not lora and export in ("adapter", "both"):
        raise UserError(f"--export {export}: a full fine-tune has no adapter; use --export merged (or none)")
    return {"merged": ("model",), "adapter": ("adapter",), "both": ("adapter", "model"), "none": ()}[export]


def export_run(run_dir, summary: dict, model: Transformer, tokenizer: Tokenizer, *, lora: bool,
               base_name: str | None = None, export: str | None = None,
               dtype: torch.dtype = torch.float32) -> list[tuple[Path, int, float]]:
    """Load the run's final trained weights into `model` (float32, on the CPU, LoRA applied as
    in training) and write what `export` asks for (default: both for LoRA, merged otherwise),
    RUN/model/ in `dtype`. Returns (folder, bytes, seconds) of each folder written."""
    run_dir = Path(run_dir)
    names = export_folders(export or ("both" if lora else "merged"), lora)
    for name in names:
        check_export_target(run_dir, name)
    if not names:
        return []
    path = load_final_weights(run_dir, summary, model)
    written = []
    try:
        if "adapter" in names:
            written.append(_export(run_dir, "adapter", lambda folder: save_adapter(model, folder, base_model=base_name)))
        if "model" in names:
            model = merge_and_unload(model) if lora else model  # in float32, rounded once below
            written.append(_export(run_dir, "model", lambda folder: save_pretrained(_cast(model, dtype), tokenizer,
                                                                                     folder)))
    except OSError as e:  # a full disk: the checkpoint the export is made from is intact
        reason = "the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else (e.strerror or str(e))
        raise UserError(f"could not export into {run_dir} ({reason}); the run's checkpoint {path} is intact: "
                        f"free some space, then --resume {run_dir} to export again") from None
    return written


def load_final_weights(run_dir, summary: dict, model: Transformer) -> Path:
    """Load the trained float32 weights a finished run ended with (its final checkpoint, whole,
    whether sharded or not) into `model`, built as the run built it before training; return
    that checkpoint's path. Read by this process alone, into the model's own parameters."""
    path = final_checkpoint(run_dir, summary)
    load_weights_into(path, dict(model.named_parameters()))
    return path


def _cast(model: Transformer, dtype: torch.dtype) -> Transformer:
    """`model` in `dtype`; a weight that float16 cannot hold (past +-65,504) is refused, not saved as inf."""
    if dtype == torch.float32:
        return model
    for name, p in model.named_parameters():
        if torch.isinf(p.detach().to(dtype)).any() and torch.isfinite(p).all():
            raise UserError(f"--save-dtype {str(dtype).removeprefix('torch.')}: {name} has values it cannot hold "
                            f"(largest {p.detach().abs().max().item():.4g}); --resume the run with --save-dtype "
                            "bfloat16 or float32 to export it")
    return model.to(dtype)


def _export(run_dir: Path, name: str, write) -> tuple[Path, int, float]:
    """RUN/<name> written by write(folder) into a staged folder, recorded as the run's before it
    is renamed into place; with its size in bytes and the seconds it took."""
    start, target = time.perf_counter(), run_dir / name
    with staged_folder(target) as tmp:
        write(tmp)
        record_export(run_dir, name, folder_fingerprint(tmp), landed=False)
    record_export(run_dir, name, folder_fingerprint(target), landed=True)
    size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
    return target, size, time.perf_counter() - start
