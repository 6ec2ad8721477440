"""Devices and dtypes (`--device auto` picks CUDA, then Apple MPS, then CPU; dtype follows the device),
and torchrun: process group, reductions and rank 0's word for all; the host's memory and allocator."""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from nanoqwen.errors import NanoQwenError, RankError, counted, user_error_line
from nanoqwen.io import usable_cores

T = TypeVar("T")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


INFERENCE_DTYPE_HELP = "default: bfloat16 on CUDA (float16 on GPUs without bf16), else float32"


def add_device_arguments(p: argparse.ArgumentParser, dtype_help: str = INFERENCE_DTYPE_HELP) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help=dtype_help)


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise NanoQwenError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise NanoQwenError(f"--device {name} was asked for but no CUDA GPU is visible; use --device cpu or auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise NanoQwenError(f"--device {name} was asked for but Apple MPS is not available; use --device cpu or auto")
    return device


def native_bf16(device: torch.device) -> bool:
    """Whether `device` is a GPU whose tensor cores compute in bfloat16 (Ampere and later, ROCm). Older ones (T4,
    V100) only emulate it, which torch.cuda.is_bf16_supported() counts by default, at a fraction of fp16's speed."""
    if device.type != "cuda":
        return False
    with torch.cuda.device(device):  # the run's GPU, not whichever is current (--device cuda:1)
        return torch.cuda.is_bf16_supported(including_emulation=False)


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """The named dtype, or the device's natural one: bf16 on CUDA (fp16 where bf16 is not native), else fp32."""
    if name is not None:
        dtype = DTYPES[name]
        if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise NanoQwenError("this GPU has no bfloat16; use --dtype float16 or float32")
        return dtype
    if device.type == "cuda":
        return torch.bfloat16 if native_bf16(device) else torch.float16
    return torch.float32


def reuse_freed_memory() -> None:
    """Have glibc keep freed blocks of up to 32 MiB for reuse instead of handing them back to the kernel
    (Linux only).

    PyTorch's CPU tensors come straight from malloc, which maps each large block fresh and unmaps it on
    free. A training step makes the same activations every time, so each of them page-faults anew and
    the kernel zeroes every page: about 40,000 faults and 7-10% of a `cpu`-preset step on the 2-core
    test machine. Blocks up to 32 MiB now come from the heap and are reused, and the heap is not trimmed.
    Bigger ones (a chunk of logits at the Qwen3 vocabulary) are still mapped and returned, which keeps
    peak memory where it was; with no mapping at all, fragmentation raised it by 20% there (3.05 GiB against 2.54).
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...): nothing to tune
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    mallopt(m_mmap_threshold, 32 << 20)
    mallopt(m_trim_threshold, 2**31 - 1)


def free_host_memory() -> int | None:
    """Bytes this process can still get from the machine: MemAvailable plus free swap, capped by a container's
    cgroup limit; None where that cannot be read (not Linux)."""
    try:
        with open("/proc/meminfo") as f:
            fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.strip()}
        free = fields["MemAvailable"] + fields.get("SwapFree", 0)
    except (OSError, KeyError, ValueError, IndexError):
        return None
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read())
        if limit != "max":
            free = min(free, int(limit) - used)
    except (OSError, ValueError):
        pass
    return free


def check_host_memory(num_params: int, bytes_per_param: int, what: str,
                      hint: str = "choose a smaller preset, or --set fewer layers or a smaller hidden_size",
                      processes: int = 1) -> None:
    """Refuse up front a model that cannot fit in the machine's memory.

    Linux overcommits, so a CPU model too large for the machine is no exception: the kernel kills the process
    midway, with no message. `bytes_per_param` is a lower bound of what the job holds per parameter, so a
    refusal is never wrong; a job that passes may still run short on activations."""
    free = free_host_memory()
    need = num_params * bytes_per_param * processes
    if free is None or need <= free:
        return
    each = f" in each of {processes} processes" if processes > 1 else ""
    raise NanoQwenError(f"{what} needs at least {need / 2**30:.1f} GiB of memory ({num_params / 1e9:.2f}B parameters "
                        f"x {bytes_per_param} bytes{each}) and this machine has {free / 2**30:.1f} GiB free; {hint}")


# -- torchrun ------------------------------------------------------------------------------------
@dataclass
class DistInfo:
    """This process's place in the job; one process without torchrun."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    distributed: bool = False
    """Launched by torchrun: a process group exists and DDP/FSDP2 wrap the model, one process included."""
    processes_here: int = 1
    """The job's processes on this machine (torchrun's LOCAL_WORLD_SIZE): they share its memory and cores."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str = "auto") -> DistInfo:
    """Join the torchrun job when launched by torchrun (NCCL on GPUs, gloo on CPU); pick this rank's device
    (on CPU, its share of the machine's cores: see `threads_per_process`).

    `torchrun --nproc_per_node 1` joins a job of one, so DDP and --fsdp run as they would on more."""
    device = resolve_device(device_name)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo(device=device)
    world_size, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        visible, processes = torch.cuda.device_count(), os.environ.get("LOCAL_WORLD_SIZE", "?")
        if local_rank >= visible:  # torch's own words are a traceback of "invalid device ordinal"
            raise RankError(f"process {local_rank} of the {processes} started on this machine has no GPU of its own "
                            f"(LOCAL_RANK {local_rank}, {counted(visible, 'GPU')} visible): start one process a "
                            f"GPU, --nproc_per_node {visible}")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    threads = threads_per_process(os.environ, launcher_environment(), usable_cores()) if device.type == "cpu" else None
    if threads is not None:
        torch.set_num_threads(threads)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    patient_group()  # now, while every process is here: see there
    return DistInfo(rank, world_size, device, distributed=True,
                    processes_here=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def threads_per_process(env: Mapping[str, str], launcher_env: Mapping[str, str] | None, cores: int) -> int | None:
    """Torch threads for each of the processes a job runs on this machine (LOCAL_WORLD_SIZE) on CPU: a share of
    its cores, cores // processes; None to leave torch's count (one process, or an OMP_NUM_THREADS of the user's).

    torchrun sets OMP_NUM_THREADS=1 in its processes where the user set none (and warns): one core each, the rest
    idle. Its 1 is told from a user's own by the environment torchrun itself started with (`launcher_env`), which
    holds the user's but not the one torchrun set; where that cannot be read, the 1 stays. A launcher that sets no
    OMP_NUM_THREADS left every process a thread per core: oversubscribed, as two runs at once are."""
    processes = int(env.get("LOCAL_WORLD_SIZE", "1"))
    if processes <= 1:
        return None
    omp = env.get("OMP_NUM_THREADS")
    torchruns_own = omp == "1" and "TORCHELASTIC_RUN_ID" in env and launcher_env is not None \
        and "OMP_NUM_THREADS" not in launcher_env
    if omp is not None and not torchruns_own:
        return None
    return max(1, cores // processes)


def launcher_environment() -> dict[str, str] | None:
    """The environment the parent process (torchrun) was started with; None where it cannot be read (not Linux)."""
    try:
        raw = Path(f"/proc/{os.getppid()}/environ").read_bytes()
    except OSError:
        return None
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def all_reduce(value: float, op: str = "mean", device: torch.device | None = None,
               group: dist.ProcessGroup | None = None) -> float:
    """A Python number reduced over all processes ("mean", "sum" or "max"); itself without torchrun. `device`
    is where the group's backend reduces (the GPU for NCCL's; a gloo group's on the CPU)."""
    if not dist.is_initialized():
        return value
    tensor = torch.tensor(float(value), dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=group)
    result = tensor.item()
    return result / dist.get_world_size() if op == "mean" else result


# How long the other processes wait for rank 0's own work: a corpus downloaded and prepared, or a large checkpoint
# written, can take longer than the job's collectives wait (10 minutes under NCCL, 30 under gloo) before they fail.
RANK0_WORK_TIMEOUT = timedelta(days=1)
_patient: dist.ProcessGroup | None = None


def patient_group() -> dist.ProcessGroup:
    """A gloo group of every process (CPU tensors, whatever the job's backend) whose collectives wait
    RANK0_WORK_TIMEOUT. Made as the job starts (init_distributed), where every process is: made on first use,
    rank 0 joined it only after its first work for all (a corpus it prepares), so the others waited for it in the
    group's rendezvous, on torchrun's store, which outlives rank 0; rank 0 interrupted there (Ctrl-C) left them
    waiting until torchrun killed them. In the group, they see rank 0 go (its sockets close) and stop."""
    global _patient
    if _patient is None:
        _patient = dist.new_group(backend="gloo", timeout=RANK0_WORK_TIMEOUT)
    return _patient


def from_rank0(value: T) -> T:
    """Rank 0's `value` on every process (what it read from disk or chose); itself without torchrun. Where
    each rank would read for itself, a rank that reads after rank 0 changed the disk would decide otherwise."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_to_rank0(value: T) -> list[T] | None:
    """Every rank's `value`, in rank order, on rank 0 (None on the others); [value] without torchrun. Gathered in
    `patient_group` (gloo): objects stay on the CPU, whatever the job's backend."""
    if not dist.is_initialized():
        return [value]
    gathered: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(value, gathered, dst=0, group=patient_group())
    return gathered


def on_rank0(work: Callable[[], None]) -> None:
    """`work` on rank 0 alone (what it alone writes: a checkpoint, a line of metrics), with its outcome told to
    every rank. Where it fails (a full disk), every process stops with rank 0's line; the others would crash in
    their next collective with a traceback each (gloo) or wait in it (NCCL) until torchrun ends them. Just
    `work()` without torchrun; under it, one scalar all-reduce in `patient_group`: the work may take longer
    than the job's collectives may wait (preparing a corpus, saving a large checkpoint)."""
    error: Exception | None = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            work()
        except Exception as e:  # noqa: BLE001 (told to the others, then raised here as it was)
            error = e
    if dist.is_initialized() and all_reduce(float(error is not None), "max", group=patient_group()):
        line = from_rank0(None if error is None else user_error_line(error))
        if error is None:
            raise NanoQwenError(line or "process 0 failed (its traceback is above); every process stops with it")
    if error is not None:
        raise error


# gloo's words for a collective whose other end went away: the process there ended (its own error, a kill)
PEER_GONE = ("Connection closed by peer", "Connection reset by peer")
PEER_GONE_LINE = ("another process of this job ended (its error is above, or torchrun's summary below says how); "
                  "the others stop with it")


def job_error_line(error: BaseException) -> str | None:
    """What a torchrun process says of `error` (see user_error_line), a collective cut short by another process's end
    included: one line for the job (say_once), where each of the others printed gloo's traceback. None: a bug."""
    line = user_error_line(error)
    if line is None and dist.is_initialized() and isinstance(error, RuntimeError) and \
            any(words in str(error) for words in PEER_GONE):
        return PEER_GONE_LINE
    return line


def say_once(line: str, say: Callable[[str], None]) -> None:
    """`say(line)` once for the whole torchrun job, where every process may meet the same error (a bad flag, which
    each one checks; rank 0's line, which on_rank0 raises on all): the first process to report it says it, and
    the others wait until it has (seconds at most: torchrun, seeing them end, could end it first). A line no other
    process met is said by its own. Where the job's key-value store fails, said here too: better twice than never."""
    key = "nanoqwen/error/" + hashlib.sha256(line.encode()).hexdigest()
    said = False
    try:
        store = dist.distributed_c10d._get_default_store()
        if store.add(key, 1) == 1:
            say(line)
            said = True
            store.set(f"{key}/said", "1")
        else:
            store.wait([f"{key}/said"], timedelta(seconds=10))
    except RuntimeError:  # DistStoreError: the store went with the process that held it, or the wait timed out
        if not said:
            say(line)


def shutdown_distributed() -> None:
    global _patient
    if dist.is_initialized():
        dist.destroy_process_group()  # every group, the patient one too
    _patient = None
