"""`nanoqwen eval`'s figures against an independent computation: Transformers' own tokenizer and Qwen3ForCausalLM
(its loss from `labels`) read from the same checkpoint folder, over the windows eval says it scores."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import transformers

from nanoqwen.checkpoint import config_for_tokenizer, save_checkpoint
from nanoqwen.cli import main
from nanoqwen.model import Qwen3
from nanoqwen.tokenizer import train_bpe
from tests.test_model import hf_eager, scramble, tiny_config

TEXT = "the cat sat on the mat and the dog sat on the log. "


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small model with a small BPE, its weights scrambled, then fitted a little to TEXT: its predictions differ
    from token to token, and some argmax guesses hit."""
    tokenizer = train_bpe([TEXT] * 20, 300)
    config = config_for_tokenizer(tiny_config(hidden_size=32, head_dim=16, intermediate_size=64), tokenizer,
                                  fit_vocab=True)
    model = Qwen3(config)
    scramble(model, seed=4)
    ids = torch.tensor([tokenizer.encode(TEXT * 4)])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(20):
        loss = torch.nn.functional.cross_entropy(model(ids[:, :-1])[0], ids[0, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    path = tmp_path_factory.mktemp("reference") / "ck"
    save_checkpoint(model, path, tokenizer)
    return path


def reference(checkpoint: Path, ids: list[int], context: int, labels: list[int] | None = None
              ) -> tuple[float, int, int]:
    """(total nats, argmax hits, tokens scored) of Transformers' Qwen3ForCausalLM on `ids` in consecutive windows
    of `context` predictions (window k predicts ids[k*context + 1 : (k+1)*context + 1]); `labels` (-100: not
    scored) as Transformers takes them, else every token."""
    hf = hf_eager(checkpoint)
    labels = ids if labels is None else labels
    nats, hits, count = 0.0, 0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, context):
            window = torch.tensor([ids[start:start + context + 1]])
            target = torch.tensor([labels[start:start + context + 1]])
            target[0, 0] = -100  # (predicted by the window before, or by nothing)
            scored = int((target[0, 1:] != -100).sum())
            if not scored:  # (Transformers' mean over no label is nan)
                continue
            out = hf(input_ids=window, labels=target)  # Transformers shifts the labels itself
            nats += out.loss.item() * scored
            hits += int(((out.logits[0, :-1].argmax(-1) == target[0, 1:]) & (target[0, 1:] != -100)).sum())
            count += scored
    return nats, hits, count


def eval_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    capsys.readouterr()
    assert main(["eval", *args, "--json", "--device", "cpu"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_a_text_files_figures_are_transformers_own(checkpoint: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    # Two documents parted by <|endoftext|>, non-ASCII bytes in them, over several windows of 16 (the last one short).
    # (the whitespace next to a separator is no part of a document: there is none here)
    documents = [("The café sat on the mat; naïve dogs sat on the log. " * 3 + TEXT).strip(),
                 ("Ein Hund saß auf dem Baumstamm. " * 2).strip()]
    (tmp_path / "t.txt").write_text("<|endoftext|>".join(documents), encoding="utf-8")
    result = eval_json(capsys, "--model", str(checkpoint), "--text-file", str(tmp_path / "t.txt"), "--context", "16")
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    eot = hf_tokenizer.convert_tokens_to_ids("<|endoftext|>")
    ids = [eot]  # each document after an <|endoftext|>, as documents follow one another in training
    for document in documents:
        ids += [*hf_tokenizer(document, add_special_tokens=False)["input_ids"], eot]
    ids = ids[:-1]  # the last document ends the file: nothing follows it
    assert (len(ids) - 1) % 16 and len(ids) > 3 * 16
    nats, hits, count = reference(checkpoint, ids, 16)
    text_bytes = sum(len(document.encode("utf-8")) for document in documents)  # the separator's none
    assert result["tokens"] == count == len(ids) - 1
    assert result["loss"] == pytest.approx(nats / count, rel=1e-5)
    assert 0 < hits < count and result["accuracy"] == hits / count
    assert result["perplexity"] == pytest.approx(math.exp(nats / count), rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(nats / math.log(2) / text_bytes, rel=1e-5)


def test_a_text_shorter_than_one_window_is_scored_whole(checkpoint: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    text = "A dog."
    (tmp_path / "short.txt").write_text(text)
    result = eval_json(capsys, "--model", str(checkpoint), "--text-file", str(tmp_path / "short.txt"))
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    ids = [hf_tokenizer.convert_tokens_to_ids("<|endoftext|>"), *hf_tokenizer(text)["input_ids"]]
    nats, _, count = reference(checkpoint, ids, 128)
    assert result["tokens"] == count == len(ids) - 1
    assert result["bits_per_byte"] == pytest.approx(nats / math.log(2) / len(text.encode()), rel=1e-5)


CHATS = [  # a reply that starts with a line break, and an é that two byte-level tokens of bpe:300 share
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "the colour of the sky?"},
     {"role": "assistant", "content": "blue, or grey"}, {"role": "user", "content": "and of grass?"},
     {"role": "assistant", "content": "green, mostly"}],
    [{"role": "user", "content": "what do cows drink?"}, {"role": "assistant", "content": "\nwater, café au lait\n"}],
    [{"role": "user", "content": "who wrote hamlet?"}, {"role": "assistant", "content": "shakespeare, around 1600"}],
]


def test_a_prepared_folders_assistant_figures_are_transformers_own(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    # The scored tokens found from the text (Transformers' offsets of each token), not from nanoqwen's marks: those
    # wholly inside an assistant's reply or its <|im_end|>; bits per byte over those tokens' own bytes.
    import re

    import numpy as np

    from nanoqwen.data.prepare import prepare
    from nanoqwen.tokenizer import load_tokenizer

    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "chats.jsonl").write_text("".join(
        json.dumps({"messages": chat}) + "\n" for _ in range(8) for chat in CHATS))
    data = prepare(str(tmp_path / "corpus"), "bpe:300", tmp_path / "data", val_fraction=0.3, progress=False)
    tokenizer = load_tokenizer(data)
    model = Qwen3(config_for_tokenizer(tiny_config(hidden_size=32, head_dim=16, intermediate_size=64), tokenizer,
                                       fit_vocab=True))
    scramble(model, seed=5)
    save_checkpoint(model, tmp_path / "ck", tokenizer)
    meta = json.loads((data / "meta.json").read_text())
    val = np.fromfile(data / "val.bin", dtype=np.dtype(meta["dtype"]).newbyteorder("<")).tolist()
    assert len(val) > 3 * 16
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "ck")
    text = hf_tokenizer.decode(val, skip_special_tokens=False)
    encoded = hf_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    assert encoded["input_ids"] == val  # the text read back is the one prepare encoded
    replies = [m.span(1) for m in re.finditer(r"<\|im_start\|>assistant\n(.*?<\|im_end\|>)", text, re.DOTALL)]
    offsets = encoded["offset_mapping"]
    added = {hf_tokenizer.convert_tokens_to_ids(token) for token in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")}
    for loss_on in ("all", "assistant"):
        inside = [loss_on == "all" or any(a <= start and end <= b for a, b in replies) for start, end in offsets]
        if loss_on == "assistant":
            assert not all(inside[1:])  # the test tells the assistant's tokens from the others
        # The split whole (its bytes from meta.json's count), and five windows of it (from their tokens): the text
        # the scored tokens stand for (a character two byte-level tokens share counted once), an added token's none
        # (<|im_end|>, as prepare counts a chat's text); the first token is predicted by nothing.
        for args, n in (([], len(val)), (["--max-windows", "5"], 5 * 16 + 1)):
            chars = {c for (start, end), scored, i in zip(offsets[1:n], inside[1:n], val[1:n])
                     if scored and i not in added for c in range(start, end)}
            text_bytes = sum(len(text[c].encode("utf-8")) for c in chars)
            nats, hits, count = reference(tmp_path / "ck", val[:n], 16,
                                          [i if ok else -100 for i, ok in zip(val[:n], inside)])
            result = eval_json(capsys, "--model", str(tmp_path / "ck"), "--data", str(data), "--loss-on", loss_on,
                               "--context", "16", *args)
            assert result["tokens"] == count
            assert result["loss"] == pytest.approx(nats / count, rel=1e-5)
            assert result["accuracy"] == hits / count
            assert result["bits_per_byte"] == pytest.approx(nats / math.log(2) / text_bytes, rel=1e-5)


def test_a_folders_own_added_word_is_text_whose_bytes_count(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                             ) -> None:
    # A tokenizer folder's non-special added word ("foo_bar") keeps its id in a text and in a chat's turns: it is
    # text there, 7 bytes, as prepare counts a split's bytes (eval --data divides by those, less the first token's).
    # Counted as none from the ids, bits per byte of a split's windows (training's val_bpb, eval --max-windows)
    # divided by fewer bytes than the split whole's, 18% fewer here.
    import numpy as np

    from nanoqwen.data.prepare import prepare
    from nanoqwen.tokenizer import load_tokenizer

    tokenizer = train_bpe(["the weather in paris is sunny today"] * 50, 300)
    tokenizer.hf.add_tokens(["foo_bar"])
    (tmp_path / "tokenizer").mkdir()
    tokenizer.save(tmp_path / "tokenizer")
    (tmp_path / "corpus").mkdir()
    for i in range(4):
        (tmp_path / "corpus" / f"{i}.txt").write_text("sunny foo_bar today in paris. " * 5)
    chat = [{"role": "user", "content": "is foo_bar sunny?"}, {"role": "assistant", "content": "foo_bar is, today"}]
    (tmp_path / "corpus" / "chats.jsonl").write_text((json.dumps({"messages": chat}) + "\n") * 4)
    data = prepare(str(tmp_path / "corpus"), str(tmp_path / "tokenizer"), tmp_path / "data", val_fraction=0.3,
                   progress=False)
    tokenizer = load_tokenizer(data)
    meta = json.loads((data / "meta.json").read_text())
    for split in ("train", "val"):
        ids = np.fromfile(data / f"{split}.bin", dtype=np.dtype(meta["dtype"]).newbyteorder("<")).tolist()
        assert tokenizer.token_id("foo_bar") in ids
        assert tokenizer.text_bytes(ids) == meta["splits"][split]["bytes"], split
