"""The OpenAI wire format: request bodies (validated by pydantic), error bodies, response chunks.

Field names and defaults follow OpenAI's API. Supported: `max_tokens` (chat also
`max_completion_tokens`), `temperature`, `top_p`, `presence_penalty`, `frequency_penalty`, `stop`,
`seed`, `n`, `stream`, `stream_options.include_usage`, and log-probabilities (chat: `logprobs` +
`top_logprobs` 0..20; completions: `logprobs` 0..5), and completions' `echo` (the prompt as sent first, with its
tokens' logprobs; with `max_tokens` 0 the prompt alone, how evaluation harnesses score text). What would
change the answer and is not implemented is refused with a 400: completions' `suffix`, `logit_bias`,
`best_of` > 1, a `response_format` other than text (and vLLM's `guided_*` and `structured_outputs`, and its
`use_beam_search`, `bad_words`, `allowed_token_ids`, `prompt_logprobs`, `truncate_prompt_tokens` and chat `echo`),
chat's older `functions` and `function_call`, audio replies (`modalities` beyond text, `audio`), content parts other
than text (an assistant's refusal parts are text: what it said). A message's text parts are joined with newlines,
as vLLM's.
`top_k`, `min_p`, `repetition_penalty`, `skip_special_tokens` (default true), `min_tokens`, `ignore_eos`,
`stop_token_ids` and `include_stop_str_in_output` are extras (as vLLM names them).
Chat's `add_generation_prompt` (default true) is vLLM's extra; its `continue_final_message` is refused.
`tools` (function tools; other kinds are refused), and the `tool_calls` and `tool_call_id` of messages, go to
a chat template that uses them (official Qwen3 folders); the `<tool_call>` blocks of a reply to such a request
come back as `tool_calls` (`tool_choice` "auto" or "none"; `parallel_tool_calls: false` keeps the first; both only
with `tools`, as OpenAI's). Forcing a call (`tool_choice` "required" or a named one) and a tool's `strict: true`
(calls whose arguments fit its schema) need constrained decoding, and are refused. Other unknown fields are
ignored, as OpenAI-compatible servers commonly do.
Types are strict, as OpenAI's API is: a string is no number and a boolean no count (ints are floats).
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationInfo, field_validator

from nanoqwen.errors import SEED_LIMIT


class APIError(Exception):
    """An error answered as OpenAI does: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error") -> None:  # noqa: A002 (OpenAI's field name)
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,  # noqa: A002
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# Strict, as OpenAI's API is: "5" is no max_tokens and true no n (pydantic would convert them); ints are floats.
STRICT = ConfigDict(strict=True)


class StreamOptions(BaseModel):
    model_config = STRICT

    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: with include_usage, every chunk carries its choice's usage so far


class RequestBody(BaseModel):
    # NaN, which Python's JSON reads, is no number either
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)

    model: str | None = None

    @field_validator("model", mode="before")
    @classmethod
    def empty_is_not_given(cls, value: Any) -> Any:
        """An empty model name asks for the model served, as vLLM takes it (clients that need none send "")."""
        return None if value == "" else value

    def check_text(self) -> None:
        """JSON may carry a lone UTF-16 surrogate ("\\ud800"), which is not text: no tokenizer encodes it,
        and an error message quoting it could not be sent. Refused up front, naming the field."""
        for name in type(self).model_fields:
            if holds_lone_surrogate(getattr(self, name)):
                raise APIError(400, f"'{name}' holds a lone UTF-16 surrogate (\\ud800-\\udfff outside a pair), "
                                    "which is not text; send valid Unicode", name)


GUIDED_DECODING = ("guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs")
# vLLM's other extras that would change the answer (beam search, banned or allowed tokens, the prompt's logprobs, a
# prompt cut to its last tokens): refused when given a value that asks for them, not ignored
VLLM_UNSUPPORTED = ("use_beam_search", "bad_words", "allowed_token_ids", "prompt_logprobs", "truncate_prompt_tokens")


def asks_for(value: Any) -> bool:
    """Whether a field of VLLM_UNSUPPORTED is given a value that does something (false and [] do nothing; 0 does,
    as prompt_logprobs 0 asks for the prompt's own tokens)."""
    return value is not None and value is not False and value != []


