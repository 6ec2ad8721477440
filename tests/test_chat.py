"""`nanoqwen chat` in a real pseudo-terminal, and its history trimming."""

from __future__ import annotations

import io
import json
import os
import select
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pexpect
import pytest

from nanoqwen.chat import HELP, MORE, PROMPT, Conversation, printable, read_message
from nanoqwen.cli import main
from nanoqwen.errors import NanoQwenError
from nanoqwen.generate import SamplingParams, generate
from nanoqwen.tokenizer import Tokenizer, load_tokenizer, qwen3_tokenizer
from tests.serve_helpers import (
    OPENING_THINKING_TEMPLATE,
    THINKING_TEMPLATE,
    load_reference,
    make_checkpoint,
    make_plain_run,
    wait_for,
    with_chat_template,
)

MAX_NEW = 24


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("chat") / "tiny")


@pytest.fixture(scope="module")
def local(checkpoint: Path):
    return load_reference(checkpoint)


def reply_of(local, messages: list[dict[str, str]] | str, temperature: float = 0.0, seed: int | None = None,
             max_new_tokens: int = MAX_NEW) -> str:
    """The reference reply (greedy unless told): `generate` on the rendered ChatML prompt (or on raw text)."""
    model, tokenizer = local
    prompt = messages if isinstance(messages, str) else tokenizer.render_chat(messages)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                            stop_token_ids=tokenizer.stop_ids)
    return generate(model, tokenizer, [prompt], params)[0].text


def interactive_interrupt() -> None:
    """Ctrl-C's SIGINT at its default in the chat, as a shell starts a program in the foreground: tests run as a
    background job (CI's may) inherit it ignored, and a Python started so never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def spawn_chat(checkpoint: Path, *extra: str, **env: str) -> pexpect.spawn:
    """The chat in a pseudo-terminal (TERM=dumb unless `env` says otherwise), at its first prompt."""
    child = pexpect.spawn(sys.executable, ["-m", "nanoqwen", "chat", "--model", str(checkpoint), "--temperature", "0",
                                           "--max-new-tokens", str(MAX_NEW), "--device", "cpu", *extra],
                          env={**os.environ, "TERM": "dumb", **env}, encoding="utf-8", timeout=90,
                          dimensions=(50, 400), preexec_fn=interactive_interrupt)
    # close() signals a child still alive and gives each signal this long to end it: pexpect's 0.1 s was too short for
    # a process of ~1 GB to be torn down on a heavily loaded machine ("Could not terminate the child", after a pass)
    child.delayafterterminate = 2
    child.expect_exact(PROMPT)
    return child


def say(child: pexpect.spawn, line: str) -> str:
    """Send a line and return what the program printed before its next prompt (echo removed)."""
    child.sendline(line)
    child.expect_exact(PROMPT)
    out = child.before.replace("\r\n", "\n")
    assert out.startswith(line + "\n"), out  # the terminal's echo of the line
    return out[len(line) + 1:]


def test_chat_in_a_terminal(checkpoint: Path, local) -> None:
    child = spawn_chat(checkpoint, "--system", "Be brief.")
    try:
        assert "ChatML" in child.before and f"nanoqwen chat: {checkpoint.name} · " in child.before
        assert "plain text" not in child.before  # weights alone: nothing says what it was trained on
        system = [{"role": "system", "content": "Be brief."}]
        first = reply_of(local, [*system, {"role": "user", "content": "Hello!"}])
        assert say(child, "Hello!") == printable(first) + "\n"
        # The second reply sees the first exchange.
        history = [*system, {"role": "user", "content": "Hello!"}, {"role": "assistant", "content": first}]
        second = reply_of(local, [*history, {"role": "user", "content": "More, please."}])
        assert say(child, "More, please.") == printable(second) + "\n"
        assert "history cleared" in say(child, "/reset")
        assert say(child, "Hello!") == printable(first) + "\n"  # a fresh start gives the first reply again
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_a_model_trained_on_plain_text_is_pointed_to_raw(local, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    # It never learned to end a turn: its chat replies run on to --max-new-tokens and read as broken. One line at
    # start says so and points to --raw; the chat itself is the same (ChatML, as asked).
    best = make_plain_run(tmp_path)  # the weights of `checkpoint`, as a run's best/ beside its plain-text data
    child = spawn_chat(best)
    try:
        lines = child.before.replace("\r\n", "\n").splitlines()
        assert lines[0].startswith("nanoqwen chat: tiny/best · ") and lines[0].endswith(" · ChatML")
        assert lines[1] == ("note: this model was trained on plain text, not conversations, so its replies may run on "
                            "to --max-new-tokens; --raw continues what you type as text")
        assert lines[2].startswith("Type a message")
        assert say(child, "Hello!") == printable(reply_of(local, [{"role": "user", "content": "Hello!"}])) + "\n"
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    # --raw: no note (in this process: the chat above ran in a terminal as users run it)
    capsys.readouterr()
    monkeypatch.setattr(sys, "stdin", io.StringIO("/exit\n"))
    assert main(["chat", "--model", str(best), "--raw", "--device", "cpu"]) == 0
    shown = capsys.readouterr().out
    assert "raw continuation" in shown and "plain text" not in shown


def test_messages_of_several_lines_and_a_leading_slash(checkpoint: Path, local) -> None:
    child = spawn_chat(checkpoint)
    try:
        for line in ('"""', "Roses are red,"):
            child.sendline(line)
            child.expect_exact(MORE)
        child.sendline('violets are blue."""')
        child.expect_exact(PROMPT)
        poem = [{"role": "user", "content": "Roses are red,\nviolets are blue."}]
        expected = reply_of(local, poem)
        assert expected != reply_of(local, [{"role": "user", "content": "violets are blue."}])  # the test can tell
        assert child.before.replace("\r\n", "\n") == 'violets are blue."""\n' + printable(expected) + "\n"
        # "//" sends a message that starts with "/" (here one that reads like a command), in the same history.
        history = [*poem, {"role": "assistant", "content": expected}, {"role": "user", "content": "/reset"}]
        answer = reply_of(local, history)
        assert say(child, "//reset") == printable(answer) + "\n"
        assert "(unknown command /unknown) Type a message" in say(child, "/unknown")  # named, then the help
        # Qwen3's soft switch, as its model card writes it, reads as a command: the line says how to send it
        assert say(child, "/no_think Hi").startswith("(unknown command /no_think; //no_think Hi sends it as a "
                                                    "message) Type a message")
        assert say(child, "/help") == HELP + "\n"  # asked for: the help alone, not an unknown command
        child.send("\x10" * 5 + "\r")  # Ctrl-P (Up) five times: the block, whole, without its quotes
        child.expect_exact(printable(reply_of(local, [*history, {"role": "assistant", "content": answer}, *poem])))
        child.expect_exact(PROMPT)  # (readline redraws the prompt as it shows a message of several lines)
        # (after the Up presses above, which count the lines sent) only /help itself is the help
        assert say(child, "/help me").startswith("(unknown command /help; //help me sends it as a message)")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


