"""`nanoqwen <command>`: a thin dispatcher. Each command lives in its own module, which defines
`add_arguments(parser)` and `run(args) -> int`; the module is imported only when its command runs.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import difflib
import importlib
import io
import os
import sys
import textwrap
import time
from collections.abc import Callable
from typing import NoReturn

from nanoqwen import __version__
from nanoqwen.errors import Interrupted, NanoQwenError, RankError, user_error_line
from nanoqwen.io import discard_output

COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("nanoqwen.data.prepare", "corpus -> tokenizer -> train.bin/val.bin token shards"),
    "train": ("nanoqwen.train", "train a model (no arguments: the default preset on the built-in corpus)"),
    "sample": ("nanoqwen.generate", "generate text from a checkpoint"),
    "eval": ("nanoqwen.evaluate", "loss, accuracy, perplexity and bits per byte on a text file or prepared data"),
    "chat": ("nanoqwen.chat", "interactive chat in the terminal"),
    "serve": ("nanoqwen.serve.app", "OpenAI-compatible HTTP server with a web page"),
    "init": ("nanoqwen.checkpoint", "write a random-weight checkpoint folder for a preset"),
    "tokenizer": ("nanoqwen.tokenizer_cli", "write the official Qwen3 tokenizer or train a BPE"),
    "plot": ("nanoqwen.plot", "draw loss.png for a run folder, or several runs' curves in one figure"),
    "gguf": ("nanoqwen.gguf", "write a checkpoint as one GGUF file for llama.cpp, Ollama, LM Studio"),
}
# Flags that name files or folders. An empty one is refused up front, and an --out of "-". tokenizers and safetensors
# take paths as UTF-8 strings, so a name whose bytes are not UTF-8 (read by Python as lone surrogates) is too, not
# mid-write.
PATH_FLAGS = ("out", "model", "data", "dataset", "init_from", "text_file", "tokenizer", "config", "runs")
# What --out names, where it is not a folder (prepare, train, init, tokenizer write one).
OUT_KINDS = {"gguf": "file", "plot": "file or folder"}


def refuse(prog: str, message: str) -> NoReturn:
    """A bad command line in one line, as every other bad input is (the usage block is --help's); exit 2."""
    say_error(prog, f"{prog}: error: {message} (see {prog} --help)")
    sys.exit(2)


# How long a process that leaves an error to LOCAL_RANK 0 waits before it exits: torchrun ends the whole job as soon
# as one process fails, which could be before LOCAL_RANK 0, a moment behind, has said it. (Ended by torchrun sooner.)
QUIET_EXIT_WAIT_S = 10.0


# What a torchrun job's processes stop with: train, the one command that runs as one, or a command line too wrong to
# name a command (`torchrun ... -m nanoqwen trian`). Another command is alone, whatever LOCAL_RANK it inherits (a
# subprocess of a torchrun worker, a process of another launcher).
TORCHRUN_PROGS = ("nanoqwen train", "nanoqwen")


def says_errors(error: BaseException | None = None, prog: str = TORCHRUN_PROGS[0]) -> bool:
    """Whether this process says the error `prog` stops with. Under torchrun each process parses the same
    flags and checks the same paths and device before the job's process group exists (train says the errors met
    after that once, see distributed.say_once), and each said the same line: LOCAL_RANK 0 says it for its machine.
    A RankError (a GPU missing for one process) is said by the process that meets it."""
    return isinstance(error, RankError) or prog not in TORCHRUN_PROGS or os.environ.get("LOCAL_RANK", "0") == "0"


def say_error(prog: str, line: str, error: BaseException | None = None) -> None:
    """`line` where this process says `prog`'s error (see says_errors); else nothing, after a wait for the one that
    does."""
    if says_errors(error, prog):
        say(line)
    else:
        with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C reaches every process of the job: no traceback here
            time.sleep(QUIET_EXIT_WAIT_S)


class Parser(argparse.ArgumentParser):
    """argparse, but its refusals are `refuse`'s one line, and a misspelt choice (a command, --optimizer ...) is
    answered with the one meant. `epilog_source`, where set, makes the epilog when help is shown (not at every start).
    """

    epilog_source: Callable[[], str] | None = None

    def format_help(self) -> str:
        if self.epilog_source is not None:
            self.epilog = self.epilog_source()
        return super().format_help()

    def error(self, message: str) -> NoReturn:
        refuse(self.prog, message)

    def _check_value(self, action: argparse.Action, value: object) -> None:
        choices = [str(c) for c in action.choices or ()]
        if isinstance(value, str) and choices and value not in action.choices:  # type: ignore[operator]
            close = difflib.get_close_matches(value, choices, n=1)
            if close:
                raise argparse.ArgumentError(action, f"invalid choice: {value!r}; did you mean {close[0]!r}? "
                                                     f"(choose from {', '.join(choices)})")
        super()._check_value(action, value)  # type: ignore[misc]


class LinesFormatter(argparse.HelpFormatter):
    """Wraps each line of a description or epilog on its own, where argparse joins them into one paragraph: a list
    stays one item a line, an item's further lines indented under its text."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n".join(textwrap.fill(line, width, initial_indent=indent,
                                        subsequent_indent=indent + " " * (len(line) - len(line.lstrip()) + 2))
                          for line in text.splitlines())


def list_presets(p: argparse.ArgumentParser) -> None:
    """End the --help of a command that takes --preset with each preset and what it is: read from every preset file
    when the help is shown, not at each start of the command."""
    from nanoqwen.config import presets_help

    p.formatter_class = LinesFormatter
    if isinstance(p, Parser):
        p.epilog_source = lambda: f"presets:\n{presets_help()}"
    else:  # a caller's own argparse parser (a test, a script): the list made now
        p.epilog = f"presets:\n{presets_help()}"


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = Parser(prog="nanoqwen", description="Train Qwen3-architecture models from scratch.")
    parser.add_argument("--version", action="version", version=f"nanoqwen {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:  # only the chosen command's module is imported
            importlib.import_module(module_name).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    redirected_streams_as_utf8()  # before anything is said: --help, a bad flag's line
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in COMMANDS:
        command = None
    prog = f"nanoqwen {command}" if command else "nanoqwen"
    try:  # the command's module is imported here (torch: seconds), before its run's own handlers
        args, unknown = build_parser(command).parse_known_args(argv)
    except KeyboardInterrupt:
        return interrupted(prog)
    prog = getattr(args, "command_prog", prog)  # a subcommand's own (`nanoqwen tokenizer train`), as argparse says it
    if unknown:  # the top-level parser finds them, but they were meant for the command: point at its help
        refuse(prog, f"unrecognized arguments: {' '.join(unknown)}{_expanded_wildcard_hint(unknown)}")
    if args.command is None:  # a bare `nanoqwen` (anything else that names no command the parser refused above)
        build_parser().print_help()
        return 0
    with contextlib.suppress(AttributeError):  # a prompt with undecodable bytes is printed, never a traceback
        sys.stdout.reconfigure(errors="replace")  # type: ignore[union-attr]
    try:
        check_path_flags(args)
        return importlib.import_module(COMMANDS[args.command][0]).run(args) or 0
    except NanoQwenError as e:
        say_error(prog, f"{prog}: error: {e}", e)
        return 2
    except KeyboardInterrupt as e:
        return interrupted(prog, e)
    except BrokenPipeError:  # `nanoqwen sample ... | head`
        discard_output(sys.stdout)
        return 0
    except OSError as e:
        line = user_error_line(e)
        if line is None:
            raise
        say_error(prog, f"{prog}: error: {line}", e)
        return 2


def redirected_streams_as_utf8() -> None:
    """On Windows, the standard streams that are not a console read and write UTF-8, as in Python's UTF-8 mode (its
    default from 3.15): they were in the ANSI code page (cp1252), so `nanoqwen sample ... > out.txt` lost every
    character outside it (Chinese, emoji) and a UTF-8 file piped into chat was misread. A console is UTF-8 already;
    elsewhere the locale's encoding is the terminal's, and PYTHONIOENCODING (or UTF-8 mode) is the user's choice."""
    if sys.platform != "win32" or sys.flags.utf8_mode or os.environ.get("PYTHONIOENCODING"):
        return
    for stream in (sys.stdin, sys.stdout, sys.stderr):
        if not isinstance(stream, io.TextIOWrapper) or codecs.lookup(stream.encoding).name == "utf-8":
            continue  # (None: closed by the shell; a caller's own stream, such as a StringIO)
        with contextlib.suppress(OSError, ValueError):  # closed, or a caller's stdin already read from: left as it is
            if not stream.isatty():
                stream.reconfigure(encoding="utf-8")


