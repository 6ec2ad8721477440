"""Shared by the training tests: a small prepared corpus, a tiny preset, and ways to run `nanoqwen train`."""

from __future__ import annotations

import gc
import json
import os
import random
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from nanoqwen.cli import main

if TYPE_CHECKING:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

TINY_MODEL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_key_value_heads": 1, "head_dim": 16, "max_position_embeddings": 64, "max_window_layers": 2,
              "tie_word_embeddings": True, "rope_theta": 10000.0}
# Small and fast: 8 sequences of 32 tokens per step, no periodic saves or samples unless a test asks.
FAST = ["--batch-size", "8", "--seq-len", "32", "--lr", "1e-2", "--warmup", "5", "--eval-interval", "10",
        "--eval-windows", "4", "--save-interval", "1000", "--sample-interval", "0", "--sample-tokens", "8",
        "--device", "cpu", "--no-compile", "--log-interval", "1000"]


def write_corpus(folder: Path, documents: int = 24, sentences: int = 60, seed: int = 0) -> Path:
    """Documents of simple, repetitive English (so a tiny model learns quickly), one .txt file each."""
    rng = random.Random(seed)
    nouns = ["king", "queen", "sword", "crown", "night", "rose", "horse", "friend", "heart", "storm"]
    verbs = ["loves", "fears", "takes", "sees", "keeps", "seeks", "holds", "hears"]
    adjectives = ["old", "fair", "dark", "noble", "sweet", "proud"]
    folder.mkdir(parents=True, exist_ok=True)
    for d in range(documents):
        lines = [f"the {rng.choice(adjectives)} {rng.choice(nouns)} {rng.choice(verbs)} "
                 f"the {rng.choice(adjectives)} {rng.choice(nouns)}." for _ in range(sentences)]
        (folder / f"doc{d:02d}.txt").write_text("\n".join(lines) + "\n")
    return folder


def make_data(root: Path) -> Path:
    """A prepared folder (train.bin, val.bin, meta.json, tokenizer) from the corpus above, 300-id BPE."""
    from nanoqwen.data.prepare import prepare

    corpus = write_corpus(root / "corpus")
    return prepare(str(corpus), "bpe:300", root / "data", val_fraction=0.15, progress=False)


def make_preset(root: Path, **train: object) -> Path:
    path = root / "tiny.json"
    path.write_text(json.dumps({"model": TINY_MODEL, "train": train}))
    return path


def dead_pid() -> int:
    """The pid of a process that has ended."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def train_in_process(*args: str) -> int:
    """`nanoqwen train ARGS` in this process, on one thread as `run_train`'s processes are (runs here and there
    compare bit for bit, and these tiny models run as fast on one; two stall whenever other jobs load the cores).

    What this process held before is frozen out of the garbage collector's sight meanwhile: the collection
    that ends a run (and any the run sets off) scans what the run made, the model it frees among them, not all
    that the suite has imported by then (torch, Transformers, the compiler...: about a second a run, late in a
    whole suite)."""
    gc.freeze()
    try:
        with one_thread():
            return main(["train", *args])
    finally:
        gc.unfreeze()


def train_command(*args: str, nproc: int | None = None) -> list[str]:
    """`nanoqwen train ARGS`: a plain process, or a torchrun job of `nproc` processes."""
    if nproc is None:
        return [sys.executable, "-m", "nanoqwen", "train", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "nanoqwen", "train", *args]


@contextmanager
def one_thread() -> Iterator[None]:
    """Torch on one thread in this process, as in `run_train`'s processes."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def subprocess_env() -> dict[str, str]:
    # The same thread count in every process, so that runs compare bit for bit.
    # W&B offline: a --wandb run keeps its log in RUN/wandb (tests never reach the network)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline"}


def run_train(*args: str, nproc: int | None = None, timeout: float = 240,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`nanoqwen train ARGS` in a fresh process (under torchrun when nproc is given), in `env` or subprocess_env()."""
    return subprocess.run(train_command(*args, nproc=nproc), capture_output=True, text=True, timeout=timeout,
                          env=env or subprocess_env())


def torchrun_workers(torchrun: int) -> list[int]:
    """The processes torchrun started (each in a session of its own: a kill of torchrun's group misses them)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "stat").read_text().rsplit(")", 1)[1].split()[1] == str(torchrun):
                found.append(int(entry.name))
        except OSError:  # ended meanwhile
            pass
    return found


def signalled_at_step(command: list[str], step: int, stop: signal.Signals, err: Path, timeout: float = 180) -> str:
    """A torchrun job (`command`) run until it reports `step`, then stopped: SIGTERM to torchrun (which passes it on:
    the job saves), or SIGKILL to its workers (the job dies, its last/ left at its save before); what it printed.
    Its standard error goes to `err`."""
    said = []
    with err.open("w") as stderr:
        process = subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.PIPE, stderr=stderr, text=True)
        assert process.stdout is not None
        while line := process.stdout.readline():
            said.append(line)
            if line.startswith(f"step {step}/"):
                for pid in torchrun_workers(process.pid) if stop == signal.SIGKILL else [process.pid]:
                    os.kill(pid, stop)
        assert process.wait(timeout=timeout) != 0
    return "".join(said)


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def train_losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["train_loss"] for r in read_metrics(run)}