@pytest.mark.parametrize("term", ["dumb", "xterm", "no readline"])
def test_a_pasted_text_of_several_lines_is_one_message(checkpoint: Path, local, tmp_path: Path, term: str) -> None:
    # Python's readline turns bracketed paste off, so a paste reaches the chat a line at a time, whatever the
    # terminal: each line was answered on its own. Lines that come together are one message.
    env = {"TERM": term}
    if term == "no readline":  # a Python without it: input() reads the terminal in its line mode
        (tmp_path / "readline.py").write_text("raise ImportError\n")
        env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    child = spawn_chat(checkpoint, **env)
    try:
        child.send("Roses are red,\nviolets are blue.\n")
        child.expect_exact(PROMPT)
        poem = [{"role": "user", "content": "Roses are red,\nviolets are blue."}]
        first = reply_of(local, poem)
        out = child.before.replace("\r\n", "\n")
        # Echoed (by readline, or by the terminal itself as the lines come), then one reply.
        assert out.startswith("Roses are red,\n") and "violets are blue.\n" in out, out
        assert out.endswith(printable(first) + "\n") and out.count(printable(first)) == 1, out
        # A line typed after it is sent at Enter, a message of its own in the same history.
        history = [*poem, {"role": "assistant", "content": first}, {"role": "user", "content": "Hm."}]
        second = reply_of(local, history)
        assert say(child, "Hm.") == printable(second) + "\n"
        if term != "no readline":  # Ctrl-P twice (Up): the pasted message comes back whole, and is sent as one
            child.send("\x10\x10\r")
            child.expect_exact(printable(reply_of(local, [*history, {"role": "assistant", "content": second}, *poem])))
            child.expect_exact(PROMPT)  # (readline redraws the prompt as it shows a message of several lines)
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_help_names_each_command_the_chat_takes_once() -> None:
    # /quit quits as /exit does, but the help named /exit alone (and not /help itself).
    assert [HELP.count(command) for command in ("/help", "/reset", "/exit", "/quit")] == [1, 1, 1, 1]


