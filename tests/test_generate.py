"""Generation: greedy equals Transformers, seeds reproduce, streams never split a character."""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import re
import subprocess
import sys
import warnings
from collections.abc import Callable

import numpy as np
import pytest
import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

from nanoqwen.chat import Conversation
from nanoqwen.checkpoint import config_for_tokenizer, load_checkpoint, read_config, save_checkpoint
from nanoqwen.cli import main
from nanoqwen.errors import NanoQwenError
from nanoqwen.generate import (
    DecodeStep,
    Penalties,
    SamplingParams,
    TextStream,
    check_fits,
    generate,
    generate_ids,
    next_tokens,
    nucleus,
    sampled_logits,
    stream_text,
)
from nanoqwen.model import KVCache, Qwen3
from nanoqwen.tokenizer import Tokenizer, bytes_to_unicode, load_tokenizer, qwen3_tokenizer, train_bpe
from tests.hf_helpers import TRANSFORMERS_5, load_hf_model
from tests.test_model import scramble, tiny_config


@pytest.fixture(scope="module")
def qwen3() -> Tokenizer:
    return qwen3_tokenizer()  # 0.4 s a load: once for the tests that only read it


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, qwen3):
    """A small random model with the real Qwen3 tokenizer and vocabulary."""
    tokenizer = qwen3
    config = config_for_tokenizer(tiny_config(hidden_size=32, head_dim=16, intermediate_size=64), tokenizer,
                                  fit_vocab=True)
    torch.manual_seed(0)
    model = Qwen3(config)
    scramble(model, seed=11)
    path = tmp_path_factory.mktemp("gen") / "ck"
    save_checkpoint(model, path, tokenizer)
    return path


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nanoqwen", *args], capture_output=True, text=True, timeout=300)


def run_here(capsys: pytest.CaptureFixture[str], *args: str) -> subprocess.CompletedProcess:
    """`nanoqwen ARGS` in this process, its exit code and output as run_cli gives them: where what is checked is
    not the process itself (a start is seconds of imports)."""
    capsys.readouterr()
    code = main(list(args))
    said = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, said.out, said.err)


def test_greedy_equals_transformers_generate(checkpoint):
    model, tokenizer = load_checkpoint(checkpoint)
    hf = load_hf_model(checkpoint, attn_implementation="eager", dtype=torch.float32).eval()
    for prompt in ["Once upon a time", "The capital of France is", "日本語"]:
        ids = tokenizer.encode(prompt)
        ours = [step[0] for step in generate_ids(model, [ids], SamplingParams(max_new_tokens=24, temperature=0))]
        expected = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                               do_sample=False, max_new_tokens=24, min_new_tokens=24, eos_token_id=None,
                               pad_token_id=0)[0, len(ids):].tolist()
        assert ours == expected


def test_sample_command_greedy_equals_transformers(checkpoint, capsys, qwen3):
    prompt = "Hello there"
    done = run_cli("sample", "--model", str(checkpoint), "--prompt", prompt, "--temperature", "0",
                   "--max-new-tokens", "12", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    tokenizer = qwen3
    hf = load_hf_model(checkpoint, attn_implementation="eager", dtype=torch.float32).eval()
    ids = tokenizer.encode(prompt)
    out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), do_sample=False,
                      max_new_tokens=12, eos_token_id=tokenizer.stop_ids, pad_token_id=0)[0, len(ids):].tolist()
    out = [t for t in out if t not in tokenizer.stop_ids]
    assert done.stdout == prompt + tokenizer.decode(out) + "\n"
    # An empty prompt: a new document, as Transformers continues <|endoftext|> (the server does the same).
    done = run_here(capsys, "sample", "--model", str(checkpoint), "--prompt", "", "--temperature", "0",
                   "--max-new-tokens", "12", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    start = torch.tensor([[tokenizer.eot_id]])
    out = hf.generate(start, attention_mask=torch.ones(1, 1, dtype=torch.long), do_sample=False, max_new_tokens=12,
                      eos_token_id=tokenizer.stop_ids, pad_token_id=0)[0, 1:].tolist()
    assert done.stdout == tokenizer.decode([t for t in out if t not in tokenizer.stop_ids]) + "\n"


def test_transformers_batches_prompts_with_the_folders_pad_and_end_ids(checkpoint, qwen3):
    # Nothing passed but the prompts: the folder's tokenizer pads on the left with the id its
    # generation_config.json names, so each padded row generates what the prompt alone does.
    tokenizer = qwen3
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint, padding_side="left")
    hf = load_hf_model(checkpoint, attn_implementation="eager", dtype=torch.float32).eval()
    assert hf.generation_config.pad_token_id == hf_tokenizer.pad_token_id == tokenizer.eot_id
    assert hf_tokenizer.model_max_length == hf.config.max_position_embeddings == 128  # truncates to the context
    assert hf.generation_config.eos_token_id == tokenizer.stop_ids
    prompts = ["Once upon a time there was", "Hi", "The capital of France is"]
    batch = hf_tokenizer(prompts, return_tensors="pt", padding=True)
    assert (batch["input_ids"][1, :2] == tokenizer.eot_id).all()  # the short prompt was padded
    rows = hf.generate(**batch, do_sample=False, max_new_tokens=16)[:, batch["input_ids"].shape[1]:].tolist()
    model, _ = load_checkpoint(checkpoint)
    for prompt, row in zip(prompts, rows):
        ours = [step[0] for step in generate_ids(model, [tokenizer.encode(prompt)],
                                                 SamplingParams(max_new_tokens=16, temperature=0))]
        assert row[:len(ours)] == ours
        assert all(t == tokenizer.eot_id for t in row[len(ours):])  # a row that ended early is padded


def test_batched_greedy_to_the_end_of_the_context_equals_transformers(tmp_path):
    # Prompts of three lengths in one batch, greedy until each fills the context (the last tokens read at positions
    # next to max_position_embeddings, the short rows' after the long row's end): each row as Transformers generates
    # its prompt alone, and as its left-padded batch. Logprobs (the server's: log_softmax of the raw logits) equal
    # Transformers' compute_transition_scores over its raw logits, normalized.
    from nanoqwen.checkpoint import load_model
    from nanoqwen.generate import token_logprobs
    from tests.test_model import hf_model

    context = 40
    hf_model(tiny_config(max_position_embeddings=context, tie_word_embeddings=False), seed=4).save_pretrained(tmp_path)
    hf = load_hf_model(tmp_path, attn_implementation="eager", dtype=torch.float32).eval()
    model = load_model(tmp_path)
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, 320, (n,), generator=generator).tolist() for n in (context, 27, 3)]
    rows = [[t for t in row if t is not None]
            for row in zip(*generate_ids(model, prompts, SamplingParams(max_new_tokens=100, temperature=0)))]
    assert [len(row) for row in rows] == [1, 14, 38]  # what fits: the context, and one token predicted after it
    with torch.no_grad():
        for prompt, row in zip(prompts, rows):
            out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              do_sample=False, max_new_tokens=len(row), min_new_tokens=len(row), eos_token_id=None,
                              pad_token_id=0, output_logits=True, return_dict_in_generate=True)
            assert out.sequences[0, len(prompt):].tolist() == row
            theirs = hf.compute_transition_scores(out.sequences, out.logits, normalize_logits=True)[0]
            logits = model(torch.tensor([prompt + row[:-1]]))[0, len(prompt) - 1:]
            ours, _, _ = token_logprobs(logits, torch.tensor(row), 1)
            torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
        short = prompts[1:]  # left-padded together, as Transformers batches them
        ids = torch.tensor([[0] * (27 - len(p)) + p for p in short])
        mask = torch.tensor([[0] * (27 - len(p)) + [1] * len(p) for p in short])
        batched = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=14, min_new_tokens=14,
                              eos_token_id=None, pad_token_id=0)[:, 27:].tolist()
    assert batched == [rows[1], rows[2][:14]]


def test_text_flags_read_a_shells_backslash_escapes():
    # `--stop "\n"` reaches the program as a backslash and an n: it stood for those two characters, which a model
    # rarely writes, where a user means the end of a line (as llama.cpp's CLI reads it). Sample and chat alike, and
    # the prompt flags too (`--prompt "Q: hi\nA:"`, as llama.cpp's -p reads it).
    import argparse

    from nanoqwen import chat
    from nanoqwen import generate as sample

    typed = ["--stop", r"\n", "--stop", r"a\tb\r", "--stop", r"C:\dir\\", "--stop", r"\\n"]
    said = r"\n, \t, \r and \\ in it are a newline, a tab, a carriage return and a backslash"
    helps = {"--prompt": f'--prompt PROMPT text to continue ("": a new document, unconditioned); {said}',
             "--system": f"--system SYSTEM system message of the chat template (not with --raw); {said} (what you type "
                         "in the chat is sent as typed)"}
    for command, flag in ((sample, "--prompt"), (chat, "--system")):
        parser = argparse.ArgumentParser()
        command.add_arguments(parser)
        args = parser.parse_args(["--model", "m", flag, r"Q: hi\nA:\t\\n C:\dir", *typed])
        assert args.stop == ["\n", "a\tb\r", "C:\\dir\\", "\\n"]
        assert getattr(args, flag[2:]) == "Q: hi\nA:\t\\n C:\\dir"
        shown = " ".join(parser.format_help().split())
        assert f"--stop TEXT stop string (repeatable): the text ends before the first one it holds; {said}" in shown
        assert helps[flag] in shown


def test_sample_says_when_max_new_tokens_does_not_fit(checkpoint, capsys, qwen3):
    from nanoqwen.cli import main

    assert main(["sample", "--model", str(checkpoint), "--prompt", "Hello there", "--temperature", "0",
                 "--max-new-tokens", "100000"]) == 0
    context, prompt = 128, len(qwen3.encode("Hello there"))
    # The last new token is predicted, never read: context - prompt + 1 fit (see check_fits).
    assert f"(--max-new-tokens 100000: at most {context - prompt + 1} fit" in capsys.readouterr().err


def test_max_new_tokens_of_the_generation_config_is_the_default_length(checkpoint, tmp_path, monkeypatch):
    # vLLM takes a generation_config.json's max_new_tokens (not max_length, Transformers' 20-token default) as the
    # max_tokens of a request that gives none (ModelConfig.get_diff_sampling_param): sample's and chat's
    # --max-new-tokens default to it too; the flag, given, wins.
    import argparse
    import shutil

    from nanoqwen.checkpoint import read_generation_file
    from nanoqwen.generate import add_sampling_arguments, sampling_params, saved_max_new_tokens

    folder = tmp_path / "ck"
    shutil.copytree(checkpoint, folder)
    config = folder / "generation_config.json"
    sample, chat = argparse.ArgumentParser(), argparse.ArgumentParser()
    add_sampling_arguments(sample)
    add_sampling_arguments(chat, max_new_tokens=256)

    def length(parser: argparse.ArgumentParser, *flags: str) -> int:
        return sampling_params(parser.parse_args(list(flags)), read_generation_file(folder)).max_new_tokens

    config.write_text(json.dumps({"max_new_tokens": 7, "max_length": 3}))
    assert (length(sample), length(chat), length(sample, "--max-new-tokens", "9")) == (7, 7, 9)
    config.write_text(json.dumps({"max_length": 3}))
    assert (length(sample), length(chat)) == (200, 256)
    monkeypatch.setenv("COLUMNS", "1000")  # a narrow terminal (COLUMNS=40) broke "generation_config.json" in two
    assert "(default: the checkpoint's generation_config.json max_new_tokens, else 200;" in \
        " ".join(sample.format_help().split())
    for bad, words in [({"max_new_tokens": 0}, "max_new_tokens is 0, not a whole number >= 1"),
                       ({"max_new_tokens": "12"}, "max_new_tokens is '12', not a whole number >= 1"),
                       ({"max_new_tokens": 1.5}, "max_new_tokens is 1.5, not a whole number >= 1"),
                       ({"max_new_tokens": True}, "max_new_tokens is True, not a whole number >= 1")]:
        config.write_text(json.dumps(bad))
        with pytest.raises(NanoQwenError, match=f"generation_config.json: {re.escape(words)}; fix or remove it"):
            saved_max_new_tokens(read_generation_file(folder))