def interrupted(prog: str, error: KeyboardInterrupt | None = None) -> int:
    """Ctrl-C: said in one line, with the shell's exit status for it (under torchrun, where every process gets
    it, by the process that says the job's errors for its machine). An Interrupted says what it left behind."""
    if says_errors(prog=prog):
        say(f"{prog}: interrupted" + (f" {error.detail}" if isinstance(error, Interrupted) else ""))
    return error.status if isinstance(error, Interrupted) else 130


def _expanded_wildcard_hint(unknown: list[str]) -> str:
    """Files left over after a flag that takes one (`--dataset notes/*.txt`, which the shell expanded into all of
    them): say what to give instead."""
    if all(not arg.startswith("-") and os.path.exists(arg) for arg in unknown):
        return "; a flag takes one file or folder (did the shell expand a wildcard?): give the folder that holds them"
    return ""


def say(line: str) -> None:
    """A line to stderr in one write: under torchrun every rank says its error at once, and print's two writes (the
    text, then its newline) interleaved in an unbuffered stream, two ranks' lines run together on one."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def check_path_flags(args: argparse.Namespace) -> None:
    """Refuse empty and non-UTF-8 path flags; expand a leading ~ (the shell expands none in `--out=~/data`, which
    would make a folder named "~" here)."""
    for name in PATH_FLAGS:
        value = getattr(args, name, None)
        flag = "RUN" if name == "runs" else "--" + name.replace("_", "-")
        for path in value if isinstance(value, list) else [value]:
            if not isinstance(path, str):
                continue
            if not path:  # read as "not given" (the default corpus trained on, MODEL.gguf written) or as "."
                raise NanoQwenError(f"{flag} is empty; give a file or folder name")
            if path == "-" and name == "out":  # (eval's --text-file reads "-" as standard input)
                # Unix tools' name for standard output, but every command writes its files whole or not at all (a
                # GGUF's writer seeks, and llama.cpp loads one from a file): a file or folder "-" was made instead.
                raise NanoQwenError(f"{flag} - would be standard output, which this command does not write to; "
                                    f'give a {OUT_KINDS.get(args.command, "folder")} name (./- for one named "-")')
            try:
                path.encode("utf-8")
            except UnicodeEncodeError:
                raise NanoQwenError(f"{flag}: the name {path.encode('utf-8', 'replace').decode()!r} is not valid "
                                    "UTF-8; rename it, or choose another") from None
        if isinstance(value, list):
            setattr(args, name, [os.path.expanduser(path) if isinstance(path, str) else path for path in value])
        elif isinstance(value, str):
            setattr(args, name, os.path.expanduser(value))


if __name__ == "__main__":
    raise SystemExit(main())