def test_read_message_blocks_commands_and_blanks() -> None:
    def read(*lines: str, pasted: bool = False) -> tuple[str, str]:
        typed = list(lines)

        def read_line(prompt: str) -> str:  # as input() does: EOFError when nothing more is typed
            if not typed:
                raise EOFError
            return typed.pop(0)
        return read_message(read_line, lambda: pasted and bool(typed))

    assert read('"""', "a", "  b", '"""') == ("message", "a\n  b")  # inner indentation kept
    assert read('"""', "    if x:", "        y", '"""') == ("message", "    if x:\n        y")  # the first line's too
    assert read(' """first', 'last"""  ') == ("message", "first\nlast")
    assert read('"""Docstring.""" more') == ("message", '"""Docstring.""" more')  # opens nothing: as typed
    assert read('"""Docstring."""') == ("message", '"""Docstring."""')
    assert read('"""', "", '"""') == ("empty", "")
    assert read(" /reset ") == ("command", "/reset")
    assert read("//etc/hosts is a file") == ("message", "/etc/hosts is a file")
    assert read("   ") == ("empty", "")
    assert read(" hi ") == ("message", " hi ")  # a message is sent as typed
    with pytest.raises(EOFError):  # Ctrl-D inside a block ends the chat, as at the prompt
        read('"""', "unfinished")
    # Lines that arrive together (a paste) are one message as pasted, less the empty lines around it.
    assert read("", "/etc/hosts", "  //x", "", pasted=True) == ("message", "/etc/hosts\n  //x")
    assert read("", " ", pasted=True) == ("empty", "")
    assert read('"""', "a", '"""', "next", pasted=True) == ("message", "a")  # a block ends where it says


def press_in_reply(child: pexpect.spawn, press: Callable[[], object], landed: Callable[[], bool]) -> None:
    """Press a key while a reply surely streams: the chat is paused (SIGSTOP) until the terminal has turned the key
    into what the chat will see (`landed`), then resumed, so a fast machine cannot end the reply first."""
    os.kill(child.pid, signal.SIGSTOP)
    try:
        wait_for(lambda: stopped(child.pid), "the chat did not stop")  # else it could take the key in between
        press()
        wait_for(landed, "the key never reached the chat")
    finally:
        os.kill(child.pid, signal.SIGCONT)


