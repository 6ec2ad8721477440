"""`nanoqwen prepare`: a corpus -> token ids -> `train.bin` / `val.bin` + `meta.json` + the tokenizer files.

Every document's ids are followed by `<|endoftext|>` (a text file is a document, or one per part between the
`<|endoftext|>`s written in it; one over 4 MB without them is a document per ~2 MB block, see
sources.LARGE_FILE_BYTES). Documents go to train or val whole, chosen by a seeded RNG. The folder is
written under a temporary name and renamed into place at the end, so any folder that `load_meta` accepts is
complete; running again with the same inputs and options reuses it.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import random
import re
import sys
import time
import unicodedata
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from shlex import quote
from typing import Any, BinaryIO, NamedTuple

import numpy as np
from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer
from tqdm import tqdm

from nanoqwen import __version__
from nanoqwen.data.sources import (
    CHAT_COLUMNS,
    COMPRESSIONS,
    DOCUMENT_SEPARATOR,
    SOURCES_HELP,
    SUFFIXES_SAID,
    ChatRecord,
    Corpus,
    CorpusStats,
    Document,
    counted_kinds,
    open_corpus,
    zstd_unread,
)
from nanoqwen.errors import NanoQwenError, OneCorpus, counted, decimal_number, seed_int, whole_number
from nanoqwen.io import (
    atomic_dir,
    check_replaceable,
    first_few,
    is_run_config,
    prepared_inside,
    real_path,
    remove_orphans,
    trained_on,
    usable_cores,
    write_json,
)
from nanoqwen.tokenizer import (
    CHAT_TEMPLATE,
    CHAT_TEMPLATE_DIR,
    ENDOFTEXT,
    IM_END,
    IM_START,
    MAX_BPE_VOCAB,
    QWEN_FIRST_SPECIAL_ID,
    QWEN_PATTERN,
    QWEN_SPECIAL_TOKENS,
    QWEN_TEXT_TOKENS,
    QWEN_TIKTOKEN_MD5,
    Tokenizer,
    find_qwen_tiktoken,
    is_mark,
    load_tiktoken_ranks,
    load_tokenizer,
    qwen3_tokenizer,
    resolve_tokenizer,
    train_bpe,
)

META_VERSION = 1
# In the fingerprint: folders split by an older rule are redone. 2: val could be 58% of a file. 3: a held document
# over 8 KB is cut where --val-fraction of the text is under MIN_CUT_VAL_BYTES (it went to val whole: a third of
# three notes); a folder split by rule 2 with more text is split alike, and kept (see _split_alike).
SPLIT_RULE = 3
META_KEYS = ("version", "nanoqwen_version", "created", "source", "tokenizer", "vocab_size", "eot_id", "dtype",
             "splits", "replacement_chars", "skipped", "fingerprint")
SPLITS = ("train", "val")
DTYPE = np.dtype("<u4")  # little-endian uint32: Qwen ids do not fit in uint16
DEFAULT_VAL_FRACTION = 0.01  # and at least one document (or part of the only one) is always held out
# prepare's defaults, left out of the command load_meta names to make a folder again
PREPARE_DEFAULTS: dict[str, object] = {"split": "train", "val_fraction": DEFAULT_VAL_FRACTION, "seed": 0}
BATCH_CHARS = 1 << 21  # text per encode call: enough to keep every core busy, small enough to bound memory
PIECE_CHARS = 1 << 16  # long documents are encoded in pieces of about this size, so one big file uses every core
SHORT_PIECE = 1024  # characters: below this tiktoken encodes faster in one thread than in its batch call
PROGRESS_SECONDS = 30.0  # off a terminal (nohup, a log file, CI), where tqdm draws nothing: a plain line this often


class RenderedChat(str):
    """A conversation as its chat template writes it: the tokenizer's control tokens in it (<|im_start|>...)
    are encoded as their ids, as Transformers encodes apply_chat_template's text; in a plain text they are text."""


class Encoded(NamedTuple):
    """One document, encoded."""

    text: str
    nbytes: int
    """Its UTF-8 length (of a chat: of its text, without the control tokens)."""
    ids: np.ndarray
    """Its token ids, ending with <|endoftext|>."""


# -- command line ------------------------------------------------------------------------------------

