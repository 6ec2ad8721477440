"""`nanoqwen serve` end to end: the real server process, driven by the real `openai` client."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import signal
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch

from nanoqwen.checkpoint import load_checkpoint, save_checkpoint
from nanoqwen.cli import main
from nanoqwen.generate import SamplingParams, TextStream, generate, generate_ids
from nanoqwen.serve.app import base_url
from nanoqwen.serve.engine import Delta, Engine, Failed, Finished
from nanoqwen.tokenizer import Tokenizer, bytes_to_unicode, load_tokenizer, qwen3_tokenizer
from tests.serve_helpers import (
    CONTEXT,
    load_reference,
    make_checkpoint,
    make_scripted_checkpoint,
    run_server,
    wait_for,
    wait_idle,
    with_chat_template,
)

WORDS = ["start", "end", "middle", "heart", "edge", "color", "sound", "shape", "weight", "voice", "rest", "spirit",
         "center", "idea", "core", "tone"]
PROMPTS = [f"Prompt number {i}: the {w} of the story" for i, w in enumerate(WORDS)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("serve") / "tiny")


@pytest.fixture(scope="module")
def long_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """For requests that must still be running whatever the machine's speed when a test cuts them."""
    return make_checkpoint(tmp_path_factory.mktemp("serve-long") / "tiny", context=4096)


@pytest.fixture(scope="module")
def local(checkpoint: Path):
    """The same checkpoint loaded in this process, for reference outputs."""
    return load_reference(checkpoint)


@pytest.fixture(scope="module")
def url(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    with run_server(checkpoint, tmp_path_factory.mktemp("logs") / "serve.log") as base:
        yield base


@pytest.fixture(scope="module")
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)


def greedy_reference(local, prompt: str, max_tokens: int) -> str:
    model, tokenizer = local
    params = SamplingParams(max_new_tokens=max_tokens, temperature=0, stop_token_ids=tokenizer.stop_ids)
    return generate(model, tokenizer, [prompt], params)[0].text


def test_models_and_health(client: openai.OpenAI, url: str, local) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"]
    card = models[0].model_dump()
    assert card["parameters"] == local[0].num_params() and card["context_length"] == CONTEXT
    assert card["thinking_switch"] is False  # ChatML: nothing for chat_template_kwargs to switch
    assert card["trained_on_plain_text"] is False  # a folder of weights alone: nothing says what it was trained on
    # What requests leave out is sampled as the checkpoint's generation_config.json says (as vLLM reads it).
    assert card["sampling_defaults"] == {"temperature": 0.7, "top_k": 20, "top_p": 0.8, "min_p": 0.0,
                                         "repetition_penalty": 1.0}
    same = [client.completions.create(model="tiny", prompt="Once", max_tokens=8, seed=5, **given).choices[0].text
            for given in ({}, {"temperature": 0.7, "top_p": 0.8, "extra_body": {"top_k": 20}})]
    assert same[0] == same[1]
    assert client.models.retrieve("tiny").id == "tiny"
    # OpenAI's fields of a model and its list, which its Python client does not check (other clients read them).
    listed = httpx.get(f"{url}/v1/models").json()
    assert listed["object"] == "list" and listed["data"] == [httpx.get(f"{url}/v1/models/tiny").json()]
    assert {key: card[key] for key in ("id", "object", "owned_by")} == {"id": "tiny", "object": "model",
                                                                         "owned_by": "nanoqwen"}
    assert isinstance(card["created"], int) and card["created"] > 0
    health = httpx.get(f"{url}/health").json()
    assert health["status"] == "ok" and health["model"] == "tiny"


def test_an_empty_model_name_asks_for_the_model_served(client: openai.OpenAI, url: str) -> None:
    # As vLLM takes it (and as a request that leaves `model` out): clients that need no model name send "". It was a
    # 404 naming model ''. GET /v1/models/ names no model, so it stays a 404.
    hi = [{"role": "user", "content": "hi"}]
    assert client.completions.create(model="", prompt="hi", max_tokens=1).model == "tiny"
    assert client.chat.completions.create(model="", messages=hi, max_tokens=1).model == "tiny"
    assert httpx.post(f"{url}/tokenize", json={"model": "", "prompt": "hi"}).status_code == 200
    assert httpx.get(f"{url}/v1/models/").status_code == 404


def test_tokenize_counts_what_a_request_would(client: openai.OpenAI, url: str, local) -> None:
    # vLLM's /tokenize: the web page asks it how much of a chat's history fits.
    tokenizer = local[1]
    r = httpx.post(f"{url}/tokenize", json={"prompt": "Hello there"}).json()
    assert r == {"count": len(tokenizer.encode("Hello there")), "max_model_len": CONTEXT,
                 "tokens": tokenizer.encode("Hello there")}
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    counted = httpx.post(f"{url}/tokenize", json={"messages": messages}).json()["count"]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=1)
    assert counted == chat.usage.prompt_tokens
    bare = httpx.post(f"{url}/tokenize", json={"messages": messages, "add_generation_prompt": False}).json()
    assert bare["tokens"] == tokenizer.encode(tokenizer.render_chat(messages, add_generation_prompt=False))
    # A chat request takes add_generation_prompt too (vLLM's field): it was ignored, prompting a reply regardless.
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=1,
                                          extra_body={"add_generation_prompt": False})
    assert chat.usage.prompt_tokens == bare["count"] < counted
    # Content parts read as their text: a user's text parts, one a line as vLLM and llama.cpp join them (they ran
    # together: "Why?Tell me."), and an assistant's refusal part (OpenAI's client sends a replayed refusal so),
    # which was refused as "not text".
    plain = [*messages, {"role": "assistant", "content": "I cannot."}, {"role": "user", "content": "Why?\nTell me."}]
    parts = [*messages, {"role": "assistant", "content": [{"type": "refusal", "refusal": "I cannot."}]},
             {"role": "user", "content": [{"type": "text", "text": "Why?"}, {"type": "text", "text": "Tell me."}]}]
    assert httpx.post(f"{url}/tokenize", json={"messages": parts}).json() == \
        httpx.post(f"{url}/tokenize", json={"messages": plain}).json()
    for body in ({}, {"prompt": "a", "messages": messages}, {"messages": []},
                 {"messages": [{"role": "user", "content": [{"type": "refusal", "refusal": "no"}]}]}):
        r = httpx.post(f"{url}/tokenize", json=body)
        assert r.status_code == 400 and r.json()["error"]["message"], body


def test_openais_message_forms_read_as_the_template_takes_them(client: openai.OpenAI, url: str, local) -> None:
    # OpenAI's `developer` role is the system prompt; a message's `name` (OpenAI's participant name) reaches the
    # template, which ChatML's leaves out; an assistant message last is a closed turn, and the reply a new one (no
    # prefill, as OpenAI's: vLLM's continue_final_message, which would prefill, is refused in BAD_REQUESTS).
    tokenizer = local[1]
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    forms = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi", "name": "ann"}]
    counted = httpx.post(f"{url}/tokenize", json={"messages": forms}).json()["tokens"]
    assert counted == tokenizer.encode(tokenizer.render_chat(system))
    assert client.chat.completions.create(model="tiny", messages=forms, max_tokens=1).usage.prompt_tokens == \
        len(counted)
    said = [*system, {"role": "assistant", "content": "Hel"}]
    reply = client.chat.completions.create(model="tiny", messages=said, max_tokens=1)
    assert tokenizer.render_chat(said).endswith("Hel<|im_end|>\n<|im_start|>assistant\n")
    assert reply.usage.prompt_tokens == len(tokenizer.encode(tokenizer.render_chat(said)))


def test_greedy_completion_equals_generate(client: openai.OpenAI, local) -> None:
    prompt = "Once upon a time"
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=20, temperature=0)
    assert r.choices[0].text == greedy_reference(local, prompt, 20)
    assert r.choices[0].finish_reason == "length"
    assert r.id.startswith("cmpl-") and r.object == "text_completion"
    tokenizer = local[1]
    assert r.usage.prompt_tokens == len(tokenizer.encode(prompt))
    assert r.usage.completion_tokens == 20 and r.usage.total_tokens == r.usage.prompt_tokens + 20
    # n choices of each prompt: each prompt counted once (as OpenAI counts it), the choices' tokens summed.
    for prompts in ([prompt], [prompt, "The river"]):
        sampling = dict(model="tiny", prompt=prompts, max_tokens=5, temperature=0, n=2)
        plain = client.completions.create(**sampling)
        _, reasons, streamed = stream_text(client.completions.create(
            **sampling, stream=True, stream_options={"include_usage": True}))
        assert [c.finish_reason for c in plain.choices] == list(reasons.values()) == ["length"] * 2 * len(prompts)
        expected = {"prompt_tokens": sum(len(tokenizer.encode(p)) for p in prompts),
                    "completion_tokens": 5 * 2 * len(prompts)}
        for counted in (plain.usage, streamed):
            assert counted.model_dump(include=set(expected)) == expected
            assert counted.total_tokens == sum(expected.values())


def test_greedy_chat_equals_generate(client: openai.OpenAI, local) -> None:
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello."}]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0)
    tokenizer = local[1]
    rendered = tokenizer.render_chat(messages)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == greedy_reference(local, rendered, 16)
    assert r.usage.prompt_tokens == len(tokenizer.encode(rendered))
    assert r.usage.completion_tokens == 16
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion"
    # OpenAI's newer name for the limit (the one its client sends for chat) is read too.
    short = client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=3, temperature=0)
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"
    # n=2: the conversation counted once, both replies' tokens summed, streamed or not.
    sampling = dict(model="tiny", messages=messages, max_tokens=5, temperature=0, n=2)
    plain = client.chat.completions.create(**sampling)
    _, reasons, streamed = stream_text(client.chat.completions.create(
        **sampling, stream=True, stream_options={"include_usage": True}))
    assert [c.finish_reason for c in plain.choices] == list(reasons.values()) == ["length", "length"]
    for counted in (plain.usage, streamed):
        assert (counted.prompt_tokens, counted.completion_tokens) == (r.usage.prompt_tokens, 10)
        assert counted.total_tokens == r.usage.prompt_tokens + 10


def stream_text(stream) -> tuple[dict[int, str], dict[int, str], object]:
    """Concatenated text and finish reason per choice, and the usage chunk, of a streamed response."""
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    usage = None
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            piece = choice.delta.content if hasattr(choice, "delta") else choice.text
            texts[choice.index] = texts.get(choice.index, "") + (piece or "")
            if choice.finish_reason:
                reasons[choice.index] = choice.finish_reason
    return texts, reasons, usage


def test_streaming_equals_non_streaming(client: openai.OpenAI) -> None:
    sampling = dict(max_tokens=16, temperature=0.9, top_p=0.95, seed=1234, n=2,
                    extra_body={"top_k": 40, "repetition_penalty": 1.2})
    plain = client.completions.create(model="tiny", prompt="The river", **sampling)
    texts, reasons, usage = stream_text(client.completions.create(
        model="tiny", prompt="The river", stream=True, stream_options={"include_usage": True}, **sampling))
    assert texts == {c.index: c.text for c in plain.choices}
    assert reasons == {c.index: c.finish_reason for c in plain.choices}
    assert usage.model_dump() == plain.usage.model_dump()
    assert plain.choices[0].text != plain.choices[1].text  # choice k samples with seed + k
    # vLLM's continuous_usage_stats: every chunk counts its choice's tokens so far (the web page's count after a
    # stop), rising to the choice's whole count; the last chunk still counts the request's.
    chunks = list(client.completions.create(model="tiny", prompt="The river", stream=True, stream_options={
        "include_usage": True, "continuous_usage_stats": True}, **sampling))
    counts: dict[int, list[int]] = {0: [], 1: []}
    for chunk in chunks[:-1]:
        assert chunk.usage.prompt_tokens == plain.usage.prompt_tokens
        assert chunk.usage.total_tokens == chunk.usage.prompt_tokens + chunk.usage.completion_tokens
        counts[chunk.choices[0].index].append(chunk.usage.completion_tokens)
    assert all(c == sorted(c) and c[0] >= 1 for c in counts.values())
    assert counts[0][-1] + counts[1][-1] == plain.usage.completion_tokens
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == plain.usage.model_dump()
    # Over several prompts, each samples what it samples alone (as vLLM seeds a request's prompts: a harness that
    # batches them gets the same samples at any batch size): choice k, of prompt k // n, is a lone request with
    # seed + k % n.
    several = client.completions.create(model="tiny", prompt=["The sea", "The river"], **sampling)
    for k, choice in enumerate(several.choices):
        alone = client.completions.create(model="tiny", prompt=["The sea", "The river"][k // 2],
                                          **{**sampling, "n": 1, "seed": 1234 + k % 2})
        assert choice.text == alone.choices[0].text
    assert [c.text for c in several.choices[2:]] == [c.text for c in plain.choices]
    # From the last seed, choice 1 wraps to seed 0, as `nanoqwen sample --num-samples` and chat turns do
    last = client.completions.create(model="tiny", prompt="The river", **{**sampling, "seed": 2**63 - 1})
    zero = client.completions.create(model="tiny", prompt="The river", **{**sampling, "n": 1, "seed": 0})
    assert last.choices[1].text == zero.choices[0].text

    messages = [{"role": "user", "content": "Tell me about rivers."}]
    plain = client.chat.completions.create(model="tiny", messages=messages, **sampling)
    texts, reasons, usage = stream_text(client.chat.completions.create(
        model="tiny", messages=messages, stream=True, stream_options={"include_usage": True}, **sampling))
    assert texts == {c.index: c.message.content for c in plain.choices}
    assert reasons == {c.index: c.finish_reason for c in plain.choices}
    assert usage.model_dump() == plain.usage.model_dump()


def greedy_ids(local, prompt: list[int], n: int, frequency: float = 0.0, presence: float = 0.0) -> list[int]:
    """Greedy decoding by OpenAI's definition, the slow way (a whole forward per token): each step's logits
    minus (frequency * count + presence * (count > 0)), counting only the tokens generated so far."""
    model = local[0]
    out: list[int] = []
    counts = torch.zeros(model.config.vocab_size)
    with torch.inference_mode():
        for _ in range(n):
            logits = model(torch.tensor([prompt + out]))[0, -1].float()
            out.append(int((logits - frequency * counts - presence * (counts > 0).float()).argmax()))
            counts[out[-1]] += 1
    return out


def test_presence_and_frequency_penalties(client: openai.OpenAI, local) -> None:
    tokenizer = local[1]
    prompt = tokenizer.encode("A list:")

    def complete(ids: list[int], n: int = 12, **penalties: float) -> str:
        r = client.completions.create(model="tiny", prompt=ids, max_tokens=n, temperature=0, **penalties)
        return r.choices[0].text

    plain = greedy_ids(local, prompt, 12)
    assert len(set(plain)) < len(plain)  # the unpenalized text repeats a token: something to act on
    assert complete(prompt) == complete(prompt, presence_penalty=0, frequency_penalty=0) == tokenizer.decode(plain)
    for name in ("frequency", "presence"):
        fewer, more = greedy_ids(local, prompt, 12, **{name: 2.0}), greedy_ids(local, prompt, 12, **{name: -2.0})
        assert len(set(fewer)) == len(fewer) and len(set(more)) < len(set(plain))  # the expected directions
        assert complete(prompt, **{f"{name}_penalty": 2.0}) == tokenizer.decode(fewer)
        assert complete(prompt, **{f"{name}_penalty": -2.0}) == tokenizer.decode(more)
    # Frequency grows with each repeat, presence does not (at -0.3 the two texts differ).
    by_count, by_presence = greedy_ids(local, prompt, 12, frequency=-0.3), greedy_ids(local, prompt, 12, presence=-0.3)
    assert by_count != by_presence
    assert complete(prompt, frequency_penalty=-0.3, presence_penalty=0) == tokenizer.decode(by_count)
    assert complete(prompt, presence_penalty=-0.3) == tokenizer.decode(by_presence)
    # The prompt does not count: a prompt ending just before a repeat still gets the repeated token first.
    k = next(i for i in range(1, len(plain)) if plain[i] in plain[:i])
    # Logprobs describe the model, not the sampler: where the penalty changed the pick, the raw favourite
    # (the repeat) still tops the alternatives, with its unpenalized logprob.
    fewer = greedy_ids(local, prompt, k + 1, frequency=2.0)
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=k + 1, temperature=0, logprobs=1,
                                  frequency_penalty=2.0).choices[0]
    raw = reference_logprobs(local, prompt, fewer)
    assert r.text == tokenizer.decode(fewer) and fewer[k] != plain[k]
    assert [max(top.values()) for top in r.logprobs.top_logprobs] == pytest.approx(raw.max(-1).values.tolist(),
                                                                                   abs=1e-4)
    assert list(r.logprobs.top_logprobs[k]) == [tokenizer.decode([plain[k]]), r.logprobs.tokens[k]]
    repeat = greedy_ids(local, prompt + plain[:k], 3, presence=2.0)
    assert repeat[0] == plain[k]
    assert complete(prompt + plain[:k], 3, presence_penalty=2.0) == tokenizer.decode(repeat)
    # Chat takes them too.
    messages = [{"role": "user", "content": "Tell me about rivers."}]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0,
                                       frequency_penalty=2.0, presence_penalty=-1.0)
    expected = greedy_ids(local, tokenizer.encode(tokenizer.render_chat(messages)), 12, frequency=2.0, presence=-1.0)
    assert r.choices[0].message.content == tokenizer.decode(expected) and r.choices[0].logprobs is None


