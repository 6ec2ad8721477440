"""What differs on macOS (Apple's MPS) and Windows, checked on Linux: torch or the os module made to answer as
they do there."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from nanoqwen.data.loader import BatchLoader, TokenSplit

MPS = torch.device("mps")


def test_batches_reach_mps_in_a_blocking_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    # MPS copies from pageable memory asynchronously too, and read the batch after it was freed: silently wrong
    # token ids (pytorch#189690). Only CUDA's copy, from pinned memory, may overlap.
    copies: list[dict[str, Any]] = []

    def to(tensor: torch.Tensor, device: torch.device, **kwargs: Any) -> torch.Tensor:
        copies.append({"device": torch.device(device), **kwargs})
        return tensor

    monkeypatch.setattr(torch.Tensor, "to", to)
    loader = BatchLoader(TokenSplit(np.arange(64, dtype=np.uint32), 64), seq_len=8, batch_size=2, micro_batch=2,
                         seed=0, device=MPS)
    inputs, targets = loader.micro_batches(0)[0]
    assert copies == [{"device": MPS, "non_blocking": False}]
    assert torch.equal(inputs[:, 1:], targets[:, :-1])  # the batch itself, as on CPU
