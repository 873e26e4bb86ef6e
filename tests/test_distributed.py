"""Where a run executes, checked on CPU by standing in for what only a GPU or torchrun has:
the process group's timeout, the current CUDA device, the dtype an old GPU can compute in, and
the peak-memory counters."""

import json
from datetime import timedelta

import pytest
import torch

import toy_train
from minituner import distributed
from minituner.distributed import init_runtime, peak_reserved_mib, use_device
from minituner.errors import OptionError
from minituner.generate import resolve_dtype
from minituner.precision import auto_dtype
from minituner.recipes.flags import resolve_precision
from minituner.sharding import check_fsdp


@pytest.fixture
def torchrun_env(monkeypatch):
    """The environment torchrun gives rank 0 of 2, and a process group that only records its options."""
    for key, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)
    started = []
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda *a, **kw: started.append(kw))
    return started


def test_the_process_group_waits_an_hour_by_default_or_as_told(torchrun_env):
    """Rank 0 generates, scores and writes checkpoints alone while the others wait in a
    collective; NCCL's default ten minutes would abort a healthy run."""
    runtime = init_runtime("cpu")
    assert runtime.world_size == 2 and torchrun_env[-1]["timeout"] == timedelta(minutes=60)
    init_runtime("cpu", timeout_minutes=5)
    assert torchrun_env[-1]["timeout"] == timedelta(minutes=5)
    with pytest.raises(OptionError, match="must be > 0"):
        init_runtime("cpu", timeout_minutes=0)


class Joined(Exception):
    """Raised where a script, having joined the process group, would first talk to the others."""


def test_the_scripts_pass_dist_timeout_to_the_process_group(torchrun_env, tmp_path, capsys, monkeypatch):
    from minituner.recipes import finetune

    def first_collective(*args):
        raise Joined

    monkeypatch.setattr(finetune, "all_gather_object", first_collective)
    with pytest.raises(Joined):
        finetune.main(["--base", "x", "--data", "y", "--out", str(tmp_path / "run"), "--dist-timeout", "90"])
    assert torchrun_env[-1]["timeout"] == timedelta(minutes=90)
    assert finetune.main(["--dist-timeout", "0", "--out", str(tmp_path / "run2")]) == 2
    assert "--dist-timeout 0.0: must be > 0 minutes" in capsys.readouterr().err


@pytest.fixture
def two_gpus(monkeypatch):
    """torch.cuda as it looks on a machine with two GPUs of compute capability `capability[0]`."""
    capability, current = [(9, 0)], [0]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: current.__setitem__(0, torch.device(d).index))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability[0])
    return capability, current


def test_a_single_process_on_cuda_n_makes_it_the_current_device(two_gpus):
    """Otherwise a capability check or a library's context lands on cuda:0."""
    _, current = two_gpus
    assert init_runtime("cuda:1").device == torch.device("cuda", 1) and current[0] == 1
    assert use_device("cuda") == torch.device("cuda", 1)  # 'cuda' is the current one, with its index


def test_gpus_that_only_emulate_bf16_get_fp16(two_gpus):
    capability, _ = two_gpus
    gpu = torch.device("cuda", 0)
    capability[0] = (7, 5)  # a T4: torch.cuda.is_bf16_supported() says yes (by emulation)
    assert auto_dtype(gpu) == torch.float16 == resolve_dtype("auto", gpu)
    assert resolve_precision("auto", gpu) == "fp16"
    capability[0] = (8, 0)
    assert auto_dtype(gpu) == torch.bfloat16 == resolve_dtype("auto", gpu)
    assert resolve_precision("auto", gpu) == "bf16"
    assert auto_dtype(torch.device("cpu")) == torch.float32


def test_peak_memory_counts_the_allocators_reserve_and_starts_with_training(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 3 * 2**20)
    assert peak_reserved_mib(torch.device("cuda", 0)) == 3.0 and peak_reserved_mib(torch.device("cpu")) is None
    from minituner import trainer
    events = []
    monkeypatch.setattr(trainer, "reset_peak_memory", lambda device: events.append("reset"))
    real_step = trainer.train_step
    monkeypatch.setattr(trainer, "train_step", lambda *a, **kw: (events.append("step"), real_step(*a, **kw))[1])
    assert toy_train.main(["--out", str(tmp_path / "run"), "--steps", "2"]) == 0
    assert events == ["reset", "step", "step"]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert "peak_reserved_mib" in summary and summary["peak_memory_mib"] > 0


def test_the_loop_does_not_stop_the_device_between_steps(monkeypatch, tmp_path):
    """synchronize() before and after each step idled the GPU while the next batch was collated;
    the loop syncs once, when training ends."""
    from minituner import trainer
    syncs = []
    monkeypatch.setattr(trainer, "synchronize", lambda device: syncs.append(device))
    assert toy_train.main(["--out", str(tmp_path / "run"), "--steps", "5"]) == 0
    assert len(syncs) == 1


def test_a_cpu_run_fixes_glibcs_mmap_threshold_unless_the_user_set_it(monkeypatch):
    from minituner import distributed
    calls = []

    class Libc:
        def mallopt(self, option, value):
            calls.append((option, value))
    monkeypatch.setattr(distributed.ctypes, "CDLL", lambda name: Libc())
    monkeypatch.setattr(distributed.sys, "platform", "linux")
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    distributed.use_device("cpu")
    assert calls == [(-3, distributed.CPU_MMAP_THRESHOLD)]
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    distributed.use_device("cpu")
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=65536")
    distributed.use_device("cpu")
    assert len(calls) == 1  # the user's own setting stands


def test_fsdp_on_a_torch_without_fsdp2_sum_reduction_is_one_line(monkeypatch):
    import torch.distributed.fsdp

    class OldFSDPModule:  # torch before FSDP2 could sum gradients without a divide
        pass

    monkeypatch.setattr(torch.distributed.fsdp, "FSDPModule", OldFSDPModule, raising=False)  # (absent before 2.6)
    with pytest.raises(OptionError, match=r"this torch \(.*\) lacks FSDP2's sum-only gradient reduction; install a "
                                          r"newer one \(tested with 2.13\), or train without --fsdp \(DDP\)"):
        check_fsdp()
