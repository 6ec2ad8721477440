"""What `nanoqwen eval --text-file` refuses to score: data files prepare reads, and files that are not text."""

from __future__ import annotations

import io
import json
import math
import random
import re
import sys
import unicodedata
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanoqwen.checkpoint import config_for_tokenizer, save_checkpoint
from nanoqwen.cli import main
from nanoqwen.data.sources import NOT_UTF8
from nanoqwen.model import Qwen3
from nanoqwen.tokenizer import train_bpe
from tests.test_model import tiny_config

TEXT = "the cat sat on the mat and the dog sat on the log. "


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small random model with a small BPE (a Qwen3 vocabulary would only make it slower)."""
    tokenizer = train_bpe([TEXT] * 20, 300)
    config = config_for_tokenizer(tiny_config(hidden_size=32, head_dim=16, intermediate_size=64), tokenizer,
                                  fit_vocab=True)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("eval") / "ck"
    save_checkpoint(Qwen3(config), path, tokenizer)
    return path


def one_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    return err


def test_data_files_are_pointed_at_prepare(checkpoint: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    # Scored as bytes, a table or JSON records measured their syntax (a table warned of undecodable bytes and
    # still exited 0): their text is what prepare reads.
    pq.write_table(pa.table({"text": [TEXT] * 8}), tmp_path / "t.parquet")
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": TEXT}) + "\n" for _ in range(8)))
    (tmp_path / "t.json").write_text(json.dumps([{"text": TEXT}] * 8))
    (tmp_path / "t.pdf").write_bytes(b"%PDF-1.4\n" + bytes(range(256)) * 4)
    for name in ("t.parquet", "t.jsonl", "t.json", "t.pdf"):
        path = tmp_path / name
        assert main(["eval", "--model", str(checkpoint), "--text-file", str(path), "--device", "cpu"]) == 2
        assert one_line(capsys) == (
            f"nanoqwen eval: error: {path} is a {path.suffix} file, which eval does not read as text; prepare it, "
            f"then score that: `nanoqwen prepare --dataset {path} --tokenizer {checkpoint} --out DIR`"
            + ("" if name == "t.pdf" else " (with --text-column NAME if the text is not in 'text')")
            + f", then `nanoqwen eval --model {checkpoint} --data DIR`")
    # Done as said, it scores the records' text.
    data = tmp_path / "data"
    assert main(["prepare", "--dataset", str(tmp_path / "t.jsonl"), "--tokenizer", str(checkpoint),
                 "--out", str(data)]) == 0
    assert main(["eval", "--model", str(checkpoint), "--data", str(data), "--device", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["tokens"] > 0


def read_text_file(path: Path, model: str) -> tuple[list[str], int]:
    """The documents of eval's --text-file, read whole, and its count of undecodable bytes replaced."""
    from nanoqwen.evaluate import READ_PART_BYTES, open_text_file

    with open_text_file(path, model) as text:
        text.start(READ_PART_BYTES)
        documents = [piece for piece, _ in text.pieces(None)]
        text.check()
        return documents, text.replaced


def test_a_compressed_text_file_is_scored_as_its_text(tmp_path: Path) -> None:
    # A .txt.gz was scored as its compressed bytes (a small one passed as text with a warning): prepare reads its
    # text. Compressed records are pointed at prepare, as uncompressed ones are.
    import gzip

    from nanoqwen.errors import NanoQwenError

    text = "the cat sat\n<|endoftext|>\nthe dog sat. " * 40
    (tmp_path / "a.txt").write_text(text)
    (tmp_path / "a.txt.gz").write_bytes(gzip.compress(text.encode()))
    documents = read_text_file(tmp_path / "a.txt", "ck")
    assert read_text_file(tmp_path / "a.txt.gz", "ck") == documents and documents[1] == 0 and len(documents[0]) == 41
    (tmp_path / "cut.txt.gz").write_bytes((tmp_path / "a.txt.gz").read_bytes()[:40])
    with pytest.raises(NanoQwenError, match="cut.txt.gz: damaged .gz data"):
        read_text_file(tmp_path / "cut.txt.gz", "ck")
    rows = tmp_path / "t.jsonl.gz"
    rows.write_bytes(gzip.compress(json.dumps({"text": TEXT}).encode()))
    with pytest.raises(NanoQwenError, match=f"^{rows} is a .jsonl file, which eval does not read as text; prepare it"):
        read_text_file(rows, "ck")


def test_a_compressed_file_of_any_text_is_scored_as_its_text(tmp_path: Path) -> None:
    # eval scores any text file (a .log, a .py), but app.log.gz or notes.gz was scored as its compressed bytes (a
    # small one with only a warning); an archive holds files, not a text.
    import gzip
    import lzma

    from nanoqwen.errors import NanoQwenError

    (tmp_path / "app.log.gz").write_bytes(gzip.compress(b"GET /index.html 200\n"))
    (tmp_path / "notes.xz").write_bytes(lzma.compress("caf\u00e9 notes".encode()))
    assert read_text_file(tmp_path / "app.log.gz", "ck") == (["GET /index.html 200\n"], 0)
    assert read_text_file(tmp_path / "notes.xz", "ck") == (["caf\u00e9 notes"], 0)
    (tmp_path / "cut.log.gz").write_bytes((tmp_path / "app.log.gz").read_bytes()[:20])
    with pytest.raises(NanoQwenError, match="cut.log.gz: damaged .gz data"):
        read_text_file(tmp_path / "cut.log.gz", "ck")
    (tmp_path / "texts.tar.gz").write_bytes(gzip.compress(b"a.txt" + b"\0" * 507))
    with pytest.raises(NanoQwenError, match=re.escape(f"{tmp_path / 'texts.tar.gz'} is a .tar.gz archive; extract the "
                                                      "text file to score from it")):
        read_text_file(tmp_path / "texts.tar.gz", "ck")


