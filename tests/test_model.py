"""The model equals Transformers' Qwen3ForCausalLM, both ways through a checkpoint folder."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from nanoqwen.checkpoint import load_checkpoint, load_model, model_special_ids, read_config, save_checkpoint
from nanoqwen.config import ModelConfig, apply_overrides, rope_scaling_of
from nanoqwen.errors import NanoQwenError
from nanoqwen.model import Qwen3, rope_cos_sin
from tests.hf_helpers import (
    DTYPE,
    READS_YARN_FACTOR,
    READS_YARN_TRUNCATE,
    SLIDES_BY_LAYER,
    TRANSFORMERS_5,
    load_hf_model,
)

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
    return load_hf_model(path, attn_implementation="eager", dtype=torch.float32).eval()


CASES = {
    "tied-kv2": {},
    "untied": {"tie_word_embeddings": False},
    "mha-kv1ratio": {"num_key_value_heads": 4},          # kv ratio 1
    "kv-ratio4": {"num_key_value_heads": 1},             # kv ratio 4
    "head_dim-not-hidden/heads": {"head_dim": 24},       # 4 x 24 = 96 != 64
    # Scaled RoPE over a tiny original context (32 of 128): the tests' 100 tokens reach well past it.
    "yarn": {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}},
    "yarn-optional-keys": {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                                            "beta_fast": 16.0, "beta_slow": 2, "mscale": 1.2, "mscale_all_dim": 0.8,
                                            "truncate": False}, "rope_theta": 500.0},
    "yarn-attention-factor": {"rope_scaling": {"type": "yarn", "factor": 2.5, "attention_factor": 1.3}},  # original:
    "linear": {"rope_scaling": {"rope_type": "linear", "factor": 4.0}},                           # the 128 positions
}


def rope_fields(config: ModelConfig) -> dict:
    """RoPE as a config.json of the config says it (its rope_scaling in one spelling)."""
    return {k: v for k, v in config.to_hf_dict().items() if k.startswith("rope_")}


def skip_where_transformers_computes_otherwise(case: str) -> None:
    """A case whose logits the installed Transformers computes otherwise than later releases (and nanoqwen)."""
    if (CASES[case].get("rope_scaling") or {}).get("truncate") is False and not READS_YARN_TRUNCATE:
        pytest.skip("Transformers before 4.55 ignores YaRN's truncate: it rounds the correction range")


@pytest.mark.parametrize("case", CASES)
def test_nanoqwen_saves_transformers_loads(case, tmp_path):
    skip_where_transformers_computes_otherwise(case)
    model = Qwen3(tiny_config(**CASES[case]))
    scramble(model)
    save_checkpoint(model, tmp_path / "ck", tokenizer=None)
    config = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert config["model_type"] == "qwen3" and config["architectures"] == ["Qwen3ForCausalLM"]
    assert rope_fields(read_config(tmp_path / "ck")) == rope_fields(model.config)
    hf = hf_eager(tmp_path / "ck")
    ids = torch.randint(0, VOCAB, (2, 100), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (model.eval()(ids) - hf(ids).logits).abs().max().item()
    assert diff <= 1e-4


@pytest.mark.parametrize("case", CASES)
def test_transformers_saves_nanoqwen_loads(case, tmp_path):
    skip_where_transformers_computes_otherwise(case)
    config = tiny_config(**CASES[case])
    hf_config = transformers.Qwen3Config(**{k: v for k, v in config.to_hf_dict().items() if k != "architectures"})
    torch.manual_seed(0)
    hf = transformers.Qwen3ForCausalLM(hf_config)
    scramble(hf, seed=3)
    hf.save_pretrained(tmp_path / "hf")
    reloaded = hf_eager(tmp_path / "hf")  # the eager reference, as read back from disk
    model = load_model(tmp_path / "hf")
    assert model.config.tie_word_embeddings == config.tie_word_embeddings
    read = reloaded.config.rope_parameters if TRANSFORMERS_5 else reloaded.config.rope_scaling
    assert model.config.rope_scaling == rope_scaling_of(read)  # as Transformers reads it
    ids = torch.randint(0, VOCAB, (3, 100), generator=torch.Generator().manual_seed(2))
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



def test_loading_a_checkpoint_imports_no_compiler(tmp_path):
    # The model built to take a checkpoint's tensors lives on the meta device, where normal_ and arange run torch's
    # Python reference kernels, whose first call imports torch._dynamo and sympy: 800 modules, seconds at every
    # sample, chat, serve or eval (11 s of a 0.6B model's 24 s load on a busy machine). Nothing there needs them.
    model = Qwen3(tiny_config())
    scramble(model, seed=3)
    save_checkpoint(model, tmp_path, tokenizer=None)
    script = ("import sys; from nanoqwen.checkpoint import load_model; model = load_model(sys.argv[1]); "
              "print(float(model.lm_head.weight.sum()), 'torch._dynamo' in sys.modules, 'sympy' in sys.modules)")
    shown = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, check=True)
    assert shown.stdout.split() == [str(float(model.lm_head.weight.detach().sum())), "False", "False"]

# Several features at once, each case both ways, at twice the context and more: odd vocabularies, head_dim apart
# from hidden / heads, one KV head, untied heads, scaled RoPE past a small context, 16-bit saves, sharded files
# with an index, and config.json as Transformers 4 wrote it (rope_theta and rope_scaling, torch_dtype) or 5.
MIXED = [
    ({"vocab_size": 301, "hidden_size": 40, "num_attention_heads": 3, "num_key_value_heads": 1, "head_dim": 20,
      "max_position_embeddings": 16, "tie_word_embeddings": False,
      "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4}},
     torch.bfloat16, "30KB", 4),
    ({"vocab_size": 263, "hidden_size": 24, "num_attention_heads": 2, "head_dim": 12, "max_position_embeddings": 24,
      "rope_scaling": {"rope_type": "linear", "factor": 2.0}, "rope_theta": 500.0}, torch.float16, "5GB", 5),
    ({"vocab_size": 517, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 8, "num_hidden_layers": 3,
      "max_position_embeddings": 8, "tie_word_embeddings": False}, torch.float32, "20KB", 4),
]


def as_transformers_4_wrote_it(folder) -> None:
    config = json.loads((folder / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config.pop("layer_types", None)
    scaling = {("type" if k == "rope_type" else k): v for k, v in rope.items() if k != "rope_theta"}  # the old key
    config.update(rope_theta=rope["rope_theta"], rope_scaling=None if scaling["type"] == "default" else scaling,
                  torch_dtype=config.pop("dtype", config.get("torch_dtype")), transformers_version="4.51.3")
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("changes, dtype, shard, transformers_version", MIXED)
def test_mixed_configs_go_both_ways(tmp_path, changes, dtype, shard, transformers_version):
    if transformers_version == 5 and not TRANSFORMERS_5:
        pytest.skip("Transformers 4 reads no folder as Transformers 5 writes it (RoPE in rope_parameters)")
    config = tiny_config(**changes)
    ids = torch.randint(0, config.vocab_size, (2, 2 * config.max_position_embeddings + 3),
                        generator=torch.Generator().manual_seed(4))
    model = Qwen3(config).eval()
    scramble(model)
    with torch.no_grad():  # the weights the 16-bit file holds (the RoPE buffers stay float32)
        for weight in model.parameters():
            weight.copy_(weight.to(dtype))
    save_checkpoint(model, tmp_path / "ours", tokenizer=None, dtype=dtype)
    with torch.no_grad():
        assert (model(ids) - hf_eager(tmp_path / "ours")(ids).logits).abs().max().item() <= 1e-4

    hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**{k: v for k, v in config.to_hf_dict().items()
                                                                  if k not in ("architectures", "rope_scaling")}))
    scramble(hf, seed=3)
    hf.to(dtype).save_pretrained(tmp_path / "theirs", max_shard_size=shard)
    assert (tmp_path / "theirs" / "model.safetensors.index.json").exists() == (shard != "5GB")
    if transformers_version == 4:
        as_transformers_4_wrote_it(tmp_path / "theirs")
    with torch.no_grad():
        assert (load_model(tmp_path / "theirs")(ids) - hf_eager(tmp_path / "theirs")(ids).logits).abs().max() <= 1e-4


@pytest.mark.parametrize("case", ["tied-kv2", "yarn", "linear"])
def test_cached_decoding_equals_full_forward(case):
    model = Qwen3(tiny_config(num_key_value_heads=1, **CASES[case])).eval()
    scramble(model, seed=7)
    ids = torch.randint(0, VOCAB, (2, 100), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids)
        cache, fixed = model.new_cache(2, 110), model.new_cache(2, 110)
        pieces = [model(ids[:, :11], cache=cache), model(ids[:, 11:80], cache=cache)]
        pieces += [model(ids[:, t:t + 1], cache=cache) for t in range(80, 100)]
        steps = [model(ids[:, :80], cache=fixed)]
        fixed.fix_shapes()  # the steps a CUDA graph replays
        steps += [model(ids[:, t:t + 1], cache=fixed) for t in range(80, 100)]
    assert cache.length == 100
    assert (torch.cat(pieces, dim=1) - full).abs().max().item() <= 1e-4
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-4


@pytest.mark.parametrize("case", ["tied-kv2", "yarn-attention-factor", "linear"])
def test_a_caches_rope_table_holds_what_each_step_computed(case):
    # A cached forward looks cos and sin up in a table made with the cache: the same bits as computing them at
    # the step's positions (scaled RoPE and YaRN's attention factor included), at the first and last slot too.
    model = Qwen3(tiny_config(**CASES[case]))
    cache = model.new_cache(2, 50)
    positions = torch.tensor([[0, 7, 49], [3, 3, 12]])
    cos, sin = rope_cos_sin(positions, model.inv_freq, torch.float32, model.rope_scale)
    assert cache.cos is not None and cache.signed_sin is not None and cache.cos.shape == (50, 1, 16)
    assert torch.equal(cache.cos[positions], cos) and torch.equal(cache.signed_sin[positions], sin)


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


def test_every_query_of_a_padded_batch_attends_some_key(monkeypatch):
    # A padding query has no real key before it, so it attends itself. A row with every key masked is a softmax
    # over nothing: nan where a kernel does not special-case it (CPU's SDPA gives zeros, so logits cannot tell),
    # and the nan would reach the real tokens through the next layer's keys and values.
    from nanoqwen import model as model_module

    masks = []
    sdpa = model_module.sdpa_attention

    def recording(q, k, v, mask, dropout):
        masks.append(mask)
        return sdpa(q, k, v, mask, dropout)

    monkeypatch.setattr(model_module, "sdpa_attention", recording)
    model = Qwen3(tiny_config()).eval()
    batch = torch.tensor([[0, 0, 0, 5, 6, 7], [9, 8, 7, 6, 5, 4]])
    real = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        model(batch, attention_mask=real)
        cache = model.new_cache(2, 12)
        model(batch[:, :2], cache=cache, attention_mask=real[:, :2])  # a prompt prefilled in two pieces
        model(batch[:, 2:], cache=cache, attention_mask=real[:, 2:])
    assert len(masks) == 3 * model.config.num_hidden_layers
    assert all(mask is not None and bool(mask.any(-1).all()) for mask in masks)


@pytest.mark.parametrize("changes, words", [
    ({"num_attention_heads": 6, "num_key_value_heads": 4}, "multiple of num_key_value_heads"),
    ({"head_dim": 15}, "head_dim must be even"),
    ({"hidden_size": 0}, "positive integer"),
    ({"rope_theta": 0.0}, "rope_theta must be a positive number"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not Qwen3's; .*give hidden_act \"silu\""),
    ({"rms_norm_eps": -1.0}, "rms_norm_eps must be >= 0"),
    ({"attention_dropout": 1.0}, "attention_dropout must be in"),
    ({"rope_scaling": "yarn"}, "rope_scaling must be an object"),
    ({"rope_scaling": {"type": "dynamic", "factor": 4.0}}, "not supported; .* \"linear\" and \"yarn\""),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "not supported"),
    ({"rope_scaling": {"rope_type": "yarn"}}, "needs a positive \"factor\""),
    ({"rope_scaling": {"rope_type": "linear", "factor": 0.0}}, "needs a positive \"factor\""),
    ({"rope_scaling": {"rope_type": "yarn", "type": "linear", "factor": 2.0}}, "keep only rope_type"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0, "beta_fast": "32"}}, "beta_fast must be a number"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0, "partial_rotary_factor": 0.5}}, "rotates the whole head"),
    # YaRN's ramp takes logarithms of the betas and of rope_theta: one line, not a math domain error
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0, "beta_fast": -1.0}}, "beta_fast must be positive"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0, "beta_slow": -0.5}}, "beta_slow must be positive"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}, "rope_theta": 1.0}, "YaRN needs a rope_theta other than 1"),
    # --set rope_scaling='{"factor": 4}' (no rope_type) trained plain RoPE, its factor dropped without a word
    ({"rope_scaling": {"factor": 4.0}}, "is plain RoPE .* which ignores its factor; add \"rope_type\": \"linear\""),
    ({"rope_scaling": {"rope_type": "default", "factor": 4.0}}, "ignores its factor;"),
    ({"rope_scaling": {"rope_theta": 50.0}}, "ignores its rope_theta; .*give the base frequency as rope_theta"),
])
def test_bad_configs_say_what_is_wrong(changes, words):
    with pytest.raises(NanoQwenError, match=words):
        tiny_config(**changes).validate()


@pytest.mark.parametrize("rope", [
    {"rope_parameters": {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0}},  # Transformers 5
    {"rope_scaling": {"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [4.0] * 8}},  # older spelling
])
def test_scaled_rope_is_refused_not_loaded_as_plain_rope(tmp_path, rope):
    model = Qwen3(tiny_config())
    save_checkpoint(model, tmp_path, tokenizer=None)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **rope}))
    with pytest.raises(NanoQwenError, match="RoPE scaling") as caught:
        load_model(tmp_path)
    assert str(tmp_path / "config.json") in str(caught.value) and "to run it with plain RoPE" in str(caught.value)


@pytest.mark.parametrize("rope, top_level", [
    ({"rope_type": "yarn", "factor": 4.0}, 32),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}, 32),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}, 32.0),  # as some exporters write it
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32.0}, None),
])
def test_a_top_level_original_context_is_yarns_as_transformers_reads_it(tmp_path, rope, top_level):
    if top_level is not None and not TRANSFORMERS_5:
        pytest.skip("Transformers 4 reads YaRN's original context from rope_scaling alone")
    # Transformers 5 takes a top-level original_max_position_embeddings (Phi-3's place for it) as YaRN's, over
    # the one in rope_scaling; read as the full 128 positions instead, the ramp and the logits differ.
    model = Qwen3(tiny_config())
    scramble(model, seed=5)
    save_checkpoint(model, tmp_path, tokenizer=None)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["rope_parameters"]
    config["rope_scaling"] = rope
    if top_level is not None:
        config["original_max_position_embeddings"] = top_level
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = load_model(tmp_path)
    assert loaded.config.rope_scaling == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
    ids = torch.randint(0, VOCAB, (1, 100), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (loaded.eval()(ids) - hf_eager(tmp_path)(ids).logits).abs().max().item() <= 1e-4


YARN = {"rope_type": "yarn", "factor": 2.0}


@pytest.mark.parametrize("rope, top_level, words", [
    (YARN, {"original_max_position_embeddings": 32.5}, "must be a positive whole number of positions, got 32.5"),
    (YARN, {"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5 is not supported: Qwen3 rotates the whole head"),
    # Transformers moves a top-level partial_rotary_factor into any scaling's settings (Qwen3's plain RoPE ignores
    # it), where they have none of their own: both failed in Transformers and loaded here as a whole-head rotation.
    ({"rope_type": "linear", "factor": 2.0}, {"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5 is not"),
    ({**YARN, "partial_rotary_factor": 0.5}, {"partial_rotary_factor": 1.0}, "partial_rotary_factor 0.5 is not"),
])
def test_a_top_level_yarn_setting_nanoqwen_cannot_compute_is_refused(rope, top_level, words):
    # Transformers moves both into YaRN's settings: a half-rotated head would be other logits (or none at all).
    config = {**tiny_config().to_hf_dict(), "rope_scaling": rope, **top_level}
    del config["rope_parameters"]
    with pytest.raises(NanoQwenError, match=words):
        ModelConfig.from_hf_dict(config).validate()


def test_a_top_level_partial_rotary_factor_yields_to_the_scalings_own():
    # (Transformers sets it only where the scaling has none, so this one rotates the whole head there too.)
    config = {**tiny_config().to_hf_dict(), "rope_scaling": {**YARN, "partial_rotary_factor": 1.0},
              "partial_rotary_factor": 0.5}
    del config["rope_parameters"]
    assert ModelConfig.from_hf_dict(config).validate().rope_scaling["partial_rotary_factor"] == 1.0


def test_fields_a_config_leaves_out_mean_what_they_mean_to_transformers(tmp_path):
    # An untied checkpoint whose config.json omits tie_word_embeddings: Transformers reads it untied (and
    # the rope_theta of rope_parameters over a stale top-level one); so must nanoqwen, or the logits differ.
    # Special ids left out (Transformers 4 writes no null) are none, not official Qwen3's: 151645 as the end
    # of a 320-id model refused its own tokenizer as "another model's".
    config = tiny_config(tie_word_embeddings=False)
    hf_config = transformers.Qwen3Config(**{k: v for k, v in config.to_hf_dict().items() if k != "architectures"})
    hf = transformers.Qwen3ForCausalLM(hf_config)
    scramble(hf, seed=4)
    hf.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    for key in ("tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"):
        saved.pop(key, None)  # (Transformers 4 writes no null pad_token_id)
    saved["rope_parameters"] = {"rope_type": "default", "rope_theta": 500.0}
    saved["rope_theta"] = 1e6 if TRANSFORMERS_5 else 500.0  # (Transformers 4 reads the top-level one alone)
    (tmp_path / "config.json").write_text(json.dumps(saved))
    model, reloaded = load_model(tmp_path), hf_eager(tmp_path)
    assert not model.config.tie_word_embeddings and model.config.rope_theta == 500.0
    ids_read = [getattr(c, f"{k}_token_id") for c in (model.config, reloaded.config) for k in ("bos", "eos", "pad")]
    assert ids_read == [None] * 6
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (model(ids) - reloaded(ids).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("rope", [
    {"rope_scaling": {"rope_type": "default", "rope_theta": 50.0}, "rope_theta": 1e6},  # config.rope_scaling saved
    {"rope_scaling": {"rope_type": "default", "rope_theta": 50.0}},  # no top-level theta at all
    {"rope_parameters": {"rope_type": "default", "rope_theta": 70.0},
     "rope_scaling": {"rope_type": "default", "rope_theta": 50.0}},  # both: Transformers 5 takes rope_scaling's
])
def test_a_rope_theta_inside_rope_scaling_is_the_one_used(tmp_path, rope):
    if not TRANSFORMERS_5:
        pytest.skip("Transformers 4 reads the top-level rope_theta alone (10,000 where there is none)")
    # Transformers 5 reads rope_scaling as another name for rope_parameters: a config.json written from its
    # `config.rope_scaling` holds the theta there, and 1e6 (or 10,000) in its place gave logits off by ~10.
    hf_model(tiny_config(tie_word_embeddings=False), 8).save_pretrained(tmp_path)
    saved = {k: v for k, v in json.loads((tmp_path / "config.json").read_text()).items()
             if k not in ("rope_parameters", "rope_theta")}
    (tmp_path / "config.json").write_text(json.dumps({**saved, **rope}))
    model, reference = load_model(tmp_path), hf_eager(tmp_path)
    assert model.config.rope_theta == 50.0
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (model(ids) - reference(ids).logits).abs().max().item() <= 1e-4


def test_a_tied_folder_that_kept_only_the_heads_name_loads(tmp_path):
    # safetensors' save_model keeps one name of a tied pair, lm_head.weight; Transformers loads such a file.
    from safetensors.torch import save_model

    hf = hf_model(tiny_config(), 9)
    hf.save_pretrained(tmp_path)
    save_model(hf, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    assert set(load_file(tmp_path / "model.safetensors")) & {"lm_head.weight", "model.embed_tokens.weight"} == \
        {"lm_head.weight"}
    model = load_model(tmp_path)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    if not TRANSFORMERS_5:
        pytest.skip("Transformers 4 loads no embedding from lm_head.weight alone (it stays on the meta device)")
    ids = torch.randint(0, VOCAB, (2, 30), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (model(ids) - hf_eager(tmp_path)(ids).logits).abs().max().item() <= 1e-4


def test_kv_expanded_for_cudas_kernels_gives_the_same_logits_and_gradients(monkeypatch):
    """On CUDA, float32 and masked attention expand K/V to every query head (see sdpa_takes_gqa); CPU runs
    the same path when made to, causal and left-padded, forward and backward."""
    from nanoqwen import model as model_module
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert model_module.sdpa_takes_gqa(cpu, torch.float32, True, 64)
    for major, flash in ((9, True), (8, True), (7, False)):  # H100, A100: flash; V100 and T4 (7.x): none
        # No GPU here: the device's capability is all the choice reads of it.
        properties = SimpleNamespace(major=major)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device, properties=properties: properties)
        assert model_module.sdpa_takes_gqa(cuda, torch.bfloat16, False, 64) == flash
        assert model_module.sdpa_takes_gqa(cuda, torch.float16, False, 64) == flash
        assert not model_module.sdpa_takes_gqa(cuda, torch.float32, False, 64)
        assert not model_module.sdpa_takes_gqa(cuda, torch.bfloat16, True, 64)
        assert model_module.sdpa_takes_gqa(cuda, torch.float32, True, 1)  # one-token steps: no cache copy
    monkeypatch.undo()
    model = Qwen3(tiny_config())  # two kv heads: a wrong head order would show
    scramble(model, seed=9)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(4))
    padding = torch.ones(2, 12, dtype=torch.long)
    padding[0, :5] = 0

    def logits_and_grads(attention_mask):
        model.zero_grad()
        logits = model(ids, attention_mask=attention_mask)
        logits.square().mean().backward()
        return [logits.detach()] + [p.grad.clone() for p in model.parameters()]

    for attention_mask in (None, padding):
        grouped = logits_and_grads(attention_mask)
        with monkeypatch.context() as m:
            m.setattr(model_module, "sdpa_takes_gqa", lambda *_: False)
            expanded = logits_and_grads(attention_mask)
        for a, b in zip(grouped, expanded):
            assert (a - b).abs().max().item() <= 1e-5 * (1 + a.abs().max().item())


def test_attention_dropout_applies_in_training_only():
    model = Qwen3(tiny_config(attention_dropout=0.5))
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    assert not torch.equal(model.train()(ids), model(ids))
    with torch.no_grad():
        assert torch.equal(model.eval()(ids), model(ids))


@pytest.mark.parametrize("model_type", ["llama", "Qwen3", "qwen3_moe"])
def test_non_qwen3_folder_is_refused(tmp_path, model_type):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type, "hidden_size": 8}))
    with pytest.raises(NanoQwenError, match=f'model_type "{model_type}".*whose model_type is "qwen3"') as caught:
        load_model(tmp_path)
    # Qwen3-30B-A3B's: "only Qwen3 checkpoints" alone left its owner wondering why a Qwen3 was not one.
    assert ("a relative of Qwen3 with another architecture (mixture-of-experts" in str(caught.value)) == \
        (model_type == "qwen3_moe")


# Official config.json files as published (Transformers 4.51's format: rope_scaling null, an integer rope_theta,
# sliding_window null, torch_dtype, max_window_layers over the layers kept), sizes shrunk; head_dim stays unlike
# hidden / heads, as in every official size.
QWEN3_0_6B_CONFIG = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 1024, "initializer_range": 0.02,
    "intermediate_size": 3072, "max_position_embeddings": 40960, "max_window_layers": 28, "model_type": "qwen3",
    "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False,
    "vocab_size": 151936}
SHRUNK = {"vocab_size": VOCAB, "bos_token_id": 0, "eos_token_id": 1, "hidden_size": 32, "intermediate_size": 48,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}


@pytest.mark.parametrize("release", [
    {},  # Qwen3-0.6B (1.7B and 4B alike but for their sizes)
    {"tie_word_embeddings": False, "max_window_layers": 36},  # Qwen3-8B
    # the model card's YaRN, added to config.json as it says
    {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}},
])
def test_official_config_files_load_as_transformers_reads_them(tmp_path, release):
    if "rope_scaling" in release and not READS_YARN_FACTOR:
        pytest.skip("Transformers before 4.56 takes YaRN's factor as 40960 / 32768, not the card's 4")
    official = {**QWEN3_0_6B_CONFIG, **release, **SHRUNK}
    (tmp_path / "config.json").write_text(json.dumps(official))
    hf = transformers.Qwen3ForCausalLM(transformers.AutoConfig.from_pretrained(tmp_path))
    scramble(hf, seed=6)
    hf.to(torch.bfloat16).save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(official))  # the release's text, not Transformers' rewrite
    model, reference = load_model(tmp_path), hf_eager(tmp_path)
    assert load_model(tmp_path, dtype=None).lm_head.weight.dtype == torch.bfloat16
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert (model(ids) - reference(ids).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("damage", ["config-not-an-object", "config-not-utf8", "config-a-folder", "weights-cut-short",
                                    "shard-missing", "index-broken", "index-number", "index-absolute",
                                    "index-outside", "tokenizer-broken"])
def test_damaged_checkpoint_files_are_one_clear_line(tmp_path, damage):
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
    elif damage == "config-a-folder":
        (folder / "config.json").unlink()
        (folder / "config.json").mkdir()
    elif damage == "weights-cut-short":
        (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:100])
    elif damage == "shard-missing":
        sorted(folder.glob("model-*.safetensors"))[-1].unlink()
    elif damage == "index-broken":
        index.write_text("{bad")
    elif damage.startswith("index-"):  # a number, or a file outside the folder (which would load as this model)
        shard = sorted(folder.glob("model-*.safetensors"))[0]
        outside = {"index-number": 5, "index-absolute": str(shard.resolve()), "index-outside": f"../ck/{shard.name}"}
        mapping = json.loads(index.read_text())
        mapping["weight_map"]["model.norm.weight"] = outside[damage]
        index.write_text(json.dumps(mapping))
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


def test_presets_have_the_shapes_the_spec_gives_them():
    # QWEN3.md's official sizes (hidden, intermediate, layers, heads, kv heads, head_dim, tied) and what all share.
    from nanoqwen.config import load_preset

    def shape(model: ModelConfig) -> tuple[int | bool, ...]:
        return (model.hidden_size, model.intermediate_size, model.num_hidden_layers, model.num_attention_heads,
                model.num_key_value_heads, model.head_dim, model.tie_word_embeddings)

    official = {"qwen3-0.6b": (1024, 3072, 28, 16, 8, 128, True), "qwen3-1.7b": (2048, 6144, 28, 16, 8, 128, True),
                "qwen3-4b": (2560, 9728, 36, 32, 8, 128, True), "qwen3-8b": (4096, 12288, 36, 32, 8, 128, False)}
    for name, expected in official.items():
        model = load_preset(name).model
        assert shape(model) == expected, name
        assert (model.vocab_size, model.rms_norm_eps, model.rope_theta, model.max_position_embeddings,
                model.max_window_layers, model.use_sliding_window) == (151936, 1e-6, 1e6, 40960,
                                                                      model.num_hidden_layers, False), name
    # DESIGN.md's seed models: small d 384 / 6 layers / 8 heads / 4 kv; demo d 384 / 8 layers / 6 heads / 2 kv /
    # context 512 on the Qwen3 vocabulary; the 283M TinyStories model d 640 / 18 layers / 4 heads / 1 kv / ff 2048.
    def widths(model: ModelConfig) -> tuple[int, ...]:  # d / layers / heads / kv heads
        return model.hidden_size, model.num_hidden_layers, model.num_attention_heads, model.num_key_value_heads

    small, demo, stories = (load_preset(name) for name in ("small", "demo", "tinystories-283m"))
    assert widths(small.model) == (384, 6, 8, 4) and widths(demo.model) == (384, 8, 6, 2)
    assert (demo.model.max_position_embeddings, demo.model.vocab_size, demo.train["tokenizer"]) == (512, 151936,
                                                                                                    "qwen3")
    assert shape(stories.model)[:5] == (640, 2048, 18, 4, 1) and stories.model.vocab_size == 151936
    assert int(stories.model.num_params() / 1e6) == 283


def test_preset_files_are_whole_presets_or_a_checkpoints_config(tmp_path):
    # A flat file of model fields, or a misspelt section, was dropped without a word: a 0.6B model instead.
    from nanoqwen.config import load_preset

    model = {"vocab_size": 300, "hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 1,
             "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32}
    for name, raw, words in [("flat", model, "unknown top-level keys head_dim, hidden_size"),
                             ("typo", {"model": model, "trian": {}}, "unknown top-level keys trian"),
                             ("nomodel", {"train": {"lr": 0.1}}, 'no "model" object'),
                             ("list", [model], "not a JSON object"),
                             ("train", {"model": model, "train": [1]}, '"train" that is not an object'),
                             ("lr", {"model": model, "train": {"lr": "fast"}}, 'lr must be a number, got "fast"'),
                             ("sise", {"model": {**model, "hidden_sise": 64}}, 'sise.json: its "model" section has '
                              "unknown keys hidden_sise; it takes attention_bias, attention_dropout, bos_token_id"),
                             ("flag", {"model": model, "train": {"max-steps": 5, "lr": 0.1}},
                              'flag.json: its "train" section has unknown keys max-steps; .*"max_steps" for --max'),
                             ("run", {"model": model, "train": {}, "preset": "tiny", "data": "data/x",
                                      "command": ["nanoqwen"]}, "--resume")]:
        (tmp_path / f"{name}.json").write_text(json.dumps(raw))
        with pytest.raises(NanoQwenError, match=words):
            load_preset(str(tmp_path / f"{name}.json"))
    (tmp_path / "good.json").write_text(json.dumps({"model": model, "train": {"lr": 0.1}}))
    assert load_preset(str(tmp_path / "good.json")).model.hidden_size == 64
    # A checkpoint's config.json gives its architecture.
    folder = save_checkpoint(Qwen3(tiny_config()), tmp_path / "ck", None)
    preset = load_preset(str(folder / "config.json"))
    assert preset.model == read_config(folder) and preset.train == {}
    # ... and so does one pasted in whole as the model section (its "architectures" was an unexpected keyword).
    (tmp_path / "pasted.json").write_text(json.dumps({"model": json.loads((folder / "config.json").read_text()),
                                                      "train": {"lr": 0.1}}))
    assert load_preset(str(tmp_path / "pasted.json")).model == preset.model


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


def test_a_prepared_model_converted_with_to_decodes_in_its_new_dtype() -> None:
    # .to() gives each weight a new tensor: the decode path's fused and transposed views (and float32-only norms)
    # would still hold the old float32 ones; the model is prepared again from the new ones.
    model = Qwen3(tiny_config(num_key_value_heads=1)).eval()
    scramble(model, seed=21)
    expected_model = copy.deepcopy(model).to(torch.float64)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(22))
    model.prepare_for_decoding().to(torch.float64)
    layer = model.model.layers[0]
    assert model.prepared_for_decoding and layer.self_attn.qkv_weight_t.dtype == torch.float64
    assert layer.input_layernorm.decode is None and layer.self_attn.qk_norm is None  # float32-only parts gone
    # ... and the column-major layout, kept for float32 on CPU alone (.to() keeps a tensor's strides)
    assert all(w.is_contiguous() for w in (layer.self_attn.o_proj.weight, layer.mlp.down_proj.weight,
                                           layer.self_attn.q_proj.weight, model.lm_head.weight))
    with torch.no_grad():
        expected = expected_model(ids)
        cache = model.new_cache(2, 12)
        got = torch.cat([model(ids[:, :4], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(4, 9)],
                        dim=1)
    assert got.dtype == torch.float64 and (got - expected).abs().max() <= 1e-9
    model.float()  # and back: the float32 decode path again, its norms included
    assert layer.input_layernorm.decode is not None and layer.self_attn.o_weight_t.dtype == torch.float32


def test_share_memory_and_a_same_device_to_keep_a_prepared_models_weights_in_place() -> None:
    # _apply prepared the model again after any conversion, and preparing fused q/k/v and gate/up anew, as copies:
    # share_memory() left those weights out of shared memory (a worker process got its own copy), and a .to() of the
    # device and dtype the model is on copied them.
    model = Qwen3(tiny_config()).eval()
    model.prepare_for_decoding()
    attn = model.model.layers[0].self_attn
    where = attn.q_proj.weight.data_ptr()
    model.to("cpu", torch.float32)
    assert attn.q_proj.weight.data_ptr() == where and attn.qkv_weight_t.data_ptr() == where
    model.share_memory()
    assert all(p.is_shared() for p in model.parameters()) and attn.qkv_weight_t.is_shared()
    assert model.prepared_for_decoding and attn.qkv_weight_t.data_ptr() == attn.q_proj.weight.data_ptr()


def test_a_deepcopy_of_a_prepared_model_decodes_with_its_own_weights() -> None:
    # deepcopy cloned each weight on its own, and the decode path's views apart from them: the copy's views held
    # copies of the weights, not the copy's weights (an optimizer step or a load_state_dict into it, in place, left
    # its decoding on the old ones).
    model = Qwen3(tiny_config()).eval()
    scramble(model, seed=23)
    copied = copy.deepcopy(model.prepare_for_decoding())
    attn = copied.model.layers[0].self_attn
    assert copied.prepared_for_decoding and attn.qkv_weight_t.data_ptr() == attn.q_proj.weight.data_ptr()
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(24))
    with torch.no_grad():
        for name, weight in copied.named_parameters():
            if name.endswith("proj.weight"):
                weight.mul_(-0.5)
        decoded = copied(ids)  # (without grad: the decode path)
    assert (decoded - copied(ids)).abs().max() <= 1e-5  # the plain layers, with grad


def hf_norm(weight: torch.Tensor, eps: float) -> torch.nn.Module:
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    norm = Qwen3RMSNorm(weight.shape[-1], eps).to(weight.dtype)
    with torch.no_grad():
        norm.weight.copy_(weight)
    return norm


def test_bf16_norms_equal_transformers_bit_for_bit() -> None:
    # Transformers normalizes in fp32, casts to bf16, *then* scales: scaling before the cast rounds
    # differently, by less than the 5% logit tolerance of the bf16 model test, so check the norm exactly.
    model = Qwen3(tiny_config()).eval()
    scramble(model, seed=13)
    model.to(torch.bfloat16)
    g = torch.Generator().manual_seed(14)
    hidden = (3 * torch.randn(2, 7, 64, generator=g)).to(torch.bfloat16)
    heads = (3 * torch.randn(2, 7, 4, 16, generator=g)).to(torch.bfloat16)
    norms = [(model.model.norm, hidden), (model.model.layers[1].post_attention_layernorm, hidden),
             (model.model.layers[0].self_attn.q_norm, heads), (model.model.layers[1].self_attn.k_norm, heads)]
    for prepared in (False, True):  # training's RMSNorm, then whatever decoding left in its place
        if prepared:
            model.prepare_for_decoding()
        with torch.no_grad():
            for (norm, x), scale in itertools.product(norms, (1.0, 1e-3)):
                x = x * scale  # 1e-3: a mean square near eps, where only eps inside the rsqrt gives their numbers
                expected = hf_norm(norm.weight, norm.eps)(x)
                assert expected.dtype == torch.bfloat16 and not torch.equal(norm.weight, torch.ones_like(norm.weight))
                got = norm(x)
                assert got.dtype == torch.bfloat16 and torch.equal(got, expected), (prepared, norm, scale)
    # The whole model's decode path in bf16 keeps the per-head norms (no fp32 DecodeNorm block).
    assert all(layer.self_attn.qk_norm is None for layer in model.model.layers)
    # Training under autocast: float32 weights, bf16 activations; Transformers' answer is then float32.
    trained = Qwen3(tiny_config()).model.norm
    with torch.no_grad():
        trained.weight.copy_(model.model.norm.weight.float() + 1e-3)  # bits past bf16's precision
    expected = hf_norm(trained.weight, trained.eps)(hidden)
    got = trained(hidden)
    assert expected.dtype == torch.float32 and got.dtype == torch.float32 and torch.equal(got, expected)


def test_decode_norm_equals_transformers_in_float32() -> None:
    # DecodeNorm rewrites the math (sum and n * eps, weights prescaled by sqrt(n)), one weight row per head.
    # Training's fused float32 norm is checked first, then the one decoding puts in its place.
    model = Qwen3(tiny_config()).eval()
    scramble(model, seed=15)
    attn = model.model.layers[0].self_attn
    g = torch.Generator().manual_seed(16)
    x, qk = 3 * torch.randn(2, 5, 64, generator=g), 3 * torch.randn(2, 5, 6, 16, generator=g)  # 4 q + 2 k heads
    # The last position is small (mean square near eps): only there does eps (its value, n * eps) show.
    x[:, -1] *= 1e-3
    qk[:, -1] *= 1e-3
    norm = model.model.norm
    with torch.no_grad():
        assert torch.allclose(norm(x), hf_norm(norm.weight, norm.eps)(x), rtol=1e-5, atol=1e-5)
        model.prepare_for_decoding()
        assert norm.decode is not None
        assert torch.allclose(norm(x), hf_norm(norm.weight, norm.eps)(x), rtol=1e-5, atol=1e-5)
        expected = torch.cat((hf_norm(attn.q_norm.weight, attn.q_norm.eps)(qk[:, :, :4]),
                              hf_norm(attn.k_norm.weight, attn.k_norm.eps)(qk[:, :, 4:])), dim=2)
        assert torch.allclose(attn.qk_norm(qk), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype, name", [(None, "float32"), (torch.bfloat16, "bfloat16"), (torch.float16, "float16")])
def test_config_names_the_dtype_the_weights_are_saved_in(tmp_path, dtype: torch.dtype | None, name: str) -> None:
    # Transformers' dtype="auto" loads what config.json names: a bf16 file called float32 doubles its memory.
    save_checkpoint(Qwen3(tiny_config()), tmp_path, tokenizer=None, dtype=dtype)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == name
    assert {t.dtype for t in load_file(tmp_path / "model.safetensors").values()} == {dtype or torch.float32}
    assert load_model(tmp_path, dtype=None).lm_head.weight.dtype == (dtype or torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_tied_checkpoint_loads_with_one_shared_embedding(tmp_path, dtype: torch.dtype) -> None:
    # Two copies would train apart (the head no longer the embedding) and count the embedding twice.
    from nanoqwen.tokenizer import train_bpe

    tokenizer = train_bpe(["the cat sat on the mat"] * 20, 300)
    model = Qwen3(tiny_config(**model_special_ids(tokenizer)))
    scramble(model, seed=17)
    save_checkpoint(model, tmp_path, tokenizer=tokenizer)
    for loaded in (load_model(tmp_path, dtype=dtype), load_checkpoint(tmp_path, dtype=dtype)[0]):
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
        assert loaded.num_params() == model.num_params() == model.config.num_params()
        assert torch.equal(loaded.lm_head.weight, model.model.embed_tokens.weight.to(dtype))


def hf_model(config: ModelConfig, seed: int = 0) -> transformers.Qwen3ForCausalLM:
    hf_config = transformers.Qwen3Config(**{k: v for k, v in config.to_hf_dict().items() if k != "architectures"})
    torch.manual_seed(seed)
    hf = transformers.Qwen3ForCausalLM(hf_config)
    scramble(hf, seed=seed)
    return hf


def assert_same_weights(model: Qwen3, reference: torch.nn.Module) -> None:
    expected = reference.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key


@pytest.mark.parametrize("stale", ["index", "single-file"])
def test_weights_are_read_from_the_file_transformers_reads(tmp_path, stale):
    # Re-saving a folder in the other layout leaves the old index (or file) behind. Transformers reads
    # model.safetensors first, then the index: the same weights must load here.
    old, new = hf_model(tiny_config(tie_word_embeddings=False), 1), hf_model(tiny_config(tie_word_embeddings=False), 2)
    if stale == "index":  # Transformers' own re-save: it deletes the old shards but not their index
        old.save_pretrained(tmp_path, max_shard_size="50KB")
        new.save_pretrained(tmp_path)
        assert (tmp_path / "model.safetensors.index.json").exists()
    else:
        new.save_pretrained(tmp_path, max_shard_size="50KB")
        old.save_pretrained(tmp_path / "old")
        shutil.copy(tmp_path / "old" / "model.safetensors", tmp_path)
    model = load_model(tmp_path)
    assert_same_weights(model, hf_eager(tmp_path))
    assert_same_weights(model, new if stale == "index" else old)


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_pytorch_model_bin_folders_load(tmp_path, layout):
    hf = hf_model(tiny_config(tie_word_embeddings=False), 6)
    hf.save_pretrained(tmp_path, **({"max_shard_size": "50KB"} if layout == "sharded" else {}))
    for file in tmp_path.glob("model*.safetensors"):  # as Transformers < 4.35 wrote them
        torch.save(load_file(file), file.with_name(file.name.replace("model", "pytorch_model").replace(
            ".safetensors", ".bin")))
        file.unlink()
    if layout == "sharded":
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        index["weight_map"] = {k: v.replace("model", "pytorch_model").replace(".safetensors", ".bin")
                               for k, v in index["weight_map"].items()}
        (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
        (tmp_path / "model.safetensors.index.json").unlink()
    assert_same_weights(load_model(tmp_path), hf)


class NotATensor:
    pass


def test_pytorch_model_bin_runs_no_pickled_code(tmp_path):
    save_checkpoint(Qwen3(tiny_config()), tmp_path, tokenizer=None)
    (tmp_path / "model.safetensors").unlink()
    torch.save({"model.norm.weight": NotATensor()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(NanoQwenError, match="pytorch_model.bin is damaged") as caught:
        load_model(tmp_path)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("tied", [True, False])
def test_headless_base_model_folder(tmp_path, tied):
    # Saved from Qwen3Model (embedding-model exports): no `model.` prefix, no lm_head. Tied, Transformers'
    # AutoModelForCausalLM reads the embedding as the head; untied there is no head to read.
    config = tiny_config(tie_word_embeddings=tied)
    hf_config = transformers.Qwen3Config(**{k: v for k, v in config.to_hf_dict().items() if k != "architectures"})
    base = transformers.Qwen3Model(hf_config)
    scramble(base, seed=11)
    base.save_pretrained(tmp_path)
    if not tied:
        with pytest.raises(NanoQwenError, match="headless base model"):
            load_model(tmp_path)
        return
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        diff = (load_model(tmp_path)(ids) - hf_eager(tmp_path)(ids).logits).abs().max().item()
    assert diff <= 1e-4


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("prefix, wrapper", [("_orig_mod.", "torch.compile"), ("module.", "DistributedDataParallel")])
def test_weights_saved_through_a_wrapper_are_named_as_they_are(tmp_path, tied, prefix, wrapper):
    # A wrapped model's state_dict saved as is: Transformers reads none of those names (random weights), so it is
    # refused, by the names the file holds (not taken for a headless base model and given a `model.` prefix).
    model = Qwen3(tiny_config(tie_word_embeddings=tied))
    save_checkpoint(model, tmp_path, tokenizer=None)
    weights = load_file(tmp_path / "model.safetensors")
    save_file({prefix + k: v for k, v in weights.items()}, tmp_path / "model.safetensors")
    with pytest.raises(NanoQwenError) as caught:
        load_model(tmp_path)
    message = str(caught.value)
    assert f"'{prefix}" in message and wrapper in message and "headless" not in message and "'model." + prefix \
        not in message and "\n" not in message, message


def checkpoint_with_tokenizer(folder, vocab_size: int, tokenizer_ids: int = 300, **changes):
    from nanoqwen.tokenizer import train_bpe

    tokenizer = train_bpe(["the cat sat on the mat and the dog ran to the park"] * 20, tokenizer_ids)
    config = tiny_config(vocab_size=vocab_size, **{**model_special_ids(tokenizer), **changes})
    save_checkpoint(Qwen3(config), folder, tokenizer=tokenizer)
    return folder


def test_a_tokenizer_with_more_ids_than_the_model_is_refused(tmp_path, monkeypatch, capsys):
    from nanoqwen.cli import main

    model, tokenizer = load_checkpoint(checkpoint_with_tokenizer(tmp_path / "fits", 320))  # spare rows are fine
    ids = tokenizer.vocab_size
    assert 256 < ids < model.config.vocab_size
    folder = checkpoint_with_tokenizer(tmp_path / "ck", 256)
    with pytest.raises(NanoQwenError, match=f"tokenizer has {ids} ids but its model only 256 embedding rows"):
        load_checkpoint(folder)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "texts.txt").write_text("the cat sat on the mat\n" * 50)
    assert main(["train", "--init-from", "ck", "--dataset", "texts.txt", "--out", "run", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{ids} ids" in err and "256 embedding rows" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "fits", "texts.txt"]  # no run, no data prepared


def test_a_tokenizer_without_the_models_end_id_is_refused(tmp_path, monkeypatch, capsys):
    # Official weights (151,936 rows, <|im_end|> at 151645) with another model's tokenizer copied in: fewer ids
    # than rows is fine in itself (spare rows), but the model's own end token must be one of the tokenizer's.
    from nanoqwen.cli import main

    folder = checkpoint_with_tokenizer(tmp_path / "ck", 4096, eos_token_id=4000)
    with pytest.raises(NanoQwenError, match="eos_token_id 4000, which its tokenizer of [0-9]+ ids does not have"):
        load_checkpoint(folder)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "texts.txt").write_text("the cat sat on the mat\n" * 50)
    assert main(["train", "--init-from", "ck", "--dataset", "texts.txt", "--out", "run", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "the tokenizer the model was trained with" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "texts.txt"]  # no run, no data prepared


def test_special_ids_that_are_not_the_tokenizers_are_warned_about(tmp_path, capsys):
    # config.json's and generation_config.json's ids were not checked against the tokenizer: an eos that is a word
    # there cut every reply at that word, unsaid. Official Qwen3 folders pass: Base ones end with <|endoftext|> in
    # config.json and list <|im_end|> in generation_config.json, the others the reverse.
    folder = checkpoint_with_tokenizer(tmp_path / "ck", VOCAB)
    config = json.loads((folder / "config.json").read_text())
    _, tokenizer = load_checkpoint(folder)
    endoftext, im_end, the = tokenizer.eot_id, tokenizer.token_id("<|im_end|>"), tokenizer.encode(" the")[0]
    for eos, generation_eos in ((endoftext, im_end), (im_end, [im_end, endoftext])):
        (folder / "config.json").write_text(json.dumps({**config, "eos_token_id": eos}))
        (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": generation_eos}))
        assert load_checkpoint(folder)[1].stop_ids == [im_end, endoftext]
    assert capsys.readouterr().err == ""
    # Loaded as Transformers loads them (generation stops at the word), with a line for each.
    ends = f"<|im_end|> {im_end}, <|endoftext|> {endoftext}"
    (folder / "config.json").write_text(json.dumps({**config, "eos_token_id": the, "pad_token_id": VOCAB + 5}))
    # A byte-level token that is part of a UTF-8 character decodes alone to U+FFFD, which did not say which it is.
    lone_byte = tokenizer.token_id("ä")  # the byte 0xE4 in the byte-level alphabet
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [im_end, the + 1, lone_byte]}))
    assert load_checkpoint(folder)[1].stop_ids == [im_end, endoftext, the + 1, lone_byte]
    word = json.dumps(tokenizer.decode([the + 1]))
    assert capsys.readouterr().err.splitlines() == [
        f"nanoqwen: warning: {folder / 'config.json'}: eos_token_id {the} is \" the\" in its tokenizer, not one of its "
        f"end tokens ({ends}), so generation stops there, as Transformers' does; correct it in that file unless the "
        "model was trained to end its text there",
        f"nanoqwen: warning: {folder / 'config.json'}: pad_token_id {VOCAB + 5} is beyond its tokenizer's "
        f"{tokenizer.vocab_size} ids, not one of its special tokens (Transformers pads batched generations with it); "
        f"set it to {endoftext} (<|endoftext|>, as Qwen3 has it) in that file",
        f"nanoqwen: warning: {folder / 'generation_config.json'}: eos_token_id {the + 1} is {word} in its tokenizer, "
        f"not one of its end tokens ({ends}), so generation stops there, as Transformers' does; correct it in that "
        "file unless the model was trained to end its text there",
        f"nanoqwen: warning: {folder / 'generation_config.json'}: eos_token_id {lone_byte} is byte <0xE4> (token "
        f"\"ä\") in its tokenizer, not one of its end tokens ({ends}), so generation stops there, as Transformers' "
        "does; correct it in that file unless the model was trained to end its text there",
    ]
    # A negative id (some exports write "pad_token_id": -1) is said so: decoding it to show it raised OverflowError.
    (folder / "config.json").write_text(json.dumps({**config, "pad_token_id": -1}))
    (folder / "generation_config.json").unlink()
    load_checkpoint(folder)
    assert capsys.readouterr().err == f"nanoqwen: warning: {folder / 'config.json'}: pad_token_id -1 is negative, " \
        "no id of its tokenizer, not one of its special tokens (Transformers pads batched generations with it); set " \
        f"it to {endoftext} (<|endoftext|>, as Qwen3 has it) in that file\n"


def test_weights_without_a_tokenizer_refuse_text_in_one_without_their_end_id(tmp_path, monkeypatch, capsys):
    # Weights alone (official ones: <|im_end|> at 151645) trained on text of a small tokenizer: the run wrote a
    # best/ that nanoqwen itself then refused ("the tokenizer is another model's"). Refused up front instead.
    from nanoqwen.cli import main
    from nanoqwen.data.prepare import prepare

    checkpoint_with_tokenizer(tmp_path / "tok", 320)  # a tokenizer (and a model) of ~300 ids
    save_checkpoint(Qwen3(tiny_config(vocab_size=4096, eos_token_id=4000)), tmp_path / "ck", tokenizer=None)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "texts.txt").write_text("the cat sat on the mat\n" * 50)
    data = prepare("texts.txt", "tok", tmp_path / "data", progress=False)
    for given in (["--dataset", "texts.txt", "--tokenizer", "tok"], ["--data", str(data)]):
        assert main(["train", "--init-from", "ck", *given, "--out", "run", "--device", "cpu", "--max-steps", "1",
                     "--seq-len", "16", "--batch-size", "2"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "eos_token_id 4000" in err and "--tokenizer qwen3" in err, err
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "data", "texts.txt", "tok"]  # nothing prepared


@pytest.mark.parametrize("field, value", [
    ("rms_norm_eps", "1e-6"), ("rms_norm_eps", None), ("rope_theta", None), ("initializer_range", "0.02"),
    ("attention_dropout", None), ("tie_word_embeddings", "false"), ("num_hidden_layers", True),
    ("eos_token_id", [None]), ("rope_parameters", {"rope_type": "default", "rope_theta": "1e4"}),
    # RoPE per layer type (Transformers 5's nested form): Qwen3 has one; read as plain RoPE it was dropped unsaid.
    ("rope_parameters", {"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e4}}),
])
def test_config_fields_of_the_wrong_type_are_one_line(tmp_path, field, value):
    save_checkpoint(Qwen3(tiny_config()), tmp_path, tokenizer=None)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(NanoQwenError) as caught:
        load_model(tmp_path)
    message = str(caught.value)
    assert str(tmp_path / "config.json") in message and field in message and "\n" not in message, message


@pytest.mark.parametrize("layer_types", [
    ["full_attention"], ["full_attention"] * 3, [], ["full_attention", "attention_sink"],
    ["full_attention", "chunked_attention"],  # a kind Transformers knows, but not for Qwen3 (it fails to run it)
])
def test_layer_types_unlike_the_layers_are_refused_as_transformers_refuses_them(tmp_path, layer_types):
    # They were read as full attention in every layer, whatever they said.
    save_checkpoint(Qwen3(tiny_config()), tmp_path, tokenizer=None)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "layer_types": ["attention", "full_attention"]}))
    assert read_config(tmp_path).sliding_window is None  # Transformers 5's older name of full attention
    (tmp_path / "config.json").write_text(json.dumps({**config, "layer_types": layer_types}))
    with pytest.raises(NanoQwenError) as caught:
        read_config(tmp_path)
    assert str(caught.value) == (
        f"{tmp_path / 'config.json'}: layer_types must list \"full_attention\" or \"sliding_attention\" for each of "
        f"its 2 layers (num_hidden_layers), got {json.dumps(layer_types)}; correct it in the file, or delete it "
        "(use_sliding_window and max_window_layers then say which layers slide)")
    if layer_types != ["full_attention", "chunked_attention"] and SLIDES_BY_LAYER:  # (4.53 reads layer_types)
        with pytest.raises(Exception, match="layer.types"):  # (4.5x: "layer types")
            transformers.AutoConfig.from_pretrained(tmp_path)


def test_config_values_transformers_reads_load_alike(tmp_path):
    # Transformers takes an empty eos list as no eos id, a null num_key_value_heads as one per head, and "swish"
    # as another name of silu.
    save_checkpoint(Qwen3(tiny_config(num_key_value_heads=4)), tmp_path, tokenizer=None)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "eos_token_id": [], "num_key_value_heads": None,
                                                      "hidden_act": "swish"}))
    loaded = read_config(tmp_path)
    assert loaded.eos_token_id is None and loaded.num_key_value_heads == 4
    # dtype, Transformers 5's name, over torch_dtype where a file has both (the dtype a run from it saves best/ in).
    (tmp_path / "config.json").write_text(json.dumps({**config, "torch_dtype": "float16", "dtype": "bfloat16"}))
    assert read_config(tmp_path).torch_dtype == "bfloat16"
    if DTYPE == "dtype":  # (Transformers before 4.56 reads torch_dtype alone, as no file of theirs holds both)
        assert transformers.AutoConfig.from_pretrained(tmp_path).dtype == torch.bfloat16


def test_whole_numbers_in_float_fields_are_written_as_transformers_5_reads_them(tmp_path):
    # A preset's "rms_norm_eps": 0 (JSON has one number type) went into config.json as 0, and Transformers 5
    # refused the checkpoint: "Field 'rms_norm_eps' expected float, got int".
    from nanoqwen.config import load_preset

    whole = {"rms_norm_eps": 0, "rope_theta": 10000, "initializer_range": 1, "attention_dropout": 0}
    (tmp_path / "preset.json").write_text(json.dumps({"model": {**dataclasses.asdict(tiny_config()), **whole}}))
    save_checkpoint(Qwen3(load_preset(str(tmp_path / "preset.json")).model), tmp_path / "ck", tokenizer=None)
    hf = transformers.AutoConfig.from_pretrained(tmp_path / "ck")
    assert [hf.rms_norm_eps, hf.rope_parameters["rope_theta"], hf.initializer_range, hf.attention_dropout] == \
        [0.0, 10000.0, 1.0, 0.0]


@pytest.mark.parametrize("window, slides", [
    ({"max_window_layers": 2}, False),  # no layer at or past max_window_layers: Transformers attends fully
    ({"max_window_layers": 0, "layer_types": ["full_attention", "full_attention"]}, False),  # layer_types wins
    ({"max_window_layers": 1}, True),
    ({"max_window_layers": 2, "layer_types": ["full_attention", "sliding_attention"]}, True),
])
def test_sliding_window_is_refused_only_where_transformers_slides(tmp_path, window, slides):
    hf_model(tiny_config(tie_word_embeddings=False), 12).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    saved.pop("layer_types", None)  # Transformers >= 4.53 writes them; without, they follow max_window_layers
    (tmp_path / "config.json").write_text(json.dumps({**saved, "use_sliding_window": True, "sliding_window": 4,
                                                      **window}))
    if slides:
        with pytest.raises(NanoQwenError, match="set use_sliding_window to false") as caught:
            load_model(tmp_path)
        assert str(tmp_path / "config.json") in str(caught.value)
        return
    if not SLIDES_BY_LAYER:
        pytest.skip("Transformers before 4.53 slides every layer wherever use_sliding_window is set")
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(6))  # longer than the window
    with torch.no_grad():
        assert (load_model(tmp_path)(ids) - hf_eager(tmp_path)(ids).logits).abs().max().item() <= 1e-4


def test_folders_that_would_compute_other_logits_are_refused(tmp_path):
    hf_model(tiny_config(tie_word_embeddings=False), 12).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    saved.pop("layer_types", None)
    del saved["sliding_window"]
    for changes, words in [
        # Transformers slides by 4096 when the file names no window: layer 1 of 2 would slide.
        ({"use_sliding_window": True, "max_window_layers": 1}, "on sequences up to 4096"),
        ({"quantization_config": {"quant_method": "fp8"}}, "quantized checkpoint \\(fp8\\)"),
    ]:
        (tmp_path / "config.json").write_text(json.dumps({**saved, **changes}))
        with pytest.raises(NanoQwenError, match=words):
            load_model(tmp_path)
    # An explicit null is no window at all, to Transformers too: full attention, loaded.
    (tmp_path / "config.json").write_text(json.dumps({**saved, "use_sliding_window": True, "sliding_window": None,
                                                      "max_window_layers": 1}))
    assert load_model(tmp_path).config.sliding_window is None
    (tmp_path / "config.json").write_text(json.dumps(saved))
    # Tying an untied folder's embeddings would silently drop its trained lm_head.
    with pytest.raises(NanoQwenError, match="has its own lm_head"):
        load_model(tmp_path, config=dataclasses.replace(read_config(tmp_path), tie_word_embeddings=True))
    # A tied config over a file whose lm_head differs: Transformers 4 and 5 compute different logits from it.
    (tmp_path / "config.json").write_text(json.dumps({**saved, "tie_word_embeddings": True}))
    with pytest.raises(NanoQwenError, match="holds an lm_head unlike its embedding"):
        load_model(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()  # a tied save that kept both: fine
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    assert torch.equal(load_model(tmp_path).lm_head.weight, weights["model.embed_tokens.weight"])
    # An untied config over a tied save (its lm_head left out): the one weight it lacks, counted in words.
    del weights["lm_head.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(NanoQwenError, match=r"does not match its config.json: it lacks 1 weight \(lm_head.weight\);"):
        load_model(tmp_path)


def test_a_stale_rope_buffer_in_the_weights_is_ignored(tmp_path):
    # Older Transformers saved each layer's rotary_emb.inv_freq with the weights; Transformers skips them.
    save_checkpoint(Qwen3(tiny_config()), tmp_path, tokenizer=None)
    weights = load_file(tmp_path / "model.safetensors")
    reference = load_model(tmp_path)
    weights["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    # A new file, not the old one rewritten: safetensors 0.4 writes in place, under the tensors mapped from it.
    (tmp_path / "model.safetensors").unlink()
    save_file(weights, tmp_path / "model.safetensors")
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path)(ids), reference(ids))


def test_the_set_hint_comes_only_with_a_changed_config(tmp_path):
    save_checkpoint(Qwen3(tiny_config()), tmp_path, tokenizer=None)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.norm.weight"]
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(NanoQwenError, match="complete Qwen3 checkpoint"):
        load_model(tmp_path, config=read_config(tmp_path))  # what `train --init-from` passes without --set
    with pytest.raises(NanoQwenError, match="a --set cannot change"):
        load_model(tmp_path, config=dataclasses.replace(read_config(tmp_path), num_hidden_layers=3))


def test_free_host_memory_is_available_memory_and_swap_within_the_containers_limit(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # What the memory checks compare with: MemAvailable plus SwapFree (kB in /proc/meminfo), capped by a cgroup's
    # memory.max less its memory.current; "max" (no limit), or no cgroup files, caps nothing; no meminfo, no figure.
    import io

    from nanoqwen import distributed

    files: dict[str, str] = {}

    def fake_open(path: str, *args: object) -> io.StringIO:
        if path not in files:
            raise FileNotFoundError(path)
        return io.StringIO(files[path])

    monkeypatch.setattr(distributed, "open", fake_open, raising=False)
    meminfo = ("MemTotal:  9000 kB\nMemFree:  100 kB\nMemAvailable:  3000 kB\nSwapTotal:  4000 kB\n"
               "SwapFree:  2000 kB\n\n")
    files["/proc/meminfo"] = meminfo
    assert distributed.free_host_memory() == 5000 * 1024  # (no cgroup files)
    files["/sys/fs/cgroup/memory.max"], files["/sys/fs/cgroup/memory.current"] = "max\n", "1000000\n"
    assert distributed.free_host_memory() == 5000 * 1024
    files["/sys/fs/cgroup/memory.max"] = "4000000\n"
    assert distributed.free_host_memory() == 3_000_000  # the container's limit, less what it uses already
    files["/sys/fs/cgroup/memory.max"] = "9000000\n"
    assert distributed.free_host_memory() == 5000 * 1024
    files["/sys/fs/cgroup/memory.current"] = "unreadable\n"  # (a figure that cannot be read caps nothing)
    assert distributed.free_host_memory() == 5000 * 1024
    files["/proc/meminfo"] = meminfo.replace("SwapFree:  2000 kB\n", "")  # (a kernel without swap accounting)
    assert distributed.free_host_memory() == 3000 * 1024
    del files["/proc/meminfo"]
    assert distributed.free_host_memory() is None


def test_a_model_too_large_for_the_memory_is_one_line_before_it_is_built(tmp_path, monkeypatch, capsys):
    """Linux overcommits: without the check the kernel kills the process mid-build, with no message."""
    from nanoqwen import distributed
    from nanoqwen.cli import main

    assert distributed.free_host_memory() > 2**20  # this machine's real figure reads
    checkpoint = checkpoint_with_tokenizer(tmp_path / "ck", VOCAB)
    monkeypatch.setattr(distributed, "free_host_memory", lambda: 8 * 2**30)
    distributed.check_host_memory(2**30, 4, "a 1B model", processes=2)  # 8 GiB: fits in two processes, not three
    with pytest.raises(NanoQwenError, match=r"needs at least 12.0 GiB .* bytes in each of 3 processes\)"):
        distributed.check_host_memory(2**30, 4, "a 1B model", processes=3)
    assert main(["init", "--preset", "qwen3-8b", "--out", str(tmp_path / "big"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "qwen3-8b needs at least 30.5 GiB" in err and "8.0 GiB free" in err, err
    # built in the dtype it is saved in: bf16 weights take 2 bytes each, not float32's 4 (the same weights as
    # float32's cast to bf16, in tensors of any size: 3 x 257 is no multiple of 16, whose tail CPU's normal_ draws
    # otherwise in bf16)
    big = ["init", "--preset", "qwen3-8b", "--out", str(tmp_path / "big"), "--device", "cpu"]
    assert main([*big, "--dtype", "bf16"]) == 2 and "qwen3-8b needs at least 15.3 GiB" in capsys.readouterr().err
    small = ["init", "--preset", "tiny", "--set", "num_hidden_layers=1", "--set", "hidden_size=257", "--set",
             "intermediate_size=3", "--out"]
    assert main([*small, str(tmp_path / "f32")]) == 0 and main([*small, str(tmp_path / "bf16"), "--dtype", "bf16"]) == 0
    for mine, cast in zip(load_model(tmp_path / "bf16", dtype=None).parameters(),
                          load_model(tmp_path / "f32").to(torch.bfloat16).parameters(), strict=True):
        assert mine.dtype == torch.bfloat16 and torch.equal(mine, cast)
    assert not (tmp_path / "big").exists()
    params = read_config(checkpoint).num_params()
    monkeypatch.setattr(distributed, "free_host_memory", lambda: params * 3)  # bf16 fits, float32 does not
    with pytest.raises(NanoQwenError, match="load it with --dtype bfloat16"):
        load_model(checkpoint)
    assert load_model(checkpoint, dtype=torch.bfloat16).lm_head.weight.dtype == torch.bfloat16
    monkeypatch.chdir(tmp_path)  # training holds gradients and AdamW's moments too: four float32 copies
    (tmp_path / "texts.txt").write_text("the cat sat on the mat\n" * 50)
    assert main(["train", "--init-from", "ck", "--dataset", "texts.txt", "--out", "run", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "weights, gradients and AdamW state" in err and "x 16 bytes" in err, err
    assert not (tmp_path / "run").exists()


def test_a_config_without_eos_saves_a_generation_config_transformers_generates_with(tmp_path):
    save_checkpoint(Qwen3(tiny_config(eos_token_id=None)), tmp_path, tokenizer=None)
    assert json.loads((tmp_path / "generation_config.json").read_text())["eos_token_id"] is None  # was [null]
    out = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).generate(torch.tensor([[1, 2, 3]]),
                                                                                max_new_tokens=2, do_sample=False)
    assert out.shape == (1, 5)


def test_a_hugging_face_model_name_says_that_nanoqwen_downloads_nothing(tmp_path, monkeypatch):
    # `--init-from Qwen/Qwen3-0.6B`, as Transformers takes it: pointing to `nanoqwen init` (random weights) misled.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(NanoQwenError, match=r"downloads no models; .*huggingface-cli download Qwen/Qwen3-0\.6B"):
        read_config("Qwen/Qwen3-0.6B")
    (tmp_path / "runs").mkdir()  # a folder of yours, mistyped: no hub name
    with pytest.raises(NanoQwenError, match="model folder runs/typo does not exist; give a checkpoint folder"):
        read_config("runs/typo")


def test_a_folder_without_config_json_says_which_folder_to_give(tmp_path):
    folder = save_checkpoint(Qwen3(tiny_config()), tmp_path / "hub" / "snapshots" / "abc123", tokenizer=None)
    # Hugging Face's cache entry (models--ORG--NAME) or a folder of models: the checkpoint inside is named.
    for given in (tmp_path / "hub", folder.parent):
        with pytest.raises(NanoQwenError, match=f"has no config.json, but {folder} has; give that folder"):
            read_config(given)
    (folder / "config.json").unlink()  # config.json itself missing: what to do, too
    with pytest.raises(NanoQwenError, match="has no config.json, so it is not a Hugging Face checkpoint folder; "
                                            "give the folder that holds"):
        read_config(folder)
    # A LoRA fine-tune's adapter (what peft saves): the weights it changes, not a model; say how to make one.
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path":
                                                            "Qwen/Qwen3-0.6B"}))
    with pytest.raises(NanoQwenError, match="is a PEFT adapter .LORA. of Qwen/Qwen3-0.6B, not a whole model; merge "
                                            "it into that model") as caught:
        read_config(folder)
    assert "merge_and_unload()" in str(caught.value) and "\n" not in str(caught.value)
    (folder / "model.safetensors").rename(folder / "adapter_model.safetensors")  # some saves add the base's config
    (folder / "config.json").write_text(json.dumps(tiny_config().to_hf_dict()))
    with pytest.raises(NanoQwenError, match="is a PEFT adapter .LORA. of Qwen/Qwen3-0.6B"):
        load_model(folder)


@pytest.mark.parametrize("item, words", [
    ("sliding_window=abc", "sliding_window must be an integer or null"),  # a field whose preset value is null
    ("pad_token_id=1.5", "pad_token_id must be an integer or null"),
    ("rope_scaling={\"rope_type\": \"default\", \"factor\": \"x\"}", "rope_scaling.factor must be a number"),
    # JSON that does not parse was said to be a string of the wrong type ("must be an object or null")
    ("rope_scaling={broken", "is not valid JSON .Expecting property name enclosed in double quotes, at character 2.; "
                             "write it as JSON, quoted for the shell: --set 'rope_scaling="),
    ("sliding_window=[1,", "is not valid JSON"),
])
def test_a_set_of_the_wrong_type_is_one_line_not_a_checkpoint_that_cannot_load(tmp_path, item, words):
    # It was taken as it came (a string, a float) and saved into config.json, which loading then refused.
    with pytest.raises(NanoQwenError, match=words) as caught:
        apply_overrides(tiny_config(), [item])
    assert str(caught.value).startswith(f"--set {item}") and "\n" not in str(caught.value)


def test_a_set_of_a_training_setting_names_its_flag():
    # It was refused with the list of the model's fields alone, which does not say where max_steps goes.
    with pytest.raises(NanoQwenError) as caught:
        apply_overrides(tiny_config(), ["num_hidden_layers=1", "max_steps=5"])
    assert str(caught.value) == "--set 'max_steps=5': max_steps is a training setting, not a model field; " \
                                "`nanoqwen train` takes it as --max-steps 5"
    with pytest.raises(NanoQwenError, match="takes it as --fit-to-time or --no-fit-to-time$"):
        apply_overrides(tiny_config(), ["fit_to_time=true"])
    # A typo was answered with the list of all 23 fields alone; a field without its value, with the same list.
    with pytest.raises(NanoQwenError, match=r"^--set 'num_layers=2': 'num_layers' is no model field; did you mean "
                                            r"num_hidden_layers\? expected FIELD=VALUE with FIELD one of the model "
                                            r"fields \(attention_bias, "):
        apply_overrides(tiny_config(), ["num_layers=2"])
    with pytest.raises(NanoQwenError) as caught:
        apply_overrides(tiny_config(), ["num_hidden_layers"])
    assert str(caught.value) == "--set 'num_hidden_layers': give the value too, as --set num_hidden_layers=VALUE"


@pytest.mark.parametrize("item", ["eos_token_id=5", "bos_token_id=0", "pad_token_id=7"])
def test_a_set_of_a_special_id_that_the_tokenizer_decides_is_refused_not_dropped(item):
    # The new model's bos/eos/pad follow its tokenizer: a --set of one was replaced without a word.
    from nanoqwen.checkpoint import new_model_config
    from nanoqwen.tokenizer import train_bpe

    tokenizer = train_bpe(["some text to learn from"] * 3, 300)
    assert new_model_config(tiny_config(), [], tokenizer).eos_token_id == tokenizer.token_id("<|im_end|>")
    # a vocab_size of one's own stays, however spaced (it was resized to the tokenizer's without a word)
    assert new_model_config(tiny_config(), [" vocab_size = 600"], tokenizer).vocab_size == 600
    with pytest.raises(NanoQwenError, match=f"--set {item.split('=')[0]}: .*tokenizer") as caught:
        new_model_config(tiny_config(), ["num_hidden_layers=1", item], tokenizer)
    assert "\n" not in str(caught.value)


def test_a_config_without_num_key_value_heads_has_transformers_32(tmp_path):
    # Qwen3Config's default is 32 kv heads (only an explicit null means one per query head): nanoqwen took one
    # per head, so a folder Transformers loads (64 heads, 32 kv) was refused as having the wrong shapes.
    hf_model(tiny_config(num_attention_heads=64, num_key_value_heads=32, head_dim=2), 5).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["num_key_value_heads"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    model, reference = load_model(tmp_path), hf_eager(tmp_path)
    assert model.config.num_key_value_heads == reference.config.num_key_value_heads == 32
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (model(ids) - reference(ids).logits).abs().max().item() <= 1e-4


def test_a_checkpoint_is_on_the_disk_before_its_name_points_at_it(tmp_path, monkeypatch):
    # A power cut after the rename must find the whole new folder or the old one: every file and the folder
    # itself are synced before the rename, and the parent (the rename) after it. Recorded, as a power cut is
    # not something a test can make.
    import os

    synced: list[tuple[str, bool]] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        synced.append((path, (tmp_path / "ck").exists()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    folder = save_checkpoint(Qwen3(tiny_config()), tmp_path / "ck", None)
    before_rename = {os.path.basename(path) for path, renamed in synced if not renamed}
    assert {p.name for p in folder.iterdir()} <= before_rename and any(
        name.startswith(".ck.tmp-") for name in before_rename)
    assert (str(tmp_path), True) in synced  # the folder that holds the new name


def test_a_whole_original_context_written_as_a_float_is_read_as_an_integer_and_long_values_are_cut() -> None:
    # 32768.0, as some exporters write it: an integer, as GGUF's uint32 key and Transformers' YaRN take it
    from nanoqwen.config import shown_json

    original = rope_scaling_of({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32.0})
    assert original == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
    assert type(original["original_max_position_embeddings"]) is int
    # a value quoted in a message: whole up to 80 characters, else cut to 80 with "..."
    assert shown_json("x" * 78) == '"' + "x" * 78 + '"' and shown_json("x" * 79) == '"' + "x" * 76 + "..."


def test_config_json_details_are_read_as_transformers_reads_them() -> None:
    from nanoqwen.config import _coerce

    base = {k: v for k, v in tiny_config(num_hidden_layers=3, max_window_layers=3).to_hf_dict().items()
            if k not in ("rope_scaling", "rope_parameters", "sliding_window")}
    read = ModelConfig.from_hf_dict
    assert read({**base, "eos_token_id": [5, 7]}).eos_token_id == 5  # several stop ids: the first is the model's own
    assert read({**base, "use_sliding_window": True}).sliding_window == 4096  # Qwen3Config's when the file has none
    # layer_types says which layers slide: from the first sliding one up
    with pytest.raises(NanoQwenError, match=r"sliding-window attention \(layers 1 and up\)"):
        read({**base, "use_sliding_window": True, "sliding_window": 8,
              "layer_types": ["full_attention", "sliding_attention", "sliding_attention"]})
    # rope_scaling without a theta beside rope_parameters whose theta is the top-level one: one frequency, loaded
    yarn = {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64}
    assert read({**base, "rope_scaling": yarn, "rope_parameters": {**yarn, "rope_theta": base["rope_theta"]}}
                ).rope_theta == base["rope_theta"]
    # --set: a new layer count takes "no layer slides" along; a switch reads the usual words; JSON cut short is one line
    assert apply_overrides(tiny_config(), ["num_hidden_layers=4"]).max_window_layers == 4
    assert [_coerce(word, False, "tie_word_embeddings") for word in ("1", "yes", "on", "0", "no", "off")] == \
        [True, True, True, False, False, False]
    with pytest.raises(NanoQwenError, match="the value is not valid JSON"):
        _coerce('"half', None, "pad_token_id")