def stopped(pid: int) -> bool:
    """The process is stopped (state T in /proc/PID/stat, after the command name in parentheses)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"


def interrupt_pending(pid: int) -> bool:
    """SIGINT waits for the process (Ctrl-C became the signal)."""
    pending = [line.split()[1] for line in Path(f"/proc/{pid}/status").read_text().splitlines()
               if line.startswith(("SigPnd:", "ShdPnd:"))]
    return any(int(mask, 16) & (1 << (signal.SIGINT - 1)) for mask in pending)


def end_of_input_queued(pid: int) -> bool:
    """The chat's terminal holds a line or an end of input to read (Ctrl-D reached it): select says so without
    reading it."""
    fd = os.open(os.readlink(f"/proc/{pid}/fd/0"), os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        return bool(select.select([fd], [], [], 0)[0])
    finally:
        os.close(fd)


def test_ctrl_c_stops_a_reply_or_drops_a_line_and_ctrl_d_ends_the_chat_even_in_a_reply(local, tmp_path: Path
                                                                                       ) -> None:
    # Each key lands while a reply streams: one of up to 16,000 tokens (the same weights with a long context; 200
    # tokens were once all out before Ctrl-C), the chat paused while the key lands (press_in_reply). Ctrl-D in a
    # reply was read by the next prompt as a stray key (the chat went on); now it stops the reply and ends.
    child = spawn_chat(make_checkpoint(tmp_path / "long", context=16384), "--max-new-tokens", "16000")

    def ctrl_c() -> None:  # the SIGINT Ctrl-C makes, sent to the chat itself (not through the terminal's settings)
        os.kill(child.pid, signal.SIGINT)

    try:
        hello = [{"role": "user", "content": "Hello!"}]
        longer = reply_of(local, hello, max_new_tokens=32)
        child.sendline("Hello!")
        child.expect_exact("Hello!\r\n" + printable(longer)[:3])
        press_in_reply(child, ctrl_c, lambda: interrupt_pending(child.pid))  # Ctrl-C: stops it there,
        child.expect_exact(" [stopped]\r\n" + PROMPT)  # and the chat goes on
        # The reply may have gone on a token or two after the key.
        shown = (printable(longer)[:3] + child.before).replace("\r\n", "\n")
        assert printable(longer).startswith(shown) and len(shown) < len(longer)
        partial = longer[:len(shown)]  # printable keeps each character's place
        # At the prompt, Ctrl-C drops what was typed: the line, or a block.
        child.send("typed, then dropped")
        child.expect_exact("dropped")
        ctrl_c()
        child.expect_exact(PROMPT)
        for line in ('"""', "a block"):
            child.sendline(line)
            child.expect_exact(MORE)
        ctrl_c()
        child.expect_exact(PROMPT)
        # The reply cut short stays in the history, as far as it went.
        history = [*hello, {"role": "assistant", "content": partial}, {"role": "user", "content": "More."}]
        expected = printable(reply_of(local, history, max_new_tokens=12))
        assert not expected.startswith(printable(reply_of(local, [*hello, history[-1]], max_new_tokens=4)))
        child.sendline("More.")
        child.expect_exact(("More.\n" + expected).replace("\n", "\r\n"))  # 12 of up to 16,000 tokens
        # Ctrl-D in a reply stops it and ends the chat, the terminal as it was
        press_in_reply(child, child.sendeof, lambda: end_of_input_queued(child.pid))
        child.expect(pexpect.EOF)
        assert child.before.endswith(" [stopped]\r\n") and "Traceback" not in child.before, child.before
        assert child.getecho()
    finally:
        child.close()
    assert child.exitstatus == 0


