"""Where the work runs: the device, its dtypes, torchrun's process group, running out of memory.

Every stage turns its ``--device`` option into a device with ``resolve_device`` (``auto`` is this
rank's GPU under torchrun, else the CPU), checks a half-precision request with ``check_dtype``,
joins torchrun's process group with ``init_distributed`` and runs its main loop inside
``out_of_memory_guard``, so a missing device, an unsupported dtype or an exhausted GPU is a one-line
``MmsaeError`` instead of a traceback.
"""

from __future__ import annotations

import atexit
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch

from .errors import MmsaeError

# ranks can finish far apart (uneven images, a slow shard); a barrier must not time out meanwhile
DISTRIBUTED_TIMEOUT = timedelta(hours=48)


def local_rank() -> int:
    """This process's rank on its machine (torchrun's LOCAL_RANK; 0 outside torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def _no_cuda_reason() -> str:
    built = torch.version.cuda or getattr(torch.version, "hip", None)
    if built is None:
        return f"torch {torch.__version__} is built without CUDA"
    return f"torch {torch.__version__} is built with CUDA {built} but no GPU is visible"


def resolve_device(requested: str | torch.device = "auto") -> torch.device:
    """The device a ``--device`` option names, checked against this machine.

    ``auto`` is this rank's GPU (``LOCAL_RANK`` under torchrun) when CUDA is available, else the
    CPU; a bare ``cuda`` is this rank's GPU too. A device this machine does not have, or a string
    that names no device, is a one-line MmsaeError saying what the machine has.
    """
    text = str(requested).strip()
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank() % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise MmsaeError(f"--device {text!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cpu":
        return torch.device("cpu")  # (cpu:N is the same memory)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise MmsaeError(f"--device {text}: this machine has no CUDA device ({_no_cuda_reason()}); use --device cpu or auto")
        count = torch.cuda.device_count()
        if device.index is None:
            return torch.device("cuda", local_rank() % count)
        if device.index >= count:
            raise MmsaeError(f"--device {text}: this machine has {count} CUDA device{'s' if count > 1 else ''} "
                             f"(cuda:0 to cuda:{count - 1}); choose one of them or auto")
        return device
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise MmsaeError(f"--device {text}: this machine has no MPS (Apple GPU) device; use --device cpu or auto")
        return device
    raise MmsaeError(f"--device {text}: mmsae runs on cpu, cuda or mps; use --device auto, cpu, cuda, cuda:N or mps")


def check_dtype(dtype: str | torch.dtype, device: str | torch.device, option: str = "--dtype") -> None:
    """Refuse a half-precision ``dtype`` the hardware of ``device`` does not run natively.

    CPUs run both bfloat16 and float16; a CUDA GPU runs bfloat16 from compute capability 8.0
    (Ampere) on, float16 on every GPU. ``option`` names the setting in the message.
    """
    name = str(dtype).removeprefix("torch.")
    device = torch.device(device)
    if name != "bfloat16" or device.type != "cuda":
        return
    with torch.cuda.device(device):  # (the check asks the current GPU)
        native = torch.cuda.is_bf16_supported(including_emulation=False)
    if not native:
        major, minor = torch.cuda.get_device_capability(device)
        raise MmsaeError(f"{option} bfloat16: {torch.cuda.get_device_name(device)} ({device}, compute capability "
                         f"{major}.{minor}) has no native bfloat16 (needs 8.0 or newer); use float16 or float32")


def init_distributed(device: torch.device, stage: str | None = None) -> tuple[int, int]:
    """Rank and world size from torchrun's environment, joining its process group once per process.

    The backend follows the device (NCCL for CUDA, gloo otherwise), with a long timeout. The
    group stays until the process exits, so every stage a script runs uses the same one:
    destroying it and starting another in the same process hung in 1 of 5 tries under
    torchrun (torch 2.13, gloo, two processes). Processes started with WORLD_SIZE but no
    rendezvous address (MASTER_ADDR) get no group; that is an error when ``stage`` is given
    (its ranks must talk), and otherwise the ranks meet through files (harvest).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world <= 1:
        return 0, 1
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return rank, world
    if not dist.is_available() or "MASTER_ADDR" not in os.environ:
        if stage is not None:
            raise MmsaeError(f"{stage} with WORLD_SIZE={world} needs torchrun's process group (MASTER_ADDR is not set); "
                             f"start it with torchrun --nproc-per-node N -m mmsae.cli {stage} ...")
        return rank, world
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before NCCL starts, so each rank talks through its own GPU
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=DISTRIBUTED_TIMEOUT)
    atexit.register(_destroy_group)
    return rank, world


def barrier(world: int) -> None:
    """Wait for every rank (nothing to wait for in one process, or without a process group:
    harvest's ranks can also coordinate through their files alone)."""
    if world > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _destroy_group() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# What the allocators say when memory runs out: the CPU's (Linux, Windows), and MPS's
_HOST_OOM = ("DefaultCPUAllocator: can't allocate memory", "DefaultCPUAllocator: not enough memory")
_GPU_OOM = ("MPS backend out of memory",)
_ASKED = re.compile(r"[Tt]ried to allocate (\d+ bytes|[\d.]+ ?[KMGTPE]?i?B)")


def _size(asked: str) -> str:
    """``1125899906842624 bytes`` as ``1.0 PiB``; sizes torch already wrote with a unit stay."""
    if not asked.endswith(" bytes"):
        return asked
    n = float(asked.split()[0])
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024:
            return f"{n:.0f} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def _out_of_memory_message(err: BaseException, stage: str, device: str | torch.device, settings: str,
                           resumes: bool = True) -> str | None:
    """The one-line message for ``err`` if it is the GPU or the host running out of memory, else None."""
    text = str(err)
    if isinstance(err, torch.OutOfMemoryError) or any(s in text for s in _GPU_OOM):
        kind = "GPU"
    elif isinstance(err, MemoryError) or (isinstance(err, RuntimeError) and any(s in text for s in _HOST_OOM)):
        kind = "host"
    else:
        return None
    device = torch.device(device)
    where = str(device) if (kind == "host") == (device.type == "cpu") else "the host"
    asked = _ASKED.search(text)
    size = f" (it asked for {_size(asked.group(1))})" if asked else ""
    kept = "; finished work is kept" if resumes else ""
    return f"{stage} ran out of {kind} memory on {where}{size}; lower {settings} and rerun{kept}"


@contextmanager
def out_of_memory_guard(stage: str, device: str | torch.device, settings: str, resumes: bool = True) -> Iterator[None]:
    """Turn the GPU or the host running out of memory inside the block into a one-line MmsaeError.

    ``settings`` names what to lower (e.g. ``"--batch-size or --shard-size"``); ``resumes`` says
    whether a rerun continues from what the stage already wrote (its shards, checkpoints). Only
    re-raises: every other error passes through unchanged, and nothing written is touched.
    """
    try:
        yield
    except (RuntimeError, MemoryError) as err:
        message = _out_of_memory_message(err, stage, device, settings, resumes)
        if message is None:
            raise
        raise MmsaeError(message) from err
