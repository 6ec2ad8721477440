"""Use that goes on: a server's engine after many requests of every kind. In-process, a tiny random model."""

from __future__ import annotations

import asyncio
import gc
import weakref

import pytest
import torch

from nanoqwen.chat import Conversation
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


def test_a_long_message_after_a_long_chat_drops_the_fewest_turns_in_a_few_renders(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Each turn dropped rendered and encoded the whole conversation again: a 20,000-token paste after 1,000 short
    # turns (Qwen3's context of 40,960) dropped 373 of them in 374 renders, minutes of a frozen chat. Galloping then
    # bisecting finds the same fewest turns in about 2 log2(turns) renders; the usual cases take what they took.
    tokenizer = qwen3_tokenizer()
    conversation = Conversation(tokenizer, context=3000, reserve=100)
    history = [message for i in range(150) for message in (
        {"role": "user", "content": f"question {i} about things"}, {"role": "assistant", "content": f"answer {i} ok"})]
    render = conversation._prompt
    renders = []
    monkeypatch.setattr(conversation, "_prompt", lambda messages: renders.append(len(messages)) or render(messages))

    def fits(turns: list[dict[str, str]], message: str) -> bool:
        return len(tokenizer.encode(render([*turns, {"role": "user", "content": message}]))) <= 3000 - 100

    def sent(turns: list[dict[str, str]], message: str) -> tuple[int, int]:
        """Turns dropped and renders taken for `message` after `turns`."""
        conversation.messages = list(turns)
        renders.clear()
        ids = conversation.add_user(message)
        assert ids == tokenizer.encode(render(conversation.messages))
        assert conversation.messages == [*turns[2 * conversation.dropped:], {"role": "user", "content": message}]
        return conversation.dropped, len(renders)

    long_message = "word " * 1500
    fewest = next(k for k in range(len(history) // 2 + 1) if fits(history[2 * k:], long_message))
    assert fewest > 50  # (the case this is about)
    dropped, taken = sent(history, long_message)
    assert dropped == fewest and taken <= 2 * (fewest.bit_length() + 1), taken  # (it took fewest + 2)
    # The usual cases: nothing to drop, one render; one turn to drop, two; a message too long for any, every turn.
    assert sent(history[:20], "short") == (0, 1)
    full = next(k for k in range(1, 151) if not fits(history[:2 * k], "short"))
    assert fits(history[2:2 * full], "short") and sent(history[:2 * full], "short") == (1, 2)
    assert sent(history, "word " * 2950)[0] == 150
