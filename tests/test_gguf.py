"""`nanoqwen gguf` writes what llama.cpp reads: its tensor names (from llama.cpp's own gguf package), the
model's hyperparameters, and the tokenizer as its converter lists a Qwen tokenizer.

Checked by hand beyond these tests (bench/README.md has no figures for it; README.md says so): for a trained
BPE checkpoint and a Qwen3-tokenizer one, every tensor and metadata value equal to what llama.cpp's
convert_hf_to_gguf.py writes, and llama-cpp-python's logits and greedy tokens equal to Transformers'.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from nanoqwen.checkpoint import model_special_ids, save_checkpoint
from nanoqwen.cli import main
from nanoqwen.errors import NanoQwenError
from nanoqwen.gguf import check_pre_tokenizer, gguf_tensor_name, vocabulary, write_gguf
from nanoqwen.model import Qwen3
from nanoqwen.tokenizer import Tokenizer, qwen3_tokenizer, train_bpe
from tests.hf_helpers import READS_QWEN3_GGUF, load_hf_model
from tests.test_model import scramble, tiny_config

# head_dim apart from hidden / heads; Qwen3's rope_theta, apart from the 10,000 that llama.cpp and the other tests take
CONFIG = tiny_config(head_dim=24, rms_norm_eps=1e-5, bos_token_id=None, rope_theta=1_000_000.0)


def checkpoint(folder: Path, tokenizer: Tokenizer, **changes: object) -> tuple[Path, Qwen3]:
    # (its own end token: loading warns of one that is a word)
    end = model_special_ids(tokenizer)["eos_token_id"]
    model = Qwen3(dataclasses.replace(CONFIG, **{"eos_token_id": end, **changes}))
    scramble(model)  # norms far from ones: a norm written as another tensor shows
    save_checkpoint(model, folder, tokenizer)
    return folder, model


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return train_bpe(["the cat sat on the mat and the dog ran to the park"] * 20, 300)


def fields(reader: gguf.GGUFReader) -> dict[str, object]:
    return {key: field.contents() for key, field in reader.fields.items()}


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_the_file_holds_the_checkpoint_as_llama_cpp_names_it(tmp_path: Path, bpe: Tokenizer, tied: bool) -> None:
    folder, model = checkpoint(tmp_path / "ck", bpe, tie_word_embeddings=tied)
    write_gguf(folder, tmp_path / "m.gguf", "f32")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN3, CONFIG.num_hidden_layers)  # llama.cpp's table
    stored = {t.name: t for t in reader.tensors}
    weights = {k: v for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    assert len(stored) == len(weights) and ("output.weight" in stored) == (not tied)
    for key, value in weights.items():
        tensor = stored[names.get_name(key, try_suffixes=(".weight",))]
        assert tensor.tensor_type == gguf.GGMLQuantizationType.F32
        assert list(tensor.shape) == list(reversed(value.shape)), key  # GGUF lists the row length first
        assert np.array_equal(np.asarray(tensor.data).reshape(value.shape), value.numpy()), key

    meta, arch = fields(reader), "qwen3"
    assert meta["general.architecture"] == arch
    assert {k.removeprefix(arch + "."): meta[k] for k in meta if k.startswith(arch + ".")} == pytest.approx({
        "block_count": 2, "context_length": 128, "embedding_length": 64, "feed_forward_length": 112,
        "attention.head_count": 4, "attention.head_count_kv": 2, "attention.key_length": 24,
        "attention.value_length": 24, "rope.freq_base": 1_000_000.0, "attention.layer_norm_rms_epsilon": 1e-5})
    tokenizer_json = json.loads(bpe.hf.to_str())
    by_id = {i: text for text, i in bpe.hf.get_vocab(with_added_tokens=True).items()}
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "qwen2"
    assert meta["tokenizer.ggml.tokens"] == [by_id.get(i, f"[PAD{i}]") for i in range(320)]  # 320 rows, 300 ids
    assert meta["tokenizer.ggml.merges"] == [" ".join(m) if isinstance(m, list) else m
                                             for m in tokenizer_json["model"]["merges"]]
    assert meta["tokenizer.ggml.eos_token_id"] == bpe.token_id("<|im_end|>")
    assert meta["tokenizer.ggml.padding_token_id"] == bpe.token_id("<|endoftext|>")
    assert "tokenizer.ggml.bos_token_id" not in meta and meta["tokenizer.ggml.add_bos_token"] is False
    template = json.loads((folder / "tokenizer_config.json").read_text())["chat_template"]
    assert meta["tokenizer.chat_template"] == template


@pytest.mark.parametrize("tied, outtype", [(True, "f32"), (False, "bf16"), (True, "q8_0")])
def test_transformers_reads_the_file_back_to_the_same_logits_and_ids(tmp_path: Path, bpe: Tokenizer, tied: bool,
                                                                    outtype: str) -> None:
    """A reader written apart from nanoqwen, to llama.cpp's conventions: Transformers' GGUF loader rebuilds the
    model and tokenizer from the file alone. (It reads no head_dim for qwen3 and takes 128, so this model has it.)"""
    import transformers

    if not READS_QWEN3_GGUF:
        pytest.skip("Transformers before 4.54 reads no qwen3 GGUF file")
    folder, model = checkpoint(tmp_path / "ck", bpe, head_dim=128, tie_word_embeddings=tied)
    write_gguf(folder, tmp_path / "m.gguf", outtype)
    with torch.no_grad():  # what the file holds: matrices in bf16 or q8_0 blocks, norms in float32
        for weight in model.parameters():
            if weight.ndim == 2 and outtype == "bf16":
                weight.copy_(weight.to(torch.bfloat16))
            elif weight.ndim == 2 and outtype == "q8_0" and weight.shape[1] % 32 == 0:
                blocks = gguf.quants.quantize(weight.numpy(), gguf.GGMLQuantizationType.Q8_0)
                weight.copy_(torch.from_numpy(gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q8_0)))
            elif weight.ndim == 2 and outtype == "q8_0":  # down_proj's 112-wide rows: f16, as the converter
                weight.copy_(weight.to(torch.float16))
    loaded = load_hf_model(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, logits = model.eval()(ids), loaded.eval()(ids).logits
    assert (logits - expected).abs().max().item() <= 1e-4 * expected.abs().max().item()
    text = "the cat sat on the mat<|im_end|> dogs ran<|endoftext|>"
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    assert tokenizer(text)["input_ids"] == bpe.encode(text)


def test_every_weight_is_named_as_llama_cpp_names_it_and_an_unknown_one_is_one_line() -> None:
    assert gguf_tensor_name("model.layers.12.mlp.down_proj.weight") == "blk.12.ffn_down.weight"
    assert gguf_tensor_name("model.norm.weight") == "output_norm.weight"
    with pytest.raises(NanoQwenError, match=r"^no GGUF name for the weight model\.layers\.0\.mlp\.bias$"):
        gguf_tensor_name("model.layers.0.mlp.bias")  # (a KeyError's traceback, were the name looked up bare)


def test_a_tokenizer_that_decodes_otherwise_is_refused(bpe: Tokenizer) -> None:
    # llama.cpp's qwen2 pre-tokenizer comes with byte-level decoding: a tokenizer.json whose decoder is another
    # (Metaspace, say) turns the same ids into other text than llama.cpp would, so it is no Qwen tokenizer either.
    from tokenizers import decoders

    hf = bpe.hf.from_str(bpe.hf.to_str())  # a copy: the module's fixture keeps its own decoder
    check_pre_tokenizer(Tokenizer(hf), Path("ck"))  # as it is: Qwen's
    hf.decoder = decoders.Metaspace()
    with pytest.raises(NanoQwenError, match=r"^ck: its tokenizer's decoder is not Qwen's"):
        check_pre_tokenizer(Tokenizer(hf), Path("ck"))

def test_qwen3_tokens_are_typed_as_llama_cpp_types_them() -> None:
    tok = qwen3_tokenizer()
    tokens, types = vocabulary(tok, 151936)
    assert len(tokens) == len(types) == 151936
    expected = {"Ġthe": gguf.TokenType.NORMAL, "<|im_start|>": gguf.TokenType.CONTROL,
                "<|endoftext|>": gguf.TokenType.CONTROL, "<think>": gguf.TokenType.USER_DEFINED}
    for text, kind in expected.items():
        assert types[tok.token_id(text)] == kind and tokens[tok.token_id(text)] == text
    assert (tokens[151700], types[151700]) == ("[PAD151700]", gguf.TokenType.UNUSED)  # a row no token uses


def test_added_tokens_that_look_special_are_control_tokens_as_the_converter_types_them(bpe: Tokenizer) -> None:
    # The converter's does_token_look_special: not only <|...|> but DeepSeek's full-width <｜...｜>, <pad>, <mask>,
    # <2mass>, [@BOS@] and Gemma's <unused...> are control tokens even where not marked special; others stay
    # user-defined. These were all user-defined here, so llama.cpp printed them and parsed them in any prompt.
    from tokenizers import AddedToken

    hf = bpe.hf.from_str(bpe.hf.to_str())  # a copy: the module's fixture keeps its own added tokens
    looks_special = ["<｜fim▁begin｜>", "<pad>", "<mask>", "<2mass>", "[@BOS@]", "<unused0>"]
    # an opening without its closing (or a closing alone) does not look special: "<|" needs "|>"
    plain = ["<tool>", "<|half", "half|>", "<unused0"]
    hf.add_tokens([AddedToken(text, special=False, normalized=False) for text in [*looks_special, *plain]])
    tokens, types = vocabulary(Tokenizer(hf), 320)
    typed = {text: types[tokens.index(text)] for text in [*looks_special, *plain]}
    assert typed == {**dict.fromkeys(looks_special, gguf.TokenType.CONTROL),
                     **dict.fromkeys(plain, gguf.TokenType.USER_DEFINED)}


def test_weights_shrink_to_f16_or_bf16_and_norms_stay_float32(tmp_path: Path, bpe: Tokenizer) -> None:
    folder, model = checkpoint(tmp_path / "ck", bpe, bos_token_id=0)
    write_gguf(folder, tmp_path / "auto.gguf")  # float32 weights: f16, as llama.cpp's converter does
    reader = gguf.GGUFReader(tmp_path / "auto.gguf")
    meta = fields(reader)
    assert meta["tokenizer.ggml.bos_token_id"] == 0 and meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    kinds = {t.name: t.tensor_type for t in reader.tensors}
    assert kinds["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.F16
    assert kinds["blk.0.attn_q_norm.weight"] == gguf.GGMLQuantizationType.F32  # norms stay float32

    write_gguf(folder, tmp_path / "bf16.gguf", "bf16")
    stored = {t.name: t for t in gguf.GGUFReader(tmp_path / "bf16.gguf").tensors}["blk.1.ffn_down.weight"]
    weight = model.model.layers[1].mlp.down_proj.weight.detach()
    assert stored.tensor_type == gguf.GGMLQuantizationType.BF16
    as_bf16 = torch.from_numpy(np.asarray(stored.data).view(np.int16).copy()).view(torch.bfloat16)
    assert torch.equal(as_bf16.reshape(weight.shape), weight.to(torch.bfloat16))


def test_a_bf16_checkpoint_is_written_bf16_bit_for_bit_and_its_norms_as_float32(tmp_path: Path,
                                                                               bpe: Tokenizer) -> None:
    # What training saves (bf16 weights): auto keeps them bf16, as the converter does, every value as stored.
    folder = tmp_path / "ck"
    _, model = checkpoint(folder, bpe, tie_word_embeddings=False)
    save_checkpoint(model.to(torch.bfloat16), folder, bpe)
    write_gguf(folder, tmp_path / "m.gguf")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    assert fields(reader)["general.file_type"] == gguf.LlamaFileType.MOSTLY_BF16
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN3, CONFIG.num_hidden_layers)
    stored = {t.name: t for t in reader.tensors}
    for key, value in model.state_dict().items():
        tensor = stored[names.get_name(key, try_suffixes=(".weight",))]
        data = np.asarray(tensor.data)
        if value.ndim == 1:
            assert tensor.tensor_type == gguf.GGMLQuantizationType.F32 and np.array_equal(data, value.float().numpy())
        else:  # (read back as its bytes)
            assert tensor.tensor_type == gguf.GGMLQuantizationType.BF16, key
            as_bf16 = torch.from_numpy(data.view(np.int16).copy()).view(torch.bfloat16).reshape(value.shape)
            assert torch.equal(as_bf16, value), key


def test_the_command_writes_beside_the_folder_and_refuses_another_pre_tokenizer(
        tmp_path: Path, bpe: Tokenizer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    folder, _ = checkpoint(tmp_path / "best", bpe)
    assert main(["gguf", "--model", str(folder)]) == 0
    assert gguf.GGUFReader(tmp_path / "best.gguf").fields["general.architecture"].contents() == "qwen3"
    assert f"wrote {tmp_path / 'best.gguf'}" in capsys.readouterr().out
    # The path is shown as given (relative stays relative); a folder given as "." is named by its own name.
    monkeypatch.chdir(tmp_path)
    assert main(["gguf", "--model", "best"]) == 0
    assert capsys.readouterr().out.startswith("wrote best.gguf: ")
    monkeypatch.chdir(folder)
    assert main(["gguf", "--model", "."]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {tmp_path / 'best.gguf'}: ")
    # An --out that is a folder, or under a file, is one line; so is a folder that is not there yet, written with
    # its slash (it was written as a file of that name, "new", with no .gguf to tell what it is).
    for out, said in ((str(tmp_path), f"--out {tmp_path} is a folder; give a file name such as "
                                      f"{tmp_path / 'best.gguf'}"),
                      (f"{tmp_path / 'new'}/", f"--out {tmp_path / 'new'}/ is a folder; give a file name such as "
                                               f"{tmp_path / 'new' / 'best.gguf'}"),
                      (str(tmp_path / "best.gguf" / "m.gguf"), "is inside a file; give --out a path")):
        assert main(["gguf", "--model", str(folder), "--out", out]) != 0
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and said in err, err
    assert not (tmp_path / "new").exists()
    # A model that is not there is what is wrong, however --out is written (it named --out's slash first).
    assert main(["gguf", "--model", str(tmp_path / "nope"), "--out", f"{tmp_path / 'new'}/"]) == 2
    assert capsys.readouterr().err == (f"nanoqwen gguf: error: model folder {tmp_path / 'nope'} does not exist; give "
                                       "a checkpoint folder (e.g. runs/NAME/best) or make one with `nanoqwen init`\n")
    # An --out that holds anything but a GGUF file is kept (it overwrote the checkpoint's own weights);
    # an earlier export is replaced.
    weights = (folder / "model.safetensors").read_bytes()
    for kept in (folder / "model.safetensors", tmp_path / "notes.txt"):
        kept.write_bytes(weights if kept.name == "model.safetensors" else b"mine")
        assert main(["gguf", "--model", str(folder), "--out", str(kept)]) != 0
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "exists and is not a GGUF file" in err
    assert (folder / "model.safetensors").read_bytes() == weights and (tmp_path / "notes.txt").read_bytes() == b"mine"
    assert main(["gguf", "--model", str(folder), "--out", str(tmp_path / "best.gguf"), "--outtype", "f32"]) == 0
    assert gguf.GGUFReader(tmp_path / "best.gguf").tensors[0].tensor_type == gguf.GGMLQuantizationType.F32

    other = json.loads((folder / "tokenizer.json").read_text())
    other["pre_tokenizer"] = {"type": "Whitespace"}  # splits text unlike llama.cpp's qwen2 pre-tokenizer
    (folder / "tokenizer.json").write_text(json.dumps(other))
    assert main(["gguf", "--model", str(folder), "--out", str(tmp_path / "other.gguf")]) != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pre_tokenizer is not Qwen's" in err and "convert_hf_to_gguf.py" in err
    assert not (tmp_path / "other.gguf").exists() and not list(tmp_path.glob(".other.gguf*"))


def test_sampling_defaults_are_written_as_sample_reads_them(tmp_path: Path, bpe: Tokenizer) -> None:
    # A top_k written as 20.0 (JSON has one number type), which `nanoqwen sample` takes, ended the export with a
    # struct.error traceback; a value sample refuses is one line here too, naming the file.
    folder, _ = checkpoint(tmp_path / "ck", bpe)
    config = folder / "generation_config.json"
    config.write_text(json.dumps({"do_sample": True, "top_k": 20.0, "top_p": 0.5, "min_p": 0.25, "temperature": 1}))
    write_gguf(folder, tmp_path / "m.gguf", "f32")
    meta = fields(gguf.GGUFReader(tmp_path / "m.gguf"))
    assert (meta["general.sampling.top_k"], meta["general.sampling.top_p"], meta["general.sampling.min_p"],
            meta["general.sampling.temp"]) == (20, 0.5, 0.25, 1.0)
    # do_sample false is greedy for sample, chat and Transformers: llama.cpp, which takes general.sampling.* as its
    # defaults, sampled at the file's temperature 0.7; its temperature 0 is greedy.
    config.write_text(json.dumps({"do_sample": False, "top_k": 20, "temperature": 0.7}))
    write_gguf(folder, tmp_path / "m.gguf", "f32")
    meta = fields(gguf.GGUFReader(tmp_path / "m.gguf"))
    assert (meta["general.sampling.top_k"], meta["general.sampling.temp"]) == (20, 0.0)
    # A top_k past int32 (any more than the vocabulary is all of it) is written as int32's largest, not a struct.error
    config.write_text(json.dumps({"do_sample": True, "top_k": 2**40}))
    write_gguf(folder, tmp_path / "m.gguf", "f32")
    assert fields(gguf.GGUFReader(tmp_path / "m.gguf"))["general.sampling.top_k"] == 2**31 - 1
    # A repetition penalty, which sample and chat apply over the prompt and the reply (as Transformers does), was left
    # out: llama.cpp's, over the whole context (last_n -1), is the same.
    config.write_text(json.dumps({"do_sample": True, "repetition_penalty": 1.25}))
    write_gguf(folder, tmp_path / "m.gguf", "f32")
    meta = fields(gguf.GGUFReader(tmp_path / "m.gguf"))
    assert (meta["general.sampling.penalty_repeat"], meta["general.sampling.penalty_last_n"]) == (1.25, -1)
    # A file that names no min_p: sample, chat and Transformers apply none, where llama.cpp applied its own 0.05.
    assert meta["general.sampling.min_p"] == 0.0
    config.write_text(json.dumps({"top_k": 20.5}))
    with pytest.raises(NanoQwenError, match="generation_config.json: top_k is 20.5, not a whole number"):
        write_gguf(folder, tmp_path / "bad.gguf", "f32")
    assert not (tmp_path / "bad.gguf").exists()


def test_special_ids_come_as_the_converter_finds_them(tmp_path: Path, bpe: Tokenizer) -> None:
    # An eos written as Transformers' AddedToken object, or left out (then config.json's id): without these,
    # llama.cpp took id 11 (",") as the end of text, and generation stopped at the first comma.
    folder, _ = checkpoint(tmp_path / "ck", bpe, eos_token_id=bpe.token_id("<|im_end|>"))
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    for eos in ({"__type": "AddedToken", "content": "<|im_end|>", "special": True}, None):
        if eos is None:
            del settings["eos_token"]
        else:
            settings["eos_token"] = eos
        (folder / "tokenizer_config.json").write_text(json.dumps(settings))
        write_gguf(folder, tmp_path / "m.gguf", "f32")
        meta = fields(gguf.GGUFReader(tmp_path / "m.gguf"))
        assert meta["tokenizer.ggml.eos_token_id"] == bpe.token_id("<|im_end|>"), eos


def test_the_chat_template_is_the_one_the_model_is_chatted_with(tmp_path: Path, bpe: Tokenizer) -> None:
    # Transformers, and so chat and serve, take chat_template.jinja over tokenizer_config.json's template; gguf's
    # SpecialVocab took the config's, and without tokenizer_config.json none: llama.cpp chatted in another format.
    folder, _ = checkpoint(tmp_path / "ck", bpe)
    jinja = "{% for m in messages %}<|im_start|>{{ m['role'] }}: {{ m['content'] }}<|im_end|>{% endfor %}"
    (folder / "chat_template.jinja").write_text(jinja)
    for config_file in (True, False):
        if not config_file:
            (folder / "tokenizer_config.json").unlink()
        write_gguf(folder, tmp_path / "m.gguf", "f32")
        assert fields(gguf.GGUFReader(tmp_path / "m.gguf"))["tokenizer.chat_template"] == jinja, config_file


def test_named_chat_templates_are_written_under_llama_cpps_names(tmp_path: Path, bpe: Tokenizer,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    # A folder's tool_use template (additional_chat_templates/, as Transformers saves it) is what chat and serve render
    # tools with: llama.cpp reads it as tokenizer.chat_template.tool_use. SpecialVocab took tokenizer_config.json's
    # single template, which, equal to chat_template.jinja, was kept: the file had no tool_use template.
    folder, _ = checkpoint(tmp_path / "ck", bpe)
    default = json.loads((folder / "tokenizer_config.json").read_text())["chat_template"]
    (folder / "chat_template.jinja").write_text(default)
    (folder / "additional_chat_templates").mkdir()
    (folder / "additional_chat_templates" / "tool_use.jinja").write_text("TOOLS {{ tools | length }}")
    write_gguf(folder, tmp_path / "m.gguf", "f32")
    meta = fields(gguf.GGUFReader(tmp_path / "m.gguf"))
    assert (meta["tokenizer.chat_template"], meta["tokenizer.chat_templates"]) == (default, ["tool_use"])
    assert meta["tokenizer.chat_template.tool_use"] == "TOOLS {{ tools | length }}"
    # The same templates as tokenizer_config.json's mapping of names, which Transformers reads too: gguf's SpecialVocab
    # warned that it ignored them, though they are written all the same.
    shutil.rmtree(folder / "additional_chat_templates")
    (folder / "chat_template.jinja").unlink()
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    settings["chat_template"] = {"default": default, "tool_use": "TOOLS {{ tools | length }}"}
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    with caplog.at_level(logging.WARNING):
        write_gguf(folder, tmp_path / "mapped.gguf", "f32")
    assert fields(gguf.GGUFReader(tmp_path / "mapped.gguf")) == meta and not caplog.records


def test_qwens_own_tokenizer_file_converts(tmp_path: Path, bpe: Tokenizer) -> None:
    # The official Qwen3 tokenizer.json differs from the one written here only in settings that do not
    # change how text is split (trim_offsets, the decoder's options): it is not refused for them.
    folder, _ = checkpoint(tmp_path / "ck", bpe)
    spec = json.loads((folder / "tokenizer.json").read_text())
    for part in spec["pre_tokenizer"]["pretokenizers"]:
        if part["type"] == "ByteLevel":
            part["trim_offsets"] = False
    spec["decoder"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    write_gguf(folder, tmp_path / "m.gguf", "f32")
    assert fields(gguf.GGUFReader(tmp_path / "m.gguf"))["tokenizer.ggml.pre"] == "qwen2"


def test_a_tokenizer_with_no_merges_is_refused_before_a_file_llama_cpp_cannot_load(tmp_path: Path) -> None:
    # A BPE of bytes alone (259 ids, or a corpus with no pair to merge) was written with no tokenizer.ggml.merges
    # (gguf cannot write an empty array) and a warning: llama.cpp refuses such a file ("cannot find tokenizer
    # merges in model file").
    folder, _ = checkpoint(tmp_path / "ck", train_bpe(["the cat"], 259))
    with pytest.raises(NanoQwenError) as refused:
        write_gguf(folder, tmp_path / "m.gguf")
    assert str(refused.value) == (
        f"{folder}: its tokenizer has no merges (its 256 byte tokens alone), and llama.cpp loads no BPE "
        "tokenizer without them; train one with a --vocab-size above 259 on enough text to merge some pairs")
    assert list(tmp_path.iterdir()) == [folder]


def test_one_converted_weight_at_a_time(tmp_path: Path, bpe: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Weights are converted as they are written: the f16 copy of a float32 model never exists whole."""
    import gc
    import weakref

    import nanoqwen.gguf as gguf_module

    folder, _ = checkpoint(tmp_path / "ck", bpe)
    converted: list[weakref.ref] = []
    alive_at_once = []
    convert = gguf_module.tensor_data

    def tracked(tensor: torch.Tensor, outtype: str) -> np.ndarray:
        gc.collect()
        alive_at_once.append(sum(ref() is not None for ref in converted))
        data = convert(tensor, outtype)
        converted.append(weakref.ref(data))
        return data

    monkeypatch.setattr(gguf_module, "tensor_data", tracked)
    gc.collect()
    gc.freeze()  # each collection above then looks at what the export made, not at all this process holds
    try:
        write_gguf(folder, tmp_path / "m.gguf")
    finally:
        gc.unfreeze()
    assert len(alive_at_once) == len(gguf.GGUFReader(tmp_path / "m.gguf").tensors) > 10
    assert max(alive_at_once) == 0