class SamplingRequest(RequestBody):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)  # 0: only the most likely token
    top_k: int | None = Field(default=None, ge=-1, description="-1 or 0 keeps all tokens")
    min_p: float | None = Field(default=None, ge=0, le=1)  # vLLM's: 0 keeps all tokens
    repetition_penalty: float | None = Field(default=None, gt=0, le=10)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    stop: str | list[str] | None = Field(default=None)
    # any int64, as OpenAI's and vLLM's APIs take it; a negative one wraps into the generators' range (0 .. 2**63 - 1)
    seed: int | None = Field(default=None, ge=-SEED_LIMIT, lt=SEED_LIMIT)
    n: int = Field(default=1, ge=1, le=128)
    skip_special_tokens: bool = True  # vLLM's extra: false keeps <|im_start|> and the like in the text
    # vLLM's extras on stopping: tokens before a stop may end the reply; the model's end tokens do not stop it;
    # more tokens that do; the stop string (or token) that ended the reply stays in its text.
    min_tokens: int = Field(default=0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("n", "stream", "echo", "skip_special_tokens", "min_tokens", "ignore_eos",
                     "include_stop_str_in_output", mode="before", check_fields=False)
    @classmethod
    def null_is_default(cls, value: Any, info: ValidationInfo) -> Any:
        """OpenAI's API takes null for these as "not given" (its client sends n=None so)."""
        return cls.model_fields[info.field_name or ""].default if value is None else value

    # OpenAI fields that would change the answer, which this server does not implement: refused, not ignored.
    logit_bias: dict[str, float] | None = None
    best_of: int | None = Field(default=None, ge=1)
    suffix: str | None = None
    response_format: dict[str, Any] | None = None
    # vLLM's spellings of constrained decoding (response_format's kin): refused as it is, not ignored
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    structured_outputs: Any = None
    use_beam_search: Any = None
    bad_words: Any = None
    allowed_token_ids: Any = None
    prompt_logprobs: Any = None
    truncate_prompt_tokens: Any = None

    def check_unsupported(self) -> None:
        if self.best_of is not None and self.best_of < self.n:  # OpenAI's rule: the best n of best_of
            raise APIError(400, f"'best_of' ({self.best_of}) is less than 'n' ({self.n}); best_of must be at least n: "
                                "leave best_of out (this server returns n completions)", "best_of")
        given = {"logit_bias": bool(self.logit_bias), "best_of": (self.best_of or 1) > 1, "suffix": bool(self.suffix),
                 "response_format": (self.response_format or {}).get("type", "text") != "text",
                 **{name: getattr(self, name) is not None for name in GUIDED_DECODING},
                 **{name: asks_for(getattr(self, name)) for name in VLLM_UNSUPPORTED}}
        for name, used in given.items():
            if used:
                raise APIError(400, f"'{name}' is not supported by this server; leave it out", name)
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "'stream_options' is only allowed with 'stream': true", "stream_options")

    def tokens_limit(self) -> tuple[str, int | None]:
        """The field that caps the reply's tokens, and its value (None: not given)."""
        return "max_tokens", self.max_tokens

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise APIError(400, f"at most 4 stop sequences are allowed, got {len(stops)}", "stop")
        return stops


class CompletionRequest(SamplingRequest):
    # A string, a list of strings (one completion each), a list of token ids, or a list of such lists.
    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]]  # strict: true and false are no token ids
    logprobs: int | None = Field(default=None, ge=0, le=5, description="the sampled token's and the N most likely")
    # The prompt before the completion, with its tokens' logprobs when asked for: with max_tokens 0, how
    # evaluation harnesses (lm-evaluation-harness's loglikelihood tasks) score text through this API.
    echo: bool = False
    max_tokens: int | None = Field(default=None, ge=0)

    def logprobs_count(self) -> int | None:
        """None when no logprobs are asked for, else how many alternatives per token."""
        return self.logprobs