def test_raw_continuation(checkpoint: Path, local) -> None:
    child = spawn_chat(checkpoint, "--raw")
    try:
        first = reply_of(local, "Once upon a time")
        assert say(child, "Once upon a time") == printable(first) + "\n"
        # The transcript so far is the next prompt.
        assert say(child, " and then") == printable(reply_of(local, "Once upon a time" + first + " and then")) + "\n"
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_thinking_switch(checkpoint: Path, local, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A folder with a Qwen3-style template: --no-thinking starts each reply after an empty thinking block.
    thinker = with_chat_template(checkpoint, tmp_path / "thinker")
    tokenizer = load_tokenizer(thinker)
    child = spawn_chat(thinker, "--no-thinking")
    try:
        assert "the model's own chat template" in child.before
        messages = [{"role": "user", "content": "Hello!"}]
        prompt = tokenizer.render_chat(messages, enable_thinking=False)
        assert prompt.endswith("<think>\n\n</think>\n\n")
        first = reply_of(local, prompt)
        assert say(child, "Hello!") == printable(first) + "\n"
        messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "More"}]
        second = reply_of(local, tokenizer.render_chat(messages, enable_thinking=False))
        assert say(child, "More") == printable(second) + "\n"
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    # A model trained here has no switch to turn: one line, not a chat that silently ignores the flag (in this
    # process: a traceback would be an exception here).
    capsys.readouterr()
    assert main(["chat", "--model", str(checkpoint), "--no-thinking", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "has no thinking switch" in err and len(err.strip().splitlines()) == 1


def test_thinking_flags_with_a_folders_template_that_has_no_switch_say_why(checkpoint: Path, tmp_path: Path) -> None:
    # A folder's own template without enable_thinking (Qwen3's 2507 models: the Thinking ones always think, their
    # template opening <think> in the prompt) was refused "as models trained here do not think before answering".
    import argparse

    from nanoqwen.chat import new_conversation

    always = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}" \
             "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
    for folder, why in ((checkpoint, "as models trained here do not think before answering"),
                        (with_chat_template(checkpoint, tmp_path / "always", always),
                         "it thinks before answering or not as it is written")):
        args = argparse.Namespace(system=None, raw=False, thinking=False)
        with pytest.raises(NanoQwenError, match="^this model's chat template has no thinking switch "
                                                rf"\(enable_thinking\), {why}; leave --thinking/--no-thinking out$"):
            new_conversation(args, load_tokenizer(folder), 256, MAX_NEW)


def test_a_model_whose_chat_templates_are_all_named_is_refused_before_the_chat_unless_raw() -> None:
    # None of them "default" (Transformers refuses a chat without tools): chat rendered ChatML, which the folder never
    # names; --raw uses no template.
    import argparse

    from nanoqwen.chat import new_conversation
    from nanoqwen.tokenizer import train_bpe

    tokenizer = Tokenizer(train_bpe(["the cat sat on the mat"] * 20, 300).hf,
                          {"chat_template": [{"name": "tool_use", "template": "{{ tools }}"}]})
    with pytest.raises(NanoQwenError, match="^the chat templates of this model are all named \\(tool_use\\)"):
        new_conversation(argparse.Namespace(system=None, raw=False, thinking=None), tokenizer, 256, MAX_NEW)
    assert new_conversation(argparse.Namespace(system=None, raw=True, thinking=None), tokenizer, 256, MAX_NEW).raw


def test_raw_chat_with_no_reply_budget_survives_a_long_message(checkpoint: Path) -> None:
    child = spawn_chat(checkpoint, "--raw", "--max-new-tokens", "0")  # the later flag wins
    try:
        # 300 digits, one token each, in a line the terminal shows whole; still chatting after it
        assert "(dropped the oldest" in say(child, "7" * 300)
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_a_reply_cut_short_by_the_full_context_says_so(checkpoint: Path, local) -> None:
    # 200 new tokens keep room for 128 (half the context of 256): a 200-token message leaves the reply 56,
    # and it ended mid-word with no word of why.
    child = spawn_chat(checkpoint, "--max-new-tokens", "200")
    try:
        message = "7" * 200  # one token a digit
        _, tokenizer = local
        prompt = tokenizer.render_chat([{"role": "user", "content": message}])
        cut = reply_of(local, [{"role": "user", "content": message}])  # MAX_NEW tokens of the same greedy text
        out = say(child, message)
        assert out.startswith(printable(cut)) and out.endswith(" [context full]\n")
        assert len(tokenizer.encode(prompt)) < 256 - MAX_NEW
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_history_drops_oldest_turns() -> None:
    tokenizer = qwen3_tokenizer()
    conversation = Conversation(tokenizer, context=120, reserve=40, system="sys")
    for i in range(6):
        ids = conversation.add_user(f"message {i} " + "word " * 10)
        assert ids is not None and len(ids) <= 80
        conversation.add_reply(f"reply {i} " + "word " * 10)
    assert conversation.messages[0]["role"] == "user"
    assert conversation.messages[-1]["content"].startswith("reply 5")
    assert not any(m["content"].startswith("message 0") for m in conversation.messages)
    assert conversation.add_user("word " * 200) is None  # alone longer than the context
    assert conversation.messages[-1]["content"].startswith("reply 5")
    # A long message with short replies: dropping the user turn alone would leave its reply first.
    conversation = Conversation(tokenizer, context=120, reserve=40)
    for i in range(5):
        assert conversation.add_user(f"message {i} " + "word " * 25) is not None
        roles = [m["role"] for m in conversation.messages]
        assert roles == ["user", "assistant"] * (len(roles) // 2) + ["user"], roles  # whole exchanges dropped
        conversation.add_reply(f"ok {i}")
    assert conversation.dropped == 1
    # A reply stopped before its first token withdraws the message: the turns dropped for it come back.
    before = list(conversation.messages)
    assert conversation.add_user("message 5 " + "word " * 25) is not None and conversation.dropped == 1
    conversation.withdraw()
    assert conversation.messages == before and conversation.dropped == 0
    # History that fills exactly what the reply leaves is kept whole; a message longer than that alone, but within
    # the context, is still sent (the reply gets the rest), with nothing dropped from it.
    exact = Conversation(tokenizer, context=1000, reserve=10)
    exact.add_user("first")
    exact.add_reply("ok")
    whole = len(tokenizer.encode(tokenizer.render_chat([*exact.messages, {"role": "user", "content": "second"}])))
    exact.context = whole + 10
    assert len(exact.add_user("second") or []) == whole and exact.dropped == 0 and len(exact.messages) == 3
    message = "word " * 30
    alone = len(tokenizer.encode(tokenizer.render_chat([{"role": "user", "content": message}])))
    tight = Conversation(tokenizer, context=alone + 5, reserve=10)
    assert len(tight.add_user(message) or []) == alone and tight.messages == [{"role": "user", "content": message}]
    raw = Conversation(tokenizer, context=50, reserve=10, raw=True)
    raw.add_user("Once upon")
    raw.add_reply(" a time")
    raw.add_user(" there was")
    raw.withdraw()
    assert raw.transcript == "Once upon a time"
    ids = raw.add_user("word " * 100)
    assert len(ids) == 40 and raw.dropped > 0
    # Cut inside a character (each of these is several byte-level tokens): the kept text starts whole.
    raw = Conversation(tokenizer, context=512, reserve=20, raw=True)
    raw.add_user("𝑓𝑔ℕ🙂 " * 200)
    assert raw.transcript.startswith(("𝑓", "𝑔", "ℕ", "🙂", " ")) and "\ufffd" not in raw.transcript


def test_reset_clears_the_history_in_either_mode() -> None:
    # /reset: the next message is the whole prompt, with the system prompt alone before it (ChatML), or the whole
    # transcript (--raw: its text so far was kept, and the model went on continuing it).
    tokenizer = qwen3_tokenizer()
    chat = Conversation(tokenizer, context=512, reserve=40, system="sys")
    chat.add_user("Hello")
    chat.add_reply("Hi there")
    chat.reset()
    fresh = [{"role": "system", "content": "sys"}, {"role": "user", "content": "Again"}]
    assert chat.add_user("Again") == tokenizer.encode(tokenizer.render_chat(fresh))
    raw = Conversation(tokenizer, context=512, reserve=40, raw=True)
    raw.add_user("Once upon")
    raw.add_reply(" a time")
    raw.reset()
    assert raw.add_user("The river") == tokenizer.encode("The river") and raw.transcript == "The river"


def test_history_keeps_replies_as_generated_but_a_thinking_templates_thinking(checkpoint: Path,
                                                                              tmp_path: Path) -> None:
    # A template that thinks (official Qwen3) drops a reply's thinking from the history, as it does itself;
    # any other keeps the reply exactly (leading newlines were stripped, so the next prompt was not the
    # conversation that happened and the replies drifted from Transformers').
    thinker = load_tokenizer(with_chat_template(checkpoint, tmp_path / "thinker"))
    for tokenizer, kept in ((thinker, "4."), (qwen3_tokenizer(), "<think>\nTwo and two.\n</think>\n\n4.")):
        conversation = Conversation(tokenizer, context=512, reserve=40)
        conversation.add_user("What is 2 + 2?")
        conversation.add_reply("<think>\nTwo and two.\n</think>\n\n4.")
        conversation.add_user("And 3 + 3?")
        assert conversation.messages[1] == {"role": "assistant", "content": kept}
    conversation = Conversation(qwen3_tokenizer(), context=512, reserve=40)
    conversation.add_user("Hi")
    conversation.add_reply("\n\nAnd so.")
    assert conversation.messages[1]["content"] == "\n\nAnd so."


def test_a_reply_cut_while_thinking_is_an_empty_answer_in_the_history() -> None:
    # A reply cut (Ctrl-C, --max-new-tokens) before its </think> went into the history as an open thinking block,
    # which the next prompt showed as that turn's answer. It has no answer: its thinking is dropped as a finished
    # reply's is, and the question stays (a follow-up may ask it shorter). Both kinds of thinking template: one
    # with the enable_thinking switch, whose reply opens <think>, and one that opens it in the prompt (Qwen3's 2507
    # Thinking models), whose reply only closes it; ChatML keeps a reply as generated.
    qwen3 = qwen3_tokenizer()
    opening = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content.split('</think>')[-1].lstrip('\\n') }}"
               "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}")
    cases = ((THINKING_TEMPLATE, "<think>\nTwo and", "<think>\nTwo and two.\n</think>\n\n4.", ""),
             (opening, "Two and", "Two and two.\n</think>\n\n4.", ""),
             (None, "<think>\nTwo and", "<think>\nTwo and two.\n</think>\n\n4.", "<think>\nTwo and"))
    for template, cut, finished, kept in cases:
        tokenizer = qwen3 if template is None else Tokenizer(qwen3.hf, {**qwen3.config, "chat_template": template})
        conversation = Conversation(tokenizer, context=512, reserve=40)
        conversation.add_user("What is 2 + 2?")
        conversation.add_reply(cut)
        prompt = tokenizer.decode(conversation.add_user("Again?"))
        assert conversation.messages[1] == {"role": "assistant", "content": kept}
        assert ("Two and" in prompt) == bool(kept) and "What is 2 + 2?" in prompt
        conversation.add_reply(finished)  # a finished reply's thinking goes as before (ChatML: kept)
        conversation.add_user("And 3 + 3?")
        assert conversation.messages[3]["content"] == (finished if template is None else "4.")