def parse_size(text: str) -> int:
    """`500000`, `100MB`, `2G` -> bytes (decimal units)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)b?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 500000, 100MB, 2G)")
    size = int(float(m[1]) * 1000 ** "_kmgt".index(m[2].lower() or "_"))
    if size < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is less than one byte; give a size of at least 1")
    return size


def add_reading_arguments(p: argparse.ArgumentParser) -> None:
    """How a corpus is read (`open_corpus`): for prepare and for `tokenizer train`."""
    p.add_argument("--text-column", default=None, metavar="NAME",
                   help="field or column holding the text (default: text; data.text: the text field of an object "
                        "in the data field; records without one are read as chats from messages or conversations)")
    p.add_argument("--split", default="train", metavar="NAME",
                   help="split of a Hugging Face dataset (default: %(default)s)")
    p.add_argument("--max-bytes", type=parse_size, default=None, metavar="SIZE",
                   help="stop after this much text, e.g. 100MB (wikipedia-intros: 100MB unless given)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="shakespeare", metavar="SRC", action=OneCorpus,
                   help=f"corpus: {SOURCES_HELP} (default: %(default)s)")
    p.add_argument("--tokenizer", default="qwen3", metavar="TOK",
                   help="qwen3 (official, default), bpe:N (a byte-level BPE of N ids trained on the corpus), "
                        "or a tokenizer folder")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output folder (train.bin, val.bin, meta.json, tokenizer files)")
    p.add_argument("--val-fraction", type=decimal_number, default=None, metavar="F",
                   help=f"share of documents held out for validation (default {DEFAULT_VAL_FRACTION}; "
                        "at least one document either way)")
    p.add_argument("--seed", type=seed_int, default=0, metavar="N",
                   help="seed of the train/val split (default: %(default)s)")
    add_reading_arguments(p)
    p.add_argument("--force", action="store_true", help="rebuild even if DIR already holds the same result")
    p.add_argument("--workers", type=whole_number, default=None, metavar="N",
                   help="tokenizer threads (default: every core)")


def run(args: argparse.Namespace) -> int:
    prepare(args.dataset, args.tokenizer, args.out, val_fraction=args.val_fraction, seed=args.seed,
            text_column=args.text_column, split=args.split, max_bytes=args.max_bytes, force=args.force,
            workers=args.workers, replace_other=False)
    return 0


def train_tokenizer_command(args: argparse.Namespace) -> int:
    """`nanoqwen tokenizer train --dataset SRC --vocab-size N --out DIR`."""
    corpus = open_corpus(args.dataset, text_column=args.text_column, split=args.split, max_bytes=args.max_bytes)
    out = Path(args.out)
    check_replaceable(out, "tokenizer")
    start = time.perf_counter()
    with atomic_dir(out) as tmp:  # made first: an --out that cannot be written fails before the training, not after
        tokenizer, documents, nbytes = _train_on(corpus, args.vocab_size, progress=True)
        tokenizer.save(tmp)
    _warn_about(corpus.stats, in_meta=False)  # no meta.json here
    print(f"trained a byte-level BPE of {tokenizer.vocab_size} ids on {counted(documents, 'document')} "
          f"({data_size(nbytes)}) in {time.perf_counter() - start:.1f} s -> {out}")
    return 0


# -- the Python API ----------------------------------------------------------------------------------

def prepare(dataset: str, tokenizer: str, out: str | os.PathLike[str], *, val_fraction: float | None = None,
            seed: int = 0, text_column: str | None = None, split: str = "train", max_bytes: int | None = None,
            force: bool = False, workers: int | None = None, progress: bool = True,
            replace_other: bool = True) -> Path:
    """Tokenize `dataset` with `tokenizer` into the folder `out` (see the module docstring); returns `out`.

    `tokenizer` is `qwen3`, `bpe:N` or a tokenizer folder. If `out` already holds the result of the same
    inputs and options it is reused, unless `force`. One prepared from other inputs or options is replaced,
    unless `replace_other` is false (the `prepare` command's way): then only `force` replaces it.
    """
    out = Path(out).expanduser()  # ~ as open_corpus takes it, for callers from Python (the CLI expands its own)
    val_fraction = DEFAULT_VAL_FRACTION if val_fraction is None else val_fraction
    if not 0 < val_fraction < 1:
        raise NanoQwenError(f"--val-fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if workers is not None:
        if workers < 1:
            raise NanoQwenError(f"--workers must be at least 1, got {workers}")
        cores = usable_cores()
        if workers > cores:  # the thread pool starts them all: a huge number hung prepare
            print(f"note: --workers {workers} is more than the {counted(cores, 'core')} here; using {cores}")
            workers = cores
        # tokenizers' thread pool reads this when it first starts: it takes effect in a fresh process (the CLI)
        os.environ["RAYON_NUM_THREADS"] = str(workers)
    tokenizer_id = tokenizer_identity(tokenizer)  # bad specs fail before any reading
    corpus = open_corpus(dataset, text_column=text_column, split=split, max_bytes=max_bytes)

    def fingerprint_of(corpus_fingerprint: str, split_rule: int = SPLIT_RULE) -> str:
        return hashlib.sha256(json.dumps(
            {"format": META_VERSION, "split_rule": split_rule, "corpus": corpus_fingerprint,
             "max_bytes": corpus.max_bytes, "tokenizer": tokenizer_id, "val_fraction": val_fraction, "seed": seed},
            sort_keys=True).encode()).hexdigest()

    fingerprint = fingerprint_of(corpus.fingerprint)
    rule_2 = fingerprint_of(corpus.fingerprint, split_rule=2)
    made_otherwise = None if force else _made_otherwise(out, tokenizer, (fingerprint, rule_2))
    if not force and not made_otherwise and (_holds(out, fingerprint) or _holds(out, rule_2) and
                                             _split_alike(out, val_fraction)):
        remove_orphans(real_path(out))  # what a killed --force rebuild left beside it
        if progress:
            rebuild = "" if replace_other else "; --force rebuilds it"  # the prepare command's flag: train has none
            print(f"{out} is up to date (same inputs and options){rebuild}")
        return out
    check_replaceable(out, "data")
    # Whole or not, a folder made from other inputs may be what a run trained on: it resumes only from that data.
    recorded = _recorded(out / "meta.json", "fingerprint")
    other = not force and (out / "meta.json").is_file() and (recorded != fingerprint or made_otherwise is not None)
    # The same inputs, read otherwise by an older nanoqwen (before text files were parted at the separator, before
    # it read compressed files, tables, chats or UTF-16 lines, or its chats were written by another ChatML template)
    # or without zstandard: said so, not as other inputs.
    former = made_otherwise or next((made for fp, made in corpus.former_fingerprints.items()
                                     if recorded in (fingerprint_of(fp), fingerprint_of(fp, split_rule=2))), None) \
        if other else None
    earlier_split = "was split into train and val by an earlier rule, which could give val far more than " \
        "--val-fraction of a small corpus" if other and recorded == rule_2 else None
    if other and not replace_other:
        made = former or earlier_split or "holds data prepared from other inputs or options"
        raise NanoQwenError(f"{out} {made} (runs trained on it resume only from it); give --force to replace it, or "
                            "another --out")
    if other and progress:
        made = former or earlier_split or "was prepared from other inputs or options"
        print(f"{out} {made}; preparing it again (runs trained on it will not resume on the new data: prepare into "
              "another --out to keep it)", flush=True)

    start = time.perf_counter()
    documents = corpus.documents()
    first = next(documents, None)  # an empty corpus fails here, before any tokenizer work or folder
    if first is None:
        raise corpus.empty_error()
    with atomic_dir(out) as tmp:
        if tokenizer.startswith("bpe:"):
            documents.close()
            tok = _train_on(corpus, _bpe_size(tokenizer), progress)[0]
            documents = corpus.documents()  # a second pass, now to encode
        else:
            tok = resolve_tokenizer(tokenizer)
            if tok.token_id(ENDOFTEXT) is None:  # (a BERT-style folder) the id every document ends with
                raise NanoQwenError(f"tokenizer {tokenizer} has no {ENDOFTEXT} token, which prepare writes after each "
                                    "document; use qwen3, bpe:N, or a tokenizer folder that has it")
            documents = itertools.chain([first], documents)
        with _SplitWriter(tmp, val_fraction, seed, ControlTokens(tok)) as writer:
            _encode_corpus(_rendered(documents, tok), tok, tokenizer, writer, workers, progress)
        if writer.documents == 0:
            raise corpus.empty_error()
        tok.save(tmp)
        meta = {
            "version": META_VERSION,
            "nanoqwen_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "source": dataset,
            "tokenizer": tokenizer,
            "vocab_size": tok.vocab_size,
            "eot_id": tok.eot_id,
            "dtype": "uint32",
            "splits": writer.counts,  # each split's documents as its .bin holds them: a cut one is in both
            "cut_documents": writer.cut,
            "conversations": writer.conversations,
            "parted_documents": corpus.stats.parted_documents,  # read from text files parted at <|endoftext|>
            "replacement_chars": corpus.stats.replacement_chars,
            "skipped": corpus.stats.skipped,
            "copies_left_out": corpus.stats.copies,  # {a file left out: the file of the same bytes read}
            "fingerprint": fingerprint,
            # How it was made besides source and tokenizer: what `load_meta` names to make it again.
            "options": {"text_column": text_column, "split": split, "max_bytes": max_bytes,
                        "val_fraction": val_fraction, "seed": seed},
        }
        write_json(tmp / "meta.json", meta)  # written last: its presence marks a complete folder
    _warn_about(corpus.stats)
    if progress:
        seconds = time.perf_counter() - start
        total = sum(s["bytes"] for s in writer.counts.values())
        parts = "; ".join(f"{name} {counted(s['documents'], 'document')}, {counted(s['tokens'], 'token')}"
                          for name, s in writer.counts.items())
        # Told apart: a cut document in both splits' counts reads as one more than the corpus holds.
        cut = f"{counted(writer.documents, 'document')} read, {'the last ' if writer.documents > 1 else ''}cut " \
            "between them; " if writer.cut else ""
        print(f"prepared {out}: {parts} ({cut}{data_size(total)} of text in {seconds:.1f} s, "
              f"{data_size(total / seconds)}/s)")
    return out


def data_size(nbytes: float) -> str:
    """A size on screen in MB, kB or bytes (a small corpus is not "0.0 MB")."""
    return f"{nbytes / 1e6:.1f} MB" if nbytes >= 1e6 else f"{nbytes / 1e3:.1f} kB" if nbytes >= 1e3 else \
        f"{nbytes:.0f} bytes"


class _ProgressLines:
    """Progress as plain lines on stderr, one every PROGRESS_SECONDS, where stderr is not a terminal (there the bars
    draw instead): as train prints a line every --log-interval steps where its output is not one."""

    def __init__(self, what: str, enabled: bool) -> None:
        self.what = what
        self.enabled = enabled and not sys.stderr.isatty()
        self.start = self.last = time.perf_counter()

    def update(self, nbytes: int, documents: int, tokens: int | None = None) -> None:
        """Print the counts so far (UTF-8 bytes of text, documents, tokens where known) if a line is due."""
        now = time.perf_counter()
        if not self.enabled or now - self.last < PROGRESS_SECONDS:
            return
        self.last = now
        counts = [data_size(nbytes), counted(documents, "document")] + \
            ([counted(tokens, "token")] if tokens is not None else [])
        rate = data_size(nbytes / max(now - self.start, 1e-9))
        print(f"{self.what}: {' | '.join(counts)} | {rate}/s", file=sys.stderr, flush=True)


def prepare_command(meta: Any, out: str | os.PathLike[str], tokenizer: str | None = None) -> str:
    """The `nanoqwen prepare` command that made the folder of `meta` (its meta.json, read as it is), into `out`, with
    `tokenizer` in place of its own where given; SRC and no options where `meta` does not say (older folders)."""
    made_by = isinstance(meta, dict) and isinstance(meta.get("source"), str) and \
        isinstance(meta.get("tokenizer"), str) and isinstance(meta.get("options"), dict)
    tokenizer = tokenizer or (meta["tokenizer"] if made_by else None)
    options = "".join(f" --{name.replace('_', '-')} {quote(str(value))}" for name, value in meta["options"].items()
                      if value is not None and value != PREPARE_DEFAULTS.get(name)) if made_by else ""
    return (f"nanoqwen prepare --dataset {quote(meta['source']) if made_by else 'SRC'}"
            f"{f' --tokenizer {quote(tokenizer)}' if tokenizer else ''}{options} --out {quote(str(out))}")


def load_meta(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """meta.json of a prepared folder, after checking that the folder is complete (else one clear error)."""
    folder = Path(folder)
    redo = f"run `{prepare_command(None, folder)} --force`"
    path = folder / "meta.json"
    if not path.is_file():
        if not folder.exists():
            raise NanoQwenError(f"{folder} does not exist; run `{prepare_command(None, folder)}`")
        # A run, a checkpoint or a folder of texts given by mistake: preparing into it would be refused.
        if folder.is_file() and (folder.parent / "meta.json").is_file():  # its val.bin, say: not a corpus to prepare
            what = f"a file of the prepared folder {folder.parent}; give that folder"
        elif is_run_config(folder / "config.json"):
            what = f"a run folder, not prepared data; {trained_on(folder)}"
        elif (folder / "config.json").is_file():
            what = "a checkpoint, not prepared data; give the folder `nanoqwen prepare --out DIR` wrote"
        elif prepared := prepared_inside(folder):
            what = f"a folder of prepared data folders; give one of them: {first_few(prepared)}"
        else:
            what = (f"not a prepared data folder (no meta.json); to prepare the texts in it: `nanoqwen prepare "
                    f"--dataset {folder} --out DIR`, or `nanoqwen train --dataset {folder}`")
        raise NanoQwenError(f"{folder} is {what}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise NanoQwenError(f"{path} is damaged; {redo}") from None
    if not isinstance(meta, dict) or meta.get("version") != META_VERSION:
        raise NanoQwenError(f"{path} is not a version-{META_VERSION} nanoqwen meta.json; {redo}")
    redo = f"run `{prepare_command(meta, folder)} --force`"
    missing = [key for key in META_KEYS if key not in meta]
    if missing:
        raise NanoQwenError(f"{path} lacks {', '.join(missing)}; {redo}")
    for name in SPLITS:
        shard = folder / f"{name}.bin"
        try:
            expected = int(meta["splits"][name]["tokens"]) * DTYPE.itemsize
        except (KeyError, TypeError, ValueError):
            raise NanoQwenError(f"{path} has no token count for {name}; {redo}") from None
        if not shard.is_file() or shard.stat().st_size != expected:
            raise NanoQwenError(f"{shard} is missing or not {expected} bytes long; {redo}")
    if not (folder / "tokenizer.json").is_file():
        raise NanoQwenError(f"{folder} has no tokenizer.json; {redo}")
    return meta


def data_tokenizer(folder: str | os.PathLike[str]) -> Tokenizer:
    """The tokenizer a prepared folder carries into checkpoints: its files, where a folder of plain text prepared with
    qwen3 or bpe:N has this nanoqwen's ChatML template, not the one of the release that prepared it (none of its
    tokens depends on it: the folder stays up to date when the template changes). Conversations keep theirs."""
    tokenizer = load_tokenizer(folder)
    meta = load_meta(folder)
    if meta.get("conversations") or not writes_built_in_template(meta["tokenizer"]):
        return tokenizer
    return Tokenizer(tokenizer.hf, {**tokenizer.config, "chat_template": CHAT_TEMPLATE})


# -- tokenizer ---------------------------------------------------------------------------------------

def _bpe_size(spec: str) -> int:
    size = spec[len("bpe:"):]
    if not re.fullmatch("[0-9]+", size):  # (str.isdigit takes a superscript 2, which int() refuses)
        raise NanoQwenError(f"bad tokenizer {spec!r}; write bpe:N with N the vocabulary size, e.g. bpe:8192")
    if int(size) > MAX_BPE_VOCAB:  # refused before the corpus is read (train_bpe checks it too)
        raise NanoQwenError(f"{spec}: at most bpe:{MAX_BPE_VOCAB} (Qwen3's vocabulary has 151,669 ids); "
                            "choose a smaller N")
    return int(size)


def tokenizer_identity(spec: str) -> str:
    """What the result depends on, for the fingerprint; raises for a spec that names no tokenizer. The built-in
    chat template that qwen3 and bpe:N write chats with is not in it (plain text holds none of its tokens, and a
    release that changed it would prepare every folder of text again): see _made_otherwise."""
    if spec == "qwen3":
        return f"qwen3 md5:{QWEN_TIKTOKEN_MD5}"
    if spec.startswith("bpe:"):
        return f"bpe:{_bpe_size(spec)}"
    folder = Path(spec).expanduser()
    if folder.is_dir() and (folder / "tokenizer.json").is_file():
        # Its config and chat templates too: the data folder carries them into every checkpoint trained on it.
        digest = hashlib.sha256()
        named = sorted(str(path.relative_to(folder)) for path in (folder / CHAT_TEMPLATE_DIR).glob("*.jinja"))
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", *named):
            if (folder / name).is_file():
                digest.update(name.encode() + b"\0" + (folder / name).read_bytes())
        return "sha256:" + digest.hexdigest()
    resolve_tokenizer(spec)  # raises the error that names the problem
    raise AssertionError("unreachable")


def _train_on(corpus: Corpus, vocab_size: int, progress: bool) -> tuple[Tokenizer, int, int]:
    """A BPE trained on every document of `corpus`, the number of documents and their UTF-8 bytes."""
    seen = {"documents": 0, "bytes": 0}  # counted as the trainer reads the corpus
    lines = _ProgressLines("training the BPE", progress)  # the trainer's own bars draw only on a terminal

    def texts() -> Iterator[str]:
        for document in corpus.documents():
            text = document.text if isinstance(document, ChatRecord) else document
            seen["documents"] += 1
            seen["bytes"] += len(text.encode("utf-8"))
            lines.update(seen["bytes"], seen["documents"])
            yield from _pieces(text)  # the same words to count as the whole text, in bounded memory
        if lines.enabled and seen["documents"]:  # merging draws a bar on a terminal alone: said, lest a log look hung
            print(f"training the BPE: read {counted(seen['documents'], 'document')} ({data_size(seen['bytes'])}); "
                  f"merging pairs into {vocab_size:,} ids, which prints nothing until it ends (minutes, for a large "
                  "corpus)", file=sys.stderr, flush=True)

    tokenizer = train_bpe(texts(), vocab_size, show_progress=progress and sys.stderr.isatty())
    if seen["documents"] == 0:
        raise corpus.empty_error()
    if tokenizer.vocab_size < vocab_size and progress:
        print(f"note: the corpus has too little text for {vocab_size} BPE ids; the tokenizer has "
              f"{tokenizer.vocab_size} (no pair of tokens left to merge)", file=sys.stderr)
    return tokenizer, seen["documents"], seen["bytes"]


def piece_safe(hf: HFTokenizer) -> bool:
    """Whether `_pieces` keeps ids unchanged: true for Qwen's NFC + regex + byte-level pipeline."""
    normalizer = json.loads(hf.normalizer.__getstate__()) if hf.normalizer else {"type": "NFC"}
    steps = json.loads(hf.pre_tokenizer.__getstate__()) if hf.pre_tokenizer else {}
    steps = steps.get("pretokenizers", [steps])
    return (normalizer == {"type": "NFC"} and len(steps) >= 2 and steps[0].get("type") == "Split"
            and steps[0].get("pattern") == {"Regex": QWEN_PATTERN} and steps[0].get("behavior") == "Isolated"
            and not steps[0].get("invert")
            and all(s.get("type") == "ByteLevel" and not s.get("add_prefix_space") and not s.get("use_regex")
                    for s in steps[1:]))


