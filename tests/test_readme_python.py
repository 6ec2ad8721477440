"""The README's `### From Python` recipe, run as written: its python blocks in one namespace, in a folder of their own,
with the lines that name a checkpoint folder and a corpus (`folder = "..."`, `dataset = "..."`) pointed at a tiny
checkpoint and corpus made here. The checks are on what the blocks compute, each against a reference worked out
apart from the function the recipe shows."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch

from nanoqwen.checkpoint import config_for_tokenizer, save_checkpoint
from nanoqwen.generate import SamplingParams, generate
from nanoqwen.model import Qwen3
from nanoqwen.tokenizer import Tokenizer, train_bpe
from tests.test_model import scramble, tiny_config
from tests.train_helpers import one_thread, write_corpus

README = Path(__file__).resolve().parent.parent / "README.md"
SECTION = "### From Python"
PROMPT = "ROMEO:"  # the prompt the recipe's generate and stream_text calls continue


def recipe_blocks() -> list[str]:
    """The python code blocks of the README's SECTION (up to the next heading)."""
    text = README.read_text(encoding="utf-8")
    start = text.index(f"\n{SECTION}\n")
    end = re.compile(r"^#{2,3} ", re.M).search(text, start + len(SECTION) + 2)
    return re.findall(r"^```python\n(.*?)^```$", text[start:end.start() if end else None], re.M | re.S)


def pointed_at(code: str, name: str, path: Path) -> str:
    """`code` with its one `name = "..."` line naming `path` instead (the recipe's convention for what a reader
    fills in)."""
    code, count = re.subn(rf'^{name} = "[^"\n]*"', f"{name} = {str(path)!r}", code, flags=re.M)
    assert count == 1, f'the README\'s {SECTION} should set {name} = "..." once, on a line of its own'
    return code


def argmax_decoding(model: Qwen3, tokenizer: Tokenizer, prompt: str, steps: int) -> str:
    """Greedy decoding the plain way: the whole sequence through the model again for every token, no cache."""
    ids, new = tokenizer.encode(prompt), []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(torch.tensor([ids + new]))[0, -1].argmax())
            if token in tokenizer.stop_ids:
                break
            new.append(token)
    return tokenizer.decode(new, skip_special_tokens=True)


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """A tiny random model (weights spread wide, so no two logits nearly tie) with a BPE of its own."""
    corpus = write_corpus(tmp_path / "texts", documents=6, sentences=40)
    tokenizer = train_bpe((path.read_text() for path in sorted(corpus.iterdir())), 300)
    config = config_for_tokenizer(tiny_config(hidden_size=32, head_dim=16, intermediate_size=64), tokenizer,
                                  fit_vocab=True)
    torch.manual_seed(0)
    model = Qwen3(config)
    scramble(model, seed=5)
    save_checkpoint(model, tmp_path / "ck", tokenizer)
    return tmp_path / "ck"


def test_the_readme_python_recipe_computes_what_it_says(checkpoint: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = recipe_blocks()
    assert len(blocks) == 2
    corpus = write_corpus(tmp_path / "my_texts", documents=8, sentences=40, seed=1)
    code = pointed_at(blocks[0], "folder", checkpoint) + "\n" + pointed_at(blocks[1], "dataset", corpus)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # the run and its prepared data land here
    monkeypatch.setenv("NANOQWEN_CACHE", str(tmp_path / "cache"))
    ns: dict = {}
    with one_thread():  # as the training tests run (two threads stall on a loaded machine)
        exec(compile(code, "README.md (From Python)", "exec"), ns)

    model, tok, ids, logits = ns["model"], ns["tok"], ns["ids"], ns["logits"]
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert ns["text"] == argmax_decoding(model, tok, PROMPT, ns["greedy"].max_new_tokens)
    assert ns["streamed"] and ns["streamed"] == generate(model, tok, [PROMPT], ns["sampled"])[0].text  # its seed
    assert ns["prompt"] == "<|im_start|>user\nWho are you?<|im_end|>\n<|im_start|>assistant\n"  # ChatML
    assert ns["reply"] == argmax_decoding(model, tok, ns["prompt"], ns["greedy"].max_new_tokens)
    assert ns["max_diff"] < 1e-4

    config, trained = ns["config"], ns["trained"]
    assert Qwen3(config).num_params() == 754_560  # the count the README's comment gives
    assert ns["status"] == 0
    for item in ns["overrides"]:  # the run trained the shape asked for, on a BPE of the corpus
        name, value = item.split("=")
        assert getattr(config, name) == getattr(trained.config, name) == int(value)
    assert ns["trained_tok"].vocab_size <= trained.config.vocab_size < config.vocab_size  # fewer ids than 2,048
    assert trained.num_params() == dataclasses.replace(config, vocab_size=trained.config.vocab_size).num_params()
    assert (work / "runs" / "from-python" / "last").is_dir()


def test_generate_refuses_a_lone_prompt(checkpoint: Path) -> None:
    """generate takes a list of prompts; a string alone was read as one prompt a character, silently."""
    from nanoqwen.checkpoint import load_checkpoint

    model, tok = load_checkpoint(checkpoint)
    with pytest.raises(TypeError, match=r"a list of prompts"):
        generate(model, tok, PROMPT, SamplingParams(max_new_tokens=2))  # type: ignore[arg-type]
