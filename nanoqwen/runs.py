"""Where a run comes from and what its folder records: the settings, data and folder of a new run (from a
preset, or from a checkpoint's weights with --init-from), the same for a run resumed from its folder (with
the checks that its data is still the data it began with), and the run's config.json and logs as a resume
reads and trims them. `nanoqwen train` (train.py) builds the run from these and trains it.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import sys
from datetime import datetime
from pathlib import Path
from shlex import quote
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from nanoqwen.checkpoint import (
    DTYPE_NAMES,
    OWN_TOKENIZER_FIX,
    STATE_JSON,
    STATE_PT,
    STATE_VERSION,
    check_data_tokenizer,
    check_vocab,
    display_name,
    folder_name,
    read_generation_file,
    refuse_tokenizer_id_overrides,
    set_fields,
)
from nanoqwen.config import (
    BEST_DTYPES,
    ModelConfig,
    Preset,
    TrainConfig,
    apply_overrides,
    check_train_types,
    load_preset,
)
from nanoqwen.data.loader import check_batch
from nanoqwen.distributed import DistInfo, from_rank0, on_rank0, resolve_dtype
from nanoqwen.errors import NanoQwenError, counted, first_line
from nanoqwen.io import (
    RUN_CONFIG_KEYS,
    atomic_file,
    check_replaceable,
    folder_of_runs_refusal,
    found_data,
    is_run_record,
    json_line,
    make_run_folder,
    runs_inside,
)
from nanoqwen.tokenizer import Tokenizer, load_tokenizer, resolve_tokenizer
from nanoqwen.tracking import check_wandb, summary_writer_class

if TYPE_CHECKING:
    from nanoqwen.train import Run

# What a run started from a checkpoint's weights (--init-from) takes in place of a preset's train section:
# a rate that continues a pretrained model without undoing what it knows (3e-5 suits the Qwen3 sizes; a
# small model of your own takes ~10x more), AdamW (the optimizer such checkpoints were trained with), and a
# short run that evaluates, samples and saves often. Sequences are 1,024 tokens, or the context if shorter.
FINETUNE_TRAIN: dict[str, Any] = {"optimizer": "adamw", "lr": 3e-5, "warmup": 20, "max_steps": 500,
                                  "batch_size": 16, "eval_interval": 50, "save_interval": 250,
                                  "sample_interval": 250}
FINETUNE_SEQ_LEN = 1024


# -- a new run: its settings, data and folder -----------------------------------------------------
def resolve_train_config(preset_train: dict[str, Any], args: argparse.Namespace,
                         base: TrainConfig | None = None) -> TrainConfig:
    """Defaults (or a resumed run's config), then the preset's train section, then the flags."""
    values = dataclasses.asdict(base or TrainConfig())
    unknown = sorted(set(preset_train) - values.keys())
    if unknown:
        raise NanoQwenError(f"the preset's train section has unknown keys {unknown}; "
                            f"known: {', '.join(values)}")
    values.update(preset_train)
    for name in values:
        given = getattr(args, name, None)
        if given is not None:
            values[name] = given
    if values["max_minutes"] == 0:  # no cap: the only way to lift a preset's (or a resumed run's own)
        values["max_minutes"] = None
    cfg = TrainConfig(**values).validate()
    # A flag that only tunes another one that is off did nothing, without a word (no W&B run, no fitted schedule).
    if getattr(args, "wandb_project", None) is not None and not cfg.wandb:
        raise NanoQwenError(f"--wandb-project {args.wandb_project} names the W&B project --wandb logs into, and "
                            "--wandb is off; add --wandb (or leave --wandb-project out)")
    if getattr(args, "fit_to_time", None) and cfg.max_minutes is None:
        lifted = getattr(args, "max_minutes", None) == 0  # given, as the cap's absence
        raise NanoQwenError("--fit-to-time ends the schedule where --max-minutes runs out, and "
                            + ("--max-minutes 0 sets no cap; give" if lifted else "no --max-minutes is set; add")
                            + " --max-minutes M (or leave --fit-to-time out)")
    if cfg.tensorboard:  # one clear line now if the package is missing, not after preparing data
        summary_writer_class()
    if cfg.wandb:
        check_wandb(cfg.wandb_project)
    return cfg


def default_preset_name(device: torch.device) -> str:
    """The preset `nanoqwen train` picks when none is given: demo (bf16, torch.compile, the Qwen3 vocabulary) on CUDA;
    cpu elsewhere, MPS included, where training runs in float32 without those (see resolve_dtype)."""
    return "demo" if device.type == "cuda" else "cpu"


def slug(text: str) -> str:
    """A path's (or a name's) part of a run or data folder's name."""
    path = Path(text).expanduser()
    return file_name_part(folder_name(path.resolve()) if path.exists() else text)


def file_name_part(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._]+", "-", name).strip("-.") or "data"  # no hidden folder from a leading dot