# A newline followed by a word character: no match of Qwen's pre-tokenizer regex spans such a point
# (newlines only end a pre-token or continue into more whitespace), so cutting there changes no ids.
PIECE_BOUNDARY = re.compile(r"\n(?=\w)")
# Nor a space after a non-space: a run of letters, digits or punctuation stops before a space (only "\r\n" may end
# one of punctuation), and whitespace starts a pre-token of its own. A text without newlines (a record's: one
# document however long) is cut there, else it was encoded whole: 2 GB of memory for 18 MB with `tokenizers`.
SPACE_BOUNDARY = re.compile(r"(?<=\S)(?= )")


def _pieces(text: str) -> list[str]:
    """`text` cut into pieces of about PIECE_CHARS at safe boundaries, a newline before a word where one comes soon
    enough, else a space (one piece if there are none)."""
    pieces, start = [], 0
    while len(text) - start > 2 * PIECE_CHARS:
        near = start + PIECE_CHARS
        m = PIECE_BOUNDARY.search(text, near, near + PIECE_CHARS) or SPACE_BOUNDARY.search(text, near)
        if m is None:
            break
        pieces.append(text[start:m.end()])
        start = m.end()
    pieces.append(text[start:])
    return pieces


@lru_cache(maxsize=1)
def _qwen3_tiktoken() -> Any | None:
    """The official Qwen3 ranks as a `tiktoken` encoding, when tiktoken is installed (else None).

    tiktoken is the reference implementation of Qwen's BPE (the `tokenizers` version must give its ids,
    tested) and encodes about 5x faster per core, so prepare uses it for `qwen3`.
    """
    try:
        import tiktoken
    except ImportError:
        return None
    ranks = load_tiktoken_ranks(find_qwen_tiktoken())
    return tiktoken.Encoding("qwen3", pat_str=QWEN_PATTERN, mergeable_ranks=ranks, special_tokens={})


