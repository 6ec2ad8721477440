"""Zstandard-compressed files (.zst, .zstd), read where the `zstandard` package is installed (nanoqwen does not
depend on it): opened as `gzip.open` opens a .gz, so the corpus readers read them alike."""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path
from typing import IO, Any

SUFFIXES = (".zst", ".zstd")
OUTPUT_BYTES = 1 << 20  # decompressed bytes asked of zstandard at a time: a read's most, whatever the data's ratio
# The frame format (RFC 8878), as far as finding where a file's frames end takes
MAGIC = 0xFD2FB528
SKIPPABLE_MAGIC, SKIPPABLE_MASK = 0x184D2A50, 0xFFFFFFF0  # 16 magic numbers: 0x184D2A50 to 0x184D2A5F
RLE_BLOCK = 1  # a block of one byte repeated: its header's size is the size it decompresses to, its content 1 byte


def available() -> bool:
    """Whether the `zstandard` package is installed (looked up, not imported)."""
    return importlib.util.find_spec("zstandard") is not None


class BadZstdFile(OSError):
    """Data that is not zstd, as gzip's BadGzipFile is an OSError."""


class _Reader(io.RawIOBase):
    """The decompressed bytes of a .zst file, every frame of it (as `zstd -d` writes them: files joined with `cat`, or
    compressed by pzstd, hold several), read through zstandard's stream reader, which gives at most the bytes asked
    for (its decompressobj gives all that the compressed bytes given to it hold: 32 KB of a crafted file are a GB).
    Unlike that reader, a file cut short is an EOFError, as gzip's is (that one ends in silence where the data does),
    and a seek back starts again from the beginning (a reader looks at a file's first bytes, then reads it from the
    start)."""

    def __init__(self, path: Path) -> None:
        import zstandard

        self._zstandard = zstandard
        self._path = path
        self._file = path.open("rb")
        self._whole: bool | None = None  # whether the file ends between frames, once its end is reached
        self._rewind()

    def _rewind(self) -> None:
        self._file.seek(0)
        self._stream = self._zstandard.ZstdDecompressor().stream_reader(self._file, read_across_frames=True,
                                                                        closefd=False)
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def readinto(self, buffer: Any) -> int:
        with memoryview(buffer) as view:
            try:
                n = self._stream.readinto(view[:OUTPUT_BYTES])
            except self._zstandard.ZstdError as e:
                raise BadZstdFile(str(e)) from None
        if n == 0 and len(buffer) and not self._ends_whole():
            raise EOFError("Compressed file ended before the end-of-frame marker was reached")
        self._position += n
        return n

    def _ends_whole(self) -> bool:
        if self._whole is None:
            with self._path.open("rb") as file:  # (the stream reader's own file stays where it read to)
                self._whole = _ends_between_frames(file)
        return self._whole

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_CUR:
            offset += self._position
        elif whence != io.SEEK_SET:
            raise io.UnsupportedOperation("a zstd stream cannot seek from its end")
        if offset < self._position:
            self._rewind()
        while self._position < offset and self.read(min(offset - self._position, OUTPUT_BYTES)):
            pass
        return self._position

    def close(self) -> None:
        if hasattr(self, "_file"):  # (not where opening it failed)
            self._file.close()
        super().close()


def _ends_between_frames(file: IO[bytes]) -> bool:
    """Whether the zstd data of `file` ends where a frame does, not inside one: walked from frame to frame and block to
    block by their headers (a few bytes read per block of up to 128 KB of text), once its decompressed bytes are all
    read. (Bytes that are no frame were refused as the data was decompressed.)"""
    size = file.seek(0, io.SEEK_END)
    position = 0
    while position < size:
        file.seek(position)
        head = file.read(8)  # the magic number, then a frame's descriptor or a skippable frame's size
        if len(head) < 8:  # (no frame is shorter than 9 bytes)
            return False
        magic = int.from_bytes(head[:4], "little")
        if magic & SKIPPABLE_MASK == SKIPPABLE_MAGIC:
            position += 8 + int.from_bytes(head[4:8], "little")
            continue
        if magic != MAGIC:
            return True
        descriptor = head[4]
        single_segment = bool(descriptor & 0x20)
        content_size_bytes = (int(single_segment), 2, 4, 8)[descriptor >> 6]
        position += 5 + (not single_segment) + (0, 1, 2, 4)[descriptor & 3] + content_size_bytes
        last = False
        while not last:
            file.seek(position)
            header = int.from_bytes(file.read(3), "little")
            if position + 3 > size:
                return False
            last, kind, block_size = bool(header & 1), header >> 1 & 3, header >> 3
            position += 3 + (1 if kind == RLE_BLOCK else block_size)
        position += 4 if descriptor & 0x04 else 0  # the content checksum
    return position == size


def open_zstd(path: Path) -> IO[bytes]:
    """A .zst file's decompressed bytes, buffered: read, read by line, seek."""
    return io.BufferedReader(_Reader(path), buffer_size=1 << 17)