class ContentPart(BaseModel):
    """One part of a message's content: text, or another kind (an image...), refused by name when read."""
    model_config = ConfigDict(strict=True, extra="allow")

    type: str
    text: str | None = None
    refusal: str | None = None  # an assistant's refusal part (OpenAI's): text the model said


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")  # tool_calls, tool_call_id, name...: go to the template

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self, index: int) -> str:
        if not isinstance(self.content, list):
            return self.content or ""
        texts = []
        for k, part in enumerate(self.content):
            # OpenAI's assistant messages may hold refusal parts besides text ones: what it said, so text too
            kind = "refusal" if part.type == "refusal" and self.role == "assistant" else "text"
            said = part.refusal if kind == "refusal" else part.text
            if part.type != kind or said is None:
                what = f"a part of type '{part.type}'" if part.type != kind else f"a {kind} part without '{kind}'"
                raise APIError(400, f"messages[{index}].content holds {what}; this model reads text only: send "
                                    "its content as a string or text parts",
                               f"messages[{index}].content[{k}].{'type' if part.type != kind else kind}")
            texts.append(said)
        return "\n".join(texts)  # as vLLM and llama.cpp's server join the parts for a template that reads text


FUNCTION_TOOL = '{"type": "function", "function": {"name": ..., "parameters": {...}}}'  # a tool, as OpenAI's


class ChatInput(RequestBody):
    """A conversation and what its chat template takes besides: shared by chat requests and /tokenize."""

    messages: list[ChatMessage] = Field(min_length=1)
    # Variables for the model's chat template, as vLLM takes them: {"enable_thinking": false} asks a Qwen3
    # model to answer without thinking first.
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None  # function definitions, for a template that lists them
    add_generation_prompt: bool = True  # vLLM's: false renders the conversation without opening a reply
    # vLLM's: the reply continues the final message (a prefill); not implemented, so refused rather than ignored
    continue_final_message: bool = False

    def template_kwargs(self) -> dict[str, Any]:
        if self.continue_final_message:
            raise APIError(400, "'continue_final_message' is not supported by this server; leave it out (the "
                                "reply starts a new assistant turn)", "continue_final_message")
        given = self.chat_template_kwargs or {}
        if taken := sorted(given.keys() & {"messages", "add_generation_prompt"}):
            raise APIError(400, f"'chat_template_kwargs' may not set {', '.join(taken)}; the request's own fields "
                                "say that", "chat_template_kwargs")
        self.check_tools()
        # An empty list too, as vLLM passes it on: Transformers then picks a folder's tool_use template, which sees []
        return {**given, "tools": self.tools} if self.tools is not None else given

    def check_tools(self) -> None:
        """Each tool a function with a name, as OpenAI's and vLLM's APIs take them (no `type` reads as "function", as
        vLLM's): another kind (OpenAI's "custom") or a tool without its function would reach the template, which may
        list any JSON (official Qwen3 ones do), and a call of it would come back as a function's."""
        for i, tool in enumerate(self.tools or []):
            if (kind := tool.get("type", "function")) != "function":
                raise APIError(400, f"'tools[{i}].type' is {json.dumps(kind)}; this server calls function tools only: "
                                    f"give {FUNCTION_TOOL}", f"tools[{i}].type")
            function = tool.get("function")
            if not isinstance(function, dict):
                raise APIError(400, f"'tools[{i}].function' {'is missing' if function is None else 'is no object'}; "
                                    f"a tool is {FUNCTION_TOOL}", f"tools[{i}].function")
            if not isinstance(function.get("name"), str):
                raise APIError(400, f"'tools[{i}].function.name' is missing or no string; a tool is {FUNCTION_TOOL}",
                               f"tools[{i}].function.name")

    def uses_tools(self) -> bool:
        return bool(self.tools) or any((m.model_extra or {}).get("tool_calls") for m in self.messages or [])

    def chat_messages(self) -> list[dict[str, Any]]:
        """{"role", "content"} dicts (and any other fields a message has, such as tool_calls) for the chat
        template; OpenAI's `developer` role is the system prompt. Only an assistant's may be null (its tool calls
        say it all)."""
        for i, m in enumerate(self.messages or []):
            if m.content is None and m.role != "assistant":
                raise APIError(400, f"messages[{i}] ({m.role}) has no content; give its text", f"messages[{i}].content")
        return [{**(m.model_extra or {}), "role": "system" if m.role == "developer" else m.role,
                 "content": m.text(i)} for i, m in enumerate(self.messages or [])]