def reference_logprobs(local, prompt: list[int], generated: list[int]) -> torch.Tensor:
    """(len(generated), V): log_softmax of the checkpoint's logits at each generated position, in one forward."""
    with torch.inference_mode():
        logits = local[0](torch.tensor([prompt + generated[:-1]]))[0, len(prompt) - 1:].float()
    return logits.log_softmax(-1)


def test_completion_logprobs(client: openai.OpenAI, local) -> None:
    tokenizer = local[1]
    prompt, n, top = "Once upon a time", 8, 3
    ids = tokenizer.encode(prompt)
    generated = greedy_ids(local, ids, n)
    expected = reference_logprobs(local, ids, generated)
    sampling = dict(model="tiny", prompt=prompt, max_tokens=n, temperature=0, logprobs=top)
    plain = client.completions.create(**sampling).choices[0]
    streamed: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    text = ""
    for chunk in client.completions.create(**sampling, stream=True):
        for choice in chunk.choices:
            text += choice.text
            if choice.logprobs is not None:  # the logprobs of the tokens behind this chunk's text
                for key, values in streamed.items():
                    values += getattr(choice.logprobs, key)
    assert text == plain.text == tokenizer.decode(generated)
    assert streamed == plain.logprobs.model_dump(include=set(streamed))
    logprobs = plain.logprobs
    assert logprobs.token_logprobs == pytest.approx(expected[range(n), generated].tolist(), abs=1e-4)
    assert "".join(logprobs.tokens) == plain.text
    assert logprobs.text_offset == [len(tokenizer.decode(generated[:i])) for i in range(n)]
    for i, alternatives in enumerate(logprobs.top_logprobs):
        best = expected[i].topk(top)
        assert list(alternatives.values()) == pytest.approx(best.values.tolist(), abs=1e-4)  # sorted, best first
        assert list(alternatives)[0] == logprobs.tokens[i]  # greedy: the sampled token is the most likely
    # Temperature and top-k change what is sampled, not the logprobs (the first step depends on the prompt only).
    hot = client.completions.create(model="tiny", prompt=prompt, max_tokens=1, temperature=1.8, seed=3, logprobs=top,
                                    extra_body={"top_k": 2}).choices[0].logprobs
    assert list(hot.top_logprobs[0].values()) == pytest.approx(expected[0].topk(top).values.tolist(), abs=1e-4)
    assert hot.token_logprobs[0] == hot.top_logprobs[0][hot.tokens[0]]


def prompt_reference(local, ids: list[int]) -> torch.Tensor:
    """(len(ids) - 1, V): log_softmax at each prompt position that predicts the next prompt token, one forward."""
    with torch.inference_mode():
        return local[0](torch.tensor([ids]))[0, :-1].float().log_softmax(-1)


def assert_scores_prompt(logprobs, local, ids: list[int], top: int) -> None:
    """An echoed prompt's logprobs: the first token's null, each later one's as one forward scores it."""
    from nanoqwen.serve.app import token_text

    tokenizer, expected = local[1], prompt_reference(local, ids)
    assert logprobs.tokens[:len(ids)] == [token_text(tokenizer, t)[0] for t in ids]
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert logprobs.token_logprobs[1:len(ids)] == pytest.approx(expected[range(len(ids) - 1), ids[1:]].tolist(),
                                                                abs=1e-4)
    for k in range(1, len(ids)):
        assert list(logprobs.top_logprobs[k].values())[:top] == pytest.approx(expected[k - 1].topk(top).values.tolist(),
                                                                               abs=1e-4)
    assert logprobs.text_offset[:len(ids)] == [len(tokenizer.decode(ids[:k])) for k in range(len(ids))]


def test_echo_scores_the_prompt_as_evaluation_harnesses_ask(client: openai.OpenAI, local) -> None:
    # lm-evaluation-harness's loglikelihood tasks send token ids with echo, logprobs and max_tokens 0 (or 1).
    tokenizer = local[1]
    texts = ["Once upon a time, in a land far away", "The rain in Spain"]
    batch = [tokenizer.encode(text) for text in texts]
    scored = client.completions.create(model="tiny", prompt=batch, echo=True, max_tokens=0, logprobs=2, temperature=0)
    assert scored.usage.completion_tokens == 0 and scored.usage.prompt_tokens == sum(map(len, batch))
    for choice, ids, text in zip(scored.choices, batch, texts):
        assert (choice.text, choice.finish_reason, len(choice.logprobs.tokens)) == (text, "length", len(ids))
        assert_scores_prompt(choice.logprobs, local, ids, 2)
    alone = client.completions.create(model="tiny", prompt=texts[1], echo=True, max_tokens=0, logprobs=2)
    assert alone.choices[0].logprobs == scored.choices[1].logprobs  # text or ids, batched or alone
    two = client.completions.create(model="tiny", prompt=texts[1], echo=True, max_tokens=0, logprobs=2, n=2)
    assert two.choices[0].logprobs == two.choices[1].logprobs == alone.choices[0].logprobs  # one shared prefill
    # The harness's own request (max_tokens 1, logprobs 1) and reading: a continuation's summed logprob and
    # whether each of its tokens was the most likely one.
    context, continuation = tokenizer.encode("The rain in"), tokenizer.encode(" Spain stays")
    ids = context + continuation
    harness = client.completions.create(model="tiny", prompt=[ids], echo=True, max_tokens=1, logprobs=1,
                                        temperature=0, seed=1234).choices[0].logprobs
    expected = prompt_reference(local, ids)[range(len(context) - 1, len(ids) - 1), continuation]
    assert sum(harness.token_logprobs[len(context):-1]) == pytest.approx(float(expected.sum()), abs=1e-4)
    assert [lp == max(top.values()) for lp, top in zip(harness.token_logprobs[len(context):-1],
                                                        harness.top_logprobs[len(context):-1])] == \
        [bool(prompt_reference(local, ids)[k].argmax() == ids[k + 1]) for k in range(len(context) - 1, len(ids) - 1)]
    # With a completion: the prompt's text and logprobs, then the completion's, offsets counting on.
    sampling = dict(model="tiny", prompt=texts[0], max_tokens=5, temperature=0, logprobs=1)
    plain = client.completions.create(**sampling).choices[0]
    echoed = client.completions.create(**sampling, echo=True).choices[0]
    assert echoed.text == texts[0] + plain.text == texts[0] + greedy_reference(local, texts[0], 5)
    assert_scores_prompt(echoed.logprobs, local, batch[0], 1)
    for key in ("tokens", "token_logprobs", "top_logprobs"):
        assert getattr(echoed.logprobs, key)[len(batch[0]):] == getattr(plain.logprobs, key)
    assert echoed.logprobs.text_offset[len(batch[0]):] == [len(texts[0]) + k for k in plain.logprobs.text_offset]
    streamed = {"text": "", "tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for chunk in client.completions.create(**sampling, echo=True, stream=True):
        for choice in chunk.choices:
            streamed["text"] += choice.text
            if choice.logprobs is not None:
                for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                    streamed[key] += getattr(choice.logprobs, key)
    assert streamed == {"text": echoed.text, **echoed.logprobs.model_dump(include=set(streamed))}
    # Echo without logprobs: the prompt's text only; max_tokens 0 without echo: nothing at all.
    assert client.completions.create(model="tiny", prompt=texts[1], echo=True, max_tokens=0).choices[0].text == texts[1]
    empty = client.completions.create(model="tiny", prompt=texts[1], max_tokens=0).choices[0]
    assert (empty.text, empty.logprobs, empty.finish_reason) == ("", None, "length")


def test_an_echoed_prompt_is_scored_across_its_prefill_chunks(local) -> None:
    """In-process: a prompt read in chunks of 7 scores each token as one forward over all of it does."""
    model, tokenizer = local
    prompt = tokenizer.encode(" ".join(PROMPTS))[:40]

    async def main() -> list:
        engine = Engine(model, tokenizer, prefill_chunk=7)
        engine.start()
        try:
            job = engine.submit([prompt], SamplingParams(max_new_tokens=0), 1, top_logprobs=3, echo=True)
            events = [await job.events.get(), await job.events.get()]
            return events
        finally:
            engine.stop()

    echoed, finished = asyncio.run(main())
    assert isinstance(echoed, Delta) and isinstance(finished, Finished) and finished.completion_tokens == 0
    expected = prompt_reference(local, prompt)
    assert [e.token for e in echoed.logprobs] == prompt and echoed.text == tokenizer.decode(prompt)
    assert [e.logprob for e in echoed.logprobs[1:]] == pytest.approx(
        expected[range(len(prompt) - 1), prompt[1:]].tolist(), abs=1e-4)
    for k, entry in enumerate(echoed.logprobs[1:]):
        assert [t for t, _ in entry.top] == expected[k].topk(3).indices.tolist()


def test_a_chat_request_without_max_tokens_gets_the_checkpoints_max_new_tokens(local) -> None:
    # As vLLM: a generation_config.json's max_new_tokens is the max_tokens of a chat request that gives none (it
    # ran to the end of the context); one given wins, and completions keep OpenAI's 16, which vLLM's protocol
    # sets where the request gives none.
    from fastapi.testclient import TestClient

    from nanoqwen.serve.app import create_app

    model, tokenizer = local
    body = {"temperature": 0, "ignore_eos": True}
    chat = {"messages": [{"role": "user", "content": "Hi"}], **body}
    with TestClient(create_app(model, tokenizer, "tiny", default_max_tokens=5)) as http:
        def generated(path: str, request: dict) -> int:
            answer = http.post(path, json=request)
            assert answer.status_code == 200, answer.text
            return answer.json()["usage"]["completion_tokens"]

        assert generated("/v1/chat/completions", chat) == 5
        assert generated("/v1/chat/completions", {**chat, "max_tokens": 7}) == 7
        assert generated("/v1/completions", {"prompt": "Hi", **body}) == 16
        refused = http.post("/v1/chat/completions", json={**chat, "min_tokens": 6})
        assert refused.status_code == 400 and refused.json()["error"]["message"] == (
            "min_tokens (6) is more than the 5 tokens a reply gets without max_tokens (the checkpoint's "
            "generation_config.json max_new_tokens); send max_tokens of at least 6 too")


def test_echo_returns_a_text_prompt_as_sent_with_its_tokens_offsets_in_it(local) -> None:
    # The echo was the prompt's ids decoded: its special tokens left out (skip_special_tokens, the default) and its
    # text normalized (NFC), so "<|im_start|>user\nhi" came back as "user\nhi" and offsets pointed elsewhere.
    # As OpenAI's and vLLM's: the prompt as sent, each token's offset where its text starts in it.
    from fastapi.testclient import TestClient

    from nanoqwen.serve.app import create_app

    model, tokenizer = local
    body = {"echo": True, "logprobs": 0, "temperature": 0}
    with TestClient(create_app(model, tokenizer, "tiny")) as http:
        def complete(prompt: str | list[int], max_tokens: int) -> dict:
            answer = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens, **body})
            assert answer.status_code == 200, answer.text
            return answer.json()["choices"][0]

        chat = complete("<|im_start|>user\nhi", 0)
        assert chat["text"] == "<|im_start|>user\nhi"
        assert chat["logprobs"]["tokens"] == ["<|im_start|>", "user", "\n", "hi"]
        assert chat["logprobs"]["text_offset"] == [0, 12, 16, 17]
        decomposed = "cafe\u0301 ok"  # an e and a combining accent, which NFC makes one character
        echoed, prompt_tokens = complete(decomposed, 3), len(tokenizer.encode(decomposed))
        offsets = echoed["logprobs"]["text_offset"]
        assert echoed["text"].startswith(decomposed) and offsets[:prompt_tokens] == [0, 2, 5]
        body["echo"] = False  # the completion's own offsets count on from the prompt as sent
        plain = complete(decomposed, 3)
        assert echoed["text"] == decomposed + plain["text"]
        assert offsets[prompt_tokens:] == [len(decomposed) + k for k in plain["logprobs"]["text_offset"]]
        body["echo"] = True
        empty = complete("", 0)  # a new document's <|endoftext|>, which the prompt as sent does not hold
        assert (empty["text"], empty["logprobs"]["text_offset"]) == ("", [0])
        ids = complete(tokenizer.encode("<|im_start|>user\nhi"), 0)  # token ids: their text, decoded
        assert ids["text"] == "user\nhi" and ids["logprobs"]["text_offset"] == [0, 0, 4, 5]
        # several prompts: each choice echoes its own prompt's text
        several = http.post("/v1/completions", json={"prompt": ["<|im_start|>hi", "the cat"], "max_tokens": 0,
                                                      "n": 2, **body}).json()["choices"]
        assert [c["text"] for c in several] == ["<|im_start|>hi"] * 2 + ["the cat"] * 2