def _is_qwen3(tokenizer: Tokenizer) -> bool:
    """Whether a tokenizer folder (say, official Qwen3 weights') is the Qwen3 tokenizer: the same vocabulary
    and pipeline, so tiktoken's ids for the ranks are its ids too."""
    if tokenizer.vocab_size != QWEN_FIRST_SPECIAL_ID + len(QWEN_SPECIAL_TOKENS) or not piece_safe(tokenizer.hf):
        return False  # cheap checks first: most folders are BPEs of their own
    try:
        return tokenizer.fingerprint == _qwen3_fingerprint()
    except NanoQwenError:  # the Qwen ranks are not installed: encode with the folder's own tokenizer
        return False


@lru_cache(maxsize=1)
def _qwen3_fingerprint() -> str:
    """The Qwen3 tokenizer's fingerprint, once a process: loading it and hashing its 151,669 tokens took about a
    second each time a folder's tokenizer of its size was checked (every eval of such a checkpoint)."""
    return qwen3_tokenizer().fingerprint


def _rendered(documents: Iterator[Document], tokenizer: Tokenizer) -> Iterator[str]:
    """Texts as they are; chat records written by the tokenizer's chat template, as `chat` and `serve` write
    them (the end of a conversation is the <|endoftext|> that follows every document)."""
    control = ControlTokens(tokenizer)
    for document in documents:
        if not isinstance(document, ChatRecord):
            yield document
            continue
        if tokenizer.chat_format == "ChatML" and None in (tokenizer.token_id(IM_START), tokenizer.token_id(IM_END)):
            raise NanoQwenError(f"{document.where} is a chat, and the tokenizer has no {IM_START} and {IM_END} "
                                "tokens to write it with; use qwen3, bpe:N, or a tokenizer folder that has them")
        try:
            text = tokenizer.render_chat(list(document.messages), add_generation_prompt=False)
        except NanoQwenError as e:
            raise NanoQwenError(f"{document.where}: {e}") from None
        if document.silent and _as_if_blank(text, document, tokenizer):
            continue
        yield RenderedChat(control.normalized(text))