def test_a_full_disk_is_one_line_and_keeps_the_file_there(tmp_path: Path, bpe: Tokenizer,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    import nanoqwen.io as io_module

    folder, _ = checkpoint(tmp_path / "ck", bpe)
    (tmp_path / "m.gguf").write_text("GGUF an earlier export")  # a GGUF's magic: replaceable, unlike other files

    def write_on_a_full_disk(*args: object, **kwargs: object) -> None:
        raise OSError("196608 requested and 94416 written")  # numpy's tofile, with no errno

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", write_on_a_full_disk)
    monkeypatch.setattr(io_module, "disk_full", lambda path: True)
    assert main(["gguf", "--model", str(folder), "--out", str(tmp_path / "m.gguf")]) != 0
    err = capsys.readouterr().err.strip()
    assert "no space left on the disk" in err and "\n" not in err
    assert (tmp_path / "m.gguf").read_text() == "GGUF an earlier export" and not list(tmp_path.glob(".m.gguf*"))


def test_a_file_that_cannot_be_made_is_named_as_asked_for(tmp_path: Path, bpe: Tokenizer,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    # The line named the hidden temporary file beside it (".NAME.tmp-x1y2z3": Permission denied in a folder of
    # someone else's, or here a name long enough that the temporary one is too long).
    folder, _ = checkpoint(tmp_path / "ck", bpe)
    out = tmp_path / ("m" * 245 + ".gguf")
    assert main(["gguf", "--model", str(folder), "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"nanoqwen gguf: error: File name too long: {out}; choose a shorter name\n"
    assert not list(tmp_path.glob(".m*"))
    # A folder, as the tokenizer commands write one (it named ".NAME.tmp-PID-x1y2z3").
    (tmp_path / "t.txt").write_text("the cat sat on the mat")
    out = tmp_path / ("t" * 250)
    assert main(["tokenizer", "train", "--dataset", str(tmp_path / "t.txt"), "--vocab-size", "259", "--out",
                 str(out)]) == 2
    assert capsys.readouterr().err == (f"nanoqwen tokenizer train: error: File name too long: {out}; choose a "
                                       "shorter name\n")


YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}


@pytest.mark.parametrize("rope, written", [
    (YARN, {"type": "yarn", "factor": 4.0, "original_context_length": 32}),
    ({"type": "yarn", "factor": 2.0, "beta_fast": 16.0, "beta_slow": 0},  # beta_slow 0: Transformers' default, 1
     {"type": "yarn", "factor": 2.0, "original_context_length": 128, "yarn_beta_fast": 16.0, "yarn_beta_slow": 1.0}),
    ({"type": "yarn", "factor": 2.0, "beta_fast": 0, "beta_slow": 2.0},  # beta_fast 0: Transformers' default, 32
     {"type": "yarn", "factor": 2.0, "original_context_length": 128, "yarn_beta_fast": 32.0, "yarn_beta_slow": 2.0}),
    ({"rope_type": "linear", "factor": 2.5}, {"type": "linear", "factor": 2.5}),
    (None, {}),
], ids=["yarn", "yarn-betas", "yarn-beta-fast-0", "linear", "plain"])
def test_rope_scaling_is_written_as_the_converter_writes_it(tmp_path: Path, bpe: Tokenizer, rope: dict | None,
                                                            written: dict) -> None:
    folder, _ = checkpoint(tmp_path / "ck", bpe, rope_scaling=rope)
    write_gguf(folder, tmp_path / "m.gguf", "f32")
    meta = fields(gguf.GGUFReader(tmp_path / "m.gguf"))
    assert {k.removeprefix("qwen3.rope.scaling."): v for k, v in meta.items()
            if k.startswith("qwen3.rope.scaling.")} == pytest.approx(written)


@pytest.mark.parametrize("extra", [{"attention_factor": 1.3}, {"mscale": 1.2, "mscale_all_dim": 0.8},
                                   {"truncate": False}])
def test_yarn_that_llama_cpp_cannot_compute_is_refused(tmp_path: Path, bpe: Tokenizer, extra: dict) -> None:
    folder, _ = checkpoint(tmp_path / "ck", bpe, rope_scaling={**YARN, **extra})
    with pytest.raises(NanoQwenError, match=f"YaRN with .*{next(iter(extra))}.* cannot be written as GGUF: llama.cpp"):
        write_gguf(folder, tmp_path / "m.gguf", "f32")
    assert not (tmp_path / "m.gguf").exists()


def test_ctrl_c_while_the_command_loads_is_one_line(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    # The command's module is imported (torch: seconds) while its flags are set up, before the run's own handler:
    # a Ctrl-C then printed a traceback through torch's import.
    def interrupted(parser: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("nanoqwen.gguf.add_arguments", interrupted)
    assert main(["gguf", "--model", "ck"]) == 130
    assert capsys.readouterr().err == "nanoqwen gguf: interrupted\n"
    # Under torchrun every process of the job gets the Ctrl-C: the machine's first one says it, as it says errors
    monkeypatch.setattr("nanoqwen.train.add_arguments", interrupted)
    for local_rank, said in (("1", ""), ("0", "nanoqwen train: interrupted\n")):
        monkeypatch.setenv("LOCAL_RANK", local_rank)
        assert main(["train"]) == 130
        assert capsys.readouterr().err == said


def test_ctrl_c_while_the_command_runs_is_one_line_and_exit_130(monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    def interrupted(args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr("nanoqwen.gguf.run", interrupted)
    assert main(["gguf", "--model", "ck"]) == 130  # the shell's status for Ctrl-C, not 1 with a traceback
    assert capsys.readouterr().err == "nanoqwen gguf: interrupted\n"


def test_a_torchrun_jobs_errors_are_said_once_a_machine_and_a_ranks_own_by_its_process(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # Every process checks the same flags: LOCAL_RANK 0 says their error for the machine, the others exit quietly.
    # A RankError (a GPU missing for one process) only that process meets: it says it, whatever its LOCAL_RANK.
    from nanoqwen.errors import RankError

    monkeypatch.setattr("nanoqwen.cli.QUIET_EXIT_WAIT_S", 0.0)
    for local_rank, error, said in (("1", NanoQwenError("bad flag"), ""),
                                    ("0", NanoQwenError("bad flag"), "nanoqwen train: error: bad flag\n"),
                                    ("1", RankError("no cuda:1"), "nanoqwen train: error: no cuda:1\n")):
        def fail(args: object, error: Exception = error) -> int:
            raise error

        monkeypatch.setenv("LOCAL_RANK", local_rank)
        monkeypatch.setattr("nanoqwen.train.run", fail)
        assert main(["train"]) == 2
        assert capsys.readouterr().err == said, (local_rank, error)


def test_nanoqwen_alone_lists_the_commands_and_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    shown = capsys.readouterr()
    assert shown.err == "" and all(command in shown.out for command in ("prepare", "train", "serve", "gguf"))


@pytest.mark.parametrize("argv", [["--"], ["--", "--"], ["-x"], [""], ["trian"], ["--version=1"]])
def test_arguments_that_name_no_command_are_refused_in_one_line(argv: list[str],
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    # Only a bare `nanoqwen` lists the commands (exit 0): anything else without a command is refused by the parser
    # (exit 2), so main never reaches the listing with arguments.
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    shown = capsys.readouterr()
    assert shown.out == "" and shown.err.startswith("nanoqwen: error: ") and shown.err.count("\n") == 1


def test_the_tokenizer_commands_read_and_document_flags_as_the_others_do(capsys: pytest.CaptureFixture[str],
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # (Here for want of a command-line test file of the tokenizer commands.) argparse's own "invalid int value"
    # named Python's type where every other whole-number flag says what it takes.
    with pytest.raises(SystemExit) as exit_:
        main(["tokenizer", "train", "--dataset", "t.txt", "--vocab-size", "8k", "--out", "tok"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == ("nanoqwen tokenizer train: error: argument --vocab-size: must be a whole "
                                       "number, got 8k (see nanoqwen tokenizer train --help)\n")
    # Its other refusals name the subcommand too, as argparse's do (they said "nanoqwen tokenizer: error").
    assert main(["tokenizer", "train", "--dataset", "no/such.txt", "--vocab-size", "300", "--out", "tok"]) == 2
    assert capsys.readouterr().err.startswith("nanoqwen tokenizer train: error: no such file or folder: no/such.txt")
    # Both write a folder, DIR as tokenizer train and prepare call it; each --help says what the command does.
    monkeypatch.setenv("COLUMNS", "1000")  # one line each: a narrow terminal (COLUMNS=40) wrapped the description
    for command, said in (("qwen3", "write the official Qwen3 tokenizer (offline)"),
                          ("train", "train a byte-level BPE on a corpus")):
        with pytest.raises(SystemExit):
            main(["tokenizer", command, "--help"])
        shown = capsys.readouterr().out
        assert f"\n\n{said}\n\n" in shown and "--out DIR " in shown, shown


def test_a_folder_of_runs_names_its_runs_or_checkpoints(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # (Here with the other small commands' refusals.) `nanoqwen plot runs` said runs/metrics.jsonl does not exist.
    for name in ("b", "a"):
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "metrics.jsonl").write_text('{"step": 1, "train_loss": 5.0}\n')
    runs = tmp_path / "runs"
    assert main(["plot", str(runs)]) == 2
    assert capsys.readouterr().err == (f"nanoqwen plot: error: {runs} is a folder of runs; give one of them, or "
                                       f"several to compare in one figure: {runs / 'a'} {runs / 'b'}\n")
    # Given for a checkpoint (gguf, sample, chat...), its runs' checkpoints are named (it "has no config.json"):
    # best/ where a run has one, else last/, and none of a run that has saved none yet.
    for run, saved in (("a", "best"), ("a", "last"), ("b", "last")):
        (runs / run / saved).mkdir()
        (runs / run / saved / "config.json").write_text("{}")
    (runs / "c").mkdir()
    (runs / "c" / "metrics.jsonl").write_text('{"step": 1, "train_loss": 5.0}\n')
    assert main(["gguf", "--model", str(runs)]) == 2
    assert capsys.readouterr().err == (f"nanoqwen gguf: error: {runs} is a folder of runs; give a checkpoint of one "
                                       f"of them: {runs / 'a' / 'best'} {runs / 'b' / 'last'}\n")


def test_q8_0_is_written_in_blocks_as_llama_cpp_quantizes_and_rows_that_are_not_blocks_as_f16(
        tmp_path: Path, bpe: Tokenizer) -> None:
    # llama.cpp's converter writes q8_0 itself (--outtype q8_0); this pointed users at building llama-quantize.
    folder, model = checkpoint(tmp_path / "ck", bpe)
    write_gguf(folder, tmp_path / "m.gguf", "q8_0")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    stored = {t.name: t for t in reader.tensors}
    assert fields(reader)["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    q8 = gguf.GGMLQuantizationType.Q8_0
    embedding = model.model.embed_tokens.weight.detach().numpy()
    token_embd = stored["token_embd.weight"]
    assert token_embd.tensor_type == q8 and list(token_embd.shape) == [64, 320]  # GGUF lists the row length first
    assert np.array_equal(np.asarray(token_embd.data).reshape(-1), gguf.quants.quantize(embedding, q8).reshape(-1))
    assert stored["blk.0.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.F16  # rows of 112: not blocks
    assert stored["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    size = (tmp_path / "m.gguf").stat().st_size
    write_gguf(folder, tmp_path / "f16.gguf", "f16")
    assert size < 0.75 * (tmp_path / "f16.gguf").stat().st_size  # the point of it: ~half the f16 file's weights


def test_another_quantized_outtype_points_at_llama_quantize(capsys: pytest.CaptureFixture[str]) -> None:
    # argparse's "invalid choice: 'q4_k_m'" left a newcomer without the way to the quantized file they asked for.
    with pytest.raises(SystemExit) as exit_:
        main(["gguf", "--model", "ck", "--outtype", "q4_k_m"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == (
        "nanoqwen gguf: error: argument --outtype: must be auto, f32, f16, bf16 or q8_0, got q4_k_m; for another "
        "quantized file (q4_k_m, q5_k_m, ...) write f16 here, then run llama.cpp's llama-quantize on it "
        "(see nanoqwen gguf --help)\n")


def test_out_dash_is_refused_not_written_as_a_file_named_dash(tmp_path: Path, bpe: Tokenizer,
                                                             capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # `gguf --out -` wrote a file named "-" where a user means standard output, which no command writes its files to
    # (llama.cpp and Ollama load a GGUF from a file, and gguf's writer seeks); so did plot's, and the folder writers
    # made a folder "-". Refused before any work; ./- names such a file.
    folder, _ = checkpoint(tmp_path / "ck", bpe)
    monkeypatch.chdir(tmp_path)
    # Each names what its --out takes: gguf's a folder refuses, and the folder writers' a file (it said "a file or
    # folder name" for all).
    for command, name in ((["gguf", "--model", str(folder)], "file"), (["plot", str(tmp_path)], "file or folder"),
                          (["init", "--tokenizer", str(folder)], "folder"), (["prepare"], "folder"),
                          (["train"], "folder"), (["tokenizer", "qwen3"], "folder")):
        assert main([*command, "--out", "-"]) == 2
        prog = " ".join(["nanoqwen", *command[:2 if command[0] == "tokenizer" else 1]])
        assert capsys.readouterr().err == (f"{prog}: error: --out - would be standard output, which this command "
                                           f'does not write to; give a {name} name (./- for one named "-")\n')
    assert not (tmp_path / "-").exists()
    assert main(["gguf", "--model", str(folder), "--out", "./-"]) == 0
    assert gguf.GGUFReader(tmp_path / "-").fields["general.architecture"].contents() == "qwen3"