def dataset_slug(dataset: str, fingerprint: str | None) -> str:
    """A corpus's part of a data folder's name: for local files, their name and a hash of the corpus's
    `fingerprint` (where the files are, their names, sizes and times; for a named corpus read by another column
    than `text`, the column; None for a named corpus as it is). Two `corpus.txt` in different folders never share
    one prepared folder, and text changed after a run was made from it is prepared into a new folder instead of
    over the one that run still resumes on."""
    if fingerprint is None:
        return slug(dataset)
    return f"{slug(dataset)}-{hashlib.sha256(fingerprint.encode()).hexdigest()[:6]}"


def tokenizer_slug(tokenizer: str) -> str:
    """A tokenizer's part of a data folder's name. A folder's name says little (every run's is `best`):
    a hash of what prepare's result depends on (its vocabulary, config and chat template) keeps two different
    tokenizers from sharing one prepared folder, where preparing for one would replace the other's."""
    from nanoqwen.data.prepare import tokenizer_identity

    identity = tokenizer_identity(tokenizer)  # a bad --tokenizer (bpe:x) is one line, before "preparing ..." is printed
    if Path(tokenizer).expanduser().is_dir():
        load_tokenizer(tokenizer)  # and so is a damaged folder
        return f"{slug(tokenizer)}-{identity.removeprefix('sha256:')[:8]}"
    return slug(tokenizer)


def prepared_folder(dataset: str, tokenizer: str, text_column: str | None = None) -> Path:
    """data/DATASET-TOKENIZER, prepared by rank 0. A named corpus, once prepared, is used as it is; local files (a
    path, hf:FOLDER) are compared with what the folder was made from every time (prepare reuses it when nothing
    changed)."""
    from nanoqwen.data.sources import DEFAULT_TEXT_COLUMN, PreparedDataGiven, open_corpus

    try:
        corpus = open_corpus(dataset, text_column=text_column)  # a bad --dataset is one line, before any other
    except PreparedDataGiven as e:
        raise NanoQwenError(f"{e}, or train on it as it is: --data {quote(dataset)}") from None
    # Files (hf:FOLDER's too) are named by what they hold now; a named corpus by its column where that is not the
    # default: a folder of one column, reused as it is, would give a run without --text-column (or with another)
    # that column's text.
    other_column = text_column not in (None, DEFAULT_TEXT_COLUMN)
    name = dataset_slug(dataset, corpus.fingerprint if corpus.local or other_column else None)
    folder = Path("data") / f"{name}-{tokenizer_slug(tokenizer)}"
    # rank 0's answer: a rank that looked after rank 0 had prepared the folder would skip the wait rank 0 is in
    if from_rank0(corpus.local or other_column or not (folder / "meta.json").exists()):
        def prepare_it() -> None:  # rank 0; the others wait, and stop with its line if the corpus is refused
            from nanoqwen.data.prepare import prepare  # the data pipeline is imported only when needed

            if not (folder / "meta.json").exists():
                print(f"preparing {dataset} with tokenizer {tokenizer} into {folder}", flush=True)
            prepare(dataset, tokenizer, folder, text_column=text_column)

        on_rank0(prepare_it)
    return folder


def note_vocab_change(preset: Preset, config: ModelConfig, data: Path, overrides: list[str]) -> None:
    """A preset sized for a small vocabulary trained on data of a large one (a plain `prepare` uses the Qwen3
    tokenizer) is a model many times the size: say so, and what keeps the preset's size. Only the tokenizer's
    part: a size the --set flags give (fewer layers, a vocab_size of their own) is the user's, not the data's."""
    if "vocab_size" in set_fields(overrides):
        return
    planned = dataclasses.replace(config, vocab_size=preset.model.vocab_size).num_params()
    actual = config.num_params()
    if max(planned, actual) < 2 * min(planned, actual):
        return
    tokenizer = preset.train.get("tokenizer")
    keep = f"; `--dataset SRC` prepares with the preset's tokenizer, {tokenizer}, for its size" if tokenizer else ""
    print(f"the {preset.name} preset names a vocabulary of {preset.model.vocab_size:,}; {data}'s tokenizer makes it "
          f"{config.vocab_size:,}, so the model has {actual / 1e6:.3g}M parameters, not {planned / 1e6:.3g}M"
          f"{keep}", flush=True)


def check_seq_len(seq_len: int, config: ModelConfig, can_set: bool) -> None:
    if seq_len > config.max_position_embeddings:
        raise NanoQwenError(f"--seq-len {seq_len} exceeds the model's context ({config.max_position_embeddings}); "
                            "lower it" + (f" or --set max_position_embeddings={seq_len}" if can_set else ""))