def test_chat_logprobs(client: openai.OpenAI, local) -> None:
    tokenizer = local[1]
    messages = [{"role": "user", "content": "Tell me about rivers."}]
    n, top = 8, 4
    ids = tokenizer.encode(tokenizer.render_chat(messages))
    generated = greedy_ids(local, ids, n)
    expected = reference_logprobs(local, ids, generated)
    sampling = dict(model="tiny", messages=messages, max_tokens=n, temperature=0, logprobs=True, top_logprobs=top)
    plain = client.chat.completions.create(**sampling).choices[0]
    streamed, text = [], ""
    for chunk in client.chat.completions.create(**sampling, stream=True):
        for choice in chunk.choices:
            text += choice.delta.content or ""
            streamed += choice.logprobs.content if choice.logprobs is not None else []
    content = plain.logprobs.content
    assert text == plain.message.content == tokenizer.decode(generated)
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in content]
    assert [e.logprob for e in content] == pytest.approx(expected[range(n), generated].tolist(), abs=1e-4)
    assert b"".join(bytes(e.bytes) for e in content) == plain.message.content.encode()
    for i, entry in enumerate(content):
        best = expected[i].topk(top)
        assert [a.logprob for a in entry.top_logprobs] == pytest.approx(best.values.tolist(), abs=1e-4)
        assert [bytes(a.bytes) for a in entry.top_logprobs] == [tokenizer.token_bytes(t) for t in best.indices.tolist()]
        assert entry.top_logprobs[0].token == entry.token  # greedy: the sampled token is the most likely
    # Without top_logprobs: each token's own logprob and no alternatives.
    bare = client.chat.completions.create(model="tiny", messages=messages, max_tokens=2, temperature=0, logprobs=True)
    assert [e.top_logprobs for e in bare.choices[0].logprobs.content] == [[], []]


def test_chat_logprobs_leave_out_the_stop_token(checkpoint: Path, local, tmp_path: Path) -> None:
    # The reply's content logprobs end with its content, as OpenAI's: the end token that stopped it is no text.
    # The random model never picks <|im_end|>, so a copy of it ends at one of its greedy tokens instead.
    import shutil

    from fastapi.testclient import TestClient

    from nanoqwen.serve.app import create_app

    tokenizer = local[1]
    messages = [{"role": "user", "content": "Tell me about rivers."}]
    generated = greedy_ids(local, tokenizer.encode(tokenizer.render_chat(messages)), 8)
    k = next(k for k in range(2, 8) if generated[k] not in generated[:k])
    folder = tmp_path / "stops"
    shutil.copytree(checkpoint, folder)
    saved = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**saved, "eos_token_id": [generated[k]]}))
    model, stopping = load_checkpoint(folder)
    sampling = dict(model="tiny", messages=messages, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2)
    with TestClient(create_app(model, stopping, "tiny")) as http:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=http, max_retries=0)
        plain = client.chat.completions.create(**sampling).choices[0]
        chunks = list(client.chat.completions.create(**sampling, stream=True))
    streamed = [e for c in chunks for choice in c.choices if choice.logprobs for e in choice.logprobs.content]
    assert plain.finish_reason == "stop" and plain.message.content == tokenizer.decode(generated[:k])
    assert [bytes(e.bytes) for e in plain.logprobs.content] == [tokenizer.token_bytes(t) for t in generated[:k]]
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in plain.logprobs.content]
    assert chunks[-1].choices[0].finish_reason == "stop" and chunks[-1].choices[0].logprobs is None


def test_stop_strings_and_max_tokens_cap(client: openai.OpenAI, local) -> None:
    sampling = dict(model="tiny", prompt="A list:", max_tokens=30, temperature=0, logprobs=1)
    full = client.completions.create(**sampling).choices[0]
    # A stop string made of two whole tokens from the middle: the text ends where the first one starts.
    pieces, offsets = full.logprobs.tokens, full.logprobs.text_offset
    k = next(k for k in range(len(pieces) // 2, len(pieces) - 1)
             if full.text.find(pieces[k] + pieces[k + 1]) == offsets[k] and pieces[k].strip())
    stop = pieces[k] + pieces[k + 1]
    cut = client.completions.create(**sampling, stop=[stop]).choices[0]
    assert cut.text == full.text[:offsets[k]]
    assert cut.finish_reason == "stop"
    # One stop string may come as a string, as OpenAI's API takes it: the same stop, not one per character.
    assert client.completions.create(**sampling, stop=stop).choices[0].text == cut.text
    # The stop string completed by the budget's last token: the stop string ended it, not the length.
    exact = dict(sampling, max_tokens=k + 2, stop=[stop])
    at_budget = client.completions.create(**exact).choices[0]
    assert (at_budget.text, at_budget.finish_reason) == (cut.text, "stop")
    chunks = list(client.completions.create(**exact, stream=True))
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    # One token less and the stop string is never completed: the length ended it, with all the text made.
    short = client.completions.create(**dict(exact, max_tokens=k + 1)).choices[0]
    assert (short.text, short.finish_reason) == (full.text[:offsets[k + 1]], "length")
    # Its logprobs, streamed or not: the tokens up to the stop string's end, offsets within the returned text.
    text, streamed = "", {"tokens": [], "text_offset": []}
    for chunk in client.completions.create(**sampling, stop=[stop], stream=True):
        text += chunk.choices[0].text
        for key, values in streamed.items():
            values += getattr(chunk.choices[0].logprobs, key) if chunk.choices[0].logprobs else []
    assert text == cut.text
    assert streamed["tokens"] == cut.logprobs.tokens == pieces[:k + 2]
    assert streamed["text_offset"] == cut.logprobs.text_offset == offsets[:k] + [len(text), len(text)]
    # A prompt 4 tokens short of the context gets at most 5 new tokens (the last is predicted, never read: see
    # check_fits), however many were asked for.
    long_ids = local[1].encode(" word" * (CONTEXT - 4))[:CONTEXT - 4]
    capped = client.completions.create(model="tiny", prompt=long_ids, max_tokens=200, temperature=0)
    assert capped.usage.prompt_tokens == CONTEXT - 4
    assert capped.usage.completion_tokens <= 5


def test_vllms_stop_token_ids_min_tokens_and_include_stop_str_in_output(client: openai.OpenAI, local) -> None:
    model, tokenizer = local
    prompt = "A list:"
    ids = generate(model, tokenizer, [prompt], SamplingParams(max_new_tokens=12, temperature=0))[0].token_ids
    k = next(k for k in range(3, 12) if ids[k] not in ids[:k])
    sampling = dict(model="tiny", prompt=prompt, max_tokens=12, temperature=0)

    def ask(**extra):
        return client.completions.create(**sampling, extra_body=extra)

    stopped = ask(stop_token_ids=[ids[k]])
    assert (stopped.choices[0].text, stopped.choices[0].finish_reason) == (tokenizer.decode(ids[:k]), "stop")
    assert stopped.usage.completion_tokens == k + 1  # the stop token is counted, not shown
    kept = ask(stop_token_ids=[ids[k]], include_stop_str_in_output=True).choices[0]
    assert (kept.text, kept.finish_reason) == (tokenizer.decode(ids[:k + 1]), "stop")
    # min_tokens: the stop token cannot be drawn before k + 1 tokens are in, so the reply goes on past it.
    held = ask(stop_token_ids=[ids[k]], min_tokens=k + 1)
    reference = generate(model, tokenizer, [prompt], SamplingParams(max_new_tokens=12, temperature=0,
                                                                    stop_token_ids=[ids[k]], min_tokens=k + 1))[0]
    assert held.choices[0].text == reference.text and held.usage.completion_tokens == len(reference.token_ids) + (
        reference.finish_reason == "stop")
    assert held.usage.completion_tokens > k + 1 and reference.token_ids[:k] == ids[:k]
    # A stop string: the text ends before it, or after it when asked, and not before min_tokens tokens are in.
    word = tokenizer.decode(ids[k:k + 1])
    assert word.strip() and stopped.choices[0].text.find(word) == -1
    # Usage counts every token sampled, the one that completed the stop string too, cut from the text or not (vLLM
    # counts its token_ids so).
    cut, kept = ask(stop=[word]), ask(stop=[word], include_stop_str_in_output=True)
    assert (cut.choices[0].text, cut.usage.completion_tokens) == (tokenizer.decode(ids[:k]), k + 1)
    assert (kept.choices[0].text, kept.usage.completion_tokens) == (tokenizer.decode(ids[:k + 1]), k + 1)
    late = ask(stop=[word], min_tokens=k + 2).choices[0]
    assert late.text.startswith(tokenizer.decode(ids[:k + 1])) and late.text != tokenizer.decode(ids[:k])


def test_ignore_eos_runs_to_max_tokens(local) -> None:
    # vLLM's ignore_eos (benchmarks send it to measure a fixed length): the model's end tokens do not stop it, a
    # request's own stop_token_ids still do. The random model never writes an end token, so a copy of its
    # tokenizer takes one of its greedy tokens as its end, as a checkpoint's generation_config.json may name one.
    import copy

    from fastapi.testclient import TestClient

    from nanoqwen.serve.app import create_app

    model, tokenizer = local
    prompt = "Once upon"
    ids = generate(model, tokenizer, [prompt], SamplingParams(max_new_tokens=10, temperature=0))[0].token_ids
    k = next(k for k in range(2, 10) if ids[k] not in ids[:k])
    ending = copy.copy(tokenizer)
    ending.extra_stop_ids = [ids[k]]
    with TestClient(create_app(model, ending, "tiny")) as http:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=http, max_retries=0)

        def ask(**extra):
            return client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0,
                                             extra_body=extra).choices[0]

        ended, going = ask(), ask(ignore_eos=True)
        assert (ended.text, ended.finish_reason) == (tokenizer.decode(ids[:k]), "stop")
        assert (going.text, going.finish_reason) == (tokenizer.decode(ids), "length")
        assert ask(ignore_eos=True, stop_token_ids=[ids[k]]).text == tokenizer.decode(ids[:k])
        # min_tokens holds the ignored end token off too, as vLLM masks EOS until then: the reply parts from the
        # one that drew it at k, and is the greedy one with that token masked up to k + 1 tokens
        masked = generate(model, tokenizer, [prompt], SamplingParams(max_new_tokens=k + 1, temperature=0,
                                                                     stop_token_ids=[ids[k]], min_tokens=k + 1))[0]
        held = ask(ignore_eos=True, min_tokens=k + 1)
        assert masked.token_ids[:k] == ids[:k] and len(masked.token_ids) == k + 1
        assert held.text.startswith(masked.text) and held.text != going.text and held.finish_reason == "length"
        chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
        assert chat.usage.completion_tokens == 10 and chat.choices[0].finish_reason == "length"


def test_concurrent_greedy_equals_sequential(client: openai.OpenAI, url: str) -> None:
    def run(i: int) -> str:
        if i % 4 == 3:  # a mix of chat and completions, streamed and not, of different prompt lengths
            r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPTS[i]}],
                                               max_tokens=12 + i, temperature=0)
            return r.choices[0].message.content
        if i % 2:
            texts, _, _ = stream_text(client.completions.create(
                model="tiny", prompt=PROMPTS[i] * (1 + i % 3), max_tokens=12 + i, temperature=0, stream=True))
            return texts[0]
        return client.completions.create(model="tiny", prompt=PROMPTS[i] * (1 + i % 3), max_tokens=12 + i,
                                         temperature=0).choices[0].text

    one_by_one = [run(i) for i in range(16)]
    before = httpx.get(f"{url}/health").json()["tokens_generated"]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(run, range(16)))
    assert together == one_by_one
    assert httpx.get(f"{url}/health").json()["tokens_generated"] - before == sum(12 + i for i in range(16))