def test_sampling_defaults_come_from_the_checkpoints_generation_config(checkpoint, tmp_path, capsys):
    import argparse
    import shutil

    from nanoqwen.checkpoint import read_generation_file
    from nanoqwen.generate import SAMPLING_DEFAULTS, add_sampling_arguments, checkpoint_sampling, sampling_params

    folder = tmp_path / "ck"
    shutil.copytree(checkpoint, folder)
    config = folder / "generation_config.json"

    def sampling() -> dict[str, float]:  # as a command reads the folder's file: once, at load
        return checkpoint_sampling(read_generation_file(folder))

    config.write_text(json.dumps({"do_sample": True, "temperature": 0.6, "top_k": 20, "top_p": 0.95}))
    parser = argparse.ArgumentParser()
    add_sampling_arguments(parser)
    given = parser.parse_args(["--top-k", "5"])
    given.model = str(folder)
    params = sampling_params(given, read_generation_file(folder))
    assert (params.temperature, params.top_k, params.top_p, params.min_p, params.repetition_penalty) == (
        0.6, 5, 0.95, 0.0, 1.0)
    config.write_text(json.dumps({"do_sample": True, "min_p": 0.05}))  # Transformers' min_p, read as it reads it
    assert sampling_params(given, read_generation_file(folder)).min_p == 0.05
    given.min_p = 0.1  # --min-p
    assert sampling_params(given, read_generation_file(folder)).min_p == 0.1
    given.min_p = None
    # A flag out of its range is named as typed (it was "min_p must be..."), before the model's wait: a folder
    # without its weights, which would fail to load, still gets the flag's line. Sample and chat alike.
    unloadable = tmp_path / "no-weights"
    shutil.copytree(folder, unloadable, ignore=shutil.ignore_patterns("*.safetensors"))
    for command, flag, value, problem in (("sample", "--min-p", "1.5", "must be in [0, 1], got 1.5"),
                                          ("sample", "--max-new-tokens", "-1", "must be >= 0, got -1"),
                                          ("chat", "--temperature", "inf", "must be a number >= 0, got inf")):
        capsys.readouterr()
        assert main([command, "--model", str(unloadable), *(["--prompt", "Hi"] if command == "sample" else []), flag,
                     value]) == 2
        assert capsys.readouterr().err == f"nanoqwen {command}: error: {flag} {problem}\n"
    # A file that asks to sample but leaves a setting out (GenerationConfig writes only those set) means
    # Transformers' default there, as generate() reads it: temperature 1, top-k 50, top-p 1.
    config.write_text(json.dumps({"do_sample": True, "temperature": 0.7}))
    assert sampling() == {"temperature": 0.7, "top_k": 50, "top_p": 1.0, "min_p": 0.0, "repetition_penalty": 1.0}
    config.write_text(json.dumps({"do_sample": True, "top_p": 0.9}))
    assert sampling()["temperature"] == 1.0
    shown = " ".join(parser.format_help().split())  # and --help says so, not "else 0.95" alone
    assert "json, else 0.95, or 1 where it sets do_sample true)" in shown and "json, else 50)" in shown, shown
    assert parser.parse_args(["--top-k", "-1"]).top_k == 0  # vLLM's "all", as the server and the file take it
    # A file that is not a JSON object gives the defaults, as Transformers loads a model whose file is not JSON;
    # but it is named in one line (it was ignored in silence), the model still loading.
    capsys.readouterr()
    for broken, problem in (("{broken", "is not valid JSON (Expecting property name enclosed in double quotes: "
                                         "line 1 column 2 (char 1))"), ("[0.7]", "is not a JSON object")):
        config.write_text(broken)
        assert sampling() == SAMPLING_DEFAULTS
        assert capsys.readouterr().err == (f"nanoqwen: warning: {config} {problem}; ignored (end ids from config.json, "
                                           "default sampling settings): fix or remove it\n")
    config.write_text(json.dumps({"top_k": -1}))  # vLLM's "all tokens", as some folders write it
    assert sampling()["top_k"] == 0
    for bad, words in [({"top_k": 20.5}, "top_k is 20.5, not a whole number"), ({"top_p": 1.5}, "top_p must be in"),
                       ({"min_p": -0.1}, "min_p must be in"),
                       ({"temperature": "0.7"}, "temperature is '0.7'"), ({"top_k": 1e400}, "top_k is inf"),
                       ({"temperature": float("nan")}, "temperature must be a number >= 0")]:
        config.write_text(json.dumps(bad))
        with pytest.raises(NanoQwenError, match="generation_config.json: " + words):
            sampling()
    # do_sample false: greedy, so `nanoqwen sample` with no sampling flags gives the greedy text. What Transformers
    # would apply besides and nanoqwen does not (typical_p, no_repeat_ngram_size) is said once at load; settings
    # left at what means "off" are not.
    config.write_text(json.dumps({"do_sample": False, "temperature": 0.6, "typical_p": 0.9, "no_repeat_ngram_size": 3,
                                  "num_beams": 1, "suppress_tokens": [], "min_length": 0, "bad_words_ids": None,
                                  "penalty_alpha": 0.6, "top_k": 4, "dola_layers": None}))  # contrastive search
    assert sampling()["temperature"] == 0
    # The greedy reference: the same weights with a file that is no JSON, said once (not once per reading of it).
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / "generation_config.json").write_text("{broken")
    runs = [run_here(capsys, "sample", "--model", str(path), "--prompt", "Hello there", "--max-new-tokens", "12",
                    "--device", "cpu", *extra) for path, extra in ((folder, []), (broken, ["--temperature", "0"]))]
    assert runs[0].returncode == 0 and runs[0].stdout == runs[1].stdout, runs[0].stderr
    warning = (f"nanoqwen: warning: {config} sets typical_p, no_repeat_ngram_size, penalty_alpha, which "
               "Transformers' generate() applies and nanoqwen does not: its text can differ from Transformers'")
    assert runs[0].stderr.splitlines().count(warning) == 1, runs[0].stderr
    assert runs[1].stderr.splitlines() == [
        f"nanoqwen: warning: {broken / 'generation_config.json'} is not valid JSON (Expecting property name enclosed "
        "in double quotes: line 1 column 2 (char 1)); ignored (end ids from config.json, default sampling settings): "
        "fix or remove it"], runs[1].stderr


def test_unapplied_generation_settings_are_transformers_own_with_their_off_values():
    # Each name is a GenerationConfig field, and Transformers' default for it is one nanoqwen takes for "off".
    from transformers import GenerationConfig

    from nanoqwen.generate import UNAPPLIED_GENERATION

    # Transformers 5 fills what a file leaves out from these at generate(); 4.x held them on GenerationConfig()
    defaults = getattr(GenerationConfig, "_get_default_generation_params", lambda: GenerationConfig().to_dict())()
    for name, off in UNAPPLIED_GENERATION.items():
        if name == "top_h" and not TRANSFORMERS_5:
            continue  # a field of Transformers 5's (a generation_config.json it writes may set it)
        assert hasattr(GenerationConfig(), name) and defaults.get(name) in (None, *off), name


def test_generation_stops_at_the_end_ids_of_generation_config(checkpoint, tmp_path, qwen3):
    import shutil

    model, tokenizer = load_checkpoint(checkpoint)
    params = SamplingParams(max_new_tokens=12, temperature=0, stop_token_ids=tokenizer.stop_ids)
    free = generate(model, tokenizer, ["The rain in Spain"], params)[0].token_ids
    assert len(free) == 12 and free[4] not in free[:4]
    folder = tmp_path / "ck"
    shutil.copytree(checkpoint, folder)
    saved = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**saved, "eos_token_id": [free[4]]}))
    model, tokenizer = load_checkpoint(folder)  # as Transformers, which stops at generation_config's eos ids
    assert tokenizer.stop_ids == [*qwen3.stop_ids, free[4]]
    params = SamplingParams(max_new_tokens=12, temperature=0, stop_token_ids=tokenizer.stop_ids)
    done = generate(model, tokenizer, ["The rain in Spain"], params)[0]
    assert (done.token_ids, done.finish_reason) == (free[:4], "stop")  # the end id itself is not text
    # generate_ids itself ends a row at its stop token (the text layer above would hide a row that went on).
    assert [t for (t,) in generate_ids(model, [tokenizer.encode("The rain in Spain")], params)] == free[:5]
    # min_tokens: the end id cannot be drawn before 6 tokens are in; the row goes on past it.
    held = SamplingParams(**{**vars(params), "min_tokens": 6})
    got = [t for (t,) in generate_ids(model, [tokenizer.encode("The rain in Spain")], held)]
    assert got[:4] == free[:4] and free[4] not in got[:6] and (len(got) == 12 or got[-1] == free[4])
    # Without a generation_config.json Transformers takes its settings from config.json, its eos ids too.
    (folder / "generation_config.json").unlink()
    config = json.loads((folder / "config.json").read_text())
    for eos, extra in ((free[4], [free[4]]), ([free[4], free[5]], [free[4], free[5]]), (None, [])):
        (folder / "config.json").write_text(json.dumps({**config, "eos_token_id": eos}))
        assert load_checkpoint(folder)[1].stop_ids == [*qwen3.stop_ids, *extra], eos
    # So does a file that is no JSON (Transformers reads it as missing): its end ids were none at all.
    (folder / "config.json").write_text(json.dumps({**config, "eos_token_id": free[4]}))
    (folder / "generation_config.json").write_text('{"eos_token_id": [1, 2]')
    assert load_checkpoint(folder)[1].stop_ids == [*qwen3.stop_ids, free[4]]


def test_batched_prompts_equal_one_by_one(checkpoint):
    model, tokenizer = load_checkpoint(checkpoint)
    prompts = ["a", "The rain in Spain stays mainly", "1 2 3 4"]
    params = SamplingParams(max_new_tokens=10, temperature=0, stop_token_ids=tokenizer.stop_ids)
    together = [c.text for c in generate(model, tokenizer, prompts, params)]
    alone = [generate(model, tokenizer, [p], params)[0].text for p in prompts]
    assert together == alone


def test_a_model_in_training_mode_generates_without_dropout(checkpoint):
    # Training samples from the model as it trains (train mode): with attention_dropout set, the prompt's
    # attention was dropped out at random, so a greedy sample was noise, unlike the same checkpoint's.
    model, tokenizer = load_checkpoint(checkpoint)
    for layer in model.model.layers:
        layer.self_attn.dropout = 0.5
    ids = tokenizer.encode("The rain in Spain stays mainly")
    params = SamplingParams(max_new_tokens=8, temperature=0)
    expected = [step[0] for step in generate_ids(model, [ids], params)]
    model.train()
    for _ in range(3):
        assert [step[0] for step in generate_ids(model, [ids], params)] == expected
        assert model.training  # given back as it came


def test_penalties_follow_a_step_by_step_reference_batched_or_alone(checkpoint):
    # Repetition penalty on the prompt and the output (Transformers' rule), presence and frequency on the
    # output only (OpenAI's), recomputed here from scratch at every step with a full forward pass.
    model, tokenizer = load_checkpoint(checkpoint)
    params = SamplingParams(max_new_tokens=12, temperature=0, repetition_penalty=1.5, presence_penalty=0.4,
                            frequency_penalty=0.8)
    prompts = [tokenizer.encode(p) for p in ["a", "The rain in Spain stays mainly", "1 2 3 4"]]

    def reference(prompt: list[int]) -> list[int]:
        ids, out = list(prompt), []
        with torch.no_grad():
            for _ in range(params.max_new_tokens):
                logits = model(torch.tensor([ids]))[0, -1].float()
                for t in set(ids):
                    logits[t] = logits[t] / 1.5 if logits[t] > 0 else logits[t] * 1.5
                for t in set(out):
                    logits[t] -= 0.4 + 0.8 * out.count(t)
                out.append(int(logits.argmax()))
                ids.append(out[-1])
        return out

    expected = [reference(p) for p in prompts]
    together = [[int(t) for t in row] for row in zip(*generate_ids(model, prompts, params))]
    assert together == expected  # left padding of the shorter rows is not a repeated token 0
    assert [[step[0] for step in generate_ids(model, [p], params)] for p in prompts] == expected
    # The left padding (id 0) of a short row is no token of its prompt, while a real 0 of another row is.
    padded, real = torch.tensor([[0, 0, 5], [0, 4, 5]]), torch.tensor([[0, 0, 1], [1, 1, 1]])
    seen = Penalties.start(params, padded, 8, real).seen
    assert seen[0].nonzero().flatten().tolist() == [5] and seen[1].nonzero().flatten().tolist() == [0, 4, 5]


