"""`nanoqwen serve`: an OpenAI-compatible HTTP API over a checkpoint, and a web page at `/`.

Endpoints: GET /health, GET /v1/models and /v1/models/{name}, POST /v1/completions, POST
/v1/chat/completions (both with `stream: true` as server-sent events), POST /tokenize (vLLM's), and the
page's static files. All model work runs on the engine's one worker thread
(see engine.py); handlers here only validate, tokenize, and turn engine events into responses.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import hmac
import ipaddress
import json
import logging
import os
import socket
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from nanoqwen.checkpoint import display_name
from nanoqwen.errors import InvalidSetting, NanoQwenError, decimal_number, port_number, positive_int
from nanoqwen.generate import SamplingParams, check_fits, nth_seed, prompt_ids
from nanoqwen.model import Qwen3
from nanoqwen.serve.engine import Delta, Engine, Failed, Finished, Job, SentText, TokenLogprob
from nanoqwen.serve.protocol import (
    APIError,
    ChatInput,
    ChatRequest,
    CompletionRequest,
    SamplingRequest,
    StreamOptions,
    TokenizeRequest,
    ToolCallStream,
    error_body,
    new_id,
    now,
    reason_with_calls,
    split_tool_calls,
    usage,
)
from nanoqwen.tokenizer import Tokenizer

STATIC_DIR = Path(__file__).parent / "static"
DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB: far more than any context's worth of text
MAX_CHOICES = 128  # completions one request may ask for (prompts x n), as OpenAI caps n
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to what fits


# -- middleware (plain ASGI, so they run before any body parsing) --------------------------------
async def send_error(scope: Scope, receive: Receive, send: Send, status: int, message: str,
                     code: str | None = None, headers: dict[str, str] | None = None) -> None:
    await JSONResponse(error_body(message, code=code), status, headers=headers)(scope, receive, send)


class BodyLimit:
    """Refuse request bodies over `max_bytes` with 413, whether or not Content-Length is sent.

    The body is read here (it is small by construction) and replayed to the app; later receives pass
    through, so the app still sees the client disconnect.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = f"the request body is larger than this server's limit of {self.max_bytes} bytes"
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await send_error(scope, receive, send, 413, too_large, "request_too_large")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending the body
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await send_error(scope, receive, send, 413, too_large, "request_too_large")
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class QuietCancelledRequests(logging.Filter):
    """Drops uvicorn's traceback of a request cut at shutdown (after --shutdown-grace): on Ctrl-C the cut streams
    end in CancelledError, each logged as an "Exception in ASGI application", after the server said it stopped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], asyncio.CancelledError))


class APIKeyAuth:
    """With a key set, /v1/* and /tokenize need `Authorization: Bearer KEY` (the page and /health stay open)."""

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app, self.api_key = app, api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        guarded = scope["type"] == "http" and (scope["path"].startswith("/v1/") or scope["path"] == "/tokenize")
        if self.api_key and guarded:
            given = dict(scope["headers"]).get(b"authorization", b"")  # raw bytes: a UTF-8 key compares as sent
            scheme, _, key = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(key.lstrip(b" "), self.api_key.encode()):
                message = ("missing or wrong API key: send the header 'Authorization: Bearer KEY' "
                           "(the key the server was started with)")
                return await send_error(scope, receive, send, 401, message, "invalid_api_key",
                                        headers={"WWW-Authenticate": "Bearer"})
        await self.app(scope, receive, send)


SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})  # read-only: a forged one runs nothing


def foreign_origin(headers: dict[bytes, bytes], allow_origins: list[str]) -> str | None:
    """The origin of a web page on another origin (another site, or another port of this one) whose script made the
    browser send this request, unless `allow_origins` names it ("*": any); None for this server's own page and for
    clients that are no browser. As Go's net/http CrossOriginProtection: the browser's Sec-Fetch-Site says where a
    request comes from; a browser too old to send it is judged by its Origin against the Host it asked."""
    origin = headers.get(b"origin", b"").decode("latin-1")
    if "*" in allow_origins or origin in allow_origins:
        return None
    site = headers.get(b"sec-fetch-site")
    if site is not None:
        return None if site in (b"same-origin", b"none") else origin or "another site"
    if not origin:  # no browser sent it (or one that sends no Origin, so none that runs other sites' scripts)
        return None
    return None if origin.partition("://")[2] == headers.get(b"host", b"").decode("latin-1") else origin


class CrossOriginGuard:
    """Refuse a request a web page on another origin had the browser send, unless --allow-origin names the page
    (cross-site request forgery). Without CORS headers such a page cannot read the answer, but a browser sends
    some POSTs without asking first (a text/plain or untyped body): any page the user visits could otherwise run
    generations on a server that needs no key. Reads (GET, HEAD) and CORS preflights pass."""

    def __init__(self, app: ASGIApp, allow_origins: list[str]) -> None:
        self.app, self.allow_origins = app, allow_origins

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] not in SAFE_METHODS:
            origin = foreign_origin(dict(scope["headers"]), self.allow_origins)
            if origin is not None:
                message = (f"a request from the web page at {origin} (another origin) is refused; to let that page's "
                           "scripts call this server, start it with --allow-origin naming the page's origin")
                return await send_error(scope, receive, send, 403, message, "cross_origin_refused")
        await self.app(scope, receive, send)


def names_this_machine(host: str) -> bool:
    """Whether a request's Host header is one a client on this machine sends a server on its loopback: an IP address,
    localhost, or a name under .localhost (RFC 6761: never looked up in DNS); an empty one comes from no browser."""
    host = host.lower()
    name = host[1:].partition("]")[0] if host.startswith("[") else host.partition(":")[0]  # less the port
    name = name.removesuffix(".")  # "localhost." is localhost
    if not host or name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class LocalHostsOnly:
    """On a server listening on this machine's loopback alone: refuse requests whose Host names anything but this
    machine (DNS rebinding). A page at evil.example whose name is made to resolve to 127.0.0.1 is, to the browser,
    the server's own origin: its scripts could call the API and read the answers, as the server's own page does.
    Such a request carries the page's name as its Host; a client here sends localhost or the address."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            if not names_this_machine(host):
                message = (f"the Host header {host!r} names no address of this machine, and this server listens on "
                           "its loopback alone (a guard against DNS rebinding): ask for localhost or 127.0.0.1; "
                           "behind a reverse proxy or port forwarder, have it send 'Host: 127.0.0.1', or start the "
                           "server with --api-key")
                return await send_error(scope, receive, send, 403, message, "host_not_allowed")
        await self.app(scope, receive, send)


class EventStream(StreamingResponse):
    """Server-sent events that run `on_close` however the stream ends, a client disconnect included,
    so the engine stops generating for a client that is gone."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def sse(data: dict[str, Any] | str) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload}\n\n"


def is_union_branch(part: int | str) -> bool:
    """pydantic names the branch of a union a value was tried as by its type ('str', 'list[int]')."""
    return isinstance(part, str) and (part in {"str", "int"} or "[" in part)


def field_path(loc: tuple[int | str, ...]) -> str:
    """A field's path as OpenAI's validation errors name it, in their message and their `param` alike:
    'messages[0].content[1].text' (pydantic's loc reads ('messages', 0, 'content', 1, 'text'))."""
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).removeprefix(".")


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One readable line (and the offending parameter) from pydantic's error list."""
    errors = [{**e, "loc": tuple(p for p in e.get("loc", ()) if p != "body")} for e in exc.errors()]

    def named_depth(loc: tuple[int | str, ...]) -> int:  # field names in a path, not indices or union branches
        return sum(isinstance(p, str) and not is_union_branch(p) for p in loc)

    # A value that fits no branch of a union gets an error per branch. One that reaches into a field names
    # the part that is wrong (a content part's 'text'); otherwise the value is none of the forms it may take.
    first = max(errors, key=lambda e: named_depth(e["loc"]))
    loc = first["loc"]
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", first.get("msg"))
        return f"the request body is not valid JSON: {detail}", None
    if not loc:
        return "the request body must be a JSON object (and sent with Content-Type: application/json)", None
    message = first.get("msg")
    branch = next((i for i, p in enumerate(loc) if is_union_branch(p)), None)
    if branch is not None and named_depth(loc) == named_depth(loc[:branch]):
        forms = dict.fromkeys(e["loc"][branch] for e in errors if e["loc"][:branch] == loc[:branch]
                              and len(e["loc"]) > branch)
        loc, message = loc[:branch], "should be one of: " + ", ".join(map(str, forms))
    field = field_path(tuple(p for p in loc if not is_union_branch(p)))
    return f"invalid '{field}': {message}", field


# -- the application -----------------------------------------------------------------------------
# What a request leaves out is sampled as OpenAI's API does, unless the checkpoint's generation_config.json
# says otherwise (as vLLM reads it): official Qwen3 folders recommend temperature 0.6-0.7, top-p, top-k.
OPENAI_SAMPLING: dict[str, float] = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0,
                                     "repetition_penalty": 1.0}
LogprobShape = Callable[[list[TokenLogprob]], dict[str, Any]]
NESTED_TOO_DEEPLY = "the request's JSON is nested too deeply; flatten it"


def add_error_handlers(app: FastAPI) -> None:
    """Every error as OpenAI's error body, with the status it deserves."""

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(exc)
        return JSONResponse(error_body(message, param=param), 400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = str(exc.detail)
        # FastAPI says only "There was an error parsing the body", whatever the parser's error
        if isinstance(exc.__cause__, UnicodeDecodeError):
            message = (f"the request body is not valid JSON: it is not UTF-8 text ({exc.__cause__.reason} at byte "
                       f"{exc.__cause__.start}); send it as UTF-8")
        elif isinstance(exc.__cause__, RecursionError):  # deeper than the parser itself goes (thousands)
            message = NESTED_TOO_DEEPLY
        elif isinstance(exc.__cause__, ValueError):  # Python reads no integer of more than 4300 digits
            message = (f"the request body holds a number Python cannot read ({str(exc.__cause__).partition(';')[0]}); "
                       f"send numbers of at most {sys.get_int_max_str_digits()} digits")
        return JSONResponse(error_body(message, param=None, code=code), exc.status_code,
                            headers=exc.headers)  # a 405's Allow, for one

    @app.exception_handler(RecursionError)  # JSON nested a few hundred deep: too deep to walk, the client's fault
    async def nested_too_deeply(_: Request, exc: RecursionError) -> JSONResponse:
        return JSONResponse(error_body(NESTED_TOO_DEEPLY), 400)

    @app.exception_handler(Exception)
    async def server_error(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error"), 500)


# -- logprobs in OpenAI's two shapes ---------------------------------------------------------------
def token_text(tokenizer: Tokenizer, token: int, starts_text: bool = False) -> tuple[str, list[int]]:
    """A token as OpenAI shows it: its text where it follows other text (a SentencePiece "\u2581b", " b"), or where the
    text begins with it (`starts_text`: "b"), or `bytes:\\xe6\\x97` when its bytes are not whole UTF-8 on their own
    (part of a character); and the bytes themselves. A reply's tokens then join into its text."""
    raw = tokenizer.token_bytes(token, starts_text)
    try:
        return raw.decode("utf-8"), list(raw)
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), list(raw)


def chat_logprobs(tokenizer: Tokenizer, entries: list[TokenLogprob], stops: frozenset[int] = frozenset()
                  ) -> dict[str, Any]:
    """The logprobs of a reply's content tokens: as OpenAI, not of the stop token that ended it (`stops`: the
    tokens that stop it and are not text)."""
    def item(token: int, logprob: float) -> dict[str, Any]:
        text, raw = token_text(tokenizer, token)
        return {"token": text, "logprob": logprob, "bytes": raw}

    content = [{**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
               for e in entries if e.token not in stops]
    return {"content": content}


def completion_logprobs(tokenizer: Tokenizer, entries: list[TokenLogprob]) -> dict[str, Any]:
    return {
        # (an echoed prompt's first token, the one with no logprob, begins the text)
        "tokens": [token_text(tokenizer, e.token, starts_text=e.logprob is None)[0] for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        # As OpenAI: the N most likely, plus the sampled token when it is not among them (null for an echoed
        # prompt's first token, which nothing predicts).
        "top_logprobs": [None if e.logprob is None else
                         {token_text(tokenizer, t)[0]: lp for t, lp in [*e.top, (e.token, e.logprob)]}
                         for e in entries],
        "text_offset": [e.text_offset for e in entries],
    }


# -- engine events -> responses --------------------------------------------------------------------
async def client_gone(request: Request) -> None:
    """Returns when the client disconnects (what a non-streaming request has to watch for)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def events(job: Job) -> AsyncIterator[Delta | Finished]:
    left = job.choices
    while left:
        event = await job.events.get()
        if isinstance(event, Failed):
            raise APIError(event.status, event.message, type="server_error")
        left -= isinstance(event, Finished)
        yield event


async def collect(job: Job) -> tuple[list[str], list[str], int, list[list[TokenLogprob]]]:
    """Whole texts, finish reasons, the completion token count, and the logprobs of every choice."""
    texts, reasons, completion_tokens = [""] * job.choices, [""] * job.choices, 0
    logprobs: list[list[TokenLogprob]] = [[] for _ in range(job.choices)]
    async for event in events(job):
        logprobs[event.index] += event.logprobs
        if isinstance(event, Delta):
            texts[event.index] += event.text
        else:
            reasons[event.index] = event.finish_reason
            completion_tokens += event.completion_tokens
    return texts, reasons, completion_tokens, logprobs


def chat_message(text: str, reason: str, tools: bool, most_calls: int | None = None) -> tuple[dict[str, Any], str]:
    """A whole reply as OpenAI's message, and its finish reason; with `tools`, its tool calls parsed out (the
    first `most_calls` of them, None: all)."""
    content, calls = split_tool_calls(text, most_calls) if tools else (text, [])
    if not calls:
        return {"role": "assistant", "content": text}, reason
    message = {"role": "assistant", "content": content if content.strip() else None, "tool_calls": calls}
    return message, reason_with_calls(reason)


async def stream(job: Job, head: dict[str, Any], chat: bool, prompt_lengths: list[int],
                 options: StreamOptions | None, shape: LogprobShape | None, tools: bool = False,
                 most_calls: int | None = None) -> AsyncIterator[str]:
    """Server-sent chunks. With `tools`, a choice's text from its first `<tool_call>` on is held back and
    sent at its end as `tool_calls` (the first `most_calls`; and whatever text lies outside the calls), so the
    streamed text is the non-streamed message's. `prompt_lengths`: the tokens of each prompt, whose choices are
    `job.choices // len(prompt_lengths)` in a row. `options.include_usage`: a last chunk counts the request's
    tokens; with `continuous_usage_stats` too, every chunk counts its choice's so far, as vLLM's do (a page
    stopped mid-reply knows how many tokens it got)."""
    head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
    include_usage = bool(options and options.include_usage)
    continuous = include_usage and bool(options and options.continuous_usage_stats)
    per_prompt = job.choices // len(prompt_lengths)
    generated = [0] * job.choices  # tokens each choice has generated by its latest chunk
    calls_out = [ToolCallStream(most_calls) for _ in range(job.choices)] if tools else []

    def usage_of(index: int) -> dict[str, Any]:
        if not include_usage:
            return {}
        return {"usage": usage(prompt_lengths[index // per_prompt], generated[index]) if continuous else None}

    def chunk(index: int, text: str | None, reason: str | None, role: bool = False,
              entries: list[TokenLogprob] | None = None) -> str:
        logprobs = shape(entries) if shape and entries else None  # the tokens behind this chunk
        if chat and logprobs is not None and not logprobs["content"]:
            logprobs = None  # a last chunk's stop token, which is not content
        if chat:
            delta = {"role": "assistant", "content": ""} if role else {} if text is None else {"content": text}
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
        else:
            choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": reason}
        return sse({**head, "choices": [choice], **usage_of(index)})

    completion_tokens = 0
    try:
        if chat:  # OpenAI opens each choice with a role-only delta
            for i in range(job.choices):
                yield chunk(i, None, None, role=True)
        async for event in events(job):
            i = event.index
            if isinstance(event, Delta):
                generated[i] = event.tokens
                text = calls_out[i].push(event.text) if tools else event.text
                if text or event.logprobs:  # a piece held back whole sends nothing
                    yield chunk(i, text, None, entries=event.logprobs)
                continue
            completion_tokens += event.completion_tokens
            generated[i] = event.completion_tokens
            reason = event.finish_reason
            if tools:
                rest, calls = calls_out[i].finish()
                if rest:
                    yield chunk(i, rest, None)
                if calls:
                    calls = [{"index": k, **call} for k, call in enumerate(calls)]
                    yield sse({**head, "choices": [{"index": i, "delta": {"tool_calls": calls}, "logprobs": None,
                                                    "finish_reason": None}], **usage_of(i)})
                    reason = reason_with_calls(reason)
            yield chunk(i, None, reason, entries=event.logprobs)
        if include_usage:
            yield sse({**head, "choices": [], "usage": usage(sum(prompt_lengths), completion_tokens)})
    except APIError as e:  # the status line is already sent: report the error in the stream
        yield sse(e.body())
    yield sse("[DONE]")


def prompt_items(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """A completion request's prompts: its one text or token list, or each of its list of them."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return [prompt]  # type: ignore[list-item]
    if not prompt:
        raise APIError(400, "'prompt' is an empty list; give at least one prompt", "prompt")
    return list(prompt)  # type: ignore[arg-type]


def check_choices(n: int, prompts: int) -> None:
    """At most MAX_CHOICES completions in one request (a chat's n is capped as much by its field's bound)."""
    if n * prompts > MAX_CHOICES:
        raise APIError(400, f"at most {MAX_CHOICES} completions per request; n={n} for {prompts} prompts asks for "
                            f"{n * prompts}", "n" if n > 1 else "prompt")


class Service:
    """One model behind the API: turns requests into prompts and sampling settings, hands them to the
    engine, and turns its events into OpenAI's responses."""

    def __init__(self, model: Qwen3, tokenizer: Tokenizer, name: str, engine: Engine,
                 sampling_defaults: dict[str, float], plain_text: bool = False,
                 default_max_tokens: int | None = None) -> None:
        self.model, self.tokenizer, self.name, self.engine = model, tokenizer, name, engine
        self.defaults = sampling_defaults
        self.chat_max_tokens = default_max_tokens  # a chat request's without max_tokens (None: what fits)
        self.context = model.config.max_position_embeddings
        # Beyond OpenAI's fields: the size, the context, whether chat_template_kwargs {"enable_thinking":
        # false} means anything (official Qwen3 templates; this also compiles the template, so a broken one
        # stops here), and whether the model is known to be trained on plain text alone (runs.trained_on_plain_text:
        # it never learned to end a turn, so the web page opens in Completion; chat requests are served all the same).
        self.card = {"id": name, "object": "model", "created": now(), "owned_by": "nanoqwen",
                     "parameters": model.num_params(), "context_length": self.context,
                     "thinking_switch": tokenizer.thinking_switch, "trained_on_plain_text": plain_text,
                     "sampling_defaults": sampling_defaults}

    # -- request -> prompts and sampling parameters -----------------------------------------------
    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.name:
            raise APIError(404, f"the model '{name}' does not exist; this server serves '{self.name}' "
                                "(see GET /v1/models)", "model", "model_not_found")

    def check_prompt_fits(self, prompt: list[int], param: str) -> None:
        try:
            check_fits(self.model, len(prompt), 1)
        except NanoQwenError as e:
            raise APIError(400, str(e), param, "context_length_exceeded") from None

    def chat_prompt(self, body: ChatInput) -> list[int]:
        """The conversation's prompt ids, through the model's chat template."""
        try:
            # (the template given these tools: a folder's tool_use one may have their place where its default has not)
            if body.uses_tools() and self.tokenizer.writes_chatml(body.tools):
                raise APIError(400, "this model chats in plain ChatML, which has no place for tools or tool calls; "
                                    "serve a folder whose chat template has (such as an official Qwen3 one)", "tools")
            text = self.tokenizer.render_chat(body.chat_messages(), body.add_generation_prompt,
                                              **body.template_kwargs())
        except NanoQwenError as e:  # the template's refusal, or a model with no template for this chat
            raise APIError(400, str(e), "messages") from None
        return self.encode([text])[0]

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text. Called in a worker thread, never on the event loop, so a long prompt does not
        hold up every other request and stream; `tokenizers` lets go of Python's lock in its batch call only."""
        return self.tokenizer.encode_batch(texts)

    def completion_prompts(self, items: list[str | list[int]]) -> tuple[list[list[int]], list[SentText | None]]:
        """Each prompt's ids (`items`: from `prompt_items`), and for echo each text prompt as sent (None for ids).
        Called in a worker thread, as `encode` is."""
        vocab = self.model.config.vocab_size
        encoded = iter(self.tokenizer.encode_batch_with_starts([item for item in items if isinstance(item, str)]))
        prompts: list[list[int]] = []
        sent: list[SentText | None] = []
        for item in items:
            if isinstance(item, str):
                ids, starts = next(encoded)
                sent.append(SentText(item, starts or [0]))  # (an empty one's new-document token starts at 0)
            else:
                ids = item
                sent.append(None)
            # an empty one starts a new document, as in `nanoqwen sample`
            ids = prompt_ids(self.tokenizer, ids)
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise APIError(400, f"token id {bad[0]} is outside the vocabulary [0, {vocab})", "prompt")
            self.check_prompt_fits(ids, "prompt")
            prompts.append(ids)
        return prompts, sent

    def request_sampling(self, body: SamplingRequest, default_max_tokens: int | None = None) -> SamplingParams:
        """The request's sampling settings, the server's defaults where it gives none; where it gives no max_tokens,
        `default_max_tokens` (None: to the end of the context)."""
        body.check_unsupported()
        limit, max_tokens = body.tokens_limit()
        self.check_min_tokens(body.min_tokens, limit, max_tokens, default_max_tokens, isinstance(body, ChatRequest))
        if max_tokens is None:
            max_tokens = default_max_tokens
        defaults = self.defaults
        top_k = int(defaults["top_k"]) if body.top_k is None else max(body.top_k, 0)  # -1 and 0: all tokens
        vocab = self.model.config.vocab_size
        if bad := [t for t in body.stop_token_ids or [] if not 0 <= t < vocab]:
            raise APIError(400, f"stop token id {bad[0]} is outside the vocabulary [0, {vocab})", "stop_token_ids")
        # ignore_eos: the model's end tokens are tokens like any other (but for min_tokens, which holds them off
        # as vLLM does); the request's own stop tokens still stop
        stops = [*([] if body.ignore_eos else self.tokenizer.stop_ids), *(body.stop_token_ids or [])]
        params = SamplingParams(
            max_new_tokens=self.context if max_tokens is None else max_tokens,  # the engine caps it to what fits
            temperature=defaults["temperature"] if body.temperature is None else body.temperature,
            top_k=top_k,
            top_p=defaults["top_p"] if body.top_p is None else body.top_p,
            min_p=defaults.get("min_p", 0.0) if body.min_p is None else body.min_p,
            repetition_penalty=defaults["repetition_penalty"] if body.repetition_penalty is None
            else body.repetition_penalty,
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            stop_token_ids=list(dict.fromkeys(stops)),
            stop_strings=body.stop_strings(),
            min_tokens=body.min_tokens,
            ignored_end_ids=self.tokenizer.stop_ids if body.ignore_eos else [],
            include_stop_str_in_output=body.include_stop_str_in_output,
            seed=nth_seed(body.seed, 0),  # a negative seed wrapped into the range, as a choice's seed wraps
            skip_special_tokens=body.skip_special_tokens,
        )
        try:
            return params.validate()
        except InvalidSetting as e:  # a backstop: the fields were checked above and by pydantic
            raise APIError(400, str(e), "max_tokens" if e.name == "max_new_tokens" else e.name) from None

    def check_min_tokens(self, min_tokens: int, limit: str, max_tokens: int | None, default_max_tokens: int | None,
                         chat: bool = False) -> None:
        """min_tokens past max_tokens (`limit` names the field given: chat's max_completion_tokens, or max_tokens) is
        refused, as vLLM refuses it, in a line that says what to send: past a max_tokens left out, it names the
        default the user never wrote (a chat reply's: the checkpoint's; a completion's: OpenAI's)."""
        if max_tokens is not None:
            if min_tokens > max_tokens:
                raise APIError(400, f"min_tokens ({min_tokens}) is more than {limit} ({max_tokens}); send a {limit} "
                                    f"of at least {min_tokens}, or a smaller min_tokens", "min_tokens")
        elif default_max_tokens is not None and min_tokens > default_max_tokens:
            gets = "a reply gets without max_tokens (the checkpoint's generation_config.json max_new_tokens)" if chat \
                else "a completion gets without max_tokens (OpenAI's default)"
            raise APIError(400, f"min_tokens ({min_tokens}) is more than the {default_max_tokens} tokens {gets}; send "
                                f"max_tokens of at least {min_tokens} too", "min_tokens")
        elif min_tokens > self.context:
            raise APIError(400, f"min_tokens ({min_tokens}) is more than the model's context of {self.context} "
                                "tokens; send a smaller min_tokens", "min_tokens")

    # -- the answer ------------------------------------------------------------------------------
    async def respond(self, request: Request, body: SamplingRequest, prompts: list[list[int]],
                      params: SamplingParams, chat: bool, top_logprobs: int | None, tools: bool = False,
                      echo: bool = False, most_calls: int | None = None, sent: list[SentText | None] | None = None
                      ) -> Response:
        """`sent`: with `echo`, the prompts as sent in text (see Engine.submit)."""
        job = self.engine.submit(prompts, params, body.n, top_logprobs, echo, sent)
        # None: the request asked for no logprobs, and every choice says `"logprobs": null`.
        shape: LogprobShape | None = None
        if top_logprobs is not None:
            shape = functools.partial(completion_logprobs, self.tokenizer)
            if chat:
                shape = functools.partial(chat_logprobs, self.tokenizer, stops=frozenset(
                    [] if params.include_stop_str_in_output else params.stop_token_ids))
        ident, created = new_id("chatcmpl-" if chat else "cmpl-"), now()
        head = {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": self.name}
        prompt_tokens = sum(len(p) for p in prompts)
        if body.stream:
            return EventStream(stream(job, head, chat, [len(p) for p in prompts], body.stream_options, shape,
                                      tools, most_calls),
                               on_close=job.cancel)
        collector = asyncio.create_task(collect(job))
        watcher = asyncio.create_task(client_gone(request))
        try:
            done, _ = await asyncio.wait({collector, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:  # finished, client gone, or this handler cancelled: either way no more work for this job
            job.cancel()
            watcher.cancel()
            if not collector.done():
                collector.cancel()
        if collector not in done:
            return Response(status_code=499)  # nobody is listening; nginx's "client closed request"
        texts, reasons, completion_tokens, logprobs = collector.result()
        choices: list[dict[str, Any]] = []
        for i, (text, reason, entries) in enumerate(zip(texts, reasons, logprobs)):
            if chat:
                message, reason = chat_message(text, reason, tools, most_calls)
                choice: dict[str, Any] = {"index": i, "message": message}
            else:
                choice = {"index": i, "text": text}
            choices.append({**choice, "logprobs": shape(entries) if shape else None, "finish_reason": reason})
        return JSONResponse({**head, "choices": choices, "usage": usage(prompt_tokens, completion_tokens)})


def create_app(model: Qwen3, tokenizer: Tokenizer, model_name: str, api_key: str | None = None,
               max_batch_size: int = 32, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               prefill_chunk: int = 512, sampling_defaults: dict[str, float] | None = None,
               allow_origins: list[str] | None = None, plain_text: bool = False,
               default_max_tokens: int | None = None, local_hosts_only: bool = False) -> FastAPI:
    """The server for one model. The engine thread starts and stops with the app's lifespan.
    `sampling_defaults`: temperature, top_k, top_p and repetition_penalty for requests that leave them out
    (default OPENAI_SAMPLING); shown in the model card, where the web page takes its starting values.
    `default_max_tokens`: the length of a chat reply whose request gives none (the checkpoint's max_new_tokens, as
    vLLM takes it; None: what fits the context); completions keep OpenAI's 16, as vLLM's protocol sets it.
    `allow_origins`: web pages (origins, or "*") whose scripts may call the API from a browser (CORS).
    `plain_text`: the model is known to be trained on plain text alone (the card's trained_on_plain_text).
    `local_hosts_only`: answer only requests addressed to this machine by name or address (LocalHostsOnly), as a
    server on the loopback alone should."""
    engine = Engine(model, tokenizer, max_batch_size=max_batch_size, prefill_chunk=prefill_chunk)
    service = Service(model, tokenizer, model_name, engine, sampling_defaults or OPENAI_SAMPLING, plain_text,
                      default_max_tokens)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        engine.stop()  # after uvicorn's grace: Ctrl-C and SIGTERM end here (it then re-raises the signal)
        print(f"nanoqwen serve: stopped after generating {engine.tokens_generated:,} tokens", flush=True)

    # No /docs: FastAPI's docs page loads its scripts from a CDN.
    app = FastAPI(title="nanoqwen", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine = engine
    add_error_handlers(app)

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, **engine.stats()}

    @app.api_route("/v1/models", methods=["GET", "HEAD"])
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [service.card]}

    @app.api_route("/v1/models/{name:path}", methods=["GET", "HEAD"])
    async def get_model(name: str) -> dict[str, Any]:
        service.check_model(name)
        return service.card

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        body.check_text()
        service.check_model(body.model)
        items = prompt_items(body.prompt)
        check_choices(body.n, len(items))  # before reading them: 150,000 tiny prompts fit in a body
        prompts, sent = await run_in_threadpool(service.completion_prompts, items)
        top_logprobs = body.logprobs_count()
        params = service.request_sampling(body, COMPLETION_DEFAULT_MAX_TOKENS)
        return await service.respond(request, body, prompts, params, chat=False, top_logprobs=top_logprobs,
                                     echo=body.echo, sent=sent)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request) -> Response:
        body.check_text()
        service.check_model(body.model)
        top_logprobs = body.logprobs_count()
        prompt = await run_in_threadpool(service.chat_prompt, body)
        service.check_prompt_fits(prompt, "messages")
        params = service.request_sampling(body, service.chat_max_tokens)
        return await service.respond(request, body, [prompt], params, chat=True, top_logprobs=top_logprobs,
                                     tools=body.parses_tool_calls(), most_calls=body.most_tool_calls())

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        """Token ids of a prompt or a rendered conversation, and the context (vLLM's endpoint): the web page
        asks it how much of a chat's history fits."""
        body.check_text()
        service.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give either 'prompt' (text) or 'messages' (a conversation)", "prompt")
        if body.prompt is not None:
            ids = (await run_in_threadpool(service.encode, [body.prompt]))[0]
        else:
            ids = await run_in_threadpool(service.chat_prompt, body)
        return {"count": len(ids), "max_model_len": service.context, "tokens": ids}

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    # Added last = runs first: a request without the key is refused before its body is even read.
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.add_middleware(APIKeyAuth, api_key=api_key)
    app.add_middleware(CrossOriginGuard, allow_origins=allow_origins or [])  # before the key: a forged request has none
    if local_hosts_only:
        app.add_middleware(LocalHostsOnly)
    if allow_origins:  # outermost: a browser's preflight carries no key, and refusals need the headers too
        # Any request header: OpenAI's JavaScript client sends its own (X-Stainless-*), and a preflight that names
        # one not allowed blocks the request; which pages may call is what allow_origins decides.
        app.add_middleware(CORSMiddleware, allow_origins=allow_origins, allow_methods=["GET", "POST"],
                           allow_headers=["*"])
    return app


# -- `nanoqwen serve` ----------------------------------------------------------------------------
SHUTDOWN_GRACE_S = 3
# How long past --shutdown-grace uvicorn waits before it cuts the connections still open: time enough for the answers
# `Engine.end_all` ends at the grace to go out whole.
CUT_AFTER_GRACE_S = 2
SHUTTING_DOWN = "the server is shutting down and ended this request unfinished; send it again once the server is back"


def serve(app: FastAPI, host: str, port: int, grace: float) -> bool:
    """Serve `app` with uvicorn until Ctrl-C or SIGTERM, which give the requests in flight `grace` seconds to finish.
    Those still running then are ended by the engine with a 503 (a stream with that error event and its [DONE]):
    uvicorn alone cut their connections mid-body, which a client reads as a broken connection, not an answer.
    False where the server never started."""
    import uvicorn

    engine: Engine = app.state.engine

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            over = asyncio.get_running_loop().call_later(grace, engine.end_all, SHUTTING_DOWN)
            try:
                await super().shutdown(sockets)
            finally:
                over.cancel()

    server = Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                   timeout_graceful_shutdown=grace + CUT_AFTER_GRACE_S))
    with contextlib.suppress(KeyboardInterrupt):  # as uvicorn.run: a second Ctrl-C
        server.run()
    return server.started


def check_can_bind(host: str, port: int) -> None:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise NanoQwenError(f"--host {host}: {e.strerror}; give an address such as 127.0.0.1 or 0.0.0.0") from None
    try:
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
            s.bind(infos[0][4])
    except OSError as e:
        raise NanoQwenError(f"cannot listen on {host}:{port} ({e.strerror or e}); is another server running "
                            "there? pick another with --port") from None


WILDCARD_HOSTS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}  # every interface -> this machine's loopback


def base_url(host: str, port: int) -> str:
    """The server's address as clients write it: an IPv6 host in brackets (RFC 3986), since in
    `http://::1:8000` no client can tell the address from the port; a wildcard host (0.0.0.0: every interface) as
    this machine's loopback, which a browser here opens where it may refuse http://0.0.0.0."""
    host = WILDCARD_HOSTS.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def listens_on_loopback_only(host: str) -> bool:
    """Whether a --host (resolved as uvicorn binds it) is this machine's loopback alone: 127.0.0.1, ::1, localhost."""
    try:
        return all(ipaddress.ip_address(info[4][0]).is_loopback
                   for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM))
    except (socket.gaierror, ValueError):  # (a scoped IPv6 address, fe80::1%eth0: a network interface's)
        return False


def add_arguments(p: argparse.ArgumentParser) -> None:
    from nanoqwen.distributed import add_device_arguments

    p.add_argument("--model", required=True, help="checkpoint folder (e.g. runs/NAME/best)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=port_number, default=8000, help="port to listen on (default 8000)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/* and /tokenize; KEY is printable ASCII (default: "
                        "$NANOQWEN_API_KEY if set)")
    p.add_argument("--allow-origin", action="append", default=None, metavar="ORIGIN",
                   help="let scripts of the web page at ORIGIN (such as http://localhost:3000, or * for any) call "
                        "the API from a browser (CORS); repeat for more (default: none, only this server's page)")
    p.add_argument("--model-name", default=None, help="the model id clients use (default: from the folder)")
    p.add_argument("--max-batch-size", type=positive_int, default=32,
                   help="requests decoded together at most (default 32)")
    p.add_argument("--prefill-chunk", type=positive_int, default=512,
                   help="prompt tokens per forward pass; smaller keeps running streams smoother while "
                        "a long prompt is read (default 512)")
    p.add_argument("--max-request-bytes", type=positive_int, default=DEFAULT_MAX_BODY_BYTES,
                   help=f"larger request bodies are refused with 413 (default {DEFAULT_MAX_BODY_BYTES:,})")
    p.add_argument("--shutdown-grace", type=decimal_number, default=SHUTDOWN_GRACE_S,
                   help=f"seconds requests in flight get to finish on Ctrl-C or SIGTERM before they are ended with "
                        f"a 503, a stream's as its last event (default {SHUTDOWN_GRACE_S:g})")
    add_device_arguments(p)


def run(args: argparse.Namespace) -> int:
    from nanoqwen.checkpoint import read_generation_file
    from nanoqwen.generate import checkpoint_sampling, load_for_inference, saved_max_new_tokens, unapplied_generation
    from nanoqwen.runs import trained_on_plain_text

    if not 0 <= args.shutdown_grace < float("inf"):
        raise NanoQwenError(f"--shutdown-grace must be a number of seconds >= 0, got {args.shutdown_grace}")
    check_can_bind(args.host, args.port)  # before the (slow) model load
    # An empty --api-key (a shell variable that was never set) must not quietly serve the API to anyone.
    if args.api_key is not None and not args.api_key.strip():
        raise NanoQwenError("--api-key is empty, which would leave the API open to anyone; give the key clients "
                            "must send, or leave the flag out")
    api_key = args.api_key or os.environ.get("NANOQWEN_API_KEY") or None
    if api_key is not None and api_key != api_key.strip():  # no Bearer header can carry it: nobody could get in
        raise NanoQwenError("--api-key (or $NANOQWEN_API_KEY) starts or ends with a blank, which no "
                            "'Authorization: Bearer' header carries; remove it")
    # httpx (so the openai client) sends ASCII headers only, and a browser Latin-1 at most, not UTF-8: with any
    # other character in the key, only curl could get in.
    if api_key is not None and not (api_key.isascii() and api_key.isprintable()):
        raise NanoQwenError("--api-key (or $NANOQWEN_API_KEY) holds a character other than printable ASCII, "
                            "which the openai client and browsers cannot send; use letters, digits and punctuation")
    generation = read_generation_file(args.model)  # once: the end ids, sampling defaults and warnings come from it
    defaults = checkpoint_sampling(generation, OPENAI_SAMPLING)  # a bad value there: one line before the model's wait
    default_max_tokens = saved_max_new_tokens(generation)
    for field, most in (("temperature", 2.0), ("repetition_penalty", 10.0)):  # what a request may ask for
        if defaults[field] > most:
            print(f"nanoqwen serve: note: {generation.path}'s {field} {defaults[field]:g} is "
                  f"above what a request may ask for; requests without one get {most:g}", flush=True)
            defaults[field] = most
    if (unapplied := unapplied_generation(generation)) is not None:
        print(f"nanoqwen serve: warning: {unapplied}", flush=True)
    model, tokenizer = load_for_inference(args, generation)
    name = args.model_name or display_name(args.model)
    on_loopback = listens_on_loopback_only(args.host)
    app = create_app(model, tokenizer, name, api_key=api_key, max_batch_size=args.max_batch_size,
                     max_body_bytes=args.max_request_bytes, prefill_chunk=args.prefill_chunk,
                     sampling_defaults=defaults, allow_origins=args.allow_origin,
                     plain_text=trained_on_plain_text(Path(args.model)), default_max_tokens=default_max_tokens,
                     # with a key, a rebinding page cannot call the API (it has no key): a port forwarder that sends its
                     # own name as Host (a Codespace's, a JupyterHub proxy's) then reaches the server
                     local_hosts_only=on_loopback and api_key is None)
    url = base_url(args.host, args.port)
    print(f"nanoqwen serve: {name} ({model.num_params() / 1e6:.1f}M parameters) at {url}  "
          f"(web page {url}/, OpenAI base_url {url}/v1{', API key required' if api_key else ''})", flush=True)
    if not on_loopback and not api_key:
        print("nanoqwen serve: warning: listening beyond this machine without --api-key", flush=True)
    if args.host in WILDCARD_HOSTS:
        print(f"nanoqwen serve: listening on every interface (--host {args.host}): from another machine, give this "
              "machine's address in place of the loopback above", flush=True)
    # Ctrl-C or SIGTERM: requests in flight get --shutdown-grace seconds to finish, then are ended (their jobs
    # cancelled), so a long generation cannot hold the server up for minutes.
    logging.getLogger("uvicorn.error").addFilter(QuietCancelledRequests())
    return 0 if serve(app, args.host, args.port, args.shutdown_grace) else 3  # 3: uvicorn's, for a failed start
