"""A review of checkpoints and Qwen3 interop as a Transformers reader sees them (tiny, in-process checks)."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from nanoqwen.checkpoint import load_model, save_checkpoint, weight_files
from nanoqwen.errors import NanoQwenError
from nanoqwen.model import Qwen3
from nanoqwen.tokenizer import load_tokenizer
from tests.hf_helpers import TRANSFORMERS_5, load_hf_model
from tests.test_model import VOCAB, scramble, tiny_config
from tests.train_helpers import FAST, make_data, train_in_process


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_model_converted_to_16_bits_keeps_ropes_frequencies_in_float32(tmp_path, dtype: torch.dtype) -> None:
    # .to(bfloat16) rounded the RoPE buffer with the weights: angles a radian off within a thousand positions (the
    # argmax moved at 5% of 2,048), unlike the model loaded in that dtype, or Transformers' from_pretrained.
    model = Qwen3(tiny_config(max_position_embeddings=1024, rope_theta=1e6)).eval()
    scramble(model, seed=31)
    save_checkpoint(model, tmp_path, tokenizer=None)
    loaded = load_model(tmp_path, dtype=dtype)
    converted = model.to(dtype)
    assert converted.inv_freq.dtype == torch.float32 and torch.equal(converted.inv_freq, loaded.inv_freq)
    ids = torch.randint(0, VOCAB, (1, 600), generator=torch.Generator().manual_seed(32))
    with torch.no_grad():
        assert torch.equal(converted(ids), loaded(ids))


def test_config_json_names_the_dtype_of_weights_saved_in_any_float_dtype(tmp_path) -> None:
    # A float64 model (the tests' own references are) was written as float64 under config.json's "float32":
    # Transformers' dtype="auto" then loaded it at half the precision it was saved in.
    save_checkpoint(Qwen3(tiny_config()).to(torch.float64), tmp_path, tokenizer=None)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "float64"
    assert load_hf_model(tmp_path, dtype="auto").dtype == torch.float64


def test_a_rope_scaling_added_beside_rope_parameters_without_their_theta_is_refused(tmp_path) -> None:
    # Qwen3's model card says to add rope_scaling (YaRN) to config.json. Added to a folder Transformers 5 saved (its
    # rope_theta inside rope_parameters, none at the top), rope_scaling stands in for rope_parameters whole, in
    # Transformers as here: the base frequency fell to the default 10,000 from 1,000,000, in silence.
    hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        **{k: v for k, v in tiny_config(rope_theta=1e6).to_hf_dict().items() if k != "architectures"}))
    hf.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    if TRANSFORMERS_5:
        assert "rope_theta" not in saved and saved["rope_parameters"]["rope_theta"] == 1e6
    else:  # the folder as Transformers 5 saves it
        saved["rope_parameters"] = {"rope_type": "default", "rope_theta": saved.pop("rope_theta")}
    saved["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(NanoQwenError) as caught:
        load_model(tmp_path)
    assert "rope_scaling" in str(caught.value) and '"rope_theta": 1000000.0' in str(caught.value)
    saved["rope_scaling"]["rope_theta"] = 1e6  # as the line says: the scaling with its theta loads
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert load_model(tmp_path).config.rope_theta == 1e6


def test_init_from_a_sharded_untied_fp16_transformers_folder_trains_from_its_weights(tmp_path) -> None:
    # The shapes official 8B and up come in (an lm_head of its own), as Transformers shards them, in float16: last/
    # holds those weights (lr 0), best/ keeps their dtype, and Transformers reads best/ back as it wrote the source.
    data = make_data(tmp_path)
    tokenizer = load_tokenizer(data)
    config = tiny_config(tie_word_embeddings=False, eos_token_id=tokenizer.stop_ids[0], bos_token_id=tokenizer.eot_id)
    hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        **{k: v for k, v in config.to_hf_dict().items() if k != "architectures"}))
    scramble(hf, seed=33)
    hf.to(torch.float16).save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    source = {k: v for path in weight_files(tmp_path / "hf") for k, v in load_file(path).items()}
    assert len(weight_files(tmp_path / "hf")) > 1 and "lm_head.weight" in source
    assert train_in_process("--init-from", str(tmp_path / "hf"), "--data", str(data), "--out", str(tmp_path / "run"),
                            *FAST, "--lr", "0", "--min-lr", "0", "--max-steps", "1") == 0
    last, best = load_file(tmp_path / "run/last/model.safetensors"), load_file(tmp_path / "run/best/model.safetensors")
    assert last.keys() == best.keys() == source.keys()
    assert all(torch.equal(last[k], v.float()) and torch.equal(best[k], v) for k, v in source.items())
    reread = load_hf_model(tmp_path / "run/best", dtype="auto")
    assert reread.dtype == torch.float16 and not reread.config.tie_word_embeddings


@pytest.mark.parametrize("head", ["Qwen3ForSequenceClassification", "Qwen3ForTokenClassification"])
def test_a_qwen3_with_a_classifiers_head_is_named_so(tmp_path, head: str) -> None:
    # Reward models and classifiers on Qwen3 (a score head in place of lm_head) were refused as weights that "fit
    # nowhere", asking whether the checkpoint was complete: a re-download would not help.
    config = transformers.Qwen3Config(**{k: v for k, v in tiny_config().to_hf_dict().items() if k != "architectures"},
                                      num_labels=1)
    getattr(transformers, head)(config).save_pretrained(tmp_path)
    with pytest.raises(NanoQwenError) as caught:
        load_model(tmp_path)
    assert head in str(caught.value) and "complete" not in str(caught.value) and "\n" not in str(caught.value)


def test_init_from_saves_best_in_the_dtype_its_weights_are_stored_in_when_config_json_names_none(tmp_path) -> None:
    # A folder whose config.json names no dtype (Transformers reads its weights' then) gave a float32 best/ for
    # bf16 weights: twice their size. Its config.json read as float32, whatever the weights were.
    from nanoqwen.runs import checkpoint_preset

    save_checkpoint(Qwen3(tiny_config()).to(torch.bfloat16), tmp_path, tokenizer=None)
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["torch_dtype"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert checkpoint_preset(tmp_path, []).train["best_dtype"] == "bfloat16"


@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn])
@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_quantized_weights_without_a_quantization_config_are_refused_naming_the_tensor(tmp_path, dtype, suffix) -> None:
    # int8 or fp8 weights under a config.json without quantization_config (lost, or copied from the unquantized
    # release) were cast to float as they were: int8's -127..127 as the weights themselves, their scales unread.
    from nanoqwen.checkpoint import check_weight_files, read_config

    save_checkpoint(Qwen3(tiny_config()), tmp_path, tokenizer=None)
    state = load_file(tmp_path / "model.safetensors")
    key = "model.layers.0.mlp.down_proj.weight"
    state[key] = (state[key] * 100).to(dtype)
    if suffix == ".bin":
        (tmp_path / "model.safetensors").unlink()
        torch.save(state, tmp_path / "pytorch_model.bin")
    else:
        save_file(state, tmp_path / "model.safetensors")
    checks = [lambda: load_model(tmp_path)]
    if suffix == ".safetensors":  # read from the header alone, before --init-from prepares any data
        checks.append(lambda: check_weight_files(tmp_path, read_config(tmp_path)))
    for check in checks:
        with pytest.raises(NanoQwenError) as caught:
            check()
        message = str(caught.value)
        assert f"{key} is stored in {str(dtype).removeprefix('torch.')}" in message and "quantization_config" in \
            message and "\n" not in message
