"""`nanoqwen chat`: talk to a checkpoint in the terminal.

Chat models get the conversation through the checkpoint's chat template (ChatML, the turns of Qwen3's own
template, or the folder's own, as official Qwen3 folders carry); base models can be driven with `--raw`, where the
whole transcript is plain text that the model continues. Replies stream in as they are generated.
When the history no longer fits the context, the oldest turns are dropped.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import select
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from nanoqwen.checkpoint import display_name
from nanoqwen.errors import NanoQwenError
from nanoqwen.generate import (
    ESCAPES_HELP,
    SamplingParams,
    add_sampling_arguments,
    escaped_text,
    load_for_sampling,
    nth_seed,
    printable,
    reopen_closed_stdout,
    stream_batch,
)
from nanoqwen.model import Qwen3
from nanoqwen.runs import trained_on_plain_text
from nanoqwen.tokenizer import Tokenizer

PROMPT = "you> "
MORE = "...> "  # the prompt for the next line of a message of several lines
BLOCK = '"""'  # opens and closes a message of several lines (pasted text, code)
THINK_START, THINK_END = "<think>", "</think>"
PASTE_GAP_S = 0.05  # input waiting this soon after a line is the rest of a paste, not typed
QUIT = ("/exit", "/quit")  # either ends the chat, as Ctrl-D does
HELP = ('Type a message and press Enter; """ opens and closes a message of several lines, and // sends a '
        "message that starts with /. Ctrl-C stops a reply. /reset clears the history, /help shows this, "
        f"{' or '.join(QUIT)} quits (or Ctrl-D).")
def read_message(read_line: Callable[[str], str], pasted: Callable[[], bool] = lambda: False) -> tuple[str, str]:
    """The next thing typed: ("command", "/reset"), ("message", text) or ("empty", "").

    A line that starts with BLOCK, with no other BLOCK in it, goes on over the next lines up to one that ends
    with BLOCK; the text between is the message, its newlines kept (a line like BLOCK + text + BLOCK is sent
    as typed, as code would have it). A line that starts with // is a message starting with /.
    Lines that come while `pasted()` says more input is already waiting are one message too, as typed, its
    first line a message even if it starts with /: Python's readline turns bracketed paste off (and libedit or
    TERM=dumb have none), so a paste comes in a line at a time.
    EOFError and KeyboardInterrupt from `read_line` pass through (a block cut short is dropped with them).
    """
    line = read_line(PROMPT)
    stripped = line.strip()
    if stripped.startswith(BLOCK) and BLOCK not in stripped[len(BLOCK):]:
        lines = [line.lstrip()[len(BLOCK):]]
        while not lines[-1].rstrip().endswith(BLOCK):
            lines.append(read_line(MORE))
        lines[-1] = lines[-1].rstrip()[:-len(BLOCK)]
        return several_lines(lines)
    lines = [line]
    while pasted():
        lines.append(read_line(MORE))
    if len(lines) > 1:
        return several_lines(lines)
    if stripped.startswith("//"):
        return "message", line.lstrip()[1:]
    if stripped.startswith("/"):
        return "command", stripped
    return ("message", line) if stripped else ("empty", "")


def several_lines(lines: list[str]) -> tuple[str, str]:
    """A message of several lines, less the empty lines around it (a BLOCK on its own line leaves one)."""
    text = "\n".join(lines).strip("\n")
    return ("message", text) if text.strip() else ("empty", "")


