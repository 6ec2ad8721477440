"""Shared by the serving, web page and chat tests: a tiny random checkpoint and a real server process."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import torch

from nanoqwen.checkpoint import STATE_VERSION, config_for_tokenizer, load_checkpoint, save_checkpoint
from nanoqwen.config import ModelConfig
from nanoqwen.io import write_json
from nanoqwen.model import Qwen3
from nanoqwen.tokenizer import Tokenizer, qwen3_tokenizer

CONTEXT = 256
STARTUP_TIMEOUT_S = 90  # importing torch and loading on a busy 2-core machine
# A hung request handler or engine never exits; a sound server on a 2-core machine with other jobs running took
# over 10 s (its last line said, then seconds of interpreter and torch teardown).
SHUTDOWN_TIMEOUT_S = 30


def make_checkpoint(directory: Path, context: int = CONTEXT) -> Path:
    """A ~20M-parameter random Qwen3 with the official tokenizer (so ChatML tokens exist).

    Untied embeddings make a random model's greedy text varied (a tied one mostly repeats its input),
    so comparisons between code paths actually compare something.
    """
    model, tokenizer = random_model(context)
    return save_checkpoint(model, directory, tokenizer)


def random_model(context: int = CONTEXT) -> tuple[Qwen3, Tokenizer]:
    """make_checkpoint's model (seeded) and the official tokenizer, not yet saved."""
    tokenizer = qwen3_tokenizer()
    config = config_for_tokenizer(ModelConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, max_position_embeddings=context, max_window_layers=2, tie_word_embeddings=False,
    ), tokenizer, fit_vocab=True)
    torch.manual_seed(0)
    return Qwen3(config), tokenizer


def make_scripted_checkpoint(directory: Path, chains: list[list[int]]) -> Path:
    """A Qwen3 of `make_checkpoint`'s shape (the official tokenizer) that writes scripted tokens: after chains[i][k] it
    always predicts chains[i][k + 1] (the last one, itself), whatever came before, so a prompt ending in a chain's first
    token is answered with the rest, greedy or sampled alike. Chains hold distinct tokens, 64 at most.

    How: every layer adds nothing (o_proj and down_proj zero), so the last position's hidden state is its token's
    embedding; the chains' tokens get orthonormal embeddings, and the lm_head row of each successor points along its
    predecessor's, a logit of 80 against 0 for every other token."""
    model, tokenizer = random_model()
    config = model.config
    tokens = [token for chain in chains for token in chain]
    assert len(set(tokens)) == len(tokens) <= config.hidden_size, "chains hold distinct tokens, 64 at most"
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        directions = torch.linalg.qr(torch.randn(config.hidden_size, len(tokens)))[0].T  # orthonormal rows
        model.model.embed_tokens.weight[tokens] = directions
        model.lm_head.weight.zero_()
        for chain in chains:
            for token, following in zip(chain, [*chain[1:], chain[-1]]):
                model.lm_head.weight[following] += 10 * directions[tokens.index(token)]  # x8: the RMS-normed length
    return save_checkpoint(model, directory, tokenizer)


def make_plain_run(root: Path) -> Path:
    """A run folder as `nanoqwen train` leaves one, trained on plain text (`make_checkpoint`'s weights as its best/,
    its config.json written here with what trained_on_plain_text reads) beside its prepared data: returns best/."""
    from nanoqwen.config import TrainConfig
    from nanoqwen.data.prepare import prepare
    from nanoqwen.runs import RUN_CONFIG_FORMAT, data_digest, data_splits

    run = root / "runs" / "tiny"
    best = make_checkpoint(run / "best")
    (root / "corpus").mkdir(parents=True)
    (root / "corpus" / "story.txt").write_text("Once upon a time there was a tiny model. " * 40)
    data = prepare(str(root / "corpus"), str(best), root / "data", val_fraction=0.2, progress=False, workers=1)
    write_json(run / "config.json", {
        "version": STATE_VERSION, "format": RUN_CONFIG_FORMAT, "preset": "tiny", "data": str(data),
        "data_from_run": os.path.relpath(data, run.resolve()), "data_splits": data_splits(data),
        "data_digest": data_digest(data), "train": dataclasses.asdict(TrainConfig()),
        "args": {"init_from": None, "data": str(data)}})
    return best


