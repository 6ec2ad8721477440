"""Loss, accuracy, perplexity and bits per byte of a model on a token stream."""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from shlex import quote
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from nanoqwen.data.loader import check_token_ids
from nanoqwen.data.sources import (
    DOCUMENT_SEPARATOR,
    NOT_UTF8,
    ONLY_SEPARATORS,
    SUFFIXES,
    TEXT_SUFFIXES,
    TextDecoder,
    before_partial_separator,
    conversion_hint,
    file_type,
    open_binary,
    said_if_damaged,
    separated_documents,
    undecodable,
    universal_newlines,
    zstd_unread,
)
from nanoqwen.errors import NanoQwenError, positive_int
from nanoqwen.io import json_line
from nanoqwen.loss import IGNORE_INDEX
from nanoqwen.model import Qwen3

if TYPE_CHECKING:
    from nanoqwen.data.loader import ChatMarks, TokenSplit
    from nanoqwen.tokenizer import Tokenizer


def score_positions(model: Qwen3, hidden: torch.Tensor, targets: torch.Tensor, chunk: int = 1024
                    ) -> tuple[float, int, int]:
    """Sum of next-token NLL, correct argmax predictions and count, projecting `chunk` positions at a time
    so the (tokens, vocab) logits never exist whole. hidden (N, C), targets (N,), IGNORE_INDEX = skip."""
    total_nats, correct = 0.0, 0
    for start in range(0, hidden.shape[0], chunk):
        t = targets[start:start + chunk]
        logits = model.lm_head(hidden[start:start + chunk]).float()
        total_nats += F.cross_entropy(logits, t, ignore_index=IGNORE_INDEX, reduction="sum").item()
        correct += int(((logits.argmax(-1) == t) & (t != IGNORE_INDEX)).sum())
    return total_nats, correct, int((targets != IGNORE_INDEX).sum())


SLICE_TOKENS = 1 << 22  # eval --data holds a split this many tokens at a time (32 MB as int64), not whole