class Terminal:
    """What the user has typed or pasted that the chat has not read yet. Only a terminal is asked: piped input
    is one message a line, read to its end."""

    def __init__(self, stdin: TextIO) -> None:
        self.fd = stdin.fileno() if os.name == "posix" and stdin.isatty() else None

    def waiting(self, timeout: float = 0.0) -> bool:
        return self.fd is not None and bool(select.select([self.fd], [], [], timeout)[0])

    def pasted(self) -> bool:
        """More input already waiting, or about to be (a long paste comes in chunks).

        GNU readline reads a byte at a time, so what follows the line input() returned is still the terminal's.
        """
        return self.waiting(PASTE_GAP_S)

    def end_of_input(self) -> bool:
        """Whether Ctrl-D was pressed on an empty line while no prompt was up (during a reply).

        The terminal, in its line mode then, holds an end of input: readable, with no bytes to read (as Linux
        counts them). Reading takes it; left there, the next prompt read it as a stray key (readline's raw mode
        sees a NUL) and the chat went on.
        """
        if not self.waiting():
            return False
        import fcntl  # POSIX only, as self.fd is
        import termios

        if struct.unpack("i", fcntl.ioctl(self.fd, termios.FIONREAD, bytes(4)))[0]:
            return False  # a line typed ahead: the next prompt's
        return os.read(self.fd, 1) == b""

    def input(self, prompt: str) -> str:
        """input(), or EOFError at once for a Ctrl-D pressed since the last prompt (as a reply ended)."""
        if self.end_of_input():
            raise EOFError
        return input(prompt)

    @staticmethod
    def history_length() -> int:
        readline = sys.modules.get("readline")
        return readline.get_current_history_length() if readline else 0

    @staticmethod
    def keep_whole(first: int, message: str) -> None:
        """Make the lines of a message read since history entry `first` one entry: Up brings the message back
        whole (readline returns its newlines with it, one message again), not its last line alone."""
        readline = sys.modules.get("readline")
        if readline is None:
            return
        with contextlib.suppress(ValueError, AttributeError):  # libedit's numbering may differ: leave it be
            while readline.get_current_history_length() > first:
                readline.remove_history_item(readline.get_current_history_length() - 1)
            readline.add_history("/" + message if message.lstrip().startswith("/") else message)  # "//": no command


