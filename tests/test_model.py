"""The model equals Transformers' Qwen3ForCausalLM, both ways through a checkpoint folder."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import transformers

from nanoqwen.checkpoint import load_model, save_checkpoint
from nanoqwen.config import ModelConfig
from nanoqwen.errors import NanoQwenError
from nanoqwen.model import Qwen3

VOCAB = 320


def tiny_config(**changes) -> ModelConfig:
    base = ModelConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                       rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=0, eos_token_id=1,
                       max_window_layers=2)
    return dataclasses.replace(base, **changes)


def scramble(model: torch.nn.Module, seed: int = 0) -> None:
    """Weights far from the 0.02 init, and norm weights far from ones, so no wrong detail can hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def hf_eager(path) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, attn_implementation="eager", dtype=torch.float32).eval()


CASES = {
    "tied-kv2": {},
    "untied": {"tie_word_embeddings": False},
    "mha-kv1ratio": {"num_key_value_heads": 4},          # kv ratio 1
    "kv-ratio4": {"num_key_value_heads": 1},             # kv ratio 4
    "head_dim-not-hidden/heads": {"head_dim": 24},       # 4 x 24 = 96 != 64
}


@pytest.mark.parametrize("case", CASES)
def test_nanoqwen_saves_transformers_loads(case, tmp_path):
    model = Qwen3(tiny_config(**CASES[case]))
    scramble(model)
    save_checkpoint(model, tmp_path / "ck", tokenizer=None)
    config = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert config["model_type"] == "qwen3" and config["architectures"] == ["Qwen3ForCausalLM"]
    hf = hf_eager(tmp_path / "ck")
    ids = torch.randint(0, VOCAB, (2, 33), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (model.eval()(ids) - hf(ids).logits).abs().max().item()
    assert diff <= 1e-4


@pytest.mark.parametrize("case", CASES)
def test_transformers_saves_nanoqwen_loads(case, tmp_path):
    config = tiny_config(**CASES[case])
    hf_config = transformers.Qwen3Config(**{k: v for k, v in config.to_hf_dict().items() if k != "architectures"})
    torch.manual_seed(0)
    hf = transformers.Qwen3ForCausalLM(hf_config)
    scramble(hf, seed=3)
    hf.save_pretrained(tmp_path / "hf")
    reloaded = hf_eager(tmp_path / "hf")  # the eager reference, as read back from disk
    model = load_model(tmp_path / "hf")
    assert model.config.tie_word_embeddings == config.tie_word_embeddings
    ids = torch.randint(0, VOCAB, (3, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        diff = (model(ids) - reloaded(ids).logits).abs().max().item()
    assert diff <= 1e-4


def test_sharded_and_bf16_checkpoints_load(tmp_path):
    hf_config = transformers.Qwen3Config(**{k: v for k, v in tiny_config(tie_word_embeddings=False)
                                            .to_hf_dict().items() if k != "architectures"})
    hf = transformers.Qwen3ForCausalLM(hf_config)
    scramble(hf, seed=5)
    hf.to(torch.bfloat16).save_pretrained(tmp_path / "hf", max_shard_size="50KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    model = load_model(tmp_path / "hf", dtype=None)
    assert model.lm_head.weight.dtype == torch.bfloat16
    expected = hf.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_cached_decoding_equals_full_forward():
    model = Qwen3(tiny_config(num_key_value_heads=1)).eval()
    scramble(model, seed=7)
    ids = torch.randint(0, VOCAB, (2, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 40)
        pieces = [model(ids[:, :11], cache=cache), model(ids[:, 11:17], cache=cache)]
        pieces += [model(ids[:, t:t + 1], cache=cache) for t in range(17, 30)]
    assert cache.length == 30
    assert (torch.cat(pieces, dim=1) - full).abs().max().item() <= 1e-4


def test_left_padded_batch_equals_rows_alone():
    model = Qwen3(tiny_config()).eval()
    scramble(model, seed=8)
    short, long = torch.tensor([[5, 6, 7]]), torch.tensor([[9, 8, 7, 6, 5, 4]])
    batch = torch.tensor([[0, 0, 0, 5, 6, 7], [9, 8, 7, 6, 5, 4]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        cache = model.new_cache(2, 8)
        padded = model(batch, cache=cache, attention_mask=mask)
        next_step = model(torch.tensor([[3], [3]]), cache=cache)
        alone_short = model(torch.cat([short, torch.tensor([[3]])], 1))
        alone_long = model(torch.cat([long, torch.tensor([[3]])], 1))
    assert (padded[0, 3:] - alone_short[0, :3]).abs().max() <= 1e-4
    assert (padded[1] - alone_long[0, :6]).abs().max() <= 1e-4
    assert (next_step[0, 0] - alone_short[0, 3]).abs().max() <= 1e-4
    assert (next_step[1, 0] - alone_long[0, 6]).abs().max() <= 1e-4


@pytest.mark.parametrize("changes, words", [
    ({"num_attention_heads": 6, "num_key_value_heads": 4}, "multiple of num_key_value_heads"),
    ({"head_dim": 15}, "head_dim must be even"),
    ({"hidden_size": 0}, "positive integer"),
    ({"rope_theta": 0.0}, "rope_theta must be a positive number"),
    ({"rms_norm_eps": -1.0}, "rms_norm_eps must be >= 0"),
    ({"attention_dropout": 1.0}, "attention_dropout must be in"),
    ({"rope_scaling": "yarn"}, "rope_scaling must be an object"),
    ({"rope_scaling": {"type": "linear", "factor": 4.0}}, "not supported"),
])
def test_bad_configs_say_what_is_wrong(changes, words):
    with pytest.raises(NanoQwenError, match=words):
        tiny_config(**changes).validate()


@pytest.mark.parametrize("rope", [
    {"rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}},  # Transformers 5
    {"rope_scaling": {"type": "yarn", "factor": 4.0}},  # the older spelling
])
def test_scaled_rope_is_refused_not_loaded_as_plain_rope(tmp_path, rope):
    model = Qwen3(tiny_config())
    save_checkpoint(model, tmp_path, tokenizer=None)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **rope}))
    with pytest.raises(NanoQwenError, match="RoPE scaling"):
        load_model(tmp_path)


def test_fields_a_config_leaves_out_mean_what_they_mean_to_transformers(tmp_path):
    # An untied checkpoint whose config.json omits tie_word_embeddings: Transformers reads it untied (and
    # the rope_theta of rope_parameters over a stale top-level one); so must nanoqwen, or the logits differ.
    config = tiny_config(tie_word_embeddings=False)
    hf_config = transformers.Qwen3Config(**{k: v for k, v in config.to_hf_dict().items() if k != "architectures"})
    hf = transformers.Qwen3ForCausalLM(hf_config)
    scramble(hf, seed=4)
    hf.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["tie_word_embeddings"]
    saved["rope_parameters"] = {"rope_type": "default", "rope_theta": 500.0}
    saved["rope_theta"] = 1e6
    (tmp_path / "config.json").write_text(json.dumps(saved))
    model, reloaded = load_model(tmp_path), hf_eager(tmp_path)
    assert not model.config.tie_word_embeddings and model.config.rope_theta == 500.0
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (model(ids) - reloaded(ids).logits).abs().max().item() <= 1e-4


def test_attention_dropout_applies_in_training_only():
    model = Qwen3(tiny_config(attention_dropout=0.5))
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    assert not torch.equal(model.train()(ids), model(ids))
    with torch.no_grad():
        assert torch.equal(model.eval()(ids), model(ids))


def test_non_qwen3_folder_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(NanoQwenError, match="not Qwen3"):
        load_model(tmp_path)


@pytest.mark.parametrize("damage", ["config-not-an-object", "config-not-utf8", "weights-cut-short",
                                    "shard-missing", "index-broken", "tokenizer-broken"])
def test_damaged_checkpoint_files_are_one_clear_line(tmp_path, damage):
    from nanoqwen.checkpoint import load_checkpoint
    from nanoqwen.tokenizer import train_bpe

    model = Qwen3(tiny_config(tie_word_embeddings=False))
    folder = tmp_path / "ck"
    if damage.startswith(("shard", "index")):
        hf_config = transformers.Qwen3Config(**{k: v for k, v in model.config.to_hf_dict().items()
                                                if k != "architectures"})
        transformers.Qwen3ForCausalLM(hf_config).save_pretrained(folder, max_shard_size="50KB")
    else:
        save_checkpoint(model, folder, tokenizer=None)
    train_bpe(["some text to learn from"] * 5, 300).save(folder)
    index = folder / "model.safetensors.index.json"
    if damage == "config-not-an-object":
        (folder / "config.json").write_text("[1]")
    elif damage == "config-not-utf8":
        (folder / "config.json").write_bytes(b"\xff\xfe{}")
    elif damage == "weights-cut-short":
        (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:100])
    elif damage == "shard-missing":
        sorted(folder.glob("model-*.safetensors"))[-1].unlink()
    elif damage == "index-broken":
        index.write_text("{bad")
    else:
        (folder / "tokenizer.json").write_text("{bad")
    with pytest.raises(NanoQwenError) as caught:
        load_checkpoint(folder)
    assert str(folder) in str(caught.value) and "\n" not in str(caught.value)


def test_parameter_count_matches_official_sizes():
    from nanoqwen.config import load_preset

    counts = {name: load_preset(name).model.num_params() for name in ("qwen3-0.6b", "qwen3-8b", "small", "tiny")}
    assert round(counts["qwen3-0.6b"] / 1e6) == 596  # Qwen3-0.6B: 0.6B total, 0.44B without embeddings
    assert round(counts["qwen3-8b"] / 1e9, 1) == 8.2
    assert round(counts["small"] / 1e6) == 32
    assert 6e6 < counts["tiny"] < 8e6
    small = tiny_config()
    assert Qwen3(small).num_params() == small.num_params()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bf16: the layout decoding keeps on GPUs
def test_prepared_for_decoding_keeps_logits_and_saves_the_same(tmp_path, dtype):
    model = Qwen3(tiny_config(num_key_value_heads=1)).eval()
    scramble(model, seed=9)
    model.to(dtype)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        before = model(ids).float()
        model.prepare_for_decoding()
        cache = model.new_cache(2, 16)
        after = torch.cat([model(ids[:, :5], cache=cache)] + [model(ids[:, t:t + 1], cache=cache)
                                                               for t in range(5, 12)], dim=1).float()
    assert (before - after).abs().max() <= (1e-4 if dtype == torch.float32 else 0.05 * before.abs().max())
    if dtype != torch.float32:
        return
    save_checkpoint(model, tmp_path / "ck", tokenizer=None)
    with torch.no_grad():
        assert (load_model(tmp_path / "ck")(ids) - before).abs().max() <= 1e-5