def check_parallelism(fsdp: bool, optimizer: str, info: DistInfo, resumed: Path | None = None) -> None:
    """What --fsdp cannot run with, refused before a corpus is prepared or a model built. A `resumed` run keeps its
    optimizer (its state goes on): another is a new run from its weights."""
    if fsdp and not info.distributed:
        raise NanoQwenError("--fsdp shards the model over processes; launch with torchrun --nproc_per_node N")
    if fsdp and optimizer == "muon" and resumed is not None:
        raise NanoQwenError(f"{resumed} trains with muon, which needs whole matrices: resume it without --fsdp (a "
                            "whole model per process), or start a new run from its weights with --fsdp: "
                            f"--init-from {resumed / 'last'} --optimizer adamw --fsdp")
    if fsdp and optimizer == "muon":
        raise NanoQwenError("--optimizer muon needs whole matrices; with --fsdp use --optimizer adamw")


def warming_up(steps: int) -> str:
    return f"warming up over {steps}" if steps else "no warmup"


def warmup_cut(warmup: int, steps: int) -> str:
    """What is said when a warmup longer than half of a run of `steps` is cut to half of it."""
    return f"warmup {warmup} is longer than half of the {counted(steps, 'step')}: {warming_up(steps // 2)}"


def new_run(args: argparse.Namespace, info: DistInfo) -> tuple[Preset, TrainConfig, Path, Path]:
    """Preset, settings, data folder (prepared if need be) and run folder of a new run."""
    if args.init_from:
        preset = checkpoint_preset(Path(args.init_from), args.set)
        model = preset.model  # --set applied
    else:
        preset = load_preset(args.config or args.preset or default_preset_name(info.device))
        refuse_tokenizer_id_overrides(args.set)  # a bad --set is one line before any data is prepared
        model = apply_overrides(preset.model, args.set)
    cfg = resolve_train_config(preset.train, args)
    if cfg.seq_len:  # before a corpus is prepared (a tokenizer changes the vocabulary, not the context)
        check_seq_len(cfg.seq_len, model, can_set=True)
    check_batch(cfg.batch_size, cfg.micro_batch, info.world_size)  # likewise
    check_parallelism(args.fsdp, cfg.optimizer, info)
    if (args.tokenizer or args.text_column) and args.data:
        raise NanoQwenError("--tokenizer and --text-column go with --dataset; a --data folder is prepared already")
    if args.init_from and "tokenizer" not in preset.train and not (args.tokenizer or args.data):
        raise NanoQwenError(f"{args.init_from} has no tokenizer.json to prepare --dataset with; give --tokenizer "
                            "(qwen3 for official Qwen3 weights) or a prepared --data folder")
    if args.init_from and (args.tokenizer or "").startswith("bpe:"):  # refused before a corpus is prepared
        raise NanoQwenError(f"--tokenizer {args.tokenizer} would train a new tokenizer, whose ids mean nothing to "
                            f"the weights of {args.init_from}; leave --tokenizer out to use the checkpoint's own")
    if args.init_from and args.tokenizer and "tokenizer" in preset.train and \
            resolve_tokenizer(args.tokenizer).fingerprint != load_tokenizer(args.init_from).fingerprint:
        raise NanoQwenError(f"--tokenizer {args.tokenizer} is a different tokenizer than {args.init_from}'s, whose "
                            "weights would read its ids as other tokens; leave --tokenizer out to use the checkpoint's "
                            "own")
    if args.init_from and args.tokenizer and "tokenizer" not in preset.train:  # weights alone: one they can read
        check_vocab(resolve_tokenizer(args.tokenizer), model, Path(args.init_from), f"--tokenizer {args.tokenizer}",
                    OWN_TOKENIZER_FIX)
    out = Path(args.out) if args.out is not None else None
    if out is not None:  # refused before a corpus is prepared
        if (out / "last").exists():
            raise NanoQwenError(f"{out} already holds a run; continue it with --resume {quote(str(out))} or pick "
                                "another --out")
        check_replaceable(out, "run")  # a checkpoint, a data folder or a folder of the user's files is not a run
        if args.init_from and out.resolve() in Path(args.init_from).resolve().parents:  # its best/, say: deleted
            raise NanoQwenError(f"--init-from {args.init_from} is inside --out {out}, whose best/ a new run deletes "
                                "before it saves anything: the weights it starts from could be lost; pick another "
                                "--out, or copy the checkpoint elsewhere first")
    if args.data:
        from nanoqwen.data.prepare import load_meta

        load_meta(args.data)  # one clear line if it is not a complete prepared folder
    data = Path(args.data) if args.data else prepared_folder(cfg.dataset, cfg.tokenizer, args.text_column)
    if args.init_from:
        check_data_tokenizer(Path(args.init_from), data, preset.model)
    if cfg.warmup > cfg.max_steps // 2:
        # A short trial of a preset made for long runs (--max-steps 30, warmup 50) would end still warming
        # up, at its highest rate. Cut once, here, and saved: the rate must not depend on a fitted length.
        if info.is_main:
            print(warmup_cut(cfg.warmup, cfg.max_steps), flush=True)
        cfg.warmup = cfg.max_steps // 2
    # Claimed last: nothing after it fails before the caller locks it (a lock released empty removes the folder).
    return preset, cfg, data, out or default_out(preset.name)


