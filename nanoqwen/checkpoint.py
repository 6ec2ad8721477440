"""Checkpoints are Hugging Face Qwen3 folders: config.json, model.safetensors, generation_config.json
and the tokenizer files. Written atomically; any Qwen3 folder Transformers writes loads back. A run's last/
also holds its training state (optimizer, grad scaler, RNG, loop state), written in the same atomic step.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pickle
import sys
import typing
from pathlib import Path, PurePosixPath
from shlex import quote
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from nanoqwen.cli import list_presets
from nanoqwen.config import (
    QWEN3_VOCAB_SIZE,
    LoopState,
    ModelConfig,
    apply_overrides,
    check_json_types,
    load_preset,
)
from nanoqwen.distributed import (
    add_device_arguments,
    all_reduce,
    check_host_memory,
    gather_to_rank0,
    on_rank0,
    resolve_device,
    resolve_dtype,
)
from nanoqwen.errors import NanoQwenError, counted, first_line, seed_int
from nanoqwen.io import (
    atomic_dir,
    check_replaceable,
    folder_of_runs_refusal,
    give_usual_mode,
    is_run_config,
    is_run_record,
    run_folder_refusal,
    runs_inside,
    write_json,
)
from nanoqwen.model import Qwen3, rope_inv_freq
from nanoqwen.tokenizer import ENDOFTEXT, QWEN_FIRST_SPECIAL_ID, Tokenizer, load_tokenizer, resolve_tokenizer

if TYPE_CHECKING:  # the training state's functions take the run being trained
    from nanoqwen.train import Run

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
# Key mapping as data: Transformers' names are ours, except that a tied head is stored once.
TIED_HEAD_KEY, EMBEDDING_KEY = "lm_head.weight", "model.embed_tokens.weight"
# Where Transformers looks for the weights, in its order: the first present wins, so a folder re-saved in
# another layout loads its new weights past the stale index (or file) the old save left behind.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
# What a state_dict saved through a wrapper, not from the model itself, starts every name with.
WRAPPER_PREFIXES = {"_orig_mod.": "torch.compile", "module.": "DistributedDataParallel"}
# The top-level parts of Qwen3Model (a base model without the head), whose names lack the `model.` prefix.
HEADLESS_PARTS = ("embed_tokens", "layers", "norm", "rotary_emb")  # (an old save's RoPE buffer)


def vocab_rows(tokenizer: Tokenizer) -> int:
    """Embedding rows for a tokenizer: Qwen3's 151936 for the official one, else its ids rounded up to 64."""
    if tokenizer.vocab_size > QWEN_FIRST_SPECIAL_ID:
        return max(QWEN3_VOCAB_SIZE, tokenizer.vocab_size)
    return -(-tokenizer.vocab_size // 64) * 64


def config_for_tokenizer(config: ModelConfig, tokenizer: Tokenizer, fit_vocab: bool = False) -> ModelConfig:
    """Point bos/eos/pad at the tokenizer's own special ids and make sure the embedding holds them all.

    `fit_vocab` sizes the embedding to the tokenizer (presets name a vocabulary size, the data decides).
    """
    vocab = vocab_rows(tokenizer) if fit_vocab else config.vocab_size
    if tokenizer.vocab_size > vocab:
        raise NanoQwenError(f"the tokenizer has {tokenizer.vocab_size} ids but the model only {vocab} "
                            f"rows; use --set vocab_size={vocab_rows(tokenizer)} or a smaller tokenizer")
    return dataclasses.replace(config, vocab_size=vocab, **model_special_ids(tokenizer))


def model_special_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """A new model's bos, eos and pad ids: its tokenizer's <|endoftext|>, its end token (<|im_end|> where it has
    one) and <|endoftext|>, as Qwen3's."""
    return {"bos_token_id": tokenizer.eot_id, "eos_token_id": tokenizer.stop_ids[0], "pad_token_id": tokenizer.eot_id}


TOKENIZER_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")  # a new model's: its tokenizer's special ids


def set_fields(overrides: list[str]) -> list[str]:
    """The model fields `--set FIELD=VALUE` items name (as apply_overrides reads them: ` vocab_size =600` too)."""
    return [item.partition("=")[0].strip() for item in overrides]


def refuse_tokenizer_id_overrides(overrides: list[str]) -> None:
    """One line for a --set of a special id on a new model, which `config_for_tokenizer` would replace unsaid."""
    for key in set_fields(overrides):
        if key in TOKENIZER_IDS:
            raise NanoQwenError(f"--set {key}: a new model's bos, eos and pad ids are its tokenizer's (<|endoftext|>, "
                                "<|im_end|>), set from the tokenizer; leave it out")


def new_model_config(model: ModelConfig, overrides: list[str], tokenizer: Tokenizer) -> ModelConfig:
    """A preset's model with `--set` overrides, sized to the tokenizer unless vocab_size was set by hand."""
    refuse_tokenizer_id_overrides(overrides)
    config = apply_overrides(model, overrides)
    return config_for_tokenizer(config, tokenizer, fit_vocab="vocab_size" not in set_fields(overrides))


def generation_config(config: ModelConfig, tokenizer: Tokenizer | None) -> dict:
    stop = tokenizer.stop_ids if tokenizer is not None else [i for i in [config.eos_token_id] if i is not None]
    return {"bos_token_id": config.bos_token_id, "eos_token_id": stop or None,
            "pad_token_id": config.pad_token_id if config.pad_token_id is not None else config.bos_token_id,
            "do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20,
            "transformers_version": "4.51.0"}


def save_checkpoint(model: Qwen3, directory: str | Path, tokenizer: Tokenizer | None,
                    dtype: torch.dtype | None = None, generation: dict | None = None,
                    step: int | None = None) -> Path:
    """Write `model` (and its tokenizer) as a Hugging Face Qwen3 folder, replacing `directory` whole.
    `generation`: the generation_config.json to write (default: nanoqwen's, see `generation_config`).
    `step`: the training step the weights are from, kept in the safetensors metadata (see `checkpoint_step`)."""
    with atomic_dir(directory) as tmp:
        write_checkpoint_files(model, tmp, tokenizer, dtype, generation, step)
    return Path(directory)


def display_name(directory: str | Path) -> str:
    """What a checkpoint folder is called on screen and in the API: runs/NAME/best -> NAME/best (a bare
    `best` says little); any other folder -> its name (see folder_name)."""
    path = Path(directory).resolve()
    return f"{path.parent.name}/{path.name}" if path.name in {"best", "last"} else folder_name(path)


def folder_name(path: Path) -> str:
    """The name a folder goes by: a Hugging Face cache snapshot's (`models--Qwen--Qwen3-0.6B/snapshots/HASH`,
    where `huggingface-cli download` leaves official weights) is the model's, `Qwen3-0.6B`, not the hash."""
    hub_folder = path.parent.parent.name
    if path.parent.name == "snapshots" and hub_folder.startswith(("models--", "datasets--")):
        return hub_folder.split("--")[-1]
    return path.name


STEP_METADATA = "nanoqwen_step"


def checkpoint_step(directory: Path) -> int | None:
    """The training step a checkpoint's weights are from, when training wrote it (None otherwise)."""
    try:
        with safe_open(str(directory / "model.safetensors"), "pt") as f:
            return int((f.metadata() or {})[STEP_METADATA])
    except (OSError, SafetensorError, KeyError, ValueError):
        return None


def write_checkpoint_files(model: Qwen3, folder: Path, tokenizer: Tokenizer | None, dtype: torch.dtype | None = None,
                           generation: dict | None = None, step: int | None = None) -> None:
    """The files of a checkpoint, into `folder`: a temporary one that its caller's atomic_dir puts in place."""
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    config = model.config
    state = {k: v.detach().to(dtype or v.dtype).contiguous().cpu() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop(TIED_HEAD_KEY, None)
    stored = str(next(iter(state.values())).dtype).removeprefix("torch.")  # "float64" too (Python's own saves)
    hf_config = dataclasses.replace(config, torch_dtype=stored).to_hf_dict()
    metadata = {"format": "pt"} if step is None else {"format": "pt", STEP_METADATA: str(step)}
    save_file(state, str(folder / "model.safetensors"), metadata=metadata)
    give_usual_mode(folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")
    generation = generation or generation_config(config, tokenizer)
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
    if tokenizer is not None:
        tokenizer.save(folder, context=config.max_position_embeddings)


# Transformers' Qwen3 classes with another head than a language model's (reward models are such classifiers).
OTHER_HEADS = {"Qwen3ForSequenceClassification": "a head that scores whole texts (score.weight)",
               "Qwen3ForTokenClassification": "a head that labels each token (score.weight)",
               "Qwen3ForQuestionAnswering": "a head that marks answer spans (qa_outputs)"}


def read_config(directory: str | Path) -> ModelConfig:
    directory = Path(directory)
    path = directory / "config.json"
    if directory.is_file():
        if directory.suffix.lower() == ".gguf":  # `nanoqwen gguf` writes DIR.gguf beside the checkpoint DIR
            written_from = directory.with_suffix("")
            which = f"the one it was written from, {written_from}" if (written_from / "config.json").is_file() else \
                "one such as runs/NAME/best"
            raise NanoQwenError(f"{directory} is a GGUF file, for llama.cpp, Ollama or LM Studio; nanoqwen reads "
                                f"checkpoint folders: give {which}")
        if is_run_config(directory.parent / "config.json"):  # a run's own file (metrics.jsonl): its checkpoints
            raise run_folder_refusal(directory.parent)
        if (directory.parent / "config.json").is_file():
            raise NanoQwenError(f"{directory} is a file; give the checkpoint folder that holds it ({directory.parent})")
        raise NanoQwenError(f"{directory} is a file, not a checkpoint folder; give one such as runs/NAME/best")
    if not directory.is_dir():
        if len(directory.parts) == 2 and not directory.is_absolute() and not directory.parent.exists():
            # ORG/NAME where no ORG folder is: a Hugging Face model's name, as Transformers would take it
            raise NanoQwenError(f"model folder {directory} does not exist; nanoqwen reads checkpoint folders and "
                                f"downloads no models; if {directory} is a Hugging Face model, download it first "
                                f"(`huggingface-cli download {directory} --local-dir models/{directory.name}`) and "
                                f"give that folder (models/{directory.name})")
        raise NanoQwenError(f"model folder {directory} does not exist; give a checkpoint folder "
                            "(e.g. runs/NAME/best) or make one with `nanoqwen init`")
    if not path.exists():
        if (directory / "adapter_config.json").is_file():  # peft's save of a LoRA (or other) fine-tune
            raise adapter_folder(directory)
        if (directory / "meta.json").is_file() and (directory / "train.bin").is_file():
            raise NanoQwenError(f"{directory} is a prepared data folder, not a model; train one on it (nanoqwen "
                                f"train --data {quote(str(directory))}) and give its checkpoint, runs/NAME/best")
        # A folder of models, or Hugging Face's cache entry for one (models--ORG--NAME/snapshots/REVISION/)
        found = (*directory.glob("*/config.json"), *directory.glob("snapshots/*/config.json"))
        inside = sorted(p.parent for p in found if not is_run_config(p))  # runs/: its runs' records, not models
        if inside:
            which = f"{inside[0]} has; give that folder" if len(inside) == 1 else \
                f"{', '.join(map(str, inside[:3]))} have; give one of them"
            raise NanoQwenError(f"{directory} has no config.json, but {which}")
        # runs/: a checkpoint of one of its runs, best/ (lowest val loss) where it has one
        saved = [[run / name for name in ("best", "last") if (run / name / "config.json").is_file()]
                 for run in runs_inside(directory)]
        if any(saved):
            raise folder_of_runs_refusal(directory, "a checkpoint of one of them",
                                         [checkpoints[0] for checkpoints in saved if checkpoints])
        raise NanoQwenError(f"{directory} has no config.json, so it is not a Hugging Face checkpoint folder; give the "
                            "folder that holds a model's config.json and weights (re-download one that lacks it)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NanoQwenError(f"{path} is not valid JSON ({e}); re-download or re-save the checkpoint") from e
    except OSError as e:  # a folder by that name, unreadable
        raise NanoQwenError(f"{path} cannot be read ({first_line(e)}); re-download or re-save the checkpoint") from e
    if not isinstance(raw, dict):
        raise NanoQwenError(f"{path} is not a config object; re-download or re-save the checkpoint")
    # A run's own record, checkpoints or not yet (training, or stopped before its first save): not a bad model_type
    has_checkpoints = (directory / "best").is_dir() or (directory / "last").is_dir()
    if "model_type" not in raw and (is_run_record(raw) or has_checkpoints):
        raise run_folder_refusal(directory)
    config = ModelConfig.from_hf_dict(raw, str(path))
    named = raw.get("architectures")
    heads = [name for name in named if isinstance(name, str) and name in OTHER_HEADS] if isinstance(named, list) else []
    if heads:  # its head's weights would be refused as fitting nowhere, which says nothing of why
        raise NanoQwenError(f"{directory} is a {heads[0]}: a Qwen3 with {OTHER_HEADS[heads[0]]} in place of lm_head "
                            "(next-token logits); nanoqwen runs language models, Qwen3ForCausalLM checkpoints")
    return config


def adapter_folder(directory: Path) -> NanoQwenError:
    """The refusal of a PEFT adapter folder: only the changes to a base model, which Transformers (with peft
    installed) merges into that model as it loads; nanoqwen reads whole models."""
    try:
        adapter = json.loads((directory / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        adapter = {}
    adapter = adapter if isinstance(adapter, dict) else {}
    kind, base = adapter.get("peft_type", "?"), adapter.get("base_model_name_or_path") or "its base model"
    return NanoQwenError(f"{directory} is a PEFT adapter ({kind}) of {base}, not a whole model; merge it into that "
                         "model with peft (PeftModel.from_pretrained(BASE, ADAPTER).merge_and_unload()"
                         ".save_pretrained(NEW_DIR)) and give NEW_DIR")


def weight_files(directory: Path) -> list[Path]:
    """The files holding the weights: the first of WEIGHT_FILES present, an index standing for its shards."""
    for name in WEIGHT_FILES:
        path = directory / name
        if path.exists():
            return shard_files(path) if name.endswith(".index.json") else [path]
    if (directory / "adapter_config.json").is_file():  # an adapter saved beside its base model's config.json
        raise adapter_folder(directory)
    raise NanoQwenError(f"{directory} has no model.safetensors or pytorch_model.bin (nor a sharded index of "
                        "either); is it a complete checkpoint?")


def shard_files(index: Path) -> list[Path]:
    """The shards an index names, each a file inside its folder, all present."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (ValueError, KeyError, TypeError, OSError) as e:  # bad JSON or bytes, no weight_map, a folder
        raise NanoQwenError(f"{index} is damaged ({type(e).__name__}: {e}); re-download the checkpoint") from e
    check_json_types({"weight_map": weight_map}, {"weight_map": dict[str, str]}, str(index))
    names = sorted(set(weight_map.values()))
    if not names:
        raise NanoQwenError(f"{index} names no weight files; re-download the checkpoint")
    for name in names:  # weights from elsewhere would load silently as this model's
        if PurePosixPath(name).is_absolute() or ".." in PurePosixPath(name).parts:
            raise NanoQwenError(f"{index} names {name}, which is outside {index.parent}; re-download the checkpoint")
    missing = [n for n in names if not (index.parent / n).is_file()]
    if missing:
        raise NanoQwenError(f"{index.parent} lacks {', '.join(missing[:3])}, named in {index.name}; "
                            "the download is incomplete")
    return [index.parent / n for n in names]


# The dtypes a safetensors header names (the format's own codes), as torch's.
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
                      "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def check_weight_files(directory: Path, config: ModelConfig) -> torch.dtype | None:
    """The weight files are all there, each safetensors header fits its file's size (so a file cut short is
    found) and names the tensors `config` describes, in their shapes and in dtypes nanoqwen loads, without reading
    the weights: for a long job (preparing a corpus) to refuse up front, not at loading. Returns the dtype the
    weights are stored in (the embedding's, as `load_model` keeps it), or None for a pickled .bin."""
    headers: dict[str, torch.Tensor] = {}
    for path in weight_files(directory):
        if path.suffix != ".safetensors":
            return None  # a pickled .bin has no header to read without loading it: checked when loaded
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    stored = f.get_slice(key)
                    dtype = SAFETENSORS_DTYPES.get(stored.get_dtype())
                    if dtype is None:  # a code newer than this list: no weights nanoqwen loads either
                        raise not_full_precision(directory, key, stored.get_dtype())
                    headers[key] = torch.empty(stored.get_shape(), dtype=dtype, device="meta")
        except (SafetensorError, OSError) as e:
            raise damaged(path, e) from e
    return match_weights(headers, directory, config)[EMBEDDING_KEY].dtype


# What nanoqwen loads: floats of 16 bits and up (float64 too: Python's own saves, the tests' references).
FULL_PRECISION = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def not_full_precision(directory: Path, key: str, dtype: str) -> NanoQwenError:
    """The refusal of a weight stored in 8 bits (int8, fp8) or as integers where config.json, with no
    quantization_config, says nothing of how to read them back (Transformers casts them to float as they are:
    int8's -127..127 as the weights, their scales unread)."""
    return NanoQwenError(f"{directory}: {key} is stored in {dtype}, as quantized weights are, but its config.json "
                         "has no quantization_config to say how to read them; nanoqwen loads only full-precision "
                         "weights (bf16, fp16 or fp32): use the unquantized release of the model")


def damaged(path: Path, e: BaseException) -> NanoQwenError:
    return NanoQwenError(f"{path} is damaged or cut short ({first_line(e)}); re-download or re-save the checkpoint")


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of one weight file: safetensors, or a pytorch_model.bin unpickled as tensors only."""
    try:
        if path.suffix == ".bin":
            state = torch.load(path, map_location="cpu", weights_only=True)  # weights_only: runs no pickled code
        else:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                state = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except pickle.UnpicklingError:  # objects beyond tensors, which weights_only refuses, or no pickle at all
        state = None
    except (SafetensorError, OSError, RuntimeError, EOFError, KeyError, ValueError) as e:
        raise damaged(path, e) from e
    if not (isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())):
        raise NanoQwenError(f"{path} is damaged or holds more than named tensors, which nanoqwen does not "
                            "unpickle; re-download it, or convert the folder to safetensors with Transformers: "
                            "AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(NEW_DIR)")
    return state


def load_model(directory: str | Path, device: torch.device | str = "cpu",
               dtype: torch.dtype | None = torch.float32, config: ModelConfig | None = None) -> Qwen3:
    """Build a Qwen3 from a checkpoint folder, tied or untied, one file or sharded.

    `dtype=None` keeps the stored dtype. `config` replaces the folder's config.json (its weights must fit it).
    """
    directory = Path(directory)
    own = read_config(directory)
    config = config or own
    if torch.device(device).type == "cpu":  # the weights in the dtype asked for (the stored one: at least 2 bytes)
        size = dtype.itemsize if dtype else 2
        check_host_memory(config.num_params(), size, f"loading {directory}",
                          "load it with --dtype bfloat16, or on a machine with more memory" if size > 2 else
                          "load it on a machine with more memory")
    state = {key: value for path in weight_files(directory) for key, value in read_weights(path).items()}
    state = match_weights(state, directory, config, own)
    target = dtype or state[EMBEDDING_KEY].dtype
    for key, value in state.items():  # one tensor at a time: the old copy is freed as the new one is made
        state[key] = value.to(device=device, dtype=target)
    with torch.device("meta"):
        model = Qwen3(config)
    return assign_weights(model, state, device).eval()


def match_weights(state: dict[str, torch.Tensor], directory: Path, config: ModelConfig,
                  own: ModelConfig | None = None) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors (or, from headers alone, meta tensors of their shapes) under the names and in the
    shapes a Qwen3 of `config` has: old and headless saves renamed, a tied head dropped; anything missing, left
    over or of another shape refused. `own` is the folder's config.json, when `config` replaces it."""
    own = own or config
    described, hint = ("its config.json", "is it a complete Qwen3 checkpoint?") if config == own else \
        ("the model config asked for", "a --set cannot change the shape of a checkpoint's weights")
    for prefix, wrapper in WRAPPER_PREFIXES.items():  # Transformers reads none of such names: random weights
        if state and all(key.startswith(prefix) for key in state):
            raise NanoQwenError(f"{directory}: every weight's name starts with {prefix!r}, as {wrapper} names them, "
                                "which Transformers does not read; save the unwrapped model's weights (model."
                                f"{prefix[:-1]}.state_dict()), or remove {prefix!r} from the names")
    if state and all(key.split(".")[0] in HEADLESS_PARTS for key in state):  # saved from Qwen3Model: no head
        if not config.tie_word_embeddings:
            raise NanoQwenError(f"{directory} is a headless base model (Qwen3Model: no 'model.' prefix, no lm_head) "
                                "with untied embeddings, so it has no output layer; use its Qwen3ForCausalLM "
                                "checkpoint")
        state = {f"model.{key}": value for key, value in state.items()}  # as Transformers: the head is the embedding
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}  # old saves' RoPE buffer
    for key, value in state.items():  # before the names: a quantizer's own (qweight, weight_scale) fit nowhere
        if value.dtype not in FULL_PRECISION:
            raise not_full_precision(directory, key, str(value.dtype).removeprefix("torch."))
    if config.tie_word_embeddings and not own.tie_word_embeddings and TIED_HEAD_KEY in state:
        raise NanoQwenError(f"{directory} has its own lm_head (untied embeddings); tie_word_embeddings=true would "
                            "throw it away and answer with the input embedding instead; leave it untied")
    head, embedding = state.get(TIED_HEAD_KEY), state.get(EMBEDDING_KEY)
    if config.tie_word_embeddings and own.tie_word_embeddings and head is not None and embedding is not None and \
            not head.is_meta and not torch.equal(head, embedding):
        raise NanoQwenError(f"{directory} says tie_word_embeddings true but holds an lm_head unlike its embedding "
                            "(Transformers 4 drops that head, 5 keeps it); set \"tie_word_embeddings\": false in its "
                            "config.json to use the head, or remove lm_head.weight to tie")
    if config.tie_word_embeddings and embedding is None and head is not None:
        state[EMBEDDING_KEY] = head  # safetensors' save_model keeps a tied pair's head name only
    if config.tie_word_embeddings:
        state.pop(TIED_HEAD_KEY, None)
    with torch.device("meta"):
        expected = {k: v.shape for k, v in Qwen3(config).state_dict().items()
                    if not (config.tie_word_embeddings and k == TIED_HEAD_KEY)}
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        found = [f"lacks {counted(len(missing), 'weight')} ({', '.join(missing[:3])}{', ...' * (len(missing) > 3)})"
                 ] if missing else []
        found += [f"holds {counted(len(unexpected), 'weight')} that {'fit' if len(unexpected) > 1 else 'fits'} "
                  f"nowhere in it ({', '.join(unexpected[:3])}{', ...' * (len(unexpected) > 3)})"] if unexpected else []
        raise NanoQwenError(f"{directory} does not match {described}: it {' and '.join(found)}; {hint}")
    for key, value in state.items():
        if value.shape != expected[key]:
            raise NanoQwenError(f"{directory}: {key} has shape {tuple(value.shape)}, {described} implies "
                                f"{tuple(expected[key])}; {hint}")
    return state


def assign_weights(model: Qwen3, state: dict[str, torch.Tensor], device: torch.device | str) -> Qwen3:
    """Make a Qwen3 built on the meta device hold the tensors of `state` (no copies, no random weights drawn
    first); a tied head shares the embedding's tensor; RoPE's buffer is built on `device`."""
    if model.config.tie_word_embeddings:
        state = {**state, TIED_HEAD_KEY: state[EMBEDDING_KEY]}
    model.load_state_dict(state, assign=True)
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(model.config, device)  # non-persistent: not in the files
    return model


def load_checkpoint(directory: str | Path, device: torch.device | str = "cpu",
                    dtype: torch.dtype | None = torch.float32, generation: GenerationFile | None = None
                    ) -> tuple[Qwen3, Tokenizer]:
    """A model and its tokenizer from one checkpoint folder; a tokenizer the model cannot read is refused first.
    `generation`: the folder's generation_config.json where the caller read it already (None: read here)."""
    config = read_config(directory)  # first: it says best what a folder that is no checkpoint is
    tokenizer = load_tokenizer(directory)
    check_vocab(tokenizer, config, Path(directory))
    generation = generation or read_generation_file(directory)
    tokenizer.extra_stop_ids = generation_end_ids(generation)
    warn_of_special_ids(tokenizer, config, generation)
    return load_model(directory, device, dtype), tokenizer


@dataclasses.dataclass(frozen=True)
class GenerationFile:
    """A checkpoint folder's generation_config.json as read once where the model is loaded to generate: its end
    ids, its recommended sampling and the settings nanoqwen does not apply all come from this one reading."""

    path: Path
    settings: dict[str, Any] | None
    """The file's JSON object; None where the folder has none, or where it is no JSON object (warned about)."""

    def get(self, name: str) -> Any:
        return (self.settings or {}).get(name)


def read_generation_file(directory: str | Path, warn: bool = True) -> GenerationFile:
    """A folder's generation_config.json. One that is not a JSON object (not JSON, cut short, an array...) is named
    in one warning line (`warn`: False in all but one of torchrun's processes) and read as missing: the model still
    loads, as Transformers loads it when that file is no JSON (then taking its end ids from config.json), since the
    file only ever supplies defaults."""
    path = Path(directory) / "generation_config.json"
    if not path.is_file():
        return GenerationFile(path, None)
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        problem = f"cannot be read ({e.strerror or e})"
    except ValueError as e:  # not JSON, or not UTF-8
        problem = f"is not valid JSON ({e})"
    else:
        if isinstance(saved, dict):
            return GenerationFile(path, saved)
        problem = "is not a JSON object"
    if warn:
        print(f"nanoqwen: warning: {path} {problem}; ignored (end ids from config.json, default sampling settings): "
              "fix or remove it", file=sys.stderr, flush=True)
    return GenerationFile(path, None)


def generation_end_ids(generation: GenerationFile) -> list[int]:
    """The end ids a folder's generation_config.json names (eos_token_id, one or a list): Transformers stops
    at them, so generation here does too, besides <|im_end|> and <|endoftext|>. A folder without that file
    (or with one that is no JSON object) gets them from config.json, where Transformers then takes its
    generation settings from."""
    saved = generation.settings
    if saved is None:
        try:  # read_config took it already: only its raw eos_token_id, which may be a list, is wanted here
            saved = json.loads(generation.path.with_name("config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            saved = {}
    end = saved.get("eos_token_id") if isinstance(saved, dict) else None
    return [i for i in (end if isinstance(end, list) else [end]) if isinstance(i, int) and not isinstance(i, bool)
            and i >= 0]


# What to do about text in another tokenizer than the model's (a folder of weights alone says nothing of it).
OWN_TOKENIZER_FIX = "prepare the text with the tokenizer the model was trained with (--tokenizer qwen3 for official " \
    "Qwen3 weights)"


def check_vocab(tokenizer: Tokenizer, config: ModelConfig, directory: Path, whose: str = "its tokenizer",
                fix: str = "use the tokenizer the model was trained with") -> None:
    """Every id the tokenizer gives needs an embedding row (spare rows are fine: official Qwen3 has 267), and the
    model's end token must be one of the tokenizer's (fewer ids, such as another model's tokenizer copied in, would
    otherwise decode its rows as nothing). `whose` names the tokenizer when it is not the folder's own."""
    if tokenizer.vocab_size > config.vocab_size:
        raise NanoQwenError(f"{directory}: {whose} has {tokenizer.vocab_size} ids but its model only "
                            f"{config.vocab_size} embedding rows (vocab_size), so ids {config.vocab_size} and up "
                            f"would fail; {fix}")
    if config.eos_token_id is not None and config.eos_token_id >= tokenizer.vocab_size:
        raise NanoQwenError(f"{directory}: its model ends text with eos_token_id {config.eos_token_id}, which {whose} "
                            f"of {tokenizer.vocab_size} ids does not have, so the tokenizer is another model's; {fix}")


def warn_of_special_ids(tokenizer: Tokenizer, config: ModelConfig, generation: GenerationFile) -> None:
    """One warning line for each id a folder names that its tokenizer holds as another token than it stands for:
    an end id (config.json's eos_token_id, generation_config.json's) that is not one of its end tokens, or a bos
    or pad id that is no special token. Such a folder still loads: Transformers runs it as it is, and generation
    here stops where it stops (a fine-tune may end its text at a token of its own), but a tokenizer of another
    model, or a mistyped id, would cut every reply at a word, unsaid."""
    config_path = generation.path.with_name("config.json")
    end_ids_path = generation.path if generation.settings is not None else config_path
    named = [(config_path, "eos_token_id", config.eos_token_id), (config_path, "bos_token_id", config.bos_token_id),
             (config_path, "pad_token_id", config.pad_token_id),
             *((end_ids_path, "eos_token_id", token_id) for token_id in generation_end_ids(generation))]
    ends = ", ".join(f"{text} {token_id}" for token_id, text in tokenizer.end_ids.items()) or "none"
    endoftext = tokenizer.token_id(ENDOFTEXT)
    for path, name, token_id in dict.fromkeys(named):
        is_end = name == "eos_token_id"
        if token_id is None or token_id in (tokenizer.end_ids if is_end else tokenizer.special_ids):
            continue
        if token_id < 0:  # some exports write pad -1 (decode refuses it)
            found = "is negative, no id of its tokenizer"
        elif token_id >= tokenizer.vocab_size:
            found = f"is beyond its tokenizer's {tokenizer.vocab_size} ids"
        else:
            found = f"is {tokenizer.token_shown(token_id)} in its tokenizer"
        if is_end:
            problem = f"not one of its end tokens ({ends}), so generation stops there, as Transformers' does"
            fix = "correct it in that file unless the model was trained to end its text there"
        else:
            problem = "not one of its special tokens" + (
                " (Transformers pads batched generations with it)" if name == "pad_token_id" else "")
            fix = "correct it" if endoftext is None else f"set it to {endoftext} ({ENDOFTEXT}, as Qwen3 has it)"
            fix += " in that file"
        print(f"nanoqwen: warning: {path}: {name} {token_id} {found}, {problem}; {fix}", file=sys.stderr, flush=True)


def check_data_tokenizer(checkpoint: Path, data: Path, config: ModelConfig) -> None:
    """The data must be in the checkpoint's token ids: the same tokenizer where the checkpoint has one, else one
    its model can read (its checkpoints, which carry that tokenizer, would not load otherwise)."""
    tokenizer = load_tokenizer(data)
    if (checkpoint / "tokenizer.json").is_file():
        if load_tokenizer(checkpoint).fingerprint != tokenizer.fingerprint:
            from nanoqwen.data.prepare import prepare_command  # the data pipeline is imported only when needed

            try:  # the source its meta.json names, to prepare again
                meta = json.loads((data / "meta.json").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                meta = None
            raise NanoQwenError(f"{data} was tokenized with a different tokenizer than {checkpoint}'s, so its ids "
                                f"mean other tokens to this model; prepare the text with "
                                f"`{prepare_command(meta, 'DIR', tokenizer=str(checkpoint))}`")
    else:
        check_vocab(tokenizer, config, checkpoint, f"{data}'s tokenizer", OWN_TOKENIZER_FIX)


# -- `nanoqwen init` -----------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="tiny", help="preset name (listed below) or JSON file (default: tiny)")
    list_presets(p)
    p.add_argument("--out", required=True, help="folder to write the checkpoint into")
    p.add_argument("--tokenizer", default="qwen3", help="qwen3 (default) or a tokenizer folder")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the random weights (default 0)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a model field, e.g. --set num_hidden_layers=2")
    p.add_argument("--force", action="store_true", help="replace the weights of a checkpoint already in --out")
    add_device_arguments(p, dtype_help="dtype the weights are stored in (default float32)")


def run(args: argparse.Namespace) -> int:
    check_replaceable(args.out, "checkpoint")
    out = Path(args.out)
    if out.exists() and is_run_config(out.resolve().parent / "config.json"):  # a run's best/ or last/
        raise NanoQwenError(f"{args.out} is a checkpoint of the run {out.resolve().parent}; init writes random "
                            "weights, so pick another --out")
    if any((out / name).exists() for name in WEIGHT_FILES) and not args.force:  # trained or downloaded weights
        raise NanoQwenError(f"{args.out} already holds a checkpoint's weights, which init would replace with random "
                            "ones; pick another --out, or give --force to replace them")
    preset = Path(args.preset)
    if preset.suffix == ".json" and is_run_config(preset):  # (load_preset's refusal names train's flags)
        raise NanoQwenError(f"{preset} is a run's record of its settings, not a preset; for the run's architecture "
                            f"give its checkpoint's: --preset {preset.parent / 'best' / 'config.json'}")
    tokenizer = resolve_tokenizer(args.tokenizer)
    config = new_model_config(load_preset(args.preset).model, args.set, tokenizer)
    torch.manual_seed(args.seed)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, torch.device("cpu")) if args.dtype else torch.float32
    if device.type == "cpu":
        check_host_memory(config.num_params(), dtype.itemsize, f"preset {args.preset}")
    # Built in --dtype itself: bf16 weights take half of float32's memory, and Qwen3.init_weights draws each matrix
    # in float32 before rounding it, so a seed gives the weights that float32 cast to bf16 gave.
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = Qwen3(config)
    finally:
        torch.set_default_dtype(default_dtype)
    save_checkpoint(model, args.out, tokenizer, dtype=dtype)
    # The tokenizer's vocabulary sizes the embeddings (Qwen3's 151,936 rows are most of a small preset's weights).
    print(f"wrote {args.out}: {model.num_params() / 1e6:.1f}M parameters, preset {args.preset} with the "
          f"{args.tokenizer} tokenizer (vocab_size {config.vocab_size:,}), seed {args.seed}")
    return 0


# -- the training state beside a run's last/ ---------------------------------------------------------
STATE_VERSION = 1
STATE_JSON, STATE_PT = "train_state.json", "train_state.pt"


def seed_dropout(seed: int, rank: int) -> None:
    """Seed what this rank's dropout draws from once its weights are drawn (from `seed`, alike on every rank: FSDP2
    shards them as each rank built them). Rank 0 goes on from `seed`, as one process does; every other rank starts
    from a seed of its own, made from (seed, rank), so that it draws other masks for its own micro-batches."""
    if rank:  # torch.manual_seed seeds the CPU's generator and every GPU's (CUDA, MPS)
        torch.manual_seed(int(np.random.SeedSequence([seed, rank]).generate_state(1, np.uint64)[0]))


def rng_states(device: torch.device) -> dict[str, torch.Tensor]:
    """The generators this process's dropout goes on drawing from: torch's (the CPU's) and that of the device it
    trains on, under its type (CUDA's, MPS's; a CPU run initializes no GPU)."""
    states = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    elif device.type == "mps":
        states["mps"] = torch.mps.get_rng_state()
    return states


def saved_rng(device: torch.device) -> dict[str, Any] | None:
    """What train_state.pt keeps of the generators: rank 0's under "rng" (all that saves from before kept) and each
    other rank's, in rank order, under "other_ranks_rng". A collective (every rank calls it): None but on rank 0."""
    states = gather_to_rank0(rng_states(device))
    return None if states is None else {"rng": states[0], "other_ranks_rng": states[1:]}


def restore_rank_rng(saved: dict[str, Any], device: torch.device, rank: int) -> None:
    """Put back this rank's generators as saved_rng saved them. A rank the save holds none of (a resume on more
    processes, or a save from before each rank's were kept) keeps its seed_dropout seeding."""
    if rank == 0:
        restore_rng_states(saved["rng"], device)
    elif rank <= len(others := saved.get("other_ranks_rng", [])):
        restore_rng_states(others[rank - 1], device)


def restore_rng_states(saved: dict[str, Any], device: torch.device) -> None:
    """Put back what rng_states saved; a device's generator saved on another kind of device (or none) stays as
    seeded."""
    torch.set_rng_state(saved["torch"])
    if device.type == "mps" and saved.get("mps") is not None:
        torch.mps.set_rng_state(saved["mps"])
    restore_cuda_rng(saved.get("cuda"), device)


def restore_cuda_rng(saved: torch.Tensor | list[torch.Tensor] | None, device: torch.device) -> None:
    """Put back the training device's CUDA generator from the one this rank saved, whichever GPU it trained on then.
    Saves from before held a list, one per GPU rank 0's process saw, put back as they were then (a run saved on more
    GPUs than it resumes on still resumes)."""
    if saved is None or device.type != "cuda":
        return
    if isinstance(saved, torch.Tensor):
        torch.cuda.set_rng_state(saved, device)
        return
    for index, state in enumerate(saved[:torch.cuda.device_count()]):
        torch.cuda.set_rng_state(state, index)


def load_train_state(run: Run, last: Path) -> None:
    """Optimizer, scaler, RNG and loop state from last/; one clear line when any of it is unusable."""
    try:
        state = json.loads((last / STATE_JSON).read_text(encoding="utf-8"))
        state.pop("train", None)  # the settings and autocast dtype it was saved with, read by runs.resumed_run
        state.pop("dtype", None)
        version = state.pop("version", None)
        if isinstance(version, int) and version > STATE_VERSION:  # not damaged: written by a newer nanoqwen
            raise NanoQwenError(f"cannot resume from {last}: its {STATE_JSON} is version {version}, from a newer "
                                f"nanoqwen (this one reads version {STATE_VERSION}); upgrade nanoqwen to resume it")
        if version != STATE_VERSION:
            raise ValueError(f"unknown state version in {STATE_JSON}")
        check_json_types(state, typing.get_type_hints(LoopState), str(last / STATE_JSON))
        run.state = LoopState(**state)
        if min(run.state.step, run.state.tokens, run.state.evals_since_best) < 0:
            raise ValueError(f"negative counts in {STATE_JSON}")
        try:
            blob = torch.load(last / STATE_PT, map_location="cpu", weights_only=True)
        except (FileNotFoundError, PermissionError):
            raise
        except Exception as e:  # noqa: BLE001 (torch's words for a cut-off file are long and say no more)
            raise ValueError(f"{STATE_PT} is cut short or damaged") from e
        load_optimizer_state(run, blob["optimizer"])
        if blob.get("scaler"):
            run.scaler.load_state_dict(blob["scaler"])
        restore_rank_rng(blob, run.info.device, run.info.rank)
    except NanoQwenError:
        raise
    except Exception as e:  # noqa: BLE001 (any failure here means the same thing to the user)
        raise NanoQwenError(f"cannot resume from {last}: its training state ({STATE_JSON}, {STATE_PT}) is missing or "
                            f"corrupt ({first_line(e, 200)}); start a new run from its weights: --init-from {last}"
                            ) from e


def optimizer_state(run: Run) -> dict[str, Any]:
    if run.args.fsdp:  # gather the sharded state (a collective: every rank calls it)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(run.model, run.optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return run.optimizer.state_dict()


def load_optimizer_state(run: Run, state: dict[str, Any]) -> None:
    if run.args.fsdp and any(isinstance(key, int) for key in state.get("state", {})):
        state = keyed_by_name(state, run)  # saved without --fsdp; FSDP's loader wants names
    # Loading puts back the saved groups' settings; the weight decay is the run's as given now (--weight-decay
    # with --resume), as the learning rate is (set at every step).
    decays = [group["weight_decay"] for group in run.optimizer.param_groups]
    if run.args.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(run.model, run.optimizer, state, options=StateDictOptions(full_state_dict=True))
    else:
        run.optimizer.load_state_dict(state)
    for group, decay in zip(run.optimizer.param_groups, decays, strict=True):
        group["weight_decay"] = decay


def keyed_by_name(state: dict[str, Any], run: Run) -> dict[str, Any]:
    """An optimizer state saved by a whole model (keyed by position: the order of the optimizer's parameters, which
    the same model builds alike) keyed by parameter name, as FSDP's full state is."""
    name_of = {id(p): name for name, p in run.model.named_parameters()}
    names = [name_of[id(p)] for group in run.optimizer.param_groups for p in group["params"]]
    return {"state": {names[i]: value for i, value in state["state"].items()},
            "param_groups": [{**group, "params": [names[i] for i in group["params"]]}
                             for group in state["param_groups"]]}


def full_model(run: Run) -> Qwen3 | None:
    """The model with whole tensors on rank 0 (None elsewhere); a collective under FSDP."""
    if not run.args.fsdp:
        return run.model if run.info.is_main else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(run.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not run.info.is_main:
        return None
    with torch.device("meta"):  # the gathered tensors become its weights: no second model's worth drawn first
        copy = Qwen3(run.model.config)
    return assign_weights(copy, state, "cpu")


def save_last(run: Run) -> None:
    """last/: the weights and the training state, replaced together or not at all."""
    # A save between evaluations, or on a signal, follows an update no loss has seen yet: never keep a
    # diverged one in place of the last good save. Each rank checks its own (FSDP: sharded) weights and all
    # ranks learn the answer, so they stop together instead of waiting on rank 0.
    broken = next((name for name, p in run.model.named_parameters()
                   if not bool(torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all())), None)
    if all_reduce(float(broken is not None), "max", run.info.device):
        where = broken or "on another rank"
        raise NanoQwenError(f"the weights became nan or infinite at step {run.state.step} ({where}); last/ keeps "
                            "the save before; lower --lr or raise --warmup")
    model, optim_state, rng = full_model(run), optimizer_state(run), saved_rng(run.info.device)

    def write() -> None:  # rank 0
        assert model is not None and rng is not None
        with atomic_dir(run.out / "last") as tmp:  # the checkpoint and the training state, in place together
            write_checkpoint_files(model, tmp, run.tokenizer, generation=run.generation, step=run.state.step)
            torch.save({"optimizer": optim_state, "scaler": run.scaler.state_dict(), **rng}, tmp / STATE_PT)
            # the settings (and autocast dtype) it was trained with: what a resume compares the flags given to it with
            write_json(tmp / STATE_JSON, {"version": STATE_VERSION, **dataclasses.asdict(run.state),
                                          "train": dataclasses.asdict(run.cfg), "dtype": DTYPE_NAMES[run.amp_dtype]})

    on_rank0(write)


def save_best(run: Run) -> None:
    model = full_model(run)

    def write() -> None:  # rank 0
        assert model is not None
        save_checkpoint(model, run.out / "best", run.tokenizer, dtype=getattr(torch, run.cfg.best_dtype),
                        generation=run.generation, step=run.state.step)

    on_rank0(write)
