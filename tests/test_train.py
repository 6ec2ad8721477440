"""The training engine: loss falls, exact resume after SIGKILL, torchrun (DDP and FSDP2) follows the
single-process curve, accumulation invariance, the chunked loss, Muon, early stopping, the wall cap,
clear errors for a broken training state, bf16/fp16 autocast (on CPU), and best/ loading in Transformers."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import html
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from nanoqwen.checkpoint import checkpoint_step, load_model, save_checkpoint
from nanoqwen.cli import main
from nanoqwen.config import LoopState, ModelConfig, TrainConfig
from nanoqwen.data.loader import BatchLoader, TokenSplit, batch_offsets
from nanoqwen.distributed import threads_per_process, usable_cores
from nanoqwen.errors import NanoQwenError
from nanoqwen.loss import chunked_cross_entropy, plain_cross_entropy
from nanoqwen.model import Qwen3
from nanoqwen.optim import MuonFp32, build_optimizer, lr_at, set_lr, wsd_decay_start
from nanoqwen.plot import read_metrics as read_metrics_lenient
from nanoqwen.runs import (
    DIGEST_SLICE_BYTES,
    DIGEST_SLICES,
    carried_files,
    data_digest,
    trained_on_plain_text,
    truncate_metrics,
)
from nanoqwen.tokenizer import load_tokenizer
from nanoqwen.tracking import Display
from nanoqwen.train import Run, add_arguments, fit_resumed_schedule, fit_schedule, unsaved_flags
from tests.train_helpers import (
    FAST,
    TINY_MODEL,
    dead_pid,
    make_data,
    make_preset,
    read_metrics,
    run_train,
    signalled_at_step,
    subprocess_env,
    tensorboard_events,
    tensorboard_scalars,
    train_command,
    train_in_process,
    train_losses,
    wandb_runs,
    write_corpus,
)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_data(tmp_path_factory.mktemp("train-data"))


@pytest.fixture(scope="module")
def preset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_preset(tmp_path_factory.mktemp("preset"))


@pytest.fixture(scope="module")
def trained(data: Path, preset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One AdamW run of 40 steps, shared by the tests that only read its outputs."""
    out = tmp_path_factory.mktemp("runs") / "adamw"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WANDB_MODE", "offline")  # --wandb keeps its log in RUN/wandb
        assert train_in_process("--config", str(preset), "--data", str(data), "--out", str(out), *FAST,
                                "--max-steps", "40", "--sample-interval", "20", "--tensorboard", "--wandb") == 0
    return out


def common(data: Path, preset: Path, out: Path) -> list[str]:
    return ["--config", str(preset), "--data", str(data), "--out", str(out), *FAST]


# -- pieces ---------------------------------------------------------------------------------------
def test_chunked_loss_equals_plain_loss_and_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    hidden = torch.randn(3, 37, 24, dtype=torch.float64, requires_grad=True)
    weight = (0.3 * torch.randn(101, 24, dtype=torch.float64)).requires_grad_()
    targets = torch.randint(0, 101, (3, 37))
    targets[0, :5] = -100  # ignored positions count neither in the loss nor in the mean
    expected = plain_cross_entropy(hidden, weight, targets)
    expected.backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    for chunk in (7, 16, 1000):  # ragged last chunk, several chunks, one chunk
        loss = chunked_cross_entropy(hidden, weight, targets, chunk=chunk)
        (2.0 * loss).backward()  # a non-unit upstream gradient
        torch.testing.assert_close(loss, expected)
        torch.testing.assert_close(hidden.grad, 2.0 * grads[0])
        torch.testing.assert_close(weight.grad, 2.0 * grads[1])
        hidden.grad = weight.grad = None
    with torch.no_grad(), monkeypatch.context() as patched:  # evaluation: no gradients computed or kept
        def no_gradients(*args: torch.Tensor) -> torch.Tensor:
            raise AssertionError("the gradient path ran under no_grad")

        patched.setattr("nanoqwen.loss.loss_and_logit_grads", no_gradients)
        torch.testing.assert_close(chunked_cross_entropy(hidden, weight, targets, chunk=7), expected)
    # The compiled softmax step (`train --compile`): the same loss and gradients
    loss = chunked_cross_entropy(hidden, weight, targets, chunk=16, compiled=True)
    (2.0 * loss).backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(hidden.grad, 2.0 * grads[0])
    torch.testing.assert_close(weight.grad, 2.0 * grads[1])


def test_a_chunk_holds_its_budget_of_logits_and_never_fewer_than_256_rows() -> None:
    # Values cannot show the chunk size (any size gives the same loss): 128 MiB of fp32 logits a chunk on CPU, 2**28
    # logits on CUDA (1,766 tokens at Qwen3's vocabulary, as loss.py says), never under 256 rows, whose (V, C) weight
    # gradient update would be memory-bound; a small vocabulary takes many rows, not 256.
    from nanoqwen.loss import chunk_rows

    assert (chunk_rows(151936), chunk_rows(151936, "cuda"), chunk_rows(1024)) == (256, 1766, 32768)

def test_chunked_loss_gives_the_heads_gradient_where_only_the_head_learns() -> None:
    # A frozen trunk (its hidden states need no gradient) under a head that trains: the head's gradient is computed
    # in the forward pass all the same (were it computed only for hidden states that ask, backward() would get None).
    torch.manual_seed(0)
    hidden = torch.randn(9, 8, dtype=torch.float64)
    weight = torch.randn(13, 8, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 13, (9,))
    plain_cross_entropy(hidden, weight, targets).backward()
    expected, weight.grad = weight.grad, None
    chunked_cross_entropy(hidden, weight, targets, chunk=4).backward()
    torch.testing.assert_close(weight.grad, expected)

def test_chunked_loss_of_a_batch_without_targets_is_zero_not_nan() -> None:
    # --loss-on-assistant: a micro-batch of user turns alone has no target left. Its loss is weighted by its 0
    # targets in the step; a 0 / 0 there (nan) would make every gradient of the step nan.
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    targets = torch.full((2, 5), -100)
    loss = chunked_cross_entropy(hidden, weight, targets, chunk=4)
    (loss * 0).backward()
    assert loss.item() == 0.0
    assert torch.equal(hidden.grad, torch.zeros_like(hidden)) and torch.equal(weight.grad, torch.zeros_like(weight))
    with torch.no_grad():
        assert chunked_cross_entropy(hidden, weight, targets, chunk=4).item() == 0.0


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_chunked_loss_under_bf16_autocast_equals_the_plain_one(compiled: bool) -> None:
    # The CUDA training path's dtypes: bf16 matmuls and logits, the softmax in fp32, the gradient in bf16
    torch.manual_seed(0)
    hidden = torch.randn(2, 45, 32, requires_grad=True)
    weight = (0.3 * torch.randn(211, 32)).requires_grad_()
    targets = torch.randint(0, 211, (2, 45))
    targets[1, 3:9] = -100
    results = []
    for loss_fn in (plain_cross_entropy, partial(chunked_cross_entropy, chunk=32, compiled=compiled)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(hidden, weight, targets)
        loss.backward()
        results.append((loss.detach(), hidden.grad, weight.grad))
        hidden.grad = weight.grad = None
    (loss, grad_hidden, grad_weight), (plain_loss, plain_hidden, plain_weight) = results[1], results[0]
    torch.testing.assert_close(loss, plain_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_hidden, plain_hidden.to(grad_hidden.dtype), rtol=0.02, atol=2e-4)
    torch.testing.assert_close(grad_weight, plain_weight, rtol=0.02, atol=2e-4)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_chunked_loss_under_fp16_keeps_the_gradient_of_unlikely_tokens(compiled: bool) -> None:
    # The T4/V100 path: fp16 matmuls, the loss multiplied by GradScaler's 2**16. The logits' gradient goes to fp16
    # for the head's matmuls; cast there before that scale (a probability under fp16's 6e-8 is 0), the head rows of
    # the tokens a peaked model rules out got no gradient, where Transformers' fp32 loss keeps them (autograd
    # scales its gradient first).
    torch.manual_seed(0)
    vocab = 8192
    hidden = torch.randn(48, 32, requires_grad=True)
    weight = (2 * torch.randn(vocab, 32)).requires_grad_()  # logits of std 11: most probabilities far below 6e-8
    targets = torch.randint(0, vocab, (48,))
    targets[:5] = -100
    hidden64, weight64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    expected = plain_cross_entropy(hidden64, weight64, targets)
    expected.backward()
    scored = targets != -100
    unlikely = torch.softmax(hidden64[scored] @ weight64.T, dim=-1).amax(dim=0) < 6e-8  # in every scored row
    unlikely[targets[scored]] = False  # rows with a target hold its -hidden too
    assert unlikely.sum() > vocab / 2
    with torch.autocast("cpu", dtype=torch.float16):
        loss = chunked_cross_entropy(hidden, weight, targets, chunk=16, compiled=compiled)
    (loss * 2.0**16).backward()
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-3, atol=0)
    grad_hidden, grad_weight = hidden.grad.double() / 2**16, weight.grad.double() / 2**16

    def error(got: torch.Tensor, reference: torch.Tensor) -> float:
        return float((got - reference).norm() / reference.norm())

    # Transformers' fp16 logits under the same scale: 0.0019, 0.0019 and 0.009 (cast before the scale: 0.72)
    assert error(grad_hidden, hidden64.grad) < 0.005 and error(grad_weight, weight64.grad) < 0.005
    unlikely_error = error(grad_weight[unlikely], weight64.grad[unlikely])
    assert unlikely_error < 0.03, unlikely_error
    # A scale too large overflows fp16: inf or nan (GradScaler skips the step and lowers its scale), never a
    # finite gradient with the large terms cut
    hidden.grad = weight.grad = None
    with torch.autocast("cpu", dtype=torch.float16):
        loss = chunked_cross_entropy(hidden, weight, targets, chunk=16, compiled=compiled)
    (loss * 2.0**40).backward()
    assert not hidden.grad.isfinite().all() and not weight.grad.isfinite().all()


def test_schedules_are_functions_of_the_step() -> None:
    kw = {"max_lr": 1.0, "min_lr": 0.1, "warmup": 10, "total": 100}
    cosine = [lr_at(s, **kw) for s in range(100)]
    assert cosine[0] == pytest.approx(0.1) and cosine[9] == pytest.approx(1.0)
    assert cosine[-1] == pytest.approx(0.1) and all(a >= b for a, b in zip(cosine[9:], cosine[10:]))
    wsd = [lr_at(s, schedule="wsd", **kw) for s in range(100)]
    assert wsd[10:82] == [1.0] * 72 and wsd[-1] == pytest.approx(0.1)
    # Short runs (a warmup cut to half of them): the warmup still peaks, and the last step is at min_lr.
    for schedule in ("cosine", "wsd"):
        for total in range(1, 7):
            for warmup in range(total // 2 + 1):
                lrs = [lr_at(s, max_lr=1.0, min_lr=0.1, warmup=warmup, total=total, schedule=schedule)
                       for s in range(total)]
                assert lrs[-1] == pytest.approx(0.1), (schedule, total, warmup, lrs)
                assert warmup == 0 or lrs[warmup - 1] == pytest.approx(1.0), (schedule, total, warmup, lrs)


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_past_the_last_step_the_rate_stays_at_min_lr(schedule: str) -> None:
    # A step at or past `total` (a schedule shortened under a run that went on) holds min_lr: the cosine came back
    # up past its trough, and WSD's line went on below min_lr (to 0 and negative rates).
    kw = {"max_lr": 1.0, "min_lr": 0.1, "warmup": 2, "total": 10, "schedule": schedule}
    assert [lr_at(step, **kw) for step in range(9, 14)] == pytest.approx([0.1] * 5)

def test_batches_do_not_depend_on_processes_or_micro_batch(data: Path) -> None:
    split = TokenSplit.open(data, "train")
    one = BatchLoader(split, seq_len=16, batch_size=8, micro_batch=8, seed=3)
    whole = torch.cat([x for x, _ in one.micro_batches(5)])
    for world, micro in [(2, 2), (4, 1), (1, 4)]:
        parts = [x for rank in range(world) for x, _ in BatchLoader(
            split, seq_len=16, batch_size=8, micro_batch=micro, seed=3, rank=rank, world_size=world).micro_batches(5)]
        assert torch.equal(torch.cat(parts), whole)
    inputs, targets = one.micro_batches(5)[0]
    assert torch.equal(inputs[:, 1:], targets[:, :-1])  # targets are the inputs shifted by one
    assert not np.array_equal(batch_offsets(3, 5, 8, 16, len(split)), batch_offsets(3, 6, 8, 16, len(split)))


# ids of a made-up ChatML vocabulary: <|endoftext|> 0, <|im_start|> 1, <|im_end|> 2, user 3, assistant 4, "\n" 5
EOT, IM_START, IM_END, USER, ASSISTANT, NL = range(6)
CHAT_TURNS = [IM_START, USER, NL, 6, IM_END, NL, IM_START, ASSISTANT, NL, 7, 8, IM_END, NL, EOT]  # 7 8: the reply


def made_up_marks() -> Any:
    from nanoqwen.data.loader import ChatMarks

    return ChatMarks(im_start=IM_START, im_end=IM_END, eot=EOT, assistant=(ASSISTANT,), newline=frozenset({NL}))


def test_assistant_targets_do_not_depend_on_processes_or_micro_batch() -> None:
    # Each process masks its own slice of the step's windows (rank 1 with rank 0's mask trained the user's turns).
    tokens = np.array(CHAT_TURNS * 40, dtype=np.uint32)
    split, marks = TokenSplit(tokens, len(tokens)), made_up_marks()

    def targets(world: int, micro: int) -> torch.Tensor:
        return torch.cat([t for rank in range(world) for _, t in BatchLoader(
            split, seq_len=6, batch_size=8, micro_batch=micro, seed=1, rank=rank, world_size=world,
            assistant=marks).micro_batches(4)])

    whole = targets(1, 8)
    assert 0 < int((whole != -100).sum()) < whole.numel()  # some targets are the assistant's, some not
    assert set(whole[whole != -100].tolist()) <= {7, 8, IM_END}
    for world, micro in [(2, 2), (4, 1), (2, 4)]:
        assert torch.equal(targets(world, micro), whole), (world, micro)


def test_a_window_deep_inside_a_long_reply_is_the_assistants() -> None:
    # The turn a window starts in is searched for up to LOOK_BACK tokens back, over several chunks.
    from nanoqwen.data.loader import LOOK_BACK_CHUNK, assistant_targets

    reply = [7] * (3 * LOOK_BACK_CHUNK)
    tokens = np.array([EOT, IM_START, ASSISTANT, NL, *reply, IM_END, NL, EOT], dtype=np.uint32)
    marks = made_up_marks()
    assert assistant_targets(tokens, 2 * LOOK_BACK_CHUNK + 100, 7, marks).all()
    assert assistant_targets(tokens, len(tokens) - 4, 4, marks).tolist() == [True, True, False, False]


def test_eval_loss_on_assistant_scores_the_predictions_of_the_assistants_tokens() -> None:
    from nanoqwen.evaluate import assistant_scoring

    tokens = torch.tensor([EOT, *CHAT_TURNS])  # predictions of tokens[1:]: the reply's 7, 8 and <|im_end|> count
    bytes_of = SimpleNamespace(text_bytes=lambda ids: 10 * len(ids))
    scored, num_bytes = assistant_scoring(tokens, made_up_marks(), bytes_of)  # type: ignore[arg-type]
    assert tokens[1:][scored].tolist() == [7, 8, IM_END] and num_bytes == 30


def test_token_ids_from_the_embeddings_size_up_are_refused_and_a_split_needs_a_whole_window() -> None:
    from nanoqwen.data.loader import check_token_ids

    check_token_ids(np.array([0, 63]), 64, "train.bin")
    check_token_ids(torch.tensor([], dtype=torch.long), 64, "train.bin")
    for ids in (np.array([3, 64]), torch.tensor([64])):
        with pytest.raises(NanoQwenError, match="train.bin holds token id 64, outside the model's 64 embedding rows"):
            check_token_ids(ids, 64, "train.bin")
    # a window is seq_len + 1 tokens: a split of seq_len tokens has none
    with pytest.raises(NanoQwenError, match="has 8 tokens, not more than --seq-len 8"):
        BatchLoader(TokenSplit(np.arange(8, dtype=np.uint32), 8), seq_len=8, batch_size=2, micro_batch=2, seed=0)
    # ... and a split of seq_len + 1 tokens exactly one: every window of every step is the whole split
    tokens = np.arange(9, dtype=np.uint32)
    loader = BatchLoader(TokenSplit(tokens, 9), seq_len=8, batch_size=4, micro_batch=2, seed=0)
    for step in range(5):
        for inputs, targets in loader.micro_batches(step):
            assert inputs.tolist() == [list(range(8))] * 2 and targets.tolist() == [list(range(1, 9))] * 2


def mapped(path: Path, field: str) -> list[str]:
    """`field` (Rss, VmFlags) of each of this process's mappings of the file `path` (Linux's /proc/self/smaps)."""
    values, inside = [], False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if line[:1].islower() or line[:1].isdigit():  # a mapping's first line (its address), which names its file
            inside = line.endswith(f" {path}")
        elif inside and line.startswith(f"{field}:"):
            values.append(line.split(":", 1)[1].strip())
    return values


def resident_kb(path: Path) -> int:
    """This process's resident memory in its mappings of the file `path`."""
    return sum(int(value.split()[0]) for value in mapped(path, "Rss"))


@pytest.mark.skipif(not Path("/proc/self/smaps").is_file(), reason="reads the process's mappings from /proc (Linux)")
def test_the_loader_reads_train_bin_at_random_and_gives_back_the_pages_it_read(data: Path, tmp_path: Path) -> None:
    # Windows drawn at random mapped train.bin in page by page and kept it: over a long run the whole file was resident
    # in the process (an 8 GB corpus, 8 GB in each process of a job). What a step read goes back once it is copied.
    big = tmp_path / "data"
    shutil.copytree(data, big)
    tokens = (np.arange(1 << 20) % 300).astype("<u4")  # 4 MB: a few steps read a few hundred of its pages
    tokens.tofile(big / "train.bin")
    meta = json.loads((big / "meta.json").read_text())
    meta["splits"]["train"]["tokens"] = len(tokens)
    (big / "meta.json").write_text(json.dumps(meta))
    split = TokenSplit.open(big, "train")
    assert not any("rr" in flags.split() for flags in mapped(big / "train.bin", "VmFlags"))
    for assistant in (None, made_up_marks()):
        loader = BatchLoader(split, seq_len=512, batch_size=16, micro_batch=8, seed=0, assistant=assistant)
        for step in range(3):
            inputs, targets = loader.micro_batches(step)[0]
            assert resident_kb(big / "train.bin") == 0
            start = int(batch_offsets(0, step, 16, 512, len(tokens))[0])  # read right all the same
            assert inputs[0].tolist() == tokens[start:start + 512].tolist()
    # ... and read alone, not with the pages after it, as read ahead for a reader going on through the file (200 steps
    # of 64 windows read all of a 2.4 GB train.bin from the disk, for their 52 MB): "rr", random read advised.
    assert ["rr" in flags.split() for flags in mapped(big / "train.bin", "VmFlags")] == [True]


# -- whole runs -----------------------------------------------------------------------------------
CONVERSATIONS = [  # several turns, so windows start inside the user's turns and the assistant's
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "the colour of the sky?"},
     {"role": "assistant", "content": "blue"}, {"role": "user", "content": "and of grass?"},
     {"role": "assistant", "content": "green, mostly"}],
    [{"role": "user", "content": "what do cows drink?"}, {"role": "assistant", "content": "\nwater\n"}],
    [{"role": "user", "content": "who wrote hamlet?"}, {"role": "assistant", "content": "shakespeare"},
     {"role": "user", "content": "when?"}, {"role": "assistant", "content": "around 1600"}],
    [{"role": "user", "content": "and you?"}, {"role": "assistant2", "content": "not the assistant"},
     {"role": "Assistant", "content": "nor this one"}, {"role": "assistants", "content": "nor these"}],
]


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from nanoqwen.data.prepare import prepare

    root = tmp_path_factory.mktemp("chat-data")
    (root / "corpus").mkdir()
    (root / "corpus" / "chats.jsonl").write_text("".join(
        json.dumps({"messages": chat}) + "\n" for _ in range(30) for chat in CONVERSATIONS))
    (root / "corpus" / "notes.txt").write_text("plain notes, not a chat, " * 40)
    return prepare(str(root / "corpus"), "bpe:400", root / "data", val_fraction=0.1, progress=False)


def test_assistant_targets_are_what_each_turn_adds_to_its_prompt(chat_data: Path) -> None:
    """The tokens an assistant wrote are those its turn adds to the prompt `chat` and `serve` would write for it
    (the generation prompt), through its <|im_end|>: found in any window, however far into a turn it starts."""
    from nanoqwen.data.loader import assistant_targets
    from nanoqwen.train import chat_marks

    tok = load_tokenizer(chat_data)
    stream, wrote = [], []
    for chat in [*CONVERSATIONS, "plain notes between chats", *CONVERSATIONS[::-1]]:
        if isinstance(chat, str):
            ids, mask = tok.encode(chat), [False] * len(tok.encode(chat))
        else:
            ids = tok.encode(tok.render_chat(chat, add_generation_prompt=False))
            mask = [False] * len(ids)
            for i, turn in enumerate(chat):
                if turn["role"] == "assistant":
                    prompt = tok.encode(tok.render_chat(chat[:i]))  # ends with <|im_start|>assistant\n
                    through = tok.encode(tok.render_chat(chat[:i + 1], add_generation_prompt=False))
                    mask[len(prompt):len(through) - 1] = [True] * (len(through) - 1 - len(prompt))  # not the \n
        stream += [*ids, tok.eot_id]
        wrote += [*mask, False]
    tokens, wrote = np.array(stream, dtype=np.uint32), np.array(wrote)
    assert wrote.sum() > 20 and not wrote[-1]
    marks = chat_marks(chat_data)
    for start in range(len(tokens)):
        for length in (1, 7, len(tokens) - start):
            length = min(length, len(tokens) - start)
            assert (assistant_targets(tokens, start, length, marks) == wrote[start:start + length]).all(), start


def test_a_checkpoint_is_known_plain_text_only_from_its_run(data: Path, chat_data: Path, preset: Path,
                                                           tmp_path: Path) -> None:
    """Chat and the web page point a model trained on plain text alone to plain continuation: known from the run
    folder its checkpoint sits in, and only there; anything not known is treated as a chat model, as before."""
    project = tmp_path / "project"
    shutil.copytree(data, project / "data")
    short = [*FAST, "--max-steps", "2", "--eval-interval", "2"]
    plain, chat, tuned = project / "runs" / "plain", project / "runs" / "chat", project / "runs" / "tuned"
    assert train_in_process("--config", str(preset), "--data", str(project / "data"), "--out", str(plain),
                            *short) == 0
    assert train_in_process("--config", str(preset), "--data", str(chat_data), "--out", str(chat), *short) == 0
    # A chat model fine-tuned on plain text still chats: a run from another checkpoint is not known to be plain.
    assert train_in_process("--init-from", str(plain / "best"), "--data", str(project / "data"), "--out",
                            str(tuned), *short) == 0
    assert trained_on_plain_text(plain / "best") and trained_on_plain_text(plain / "last")
    assert not trained_on_plain_text(chat / "best")
    assert not trained_on_plain_text(tuned / "best")
    assert not trained_on_plain_text(plain)  # the run folder is no checkpoint
    shutil.copytree(plain / "best", tmp_path / "copied" / "best")  # out of its run: nothing says what it saw
    assert not trained_on_plain_text(tmp_path / "copied" / "best")
    # The project moved as a whole: the data is found beside the run, as a resume finds it.
    moved = project.rename(tmp_path / "moved")
    assert trained_on_plain_text(moved / "runs" / "plain" / "best")
    (moved / "data").rename(tmp_path / "elsewhere")  # data gone
    assert not trained_on_plain_text(moved / "runs" / "plain" / "best")
    shutil.copytree(chat_data, moved / "data")  # another folder in its place: chats, not the text it trained on
    meta = json.loads((moved / "data" / "meta.json").read_text())
    (moved / "data" / "meta.json").write_text(json.dumps({**meta, "conversations": 0}))
    assert not trained_on_plain_text(moved / "runs" / "plain" / "best")
    shutil.rmtree(moved / "data")
    (tmp_path / "elsewhere").rename(moved / "data")
    assert trained_on_plain_text(moved / "runs" / "plain" / "best")
    for damaged in ("{", "[]", json.dumps({"train": {}, "preset": "x", "data": 5, "args": {"init_from": None}})):
        (moved / "runs" / "plain" / "config.json").write_text(damaged)
        assert not trained_on_plain_text(moved / "runs" / "plain" / "best")


def test_a_link_to_a_run_checkpoint_is_known_plain_text(tmp_path: Path) -> None:
    # `ln -s runs/NAME/best model` and `serve --model model`: the link's own name said nothing of a run (not known).
    from tests.serve_helpers import make_plain_run

    best = make_plain_run(tmp_path)
    (tmp_path / "model").symlink_to(best)
    (tmp_path / "run").symlink_to(best.parent)  # a link to the run folder: its best/ is found through it as before
    assert trained_on_plain_text(tmp_path / "model") and trained_on_plain_text(tmp_path / "run" / "best")
    (tmp_path / "weights").symlink_to(tmp_path / "model")  # (links followed to the end)
    assert trained_on_plain_text(tmp_path / "weights")


