"""The model, reviewed against Transformers' Qwen3 in 16 bits (RoPE's frequencies and rounding, CPU autocast) and in
training (initialization, gradients, activation checkpointing, which optimizer takes which weight). Tiny, in-process."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.models.qwen3.modeling_qwen3 import apply_rotary_pos_emb

from nanoqwen.checkpoint import load_model, save_checkpoint
from nanoqwen.loss import CausalLMLoss, chunked_cross_entropy
from nanoqwen.model import Qwen3, apply_rope, rope_cos_sin, rope_inv_freq
from nanoqwen.optim import HybridOptimizer, build_optimizer
from tests.hf_helpers import load_hf_model
from tests.test_model import VOCAB, hf_eager, scramble, tiny_config


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rope_in_16_bits_rounds_as_transformers_does(dtype: torch.dtype) -> None:
    # One addcmul rounded x * cos + rotate_half(x) * sin once; Transformers rounds each product, then the sum: a
    # sixth of bf16 values came out one unit apart, and every logit of a 16-bit model after them.
    g = torch.Generator().manual_seed(33)
    x = (3 * torch.randn(2, 50, 4, 16, generator=g)).to(dtype)  # (B, T, H, D)
    positions = torch.arange(50).expand(2, 50)
    inv_freq = rope_inv_freq(tiny_config())
    cos, signed_sin = rope_cos_sin(positions, inv_freq, dtype)
    angles = torch.cat([positions[..., None] * inv_freq] * 2, dim=-1)
    expected, _ = apply_rotary_pos_emb(x, x, angles.cos().to(dtype), angles.sin().to(dtype), unsqueeze_dim=2)
    assert torch.equal(apply_rope(x, cos, signed_sin), expected)


def test_a_bf16_model_computes_transformers_logits_bit_for_bit(tmp_path) -> None:
    # Loaded in bf16 (eval, sample --dtype bfloat16): the same roundings as Transformers' SDPA model, op for op.
    model = Qwen3(tiny_config())
    scramble(model, seed=34)
    save_checkpoint(model, tmp_path / "ck", tokenizer=None, dtype=torch.bfloat16)
    ours = load_model(tmp_path / "ck", dtype=torch.bfloat16)
    theirs = load_hf_model(tmp_path / "ck", attn_implementation="sdpa", dtype=torch.bfloat16).eval()
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(35))
    with torch.no_grad():
        assert torch.equal(ours(ids), theirs(ids).logits)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_gradients_equal_transformers_with_a_tied_or_an_untied_head(tmp_path, tied: bool) -> None:
    # The chunked loss hands the head its gradient itself: tied, the embedding takes it once, beside the lookup's.
    # Chunks of 7 of the 80 rows: several whose targets are all ignored, and a ragged last one.
    model = Qwen3(tiny_config(tie_word_embeddings=tied)).train()
    scramble(model, seed=42)
    save_checkpoint(model, tmp_path / "ck", tokenizer=None)
    theirs = hf_eager(tmp_path / "ck").train()
    ids = torch.randint(0, VOCAB, (2, 41), generator=torch.Generator().manual_seed(43))
    inputs, targets = ids[:, :-1], ids[:, 1:].clone()
    targets[0], targets[1, 30:] = -100, -100
    expected = F.cross_entropy(theirs(inputs).logits.flatten(0, 1), targets.flatten())
    expected.backward()
    loss = chunked_cross_entropy(model(inputs, return_hidden=True), model.lm_head.weight, targets, chunk=7)
    loss.backward()
    torch.testing.assert_close(loss, expected)
    expected_grads = {name: p.grad for name, p in theirs.named_parameters()}
    assert sorted(expected_grads) == sorted(name for name, _ in model.named_parameters())
    for name, p in model.named_parameters():
        assert (p.grad - expected_grads[name]).abs().max() <= 1e-5 * expected_grads[name].abs().max(), name


def test_training_under_cpu_bf16_autocast_computes_transformers_logits_and_loss(tmp_path) -> None:
    # `train --dtype bfloat16 --device cpu`: float32 weights, bf16 matmuls. The QK-norms' float32 weights lift q and
    # k back to float32, so RoPE runs in float32 here as it does in Transformers under the same autocast.
    model = Qwen3(tiny_config()).train()
    scramble(model, seed=36)
    save_checkpoint(model, tmp_path / "ck", tokenizer=None)
    theirs = load_hf_model(tmp_path / "ck", attn_implementation="sdpa", dtype=torch.float32).train()
    ids = torch.randint(0, VOCAB, (2, 41), generator=torch.Generator().manual_seed(37))
    inputs, targets = ids[:, :-1], ids[:, 1:]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits, expected = model(inputs), theirs(inputs).logits
        loss = CausalLMLoss(model)(inputs, targets)
    assert logits.dtype == torch.bfloat16 and torch.equal(logits, expected)
    torch.testing.assert_close(loss, F.cross_entropy(expected.float().flatten(0, 1), targets.flatten()))


def test_activation_checkpointing_gives_the_same_gradients_under_attention_dropout() -> None:
    # The recomputed forward draws the dropout masks the first one drew (checkpoint restores the RNG state), and
    # leaves the generator where a plain step leaves it.
    model = Qwen3(tiny_config(attention_dropout=0.3)).train()
    scramble(model, seed=38)
    ids = torch.randint(0, VOCAB, (2, 33), generator=torch.Generator().manual_seed(39))
    results = []
    for checkpointing in (False, True):
        model.activation_checkpointing = checkpointing
        torch.manual_seed(40)
        CausalLMLoss(model)(ids[:, :-1], ids[:, 1:]).backward()
        results.append(([p.grad for p in model.parameters()], torch.rand(1)))
        model.zero_grad()
    (plain, after_plain), (checkpointed, after_checkpointed) = results
    assert all(torch.equal(a, b) for a, b in zip(plain, checkpointed)) and torch.equal(after_plain, after_checkpointed)
    model.activation_checkpointing = False
    torch.manual_seed(41)
    CausalLMLoss(model)(ids[:, :-1], ids[:, 1:]).backward()
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.weight.grad, plain[2])  # the dropout shows


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_muon_takes_the_block_matrices_alone_and_adamw_is_fused(tied: bool) -> None:
    # Muon orthogonalizes hidden 2-D matrices only: the embedding, a head and the norms are AdamW's (fused on CPU).
    model = Qwen3(tiny_config(tie_word_embeddings=tied))
    names = {id(p): name for name, p in model.named_parameters()}
    hybrid = build_optimizer(model, "muon", 1e-3, 0.1, torch.device("cpu"))
    assert isinstance(hybrid, HybridOptimizer)
    muon, adamw = hybrid.optimizers
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    taken = {names[id(p)] for group in muon.param_groups for p in group["params"]}
    assert taken == {name for name in names.values() if ".layers." in name and name.endswith("proj.weight")}
    assert len(taken) == 7 * model.config.num_hidden_layers
    plain = build_optimizer(model, "adamw", 1e-3, 0.1, torch.device("cpu"))
    assert all(group["fused"] for optimizer in (adamw, plain) for group in optimizer.param_groups)


def test_init_draws_matrices_at_the_initializer_range_and_a_bf16_model_as_float32_cast() -> None:
    # Transformers' init: normal(0, initializer_range) for every Linear and Embedding, ones for the norms. Built in
    # bf16 (`nanoqwen init --dtype bfloat16`), a seed gives the float32 draw rounded.
    config = tiny_config(initializer_range=0.05, tie_word_embeddings=False)  # not the 0.02 default: it is read
    torch.manual_seed(44)
    model = Qwen3(config)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
        else:  # 2,048 values at least: the sample's std is within 5% of 0.05
            assert abs(p.std().item() - 0.05) < 0.0025 and abs(p.mean().item()) < 0.005, name
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        torch.manual_seed(44)
        built_in_bf16 = Qwen3(config)
    finally:
        torch.set_default_dtype(default_dtype)
    assert built_in_bf16.inv_freq.dtype == torch.float32
    for (name, p), bf16 in zip(model.named_parameters(), built_in_bf16.parameters()):
        assert bf16.dtype == torch.bfloat16 and torch.equal(p.to(torch.bfloat16), bf16), name