def _as_if_blank(text: str, chat: ChatRecord, tokenizer: Tokenizer) -> bool:
    """Whether `text`, a chat of blank turns as rendered, is what its turns render to without their tool calls and
    thinking: then the template wrote none of them (ChatML writes neither), and it holds nothing to train on."""
    try:
        return text == tokenizer.render_chat([{"role": m["role"], "content": m["content"]} for m in chat.messages],
                                             add_generation_prompt=False)
    except NanoQwenError:  # refused without them: the template needs what they carry, so it writes something
        return False


def _encoder(tokenizer: Tokenizer, spec: str, workers: int | None) -> Callable[[list[str]], list[Encoded]]:
    """A function from a batch of documents to their ids, each ending with <|endoftext|>.

    Both engines spread a batch over every core in native threads that release the GIL (`tokenizers`'
    encode_batch_fast skips offsets; tiktoken encodes `qwen3`). On 2 cores this matched a multiprocessing
    pool over batches, without the pool's start-up and pickling, and leaves the reading thread free to
    read the next batch meanwhile. A text's added tokens are text ("<|endoftext|>" written in it); a rendered
    chat's are ids, as Transformers encodes apply_chat_template's text.
    """
    control = ControlTokens(tokenizer)
    fast = _qwen3_tiktoken() if spec == "qwen3" or _is_qwen3(tokenizer) else None
    if fast is not None:
        threads = workers or usable_cores()

        def encode_pieces(pieces: list[str]) -> list[list[int]]:
            # The batch call spends a thread task on each piece, which costs more than encoding a short one (a
            # chat's turns): those are encoded here, one after another.
            return _encode_apart(pieces, lambda piece: len(piece) < SHORT_PIECE,
                                 lambda short: [fast.encode_ordinary(piece) for piece in short],
                                 lambda long: fast.encode_ordinary_batch(long, num_threads=threads))
        cut = True
    else:
        plain, native = _ordinary(tokenizer.hf), tokenizer.untruncated

        def encode_pieces(pieces: list[str]) -> list[list[int]]:
            # A chat whole, its added tokens found as Transformers finds them (their lstrip, rstrip, normalized).
            return _encode_apart(pieces, lambda piece: isinstance(piece, RenderedChat),
                                 lambda chats: _ids(native, chats), lambda texts: _ids(plain, texts))
        cut = piece_safe(plain)
    eot = np.array([tokenizer.eot_id], dtype=DTYPE)

    def items(text: str) -> tuple[list[str | int], int]:
        """A document as pieces of text to encode and, in a chat tiktoken encodes, its control tokens' ids (Qwen's
        carry no lstrip or rstrip: the text between them is all there is to encode); and its text's bytes."""
        if isinstance(text, RenderedChat) and fast is None:
            return [text], control.text_bytes(text)
        found: list[str | int] = []
        nbytes = 0
        for i, segment in enumerate(control.split(text) if isinstance(text, RenderedChat) else [text]):
            nbytes += control.segment_bytes(i, segment)
            if i % 2:  # a control token
                found.append(control.ids[segment])
            elif segment:
                found += _pieces(segment) if cut else [segment]
        return found, nbytes

    def encode(texts: list[str]) -> list[Encoded]:
        documents = [items(text) for text in texts]
        ids = iter(encode_pieces([item for doc, _ in documents for item in doc if isinstance(item, str)]))
        encoded = []
        for text, (doc, nbytes) in zip(texts, documents):
            parts = [np.asarray([item] if isinstance(item, int) else next(ids), dtype=DTYPE) for item in doc]
            encoded.append(Encoded(text, nbytes, np.concatenate([*parts, eot])))
        return encoded

    return encode


