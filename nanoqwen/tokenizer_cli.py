"""`nanoqwen tokenizer qwen3 --out DIR` and `nanoqwen tokenizer train --dataset SRC --vocab-size N --out DIR`."""

from __future__ import annotations

import argparse

from nanoqwen.data.prepare import add_reading_arguments
from nanoqwen.data.sources import SOURCES_HELP
from nanoqwen.errors import OneCorpus, whole_number
from nanoqwen.io import atomic_dir, check_replaceable


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="tokenizer_command", metavar="{qwen3,train}", required=True)
    out_help = "folder for tokenizer.json and tokenizer_config.json"
    what = "write the official Qwen3 tokenizer (offline)"
    official = sub.add_parser("qwen3", help=what, description=what)
    official.add_argument("--out", required=True, metavar="DIR", help=out_help)
    official.set_defaults(command_prog=official.prog)  # errors are said as `nanoqwen tokenizer qwen3: error: ...`
    what = "train a byte-level BPE on a corpus"
    train = sub.add_parser("train", help=what, description=what)
    train.add_argument("--dataset", required=True, metavar="SRC", action=OneCorpus, help=f"corpus: {SOURCES_HELP}")
    train.add_argument("--vocab-size", type=whole_number, required=True, metavar="N",
                       help="ids in the tokenizer, its special tokens included (e.g. 2048); fewer when the "
                       "corpus runs out of pairs to merge")
    train.add_argument("--out", required=True, metavar="DIR", help=out_help)
    add_reading_arguments(train)
    train.set_defaults(command_prog=train.prog)


def run(args: argparse.Namespace) -> int:
    if args.tokenizer_command == "qwen3":
        from nanoqwen.tokenizer import qwen3_tokenizer

        check_replaceable(args.out, "tokenizer")
        tokenizer = qwen3_tokenizer()
        with atomic_dir(args.out) as tmp:
            tokenizer.save(tmp)
        print(f"wrote the Qwen3 tokenizer ({tokenizer.vocab_size} ids) to {args.out}")
        return 0
    from nanoqwen.data.prepare import train_tokenizer_command

    return train_tokenizer_command(args)
