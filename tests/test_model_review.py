"""The model, reviewed against Transformers' Qwen3 in 16 bits: RoPE's frequencies and rounding (tiny, in-process)."""

from __future__ import annotations

import pytest
import torch

from nanoqwen.checkpoint import load_model, save_checkpoint
from nanoqwen.model import Qwen3, rope_inv_freq
from tests.test_model import VOCAB, scramble, tiny_config


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_model_converted_to_16_bits_keeps_float32_rope_frequencies(tmp_path, dtype: torch.dtype) -> None:
    # .to(bf16) rounded the inv_freq buffer to bf16 (8 bits), so each angle was off by up to 2^-9 of itself:
    # at position 30,000 of Qwen3's 40,960, tens of radians. A model loaded in bf16 keeps it in float32.
    config = tiny_config()
    model = Qwen3(config)
    scramble(model, seed=31)
    save_checkpoint(model, tmp_path / "ck", tokenizer=None, dtype=dtype)
    model.to(dtype)
    assert model.inv_freq.dtype == torch.float32 and torch.equal(model.inv_freq, rope_inv_freq(config))
    ids = torch.randint(0, VOCAB, (1, 600), generator=torch.Generator().manual_seed(32))
    with torch.no_grad():
        assert torch.equal(model(ids), load_model(tmp_path / "ck", dtype=dtype)(ids))
