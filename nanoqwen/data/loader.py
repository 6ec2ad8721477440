"""Training batches from a prepared folder: memory-mapped, seeded per step, sharded by rank.

The global batch of step s is `batch_size` windows whose start offsets come from a generator seeded
with (seed, s). Every process draws the same offsets, takes its own contiguous slice of them and
splits that into micro-batches. So:
- the samples of a step do not depend on the number of processes or the micro-batch size, and
- the data position *is* the step: resuming at step s needs no loader state at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nanoqwen.errors import NanoQwenError


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

    @classmethod
    def open(cls, folder: str | Path, split: str) -> TokenSplit:
        from nanoqwen.data.prepare import load_meta  # checks that the folder is complete, else one clear line

        meta = load_meta(folder)
        bin_path = Path(folder) / f"{split}.bin"
        dtype = np.dtype(meta["dtype"]).newbyteorder("<")
        size = bin_path.stat().st_size // dtype.itemsize
        tokens = np.memmap(bin_path, dtype=dtype, mode="r", shape=(size,)) if size else np.zeros(0, dtype)
        return cls(tokens, int(meta["splits"][split]["bytes"]))

    def __len__(self) -> int:
        return len(self.tokens)

    def prefix(self, num_tokens: int) -> tuple[torch.Tensor, int]:
        """The first `num_tokens` tokens (int64) and the bytes of text they stand for (prorated)."""
        n = min(num_tokens, len(self.tokens))
        tokens = torch.from_numpy(np.asarray(self.tokens[:n], dtype=np.int64))
        return tokens, round(self.num_bytes * n / max(1, len(self.tokens)))


def batch_offsets(seed: int, step: int, batch_size: int, seq_len: int, num_tokens: int) -> np.ndarray:
    """Start offsets of the `batch_size` windows of step `step`: a pure function of (seed, step)."""
    rng = np.random.default_rng([seed, step])
    return rng.integers(0, num_tokens - seq_len, size=batch_size)  # window = seq_len + 1 tokens


class BatchLoader:
    """This process's micro-batches of a step: (inputs, targets) pairs of shape (micro_batch, seq_len)."""

    def __init__(self, split: TokenSplit, *, seq_len: int, batch_size: int, micro_batch: int, seed: int,
                 rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu",
                 vocab_size: int | None = None, where: str = "the training data") -> None:
        if batch_size % world_size:
            raise NanoQwenError(f"--batch-size {batch_size} must be a multiple of the {world_size} processes")
        self.per_rank = batch_size // world_size
        if micro_batch <= 0 or self.per_rank % micro_batch:
            raise NanoQwenError(f"--micro-batch {micro_batch} must divide the {self.per_rank} sequences each "
                                f"process gets per step (--batch-size {batch_size} / {world_size} processes)")
        if len(split) <= seq_len:
            raise NanoQwenError(f"the training split has {len(split)} tokens, not more than --seq-len {seq_len}; "
                                "use a smaller --seq-len or more data")
        self.split, self.seq_len, self.batch_size, self.micro_batch = split, seq_len, batch_size, micro_batch
        self.seed, self.rank = seed, rank
        self.device = torch.device(device)
        self.vocab_size, self.where = vocab_size, where  # ids are checked batch by batch: no scan of the file

    @property
    def accumulation(self) -> int:
        """Micro-batches per optimizer step on each process."""
        return self.per_rank // self.micro_batch

    def micro_batches(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        offsets = batch_offsets(self.seed, step, self.batch_size, self.seq_len, len(self.split))
        mine = offsets[self.rank * self.per_rank:(self.rank + 1) * self.per_rank]
        windows = np.stack([self.split.tokens[o:o + self.seq_len + 1] for o in mine]).astype(np.int64)
        if self.vocab_size is not None:
            check_token_ids(windows, self.vocab_size, self.where)
        batch = torch.from_numpy(windows)  # (per_rank, T + 1)
        if self.device.type == "cuda":
            batch = batch.pin_memory()  # lets the copy below overlap with compute
        batch = batch.to(self.device, non_blocking=True)
        return [(batch[i:i + self.micro_batch, :-1], batch[i:i + self.micro_batch, 1:])
                for i in range(0, self.per_rank, self.micro_batch)]
