"""Zstandard-compressed files (.zst, .zstd), read where the `zstandard` package is installed (nanoqwen does not
depend on it): opened as `gzip.open` opens a .gz, so the corpus readers read them alike."""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path
from typing import IO, Any

SUFFIXES = (".zst", ".zstd")
INPUT_BYTES = 1 << 15  # compressed bytes decompressed at a time: text's ratio keeps what they give to a few hundred KB


def available() -> bool:
    """Whether the `zstandard` package is installed (looked up, not imported)."""
    return importlib.util.find_spec("zstandard") is not None


class BadZstdFile(OSError):
    """Data that is not zstd, as gzip's BadGzipFile is an OSError."""


class _Reader(io.RawIOBase):
    """The decompressed bytes of a .zst file, every frame of it (as `zstd -d` writes them: files joined with `cat`, or
    compressed by pzstd, hold several). Unlike zstandard's own reader, a file cut short is an EOFError, as gzip's is
    (that one ends in silence where the data does), and a seek back starts again from the beginning (a reader looks
    at a file's first bytes, then reads it from the start)."""

    def __init__(self, path: Path) -> None:
        import zstandard

        self._zstandard = zstandard
        self._file = path.open("rb")
        self._rewind()

    def _rewind(self) -> None:
        self._file.seek(0)
        self._frame = self._zstandard.ZstdDecompressor().decompressobj()
        self._in_frame = False  # bytes of the current frame were given to it and its end not reached
        self._ready, self._offset = b"", 0  # decompressed, and how much of it was read
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def readinto(self, buffer: Any) -> int:
        while self._offset == len(self._ready):
            data = self._file.read(INPUT_BYTES)
            if not data:
                if self._in_frame:
                    raise EOFError("Compressed file ended before the end-of-frame marker was reached")
                return 0
            self._decompress(data)
        n = min(len(buffer), len(self._ready) - self._offset)
        buffer[:n] = memoryview(self._ready)[self._offset:self._offset + n]
        self._offset += n
        self._position += n
        return n

    def _decompress(self, data: bytes) -> None:
        ready = []
        while data:
            try:
                ready.append(self._frame.decompress(data))
            except self._zstandard.ZstdError as e:
                raise BadZstdFile(str(e)) from None
            self._in_frame = not self._frame.eof
            if self._in_frame:
                break
            data = self._frame.unused_data  # the next frame's start
            self._frame = self._zstandard.ZstdDecompressor().decompressobj()
        self._ready, self._offset = b"".join(ready), 0

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_CUR:
            offset += self._position
        elif whence != io.SEEK_SET:
            raise io.UnsupportedOperation("a zstd stream cannot seek from its end")
        if offset < self._position:
            self._rewind()
        while self._position < offset and self.read(min(offset - self._position, 1 << 20)):
            pass
        return self._position

    def close(self) -> None:
        if hasattr(self, "_file"):  # (not where opening it failed)
            self._file.close()
        super().close()


def open_zstd(path: Path) -> IO[bytes]:
    """A .zst file's decompressed bytes, buffered: read, read by line, seek."""
    return io.BufferedReader(_Reader(path))