# -- a resumed run: its saved settings, and the data it began with --------------------------------
class Changes(NamedTuple):
    """How a resume differs from what last/ was trained with."""

    listed: list[str]
    """The settings that differ ("batch_size 16 -> 32"; lengths of the run and reporting apart; the autocast
    dtype too)."""
    given: set[str]
    """The names of the settings given anew (now, or by a resume that never saved)."""
    trained: TrainConfig
    """The settings last/ was trained with."""


# The flags that make a run's model and data, which a resume takes from the run folder (args' names).
RUN_FIXED_FLAGS = ("set", "preset", "config", "init_from", "dataset", "tokenizer", "text_column")


def resumed_run(args: argparse.Namespace, info: DistInfo) -> tuple[TrainConfig, str, Path, Path, Changes]:
    """Settings (saved, then the flags given now), preset name, data folder and run folder of a run to resume,
    and how they differ from those last/ was trained with."""
    out = Path(args.resume or args.out or "")
    if not (args.resume or args.out):  # not Path("."): a run in the current folder resumes as the report says
        raise NanoQwenError("--resume needs the run folder: --resume runs/NAME")
    # Named as given: a new run's command line with --resume added repeats some of them, not all seven.
    fixed = [f"--{name.replace('_', '-')}" for name in RUN_FIXED_FLAGS if getattr(args, name)]
    if fixed:
        names = ", ".join(fixed[:-1]) + f" and {fixed[-1]}" if len(fixed) > 1 else fixed[0]
        raise NanoQwenError(f"--resume continues a run with its own model and data, which {names} cannot change; "
                            f"leave {'them' if len(fixed) > 1 else 'it'} out (--data may say where its data folder "
                            "is now)")
    if args.resume and args.out and Path(args.out).resolve() != Path(args.resume).resolve():
        raise NanoQwenError(f"--resume {args.resume} continues that run in its own folder; drop --out (to train "
                            f"into {args.out} from its weights instead: --init-from {Path(args.resume) / 'last'})")
    saved = read_run_config(out)
    # Flags that are not settings of the loop but change its numbers: the run's own unless given now.
    asked = saved.get("args", {})
    args.dtype = args.dtype or asked.get("dtype")
    if args.activation_checkpointing is None:  # --no-activation-checkpointing turns it off
        args.activation_checkpointing = bool(asked.get("activation_checkpointing"))
    train = saved["train"]
    if saved.get("format", 1) < RUN_CONFIG_FORMAT and \
            train.get("micro_batch") == train["batch_size"] // saved.get("world_size", 1):
        train["micro_batch"] = None  # resolved, not asked for: runs of format 1 saved it so
    if args.optimizer and args.optimizer != saved["train"]["optimizer"]:
        raise NanoQwenError(f"{out} trains with {saved['train']['optimizer']}, whose state --resume continues; to "
                            f"switch to {args.optimizer}, start a new run from its weights: --init-from {out / 'last'}")
    cfg = resolve_train_config({}, args, TrainConfig(**train))
    # before its data is checked or a model built; a split the run's own sizes do not allow under this many processes
    # names them as its own (the user typed neither)
    check_batch(cfg.batch_size, cfg.micro_batch, info.world_size,
                runs_own=[name for name in ("batch_size", "micro_batch") if getattr(args, name) is None])
    # Compared with what last/ was trained with, not with config.json: a resume that failed or was killed before
    # its first save has already written its flags there, and they are still changes of the run (a val loss
    # measured otherwise, a new length).
    before, trained_dtype = trained_settings(out / "last") or (TrainConfig(**train), None)
    given = {name for name in before.__dataclass_fields__
             if getattr(args, name, None) is not None or getattr(cfg, name) != getattr(before, name)}
    # The length is not a change of the run, nor is the micro-batch (memory only: the same losses, to rounding),
    # nor what reports on it or saves it: samples draw from a generator of their own, saves draw nothing.
    unchanged = ("max_steps", "max_minutes", "micro_batch", "log_interval", "tensorboard", "wandb", "wandb_project",
                 "sample_interval", "sample_tokens", "sample_prompt", "save_interval", "best_dtype")
    changed = [f"{name} {getattr(before, name)} -> {getattr(cfg, name)}" for name in before.__dataclass_fields__
               if name not in unchanged and getattr(cfg, name) != getattr(before, name)]
    # The autocast dtype is a flag, not a setting, but it changes the numbers as much: --dtype given now, or the
    # device's own where the run never asked for one and resumes on another kind of device. A save from before
    # last/ recorded it is compared with the dtype the run began in.
    dtype = DTYPE_NAMES[resolve_dtype(args.dtype, info.device)]
    trained_dtype = trained_dtype or str(first_launch(saved).get("dtype", "")).removeprefix("torch.")
    if trained_dtype and trained_dtype != dtype:
        changed.append(f"dtype {trained_dtype} -> {dtype}")
    check_parallelism(args.fsdp, cfg.optimizer, info, resumed=out)
    return cfg, saved["preset"], resumed_data(args, saved, out, info.is_main), out, Changes(changed, given, before)