def test_a_reply_cut_while_thinking_says_why_it_has_no_answer(checkpoint: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # Cut by --max-new-tokens before its </think>, a reply showed thinking, then the prompt: no answer, and nothing to
    # say why. A line says so, and what to do (as the web page's note does). This template opens the <think> in the
    # prompt, so the tiny model's reply is thinking from its first token.
    thinker = with_chat_template(checkpoint, tmp_path / "thinker", OPENING_THINKING_TEMPLATE)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\n"))
    assert main(["chat", "--model", str(thinker), "--max-new-tokens", "2", "--temperature", "0",
                 "--device", "cpu"]) == 0
    assert ("\n(--max-new-tokens 2 ran out while the model was thinking, before its answer: start the chat again "
            "with more, or with --no-thinking)\n") in capsys.readouterr().out
    # Thinking off already, the model thought all the same (one that opens <think> itself): the line asked for the
    # --no-thinking given. (The reply is set: the tiny model writes no <think> of its own.)
    import nanoqwen.chat as chat_module

    monkeypatch.setattr(chat_module, "reply", lambda *args: ("<think>\nStill", "max tokens"))
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\n"))
    assert main(["chat", "--model", str(thinker), "--max-new-tokens", "2", "--no-thinking", "--device", "cpu"]) == 0
    assert ("(--max-new-tokens 2 ran out while the model was thinking, before its answer: start the chat again "
            "with more)\n") in capsys.readouterr().out
    # Cut by the end of the context instead: more tokens would not help, room in the history would.
    monkeypatch.setattr(chat_module, "reply", lambda *args: ("<think>\nStill", "context full"))
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\n"))
    assert main(["chat", "--model", str(thinker), "--device", "cpu"]) == 0
    assert ("(the context filled while the model was thinking, before its answer; /reset clears the history to "
            "leave it more room)\n") in capsys.readouterr().out
    # Stopped with Ctrl-C while thinking: the turn stays in the history with no answer, and the line says so.
    monkeypatch.setattr(chat_module, "reply", lambda *args: ("<think>\nStill", "stopped"))
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\n"))
    assert main(["chat", "--model", str(thinker), "--device", "cpu"]) == 0
    assert "(stopped while the model was thinking, before its answer: the turn is kept with no answer)\n" in \
        capsys.readouterr().out


def test_a_seeded_chat_replays_and_each_turn_draws_anew(checkpoint: Path, local) -> None:
    # --seed S samples turn k with S + k: the same session again gives the same replies, and a message sent
    # twice is not answered with the same draws (every turn reused S).
    child = spawn_chat(checkpoint, "--temperature", "1", "--top-k", "0", "--top-p", "1", "--seed", "5")
    try:
        hello = [{"role": "user", "content": "Hello!"}]
        first = reply_of(local, hello, temperature=1, seed=5)
        assert say(child, "Hello!") == printable(first) + "\n"
        again = [*hello, {"role": "assistant", "content": first}, *hello]
        second = reply_of(local, again, temperature=1, seed=6)
        assert second != reply_of(local, again, temperature=1, seed=5)
        assert say(child, "Hello!") == printable(second) + "\n"
        assert "history cleared" in say(child, "/reset")
        assert say(child, "Hello!") == printable(first) + "\n"
        child.sendline("/exit")  # ended as a user ends it: close() alone signals it down, too slow on a loaded machine
        child.expect(pexpect.EOF)
    finally:
        child.close()


def test_a_chat_seeded_with_the_last_seed_goes_on(checkpoint: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    # Turn k samples with seed S + k: from --seed 2**63 - 1, the second turn's seed was out of range and the
    # chat ended with an error instead of answering.
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\nHo\n"))  # piped input, in this process
    assert main(["chat", "--model", str(checkpoint), "--max-new-tokens", "2", "--temperature", "1", "--seed",
                 str(2**63 - 1), "--device", "cpu"]) == 0
    done = capsys.readouterr()
    assert done.err == "", done.err
    assert done.out.count(PROMPT) == 3  # both messages answered, then the end of input


def test_bad_input_bytes_and_settings_are_one_line_or_survived(checkpoint: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    # Typed bytes that are not UTF-8, in a locale where Python reads input strictly, ended the chat with a
    # traceback; a system prompt with no room left, or one --raw would drop, is refused up front.
    chat = [sys.executable, "-m", "nanoqwen", "chat", "--model", str(checkpoint), "--max-new-tokens", "4",
            "--device", "cpu"]
    # A message too long beside the system prompt names the prompt's share (a message shorter than the context
    # was said to be too long alone).
    system = ["--system", "Be brief. " * 40]
    done = subprocess.run(chat + system, input=b"caf\xe9 \xff bad\nok\n" + b"7" * 200 + b"\n", capture_output=True,
                          timeout=120, env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    assert done.returncode == 0 and b"Traceback" not in done.stderr, done.stderr
    assert done.stdout.count(PROMPT.encode()) == 4  # both messages answered, the long one refused, the end of input
    system_tokens = len(qwen3_tokenizer().encode(qwen3_tokenizer().render_chat(
        [{"role": "system", "content": system[1]}])))
    assert (f"(that message with the --system prompt's {system_tokens} tokens is too long for the context of 256 "
            "tokens; shorten it)").encode() in done.stdout
    # the refusals in this process (a traceback would be an exception here)
    for extra, words in ((["--system", "word " * 300], "--system takes"), (["--raw", "--system", "Be brief."],
                                                                           "--raw uses no template")):
        assert main(chat[3:] + extra) == 2
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1, err


def test_printable_defuses_control_characters() -> None:
    assert printable("a\x1b[2Jb\r\n\tc\x7f") == "a\u241b[2Jb\u240d\n\tc\u2421"


def test_a_runs_checkpoint_is_named_with_its_run(tmp_path: Path) -> None:
    # As the server names it in /v1/models: a bare "best" says little.
    from nanoqwen.checkpoint import display_name

    assert display_name(tmp_path / "runs" / "shakes" / "best") == "shakes/best"
    assert display_name(tmp_path / "models" / "tiny") == "tiny"


def test_a_model_trained_on_conversations_answers_in_the_chat(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Chat records in, `nanoqwen chat` out: prepare renders them as the chat renders its prompts, so a tiny
    model trained on a few question-answer pairs gives each answer, and stops where its turn ends."""
    from tests.train_helpers import FAST, make_preset, train_in_process

    answers = {"what colour is the sky?": "blue", "what do cows drink?": "water", "who wrote hamlet?": "shakespeare",
               "how many legs has a cat?": "four", "where is paris?": "in france", "what is ice?": "frozen water"}
    (tmp_path / "chats.jsonl").write_text("".join(
        json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"
        for _ in range(40) for q, a in answers.items()))
    monkeypatch.chdir(tmp_path)  # --dataset prepares into data/ here
    fast = [*FAST]
    fast[fast.index("--seq-len") + 1] = "64"  # a whole conversation in a window
    assert train_in_process("--dataset", str(tmp_path / "chats.jsonl"), "--tokenizer", "bpe:400",
                            "--config", str(make_preset(tmp_path)), "--out", str(tmp_path / "run"),
                            "--max-steps", "150", *fast) == 0
    out = capsys.readouterr().out
    assert f"next: nanoqwen chat --model {tmp_path / 'run' / 'best'}" in out
    assert "\nsample:\n<|im_start|>user\n" in out  # a conversation from its start, its control tokens shown
    assert (tmp_path / "data").is_dir()
    child = spawn_chat(tmp_path / "run" / "best")
    try:
        for question, answer in answers.items():
            assert say(child, question) == answer + "\n"
            say(child, "/reset")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()


def test_a_chat_with_its_standard_output_closed_ends_cleanly(checkpoint: Path, monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    # `nanoqwen chat ... >&-` (sys.stdout None) stopped with a traceback at its first prompt; as sample does, it
    # runs, what it prints going nowhere.
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\n"))
    monkeypatch.setattr(sys, "stdout", None)
    assert main(["chat", "--model", str(checkpoint), "--max-new-tokens", "2", "--device", "cpu"]) == 0