def test_sampling_keeps_the_distribution_transformers_warpers_keep(monkeypatch):
    from transformers import MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    # Transformers' top-p as it runs on a GPU, whose sort is stable: a CPU's leaves tied tokens in no set order, so
    # which of the tied leaders below it kept changed with the -inf a top-k had put in the row.
    sort = torch.sort
    monkeypatch.setattr(torch, "sort", lambda *args, **kwargs: sort(*args, **{**kwargs, "stable": True}))
    torch.manual_seed(0)
    logits = torch.randn(4, 64) * 3
    logits[1, :4] = torch.tensor([1.0, 1.0, 1.0, 1.0]) * 20  # four equal leaders: top_p 0.5 keeps two of them
    for temperature, top_k, top_p, min_p in [
            (1.0, 0, 0.5, 0.0), (2.0, 0, 0.6, 0.0), (0.5, 10, 0.9, 0.0), (1.7, 5, 1.0, 0.0), (0.8, 20, 0.3, 0.0),
            (1.0, 0, 1.0, 0.1), (2.0, 0, 1.0, 0.05), (0.7, 0, 0.9, 0.2), (1.3, 30, 0.95, 0.02), (1.0, 0, 1.0, 1.0)]:
        ours, columns = sampled_logits(logits.clone(), SamplingParams(temperature=temperature, top_k=top_k,
                                                                      top_p=top_p, min_p=min_p))
        probs = ours.softmax(-1)
        if columns is not None:  # back to one column per token
            probs = torch.zeros_like(logits).scatter(-1, columns, probs)
        warped, ids = logits.clone(), torch.zeros(4, 1, dtype=torch.long)
        for warper in [TemperatureLogitsWarper(temperature), *([TopKLogitsWarper(top_k)] if top_k else []),
                       *([TopPLogitsWarper(top_p)] if top_p < 1 else []),
                       *([MinPLogitsWarper(min_p)] if min_p else [])]:  # Transformers' order (its generate's)
            warped = warper(ids, warped)
        torch.testing.assert_close(probs, warped.softmax(-1), atol=1e-6, rtol=1e-5)
        if min_p:  # it cut something: the kept sets are compared, not only tokens of tiny probability
            assert bool((warped.isinf() & ~logits.isinf()).any())


def test_penalized_sampling_keeps_what_transformers_processors_keep_in_their_order():
    # The repetition penalty before the warpers, over each row's prompt and output but not its left padding (as
    # generate() builds Transformers' processor from the attention mask), then temperature, top-k, top-p and min-p.
    from transformers import (
        LogitsProcessorList,
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 64, generator=generator) * 3
    prompts = torch.randint(0, 64, (3, 6), generator=generator)
    real = torch.tensor([[1] * 6, [0, 0, 0, 1, 1, 1], [0] * 5 + [1]])
    prompts[real == 0] = int(logits[1].argmax())  # padding with the id of a row's best token, which it must not touch
    output = torch.randint(0, 64, (3, 4), generator=generator)
    for repetition, temperature, top_k, top_p, min_p in [(1.5, 0.7, 0, 0.9, 0.0), (0.8, 1.5, 20, 0.8, 0.05),
                                                         (2.0, 1.0, 10, 1.0, 0.1)]:
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                repetition_penalty=repetition)
        penalties = Penalties.start(params, prompts, 64, real)
        for step in range(output.shape[1]):
            penalties.record(output[:, step])
        ours, columns = sampled_logits(penalties.apply(logits.clone()), params)
        probs = ours.softmax(-1)
        if columns is not None:
            probs = torch.zeros_like(logits).scatter(-1, columns, probs)
        processors = LogitsProcessorList([
            RepetitionPenaltyLogitsProcessor(repetition),
            TemperatureLogitsWarper(temperature), *([TopKLogitsWarper(top_k)] if top_k else []),
            *([TopPLogitsWarper(top_p)] if top_p < 1 else []), MinPLogitsWarper(min_p)])
        # each row alone: its prompt from its first real token, then its output (its left padding unpenalized)
        expected = torch.cat([processors(torch.cat([prompts[row, real[row].argmax():], output[row]])[None],
                                         logits[row:row + 1].clone()) for row in range(len(logits))]).softmax(-1)
        torch.testing.assert_close(probs, expected, atol=1e-6, rtol=1e-5)


def test_a_large_top_k_with_top_p_keeps_the_tokens_transformers_warpers_keep():
    # A top_k over 1/8 of a vocabulary of 512 or more, with top_p, takes its own CPU path (the k-th value by
    # kthvalue, then `nucleus`): the same kept tokens as Transformers' warpers, ties with the k-th value included.
    from transformers import TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    for top_k, top_p in [(300, 0.999), (300, 0.6), (150, 0.9999)]:
        logits = torch.randn(3, 1024) / 2
        ranked = logits.argsort(-1, descending=True)
        kth = logits.gather(-1, ranked[:, top_k - 1:top_k])
        logits[0, ranked[0, top_k:top_k + 4]] = kth[0]  # row 0: four more tie with the k-th; rows 1, 2: none do
        ours, columns = sampled_logits(logits.clone(), SamplingParams(top_k=top_k, top_p=top_p))
        assert columns is not None
        kept = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, columns, ours[:, :columns.shape[-1]].isfinite())
        warped = TopPLogitsWarper(top_p)(None, TopKLogitsWarper(top_k)(None, logits.clone()))
        assert torch.equal(kept, warped.isfinite()), (top_k, top_p)
        assert top_p < 0.99 or kept.sum(-1).tolist() == [top_k + 4, top_k, top_k]  # the k best, and the ties


def test_top_p_keeps_what_a_full_sort_keeps():
    # On a CPU top-p looks for its tokens among the best few (torch.topk) rather than sorting the vocabulary. It must
    # keep what a full sort keeps (ties: the higher id first), with the same probabilities: rows flat and peaked,
    # bfloat16's many ties, equal leaders that top-p cuts through, top_p 0 (1e-300 in float32) to 0.9999999.
    torch.manual_seed(0)
    vocab = 4096
    logits = torch.randn(6, vocab) * torch.tensor([[0.5], [2.0], [4.0], [8.0], [4.0], [3.0]])
    logits[4] = logits[4].bfloat16().float()
    logits[5, [7, 300, 1000, 2500]] = 20.0  # four equal leaders of ~0.25 each: top_p 0.5 keeps three
    values, order = torch.sort(logits, dim=-1, stable=True)  # the full sort: ascending, ties in id order, reversed
    values, order = values.flip(-1), order.flip(-1)
    probs = logits.softmax(-1).gather(-1, order)
    searched = set()
    for top_p in (1e-300, 0.1, 0.5, 0.9, 0.95, 0.999, 0.9999999):
        sort_keeps = ~(probs.cumsum(-1) - probs >= top_p)
        sort_keeps[:, 0] = True
        for rows in [[0], [1], [2], [3], [4], [5], list(range(6))]:
            kept, ids = nucleus(logits[rows], top_p)
            if kept.shape[-1] < vocab:
                searched.add((top_p, rows[0] if len(rows) == 1 else "all"))
            for got_logits, got_ids, row in zip(kept, ids, rows):
                assert torch.equal(got_ids[got_logits.isfinite()], order[row][sort_keeps[row]]), (top_p, row)
                assert torch.equal(got_logits[got_logits.isfinite()], values[row][sort_keeps[row]]), (top_p, row)
        if top_p == 0.5:
            assert order[5][sort_keeps[5]].tolist() == [2500, 1000, 300]
    # Both ways were taken: at 0.9 the peaked rows were found among the best, the flat ones (and a batch) sorted.
    assert {row for p, row in searched if p == 0.9} == {2, 3, 4, 5} and (1e-300, "all") in searched


def test_top_p_cuts_through_tied_tokens_alike_on_every_path():
    # Four equal leaders (~0.25 each): top_p 0.5 keeps three. Which three is the ties' order: the higher ids first, as
    # Transformers' top-p (a stable ascending sort, whose end it keeps) keeps them on a GPU, and nanoqwen's CPU search
    # does. A top-k before it left them in torch.topk's order, and the sort for a GPU (descending, stable there) put
    # the lower ids first: the tokens kept depended on a top-k that cut none of them, and on the device.
    class OffTheCpu(torch.Tensor):  # takes nucleus's way for a GPU, here
        @property
        def is_cpu(self) -> bool:
            return False

    logits = torch.full((1, 100), -5.0)
    logits[0, [10, 20, 30, 40]] = 3.0
    for top_k in (0, 8, 60):
        ours, columns = sampled_logits(logits.clone(), SamplingParams(top_k=top_k, top_p=0.5))
        kept = columns[0, :ours.shape[-1]][ours[0, :columns.shape[-1]].isfinite()]
        assert sorted(kept.tolist()) == [20, 30, 40], top_k
    values, ids = nucleus(logits.as_subclass(OffTheCpu), 0.5)
    assert sorted(ids[0][values[0].isfinite()].tolist()) == [20, 30, 40]


def test_min_tokens_holds_off_stops_and_the_stop_can_stay_in_the_text(qwen3):
    # Stop tokens cannot be drawn before min_tokens tokens are in (vLLM masks them), greedy or sampled.
    logits = torch.tensor([[5.0, 4.0, 1.0, 0.5, -1.0]])
    greedy = SamplingParams(temperature=0, stop_token_ids=[0, 3], min_tokens=2)
    assert [int(next_tokens(logits, greedy, None, generated=n)) for n in range(3)] == [1, 1, 0]
    g = torch.Generator().manual_seed(0)
    sampled = SamplingParams(temperature=1.0, top_k=2, stop_token_ids=[0], min_tokens=1)
    assert {int(next_tokens(logits, sampled, g, generated=0)) for _ in range(50)} == {1, 2}  # masked before top-k
    assert {int(next_tokens(logits, sampled, g, generated=1)) for _ in range(50)} == {0, 1}
    # Stop strings end the text only once min_tokens tokens are in (the token completing one counts); the stop
    # string or token stays in the text with include_stop_str_in_output.
    tokenizer = qwen3
    ids = tokenizer.encode(" one two three four")
    assert [tokenizer.decode([t]) for t in ids] == [" one", " two", " three", " four"]

    def text(**settings) -> tuple[str, str | None]:
        params = SamplingParams(**settings)
        stream, out = TextStream.for_params(tokenizer, params), ""
        for token in ids:
            delta, reason = stream.accept(token, params.stop_token_ids)
            out += delta
            if reason:
                return out, reason
        return out + stream.finish(), None

    assert text(stop_strings=[" two"]) == text(stop_strings=[" two"], min_tokens=2) == (" one", "stop")
    assert text(stop_strings=[" two"], min_tokens=3) == (" one two three four", None)
    assert text(stop_strings=["two th"], min_tokens=3) == (" one ", "stop")  # completed by the 3rd token
    assert text(stop_strings=[" two"], include_stop_str_in_output=True) == (" one two", "stop")
    assert text(stop_strings=[" t"], include_stop_str_in_output=True) == (" one t", "stop")
    assert text(stop_token_ids=[ids[2]]) == (" one two", "stop")
    assert text(stop_token_ids=[ids[2]], include_stop_str_in_output=True) == (" one two three", "stop")
    # The refused field is carried by the error (the server's `param`), not read off its message
    # (min_tokens past max_new_tokens is named in this class's words: the server says it in the API's, naming the
    # max_tokens field a request gave or the default it left out)
    for bad, line in [({"max_new_tokens": 4, "min_tokens": 5}, "min_tokens must be >= 0 and no more than "
                       "max_new_tokens (4), got 5"),
                      ({"min_p": 1.5}, "min_p must be in [0, 1], got 1.5"),
                      ({"frequency_penalty": -3}, "frequency_penalty must be in [-2, 2], got -3")]:
        with pytest.raises(NanoQwenError) as e:
            SamplingParams(**bad).validate()
        assert (str(e.value), getattr(e.value, "name", None)) == (line, [*bad][-1])


