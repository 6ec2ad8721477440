"""Training batches from a prepared folder: memory-mapped, seeded per step, sharded by rank.

The global batch of step s is `batch_size` windows whose start offsets come from a generator seeded
with (seed, s). Every process draws the same offsets, takes its own contiguous slice of them and
splits that into micro-batches. So:
- the samples of a step do not depend on the number of processes or the micro-batch size, and
- the data position *is* the step: resuming at step s needs no loader state at all.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nanoqwen.errors import NanoQwenError
from nanoqwen.loss import IGNORE_INDEX

LOOK_BACK = 1 << 16  # tokens searched before a window for the turn it starts in (a longer turn's inside trains nothing)
LOOK_BACK_CHUNK = 4096


def check_token_ids(ids: np.ndarray | torch.Tensor, vocab_size: int, where: str) -> None:
    """One clear line if `ids` hold an id the model has no embedding row for (data from another tokenizer)."""
    count = ids.size if isinstance(ids, np.ndarray) else ids.numel()
    largest = int(ids.max()) if count else -1
    if largest >= vocab_size:
        raise NanoQwenError(f"{where} holds token id {largest}, outside the model's {vocab_size} embedding rows; "
                            "was it prepared with another tokenizer? prepare it again with the model's")


@dataclass
class TokenSplit:
    """One split (train.bin or val.bin) of a prepared folder, memory-mapped."""

    tokens: np.ndarray
    num_bytes: int
    """UTF-8 bytes of the text the tokens came from (for bits per byte)."""
    mapping: mmap.mmap | None = None
    """The memory map `tokens` reads the file through (None: tokens held in memory), whose pages `release` unmaps."""

    @classmethod
    def open(cls, folder: str | Path, split: str) -> TokenSplit:
        from nanoqwen.data.prepare import load_meta  # checks that the folder is complete, else one clear line

        meta = load_meta(folder)
        bin_path = Path(folder) / f"{split}.bin"
        dtype = np.dtype(meta["dtype"]).newbyteorder("<")
        size = bin_path.stat().st_size // dtype.itemsize
        if not size:
            return cls(np.zeros(0, dtype), int(meta["splits"][split]["bytes"]))
        with open(bin_path, "rb") as f:  # the map holds the file open
            mapping = mmap.mmap(f.fileno(), size * dtype.itemsize, access=mmap.ACCESS_READ)
        return cls(np.frombuffer(mapping, dtype=dtype), int(meta["splits"][split]["bytes"]), mapping)

    def read_at_random(self) -> None:
        """Tell the system that the file is read at random (training windows): a page missed is read alone, not with
        the pages around it that suit a reader going on through the file (read ahead, 8 MB a miss on some systems: 200
        steps of 64 windows of 1,024 tokens read all of a 2.4 GB train.bin, for their 52 MB; a corpus larger than the
        memory is read over and over)."""
        self._advise("MADV_RANDOM")

    def release(self) -> None:
        """Unmap the pages read so far from this process; the system's file cache keeps them. Windows drawn at random
        map the file in page by page: over a long run the whole of it, an 8 GB train.bin 8 GB of the process's resident
        memory (of each process of a job, counted in its memory limit)."""
        self._advise("MADV_DONTNEED")

    def _advise(self, name: str) -> None:
        """madvise the map with mmap's advice `name`, where there is a map and the system has that advice (Windows
        has no madvise)."""
        advice = getattr(mmap, name, None)
        if self.mapping is not None and advice is not None:
            self.mapping.madvise(advice)

    def __len__(self) -> int:
        return len(self.tokens)

    def prefix(self, num_tokens: int) -> torch.Tensor:
        """The first `num_tokens` tokens (int64)."""
        return torch.from_numpy(np.asarray(self.tokens[:min(num_tokens, len(self.tokens))], dtype=np.int64))


@dataclass(frozen=True)
class ChatMarks:
    """The ids that frame a ChatML turn, `<|im_start|>ROLE\n ... <|im_end|>`: the marks, the assistant role's
    ids, and the ids of every token that starts with a newline (the one that must end the role's line)."""

    im_start: int
    im_end: int
    eot: int
    assistant: tuple[int, ...]
    newline: frozenset[int]


def assistant_targets(tokens: np.ndarray, start: int, length: int, marks: ChatMarks,
                      look_back: int = LOOK_BACK) -> np.ndarray:
    """Which of tokens[start:start + length] an assistant wrote: the tokens of its turns after the
    `<|im_start|>assistant` line, through the turn's <|im_end|> (so the model learns to end it). The turn `start`
    falls in is searched for up to `look_back` tokens back (`start`: as far back as it began)."""
    end = start + length
    begin = _turn_start(tokens, start, marks, look_back)
    span = np.asarray(tokens[begin:end])
    at = np.flatnonzero(np.isin(span, (marks.im_start, marks.im_end, marks.eot)))
    opens, closes = at[span[at] == marks.im_start] + begin, at[span[at] != marks.im_start] + begin
    wrote = np.zeros(length, dtype=bool)
    role = len(marks.assistant)
    for turn in opens:
        line_end = turn + 1 + role  # the token that ends the role's line
        if line_end >= len(tokens) or int(tokens[line_end]) not in marks.newline or \
                tuple(int(i) for i in tokens[turn + 1:line_end]) != marks.assistant:
            continue
        k = int(np.searchsorted(closes, line_end + 1))
        last = int(closes[k]) + 1 if k < len(closes) else end  # its <|im_end|> included
        wrote[max(line_end + 1, start) - start:max(min(last, end), start) - start] = True
    return wrote


def _turn_start(tokens: np.ndarray, start: int, marks: ChatMarks, look_back: int) -> int:
    """The <|im_start|> of the turn `start` falls in (searched up to `look_back` tokens back), else `start`."""
    for stop in range(start, max(0, start - look_back), -LOOK_BACK_CHUNK):
        low = max(0, stop - LOOK_BACK_CHUNK)
        found = np.flatnonzero(np.isin(tokens[low:stop], (marks.im_start, marks.im_end, marks.eot)))
        if found.size:
            at = low + int(found[-1])
            return at if tokens[at] == marks.im_start else start
    return start


def batch_offsets(seed: int, step: int, batch_size: int, seq_len: int, num_tokens: int) -> np.ndarray:
    """Start offsets of the `batch_size` windows of step `step`: a pure function of (seed, step)."""
    rng = np.random.default_rng([seed, step])
    return rng.integers(0, num_tokens - seq_len, size=batch_size)  # window = seq_len + 1 tokens


def check_batch(batch_size: int, micro_batch: int | None, world_size: int, runs_own: Iterable[str] = ()) -> int:
    """The sequences each process gets per step, once --batch-size splits evenly over the processes and
    --micro-batch (None: the whole per-process batch) divides that share; else one line saying which does not.
    `runs_own`: the settings a resumed run keeps from its start (not given now), which the line says are its own."""
    def flag(name: str, value: int) -> str:
        said = f"--{name.replace('_', '-')} {value}"
        return f"the run's own {said}" if name in runs_own else said

    if batch_size % world_size:
        raise NanoQwenError(f"{flag('batch_size', batch_size)} must be a multiple of the {world_size} processes")
    per_rank = batch_size // world_size
    if micro_batch is not None and micro_batch <= 0:
        raise NanoQwenError(f"--micro-batch must be at least 1, got {micro_batch}")
    if micro_batch is not None and per_rank % micro_batch:
        share = flag("batch_size", batch_size) if world_size == 1 else (f"the {per_rank} sequences each process gets "
                                                                       f"a step ({flag('batch_size', batch_size)} "
                                                                       f"over {world_size} processes)")
        fits = max(size for size in range(1, min(micro_batch, per_rank) + 1) if per_rank % size == 0)
        raise NanoQwenError(f"{flag('micro_batch', micro_batch)} must divide {share} evenly; --micro-batch {fits} "
                            "does")
    return per_rank


class BatchLoader:
    """This process's micro-batches of a step: (inputs, targets) pairs of shape (micro_batch, seq_len)."""

    def __init__(self, split: TokenSplit, *, seq_len: int, batch_size: int, micro_batch: int, seed: int,
                 rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu",
                 vocab_size: int | None = None, where: str = "the training data",
                 assistant: ChatMarks | None = None) -> None:
        self.per_rank = check_batch(batch_size, micro_batch, world_size)
        if len(split) <= seq_len:
            raise NanoQwenError(f"the training split has {len(split)} tokens, not more than --seq-len {seq_len}; "
                                "use a smaller --seq-len or more data")
        self.split, self.seq_len, self.batch_size, self.micro_batch = split, seq_len, batch_size, micro_batch
        split.read_at_random()
        self.seed, self.rank = seed, rank
        self.device = torch.device(device)
        self.vocab_size, self.where = vocab_size, where  # ids are checked batch by batch: no scan of the file
        self.assistant = assistant  # given: only what an assistant wrote is a target
        self._trained_step: tuple[int, np.ndarray] = (-1, np.zeros((0, seq_len), dtype=bool))

    @property
    def accumulation(self) -> int:
        """Micro-batches per optimizer step on each process."""
        return self.per_rank // self.micro_batch

    def micro_batches(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        offsets = batch_offsets(self.seed, step, self.batch_size, self.seq_len, len(self.split))
        mine = offsets[self.rank * self.per_rank:(self.rank + 1) * self.per_rank]
        windows = np.stack([self.split.tokens[o:o + self.seq_len + 1] for o in mine]).astype(np.int64)
        self.split.release()  # copied: their pages go back (the assistant's targets, read below, release their own)
        if self.vocab_size is not None:
            check_token_ids(windows, self.vocab_size, self.where)
        targets = windows[:, 1:].copy()
        if self.assistant is not None:
            targets[~self._trained(step)[self.rank * self.per_rank:(self.rank + 1) * self.per_rank]] = IGNORE_INDEX
        batch = torch.from_numpy(np.concatenate([windows[:, :-1], targets], axis=1))  # (per_rank, 2T)
        pinned = self.device.type == "cuda"
        if pinned:
            batch = batch.pin_memory()  # lets the copy below overlap with compute
        # Overlapped only from pinned memory: MPS copies from pageable memory asynchronously too, and read this
        # batch after it was freed, silently changing token ids (pytorch#189690)
        batch = batch.to(self.device, non_blocking=pinned)
        t = self.seq_len
        return [(batch[i:i + self.micro_batch, :t], batch[i:i + self.micro_batch, t:])
                for i in range(0, self.per_rank, self.micro_batch)]

    def targets_in_step(self, step: int) -> int:
        """The targets the loss covers in the whole global batch of `step` (every process's)."""
        if self.assistant is None:
            return self.batch_size * self.seq_len
        return int(self._trained(step).sum())

    def _trained(self, step: int) -> np.ndarray:
        """(batch_size, T): which targets of the step's global batch an assistant wrote (kept for the step)."""
        assert self.assistant is not None
        if self._trained_step[0] != step:
            offsets = batch_offsets(self.seed, step, self.batch_size, self.seq_len, len(self.split))
            self._trained_step = (step, np.stack([
                assistant_targets(self.split.tokens, int(o) + 1, self.seq_len, self.assistant) for o in offsets]))
            self.split.release()
        return self._trained_step[1]