def trained_settings(last: Path) -> tuple[TrainConfig, str | None] | None:
    """The settings last/ was saved with and the autocast dtype it trained in (its train_state.json; the dtype
    None in a save from before it was recorded), or None where it does not say (a save from before they were
    recorded; a damaged state, which loading it reports)."""
    try:
        recorded = json.loads((last / STATE_JSON).read_text(encoding="utf-8"))
        check_train_types(recorded["train"], str(last / STATE_JSON))
        dtype = recorded.get("dtype")
        return TrainConfig(**recorded["train"]), dtype if isinstance(dtype, str) else None
    except (OSError, ValueError, KeyError, TypeError, NanoQwenError):
        return None


def resumed_data(args: argparse.Namespace, saved: dict[str, Any], out: Path, announce: bool) -> Path:
    """Where the run's data folder is now: --data, the saved path, or the same place relative to the run folder
    (the project moved as a whole). Its contents are checked by `check_resumed_data`."""
    if args.data:
        data = Path(args.data)
        # Texts, not a prepared folder (load_meta says what a run, a checkpoint or a shard given is): what prepare
        # would advise, `train --dataset`, a resume refuses.
        if data.exists() and not any((place / name).exists() for place, name in
                                     ((data, "meta.json"), (data, "config.json"), (data.parent, "meta.json"))):
            raise NanoQwenError(f"cannot resume {out}: --data {data} is not prepared data (no meta.json); a resume "
                                f"trains on the data it began with, {saved['data']} (--data says where that folder "
                                "is now); to train on these texts from the run's weights instead: nanoqwen train "
                                f"--init-from {quote(str(out / 'last'))} --dataset {quote(str(data))}")
        return data
    data = Path(saved["data"])
    found = found_data(saved, out)
    if found is not None and found != data and announce:
        print(f"{data} is gone; resuming with {found.resolve()}, where it sits beside the run as it did", flush=True)
    if found is None:
        given = saved.get("args", {})
        train = saved["train"]
        again = ""
        if given.get("data") is None and train.get("dataset") and train.get("tokenizer"):
            # prepared by the run itself (--dataset): deleted, not moved, most likely; the same text prepared
            # alike passes check_resumed_data
            column = f" --text-column {quote(given['text_column'])}" if given.get("text_column") else ""
            again = (f"prepare it again: nanoqwen prepare --dataset {quote(train['dataset'])} --tokenizer "
                     f"{quote(train['tokenizer'])}{column} --out {quote(str(data))}; or, ")
        raise NanoQwenError(f"cannot resume {out}: its data folder {data} does not exist; {again}if it moved, give "
                            "--resume with --data NEW_PLACE")
    return found


def carried_files(data: Path, source: Path | None, warn: bool = True) -> tuple[Tokenizer, dict | None]:
    """The tokenizer and generation_config.json the run's checkpoints carry: those of the checkpoint it
    starts from or resumes, where that holds the data's tokenizer (an official folder's chat template, end
    token and recommended sampling stay so, whatever prepared the data); else the data's (see data_tokenizer), and
    the defaults.
    `warn`: whether a broken generation_config.json is warned about here (one process of torchrun's says it)."""
    from nanoqwen.data.prepare import data_tokenizer

    tokenizer = data_tokenizer(data)
    if source is None or not (source / "tokenizer.json").is_file():
        return tokenizer, None
    own = load_tokenizer(source)
    if own.fingerprint != tokenizer.fingerprint:  # its generation_config's end ids are for its own tokenizer
        return tokenizer, None
    return own, read_generation_file(source, warn).settings or None


def note_chat_template(tokenizer: Tokenizer, data: Path, checkpoint: Path) -> None:
    """Say so when the data's conversations were rendered with another chat template than the one the run's
    checkpoints carry (ChatML records for official weights): chat and serve prompt in a format never trained."""
    if holds_conversations(data) and tokenizer.chat_template != load_tokenizer(data).chat_template:
        print(f"note: {data} holds conversations rendered with another chat template than the one {checkpoint} "
              "carries, which its checkpoints keep and chat and serve prompt with; to train in that format, prepare "
              f"the records with --tokenizer {checkpoint} (or train with --dataset)", flush=True)


def data_splits(data: Path) -> dict[str, Any]:
    """Documents, tokens and bytes of each split: what tells other data from the same, prepared alike."""
    from nanoqwen.data.prepare import load_meta

    return load_meta(data)["splits"]