class ChatRequest(SamplingRequest, ChatInput):
    max_completion_tokens: int | None = Field(default=None, ge=1)  # OpenAI's newer name for max_tokens
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    # "auto" or "none"; forcing a call ("required", or a named function) needs constrained decoding, which this
    # server does not do: refused by name in check_unsupported, not with pydantic's wording
    tool_choice: str | dict[str, Any] | None = None
    functions: list[Any] | None = None  # OpenAI's older spelling of tools: refused with the way to send them
    function_call: Any = None
    modalities: list[str] | None = None  # OpenAI's ["text", "audio"] asks for a spoken reply too
    echo: Any = None  # vLLM's, for chat: the reply starts with the last message when it is the assistant's
    audio: dict[str, Any] | None = None  # the spoken reply's voice and format

    def tokens_limit(self) -> tuple[str, int | None]:
        if self.max_completion_tokens is not None:  # OpenAI's newer name wins
            return "max_completion_tokens", self.max_completion_tokens
        return super().tokens_limit()

    def check_unsupported(self) -> None:
        super().check_unsupported()
        beyond_text = set(self.modalities or ["text"]) != {"text"}
        if beyond_text or self.audio is not None:
            raise APIError(400, "this model writes text only: audio replies are not supported; leave out 'audio' "
                                "and give 'modalities' as [\"text\"] or not at all",
                           "modalities" if beyond_text else "audio")
        if asks_for(self.echo):
            raise APIError(400, "'echo' is not supported in chat requests by this server; leave it out (completions "
                                "take it)", "echo")
        for name in ("functions", "function_call"):
            if getattr(self, name) is not None:
                raise APIError(400, f"'{name}' (OpenAI's older form of tools) is not supported; send the functions "
                                    "as 'tools': [{\"type\": \"function\", \"function\": {...}}]", name)
        for name in ("tool_choice", "parallel_tool_calls"):  # OpenAI's 400s, in its words ("none" and false too)
            if getattr(self, name) is not None and not self.tools:
                raise APIError(400, f"Invalid value for '{name}': '{name}' is only allowed when 'tools' are "
                                    "specified.", name)
        if isinstance(self.tool_choice, str) and self.tool_choice not in ("auto", "none", "required"):
            raise APIError(400, f"Invalid value for 'tool_choice': {json.dumps(self.tool_choice)}; give \"auto\" (the "
                                "model decides) or \"none\"", "tool_choice")
        if isinstance(self.tool_choice, dict) and self.tool_choice.get("type") == "allowed_tools":  # OpenAI's subset
            raise APIError(400, "'tool_choice' of type \"allowed_tools\" is not supported; send the allowed tools "
                                "alone as 'tools', with \"auto\" (the model decides among them)", "tool_choice")
        # strict: OpenAI's promise that a tool's calls fit its schema, which takes constrained decoding, as forcing a
        # call does; taken and not kept, a client that relies on it fails later, on arguments it never checks
        for i, tool in enumerate(self.tools or []):
            function = tool.get("function")
            if isinstance(function, dict) and function.get("strict") is True:
                raise APIError(400, f"'tools[{i}].function.strict' is true, which this server cannot keep: it does not "
                                    "constrain decoding, so a call's arguments are the JSON the model wrote, unchecked "
                                    "against the schema; leave 'strict' out (or false) and check them yourself",
                               f"tools[{i}].function.strict")
        if self.tool_choice not in (None, "auto", "none"):
            given = json.dumps(self.tool_choice) if isinstance(self.tool_choice, str) else "naming a tool"
            raise APIError(400, f"'tool_choice' {given} is not supported: this server cannot "
                                "force a tool call (that needs constrained decoding); give \"auto\" (the model "
                                "decides) or \"none\"", "tool_choice")

    parallel_tool_calls: bool | None = None  # false: one call at most

    def parses_tool_calls(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"

    def most_tool_calls(self) -> int | None:
        """How many of a reply's tool calls it answers (None: all). The model may still write more; the later
        ones are dropped, as vLLM drops them."""
        return 1 if self.parallel_tool_calls is False else None

    def logprobs_count(self) -> int | None:
        """None when no logprobs are asked for, else how many alternatives per token."""
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


class TokenizeRequest(ChatInput):
    """POST /tokenize, as vLLM takes it: a `prompt`, or chat `messages` rendered by the chat template."""

    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)  # type: ignore[assignment]


