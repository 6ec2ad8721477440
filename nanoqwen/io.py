"""Files that are either whole or absent: write under a temporary name, then rename into place."""

from __future__ import annotations

import ctypes
import errno
import itertools
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from nanoqwen.errors import NanoQwenError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def give_usual_mode(path: str | os.PathLike[str]) -> None:
    """rw for the owner, r for others (per the umask), for a file a library wrote privately (safetensors
    writes 0600) that other users and tools are meant to read."""
    os.chmod(path, 0o666 & ~_umask())


def usable_cores() -> int:
    """The cores this process may run on (a container's or taskset's share, not the whole machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cache_dir() -> Path:
    """Where nanoqwen keeps what it builds or downloads once per machine ($NANOQWEN_CACHE overrides)."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nanoqwen"
    path = Path(os.environ.get("NANOQWEN_CACHE") or default)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def atomic_dir(final: str | os.PathLike[str], keep_existing: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside `final`; on success it replaces `final` whole.

    On an exception the temporary folder is removed and `final` is left as it was. With
    `keep_existing` (caches that several processes may build at once), a `final` that appeared
    meanwhile is kept and the new copy dropped, so readers never see it missing.
    """
    final = real_path(final)
    # the folders made to hold it (data/ of train's data/NAME), deepest first: a failure leaves none of them behind
    made = missing_folders(final.parent)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(final)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent))
    except OSError as e:
        remove_if_empty(made)
        raise refused_as_asked(e, final) from None
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the finished folder gets the usual mode
    try:
        yield tmp
    except BaseException as e:
        full = no_space_left(e, tmp, final)
        shutil.rmtree(tmp, ignore_errors=True)
        remove_if_empty(made)
        if full:
            raise full from e
        raise
    if keep_existing and final.exists():
        shutil.rmtree(tmp, ignore_errors=True)
        return
    sync_tree(tmp)  # on the disk before the name points at it: after a power cut, the old folder or the whole new one
    old = None
    try:
        if keep_existing or not final.exists():  # keep_existing: a rename fails where another writer came first
            rename_patiently(tmp, final)
        elif exchange(tmp, final):  # in one step: a reader (sample of RUN/best mid-run) always finds a whole folder
            old = tmp  # the replaced one, under the temporary name (an orphan of it goes as a tmp one does)
        else:  # two renames, where the system cannot swap: `final` is missing for a moment between them
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            shutil.rmtree(old, ignore_errors=True)
            rename_patiently(final, old)
            rename_patiently(tmp, final)
    except OSError as e:  # e.g. `final` is a mount point, which cannot be renamed away
        shutil.rmtree(tmp, ignore_errors=True)
        if keep_existing and final.exists():  # another writer's whole copy came first (since the check above)
            return
        if old is not None and not final.exists():
            old.rename(final)
        if sys.platform == "win32" and isinstance(e, PermissionError):
            raise NanoQwenError(f"cannot replace {final}: another program has a file in it open (Windows renames "
                                "no folder then), such as a nanoqwen loading it or an editor; close it and run "
                                "again, or write elsewhere") from None
        raise NanoQwenError(f"cannot replace {final} ({e.strerror}); write to a new folder inside it "
                            "instead") from None
    sync_file(final.parent)  # the rename itself
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# Seconds between tries of a rename Windows refuses (about 3 s in all): a virus scanner or indexer reading the files
# just written, or another nanoqwen loading the folder, holds them open for a moment
WINDOWS_RENAME_WAITS = (0.1, 0.2, 0.4, 0.8, 1.5)


def rename_patiently(source: Path, target: Path, over_file: bool = False) -> None:
    """`source.rename(target)` (with `over_file`, os.replace: a file put over the file `target`), tried again for a
    while on Windows while refused: it renames no folder while a program holds a file in it open, nor replaces a
    file held open."""
    move = os.replace if over_file else Path.rename
    for wait in WINDOWS_RENAME_WAITS if sys.platform == "win32" else ():
        try:
            move(source, target)
            return
        except PermissionError:
            time.sleep(wait)
    move(source, target)


def missing_folders(folder: Path) -> list[Path]:
    """`folder` and the folders above it that do not exist yet, deepest first: those that making it makes."""
    return list(itertools.takewhile(lambda path: not path.exists(), [folder, *folder.parents]))


def remove_if_empty(folders: list[Path]) -> None:
    """Remove `folders` (each inside the next) while they are empty: one that another writer put something in
    meanwhile stays, and so do those that hold it."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def refused_as_asked(error: OSError, final: Path) -> OSError:
    """The error of a folder that refuses the temporary file or folder made beside `final` (no permission, a name
    too long), said of `final`: the hidden temporary name means nothing to the user."""
    return OSError(error.errno, error.strerror, str(final))


RENAME_EXCHANGE, AT_FDCWD = 2, -100  # from Linux's <linux/fs.h> and <fcntl.h>


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux's renameat2 with RENAME_EXCHANGE), so that a reader of either
    name finds one whole folder or the other, never none. False where the system or its file system cannot (not
    Linux, a libc without renameat2, a file system without the flag): nothing has changed then."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a libc from before renameat2 (glibc 2.28)
        return False
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # unsupported here (e.g. some network or FUSE mounts)
        return False
    raise OSError(code, os.strerror(code), str(b))


def sync_file(path: str | os.PathLike[str]) -> None:
    """fsync a file or a folder (its entries) by name. Windows opens no folder (its entries are left to NTFS's
    journal) and flushes a file only through a descriptor that may write (FlushFileBuffers)."""
    windows = sys.platform == "win32"
    if windows and os.path.isdir(path):
        return
    fd = os.open(path, os.O_RDWR if windows else os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(folder: Path) -> None:
    """fsync every file under `folder` and the folders that hold them."""
    for parent, _, names in os.walk(folder):
        for name in names:
            sync_file(os.path.join(parent, name))
        sync_file(parent)


def real_path(path: str | os.PathLike[str]) -> Path:
    """`path` made absolute, `.` and `..` resolved, and a symlink followed to its target: an output is
    replaced where it really is (a link to another disk stays a link, and `--out .` has a name)."""
    return Path(os.path.realpath(path))


LOCK_FILE = ".lock"  # held by the process writing a run folder
# Run folders, and runs/ above them, that this process made (absolute): a run that fails to start removes those it
# made, empty, as release_lock finds them, and never a folder the user made (an empty --out, their own runs/).
_made_for_runs: set[Path] = set()

# Files that mark an earlier output of each kind: an --out holding one may be replaced (a prepared data
# folder holds meta.json; a checkpoint, config.json; a tokenizer, tokenizer.json; a run, its own files).
MARKERS: dict[str, tuple[str, ...]] = {
    "data": ("meta.json",),
    "checkpoint": ("config.json", "tokenizer.json"),  # a tokenizer folder becomes a checkpoint
    "tokenizer": ("tokenizer.json",),
    # A run writes its config.json first: without one, a folder is not a run (its best/ is not ours to replace).
    "run": ("config.json",),
}
# Everything a folder replaced whole may hold: config.json or tokenizer.json alone do not make a folder
# ours (a project's config.json, a downloaded model with its README and shards), and nothing else in it
# may be deleted.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
WRITTEN: dict[str, tuple[str, ...]] = {
    "data": ("meta.json", "train.bin", "val.bin", *_TOKENIZER_FILES),
    "checkpoint": ("config.json", "generation_config.json", "model.safetensors", *_TOKENIZER_FILES),
    "tokenizer": _TOKENIZER_FILES,
}
# A new run writes into its folder instead of replacing it: one that holds a run's files but no last/ (it
# stopped before its first save), or nothing, but never another kind's output. `train` refuses a folder
# with last/ itself (that is --resume's).
RUN_FOREIGN = ("meta.json", "model.safetensors", "tokenizer.json", "train.bin")


def check_replaceable(out: str | os.PathLike[str], kind: str) -> None:
    """Refuse to let an --out that exists be replaced unless it is an earlier output of the same `kind`
    (see MARKERS, WRITTEN and RUN_FOREIGN). Anything else (a file, `--out .`, a run or a checkpoint given to
    a command that writes a tokenizer, a folder of the user's files) would be deleted."""
    markers = MARKERS[kind]
    out = Path(out)
    if not out.exists():
        refuse_inside_a_file(out, "a folder name")
        return
    if not out.is_dir():
        raise NanoQwenError(f"{out} is a file; give --out a folder name")
    entries = {entry.name for entry in out.iterdir()} - {LOCK_FILE}
    if kind in WRITTEN:
        foreign = sorted(entries - set(WRITTEN[kind]))
    else:
        foreign = [name for name in RUN_FOREIGN if name in entries]
    if kind == "run" and "config.json" in entries and not is_run_config(out / "config.json"):
        foreign.append("a config.json that is not a run's")
    unmarked = bool(entries) and not entries.intersection(markers)
    if foreign or unmarked:
        shown = foreign or sorted(entries)  # a folder of the user's own files: name some of them
        listed = ", ".join(shown[:3]) + (", ..." if len(shown) > 3 else "")
        missing = f"; no {' or '.join(markers)}" if unmarked else ""
        raise NanoQwenError(f"{out} exists and holds something other than what this command writes "
                            f"({listed}{missing}), which writing there would overwrite or delete; choose another "
                            "--out or remove it")


def refuse_inside_a_file(out: Path, give: str) -> None:
    """One line for an --out under a file, which no write can make (mkdir would fail with a traceback)."""
    if any(parent.is_file() for parent in out.parents):
        raise NanoQwenError(f"{out} is inside a file; give --out {give}")


def no_space_left(error: BaseException, written: Path, final: Path) -> NanoQwenError | None:
    """The plain error for a write into `written` that failed on a full disk (libraries say it their own way:
    safetensors, torch.save's "unexpected pos", numpy's "N requested and M written"); None for other errors."""
    if isinstance(error, Exception) and not isinstance(error, NanoQwenError) and disk_full(written):
        return NanoQwenError(f"no space left on the disk of {final}; free some space or write elsewhere")
    return None


def json_line(record: dict[str, Any]) -> str:
    """One JSON object on one line, a NaN or infinity written as null: Python writes them as NaN and Infinity,
    which strict JSON readers (jq, JavaScript, most JSON libraries) refuse."""
    return json.dumps({key: None if isinstance(value, float) and not math.isfinite(value) else value
                       for key, value in record.items()})


def disk_full(path: Path) -> bool:
    """Whether the disk holding `path` has (next to) nothing left: what a failed write most likely met."""
    try:
        return shutil.disk_usage(path).free < 1 << 20
    except OSError:
        return False


RUN_CONFIG_KEYS = ("train", "preset", "data")  # what a run's config.json holds that a model's does not


def is_run_config(path: Path) -> bool:
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return is_run_record(saved)


def found_data(saved: dict[str, Any], run_dir: Path) -> Path | None:
    """Where the data folder of the run in `run_dir` (its config.json `saved`) is now: the path it recorded, else
    the same place relative to the run folder (the project moved as a whole); None where neither is."""
    data = Path(saved["data"])
    if data.exists():
        return data
    moved = run_dir / saved["data_from_run"] if "data_from_run" in saved else None
    return moved if moved is not None and moved.is_dir() else None


def trained_on(run_dir: Path) -> str:
    """For a run folder given where data is read: the prepared folder it trained on, where that still is."""
    try:
        saved = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
        data = found_data(saved, run_dir) if isinstance(saved.get("data"), str) else None
    except (OSError, ValueError, AttributeError):
        data = None
    return (f"it trained on the prepared folder {data} (--data {data})" if data is not None
            else "its config.json names the data folder it trained on")


def run_folder_refusal(folder: Path) -> NanoQwenError:
    """The line for a run folder given where a checkpoint is read: the checkpoints it has, or that it has none yet
    (a run still before its first evaluation, or one stopped there), not a complaint about its config.json."""
    saved = {name: folder / name for name in ("best", "last") if (folder / name / "config.json").is_file()}
    if len(saved) == 2:
        return NanoQwenError(f"{folder} is a run folder; give one of its checkpoints: {saved['best']} (lowest val "
                             f"loss) or {saved['last']}")
    if saved:
        name, checkpoint = next(iter(saved.items()))
        return NanoQwenError(f"{folder} is a run folder; give its checkpoint {checkpoint} (its only one, "
                             f"{'lowest val loss' if name == 'best' else 'the latest'})")
    return NanoQwenError(f"{folder} is a run folder with no checkpoint yet: a run writes {folder / 'best'} at its "
                         f"first evaluation and {folder / 'last'} at its first save; give one of them once it has "
                         "(a run stopped before then saved none)")


def is_json_number(value: Any) -> bool:
    """Whether a parsed JSON value is a number: an int or a float, not a bool (which Python counts as an int)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def runs_inside(folder: Path) -> list[Path]:
    """The run folders in `folder` (runs/, given where one run or one checkpoint is read), by name."""
    return sorted(found.parent for found in folder.glob("*/metrics.jsonl"))


def prepared_inside(folder: Path) -> list[Path]:
    """The prepared folders in `folder` where it holds nothing else (data/, given as --data or as a corpus), by
    name; none where it holds files too (texts beside a prepared folder: a corpus)."""
    if not folder.is_dir() or any(path.is_file() and not path.name.startswith(".") for path in folder.iterdir()):
        return []
    return sorted(meta.parent for meta in folder.glob("*/meta.json"))


def folder_of_runs_refusal(folder: Path, give: str, choices: list[Path]) -> NanoQwenError:
    """The line for a folder of runs given where one run (plot, --resume) or one checkpoint (sample, gguf...) is
    read: what to `give` instead, and the first few of the `choices`."""
    return NanoQwenError(f"{folder} is a folder of runs; give {give}: {first_few(choices)}")


def first_few(paths: list[Path]) -> str:
    """The first three of `paths`, for a line that offers them as choices."""
    return " ".join(map(str, paths[:3])) + (" ..." if len(paths) > 3 else "")


def is_run_record(saved: Any) -> bool:
    """Whether parsed JSON is a run folder's config.json (not a model's, nor a preset)."""
    return isinstance(saved, dict) and set(RUN_CONFIG_KEYS) <= saved.keys()


def remove_orphans(final: Path) -> None:
    """Clean up after processes that died mid-write (kill -9, power loss): remove their temporary folders
    and files beside `final`, and put back the previous `final` that one moved aside just before it died (between
    atomic_dir's two renames), if `final` is missing. Their names carry the writer's pid, and a pid with
    no process behind it will never finish."""
    for kind in ("old", "tmp"):
        for orphan in sorted(final.parent.glob(f".{final.name}.{kind}-*")):
            pid = orphan.name[len(f".{final.name}.{kind}-"):].split("-")[0]
            if not pid.isdigit() or (kind == "old" and not orphan.is_dir()) or writer_alive(int(pid)):
                continue
            try:
                if kind == "old" and not final.exists():
                    orphan.rename(final)
                elif orphan.is_dir():
                    shutil.rmtree(orphan, ignore_errors=True)
                else:  # atomic_path's
                    orphan.unlink()
            except FileNotFoundError:
                pass  # another process (a rank of the same job) got there first


def writer_alive(pid: int) -> bool:
    if sys.platform == "win32":
        return windows_process_alive(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # alive under another user, or not a pid at all: leave its files alone
    return True


WINDOWS_NO_SUCH_PROCESS = 87  # ERROR_INVALID_PARAMETER, OpenProcess's word for a process id that is not in use
WINDOWS_SYNCHRONIZE = 0x00100000  # the right to wait for a process to end: all that is asked of it


def windows_process_alive(pid: int) -> bool:
    """writer_alive on Windows, asked through a handle on the process: there os.kill's signal 0 is CTRL_C_EVENT, a
    Ctrl-C to every process of the console (this one too) that never says whether `pid` is gone, and any other
    signal ends the process."""
    import _winapi

    try:
        handle = _winapi.OpenProcess(WINDOWS_SYNCHRONIZE, False, pid)
    except OverflowError:
        return True  # not a process id at all: leave its files alone
    except OSError as e:
        return getattr(e, "winerror", None) != WINDOWS_NO_SUCH_PROCESS  # access denied: another user's, alive
    try:
        return _winapi.WaitForSingleObject(handle, 0) != _winapi.WAIT_OBJECT_0  # signalled: it has ended
    finally:
        _winapi.CloseHandle(handle)


def hold_lock(folder: Path) -> IO[str] | None:
    """An exclusive lock on `folder`/.lock for as long as the returned file stays open (the process's
    life): a second writer is refused in one line instead of interleaving its files with the first's.
    flock, or on Windows (which has none) a lock on the file's first byte; None where neither exists."""
    try:
        import fcntl
    except ImportError:  # Windows
        fcntl = None  # type: ignore[assignment]
        try:
            import msvcrt
        except ImportError:
            return None
    make_run_folder(folder)
    handle = open(folder.absolute() / LOCK_FILE, "a")  # noqa: SIM115 (held open on purpose; named absolute)
    try:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            handle.seek(0)  # the same byte for every process (the file stays empty)
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
    except OSError as e:
        handle.close()
        if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):  # not a lock another holds
            raise
        raise NanoQwenError(f"{folder} is in use by another nanoqwen process; wait for it to finish (new work can "
                            "go elsewhere with --out)") from None
    return handle


def make_run_folder(folder: Path, exist_ok: bool = True) -> None:
    """mkdir -p, remembering the folders it made for release_lock (FileExistsError unless `exist_ok`)."""
    made = missing_folders(folder.absolute())
    folder.mkdir(parents=True, exist_ok=exist_ok)
    _made_for_runs.update(made)


def release_lock(handle: IO[str]) -> None:
    """Give up a hold_lock lock. A folder that holds nothing else (a run that failed to start) loses the lock file,
    and goes, with the runs/ above it, where this process made them: a folder the user made stays, empty."""
    lock = Path(handle.name)
    handle.close()
    above = [lock.parent, *lock.parent.parents]
    if [entry.name for entry in lock.parent.iterdir()] == [LOCK_FILE]:
        lock.unlink(missing_ok=True)
        # another process may have begun writing there meanwhile: what holds anything stays
        remove_if_empty(list(itertools.takewhile(lambda folder: folder in _made_for_runs, above)))
    _made_for_runs.difference_update(above)


@contextmanager
def atomic_path(final: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path beside `final` for a writer that opens files by name; synced to the disk and renamed
    over `final` on success (the rename synced too, as atomic_dir's is)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(final)  # what a writer killed mid-write left (a GGUF's: the model's size)
    try:  # named by this process, as atomic_dir's folder is: its orphan is known for one
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent)
    except OSError as e:
        raise refused_as_asked(e, final) from None
    os.close(fd)
    give_usual_mode(tmp)  # mkstemp makes it private
    try:
        yield Path(tmp)
        sync_file(tmp)  # on the disk before the name points at it
        try:
            rename_patiently(Path(tmp), final, over_file=True)
        except PermissionError:
            if sys.platform != "win32":
                raise
            raise NanoQwenError(f"cannot replace {final}: another program has it open (Windows replaces no file "
                                "then), or it is read-only; close it and run again, or write elsewhere") from None
        sync_file(final.parent)  # and the new name too: after a power cut, the new file rather than the old one
    except BaseException as e:
        full = no_space_left(e, Path(tmp), final)
        Path(tmp).unlink(missing_ok=True)
        if full:
            raise full from e
        raise


@contextmanager
def atomic_file(final: str | os.PathLike[str], mode: str = "w") -> Iterator[Any]:
    """Open a temporary file beside `final` for writing; it is renamed over `final` on success. Text is UTF-8 (not
    the locale's encoding: Windows' cp1252 holds little of what a model writes)."""
    with atomic_path(final) as tmp, open(tmp, mode, encoding=None if "b" in mode else "utf-8") as f:
        yield f


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    with atomic_file(path) as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def discard_output(stream: IO[str]) -> None:
    """Point `stream`'s file at /dev/null: its reader is gone, and later writes (or a flush at exit) must not fail."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, stream.fileno())
    os.close(devnull)


def reader_gone(error: OSError) -> bool:
    """Whether a write failed because no one reads the stream any more: a closed pipe, or a terminal hung up (the
    workers of a torchrun job closed with its terminal, in sessions of their own, are not ended by the hangup)."""
    return isinstance(error, BrokenPipeError) or error.errno == errno.EIO


class ReaderMayLeave:
    """stdout for a long job: once its reader is gone (`nanoqwen train ... | head`, or the terminal of a torchrun job
    closed), what is printed is dropped and the job goes on. Python raises BrokenPipeError (a hung-up terminal: EIO)
    at the next print, which ended a run unsaved."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except OSError as e:
            if not reader_gone(e):
                raise
            discard_output(self.stream)  # what is still buffered goes there too
            return len(text)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except OSError as e:
            if not reader_gone(e):
                raise
            discard_output(self.stream)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)