@pytest.mark.parametrize("fixed_shapes", [False, True])
def test_engine_batches_requests_that_join_and_leave(local, fixed_shapes: bool) -> None:
    """In-process: more requests than rows, arriving while others decode, with mixed sampling settings
    (penalties and logprobs for some rows only), give what each gives alone (greedy and seeded alike);
    no state leaks between rows. With fixed shapes, the batches decode through the step a GPU captures
    as a CUDA graph (run eagerly here), and still give what the usual step gives alone."""
    model, tokenizer = local
    requests = []
    for i, text in enumerate(PROMPTS[:10]):
        prompt = tokenizer.encode(text * (1 + i % 4))  # 9 to 50 tokens: rows of every alignment
        params = SamplingParams(max_new_tokens=6 + 3 * i, temperature=0 if i % 3 else 0.9, top_k=20 * (i % 2),
                                repetition_penalty=1.3 if i % 4 == 1 else 1.0, seed=i,
                                frequency_penalty=0.5 if i % 4 == 2 else 0.0,
                                presence_penalty=-0.5 if i % 5 == 3 else 0.0, stop_token_ids=tokenizer.stop_ids)
        requests.append((prompt, params))

    steps_run = [0]

    async def run(engine: Engine, prompt: list[int], params: SamplingParams, arrival: int) -> tuple[str, int, list]:
        while steps_run[0] < arrival:  # submitted once the batched engine has run `arrival` steps
            await asyncio.sleep(0)
        # Every other request asks for logprobs, of 1 to 3 alternatives: a row gets its own number, not its batch's.
        top_logprobs = 1 + params.seed % 3 if params.seed % 2 == 0 else None
        job, text, logprobs = engine.submit([prompt], params, 1, top_logprobs), "", []
        while True:
            event = await job.events.get()
            logprobs += [(e.token, [e.logprob] + [lp for _, lp in e.top]) for e in event.logprobs]
            if isinstance(event, Delta):
                text += event.text
            else:
                assert isinstance(event, Finished)
                return text, event.completion_tokens, logprobs

    async def main() -> tuple[list, list]:
        usual = Engine(model, tokenizer, max_batch_size=3, fixed_shapes=False)
        engine = Engine(model, tokenizer, max_batch_size=3, fixed_shapes=fixed_shapes)
        rebuild = engine._rebuild_cache

        def record(survivors: list, admitted: list) -> None:  # see that rows really join running batches
            batches.append((len(survivors), len(admitted)))
            rebuild(survivors, admitted)
            steppers.append(engine._decode_step is not None)

        engine._rebuild_cache = record  # type: ignore[method-assign]
        usual.start()
        try:
            alone = [await run(usual, p, params, 0) for p, params in requests]
        finally:
            usual.stop()
        # The batched engine's loop runs here, one step per turn of the event loop, so requests arrive at
        # set steps (every third) whatever the machine's speed: a timed arrival let a fast machine finish
        # each request before the next came, and no batch ever filled.
        together = asyncio.gather(*(run(engine, p, params, 3 * i) for i, (p, params) in enumerate(requests)))
        with torch.inference_mode():
            while not together.done():
                engine._collect(block=False)
                engine._step()
                steps_run[0] += 1
                await asyncio.sleep(0)
        assert engine.stats()["waiting"] == 0
        return alone, list(await together)

    batches: list[tuple[int, int]] = []
    steppers: list[bool] = []  # after each rebuild: does the batch decode through a DecodeStep?
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is fastest, and immune to a busy machine
    try:
        alone, together = asyncio.run(main())
    finally:
        torch.set_num_threads(threads)
    assert [(text, n) for text, n, _ in together] == [(text, n) for text, n, _ in alone]
    assert max(s + a for s, a in batches) == 3 and any(s and a for s, a in batches)
    assert steppers == [fixed_shapes and bool(s + a) for s, a in batches]
    assert [n for _, n, _ in alone] == [params.max_new_tokens for _, params in requests]
    for i, ((_, n, logprobs), (_, _, batched)) in enumerate(zip(alone, together)):
        assert len(logprobs) == (n if i % 2 == 0 else 0)  # one entry per sampled token, for rows that asked
        assert [t for t, _ in batched] == [t for t, _ in logprobs]
        assert [v for _, values in batched for v in values] == pytest.approx(
            [v for _, values in logprobs for v in values], abs=1e-4)


def test_long_prompt_prefills_in_chunks_between_decode_steps(local) -> None:
    """In-process: a long prompt arriving while another request decodes is read one chunk per engine
    step, with a decode step of the running request after each chunk (its stream never stalls for the
    whole prompt); the chunked prompt gives the tokens and logprobs of one forward over all of it."""
    model, tokenizer = local
    chunk, long_prompt = 16, tokenizer.encode(" ".join(PROMPTS))[:150]  # 10 chunks
    short_params = SamplingParams(max_new_tokens=60, temperature=0)  # no stop ids: always 60 tokens
    long_params = SamplingParams(max_new_tokens=5, temperature=0)
    steps: list[str] = []

    async def finish(job) -> tuple[list[int], list[float]]:
        tokens, logprobs = [], []
        while not isinstance(event := await job.events.get(), Finished):
            tokens += [e.token for e in event.logprobs]
            logprobs += [e.logprob for e in event.logprobs]
        return tokens + [e.token for e in event.logprobs], logprobs + [e.logprob for e in event.logprobs]

    async def main() -> tuple[list[int], list[float], int]:
        engine = Engine(model, tokenizer, prefill_chunk=chunk)
        prefill, decode = engine._prefill_chunk, engine._decode

        def record_prefill(seq):
            steps.append("long" if len(seq.prompt) == len(long_prompt) else "short")
            return prefill(seq)

        def record_decode() -> None:
            steps.append(f"decode{len(engine._active)}")
            decode()

        engine._prefill_chunk, engine._decode = record_prefill, record_decode  # type: ignore[method-assign]
        engine.start()
        try:
            short = engine.submit([tokenizer.encode(PROMPTS[0])], short_params, 1, top_logprobs=0)
            await short.events.get()  # it is decoding now
            long = engine.submit([long_prompt], long_params, 1, top_logprobs=0)
            (tokens, logprobs), (short_tokens, _) = await asyncio.gather(finish(long), finish(short))
            return tokens, logprobs, len(short_tokens) + 1
        finally:
            engine.stop()

    tokens, logprobs, short_count = asyncio.run(main())
    assert short_count == 60
    long_steps = [i for i, step in enumerate(steps) if step == "long"]
    assert len(long_steps) == 10
    assert all(steps[i + 1] == "decode1" for i in long_steps[:-1])  # the short stream moved after each chunk
    assert steps[long_steps[-1] + 1] == "decode2"  # then both decode together
    reference = [t for (t,) in generate_ids(model, [long_prompt], long_params)]
    assert tokens == reference
    with torch.inference_mode():  # first token's logprob from one forward over the whole prompt
        first = model(torch.tensor([long_prompt]))[0, -1].float().log_softmax(-1)[reference[0]]
    assert logprobs[0] == pytest.approx(float(first), abs=1e-4)


def test_the_choices_of_a_prompt_read_it_once(local) -> None:
    """In-process: n choices of one prompt share one prefill (it was read n times: a 3,000-token prompt with
    n=16 took 10x as long), and each choice samples what it samples alone with its seed."""
    model, tokenizer = local
    prompts = [tokenizer.encode(PROMPTS[0] * 3), tokenizer.encode(PROMPTS[1])]
    params = SamplingParams(max_new_tokens=6, temperature=1.0, seed=11)
    prefills: list[int] = []

    async def texts(engine: Engine, job) -> list[str]:
        out = [""] * job.choices
        done = 0
        while done < job.choices:
            event = await job.events.get()
            assert not isinstance(event, Failed)
            if isinstance(event, Delta):
                out[event.index] += event.text
            done += isinstance(event, Finished)
        return out

    async def main() -> tuple[list[str], list[str]]:
        engine = Engine(model, tokenizer, prefill_chunk=8)
        forward = engine.model.forward

        def counted(ids, *args, **kwargs):  # type: ignore[no-untyped-def]
            prefills.append(ids.shape[1]) if ids.shape[1] > 1 else None
            return forward(ids, *args, **kwargs)

        engine.model.forward = counted  # type: ignore[method-assign]
        engine.start()
        try:
            together = await texts(engine, engine.submit(prompts, params, 4, top_logprobs=None))
            alone = []
            for index in range(8):
                seeded = dataclasses.replace(params, seed=11 + index % 4)
                alone += await texts(engine, engine.submit([prompts[index // 4]], seeded, 1))
            return together, alone
        finally:
            del engine.model.forward
            engine.stop()

    together, alone = asyncio.run(main())
    assert together == alone
    chunks = -(-len(prompts[0]) // 8) + -(-len(prompts[1]) // 8)
    assert len(prefills) == chunks + 4 * chunks  # each prompt read once for its 4 choices, then 4 times alone


def test_health_counts_waiting_choices_not_requests(local) -> None:
    model, tokenizer = local
    prompts = [tokenizer.encode(PROMPTS[0]), tokenizer.encode(PROMPTS[1])]

    async def main() -> list[int]:
        engine = Engine(model, tokenizer)  # not started: what is submitted waits
        engine.submit(prompts, SamplingParams(max_new_tokens=2, temperature=0), 3)
        engine.submit(prompts[:1], SamplingParams(max_new_tokens=2, temperature=0), 1)
        submitted = engine.stats()["waiting"]
        engine._collect(block=False)  # from the inbox to the waiting list
        return [submitted, engine.stats()["waiting"]]

    assert asyncio.run(main()) == [7, 7]


@pytest.mark.parametrize("fixed_shapes", [False, True])
def test_batch_cache_grows_as_rows_need_it(local, fixed_shapes: bool) -> None:
    """In-process: the batch cache holds a few slots past the tokens in it, not every token the requests
    may still sample (a request without max_tokens may run to the whole context), and grows when it fills:
    the rows give the tokens they give alone all the same (also through the step a GPU captures)."""
    model, tokenizer = local
    prompts = [tokenizer.encode(PROMPTS[0]), tokenizer.encode(PROMPTS[1] * 3)]
    params = SamplingParams(max_new_tokens=90, temperature=0)  # no stop ids: 90 tokens each
    capacities: list[int] = []

    async def tokens(job) -> list[int]:
        out: list[int] = []
        while not isinstance(event := await job.events.get(), Finished):
            out += [e.token for e in event.logprobs]
        return out + [e.token for e in event.logprobs]

    async def main() -> list[list[int]]:
        engine = Engine(model, tokenizer, cache_growth=16, fixed_shapes=fixed_shapes)
        rebuild = engine._rebuild_cache

        def record(survivors: list, admitted: list) -> None:
            rebuild(survivors, admitted)
            capacities.append(engine._cache.max_len if engine._cache is not None else 0)

        engine._rebuild_cache = record  # type: ignore[method-assign]
        # both queued before the worker starts, so they join at once: submitted to a running engine, a busy
        # machine's worker took the first alone (capacities [26, 60])
        jobs = [engine.submit([p], params, 1, top_logprobs=0) for p in prompts]
        engine.start()
        try:
            return list(await asyncio.gather(*(tokens(job) for job in jobs)))
        finally:
            engine.stop()

    together = asyncio.run(main())
    assert together == [[t for (t,) in generate_ids(model, [p], params)] for p in prompts]
    span = max(len(p) for p in prompts)  # both join at once, then grow by the slots in use: 60, then 119
    assert capacities[:2] == [2 * span, span + 90 - 1] and all(c <= span + 90 for c in capacities)


def test_a_request_that_fails_fails_alone_and_a_failing_step_answers_all(local) -> None:
    """In-process: a request whose own work raises (its first token, or a later one) gets a Failed event, and
    only it: the requests decoding beside it finish as they do alone. A step that fails as a whole (the
    batch's forward pass) answers every request it held with Failed, none is left waiting forever, and the
    engine then serves the next request as usual."""
    model, tokenizer = local
    first_fails = tokenizer.encode("this request breaks at its first token")
    third_fails = tokenizer.encode("this request breaks at its third token")
    params = SamplingParams(max_new_tokens=30, temperature=0)
    long_params = SamplingParams(max_new_tokens=200, temperature=0)  # still running when the others are done
    prompts = [tokenizer.encode(text) for text in PROMPTS[:3]]

    async def outcome(job) -> tuple[type, str]:
        text = ""
        while isinstance(event := await asyncio.wait_for(job.events.get(), timeout=20), Delta):
            text += event.text
        return type(event), text

    async def main() -> tuple[list, list]:
        engine = Engine(model, tokenizer, max_batch_size=4)
        first_token, accept, decode = engine._first_token, engine._accept, engine._decode
        forward_fails = [False]

        def failing_first(seq, logits) -> bool:
            if seq.prompt == first_fails:
                raise RuntimeError("injected failure")
            return first_token(seq, logits)

        def failing_accept(seq, token, score) -> bool:
            if seq.prompt == third_fails and seq.generated == 2 and seq.index == 0:
                raise RuntimeError("injected failure")
            return accept(seq, token, score)

        def failing_decode() -> None:
            if forward_fails[0] and len(engine._active) == 2:
                raise RuntimeError("injected failure")
            decode()

        engine._first_token, engine._accept, engine._decode = failing_first, failing_accept, failing_decode
        engine.start()
        try:
            running = engine.submit([prompts[0]], long_params, 1)
            start = await running.events.get()  # decoding now, long enough for the others to join it
            jobs = [engine.submit([prompt], params, 1) for prompt in (first_fails, third_fails, prompts[1])]
            kind, rest = await outcome(running)
            alone = [(kind, start.text + rest), *[await outcome(job) for job in jobs]]
            # Two choices, the first failing: nothing of the second follows the job's Failed.
            pair = engine.submit([third_fails], params, 2)
            assert (await outcome(pair))[0] is Failed
            while engine.stats()["active"] or engine.stats()["waiting"]:  # its rows are dropped at once
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)  # events handed over before then have landed
            assert pair.events.empty()
            forward_fails[0] = True  # once two rows decode together
            held = [engine.submit([prompt], params, 1) for prompt in prompts[:2]]
            failed = [await outcome(job) for job in held]
            forward_fails[0] = False
            after = await outcome(engine.submit([prompts[2]], params, 1))
            return alone, [*failed, after]
        finally:
            engine.stop()

    alone, later = asyncio.run(main())
    assert [kind for kind, _ in alone] == [Finished, Failed, Failed, Finished]
    assert alone[0][1] == greedy_reference(local, PROMPTS[0], 200)  # as if the failing ones were never there
    assert alone[3][1] == greedy_reference(local, PROMPTS[1], 30)
    assert [kind for kind, _ in later] == [Failed, Failed, Finished]
    assert later[2][1] == greedy_reference(local, PROMPTS[2], 30)


def test_negative_seeds_are_seeds_as_in_openais_api(client: openai.OpenAI) -> None:
    # OpenAI's and vLLM's seed is any int64: a negative one (-1 is a common pick) was refused with a 400. It wraps
    # into the generators' range as a choice's seed past the last one does (nth_seed): -1 samples as 2**63 - 1.
    sampling = dict(model="tiny", prompt="The river", max_tokens=8, temperature=1.0, n=2)
    for negative, wrapped in ((-1, 2**63 - 1), (-2**63, 0)):
        texts = [[c.text for c in client.completions.create(seed=seed, **sampling).choices]
                 for seed in (negative, wrapped)]
        assert texts[0] == texts[1] and texts[0][0] != texts[0][1]
    chat = dict(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=8, temperature=1.0)
    assert client.chat.completions.create(seed=-7, **chat).choices[0].message.content == \
        client.chat.completions.create(seed=2**63 - 7, **chat).choices[0].message.content


def test_extreme_sampling_values_are_served(client: openai.OpenAI, local) -> None:
    # A temperature of 1e-40 is greedy in effect (it once overflowed to a nan distribution and failed the
    # whole batch); a tiny repetition penalty likewise.
    expected = greedy_reference(local, PROMPTS[3], 8)
    r = client.completions.create(model="tiny", prompt=PROMPTS[3], max_tokens=8, temperature=1e-40, stop=None)
    assert r.choices[0].text == expected
    r = client.completions.create(model="tiny", prompt=PROMPTS[3], max_tokens=8, temperature=1.0, top_p=0, seed=5)
    assert r.choices[0].text == expected  # top_p 0 (OpenAI's range is [0, 1]): the most likely token alone
    r = client.completions.create(model="tiny", prompt=PROMPTS[3], max_tokens=8, temperature=1.0, seed=1,
                                  extra_body={"repetition_penalty": 1e-300})
    assert r.usage.completion_tokens >= 1


def test_disconnect_stops_generation(long_checkpoint: Path, tmp_path: Path) -> None:
    # 8 x 4000 tokens: no machine finishes them before the client goes, so only a cancelled job stays far short.
    body = {"model": "tiny", "prompt": "Go on forever", "max_tokens": 4000, "temperature": 0, "stream": True}
    with run_server(long_checkpoint, tmp_path / "serve.log") as url:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            for _ in range(3):
                assert next(line for line in lines if line.startswith("data: "))
        wait_idle(url)
        streamed = httpx.get(f"{url}/health").json()["tokens_generated"]
        assert streamed < 4000 // 2
        # A non-streaming request whose client hangs up once generation has begun: 8 choices.
        request = json.dumps({**body, "stream": False, "n": 8}).encode()
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as conn:
            conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(request), request))
            wait_for(lambda: httpx.get(f"{url}/health").json()["tokens_generated"] != streamed,
                     "the request never started generating", timeout=60)
        wait_idle(url)
        assert httpx.get(f"{url}/health").json()["tokens_generated"] - streamed < 8 * 4000 // 2


BAD_REQUESTS = [
    # (path, body, status, param)
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", {"max_tokens": 5}, 400, "prompt"),
    ("/v1/chat/completions", {"model": "tiny"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ("/v1/completions", {"prompt": "hi", "temperature": 3}, 400, "temperature"),
    ("/v1/completions", b'{"prompt": "hi", "temperature": NaN}', 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "top_p": 1.01}, 400, "top_p"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": "hi", "n": 129}, 400, "n"),
    ("/v1/completions", {"prompt": ["a", "b", "c", "d", "e"], "n": 26}, 400, "n"),  # 130 completions, over 128
    ("/v1/completions", {"prompt": "hi", "top_k": -5}, 400, "top_k"),
    # vLLM's extras: min_p in [0, 1]; min_tokens a count no more than max_tokens; stop token ids in the vocabulary
    ("/v1/completions", {"prompt": "hi", "min_p": 1.5}, 400, "min_p"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "min_p": -0.1}, 400, "min_p"),
    ("/v1/completions", {"prompt": "hi", "min_tokens": -1}, 400, "min_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 5, "min_tokens": 6}, 400, "min_tokens"),
    ("/v1/completions", {"prompt": "hi", "stop_token_ids": [10**9]}, 400, "stop_token_ids"),
    ("/v1/completions", {"prompt": "hi", "stop_token_ids": 5}, 400, "stop_token_ids"),
    ("/v1/completions", {"prompt": "hi", "ignore_eos": "yes"}, 400, "ignore_eos"),
    ("/v1/completions", {"prompt": "hi", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ("/v1/completions", {"prompt": "hi", "presence_penalty": 2.5}, 400, "presence_penalty"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "frequency_penalty": -2.01}, 400,
     "frequency_penalty"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 6}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "echo": "yes"}, 400, "echo"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"50": -100}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "hi", "best_of": 3}, 400, "best_of"),
    ("/v1/completions", {"prompt": "hi", "suffix": "end"}, 400, "suffix"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "response_format": {"type": "json_object"}}, 400, "response_format"),
    # Audio replies (OpenAI's modalities and audio): this model writes text only
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "modalities": ["text", "audio"],
                              "audio": {"voice": "alloy", "format": "wav"}}, 400, "modalities"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "audio": {"voice": "alloy"}}, 400,
     "audio"),
    # vLLM's spellings of constrained decoding, response_format's kin: refused as it is, not ignored
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "guided_json": {"type": "object"}},
     400, "guided_json"),
    ("/v1/completions", {"prompt": "hi", "guided_choice": ["yes", "no"]}, 400, "guided_choice"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "structured_outputs": {"regex": "a+"}},
     400, "structured_outputs"),
    # and its other extras that would change the answer: beam search, banned or allowed tokens, prompt logprobs (0
    # too: the prompt's own tokens), a prompt cut to its last tokens, chat's echo
    ("/v1/completions", {"prompt": "hi", "use_beam_search": True}, 400, "use_beam_search"),
    ("/v1/completions", {"prompt": "hi", "bad_words": ["no"]}, 400, "bad_words"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "allowed_token_ids": [1, 2]}, 400,
     "allowed_token_ids"),
    ("/v1/completions", {"prompt": "hi", "prompt_logprobs": 0}, 400, "prompt_logprobs"),
    ("/v1/completions", {"prompt": "hi", "truncate_prompt_tokens": 5}, 400, "truncate_prompt_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "echo": True}, 400, "echo"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21},
     400, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400, "top_logprobs"),
    ("/v1/completions", {"prompt": "hi", "seed": -2**63 - 1}, 400, "seed"),  # past int64, OpenAI's and vLLM's range
    ("/v1/completions", {"prompt": "hi", "seed": 2**63}, 400, "seed"),
    ("/v1/completions", {"prompt": "hi", "stream": "yes please"}, 400, "stream"),
    ("/v1/completions", {"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("/v1/completions", {"prompt": "hi", "stop": ["a", ""]}, 400, "stop"),  # an empty one, as vLLM: not ignored
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stop": ""}, 400, "stop"),
    # Types as OpenAI's API takes them, not converted: "5" is no count, true no number, "yes" no boolean.
    ("/v1/completions", {"prompt": "hi", "max_tokens": "5"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": True}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "n": "2"}, 400, "n"),
    ("/v1/completions", {"prompt": "hi", "temperature": "0.5"}, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "logprobs": True}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "stream": True, "stream_options": {"include_usage": "yes"}}, 400,
     "stream_options.include_usage"),
    ("/v1/completions", {"prompt": "hi", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("/v1/completions", {"prompt": "hi", "best_of": 0}, 400, "best_of"),
    ("/v1/completions", {"prompt": "hi", "n": 3, "best_of": 1}, 400, "best_of"),  # below n: OpenAI refuses it too
    ("/v1/completions", {"prompt": ["hi"] * 129}, 400, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": None}]}, 400, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [  # images: refused by name, not as "no string"
        {"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": "x"}}]}]},
     400, "messages[0].content[1].type"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text"}]}]}, 400,
     "messages[0].content[0].text"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, 400,
     "messages[0].content[0].text"),  # the part's text named, not "content should be a string"
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [123]}]}, 400, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "functions": [{"name": "f", "parameters": {}}]}, 400, "functions"),
    # tool_choice and parallel_tool_calls only with tools, as OpenAI's ("none" and false too); a named function
    # would need constrained decoding
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tool_choice": "none"}, 400,
     "tool_choice"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "parallel_tool_calls": False}, 400,
     "parallel_tool_calls"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": [],
                              "tool_choice": {"type": "function", "function": {"name": "f"}}}, 400, "tool_choice"),
    ("/v1/completions", {"prompt": [1, 10**9]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [True, False]}, 400, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": "off"}, 400,
     "chat_template_kwargs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "chat_template_kwargs": {"add_generation_prompt": False}}, 400, "chat_template_kwargs"),
    # vLLM's continue_final_message (prefill the reply) is not implemented: refused, not ignored
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Su"}],
                              "continue_final_message": True}, 400, "continue_final_message"),
    ("/v1/completions", {"prompt": "hi\ud800"}, 400, "prompt"),  # a lone surrogate is not text
    ("/v1/completions", {"prompt": ["ok", "a\udfff"]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "stop": ["\ud800"]}, 400, "stop"),
    ("/v1/completions", {"prompt": "hi", "model": "\udc80"}, 400, "model"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi\ud800"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": "", "tool_calls": [{"id": "\ud800"}]}]},
     400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]},
     400, "tools"),  # a ChatML model has no place for them
    pytest.param("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi", "extra": '
                 + b"[" * 600 + b"]" * 600 + b"}]}", 400, None, id="nested-600-deep"),  # a 400, not a 500
    ("/v1/completions", {"prompt": "hi", "model": "gpt-4"}, 404, "model"),
    ("/v1/nothing-here", {"prompt": "hi"}, 404, None),
]