TOOL_CALL_OPEN = "<tool_call>"
# Only a block holding a JSON object: a stray "<tool_call>" mentioned before the call (in thinking, say)
# must not swallow it.
TOOL_CALL = re.compile(r"<tool_call>\s*(\{(?:(?!</?tool_call>).)*?\})\s*</tool_call>", re.DOTALL)  # within one block


def split_tool_calls(text: str, most: int | None = None) -> tuple[str, list[dict[str, Any]]]:
    """A reply's text without its tool calls, and the first `most` calls (None: all) in OpenAI's shape. Qwen3
    writes a call as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (the Hermes format vLLM parses);
    a block that does not hold such JSON stays in the text, as does an unclosed one (a reply cut at max_tokens)."""
    calls: list[dict[str, Any]] = []

    def take(match: re.Match[str]) -> str:
        try:
            call = json.loads(match[1])
        except ValueError:
            return match[0]
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return match[0]
        arguments = call.get("arguments", {})
        calls.append({"id": new_id("call_"), "type": "function", "function": {
            "name": call["name"],
            "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)}})
        return ""

    return TOOL_CALL.sub(take, text), calls[:most]


def reason_with_calls(reason: str) -> str:
    """A reply that ended on its own with tool calls in it finished to call them (one cut short did not)."""
    return "tool_calls" if reason == "stop" else reason


class ToolCallStream:
    """One streamed choice's text with its tool calls taken out: from the first `<tool_call>` on, the text
    is held back until the end, where `finish` parses it, so that what `push` and `finish` give adds up
    to the non-streamed message (`split_tool_calls` of the whole text, whose content is None when it is only
    blanks besides the calls: so blanks that open the reply are held too, until text or the end shows which)."""

    def __init__(self, most_calls: int | None = None) -> None:
        self.most_calls = most_calls  # the calls `finish` gives at most (None: all)
        self.held = ""
        self.calling = False
        self.blank = True  # nothing but blanks sent so far

    def push(self, text: str) -> str:
        """What of the text so far may be sent now: nothing of a call, nor what may start one."""
        text = self.held + text
        if self.calling:
            self.held = text
            return ""
        if (at := text.find(TOOL_CALL_OPEN)) >= 0:
            self.calling, cut = True, at
        else:
            cut = len(text) - next((n for n in range(min(len(text), len(TOOL_CALL_OPEN) - 1), 0, -1)
                                    if TOOL_CALL_OPEN.startswith(text[-n:])), 0)  # a marker cut between two pieces
        if self.blank and not text[:cut].strip():
            cut = 0
        self.blank = self.blank and not text[:cut].strip()
        self.held = text[cut:]
        return text[:cut]

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """The text held back, less its calls (nothing, when that and all sent before are blanks besides the
        calls); and the calls."""
        rest, calls = split_tool_calls(self.held, self.most_calls)
        return ("" if calls and self.blank and not rest.strip() else rest), calls


def holds_lone_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")  # at C speed; only a surrogate cannot be encoded
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, BaseModel):
        return (any(holds_lone_surrogate(getattr(value, name)) for name in type(value).model_fields)
                or holds_lone_surrogate(value.model_extra or {}))
    if isinstance(value, dict):
        return any(holds_lone_surrogate(k) or holds_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return any(holds_lone_surrogate(v) for v in value)
    return False


def new_id(prefix: str) -> str:
    """An id shaped as OpenAI's: "chatcmpl-...", "cmpl-...", "call_..." (the prefix holds its separator)."""
    return f"{prefix}{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