def test_a_stop_string_written_before_min_tokens_never_ends_the_text_later(qwen3):
    # "\n\n" came whole in the 2nd token; its last "\n" was held back (it may start another "\n\n"), and the
    # 3rd token's search, from what was sent, found the old one: the text ended as "Hi\n", half a stop string.
    tokenizer = qwen3
    assert [tokenizer.decode([t]) for t in tokenizer.encode("Hi\n\nThere")] == ["Hi", "\n\n", "There"]
    assert [tokenizer.decode([t]) for t in tokenizer.encode("ab x b y")] == ["ab", " x", " b", " y"]
    for text, stops, min_tokens, expected in [("Hi\n\nThere is more", ["\n\n"], 3, ("Hi\n\nThere is more", False)),
                                              ("ab x b y", ["b", "abc"], 2, ("ab x ", True))]:  # the later "b"
        stream, out = TextStream(tokenizer, stops, min_tokens=min_tokens), ""
        for token in tokenizer.encode(text):
            delta, reason = stream.accept(token, [])
            out += delta
            if reason:
                break
        assert (out + stream.finish(), stream.stopped) == expected, stops


def test_a_prompt_as_long_as_the_context_still_predicts_one_token(checkpoint, capsys, monkeypatch):
    # The model reads every prompt token inside its context; the token it predicts after the last is never read.
    model, tokenizer = load_checkpoint(checkpoint)
    model.prepare_for_decoding()
    context = model.config.max_position_embeddings
    assert check_fits(model, context, 50) == 1 and check_fits(model, context - 1, 50) == 2
    prompt = "7" * context  # one token a digit
    ids = tokenizer.encode(prompt)
    assert len(ids) == context
    with torch.no_grad():
        expected = int(model(torch.tensor([ids]))[0, -1].argmax())
    monkeypatch.setattr("nanoqwen.generate.load_for_inference", lambda *args: (model, tokenizer))  # loaded above
    assert main(["sample", "--model", str(checkpoint), "--prompt", prompt, "--max-new-tokens", "5", "--temperature",
                 "0", "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    assert out == prompt + tokenizer.decode([expected]) + "\n"
    assert err == "(--max-new-tokens 5: at most 1 fit in the model's context after the prompt)\n"
    # One token more is a prompt longer than the context: one line (which sample says before echoing it).
    with pytest.raises(NanoQwenError, match=f"^the prompt is {context + 1} tokens but the model's context is "
                                            f"{context}; shorten it to at most {context} tokens$"):
        check_fits(model, context + 1, 50)
    # So does a chat message that alone, in its template, is as long as the context.
    one = len(tokenizer.encode(tokenizer.render_chat([{"role": "user", "content": "7"}])))
    conversation = Conversation(tokenizer, context, reserve=8)
    assert len(conversation.add_user("7" * (context - one + 1))) == context
    assert conversation.add_user("7" * (context - one + 2)) is None


def test_num_samples_are_seed_plus_k(checkpoint, capsys):
    common = ["sample", "--model", str(checkpoint), "--prompt", "Once", "--max-new-tokens", "12",
              "--temperature", "1.0", "--device", "cpu"]
    assert main([*common, "--seed", "7", "--num-samples", "3"]) == 0
    together = capsys.readouterr().out
    alone = []
    for k in range(3):
        assert main([*common, "--seed", str(7 + k)]) == 0
        alone.append(capsys.readouterr().out.strip())
    assert len(set(alone)) == 3  # three different draws
    for text in alone:
        assert text in together


def test_num_samples_from_the_last_seed_wrap_to_seed_zero(checkpoint, capsys):
    # --seed 2**63 - 1 is a valid seed, but sample 2 asked for seed 2**63 and ended the command with an error.
    common = ["sample", "--model", str(checkpoint), "--prompt", "Once", "--max-new-tokens", "6",
              "--temperature", "1.0", "--device", "cpu"]
    assert main([*common, "--seed", str(2**63 - 1), "--num-samples", "2"]) == 0
    together = capsys.readouterr().out
    assert main([*common, "--seed", "0"]) == 0
    assert together.endswith("---\n" + capsys.readouterr().out)


@pytest.mark.parametrize("prepared", [False, True])
def test_fixed_shape_decoding_equals_the_usual_path(checkpoint, prepared):
    """The decode step that CUDA graphs replay (whole cache under a mask, slots on the device), run eagerly:
    padded prompts, greedy and sampled, give the same tokens, and its logits match the usual step's."""
    model, tokenizer = load_checkpoint(checkpoint)
    if prepared:
        model.prepare_for_decoding()
    prompts = [tokenizer.encode(p) for p in ["a", "The rain in Spain stays mainly", "1 2 3 4"]]
    for params in (SamplingParams(max_new_tokens=16, temperature=0),
                   SamplingParams(max_new_tokens=16, temperature=1.0, top_k=20, seed=3, repetition_penalty=1.3)):
        usual = list(generate_ids(model, prompts, params, fixed_shapes=False))
        fixed = list(generate_ids(model, prompts, params, fixed_shapes=True))
        assert fixed == usual and len(usual) == 16
    ids = torch.tensor([prompts[1]])
    with torch.inference_mode():
        caches = [model.new_cache(1, ids.shape[1] + 4) for _ in range(2)]
        for cache in caches:
            model(ids, cache=cache)
        caches[1].fix_shapes()
        for token in (5, 6, 7):
            usual, fixed = (model(torch.tensor([[token]]), cache=cache) for cache in caches)
            torch.testing.assert_close(fixed, usual, rtol=1e-5, atol=1e-5)
        assert caches[1].length == caches[0].length == ids.shape[1] + 3
        assert int(caches[1].slot) == caches[1].length and torch.equal(caches[1].next_position, caches[0].next_position)
        model(torch.tensor([[8]]), cache=caches[1])  # the last slot
        with pytest.raises(ValueError, match="KV cache holds"):
            model(torch.tensor([[9]]), cache=caches[1])
        fresh = model.new_cache(1, 4)
        fresh.fix_shapes()
        with pytest.raises(ValueError, match="one token per row"):
            model(torch.tensor([[1, 2]]), cache=fresh)


class OpRecorder(TorchDispatchMode):
    """Records every aten call made inside it, as a CUDA graph records kernels, so that the calls can be
    replayed later with none of the Python that made them: tensors the block did not create (weights, the
    cache, the input buffer) are used again as they are; those it created are made anew."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.calls.append((func, args, kwargs or {}, out))
        return out

    def replay(self) -> dict[int, torch.Tensor]:
        """Run the calls again; maps id(a tensor made while recording) -> the tensor made for it now."""
        made: dict[int, torch.Tensor] = {}

        def now(x):
            return made.get(id(x), x) if isinstance(x, torch.Tensor) else x

        for func, args, kwargs, out in self.calls:
            again = func(*tree_map(now, args), **tree_map(now, kwargs))
            made.update((id(old), new) for old, new in zip(tree_leaves(out), tree_leaves(again))
                        if isinstance(old, torch.Tensor))
        return made


@pytest.mark.parametrize("prepared", [False, True])
def test_fixed_shape_step_replays_without_its_python(checkpoint, prepared):
    """A CUDA graph keeps only the ops of the step it captured. Replaying the ops recorded at one fixed-shape
    step, over a left-padded batch, must go on giving the usual step's logits at every later position (no op
    may depend on host-side state such as `cache.length`), and the step must read nothing back to the host."""
    model, _ = load_checkpoint(checkpoint)
    if prepared:
        model.prepare_for_decoding()
    ids = torch.tensor([[0, 0, 0, 5, 6], [1, 2, 3, 4, 5]])
    real = torch.tensor([[0, 0, 0, 1, 1], [1, 1, 1, 1, 1]])
    with torch.inference_mode():
        usual_cache, fixed_cache = model.new_cache(2, 12), model.new_cache(2, 12)
        expected = model(ids, cache=usual_cache, attention_mask=real, logits_to_keep=1)
        model(ids, cache=fixed_cache, attention_mask=real, logits_to_keep=1)
        fixed_cache.fix_shapes()
        token = torch.zeros(2, 1, dtype=torch.long)  # the step's input buffer
        for step in range(7):
            token.copy_(expected[:, -1].argmax(-1, keepdim=True))
            if step == 0:
                with OpRecorder() as recorder:
                    output = model(token, cache=fixed_cache)
                aten = torch.ops.aten
                host_reads = {aten.item.default, aten._local_scalar_dense.default, aten.is_nonzero.default,
                              aten.equal.default}
                assert not host_reads & {call[0] for call in recorder.calls}
                logits = output
            else:
                logits = recorder.replay()[id(output)]
            expected = model(token.clone(), cache=usual_cache)
            torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert int(fixed_cache.slot) == usual_cache.length == 12


class EmulatedGraphStep(DecodeStep):
    """DecodeStep with a CUDA graph's semantics emulated on CPU, so its own bookkeeping (warm-up, the length
    put back after a capture, captures again as the window grows) runs here: recording runs the step's
    ops under an OpRecorder, then puts every cache tensor back, as a capture that runs nothing would;
    a replay reruns the recorded ops with none of the Python."""

    records = 0

    def _warm_up(self) -> torch.Tensor:
        return self.model(self.token, cache=self.cache)

    def _record(self):
        cache = self.cache
        state = (cache.keys, cache.values, cache.key_valid, cache.next_position, cache.slot)
        saved = [tensor.clone() for tensor in state]
        with OpRecorder() as recorder:
            logits = self.model(self.token, cache=cache)
        for tensor, before in zip(state, saved):
            tensor.copy_(before)
        self.records += 1
        return lambda: recorder.replay()[id(logits)]


class FailingCaptureStep(EmulatedGraphStep):
    def _record(self):
        raise RuntimeError("no graph here")


@pytest.mark.parametrize("step_class", [EmulatedGraphStep, FailingCaptureStep])
def test_decode_step_captures_again_as_the_cache_outgrows_its_window(checkpoint, monkeypatch, step_class):
    """A padded batch decoded for 29 steps through DecodeStep, its first step eager, with windows of 4 slots
    doubling (8, 16, 32, then the cache's 36): the logits equal the usual step's at every position, with
    one capture per window; a capture that fails warns once and decoding goes on eagerly, still right."""
    monkeypatch.setattr(KVCache, "FIRST_WINDOW", 4)
    model, tokenizer = load_checkpoint(checkpoint)
    model.prepare_for_decoding()
    ids = torch.tensor([[0, 0, 0, 7, 8, 9], [1, 2, 3, 4, 5, 6]])
    real = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.inference_mode(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        usual_cache, fixed_cache = model.new_cache(2, 36), model.new_cache(2, 36)
        expected = model(ids, cache=usual_cache, attention_mask=real, logits_to_keep=1)
        model(ids, cache=fixed_cache, attention_mask=real, logits_to_keep=1)
        step = step_class(model, fixed_cache, capture=True, capture_at=2)
        for _ in range(29):
            token = expected[:, -1].argmax(-1)
            logits = step(token)
            expected = model(token[:, None], cache=usual_cache)
            torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
            assert fixed_cache.length == usual_cache.length
    failed = [w for w in caught if "decoding without a CUDA graph" in str(w.message)]
    if step_class is EmulatedGraphStep:
        assert step.records == 3 and step.window == 36 and not failed
    else:
        assert step.replay is None and len(failed) == 1


def test_decode_step_whose_warm_up_fills_the_cache(checkpoint):
    """The server's engine captures a batch at its 4th step, which may be the batch's last: the warm-up
    then fills the cache, and nothing is captured (the step is not attempted past the cache's end)."""
    model, _ = load_checkpoint(checkpoint)
    ids = torch.tensor([[5, 6, 7]])
    with torch.inference_mode():
        usual_cache, fixed_cache = model.new_cache(1, 4), model.new_cache(1, 4)
        token = model(ids, cache=usual_cache)[:, -1].argmax(-1)
        model(ids, cache=fixed_cache)
        step = EmulatedGraphStep(model, fixed_cache, capture=True)
        torch.testing.assert_close(step(token), model(token[:, None], cache=usual_cache), rtol=1e-5, atol=1e-5)
    assert step.records == 0 and fixed_cache.length == 4


class FakeCuda:
    """torch.cuda's streams, device guard and graph capture, stood in for on CPU: it notes on which device each
    stream is made and which device is current while the warm-up and the capture run the model."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.current: torch.device | None = None  # None: the process's current device, cuda:0
        self.streams: list[torch.device | None] = []  # the device of each stream made
        self.ran_on: list[torch.device | None] = []  # the current device, as the model ran in a warm-up or capture
        fake = self

        class Stream:
            def __init__(self, device=None):
                self.device = None if device is None else torch.device(device)
                fake.streams.append(self.device)

            def wait_stream(self, other):
                pass

        @contextlib.contextmanager
        def device(where):
            before, fake.current = fake.current, torch.device(where)
            yield
            fake.current = before

        @contextlib.contextmanager
        def stream(s):
            before, fake.current = fake.current, s.device  # as torch.cuda.stream makes the stream's device current
            yield
            fake.current = before

        class CUDAGraph:
            def replay(self):
                pass

        @contextlib.contextmanager
        def graph(cuda_graph, pool=None, stream=None, capture_error_mode="global"):
            # torch.cuda.graph makes its own stream, once, on the device current then, unless given one
            with fake_stream_context(stream or Stream()):
                yield

        fake_stream_context = stream
        original = Qwen3.forward

        def forward(model, *args, **kwargs):
            fake.ran_on.append(fake.current)
            return original(model, *args, **kwargs)

        for name, value in [("Stream", Stream), ("device", device), ("stream", stream), ("graph", graph),
                            ("CUDAGraph", CUDAGraph), ("current_stream", Stream)]:
            monkeypatch.setattr(torch.cuda, name, value)
        monkeypatch.setattr(Qwen3, "forward", forward)


def test_decode_step_captures_on_the_device_of_its_cache(checkpoint, monkeypatch):
    """`--device cuda:1`: the warm-up and the capture must run with the cache's device current and on streams of
    that device. torch.cuda.graph's own stream is made on the device current at the time (cuda:0), where the
    model's kernels, launched on cuda:1, would not be captured: they would run once and the graph replay nothing."""
    model, _ = load_checkpoint(checkpoint)
    model.prepare_for_decoding()
    ids = torch.tensor([[5, 6, 7]])
    with torch.inference_mode():
        cache = model.new_cache(1, 8)
        token = model(ids, cache=cache)[:, -1].argmax(-1)
        fake = FakeCuda(monkeypatch)
        step = DecodeStep(model, cache, capture=True)
        step(token)  # the warm-up, then the capture of the next step
    device = cache.keys.device
    assert step.replay is not None and len(fake.ran_on) == 2
    assert fake.ran_on == [device, device] and fake.streams and all(s == device for s in fake.streams)


def test_same_seed_same_text(checkpoint):
    model, tokenizer = load_checkpoint(checkpoint)
    params = dict(max_new_tokens=20, temperature=1.0, top_k=50, top_p=0.9, repetition_penalty=1.2)
    a = generate(model, tokenizer, ["Once"], SamplingParams(seed=5, **params))[0]
    b = generate(model, tokenizer, ["Once"], SamplingParams(seed=5, **params))[0]
    c = generate(model, tokenizer, ["Once"], SamplingParams(seed=6, **params))[0]
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids
    streamed = "".join(stream_text(model, tokenizer, "Once", SamplingParams(seed=5, **params)))
    assert streamed == a.text


def test_top_k_top_p_and_penalty_restrict_choices():
    logits = torch.tensor([[5.0, 4.0, 1.0, 0.5, -1.0]])
    g = torch.Generator().manual_seed(0)
    picks = {int(next_tokens(logits, SamplingParams(temperature=1.0, top_k=2), g)) for _ in range(200)}
    assert picks == {0, 1}
    # softmax: token 0 has ~0.71, so top_p 0.5 keeps it alone
    picks = {int(next_tokens(logits, SamplingParams(temperature=1.0, top_p=0.5), g)) for _ in range(50)}
    assert picks == {0}
    params = SamplingParams(temperature=0, repetition_penalty=2.0)
    assert int(next_tokens(logits, params, None, Penalties.start(params, torch.tensor([[0]]), 5))) == 1


def test_top_k_keeps_ties_as_transformers_does():
    from transformers import TopKLogitsWarper

    # Row 0: three tokens tie for the 3rd place; row 1: none do. Transformers keeps every tied token.
    logits = torch.tensor([[5.0, 4.0, 3.0, 3.0, 3.0, -1.0, -2.0], [3.0, 2.9, 2.8, 0.0, -1.0, -1.5, -2.0]])
    kept = TopKLogitsWarper(top_k=3)(torch.zeros(2, 1, dtype=torch.long), logits.clone()).isfinite()
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=1.0, top_k=3)
    for row in range(2):
        picks = {int(next_tokens(logits[row:row + 1], params, g)) for _ in range(400)}
        assert picks == set(kept[row].nonzero().flatten().tolist())
    both = next_tokens(logits, params, g)  # one batch, rows with different numbers of ties
    assert int(both[0]) in {0, 1, 2, 3, 4} and int(both[1]) in {0, 1, 2}
    # Exactly: the batch takes as many columns as row 0's ties need, and row 1 must drop its extra two
    # (one draw above hits them ~2% of the time, so check what it draws from).
    batched, columns = sampled_logits(logits, params)
    kept_batched = torch.zeros_like(kept).scatter(-1, columns, batched.isfinite())
    assert torch.equal(kept_batched, kept)


def test_presence_and_frequency_penalties_count_generated_tokens_only():
    logits = torch.tensor([[5.0, 4.0, 1.0, 0.5, -1.0]])
    assert Penalties.start(SamplingParams(), torch.tensor([[0]]), 5) is None  # nothing to remember
    params = SamplingParams(temperature=0, frequency_penalty=1.0, presence_penalty=0.5)
    penalties = Penalties.start(params, torch.tensor([[0, 0, 1]]), 5)
    assert torch.equal(penalties.apply(logits), logits)  # the prompt does not count
    for token in (0, 0, 1):
        penalties.record(torch.tensor([token]))
    # token 0: twice (2 * 1.0 + 0.5), token 1: once (1.0 + 0.5)
    assert torch.equal(penalties.apply(logits), torch.tensor([[2.5, 2.5, 1.0, 0.5, -1.0]]))
    with pytest.raises(NanoQwenError, match="presence_penalty"):
        SamplingParams(presence_penalty=2.5).validate()


def test_repetition_penalty_counts_the_prompt_and_the_generated_tokens():
    # Transformers' rule: every token in the sequence so far, generated ones included, once however often it came;
    # positive logits divided by the penalty, negative ones multiplied.
    logits = torch.tensor([[5.0, 4.0, 1.0, -1.0, 2.0]])
    params = SamplingParams(temperature=0, repetition_penalty=2.0)
    penalties = Penalties.start(params, torch.tensor([[0, 0]]), 5)
    assert torch.equal(penalties.apply(logits), torch.tensor([[2.5, 4.0, 1.0, -1.0, 2.0]]))
    for token in (3, 4, 4):
        penalties.record(torch.tensor([token]))
    assert torch.equal(penalties.apply(logits), torch.tensor([[2.5, 4.0, 1.0, -2.0, 1.0]]))


def test_penalties_apply_in_vllms_order_repetition_first():
    # vLLM scales by the repetition penalty, then subtracts the frequency and presence penalties: the other order
    # gives other logits wherever a generated token has both.
    params = SamplingParams(temperature=0, repetition_penalty=2.0, frequency_penalty=1.0, presence_penalty=0.5)
    penalties = Penalties.start(params, torch.tensor([[2]]), 3)
    for token in (0, 1):
        penalties.record(torch.tensor([token]))
    # 5 / 2 - 1 - 0.5; -1 * 2 - 1 - 0.5; 1 / 2 (a prompt token: repetition alone)
    assert torch.equal(penalties.apply(torch.tensor([[5.0, -1.0, 1.0]])), torch.tensor([[1.0, -3.5, 0.5]]))


def test_stream_never_splits_characters_and_honours_stop_strings(qwen3):
    tokenizer = qwen3
    text = "naïve 🤖 日本 done. STOP here"
    stream = TextStream(tokenizer, ["STOP"])
    pieces = [stream.push(t) for t in tokenizer.encode(text)]
    pieces.append(stream.finish())
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == "naïve 🤖 日本 done. "
    assert stream.stopped


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_stream_decodes_each_token_once_and_equals_the_whole_decode(monkeypatch, skip_special_tokens: bool):
    # Decoding all ids again at every token made a long generation quadratic (17 s of decoding at 8,000 tokens).
    tokenizer = qwen3_tokenizer()
    byte_ids = [tokenizer.token_id(bytes_to_unicode()[b]) for b in "🤖".encode()]
    ids = [*tokenizer.encode("naïve 日本 \ufffd<|im_end|> done, ") * 30, *byte_ids, 1278, 1278,
           *tokenizer.encode(" e\u0301 ok")]
    windows: list[int] = []
    decode = tokenizer.decode
    monkeypatch.setattr(tokenizer, "decode", lambda part, **kw: (windows.append(len(part)), decode(part, **kw))[1])
    stream = TextStream(tokenizer, [], skip_special_tokens)
    for k, token in enumerate(ids):
        stream.push(token)
        assert stream.text == decode(ids[:k + 1], skip_special_tokens=skip_special_tokens), k
    assert ("<|im_end|>" in stream.text) != skip_special_tokens
    assert max(windows) <= 6  # the bytes of one character (and undecodable ones), never the whole text


def test_special_tokens_are_left_out_of_the_text_unless_kept(tmp_path):
    # As HF pipelines and vLLM decode: <|im_start|> and the like are not text; <think> and <tool_call> are,
    # also in folders written before nanoqwen marked them `special: false` (as official Qwen3 folders do).
    qwen3_tokenizer().save(tmp_path)
    raw = json.loads((tmp_path / "tokenizer.json").read_text())
    for token in raw["added_tokens"]:
        token["special"] = True
    (tmp_path / "tokenizer.json").write_text(json.dumps(raw))
    assert load_tokenizer(tmp_path).decode(qwen3_tokenizer().encode("<think>a<|im_end|>"),
                                           skip_special_tokens=True) == "<think>a"
    tokenizer = qwen3_tokenizer()
    ids = tokenizer.encode("a<|im_start|>b<think>c<|endoftext|><tool_call>d")
    assert len(ids) == 8
    kept = "a<|im_start|>b<think>c<|endoftext|><tool_call>d"
    for skip, expected in ((True, "ab<think>c<tool_call>d"), (False, kept)):
        stream, starts, text = TextStream(tokenizer, [], skip), [], ""
        for token in ids:
            text, starts = text + stream.accept(token, [])[0], [*starts, stream.token_start]
        assert text + stream.finish() == expected
        pieces = [tokenizer.decode([token], skip_special_tokens=skip) for token in ids]  # "" for a skipped one
        assert starts == [len("".join(pieces[:k])) for k in range(len(ids))]  # where each token's text begins


def test_undecodable_bytes_neither_hide_stop_strings_nor_shift_offsets(qwen3):
    tokenizer = qwen3
    assert tokenizer.token_bytes(1278) == b" \xd0"  # a space, then a lead byte whose character never comes
    stream, starts, text = TextStream(tokenizer, ["X"]), [], ""
    for token in [1278, 1278, 1278, *tokenizer.encode(" aX b")]:
        delta, reason = stream.accept(token, [])
        text, starts = text + delta, [*starts, stream.token_start]
        if reason:
            break
    assert reason == "stop" and text == " \ufffd \ufffd \ufffd a" and starts == [0, 2, 4, 6, 8]
    stream = TextStream(tokenizer, [" "])  # the stop string is there at once, before the undecodable byte
    assert stream.accept(1278, []) == ("", "stop")
    # A character whose bytes come one token at a time: held back, then starting where its first byte did.
    byte_ids = [tokenizer.token_id(bytes_to_unicode()[b]) for b in "🤖".encode()]
    stream, starts, text = TextStream(tokenizer, []), [], ""
    for token in [*byte_ids, *tokenizer.encode(" ok")]:
        text, starts = text + stream.accept(token, [])[0], [*starts, stream.token_start]
    assert text == "🤖 ok" and starts == [0, 0, 0, 0, 1]


def byte_fallback_tokenizer() -> Tokenizer:
    """A SentencePiece-style tokenizer (as Llama's and Mistral's folders hold): characters outside its few words are
    spelled by <0xNN> byte tokens, which its ByteFallback decoder reads as a group, one U+FFFD per byte while the
    group is not whole UTF-8."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers

    vocab = {"<unk>": 0, **{f"<0x{b:02X}>": 1 + b for b in range(256)}}
    for word in ["\u2581", "a", "b", "\u2581a", "\u2581b"]:
        vocab[word] = len(vocab)
    hf = HFTokenizer(models.BPE(vocab, [], unk_token="<unk>", byte_fallback=True))
    hf.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    hf.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    return Tokenizer(hf)


def test_a_character_spelled_by_byte_fallback_tokens_is_never_cut_into_replacement_characters():
    # A byte-fallback decoder shows a character still missing bytes as one U+FFFD per byte ("日"'s first two bytes:
    # "\ufffd\ufffd"); holding back the last U+FFFD alone sent the first, and the character, once whole, was lost:
    # "a 日本 b" streamed (and returned) as "a \ufffd\ufffd b".
    tokenizer = byte_fallback_tokenizer()
    assert not tokenizer.byte_level
    ids = tokenizer.encode("a 日本 b")  # "\u2581", "a", "\u2581", the 6 bytes of "日本", "\u2581", "b"
    assert len(ids) == 11 and tokenizer.hf.decode(ids[:5]) == "a \ufffd\ufffd"
    assert tokenizer.decode(ids[:5]) == "a \ufffd"  # one for the character still coming, as byte-level decoding
    stream, pieces, starts = TextStream(tokenizer, ["b"]), [], []
    for token in ids:
        pieces.append(stream.accept(token, [])[0])
        starts.append(stream.token_start)
    assert pieces == ["", "a", " ", "", "", "日", "", "", "本", " ", ""] and stream.stopped
    assert starts == [0, 0, 1, 2, 2, 2, 3, 3, 3, 4, 5]  # a byte token starts where its character does
    # Cut inside "本" (max_tokens): "日", sent, stays, and the character cut off ends the text as one U+FFFD, as
    # byte-level decoding shows it (the ByteFallback decoder alone reads the whole group as 5 U+FFFDs).
    assert tokenizer.decode(ids[:8]) == "a 日\ufffd"
    stream = TextStream(tokenizer, [])
    assert "".join(stream.push(token) for token in ids[:8]) + stream.finish() == "a 日\ufffd"


def test_byte_fallback_text_after_a_cut_character_keeps_what_was_sent():
    # The ByteFallback decoder shows a byte run that is not whole UTF-8 as one U+FFFD a byte, its whole characters
    # too: "日" sent, then a cut character and a word, came out "日\ufffd\ufffd\ufffd b" (the sent "日" again as
    # U+FFFDs after it). Byte runs now decode as byte-level text does: one U+FFFD a broken character.
    tokenizer = byte_fallback_tokenizer()
    byte = {b: tokenizer.token_id(f"<0x{b:02X}>") for b in range(256)}
    ids = [*(byte[b] for b in "日".encode()), byte[0xE6], *tokenizer.encode("b")]  # "b": "\u2581b"
    assert tokenizer.decode(ids) == "日\ufffd b"
    assert tokenizer.decode([byte[0xE6], byte[0x41]]) == "\ufffdA"  # the "A" was never part of a character
    stream = TextStream(tokenizer, [])
    assert "".join(stream.accept(token, [])[0] for token in ids) + stream.finish() == "日\ufffd b"


@pytest.mark.parametrize("vocabulary", ["qwen3", "byte_fallback"])
def test_a_reply_is_the_text_its_tokens_add_to_the_prompts(qwen3, monkeypatch, vocabulary: str):
    # A reply's ids were decoded alone: a SentencePiece decoder drops a text's leading space, so "a" answered with
    # "\u2581b" read "b" (and `sample` printed "ab"), and a prompt of ids ending inside a character had the reply's
    # bytes that finish it shown as U+FFFDs. A reply is now what its tokens add to the prompt's text, from the
    # character the prompt left unfinished on; a U+FFFD the prompt's text ends with stays the prompt's.
    if vocabulary == "byte_fallback":
        tokenizer = byte_fallback_tokenizer()
        byte = lambda b: tokenizer.token_id(f"<0x{b:02X}>")  # noqa: E731
        word = lambda text: [tokenizer.token_id(text.replace(" ", "\u2581"))]  # noqa: E731
    else:
        tokenizer = qwen3
        byte = lambda b: tokenizer.token_id(bytes_to_unicode()[b])  # noqa: E731
        word = tokenizer.encode
    robot = [byte(b) for b in "🤖".encode()]
    end = tokenizer.stop_ids[0] if vocabulary == "qwen3" else tokenizer.token_id("<unk>")
    cases = [(word("a"), word(" b"), " b"),
             ([*word("a"), *robot[:2]], [*robot[2:], *word(" b")], "🤖 b"),
             ([*word("a"), *robot[:1]], [byte(0x41)], "\ufffdA"),  # broken by the reply: the reply shows it
             ([*word("a"), byte(0x80)], [*word(" b")], " b"),  # broken already: the prompt's
             ([*word("a"), *robot[:3]], [end], "\ufffd")]  # ended at once: the character stays unfinished
    for prompt, reply, expected in cases:
        stream = TextStream(tokenizer, [], prompt=prompt)
        pieces = [stream.accept(token, [end])[0] for token in reply]
        pieces.append(stream.finish())
        assert "".join(pieces) == expected, (prompt, reply)
        assert "\ufffd" in expected or not any("\ufffd" in piece for piece in pieces)  # none for a whole character
    # generate, sample and chat give the stream their prompt
    prompt, reply, expected = cases[1]
    monkeypatch.setattr("nanoqwen.generate.generate_ids", lambda model, prompts, params: iter([[t] for t in reply]))
    params = SamplingParams(max_new_tokens=len(reply), temperature=0)
    assert generate(None, tokenizer, [prompt], params)[0].text == expected  # type: ignore[arg-type, list-item]


def random_stream_case(rng: random.Random, tokenizer: Tokenizer, byte_id: Callable[[int], int]) -> list[int]:
    """Ids as a model may sample them: pieces of text, characters spelled byte by byte (some cut), lone bytes,
    any id of the vocabulary (special tokens included)."""
    ids: list[int] = []
    for _ in range(rng.randint(1, 6)):
        kind = rng.random()
        if kind < 0.4:
            text = rng.choice(["naïve 🤖 日本 done. STOP here", "ab x b y", "Hi\n\nThere END", "e\u0301 ==> a\ufffdb"])
            at = rng.randrange(len(text))
            ids += tokenizer.encode(text[at:at + rng.randint(1, 12)])
        elif kind < 0.7:
            data = rng.choice("é🤖日ïa\u2581\ufffd").encode()
            ids += [byte_id(b) for b in data[:rng.randint(1, len(data)) if rng.random() < 0.3 else None]]
        elif kind < 0.85:
            ids.append(byte_id(rng.randrange(256)))
        else:
            ids.append(rng.randrange(tokenizer.vocab_size))
    return ids


def stream_vocabulary(qwen3: Tokenizer, vocabulary: str) -> tuple[Tokenizer, Callable[[int], int]]:
    """The tokenizer the streaming property tests draw ids of, and the id of the token that is one byte."""
    if vocabulary == "byte_fallback":
        tokenizer = byte_fallback_tokenizer()
        return tokenizer, lambda b: tokenizer.token_id(f"<0x{b:02X}>")
    tokenizer = qwen3 if vocabulary == "qwen3" else train_bpe(["naïve 🤖 日本 the cat sat on the mat"] * 20, 300)
    return tokenizer, lambda b: tokenizer.token_id(bytes_to_unicode()[b])


@pytest.mark.parametrize("vocabulary", ["qwen3", "bpe", "byte_fallback"])
def test_streamed_text_is_the_decoded_text_cut_at_the_first_stop(qwen3, vocabulary: str):
    # A property test over random ids and settings: the chunks join to the decoded text, cut where a stop token
    # (its text left out unless asked) or the stop string completed first (once min_tokens tokens are in) ends it;
    # no chunk sends a U+FFFD where the text has a character; logprob offsets never go back nor past the text.
    tokenizer, byte_id = stream_vocabulary(qwen3, vocabulary)
    rng = random.Random(0)
    for case in range(700):
        ids = random_stream_case(rng, tokenizer, byte_id)
        whole = tokenizer.decode(ids)
        stops = [whole[at:at + rng.randint(1, 4)] if whole and rng.random() < 0.6 else
                 rng.choice(["zz", "END", "\n\n", " a", "日", "\ufffd"])
                 for at in [rng.randrange(max(len(whole), 1)) for _ in range(rng.randint(0, 3))]]
        min_tokens = rng.choice([0, 1, 2, rng.randint(0, len(ids) + 1)])
        stop_ids = rng.sample(ids, 1) if rng.random() < 0.3 else []
        include, skip = rng.random() < 0.3, rng.random() < 0.8
        stream, chunks, starts, reason = TextStream(tokenizer, stops, skip, min_tokens, include), [], [], None
        for token in ids:
            delta, reason = stream.accept(token, stop_ids)
            chunks.append(delta)
            starts.append(stream.token_start)
            assert 0 <= stream.token_start <= len(stream.text)
            if reason:
                break
        if reason is None:
            chunks.append(stream.finish())
            reason = "stop" if stream.stopped else "length"
        # What it should be: the text of the ids up to a stop token, cut at the stop string that ends first (of
        # those ending together, the longer), counting only those that end after the text of the first
        # min_tokens - 1 tokens (what stays of it once characters still coming are held back).
        used = ids[:next((k + 1 for k, token in enumerate(ids) if token in stop_ids), len(ids))]
        expected = tokenizer.decode(used if include or used[-1] not in stop_ids else used[:-1], skip)
        expected_reason = "stop" if used[-1] in stop_ids else "length"
        if len(used) >= min_tokens:
            unchecked = len(tokenizer.decode(used[:max(min_tokens - 1, 0)], skip).rstrip("\ufffd"))
            found = [(at + len(stop), at) for stop in stops for at in range(len(expected))
                     if expected.startswith(stop, at) and at + len(stop) > unchecked]
            if found:
                end, start = min(found)
                expected, expected_reason = expected[:end if include else start], "stop"
        said = (case, ids, stops, min_tokens, stop_ids, include, skip, chunks)
        assert ("".join(chunks), reason) == (expected, expected_reason), said
        assert all(a <= b for a, b in zip(starts, starts[1:])), said
        shown = 0
        for chunk in chunks:  # (the joined text equals it, so a U+FFFD sent is one the text has at that place)
            assert all(expected[shown + k] == "\ufffd" for k, c in enumerate(chunk) if c == "\ufffd"), said
            shown += len(chunk)


@pytest.mark.parametrize("vocabulary", ["qwen3", "bpe", "byte_fallback"])
def test_a_reply_joins_its_prompt_as_their_ids_decode(qwen3, vocabulary: str):
    # A property test over random prompts and replies (characters cut at either side of the join included): the
    # prompt's text, but for a character it ends inside of, and the reply's streamed text join to the text of all ids.
    tokenizer, byte_id = stream_vocabulary(qwen3, vocabulary)
    rng = random.Random(1)
    for case in range(400):
        prompt, reply = random_stream_case(rng, tokenizer, byte_id), random_stream_case(rng, tokenizer, byte_id)
        skip = rng.random() < 0.7
        stream = TextStream(tokenizer, [], skip, prompt=prompt)
        text = "".join(stream.push(token) for token in reply) + stream.finish()
        prompt_text = tokenizer.decode(prompt, skip)
        said = (case, prompt, reply, skip)
        assert prompt_text.removesuffix("\ufffd" if stream.prompt_cut else "") + text == \
            tokenizer.decode([*prompt, *reply], skip), said


def test_a_stop_string_split_over_tokens_never_shows_its_start(qwen3):
    tokenizer = qwen3
    stream, shown = TextStream(tokenizer, ["END"]), ""
    for piece in ["abc", " E", "ND", " more"]:
        for token in tokenizer.encode(piece):
            shown += stream.push(token)
    assert shown == "abc " and stream.stopped
    # A start that never became the stop string is text: the end of generation hands it out.
    stream = TextStream(tokenizer, ["END"])
    shown = "".join(stream.push(token) for token in tokenizer.encode("abc EN"))
    assert (shown, shown + stream.finish(), stream.stopped) == ("abc ", "abc EN", False)
    # The longest start held back: "==" may be "==>" begun at either "=", and the first one is where it was.
    stream = TextStream(tokenizer, ["==>"])
    assert "".join(stream.push(token) for piece in ["x ==", ">", " y"] for token in tokenizer.encode(piece)) == "x "


def test_holding_back_a_stop_strings_start_costs_the_held_text_not_the_reply(qwen3):
    # The held-back search tried every prefix of each stop string at every token: a 5,000-character stop
    # made 3,000 tokens take 16 s of the server's one engine thread. Now it tries only the text not yet sent.
    class CountedStop(str):
        slices = 0

        def __getitem__(self, key):  # type: ignore[override]
            CountedStop.slices += 1
            return str.__getitem__(self, key)

    tokenizer = qwen3
    long_stop = CountedStop("q" * 4999 + "!")
    stream = TextStream(tokenizer, [long_stop, CountedStop("the end")])
    ids = tokenizer.encode("a plain reply that goes on and on, " * 40 + "until the en")
    per_token = []
    for token in ids:
        before = CountedStop.slices
        stream.push(token)
        per_token.append(CountedStop.slices - before)
    assert max(per_token) <= 2 * 12  # at most the held text plus one token's few characters, per stop
    assert stream.text.endswith("the en") and stream.emitted == len(stream.text) - len("the en")
    assert stream.push(tokenizer.encode("d")[0]) == "" and stream.stopped  # the held start did become the stop


def test_the_stop_string_completed_first_ends_the_text_whatever_their_order_or_the_tokens(qwen3):
    # The text ends where it would had it come one character at a time: at the stop string completed first (of two
    # completed together, the longer). The one that started first won, so a token holding a whole stop string that
    # starts before a shorter one it also holds ended the text earlier than the same text split over two tokens.
    tokenizer = qwen3

    def streamed(pieces: list[str], stops: list[str], include: bool = False) -> str:
        stream, text = TextStream(tokenizer, stops, include_stop=include), ""
        for token in [t for piece in pieces for t in tokenizer.encode(piece)]:
            delta, reason = stream.accept(token, [])
            text += delta
            if reason:
                return text + stream.finish()  # nothing more once it stopped, however finish is called
        return text + stream.finish()

    assert [tokenizer.decode([t]) for t in tokenizer.encode(" ab a")] == [" ab", " a"]
    assert [tokenizer.decode([t]) for t in tokenizer.encode("xabc")] == ["x", "abc"]
    for text, pieces, stops, cut, kept in [
            ("you weou and more", ["you weou and more"], ["eou", "weou"], "you ", "you weou"),
            (" ab a", [" ab", " a"], ["a", " ab"], " ", " a"), (" ab a", [" ", "a", "b a"], ["a", " ab"], " ", " a"),
            ("xabc", ["xabc"], ["abc", "b"], "xa", "xab"), ("xabc", ["xa", "bc"], ["abc", "b"], "xa", "xab")]:
        assert "".join(pieces) == text
        for order in (stops, stops[::-1]):
            assert (streamed(pieces, order), streamed(pieces, order, include=True)) == (cut, kept), (pieces, order)


def test_extreme_temperature_and_penalty_still_pick_a_token():
    # Dividing by a temperature of 1e-40 overflows every logit; a repetition penalty of 1e-300 overflows the
    # seen ones. Either must pick the best token(s), never raise on a nan distribution (one such request
    # used to fail every request batched with it in the server).
    logits = torch.tensor([[5.0, 4.0, 1.0, 0.5, -1.0], [0.0, 3.0, -2.0, 2.5, 1.0]])
    generator = torch.Generator().manual_seed(0)
    for top_k, top_p in [(0, 1.0), (3, 1.0), (0, 0.9)]:
        for temperature in (1e-40, 1e-50, 1e-4):  # 1e-50 is 0 in float32: 0/0 was nan
            tiny = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
            assert next_tokens(logits, tiny, generator).tolist() == [0, 1]
        narrow = SamplingParams(temperature=1.0, top_k=top_k, top_p=1e-300)  # 0 in float32: kept nothing
        assert next_tokens(logits, narrow, generator).tolist() == [0, 1]
        fond = SamplingParams(temperature=1.0, repetition_penalty=1e-300, top_k=top_k, top_p=top_p)
        penalties = Penalties.start(fond, torch.tensor([[2], [3]]), vocab_size=5)
        assert next_tokens(logits, fond, generator, penalties).tolist() == [2, 3]


def test_unseeded_sampling_leaves_the_global_generator_alone(checkpoint):
    model, tokenizer = load_checkpoint(checkpoint)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    generate(model, tokenizer, ["Once"], SamplingParams(max_new_tokens=3, temperature=1.0, seed=None))
    assert torch.equal(torch.rand(3), expected)


def test_prompt_longer_than_context_is_one_clear_line(checkpoint, capsys):
    done = run_here(capsys, "sample", "--model", str(checkpoint), "--prompt", "word " * 200, "--device", "cpu")
    assert done.returncode == 2 and done.stdout == ""  # the prompt is not echoed before the error
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "context is 128" in lines[0]


def test_eval_command_reports_consistent_metrics(checkpoint, tmp_path, capsys):
    text = "To be, or not to be, that is the question. " * 12
    (tmp_path / "t.txt").write_text(text)
    done = run_here(capsys, "eval", "--model", str(checkpoint), "--text-file", str(tmp_path / "t.txt"), "--json",
                   "--device", "cpu")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    model, tokenizer = load_checkpoint(checkpoint)
    ids = torch.tensor([[tokenizer.eot_id, *tokenizer.encode(text)]])  # the first token too, after <|endoftext|>
    context = model.config.max_position_embeddings
    with torch.no_grad():  # the reference: each window scored on its own
        nll, n, right = 0.0, 0, 0
        for s in range(0, ids.shape[1] - 1, context):
            window = ids[:, s:s + context + 1]
            logits = model(window[:, :-1])
            nll += torch.nn.functional.cross_entropy(logits[0], window[0, 1:], reduction="sum").item()
            n += window.shape[1] - 1
            right += int((logits[0].argmax(-1) == window[0, 1:]).sum())
    assert result["tokens"] == n == len(tokenizer.encode(text))
    assert result["loss"] == pytest.approx(nll / n, rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(nll / 0.6931471805599453 / len(text.encode()), rel=1e-5)
    assert result["perplexity"] == pytest.approx(2.718281828459045 ** result["loss"], rel=1e-5)
    assert result["accuracy"] == pytest.approx(right / n)


def test_eval_accuracy_counts_the_argmax_hits_of_every_window():
    # The test above scores a model of 151,936 ids that never guesses a token: its accuracy is 0, whatever is
    # counted. Here 8 ids, so some guesses hit; windows of 16, 16 and 8 (the last one padded in its batch).
    from nanoqwen.evaluate import evaluate_tokens

    model = Qwen3(tiny_config(vocab_size=8, max_position_embeddings=16)).eval()
    scramble(model, seed=3)
    tokens = torch.randint(0, 8, (41,), generator=torch.Generator().manual_seed(0))
    nll, right = 0.0, 0
    with torch.no_grad():  # the reference: each window scored on its own
        for s in range(0, 40, 16):
            window = tokens[s:s + 17]
            logits = model(window[None, :-1])[0]
            nll += torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum").item()
            right += int((logits.argmax(-1) == window[1:]).sum())
    assert 0 < right < 40  # the test tells a count of hits from none and from all
    result = evaluate_tokens(model, tokens, num_bytes=40, context=16, batch_size=3)
    assert result["tokens"] == 40 and result["accuracy"] == right / 40
    assert result["loss"] == pytest.approx(nll / 40, rel=1e-5)


def test_eval_of_a_file_that_is_not_utf8_warns(checkpoint, tmp_path, capsys):
    raw = "Ça coûte 12 € à Zürich. ".encode("latin-1", errors="replace") * 4  # Ç û à ü: one byte each
    (tmp_path / "latin1.txt").write_bytes(raw)
    assert main(["eval", "--model", str(checkpoint), "--text-file", str(tmp_path / "latin1.txt"), "--json",
                 "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "is not UTF-8 text: replaced 16 undecodable byte sequences" in captured.err
    assert json.loads(captured.out.strip().splitlines()[-1])["bits_per_byte"] > 0  # still measured


def test_bits_per_byte_count_the_text_not_the_file(checkpoint, tmp_path, capsys):
    text = "Bits per byte are per UTF-8 byte of the text, café, whatever the file's encoding. " * 3
    results = []
    for encoding in ("utf-8", "utf-8-sig", "utf-16", "utf-32"):
        (tmp_path / f"{encoding}.txt").write_bytes(text.encode(encoding))
        assert main(["eval", "--model", str(checkpoint), "--text-file", str(tmp_path / f"{encoding}.txt"), "--json",
                     "--device", "cpu"]) == 0
        results.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert all(r == results[0] for r in results), results


def test_an_error_line_is_one_write(tmp_path, monkeypatch):
    # Under torchrun every rank says its error at once; print's two writes (text, then newline) interleaved in an
    # unbuffered stream, and two ranks' lines ran together on one.
    class Writes(io.StringIO):
        def __init__(self) -> None:
            super().__init__()
            self.calls: list[str] = []

        def write(self, text: str) -> int:
            self.calls.append(text)
            return super().write(text)

    stderr = Writes()
    monkeypatch.setattr(sys, "stderr", stderr)
    assert main(["init", "--preset", str(tmp_path / "mine.json"), "--out", str(tmp_path / "m")]) == 2
    (line,) = stderr.calls
    assert line.startswith("nanoqwen init: error: preset file") and line.endswith("\n") and line.count("\n") == 1


def test_a_gguf_or_a_run_file_given_as_the_model_names_the_checkpoint_to_give(tmp_path, capsys):
    # `--model runs/NAME/best.gguf`, the file `nanoqwen gguf` wrote beside best/, said "give the checkpoint folder
    # that holds it (runs/NAME)": the run folder, itself refused; so did a run's own files (metrics.jsonl).
    run = tmp_path / "run"
    (run / "best").mkdir(parents=True)
    (run / "best" / "config.json").write_text("{}")
    (run / "config.json").write_text(json.dumps({"train": {}, "preset": "cpu", "data": "d"}))
    for name in ("best.gguf", "metrics.jsonl"):
        (run / name).write_text("")
    (tmp_path / "other.gguf").write_text("")
    for model, expected in [
        (run / "best.gguf", f"{run / 'best.gguf'} is a GGUF file, for llama.cpp, Ollama or LM Studio; nanoqwen reads "
                            f"checkpoint folders: give the one it was written from, {run / 'best'}"),
        (tmp_path / "other.gguf", f"{tmp_path / 'other.gguf'} is a GGUF file, for llama.cpp, Ollama or LM Studio; "
                                  "nanoqwen reads checkpoint folders: give one such as runs/NAME/best"),
        (run / "metrics.jsonl", f"{run} is a run folder; give its checkpoint {run / 'best'} (its only one, lowest "
                                "val loss)")]:
        assert main(["sample", "--model", str(model), "--prompt", "x"]) == 2
        assert capsys.readouterr().err == f"nanoqwen sample: error: {expected}\n"


def test_command_line_mistakes_are_one_clear_line(checkpoint, tmp_path, capsys):
    cases = [
        (["eval", "--model", str(checkpoint), "--text-file", str(tmp_path)], "is a folder; give one UTF-8 text file"),
        (["eval", "--model", str(checkpoint), "--text-file", __file__, "--split", "train"], "leave --split out"),
        (["sample", "--model", str(checkpoint / "model.safetensors"), "--prompt", "x"],
         f"is a file; give the checkpoint folder that holds it ({checkpoint})"),
        (["sample", "--model", __file__, "--prompt", "x"], "is a file, not a checkpoint folder"),
        (["init", "--preset", str(tmp_path / "mine.json"), "--out", str(tmp_path / "m")],
         "preset file " + str(tmp_path / "mine.json") + " does not exist"),
        (["init", "--preset", __file__, "--out", str(tmp_path / "m")], f"preset file {__file__} is not a .json file"),
        # (it named train's ways: --resume, --init-from, --config, none of them init's)
        (["init", "--preset", str(tmp_path / "run" / "config.json"), "--out", str(tmp_path / "m")],
         f"{tmp_path / 'run' / 'config.json'} is a run's record of its settings, not a preset; for the run's "
         f"architecture give its checkpoint's: --preset {tmp_path / 'run' / 'best' / 'config.json'}"),
    ]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps({"train": {}, "preset": "cpu", "data": "d"}))
    for args, expected in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip()
        assert expected in err and "\n" not in err, err
    assert not (tmp_path / "m").exists()
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    for args, expected in [
        (["sample", "--model", str(checkpoint), "--prompt", "x", "--temperature", "inf"],
         "--temperature must be a number >= 0"),
        (["init", "--out", str(tmp_path / "m"), "--tokenizer", "bpe:300"], "only prepare and train do"),
        (["init", "--out", str(tmp_path / "m"), "--set", "torch_dtype=int8"], "give --dtype"),  # it was dropped
        (["sample", "--model", str(checkpoint), "--prompt", "x", "--repetition-penalty", "0"],
         "--repetition-penalty must be > 0"),
        # An empty stop string was dropped in silence (`--stop "$UNSET"`): refused, sample and chat alike
        (["sample", "--model", str(checkpoint), "--prompt", "x", "--stop", "END", "--stop", ""],
         'error: --stop "" (an empty string) marks no place to stop; give the text to stop at, or leave it out'),
        (["chat", "--model", str(checkpoint), "--stop", ""], '--stop "" (an empty string) marks no place to stop'),
        (["eval", "--model", str(checkpoint), "--text-file", "/dev/null"], "is not a regular file"),
        (["eval", "--model", str(checkpoint), "--text-file", str(empty)], "is empty; give it some text"),
        (["eval", "--model", str(checkpoint), "--text-file", __file__, "--context", "129"],
         "--context 129 is longer than the model's context (128 positions)"),
        (["eval", "--model", str(checkpoint), "--data", str(tmp_path / "nodata")], "nodata does not exist"),
    ]:
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip()
        assert expected in err and "\n" not in err, err
    # argparse's own refusals are one line too, pointing at the help of the command they were meant for.
    for args, expected in [(["sample", "--model", "m", "--prompt", "x", "--bogus"], "(see nanoqwen sample --help)"),
                           (["sample", "--model", "m"], "required: --prompt (see nanoqwen sample --help)"),
                           (["serve", "--model", "m", "--port", "70000"], "must be a TCP port from 1 to 65535"),
                           # not argparse's "invalid seed_int value: 'x'", which names a function of ours
                           (["sample", "--model", "m", "--prompt", "x", "--seed", "x"],
                            "argument --seed: must be a whole number, got x (see nanoqwen sample --help)"),
                           (["sample", "--model", "m", "--prompt", "x", "--top-k", "1.5"],
                            "argument --top-k: must be a whole number, got 1.5"),
                           # argparse's "invalid float value: 'hot'", and NaN, which float() takes
                           (["sample", "--model", "m", "--prompt", "x", "--temperature", "hot"],
                            "argument --temperature: must be a number, got hot"),
                           (["chat", "--model", "m", "--repetition-penalty", "nan"],
                            "argument --repetition-penalty: must be a number, got nan"),
                           (["sample", "--model", "m", "--prompt", "x", "--max-new-tokens", "1e3"],
                            "argument --max-new-tokens: must be a whole number, got 1e3"),
                           (["serve", "--model", "m", "--shutdown-grace", "3s"],
                            "argument --shutdown-grace: must be a number, got 3s"),
                           (["serve", "--model", "m", "--port", "http"], "argument --port: must be a whole number"),
                           (["eval", "--model", "m", "--data", "d", "--context", "1k"],
                            "argument --context: must be a whole number, got 1k")]:
        with pytest.raises(SystemExit) as exit_:
            main(args)
        err = capsys.readouterr().err.strip()
        assert exit_.value.code == 2 and expected in err and "\n" not in err, err


def test_bytes_that_are_not_utf8_in_a_prompt_are_replaced(checkpoint, qwen3):
    # A terminal in another encoding (or a Latin-1 argument) hands Python lone surrogates: they are read as
    # U+FFFD, as undecodable bytes are everywhere else, instead of failing inside the tokenizer. Printed back
    # where Python writes UTF-8 strictly (a UTF-8 locale other than C), it is replaced, not a traceback.
    for env in ({}, {"PYTHONIOENCODING": "utf-8"}):
        done = subprocess.run([sys.executable, "-m", "nanoqwen", "sample", "--model", str(checkpoint), "--prompt",
                               b"caf\xe9", "--temperature", "0", "--max-new-tokens", "4", "--device", "cpu"],
                              capture_output=True, timeout=300, env={**os.environ, **env})
        assert done.returncode == 0 and b"Traceback" not in done.stderr, done.stderr
    tokenizer = qwen3
    assert tokenizer.encode("caf\udce9") == tokenizer.encode("caf\ufffd\ufffd\ufffd")


def test_init_command_writes_a_loadable_folder(tmp_path, capsys):
    from nanoqwen.cli import main

    done = run_cli("init", "--preset", "tiny", "--out", str(tmp_path / "m"), "--seed", "3",
                   "--set", "num_hidden_layers=1")  # once as users run it; the refusals below in this process
    assert done.returncode == 0, done.stderr
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["vocab_size"] == 151936 and config["num_hidden_layers"] == 1 and config["eos_token_id"] == 151645
    assert config["max_window_layers"] == 1  # as the preset's, every layer (no sliding window anyway)
    # Transformers' generate() stops at generation_config's ids: Qwen3's two, the end of a turn and of a document
    generation = json.loads((tmp_path / "m" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [151645, 151643] and generation["bos_token_id"] == 151643
    params = read_config(tmp_path / "m").num_params()  # the tied head counted once
    assert done.stdout == (f"wrote {tmp_path / 'm'}: {params / 1e6:.1f}M parameters, preset tiny with the qwen3 "
                           "tokenizer (vocab_size 151,936), seed 3\n")
    hf = load_hf_model(tmp_path / "m", dtype=torch.float32)
    model, _ = load_checkpoint(tmp_path / "m")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max() <= 1e-4
    capsys.readouterr()
    assert main(["init", "--preset", "tiny", "--out", str(tmp_path / "x"), "--set", "num_key_value_heads=3"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
    # A folder with weights (trained, downloaded, or an earlier init) keeps them unless --force.
    weights = (tmp_path / "m" / "model.safetensors").read_bytes()
    again = ["init", "--preset", "tiny", "--out", str(tmp_path / "m"), "--seed", "4", "--set", "num_hidden_layers=1"]
    assert main(again) == 2
    err = capsys.readouterr().err
    assert "already holds a checkpoint's weights" in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == weights
    assert main([*again, "--force"]) == 0 and (tmp_path / "m" / "model.safetensors").read_bytes() != weights
    # (--help lists the presets: test_train's test_train_and_init_help_list_each_preset_with_what_it_is)


def test_eval_command_scores_a_prepared_folder(checkpoint, tmp_path, capsys):
    from nanoqwen.cli import main
    from nanoqwen.data.prepare import prepare

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"{i}.txt").write_text(f"Document {i}: the quality of mercy is not strained. " * (i + 2))
    folder = prepare(str(corpus), "qwen3", tmp_path / "prepared", progress=False)
    done = run_cli("eval", "--model", str(checkpoint), "--data", str(folder), "--json", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    meta = json.loads((folder / "meta.json").read_text())
    assert result["tokens"] == meta["splits"]["val"]["tokens"] - 1
    # The bytes the tokens stand for, counted from the tokens, are the bytes prepare counted from the text;
    # the first token's are not scored, as nothing predicts it...
    tokenizer = load_tokenizer(folder)
    val = np.fromfile(folder / "val.bin", dtype=np.dtype(meta["dtype"]).newbyteorder("<")).tolist()
    assert tokenizer.text_bytes(val) == meta["splits"]["val"]["bytes"] and tokenizer.text_bytes(val[:1]) > 0
    assert result["bits_per_byte"] == pytest.approx(
        result["loss"] * result["tokens"] / 0.6931471805599453 / tokenizer.text_bytes(val[1:]), rel=1e-6)
    # ... so a prefix of windows divides by its own text's bytes (they were prorated by tokens)
    capsys.readouterr()
    assert main(["eval", "--model", str(checkpoint), "--data", str(folder), "--json", "--device", "cpu",
                 "--max-windows", "1", "--context", "5"]) == 0  # in this process: the command above ran as users run it
    prefix = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert prefix["tokens"] == 5 and prefix["bits_per_byte"] == pytest.approx(
        prefix["loss"] * 5 / 0.6931471805599453 / tokenizer.text_bytes(val[1:6]), rel=1e-6)


@pytest.mark.parametrize("stream", [False, True])
def test_sample_shows_control_characters_on_a_terminal_and_pipes_them_as_generated(checkpoint, monkeypatch, stream,
                                                                                   qwen3):
    # A model's ESC sequence or carriage return acted on the terminal (cleared it, wrote over the line), where the
    # chat shows them; piped or redirected, the text is as generated.
    from nanoqwen.chat import printable

    text = "a\x1b[2Jb\rc\x9bd"
    ids = qwen3.encode(text)
    monkeypatch.setattr("nanoqwen.generate.generate_ids", lambda *args, **kwargs: iter([[i] for i in ids]))

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    for output, shown in ((Terminal(), printable(text)), (io.StringIO(), text)):
        monkeypatch.setattr(sys, "stdout", output)
        assert main(["sample", "--model", str(checkpoint), "--prompt", "Hi\\r", "--max-new-tokens", str(len(ids)),
                     "--device", "cpu", *(["--stream"] if stream else [])]) == 0
        assert output.getvalue() == "Hi\r" + shown + "\n"  # the prompt, typed by the user, as given
    # A closed standard output (`>&-`, None in Python) is no terminal: sample runs, its text going nowhere (--stream
    # stopped with a traceback)
    monkeypatch.setattr(sys, "stdout", None)
    assert main(["sample", "--model", str(checkpoint), "--prompt", "Hi", "--device", "cpu",
                 *(["--stream"] if stream else [])]) == 0


def test_sample_redirected_to_a_file_on_windows_writes_utf8(checkpoint, monkeypatch):
    # A redirected stream on Windows is in the ANSI code page (cp1252), not the console's UTF-8: `nanoqwen sample >
    # out.txt` wrote "?" for every character outside it (Chinese, emoji), and errors naming such a file were escaped.
    # Streams that are not a console are UTF-8 there, as in Python's UTF-8 mode, for every command.
    def redirected() -> io.TextIOWrapper:
        return io.TextIOWrapper(io.BytesIO(), encoding="cp1252", errors="strict", write_through=True)

    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.delenv("PYTHONIOENCODING", raising=False)
    monkeypatch.setattr(sys, "stdout", redirected())
    monkeypatch.setattr(sys, "stderr", redirected())
    monkeypatch.setattr(sys, "stdin", redirected())  # a UTF-8 file piped into chat is read as one
    prompt = "从前 🙂 café"
    assert main(["sample", "--model", str(checkpoint), "--prompt", prompt, "--max-new-tokens", "1", "--device",
                 "cpu"]) == 0
    assert sys.stdout.buffer.getvalue().decode("utf-8").startswith(prompt)  # type: ignore[attr-defined]
    missing = checkpoint.parent / "从前"
    assert main(["sample", "--model", str(missing), "--prompt", "x"]) == 2
    assert str(missing) in sys.stderr.buffer.getvalue().decode("utf-8")  # type: ignore[attr-defined]
    monkeypatch.setattr(sys, "stderr", redirected())  # a bad command line's line, said before the command runs
    with pytest.raises(SystemExit):
        main(["sample", "--model", str(checkpoint), "--prompt", "x", "从前"])
    assert "unrecognized arguments: 从前" in sys.stderr.buffer.getvalue().decode("utf-8")  # type: ignore[attr-defined]
    assert sys.stdin.encoding == "utf-8"