def encode_texts(tokenizer: Tokenizer, texts: list[str]) -> list[Encoded]:
    """Plain texts as prepare writes documents of them: NFC-normalized, their ids ending with <|endoftext|> (an added
    token written in one is text), and their UTF-8 bytes. eval --text-file scores a file's documents so, to measure
    what training measured."""
    return _encoder(tokenizer, "", None)([unicodedata.normalize("NFC", text) for text in texts])


def _ids(hf: HFTokenizer, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in hf.encode_batch_fast(texts, add_special_tokens=False)]


def _encode_apart(pieces: list[str], first: Callable[[str], bool], encode_first: Callable[[list[str]], list],
                  encode_rest: Callable[[list[str]], list]) -> list[list[int]]:
    """The ids of `pieces`, in order: those `first` picks encoded by `encode_first`, the rest by `encode_rest`."""
    picked = [i for i, piece in enumerate(pieces) if first(piece)]
    rest = sorted(set(range(len(pieces))) - set(picked))
    ids = dict(zip(picked, encode_first([pieces[i] for i in picked])))
    ids.update(zip(rest, encode_rest([pieces[i] for i in rest])))
    return [ids[i] for i in range(len(pieces))]


def _ordinary(hf: HFTokenizer) -> HFTokenizer:
    """A copy of `hf` for texts: its special tokens and Qwen's text tokens (<think>...) are text there, as
    tiktoken's encode_ordinary writes them; a folder's other added tokens (words of its own) keep their ids."""
    plain = HFTokenizer(hf.model)  # the same vocabulary and merges, shared: nothing to copy
    for part in ("normalizer", "pre_tokenizer", "post_processor", "decoder"):
        if getattr(hf, part) is not None:
            setattr(plain, part, getattr(hf, part))
    added = sorted(hf.get_added_tokens_decoder().items())
    for _, token in added:
        same = AddedToken(token.content, single_word=token.single_word, lstrip=token.lstrip, rstrip=token.rstrip,
                          normalized=token.normalized, special=is_mark(token))
        (plain.add_special_tokens if is_mark(token) else plain.add_tokens)([same])
    if any(plain.token_to_id(token.content) != i for i, token in added):  # ids with gaps: copy it whole
        spec = json.loads(hf.to_str())
        for token in spec["added_tokens"]:
            token["special"] = token["special"] or token["content"] in QWEN_TEXT_TOKENS
        plain = HFTokenizer.from_str(json.dumps(spec))
        plain.no_truncation()
        plain.no_padding()
    plain.encode_special_tokens = True  # special tokens written in a text are text
    return plain


class ControlTokens:
    """A tokenizer's added tokens (<|im_start|>, <think>...), which a rendered chat holds as ids."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        added = tokenizer.hf.get_added_tokens_decoder()
        self.ids = {token.content: i for i, token in added.items()}
        self.words = frozenset(token.content for token in added.values() if not is_mark(token))  # text, as ids
        longest_first = sorted(self.ids, key=len, reverse=True)
        self.pattern = re.compile("(" + "|".join(map(re.escape, longest_first)) + ")") if self.ids else None

    def split(self, text: str) -> list[str]:
        """`text` as text segments (even places) and the control tokens between them (odd places)."""
        return self.pattern.split(text) if self.pattern else [text]

    def normalized(self, text: str) -> str:
        """A rendered chat NFC-normalized between its control tokens, as Transformers' tokenizer does it (added
        tokens found first, then the rest normalized): NFC over the whole would fold a combining mark that
        follows one into it ("<|im_end|>" + U+0338 is "<|im_end|≯"), and tiktoken normalizes nothing itself
        (every key the template writes, tool calls and thinking too, must be normalized here)."""
        return "".join(unicodedata.normalize("NFC", s) if i % 2 == 0 else s for i, s in enumerate(self.split(text)))

    def text_bytes(self, text: str) -> int:
        """UTF-8 bytes of a chat's text, its marks left out (as <|endoftext|> is), as Tokenizer.text_bytes counts."""
        return sum(self.segment_bytes(place, segment) for place, segment in enumerate(self.split(text)))

    def segment_bytes(self, place: int, segment: str) -> int:
        """UTF-8 bytes of the text that the segment at `place` of `split` stands for: a mark's none, a folder's own
        added word's its own."""
        return 0 if place % 2 and segment not in self.words else len(segment.encode("utf-8"))

    def cut_outside(self, text: str, cut: int) -> int:
        """`cut`, or the start of the control token it falls inside."""
        for match in self.pattern.finditer(text) if self.pattern else ():
            if match.start() >= cut:
                break
            if cut < match.end():
                return match.start()
        return cut


# -- writing -----------------------------------------------------------------------------------------