# A digest of the data reads this many slices of each split, at fixed places (the whole of a smaller file).
DIGEST_SLICES, DIGEST_SLICE_BYTES = 16, 1 << 16


def data_digest(data: Path) -> str:
    """sha256 of the sizes of train.bin and val.bin and of DIGEST_SLICES slices of each, spread evenly from start
    to end: other tokens in the same numbers (which the counts of `data_splits` miss) are told apart by 2 MiB read,
    however many GB the data holds. Not meta.json's fingerprint: that hashes what the folder was made from (where
    the files were, their times), so the same text prepared again elsewhere would not match it."""
    from nanoqwen.data.prepare import SPLITS

    digest = hashlib.sha256()
    for name in SPLITS:
        with (data / f"{name}.bin").open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            digest.update(f"{name} {size}\n".encode())
            if size <= DIGEST_SLICES * DIGEST_SLICE_BYTES:
                digest.update(f.read())
                continue
            for k in range(DIGEST_SLICES):
                f.seek(k * (size - DIGEST_SLICE_BYTES) // (DIGEST_SLICES - 1))
                digest.update(f.read(DIGEST_SLICE_BYTES))
    return digest.hexdigest()


def check_resumed_data(out: Path, data: Path, announce: bool) -> None:
    """The run's data folder may have been prepared again since (`nanoqwen prepare --out` over it), or --data
    may name another: ids from another tokenizer would mean other tokens to this model, and other text would
    not continue the run (its data position, its best val loss)."""
    from nanoqwen.data.prepare import load_meta

    meta = load_meta(data)  # one clear line if the folder is gone or incomplete
    saved = read_run_config(out)
    own_folder = Path(saved["data"]).resolve() == data.resolve()
    last = out / "last"
    given = saved.get("args", {})  # a run from --dataset (or the default corpus) names its source; with --data,
    if given.get("data") is None and saved["train"].get("dataset"):  # the folder's meta.json names it (older: SRC)
        source = quote(saved["train"]["dataset"])
    else:
        source = quote(meta["source"]) if isinstance(meta.get("source"), str) else "SRC"
    if (last / "tokenizer.json").is_file() and load_tokenizer(data).fingerprint != load_tokenizer(last).fingerprint:
        what = "was prepared again with another tokenizer since the run began" if own_folder else \
            "holds ids of another tokenizer than the run's"
        raise NanoQwenError(f"cannot resume {out}: {data} {what}, so its ids mean other tokens to this model; "
                            "continue from the weights on text in the run's tokenizer: nanoqwen train --init-from "
                            f"{quote(str(last))} --dataset {source}")
    recorded = saved.get("data_splits")  # its documents, tokens and bytes: the same text prepared alike
    digest = saved.get("data_digest")  # and its tokens (runs from before it was recorded: the counts alone)
    if (recorded is not None and meta["splits"] != recorded) or (digest is not None and data_digest(data) != digest):
        how = " (prepared again from other text or settings)" if own_folder else ""
        elsewhere = "" if own_folder else "give --data the folder it began with, or "
        raise NanoQwenError(f"cannot resume {out}: {data} holds other data than the run began with{how}; "
                            f"{elsewhere}train on it from the run's weights instead: nanoqwen train --init-from "
                            f"{quote(str(last))} --data {quote(str(data))}")
    if recorded is None and not own_folder and announce:
        print(f"note: {out} was made before runs recorded what their data holds, so nothing checks that {data} "
              "is the data it began with", flush=True)


# -- a run from a checkpoint's weights (--init-from) ----------------------------------------------
# Model fields that decide the shapes of the weights: what --set may not change with --init-from.
WEIGHT_SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                       "num_key_value_heads", "head_dim", "tie_word_embeddings")


def checkpoint_preset(folder: Path, overrides: list[str]) -> Preset:
    """What --init-from stands in for a preset with: the checkpoint's model (with --set applied), the
    fine-tuning defaults, and the checkpoint's own tokenizer for --dataset."""
    from nanoqwen.checkpoint import check_weight_files, read_config

    original = read_config(folder)
    # a missing or cut-off file (a failed download), or weights unlike config.json, said before data is prepared
    stored = check_weight_files(folder, original)
    config = apply_overrides(original, overrides)
    reshaped = [name for name in WEIGHT_SHAPE_FIELDS if getattr(config, name) != getattr(original, name)]
    if reshaped:  # refused here, before any data is prepared for weights that could not load
        raise NanoQwenError(f"--set {', '.join(reshaped)} would change the shapes of {folder}'s weights, which then "
                            "cannot be loaded; --init-from keeps the architecture (to train another one, use --preset "
                            "or --config without --init-from)")
    train: dict[str, Any] = {**FINETUNE_TRAIN, "seq_len": min(FINETUNE_SEQ_LEN, config.max_position_embeddings)}
    # Official weights come in bfloat16: best/ the same size, not twice it. The weights' own dtype, which config.json
    # may not name (a pickled .bin's is not known before loading: config.json's there).
    best_dtype = str(stored).removeprefix("torch.") if stored else config.torch_dtype
    if best_dtype in BEST_DTYPES:
        train["best_dtype"] = best_dtype
    if (folder / "tokenizer.json").is_file():
        check_vocab(load_tokenizer(folder), config, folder)  # before any data is prepared or run written
        train["tokenizer"] = str(folder)
    return Preset(name=file_name_part(display_name(folder)), model=config, train=train)  # runs/NAME-best-TIME


