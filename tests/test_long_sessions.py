"""Use that goes on: a server's engine after many requests of every kind. In-process, a tiny random model."""

from __future__ import annotations

import asyncio
import gc
import weakref

import pytest
import torch

from nanoqwen.generate import SamplingParams
from nanoqwen.model import Qwen3
from nanoqwen.serve.engine import Engine, Failed, Finished, Job
from nanoqwen.tokenizer import Tokenizer, qwen3_tokenizer
from tests.test_model import tiny_config

CONTEXT = 64


@pytest.fixture(scope="module")
def local() -> tuple[Qwen3, Tokenizer]:
    # A small vocabulary, its ids Qwen3's first tokens (single bytes): a step costs little beside the engine's work
    torch.manual_seed(0)
    return Qwen3(tiny_config(max_position_embeddings=CONTEXT)).prepare_for_decoding(), qwen3_tokenizer()


async def drain(job: Job) -> list[str]:
    """How each choice of `job` ended ("stop", "length", or "failed")."""
    ends: dict[int, str] = {}
    while len(ends) < job.choices:
        event = await asyncio.wait_for(job.events.get(), timeout=30)
        if isinstance(event, Failed):
            return ["failed"]
        if isinstance(event, Finished):
            ends[event.index] = event.finish_reason
    return [ends[i] for i in sorted(ends)]


async def until_idle(engine: Engine) -> None:
    """Until the worker has taken in everything submitted and dropped every row (cancelled ones at its next step)."""
    for _ in range(3000):
        if engine._inbox.empty() and not (engine._active or engine._waiting or engine._admitting):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"the engine is still busy: {engine.stats()}")


def test_the_engine_lets_go_of_every_request_once_its_clients_are_done(local: tuple[Qwen3, Tokenizer]) -> None:
    # A server up for hours must hold nothing of the requests it answered: no job, no row, no KV cache. Rounds of
    # every kind (n > 1 sharing one prefill, sampled and greedy, prompts read in chunks, a batch full so that some
    # wait, clients gone while waiting, in prefill and mid-decode, a prompt that fills the context) end with the
    # engine empty and every job freed: a leak shows as a count, not as memory creeping up over the hours.
    model, tokenizer = local
    prompt = list(range(40, 64))  # 24 tokens: several prefill chunks of 5
    full = [70] * CONTEXT  # as long as the context: one token of reply fits
    greedy, sampled = SamplingParams(max_new_tokens=3, temperature=0), SamplingParams(max_new_tokens=3, seed=1)
    long = SamplingParams(max_new_tokens=CONTEXT, temperature=0)  # to the end of the context

    async def main() -> tuple[list[weakref.ref], list[list[str]], Engine]:
        engine = Engine(model, tokenizer, max_batch_size=2, prefill_chunk=5)
        engine.start()
        refs, ends = [], []
        try:
            for _ in range(2):
                finished = [engine.submit([prompt], greedy, 2), engine.submit([prompt, full], sampled, 1),
                            engine.submit([full], long, 1)]
                gone = [engine.submit([prompt], long, 2) for _ in range(2)]  # they wait for a row
                gone[0].cancel()  # waiting, or reading its prompt
                first = await asyncio.wait_for(gone[1].events.get(), timeout=30)  # (its first text: decoding)
                assert not isinstance(first, Failed)
                gone[1].cancel()
                ends += [await drain(job) for job in finished]
                refs += [weakref.ref(job) for job in finished + gone]
                del finished, gone, first
                await until_idle(engine)
            return refs, ends, engine
        finally:
            engine.stop()

    refs, ends, engine = asyncio.run(main())
    assert ends == [["length"] * 2, ["length"] * 2, ["length"]] * 2  # (nothing failed)
    assert engine._cache is None and engine._decode_step is None
    gc.collect()
    assert [ref() for ref in refs] == [None] * len(refs)
    assert len(engine._jobs) == 0