# A chat template in the manner of official Qwen3 folders (written for these tests): the tools listed first,
# a system message only first, earlier replies without their thinking and with their tool calls, and a reply
# that may start after an empty thinking block. Indented over lines, with loop controls and bare text between
# blocks, so rendering it exercises the jinja settings Transformers uses (trimmed and left-stripped blocks).
THINKING_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n# Tools' }}
    {%- for tool in tools %}
        {{- '\\n' + tool.function.name }}
    {%- endfor %}
    {{- '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'system' and not loop.first %}
        {{- raise_exception('the system message must come first') }}
    {%- endif %}
    {%- if message.role == 'tool' %}
        {%- continue %}
    {%- endif %}
    {%- set content = message.content %}
    {%- if message.role == 'assistant' and '</think>' in content %}
        {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
    {%- endif %}
    {{- '<|im_start|>' + message.role + '\\n' + content }}
    {%- for call in message.tool_calls or [] %}
        {{- '<tool_call>' + call.function.name + ' ' + call.function.arguments + '</tool_call>' }}
    {%- endfor %}
    {{- '<|im_end|>\\n' }}
{%- endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
  {% if enable_thinking is defined and enable_thinking is false %}
<think>

</think>

  {% endif %}
{% endif %}"""

# Thinking on, it opens the reply's <think> in the prompt, as the 2507 thinking models' template does.
OPENING_THINKING_TEMPLATE = THINKING_TEMPLATE.replace("</think>\n\n  {% endif %}",
                                                      "</think>\n\n  {% else %}\n<think>\n  {% endif %}")
assert OPENING_THINKING_TEMPLATE != THINKING_TEMPLATE


def with_chat_template(checkpoint: Path, directory: Path, template: str = THINKING_TEMPLATE) -> Path:
    """A copy of `checkpoint` whose tokenizer carries `template`, as an official folder carries its own."""
    shutil.copytree(checkpoint, directory)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    write_json(directory / "tokenizer_config.json", {**config, "chat_template": template})
    return directory


def load_reference(directory: Path) -> tuple[Qwen3, Tokenizer]:
    """The checkpoint as `nanoqwen sample/chat/serve` load it, for reference outputs in this process."""
    model, tokenizer = load_checkpoint(directory)
    return model.prepare_for_decoding(), tokenizer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def run_server(model_dir: Path, log_path: Path, *extra: str, env: dict[str, str] | None = None,
               stop_signal: int = signal.SIGTERM) -> Iterator[str]:
    """`python -m nanoqwen serve` on a free local port; yields its base URL once /health answers, and stops it
    with `stop_signal` (SIGINT: Ctrl-C in its terminal)."""
    port = free_port()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nanoqwen", "serve", "--model", str(model_dir), "--port", str(port),
             "--device", "cpu", *extra],  # the references are computed on CPU in float32
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{log_path.read_text()}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not answer /health in {STARTUP_TIMEOUT_S}s:\n{log_path.read_text()}")
            time.sleep(0.2)
        yield url
    finally:
        proc.send_signal(stop_signal)
        try:
            proc.wait(timeout=SHUTDOWN_TIMEOUT_S)
        except subprocess.TimeoutExpired:  # a request handler or the engine hung: that is a bug
            proc.kill()
            proc.wait()
            raise AssertionError(f"server did not shut down within {SHUTDOWN_TIMEOUT_S}s:\n"
                                 f"{log_path.read_text()}") from None


def wait_for(condition: Callable[[], bool], failure: str, timeout: float = 30.0) -> None:
    """Poll `condition` until it holds; fail with `failure` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, failure
        time.sleep(0.01)


def wait_idle(url: str, timeout: float = 10.0) -> dict:
    """Poll /health until the engine has no rows and nothing waiting (work of gone clients is freed)."""
    deadline = time.monotonic() + timeout
    while True:
        health = httpx.get(f"{url}/health", timeout=5).json()
        if health["active"] == 0 and health["waiting"] == 0:
            return health
        if time.monotonic() > deadline:
            raise AssertionError(f"engine still busy after {timeout}s: {health}")
        time.sleep(0.05)