def test_loss_on_assistant_turns_trains_and_follows_the_same_curve(chat_data: Path, preset: Path,
                                                                   tmp_path: Path) -> None:
    fast = [*FAST]
    fast[fast.index("--seq-len") + 1] = "64"
    curves = []
    for micro in ("8", "2"):
        out = tmp_path / f"micro-{micro}"
        assert train_in_process("--config", str(preset), "--data", str(chat_data), "--out", str(out), *fast,
                                "--max-steps", "30", "--loss-on", "assistant", "--micro-batch", micro) == 0
        curves.append(list(train_losses(out).values()))
    # Two processes under torchrun (DDP averages their gradients) too.
    done = run_train("--config", str(preset), "--data", str(chat_data), "--out", str(tmp_path / "torchrun"), *fast,
                     "--max-steps", "30", "--loss-on", "assistant", "--micro-batch", "2", nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    curves.append(list(train_losses(tmp_path / "torchrun").values()))
    for other in curves[1:]:  # each micro-batch weighted by its share of the step's targets
        assert np.allclose(curves[0], other, rtol=0, atol=1e-4)
    assert curves[0][-1] < curves[0][0] - 2
    evals = [r for r in read_metrics(tmp_path / "micro-8") if "val_loss" in r]  # the assistant's tokens alone
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1 and evals[-1]["val_accuracy"] > 0.6
    # Bits per byte over the scored tokens' own bytes (an added token has none, as prepare counts them).
    from nanoqwen.data.loader import assistant_targets
    from nanoqwen.train import chat_marks

    tok, windows = load_tokenizer(chat_data), json.loads((tmp_path / "micro-8" / "config.json").read_text())
    val = TokenSplit.open(chat_data, "val").tokens[:windows["train"]["eval_windows"] * 64 + 1]
    scored = val[1:][assistant_targets(val, 1, len(val) - 1, chat_marks(chat_data))].tolist()
    text_bytes = sum(len(tok.token_bytes(t)) for t in scored if t < tok.token_id("<|endoftext|>"))
    assert evals[-1]["val_bpb"] == pytest.approx(evals[-1]["val_loss"] * len(scored) / math.log(2) / text_bytes)
    # Data without conversations has nothing to take the loss on: one line.
    with pytest.raises(NanoQwenError, match="--loss-on assistant needs conversations"):
        from nanoqwen.train import chat_marks

        chat_marks(make_data(tmp_path / "plain"))


def test_a_step_without_assistant_tokens_logs_no_train_loss(preset: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """A batch with no assistant token trains nothing (no step: the weights stay), and the report says how often.
    Its record says so: `train_loss` null and `no_targets` true, with no speed (no forward pass ran). It logged a
    loss of 0.0, which read as a perfect step and pulled loss.png's train curve down to 0 on sparse chat data;
    the progress line, TensorBoard, W&B and `nanoqwen plot` leave such a step out of the train loss."""
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a-notes.txt").write_text("plain notes, not a chat, " * 2000)  # read first: train
    (tmp_path / "corpus" / "chats.jsonl").write_text(json.dumps({"messages": CONVERSATIONS[0]}) + "\n")
    from nanoqwen.data.prepare import prepare
    from nanoqwen.plot import loss_curves

    prepare(str(tmp_path / "corpus"), "bpe:300", tmp_path / "data", val_fraction=0.5, progress=False)
    fast = [*FAST]
    fast[fast.index("--seq-len") + 1], fast[fast.index("--batch-size") + 1] = "64", "1"
    out = tmp_path / "run"
    assert train_in_process("--config", str(preset), "--data", str(tmp_path / "data"), "--out", str(out), *fast,
                            "--max-steps", "4", "--loss-on", "assistant", "--eval-windows", "400",
                            "--micro-batch", "1", "--log-interval", "1", "--tensorboard") == 0
    records = read_metrics(out)
    assert [(r["step"], r["train_loss"], r["no_targets"]) for r in records] == [(s, None, True) for s in (1, 2, 3, 4)]
    assert not any("tokens_per_s" in r or "mfu" in r for r in records) and records[-1]["tokens"] == 4 * 64
    printed = capsys.readouterr().out
    assert "step 2/4 | no assistant token in the batch: nothing trained | ETA" in printed
    assert "loss 0.0000" not in printed and "4 steps drew no assistant token in the whole batch" in printed
    train_curve, val_curve = loss_curves(read_metrics_lenient(out))
    assert train_curve == [] and [step for step, _ in val_curve] == [4]  # loss.png: the final evaluation alone
    scalars = set(tensorboard_events(out).Tags()["scalars"])
    assert "train/loss" not in scalars and {"train/lr", "val/loss"} <= scalars


def test_torchrun_agrees_on_steps_whose_targets_only_one_rank_holds(preset: Path, tmp_path: Path) -> None:
    """--loss-on assistant under torchrun: a step with no target anywhere is skipped by every rank, one whose
    targets are all on rank 0 still steps on both (rank 1's share weighs 0), and early stopping ends both at the
    same step: the records and evaluations of the one process that trained the same global batches."""
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a-notes.txt").write_text("plain notes, not a chat, " * 600)
    (tmp_path / "corpus" / "chats.jsonl").write_text(
        "".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS * 3))
    from nanoqwen.data.loader import assistant_targets
    from nanoqwen.data.prepare import prepare
    from nanoqwen.train import chat_marks

    data = prepare(str(tmp_path / "corpus"), "bpe:300", tmp_path / "data", val_fraction=0.3, progress=False)
    train, marks = TokenSplit.open(data, "train"), chat_marks(data)
    per_rank = [[int(assistant_targets(train.tokens, int(o) + 1, 64, marks).sum())
                 for o in batch_offsets(3, step, 2, 64, len(train))] for step in range(4)]
    assert per_rank == [[0, 0], [5, 0], [0, 0], [0, 0]]  # step 2: rank 0's window alone has targets
    args = ["--config", str(preset), "--data", str(data), *FAST, "--batch-size", "2", "--seq-len", "64",
            "--micro-batch", "1", "--seed", "3", "--loss-on", "assistant", "--max-steps", "8", "--eval-interval", "2",
            "--eval-windows", "20", "--early-stopping-patience", "1"]
    assert train_in_process(*args, "--out", str(tmp_path / "one")) == 0
    done = run_train(*args, "--out", str(tmp_path / "two"), nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("stopped after step 4 (early_stopping)") == 1
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [(r["step"], r.get("no_targets")) for r in two] == [(1, True), (2, None), (3, True), (4, True)]
    for mine, theirs in zip(two, one, strict=True):
        assert mine.keys() == theirs.keys()
        for key in ("train_loss", "val_loss", "val_accuracy", "lr", "tokens"):
            assert mine.get(key) == pytest.approx(theirs.get(key), rel=2e-4)


def test_loss_on_assistant_samples_answer_a_validation_question(chat_data: Path, preset: Path,
                                                               tmp_path: Path) -> None:
    """Under --loss-on assistant the model never learns the user's turns: its samples answer the first validation
    question that fits in half a window (as `chat` prompts) and end at <|im_end|>, not start a conversation."""
    fast = [*FAST]
    fast[fast.index("--seq-len") + 1] = "64"
    out = tmp_path / "run"
    assert train_in_process("--config", str(preset), "--data", str(chat_data), "--out", str(out), *fast,
                            "--max-steps", "10", "--loss-on", "assistant") == 0
    tok, val = load_tokenizer(chat_data), TokenSplit.open(chat_data, "val").tokens.tolist()
    header = "<|im_start|>assistant\n"
    documents = tok.hf.decode(val, skip_special_tokens=False).split("<|endoftext|>")
    prompt = next(d[:d.index(header) + len(header)] for d in documents
                  if header in d and len(tok.encode(d[:d.index(header) + len(header)])) <= 32)
    sample = (out / "samples.txt").read_text().split("--- step 10\n", 1)[1]
    assert sample.startswith(prompt), sample
    assert "<|im_start|>" not in sample[len(prompt):] and "<|im_end|>" not in sample[len(prompt):], sample


def test_eval_loss_on_assistant_gives_the_runs_val_loss(chat_data: Path, preset: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """`eval --loss-on assistant` scores what such a run's evaluations score: the same numbers, from its windows."""
    fast = [*FAST]
    fast[fast.index("--seq-len") + 1] = "64"
    out = tmp_path / "run"
    assert train_in_process("--config", str(preset), "--data", str(chat_data), "--out", str(out), *fast,
                            "--max-steps", "10", "--loss-on", "assistant") == 0
    last = [r for r in read_metrics(out) if "val_loss" in r][-1]
    capsys.readouterr()
    assert main(["eval", "--model", str(out / "best"), "--data", str(chat_data), "--loss-on", "assistant",
                 "--context", "64", "--max-windows", "4", "--json", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert result["loss"] == pytest.approx(last["val_loss"], abs=1e-5)
    assert result["bits_per_byte"] == pytest.approx(last["val_bpb"], abs=1e-5)
    assert result["accuracy"] == pytest.approx(last["val_accuracy"])
    assert main(["eval", "--model", str(out / "best"), "--text-file", str(tmp_path / "x.txt"),
                 "--loss-on", "assistant"]) == 2
    assert "--loss-on assistant scores the assistant's turns" in capsys.readouterr().err


def test_init_from_notes_conversations_rendered_with_another_chat_template(chat_data: Path, preset: Path,
                                                                           tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """Records prepared with ChatML (prepare's default) for weights whose folder carries its own template (official
    Qwen3's: replies open with <think>) teach a format that chat and serve, prompting with that template, never use."""
    from nanoqwen.data.prepare import prepare
    from tests.serve_helpers import THINKING_TEMPLATE

    assert train_in_process("--config", str(preset), "--data", str(chat_data), "--out", str(tmp_path / "run"),
                            *FAST, "--max-steps", "1") == 0
    official = tmp_path / "official"
    shutil.copytree(tmp_path / "run" / "best", official)
    config = json.loads((official / "tokenizer_config.json").read_text())
    (official / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": THINKING_TEMPLATE}))
    # An end id that is a word (sample, chat and serve warn of it; training from the folder did not): warned of once.
    tokenizer = load_tokenizer(official)
    word = tokenizer.encode("the")[0]
    generation = json.loads((official / "generation_config.json").read_text())
    (official / "generation_config.json").write_text(json.dumps({**generation, "eos_token_id": [tokenizer.eot_id,
                                                                                                 word]}))
    ends = ", ".join(f"{text} {token_id}" for token_id, text in tokenizer.end_ids.items())
    warned = (f"nanoqwen: warning: {official / 'generation_config.json'}: eos_token_id {word} is "
              f"{json.dumps(tokenizer.decode([word]))} in its tokenizer, not one of its end tokens ({ends}), so "
              "generation stops there, as Transformers' does; correct it in that file unless the model was trained to "
              "end its text there\n")
    own = prepare(str(chat_data.parent / "corpus"), str(official), tmp_path / "own", val_fraction=0.1, progress=False)
    for given, noted in ((chat_data, True), (own, False)):
        capsys.readouterr()
        assert train_in_process("--init-from", str(official), "--data", str(given),
                                "--out", str(tmp_path / f"run-{noted}"), *FAST, "--max-steps", "1") == 0
        said = capsys.readouterr()
        assert said.err.count(warned) == 1, said.err
        out = said.out
        assert ("another chat template than" in out) == noted, out
        assert " 1 step of " in out and "1 steps" not in out  # counts take their noun's number
        assert not noted or f"--tokenizer {official}" in out


def test_loss_falls_and_the_run_folder_is_complete(trained: Path) -> None:
    records = read_metrics(trained)
    assert [r["step"] for r in records] == list(range(1, 41))
    assert {"step", "train_loss", "lr", "tokens", "tokens_per_s", "elapsed_s"} <= records[0].keys()
    assert [r["tokens"] for r in records] == [step * 8 * 32 for step in range(1, 41)]  # FAST: 8 x 32 tokens a step
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [10, 20, 30, 40]
    assert {"val_loss", "val_accuracy", "val_perplexity", "val_bpb"} <= evals[0].keys()
    first, last = records[0]["train_loss"], np.mean([r["train_loss"] for r in records[-5:]])
    assert last < first - 1.5, (first, last)
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    for name in ["config.json", "metrics.jsonl", "samples.txt", "loss.png", "best/model.safetensors",
                 "last/model.safetensors", "last/train_state.json", "last/train_state.pt"]:
        assert (trained / name).exists(), name
    assert (trained / "samples.txt").read_text().count("--- step") == 2  # step 20 and the end
    assert json.loads((trained / "last/train_state.json").read_text())["step"] == 40
    (trained / "loss.png").unlink()
    assert main(["plot", str(trained)]) == 0 and (trained / "loss.png").stat().st_size > 10_000
    (trained / "plots").mkdir()  # --out a folder: the plot goes in it
    assert main(["plot", str(trained), "--out", str(trained / "plots")]) == 0 and (trained / "plots/loss.png").exists()
    assert main(["plot", str(trained), "--out", f"{trained / 'plots'}/"]) == 0  # named as a folder
    assert main(["plot", str(trained), "--out", f"{trained / 'no-such-folder'}/"]) == 2  # not a file of that name
    assert not (trained / "no-such-folder").exists()


def test_a_resumed_runs_tensorboard_shows_each_step_once_as_the_resume_logged_it(tmp_path: Path) -> None:
    from nanoqwen.tracking import TensorBoardLog

    with TensorBoardLog(tmp_path, 0) as log:  # killed at step 4, its last save at step 2
        for step in range(1, 5):
            log.record({"step": step, "train_loss": float(step)})
    with TensorBoardLog(tmp_path, 2) as log:  # the resume trains steps 3 and 4 again
        for step in (3, 4):
            log.record({"step": step, "train_loss": 10.0 + step})
    got = [(e.step, e.value) for e in tensorboard_events(tmp_path).Scalars("train/loss")]
    assert got == [(1, 1.0), (2, 2.0), (3, 13.0), (4, 14.0)]


def test_a_new_runs_tensorboard_drops_what_a_run_killed_before_its_first_save_logged(tmp_path: Path) -> None:
    # Such a folder takes a new run (it holds no last/), which starts its metrics.jsonl afresh: TensorBoard showed
    # the killed run's later steps after the new run's, as if they were one run.
    from nanoqwen.tracking import TensorBoardLog

    with TensorBoardLog(tmp_path, 0) as log:  # killed at step 4, never saved
        for step in range(1, 5):
            log.record({"step": step, "train_loss": float(step)})
    with TensorBoardLog(tmp_path, 0) as log:  # the new run in its folder
        for step in (1, 2):
            log.record({"step": step, "train_loss": 10.0 + step})
    got = [(e.step, e.value) for e in tensorboard_events(tmp_path).Scalars("train/loss")]
    assert got == [(1, 11.0), (2, 12.0)]


def test_tensorboard_charts_a_records_numbers_but_its_step_and_flags(tmp_path: Path) -> None:
    # The step is the x-axis, not a curve; a step that trained nothing has a train_loss of null and a no_targets flag
    # (true), neither of them a point.
    from nanoqwen.tracking import TensorBoardLog

    with TensorBoardLog(tmp_path, 0) as log:
        log.record({"step": 1, "train_loss": None, "no_targets": True, "lr": 0.5, "val_loss": 2.0, "tokens": 64})
    assert sorted(tensorboard_events(tmp_path).Tags()["scalars"]) == ["train/lr", "train/tokens", "val/loss"]

def test_tensorboard_mirrors_metrics_and_samples(trained: Path) -> None:
    records = read_metrics(trained)
    events = tensorboard_events(trained)
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/tokens_per_s", "val/loss", "val/accuracy", "val/bpb"} <= tags
    for key, tag in [("train_loss", "train/loss"), ("lr", "train/lr"), ("val_loss", "val/loss"),
                     ("val_bpb", "val/bpb")]:
        expected = {r["step"]: r[key] for r in records if key in r}
        got = {e.step: e.value for e in events.Scalars(tag)}
        assert list(got) == list(expected), tag
        np.testing.assert_allclose(list(got.values()), list(expected.values()), rtol=1e-6)  # stored as float32
    samples = {e.step: e.tensor_proto.string_val[0].decode() for e in events.Tensors("sample/text_summary")}
    with (trained / "samples.txt").open(newline="") as f:  # as written: a sample may hold a bare \r
        written = f.read()
    assert list(samples) == [20, 40]
    for step, text in samples.items():  # the indented markdown of the sample samples.txt holds for that step
        assert text.replace("\n    ", "\n").removeprefix("    ") in written.split(f"--- step {step}\n")[1]


def test_wandb_mirrors_metrics_samples_and_config(trained: Path) -> None:
    (logged,) = wandb_runs(trained)
    assert logged.id == json.loads((trained / "last/train_state.json").read_text())["wandb_id"]
    assert [row for row in logged.rows if "sample" not in row] == read_metrics(trained)  # every value, in order
    samples = {row["step"]: html.unescape(re.search(r"<pre>(.*)</pre>", row["sample"], re.S).group(1))
               for row in logged.rows if "sample" in row}
    with (trained / "samples.txt").open(newline="") as f:  # as written: a sample may hold a bare \r
        written = f.read()
    assert list(samples) == [20, 40]
    for step, text in samples.items():
        assert written.split(f"--- step {step}\n")[1].startswith(text + "\n\n")
    config = json.loads((trained / "config.json").read_text())
    assert logged.config["train"] == config["train"] and logged.config["model"] == config["model"]


@pytest.mark.parametrize("flag, modules", [("--tensorboard", ("tensorboard", "torch.utils.tensorboard")),
                                           ("--wandb", ("wandb",))])
def test_a_tracker_without_its_package_is_one_clear_line(data: Path, preset: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str], flag: str,
                                                          modules: tuple[str, ...]) -> None:
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)  # import fails as if it were not installed
    out = tmp_path / "no-tracker"
    assert train_in_process(*common(data, preset, out), "--max-steps", "2", flag) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"pip install {modules[0]}" in err
    assert not out.exists()


def test_wandb_without_a_login_is_one_clear_line(data: Path, preset: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    # In this process, after the offline run of `trained` (or before it): W&B keeps no settings from one run
    # to the next
    for name in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc, no saved W&B settings
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    out = tmp_path / "no-login"
    assert train_in_process(*common(data, preset, out), "--max-steps", "2", "--wandb") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--wandb could not start a W&B run" in err and "wandb login" in err and "WANDB_MODE=offline" in err
    assert err.endswith("or train with --no-wandb")
    assert not out.exists()  # found before the run began: no model built, no folder made
    # Offline, the next try in this process starts (W&B let go of the settings it had failed with)
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert train_in_process(*common(data, preset, out), "--max-steps", "2", "--wandb") == 0
    (logged,) = wandb_runs(out)
    assert [row["step"] for row in logged.rows if "train_loss" in row] == [1, 2]
    # The report ends with how to upload it (W&B's own lines about that scroll away with the progress)
    (folder,) = (out / "wandb").glob("offline-run-*")
    assert f"W&B run{' ' * 27} `wandb sync {folder}` uploads it\n" in capsys.readouterr().out


def test_a_wandb_run_resumed_without_the_package_points_to_no_wandb(data: Path, preset: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    # The resume was not given --wandb (the run keeps it): "train without --wandb" told it nothing to do
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "tracked"
    assert train_in_process(*common(data, preset, out), "--max-steps", "2", "--wandb") == 0
    monkeypatch.setitem(sys.modules, "wandb", None)  # resumed where wandb is not installed
    capsys.readouterr()
    assert train_in_process("--resume", str(out), "--max-steps", "3") == 2
    assert "pip install wandb (or train with --no-wandb;" in capsys.readouterr().err
    assert train_in_process("--resume", str(out), "--max-steps", "3", "--no-wandb") == 0
    assert max(train_losses(out)) == 3


def test_wandb_that_fails_under_torchrun_stops_every_rank_with_its_line(data: Path, preset: Path,
                                                                        tmp_path: Path) -> None:
    # Rank 0 alone starts W&B: the other rank stopped with its line, not with a traceback from its next collective
    env = {k: v for k, v in subprocess_env().items() if k not in ("WANDB_MODE", "WANDB_API_KEY")}
    env.update(HOME=str(tmp_path), WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"))  # no login
    out = tmp_path / "no-login"
    done = subprocess.run(train_command(*common(data, preset, out), "--max-steps", "2", "--wandb", nproc=2),
                          capture_output=True, text=True, timeout=240, env=env, stdin=subprocess.DEVNULL)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if "nanoqwen train: error:" in line]
    assert len(lines) == 1 and "--wandb could not start a W&B run" in lines[0], done.stderr[-3000:]  # not once a rank
    assert "[rank1]" not in done.stderr and not out.exists()


def test_an_error_every_torchrun_process_meets_before_the_job_starts_is_said_once_a_machine(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], ctrl_c_raises: None) -> None:
    # A bad flag, an empty path, --device cuda without a GPU: each process of `torchrun --nproc_per_node 8` checks
    # its own command line before the job's process group exists, and each printed the same line, 8 of them.
    # LOCAL_RANK 0 says it for its machine; the others stop as it does (exit 2), silently (after a wait for it,
    # which torchrun cuts short as it ends the job: none here).
    from nanoqwen import cli
    from nanoqwen.cli import says_errors
    from nanoqwen.errors import RankError

    monkeypatch.setattr(cli, "QUIET_EXIT_WAIT_S", 0.0)
    for local_rank, lines in (("1", 0), ("0", 1)):
        monkeypatch.setenv("LOCAL_RANK", local_rank)
        with pytest.raises(SystemExit) as exited:
            main(["train", "--max-steps", "x"])
        assert exited.value.code == 2
        assert capsys.readouterr().err.count("nanoqwen train: error: argument --max-steps: must be a whole number, "
                                             "got x (see nanoqwen train --help)\n") == lines  # not "invalid int value"
        with pytest.raises(SystemExit):
            main(["train", "--lr", "3e-4x"])
        assert capsys.readouterr().err.count("nanoqwen train: error: argument --lr: must be a number, got 3e-4x (see "
                                             "nanoqwen train --help)\n") == lines
        assert main(["train", "--out", ""]) == 2
        assert capsys.readouterr().err.count("nanoqwen train: error: --out is empty") == lines
        with pytest.raises(SystemExit):  # a command misspelt names none: the job's all the same
            main(["trian", "--out", "x"])
        assert capsys.readouterr().err.count("nanoqwen: error: argument COMMAND: invalid choice: 'trian'; did you mean "
                                             "'train'? (choose from prepare, train,") == lines
        with pytest.raises(SystemExit):  # a flag's choices too
            main(["train", "--optimizer", "adam"])
        assert capsys.readouterr().err.count("argument --optimizer: invalid choice: 'adam'; did you mean 'adamw'?") \
            == lines
        assert says_errors(NanoQwenError("bad flag")) == (local_rank == "0") and says_errors(RankError("no GPU"))
        if local_rank == "1":  # Ctrl-C while it waits for LOCAL_RANK 0 ends the wait, with no traceback
            monkeypatch.setattr(cli, "QUIET_EXIT_WAIT_S", 30.0)
            # (Python's own SIGINT handler, ctrl_c_raises: ignored, as a suite run in the background inherits it,
            # the signal neither ended the wait nor tested anything: 30 s of sleep, and a pass)
            threading.Timer(0.2, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT)).start()
            started = time.monotonic()
            try:
                cli.say_error("nanoqwen train", "nanoqwen train: error: --out is empty")
            except KeyboardInterrupt:
                pytest.fail("Ctrl-C during the wait for LOCAL_RANK 0 raised KeyboardInterrupt")
            assert time.monotonic() - started < 20, "Ctrl-C did not end the wait for LOCAL_RANK 0"
            assert capsys.readouterr().err == ""
            monkeypatch.setattr(cli, "QUIET_EXIT_WAIT_S", 0.0)
        # Only train runs as a torchrun job: another command is alone, whatever LOCAL_RANK it inherits (a worker's
        # subprocess, another launcher's), and says its error (it waited 10 s and exited 2 without a word).
        assert main(["sample", "--model", "", "--prompt", "hi"]) == 2
        assert capsys.readouterr().err == "nanoqwen sample: error: --model is empty; give a file or folder name\n"
    # One process's own (no GPU for its LOCAL_RANK: torch's "invalid device ordinal" traceback) is one line, said by
    # the process that meets it, whatever its rank. Stood in for on CPU: one GPU visible to a job of two.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for name, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    assert main(["train", "--device", "cuda"]) == 2
    assert capsys.readouterr().err == "nanoqwen train: error: process 1 of the 2 started on this machine has no GPU " \
        "of its own (LOCAL_RANK 1, 1 GPU visible): start one process a GPU, --nproc_per_node 1\n"


def test_a_default_run_folder_rank0_cannot_make_stops_every_rank_with_its_line(data: Path, preset: Path,
                                                                              tmp_path: Path) -> None:
    # No --out: rank 0 makes runs/PRESET-TIME. Where it cannot (a file named runs), the other rank waited for the
    # name in a broadcast and died with a traceback when torchrun ended the job.
    (tmp_path / "runs").write_text("not a folder")
    command = train_command("--config", str(preset), "--data", str(data), *FAST, "--max-steps", "1", nproc=2)
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, env=subprocess_env(), cwd=tmp_path,
                          stdin=subprocess.DEVNULL)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if "nanoqwen train: error:" in line]
    assert len(lines) == 1 and "Not a directory: runs/" in lines[0], done.stderr[-3000:]
    assert "[rank1]" not in done.stderr and (tmp_path / "runs").read_text() == "not a folder"


def test_wandb_project_w_and_b_refuses_is_one_line_before_the_run_starts(data: Path, preset: Path, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")  # not a login's fault: no hint to log in
    out = tmp_path / "bad-project"
    assert train_in_process(*common(data, preset, out), "--max-steps", "2", "--wandb", "--wandb-project", "me/p") == 2
    said = capsys.readouterr()
    assert said.err.strip().startswith("nanoqwen train: error: --wandb-project: Invalid project name 'me/p'")
    assert said.err.strip().count("\n") == 0 and said.out == "" and not out.exists()


def test_wandb_run_in_the_folder_itself_is_named_after_it(data: Path, preset: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "here"
    out.mkdir()
    monkeypatch.chdir(out)  # --out . : Path(".").name is "", and W&B made up a name
    assert train_in_process(*common(data, preset, Path(".")), "--max-steps", "2", "--wandb") == 0
    assert [logged.name for logged in wandb_runs(out)] == ["here"]


def test_a_resumed_wandb_run_is_given_the_run_config_json(data: Path, preset: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # A resume gave W&B a config.json built afresh: its launches held this launch alone, its command this one's.
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "tracked"
    assert train_in_process(*common(data, preset, out), "--max-steps", "2", "--wandb") == 0
    assert train_in_process("--resume", str(out), "--max-steps", "3") == 0
    first, resumed = wandb_runs(out)
    config = json.loads((out / "config.json").read_text())
    assert [launch["step"] for launch in resumed.config["launches"]] == [0, 2]
    assert {key: resumed.config[key] for key in config} == config
    assert first.config["command"] == resumed.config["command"]


def test_a_run_in_the_current_folder_resumes_as_its_report_says(data: Path, preset: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert train_in_process(*common(data, preset, Path(".")), "--max-steps", "2") == 0
    # was refused: "needs the run folder"
    assert "nanoqwen train --resume . --device cpu --max-steps 4" in capsys.readouterr().out
    assert train_in_process("--resume", ".", "--max-steps", "3") == 0
    assert max(train_losses(tmp_path)) == 3


def test_bad_model_override_is_refused_before_preparing_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    write_corpus(tmp_path / "texts", documents=2)
    assert train_in_process("--dataset", "texts", "--set", "num_attention_heads=3", "--max-steps", "1") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "multiple of num_key_value_heads" in err
    assert not (tmp_path / "data").exists() and not (tmp_path / "runs").exists()
    (tmp_path / "runs/old/last").mkdir(parents=True)  # and an --out that already holds a run
    assert train_in_process("--dataset", "texts", "--out", "runs/old", "--max-steps", "1") == 2
    assert "already holds a run" in capsys.readouterr().err and not (tmp_path / "data").exists()
    # A sequence longer than the preset's context: one line, before any data is prepared or a note printed.
    assert train_in_process("--dataset", "texts", "--seq-len", "100000", "--max-steps", "1") == 2
    said = capsys.readouterr()
    assert "--seq-len 100000 exceeds the model's context" in said.err and "--set max_position" in said.err
    assert said.out == "" and not (tmp_path / "data").exists()
    # --fsdp outside torchrun: refused once the data was prepared and the model built (minutes, for a large one)
    assert train_in_process("--dataset", "texts", "--fsdp", "--max-steps", "1") == 2
    said = capsys.readouterr()
    assert said.err == "nanoqwen train: error: --fsdp shards the model over processes; launch with torchrun " \
        "--nproc_per_node N\n" and said.out == "" and not (tmp_path / "data").exists()


def test_a_bad_tokenizer_is_refused_before_preparing_is_announced(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    write_corpus(tmp_path / "texts", documents=2)
    for tokenizer, words in [("bpe:x", "bad tokenizer 'bpe:x'; write bpe:N"), ("qwen4", "unknown tokenizer 'qwen4'")]:
        assert train_in_process("--dataset", "texts", "--tokenizer", tokenizer, "--max-steps", "1") == 2
        said = capsys.readouterr()
        assert said.err.strip().count("\n") == 0 and words in said.err, said.err
        assert said.out == "" and not (tmp_path / "data").exists()  # no "preparing texts ..." first


def test_resume_of_nothing_or_of_a_file_says_which(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    for target, words in [(tmp_path / "nope", "does not exist"), (tmp_path / "notes.txt", "is a file")]:
        assert train_in_process("--resume", str(target)) == 2
        assert capsys.readouterr().err.strip() == (f"nanoqwen train: error: cannot resume: {target} {words}; give a "
                                                   "run folder (runs/NAME, the one a run's closing lines name)")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_resume_of_a_run_that_saved_nothing_says_to_start_it_again(
        trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    # A run killed before its first save has its config.json alone: the refusal said why, not what to do.
    monkeypatch.setenv("WANDB_MODE", "offline")  # the trained run logs to W&B: as subprocess_env() has it
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(trained / "config.json", run / "config.json")
    assert train_in_process("--resume", str(run)) == 2
    assert capsys.readouterr().err.strip() == (
        f"nanoqwen train: error: cannot resume: {run / 'last'} is missing: the run stopped before its first save, so "
        f"nothing of it is left to resume; start it again (its own command, with --out {run}, starts over in this "
        "folder)")
    # Killed after its first evaluation, before its first save: best/ is there, and starting over replaces it.
    shutil.copytree(trained / "best", run / "best")
    assert train_in_process("--resume", str(run)) == 2
    assert capsys.readouterr().err.strip() == (
        f"nanoqwen train: error: cannot resume: {run / 'last'} is missing: the run stopped before its first save, so "
        f"nothing of it is left to resume; start it again (its own command, with --out {run}, starts over in this "
        f"folder, replacing its best/), or start a new run from those weights: --init-from {run / 'best'}")


def test_resume_of_a_folder_of_runs_names_its_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # `--resume runs` said "runs/config.json is missing" where plot, sample and gguf name the runs inside it.
    runs = tmp_path / "runs"
    for name in ("b", "a"):
        (runs / name).mkdir(parents=True)
        (runs / name / "metrics.jsonl").write_text('{"step": 1, "train_loss": 5.0}\n')
    assert train_in_process("--resume", str(runs)) == 2
    assert capsys.readouterr().err == (f"nanoqwen train: error: {runs} is a folder of runs; give one of them to "
                                       f"--resume: {runs / 'a'} {runs / 'b'}\n")
    assert sorted(path.name for path in runs.iterdir()) == ["a", "b"]  # no lock or record left in it


def test_a_resume_names_the_flags_of_a_new_run_it_cannot_take(preset: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    # A new run's command line with --resume added: the refusal names what to leave out, not all seven such flags.
    for flags, names in [(["--config", str(preset)], "which --config cannot change; leave it out"),
                         (["--dataset", "texts/", "--set", "num_hidden_layers=4"],
                          "which --set and --dataset cannot change; leave them out")]:
        assert train_in_process("--resume", str(tmp_path / "run"), *flags) == 2
        assert capsys.readouterr().err.strip() == ("nanoqwen train: error: --resume continues a run with its own model "
                                                   f"and data, {names} (--data may say where its data folder is now)")
    # Each of the seven alone is named: one missing from the list would be taken silently, a model or data other
    # than the run's own (the folder named here need not exist: refused before it is read).
    for flags in (["--set", "num_hidden_layers=4"], ["--preset", "cpu"], ["--config", str(preset)],
                  ["--init-from", "ckpt"], ["--dataset", "texts/"], ["--tokenizer", "qwen3"],
                  ["--text-column", "body"]):
        assert train_in_process("--resume", str(tmp_path / "run"), *flags) == 2, flags
        assert f"which {flags[0]} cannot change; leave it out" in capsys.readouterr().err, flags


def test_a_longer_context_set_with_seq_len_is_taken(data: Path, preset: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    # The refusal of a --seq-len past the context says "or --set max_position_embeddings=N"; doing so was
    # refused by the same check, made against the preset's model before --set.
    out = tmp_path / "long"
    assert train_in_process(*common(data, preset, out), "--seq-len", "128", "--set", "max_position_embeddings=128",
                            "--max-steps", "1", "--sample-tokens", "1000", "--eval-windows", "1000",
                            "--sample-prompt", prompt := "the king " * 24) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["seq_len"] == 128 and config["model"]["max_position_embeddings"] == 128
    # More sample tokens than fit, more windows than val.bin holds: each said once, not cut silently
    printed, val_tokens = capsys.readouterr().out, len(TokenSplit.open(data, "val"))
    fits = 128 - len(load_tokenizer(data).encode(prompt)) + 1
    assert printed.count(f"note: --sample-tokens 1000: at most {fits} fit in the model's context (128 tokens) after "
                         "the sample prompt; samples stop there\n") == 1
    assert printed.count(f"note: --eval-windows 1000: {data.resolve()}/val.bin holds {val_tokens:,} tokens, fewer "
                         "than 1000 windows of 128; every evaluation scores all of it\n") == 1
    assert val_tokens < 1000 * 128 and read_metrics(out)[-1]["val_loss"] > 0


def test_a_micro_batch_that_does_not_divide_is_refused_before_preparing_data(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    write_corpus(tmp_path / "texts", documents=2)
    assert train_in_process("--dataset", "texts", "--batch-size", "10", "--micro-batch", "4", "--max-steps", "1") == 2
    said = capsys.readouterr()
    assert said.err == ("nanoqwen train: error: --micro-batch 4 must divide --batch-size 10 evenly; --micro-batch 2 "
                        "does\n")  # it said "(--batch-size 10 / 1 processes)"
    assert said.out == "" and not (tmp_path / "data").exists() and not (tmp_path / "runs").exists()
    # Under torchrun, each process's share of a step is what it divides.
    from nanoqwen.data.loader import check_batch

    with pytest.raises(NanoQwenError) as e:
        check_batch(16, 3, world_size=2)
    assert str(e.value) == ("--micro-batch 3 must divide the 8 sequences each process gets a step (--batch-size 16 "
                            "over 2 processes) evenly; --micro-batch 2 does")
    with pytest.raises(NanoQwenError) as e:
        check_batch(16, 0, world_size=1)
    assert str(e.value) == "--micro-batch must be at least 1, got 0"


def test_a_resume_names_the_runs_own_micro_batch_it_cannot_split(trained: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    # A resume whose split the run's own micro-batch no longer divides (another --batch-size, or more processes)
    # named it as a flag given; the user typed no --micro-batch: it is the run's, from its start
    config = json.loads((trained / "config.json").read_text())
    config["train"].update(micro_batch=4, wandb=False)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert train_in_process("--resume", str(run), "--batch-size", "6") == 2
    assert capsys.readouterr().err == ("nanoqwen train: error: the run's own --micro-batch 4 must divide --batch-size "
                                       "6 evenly; --micro-batch 3 does\n")
    assert sorted(path.name for path in run.iterdir()) == ["config.json"]


def test_a_resume_refuses_another_optimizer_before_touching_the_run(trained: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    # The saved state is AdamW's: another optimizer cannot continue it (it failed later as a "corrupt" state)
    run = tmp_path / "run"
    run.mkdir()
    config = json.loads((trained / "config.json").read_text())
    config["train"]["wandb"] = False
    (run / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert train_in_process("--resume", str(run), "--optimizer", "muon") == 2
    err = capsys.readouterr().err
    assert f"{run} trains with adamw, whose state --resume continues" in err
    assert f"--init-from {run / 'last'}" in err and err.count("\n") == 1, err
    assert sorted(path.name for path in run.iterdir()) == ["config.json"]


def test_the_closing_sample_on_a_terminal_shows_its_control_characters(
        data: Path, preset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The run's last sample, printed in its closing lines, let a generated ESC sequence act on the terminal (clear
    # the screen above it), as sample and chat no longer do; piped, the text stays as generated.
    import io

    import nanoqwen.train as train_module

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(train_module, "sample", lambda run: "it ends\x1b[2J")
    for name, out, shown in [("terminal", Terminal(), "it ends\u241b[2J"), ("piped", io.StringIO(), "it ends\x1b[2J")]:
        monkeypatch.setattr(sys, "stdout", out)
        assert train_in_process(*common(data, preset, tmp_path / name), "--max-steps", "1") == 0
        assert f"\nsample:\n{shown}\n" in out.getvalue()


def test_a_sample_of_nothing_says_so(data: Path, chat_data: Path, preset: Path, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # The default prompt is a new line: a model that ended the document at once printed blank lines.
    import nanoqwen.train as train_module

    monkeypatch.setattr(train_module, "sample", lambda run: run.sample_prompt)
    # and a model that diverged (a val loss of 223, as seen) had its perplexity, e^223, printed in 97 digits
    real_evaluate = train_module.evaluate
    monkeypatch.setattr(train_module, "evaluate",
                        lambda run: {**real_evaluate(run), "loss": 223.0, "perplexity": math.exp(223.0)})
    assert train_in_process(*common(data, preset, tmp_path / "run"), "--max-steps", "1") == 0
    printed = capsys.readouterr().out
    assert "\nsample:\n(nothing after it: the model ended the document at once)\n" in printed
    assert "val loss 223.0000 | accuracy " in printed and " | perplexity 7.04e+96 | bits per byte " in printed
    no_constants = partial(json.loads, parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))
    assert no_constants((tmp_path / "run/metrics.jsonl").read_text())["val_perplexity"] == math.exp(223.0)
    monkeypatch.setattr(train_module, "evaluate", real_evaluate)
    assert train_in_process(*common(data, preset, tmp_path / "prompted"), "--max-steps", "1",
                            "--sample-prompt", "the king") == 0
    assert "\nsample:\nthe king (nothing after it: the model ended the document at once)\n" in capsys.readouterr().out
    # Under --loss-on assistant the prompt is a validation question: the model ended its reply, not a document.
    assert train_in_process("--config", str(preset), "--data", str(chat_data), "--out", str(tmp_path / "chat"),
                            *FAST, "--max-steps", "1", "--loss-on", "assistant") == 0
    assert "(nothing after it: the model ended its reply at once)\n" in capsys.readouterr().out


def test_a_preset_sized_for_another_vocabulary_says_what_the_data_makes_of_it(
        data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # `prepare` defaults to the Qwen3 tokenizer: the cpu preset trained on such data silently grew 11x.
    # Here the other way round, which is cheaper: a preset made for 30,000 ids, data of a 300-id BPE.
    big = tmp_path / "big.json"
    big.write_text(json.dumps({"model": {**TINY_MODEL, "vocab_size": 30000}, "train": {"tokenizer": "bpe:30000"}}))
    assert train_in_process("--config", str(big), "--data", str(data), "--out", str(tmp_path / "run"), *FAST,
                            "--max-steps", "1") == 0
    note = next(line for line in capsys.readouterr().out.splitlines() if "names a vocabulary" in line)
    assert "of 30,000;" in note and "makes it 320, so the model has 0.0289M parameters, not 0.979M" in note
    assert "the preset's tokenizer, bpe:30000, for its size" in note


def test_the_vocabulary_note_is_about_the_tokenizer_not_the_sets(capsys: pytest.CaptureFixture[str]) -> None:
    # `--preset cpu --set num_hidden_layers=1` on data of the preset's 2,048 ids was put down to the tokenizer
    # ("names a vocabulary of 2,048; data's tokenizer makes it 2,048, so the model has 1.31M parameters, not
    # 3.67M"), and so was a vocab_size the user set (600, "the tokenizer makes it 600").
    from nanoqwen.config import apply_overrides, load_preset
    from nanoqwen.runs import note_vocab_change

    preset = load_preset("cpu")
    one_layer = apply_overrides(preset.model, ["num_hidden_layers=1"])
    note_vocab_change(preset, one_layer, Path("data"), ["num_hidden_layers=1"])
    note_vocab_change(preset, apply_overrides(preset.model, ["vocab_size=60000"]), Path("data"), [" vocab_size =60000"])
    assert capsys.readouterr().out == ""
    # The tokenizer's own part is still said, of the model the flags ask for: 1 layer at 151,936 ids, not at 2,048.
    note_vocab_change(preset, dataclasses.replace(one_layer, vocab_size=151936), Path("data"), ["num_hidden_layers=1"])
    assert capsys.readouterr().out == (
        "the cpu preset names a vocabulary of 2,048; data's tokenizer makes it 151,936, so the model has 39.7M "
        "parameters, not 1.31M; `--dataset SRC` prepares with the preset's tokenizer, bpe:2048, for its size\n")


def test_runs_started_in_the_same_second_get_their_own_folders(data: Path, preset: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    # A sweep started in the background (`for lr in ...; do nanoqwen train --lr $lr & done`) lost all runs but
    # one: each named runs/PRESET-TIME, the others found it locked.
    import datetime as real

    import nanoqwen.runs as runs_module

    class Frozen(real.datetime):
        @classmethod
        def now(cls, tz=None):  # type: ignore[no-untyped-def, override]
            return real.datetime(2026, 12, 4, 23, 0, 0)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(runs_module, "datetime", Frozen)
    flags = ["--config", str(preset), "--data", str(data), *FAST, "--max-steps", "2"]
    assert train_in_process(*flags) == 0 and train_in_process(*flags, "--lr", "2e-2") == 0
    runs = sorted(path.name for path in (tmp_path / "runs").iterdir())
    assert runs == [f"{preset.stem}-20261204-230000", f"{preset.stem}-20261204-230000-2"]  # runs/PRESET-TIME
    assert [json.loads((tmp_path / "runs" / run / "config.json").read_text())["train"]["lr"] for run in runs] == \
        [1e-2, 2e-2]
    capsys.readouterr()
    assert train_in_process(*flags, "--out", "") == 2  # not the default folder, silently
    assert "--out is empty" in capsys.readouterr().err and len(list((tmp_path / "runs").iterdir())) == 2


def test_fit_to_time_ends_the_schedule_where_the_time_runs_out(data: Path, preset: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "fitted"
    assert train_in_process(*common(data, preset, out), "--max-steps", "100000", "--schedule", "wsd",
                            "--fit-to-time", "--max-minutes", "0.1", "--eval-interval", "1000") == 0
    printed = capsys.readouterr().out
    assert "(max_minutes)" in printed  # the time ended it, through the fitted schedule
    assert printed.count("\nsample:\n") == 1 and "--- sample at step" not in printed  # the last sample once
    records = read_metrics(out)
    state = json.loads((out / "last/train_state.json").read_text())
    assert state["fitted_steps"] < 100000 and records[-1]["step"] <= state["fitted_steps"]
    # its first step is kept apart from the pace a resume fits to (its time within the whole's)
    assert state["first_steps"] == 1 and 0 < state["first_steps_s"] < state["elapsed_s"]
    if records[-1]["step"] == state["fitted_steps"]:  # the decay completed: the last rate is min_lr
        assert records[-1]["lr"] == pytest.approx(1e-3)
        # more time trains it further, not more steps
        assert f"--resume {out} --device cpu --max-minutes 0.1" in printed
    # Resumed with a twentieth of that time, the schedule is fitted to it before the first step (at the pace of the
    # steps before): too little for a whole decay, so it decays from the first step, not from the peak rate
    assert train_in_process("--resume", str(out), "--max-minutes", "0.005") == 0
    resumed = [r for r in read_metrics(out) if r["step"] > records[-1]["step"]]
    rates = [r["lr"] for r in resumed]
    assert rates and rates[0] < 1e-2 and rates == sorted(rates, reverse=True)


class FittedRun(SimpleNamespace):
    """What fit_schedule reads and writes of a run."""
    total_steps, warmup = Run.total_steps, Run.warmup

    def __init__(self, step: int, warmup: int, fitted_steps: int | None = None) -> None:
        super().__init__(cfg=SimpleNamespace(max_steps=100_000, warmup=warmup, max_minutes=10.0, fit_to_time=True),
                         state=LoopState(step=step, fitted_steps=fitted_steps),
                         info=SimpleNamespace(device=torch.device("cpu")), decay_compressed=False)

    def fit(self, step_s: float, remaining_s: float, recent_step_s: float | None = None) -> None:
        fit_schedule(self, step_s, recent_step_s or step_s, remaining_s,  # type: ignore[arg-type]
                     Display(True, self.state.step, self.total_steps, 1))  # its lines to stdout

    def rate(self, step: int) -> float:
        return lr_at(step, max_lr=1.0, min_lr=0.1, warmup=self.warmup, total=self.total_steps, schedule="wsd")


def test_the_step_the_decay_starts_at_is_said_as_the_metrics_number_it(capsys: pytest.CaptureFixture[str]) -> None:
    # After step 7 of 10 the fit leaves the decay to the last two steps: step 8 still runs at the peak rate (lr_at of
    # 0-based 7), step 9 is the first decayed one. The line said "step 7: ... decays from here", a step early.
    run = FittedRun(step=7, warmup=2)
    run.fit(step_s=1.0, remaining_s=3.3)
    assert run.total_steps == 10 and [run.rate(step) for step in (7, 8)] == pytest.approx([1.0, 0.55])
    assert "step 7: the learning rate decays from step 9 to the last step, 10" in capsys.readouterr().out


def test_a_fitted_length_too_short_for_the_warmup_cuts_it_and_still_decays() -> None:
    # 8 steps fit in the time left, warmup 50: the run ended still warming up, at 16% of the peak rate.
    run = FittedRun(step=6, warmup=50)
    run.fit(step_s=6.5, remaining_s=60 - 6 * 6.5)
    assert run.total_steps == 9 and run.warmup == 4 and run.state.fitted_warmup == 4
    # at the peak, then decayed to min_lr at the last step
    assert [run.rate(step) for step in range(6, 9)] == pytest.approx([1.0, 1.0, 0.1])
    run.fit(step_s=100.0, remaining_s=1.0)  # a slower machine
    assert run.total_steps == 7 and run.warmup == 4  # the length is re-estimated; the warmup was cut once
    # No time left at step 11 (a resume with a saved --max-minutes ended at the cap still at the peak rate,
    # its decay pushed past the time): the decay starts at once, compressed to the one step that fits.
    late = FittedRun(step=11, warmup=4)
    late.fit(step_s=100.0, remaining_s=1.0)
    assert late.total_steps == 12 and late.decay_compressed and late.rate(11) == pytest.approx(0.1)
    # Two steps fit at step 30 of a run warmed up over 10: the rate drops into the decay, min_lr at the last.
    resumed = FittedRun(step=30, warmup=10)
    resumed.fit(step_s=1.0, remaining_s=2.2)
    assert resumed.total_steps == 32 and [resumed.rate(step) for step in (30, 31)] == pytest.approx([0.325, 0.1])
    resumed.fit(step_s=1.0, remaining_s=600.0)  # then a faster machine: the decay never grows back
    assert resumed.total_steps == 32


def test_a_resume_given_a_new_length_fits_its_schedule_before_its_first_step() -> None:
    # A run that had decayed to min_lr at step 100, at 1 s a step, resumed with --max-minutes 0.1: the length
    # given dropped its fitted one, and its first 5 steps trained at the peak rate (max_steps' schedule) before
    # the loop had timed steps of its own. Now it is fitted at once, at the pace of the steps before.
    resumed = FittedRun(step=100, warmup=10)
    resumed.state.elapsed_s, resumed.cfg.max_minutes = 100.0, 0.1
    fit_resumed_schedule(resumed, Display(False, 100, resumed.total_steps, 1))  # type: ignore[arg-type]
    assert resumed.total_steps == 105 and resumed.decay_compressed  # 5 steps fit in 6 s (5% spare)
    rates = [resumed.rate(step) for step in range(100, 105)]
    assert rates[0] < 1.0 and rates[-1] == pytest.approx(0.1) and rates == sorted(rates, reverse=True)
    # The same pace after two invocations whose first steps compiled for 21 s each: those are left out of it (at
    # 142 s over 100 steps, 4 steps fit)
    compiled = FittedRun(step=100, warmup=10)
    compiled.state.elapsed_s, compiled.cfg.max_minutes = 142.0, 0.1
    compiled.state.first_steps, compiled.state.first_steps_s = 2, 42.0
    fit_resumed_schedule(compiled, Display(False, 100, compiled.total_steps, 1))  # type: ignore[arg-type]
    assert compiled.total_steps == 105
    # A new run has no pace to go by (the loop fits it after timing its first steps); a fit kept by a plain resume
    # stays until the loop refits it.
    for run in (FittedRun(step=0, warmup=10), FittedRun(step=100, warmup=10, fitted_steps=150)):
        total = run.total_steps
        fit_resumed_schedule(run, Display(False, run.state.step, total, 1))  # type: ignore[arg-type]
        assert run.total_steps == total


def test_a_machine_that_slows_in_the_decay_compresses_it_to_end_at_min_lr() -> None:
    # A default run whose machine got 25x slower two minutes before the end stopped at its time cap
    # still near the peak rate (the decay planned for a speed it no longer had): val loss 4.69, not ~4.4.
    run = FittedRun(step=95, warmup=10, fitted_steps=110)
    assert wsd_decay_start(110, 10) == 90  # step 95 is in the decay
    before = run.rate(95)
    run.fit(step_s=1.0, remaining_s=600.0)
    assert run.total_steps == 110 and not run.decay_compressed  # time to spare: the decay never grows back
    run.fit(step_s=1.0, recent_step_s=5.0, remaining_s=21.0)
    assert run.total_steps == 98 and run.decay_compressed  # 3 steps of 5 s fit (5% spare), by the last steps
    rates = [run.rate(step) for step in range(95, 98)]
    assert rates[0] < before and rates[-1] == pytest.approx(0.1)  # a lower rate now, min_lr at the last step
    assert rates == sorted(rates, reverse=True)


def test_wsd_decays_over_the_nearest_whole_number_of_steps_and_at_least_one() -> None:
    # A fifth of the steps after the warmup, to the nearest step: 2.6 of 13 is 3 steps of decay (not 2), 2.4 is 2;
    # a run of 2 steps still decays over its last one.
    assert [wsd_decay_start(total, 0) for total in (13, 12, 3, 2)] == [10, 10, 2, 1]

def test_muon_on_cpu_follows_torchs_muon() -> None:
    # MuonFp32 is torch.optim.Muon with the Newton-Schulz iteration in fp32: the same momentum (Nesterov),
    # weight decay (scaled by the rate) and update, up to torch's bf16 iteration.
    torch.manual_seed(0)
    start, grads = torch.randn(32, 48), [torch.randn(32, 48) for _ in range(3)]

    def trained(optimizer_class: type[torch.optim.Optimizer], **options: Any) -> torch.Tensor:
        weight = torch.nn.Parameter(start.clone())
        optimizer = optimizer_class([weight], lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw", **options)
        for grad in grads:
            weight.grad = grad.clone()
            optimizer.step()
        return weight.detach()

    ours, torchs = trained(MuonFp32), trained(torch.optim.Muon)
    assert (ours - start).abs().max() > 0.02 and (ours - torchs).abs().max() < 2e-3
    assert (trained(MuonFp32, nesterov=False) - torchs).abs().max() > 5e-3  # the test tells the two apart


def test_flops_per_token_counts_matmul_weights_and_attention() -> None:
    from nanoqwen.tracking import flops_per_token

    for tied in (True, False):
        config = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=1, head_dim=8, tie_word_embeddings=tied)
        lookup = 0 if tied else 64 * 16  # an untied embedding is a lookup, not a matmul
        attention = 12 * 2 * 2 * 8 * 128  # QK^T and AV, forward and backward, over 128 positions
        assert flops_per_token(config, 128) == 6 * (Qwen3(config).num_params() - lookup) + attention


@pytest.mark.parametrize(("name", "peak"), [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                                            ("NVIDIA H200", 989e12), ("NVIDIA H200 NVL", 835e12),
                                            ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA L40S", 362e12),
                                            ("NVIDIA L4", 121e12), ("Tesla V100-SXM2-16GB", None)])
def test_mfu_peak_follows_the_gpus_name(name: str, peak: float | None, monkeypatch: pytest.MonkeyPatch) -> None:
    # The names torch.cuda.get_device_name() gives; a variant (H200 NVL: 835 TFLOPS) is not its family's (989).
    from nanoqwen.tracking import peak_flops

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_flops(torch.device("cuda")) == peak == peak_flops(torch.device("cuda"), torch.float16)
    assert peak_flops(torch.device("cuda"), torch.float32) == (peak and peak / 2)  # on TF32 tensor cores
    assert peak_flops(torch.device("cpu")) is None


def test_a_warmup_given_to_resume_wins_over_one_cut_to_fit(data: Path, preset: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cut"
    assert train_in_process(*common(data, preset, out), "--max-steps", "1000000", "--warmup", "100000",
                            "--schedule", "wsd", "--fit-to-time", "--max-minutes", "0.05") == 0
    state = json.loads((out / "last/train_state.json").read_text())
    assert state["fitted_warmup"] is not None and state["fitted_warmup"] < 100000  # cut to the fitted length
    # a time given now wins over the length fitted to the time before, as --max-steps does: the run trains on
    capsys.readouterr()
    assert train_in_process("--resume", str(out), "--max-minutes", "0.025") == 0
    step = json.loads((out / "last/train_state.json").read_text())["step"]
    assert step > state["step"] and "caps this invocation too" not in capsys.readouterr().out
    assert train_in_process("--resume", str(out), "--warmup", "2", "--max-steps", str(step + 2)) == 0
    assert json.loads((out / "last/train_state.json").read_text())["fitted_warmup"] is None
    # the saved time cap still holds, and the resume says so (it once rode along silently)
    printed = capsys.readouterr().out
    assert "--max-minutes 0.025 (the run's own) caps this invocation too; give --max-minutes to change it (0: no " \
        "cap)" in printed
    assert f" from step {step}: " in printed  # where it goes on from
    # --max-minutes 0 lifts the cap (a preset's, or the run's own as here), for this resume and those after it
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "0: none (lifts a preset's cap" in shown
    # a default no one can type was shown as Python's None
    assert "None" not in shown and "--min-lr MIN_LR Learning rate at the last step (unset: lr / 10). (default: the " \
        "preset's, else unset)" in shown
    assert train_in_process("--resume", str(out), "--max-minutes", "0", "--max-steps", str(step + 4)) == 0
    assert json.loads((out / "config.json").read_text())["train"]["max_minutes"] is None
    assert read_metrics(out)[-1]["step"] == step + 4 and "caps this invocation" not in capsys.readouterr().out


def test_muon_trains(data: Path, preset: Path, tmp_path: Path) -> None:
    out = tmp_path / "muon"
    assert train_in_process(*common(data, preset, out), "--max-steps", "30", "--optimizer", "muon") == 0
    losses = list(train_losses(out).values())
    assert np.mean(losses[-5:]) < losses[0] - 1.5


def test_adamw_steps_with_betas_0_9_and_0_95_and_a_muon_state_of_another_shape_is_refused() -> None:
    # (0.9, 0.95), as LLM pretraining uses (torch's default 0.999 reacts ten times slower to a loss spike); a saved
    # hybrid state that does not hold both optimizers' is refused, not half loaded.
    config = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    model = Qwen3(config)
    assert build_optimizer(model, "adamw", 1e-3, 0.1, torch.device("cpu")).defaults["betas"] == (0.9, 0.95)
    hybrid = build_optimizer(model, "muon", 1e-3, 0.1, torch.device("cpu"))
    assert hybrid.optimizers[1].defaults["betas"] == (0.9, 0.95)  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="^expected the state of 2 optimizers, got 1$"):
        hybrid.load_state_dict({"optimizers": hybrid.state_dict()["optimizers"][1:]})

@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
@pytest.mark.parametrize("tied", [True, False])
def test_weight_decay_falls_on_block_matrices_and_on_embeddings_only_if_asked(optimizer: str, tied: bool) -> None:
    config = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, tie_word_embeddings=tied)
    model = Qwen3(config)
    names = {id(p): name for name, p in model.named_parameters()}
    for decay_embeddings in (False, True):
        # 0.05: neither torch's AdamW default (0.01) nor its Muon's (0.1), so a value not passed on shows
        built = build_optimizer(model, optimizer, 1e-3, 0.05, torch.device("cpu"), decay_embeddings)
        decays = {names[id(p)]: group["weight_decay"] for group in built.param_groups for p in group["params"]}
        assert sorted(decays) == sorted(names.values())  # every parameter once (a tied head is the embedding)
        for name, decay in decays.items():
            if "embed_tokens" in name or "lm_head" in name:
                assert decay == (0.05 if decay_embeddings else 0.0), name
            elif name.endswith("norm.weight"):
                assert decay == 0.0, name
            else:
                assert decay == 0.05 and "proj" in name, name
    set_lr(built, 0.123)  # the schedule's rate reaches every group (the embeddings' and the norms' too)
    assert {group["lr"] for group in built.param_groups} == {0.123}
    if optimizer == "muon":  # Moonshot's step size, so one --lr suits the Muon and the AdamW halves
        assert {g.get("adjust_lr_fn") for g in built.optimizers[0].param_groups} == {"match_rms_adamw"}
    # One step moves every parameter, and zero_grad clears every gradient (of both optimizers, with Muon).
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    built.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    built.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_low_precision_autocast_trains(data: Path, preset: Path, tmp_path: Path) -> None:
    # The CUDA precision paths (bf16 autocast; fp16 with its GradScaler), run on CPU: the curve of fp32
    # within autocast's rounding, and the scaler's state saved beside the weights for resume.
    curves, scalers = {}, {}
    for dtype in ["float32", "bfloat16", "float16"]:
        out = tmp_path / dtype
        assert train_in_process(*common(data, preset, out), "--max-steps", "30", "--dtype", dtype) == 0
        curves[dtype] = train_losses(out)
        scalers[dtype] = torch.load(out / "last/train_state.pt", weights_only=True)["scaler"]
    reference = curves["float32"]
    for dtype in ["bfloat16", "float16"]:
        losses = curves[dtype]
        assert losses[1] == pytest.approx(reference[1], abs=0.02)
        assert np.mean([losses[s] for s in range(26, 31)]) < losses[1] - 1.5
        assert abs(losses[30] - reference[30]) < 0.15, (dtype, losses[30], reference[30])
    assert scalers["float16"]["scale"] > 0 and not scalers["bfloat16"] and not scalers["float32"]


def test_compiled_model_follows_the_eager_curve(data: Path, preset: Path, tmp_path: Path) -> None:
    # The torch.compile path `nanoqwen train` takes by default on CUDA, traced and run here on CPU:
    # the model must compile (the chunked loss stays eager) and train to the eager curve.
    curves = []
    for name, flag in [("eager", "--no-compile"), ("compiled", "--compile")]:
        out = tmp_path / name
        assert train_in_process(*common(data, preset, out), "--max-steps", "6", flag) == 0
        assert json.loads((out / "config.json").read_text())["train"]["compile"] == (name == "compiled")
        curves.append(list(train_losses(out).values()))
    np.testing.assert_allclose(curves[1], curves[0], rtol=1e-4)


def test_micro_batches_and_accumulation_give_the_same_curve(data: Path, preset: Path, tmp_path: Path) -> None:
    curves = []
    for name, extra in [("whole", ["--micro-batch", "8"]), ("accumulated", ["--micro-batch", "2"]),
                        ("checkpointed", ["--micro-batch", "4", "--activation-checkpointing"])]:
        out = tmp_path / name
        assert train_in_process(*common(data, preset, out), "--max-steps", "8", *extra) == 0
        curves.append(list(train_losses(out).values()))
    np.testing.assert_allclose(curves[1], curves[0], rtol=1e-4)
    np.testing.assert_allclose(curves[2], curves[0], rtol=1e-4)

    # Memory only: --no-activation-checkpointing turns it off, for later resumes too (a plain one kept it on)
    def checkpointing(run: Path) -> bool:
        return json.loads((run / "config.json").read_text())["args"]["activation_checkpointing"]

    assert checkpointing(out)
    assert train_in_process("--resume", str(out), "--max-steps", "9", "--no-activation-checkpointing") == 0
    assert train_in_process("--resume", str(out), "--max-steps", "10") == 0 and not checkpointing(out)


def test_the_evaluation_that_ends_a_cut_run_does_not_count_toward_patience(data: Path, preset: Path,
                                                                            tmp_path: Path) -> None:
    # lr 0, evaluations at 2 (the best), 4, 6: patience 2 stops an unbroken run at step 6. A run cut at
    # step 5 (as --max-minutes cuts one) evaluates there too; resumed, it must still stop at 6, not at 5.
    out = tmp_path / "cut"
    flags = ["--lr", "0", "--min-lr", "0", "--eval-interval", "2", "--early-stopping-patience", "2"]
    assert train_in_process(*common(data, preset, out), "--max-steps", "5", *flags) == 0
    assert [r["step"] for r in read_metrics(out) if "val_loss" in r] == [2, 4, 5]
    assert json.loads((out / "last/train_state.json").read_text())["evals_since_best"] == 1
    assert train_in_process("--resume", str(out), "--max-steps", "50") == 0
    assert [r["step"] for r in read_metrics(out) if "val_loss" in r] == [2, 4, 5, 6]


def test_the_resume_line_gives_again_the_flags_a_run_does_not_save() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert unsaved_flags(parser.parse_args([])) == ""
    given = parser.parse_args(["--device", "cuda:1", "--dtype", "float16", "--fsdp", "--lr", "1e-3"])
    assert unsaved_flags(given) == " --device cuda:1 --dtype float16 --fsdp"  # --lr is the run's own


def test_patience_counts_the_evaluations_since_the_last_better_one(data: Path, preset: Path, tmp_path: Path) -> None:
    # A better val loss starts the count afresh: patience 2 stops after two evaluations in a row without one, not
    # after any two (the lr-0 runs above never improve, so they cannot tell the two apart). At this rate the val loss
    # of the tiny model rises and falls in its first steps (4.76, 4.94, 4.57, 4.67, 3.99, ... here).
    out = tmp_path / "bumpy"
    assert train_in_process(*common(data, preset, out), "--max-steps", "40", "--lr", "0.13", "--warmup", "0",
                            "--eval-interval", "1", "--early-stopping-patience", "2") == 0
    losses = [r["val_loss"] for r in read_metrics(out) if "val_loss" in r]
    best, since, stop, recovered = math.inf, 0, None, False
    for step, loss in enumerate(losses, start=1):
        recovered |= since > 0 and loss < best  # a better one after one that was not: the case this is about
        best, since = (loss, 0) if loss < best else (best, since + 1)
        if since == 2:
            stop = step
            break
    assert recovered and stop is not None and len(losses) == stop < 40, losses
    state = json.loads((out / "last/train_state.json").read_text())
    assert (state["best_val_loss"], state["evals_since_best"]) == (best, 2)


def test_a_val_loss_measured_otherwise_starts_best_afresh(data: Path, preset: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    # lr 0: the weights never change. Over other val windows the loss is another number, which was compared
    # with the old best (a better model could stop early; a worse one replaced best/).
    out = tmp_path / "rescored"
    flags = ["--lr", "0", "--min-lr", "0", "--eval-interval", "2"]
    assert train_in_process(*common(data, preset, out), "--max-steps", "4", *flags) == 0
    assert json.loads((out / "last/train_state.json").read_text())["best_step"] == 2  # step 4 was no better
    shutil.copytree(out, tmp_path / "at-4")
    capsys.readouterr()
    assert train_in_process("--resume", str(out), "--max-steps", "6", "--eval-windows", "8") == 0
    assert "writes best/ afresh (it holds step 2)" in capsys.readouterr().out
    assert json.loads((out / "last/train_state.json").read_text())["best_step"] == 6
    # That resume killed before its first evaluation and save: config.json already holds its flags, last/ and
    # best/ do not. The next resume compares with what last/ was trained with, so it still starts best/ afresh.
    for folder in ("last", "best"):
        shutil.rmtree(out / folder)
        shutil.copytree(tmp_path / "at-4" / folder, out / folder)
    assert train_in_process("--resume", str(out)) == 0
    printed = capsys.readouterr().out
    assert "eval_windows 4 -> 8" in printed and "writes best/ afresh (it holds step 2)" in printed, printed


def test_early_stopping_and_the_wall_cap_end_with_a_save(data: Path, preset: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    # lr 0: the val loss never improves, so patience 2 stops at the third evaluation (steps 2, 4, 6).
    out = tmp_path / "patience run"
    assert train_in_process(*common(data, preset, out), "--max-steps", "50", "--lr", "0", "--min-lr", "0",
                            "--eval-interval", "2", "--early-stopping-patience", "2") == 0
    assert read_metrics(out)[-1]["step"] == 6
    assert json.loads((out / "last/train_state.json").read_text())["step"] == 6
    printed = capsys.readouterr().out
    assert "early_stopping" in printed
    resume = shlex.split(printed.split("next: ")[1].splitlines()[0].split("|")[1])  # pasted as printed: one path
    # as planned, on the device it was given
    assert resume == ["nanoqwen", "train", "--resume", str(out), "--device", "cpu", "--max-steps", "50"], resume
    # A plain resume ends where the run ended (it went on, so a run killed after its stop ended otherwise).
    assert train_in_process("--resume", str(out)) == 2
    assert "stopped early at step 6 (2 evaluations without a better val loss)" in capsys.readouterr().err
    # More steps asked of it: a fresh patience (two more evaluations), not a stop at the next one.
    assert train_in_process("--resume", str(out), "--max-steps", "50") == 0
    assert read_metrics(out)[-1]["step"] == 10
    # A patience given now counts the evaluations already without a better val loss, as if the run had had it all
    # along: 2 -> 3 allows one more, not 3; one turned on (or lowered) below that count stops it at the next one.
    assert train_in_process("--resume", str(out), "--early-stopping-patience", "3") == 0
    assert read_metrics(out)[-1]["step"] == 12
    assert train_in_process("--resume", str(out), "--max-steps", "14", "--early-stopping-patience", "0") == 0
    assert json.loads((out / "last/train_state.json").read_text())["evals_since_best"] == 4
    assert train_in_process("--resume", str(out), "--max-steps", "18", "--early-stopping-patience", "2") == 0
    assert read_metrics(out)[-1]["step"] == 16
    assert train_in_process("--resume", str(out), "--max-steps", "18", "--early-stopping-patience", "0") == 0
    capsys.readouterr()
    assert train_in_process("--resume", str(out), "--seq-len", "100000") == 2
    err = capsys.readouterr().err.strip()  # a resume takes no --set: the hint is only to lower it
    assert "--seq-len 100000 exceeds the model's context" in err and "--set" not in err, err
    assert train_in_process("--resume", str(out)) == 2  # all its steps done: one line, not a run of 0 steps
    err = capsys.readouterr().err.strip()
    assert "has done all 18 of its steps; give --max-steps" in err and "\n" not in err
    out = tmp_path / "capped"
    assert train_in_process(*common(data, preset, out), "--max-steps", "1000", "--max-minutes", "0.0001",
                            "--log-interval", "1") == 0
    last = read_metrics(out)[-1]
    assert last["step"] < 1000 and "val_loss" in last  # a final evaluation
    assert json.loads((out / "last/train_state.json").read_text())["step"] == last["step"]
    printed = capsys.readouterr().out
    assert (out / "best").is_dir() and "max_minutes" in printed
    assert f"the time allowed {last['step']} of the 1,000 steps planned" in printed
    assert "| ETA 0 s" in printed and "ETA -" not in printed  # the cap passed mid-step: no time left, not less


def test_a_wall_cap_reached_on_the_last_step_ends_a_finished_run(data: Path, preset: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    # Every step ran: the time that ran out with the last one stopped nothing, where the report said
    # "stopped after step 1 (max_minutes)".
    out = tmp_path / "capped-at-the-end"
    assert train_in_process(*common(data, preset, out), "--max-steps", "1", "--max-minutes", "0.0001") == 0
    printed = capsys.readouterr().out
    assert "stopped after step 1 (max_steps)" in printed, printed
    assert f"--resume {out} --device cpu --max-steps 2" in printed  # more steps, as for any finished run


@pytest.mark.parametrize(("flags", "words"), [
    (["--sample-prompt", "word " * 1000], "--sample-prompt: the prompt is"),
    (["--max-minutes", "-1"], "--max-minutes must be positive (or 0 for no cap), got -1"),
    (["--early-stopping-patience", "-1"], "must not be negative"),
    (["--sample-interval", "-1"], "must not be negative"),
    (["--schedule", "cosine", "--fit-to-time"], "--no-fit-to-time"),
    # flags that tune one that is off did nothing without a word: no fitted schedule, no W&B run
    (["--schedule", "wsd", "--fit-to-time"], "--fit-to-time ends the schedule where --max-minutes runs out, and no "
                                             "--max-minutes is set; add --max-minutes M"),
    (["--schedule", "wsd", "--fit-to-time", "--max-minutes", "0"], "--fit-to-time ends the schedule where "
     "--max-minutes runs out, and --max-minutes 0 sets no cap; give --max-minutes M"),
    (["--wandb-project", "mine"], "--wandb-project mine names the W&B project --wandb logs into, and --wandb is off"),
    (["--seed", str(2**64)], "--seed must be between 0 and 2**63 - 1"),
    (["--lr", "1e38"], "--lr must be a number >= 0 and at most 10"),
    (["--min-lr", "-1"], "--min-lr must be a number >= 0"),
    (["--lr", "1e-3", "--min-lr", "1"], "--min-lr 1 is above --lr 0.001"),  # the rate would climb to 1 at the end
    (["--weight-decay", "-1"], "--weight-decay must be a number >= 0"),
    (["--grad-clip", "-1"], "--grad-clip must be a number >= 0"),
    (["--max-minutes", "-1"], "--max-minutes must be positive (or 0 for no cap), got -1"),
])
def test_settings_that_would_fail_late_are_refused_first(data: Path, preset: Path, tmp_path: Path, flags: list[str],
                                                          words: str, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "refused"
    assert train_in_process(*common(data, preset, out), "--max-steps", "3", *flags) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and words in err, err
    assert not out.exists()  # not even the folder (nor the lock it held while starting)


def test_train_settings_at_their_bounds_are_taken_and_past_them_refused() -> None:
    TrainConfig(lr=10.0, min_lr=10.0, seed=2**63 - 1, max_minutes=1e-6).validate()  # a flat rate: min_lr = lr
    for bad in ({"seed": 2**63}, {"max_minutes": 0.0}, {"lr": 10.5}, {"lr": 1e-3, "min_lr": 2e-3}):
        with pytest.raises(NanoQwenError):
            TrainConfig(**bad).validate()

@pytest.mark.parametrize("seen_by", ["evaluation", "save"])
def test_diverged_weights_are_never_saved(data: Path, preset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str], seen_by: str) -> None:
    # An update that diverges is seen by no train loss (that was read before it). evaluation: the final
    # evaluation sees it (its loss made nan here, as such weights give), so no best/ or last/ is written.
    # save: a save at every step, the weights made nan by the 2nd update (as an infinite gradient does):
    # the save itself refuses them, and last/ keeps step 1.
    import nanoqwen.train as train_module

    if seen_by == "evaluation":
        real_evaluate = train_module.evaluate

        def evaluate(run):
            result = real_evaluate(run)
            return {**result, "loss": float("nan")} if run.state.step == 2 else result

        monkeypatch.setattr(train_module, "evaluate", evaluate)
        flags, words = ["--max-steps", "2"], "the val loss became nan at step 2"
    else:
        real_step = train_module.train_step

        def train_step(run):
            result = real_step(run)
            if run.state.step == 2:
                with torch.no_grad():
                    next(run.model.parameters()).fill_(float("nan"))
            return result

        monkeypatch.setattr(train_module, "train_step", train_step)
        flags, words = ["--max-steps", "4", "--save-interval", "1"], "the weights became nan or infinite at step 2"
    out = tmp_path / "diverged"
    assert train_in_process(*common(data, preset, out), *flags) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and "\n" not in err, err
    if seen_by == "evaluation":
        assert not (out / "best").exists() and not (out / "last").exists()
    else:
        assert json.loads((out / "last/train_state.json").read_text())["step"] == 1
        assert all(torch.isfinite(p).all() for p in load_model(out / "last").parameters())


def test_running_out_of_memory_says_what_to_lower(data: Path, preset: Path, tmp_path: Path) -> None:
    import resource

    # 4 GiB of address space beyond what the shared libraries map: a CUDA build of torch maps its own at import
    # (4.1 GiB for 2.9.1+cu128, more than the 4 GiB once given in all, so the run failed importing torch; 2.7 GiB
    # for 2.11.0+cu130); a CPU build, 0.4 GiB.
    cap = (4 << 30) + library_bytes()

    def four_gib() -> None:  # a real allocation failure, without touching the machine's memory
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    # 32768 x 32 tokens in one forward pass: far more than 4 GiB of activations, even for this tiny model.
    command = train_command(*common(data, preset, tmp_path / "run"), "--max-steps", "2", "--batch-size", "32768")
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, env=subprocess_env(),
                          preexec_fn=four_gib)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "out of cpu memory at step 1" in lines[0] and "--micro-batch" in lines[0], lines


def test_a_micro_batch_whose_activations_do_not_fit_is_lowered_or_refused(
        data: Path, preset: Path, trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The tinystories-283m recipe on a 24 GB CPU: its micro-batch of 32 x 512 tokens keeps ~18 GiB of activations
    # beside 4 GiB of model and AdamW state, and the kernel killed the run with no message.
    import nanoqwen.train as train_module
    from nanoqwen.checkpoint import read_config
    from nanoqwen.train import activation_bytes_per_token

    config = read_config(trained / "best")
    model_bytes = config.num_params() * 16  # weights, gradients and AdamW's two moments
    per_sequence = 32 * activation_bytes_per_token(config, checkpointing=False, itemsize=4)
    room_for_two = model_bytes + 3 * per_sequence + per_sequence // 5  # 2 with half again to spare, not 4
    monkeypatch.setattr(train_module, "free_host_memory", lambda: room_for_two)
    lowered, asked = tmp_path / "lowered", tmp_path / "asked"
    assert train_in_process(*common(data, preset, lowered), "--max-steps", "3") == 0  # all 8 sequences at once
    out = capsys.readouterr().out
    assert "training with --micro-batch 2 (the same batch of 8 sequences a step, in more forward passes)" in out
    assert "micro-batch 2, accumulation 4" in out
    assert train_in_process(*common(data, preset, asked), "--max-steps", "3", "--micro-batch", "2") == 0
    assert "training with --micro-batch" not in capsys.readouterr().out
    assert train_losses(lowered) == train_losses(asked)

    assert train_in_process(*common(data, preset, tmp_path / "four"), "--max-steps", "3", "--micro-batch", "4") == 2
    err = capsys.readouterr().err
    assert re.fullmatch(r"nanoqwen train: error: --micro-batch 4 sequences of 32 tokens a forward pass need about "
                        r"[0-9.]+ GiB of activations beside the model's [0-9.]+ GiB, and this machine has [0-9.]+ GiB "
                        r"free; --micro-batch 2 fits \(--batch-size stays 8, by gradient accumulation\)\n", err), err
    monkeypatch.setattr(train_module, "free_host_memory", lambda: model_bytes + per_sequence // 2)
    assert train_in_process(*common(data, preset, tmp_path / "none"), "--max-steps", "3") == 2
    assert "; not even one sequence fits: add --activation-checkpointing, shorten --seq-len, or choose a smaller " \
           "model\n" in capsys.readouterr().err
    assert not (tmp_path / "four" / "metrics.jsonl").exists() and not (tmp_path / "none" / "metrics.jsonl").exists()


def micro_batch_worker(rank: int, folder: str) -> None:
    """One of two processes of a gloo job whose machine reads differently for each (rank 1 sees the model rank 0
    has already built, and less room): the micro-batch each would train with goes to folder/RANK.json."""
    from datetime import timedelta

    import torch.distributed as dist

    import nanoqwen.train as train_module

    config = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32)
    per_sequence = 32 * train_module.activation_bytes_per_token(config, checkpointing=False, itemsize=4)
    room = config.num_params() * 16 + (8 if rank == 0 else 3) * per_sequence  # (divided by the 2 processes)
    train_module.free_host_memory = lambda: 2 * room
    dist.init_process_group("gloo", store=dist.FileStore(f"{folder}/store", 2), rank=rank, world_size=2,
                            timeout=timedelta(seconds=20))
    loader = SimpleNamespace(micro_batch=4, per_rank=4, seq_len=32, batch_size=8)
    chosen = train_module.micro_batch_in_memory(loader, config, 16, given=False, checkpointing=False, itemsize=4,
                                                processes=2, say=lambda line: None)
    dist.destroy_process_group()
    Path(folder, f"{rank}.json").write_text(json.dumps(chosen))


def test_every_process_of_a_job_trains_with_the_same_micro_batch(tmp_path: Path) -> None:
    # Each process read the machine's free memory for itself: one that read it after the others had built their
    # models could lower its micro-batch alone, and under --fsdp (whose forward passes are collectives) a process
    # with more micro-batches a step waits for the others in a collective they never make.
    import torch.multiprocessing as mp

    mp.start_processes(micro_batch_worker, args=(str(tmp_path),), nprocs=2, start_method="fork")
    assert [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1)] == [2, 2]


def library_bytes() -> int:
    """Address space the shared libraries loaded in this process map (torch's, which a train process loads too)."""
    spans = [line.split()[0] for line in Path("/proc/self/maps").read_text().splitlines() if ".so" in line]
    return sum(int(end, 16) - int(start, 16) for start, end in (span.split("-") for span in spans))


def test_an_empty_validation_split_is_refused_before_training(data: Path, preset: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    (copy / "val.bin").write_bytes(b"")
    meta = json.loads((copy / "meta.json").read_text())
    meta["splits"]["val"] = {key: 0 for key in meta["splits"]["val"]}
    (copy / "meta.json").write_text(json.dumps(meta))
    out = tmp_path / "run"
    assert train_in_process(*common(copy, preset, out), "--max-steps", "3") == 2
    assert "no validation tokens" in capsys.readouterr().err and not (out / "metrics.jsonl").exists()


@pytest.mark.parametrize("split", ["train", "val"])
def test_data_with_ids_beyond_the_vocabulary_is_one_line(data: Path, preset: Path, tmp_path: Path, split: str,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    # Ids written by a larger tokenizer into a folder of the right size: torch.embedding's IndexError before.
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    ids = np.fromfile(copy / f"{split}.bin", dtype="<u4")
    ids[:] = 150_000
    ids.tofile(copy / f"{split}.bin")
    out = tmp_path / "run"
    assert train_in_process(*common(copy, preset, out), "--max-steps", "3") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{split}.bin holds token id 150000, outside the model's" in err[0], err
    assert not (out / "last").exists()


def test_val_bits_per_byte_count_the_bytes_of_the_scored_tokens(trained: Path, data: Path) -> None:
    # The fixed val subset is eval_windows x seq_len tokens (FAST: 4 x 32) of val.bin; its bytes are those of
    # the text its predicted tokens stand for (prorated from the split's by tokens they were 2% off here).
    tokens = TokenSplit.open(data, "val").prefix(4 * 32 + 1)
    scored_bytes = load_tokenizer(data).text_bytes(tokens[1:].tolist())
    val = json.loads((data / "meta.json").read_text())["splits"]["val"]
    assert scored_bytes != round(val["bytes"] * len(tokens) / val["tokens"])  # the test tells the two apart
    evals = [r for r in read_metrics(trained) if "val_loss" in r]
    for record in evals:
        expected = record["val_loss"] * (len(tokens) - 1) / math.log(2) / scored_bytes
        assert record["val_bpb"] == pytest.approx(expected, rel=1e-6)


def test_grad_clip_bounds_the_gradient_each_step_and_zero_turns_it_off(data: Path, preset: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    norms: list[tuple[float, float]] = []  # (before, after) of every clipping
    clip = torch.nn.utils.clip_grad_norm_

    def measured(parameters: Iterable[torch.Tensor], max_norm: float, *args: Any, **kwargs: Any) -> torch.Tensor:
        parameters = list(parameters)
        before = clip(parameters, max_norm, *args, **kwargs)
        after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in parameters if p.grad is not None]))
        norms.append((float(before), float(after)))
        return before

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", measured)
    assert train_in_process(*common(data, preset, tmp_path / "a"), "--max-steps", "3", "--grad-clip", "0.05") == 0
    assert len(norms) == 3
    for before, after in norms:
        assert before > 0.05 and after == pytest.approx(0.05, rel=1e-3)
    assert train_in_process(*common(data, preset, tmp_path / "b"), "--max-steps", "3", "--grad-clip", "0") == 0
    assert len(norms) == 3  # off: never called
    # fp16's GradScaler multiplies the loss by 2**16: the clip sees the gradient unscaled, as the fp32 run's first
    # (clipped before unscaling, it cut the scaled one to 0.05, and the update to 2**-16 of that)
    assert train_in_process(*common(data, preset, tmp_path / "c"), "--max-steps", "1", "--grad-clip", "0.05",
                            "--dtype", "float16") == 0
    assert len(norms) == 4 and norms[3][0] == pytest.approx(norms[0][0], rel=0.05), norms


def test_every_step_trains_in_training_mode_after_evaluations_samples_and_a_resume(
        data: Path, preset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Evaluating and sampling put the model in eval mode (no dropout), and a resume loads it so: each must leave
    # it training, or every later step trained without dropout (silently: the loss still falls)
    import nanoqwen.train

    modes: list[bool] = []  # model.training at each optimizer step
    step = nanoqwen.train.optimizer_step
    monkeypatch.setattr(nanoqwen.train, "optimizer_step",
                        lambda run, *args: (modes.append(run.model.training), step(run, *args))[1])
    out = tmp_path / "run"
    assert train_in_process(*common(data, preset, out), "--max-steps", "3", "--eval-interval", "1",
                            "--sample-interval", "2") == 0  # step 1 evaluates, step 2 samples after it too
    assert train_in_process("--resume", str(out), "--max-steps", "4") == 0
    assert modes == [True] * 4


def test_a_warmup_longer_than_the_run_is_cut_to_half_of_it(data: Path, preset: Path, tmp_path: Path) -> None:
    out = tmp_path / "short"  # a 10-step trial of settings made for long runs: it must still decay to min_lr
    assert train_in_process(*common(data, preset, out), "--max-steps", "10", "--warmup", "50") == 0
    assert json.loads((out / "config.json").read_text())["train"]["warmup"] == 5
    rates = [r["lr"] for r in read_metrics(out)]
    assert rates[:5] == pytest.approx([2e-3, 4e-3, 6e-3, 8e-3, 1e-2]) and rates[-1] == pytest.approx(1e-3)
    # A resume that sets a length or warmup anew is cut alike: it ended still warming up (here at 3e-3).
    assert train_in_process("--resume", str(out), "--max-steps", "12", "--warmup", "40") == 0
    assert json.loads((out / "last/train_state.json").read_text())["fitted_warmup"] == 6
    cosine = 1e-2 * (0.1 + 0.45 * (1 + math.cos(math.pi * (10 - 6) / (12 - 1 - 6))))  # step 10 of 12, warmup 6
    assert [r["lr"] for r in read_metrics(out)][10:] == pytest.approx([cosine, 1e-3])
    # --min-lr 0 is a rate that ends at 0, not an unset one (--lr / 10)
    out = tmp_path / "to-zero"
    assert train_in_process(*common(data, preset, out), "--max-steps", "2", "--warmup", "0", "--min-lr", "0") == 0
    assert [r["lr"] for r in read_metrics(out)] == pytest.approx([1e-2, 0.0])


def test_config_json_says_how_the_latest_launch_ran_and_each_launch_from_its_step(
        data: Path, preset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A torchrun job resumed in one process (or on another machine): config.json said the first launch's process
    # count and threads ever after, misdescribing the steps run since.
    out = tmp_path / "run"
    assert train_in_process(*common(data, preset, out), "--max-steps", "2") == 0
    config = json.loads((out / "config.json").read_text())
    first = {"step": 0, "world_size": 1, "device": "cpu", "dtype": "torch.float32", "threads": 1}
    assert config["launches"] == [first]
    # as a 2-process job of an earlier nanoqwen wrote it (no launches recorded)
    del config["launches"]
    config.update(world_size=2, threads=7)
    (out / "config.json").write_text(json.dumps(config))
    assert train_in_process("--resume", str(out), "--max-steps", "3") == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["world_size"], config["threads"]) == (1, 1)  # this launch's
    assert config["launches"] == [{**first, "world_size": 2, "threads": 7}, {**first, "step": 2}]
    # A launch that stopped before its first save ran no step the run kept: the next one from its step replaces it,
    # in launches and its command line in resumed_with (which kept it).
    killed = ["nanoqwen", "train", "--resume", str(out), "--max-steps", "9"]
    config["launches"].append({**first, "step": 3, "world_size": 4})
    config["resumed_with"].append(killed)
    (out / "config.json").write_text(json.dumps(config))
    assert train_in_process("--resume", str(out), "--max-steps", "4") == 0
    config = json.loads((out / "config.json").read_text())
    assert [(launch["step"], launch["world_size"]) for launch in config["launches"]] == [(0, 2), (2, 1), (3, 1)]
    assert len(config["resumed_with"]) == 2 and killed not in config["resumed_with"]
    # A last/ from before saves recorded their dtype is compared with the run's first launch's, not with that of a
    # later one that saved nothing (here a resume with --dtype bf16 that failed before its first save).
    state = json.loads((out / "last/train_state.json").read_text())
    del state["dtype"]
    (out / "last/train_state.json").write_text(json.dumps(state))
    config["args"]["dtype"] = "bf16"
    config["launches"].append({**first, "step": 4, "dtype": "torch.bfloat16"})
    (out / "config.json").write_text(json.dumps({**config, "dtype": "torch.bfloat16"}))
    capsys.readouterr()
    assert train_in_process("--resume", str(out), "--max-steps", "5") == 0
    assert f"resuming {out} with dtype float32 -> bfloat16:" in capsys.readouterr().out


def test_flags_given_to_resume_hold_for_later_resumes(data: Path, preset: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert train_in_process(*common(data, preset, out), "--max-steps", "4") == 0
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["micro_batch"] is None  # not the one it chose
    config["train"]["micro_batch"] = 8  # as runs of format 1 saved it: read back as "not given"
    del config["format"]
    (out / "config.json").write_text(json.dumps(config))
    # A new global batch (the saved micro-batch must not pin the old one) and a rate of 0, saved for later; and
    # another autocast dtype (a flag, not a setting of the loop, but it changes the numbers as much):
    assert train_in_process("--resume", str(out), "--max-steps", "5", "--batch-size", "4", "--lr", "0",
                            "--min-lr", "0", "--weight-decay", "0.5", "--dtype", "bf16") == 0
    note = next(line for line in capsys.readouterr().out.splitlines() if line.startswith(f"resuming {out} with"))
    assert "batch_size 8 -> 4" in note and "min_lr None -> 0.0" in note and "max_steps" not in note
    assert "lr 0.01 -> 0.0" in note, note
    assert "dtype float32 -> bfloat16" in note
    # The weight decay given now is the one used (loading the optimizer's state put the saved one back).
    blob = torch.load(out / "last/train_state.pt", weights_only=True)["optimizer"]
    groups = [group for part in blob.get("optimizers", [blob]) for group in part["param_groups"]]
    assert "weight_decay" in note and max(group["weight_decay"] for group in groups) == 0.5
    saved = json.loads((out / "config.json").read_text())
    assert saved["train"]["batch_size"] == 4 and saved["train"]["lr"] == 0
    assert saved["command"] and len(saved["resumed_with"]) == 1  # the first command is kept
    # No --lr: the saved 0 holds (and the saved dtype, which last/ was trained in). What reports on the run, or
    # samples or saves it, is no change of it (the losses stay those of a run that never stopped).
    assert train_in_process("--resume", str(out), "--max-steps", "6", "--log-interval", "5", "--tensorboard",
                            "--sample-interval", "5", "--sample-tokens", "4", "--sample-prompt", "the",
                            "--save-interval", "5", "--best-dtype", "bfloat16") == 0
    assert f"resuming {out} with" not in capsys.readouterr().out  # nothing changed now
    assert [r["lr"] for r in read_metrics(out)][4:] == [0, 0]
    # No more steps to take: one line, and the saved settings are not rewritten with the smaller number.
    before = (out / "config.json").read_bytes()
    assert train_in_process("--resume", str(out), "--max-steps", "6") == 2
    err = capsys.readouterr().err.strip()
    assert "already at step 6" in err and "\n" not in err and "its last/ and best/ are usable" in err
    assert (out / "config.json").read_bytes() == before
    shutil.rmtree(out / "best")  # as a run stopped before its first evaluation has none
    assert train_in_process("--resume", str(out), "--max-steps", "6") == 2
    assert "(its last/ is usable as it is)" in capsys.readouterr().err
    # A micro-batch asked for is kept, even one equal to what the run would choose (another process count
    # on resume would choose another).
    asked = tmp_path / "asked"
    assert train_in_process(*common(data, preset, asked), "--max-steps", "1", "--micro-batch", "8") == 0
    assert train_in_process("--resume", str(asked), "--max-steps", "2") == 0
    assert json.loads((asked / "config.json").read_text())["train"]["micro_batch"] == 8


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])  # muon: the default run's, with two optimizers' state
def test_resume_after_sigkill_reproduces_the_uninterrupted_curve(data: Path, preset: Path, tmp_path: Path,
                                                                 optimizer: str, monkeypatch: pytest.MonkeyPatch
                                                                 ) -> None:
    args = ["--max-steps", "60", "--save-interval", "10", "--sample-interval", "40", "--optimizer", optimizer,
            "--tensorboard", "--wandb"]
    if optimizer == "adamw":  # dropout draws from torch's generator: the curve holds only if the resume restores it
        args += ["--set", "attention_dropout=0.1"]
    # The uninterrupted run and the resume in this process (no interpreter to start; one thread, as the killed one)
    monkeypatch.setenv("WANDB_MODE", "offline")
    reference = tmp_path / "reference"
    assert train_in_process(*common(data, preset, reference), *args) == 0
    killed = tmp_path / "killed"
    process = subprocess.Popen(train_command(*common(data, preset, killed), *args), env=subprocess_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:  # kill it mid-run, wherever it is (perhaps mid-save)
        metrics = killed / "metrics.jsonl"
        if metrics.exists() and metrics.read_text().count("\n") >= 25:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert len(read_metrics(killed)) < 60
    # TensorBoard reads a folder's event files in name order: the second each was opened in, then host and process
    # id. A resume from the command line opens its file seconds after the killed run's; this one, in this process (a
    # lower id), could open it in the same second and sort first, its purge of steps 21-25 then read before them.
    opened = max(int(f.name.split(".")[3]) for f in (killed / "tensorboard").glob("events.out.tfevents.*"))
    while time.time() < opened + 1:
        time.sleep(0.01)
    assert train_in_process("--resume", str(killed)) == 0
    expected, got = train_losses(reference), train_losses(killed)
    assert list(got) == list(range(1, 61))
    assert got == expected  # bit for bit
    # So are its evaluations: a resume scores the run's own val subset (--eval-windows of --seq-len), as it did
    evaluations = [{r["step"]: (r["val_loss"], r["val_accuracy"], r["val_bpb"]) for r in read_metrics(run)
                    if "val_loss" in r} for run in (reference, killed)]
    assert list(evaluations[0]) == list(range(10, 61, 10)) and evaluations[1] == evaluations[0]
    # TensorBoard drops what the killed process logged after its last save: each step once, as in metrics.jsonl
    logged = tensorboard_scalars(killed, "train/loss")
    assert list(logged) == list(range(1, 61))
    np.testing.assert_allclose(list(logged.values()), list(expected.values()), rtol=1e-6)
    # W&B: the resume goes on in the killed process's W&B run, from the step after its last save
    killed_log, resumed_log = wandb_runs(killed)
    assert killed_log.id == resumed_log.id
    resumed_losses = {row["step"]: row["train_loss"] for row in resumed_log.rows if "train_loss" in row}
    saved_step = min(resumed_losses) - 1
    assert saved_step % 10 == 0 and list(resumed_losses) == list(range(saved_step + 1, 61))
    assert resumed_losses == {step: expected[step] for step in resumed_losses}


def test_sigterm_saves_and_exits_cleanly(data: Path, preset: Path, tmp_path: Path) -> None:
    out = tmp_path / "term"
    process = subprocess.Popen(train_command(*common(data, preset, out), "--max-steps", "100000"),
                               env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().count("\n") >= 3):
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr  # saved, yet stopped short: `train && ...` stops
    step = json.loads((out / "last/train_state.json").read_text())["step"]
    assert step == read_metrics(out)[-1]["step"] and "signal SIGTERM" in stdout


def test_a_signal_during_the_last_step_ends_the_run_as_planned(data: Path, preset: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # That step ends the run anyway: stopped short, it had no final evaluation or sample (best/ and the report
    # stayed at the evaluation before), and a resume, with no steps left, refused to make up for them.
    import nanoqwen.train as train_module

    planned_step = train_module.optimizer_step

    def signalled_in_last_step(run: Run, *args: Any) -> float:
        if run.state.step + 1 == run.total_steps:
            signal.raise_signal(signal.SIGTERM)
        return planned_step(run, *args)

    monkeypatch.setattr(train_module, "optimizer_step", signalled_in_last_step)
    out = tmp_path / "run"
    assert train_in_process(*common(data, preset, out), "--max-steps", "12") == 0  # done: `train && ...` goes on
    last = read_metrics(out)[-1]
    assert last["step"] == 12 and "val_loss" in last
    assert "--- step 12\n" in (out / "samples.txt").read_text()
    assert json.loads((out / "last/train_state.json").read_text())["step"] == 12


def test_a_second_signal_during_the_save_says_what_last_holds_and_how_to_resume(
        data: Path, preset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    # A first SIGTERM promised a save; a Ctrl-C during it abandoned the save, and the user saw only "interrupted".
    import nanoqwen.checkpoint as checkpoint_module
    import nanoqwen.train as train_module

    planned_step, planned_write = train_module.optimizer_step, checkpoint_module.write_checkpoint_files
    planned_save = train_module.save_last
    signalled_at, again = 0, "mid-save"

    def signalled(run: Run, *args: Any) -> float:
        if run.state.step + 1 == signalled_at:
            signal.raise_signal(signal.SIGTERM)
        return planned_step(run, *args)

    def write_then_signal(*args: Any, **kwargs: Any) -> None:
        planned_write(*args, **kwargs)  # mid-way through the save: its files written, not yet in place
        if again == "mid-save" and kwargs.get("step") == signalled_at:
            signal.raise_signal(signal.SIGINT)

    def save_then_signal(run: Run) -> None:
        planned_save(run)
        if again == "after-save" and run.state.step == signalled_at:
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(train_module, "optimizer_step", signalled)
    monkeypatch.setattr(checkpoint_module, "write_checkpoint_files", write_then_signal)
    monkeypatch.setattr(train_module, "save_last", save_then_signal)
    abandoned = "nanoqwen train: interrupted by a second SIGINT, which abandoned the save the first signal asked for: "
    for signalled_at, again, saved in ((6, "mid-save", 4), (3, "mid-save", None), (6, "after-save", 6)):
        out = tmp_path / f"{again}-{signalled_at}"
        assert train_in_process(*common(data, preset, out), "--max-steps", "12", "--save-interval", "4") == 130
        line = capsys.readouterr().err.strip().splitlines()[-1]
        resume = f"; resume: nanoqwen train --resume {out} --device cpu"
        if saved is None:
            assert line == abandoned + f"nothing is saved in {out / 'last'} yet; start the run again"
        elif again == "mid-save":
            assert line == abandoned + f"{out / 'last'} holds step {saved}" + resume
        else:
            assert line == f"nanoqwen train: interrupted by a second SIGINT as the run stopped: {out / 'last'} " \
                f"holds step {saved}, its latest" + resume
        assert checkpoint_step(out / "last") == saved
        assert not list(out.glob(".last.*"))  # the abandoned save's files went with it


def test_ctrl_c_while_the_closing_plot_is_drawn_says_the_run_is_saved(
        data: Path, preset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    # The run is saved before loss.png is drawn; a Ctrl-C there said a plain "interrupted", as if all was lost.
    import nanoqwen.plot as plot_module

    def ctrl_c(run_dir: Path) -> Path:
        raise KeyboardInterrupt

    monkeypatch.setattr(plot_module, "plot_run", ctrl_c)
    out = tmp_path / "run"
    assert train_in_process(*common(data, preset, out), "--max-steps", "4") == 130
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == f"nanoqwen train: interrupted while drawing {out / 'loss.png'}: the run is saved ({out / 'last'} " \
        f"holds step 4); draw it later with `nanoqwen plot {out}`"
    assert checkpoint_step(out / "last") == 4


def test_a_signal_torchrun_passes_on_again_still_saves() -> None:
    # A job scheduler (SLURM) signals every process of a job: each worker got SIGTERM, then torchrun passed its own
    # on, and the second aborted the save. Under torchrun a worker notes both, and keeps noting them until it
    # exits (torchrun signals the others when one stops, mid-way through rank 0's save or report).
    from nanoqwen.train import StopSignal

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with StopSignal(patient=True) as stop:
            signal.raise_signal(signal.SIGTERM)
            signal.raise_signal(signal.SIGTERM)
            signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGTERM)  # after the loop: noted, not the default death
        assert stop.name == "SIGTERM"
        for sig, handler in before.items():
            signal.signal(sig, handler)
        with pytest.raises(KeyboardInterrupt), StopSignal():  # one process: a second signal aborts
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
        assert {sig: signal.getsignal(sig) for sig in before} == before
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def test_under_torchrun_a_hangup_is_a_stop_as_sigterm_is_unless_ignored() -> None:
    # torchrun handles SIGHUP itself (nohup's ignore undone: `nohup torchrun ...` and a closed terminal) and passes it
    # on to every worker, which died at once, unsaved. Under torchrun a worker takes it as SIGTERM, unless the
    # worker was left to ignore it (`torchrun --signals_to_handle SIGTERM,SIGINT` under nohup). A stop saves as the
    # SIGTERM test below shows.
    from nanoqwen.train import StopSignal

    before = signal.getsignal(signal.SIGHUP)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)  # as in a terminal: the suite may run under nohup, which ignores it
    try:
        with StopSignal(patient=True) as stop:
            assert signal.getsignal(signal.SIGHUP) == stop._handle
            signal.raise_signal(signal.SIGHUP)
        assert stop.name == "SIGHUP"
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        with StopSignal(patient=True):
            assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        with StopSignal():  # one process: a hangup ends it as it ends any command
            assert signal.getsignal(signal.SIGHUP) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGHUP, before)


def test_a_reader_that_leaves_does_not_end_the_run(data: Path, preset: Path, tmp_path: Path) -> None:
    # `nanoqwen train ... | head -1`: the closed pipe raised at the next print, which ended the run unsaved.
    out = tmp_path / "piped"
    process = subprocess.Popen(train_command(*common(data, preset, out), "--max-steps", "12", "--log-interval", "1"),
                               env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None and process.stdout.readline()
    process.stdout.close()  # the reader leaves after one line
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == 0, stderr
    assert json.loads((out / "last/train_state.json").read_text())["step"] == 12


def test_without_a_terminal_the_progress_is_a_line_every_log_interval_and_at_both_ends(
        capsys: pytest.CaptureFixture[str]) -> None:
    # A log file or a pipe (nohup, a job scheduler): plain lines, the first and the last step always among them.
    display = Display(True, 0, 10, 4)
    for step in range(1, 11):
        display.update(step, "loss 1.0")
    display.print("a sample")
    display.close()
    assert capsys.readouterr().out == "step 1/10 | loss 1.0\nstep 4/10 | loss 1.0\n" \
        "step 8/10 | loss 1.0\nstep 10/10 | loss 1.0\na sample\n"
    display = Display(False, 0, 10, 1)  # every rank but 0: nothing
    display.update(1, "loss 1.0")
    display.print("a sample")
    assert capsys.readouterr().out == ""


def test_a_terminal_that_hangs_up_is_a_reader_that_left() -> None:
    # torchrun in a terminal that closes: its workers stop after the step and save (a hangup is a stop under
    # torchrun), but they are in sessions of their own and the terminal stays their stdout: rank 0's next print
    # raised EIO, which ended it unsaved where it printed before the save (a step's val loss line).
    import pty

    from nanoqwen.io import ReaderMayLeave

    controller, terminal = pty.openpty()
    with open(terminal, "w") as stream:
        out = ReaderMayLeave(stream)
        print("step 1/8", file=out, flush=True)
        os.close(controller)  # the terminal closes
        print("step 2: val loss 3.1", file=out, flush=True)
        print("stopped after step 2", file=out, flush=True)
        assert os.path.samestat(os.fstat(stream.fileno()), os.stat(os.devnull))  # the rest goes nowhere


COMPILED_ACCUMULATING = ["--compile", "--micro-batch", "2"]  # what a multi-GPU run does by default, traced on CPU
TORCHRUN_ARGS = ["--max-steps", "8", "--eval-interval", "4"]


@pytest.fixture(scope="module")
def single_process_run(data: Path, preset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The one-process run every torchrun job is compared with (the same for all of them: trained once)."""
    single = tmp_path_factory.mktemp("single") / "run"
    assert train_in_process(*common(data, preset, single), *TORCHRUN_ARGS) == 0
    return single


@pytest.mark.parametrize(("fsdp", "nproc", "extra"),
                         [(False, 2, []), (True, 2, []), (True, 1, []), (False, 2, COMPILED_ACCUMULATING),
                          (True, 2, COMPILED_ACCUMULATING)],
                         ids=["ddp", "fsdp", "fsdp-one", "ddp-compiled-accumulating", "fsdp-compiled-accumulating"])
def test_torchrun_follows_the_single_process_curve(data: Path, preset: Path, single_process_run: Path,
                                                   tmp_path: Path, fsdp: bool, nproc: int, extra: list[str]) -> None:
    # nproc 1: a torchrun job of one process still shards with FSDP2 (what a one-GPU machine can check).
    # Compiled, with two micro-batches a step: the model is compiled inside DDP (gradients synced on the last
    # micro-batch only) or under FSDP2, as on GPUs by default; the single process stays eager.
    single = single_process_run
    multi = tmp_path / "multi"
    # DDP as users start it, with no OMP_NUM_THREADS: torchrun's 1 per process becomes a share of the cores each
    # (the others keep the 1 set here, as a user's own, so that they compare bit for bit)
    env = {k: v for k, v in subprocess_env().items() if k != "OMP_NUM_THREADS"} if nproc == 2 and not fsdp and \
        not extra else None
    threads = max(1, usable_cores() // nproc) if env else 1
    done = run_train(*common(data, preset, multi), *TORCHRUN_ARGS, *(["--fsdp"] if fsdp else []), *extra,
                     nproc=nproc, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    each = " each" if nproc > 1 else ""
    assert f"on cpu x{nproc} {'FSDP' if fsdp else 'DDP'} (float32, {threads} thread{'s' * (threads > 1)}{each})" \
        in done.stdout  # how the job splits
    one, two = train_losses(single), train_losses(multi)
    assert list(one) == list(two)
    # the tokens of every process's share of the batch (the plot's x by tokens matches the single process's)
    assert [r["tokens"] for r in read_metrics(multi)] == [r["tokens"] for r in read_metrics(single)]
    np.testing.assert_allclose(list(two.values()), list(one.values()), rtol=2e-4)
    # the evaluations (every rank scores the same subset): the single process's numbers, at the same steps
    evals = [[(r["step"], r["val_loss"], r["val_accuracy"]) for r in read_metrics(run) if "val_loss" in r]
             for run in (single, multi)]
    assert [e[0] for e in evals[1]] == [e[0] for e in evals[0]] == [4, 8]
    np.testing.assert_allclose([e[1:] for e in evals[1]], [e[1:] for e in evals[0]], rtol=2e-4)
    config = json.loads((multi / "config.json").read_text())
    assert config["world_size"] == nproc and config["threads"] == threads
    assert (multi / "best/model.safetensors").exists()
    assert config["train"]["compile"] is bool(extra)
    # the checkpoint holds the trained weights (FSDP: gathered from the shards on rank 0)
    for mine, theirs in zip(load_model(multi / "last").parameters(), load_model(single / "last").parameters(),
                            strict=True):
        torch.testing.assert_close(mine, theirs, atol=5e-3, rtol=0)
    if extra:  # the plain jobs resume below: compiling once more would only add time
        return
    # the torchrun job's checkpoints resume on one plain process (this one)
    assert train_in_process("--resume", str(multi), "--max-steps", "10") == 0
    assert max(train_losses(multi)) == 10
    config = json.loads((multi / "config.json").read_text())  # says how its steps since ran
    assert config["world_size"] == 1 and [(launch["step"], launch["world_size"]) for launch in config["launches"]] \
        == [(0, nproc), (8, 1)]


def test_sigterm_to_torchrun_stops_every_process_saved_once_and_resumes_on_the_uninterrupted_curve(
        data: Path, preset: Path, single_process_run: Path, tmp_path: Path) -> None:
    # `kill` of torchrun (a scheduler's stop): it passes the signal on to every process and, once they have ended,
    # raises a traceback of its own (SignalException). The job stops after one step, saved once by rank 0, and says
    # that the traceback after it is torchrun's report of the stop, not a failure of the run.
    out = tmp_path / "run"
    # a save and a sample every step (neither changes the curve): slow enough for the signal to land mid-run
    command = train_command(*common(data, preset, out), *TORCHRUN_ARGS, "--log-interval", "1", "--save-interval", "1",
                            "--sample-interval", "1", nproc=2)
    stdout = signalled_at_step(command, 1, signal.SIGTERM, tmp_path / "err", timeout=120)
    stderr = (tmp_path / "err").read_text()
    step = json.loads((out / "last/train_state.json").read_text())["step"]
    assert 1 <= step < 8 and stdout.count("stopped after step") == 1  # every process at the same step
    assert f"stopped after step {step} (signal SIGTERM)" in stdout and "SignalException" in stderr
    assert stderr.index(f"note: torchrun reports a job stopped by a signal with a traceback of its own below "
                        f"(SignalException, or ChildFailedError where only a worker got it): this run stopped as "
                        f"asked, with last/ saved at step {step}") < stderr.index("Traceback")
    assert [r["step"] for r in read_metrics(out)] == list(range(1, step + 1))  # rank 0's lines, once each
    # resumed as it was started: a plain process would hold a model --fsdp shards whole, and the flags a run does
    # not save given again (--device cpu: on a GPU machine the resume went to the GPU)
    assert f"|  torchrun --standalone --nproc_per_node 2 -m nanoqwen train --resume {out} --device cpu\n" in stdout
    assert re.findall(r"--- step (\d+)", (out / "samples.txt").read_text()) == [str(s) for s in range(1, step + 1)]
    assert train_in_process("--resume", str(out)) == 0
    np.testing.assert_allclose(list(train_losses(out).values()), list(train_losses(single_process_run).values()),
                               rtol=2e-4)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_launchers_environment_keeps_values_that_hold_an_equals_sign(monkeypatch: pytest.MonkeyPatch) -> None:
    # LS_COLORS, MAKEFLAGS and the like hold "=": only the first one ends the name.
    from nanoqwen.distributed import launcher_environment

    launcher = subprocess.Popen([sys.executable, "-c", "print(flush=True); input()"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, env={"OMP_NUM_THREADS": "1", "LS_COLORS": "rs=0:di=01;34"})
    try:
        launcher.stdout.readline()  # (a forked child's environ reads empty until it has started the program)
        monkeypatch.setattr(os, "getppid", lambda: launcher.pid)
        assert launcher_environment() == {"OMP_NUM_THREADS": "1", "LS_COLORS": "rs=0:di=01;34"}
    finally:
        launcher.communicate(b"\n")

def test_torchruns_cpu_processes_share_the_cores_unless_the_user_set_omp_num_threads() -> None:
    # torchrun gives each process OMP_NUM_THREADS=1 where the user set none: 2 processes on 16 cores left 14 idle
    torchrun = {"LOCAL_WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "job", "OMP_NUM_THREADS": "1"}
    assert threads_per_process(torchrun, launcher_env={"PATH": "/bin"}, cores=16) == 8
    assert threads_per_process({**torchrun, "LOCAL_WORLD_SIZE": "4"}, {}, cores=3) == 1  # at least one each
    # the user's own OMP_NUM_THREADS stays: a 1 torchrun started with, any other count, or one that cannot be told
    assert threads_per_process(torchrun, launcher_env={"OMP_NUM_THREADS": "1"}, cores=16) is None
    assert threads_per_process({**torchrun, "OMP_NUM_THREADS": "3"}, launcher_env={}, cores=16) is None
    assert threads_per_process(torchrun, launcher_env=None, cores=16) is None
    # another launcher's OMP_NUM_THREADS=1 (no torchrun job) is the user's own too
    assert threads_per_process({"LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}, launcher_env={}, cores=16) is None
    # a launcher that sets none leaves each process a thread per core: oversubscribed; one process keeps them all
    assert threads_per_process({"LOCAL_WORLD_SIZE": "2"}, launcher_env=None, cores=16) == 8
    assert threads_per_process({**torchrun, "LOCAL_WORLD_SIZE": "1"}, launcher_env={}, cores=16) is None


def test_fsdp_shards_on_the_runs_device_not_the_machines_accelerator(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # fully_shard's default mesh is the machine's accelerator: on a GPU machine a `--device cpu` job (these tests
    # there) had its shards moved to cuda:0 under a gloo group. The machine is made to claim CUDA here.
    import torch.distributed as dist

    from nanoqwen.distributed import DistInfo
    from nanoqwen.train import wrap_model

    monkeypatch.setattr(torch._C, "_get_accelerator", lambda: torch.device("cuda"))
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        model = Qwen3(ModelConfig(**TINY_MODEL, vocab_size=64))
        info = DistInfo(device=torch.device("cpu"), distributed=True)
        wrap_model(model, info, SimpleNamespace(fsdp=True), info.device, compile_model=False)
        assert {(p.device_mesh.device_type, p.device.type) for p in model.parameters()} == {("cpu", "cpu")}
    finally:
        dist.destroy_process_group()


def test_a_run_trained_without_fsdp_resumes_with_it(tmp_path: Path) -> None:
    # A DDP run (a whole model per process) that outgrew its GPUs' memory was refused with --fsdp: its optimizer
    # state is keyed by position, and FSDP's loader wants parameter names. The positions are those names, in order.
    import torch.distributed as dist

    from nanoqwen.checkpoint import load_optimizer_state, optimizer_state
    from nanoqwen.distributed import DistInfo
    from nanoqwen.train import wrap_model

    torch.manual_seed(0)
    config = ModelConfig(**TINY_MODEL, vocab_size=64)
    whole = Qwen3(config)
    trained = build_optimizer(whole, "adamw", 1e-2, 0.1, torch.device("cpu"))
    whole(torch.randint(0, 64, (2, 8))).float().pow(2).mean().backward()
    trained.step()
    saved = trained.state_dict()  # keyed by position, as a run without --fsdp saves it
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        sharded = Qwen3(config)
        sharded.load_state_dict(whole.state_dict())
        info = DistInfo(device=torch.device("cpu"), distributed=True)
        # Stand-ins for the run's args and Run: the two functions read args.fsdp, model and optimizer alone, and a
        # real Run resumed with --fsdp is a torchrun job (a process start and a data set up, for this one load).
        fsdp = SimpleNamespace(fsdp=True)
        wrap_model(sharded, info, fsdp, info.device, compile_model=False)
        run = SimpleNamespace(args=fsdp, model=sharded, out=tmp_path, optimizer=build_optimizer(
            sharded, "adamw", 1e-2, 0.1, torch.device("cpu")))
        load_optimizer_state(run, copy.deepcopy(saved))
        loaded = optimizer_state(run)  # gathered from the shards, keyed by name
    finally:
        dist.destroy_process_group()
    names = [name for name, _ in whole.named_parameters()]
    position = {id(p): i for i, p in enumerate(p for group in trained.param_groups for p in group["params"])}
    assert len(loaded["state"]) == len(saved["state"]) == len(names)
    for name, p in whole.named_parameters():
        for key, value in saved["state"][position[id(p)]].items():
            torch.testing.assert_close(loaded["state"][name][key], value, rtol=0, atol=0)


def test_a_muon_run_resumed_with_fsdp_is_told_to_resume_without_it(tmp_path: Path) -> None:
    # A run resumes across --fsdp now, but not a Muon one (it needs whole matrices): it was told a new run's way,
    # "with --fsdp use --optimizer adamw", which its resume refuses in turn (a resume keeps its optimizer's state).
    from nanoqwen.cli import build_parser
    from nanoqwen.distributed import DistInfo
    from nanoqwen.runs import resumed_run

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"train": dataclasses.asdict(TrainConfig(optimizer="muon")),
                                                 "preset": "tiny", "data": str(tmp_path / "data")}))
    args = build_parser("train").parse_args(["train", "--resume", str(run), "--fsdp"])
    with pytest.raises(NanoQwenError) as refused:  # a job of 2 as torchrun's would be: it is refused before any use
        resumed_run(args, DistInfo(world_size=2, distributed=True))
    assert str(refused.value) == f"{run} trains with muon, which needs whole matrices: resume it without --fsdp (a " \
        f"whole model per process), or start a new run from its weights with --fsdp: --init-from {run / 'last'} " \
        "--optimizer adamw --fsdp"


@pytest.mark.parametrize(("damage", "said"), [("corrupt", "train_state.pt is cut short or damaged"),
                                              ("truncated", "train_state.pt is cut short or damaged"),
                                              ("missing", "train_state.json"),
                                              ("later version", "from a newer nanoqwen (this one reads version 1)"),
                                              ("negative step", "negative counts in train_state.json"),
                                              ("no run config", "config.json is missing"),
                                              ("hand-edited run config", 'lr must be a number, got "fast"')])
def test_broken_training_state_gives_one_clear_line(trained: Path, tmp_path: Path, damage: str, said: str,
                                                   capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")  # the trained run logs to W&B: as subprocess_env() has it
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    state = run / "last/train_state.pt"
    if damage == "corrupt":
        state.write_bytes(b"not a checkpoint")
    elif damage == "truncated":
        state.write_bytes(state.read_bytes()[:100])
    elif damage == "missing":
        (run / "last/train_state.json").unlink()
    elif damage in ("later version", "negative step"):  # by a newer nanoqwen, or a hand edit
        saved = json.loads((run / "last/train_state.json").read_text())
        edit = {"version": saved["version"] + 1} if damage == "later version" else {"step": -1}
        (run / "last/train_state.json").write_text(json.dumps({**saved, **edit}))
    elif damage == "hand-edited run config":  # a string where a number belongs was a TypeError traceback
        saved = json.loads((run / "config.json").read_text())
        (run / "config.json").write_text(json.dumps({**saved, "train": {**saved["train"], "lr": "fast"}}))
    else:
        (run / "config.json").unlink()
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    capsys.readouterr()
    assert train_in_process("--resume", str(run), "--max-steps", "50") == 2  # in this process: a start costs ~4 s
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "cannot resume" in lines[0] and said in lines[0], err
    if damage == "later version":  # what to do: upgrade
        assert lines[0].endswith("upgrade nanoqwen to resume it"), err
    else:  # what to do: the weights are fine
        assert f"--init-from {run / 'last'}" in lines[0], err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"} == before


def test_best_checkpoint_loads_in_transformers_with_equal_logits(trained: Path) -> None:
    pytest.importorskip("transformers")
    from nanoqwen.checkpoint import load_model
    from tests.hf_helpers import load_hf_model

    ours = load_model(trained / "best")
    theirs = load_hf_model(trained / "best", dtype=torch.float32).eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids), rtol=1e-4, atol=1e-4)


# -- starting from a checkpoint's weights ----------------------------------------------------------
def test_train_help_gives_the_defaults_a_run_from_init_from_takes(capsys: pytest.CaptureFixture[str],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # A run from --init-from has no preset: its lr is 3e-5, not the 0.003 that "else" gave as the only default.
    monkeypatch.setenv("COLUMNS", "1000")  # one line a flag: no wrap inside "--init-from"
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    shown = capsys.readouterr().out
    assert "Peak learning rate. (default: the preset's, else 0.003; after --init-from, 3e-05)" in shown
    assert "(default: the preset's, else 1000; after --init-from, 500)" in shown
    assert "(default: the preset's, else unset; after --init-from, 1024 or the context, if shorter)" in shown
    assert "(default: the preset's, else 'adamw')\n" in shown  # the same either way: said once
    # the corpus and tokenizer a run prepares when none is given
    assert "or a local file or folder (default: the preset's, else shakespeare)" in shown
    assert "(default: the preset's, else bpe:2048; after --init-from, the checkpoint's)" in shown


@pytest.mark.parametrize("columns", [40, 1000])
def test_train_and_init_help_list_each_preset_with_what_it_is(capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                             columns: int) -> None:
    # --help gave the presets' names only (a name was found only by giving a wrong one), and every preset file's
    # "description" was read and shown nowhere: it ends --help, one preset a line, each line within the terminal.
    from nanoqwen.config import load_preset, preset_names

    monkeypatch.setenv("COLUMNS", str(columns))
    presets = [load_preset(name) for name in preset_names()]
    assert all(preset.description for preset in presets)
    for command in ("init", "train"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        listing = capsys.readouterr().out.split("\npresets:\n")[1]
        assert max(map(len, listing.splitlines())) <= columns - 2  # argparse's width
        shown = [" ".join(item.split()) for item in re.split(r"\n(?=  \S)", listing)]
        assert shown == [f"{preset.name}: {preset.description}" for preset in presets]
    # and a wrong name is refused with the names, pointing at the list
    assert main(["init", "--preset", "tinny", "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert f"unknown preset 'tinny' (did you mean 'tiny'?); choose one of {', '.join(preset_names())}" in err
    assert "--help says what each is" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("source", ["run", "transformers-bf16"])
def test_init_from_starts_at_the_checkpoint_weights(trained: Path, data: Path, tmp_path: Path, source: str) -> None:
    from safetensors.torch import load_file

    from nanoqwen.checkpoint import read_config, weight_files

    checkpoint = trained / "best"
    if source == "transformers-bf16":  # as official weights come: written by Transformers, in bfloat16
        pytest.importorskip("transformers")
        from tests.hf_helpers import load_hf_model

        model = load_hf_model(checkpoint, dtype=torch.bfloat16)
        checkpoint = tmp_path / "hf"
        model.save_pretrained(checkpoint)
        shutil.copy(trained / "best" / "tokenizer.json", checkpoint / "tokenizer.json")
        # Its own chat template, end token and sampling (a Base model's: greedy), which every checkpoint of a
        # run from it keeps, although the data folder's tokenizer (the same vocabulary) carries nanoqwen's.
        config = json.loads((trained / "best" / "tokenizer_config.json").read_text())
        config.update(chat_template="{{ messages[0]['content'] }}", eos_token="<|endoftext|>")
        (checkpoint / "tokenizer_config.json").write_text(json.dumps(config))
        (checkpoint / "generation_config.json").write_text(json.dumps(
            {"do_sample": False, "eos_token_id": 0, "max_new_tokens": 2048}))
    out = tmp_path / "from-checkpoint"
    # A learning rate of 0 leaves the weights as they were loaded, so last/ must hold the checkpoint's.
    assert train_in_process("--init-from", str(checkpoint), "--data", str(data), "--out", str(out), *FAST,
                            "--lr", "0", "--min-lr", "0", "--max-steps", "2") == 0
    source_weights = {k: v for path in weight_files(checkpoint) for k, v in load_file(path).items()}
    saved = load_file(out / "last/model.safetensors")
    assert saved.keys() == source_weights.keys()
    for key, value in saved.items():
        assert torch.equal(value, source_weights[key].float()), key
    # best/ keeps the source's dtype (bfloat16 for official weights: not twice their size); last/ is float32.
    best = load_file(out / "best/model.safetensors")
    assert {v.dtype for v in best.values()} == {next(iter(source_weights.values())).dtype}
    assert all(torch.equal(best[key], source_weights[key]) for key in best)
    assert dataclasses.replace(read_config(out / "last"), torch_dtype="float32") == \
        dataclasses.replace(read_config(checkpoint), torch_dtype="float32")  # special ids included
    for kept in ("best", "last"):
        config = json.loads((out / kept / "tokenizer_config.json").read_text())
        source_config = json.loads((checkpoint / "tokenizer_config.json").read_text())
        assert (config["chat_template"], config["eos_token"]) == (source_config["chat_template"],
                                                                  source_config["eos_token"])
        assert json.loads((out / kept / "generation_config.json").read_text()) == json.loads(
            (checkpoint / "generation_config.json").read_text())
    first, fresh = train_losses(out)[1], train_losses(trained)[1]
    assert first < fresh - 2, (first, fresh)  # the trained model's loss, not a random one's
    if source == "run":  # the same weights on the same validation windows: the same val loss
        best = json.loads((trained / "last/train_state.json").read_text())["best_val_loss"]
        assert read_metrics(out)[-1]["val_loss"] == pytest.approx(best, rel=1e-6)


def test_init_from_a_folder_without_tokenizer_writes_the_datas_generation_config(trained: Path, data: Path,
                                                                                  tmp_path: Path) -> None:
    # Weights only (no tokenizer files): the run's checkpoints carry the data's tokenizer, so the folder's
    # generation_config.json, whose end ids belong to some other tokenizer, must not come along.
    from nanoqwen.checkpoint import generation_config, read_config

    source = tmp_path / "weights-only"
    shutil.copytree(trained / "best", source)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (source / name).unlink()
    (source / "generation_config.json").write_text(json.dumps({"eos_token_id": [500, 501]}))
    out = tmp_path / "run"
    assert train_in_process("--init-from", str(source), "--data", str(data), "--out", str(out), *FAST,
                            "--max-steps", "1") == 0
    written = json.loads((out / "best" / "generation_config.json").read_text())
    assert written == generation_config(read_config(out / "best"), load_tokenizer(data))
    assert written["eos_token_id"] == load_tokenizer(data).stop_ids


def test_dataset_folders_of_hf_folders_and_text_columns_follow_what_was_read(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # `--dataset hf:FOLDER` (local data files read as a dataset) was named and reused as a hub dataset is: its files
    # edited, the folder of their old text was trained on again. And a named corpus's folder ignored --text-column:
    # a later run without it (or with another) trained on the text of the column an earlier run named, in silence.
    from nanoqwen.runs import prepared_folder

    monkeypatch.chdir(tmp_path)
    (tmp_path / "rows").mkdir()
    (tmp_path / "rows" / "train.jsonl").write_text("".join(
        json.dumps({"text": f"plain {i}", "body": f"body {i}"}) + "\n" for i in range(8)))

    def text_of(folder: Path) -> str:
        return load_tokenizer(folder).decode(np.fromfile(folder / "train.bin", dtype="<u4").tolist())

    plain = prepared_folder("hf:rows", "bpe:300")
    body = prepared_folder("hf:rows", "bpe:300", text_column="body")
    assert "body 1" in text_of(body) and "plain" not in text_of(body)
    assert body != plain and "plain 1" in text_of(prepared_folder("hf:rows", "bpe:300"))  # not body's folder
    (tmp_path / "rows" / "train.jsonl").write_text("".join(json.dumps({"text": f"edited {i}"}) + "\n"
                                                           for i in range(8)))
    edited = prepared_folder("hf:rows", "bpe:300")
    assert "edited 1" in text_of(edited) and edited != plain and "plain 1" in text_of(plain)


def test_dataset_folders_of_tokenizers_of_other_chat_templates_are_apart(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # Two checkpoints named alike (runs/x/best, runs/y/best) of one vocabulary, one with a chat template of its own:
    # their data folder was one name, so preparing the chats for the second replaced the first's, and a run trained
    # on the first's no longer resumed (its tokens differ).
    from nanoqwen.runs import prepared_folder, tokenizer_slug
    from nanoqwen.tokenizer import train_bpe

    monkeypatch.chdir(tmp_path)
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"what is {i}?"}, {"role": "assistant", "content": f"it is {i}."}]}) + "\n"
        for i in range(8)))
    tokenizer = train_bpe(["what is it? it is."], 300)
    for run in ("x", "y"):
        (tmp_path / run / "best").mkdir(parents=True)
        tokenizer.save(tmp_path / run / "best")
    config = tmp_path / "y" / "best" / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "chat_template": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + ' said\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}")}))
    first = prepared_folder("chats.jsonl", "x/best")
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    second = prepared_folder("chats.jsonl", "y/best")
    assert second != first and {p.name: p.read_bytes() for p in first.iterdir()} == before
    assert "user said" in load_tokenizer(second).decode(np.fromfile(second / "train.bin", dtype="<u4").tolist())
    # A damaged folder is one line before "preparing ..." is printed, as it was when its vocabulary named it.
    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / "tokenizer.json").write_text('{"broken')
    with pytest.raises(NanoQwenError, match="the tokenizer in damaged is damaged"):
        tokenizer_slug("damaged")


def test_init_from_takes_the_fine_tuning_defaults_in_place_of_a_presets(tmp_path: Path) -> None:
    # The defaults --help promises after --init-from (3e-5, AdamW, 500 steps, 1,024 tokens or the context): without
    # them, a fine-tune ran on TrainConfig's own (a rate 100x higher, that undoes what the weights know).
    from nanoqwen.checkpoint import save_checkpoint
    from nanoqwen.runs import checkpoint_preset

    for context, seq_len in ((4096, 1024), (256, 256)):
        folder = tmp_path / str(context)
        save_checkpoint(Qwen3(ModelConfig(vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                          max_position_embeddings=context)), folder, None)
        train = checkpoint_preset(folder, []).train
        assert {key: train.get(key) for key in ("optimizer", "lr", "warmup", "max_steps", "batch_size", "seq_len",
                                                "eval_interval", "save_interval", "sample_interval")} == \
            {"optimizer": "adamw", "lr": 3e-5, "warmup": 20, "max_steps": 500, "batch_size": 16, "seq_len": seq_len,
             "eval_interval": 50, "save_interval": 250, "sample_interval": 250}


def test_a_hugging_face_cache_snapshot_is_named_after_its_model(tmp_path: Path) -> None:
    # `--init-from ~/.cache/huggingface/hub/models--Qwen--Qwen3-0.6B/snapshots/HASH` named the run and its data
    # folder after the 40-character hash.
    from nanoqwen.checkpoint import display_name, save_checkpoint
    from nanoqwen.runs import checkpoint_preset, slug

    snapshot = tmp_path / "hub" / "models--Qwen--Qwen3-0.6B" / "snapshots" / ("0123abcd" * 5)
    snapshot.mkdir(parents=True)
    assert slug(str(snapshot)) == "Qwen3-0.6B"
    tiny = ModelConfig(vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    save_checkpoint(Qwen3(tiny), snapshot, None)  # weights alone, as downloaded
    assert checkpoint_preset(snapshot, []).name == "Qwen3-0.6B"  # the run's name: runs/Qwen3-0.6B-TIME
    assert display_name(snapshot) == "Qwen3-0.6B"  # sample, chat and serve's name for it (the API's model id)
    (tmp_path / "snapshots" / "v1").mkdir(parents=True)  # a folder of the user's that is no cache
    assert slug(str(tmp_path / "snapshots" / "v1")) == "v1" and slug("hf:ORG/NAME") == "hf-ORG-NAME"


def test_init_from_prepares_the_dataset_with_the_checkpoints_tokenizer(trained: Path, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from nanoqwen.tokenizer import load_tokenizer

    monkeypatch.chdir(tmp_path)
    write_corpus(tmp_path / "texts", documents=6, seed=1)  # new text in the same words
    assert train_in_process("--init-from", str(trained / "best"), "--dataset", "texts", "--out", "tuned", *FAST,
                            "--lr", "3e-3", "--max-steps", "20") == 0
    from nanoqwen.data.prepare import tokenizer_identity

    fingerprint = load_tokenizer(trained / "best").fingerprint
    (prepared,) = (tmp_path / "data").iterdir()
    # Named after the tokenizer (its vocabulary, config and chat template), not only its folder (every run's is best/).
    identity = tokenizer_identity(str(trained / "best")).removeprefix("sha256:")
    assert prepared.name.startswith("texts-") and prepared.name.endswith(f"-best-{identity[:8]}")
    assert load_tokenizer(prepared).fingerprint == fingerprint
    losses = train_losses(tmp_path / "tuned")
    assert losses[1] < train_losses(trained)[1] - 2  # starts where the checkpoint is
    assert np.mean([losses[s] for s in range(16, 21)]) < losses[1] - 0.2  # and learns the new text


@pytest.mark.parametrize("problem", ["other-tokenizer", "no-tokenizer", "bpe", "reshape", "tokenizer-folder",
                                     "missing-shard", "cut-short", "fewer-layers", "other-width"])
def test_init_from_refuses_data_the_checkpoint_cannot_read(trained: Path, tmp_path: Path, problem: str,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    from nanoqwen.data.prepare import prepare

    monkeypatch.chdir(tmp_path)
    corpus = write_corpus(tmp_path / "texts", documents=4)
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(trained / "best", checkpoint)
    if problem == "other-tokenizer":
        other = prepare(str(corpus), "bpe:280", tmp_path / "other", val_fraction=0.15, progress=False)
        given = ["--data", str(other)]
        expected = "different tokenizer"
    elif problem == "no-tokenizer":
        (checkpoint / "tokenizer.json").unlink()
        given = ["--dataset", "texts"]
        expected = "no tokenizer.json"
    elif problem == "bpe":  # refused before the corpus is prepared (it was prepared first, then refused)
        given = ["--dataset", "texts", "--tokenizer", "bpe:280"]
        expected = "would train a new tokenizer"
    elif problem == "tokenizer-folder":  # another tokenizer's folder: refused before the corpus is prepared too
        other = prepare(str(corpus), "bpe:280", tmp_path / "other", val_fraction=0.15, progress=False)
        given = ["--dataset", "texts", "--tokenizer", str(other)]
        expected = "leave --tokenizer out"
    elif problem == "missing-shard":  # an interrupted download: said before the corpus is prepared
        (checkpoint / "model.safetensors").unlink()
        (checkpoint / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}))
        given = ["--dataset", "texts"]
        expected = "lacks model-00001-of-00002.safetensors"
    elif problem == "cut-short":  # a weights file cut off (a disk filled up): its header says so, at once
        weights = checkpoint / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-100])
        given = ["--dataset", "texts"]
        expected = "is damaged or cut short"
    elif problem in ("fewer-layers", "other-width"):  # config.json of another model size: read from the headers
        config = json.loads((checkpoint / "config.json").read_text())
        field, value = ("num_hidden_layers", 1) if problem == "fewer-layers" else ("intermediate_size", 96)
        (checkpoint / "config.json").write_text(json.dumps({**config, field: value}))
        given = ["--dataset", "texts"]
        expected = "does not match its config.json: it holds 11 weights that fit nowhere in it (model.layers.1." \
            if problem == "fewer-layers" else "has shape"
    else:  # likewise weights that could not load into the model --set asks for
        given = ["--dataset", "texts", "--set", "num_hidden_layers=3", "--set", "rope_theta=5e5"]
        expected = "--set num_hidden_layers would change the shapes"
    assert train_in_process("--init-from", str(checkpoint), *given, "--out", "run", *FAST) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and expected in err, err
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()


def test_a_broken_generation_config_to_start_from_is_warned_about_by_one_process(trained: Path, data: Path,
                                                                                 tmp_path: Path,
                                                                                 capsys: pytest.CaptureFixture[str]
                                                                                 ) -> None:
    # Every torchrun process reads the folder a run starts from: each one warned, N lines of one problem.
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(trained / "best", checkpoint)
    (checkpoint / "generation_config.json").write_text("[0.7]")
    capsys.readouterr()
    assert carried_files(data, checkpoint, warn=False)[1] is None and capsys.readouterr().err == ""
    assert carried_files(data, checkpoint)[1] is None
    assert capsys.readouterr().err == f"nanoqwen: warning: {checkpoint / 'generation_config.json'} is not a JSON " \
        "object; ignored (end ids from config.json, default sampling settings): fix or remove it\n"


def test_init_from_a_checkpoint_inside_out_is_refused_before_the_run_deletes_it(trained: Path, data: Path,
                                                                                 tmp_path: Path,
                                                                                 capsys: pytest.CaptureFixture[str]
                                                                                 ) -> None:
    # A run stopped before its first save of last/ keeps a best/; a new run into that folder starts by deleting
    # best/, which here was the weights it starts from: they were gone for good if it, too, stopped early.
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    shutil.rmtree(run / "last")
    before = (run / "best" / "model.safetensors").read_bytes()
    assert train_in_process("--init-from", str(run / "best"), "--data", str(data), "--out", str(run), *FAST,
                            "--max-steps", "1") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"--init-from {run / 'best'} is inside --out {run}" in err, err
    assert (run / "best" / "model.safetensors").read_bytes() == before and not (run / "last").exists()


def test_a_run_folder_given_as_a_checkpoint_names_its_checkpoints(trained: Path, tmp_path: Path) -> None:
    from nanoqwen.checkpoint import load_checkpoint, load_model

    with pytest.raises(NanoQwenError, match="is a run folder; give one of its checkpoints"):
        load_model(trained)  # as `sample --model runs/NAME` or `train --init-from runs/NAME` would
    # A run still before its first evaluation, or killed there, has its config.json alone: it was refused as a model
    # of "model_type null", as if it were another architecture's.
    early = tmp_path / "early"
    early.mkdir()
    shutil.copy(trained / "config.json", early / "config.json")
    with pytest.raises(NanoQwenError) as refused:
        load_checkpoint(early)
    assert str(refused.value) == (f"{early} is a run folder with no checkpoint yet: a run writes {early / 'best'} at "
                                  f"its first evaluation and {early / 'last'} at its first save; give one of them "
                                  "once it has (a run stopped before then saved none)")
    shutil.copytree(trained / "last", early / "last")  # killed after its first save of last/, before any best/
    with pytest.raises(NanoQwenError) as refused:
        load_checkpoint(early)
    assert str(refused.value) == f"{early} is a run folder; give its checkpoint {early / 'last'} (its only one, " \
                                 "the latest)"


def test_a_data_folder_given_as_a_checkpoint_says_how_to_train_on_it(data: Path) -> None:
    from nanoqwen.checkpoint import load_model

    with pytest.raises(NanoQwenError, match=f"is a prepared data folder, not a model; .* --data {data}"):
        load_model(data)  # as `chat --model data/NAME` would


def test_a_new_run_never_writes_into_a_checkpoint_data_or_a_file(trained: Path, data: Path, preset: Path,
                                                                 tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "exp" / "best").mkdir(parents=True)  # a folder of the user's that has a best/: not a run
    (tmp_path / "exp" / "best" / "pytorch_model.bin").write_text("precious")
    for target, expected in [(trained / "best", "model.safetensors"), (data, "meta.json"),
                             (tmp_path / "notes.txt", "is a file"), (tmp_path / "exp", "(best; no config.json)")]:
        before = sorted((p.relative_to(target), p.read_bytes()) for p in target.rglob("*") if p.is_file()) \
            if target.is_dir() else target.read_bytes()
        assert train_in_process(*common(data, preset, target), "--max-steps", "1") == 2
        err = capsys.readouterr().err.strip()
        assert expected in err and "\n" not in err, err
        after = sorted((p.relative_to(target), p.read_bytes()) for p in target.rglob("*") if p.is_file()) \
            if target.is_dir() else target.read_bytes()
        assert after == before


def test_dataset_folders_follow_the_files_they_were_made_from(preset: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    # Two corpora of the same name in different places, and a corpus edited between runs, each get data
    # of their own text (the name alone once picked an earlier corpus's folder, silently).
    monkeypatch.chdir(tmp_path)
    for place, word in [("a", "apple"), ("b", "zebra")]:
        (tmp_path / place).mkdir()
        (tmp_path / place / "corpus.jsonl").write_text(
            "".join(json.dumps({"body": f"the {word} {i} is here."}) + "\n" for i in range(40)))
    args = [*FAST, "--config", str(preset), "--tokenizer", "bpe:300", "--text-column", "body", "--max-steps", "1"]
    for place in ("a", "b"):
        assert train_in_process(*args, "--dataset", f"{place}/corpus.jsonl", "--out", f"runs/{place}") == 0
    folders = {place: Path(json.loads((tmp_path / f"runs/{place}/config.json").read_text())["data"])
               for place in ("a", "b")}
    assert folders["a"] != folders["b"]
    for place, word in [("a", "apple"), ("b", "zebra")]:
        assert json.loads((folders[place] / "meta.json").read_text())["source"] == f"{place}/corpus.jsonl"
        tokenizer = load_tokenizer(folders[place])
        assert word in tokenizer.decode(np.fromfile(folders[place] / "train.bin", dtype="<u4").tolist())
    (tmp_path / "a" / "corpus.jsonl").write_text(
        "".join(json.dumps({"body": f"the lemon {i} is here."}) + "\n" for i in range(40)))
    before = {p.name: p.read_bytes() for p in folders["a"].iterdir()}
    assert train_in_process(*args, "--dataset", "a/corpus.jsonl", "--out", "runs/a2") == 0
    edited = Path(json.loads((tmp_path / "runs/a2/config.json").read_text())["data"])
    text = load_tokenizer(edited).decode(np.fromfile(edited / "train.bin", dtype="<u4").tolist())
    assert "apple" not in text and "lemon" in text
    # The edited text went to a folder of its own: runs/a's data is as it was, so runs/a still resumes.
    assert edited != folders["a"] and {p.name: p.read_bytes() for p in folders["a"].iterdir()} == before
    assert train_in_process("--resume", "runs/a", "--max-steps", "2") == 0
    # Unchanged files: the same folder again, not prepared anew.
    assert train_in_process(*args, "--dataset", "a/corpus.jsonl", "--out", "runs/a3") == 0
    assert Path(json.loads((tmp_path / "runs/a3/config.json").read_text())["data"]) == edited
    # A run's data folder deleted (only a --data folder can have moved): the line says how to prepare it again,
    # and the same text prepared alike resumes.
    shutil.rmtree(folders["b"])
    capsys.readouterr()
    assert train_in_process("--resume", "runs/b", "--max-steps", "2") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "prepare it again: nanoqwen prepare " in err, err
    assert main(shlex.split(err.split("prepare it again: ")[1].split(";")[0])[1:]) == 0
    assert train_in_process("--resume", "runs/b", "--max-steps", "2") == 0


def test_eval_of_the_runs_val_windows_reproduces_its_val_metrics(trained: Path, data: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    # The run scores a fixed prefix of val.bin (--eval-windows of --seq-len); eval scores the same prefix with
    # --max-windows, and both divide by the bytes of that prefix's text (once prorated from the whole split).
    last = read_metrics(trained)[-1]
    assert main(["eval", "--model", str(trained / "last"), "--data", str(data), "--max-windows", "4",
                 "--context", "32", "--device", "cpu", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["loss"] == pytest.approx(last["val_loss"], rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(last["val_bpb"], rel=1e-5)
    # A model that diverged: its perplexity (e^loss, beyond a million) in scientific notation, not in dozens of digits
    model = load_model(trained / "last")
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    save_checkpoint(model, tmp_path / "diverged", load_tokenizer(trained / "last"))
    assert main(["eval", "--model", str(tmp_path / "diverged"), "--data", str(data), "--max-windows", "1",
                 "--context", "32", "--device", "cpu"]) == 0
    printed = dict(line.strip().split(": ") for line in capsys.readouterr().out.strip().splitlines()[-5:])
    assert float(printed["loss"]) > math.log(1e6) and re.fullmatch(r"\d\.\d{4}e\+\d+", printed["perplexity"])
    assert float(printed["perplexity"]) == pytest.approx(math.exp(float(printed["loss"])), rel=1e-3)


def test_plot_of_a_missing_run_names_what_is_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plot", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.strip() == (f"nanoqwen plot: error: {tmp_path / 'nope'} does not exist; give a "
                                               "run folder written by `nanoqwen train`")
    assert main(["plot", str(tmp_path)]) == 2  # a folder, but no run's
    assert f"{tmp_path / 'metrics.jsonl'} does not exist" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train_loss": 5.0}\n')  # the file, not its run folder
    assert main(["plot", str(tmp_path / "metrics.jsonl")]) == 2
    assert capsys.readouterr().err.strip() == (f"nanoqwen plot: error: {tmp_path / 'metrics.jsonl'} is a file; give "
                                               f"the run folder that holds it ({tmp_path})")
    (tmp_path / "best").mkdir()  # a checkpoint of the run, as sample and chat take: the run is the folder above
    assert main(["plot", str(tmp_path / "best")]) == 2
    assert capsys.readouterr().err.strip() == (f"nanoqwen plot: error: {tmp_path / 'best'} is inside a run folder; "
                                               f"give the run folder ({tmp_path}), which holds metrics.jsonl")
    # A last record cut short (being written, or its run killed) is left out; a whole line that is not JSON is not.
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train_loss": 5.0}\n{"step": 2, "tra')
    assert read_metrics_lenient(tmp_path) == [{"step": 1, "train_loss": 5.0}]
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train_loss": 5.0}\n{"step": 2, "tra\n')
    with pytest.raises(NanoQwenError, match=r"metrics.jsonl:2 is not JSON"):
        read_metrics_lenient(tmp_path)


def test_plot_compares_runs_by_step_tokens_or_time(trained: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    import matplotlib.pyplot as plt

    from nanoqwen.plot import loss_curves, loss_figure, smooth, smoothing_for

    records = read_metrics(trained)
    runs = tmp_path / "runs"
    # b: as if twice the batch (tokens) on a machine three times slower, its losses 0.5 lower
    b_records = [{**r, "tokens": 2 * r["tokens"], "elapsed_s": 3 * r["elapsed_s"],
                  **{k: r[k] - 0.5 for k in ("train_loss", "val_loss") if k in r}} for r in records]
    for name, run_records in [("a", records), ("b", b_records)]:
        (runs / name).mkdir(parents=True)
        (runs / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in run_records))
    assert main(["plot", str(runs / "a"), str(runs / "b"), "--x", "tokens"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {runs / 'compare.png'}"  # beside the runs it compares
    assert (runs / "compare.png").stat().st_size > 10_000
    val = [r for r in records if "val_loss" in r]
    b_train, b_val = loss_curves(b_records, "tokens")
    assert b_train == [(2 * r["tokens"], r["train_loss"] - 0.5) for r in records]
    np.testing.assert_allclose(loss_curves(b_records, "minutes")[1],
                               [(3 * r["elapsed_s"] / 60, r["val_loss"] - 0.5) for r in val])
    a_train, a_val = loss_curves(records, "tokens")
    fig = loss_figure(["a", "b"], [(a_train, a_val), (b_train, b_val)], "tokens")
    lines = fig.axes[0].get_lines()
    best = min(r["val_loss"] for r in val)
    assert [line.get_label() for line in lines] == ["a train", f"a val (best {best:.3f})", "b train",
                                                    f"b val (best {best - 0.5:.3f})"]
    np.testing.assert_allclose(lines[2].get_ydata(), smooth([y for _, y in b_train], smoothing_for(len(b_train))))
    np.testing.assert_allclose(lines[3].get_xydata(), b_val)
    assert fig.axes[0].get_xlabel() == "tokens seen"
    plt.close(fig)
    assert main(["plot", str(runs / "a"), str(runs / "b"), "--out", str(tmp_path / "by-step.svg")]) == 0
    assert (tmp_path / "by-step.svg").read_text().startswith("<?xml")


def test_plot_refuses_a_run_given_twice_or_without_the_x_asked_for(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    old, new = tmp_path / "runs/old", tmp_path / "runs/new"
    for run, extra in [(old, {}), (new, {"tokens": 4096, "elapsed_s": 1.5})]:  # an older run: no tokens, no time
        run.mkdir(parents=True)
        (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "train_loss": 5.0, "val_loss": 5.1, **extra}) + "\n")
    for x, key in [("tokens", "tokens"), ("minutes", "elapsed_s")]:
        assert main(["plot", str(new), str(old), "--x", x]) == 2
        assert capsys.readouterr().err.strip() == (f"nanoqwen plot: error: {old / 'metrics.jsonl'} has no {key} "
                                                   "(written by an older nanoqwen); plot it against the step: --x step")
    assert main(["plot", str(new), str(old)]) == 0 and (tmp_path / "runs/compare.png").exists()  # by step it can
    assert main(["plot", str(new), "--out", str(tmp_path)]) == 0 and (tmp_path / "loss.png").exists()  # into a folder
    capsys.readouterr()
    assert main(["plot", str(new), f"{tmp_path}/runs/./new/"]) == 2  # the same run, spelled otherwise
    assert capsys.readouterr().err.strip() == f"nanoqwen plot: error: {new} is given twice; give each run once"
    assert not (new / "compare.png").exists()


def test_the_plotted_train_curve_follows_a_short_runs_falling_loss() -> None:
    from nanoqwen.plot import smooth, smoothing_for

    falling = [10.0 - i for i in range(10)]
    assert smooth(falling, smoothing_for(len(falling))) == falling  # ten records: nothing to average over
    noisy = [5.0 + (-1) ** i for i in range(400)]
    smoothed = smooth(noisy, smoothing_for(len(noisy)))
    assert smoothing_for(400) == 0.9 and max(abs(v - 5.0) for v in smoothed[100:]) < 0.06
    assert smoothing_for(100) == pytest.approx(0.8)  # a window of a twentieth of the run: 5 records
    assert smooth([4.0] * 5, 0.9) == pytest.approx([4.0] * 5)  # bias-corrected: no climb from 0 at the start


def test_compared_runs_are_smoothed_alike() -> None:
    # Each run's curve was smoothed over a twentieth of its own length: a run stopped early, drawn beside a longer
    # one with the very same first steps, ran ahead of it, as if it had learned faster.
    import matplotlib.pyplot as plt

    from nanoqwen.plot import loss_figure, smooth, smoothing_for

    long = [(step, 8.0 - step / 100 + 0.3 * (-1) ** step) for step in range(1, 401)]
    fig = loss_figure(["long", "short"], [(long, []), (long[:40], [])], "step")
    long_line, short_line = fig.axes[0].get_lines()
    np.testing.assert_array_equal(short_line.get_ydata(), long_line.get_ydata()[:40])
    # over the longest run's window (the short one's, a window of 2 records, left the long curve as noisy as its losses)
    np.testing.assert_allclose(long_line.get_ydata(), smooth([loss for _, loss in long], smoothing_for(400)))
    plt.close(fig)


def test_many_compared_runs_stay_apart_and_runs_far_apart_are_compared_here(tmp_path: Path) -> None:
    # From the eleventh run on, colors came round with the same line style: two runs drawn alike.
    import matplotlib.pyplot as plt

    from nanoqwen.plot import common_folder, loss_figure

    curve = [(step, 5.0 - step / 10) for step in range(1, 4)]
    fig = loss_figure([f"r{i}" for i in range(12)], [(curve, curve)] * 12, "step")
    looks = [(line.get_color(), line.get_linestyle(), line.get_marker()) for line in fig.axes[0].get_lines()]
    assert len(set(looks)) == len(looks) == 24, looks
    plt.close(fig)
    # Runs that only / holds: compare.png went to /compare.png (permission denied); it goes here instead.
    assert common_folder([Path("/tmp/a/r1"), Path("/srv/r2")]) == Path(".")
    assert common_folder([tmp_path / "runs/a", tmp_path / "runs/b"]) == tmp_path / "runs"


def test_compared_runs_are_named_by_their_folders_or_by_their_paths_where_those_are_alike(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import nanoqwen.plot as plot

    drawn: list[list[str]] = []
    draw = plot.loss_figure
    monkeypatch.setattr(plot, "loss_figure", lambda names, curves, x: drawn.append(names) or draw(names, curves, x))
    for run in ("a/x", "b/x", "b/y"):
        (tmp_path / run).mkdir(parents=True)
        (tmp_path / run / "metrics.jsonl").write_text('{"step": 1, "train_loss": 5.0}\n')
    plot.plot_runs([tmp_path / "a/x", tmp_path / "b/y"])
    plot.plot_runs([tmp_path / "a/x", tmp_path / "b/x"])  # two runs named x: a legend of "x train" twice
    assert drawn == [["x", "y"], [str(tmp_path / "a/x"), str(tmp_path / "b/x")]]

def test_plot_leaves_out_losses_that_are_not_finite() -> None:
    # metrics.jsonl from before json_line wrote null (or from another tool) holds NaN and Infinity, which
    # json.loads reads as floats: one NaN made the rest of the smoothed train curve NaN (drawn as nothing) and
    # could be marked "best nan".
    import matplotlib.pyplot as plt

    from nanoqwen.plot import loss_curves, loss_figure

    lines = ['{"step": 1, "train_loss": 5.0, "val_loss": NaN, "tokens": 8}',
             '{"step": 2, "train_loss": NaN, "tokens": 16}', '{"step": 3, "train_loss": Infinity, "tokens": NaN}',
             '{"step": 4, "train_loss": 4.0, "val_loss": 4.5, "tokens": 32}',
             '{"step": 5, "val_loss": 4.7, "tokens": 40}']  # not the best: that is step 4's
    records = [json.loads(line) for line in lines]
    train, val = loss_curves(records)
    assert train == [(1, 5.0), (4, 4.0)] and val == [(4, 4.5), (5, 4.7)]
    assert loss_curves(records, "tokens") == ([(8, 5.0), (32, 4.0)], [(32, 4.5), (40, 4.7)])
    fig = loss_figure(["r"], [(train, val)], "step")
    assert all(np.isfinite(line.get_ydata()).all() for line in fig.axes[0].get_lines())
    assert fig.axes[0].get_lines()[-1].get_xydata().tolist() == [[4, 4.5], [5, 4.7]]  # val drawn at its steps
    assert [t.get_text() for t in fig.axes[0].texts] == ["best 4.500"]
    plt.close(fig)


def test_plot_draws_only_records_of_a_step() -> None:
    # Records without a whole-number step (another tool's, a hand-edited line, a JSON value that is no object) are no
    # point of a curve, whatever its x-axis: against tokens or time they were drawn where the step's were.
    from nanoqwen.plot import loss_curves

    records = [{"step": "1", "tokens": 8, "train_loss": 5.0}, {"tokens": 16, "train_loss": 4.5, "val_loss": 4.6},
               {"step": 2.0, "tokens": 20, "train_loss": 4.2}, [3, 4.0],
               {"step": 3, "tokens": 24, "elapsed_s": 60.0, "train_loss": 4.0, "val_loss": 4.1}]
    for x, at in (("step", 3), ("tokens", 24), ("minutes", 1.0)):
        assert loss_curves(records, x) == ([(at, 4.0)], [(at, 4.1)]), x

def test_resume_after_a_record_cut_short(data: Path, preset: Path, tmp_path: Path) -> None:
    # A run killed while writing a metrics line leaves half a line: resume and plot take the whole ones.
    out = tmp_path / "cut"
    assert train_in_process(*common(data, preset, out), "--max-steps", "3", "--save-interval", "2") == 0
    metrics = out / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 4, "train_lo')
    assert [r["step"] for r in read_metrics_lenient(out)] == [1, 2, 3]
    assert train_in_process("--resume", str(out), "--max-steps", "5") == 0
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4, 5]
    # tokens and training time go on from the saved state's (a plot against them draws one unbroken curve)
    assert [r["tokens"] for r in read_metrics(out)] == [step * 8 * 32 for step in range(1, 6)]
    elapsed = [r["elapsed_s"] for r in read_metrics(out)]
    assert elapsed == sorted(elapsed) and elapsed[3] > elapsed[2] > 0, elapsed
    # Records that are not a step's (odd lines written by hand) are left out of the plot; no losses at all is
    # one line.
    with (out / "metrics.jsonl").open("a") as f:
        f.write('5\n{"train_loss": 3}\n{"step": 6, "train_loss": null}\n{"step": 7, "train_loss": "abc"}\n'
                '{"step": "abc"}\n')
    assert main(["plot", str(out)]) == 0
    truncate_metrics(out, 6)  # as a resume from step 6 does: they stay, but for step 7's (a TypeError before)
    assert read_metrics_lenient(out)[-4:] == [5, {"train_loss": 3}, {"step": 6, "train_loss": None}, {"step": "abc"}]
    (out / "metrics.jsonl").write_text("")
    assert main(["plot", str(out)]) == 2


def test_a_schedule_fitted_to_time_that_never_binds_stops_at_max_steps(data: Path, preset: Path, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r"
    assert train_in_process(*common(data, preset, out), "--max-steps", "8", "--schedule", "wsd",
                            "--fit-to-time", "--max-minutes", "30") == 0
    printed = capsys.readouterr().out
    assert "(max_steps)" in printed and "all of --max-steps fit" in printed
    # As a run whose time fitted 8 of its 10 steps: what trains it further is more time, its schedule fitted anew
    # (a plain resume, which keeps the fitted length, has no step left).
    for path in (out / "config.json", out / "last/train_state.json"):
        saved = json.loads(path.read_text())
        saved["train"]["max_steps"] = 10
        path.write_text(json.dumps(saved))
    assert train_in_process("--resume", str(out)) == 2
    err = capsys.readouterr().err.strip()
    assert "has done all 8 of its steps that fit in --max-minutes 30" in err and "give --max-minutes" in err, err
    assert "\n" not in err
    assert train_in_process("--resume", str(out), "--max-minutes", "30") == 0
    assert read_metrics(out)[-1]["step"] == 10


def test_a_killed_run_resumes_as_it_was_left(data: Path, preset: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
                                             ) -> None:
    # A run stopped by SIGKILL keeps what it had: samples taken after its last save are dropped with the
    # metrics; a last/ that a save moved aside just before dying comes back; bf16 autocast stays on.
    import nanoqwen.checkpoint

    written: list[Path] = []  # where the weights go: a kill mid-save leaves that folder, which must be cleaned up
    save_file = nanoqwen.checkpoint.save_file
    monkeypatch.setattr(nanoqwen.checkpoint, "save_file",
                        lambda tensors, path, **kw: (written.append(Path(path)), save_file(tensors, path, **kw)))
    out = tmp_path / "run"
    # A reader of last/ or best/ (sample, serve, a copy) while the run saves finds a whole folder, never none: a
    # save swaps the new one in for the old in one step (it moved the old away first, then the new in).
    missing: list[str] = []
    rename = os.rename

    def rename_and_look(source: Any, target: Any) -> None:
        there = [name for name in ("last", "best") if (out / name).is_dir()]
        rename(source, target)
        missing.extend(name for name in there if not (out / name).is_dir())

    with monkeypatch.context() as patched:
        patched.setattr(os, "rename", rename_and_look)
        assert train_in_process(*common(data, preset, out), "--max-steps", "4", "--save-interval", "2",
                                "--sample-interval", "1", "--dtype", "bfloat16", "--eval-interval", "2") == 0
    assert written and missing == []
    assert checkpoint_step(out / "last") == checkpoint_step(out / "best") == 4  # each replaced at step 4
    for folder in (path.parent for path in written):  # one temporary folder beside last/ or best/, never nested
        assert folder.parent == out and re.fullmatch(r"\.(last|best)\.tmp-\d+-[^.]+", folder.name), folder
    last = out / "last"
    for step in (5, 6):  # what a run killed after step 6, saved at 4, would have left
        with (out / "samples.txt").open("a") as f:
            f.write(f"--- step {step}\nlost text\n\n")
    last.rename(out / f".last.old-{dead_pid()}")  # killed between atomic_dir's two renames
    assert train_in_process("--resume", str(out), "--max-steps", "6") == 0
    assert "(bfloat16, 1 thread)" in capsys.readouterr().out  # the run's dtype, not the device's default
    steps = re.findall(r"(?m)^--- step (\d+)$", (out / "samples.txt").read_text())
    assert steps == ["1", "2", "3", "4", "5", "6"] and "lost text" not in (out / "samples.txt").read_text()
    assert json.loads((last / "train_state.json").read_text())["step"] == 6
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".last")) == []
    # A new run in a folder whose run died before its first save of last/ keeps none of that run's samples.
    shutil.rmtree(last)
    assert train_in_process(*common(data, preset, out), "--max-steps", "2", "--sample-interval", "1") == 0
    assert re.findall(r"(?m)^--- step (\d+)$", (out / "samples.txt").read_text()) == ["1", "2"]


def test_a_best_written_after_the_last_save_is_not_kept_by_a_resume(data: Path, preset: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    # Killed after best/ took a step later than last/: the resume replays those steps (perhaps with other
    # settings), so best/ held a model from outside the run's history while its state named an older best.
    out = tmp_path / "run"
    args = [*common(data, preset, out), "--eval-interval", "1"]
    assert train_in_process(*args, "--max-steps", "2") == 0
    shutil.copytree(out / "last", tmp_path / "last-at-2")
    assert train_in_process("--resume", str(out), "--max-steps", "4") == 0
    assert checkpoint_step(out / "best") == 4 and checkpoint_step(out / "last") == 4
    # A best/ of the same step as last/ is the run's own: a resume keeps it, and the loss it is best by; even
    # one that a save of best/ had moved aside when it was killed (between atomic_dir's two renames).
    kept = tmp_path / "kept"
    shutil.copytree(out, kept)
    (kept / "best").rename(kept / f".best.old-{dead_pid()}")
    capsys.readouterr()
    assert train_in_process("--resume", str(kept), "--max-steps", "5", "--lr", "0") == 0
    assert "removed" not in capsys.readouterr().out
    assert json.loads((kept / "last/train_state.json").read_text())["best_step"] == checkpoint_step(kept / "best") == 4
    assert not [p.name for p in kept.iterdir() if p.name.startswith(".best")]
    shutil.rmtree(out / "last")
    shutil.copytree(tmp_path / "last-at-2", out / "last")  # as if killed at step 4, after its eval, before its save
    capsys.readouterr()
    assert train_in_process("--resume", str(out), "--max-steps", "3", "--lr", "0") == 0
    assert f"removed {out / 'best'}: it held step 4, after last/'s step 2" in capsys.readouterr().out
    state = json.loads((out / "last/train_state.json").read_text())
    assert checkpoint_step(out / "best") == state["best_step"] == 3  # the next evaluation wrote it again


def test_the_data_digest_reads_fixed_slices_of_a_large_split(tmp_path: Path) -> None:
    # GBs of data are told apart by a few slices: a change in one (the first, one in the middle, the last) or in
    # the size shows; the rest of the file is not read.
    size = 4 * DIGEST_SLICES * DIGEST_SLICE_BYTES
    (tmp_path / "train.bin").write_bytes(bytes(size))
    (tmp_path / "val.bin").write_bytes(bytes(8))
    digests = {data_digest(tmp_path)}
    step = (size - DIGEST_SLICE_BYTES) // (DIGEST_SLICES - 1)
    for where in (0, 7 * step + 5, size - 1):
        with (tmp_path / "train.bin").open("r+b") as f:
            f.seek(where)
            f.write(b"\1")
        digests.add(data_digest(tmp_path))
    (tmp_path / "val.bin").write_bytes(bytes(12))
    digests.add(data_digest(tmp_path))
    assert len(digests) == 5


def test_resume_refuses_data_prepared_again_with_another_tokenizer(data: Path, preset: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    # `train --dataset DIR` prepares DIR's folder again when its files change (with a BPE trained anew): a
    # run made from the old folder must not go on reading ids that now mean other tokens.
    from nanoqwen.data.prepare import prepare

    shared = tmp_path / "shared"
    shutil.copytree(data, shared)
    out = tmp_path / "run"
    assert train_in_process(*common(shared, preset, out), "--max-steps", "2") == 0
    before = (out / "config.json").read_bytes()
    shutil.rmtree(shared)
    prepare(str(write_corpus(tmp_path / "more", documents=30)), "bpe:290", shared, val_fraction=0.15, progress=False)
    capsys.readouterr()
    assert train_in_process("--resume", str(out), "--max-steps", "4") == 2
    err = capsys.readouterr().err.strip()
    assert "prepared again with another tokenizer" in err and f"--init-from {out / 'last'}" in err and "\n" not in err
    assert err.endswith(f"--dataset {tmp_path / 'more'}")  # the text the folder's meta.json names, not SRC
    assert (out / "config.json").read_bytes() == before


def test_a_resume_finds_data_that_moved_and_refuses_data_that_changed(data: Path, preset: Path, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from nanoqwen.data.prepare import prepare

    project = tmp_path / "project"
    shutil.copytree(data, project / "data")
    out = project / "runs" / "a"
    assert train_in_process(*common(project / "data", preset, out), "--max-steps", "2") == 0
    # The project moved as a whole: the data is found where it sits relative to the run.
    project.rename(tmp_path / "moved")
    out = tmp_path / "moved" / "runs" / "a"
    assert train_in_process("--resume", str(out), "--max-steps", "3") == 0
    assert "resuming with" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["data"] == str((tmp_path / "moved" / "data").resolve())
    # The data folder moved alone: --data says where; the same data (its fingerprint) is all it takes.
    (tmp_path / "moved" / "data").rename(tmp_path / "elsewhere")
    assert train_in_process("--resume", str(out), "--max-steps", "4") == 2
    assert "--data NEW_PLACE" in capsys.readouterr().err
    assert train_in_process("--resume", str(out), "--max-steps", "4", "--data", str(tmp_path / "elsewhere")) == 0
    # Other tokens in the same numbers (counts alone told them from the run's own): not a continuation of the run.
    shuffled = tmp_path / "shuffled"
    shutil.copytree(tmp_path / "elsewhere", shuffled)
    ids = np.fromfile(shuffled / "train.bin", dtype="<u4")
    ids[::-1].tofile(shuffled / "train.bin")
    capsys.readouterr()
    assert train_in_process("--resume", str(out), "--max-steps", "5", "--data", str(shuffled)) == 2
    err = capsys.readouterr().err.strip()
    assert "holds other data than the run began with; " in err and "--init-from" in err and "\n" not in err
    # Other text in the same tokenizer: not a continuation of the run.
    other = tmp_path / "other"
    prepare(str(write_corpus(tmp_path / "more", documents=30)), str(tmp_path / "elsewhere"), other,
            val_fraction=0.15, progress=False)
    capsys.readouterr()
    assert train_in_process("--resume", str(out), "--max-steps", "5", "--data", str(other)) == 2
    err = capsys.readouterr().err.strip()
    assert "holds other data than the run began with; " in err and "--init-from" in err and "\n" not in err
    # A folder of texts given for the data: what a resume takes instead (it was told `nanoqwen train --dataset`,
    # which a resume refuses), or how to train on them from the run's weights.
    began = json.loads((out / "config.json").read_text())["data"]
    assert train_in_process("--resume", str(out), "--max-steps", "5", "--data", str(tmp_path / "more")) == 2
    assert capsys.readouterr().err == (
        f"nanoqwen train: error: cannot resume {out}: --data {tmp_path / 'more'} is not prepared data (no meta.json); "
        f"a resume trains on the data it began with, {began} (--data says where that folder is now); to train on "
        f"these texts from the run's weights instead: nanoqwen train --init-from {out / 'last'} --dataset "
        f"{tmp_path / 'more'}\n")
    # A run from before runs recorded a digest of their data: checked by its counts alone (the shuffled tokens
    # pass), and the digest recorded from then on.
    config = json.loads((out / "config.json").read_text())
    del config["data_digest"]
    (out / "config.json").write_text(json.dumps(config))
    assert train_in_process("--resume", str(out), "--max-steps", "5", "--data", str(shuffled)) == 0
    assert "data_digest" in json.loads((out / "config.json").read_text())
    # A run from before runs recorded what their data holds: not checked, and said so; recorded from then on.
    config = json.loads((out / "config.json").read_text())
    del config["data_splits"], config["data_digest"]
    (out / "config.json").write_text(json.dumps(config))
    assert train_in_process("--resume", str(out), "--max-steps", "6", "--data", str(other)) == 0
    assert "nothing checks that" in capsys.readouterr().out
    assert {"data_splits", "data_digest"} <= json.loads((out / "config.json").read_text()).keys()


def test_a_lock_released_on_a_run_folder_that_holds_nothing_else_takes_the_folder_with_it(tmp_path: Path) -> None:
    # A run that failed before writing anything left an empty runs/PRESET-TIME behind, one for every try.
    from nanoqwen.io import LOCK_FILE, hold_lock, release_lock

    for folder, files in ((tmp_path / "failed", []), (tmp_path / "written", ["config.json"])):
        lock = hold_lock(folder)
        assert lock is not None
        for name in files:
            (folder / name).write_text("{}")
        release_lock(lock)
        assert (sorted(path.name for path in folder.iterdir()) if folder.exists() else None) == \
            (sorted([*files, LOCK_FILE]) if files else None)


def test_a_run_that_fails_to_start_leaves_no_folder_it_made_and_every_folder_the_user_made(
        data: Path, preset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A first run that failed after its folder was claimed (a flag checked late, Ctrl-C) removed its empty
    # runs/PRESET-TIME but left runs/ behind; an empty --out the user had made went with the failure instead.
    import nanoqwen.train as train_module
    from nanoqwen.errors import NanoQwenError

    def refused_late(run: object) -> None:
        raise failure

    monkeypatch.setattr(train_module, "check_samples_and_eval", refused_late)
    flags = ["--config", str(preset), "--data", str(data), *FAST]
    mine = tmp_path / "mine"  # folders of the user's: runs/ for the default run folder, and an --out
    (mine / "runs").mkdir(parents=True)
    (mine / "out").mkdir()
    for failure, status in ((NanoQwenError("refused late"), 2), (KeyboardInterrupt(), 130)):
        for where, out in ((tmp_path / "new", []), (tmp_path / "new", ["--out", "a/b"]),
                           (mine, []), (mine, ["--out", "out"])):
            where.mkdir(exist_ok=True)
            monkeypatch.chdir(where)
            assert train_in_process(*flags, *out) == status, (where, out)
            assert sorted(path.relative_to(where).as_posix() for path in where.rglob("*")) == \
                (["out", "runs"] if where == mine else []), (failure, where, out)


def test_a_run_gives_back_the_float32_matmul_precision_it_found(data: Path, preset: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # train turned TF32 on for the whole process and left it on: a notebook that compared with Transformers on a GPU
    # afterwards saw TF32's rounding. It is on while the run trains, and back as it was after, an error's too.
    import nanoqwen.train as train_module
    from nanoqwen.errors import NanoQwenError

    matmul = torch.backends.cuda.matmul
    monkeypatch.setattr(matmul, "fp32_precision", "ieee")  # the notebook's own (the default is "none")
    seen: list[str] = []

    def training(run: object, fail: bool) -> dict:
        seen.append(matmul.fp32_precision)
        if fail:
            raise NanoQwenError("failed while training")
        return real_train(run)

    real_train = train_module.train
    for fail, status in ((False, 0), (True, 2)):
        monkeypatch.setattr(train_module, "train", partial(training, fail=fail))
        assert train_in_process(*common(data, preset, tmp_path / f"run-{fail}"), "--max-steps", "1") == status
        assert (matmul.fp32_precision, torch.get_float32_matmul_precision()) == ("ieee", "highest")
    assert seen == ["tf32", "tf32"]


def test_a_run_keeps_to_the_tf32_switches_the_process_uses(data: Path, preset: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # Turned on with torch's fp32_precision in a process that never touched it, TF32 made every later read of the
    # allow_tf32 flags raise (torch refuses the mix): Transformers, older Inductors and users' code read them.
    import nanoqwen.train as train_module

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # torch's default state
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    seen: list[tuple[bool, bool, str]] = []

    def training(run: object) -> dict:
        seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                     torch.get_float32_matmul_precision()))
        return real_train(run)

    real_train = train_module.train
    monkeypatch.setattr(train_module, "train", training)
    assert train_in_process(*common(data, preset, tmp_path / "run"), "--max-steps", "1") == 0
    assert seen == [(True, True, "high")]
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
            torch.get_float32_matmul_precision()) == (False, True, "highest")


def test_a_run_folder_takes_one_writer_and_its_own_files(data: Path, preset: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from nanoqwen.io import hold_lock

    out = tmp_path / "run"
    assert train_in_process(*common(data, preset, out), "--max-steps", "2") == 0
    held = [hold_lock(out), hold_lock(tmp_path / "busy")]  # other processes training into them
    for args in [common(data, preset, tmp_path / "busy"), ["--resume", str(out), "--max-steps", "3"]]:
        assert train_in_process(*args) == 2
        err = capsys.readouterr().err.strip()
        assert "in use by another nanoqwen process" in err and "\n" not in err
    for lock in held:
        lock.close()
    # Whose config.json is not a run's; a checkpoint given to --resume; --out beside --resume.
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "config.json").write_text('{"my": "settings"}')
    state = out / "last" / "train_state.json"
    saved = state.read_text()
    state.write_text(saved.replace('"step": 2', '"step": "x"'))
    for args, words in [(common(data, preset, tmp_path / "proj"), "a config.json that is not a run's"),
                        (["--resume", str(out / "last")], f"--resume {out}"),
                        (["--resume", str(out), "--out", str(tmp_path / "b")], "drop --out"),
                        (["--resume", str(out), "--max-steps", "3"], 'step must be an integer, got "x"')]:
        assert train_in_process(*args) == 2, args
        err = capsys.readouterr().err.strip()
        assert words in err and "\n" not in err, err
    assert (tmp_path / "proj" / "config.json").read_text() == '{"my": "settings"}'
    state.write_text(saved)
    assert train_in_process("--resume", str(out), "--max-steps", "3") == 0


def test_a_full_disk_while_saving_is_one_line(data: Path, preset: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    import nanoqwen.io as io_module
    import nanoqwen.train as train_module

    def torch_save_on_a_full_disk(*args: object, **kwargs: object) -> None:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(train_module.torch, "save", torch_save_on_a_full_disk)
    monkeypatch.setattr(io_module, "disk_full", lambda path: True)
    assert train_in_process(*common(data, preset, tmp_path / "run"), "--max-steps", "2") == 2
    err = capsys.readouterr().err.strip()
    assert "no space left on the disk" in err and "\n" not in err


def test_a_failure_in_what_rank_0_alone_writes_stops_every_rank_with_its_line(data: Path, preset: Path,
                                                                               tmp_path: Path) -> None:
    # A full disk while rank 0 saved last/ (or wrote metrics.jsonl), or a corpus it alone prepared and refused,
    # or a run folder in use that rank 0 alone locks, ended rank 0 with its line, and the others in their next
    # collective: a traceback each under gloo, a wait under NCCL. Now every rank raises rank 0's line.
    import torch.multiprocessing as mp

    from nanoqwen.io import hold_lock
    from tests.train_helpers import on_rank0_worker

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    assert train_in_process(*common(data, preset, tmp_path / "run"), "--max-steps", "1") == 0
    held = hold_lock(tmp_path / "run")  # another process trains into it
    try:
        mp.start_processes(on_rank0_worker, args=(2, str(tmp_path)), nprocs=2, start_method="fork")  # no re-import
    finally:
        assert held is not None
        held.close()
    zero, one = (json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1))
    assert zero["locked"] == one["locked"] and one["locked"][0] == "NanoQwenError" and \
        "in use by another nanoqwen process" in one["locked"][1]
    assert zero["reduced"] == one["reduced"] == [1.5, 3.0, 2.0]  # mean, sum and max of 1 and 2, on every rank
    assert zero["ran"] == 0 and "ran" not in one  # the work runs on rank 0 only
    full = f"No space left on device: {tmp_path}/last; free some space or write elsewhere"  # what cli says of it
    assert zero["full"][0] == "OSError" and one["full"] == ["NanoQwenError", full]
    assert zero["bug"] == ["ValueError", "a bug"] and one["bug"][0] == "NanoQwenError" and \
        "process 0 failed (its traceback is above)" in one["bug"][1]
    assert zero["prepare"] == one["prepare"] and "has no text" in one["prepare"]  # bad data: its line on every rank
    # and the command line says such a line once: the first rank to report it does; a line of one rank's own, always
    assert sorted(zero["said"] + one["said"]) == ["a line every rank met", "rank 0's own line", "rank 1's own line"]


def test_cuda_generators_saved_on_more_gpus_are_restored_on_the_ones_there(monkeypatch: pytest.MonkeyPatch) -> None:
    # A run saved (before saves kept only the training device's generator) on an 8-GPU machine resumed on one:
    # set_rng_state_all would index past the GPUs there (an IndexError, reported as a corrupt training state).
    # Stood in for on CPU: one GPU, the calls recorded.
    from nanoqwen.checkpoint import restore_cuda_rng

    restored = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((int(state[0]), device)))
    restore_cuda_rng([torch.full((4,), i, dtype=torch.uint8) for i in range(8)], torch.device("cuda", 0))
    assert restored == [(0, 0)]
    restore_cuda_rng(None, torch.device("cuda", 0))  # saved on a CPU machine
    assert restored == [(0, 0)]


def test_each_rank_resumes_its_own_cuda_generator(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each rank saves the generator of the device it trains on, and a resume puts it back on the device it trains on
    # then (cuda:3 here). Saving every GPU rank 0's process could see gave rank 3 of a torchrun job the
    # untouched generator of cuda:3 in rank 0's process: not the one its dropout had drawn from. A run on CPU
    # saves and restores no CUDA generator (nor initializes CUDA). Stood in for on CPU, the calls recorded.
    from nanoqwen.checkpoint import restore_rng_states, rng_states

    calls = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: calls.append(("get", device)) or torch.ones(4))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: calls.append(("set", device)))
    saved = rng_states(torch.device("cuda", 0))
    restore_rng_states(saved, torch.device("cuda", 3))
    assert calls == [("get", torch.device("cuda", 0)), ("set", torch.device("cuda", 3))]
    assert rng_states(torch.device("cpu")).keys() == {"torch"}
    restore_rng_states(saved, torch.device("cpu"))
    assert len(calls) == 2


def peer_gone_worker(rank: int, folder: str) -> None:
    """One of two processes of a gloo job: rank 1 ends after a first collective, as a process that failed does;
    rank 0's next collective fails, and what it would say of that (and of a bug) goes to folder/0.json."""
    import errno
    from datetime import timedelta

    import torch.distributed as dist

    from nanoqwen.distributed import all_reduce, job_error_line

    dist.init_process_group("gloo", store=dist.FileStore(f"{folder}/store", 2), rank=rank, world_size=2,
                            timeout=timedelta(seconds=20))  # a rank left waiting fails, where the peer's end is missed
    all_reduce(1.0)  # both have joined
    if rank == 1:
        return  # its sockets close as it exits
    said: dict[str, str | None] = {"gone": "no error"}
    try:
        all_reduce(1.0)
    except RuntimeError as e:
        said = {"gone": job_error_line(e), "bug": job_error_line(RuntimeError("a bug")),
                "full": job_error_line(OSError(errno.ENOSPC, "No space left on device"))}
    dist.destroy_process_group()
    Path(folder, "0.json").write_text(json.dumps(said))


def test_a_process_that_ends_mid_run_stops_the_others_with_one_line(tmp_path: Path) -> None:
    # One process of a torchrun job ended (its own error, a bug's traceback, or killed for memory): each of the
    # others printed a 25-line traceback of gloo's "Connection closed by peer" (or "reset"), out of the collective
    # it was in, before torchrun's summary. Now they say one line for the job (once: say_once), pointing at those.
    import torch.multiprocessing as mp

    from nanoqwen.distributed import PEER_GONE_LINE

    mp.start_processes(peer_gone_worker, args=(str(tmp_path),), nprocs=2, start_method="fork")  # no re-import
    said = json.loads((tmp_path / "0.json").read_text())
    assert said == {"gone": "another process of this job ended (its error is above, or torchrun's summary below "
                            "says how); the others stop with it", "bug": None,  # a bug's traceback, as before
                    "full": "No space left on device; free some space or write elsewhere"}
    assert said["gone"] == PEER_GONE_LINE


def interrupted_rank0_worker(rank: int, folder: str, port: int) -> None:
    """One of two processes of a gloo job whose store another process holds (torchrun's, which outlives them):
    rank 0 is interrupted (Ctrl-C) in its first work for all, a corpus it prepares; what each met goes to
    folder/RANK.json."""
    import torch.distributed as dist

    from nanoqwen.distributed import init_distributed, job_error_line, on_rank0, shutdown_distributed
    from tests.train_helpers import _raise

    dist.init_process_group("gloo", store=dist.TCPStore("127.0.0.1", port, 2, is_master=False), rank=rank,
                            world_size=2)
    os.environ.update(RANK=str(rank), WORLD_SIZE="2")
    init_distributed("cpu")
    met: str | None = "nothing"
    try:
        on_rank0(partial(_raise, KeyboardInterrupt()))
    except KeyboardInterrupt:
        met = "interrupted"
    except RuntimeError as e:
        met = job_error_line(e)
    finally:
        shutdown_distributed()
    Path(folder, f"{rank}.json").write_text(json.dumps(met))


def test_ctrl_c_in_rank0s_first_work_for_all_ends_the_others_at_once(tmp_path: Path) -> None:
    # Ctrl-C under torchrun while rank 0 prepared the corpus: the others waited in the rendezvous of the group
    # on_rank0 made on first use (a day's wait, on torchrun's store, which outlives them) until torchrun killed
    # them 30 s later. The group is made as the job starts now: they see rank 0 go, and stop.
    import multiprocessing

    import torch.distributed as dist

    from nanoqwen.distributed import PEER_GONE_LINE

    store = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, wait_for_workers=False)  # torchrun's, as it were
    fork = multiprocessing.get_context("fork")  # no re-import
    workers = [fork.Process(target=interrupted_rank0_worker, args=(rank, str(tmp_path), store.port))
               for rank in (0, 1)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=30)
    left = [worker for worker in workers if worker.is_alive()]
    for worker in left:
        worker.kill()
    assert not left, "a process still waited for rank 0, which had stopped"
    assert [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1)] == ["interrupted",
                                                                                      PEER_GONE_LINE]


@pytest.mark.parametrize("sample, shown", [
    # rich's console read a sample as markup: "[/INST]" (Llama-style chat text) ended the run with a MarkupError,
    # and "[bold]" vanished into a style;
    ("[INST] Hi [/INST] [bold]Hello 42", "[INST] Hi [/INST] [bold]Hello 42"),
    # it read ":fire:" as an emoji code, and let a generated ESC sequence act on the terminal (shown as sample and
    # chat show it, printable).
    ("it is :fire: now\x1b[2J", "it is :fire: now\u241b[2J"),
], ids=["markup", "emoji-and-escape"])
def test_a_sample_beside_the_progress_bar_is_printed_as_text(monkeypatch: pytest.MonkeyPatch, sample: str,
                                                             shown: str) -> None:
    import io

    class Terminal(io.StringIO):  # on a terminal, lines go through rich's console
        def isatty(self) -> bool:
            return True

    out = Terminal()
    monkeypatch.setattr(sys, "stdout", out)
    display = Display(True, 0, 10, 1)
    try:
        display.print(sample)
    finally:
        display.close()
    assert shown + "\n" in out.getvalue()
