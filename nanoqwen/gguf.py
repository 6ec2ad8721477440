"""`nanoqwen gguf`: a checkpoint folder -> one GGUF file for llama.cpp (and the tools built on it: Ollama,
LM Studio, llama-cpp-python), written with llama.cpp's own `gguf` package.

llama.cpp's `convert_hf_to_gguf.py` converts a checkpoint with the official Qwen3 tokenizer as it is, but
refuses one with a BPE trained here: it recognizes a tokenizer's pre-tokenizer by a hash of the ids it
gives for a fixed text, and a new vocabulary gives a new hash. nanoqwen's BPEs split text exactly as
Qwen's does (same normalizer, regex and byte-level mapping: llama.cpp's `qwen2` pre-tokenizer), so this
command writes what the converter would for an official Qwen3 folder: the same keys, token types and
tensor names.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from pathlib import Path

import gguf
import numpy as np
import torch

from nanoqwen.checkpoint import display_name, load_checkpoint, read_config, read_generation_file
from nanoqwen.config import ModelConfig, rope_type
from nanoqwen.errors import NanoQwenError
from nanoqwen.generate import checkpoint_sampling
from nanoqwen.io import atomic_path, refuse_inside_a_file
from nanoqwen.model import rope_attention_factor
from nanoqwen.tokenizer import BPE_SPECIAL_TOKENS, Tokenizer, byte_level_tokenizer, chat_templates

# Hugging Face key -> GGUF tensor name (`{i}`: the layer), as llama.cpp names Qwen3's tensors.
TENSOR_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "blk.{i}.attn_q.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "blk.{i}.attn_k.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "blk.{i}.attn_v.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "blk.{i}.attn_output.weight",
    "model.layers.{i}.self_attn.q_norm.weight": "blk.{i}.attn_q_norm.weight",
    "model.layers.{i}.self_attn.k_norm.weight": "blk.{i}.attn_k_norm.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "blk.{i}.ffn_norm.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "blk.{i}.ffn_gate.weight",
    "model.layers.{i}.mlp.up_proj.weight": "blk.{i}.ffn_up.weight",
    "model.layers.{i}.mlp.down_proj.weight": "blk.{i}.ffn_down.weight",
}
OUTTYPES = ("auto", "f32", "f16", "bf16", "q8_0")
Q8_0 = gguf.GGMLQuantizationType.Q8_0


def gguf_tensor_name(key: str) -> str:
    parts = key.split(".")
    layer = next((p for p in parts if p.isdigit()), None)
    pattern = key if layer is None else key.replace(f".{layer}.", ".{i}.", 1)
    if pattern not in TENSOR_NAMES:
        raise NanoQwenError(f"no GGUF name for the weight {key}")
    return TENSOR_NAMES[pattern].format(i=layer)


def how_it_splits(tokenizer_json: dict) -> dict:
    """The parts of a tokenizer.json that decide how text becomes tokens, without settings that do not
    (ByteLevel's trim_offsets, which only moves offsets; the decoder's options): Qwen's own file and the one
    written here differ in those alone."""
    def strip(node: object) -> object:
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if k != "trim_offsets"}
        return [strip(v) for v in node] if isinstance(node, list) else node

    return {"model": tokenizer_json["model"].get("type"), "normalizer": strip(tokenizer_json.get("normalizer")),
            "pre_tokenizer": strip(tokenizer_json.get("pre_tokenizer")),
            "decoder": (tokenizer_json.get("decoder") or {}).get("type")}


def check_pre_tokenizer(tokenizer: Tokenizer, directory: Path) -> None:
    """llama.cpp's `qwen2` pre-tokenizer is right only for a tokenizer that splits text as Qwen's does."""
    qwen = how_it_splits(json.loads(byte_level_tokenizer({}, [], [], 0).to_str()))
    own = how_it_splits(json.loads(tokenizer.hf.to_str()))
    for part, value in own.items():
        if value != qwen[part]:
            raise NanoQwenError(f"{directory}: its tokenizer's {part} is not Qwen's, so llama.cpp's qwen2 "
                                "pre-tokenizer would split text differently; convert it with llama.cpp's "
                                "convert_hf_to_gguf.py instead")


# Added tokens that llama.cpp's converter types as control tokens even where they are not marked special
# (its does_token_look_special): these texts, and those opening and closing as LOOKS_SPECIAL_ENDS pairs do.
LOOKS_SPECIAL = ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
LOOKS_SPECIAL_ENDS = (("<|", "|>"), ("<｜", "｜>"), ("<unused", ">"))


def looks_special(text: str) -> bool:
    return text in LOOKS_SPECIAL or any(text.startswith(a) and text.endswith(b) for a, b in LOOKS_SPECIAL_ENDS)


def vocabulary(tokenizer: Tokenizer, rows: int) -> tuple[list[str], list[int]]:
    """Tokens and their GGUF types, as llama.cpp's converter lists a Qwen tokenizer:
    every embedding row has a token (rows past the tokenizer's are unused placeholders); added tokens that
    are special or look it (`<|...|>`, see looks_special) are control tokens, other added ones (`<think>`)
    user-defined."""
    by_id = {i: text for text, i in tokenizer.hf.get_vocab(with_added_tokens=True).items()}
    added = tokenizer.hf.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(rows):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        text = by_id[i]
        tokens.append(text)
        if i not in added:
            types.append(gguf.TokenType.NORMAL)
        elif added[i].special or looks_special(text):
            types.append(gguf.TokenType.CONTROL)
        else:
            types.append(gguf.TokenType.USER_DEFINED)
    return tokens, [int(t) for t in types]


def stored_type(tensor: torch.Tensor, outtype: str) -> tuple[np.dtype, gguf.GGMLQuantizationType | None]:
    """The numpy type a weight is written as, and the GGUF type to record when numpy has none (bf16, written as
    its bits in int16; q8_0, as its blocks' bytes). Norms stay float32, as llama.cpp keeps 1-D tensors; a matrix
    whose rows are not whole q8_0 blocks of 32 is written as f16, as llama.cpp's converter falls back."""
    if tensor.ndim == 1 or outtype == "f32":
        return np.dtype(np.float32), None
    if outtype == "q8_0" and tensor.shape[-1] % gguf.GGML_QUANT_SIZES[Q8_0][0] == 0:
        return np.dtype(np.uint8), Q8_0
    if outtype in ("f16", "q8_0"):
        return np.dtype(np.float16), None
    return np.dtype(np.int16), gguf.GGMLQuantizationType.BF16


def tensor_data(tensor: torch.Tensor, outtype: str) -> np.ndarray:
    """A weight as the numpy array written for it."""
    kind, raw_dtype = stored_type(tensor, outtype)
    if raw_dtype == Q8_0:  # llama.cpp's own quantizer: a float16 scale and 32 int8 values a block
        return gguf.quants.quantize(tensor.to(torch.float32).numpy(), Q8_0)
    if raw_dtype is not None:
        return tensor.to(torch.bfloat16).view(torch.int16).numpy()
    return tensor.to(torch.float16 if kind == np.float16 else torch.float32).numpy()


def is_gguf(path: Path) -> bool:
    """Whether the file starts as every GGUF file does (its magic)."""
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def add_rope_scaling(writer: gguf.GGUFWriter, config: ModelConfig, directory: Path) -> None:
    """A linear or YaRN RoPE scaling as llama.cpp's converter writes it: rope.scaling.type and .factor, and for
    YaRN .original_context_length and the betas it is given. llama.cpp has no key for the rest of what
    Transformers reads: it takes YaRN's cos/sin factor to be 1 + 0.1 ln(factor) and always rounds the ramp's
    ends outward, so a scaling that says otherwise is refused rather than written to give other logits."""
    rope, kind = config.rope_scaling or {}, rope_type(config.rope_scaling)
    if kind == "default":
        return
    factor = rope["factor"]
    if kind == "yarn":
        if rope_attention_factor(config) != 0.1 * math.log(factor) + 1.0 or not rope.get("truncate", True):
            settings = {k: rope[k] for k in ("attention_factor", "mscale", "mscale_all_dim", "truncate") if k in rope}
            raise NanoQwenError(
                f"{directory}: YaRN with {json.dumps(settings or {'factor': factor})} cannot be written as GGUF: "
                "llama.cpp scales cos/sin by 1 + 0.1 ln(factor) and rounds the ramp's ends (truncate), and has no "
                "key to say otherwise, so it would compute other logits; only YaRN of a factor >= 1, "
                "original_max_position_embeddings and beta_fast/beta_slow exports")
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(factor)
        writer.add_rope_scaling_orig_ctx_len(rope.get("original_max_position_embeddings",
                                                      config.max_position_embeddings))
        if rope.get("beta_fast") is not None:  # Transformers reads a 0 as its default, 32 (and beta_slow's as 1)
            writer.add_rope_scaling_yarn_beta_fast(rope["beta_fast"] or 32)
        if rope.get("beta_slow") is not None:
            writer.add_rope_scaling_yarn_beta_slow(rope["beta_slow"] or 1)
    else:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(factor)


def not_of_the_chat_template(record: logging.LogRecord) -> bool:
    """A log filter: all but SpecialVocab's warning of a chat_template value it does not read."""
    return "Bad type for chat_template" not in record.getMessage()


def write_gguf(directory: str | Path, out: str | Path, outtype: str = "auto") -> dict[str, object]:
    """Write the checkpoint in `directory` as the GGUF file `out`; returns what was written (for the report)."""
    directory = Path(directory)
    generation = read_generation_file(directory)
    model, tokenizer = load_checkpoint(directory, dtype=None, generation=generation)
    check_pre_tokenizer(tokenizer, directory)
    config = model.config
    if outtype == "auto":  # as the converter: bf16 weights stay bf16, others become f16
        outtype = "bf16" if model.model.embed_tokens.weight.dtype == torch.bfloat16 else "f16"
    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN3])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(display_name(directory))
    writer.add_size_label(gguf.size_label(model.num_params(), 0, 0, 0))
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    add_rope_scaling(writer, config, directory)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    # As sample and chat read them: top_k a whole number (a JSON 20.0 failed as an int32), bad values one line, and
    # do_sample false greedy: temperature 0, which llama.cpp (taking these as its defaults) reads as greedy too.
    # No min_p in the file is none, as sample and Transformers apply it; llama.cpp's own default is 0.05.
    sampling = {"min_p": 0.0, **checkpoint_sampling(generation, base={})}
    for key, add in (("top_k", writer.add_sampling_top_k), ("top_p", writer.add_sampling_top_p),
                     ("min_p", writer.add_sampling_min_p), ("temperature", writer.add_sampling_temp),
                     ("repetition_penalty", writer.add_sampling_penalty_repeat)):
        if key in sampling:
            add(min(sampling[key], 2**31 - 1) if key == "top_k" else sampling[key])  # an int32: any more is all
    if "repetition_penalty" in sampling:  # over the prompt and the reply, as sample and chat apply it (llama.cpp: 64)
        writer.add_sampling_penalty_last_n(-1)  # -1: llama.cpp's whole context

    tokens, types = vocabulary(tokenizer, config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # Merges, special ids (from tokenizer_config.json in any form it takes, else config.json), whether to add
    # a BOS, the chat template: read by llama.cpp's own SpecialVocab, as its converter reads them.
    # Its warning that it ignores a chat_template it cannot read (Transformers' mapping of names) is not so here: the
    # templates are written below all the same.
    vocab_log = logging.getLogger("gguf.vocab")
    vocab_log.addFilter(not_of_the_chat_template)
    try:
        special_vocab = gguf.SpecialVocab(directory, load_merges=True, n_vocab=config.vocab_size)
    finally:
        vocab_log.removeFilter(not_of_the_chat_template)
    if not special_vocab.merges:  # written without the key (gguf writes no empty list), which llama.cpp requires
        raise NanoQwenError(f"{directory}: its tokenizer has no merges (its 256 byte tokens alone), and llama.cpp "
                            "loads no BPE tokenizer without them; train one with a --vocab-size above "
                            f"{256 + len(BPE_SPECIAL_TOKENS)} on enough text to merge some pairs")
    # The chat templates chat and serve use (the default one, and the named ones llama.cpp reads as
    # tokenizer.chat_template.NAME: tool_use): Transformers takes chat_template.jinja and additional_chat_templates/
    # over tokenizer_config.json's, SpecialVocab the config's (and reads none without that file), which gave
    # llama.cpp another chat format, or no tool_use template.
    own_template = tokenizer.config.get("chat_template")
    if chat_templates(special_vocab.chat_template) != chat_templates(own_template):
        special_vocab.chat_template = own_template
    special_vocab.add_to_gguf(writer, quiet=True)

    state = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight")  # llama.cpp reads the embedding as the head when output.weight is absent
    # Each weight is converted as it is written, so only one converted copy is alive at a time (the index
    # of names, shapes and sizes comes first in the file, from the types alone).
    for key, value in state.items():
        kind, raw_dtype = stored_type(value, outtype)
        # the shape of the array written: a q8_0 row is its blocks' bytes, 34 for every 32 values
        shape = gguf.quant_shape_to_byte_shape(value.shape, Q8_0) if raw_dtype == Q8_0 else tuple(value.shape)
        writer.add_tensor_info(gguf_tensor_name(key), shape, kind, math.prod(shape) * kind.itemsize,
                               raw_dtype=raw_dtype)
    with atomic_path(out) as tmp:  # a cut-off write never replaces a whole file
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for value in state.values():
            writer.write_tensor_data(tensor_data(value.detach().cpu(), outtype))
        writer.close()
    return {"tensors": len(state), "outtype": outtype, "tokens": len(tokens)}


def outtype(text: str) -> str:
    """--outtype's value; other quantized types (what llama.cpp's quantizer writes from this file) pointed at it."""
    if text not in OUTTYPES:
        raise argparse.ArgumentTypeError(f"must be {', '.join(OUTTYPES[:-1])} or {OUTTYPES[-1]}, got {text}; for "
                                         "another quantized file (q4_k_m, q5_k_m, ...) write f16 here, then run "
                                         "llama.cpp's llama-quantize on it")
    return text


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint folder (a run's best/ or last/, or any Qwen3 folder)")
    p.add_argument("--out", help="GGUF file to write (default: MODEL.gguf beside the folder, e.g. best.gguf)")
    p.add_argument("--outtype", type=outtype, default="auto", metavar="{" + ",".join(OUTTYPES) + "}",
                   help="weight type: f32, f16, bf16, q8_0 (8-bit blocks, as llama.cpp's converter writes them), or "
                        "auto, the default (bf16 for bf16 weights, else f16); norms stay f32; for q4_k_m and the "
                        "like, quantize the f16 file with llama.cpp's llama-quantize")


def run(args: argparse.Namespace) -> int:
    directory = Path(args.model)
    read_config(directory)  # a --model that is not a checkpoint is what is wrong, whatever --out says
    named = directory if directory.name not in ("", "..") else directory.resolve()  # "." or "..": name it
    out = Path(args.out) if args.out else named.with_name(f"{named.name}.gguf")  # shown as the user gave it
    # "dir/" names a folder even where there is none yet (Path drops the slash: it was written as a file "dir")
    if out.is_dir() or (args.out and args.out.endswith(("/", os.sep))):
        raise NanoQwenError(f"--out {args.out} is a folder; give a file name such as {out / named.name}.gguf")
    refuse_inside_a_file(out, "a path in a folder")
    if out.exists() and not is_gguf(out):  # another GGUF (an earlier export) is replaced; anything else is kept
        raise NanoQwenError(f"{out} exists and is not a GGUF file, which writing there would overwrite; choose "
                            "another --out (a name ending in .gguf) or remove it")
    written = write_gguf(directory, out, args.outtype)
    size = out.stat().st_size
    print(f"wrote {out}: {written['tensors']} tensors ({written['outtype']}), {written['tokens']:,} tokens, "
          f"{size / 2**20:.1f} MiB")
    print(f"next: llama-cli -m {out}   (or llama-server -m {out}; Ollama: FROM {out} in a Modelfile)")
    return 0