@pytest.mark.parametrize(("path", "body", "status", "param"), BAD_REQUESTS)
def test_bad_requests_get_openai_errors(url: str, path: str, body, status: int, param: str | None) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{url}{path}", content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param


def test_validation_errors_name_the_field_as_openai_does(client: openai.OpenAI) -> None:
    # OpenAI's API names a field in a list by its index in brackets, in the message and the param alike:
    # "Invalid value: ... 'messages[2].role'", param 'messages[2].role' (not pydantic's 'messages.2.role').
    hi = {"role": "user", "content": "hi"}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[hi, {"role": "wizard", "content": "hi"}])
    assert e.value.param == "messages[1].role"
    assert e.value.body["message"].startswith("invalid 'messages[1].role': Input should be 'system', ")
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[hi, {"role": "user", "content": [
            {"type": "text", "text": "a"}, {"type": "text", "text": 5}]}])
    assert e.value.param == "messages[1].content[1].text"
    assert e.value.body["message"] == "invalid 'messages[1].content[1].text': Input should be a valid string"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[hi, {"role": "user", "content": None}])
    assert e.value.param == "messages[1].content"


def test_min_tokens_past_max_tokens_says_what_to_send(url: str) -> None:
    # vLLM refuses a min_tokens past max_tokens too; past the 16 tokens a completion gets when max_tokens is left
    # out, the line names that default (the user never wrote it) and what to send.
    def refusal(path: str, **body) -> tuple[int, str, str]:
        r = httpx.post(f"{url}{path}", json=body)
        return r.status_code, r.json()["error"]["param"], r.json()["error"]["message"]

    assert refusal("/v1/completions", prompt="hi", min_tokens=20) == (400, "min_tokens", (
        "min_tokens (20) is more than the 16 tokens a completion gets without max_tokens (OpenAI's default); send "
        "max_tokens of at least 20 too"))
    assert refusal("/v1/completions", prompt="hi", max_tokens=5, min_tokens=6) == (400, "min_tokens", (
        "min_tokens (6) is more than max_tokens (5); send a max_tokens of at least 6, or a smaller min_tokens"))
    hi = [{"role": "user", "content": "hi"}]
    assert refusal("/v1/chat/completions", messages=hi, max_tokens=9, max_completion_tokens=5, min_tokens=6) == (
        400, "min_tokens", "min_tokens (6) is more than max_completion_tokens (5); send a max_completion_tokens of at "
        "least 6, or a smaller min_tokens")  # the field that counts, which a larger max_tokens would not change
    assert refusal("/v1/chat/completions", messages=hi, min_tokens=CONTEXT + 1) == (400, "min_tokens", (
        f"min_tokens ({CONTEXT + 1}) is more than the model's context of {CONTEXT} tokens; send a smaller min_tokens"))
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "min_tokens": 20, "max_tokens": 20,
                                                    "temperature": 0, "ignore_eos": True})
    assert r.json()["usage"]["completion_tokens"] == 20


def test_wrong_methods_say_which_are_allowed(url: str) -> None:
    r = httpx.get(f"{url}/v1/completions")
    assert r.status_code == 405 and r.headers["allow"] == "POST" and r.json()["error"]["code"] == "method_not_allowed"
    for path in ("/health", "/", "/v1/models", "/v1/models/tiny"):  # HEAD wherever GET is (load balancers probe)
        assert httpx.head(f"{url}{path}").status_code == 200, path
    # A value that is none of a field's forms says which it may take.
    r = httpx.post(f"{url}/v1/completions", json={"prompt": [True, False]})
    assert r.json()["error"]["message"] == \
        "invalid 'prompt': should be one of: str, list[str], list[int], list[list[int]]"
    # Bytes that are not UTF-8 say so (FastAPI's own line was "There was an error parsing the body").
    r = httpx.post(f"{url}/v1/completions", content=b'{"prompt": "caf\xe9"}',
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    assert "UTF-8" in r.json()["error"]["message"]


def test_limits_and_server_survives(client: openai.OpenAI, url: str, local) -> None:
    too_long = " word" * (CONTEXT + 10)
    n_tokens = len(local[1].encode(too_long))
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt=too_long, max_tokens=5)
    message = e.value.body["message"]
    assert str(n_tokens) in message and str(CONTEXT) in message
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": too_long}])
    r = httpx.post(f"{url}/v1/completions", content=b"x" * (2 << 20), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    # Sent in pieces with no Content-Length (chunked), the body is counted as it comes: one byte past the limit.
    r = httpx.post(f"{url}/v1/completions", content=iter([b"x" * (1 << 20), b"x"]),
                   headers={"Content-Type": "application/json"})
    assert "content-length" not in r.request.headers
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    # Still healthy, still answering.
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    r = client.completions.create(model="tiny", prompt="ok", max_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3
    # null is "not given" for every optional field, as in OpenAI's API (its client sends n=None so).
    nulls = {"n": None, "stream": None, "stop": None, "seed": None, "max_tokens": 3, "temperature": 0,
             "logit_bias": {}, "best_of": 1, "response_format": {"type": "text"}, "use_beam_search": False,
             "bad_words": [], "prompt_logprobs": None}
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "ok", "echo": None, **nulls})
    assert r.status_code == 200 and len(r.json()["choices"]) == 1, r.text
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], n=None,
                                          stream=None, max_tokens=2, modalities=["text"], audio=None,
                                          extra_body={"echo": False, "allowed_token_ids": None})
    assert chat.usage.completion_tokens == 2 and len(chat.choices) == 1
    # 64 completions in one request is the limit, not past it (5 prompts x 16 is a 400 in BAD_REQUESTS).
    r = client.completions.create(model="tiny", prompt=["a", "b", "c", "d"], n=16, max_tokens=1, temperature=0)
    assert [c.index for c in r.choices] == list(range(64)) and r.usage.completion_tokens == 64


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_ends_a_long_generation(long_checkpoint: Path, tmp_path: Path, stop_signal: int) -> None:
    # SIGTERM (or Ctrl-C) while 16 long streams and a plain request run: the server gives them --shutdown-grace,
    # then ends them and exits (run_server fails the test if it hangs). 16 x 4000 tokens are sequential
    # steps no CPU runs in half a second (240 did finish in the default 3 s on a fast machine). The stream ends with
    # an error event and its [DONE], the plain request with a 503: they were cut mid-body, which clients read as a
    # broken connection. Ctrl-C printed each cut stream's CancelledError as a 50-line traceback after the last line.
    body = {"prompt": "Go on forever", "max_tokens": 4000, "n": 16, "temperature": 0, "stream": True}
    lines: list[str] = []
    with ThreadPoolExecutor(1) as pool:  # (left once the plain request is answered, after the server stopped)
        with run_server(long_checkpoint, tmp_path / "serve.log", "--shutdown-grace", "0.5",
                        stop_signal=stop_signal) as base:
            stream = httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60)
            response = stream.__enter__()
            chunks = response.iter_lines()
            lines += [next(line for line in chunks if line.startswith("data: ")) for _ in range(3)]
            plain = pool.submit(httpx.post, f"{base}/v1/completions", json={**body, "n": 1, "stream": False},
                                timeout=60)
            wait_for(lambda: httpx.get(f"{base}/health").json()["active"] == 17, "the plain request never ran")
        try:
            lines += list(chunks)
        finally:
            stream.__exit__(None, None, None)
    texts = [line for line in lines if line.startswith("data: {\"id\"")]
    assert 3 <= len(texts) < 16 * 4000
    ended = {"message": "the server is shutting down and ended this request unfinished; send it again once the "
                        "server is back", "type": "server_error", "param": None, "code": None}
    assert [line for line in lines if line.startswith("data: ") and line not in texts] == [
        "data: " + json.dumps({"error": ended}, separators=(",", ":")), "data: [DONE]"]
    assert (plain.result().status_code, plain.result().json()) == (503, {"error": ended})
    log = (tmp_path / "serve.log").read_text()
    said = log.splitlines()[-1]
    assert said.startswith("nanoqwen serve: stopped after generating ") and said.endswith(" tokens")
    assert "Traceback" not in log


