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
    NOT_UTF8,
    ONLY_SEPARATORS,
    SUFFIXES,
    TEXT_SUFFIXES,
    TextDecoder,
    conversion_hint,
    file_type,
    mostly_undecodable,
    not_text,
    open_binary,
    said_if_damaged,
    separated_documents,
    universal_newlines,
    zstd_unread,
)
from nanoqwen.errors import NanoQwenError, positive_int
from nanoqwen.io import json_line
from nanoqwen.loss import IGNORE_INDEX
from nanoqwen.model import Qwen3

if TYPE_CHECKING:
    from nanoqwen.data.loader import ChatMarks, TokenSplit
    from nanoqwen.data.prepare import Encoded
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
    step = max(1, SLICE_TOKENS // (context * batch_size)) * batch_size * context
    return [(start, min(start + step + 1, num_tokens)) for start in range(0, num_tokens - 1, step)]


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
    or the encoding a byte-order mark names), with universal newlines, parted at <|endoftext|>. Read whole, or (with
    --max-windows) from its start on as far as the windows need, encode_documents asking for more: a 5 GB file asked
    for a few windows is neither read nor held whole. Its bytes are decoded incrementally, so that a character or a
    "\r\n" that one read cuts reads as it does whole; `close` ends what `read` reads from (a file)."""

    def __init__(self, read: Callable[[int], bytes], name: str, close: Callable[[], None] = lambda: None) -> None:
        self.read, self.name, self.close = read, name, close  # read(n): at most n bytes (-1: all), b"" at the end
        self.text = ""  # decoded so far, line ends as written
        self.complete = False  # whether it is the whole text
        self._read_bytes, self._first_bytes = 0, -1
        self._decoder = TextDecoder()
        self._documents: tuple[int, list[str]] = (-1, [])  # those of the text as long as it was then
        self._checked = -1  # how long the text was when checked

    @property
    def replaced(self) -> int:
        """Undecodable byte sequences in the text read, replaced by U+FFFD."""
        return self._decoder.replaced

    def __enter__(self) -> TextSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self, first_bytes: int | None) -> None:
        """Read the text whole (None), or its first `first_bytes` (at least 4, for a byte-order mark) and on until it
        holds a document; then check it (`check`): before the model loads, a mistake costs no wait."""
        self._first_bytes = -1 if first_bytes is None else first_bytes
        self.read_more()
        while not self.complete and not self.documents():  # (a start of blanks or separators alone)
            self.read_more()
        self.check()

    def read_more(self) -> None:
        """Read on: as many bytes again as were read (at least `start`'s first), or the rest (start(None))."""
        wanted, texts, final = -1 if self._first_bytes < 0 else max(self._first_bytes, self._read_bytes), [], False
        while not final and wanted != 0:  # in parts: read(n) sets aside n bytes first, and each is decoded at once
            raw = self.read(wanted if wanted < 0 else min(wanted, READ_PART_BYTES))
            final = wanted < 0 or not raw
            self._read_bytes += len(raw)
            texts.append(self._decoder.decode(raw, final))
            wanted -= 0 if wanted < 0 else len(raw)
        self.text = "".join([self.text, *texts] if self.text else texts)  # (one read's text as it is: no copy of it)
        self.complete = final

    def read_all(self) -> None:
        while not self.complete:
            self.read_more()

    def documents(self) -> list[str]:
        """The documents of the text read (of the whole text once `complete`): its text, or the parts
        <|endoftext|> separates."""
        if self._documents[0] != len(self.text):  # ("\r\n" and a lone "\r" read as "\n" give a prefix of a prefix's)
            self._documents = (len(self.text), separated_documents(universal_newlines(self.text)))
        return self._documents[1]

    def check(self) -> None:
        """One line, saying the text's name, why what was read of it is not a text to score: mostly undecodable (of
        what was read: a file's start scored by --max-windows is text, whatever follows it), empty, or separators
        alone (start reads on until a document or the end: of the whole text)."""
        if self._checked == len(self.text):  # (checked as it is already)
            return
        self._checked = len(self.text)
        if mostly_undecodable(self.replaced, self.text):  # the rule by which prepare skips such a file
            of = "of its" if self.complete else "of the first"
            raise NanoQwenError(f"{self.name} is not text: {not_text(self.replaced, self.text):,} {of} "
                                f"{len(self.text):,} characters are undecodable or NUL ({NOT_UTF8})")
        if not self.text.strip():  # blank: as prepare skips it
            raise NanoQwenError(f"{self.name} is empty; give it some text to score")
        if not self.documents():
            raise NanoQwenError(f"{self.name} {ONLY_SEPARATORS}; give it some text to score")


READ_PART_BYTES = 1 << 24  # the most one read of a TextSource asks for


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
    with said_if_damaged(path):
        f = open_binary(path)

    def read(size: int) -> bytes:
        with said_if_damaged(path):
            return f.read(size)

    return TextSource(read, f"text file {path}", f.close)


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


def text_start(texts: list[str], chars: int) -> list[str] | None:
    """About the first `chars` characters of `texts` (documents): those up to the one in which the count is reached,
    that one cut after the first line break that a word follows from there, where prepare cuts long documents too (no
    token spans such a point), or whole where it has none; None where that leaves out nothing. The last document is
    never kept whole, for `texts` may be the documents of a text's start, whose last one goes on (a document before
    it ends at a separator read, and a word read after a line break is one there)."""
    from nanoqwen.data.prepare import PIECE_BOUNDARY

    kept = []
    for text in texts:
        if len(text) > chars:
            boundary = PIECE_BOUNDARY.search(text, chars)
            if boundary is not None:
                return [*kept, text[:boundary.end()]]
            if len(kept) + 1 < len(texts):  # (a file of short stories parted by <|endoftext|>, cut after one)
                return [*kept, text]
            return None
        kept.append(text)
        chars -= len(text)
    return None


START_CHARS_PER_TOKEN = 8  # ~4 characters a token in English, fewer in other scripts: a start long enough


def encode_documents(tokenizer: Tokenizer, text: TextSource, max_tokens: int | None) -> list[Encoded]:
    """prepare's encoding of the documents of `text` (encode_texts); with `max_tokens`, of only as much of their start
    as gives more than that many ids, the first ones of the whole text's (a large file's first windows wait for no
    more, and no more of it is read than that start: text_start cuts the text read where it cuts the whole text, at
    a line break that a word read follows, so where the text read may end otherwise, more is read)."""
    from nanoqwen.data.prepare import encode_texts, piece_safe

    if max_tokens is not None and piece_safe(tokenizer.hf):  # (a tokenizer that splits text otherwise: all of it)
        chars = START_CHARS_PER_TOKEN * max_tokens
        while (start := text_start(text.documents(), chars)) is not None or not text.complete:
            if start is None:  # the text read is too short to say where the start ends
                text.read_more()
                continue
            documents = encode_texts(tokenizer, start)
            if sum(len(document.ids) for document in documents) > max_tokens:
                return documents
            chars *= 2
    text.read_all()
    return encode_texts(tokenizer, text.documents())


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
    if text is not None:  # whole, or a start of 2 bytes a character (most scripts; CJK's are 3): more if it is short
        text.start(None if max_tokens is None else 2 * START_CHARS_PER_TOKEN * max_tokens)
    model, tokenizer = load_for_inference(args)
    if text is not None:
        # Every token of the documents is scored, the first after <|endoftext|> (how documents follow one another
        # in training; Qwen3 has no start token), so bits per byte are over all of their UTF-8 bytes, whatever the
        # file's encoding (UTF-16, a BOM). They are encoded as prepare encodes them (each ended by <|endoftext|>,
        # but the last; another added token written in one is text), so the figures are those of the tokens a run
        # trains and validates on.
        documents = encode_documents(tokenizer, text, max_tokens)
        text.check()  # again where more was read for the windows
        if text.replaced:  # the figures are still computed, but the user should know why they are odd
            source = STANDARD_INPUT_NAME if args.text_file == STANDARD_INPUT else args.text_file
            print(f"nanoqwen: warning: {source} is not UTF-8 text: replaced {text.replaced:,} undecodable "
                  "byte sequences with U+FFFD (convert it to UTF-8 first, e.g. with iconv)", file=sys.stderr)
        ids = np.concatenate([[tokenizer.eot_id], *(document.ids for document in documents)])[:-1]
        tokens, num_bytes = torch.from_numpy(ids.astype(np.int64)), sum(document.nbytes for document in documents)
        if max_tokens is not None and len(ids) > max_tokens:  # a prefix: the bytes of its own text, counted
            tokens = tokens[:max_tokens]
            num_bytes = tokenizer.text_bytes(tokens[1:].numpy())
        return evaluate_tokens(model, tokens, num_bytes, context, args.batch_size)
    from nanoqwen.data.loader import TokenSplit

    split = args.split or "val"
    return evaluate_split(model, TokenSplit.open(args.data, split), f"{args.data}/{split}.bin", tokenizer, context,
                          args.batch_size, max_tokens, marks if args.loss_on == "assistant" else None)