def default_out(preset: str) -> Path:
    """runs/PRESET-TIME, made here (by rank 0 under torchrun) so that runs started in the same second, such as a
    sweep started in the background, each get their own: the second is runs/PRESET-TIME-2."""
    base = f"runs/{preset}-{datetime.now():%Y%m%d-%H%M%S}"
    made = [base]

    def make() -> None:
        for k in range(1, 1000):
            made[0] = base if k == 1 else f"{base}-{k}"
            try:
                make_run_folder(Path(made[0]), exist_ok=False)  # atomic: only one process makes it
                return
            except FileExistsError:
                continue

    on_rank0(make)  # a failure (no permission to write here) stops every rank with its line, not rank 0 alone
    return Path(from_rank0(made[0]))  # every rank writes to rank 0's


# -- the run folder's records ---------------------------------------------------------------------
def data_place(run: Run) -> dict[str, str]:
    """Where the run's data folder is, for its config.json: as given, and relative to the run folder (found
    again there if both moved together) where a relative path leads there (not to another drive on Windows)."""
    try:
        return {"data": str(run.data), "data_from_run": os.path.relpath(run.data, run.out.resolve())}
    except ValueError:  # Windows' relpath across drives
        return {"data": str(run.data)}


RUN_CONFIG_FORMAT = 2  # 2: train.micro_batch is the one asked for (None if not), never the one chosen


def run_config(run: Run) -> dict[str, Any]:
    """config.json of the run folder: what was asked for and what it resolved to."""
    this = launch(run)
    return {"version": STATE_VERSION, "format": RUN_CONFIG_FORMAT, "preset": run.preset, **data_place(run),
            "data_splits": data_splits(run.data), "data_digest": data_digest(run.data),  # tell other data on resume
            "train": dataclasses.asdict(run.cfg), "model": dataclasses.asdict(run.model.config), **this,
            "launches": [{"step": run.state.step, **this}],
            "command": sys.argv, "args": {k: v for k, v in vars(run.args).items() if k != "func"}}


def launch(run: Run) -> dict[str, Any]:
    """How this invocation runs, which a resume may change (a torchrun job resumed in one process, another
    machine): config.json says the latest one's, and each one's in `launches`, with the step it started from."""
    return {"world_size": run.info.world_size, "device": str(run.info.device), "dtype": str(run.amp_dtype),
            "threads": torch.get_num_threads()}  # torch's, in each process (on CPU: its share of the cores)


def record_launch(saved: dict[str, Any], run: Run) -> None:
    """Add this (resumed) invocation to the run's config.json `saved`: its launch to `launches`, its command line
    to `resumed_with`. A launch from this step or later saved none of its steps (a resume that failed or was killed
    before its first save): this one replaces it, in both."""
    this = launch(run)
    launches = saved.get("launches")
    if not isinstance(launches, list):  # a run from before launches were recorded: its first, as it said
        launches = [{"step": 0, **{key: saved[key] for key in this if key in saved}}]
    kept = [entry for entry in launches
            if isinstance(entry, dict) and isinstance(entry.get("step"), int) and entry["step"] < run.state.step]
    # Each resume since launches were recorded appended to both, and the steps launches start from only grow: the
    # launches replaced are its last ones, their command lines the last ones of resumed_with
    commands = saved.get("resumed_with")
    commands = commands[:max(0, len(commands) - (len(launches) - len(kept)))] if isinstance(commands, list) else []
    saved.update(this, launches=[*kept, {"step": run.state.step, **this}], resumed_with=[*commands, sys.argv])


def first_launch(saved: dict[str, Any]) -> dict[str, Any]:
    """The run's first invocation as its config.json records it (a run from before launches were recorded: the
    top-level values, which were the first one's)."""
    launches = saved.get("launches")
    return launches[0] if isinstance(launches, list) and launches and isinstance(launches[0], dict) else saved