@pytest.mark.parametrize(("flag", "value"), [("--shutdown-grace", "-1"), ("--shutdown-grace", "nan"),
                                           ("--max-batch-size", "0"), ("--prefill-chunk", "0"),
                                           ("--port", "99999"), ("--port", "-1"), ("--max-request-bytes", "-1"),
                                           ("--api-key", ""), ("--api-key", " s3cret"),  # no open or unusable key
                                           ("--api-key", "pässwort")])  # the openai client cannot send it
def test_bad_serve_flag_is_one_line(tmp_path: Path, flag: str, value: str, capsys: pytest.CaptureFixture[str]) -> None:
    # In this process (a start is seconds of imports): the folder holds no model, so nothing could start serving.
    try:
        code = main(["serve", "--model", str(tmp_path), flag, value])
    except SystemExit as e:  # argparse's refusals exit
        code = e.code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code not in (0, None) and len(lines) == 1 and flag in lines[0], err


def listening_addresses(port: int) -> set[str]:
    """The local addresses (hex, as Linux's /proc/net/tcp and tcp6 write them) of the sockets listening on `port`."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            local, state = row.split()[1], row.split()[3]
            address, _, hex_port = local.partition(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(address)
    return found


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's socket tables")
def test_the_server_listens_on_this_machine_alone_unless_told_otherwise(url: str) -> None:
    # Issue 5: serve binds 127.0.0.1 unless --host says otherwise (the url fixture's server is given none).
    assert listening_addresses(httpx.URL(url).port) == {"0100007F"}  # 127.0.0.1, in the kernel's byte order


def test_the_server_on_its_loopback_answers_requests_addressed_to_this_machine_alone(url: str) -> None:
    # DNS rebinding (test_serve_abuse): a request for another name is refused, one for localhost answered.
    assert httpx.get(f"{url}/health", headers={"Host": "evil.example"}).status_code == 403
    assert httpx.get(f"{url}/health", headers={"Host": "localhost"}).status_code == 200


def test_the_printed_addresses_work_for_ipv6_hosts() -> None:
    # `--host ::1` printed http://::1:8000/v1, which no client or browser parses as a host and a port.
    assert base_url("::1", 8000) == "http://[::1]:8000"
    assert base_url("::", 8000) == "http://[::1]:8000"  # a wildcard host: this machine, as a browser here opens it
    assert base_url("0.0.0.0", 8000) == "http://127.0.0.1:8000"
    assert base_url("", 8000) == "http://127.0.0.1:8000"  # (uvicorn binds every interface for an empty one too)
    assert base_url("127.0.0.1", 8000) == "http://127.0.0.1:8000"
    assert httpx.URL(base_url("::1", 8000) + "/v1").port == 8000


def test_special_tokens_left_out_of_the_text_unless_asked(tmp_path: Path) -> None:
    # A model rigged to answer " word" with <|im_start|> and <|im_start|> with " word": the blocks add nothing
    # to the residual stream, so each next token depends only on the last one's embedding.
    model, tokenizer = load_checkpoint(make_checkpoint(tmp_path / "rigged"))
    special, word = tokenizer.token_id("<|im_start|>"), tokenizer.encode(" word")[0]
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        model.lm_head.weight[special] = model.model.embed_tokens.weight[word]
        model.lm_head.weight[word] = model.model.embed_tokens.weight[special]
    save_checkpoint(model, tmp_path / "rigged", tokenizer)
    body = {"prompt": "a word", "max_tokens": 6, "temperature": 0}
    with run_server(tmp_path / "rigged", tmp_path / "serve.log") as base:
        kept = httpx.post(f"{base}/v1/completions", json={**body, "skip_special_tokens": False}).json()
        plain = httpx.post(f"{base}/v1/completions", json=body).json()
        with httpx.stream("POST", f"{base}/v1/completions", json={**body, "stream": True}) as response:
            chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
        chat = httpx.post(f"{base}/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "say word"}], "max_tokens": 6, "temperature": 0}).json()
    assert kept["choices"][0]["text"] == "<|im_start|> word" * 3 and kept["usage"]["completion_tokens"] == 6
    assert plain["choices"][0]["text"] == " word" * 3 and plain["usage"]["completion_tokens"] == 6
    assert "".join(c["choices"][0]["text"] for c in chunks) == " word" * 3
    assert "<|im_start|>" not in chat["choices"][0]["message"]["content"]


def test_api_key_enforced(checkpoint: Path, tmp_path: Path) -> None:
    with run_server(checkpoint, tmp_path / "serve.log", env={"NANOQWEN_API_KEY": "s3cret"}) as base:
        assert httpx.get(f"{base}/health").status_code == 200  # health and the page stay open
        assert httpx.get(f"{base}/").status_code == 200
        # with a key, no Host is refused (a port forwarder may send its own name; a rebinding page has no key)
        assert httpx.get(f"{base}/health", headers={"Host": "forwarded.example"}).status_code == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0).models.list()
        r = httpx.post(f"{base}/v1/completions", json={"prompt": "hi"})  # no Authorization header at all
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        good = openai.OpenAI(base_url=f"{base}/v1", api_key="s3cret", max_retries=0)
        assert good.completions.create(model="tiny", prompt="hi", max_tokens=2).usage.completion_tokens == 2
        assert httpx.post(f"{base}/tokenize", json={"prompt": "hi"}).status_code == 401
        lowercase = {"Authorization": "bearer s3cret"}  # the scheme is case-insensitive (RFC 7235)
        assert httpx.post(f"{base}/tokenize", json={"prompt": "hi"}, headers=lowercase).status_code == 200
        spaced = {"Authorization": "Bearer  s3cret"}  # one or more spaces after the scheme
        assert httpx.post(f"{base}/tokenize", json={"prompt": "hi"}, headers=spaced).status_code == 200
        assert httpx.post(f"{base}/tokenize", json={"prompt": "hi"}, headers={"Authorization": "s3cret"}
                          ).status_code == 401
        for wrong in ("Bearer s3cret2", "Bearer s3cret s3cret", "Bearer"):  # the key whole, not a key it starts with
            assert httpx.post(f"{base}/tokenize", json={"prompt": "hi"}, headers={"Authorization": wrong}
                              ).status_code == 401, wrong


def test_a_run_trained_on_plain_text_says_so_and_still_chats(local, plain_run_url: str) -> None:
    # The web page opens such a model in Completion (it never learned to end a turn); the API serves it as any.
    # (make_plain_run's best/ holds the weights of `checkpoint`, as a run's best/ beside its plain-text data.)
    client = openai.OpenAI(base_url=f"{plain_run_url}/v1", api_key="none", max_retries=0, timeout=120)
    card = client.models.list().data[0].model_dump()
    assert card["id"] == "tiny/best" and card["trained_on_plain_text"] is True
    messages = [{"role": "user", "content": "Hi there"}]
    reply = client.chat.completions.create(model="tiny/best", messages=messages, max_tokens=8, temperature=0)
    assert reply.choices[0].message.content == greedy_reference(local, local[1].render_chat(messages), 8)


@pytest.fixture(scope="module")
def thinker_server(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    """`checkpoint` as official Qwen3 folders come: their own template, which can start the reply after an empty
    thinking block, and sampling defaults a request could not ask for (all tokens as vLLM writes it, a temperature
    above 2) and one Transformers applies and nanoqwen does not. Served once for the tests that only ask it (a
    server start is seconds): yields the folder, the base URL and the server's log."""
    root = tmp_path_factory.mktemp("thinker")
    thinker = with_chat_template(checkpoint, root / "thinker")
    (thinker / "generation_config.json").write_text(json.dumps({"top_k": -1, "temperature": 2.5, "typical_p": 0.9}))
    with run_server(thinker, root / "serve.log") as base:
        yield thinker, base, root / "serve.log"


def test_a_folders_chat_template_and_its_thinking_switch(thinker_server: tuple[Path, str, Path], local) -> None:
    # As official Qwen3 folders come: their own template, which can start the reply after an empty thinking
    # block; the request's chat_template_kwargs reach it (vLLM's name for them, through the openai client).
    thinker, base, log_path = thinker_server
    tokenizer = load_tokenizer(thinker)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=120)
    card = client.models.list().data[0].model_dump()
    # Sampling defaults a request could not ask for: all tokens as vLLM writes it, a temperature above 2.
    # And one Transformers applies and nanoqwen does not: named in one warning line at start.
    assert card["thinking_switch"] is True
    assert card["sampling_defaults"] == {"temperature": 2.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0,
                                         "repetition_penalty": 1.0}
    log = log_path.read_text()
    assert "temperature 2.5 is above what a request may ask for" in log
    assert log.splitlines().count(f"nanoqwen serve: warning: {thinker / 'generation_config.json'} sets typical_p, "
                                  "which Transformers' generate() applies and nanoqwen does not: its text can "
                                  "differ from Transformers'") == 1
    for template_kwargs in ({}, {"enable_thinking": False}):
        r = client.chat.completions.create(model="thinker", messages=messages, max_tokens=12, temperature=0,
                                           extra_body={"chat_template_kwargs": template_kwargs})
        rendered = tokenizer.render_chat(messages, **template_kwargs)
        assert rendered.endswith("<think>\n\n</think>\n\n") == bool(template_kwargs)
        assert r.choices[0].message.content == greedy_reference(local, rendered, 12)
        assert r.usage.prompt_tokens == len(tokenizer.encode(rendered))
    # Tools, and an earlier reply's tool calls, reach the template (not ChatML's: a 400 in BAD_REQUESTS).
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    calls = [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    r = client.chat.completions.create(model="thinker", messages=calls, tools=tools, max_tokens=1)
    rendered = tokenizer.render_chat(calls, tools=tools)
    assert "get_weather</tool_call>" not in tokenizer.render_chat(calls[:1])
    assert "# Tools\nget_weather" in rendered and "<tool_call>get_weather {}</tool_call>" in rendered
    assert r.usage.prompt_tokens == len(tokenizer.encode(rendered))
    # What the template itself refuses is a 400 with its words, and the server serves on.
    with pytest.raises(openai.BadRequestError, match="the system message must come first") as e:
        client.chat.completions.create(model="thinker", messages=messages[::-1], max_tokens=2)
    assert e.value.body["param"] == "messages"
    assert client.chat.completions.create(model="thinker", messages=messages, max_tokens=2).usage.completion_tokens


TOOL_REPLY = ('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "°C"}}\n'
              '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": "{}"}\n</tool_call>\n'
              '<tool_call>not json</tool_call> done <tool_call>{"name": "cut off"')


def test_tool_calls_are_parsed_out_of_a_reply_alike_streamed_or_not() -> None:
    # Qwen3 writes calls as Hermes-style <tool_call> JSON blocks; a block that is not a call stays text, as
    # does one cut off by max_tokens. Streamed in any pieces, the text sent adds up to the whole reply's.
    from nanoqwen.serve.protocol import ToolCallStream, reason_with_calls, split_tool_calls

    # A reply that ended on its own with calls in it finished to call them; one cut short was cut short.
    assert (reason_with_calls("stop"), reason_with_calls("length")) == ("tool_calls", "length")
    content, calls = split_tool_calls(TOOL_REPLY)
    assert content == 'Let me look.\n\n\n<tool_call>not json</tool_call> done <tool_call>{"name": "cut off"'
    assert [c["function"] for c in calls] == [{"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "°C"}'},
                                              {"name": "get_time", "arguments": "{}"}]
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    assert len({c["id"] for c in calls}) == 2
    for size in (1, 2, 3, 5, 11, len(TOOL_REPLY)):
        stream = ToolCallStream()
        sent = "".join(stream.push(TOOL_REPLY[i:i + size]) for i in range(0, len(TOOL_REPLY), size))
        assert "<tool" not in sent and "<" not in sent.removesuffix("<")  # nothing of a call went out early
        rest, streamed_calls = stream.finish()
        assert sent + rest == content
        assert [c["function"] for c in streamed_calls] == [c["function"] for c in calls]
    # "<tool_call>" mentioned before the call (in thinking, say) stays text and does not swallow the call.
    mention = '<think>I might use <tool_call></think>\n<tool_call>{"name": "f", "arguments": {}}</tool_call>'
    content, calls = split_tool_calls(mention)
    assert content == "<think>I might use <tool_call></think>\n" and [c["function"]["name"] for c in calls] == ["f"]
    broken = '<tool_call>{"name": "a", "arguments": {"x": 1\n</tool_call>\n<tool_call>{"name": "b"}</tool_call>'
    assert [c["function"]["name"] for c in split_tool_calls(broken)[1]] == ["b"]  # a broken block stays alone
    stream = ToolCallStream()
    sent = "".join(stream.push(mention[i:i + 4]) for i in range(0, len(mention), 4))
    assert sent + stream.finish()[0] == content
    # Parallel calls, as Qwen3 writes them, with blanks around: no content, streamed (no delta) or not (None).
    parallel = '\n<tool_call>\n{"name": "a"}\n</tool_call>\n<tool_call>\n{"name": "b"}\n</tool_call>\n'
    assert split_tool_calls(parallel)[0].strip() == ""
    for size in (1, 3, len(parallel)):
        stream = ToolCallStream()
        sent = "".join(stream.push(parallel[i:i + size]) for i in range(0, len(parallel), size))
        rest, streamed_calls = stream.finish()
        assert sent + rest == "" and [c["function"]["name"] for c in streamed_calls] == ["a", "b"]
    opening = ToolCallStream()  # blanks that open a reply of text go out with the text
    assert opening.push("\n ") == "" and opening.push("Hi") == "\n Hi" and opening.finish() == ("", [])
    plain = ToolCallStream()  # a reply without calls goes out whole, a "<" held only while it may start one
    assert plain.push("a < b <") == "a < b " and plain.push("c") == "<c" and plain.finish() == ("", [])


def test_a_strict_tool_is_refused_since_nothing_holds_its_calls_to_the_schema() -> None:
    # OpenAI's strict: true promises calls whose arguments fit the tool's schema, which takes constrained decoding:
    # accepted and not kept, a client that relies on it (the Agents SDK sends it by default) failed later, elsewhere.
    from nanoqwen.serve.protocol import APIError, ChatRequest

    def tool(**strict: bool) -> dict:
        return {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}, **strict}}

    messages = [{"role": "user", "content": "hi"}]
    for tools in ([tool()], [tool(strict=False)]):
        ChatRequest(messages=messages, tools=tools).check_unsupported()
    with pytest.raises(APIError) as refused:
        ChatRequest(messages=messages, tools=[tool(), tool(strict=True)]).check_unsupported()
    assert (refused.value.status, refused.value.param) == (400, "tools[1].function.strict")
    assert refused.value.message.startswith("'tools[1].function.strict' is true, which this server cannot keep") and \
        "leave 'strict' out (or false)" in refused.value.message


