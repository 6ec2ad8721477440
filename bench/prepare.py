"""Prepare throughput: nanoqwen's `prepare` against the seed design's `datasets.map` pipeline.

Same corpus (Shakespeare's works repeated to about --mb MB, one .txt file per work, each copy marked
as such: prepare reads identical files once), same machine, one run
each, both with the Qwen3 tokenizer and every core, both timed from the text files to train.bin/val.bin:

- nanoqwen: `nanoqwen.data.prepare.prepare(folder, "qwen3", out)`, which encodes `qwen3` with tiktoken when
  it is installed; again with `tokenizers` only (tiktoken hidden), the path every other tokenizer takes;
  and from a tokenizer folder holding the Qwen3 tokenizer (what `train --init-from` passes for official
  weights), which prepare recognizes and encodes with tiktoken too.
- seed: read the files into `datasets.Dataset.from_dict`, `train_test_split`, `.map(batched=True,
  num_proc=cores)` with the tokenizer loaded by `transformers.AutoTokenizer` from a folder nanoqwen saved,
  then write each split with a numpy memmap, shard by shard (as nanoGPT's prepare scripts do).

With --chats the corpus is one JSON-lines file of chat records (`{"messages": [...]}`, four turns each, made
of Shakespeare's lines): nanoqwen renders them with the chat template inside prepare; the seed design loads
the file with `datasets.load_dataset("json")` and maps `apply_chat_template` + the tokenizer over it.

    python bench/prepare.py [--mb 20] [--chats]

Prints a markdown table: MB of input per second for each, and the ratio.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

import nanoqwen.data.prepare as prepare_module
from nanoqwen.data.prepare import load_meta, prepare
from nanoqwen.data.sources import open_corpus
from nanoqwen.io import usable_cores
from nanoqwen.tokenizer import qwen3_tokenizer


def make_corpus(folder: Path, megabytes: float) -> int:
    """Shakespeare's works, repeated, into `folder` up to the one that brings it to `megabytes` MB (less than
    one copy too: a small --mb for a quick run); returns its UTF-8 bytes."""
    works = list(open_corpus("shakespeare").documents())
    total, copy = 0, 0
    while total < megabytes * 1e6:
        for i, work in enumerate(works):
            text = f"[copy {copy}]\n{work}"  # each copy its own bytes: prepare reads a file's identical copies once
            (folder / f"{copy:03d}-{i:02d}.txt").write_text(text, encoding="utf-8")
            total += len(text.encode("utf-8"))
            if total >= megabytes * 1e6:
                break
        copy += 1
    return total


def make_chats(path: Path, megabytes: float) -> int:
    """A JSON-lines file of chat records, four turns of Shakespeare's lines each, of `megabytes` MB."""
    lines = [line.strip() for work in open_corpus("shakespeare").documents() for line in work.splitlines()
             if line.strip()]
    total, i = 0, 0
    with path.open("w", encoding="utf-8") as f:
        while total < megabytes * 1e6:
            turns = [{"role": ("user", "assistant")[k % 2], "content": lines[(i + k) % len(lines)]} for k in range(4)]
            row = json.dumps({"messages": turns}) + "\n"
            f.write(row)
            total += len(row.encode("utf-8"))
            i += 4
    return total


def seed_prepare(corpus: Path, tokenizer_dir: Path, out: Path, cores: int) -> int:
    """The seed design's pipeline (a folder of .txt files, or a chats .jsonl); returns the tokens written."""
    import datasets
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    if corpus.is_dir():
        texts = [p.read_text(encoding="utf-8") for p in sorted(corpus.glob("*.txt"))]
        dataset, column = datasets.Dataset.from_dict({"text": texts}), "text"
    else:
        dataset, column = datasets.load_dataset("json", data_files=str(corpus), split="train"), "messages"
    splits = dataset.train_test_split(test_size=0.01, seed=0, shuffle=True)

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        texts = batch[column] if column == "text" else tok.apply_chat_template(batch[column], tokenize=False)
        ids = [x + [eot] for x in tok(texts, add_special_tokens=False)["input_ids"]]
        return {"ids": ids, "len": [len(x) for x in ids]}

    tokens = 0
    for name, ds in (("train", splits["train"]), ("val", splits["test"])):
        ds = ds.map(tokenize, batched=True, num_proc=min(cores, len(ds)), remove_columns=[column])
        n = int(np.sum(ds["len"], dtype=np.int64))
        arr = np.memmap(out / f"{name}.bin", dtype=np.uint32, mode="w+", shape=(n,))
        shards, i = min(64, len(ds)), 0
        for k in range(shards):
            batch = ds.shard(num_shards=shards, index=k, contiguous=True).with_format("numpy")
            chunk = np.concatenate(batch["ids"])
            arr[i:i + len(chunk)] = chunk
            i += len(chunk)
        arr.flush()
        tokens += n
    return tokens