def test_a_file_that_is_mostly_not_utf8_is_refused(checkpoint: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare skips such a file as noise; eval scored it and exited 0.
    noise = tmp_path / "noise.bin"
    noise.write_bytes(random.Random(0).randbytes(4000))
    assert main(["eval", "--model", str(checkpoint), "--text-file", str(noise), "--device", "cpu"]) == 2
    err = one_line(capsys)
    assert err.startswith(f"nanoqwen eval: error: text file {noise} is not text: ") and err.endswith(
        "characters are undecodable or NUL (a binary file, or text in another encoding: convert it to UTF-8)"), err
    # UTF-16 without a byte-order mark decodes as UTF-8, a NUL after every ASCII letter: scored, it measured noise.
    utf16 = tmp_path / "utf16.txt"
    utf16.write_bytes((TEXT * 4).encode("utf-16-le"))
    assert main(["eval", "--model", str(checkpoint), "--text-file", str(utf16), "--device", "cpu"]) == 2
    assert one_line(capsys) == (f"nanoqwen eval: error: text file {utf16} is not text: 204 of its 408 characters "
                                "are undecodable or NUL (a binary file, or text in another encoding: convert it to "
                                "UTF-8)")
    # A few bad bytes in real text are still scored, with a warning (and a text file of any name is read).
    mostly = tmp_path / "notes.log"
    mostly.write_bytes(TEXT.encode() * 10 + b"\xff" * 65)
    assert main(["eval", "--model", str(checkpoint), "--text-file", str(mostly), "--device", "cpu", "--json"]) == 0
    captured = capsys.readouterr()
    assert "replaced 65 undecodable byte sequences" in captured.err
    assert json.loads(captured.out.strip().splitlines()[-1])["tokens"] > 0


def test_figures_with_no_value_are_null_in_json_lines() -> None:
    # Scored tokens with no text bytes (special tokens only) have no bits per byte: Python's json wrote NaN,
    # which jq, JavaScript and strict JSON libraries refuse (eval --json's last line, metrics.jsonl's records).
    from nanoqwen.evaluate import metrics
    from nanoqwen.io import json_line

    def strict(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    line = json_line({**metrics(2.0, 1, 4, num_bytes=0), "val_loss": float("inf")})
    parsed = json.loads(line, parse_constant=strict)
    assert parsed["bits_per_byte"] is None and parsed["val_loss"] is None and parsed["loss"] == 0.5


def test_max_windows_reads_only_the_prefix_of_a_split_it_scores(checkpoint: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # `eval --split train --max-windows 4` read the whole split into memory (8 bytes a token) and checked every id
    # of it, to score a few windows: minutes and gigabytes on a large corpus.
    import nanoqwen.evaluate
    from nanoqwen.data.loader import TokenSplit
    from nanoqwen.data.prepare import prepare
    from nanoqwen.tokenizer import load_tokenizer

    (tmp_path / "c.txt").write_text(TEXT * 40)
    data = prepare(str(tmp_path / "c.txt"), str(checkpoint), tmp_path / "data", progress=False)
    read, split_slices = [], nanoqwen.evaluate.split_slices
    monkeypatch.setattr(nanoqwen.evaluate, "split_slices", lambda *a: read.extend(split_slices(*a)) or read)
    assert main(["eval", "--model", str(checkpoint), "--data", str(data), "--split", "train", "--max-windows", "2",
                 "--context", "8", "--device", "cpu", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    train = TokenSplit.open(data, "train").prefix(1 << 30)
    assert read == [(0, 17)] and len(train) > 17 and result["tokens"] == 16
    assert result["bits_per_byte"] == pytest.approx(  # the bytes of the prefix's text, as before
        result["loss"] * 16 / 0.6931471805599453 / load_tokenizer(checkpoint).text_bytes(train[1:17].tolist()))


def test_a_split_is_scored_a_slice_at_a_time(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # `eval --data DIR --split train` read the whole split into memory at 8 bytes a token (4.9 GB for 608M tokens),
    # and under --loss-on assistant a mask of it too: slices of it are scored, to the same figures.
    import nanoqwen.evaluate
    from nanoqwen.checkpoint import load_checkpoint
    from nanoqwen.data.loader import TokenSplit
    from nanoqwen.data.prepare import prepare
    from nanoqwen.evaluate import assistant_scoring, evaluate_tokens
    from nanoqwen.tokenizer import load_tokenizer
    from nanoqwen.train import chat_marks

    chats = [[{"role": "user", "content": f"question {i}: what is {i} and {i}?"},
              {"role": "assistant", "content": f"the cat sat on {i} mats, and the dog on {i + 1} logs"}]
             for i in range(12)]
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps({"messages": chat}) + "\n" for chat in chats))
    data = prepare(str(tmp_path / "chats.jsonl"), "bpe:300", tmp_path / "data", progress=False)
    tokenizer = load_tokenizer(data)
    torch.manual_seed(0)
    model = Qwen3(config_for_tokenizer(tiny_config(hidden_size=32, head_dim=16, intermediate_size=64), tokenizer,
                                       fit_vocab=True))
    save_checkpoint(model, tmp_path / "ck", tokenizer)
    model = load_checkpoint(tmp_path / "ck")[0]  # as eval loads it
    split = TokenSplit.open(data, "train")
    tokens = split.prefix(len(split))
    assert len(tokens) > 10 * 16
    sliced, split_slices = [], nanoqwen.evaluate.split_slices
    monkeypatch.setattr(nanoqwen.evaluate, "split_slices", lambda *a: sliced.append(split_slices(*a)) or sliced[-1])

    def evaluated(loss_on: str) -> dict[str, float]:
        assert main(["eval", "--model", str(tmp_path / "ck"), "--data", str(data), "--split", "train", "--context", "8",
                     "--batch-size", "2", "--loss-on", loss_on, "--device", "cpu", "--json"]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    for loss_on in ("all", "assistant"):
        figures = []
        for slice_tokens in (1 << 30, 1):  # the split in one slice, as before; a slice per forward (2 windows of 8)
            monkeypatch.setattr(nanoqwen.evaluate, "SLICE_TOKENS", slice_tokens)
            figures.append(evaluated(loss_on))
        assert figures[1] == figures[0]  # the same figures, to the last bit
        # read a slice at a time: the first 17 tokens, the 16 after them and the one they share, ...
        assert sliced[-2] == [(0, len(tokens))]
        assert sliced[-1] == [(start, min(start + 17, len(tokens))) for start in range(0, len(tokens) - 1, 16)]
        # the figures of the split whole, as scored before (the model loaded as eval loads it, but for the last bits)
        scored, num_bytes = None, split.num_bytes - tokenizer.text_bytes(tokens[:1].numpy())
        if loss_on == "assistant":
            scored, num_bytes = assistant_scoring(tokens, chat_marks(data), tokenizer)
            assert 0 < scored.sum() < len(tokens) - 1
        assert figures[0] == pytest.approx(evaluate_tokens(model, tokens, num_bytes, 8, 2, scored=scored), rel=1e-6)


def test_max_windows_encodes_only_the_start_of_a_text_file_it_scores(checkpoint: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str],
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # `eval --text-file book.txt --max-windows 1` encoded the whole file to score its first window: a minute for a
    # 50 MB file, as long for the first 129 tokens as for all of them.
    import nanoqwen.data.prepare
    from nanoqwen.checkpoint import load_checkpoint
    from nanoqwen.evaluate import evaluate_tokens

    lines = [f"line {i}: the cat sat on the mat and the dog sat on the log.\n" for i in range(500)]
    (tmp_path / "t.txt").write_text("".join(lines))
    encoded, encode_texts = [], nanoqwen.data.prepare.encode_texts
    monkeypatch.setattr(nanoqwen.data.prepare, "encode_texts",
                        lambda tokenizer, texts: encoded.extend(texts) or encode_texts(tokenizer, texts))
    assert main(["eval", "--model", str(checkpoint), "--text-file", str(tmp_path / "t.txt"), "--max-windows", "2",
                 "--context", "8", "--device", "cpu", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert sum(map(len, encoded)) < len(lines[0]) * 10  # a few lines of the 500
    # The figures of the first 17 ids of the whole file, as before.
    model, tokenizer = load_checkpoint(checkpoint)
    ids = torch.tensor([tokenizer.eot_id, *tokenizer.encode("".join(lines))][:17])
    assert result == pytest.approx(evaluate_tokens(model, ids, tokenizer.text_bytes(ids[1:].tolist()), 8))


def test_a_context_up_to_the_models_own_is_taken(checkpoint: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    context = json.loads((checkpoint / "config.json").read_text())["max_position_embeddings"]
    (tmp_path / "t.txt").write_text(TEXT * 3)
    command = ["eval", "--model", str(checkpoint), "--text-file", str(tmp_path / "t.txt"), "--device", "cpu", "--json"]
    assert main([*command, "--context", str(context)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["tokens"] > 0
    import nanoqwen.generate

    def no_load(*args: object) -> None:
        raise AssertionError("the model was loaded before --context was checked")

    monkeypatch.setattr(nanoqwen.generate, "load_for_inference", no_load)  # one too long costs no wait for weights
    assert main([*command, "--context", str(context + 1)]) == 2
    assert f"--context {context + 1} is longer than the model's context ({context} positions)" in one_line(capsys)


def test_a_data_folder_that_is_not_one_is_refused_before_the_model_loads(checkpoint: Path, tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str],
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # As a --text-file is: a mistyped --data cost the wait for the model's weights (minutes for a large one).
    import nanoqwen.generate

    def no_load(*args: object) -> None:
        raise AssertionError("the model was loaded before --data was checked")

    monkeypatch.setattr(nanoqwen.generate, "load_for_inference", no_load)
    assert main(["eval", "--model", str(checkpoint), "--data", str(tmp_path / "nodata"), "--device", "cpu"]) == 2
    assert "nodata does not exist" in one_line(capsys)
    # A shard of a prepared folder, given for the folder: it was told to prepare that binary file as a corpus.
    data = tmp_path / "data"
    data.mkdir()
    for name in ("meta.json", "val.bin"):
        (data / name).write_bytes(b"{}")
    assert main(["eval", "--model", str(checkpoint), "--data", str(data / "val.bin"), "--device", "cpu"]) == 2
    assert one_line(capsys) == (f"nanoqwen eval: error: {data / 'val.bin'} is a file of the prepared folder {data}; "
                                "give that folder")
    # Data of another tokenizer (the command to prepare it again names the source its meta.json records), and
    # --loss-on assistant of a folder with no conversations: refused once the weights had loaded.
    from nanoqwen.data.prepare import prepare

    (tmp_path / "plain.txt").write_text(TEXT * 4)
    (tmp_path / "other").mkdir()
    train_bpe(["a quite different text, so another vocabulary"] * 20, 300).save(tmp_path / "other")
    other = prepare(str(tmp_path / "plain.txt"), str(tmp_path / "other"), tmp_path / "other-data", progress=False)
    assert main(["eval", "--model", str(checkpoint), "--data", str(other)]) == 2
    assert one_line(capsys) == (f"nanoqwen eval: error: {other} was tokenized with a different tokenizer than "
                                f"{checkpoint}'s, so its ids mean other tokens to this model; prepare the text with "
                                f"`nanoqwen prepare --dataset {tmp_path / 'plain.txt'} --tokenizer {checkpoint} "
                                "--out DIR`")
    prepared = prepare(str(tmp_path / "plain.txt"), str(checkpoint), tmp_path / "prepared", progress=False)
    assert main(["eval", "--model", str(checkpoint), "--data", str(prepared), "--loss-on", "assistant"]) == 2
    assert one_line(capsys) == (f"nanoqwen eval: error: --loss-on assistant needs conversations, and {prepared} holds "
                                "none; prepare chat records (see the README's recipe) or leave --loss-on out")


def test_a_text_file_is_encoded_as_prepare_encodes_its_documents(checkpoint: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    # eval scored "<|endoftext|>" written in a text as the one id, then as text, and a file as one document:
    # TinyStories' .txt files part their stories with it, which prepare reads as documents, each ended by the id.
    # Another added token written in one is text, the text is NFC-normalized as prepare's is, and bits per byte are
    # over the bytes prepare counts (the separators and the line breaks around them are in no document).
    from nanoqwen.data.prepare import load_meta, prepare

    text = "the cat sat\n<|endoftext|>\nthe dog sat <|im_start|> on the cafe\u0301 mat. " * 3
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text(text)
    (tmp_path / "c" / "b.txt").write_text("the log")  # held out as val: a.txt's documents are train, in order
    data = prepare(str(tmp_path / "c"), str(checkpoint), tmp_path / "data", progress=False)
    meta = load_meta(data)
    train, documents = meta["splits"]["train"], text.split("\n<|endoftext|>\n")
    assert train["documents"] == meta["parted_documents"] == 4
    assert train["bytes"] == len(unicodedata.normalize("NFC", "".join(documents)).encode())
    assert main(["eval", "--model", str(checkpoint), "--text-file", str(tmp_path / "c" / "a.txt"), "--device", "cpu",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["tokens"] == train["tokens"] - 1  # the documents' ids, each after those before (train's end in one)
    assert result["bits_per_byte"] == pytest.approx(result["loss"] * result["tokens"] / math.log(2) / train["bytes"])
    for name, text, problem in [("none.txt", "<|endoftext|>\n\n<|endoftext|>\n", "holds nothing but <|endoftext|> "
                                 "separators and blanks"), ("blank.txt", " \n\n", "is empty")]:
        (tmp_path / name).write_text(text)
        assert main(["eval", "--model", str(checkpoint), "--text-file", str(tmp_path / name), "--device", "cpu"]) == 2
        assert one_line(capsys) == f"nanoqwen eval: error: text file {tmp_path / name} {problem}; give it some " \
            "text to score"


def test_the_help_names_eval_flags_as_the_other_commands_do(capsys: pytest.CaptureFixture[str]) -> None:
    from nanoqwen.cli import build_parser

    def model_help(command: str) -> str:
        sub = next(a for a in build_parser(command)._actions if a.dest == "command").choices[command]
        return next(a.help for a in sub._actions if a.dest == "model")

    # eval's said "checkpoint folder" alone, where sample, chat and serve say which folder that is.
    assert {command: model_help(command) for command in ("eval", "sample", "chat", "serve")} == dict.fromkeys(
        ("eval", "sample", "chat", "serve"), "checkpoint folder (e.g. runs/NAME/best)")
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert "(--text-file FILE | --data DIR)" in capsys.readouterr().out  # (it said TEXT_FILE and DATA)


def test_a_dash_scores_the_text_piped_in(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # `cat notes.txt | nanoqwen eval --text-file -` looked for a file named "-". The bytes piped in are read as a
    # file's are (UTF-8 or a byte-order mark's encoding, line ends as written, parted at <|endoftext|>), so they
    # give the figures the file does.
    monkeypatch.chdir(tmp_path)
    raw = b"\xef\xbb\xbf" + "the caf\u00e9 sat\r\n<|endoftext|>\nthe dog sat on the log. ".encode() * 6
    (tmp_path / "t.txt").write_bytes(raw)

    def pipe(piped: bytes | None) -> None:  # None: a closed standard input, which Python gives as None
        monkeypatch.setattr(sys, "stdin", None if piped is None else io.TextIOWrapper(io.BytesIO(piped)))

    def scored(text_file: str, *extra: str) -> tuple[dict, str]:
        assert main(["eval", "--model", str(checkpoint), "--text-file", text_file, "--device", "cpu", "--json",
                     *extra]) == 0, capsys.readouterr().err
        captured = capsys.readouterr()
        return json.loads(captured.out.strip().splitlines()[-1]), captured.err

    named = scored("t.txt")[0]
    pipe(raw)
    assert scored("-") == (named, "") and named["tokens"] > 50
    pipe(raw)
    assert scored("-", "--max-windows", "1", "--context", "8")[0] == scored("t.txt", "--max-windows", "1",
                                                                           "--context", "8")[0]
    (tmp_path / "-").write_bytes(raw)  # a file named "-" is read as ./-, as Unix tools read one
    pipe(b"the dog")
    assert scored("./-")[0] == named and sys.stdin.read() == "the dog"
    # A standard input of text alone (no bytes beneath: io.StringIO, as a Python caller may set) is read too.
    monkeypatch.setattr(sys, "stdin", io.StringIO(raw.decode("utf-8-sig")))
    assert scored("-")[0] == named
    pipe(raw + b"\xff" * 3)  # undecodable bytes are warned of, naming where they came from
    assert "warning: standard input is not UTF-8 text: replaced 3 undecodable" in scored("-")[1]
    # Nothing piped in (an empty pipe, /dev/null, a closed standard input) is eval's line for an empty text.
    for piped, problem in ((b"", "is empty"), (b" \n", "is empty"), (None, "is empty"),
                           (b"<|endoftext|>\n", "holds nothing but <|endoftext|> separators and blanks")):
        pipe(piped)
        assert main(["eval", "--model", str(checkpoint), "--text-file", "-", "--device", "cpu"]) == 2
        assert one_line(capsys) == f"nanoqwen eval: error: standard input {problem}; give it some text to score"

    class Terminal(io.BytesIO):
        def isatty(self) -> bool:  # text typed in: told how to end it, where eval seemed to hang
            return True

        def read(self, size: int | None = -1) -> bytes:
            raise OSError(5, "Input/output error")  # (its terminal closed)

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(Terminal()))
    assert main(["eval", "--model", str(checkpoint), "--text-file", "-", "--device", "cpu"]) == 2
    assert capsys.readouterr().err == (
        "nanoqwen eval: reading the text to score from standard input; end it with Ctrl-D\n"
        "nanoqwen eval: error: standard input cannot be read (Input/output error); pipe the text into it, or give "
        "--text-file FILE\n")


def test_max_windows_reads_only_the_start_of_a_text_it_scores(checkpoint: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # `eval --text-file big.txt --max-windows 2` read and decoded the whole file to encode the start it scores: a
    # 5 GB file cost 5 GB and its decoded text in memory. Only a start is read now (16 bytes a token), and more only
    # where the windows need it, so a tail no read reaches is never judged: the NULs here, which read whole make the
    # file "not text", are past it, and the figures are those of the text before them. A compressed file and
    # standard input are read so too.
    import gzip

    head = "".join(f"line {i}: the caf\u00e9 sat on the mat\r\n<|endoftext|>\r\n" for i in range(40)).encode()
    (tmp_path / "head.txt").write_bytes(head)
    (tmp_path / "nul.txt").write_bytes(head + b"\0" * (1 << 20))
    (tmp_path / "nul.txt.gz").write_bytes(gzip.compress(head + b"\0" * (1 << 22)))

    def scored(text_file: str, *extra: str) -> tuple[int, str]:
        code = main(["eval", "--model", str(checkpoint), "--text-file", text_file, "--device", "cpu", "--json", *extra])
        captured = capsys.readouterr()
        return code, captured.out.strip().splitlines()[-1] if code == 0 else captured.err

    windows = ("--max-windows", "2", "--context", "8")
    code, expected = scored(str(tmp_path / "head.txt"), *windows)
    assert code == 0 and json.loads(expected)["tokens"] == 16
    for name in ("nul.txt", "nul.txt.gz"):
        assert scored(str(tmp_path / name), *windows) == (0, expected)
        code, err = scored(str(tmp_path / name))  # read whole: refused, as before
        assert code == 2 and f"text file {tmp_path / name} is not text: " in err
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(head + b"\0" * (1 << 20))))
    assert scored("-", *windows) == (0, expected)
    # What is read is judged: a start of NULs is no text, said of the characters read.
    (tmp_path / "nul-first.txt").write_bytes(b"\0" * (1 << 20) + head)
    code, err = scored(str(tmp_path / "nul-first.txt"), *windows)
    assert code == 2 and err.endswith(f"text file {tmp_path / 'nul-first.txt'} is not text: 272 of the first 272 "
                                      "characters are undecodable or NUL (a binary file, or text in another encoding: "
                                      "convert it to UTF-8)\n")
    # A start of blanks and separators alone is read on from: the documents after it are scored.
    (tmp_path / "blank-first.txt").write_bytes(b"\n<|endoftext|>\n" * (1 << 13) + head)
    assert scored(str(tmp_path / "blank-first.txt"), *windows) == (0, expected)
    # and a file of them alone is refused as such, though its start read ends inside one (272 bytes: "...\n<|endof")
    (tmp_path / "separators.txt").write_bytes(b"\n<|endoftext|>\n" * 100)
    code, err = scored(str(tmp_path / "separators.txt"), *windows)
    assert (code, err) == (2, f"nanoqwen eval: error: text file {tmp_path / 'separators.txt'} holds nothing but "
                              "<|endoftext|> separators and blanks; give it some text to score\n")


def test_a_text_read_a_part_at_a_time_gives_the_ids_of_the_whole(checkpoint: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # The parts read may end inside a character, a "\r\n", an <|endoftext|> or a line a word follows: what is read
    # is decoded as the whole is, and cut only where no id spans, so the ids are those of the whole text's documents
    # as prepare encodes them, wherever the reads (and the parts of one) end, and however long the pieces encoded.
    import nanoqwen.evaluate
    from nanoqwen.data.prepare import encode_texts
    from nanoqwen.data.sources import separated_documents, universal_newlines
    from nanoqwen.evaluate import TextSource, text_ids
    from nanoqwen.tokenizer import load_tokenizer

    monkeypatch.setattr(nanoqwen.evaluate, "READ_PART_BYTES", 5)
    tokenizer = load_tokenizer(checkpoint)
    text = "".join(f"caf\u00e9 {i} \U0001f600 \ufffd sat\r\n" + ("\r\n<|endoftext|>\r\nthe\rmat " if i % 3 else "")
                   for i in range(200)) + "\u4e2d" * 60 + "x" * 90 + "  \n<|endoftext|> the  end \n"  # (a line held)
    for raw in (text.encode() + b"\xff\xfe ok", text.encode("utf-16")):
        whole = TextSource(io.BytesIO(raw).read, "t")
        whole.start(len(raw) + 1)
        documents = separated_documents(universal_newlines(whole.text))
        encoded = encode_texts(tokenizer, documents)
        whole_ids = np.concatenate([[tokenizer.eot_id], *(document.ids for document in encoded)])
        for first in range(4, 70, 11):
            for max_tokens in (None, 5, 17, 60):
                read = TextSource(io.BytesIO(raw).read, "t")
                read.start(first)
                parts = list(text_ids(tokenizer, read, max_tokens))
                assert (np.concatenate([ids for ids, _ in parts]) == whole_ids).all(), (first, max_tokens)
                assert sum(nbytes for _, nbytes in parts) == sum(document.nbytes for document in encoded)
                assert read.replaced == whole.replaced and read.characters == whole.characters
            pieces = TextSource(io.BytesIO(raw).read, "t")
            pieces.start(first)
            assert [piece for piece, _ in pieces.pieces(None)] == documents  # (read_text_file's)


def logged_eval(checkpoint: Path, path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
                ) -> tuple[Callable[..., dict[str, float]], list[tuple[str, int]]]:
    """`eval --text-file path` on `checkpoint` (context 8, 2 windows a forward) as a function of more flags giving its
    figures, and the events of its last call, in order: each read of the file ("read", the bytes asked for), each
    forward of windows ("forward", the ids it scored)."""
    import nanoqwen.evaluate

    events: list[tuple[str, int]] = []
    open_binary, batch_scores = nanoqwen.evaluate.open_binary, nanoqwen.evaluate.batch_scores

    class Logged:
        def __init__(self, f: io.BufferedReader) -> None:
            self.f, self.close = f, f.close

        def read(self, size: int) -> bytes:
            events.append(("read", size))
            return self.f.read(size)

    def scored(*args: object) -> Iterator[tuple[float, int, int]]:
        for score in batch_scores(*args):
            events.append(("forward", score[2]))
            yield score

    monkeypatch.setattr(nanoqwen.evaluate, "open_binary", lambda p: Logged(open_binary(p)))
    monkeypatch.setattr(nanoqwen.evaluate, "batch_scores", scored)

    def evaluated(*extra: str) -> dict[str, float]:
        events.clear()
        assert main(["eval", "--model", str(checkpoint), "--text-file", str(path), "--context", "8", "--batch-size",
                     "2", "--device", "cpu", "--json", *extra]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    return evaluated, events


def test_a_large_text_file_is_read_encoded_and_scored_a_part_at_a_time(checkpoint: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str],
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # `eval --text-file` read the whole file into memory, decoded it, parted it and encoded it all at once before the
    # first window was scored: a 5 GB file cost several times that. It is read, encoded and scored a part at a time
    # now, to the figures of the whole (those `eval --data` gives a split of it scored a slice at a time).
    import nanoqwen.data.prepare
    import nanoqwen.evaluate
    from nanoqwen.checkpoint import load_checkpoint
    from nanoqwen.evaluate import evaluate_tokens

    stories = ["".join(f"story {s}, line {i}: the caf\u00e9 sat\r\n" for i in range(3 + s)) for s in range(3)]
    path = tmp_path / "stories.txt"
    path.write_bytes("\n<|endoftext|>\n".join([*stories, stories[0].replace("\r\n", " ")]).encode())
    evaluated, events = logged_eval(checkpoint, path, capsys, monkeypatch)
    whole = evaluated()
    monkeypatch.setattr(nanoqwen.evaluate, "READ_PART_BYTES", 50)
    monkeypatch.setattr(nanoqwen.data.prepare, "BATCH_CHARS", 30)
    monkeypatch.setattr(nanoqwen.evaluate, "SLICE_TOKENS", 1)  # a slice per forward (2 windows of 8)
    assert evaluated() == whole  # the same figures, to the last bit
    reads = [size for event, size in events if event == "read"]
    assert max(reads) == 50 and len(reads) > path.stat().st_size // 50  # read a part at a time
    first_forward = next(i for i, (event, _) in enumerate(events) if event == "forward")
    assert first_forward < max(i for i, (event, _) in enumerate(events) if event == "read")  # scored as it is read
    # the figures of the whole file's ids, as prepare encodes its documents
    model, tokenizer = load_checkpoint(checkpoint)
    documents = nanoqwen.data.prepare.encode_texts(tokenizer, [s.replace("\r\n", "\n").rstrip() for s in stories] +
                                                   [stories[0].replace("\r\n", " ")])
    ids = torch.from_numpy(np.concatenate([[tokenizer.eot_id], *(d.ids for d in documents)])[:-1].astype(np.int64))
    expected = evaluate_tokens(model, ids, sum(d.nbytes for d in documents), 8, 2)
    assert whole == pytest.approx(expected, rel=1e-6) and whole["tokens"] == len(ids) - 1
    # and a prefix (--max-windows) as before: its first ids, the bytes of their own text
    prefix = ids[:8 * 5 + 1]
    assert evaluated("--max-windows", "5") == pytest.approx(
        evaluate_tokens(model, prefix, tokenizer.text_bytes(prefix[1:].numpy()), 8, 2), rel=1e-6)


def test_a_named_pipe_is_read_as_standard_input_is(checkpoint: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    # `--text-file <(zcat notes.txt.gz)` (the shell hands eval a pipe's name) was refused as "not a regular file",
    # though `zcat notes.txt.gz | ... --text-file -` was scored; a device (/dev/zero: no end) still is.
    import os
    import threading

    raw = (TEXT * 8).encode()
    (tmp_path / "t.txt").write_bytes(raw)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)

    def write() -> None:
        with open(fifo, "wb") as f:  # (waits for a reader)
            f.write(raw)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    scored = []
    try:
        for text_file in (fifo, tmp_path / "t.txt"):
            assert main(["eval", "--model", str(checkpoint), "--text-file", str(text_file), "--device", "cpu",
                         "--json"]) == 0, capsys.readouterr().err
            scored.append(json.loads(capsys.readouterr().out))
    finally:
        unblock = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a writer left waiting (the pipe refused) goes on
        writer.join()
        os.close(unblock)
    assert scored[0] == scored[1] and scored[0]["tokens"] > 50
    assert main(["eval", "--model", str(checkpoint), "--text-file", "/dev/zero", "--device", "cpu"]) == 2
    assert one_line(capsys) == ("nanoqwen eval: error: text file /dev/zero is not a regular file; give one UTF-8 text "
                                "file (for a folder of texts, prepare it and pass --data)")


def test_a_prefix_scored_in_slices_counts_the_bytes_of_its_text_whole(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str],
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # --max-windows divides by the bytes of the prefix's own text, which a tokenizer that is not byte-level (a
    # SentencePiece one's "▁" spaces, its byte-fallback characters) decodes whole only: counted a slice at a time,
    # each slice's leading space was dropped, and a character two slices cut was counted as U+FFFDs (19 bytes, not 21).
    from tokenizers import AddedToken

    import nanoqwen.evaluate
    from nanoqwen.checkpoint import load_checkpoint
    from nanoqwen.evaluate import evaluate_tokens
    from nanoqwen.tokenizer import Tokenizer
    from tests.test_generate import byte_fallback_tokenizer

    hf = byte_fallback_tokenizer().hf
    hf.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
    tokenizer = Tokenizer(hf)
    assert not tokenizer.byte_level
    config = config_for_tokenizer(tiny_config(hidden_size=32, head_dim=16, intermediate_size=64), tokenizer,
                                  fit_vocab=True)
    torch.manual_seed(0)
    save_checkpoint(Qwen3(config), tmp_path / "ck", tokenizer)
    text = "a b 日本 ab b a 本 " * 4
    (tmp_path / "t.txt").write_text(text)
    monkeypatch.setattr(nanoqwen.evaluate, "SLICE_TOKENS", 1)  # a slice per window of 4
    assert main(["eval", "--model", str(tmp_path / "ck"), "--text-file", str(tmp_path / "t.txt"), "--context", "4",
                 "--batch-size", "1", "--max-windows", "5", "--device", "cpu", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    model, tokenizer = load_checkpoint(tmp_path / "ck")
    ids = torch.tensor([tokenizer.eot_id, *tokenizer.encode(text)])
    prefix = ids[:4 * 5 + 1]
    assert result == pytest.approx(evaluate_tokens(model, prefix, tokenizer.text_bytes(prefix[1:].numpy()), 4, 1),
                                   rel=1e-6)


def test_max_windows_past_the_end_of_a_text_still_reads_it_a_part_at_a_time(checkpoint: Path, tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture[str],
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # The start read before the model loads was 16 bytes a token of --max-windows, unbounded: windows enough for the
    # whole file (`--max-windows 100000` on a 5 GB file) read and held it whole, decoded, before the first window.
    # It is at most a part now, the rest read as the windows are scored, to the same figures.
    import nanoqwen.data.prepare
    import nanoqwen.evaluate

    path = tmp_path / "t.txt"
    path.write_text("".join(f"line {i}: the cat sat\n" + ("<|endoftext|>\n" if i % 5 == 4 else "") for i in range(40)))
    evaluated, logged = logged_eval(checkpoint, path, capsys, monkeypatch)
    whole = evaluated()
    monkeypatch.setattr(nanoqwen.evaluate, "READ_PART_BYTES", 50)
    monkeypatch.setattr(nanoqwen.data.prepare, "BATCH_CHARS", 30)
    monkeypatch.setattr(nanoqwen.evaluate, "SLICE_TOKENS", 1)
    assert evaluated("--max-windows", "100000") == whole
    events = [event for event, _ in logged]
    assert events.index("forward") < len(events) - 1 - events[::-1].index("read")  # scored as it is read


def test_a_long_run_without_spaces_is_scanned_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # A line with no space or line break (50 MB of CJK, a minified file) is one piece until it ends, and each read
    # searched it for a place to cut from its start again: time quadratic in its length (12 s for 64 MB of "a", the
    # encoding aside). What was searched is not searched again, to the same pieces.
    import nanoqwen.data.prepare
    import nanoqwen.evaluate
    from nanoqwen.evaluate import TextSource

    searched = []

    class Counted:  # SPACE_BOUNDARY, counting the characters each search goes over
        def search(self, text: str, pos: int) -> re.Match[str] | None:
            searched.append(len(text) - pos)
            return space.search(text, pos)

    space = nanoqwen.data.prepare.SPACE_BOUNDARY
    monkeypatch.setattr(nanoqwen.data.prepare, "SPACE_BOUNDARY", Counted())
    monkeypatch.setattr(nanoqwen.evaluate, "READ_PART_BYTES", 5)
    text = "ab " + "\u4e2d" * 1000 + "a" * 2000 + " end<|endoftext|>" + "x" * 1000 + " y"
    source = TextSource(io.BytesIO(text.encode()).read, "t")
    source.start(4)
    assert list(source.pieces(10)) == [("ab " + "\u4e2d" * 1000 + "a" * 2000, False), (" end", True),
                                       ("x" * 1000, False), (" y", True)]
    assert sum(searched) < 2 * len(text)


def test_a_text_file_is_judged_whole_before_it_is_scored(checkpoint: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # Read a part at a time, a file was judged by its first part before scoring (one of text with its first 16 MB
    # noise was refused), and by the rest after it was all scored (an hour's forwards, then an error). It is read
    # through once first, and judged whole, before the model loads.
    import nanoqwen.evaluate
    import nanoqwen.generate

    monkeypatch.setattr(nanoqwen.evaluate, "READ_PART_BYTES", 128)
    text = (TEXT * 20).encode()
    noisy_start = tmp_path / "start.txt"
    noisy_start.write_bytes(b"\xff" * 200 + text)
    assert main(["eval", "--model", str(checkpoint), "--text-file", str(noisy_start), "--device", "cpu"]) == 0
    assert "replaced 200 undecodable byte sequences" in capsys.readouterr().err
    noisy_end = tmp_path / "end.txt"
    noisy_end.write_bytes(text[:200] + b"\xff" * 200)
    monkeypatch.setattr(nanoqwen.generate, "load_for_inference", lambda args: pytest.fail("the model was loaded"))
    assert main(["eval", "--model", str(checkpoint), "--text-file", str(noisy_end), "--device", "cpu"]) == 2
    assert one_line(capsys) == (f"nanoqwen eval: error: text file {noisy_end} is not text: 200 of its 400 characters "
                                f"are undecodable or NUL ({NOT_UTF8})")


def test_a_u_fffd_written_in_a_utf16_or_utf32_file_is_not_undecodable(tmp_path: Path) -> None:
    # It was counted as an undecodable byte (a warning of "replaced 3 undecodable byte sequences"): only one written
    # in UTF-8 was told apart.
    path = tmp_path / "t.txt"
    for encoding, lone_surrogate in [("utf-16", b"\x00\xd8"), ("utf-32", b"\x00\xd8\x00\x00")]:  # (with a mark)
        path.write_bytes(("caf\u00e9 \ufffd ok\n" * 3).encode(encoding) + lone_surrogate)
        assert read_text_file(path, "ck") == (["caf\u00e9 \ufffd ok\n" * 3 + "\ufffd"], 1), encoding


def test_the_slices_of_a_stream_are_those_of_its_ids_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    # --text-file's ids come in parts of any length, and are scored in slices of `step` predictions, each sharing its
    # last id with the next: the ids joined less the last (the <|endoftext|> that ends the last document), or their
    # first max_tokens, sliced as split_slices slices a split of them, wherever the parts end. A slice too many
    # predicted that <|endoftext|> (or the id after the prefix); one too few dropped the last prediction.
    import nanoqwen.evaluate
    from nanoqwen.evaluate import split_slices, stream_slices

    monkeypatch.setattr(nanoqwen.evaluate, "SLICE_TOKENS", 1)  # a slice per forward: of `step` windows of 1

    rng = random.Random(0)
    for length in range(1, 26):
        ids = np.arange(100, 100 + length, dtype=np.int64)
        cuts = sorted(rng.sample(range(1, length), rng.randint(0, length - 1))) if length > 1 else []
        parts = np.split(ids, cuts)
        for step in range(1, 5):
            for max_tokens in (None, *range(1, length + 2)):
                kept = ids[:-1] if max_tokens is None or length <= max_tokens + 1 else ids[:max_tokens]
                expected = [kept[start:start + step + 1].tolist() for start in range(0, len(kept) - 1, step)]
                got = [s.tolist() for s in stream_slices(iter(parts), step, max_tokens)]
                assert got == expected, (length, cuts, step, max_tokens)
                split = [kept[start:end].tolist() for start, end in split_slices(len(kept), 1, step)]
                assert split == expected, (length, step, max_tokens)


def test_max_windows_gives_its_prefix_figures_where_a_part_ends_with_it() -> None:
    # --max-windows N scores the first N * context + 1 ids, and divides by the bytes of their own text. Where a piece
    # of a long document ended right after the prefix's last id (ids of 8 characters and more, so few in a piece),
    # the text of the id after it was counted as scored too if the stream stopped reading there.
    import nanoqwen.evaluate as evaluate
    from nanoqwen.data.prepare import encode_texts

    line = "abcdefghijklmnopqrstuvwxyzabcd\n"  # two ids: the word, the line break
    tokenizer = train_bpe([line * 3] * 20, 300)
    assert len(tokenizer.encode(line * 2)) == 4
    config = config_for_tokenizer(tiny_config(hidden_size=32, head_dim=16, intermediate_size=64), tokenizer,
                                  fit_vocab=True)
    torch.manual_seed(0)
    model = Qwen3(config)
    text = line * 40
    ids = torch.from_numpy(np.concatenate([[tokenizer.eot_id], encode_texts(tokenizer, [text.rstrip()])[0].ids[:-1]]
                                          ).astype(np.int64))
    for windows in range(1, 12):
        source = evaluate.TextSource(io.BytesIO(text.encode()).read, "t")
        source.start(64)
        prefix = ids[:windows + 1]
        assert evaluate.evaluate_text(model, tokenizer, source, 1, 64, windows + 1) == evaluate.evaluate_tokens(
            model, prefix, tokenizer.text_bytes(prefix[1:].numpy()), 1, 64), windows


def test_the_pieces_of_a_text_read_a_part_at_a_time_join_to_its_documents(monkeypatch: pytest.MonkeyPatch) -> None:
    # TextSource.pieces cuts a long document (at a space where it has no line breaks) and reads on a few bytes at a
    # time: the pieces of each document join to it whole, wherever a read or a cut ends (a piece that begins with the
    # space it was cut before, then a separator: that space is the document's, not the blank after a separator).
    import nanoqwen.evaluate
    from nanoqwen.data.sources import separated_documents, universal_newlines
    from nanoqwen.evaluate import TextSource

    monkeypatch.setattr(nanoqwen.evaluate, "READ_PART_BYTES", 5)
    words = " ".join(f"w{i}" for i in range(40))
    text = (f"  \n<|endoftext|>\r\n{words} \r\n<|endoftext|>\n\n{words}\n<|endoftext|>{words}<|endoftext|> "
            f"last\r\nline\r\nand {words}  \n")
    documents = separated_documents(universal_newlines(text))
    assert len(documents) == 4
    for first in (4, 9, 30):
        for chars in (None, 3, 10, 25):
            source = TextSource(io.BytesIO(text.encode()).read, "t")
            source.start(first)
            joined, document = [], ""
            for piece, ends in source.pieces(chars):
                document += piece
                if ends:
                    joined.append(document)
                    document = ""
            assert (joined, document) == (documents, ""), (first, chars)


def test_a_start_that_is_not_text_says_it_judged_the_start() -> None:
    # --max-windows reads only a start, which is all that is judged: the line says "of the first" characters read,
    # not "of its" (the whole text's, where it was read whole).
    from nanoqwen.data.sources import NOT_UTF8
    from nanoqwen.errors import NanoQwenError
    from nanoqwen.evaluate import TextSource

    raw = b"\0" * 2000 + b"the cat sat\n" * 10
    for first, said in [(100, "100 of the first 100"), (len(raw) + 1, f"2,000 of its {len(raw):,}")]:
        with pytest.raises(NanoQwenError) as error:
            TextSource(io.BytesIO(raw).read, "text file t.txt").start(first)
        assert str(error.value) == f"text file t.txt is not text: {said} characters are undecodable or NUL ({NOT_UTF8})"


def test_text_piped_in_is_judged_whole_once_read(checkpoint: Path, capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # Standard input cannot be read twice (a file is read through and judged before scoring): its start is judged
    # before the model loads, and all of it once read and scored, so a text start followed by much more binary (NULs)
    # is refused as a file is.
    import nanoqwen.evaluate

    monkeypatch.setattr(nanoqwen.evaluate, "READ_PART_BYTES", 64)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(TEXT.encode() * 4 + b"\0" * 1000)))
    assert main(["eval", "--model", str(checkpoint), "--text-file", "-", "--device", "cpu"]) == 2
    assert one_line(capsys) == (f"nanoqwen eval: error: standard input is not text: 1,000 of its "
                                f"{len(TEXT) * 4 + 1000:,} characters are undecodable or NUL (a binary file, or text "
                                "in another encoding: convert it to UTF-8)")


def test_a_model_of_a_long_context_is_scored_and_a_diverged_one_has_a_perplexity() -> None:
    # A context past ~16k tokens (Qwen3's is 40,960) is one window a forward by default, not none (range(0, n, 0)
    # raised); a loss past exp's range (a diverged model's) has a finite perplexity, not an OverflowError; a stream
    # of one token has no prediction to score, and says so.
    from nanoqwen.errors import NanoQwenError
    from nanoqwen.evaluate import evaluate_tokens, metrics

    torch.manual_seed(0)
    model = Qwen3(tiny_config(hidden_size=32, head_dim=16, intermediate_size=64, max_position_embeddings=40960))
    tokens = torch.arange(10) % 7 + 2
    assert evaluate_tokens(model, tokens, 9) == evaluate_tokens(model, tokens, 9, batch_size=1)
    assert evaluate_tokens(model, tokens, 9)["tokens"] == 9
    assert metrics(3 * 800.0, 0, 3, 10)["perplexity"] == math.exp(700.0)
    with pytest.raises(NanoQwenError, match="need at least 2 tokens to score, got 1"):
        evaluate_tokens(model, tokens[:1], 1)
