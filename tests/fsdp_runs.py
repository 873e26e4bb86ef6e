"""Several runs in one torchrun launch, for tests/recipes/test_fsdp.py: starting the processes
costs more than the tiny runs themselves.

    torchrun --standalone --nproc_per_node 2 tests/fsdp_runs.py JOBS.json

JOBS.json is a list of {"script": "finetune" | "instruct" | "bench", "argv": [...]}, optionally
with "stop_after": N (the run stops after step N as a SIGTERM would make it, checkpointed),
"kill_after": N (every process kills itself with SIGKILL after step N, before any checkpoint of
that step: the launch ends there), "fused": true (the loss fused with the output layer whatever
the vocabulary, as real models' is), "full_disk_on_rank": R (rank R's disk is full when it
writes its slices of a checkpoint; "expect": the exit status, then 2) and "stdout": PATH (where
rank 0's output goes; rank R's to PATH.rankR). The process group stays up from one run to the next (the scripts' shutdown is
skipped). Exits 1 if a run returned other than expected (0, or 130 for a stopped one).
"""

import contextlib
import errno
import json
import os
import sys
from pathlib import Path

import torch.distributed as dist
from torch.distributed.checkpoint import filesystem

from conftest import stop_request_after
from minituner import bench, step, trainer
from minituner.recipes import finetune, instruct

SCRIPTS = {"finetune": finetune, "instruct": instruct, "bench": bench}


def main() -> int:
    jobs = json.loads(Path(sys.argv[1]).read_text())
    finetune.shutdown = instruct.shutdown = bench.shutdown = lambda runtime: None  # one process group for every run
    failed = 0
    for job in jobs:
        trainer.StopRequest = (stop_request_after(job["stop_after"]) if "stop_after" in job else
                               stop_request_after(job["kill_after"], kill=True) if "kill_after" in job else StopRequest)
        step.FUSED_MIN_VOCAB = 0 if job.get("fused") else FUSED_MIN_VOCAB
        filesystem._write_item = full_disk if job.get("full_disk_on_rank") == int(os.environ["RANK"]) else WRITE_ITEM
        rank = os.environ["RANK"]
        out = open(job["stdout"] + ("" if rank == "0" else f".rank{rank}"), "w") if "stdout" in job else None
        with contextlib.redirect_stdout(out) if out else contextlib.nullcontext():
            code = SCRIPTS[job["script"]].main(job["argv"])
        if out:
            out.close()
        failed += code != job.get("expect", 130 if "stop_after" in job else 0)
    dist.destroy_process_group()
    return 1 if failed else 0


def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


StopRequest, FUSED_MIN_VOCAB, WRITE_ITEM = trainer.StopRequest, step.FUSED_MIN_VOCAB, filesystem._write_item

if __name__ == "__main__":
    sys.exit(main())