def test_parallel_tool_calls_false_answers_the_first_call_alone() -> None:
    # OpenAI's parallel_tool_calls: false promises one call at most: the later ones are dropped, as vLLM drops
    # them, streamed or not (it was ignored: every call came back).
    from nanoqwen.serve.app import chat_message, stream
    from nanoqwen.serve.engine import Job
    from nanoqwen.serve.protocol import APIError, ChatRequest

    body = {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}
    assert ChatRequest(**body, parallel_tool_calls=False).most_tool_calls() == 1
    assert ChatRequest(**body, parallel_tool_calls=None).most_tool_calls() is None
    # Without tools it is refused, as OpenAI refuses it (true too), in its words: clients send it with tools alone.
    for given in (True, False):
        with pytest.raises(APIError) as refused:
            ChatRequest(messages=body["messages"], parallel_tool_calls=given).check_unsupported()
        assert (refused.value.status, refused.value.message, refused.value.param) == (
            400, "Invalid value for 'parallel_tool_calls': 'parallel_tool_calls' is only allowed when 'tools' are "
                 "specified.", "parallel_tool_calls")
    message, reason = chat_message(TOOL_REPLY, "stop", tools=True, most_calls=1)
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_weather"] and reason == "tool_calls"

    async def streamed() -> list[dict]:
        job = Job(asyncio.get_running_loop(), 1)
        for event in (Delta(0, TOOL_REPLY[:30]), Delta(0, TOOL_REPLY[30:]), Finished(0, "stop", 9)):
            job.events.put_nowait(event)
        chunks = [c async for c in stream(job, {"id": "chatcmpl-x", "created": 0, "model": "m"}, True, [5], None,
                                          None, tools=True, most_calls=1)]
        return [json.loads(c.removeprefix("data: ")) for c in chunks[:-1]]

    calls = [call for chunk in asyncio.run(streamed()) for call in chunk["choices"][0]["delta"].get("tool_calls", [])]
    assert [(c["index"], c["function"]["name"]) for c in calls] == [(0, "get_weather")]


def test_a_stream_opens_chat_choices_with_their_role_counts_usage_by_prompt_and_ends_with_done() -> None:
    # OpenAI's chunks, beyond what its Python client checks: each chat choice opens with a role-only delta (clients
    # that build the message from the deltas read its role there), a stream ends with `data: [DONE]` (clients that
    # wait for it hang without it), and continuous usage counts the prompt of the chunk's own choice.
    from nanoqwen.serve.app import stream
    from nanoqwen.serve.engine import Job
    from nanoqwen.serve.protocol import StreamOptions

    async def chunks(chat: bool, prompt_lengths: list[int], options: StreamOptions) -> list[str]:
        job = Job(asyncio.get_running_loop(), 2 * len(prompt_lengths))  # n=2 of each prompt
        for i in range(job.choices):
            job.events.put_nowait(Delta(i, f"t{i}", tokens=1))
        for i in range(job.choices):
            job.events.put_nowait(Finished(i, "length" if i % 2 else "stop", 1 + i))
        return [c async for c in stream(job, {"id": "x", "created": 0, "model": "m"}, chat, prompt_lengths,
                                        options, None)]

    totals = StreamOptions(include_usage=True)
    for chat in (True, False):
        sent = asyncio.run(chunks(chat, [5], totals))
        assert sent[-1] == "data: [DONE]\n\n"
        bodies = [json.loads(c.removeprefix("data: ")) for c in sent[:-1]]
        assert {b["object"] for b in bodies} == {"chat.completion.chunk" if chat else "text_completion"}
        said = [(c["index"], c["delta"] if chat else c["text"], c["finish_reason"])
                for b in bodies for c in b["choices"]]
        opened = [(0, {"role": "assistant", "content": ""}, None), (1, {"role": "assistant", "content": ""}, None)]
        texts = [(0, {"content": "t0"}, None), (1, {"content": "t1"}, None), (0, {}, "stop"), (1, {}, "length")]
        assert said == (opened + texts if chat else
                        [(0, "t0", None), (1, "t1", None), (0, "", "stop"), (1, "", "length")])
        assert bodies[-1]["choices"] == [] and bodies[-1]["usage"] == {
            "prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    # Two prompts of 5 and 7 tokens, n=2: choices 0 and 1 continue the first, 2 and 3 the second.
    sent = asyncio.run(chunks(False, [5, 7], StreamOptions(include_usage=True, continuous_usage_stats=True)))
    bodies = [json.loads(c.removeprefix("data: ")) for c in sent[:-1]]
    counted = [(b["choices"][0]["index"], b["usage"]["prompt_tokens"]) for b in bodies[:4]]
    assert counted == [(0, 5), (1, 5), (2, 7), (3, 7)]
    assert bodies[-1]["usage"] == {"prompt_tokens": 12, "completion_tokens": 10, "total_tokens": 22}


def test_a_request_with_tools_still_answers_in_text(thinker_server: tuple[Path, str, Path], local) -> None:
    # The tiny model writes no <tool_call>: its reply to a request with tools is the plain text, streamed alike.
    # (The folder's sampling defaults do not reach these requests: each asks for greedy or is refused.)
    thinker, base, _ = thinker_server
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    messages = [{"role": "user", "content": "Weather in Oslo?"}]
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=120)
    whole = client.chat.completions.create(model="thinker", messages=messages, tools=tools, max_tokens=12,
                                           temperature=0)
    pieces = client.chat.completions.create(model="thinker", messages=messages, tools=tools, max_tokens=12,
                                            temperature=0, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in pieces if c.choices)
    rendered = load_tokenizer(thinker).render_chat(messages, tools=tools)
    assert whole.choices[0].message.content == streamed == greedy_reference(local, rendered, 12)
    assert whole.choices[0].message.tool_calls is None and whole.choices[0].finish_reason == "length"
    # Forcing a call needs constrained decoding: refused by name; and tool_choice without tools, as OpenAI does
    refusals = {"required": (tools, "'tool_choice' \"required\" is not supported: this server cannot force a "
                             "tool call (that needs constrained decoding); give \"auto\" (the model decides) or "
                             "\"none\""),
                "auto": (openai.NOT_GIVEN, "Invalid value for 'tool_choice': 'tool_choice' is only allowed when "
                         "'tools' are specified."),
                "AUTO": (tools, "Invalid value for 'tool_choice': \"AUTO\"; give \"auto\" (the model decides) or "
                         "\"none\"")}
    for choice, (given, message) in refusals.items():
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="thinker", messages=messages, tools=given, max_tokens=2,
                                           tool_choice=choice)
        assert (e.value.body["message"], e.value.body["param"]) == (message, "tool_choice")
    # OpenAI's allowed_tools (a subset the model may call) was refused as "naming a function": it names what to send
    allowed = {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": [{"type": "function",
                                                                                     "function": {"name": "f"}}]}}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="thinker", messages=messages, tools=tools, max_tokens=2,
                                       tool_choice=allowed)
    assert e.value.body["message"] == ("'tool_choice' of type \"allowed_tools\" is not supported; send the allowed "
                                       "tools alone as 'tools', with \"auto\" (the model decides among them)")


TOOL_USE = {"name": "tool_use", "template": "<|im_start|>{{ tools | length }} tools<|im_end|>"}


def tokenized_chat(templates: list[dict[str, str]], **request: object) -> httpx.Response:
    """/tokenize's answer for a chat of one message, from a tiny model whose tokenizer has these named templates."""
    from fastapi.testclient import TestClient

    from nanoqwen.model import Qwen3
    from nanoqwen.serve.app import create_app
    from nanoqwen.tokenizer import Tokenizer
    from tests.test_model import tiny_config

    bpe = tiny_bpe()
    model = Qwen3(tiny_config(vocab_size=bpe.vocab_size))
    with TestClient(create_app(model, Tokenizer(bpe.hf, {"chat_template": templates}), "tiny")) as http:
        return http.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}], **request})


@functools.cache
def tiny_bpe() -> Tokenizer:
    from nanoqwen.tokenizer import train_bpe

    return train_bpe(["the cat sat on the mat"] * 20, 300)


def test_tools_reach_a_tool_use_template_beside_a_chatml_default_one() -> None:
    # Given tools, a folder's tool_use template renders, as Transformers picks it; the server refused them whenever the
    # default template was ChatML. A folder whose templates are all named, none "default", chats only with tools
    # (Transformers refuses the rest): a 400 that says so, not ChatML, and not a 500.
    from nanoqwen.tokenizer import CHAT_TEMPLATE

    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    for templates in ([{"name": "default", "template": CHAT_TEMPLATE}, TOOL_USE], [TOOL_USE]):
        answer = tokenized_chat(templates, tools=tools)
        assert answer.status_code == 200, answer.text
        assert answer.json()["tokens"] == tiny_bpe().encode("<|im_start|>1 tools<|im_end|>")
        answer = tokenized_chat(templates)
        if len(templates) == 2:
            assert answer.json()["tokens"] == tiny_bpe().encode(tiny_bpe().render_chat([{"role": "user",
                                                                                        "content": "hi"}]))
        else:
            assert answer.status_code == 400 and answer.json()["error"]["message"].startswith(
                "the chat templates of this model are all named (tool_use)")


def test_a_tool_without_a_type_is_a_function_tool_as_vllm_reads_it() -> None:
    answer = tokenized_chat([TOOL_USE], tools=[{"function": {"name": "f", "parameters": {"type": "object"}}}])
    assert answer.status_code == 200, answer.text
    assert answer.json()["tokens"] == tiny_bpe().encode("<|im_start|>1 tools<|im_end|>")


def test_an_empty_list_of_tools_picks_the_tool_use_template_as_transformers_and_vllm_do() -> None:
    # Transformers' get_chat_template picks tool_use for any tools that are not None, and vLLM passes a request's []
    # on; the template sees the empty list. The server left [] out: the default template rendered.
    answer = tokenized_chat([{"name": "default", "template": "DEFAULT"}, TOOL_USE], tools=[])
    assert answer.json()["tokens"] == tiny_bpe().encode("<|im_start|>0 tools<|im_end|>")


def test_tools_are_function_tools_or_refused_by_name(thinker_server: tuple[Path, str, Path]) -> None:
    # A tool that is no function tool (OpenAI's newer "custom" tools, or one without its function's name) was handed
    # to the template: this one failed in a line that blamed 'messages', and an official Qwen3 template (which lists
    # each tool as JSON) took a custom tool, whose call came back as a function call. Refused by name, as vLLM does.
    _, base, _ = thinker_server
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=120)
    messages = [{"role": "user", "content": "Weather in Oslo?"}]
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    refusals = {"tools[1].type": [weather, {"type": "custom", "custom": {"name": "shell"}}],
                "tools[0].function.name": [{"type": "function", "function": {"parameters": {}}}],
                "tools[0].function": [{"type": "function"}]}
    for param, tools in refusals.items():
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="thinker", messages=messages, tools=tools, max_tokens=1)
        assert e.value.body["param"] == param, e.value.body
        r = httpx.post(f"{base}/tokenize", json={"messages": messages, "tools": tools})
        assert r.status_code == 400 and r.json()["error"]["param"] == param
    a_tool = '{"type": "function", "function": {"name": ..., "parameters": {...}}}'
    assert e.value.body["message"] == f"'tools[0].function' is missing; a tool is {a_tool}"
    custom = httpx.post(f"{base}/tokenize", json={"messages": messages, "tools": refusals["tools[1].type"]}).json()
    assert custom["error"]["message"] == f"'tools[1].type' is \"custom\"; this server calls function tools only: " \
        f"give {a_tool}"
    assert client.chat.completions.create(model="thinker", messages=messages, tools=[weather], max_tokens=1).choices