def read_run_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "config.json"
    if not run_dir.is_dir():
        what = "is a file" if run_dir.exists() else "does not exist"
        raise NanoQwenError(f"cannot resume: {run_dir} {what}; give a run folder (runs/NAME, the one a run's closing "
                            "lines name)")
    if (run_dir / STATE_PT).exists() or (run_dir.name == "best" and (run_dir.parent / "last").is_dir()):
        raise NanoQwenError(f"{run_dir} is a checkpoint of a run; --resume takes the run folder: "
                            f"--resume {quote(str(run_dir.parent))}")
    if not path.exists() and (runs := runs_inside(run_dir)):  # `--resume runs`: the folder that holds them
        raise folder_of_runs_refusal(run_dir, "one of them to --resume", runs)
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        missing = [key for key in RUN_CONFIG_KEYS if key not in saved]
        if missing:
            raise KeyError(", ".join(missing))
        TrainConfig(**saved["train"])
        check_train_types(saved["train"], "its train section")  # a hand edit
        if not isinstance(saved["data"], str):
            raise TypeError(f"its data is {saved['data']!r}, not a folder")
    except (OSError, ValueError, KeyError, TypeError, NanoQwenError) as e:
        weights = run_dir / "last"
        what = f"start a new run from its weights: --init-from {quote(str(weights))}" if weights.is_dir() else \
            "give the folder a run wrote (runs/NAME, the one a run's closing lines name)"
        cause = "missing" if isinstance(e, FileNotFoundError) else f"not a nanoqwen run config ({first_line(e, 200)})"
        raise NanoQwenError(f"cannot resume: {path} is {cause}; {what}") from e
    return saved


def load_model_config(last: Path) -> ModelConfig:
    from nanoqwen.checkpoint import read_config

    if not last.is_dir():
        best = last.parent / "best"  # written at the first evaluation, which may come before the first save
        keep = f", replacing its best/), or start a new run from those weights: --init-from {quote(str(best))}" \
            if best.is_dir() else ")"
        raise NanoQwenError(f"cannot resume: {last} is missing: the run stopped before its first save, so nothing "
                            "of it is left to resume; start it again (its own command, with --out "
                            f"{quote(str(last.parent))}, starts over in this folder{keep}")
    return read_config(last)


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop the records a killed run wrote after its last save (and a line it was cut off in): resumed
    steps will write them again."""
    from nanoqwen.plot import read_metrics

    if not (run_dir / "metrics.jsonl").exists():
        return
    # Lines that are not a step's record (written by hand: `5`, a step that is no number) are kept as they are.
    kept = [record for record in read_metrics(run_dir)
            if not (isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] > step)]
    with atomic_file(run_dir / "metrics.jsonl") as f:
        f.write("".join((json_line(r) if isinstance(r, dict) else json.dumps(r)) + "\n" for r in kept))


def truncate_samples(run_dir: Path, step: int) -> None:
    """Drop the samples a killed run took after its last save: resumed steps will take them again."""
    path = run_dir / "samples.txt"
    if not path.exists():
        return
    entries = re.split(r"(?m)^(?=--- step \d+$)", path.read_text(encoding="utf-8", errors="replace"))
    kept = [e for e in entries if not (m := re.match(r"--- step (\d+)\n", e)) or int(m[1]) <= step]
    with atomic_file(path) as f:
        f.write("".join(kept))


def holds_conversations(data: Path) -> bool:
    """Whether the data was prepared mostly from chat records (its model is for `nanoqwen chat`)."""
    from nanoqwen.data.prepare import load_meta

    try:
        meta = load_meta(data)
        return 2 * meta.get("conversations", 0) >= sum(split["documents"] for split in meta["splits"].values())
    except NanoQwenError:  # the folder went away while the run trained: the closing lines go on without it
        return False


def trained_on_plain_text(checkpoint: Path) -> bool:
    """Whether the checkpoint folder is known to be trained on plain text alone, never on a conversation: a run's
    best/ or last/ whose run started afresh (not --init-from: an official chat model fine-tuned on text still
    chats) on data that is still there, still the data the run recorded, and holds no conversations. Chat and the
    web page then point to plain continuation (such a model never ends a turn). Anything else (an official folder,
    a best/ copied out of its run, data gone or prepared again, a file damaged) is not known: False, quickly, and
    never an error."""
    try:
        folder = Path(os.path.abspath(checkpoint))
        if folder.name not in ("best", "last"):  # a link to one (`ln -s runs/NAME/best model`), say
            folder = Path(os.path.realpath(folder))
        if folder.name not in ("best", "last"):
            return False
        run_dir = folder.parent
        saved = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
        args = saved.get("args") if is_run_record(saved) else None
        if not isinstance(args, dict) or "init_from" not in args or args["init_from"]:
            return False
        data = found_data(saved, run_dir)  # as a resume finds it
        if data is None:
            return False
        from nanoqwen.data.prepare import load_meta

        meta = load_meta(data)
        recorded = saved.get("data_splits")  # prepared again since (other text, chats added): not what it saw
        return (recorded is None or meta["splits"] == recorded) and meta.get("conversations", 0) == 0
    except (OSError, ValueError, TypeError, KeyError, NanoQwenError):  # missing, damaged or edited: not known
        return False