def time_nanoqwen(corpus: Path, tok_dir: Path, out: Path) -> tuple[dict[str, float], dict[str, int]]:
    """Seconds and tokens of each nanoqwen row. Each starts with prepare's per-process caches empty (the tiktoken
    encoding, the Qwen3 fingerprint), as a `nanoqwen prepare` run does: it builds them inside its own time, as the
    seed loads its tokenizer inside its."""
    rows: dict[str, float] = {}
    tokens: dict[str, int] = {}
    contenders = [("nanoqwen prepare (tokenizers only)", "qwen3", False), ("nanoqwen prepare", "qwen3", True),
                  ("nanoqwen prepare, a tokenizer folder (as official weights bring)", str(tok_dir), True)]
    for name, spec, tiktoken in contenders:
        if tiktoken and prepare_module._qwen3_tiktoken() is None:
            continue  # tiktoken is not installed: the row above is what prepare does
        prepare_module._qwen3_tiktoken.cache_clear()
        prepare_module._qwen3_fingerprint.cache_clear()
        if not tiktoken:
            original, prepare_module._qwen3_tiktoken = prepare_module._qwen3_tiktoken, lambda: None
        start = time.perf_counter()
        try:
            done = prepare(str(corpus), spec, out, force=True, progress=False)
        finally:
            if not tiktoken:
                prepare_module._qwen3_tiktoken = original
        rows[name] = time.perf_counter() - start
        tokens[name] = sum(s["tokens"] for s in load_meta(done)["splits"].values())
    return rows, tokens


def time_seed(corpus: Path, tok_dir: Path, out: Path, cores: int) -> tuple[float, int]:
    """Seconds and tokens of the seed pipeline. Its libraries are imported before the clock starts, as nanoqwen's
    modules are (at the top of this script): neither side's imports are timed."""
    import datasets  # noqa: F401
    from transformers import AutoTokenizer  # noqa: F401 (its module loads on first use)

    start = time.perf_counter()
    tokens = seed_prepare(corpus, tok_dir, out, cores)
    return time.perf_counter() - start, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=20, help="corpus size in MB (default: %(default)s)")
    parser.add_argument("--chats", action="store_true", help="a JSON-lines file of chat records instead of text")
    args = parser.parse_args()
    cores = usable_cores()  # the seed's num_proc matches the cores nanoqwen's prepare uses (taskset, a container)
    with tempfile.TemporaryDirectory(prefix="nanoqwen-bench-") as tmp:
        root = Path(tmp)
        corpus, tok_dir, seed_out = root / "corpus", root / "tokenizer", root / "seed"
        for d in (corpus, tok_dir, seed_out):
            d.mkdir()
        if args.chats:
            corpus = corpus / "chats.jsonl"
            nbytes = make_chats(corpus, args.mb)
        else:
            nbytes = make_corpus(corpus, args.mb)
        qwen3_tokenizer().save(tok_dir)

        rows, tokens = time_nanoqwen(corpus, tok_dir, root / "nanoqwen")
        seed_name = f"seed: datasets.map(num_proc={cores}) + AutoTokenizer + numpy memmap"
        rows[seed_name], tokens[seed_name] = time_seed(corpus, tok_dir, seed_out, cores)
        rows = {seed_name: rows.pop(seed_name), **rows}

    if len(set(tokens.values())) != 1:
        print(f"warning: token counts differ: {tokens}")
    mb = nbytes / 1e6
    seed = rows[seed_name]
    what = "chat records (JSON lines)" if args.chats else "text"
    print(f"\nprepare: {mb:.1f} MB of {what} ({tokens[seed_name]:,} tokens), Qwen3 tokenizer, {cores} cores\n")
    print("| pipeline | seconds | MB/s | vs seed |")
    print("|---|---:|---:|---:|")
    for name, seconds in rows.items():
        print(f"| {name} | {seconds:.1f} | {mb / seconds:.2f} | {seed / seconds:.2f}x |")


if __name__ == "__main__":
    main()