MIN_CUT_VAL_BYTES = 4096  # a held document up to twice this goes to val whole, rather than a sliver of it


class _SplitWriter:
    """Appends documents to train.bin / val.bin, choosing each one's split with a seeded RNG.

    Until the first validation document appears, the latest train document is held back, so that it can
    become the validation set if none ever does: a corpus of a few documents still gets a non-empty val.bin.
    A corpus of one document is cut in two at a character boundary instead.

    Documents differ in size, and in a small folder one file can be most of the text: no document joins val
    when that would make val more than `cap` of the text so far (two thirds, or twice --val-fraction), and a
    held document over twice --val-fraction of the text is cut like a lone one (unless the text is so short that
    its cut would leave val a sliver), so that val stays near the fraction asked for.
    """

    def __init__(self, folder: Path, val_fraction: float, seed: int, control: ControlTokens) -> None:
        self.folder, self.val_fraction, self.control = folder, val_fraction, control
        self.cap = max(2 / 3, 2 * val_fraction)
        self.seen_bytes = 0
        self.rng = random.Random(seed)
        self.files: dict[str, BinaryIO] = {}
        self.counts = {name: {"documents": 0, "tokens": 0, "bytes": 0} for name in SPLITS}
        self.held: Encoded | None = None
        self.documents = 0  # read: the cut one is one, though its start is in train and its end in val
        self.cut = 0  # documents cut between the splits (0 or 1: the last one read)
        self.conversations = 0

    def __enter__(self) -> _SplitWriter:
        self.files = {name: open(self.folder / f"{name}.bin", "wb") for name in SPLITS}  # noqa: SIM115
        return self

    def __exit__(self, *exc: object) -> None:
        for f in self.files.values():
            f.close()

    def add(self, doc: Encoded) -> None:
        self.documents += 1
        self.conversations += isinstance(doc.text, RenderedChat)
        self.seen_bytes += doc.nbytes
        drawn = self.rng.random() < self.val_fraction  # drawn for every document: the same draws as before
        # Not the first document: were it the only one, val would hold it all (a --val-fraction of 0.5 or more).
        if drawn and self.documents > 1 and self.counts["val"]["bytes"] + doc.nbytes <= self.cap * self.seen_bytes:
            self._release()
            self._write("val", doc)
        elif self.counts["val"]["documents"]:
            self._write("train", doc)
        else:
            self._release()
            self.held = doc

    def finish(self, encode: Callable[[list[str]], list[Encoded]]) -> None:
        """Place the document held back: to val (whole or cut) if val has none. Train is never left empty:
        the first document never goes to val whole."""
        if self.held is None:
            return
        doc, self.held = self.held, None
        val_bytes = self.val_fraction * self.seen_bytes
        # Whole, if that is near --val-fraction of the text, or, where the text is so short that its fraction is
        # a sliver, if the document is small too; else cut, as a file read in blocks of 2 MiB once gave val 58%
        # of itself, and a folder of three 20 KB notes a third of their text.
        near = doc.nbytes <= 2 * max(val_bytes, MIN_CUT_VAL_BYTES)
        if self.documents > 1 and near and doc.nbytes <= self.cap * self.seen_bytes:
            self._write("val", doc)
            return
        # One document, or one too large to hold out whole: val gets --val-fraction of the text, from its end.
        share = min(0.5, val_bytes / max(doc.nbytes, 1))
        text = doc.text
        cut = min(max(round(len(text) * (1 - share)), 1), len(text) - 1)
        while cut < len(text) and unicodedata.combining(text[cut]):
            cut += 1  # keep combining marks with their base character
        if isinstance(text, RenderedChat):  # a chat's control tokens stay whole
            cut = self.control.cut_outside(text, cut)
        if not 0 < cut < len(text):
            raise NanoQwenError("the corpus is one document too short to split into train and val; "
                                "give it more text")
        train, val = encode([type(text)(text[:cut]), type(text)(text[cut:])])
        self._write("train", train)
        self._write("val", val)
        self.cut += 1

    def _release(self) -> None:
        if self.held is not None:
            self._write("train", self.held)
            self.held = None

    def _write(self, name: str, doc: Encoded) -> None:
        _, nbytes, ids = doc
        self.files[name].write(ids.tobytes())
        counts = self.counts[name]
        counts["documents"] += 1
        counts["tokens"] += len(ids)
        counts["bytes"] += nbytes