def test_prompts_are_tokenized_off_the_event_loop(checkpoint: Path, monkeypatch) -> None:
    # A 360 KB prompt took 0.5 s to tokenize on the event loop, and every stream and /health waited for it.
    # Here tokenizing waits until /health has answered: on the event loop, it never could have.
    from fastapi.testclient import TestClient

    from nanoqwen.serve.app import create_app

    model, tokenizer = load_checkpoint(checkpoint)
    entered, health_answered, waits = threading.Event(), threading.Event(), []

    def held(encode):  # type: ignore[no-untyped-def]
        def held_encode(text):  # type: ignore[no-untyped-def]
            entered.set()
            waits.append(health_answered.wait(timeout=10))
            return encode(text)
        return held_encode

    for name in ("encode", "encode_batch", "encode_batch_with_starts"):
        monkeypatch.setattr(tokenizer, name, held(getattr(tokenizer, name)))
    app = create_app(model, tokenizer, "tiny")
    requests = [("/v1/completions", {"prompt": "Once", "max_tokens": 2, "temperature": 0}),
                ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
                ("/tokenize", {"prompt": "Once"})]
    with TestClient(app) as client, ThreadPoolExecutor(1) as pool:
        for path, body in requests:
            entered.clear()
            health_answered.clear()
            answer = pool.submit(client.post, path, json=body)
            assert entered.wait(timeout=30)
            assert client.get("/health").status_code == 200
            health_answered.set()
            assert answer.result(timeout=60).status_code == 200, path
    assert waits == [True] * 3


def test_cross_origin_pages_are_let_in_only_when_named(checkpoint: Path) -> None:
    # Browser-based OpenAI clients on another origin send a preflight OPTIONS without the key; without
    # --allow-origin the browser gets no CORS headers and keeps its page out, as before.
    from fastapi.testclient import TestClient

    from nanoqwen.serve.app import create_app

    model, tokenizer = load_checkpoint(checkpoint)
    page = "http://localhost:3000"
    # The headers OpenAI's JavaScript client sends from a browser (dangerouslyAllowBrowser): the preflight
    # names them all, and one left out of the allowed list blocks every request.
    preflight = {"Origin": page, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type,x-stainless-lang,x-stainless-os,"
                                                   "x-stainless-retry-count,x-stainless-runtime,x-stainless-timeout"}
    body = {"prompt": "Once", "max_tokens": 2, "temperature": 0}
    with TestClient(create_app(model, tokenizer, "tiny", api_key="k", allow_origins=[page])) as client:
        answer = client.options("/v1/completions", headers=preflight)
        assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == page
        allowed = answer.headers["access-control-allow-headers"].lower()
        assert "authorization" in allowed and "x-stainless-retry-count" in allowed
        answer = client.post("/v1/completions", json=body, headers={"Origin": page, "Authorization": "Bearer k"})
        assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == page
        refused = client.post("/v1/completions", json=body, headers={"Origin": page})  # the page sees why
        assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == page
        other = client.options("/v1/completions", headers={**preflight, "Origin": "http://elsewhere.example"})
        assert "access-control-allow-origin" not in other.headers
    with TestClient(create_app(model, tokenizer, "tiny")) as client:
        assert "access-control-allow-origin" not in client.options("/v1/completions", headers=preflight).headers
        answer = client.post("/v1/completions", json=body, headers={"Origin": page})  # refused (test_serve_abuse)
        assert answer.status_code == 403 and "access-control-allow-origin" not in answer.headers


# What a scripted model (`make_scripted_checkpoint`) answers "Go" with, one token a piece (bytes: one byte token each):
# characters split over byte tokens, stop strings across and inside tokens.
SCRIPT = [" cat", " sat", " on", " mat", b"\xe6", b"\x97", b"\xa5", " and", b"\xf0", b"\x9f", b"\xa4", b"\x96", " end"]
SCRIPT_TEXT = " cat sat on mat日 and🤖 end"  # and " end" on and on


@pytest.fixture(scope="module")
def scripted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    """A client of the app over the scripted model: "Go" gets SCRIPT, a chat turn "Hi there" and <|im_end|>."""
    from fastapi.testclient import TestClient

    from nanoqwen.serve.app import create_app

    tokenizer = qwen3_tokenizer()

    def token(piece: str | bytes) -> int:
        if isinstance(piece, bytes):
            return tokenizer.token_id(bytes_to_unicode()[piece[0]])
        [single] = tokenizer.encode(piece)
        return single

    chains = [[token("Go"), *map(token, SCRIPT)], [token("\n"), token("Hi"), token(" there"), tokenizer.stop_ids[0]]]
    model, tokenizer = load_checkpoint(make_scripted_checkpoint(tmp_path_factory.mktemp("scripted") / "tiny", chains))
    with TestClient(create_app(model, tokenizer, "tiny")) as http:
        yield openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=http, max_retries=0)


def completion_both_ways(client: openai.OpenAI, **request) -> tuple[object, list]:
    """The scripted completion of "Go", whole and as its streamed chunks (usage included)."""
    plain = client.completions.create(model="tiny", prompt="Go", **request)
    chunks = list(client.completions.create(model="tiny", prompt="Go", stream=True,
                                            stream_options={"include_usage": True}, **request))
    return plain, chunks


def test_stop_strings_across_and_inside_tokens_end_the_text_alike_streamed_or_not(scripted: openai.OpenAI) -> None:
    # As vLLM: the text ends before the stop string completed first, finish_reason "stop"; no streamed chunk ever
    # holds a piece of it (chunks cannot be taken back: held back until it is known not to be the stop); usage and
    # logprobs count every token sampled up to the one that completed it.
    assert completion_both_ways(scripted, max_tokens=13)[0].choices[0].text == SCRIPT_TEXT
    for stop, kept, tokens in [
            ("t o", " cat sa", 3),  # begins in " sat", ends in " on"
            ("ma", " cat sat on ", 4),  # ends inside " mat"
            ("at on mat", " cat s", 4),  # longer than any token
            (["mat", "sat"], " cat ", 2),  # of several, the one completed first, whatever their order
            ("日 a", " cat sat on mat", 8),  # begins with a character of 3 byte tokens, ends inside " and"
            ("🤖", " cat sat on mat日 and", 12)]:  # a character of 4 byte tokens
        plain, chunks = completion_both_ways(scripted, stop=stop, max_tokens=20, n=2, logprobs=0)
        for choice in plain.choices:
            assert (choice.text, choice.finish_reason) == (kept, "stop"), stop
            assert len(choice.logprobs.tokens) == tokens and max(choice.logprobs.text_offset) <= len(kept), stop
        assert plain.usage.completion_tokens == 2 * tokens  # summed over the choices
        texts, reasons, usage = stream_text(chunks)
        assert (texts, reasons) == ({0: kept, 1: kept}, {0: "stop", 1: "stop"}), stop
        assert usage.model_dump() == plain.usage.model_dump()
        for k in (0, 1):
            assert [t for c in chunks for choice in c.choices if choice.index == k and choice.logprobs
                    for t in choice.logprobs.tokens] == plain.choices[k].logprobs.tokens
        assert not any("\ufffd" in choice.text for c in chunks for choice in c.choices)


def test_characters_split_over_byte_tokens_are_streamed_whole(scripted: openai.OpenAI) -> None:
    plain, chunks = completion_both_ways(scripted, max_tokens=13, logprobs=0)
    choice = plain.choices[0]
    assert (choice.text, choice.finish_reason) == (SCRIPT_TEXT, "length")
    pieces = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(pieces) == SCRIPT_TEXT and not any("\ufffd" in p for p in pieces)
    # Each byte token as OpenAI names one (its bytes), starting where its character does.
    assert choice.logprobs.tokens[4:7] == ["bytes:\\xe6", "bytes:\\x97", "bytes:\\xa5"]
    assert choice.logprobs.text_offset[3:8] == [11, 15, 15, 15, 16]
    # Cut inside "🤖" by max_tokens: its bytes so far end the text as U+FFFD (as decoding the ids reads them), sent
    # in the last text chunk alone, streamed or not alike.
    plain, chunks = completion_both_ways(scripted, max_tokens=10)
    assert (plain.choices[0].text, plain.choices[0].finish_reason) == (" cat sat on mat日 and\ufffd", "length")
    pieces = [c.choices[0].text for c in chunks if c.choices and c.choices[0].text]
    assert "".join(pieces) == plain.choices[0].text and [p for p in pieces if "\ufffd" in p] == [pieces[-1]]


def test_a_chat_reply_ends_at_its_end_token_or_at_max_tokens_streamed_as_openai_does(scripted: openai.OpenAI) -> None:
    # The end token stops it ("stop", counted in usage, not shown); max_tokens cuts it ("length", even on its last
    # word). Streamed: the role first, then the content, then a chunk with the finish reason alone; usage only when
    # stream_options.include_usage asks, in a last chunk without choices.
    request = dict(model="tiny", messages=[{"role": "user", "content": "Hi"}])
    for max_tokens, content, reason, tokens in [(10, "Hi there", "stop", 3), (2, "Hi there", "length", 2),
                                                (1, "Hi", "length", 1)]:
        plain = scripted.chat.completions.create(**request, max_tokens=max_tokens)
        assert (plain.choices[0].message.content, plain.choices[0].finish_reason) == (content, reason)
        assert plain.usage.completion_tokens == tokens
        for options in (None, {"include_usage": True}):
            chunks = list(scripted.chat.completions.create(**request, max_tokens=max_tokens, stream=True,
                                                           stream_options=options))
            usage = chunks.pop() if options else None
            assert all(c.usage is None for c in chunks)
            first, *middle, last = [c.choices[0] for c in chunks]
            assert (first.delta.role, first.delta.content, first.finish_reason) == ("assistant", "", None)
            assert "".join(c.delta.content for c in middle) == content and not any(c.finish_reason for c in middle)
            assert (last.delta.content, last.finish_reason) == (None, reason)
            if options:
                assert usage.choices == [] and usage.usage.model_dump() == plain.usage.model_dump()


def test_a_prompt_of_ids_ending_inside_a_character_is_answered_with_that_character_whole(
        scripted: openai.OpenAI) -> None:
    # The reply's first bytes finish the prompt's last character ("🤖"'s first byte): decoded alone, they streamed
    # (and returned) as three U+FFFDs. The reply holds that character whole; an echoed prompt leaves it to the reply,
    # so that prompt and reply join as their ids decode, but where nothing is generated.
    tokenizer = qwen3_tokenizer()
    prompt = [*tokenizer.encode("Go and"), tokenizer.token_id(bytes_to_unicode()[0xF0])]
    plain = scripted.completions.create(model="tiny", prompt=prompt, max_tokens=4)
    streamed = scripted.completions.create(model="tiny", prompt=prompt, max_tokens=4, stream=True)
    assert plain.choices[0].text == "🤖 end" and stream_text(streamed)[0] == {0: "🤖 end"}
    echoed = scripted.completions.create(model="tiny", prompt=prompt, max_tokens=4, echo=True, logprobs=0).choices[0]
    assert echoed.text == "Go and🤖 end" and echoed.logprobs.text_offset == [0, 2, 6, 6, 6, 6, 7]
    assert scripted.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True).choices[0].text == \
        "Go and\ufffd"


def test_logprobs_of_sentencepiece_tokens_keep_their_leading_space() -> None:
    # A "\u2581b" token (Llama's, Mistral's vocabularies) decoded alone lost its space: logprobs said "b" where the
    # reply says " b", and the tokens joined to "ba日" for " b a日". Each is its text as it follows text; an echoed
    # prompt's first token, which begins the text, as it does there.
    from nanoqwen.serve.app import chat_logprobs, completion_logprobs
    from nanoqwen.serve.engine import TokenLogprob
    from tests.test_generate import byte_fallback_tokenizer

    tokenizer = byte_fallback_tokenizer()
    word = {text: tokenizer.token_id(text.replace(" ", "\u2581")) for text in [" ", "a", "b", " a", " b"]}
    reply = [word[" b"], word[" a"], *tokenizer.encode("日")[1:]]
    stream = TextStream(tokenizer, [], prompt=tokenizer.encode("a"))
    entries = []
    for token in reply:
        stream.push(token)
        entries.append(TokenLogprob(token, -1.0, [(word[" a"], -0.5), (word["a"], -2.0)], stream.token_start))
    assert stream.text == " b a日"
    content = chat_logprobs(tokenizer, entries)["content"]
    assert [e["token"] for e in content] == [" b", " a", "bytes:\\xe6", "bytes:\\x97", "bytes:\\xa5"]
    assert b"".join(bytes(e["bytes"]) for e in content).decode() == stream.text
    assert [[t["token"] for t in e["top_logprobs"]] for e in content[:1]] == [[" a", "a"]]
    completion = completion_logprobs(tokenizer, entries)
    assert completion["tokens"] == [e["token"] for e in content] and completion["top_logprobs"][0] == {
        " a": -0.5, "a": -2.0, " b": -1.0}
    assert [e.text_offset for e in entries] == [0, 2, 4, 4, 4]  # where each token's text starts in the reply
    prompt = tokenizer.encode("b a")  # echoed: "\u2581", "b", "\u2581", "a"
    echoed = completion_logprobs(tokenizer, [TokenLogprob(prompt[0], None, [], 0),
                                             *(TokenLogprob(t, -1.0, [], 0) for t in prompt[1:])])["tokens"]
    assert echoed == ["", "b", " ", "a"] and "".join(echoed) == tokenizer.decode(prompt)


def test_logprobs_give_a_byte_fallback_tokens_own_byte() -> None:
    # OpenAI's `bytes` are there to join a character split over tokens; a <0xNN> token of a byte-fallback tokenizer
    # (Llama's, Mistral's) gave U+FFFD's bytes, from decoding it alone, so the joined bytes were three U+FFFDs.
    from nanoqwen.serve.app import chat_logprobs, completion_logprobs
    from nanoqwen.serve.engine import TokenLogprob
    from tests.test_generate import byte_fallback_tokenizer

    tokenizer = byte_fallback_tokenizer()
    ids = tokenizer.encode("日")[1:]  # its 3 byte tokens (after "\u2581")
    entries = [TokenLogprob(token, -1.0, [(token, -1.0)], 0) for token in ids]
    content = chat_logprobs(tokenizer, entries)["content"]
    assert b"".join(bytes(e["bytes"]) for e in content).decode() == "日"
    assert [e["top_logprobs"][0]["bytes"] for e in content] == [[0xE6], [0x97], [0xA5]]
    assert completion_logprobs(tokenizer, entries)["tokens"] == ["bytes:\\xe6", "bytes:\\x97", "bytes:\\xa5"]
    assert tokenizer.token_bytes(tokenizer.encode("a")[1]) == b"a"  # a word's own text, as before
