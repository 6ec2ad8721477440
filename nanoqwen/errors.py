"""The one exception type that the command line turns into a single clear line, argparse types that
refuse bad numbers as argparse does (one line, exit 2), and the wording messages share."""

import argparse
import errno
import math
from typing import Any


class NanoQwenError(Exception):
    """A problem with the user's input: the message says what is wrong and what to do."""


class RankError(NanoQwenError):
    """A problem of one process of a torchrun job that the others need not meet (its own GPU): said by the process
    that meets it, where one alike in every process (a bad flag) is said once a machine (see cli.says_errors)."""


class InvalidSetting(NanoQwenError):
    """A setting out of its range, its name carried apart (`name`), so that a caller can point at the setting
    without reading the message (the server's error body names it in `param`). The message starts with the name."""

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"{name} {problem}")
        self.name, self.problem = name, problem


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (or a signal) that left something to say in its line: what was kept and what to do, after
    "interrupted "; `status` is the shell's exit status for the signal (130 for Ctrl-C)."""

    def __init__(self, detail: str, status: int = 130) -> None:
        super().__init__(detail)
        self.detail, self.status = detail, status


# What the file system may refuse, with what to do about it: said in one line, as the user's problem it is.
FILE_SYSTEM_ERRORS = {errno.ENOSPC: "free some space or write elsewhere", errno.EDQUOT: "free some space or "
                      "write elsewhere", errno.EACCES: "check its permissions", errno.EPERM: "check its permissions",
                      errno.EROFS: "write elsewhere", errno.ENOTDIR: "", errno.EISDIR: "", errno.EEXIST: "",
                      errno.ENAMETOOLONG: "choose a shorter name", errno.ELOOP: "",
                      errno.ENOENT: "check the path"}


def user_error_line(error: BaseException) -> str | None:
    """What the command line says of an error that is the user's problem (ours, or what the file system
    refused: a full disk), after "nanoqwen CMD: error: "; None for any other (a bug: its traceback)."""
    if isinstance(error, NanoQwenError):
        return str(error)
    if not isinstance(error, OSError) or error.errno not in FILE_SYSTEM_ERRORS:
        return None
    where = f": {error.filename}" + (f" -> {error.filename2}" if error.filename2 else "") if error.filename else ""
    hint = FILE_SYSTEM_ERRORS[error.errno]
    return f"{error.strerror}{where}{'; ' + hint if hint else ''}"


def first_line(error: BaseException, limit: int | None = None) -> str:
    """The first line of an error from a library, to quote inside one of ours (at most `limit` characters,
    the cut marked)."""
    line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return line if limit is None or len(line) <= limit else line[:limit - 1].rstrip() + "…"


def counted(count: int, noun: str) -> str:
    """"1 step", "2 steps": a count with its noun (nouns that take an s)."""
    return f"{count:,} {noun}" if count == 1 else f"{count:,} {noun}s"


def whole_number(text: str) -> int:
    """A flag's whole number; argparse's own refusal of one named the type function ("invalid seed_int value")."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text}") from None


def decimal_number(text: str) -> float:
    """A flag's number, decimals allowed (3e-4, 0.1); argparse's own refusal of one named the type ("invalid float
    value"). NaN, which float() takes, is no number any setting can hold."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if math.isnan(value):
        raise argparse.ArgumentTypeError(f"must be a number, got {text}")
    return value


def positive_int(text: str) -> int:
    value = whole_number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text}")
    return value


def port_number(text: str) -> int:
    value = whole_number(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port from 1 to 65535, got {text}")
    return value


SEED_LIMIT = 2**63  # seeds are 0 .. SEED_LIMIT - 1: what torch's generators take
SEED_RANGE = "between 0 and 2**63 - 1"


class OneCorpus(argparse.Action):
    """--dataset: argparse keeps a flag's last value, so a second corpus given was read in the place of the first,
    which was left out in silence. (The default given first, then another, reads as the other given alone: the
    namespace holds nothing else to tell them apart by, and a mark of its own would be recorded with the flags.)"""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        given = getattr(namespace, self.dest, None)
        if given not in (None, self.default, values):
            raise argparse.ArgumentError(self, f"given twice, {given} and {values}, where one corpus is read: give a "
                                         "folder that holds both")
        setattr(namespace, self.dest, values)


def seed_int(text: str) -> int:
    value = whole_number(text)
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"must be {SEED_RANGE}, got {text}")
    return value
