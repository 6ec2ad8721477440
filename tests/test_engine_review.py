"""Decoding and the serving engine, reviewed for correctness: batches whose rows differ (prompt lengths, room left in
the context, seeds) give each row what it gives alone. Tiny random models, in-process."""

from __future__ import annotations

import pytest
import torch

from nanoqwen.generate import SamplingParams, generate_ids
from nanoqwen.model import Qwen3
from tests.test_model import scramble, tiny_config

CONTEXT = 32


@pytest.fixture(scope="module")
def model() -> Qwen3:
    torch.manual_seed(0)
    model = Qwen3(tiny_config(max_position_embeddings=CONTEXT))
    scramble(model, seed=3)
    return model.eval()


def rows(model: Qwen3, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    """Each row's tokens from one batched generate_ids (the Nones of a finished row left out)."""
    return [[t for t in row if t is not None] for row in zip(*generate_ids(model, prompts, params))]


def test_a_short_prompt_beside_one_near_the_context_end_gets_its_own_budget(model: Qwen3) -> None:
    # The batch's budget was the smallest row's: a 2-token prompt beside a 28-token one (5 fit in a 32-token context)
    # got 5 tokens, not the 10 it gets alone; the long row still stops at what fits.
    short, long = [5, 6], list(range(10, 10 + CONTEXT - 4))
    params = SamplingParams(max_new_tokens=10, temperature=0)
    alone = [rows(model, [prompt], params)[0] for prompt in (short, long)]
    assert [len(tokens) for tokens in alone] == [10, 5]
    assert rows(model, [short, long], params) == alone


def test_a_seeded_row_samples_what_its_prompt_samples_alone(model: Qwen3) -> None:
    # The rows shared one generator, so a seeded prompt's sample changed with the rows beside it (its first token
    # alone agreed); the server already seeds each request's prompts so (Engine.submit).
    params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=5, repetition_penalty=1.2, presence_penalty=0.5)
    prompts = [[5, 6], [7, 8, 9, 10, 11]]
    alone = [rows(model, [prompt], params)[0] for prompt in prompts]
    assert rows(model, prompts, params) == alone
    assert rows(model, prompts[::-1], params) == alone[::-1]