def tensorboard_events(run: Path) -> EventAccumulator:
    """What TensorBoard itself reads from RUN/tensorboard (every event file, with its purges applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


def tensorboard_scalars(run: Path, tag: str) -> dict[int, float]:
    return {e.step: e.value for e in tensorboard_events(run).Scalars(tag)}


class WandbRun(NamedTuple):
    id: str
    rows: list[dict]
    """The history rows: the logged keys, values as W&B stored them (a sample is its HTML file's text)."""
    config: dict
    name: str


def wandb_runs(run: Path) -> list[WandbRun]:
    """What each process logged to W&B offline (WANDB_MODE=offline) in RUN/wandb, oldest first.

    A run's log (run-ID.wandb) is records in LevelDB's log format, after a 7-byte header: 32 KiB blocks of
    chunks, each a 7-byte header (crc32, length, kind: 1 whole, 2 first, 3 middle, 4 last part of a record)
    and a piece of a wandb_internal Record protobuf. A log cut off by a kill ends with a partial chunk.
    """
    from wandb.proto import wandb_internal_pb2

    found: list[WandbRun] = []
    for folder in sorted((run / "wandb").glob("offline-run-*")):  # named by start time
        (log,) = folder.glob("run-*.wandb")
        data, pos, pending, rows, config, name = log.read_bytes(), 7, b"", [], {}, ""
        assert data[:4] == b":W&B"
        while pos + 7 <= len(data):
            if (block_left := 32768 - pos % 32768) < 7:  # a block's tail too short for a chunk header: padding
                pos += block_left
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            piece, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
            if kind == 0 or len(piece) < length:  # padding, or the cut-off end
                continue
            pending += piece
            if kind in (1, 4):
                record = wandb_internal_pb2.Record.FromString(pending)
                pending = b""
                kind_of = record.WhichOneof("record_type")
                if kind_of == "run":  # the run's start, its config and name with it
                    config = {item.key: json.loads(item.value_json) for item in record.run.config.update}
                    name = record.run.display_name
                elif kind_of == "history":
                    row = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                           for item in record.history.item}
                    if "sample/path" in row:  # a media file's fields
                        row["sample"] = (folder / "files" / row["sample/path"]).read_bytes().decode()  # a bare \r kept
                    rows.append({k: v for k, v in row.items() if not k.startswith("_") and "/" not in k})
        found.append(WandbRun(log.stem.removeprefix("run-"), rows, config, name))
    return found


def on_rank0_worker(rank: int, world_size: int, folder: str) -> None:
    """One process of a gloo job (torch.multiprocessing) that reduces its rank + 1 (mean, sum, max), has `on_rank0`
    do work that succeeds, then work that fails on rank 0 as a full disk and as a bug would, then resumes
    folder/run, which another process holds (rank 0 alone takes its lock), then prepares folder/empty (an empty
    .txt), which rank 0 refuses, then says once for the job a line both meet, and one of its own; what each process
    met goes to folder/RANK.json."""
    import errno

    import torch.distributed as dist

    from nanoqwen.cli import build_parser
    from nanoqwen.distributed import all_reduce, on_rank0, say_once
    from nanoqwen.errors import NanoQwenError
    from nanoqwen.runs import prepared_folder
    from nanoqwen.train import setup

    dist.init_process_group("gloo", store=dist.FileStore(f"{folder}/store", world_size), rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=4))  # a rank left waiting fails
    met: dict[str, object] = {}
    try:
        met["reduced"] = [all_reduce(rank + 1.0, op) for op in ("mean", "sum", "max")]  # of 1 and 2
        on_rank0(lambda: met.setdefault("ran", rank))
        on_rank0(partial(time.sleep, 5))  # longer than the job's collectives wait (a corpus prepared)
        for name, error in [("full", OSError(errno.ENOSPC, "No space left on device", f"{folder}/last")),
                            ("bug", ValueError("a bug"))]:
            try:
                on_rank0(partial(_raise, error))
            except (NanoQwenError, OSError, ValueError) as e:
                met[name] = [type(e).__name__, str(e)]
        # a run folder in use, which rank 0 alone finds when it takes the lock (as torchrun's processes see it)
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size))
        try:
            setup(build_parser("train").parse_args(["train", "--resume", f"{folder}/run", "--device", "cpu"]))
        except Exception as e:  # noqa: BLE001 (what each process met, whatever it was)
            met["locked"] = [type(e).__name__, str(e)]
        # a corpus that rank 0 alone prepares, and refuses
        os.chdir(folder)
        try:
            prepared_folder(f"{folder}/empty", "bpe:300")
        except NanoQwenError as e:
            met["prepare"] = str(e)
        said: list[str] = []
        for line in ("a line every rank met", f"rank {rank}'s own line"):
            say_once(line, said.append)
        met["said"] = said
    finally:
        dist.destroy_process_group()
    Path(folder, f"{rank}.json").write_text(json.dumps(met))


def _raise(error: BaseException) -> None:
    raise error