def _batches(documents: Iterator[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for text in documents:
        batch.append(text)
        size += len(text)
        if size >= BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _encode_corpus(documents: Iterator[str], tokenizer: Tokenizer, spec: str, writer: _SplitWriter,
                   workers: int | None, progress: bool) -> None:
    """Read, encode and write with one batch in flight: reading the next batch overlaps encoding this one."""
    encode = _encoder(tokenizer, spec, workers)
    tokens = nbytes = 0
    lines = _ProgressLines("prepare", progress)
    with ThreadPoolExecutor(max_workers=1) as pool, tqdm(
            desc="prepare", unit="B", unit_scale=True, disable=None if progress else True, leave=False,
            file=sys.stderr) as bar:
        inflight: deque[Future[list[Encoded]]] = deque()

        def write_oldest() -> None:
            nonlocal tokens, nbytes
            done = inflight.popleft().result()
            for doc in done:
                writer.add(doc)
                tokens += len(doc.ids)
            bar.set_postfix_str(f"{writer.documents:,} docs, {tokens:,} tokens", refresh=False)
            written = sum(doc.nbytes for doc in done)
            bar.update(written)
            nbytes += written
            lines.update(nbytes, writer.documents, tokens)

        for batch in _batches(documents):
            inflight.append(pool.submit(encode, batch))
            if len(inflight) > 1:
                write_oldest()
        while inflight:
            write_oldest()
    writer.finish(encode)


# -- checks and messages -----------------------------------------------------------------------------

def _recorded(path: Path, key: str) -> Any:
    """What the JSON object in `path` (meta.json, tokenizer_config.json) records under `key`, complete folder or not
    (None: unreadable, or none)."""
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return recorded.get(key) if isinstance(recorded, dict) else None


def _holds(out: Path, fingerprint: str) -> bool:
    """Whether `out` is a complete folder made from the same inputs and options."""
    try:
        return load_meta(out)["fingerprint"] == fingerprint
    except NanoQwenError:
        return False


def writes_built_in_template(spec: str) -> bool:
    """Whether the tokenizer `spec` writes chats with nanoqwen's ChatML template (CHAT_TEMPLATE), which its
    identity leaves out: qwen3 and bpe:N (a tokenizer folder's own template is in its identity)."""
    return spec == "qwen3" or spec.startswith("bpe:")


def _made_otherwise(out: Path, tokenizer: str, fingerprints: tuple[str, ...]) -> str | None:
    """Why the folder `out` holds other data than the same inputs give now (it records one of their `fingerprints`):
    files an older nanoqwen skipped and this one reads, as its meta.json lists them, or conversations written with
    another built-in chat template than this nanoqwen's (or with one no longer recorded); None if neither (or no
    complete folder, or other inputs)."""
    try:
        meta = load_meta(out)
    except NanoQwenError:
        return None
    if meta.get("fingerprint") not in fingerprints:  # other inputs (another tokenizer's template): said as such
        return None
    # The chat template a folder's conversations were written with is the one its tokenizer_config.json records.
    config = out / "tokenizer_config.json"
    if meta.get("conversations") and writes_built_in_template(tokenizer) and \
            _recorded(config, "chat_template") != CHAT_TEMPLATE:
        if not config.is_file():  # deleted by hand: which template wrote them is unknown, not an older one
            return f"has no {config.name}, the record of the chat template its conversations were written with"
        return "holds conversations written with an older nanoqwen's chat template"
    # Made before chat records were read, a folder skipped .json files of them, its reason naming their fields; made
    # before UTF-16/32 tables and JSON lines were read, it skipped those, said "read line by line as UTF-8".
    if "conversations" not in meta and any("not JSON records" in skip["reason"] and
                                           any(name in skip["reason"] for name in CHAT_COLUMNS)
                                           for skip in meta["skipped"]):
        return "was prepared by an older nanoqwen, which skipped the chat records of its .json files (read since)"
    if any("read line by line as UTF-8" in skip["reason"] for skip in meta["skipped"]):
        return "was prepared by an older nanoqwen, which skipped its UTF-16/32 tables and JSON lines (read since)"
    return None


def _split_alike(out: Path, val_fraction: float) -> bool:
    """Whether the folder `out`, split by SPLIT_RULE 2 with `val_fraction` (its fingerprint holds it), is split as
    the rule now splits it: the rules differ only where that fraction of its text is under MIN_CUT_VAL_BYTES."""
    text_bytes = sum(split["bytes"] for split in load_meta(out)["splits"].values())
    return val_fraction * text_bytes >= MIN_CUT_VAL_BYTES


SHOWN_SKIPS = 10  # skipped files named on screen: a scraped corpus may have thousands of empty pages


def _warn_about(stats: CorpusStats, in_meta: bool = True) -> None:
    """Say what was skipped, left out, replaced or parted; `in_meta`: the replacements are in the meta.json written,
    and the documents end with <|endoftext|> ids (prepare)."""
    for skipped in stats.skipped[:SHOWN_SKIPS]:
        print(f"nanoqwen: warning: skipped {skipped['path']}: {skipped['reason']}", file=sys.stderr)
    unnamed = len(stats.skipped) - SHOWN_SKIPS
    if unnamed > 0:
        where = " (each is in meta.json's skipped)" if in_meta else ""
        print(f"nanoqwen: warning: skipped {counted(unnamed, 'more file')}{where}", file=sys.stderr)
    for note in stats.notes:
        print(f"note: {note}", file=sys.stderr)
    if stats.parted_files:
        ended = f"each document ends with the {DOCUMENT_SEPARATOR} id; the separators are not in its text" if in_meta \
            else "the separators are not in their text"  # tokenizer train writes no ids
        print(f"note: read {counted(stats.parted_documents, 'document')} from "
              f"{counted(stats.parted_files, 'text file')} parted by the {DOCUMENT_SEPARATOR} written between them "
              f"({ended})", file=sys.stderr)
    left_out = [p for p in stats.left_out if not zstd_unread(Path(p))]  # those have a note of their own
    if left_out:
        print(f"note: left out {counted(len(left_out), 'file')} that {'is' if len(left_out) == 1 else 'are'} "
              f"not {SUFFIXES_SAID} ({counted_kinds(left_out)}; such as {left_out[0]}); convert "
              f"{'it if it holds' if len(left_out) == 1 else 'any that hold'} text to one of those", file=sys.stderr)
    if stats.copies:  # one line, however many: a scraped corpus may hold thousands
        copy, first = next(iter(stats.copies.items()))
        which = f"{copy}, a copy of {first}" if len(stats.copies) == 1 else \
            f"{len(stats.copies):,} files that hold the same bytes as a file read (such as {copy}, a copy of {first})"
        listed = "; meta.json's copies_left_out names each" if in_meta else ""
        print(f"note: left out {which}: each text is read once, so that it is not in train and val both "
              f"(copying a file does not weight its text{listed})", file=sys.stderr)
    if stats.replacement_chars:
        where = stats.replaced_in[:3] + ([f"{len(stats.replaced_in) - 3} more files"] if stats.replaced_in[3:] else [])
        # the likeliest other encoding's fix, for a file a shell can convert (the text of a compressed one cannot be)
        plain = [path for path in stats.replaced_in if Path(path).suffix.lower() not in COMPRESSIONS]
        name = quote(plain[0]) if plain else "FILE"
        print(f"nanoqwen: warning: replaced {stats.replacement_chars:,} undecodable byte sequences with U+FFFD "
              f"{'in ' + ', '.join(where) + ' ' if where else ''}({'counted in meta.json; ' if in_meta else ''}"
              "is the text in another encoding? UTF-8 and UTF-16/32 with a byte-order mark are read; Latin-1/Windows "
              f"text converts in place with `iconv -f cp1252 -t utf-8 {name} > {name}.new && mv {name}.new {name}`)",
              file=sys.stderr)