def windows_per_forward(context: int, batch_size: int | None) -> int:
    return batch_size or max(1, 16384 // context)  # ~16k tokens


@contextlib.contextmanager
def scoring(model: Qwen3) -> Iterator[None]:
    """The model in eval mode, without autograd, for scoring; its mode as it was afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def batch_scores(model: Qwen3, tokens: torch.Tensor, context: int, batch_size: int,
                 scored: torch.Tensor | None = None) -> Iterator[tuple[float, int, int]]:
    """(nats, correct top-1 predictions, tokens scored) of each forward of `batch_size` windows (see score_tokens),
    under `scoring`."""
    device = model.model.embed_tokens.weight.device
    starts = list(range(0, tokens.numel() - 1, context))
    for i in range(0, len(starts), batch_size):
        group = starts[i:i + batch_size]
        lengths = [min(context, tokens.numel() - 1 - s) for s in group]
        width = max(lengths)
        inputs = torch.zeros(len(group), width, dtype=torch.long)
        targets = torch.full((len(group), width), IGNORE_INDEX, dtype=torch.long)  # padding, not scored
        for row, (s, n) in enumerate(zip(group, lengths)):
            inputs[row, :n] = tokens[s:s + n]
            targets[row, :n] = tokens[s + 1:s + 1 + n]
            if scored is not None:
                targets[row, :n][~scored[s:s + n]] = IGNORE_INDEX
        # right padding never influences earlier positions (causal), so one batch serves all lengths
        hidden = model(inputs.to(device), return_hidden=True)
        yield score_positions(model, hidden.flatten(0, 1), targets.to(device).flatten())


def summed(scores: Iterable[tuple[float, int, int]]) -> tuple[float, int, int]:
    total_nats, correct, count = 0.0, 0, 0
    for nats, right, n in scores:  # added in order: the same total, however the windows were sliced
        total_nats, correct, count = total_nats + nats, correct + right, count + n
    return total_nats, correct, count


def check_scorable(num_tokens: int) -> None:
    if num_tokens < 2:
        raise NanoQwenError(f"need at least 2 tokens to score, got {num_tokens}")


def score_tokens(model: Qwen3, tokens: torch.Tensor, context: int, batch_size: int | None = None,
                 scored: torch.Tensor | None = None) -> tuple[float, int, int]:
    """Score a 1-D token stream in consecutive windows of `context` predictions.

    Every token but the first is predicted once, from at most `context` tokens before it (the
    window restarts, it does not slide); with `scored` (one bool per token but the first), only those
    predictions count. Returns (total nats, correct top-1 predictions, tokens scored).
    """
    check_scorable(tokens.numel())
    with scoring(model):
        return summed(batch_scores(model, tokens, context, windows_per_forward(context, batch_size), scored))


def metrics(total_nats: float, correct: int, count: int, num_bytes: int | None) -> dict[str, float]:
    """The report: mean loss in nats, top-1 accuracy, perplexity, bits per UTF-8 byte, tokens scored."""
    loss = total_nats / count
    result = {"loss": loss, "accuracy": correct / count, "perplexity": math.exp(min(loss, 700.0)),
              "bits_per_byte": total_nats / math.log(2) / num_bytes if num_bytes else float("nan"),
              "tokens": count}
    return result


def readable(value: float, decimals: int) -> str:
    """A metric as people read it: fixed-point, or in scientific notation from a million on (the perplexity of
    a model that diverged, exp of its loss, ran to a hundred digits)."""
    return f"{value:.{decimals}f}" if abs(value) < 1e6 else f"{value:.{decimals}e}"


def evaluate_tokens(model: Qwen3, tokens: torch.Tensor, num_bytes: int | None, context: int | None = None,
                    batch_size: int | None = None, scored: torch.Tensor | None = None) -> dict[str, float]:
    """metrics() of a token stream, every token but the first predicted; `num_bytes` is the UTF-8 size of the
    text the predicted tokens stand for (with `scored`, see score_tokens: of the scored ones alone)."""
    context = context or model.config.max_position_embeddings
    return metrics(*score_tokens(model, tokens, context, batch_size, scored=scored), num_bytes)


def assistant_scoring(tokens: torch.Tensor, marks: ChatMarks, tokenizer: Tokenizer) -> tuple[torch.Tensor, int]:
    """Under --loss-on assistant, which predictions of `tokens` count (those of an assistant's turns) and the
    bytes of text they stand for (an added token's none, as prepare counts them)."""
    from nanoqwen.data.loader import assistant_targets

    scored = assistant_targets(tokens.numpy(), 1, tokens.numel() - 1, marks)
    return torch.from_numpy(scored), tokenizer.text_bytes(tokens[1:].numpy()[scored])


# -- `nanoqwen eval` -----------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    from nanoqwen.distributed import add_device_arguments

    p.add_argument("--model", required=True, help="checkpoint folder (e.g. runs/NAME/best)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--text-file", metavar="FILE",
                        help="a text file (UTF-8, or UTF-16/32 with a byte-order mark; gzip-, bzip2-, xz- or, with the "
                             "zstandard package, zstd-compressed too), scored as prepare reads it: "
                             "one document, or the parts an <|endoftext|> written in it separates; - reads the text "
                             "from standard input")
    source.add_argument("--data", metavar="DIR",
                        help="a prepared folder (from `nanoqwen prepare`): its val.bin (or --split) is scored")
    p.add_argument("--split", default=None, choices=["train", "val"], help="with --data: which split (default val)")
    p.add_argument("--context", type=positive_int, default=None, metavar="N",
                   help="window length (default: the model's context)")
    p.add_argument("--batch-size", type=positive_int, default=None, metavar="N",
                   help="windows per forward (default: ~16k tokens)")
    p.add_argument("--max-windows", type=positive_int, default=None, metavar="N", help="score only this many windows")
    p.add_argument("--loss-on", choices=["all", "assistant"], default="all",
                   help="with --data of conversations: 'assistant' scores the assistant's turns alone, as a run "
                        "trained with --loss-on assistant evaluates (default all)")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object on the last line")
    add_device_arguments(p)


def split_slices(num_tokens: int, context: int, batch_size: int) -> list[tuple[int, int]]:
    """(start, end) of the slices of a split of `num_tokens` that evaluate_split scores one after another: about
    SLICE_TOKENS each, of whole forwards of windows (the forwards of the split whole), each sharing its last token,
    which its last window predicts, with the next, whose first window starts from it."""
    step = slice_step(context, batch_size)
    return [(start, min(start + step + 1, num_tokens)) for start in range(0, num_tokens - 1, step)]


def slice_step(context: int, batch_size: int) -> int:
    """The ids predicted in one slice (see split_slices): about SLICE_TOKENS, in whole forwards of windows."""
    return max(1, SLICE_TOKENS // (context * batch_size)) * batch_size * context


def evaluate_split(model: Qwen3, split: TokenSplit, where: str, tokenizer: Tokenizer, context: int,
                   batch_size: int | None = None, max_tokens: int | None = None, marks: ChatMarks | None = None
                   ) -> dict[str, float]:
    """metrics() of a prepared split (of its first `max_tokens` alone, where given: the rest is never read), as
    evaluate_tokens gives them of its tokens whole (with `marks`, of its assistant turns alone, as assistant_scoring
    chooses them), read a slice at a time from its memory map: 8 bytes a token of a slice in memory, not of the split
    (4.9 GB of a 608M-token train.bin). Its ids checked first, `where` naming it."""
    from nanoqwen.data.loader import assistant_targets

    ids = split.tokens[:max_tokens]  # (a view of the map: read as the slices are)
    check_scorable(len(ids))
    batch_size = windows_per_forward(context, batch_size)
    slices = split_slices(len(ids), context, batch_size)

    def assistant(start: int, end: int) -> np.ndarray:  # its turns looked for as far back as they began, as whole
        return assistant_targets(ids, start + 1, end - start - 1, marks, look_back=start + 1)

    for start, end in slices:  # mistakes said before any scoring
        check_token_ids(ids[start:end], model.config.vocab_size, where)
    if marks is not None and not any(assistant(start, end).any() for start, end in slices):
        raise NanoQwenError(f"{where} holds no assistant turn to score (in the windows given); leave --loss-on out, "
                            "or give more --max-windows")
    split.release()
    # The bytes of the text the predicted tokens stand for: the split's, less its first token's, as prepare counted
    # them; a prefix's or the assistant turns' counted from their ids.
    num_bytes = split.num_bytes - tokenizer.text_bytes(ids[:1]) if marks is None and len(ids) == len(split) else 0

    def scores() -> Iterator[tuple[float, int, int]]:
        nonlocal num_bytes
        for start, end in slices:
            tokens = torch.from_numpy(np.asarray(ids[start:end], dtype=np.int64))
            scored = None if marks is None else assistant(start, end)
            if scored is not None:
                num_bytes += tokenizer.text_bytes(tokens[1:].numpy()[scored])
            elif len(ids) < len(split):
                num_bytes += tokenizer.text_bytes(tokens[1:].numpy())
            yield from batch_scores(model, tokens, context, batch_size,
                                    None if scored is None else torch.from_numpy(scored))
            split.release()  # the pages read: a long split's would all stay mapped in, counted as this process's

    with scoring(model):
        total = summed(scores())
    return metrics(*total, num_bytes)


class TextSource:
    """The text of eval's --text-file (a file, or standard input), read as prepare reads a text file's: decoded (UTF-8,
    or the encoding a byte-order mark names), with universal newlines, parted at <|endoftext|>. Read a part at a time
    as `pieces` takes it (see there), from a start that `start` reads and checks: neither a 5 GB file scored whole nor
    one asked for a few windows is held whole. Its bytes are decoded incrementally, so that a character or a "\r\n"
    that one read cuts reads as it does whole; `close` ends what `read` reads from (a file); `reopen`, where the text
    can be read twice (a file's, not standard input's or a pipe's), gives it from its start again."""

    def __init__(self, read: Callable[[int], bytes], name: str, close: Callable[[], None] = lambda: None,
                 reopen: Callable[[], TextSource] | None = None) -> None:
        self.read, self.name, self.close = read, name, close  # read(n): at most n bytes, b"" at the end
        self.reopen = reopen
        self.text = ""  # decoded, line ends as written, not yet taken by `pieces`
        self.complete = False  # whether the whole text is read
        self.characters = self.nuls = 0  # of all the text read, for `check`
        self._read_bytes, self._first_bytes = 0, 0
        self._decoder = TextDecoder()

    @property
    def replaced(self) -> int:
        """Undecodable byte sequences in the text read, replaced by U+FFFD."""
        return self._decoder.replaced

    def __enter__(self) -> TextSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self, first_bytes: int, whole: bool = False) -> None:
        """Read the first `first_bytes` (at least 4, for a byte-order mark), and on until they hold a document or the
        text ends; then check them (one line if they are no text to score): before the model loads, a mistake costs
        no wait. With `whole` (the text is to be scored whole), a text that can be read twice is judged whole
        instead, read through once first."""
        if whole and self.reopen is not None:
            # As prepare judges a small file, and eval did when it read a file whole: noise after the first part is
            # said now, not once it was all scored, and text after a noisy first part is scored. (Reading the text
            # twice costs little next to the model's forwards.) Standard input, read once, is judged by its first
            # part now and by all of it once scored, as --max-windows' start is.
            with self.reopen() as again:
                again.read_through()
                again.check()
        self._first_bytes = first_bytes
        self.read_more()
        while not self.complete and not self._holds_a_document():  # (a start of blanks and separators)
            self.read_more()
        if not whole or self.reopen is None:
            self.check()
        if not self.text.strip():  # blank: as prepare skips it
            raise NanoQwenError(f"{self.name} is empty; give it some text to score")
        if not self._holds_a_document():
            raise NanoQwenError(f"{self.name} {ONLY_SEPARATORS}; give it some text to score")

    def _holds_a_document(self) -> bool:
        text = universal_newlines(self.text)
        if not self.complete:  # the start of a separator that the text read ends with is none of a document's text
            text = text[:before_partial_separator(text)]
        return bool(separated_documents(text))

    def read_through(self) -> None:
        """Read the whole text a part at a time, keeping none of it: what `check` counts alone."""
        self._first_bytes = READ_PART_BYTES
        while not self.complete:
            self.read_more(READ_PART_BYTES)
            self.text = ""

    def read_more(self, most: int | None = None) -> None:
        """Read on: as many bytes again as were read (at least `start`'s first), but at most `most`."""
        wanted, texts, final = max(self._first_bytes, self._read_bytes), [], False
        wanted = wanted if most is None else min(wanted, most)
        while not final and wanted > 0:  # in parts: read(n) sets aside n bytes first, and each is decoded at once
            raw = self.read(min(wanted, READ_PART_BYTES))
            final = not raw
            self._read_bytes += len(raw)
            texts.append(self._decoder.decode(raw, final))
            wanted -= len(raw)
        self.characters += sum(map(len, texts))
        self.nuls += sum(text.count("\0") for text in texts)
        self.text = "".join([self.text, *texts] if self.text else texts)  # (one read's text as it is: no copy of it)
        self.complete = final

    def check(self) -> None:
        """One line, saying the text's name, if what was read of it is mostly undecodable (a file's start scored by
        --max-windows is text, whatever follows it)."""
        if undecodable(self.replaced, self.nuls, self.characters):  # the rule by which prepare skips such a file
            of = "of its" if self.complete else "of the first"
            raise NanoQwenError(f"{self.name} is not text: {self.replaced + self.nuls:,} {of} "
                                f"{self.characters:,} characters are undecodable or NUL ({NOT_UTF8})")

    def pieces(self, chars: int | None) -> Iterator[tuple[str, bool]]:
        """The text's documents, as prepare reads them (the text, or the parts <|endoftext|> separates, the blanks
        next to a separator left out), from what `start` read on, each with whether it ends its document: each whole
        (`chars` None), or in pieces of about `chars` or more, cut where no id of a Qwen-style tokenizer spans (see
        piece_safe). Read on only as far as the pieces taken need, and what is taken let go: a piece's text and a
        read's are held, not the text."""
        held, after, begun = "", False, False  # (the text not given, its line ends read; whether a separator comes
        # right before it; whether a piece of the document it goes on was given)
        searched = 0  # the start of `held` searched already for a separator and a place to cut, in vain
        while True:
            kept = "\r" if not self.complete and self.text.endswith("\r") else ""  # a "\r\n" the read may cut
            held += universal_newlines(self.text[:len(self.text) - len(kept)])
            self.text = kept
            # Only the text read since is searched (and a separator it completes): a line without a space or a
            # break, which is held until it ends, was searched whole on each read, in time quadratic in its length
            ended = []
            if held.find(DOCUMENT_SEPARATOR, max(0, searched - len(DOCUMENT_SEPARATOR) + 1)) >= 0:
                *ended, held = held.split(DOCUMENT_SEPARATOR)
                searched = 0
            for i, document in enumerate(ended):  # each with a separator after it
                if i or after and not begun:
                    document = document.lstrip()
                if (document := document.rstrip()) or i == 0 and begun:
                    *cut, last = cut_pieces(document, chars)
                    yield from ((piece, False) for piece in cut)
                    yield last, True
            if ended:
                after, begun = True, False
            if after and not begun:
                stripped = held.lstrip()
                searched, held = max(0, searched - (len(held) - len(stripped))), stripped
            if self.complete:
                if begun or held and not held.isspace():
                    *cut, last = cut_pieces(held, chars, searched)
                    yield from ((piece, False) for piece in cut)
                    yield last, True
                return
            *cut, held = cut_pieces(held, chars, searched)  # the last piece may go on in what is read next
            searched = len(held)
            yield from ((piece, False) for piece in cut)
            begun = begun or bool(cut)
            # a text cut into pieces is read a part at a time; one held whole anyway, in reads that double
            self.read_more(READ_PART_BYTES if chars is not None else None)


READ_PART_BYTES = 1 << 24  # the most one read of a TextSource asks for, and what it reads at a time to score it whole


def cut_pieces(text: str, chars: int | None, searched: int = 0) -> list[str]:
    """`text` cut into pieces of `chars` characters or a little more (None: whole), each ending where prepare cuts long
    documents (no id of a Qwen-style tokenizer spans such a point, whatever follows it): at a line break that a word
    follows, else before a space; the last one, the rest. Its first `searched` characters hold no space to cut
    before (a last piece it was cut into before, which the text read since goes on): they are not searched again."""
    from nanoqwen.data.prepare import PIECE_BOUNDARY, SPACE_BOUNDARY

    pieces, start = [], 0
    while chars is not None and (end := PIECE_BOUNDARY.search(text, start + chars, start + 2 * chars) or
                                 SPACE_BOUNDARY.search(text, max(start + chars, searched))):
        pieces.append(text[start:end.end()])
        start = end.end()
    pieces.append(text[start:])
    return pieces


def open_text_file(path: Path, model: str) -> TextSource:
    """The text of eval's --text-file, to read (nothing read yet); or one line saying why the file is not one to
    score (checked before the model loads: a mistake costs no wait)."""
    # A pipe (`--text-file <(zcat notes.txt.gz)`, a named one) is read as standard input is; a device (/dev/zero)
    # is no text file, and may have no end.
    if not (path.is_file() or path.is_fifo()):
        what = "is a folder" if path.is_dir() else "is not a regular file" if path.exists() else "does not exist"
        raise NanoQwenError(f"text file {path} {what}; give one UTF-8 text file (for a folder of texts, "
                            "prepare it and pass --data)")
    if zstd_unread(path):  # (its bytes would be scored as text, or refused as "not text")
        raise NanoQwenError(f"text file {path} cannot be read{conversion_hint(path)}")
    kind = file_type(path)  # (rows.jsonl.gz: a .jsonl; notes.txt.gz is read as its text, as prepare reads it)
    if kind in SUFFIXES and kind not in TEXT_SUFFIXES:
        # Records or a PDF: prepare reads their text; scored as bytes they would measure JSON syntax or noise.
        column = "" if kind == ".pdf" else " (with --text-column NAME if the text is not in 'text')"
        raise NanoQwenError(f"{path} is a {kind} file, which eval does not read as text; prepare "
                            f"it, then score that: `nanoqwen prepare --dataset {quote(str(path))} --tokenizer "
                            f"{quote(model)} --out DIR`{column}, then `nanoqwen eval --model {quote(model)} "
                            "--data DIR`")
    if kind.startswith(".tar."):  # (decompressed, its members' headers would be scored as text)
        raise NanoQwenError(f"{path} is a {kind} archive; extract the text file to score from it")
    return open_text(path)


def open_text(path: Path) -> TextSource:
    """The text of the file `path` (open_text_file's, checked), to read from its start."""
    with said_if_damaged(path):
        f = open_binary(path)

    def read(size: int) -> bytes:
        with said_if_damaged(path):
            return f.read(size)

    return TextSource(read, f"text file {path}", f.close, None if path.is_fifo() else lambda: open_text(path))


# --text-file's name for standard input, as Unix tools take it (a file named "-" is ./-), and what its lines call it
STANDARD_INPUT, STANDARD_INPUT_NAME = "-", "standard input"


def open_standard_input() -> TextSource:
    """The text piped in (`--text-file -`), to read: its bytes read as a text file's are (not by Python's text mode,
    which would fail on a bad byte and miss a byte-order mark), so that `cat notes.txt | nanoqwen eval ...
    --text-file -` gives the figures `--text-file notes.txt` does, --max-windows reading as little of it. A closed
    standard input is an empty one; one of text alone (io.StringIO, as a Python caller may set) is read as its UTF-8
    bytes."""
    stream = sys.stdin  # None where the shell closed it (`<&-`)
    binary = getattr(stream, "buffer", None)
    if stream is not None and stream.isatty():  # typed in: without this, eval seemed to hang
        print("nanoqwen eval: reading the text to score from standard input; end it with Ctrl-D", file=sys.stderr)

    def read(size: int) -> bytes:
        if stream is None:
            return b""
        try:  # (a lone surrogate in text alone becomes bytes that are no UTF-8: replaced and counted, as a file's)
            return binary.read(size) if binary is not None else stream.read(size).encode("utf-8", "surrogatepass")
        except OSError as e:  # its terminal closed (EIO); a folder redirected into it is refused by Python itself
            raise NanoQwenError(f"{STANDARD_INPUT_NAME} cannot be read ({e.strerror or e}); pipe the text into it, "
                                "or give --text-file FILE") from None

    return TextSource(read, STANDARD_INPUT_NAME)


START_CHARS_PER_TOKEN = 8  # ~4 characters a token in English, fewer in other scripts: a start long enough


def text_ids(tokenizer: Tokenizer, text: TextSource, max_tokens: int | None) -> Iterator[tuple[np.ndarray, int]]:
    """prepare's encoding of the documents of `text` (encode_texts), in parts: ids, and the UTF-8 bytes of the text
    they stand for; <|endoftext|> first (a document follows one in training), and after each document. Encoded a
    batch of about prepare's size at a time; with `max_tokens`, from a start of about as many characters as the ids
    need, twice as much each time after, as far as the caller takes them (a large file's first windows wait for no
    more). A tokenizer that splits text otherwise than Qwen's (see piece_safe) is given each document whole."""
    from nanoqwen.data.prepare import BATCH_CHARS, encode_texts, piece_safe

    yield np.array([tokenizer.eot_id]), 0
    chars = BATCH_CHARS if max_tokens is None else min(START_CHARS_PER_TOKEN * max_tokens, BATCH_CHARS)
    batch: list[tuple[str, bool]] = []
    batch_chars = 0

    def encoded() -> Iterator[tuple[np.ndarray, int]]:
        for (_, ends), document in zip(batch, encode_texts(tokenizer, [piece for piece, _ in batch])):
            yield (document.ids if ends else document.ids[:-1]), document.nbytes  # (a piece's own end is no eot)

    for piece, ends in text.pieces(chars if piece_safe(tokenizer.hf) else None):
        batch.append((piece, ends))
        batch_chars += len(piece)
        if batch_chars >= chars:
            yield from encoded()
            batch, batch_chars, chars = [], 0, min(2 * chars, BATCH_CHARS)
    yield from encoded()


def stream_slices(parts: Iterable[np.ndarray], step: int, max_tokens: int | None) -> Iterator[torch.Tensor]:
    """The ids of `parts` joined, less the last (the <|endoftext|> that ends the last document), or their first
    `max_tokens` where they hold more: in slices as split_slices gives them of a split of those ids (taking no more
    parts than that needs), each sharing its last id with the next."""
    held, taken = np.empty(0, dtype=np.int64), 0  # (the ids from `taken` on: the slices' before them are given)
    for part in parts:
        held = np.concatenate([held, part])
        if max_tokens is not None and taken + len(held) > max_tokens + 1:  # more than max_tokens: its prefix
            held = np.append(held[:max_tokens - taken], 0)  # (a last id, as the end's, left out below)
            break
        while len(held) > step + 1:  # (a slice of step + 1 ids, and one more: the slice is none of the end's)
            yield torch.from_numpy(held[:step + 1])
            held, taken = held[step:], taken + step
    for start in range(0, len(held) - 2, step):  # the ids left, less the last
        yield torch.from_numpy(held[start:start + step + 1][:len(held) - 1 - start])


def evaluate_text(model: Qwen3, tokenizer: Tokenizer, text: TextSource, context: int, batch_size: int | None = None,
                  max_tokens: int | None = None) -> dict[str, float]:
    """metrics() of the documents of `text` (started: see TextSource.start), every id of their encoding
    (text_ids) predicted but the first (of their first `max_tokens` alone, where given), as evaluate_tokens gives
    them of those ids whole; read, encoded and scored a slice at a time (see split_slices), in memory that does not
    grow with the text. Its end checked as a text (TextSource.check)."""
    batch_size = windows_per_forward(context, batch_size)
    counts = {"bytes": 0, "ids": 0, "prefix bytes": 0}  # the documents', and those of the ids scored
    # A token's text that depends on its neighbours (SentencePiece's spaces, byte-fallback characters) is counted of
    # the ids scored whole, as text_bytes decodes them: a slice's alone would drop its leading space
    predicted: list[np.ndarray] = []

    def parts() -> Iterator[np.ndarray]:
        for ids, nbytes in text_ids(tokenizer, text, max_tokens):
            counts["bytes"] += nbytes
            counts["ids"] += len(ids)
            yield ids.astype(np.int64)

    def scores() -> Iterator[tuple[float, int, int]]:
        for tokens in stream_slices(parts(), slice_step(context, batch_size), max_tokens):
            if max_tokens is not None and tokenizer.byte_level:  # (needed where the ids run past max_tokens)
                counts["prefix bytes"] += tokenizer.text_bytes(tokens[1:].numpy())
            elif max_tokens is not None:
                predicted.append(tokens[1:].numpy())
            yield from batch_scores(model, tokens, context, batch_size)

    with scoring(model):
        total = summed(scores())
    text.check()  # again, of all that was read
    check_scorable(total[2] + 1)
    prefix = max_tokens is not None and counts["ids"] - 1 > max_tokens
    if prefix and predicted:
        counts["prefix bytes"] = tokenizer.text_bytes(np.concatenate(predicted))
    return metrics(*total, counts["prefix bytes"] if prefix else counts["bytes"])


def run(args: argparse.Namespace) -> int:
    if args.loss_on == "assistant" and args.text_file:
        raise NanoQwenError("--loss-on assistant scores the assistant's turns of prepared conversations; give "
                            "--data DIR (from `nanoqwen prepare` of chat records), not --text-file")
    if args.split is not None and args.text_file:
        raise NanoQwenError("--split chooses a split of a prepared --data folder; a --text-file is scored whole, "
                            "so leave --split out")
    with contextlib.ExitStack() as closing:
        text = None
        if args.text_file == STANDARD_INPUT:  # (the text as given: Path("./-") is "-" too, the file named so)
            text = open_standard_input()
        elif args.text_file:
            text = closing.enter_context(open_text_file(Path(args.text_file), args.model))
        result = figures(args, text)
    if args.json:
        print(json_line(result))
    else:
        for key, value in result.items():
            print(f"{key:>14}: {readable(value, 4)}" if isinstance(value, float) else f"{key:>14}: {value}")
    return 0


def figures(args: argparse.Namespace, text: TextSource | None) -> dict[str, float]:
    """eval's figures of --text-file's `text` (opened, nothing read yet), or of --data; mistakes said before the
    model loads."""
    from nanoqwen.checkpoint import check_data_tokenizer, read_config
    from nanoqwen.generate import load_for_inference

    if args.data:
        from nanoqwen.data.prepare import load_meta

        load_meta(args.data)  # one clear line if it is not a complete prepared folder, before the model's wait
    config = read_config(args.model)  # config.json alone: the mistakes below cost no wait for the weights either
    if args.context is not None and args.context > config.max_position_embeddings:
        raise NanoQwenError(f"--context {args.context} is longer than the model's context "
                            f"({config.max_position_embeddings} positions); give at most that")
    if args.data:
        check_data_tokenizer(Path(args.model), Path(args.data), config)
        if args.loss_on == "assistant":
            from nanoqwen.train import chat_marks

            marks = chat_marks(Path(args.data))  # (one line if it holds no conversations)
    context = args.context or config.max_position_embeddings
    max_tokens = None if args.max_windows is None else args.max_windows * context + 1  # the windows scored
    if text is not None:  # a part, or a start of 2 bytes a character (most scripts; CJK's are 3): more if it is short
        # (no more than a part: windows enough for the whole text read it whole, before the first was scored)
        text.start(min(READ_PART_BYTES, 2 * START_CHARS_PER_TOKEN * max_tokens) if max_tokens else READ_PART_BYTES,
                   whole=max_tokens is None)
    model, tokenizer = load_for_inference(args)
    if text is not None:
        # Every token of the documents is scored, the first after <|endoftext|> (how documents follow one another
        # in training; Qwen3 has no start token), so bits per byte are over all of their UTF-8 bytes, whatever the
        # file's encoding (UTF-16, a BOM). They are encoded as prepare encodes them (each ended by <|endoftext|>,
        # but the last; another added token written in one is text), so the figures are those of the tokens a run
        # trains and validates on.
        result = evaluate_text(model, tokenizer, text, context, args.batch_size, max_tokens)
        if text.replaced:  # the figures are still computed, but the user should know why they are odd
            source = STANDARD_INPUT_NAME if args.text_file == STANDARD_INPUT else args.text_file
            print(f"nanoqwen: warning: {source} is not UTF-8 text: replaced {text.replaced:,} undecodable "
                  "byte sequences with U+FFFD (convert it to UTF-8 first, e.g. with iconv)", file=sys.stderr)
        return result
    from nanoqwen.data.loader import TokenSplit

    split = args.split or "val"
    return evaluate_split(model, TokenSplit.open(args.data, split), f"{args.data}/{split}.bin", tokenizer, context,
                          args.batch_size, max_tokens, marks if args.loss_on == "assistant" else None)