class Conversation:
    """The history and how it becomes prompt ids that leave `reserve` tokens of the context for the reply."""

    def __init__(self, tokenizer: Tokenizer, context: int, reserve: int, system: str | None = None,
                 raw: bool = False, thinking: bool | None = None) -> None:
        self.tokenizer, self.context, self.reserve = tokenizer, context, reserve
        self.system, self.raw = system, raw
        # The chat template's enable_thinking; None leaves it to the template (Qwen3's own thinks by default).
        self.template_kwargs = {} if thinking is None else {"enable_thinking": thinking}
        self.messages: list[dict[str, str]] = []  # user/assistant turns (ChatML mode)
        self.transcript = ""  # the text so far (raw mode)
        self.dropped = 0  # turns (or, raw, tokens) dropped to fit, for the caller to mention
        self._before_user: tuple[list[dict[str, str]], str] = ([], "")  # the history before the last add_user
        # Whether the last prompt ends inside a thinking block its template opened (Qwen3's 2507 Thinking models):
        # the reply is thinking from its first token on, and only closes it.
        self.prompt_opens_thinking = False

    def reset(self) -> None:
        self.messages, self.transcript = [], ""

    def add_user(self, text: str) -> list[int] | None:
        """Record the user's message; the prompt ids to generate from, or None if it cannot fit at all."""
        self.dropped = 0
        self._before_user = (list(self.messages), self.transcript)
        limit = self.context - self.reserve
        if self.raw:
            ids = self.tokenizer.encode(self.transcript + text)
            if len(ids) > limit:  # keep the most recent text, from a whole character on
                cut = len(ids) - limit
                while cut < len(ids) - 1 and self.tokenizer.decode(ids[cut:cut + 1]).startswith("\ufffd"):
                    cut += 1  # a byte-level token that continues a character cut off before it
                self.dropped, ids = cut, ids[cut:]
            self.transcript = self.tokenizer.decode(ids)
            return ids
        kept = list(self.messages)
        self.messages.append({"role": "user", "content": text})
        try:
            fit = self._fit(limit)
        except NanoQwenError:  # the model's own template refused the conversation: keep it as it was
            self.messages = kept
            raise
        if fit is None:  # hopeless even alone: keep the history as it is
            self.messages = kept
            return None
        self.dropped, prompt, ids = fit
        self.messages = self.messages[self._first_kept(self.dropped):]
        self.prompt_opens_thinking = prompt.rstrip().endswith(THINK_START)
        return ids

    def _first_kept(self, turns: int) -> int:
        """Where the messages start once the oldest `turns` (a user message and its reply each) are dropped; the
        new message, last, always stays."""
        return min(2 * turns, len(self.messages) - 1)

    def _fit(self, limit: int) -> tuple[int, str, list[int]] | None:
        """The fewest oldest turns to drop for the conversation, its new message last, to take at most `limit`
        tokens, with the prompt and ids then; every turn where the message alone takes more, and None where it
        takes more than the context (one as long as the context still gets a token of reply, which is predicted,
        not read: see check_fits).

        Each try renders and encodes the whole conversation, so the turns to drop are found by galloping (1, 2,
        4, ...) then bisecting: a message that pushes out hundreds of short turns took a try a turn, minutes."""
        most = len(self.messages) // 2  # dropping that many leaves the new message alone
        tried: dict[int, tuple[str, list[int]]] = {}

        def fits(turns: int) -> bool:
            if turns not in tried:
                prompt = self._prompt(self.messages[self._first_kept(turns):])
                tried[turns] = (prompt, self.tokenizer.encode(prompt))
            return len(tried[turns][1]) <= limit

        if fits(0):
            return 0, *tried[0]
        too_few, enough = 0, min(1, most)
        while enough < most and not fits(enough):
            too_few, enough = enough, min(2 * enough, most)
        if not fits(enough):  # (enough == most) even the message alone leaves the reply less than `limit` asks
            return None if len(tried[enough][1]) > self.context else (enough, *tried[enough])
        while enough - too_few > 1:
            middle = (too_few + enough) // 2
            too_few, enough = (too_few, middle) if fits(middle) else (middle, enough)
        return enough, *tried[enough]

    def withdraw(self) -> None:
        """Undo the last add_user (a reply stopped before its first token): the history is as it was, the turns
        dropped to fit that message included."""
        self.messages, self.transcript = list(self._before_user[0]), self._before_user[1]
        self.dropped = 0

    def add_reply(self, text: str) -> None:
        if self.raw:
            self.transcript += text
            return
        # The reply as generated: the next prompt must render the conversation that really happened. Only a
        # template that thinks (official Qwen3, or one that opened the reply's thinking) drops a reply's thinking
        # from the history, as it does itself. A reply cut before its </think> (Ctrl-C, --max-new-tokens) has no
        # answer: kept whole, the next prompt showed an open thinking block as that turn's answer.
        if self.cut_while_thinking(text):
            text = ""
        elif (self.tokenizer.thinking_switch or self.prompt_opens_thinking) and THINK_END in text:
            text = text.split(THINK_END)[-1].lstrip("\n")
        self.messages.append({"role": "assistant", "content": text})

    def cut_while_thinking(self, text: str) -> bool:
        """Whether a reply to the last prompt, `text`, ends before its thinking does, a template that thinks having
        opened it (in the prompt, or the reply opening with <think>): no answer has begun."""
        return (not self.raw and (self.tokenizer.thinking_switch or self.prompt_opens_thinking)
                and THINK_END not in text and (self.prompt_opens_thinking or text.lstrip().startswith(THINK_START)))

    def fixed_ids(self) -> int:
        """Tokens the conversation takes before any message: the system prompt, in the template."""
        return len(self._ids([])) if self.system and not self.raw else 0

    def _prompt(self, messages: list[dict[str, str]]) -> str:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return self.tokenizer.render_chat(system + messages, **self.template_kwargs)

    def _ids(self, messages: list[dict[str, str]]) -> list[int]:
        return self.tokenizer.encode(self._prompt(messages))


def reply(model: Qwen3, tokenizer: Tokenizer, ids: list[int], params: SamplingParams,
          quitting: Callable[[], bool] = lambda: False) -> tuple[str, str | None]:
    """Stream one reply to stdout; return its text (the text so far where it was cut, for the history) and what
    cut it: "stopped" (Ctrl-C), "max tokens" (--max-new-tokens), "context full", or None (it ended).
    `quitting()` is asked at each token: True (Ctrl-D) stops it too, then raises EOFError, so that the chat ends
    as Ctrl-D at the prompt ends it.
    """
    text, cut, ended = "", None, False
    try:
        for _, delta, done in stream_batch(model, tokenizer, [ids], params):
            if delta:
                text += delta
                sys.stdout.write(printable(delta))
                sys.stdout.flush()
            if done is not None and done.finish_reason == "length":
                # Cut short by the end of the context, not by --max-new-tokens: say so, as it may end mid-word.
                full = (len(done.token_ids) < params.max_new_tokens
                        and len(ids) + len(done.token_ids) >= model.config.max_position_embeddings)
                cut = "context full" if full else "max tokens"
                if full:
                    sys.stdout.write(" [context full]")
            if done is None and quitting():
                cut, ended = "stopped", True
                break
    except KeyboardInterrupt:
        cut = "stopped"
    sys.stdout.write(" [stopped]\n" if cut == "stopped" else "\n")
    sys.stdout.flush()
    if ended:
        raise EOFError
    return text, cut


# -- `nanoqwen chat` -----------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    from nanoqwen.distributed import add_device_arguments

    p.add_argument("--model", required=True, help="checkpoint folder (e.g. runs/NAME/best)")
    p.add_argument("--system", default=None, type=escaped_text,
                   help=f"system message of the chat template (not with --raw); {ESCAPES_HELP} "
                        "(what you type in the chat is sent as typed)")
    p.add_argument("--raw", action="store_true",
                   help="plain continuation for base models: the transcript is the prompt, no chat template")
    p.add_argument("--thinking", action=argparse.BooleanOptionalAction, default=None,
                   help="for models that think before they answer (official Qwen3): --no-thinking asks for the "
                        "answer alone (the chat template's enable_thinking=False); default: the template's own")
    add_sampling_arguments(p, max_new_tokens=256)
    add_device_arguments(p)


def new_conversation(args: argparse.Namespace, tokenizer: Tokenizer, context: int, max_new_tokens: int
                     ) -> Conversation:
    """The empty conversation the flags ask for; one clear line where they cannot work with this model."""
    if not args.raw:  # before any message: a model without a default template has none to chat with
        tokenizer.check_default_template()
    # Room kept for a reply: max_new_tokens, but at most half the context, so history is never squeezed out.
    # At least one token is kept free: a prompt must leave room for the reply to start.
    reserve = max(1, min(max_new_tokens, context // 2))
    conversation = Conversation(tokenizer, context, reserve, args.system, args.raw, args.thinking)
    if conversation.fixed_ids() + reserve >= context:
        raise NanoQwenError(f"--system takes {conversation.fixed_ids()} tokens, which leaves no room in the context "
                            f"of {context} for a message and a reply of up to {reserve} tokens; shorten it")
    if args.thinking is not None and not tokenizer.thinking_switch:
        # ChatML (models trained here), or a folder's own template (Qwen3's 2507 Thinking models always think)
        why = ("as models trained here do not think before answering" if not tokenizer.chat_template else
               "it thinks before answering or not as it is written")
        raise NanoQwenError(f"this model's chat template has no thinking switch (enable_thinking), {why}; leave "
                            "--thinking/--no-thinking out")
    return conversation


def run(args: argparse.Namespace) -> int:
    if args.raw and args.system is not None:
        raise NanoQwenError("--system is a chat template's system message; --raw uses no template, so give one or "
                            "the other (with --raw, start the text with it instead)")
    # Typed text that is not UTF-8 reaches the tokenizer as stray characters instead of ending the chat.
    with contextlib.suppress(AttributeError):
        sys.stdin.reconfigure(errors="surrogateescape")  # type: ignore[union-attr]
    if args.thinking is not None and args.raw:
        raise NanoQwenError("--thinking/--no-thinking choose how the chat template starts a reply; --raw uses "
                            "no template, so give one or the other")
    reopen_closed_stdout()
    model, tokenizer, params = load_for_sampling(args)
    context = model.config.max_position_embeddings
    conversation = new_conversation(args, tokenizer, context, params.max_new_tokens)
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401 (line editing and history for input())
    print(f"nanoqwen chat: {display_name(args.model)} · {model.num_params() / 1e6:.1f}M parameters · "
          f"context {context} · {'raw continuation' if args.raw else tokenizer.chat_format}")
    if not args.raw and trained_on_plain_text(Path(args.model)):  # it never learned to end a turn
        print("note: this model was trained on plain text, not conversations, so its replies may run on to "
              "--max-new-tokens; --raw continues what you type as text")
    print(HELP)
    terminal = Terminal(sys.stdin)
    turn = 0  # with --seed, turn k samples with seed + k (nth_seed): a session replays, and turns do not repeat draws
    while True:
        try:
            first = terminal.history_length()
            kind, line = read_message(terminal.input, terminal.pasted)
            if kind == "message" and "\n" in line:
                terminal.keep_whole(first, line)
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:  # like a shell: Ctrl-C drops the line (or the block), Ctrl-D quits
            print()
            continue
        if kind == "empty":
            continue
        if kind == "command":
            if line in QUIT:
                return 0
            if line == "/reset":
                conversation.reset()
                turn = 0
                print("(history cleared)")
            elif line == "/help":
                print(HELP)
            else:  # a message that starts with a word after / (Qwen3's "/no_think ..."): say how to send it
                name, _, rest = line.partition(" ")
                send = f"; /{line} sends it as a message" if rest else ""
                print(f"(unknown command {name}{send}) {HELP}")
            continue
        try:
            ids = conversation.add_user(line)
        except NanoQwenError as e:
            print(f"({e})")
            continue
        if ids is None:  # "alone" is with the system prompt, which a user may not count as part of the message
            beside = f"with the --system prompt's {conversation.fixed_ids()} tokens" if args.system else "alone"
            print(f"(that message {beside} is too long for the context of {context} tokens; shorten it)")
            continue
        if conversation.dropped:
            unit = "token" if args.raw else "turn"
            oldest = f"{conversation.dropped} {unit}s" if conversation.dropped > 1 else unit
            print(f"(dropped the oldest {oldest} to fit the context)")
        seeded = dataclasses.replace(params, seed=nth_seed(params.seed, turn))
        try:
            text, cut = reply(model, tokenizer, ids, seeded, terminal.end_of_input)
        except EOFError:  # Ctrl-D during the reply: it stopped there, and the chat ends
            return 0
        if cut == "stopped" and not text:  # an empty reply would stay in the history as if the model said nothing
            conversation.withdraw()
            print("(stopped before the reply began; the message is not kept)")
            continue
        # Thinking shown and no answer, with nothing to say why (as the web page's note says it).
        if cut == "context full" and conversation.cut_while_thinking(text):
            print("(the context filled while the model was thinking, before its answer; /reset clears the history "
                  "to leave it more room)")
        elif cut == "max tokens" and conversation.cut_while_thinking(text):
            instead = ", or with --no-thinking" if tokenizer.thinking_switch and args.thinking is not False else ""
            print(f"(--max-new-tokens {params.max_new_tokens} ran out while the model was thinking, before its "
                  f"answer: start the chat again with more{instead})")
        elif cut == "stopped" and conversation.cut_while_thinking(text):  # its thinking is not kept: add_reply
            print("(stopped while the model was thinking, before its answer: the turn is kept with no answer)")
        conversation.add_reply(text)
        turn += 1
