"""The offline Qwen3 tokenizer equals a tiktoken encoding of the official ranks."""

from __future__ import annotations

import importlib.util
import json
import shlex
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tiktoken
import transformers

import nanoqwen.tokenizer
from nanoqwen.errors import NanoQwenError
from nanoqwen.tokenizer import (
    QWEN_FIRST_SPECIAL_ID,
    QWEN_PATTERN,
    QWEN_SPECIAL_TOKENS,
    Tokenizer,
    find_qwen_tiktoken,
    load_tiktoken_ranks,
    load_tokenizer,
    qwen3_tokenizer,
    train_bpe,
)
from tests.hf_helpers import TRANSFORMERS_5
from tests.serve_helpers import THINKING_TEMPLATE

TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "Le cœur a ses raisons que la raison ne connaît point. Ça coûte 12,50 € à Zürich.",
    "Привет, как дела? Ελληνικά κείμενα. עברית וערבית: مرحبا بالعالم",
    "日本語の文章と中文文本，还有한국어 문장도 있습니다。",
    "def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # O(2^n)\n",
    "for (int i = 0; i < 10; ++i) { printf(\"%d\\n\", i); }\r\n\tif(x!=y)return;",
    "emoji: 🤖🎉👨‍👩‍👧‍👦 🇫🇷 ❤️ and digits 1234567890 3.14159 1,000,000",
    "whitespace   runs\t\t\tand\n\n\n\nnewlines     \n   trailing   ",
    "e\u0301 (decomposed é) Å ﬁ contractions: I'M you'RE they'll we'd it's",
]


@pytest.fixture(scope="module")
def official():
    return qwen3_tokenizer()


@pytest.fixture(scope="module")
def reference():
    ranks = load_tiktoken_ranks(find_qwen_tiktoken())
    specials = {t: QWEN_FIRST_SPECIAL_ID + i for i, t in enumerate(QWEN_SPECIAL_TOKENS)}
    return tiktoken.Encoding("qwen", pat_str=QWEN_PATTERN, mergeable_ranks=ranks, special_tokens=specials)


@pytest.mark.parametrize("text", TEXTS)
def test_ids_equal_tiktoken(official, reference, text):
    assert official.encode(text) == reference.encode(unicodedata.normalize("NFC", text), disallowed_special=())
    assert official.decode(official.encode(text)) == unicodedata.normalize("NFC", text)


def test_known_ids(official):
    assert official.encode("Hello") == [9707]
    assert official.encode(" world") == [1879]
    assert official.encode(" Hello") == [21927]
    assert official.vocab_size == 151669


def test_added_tokens_round_trip(official):
    assert len(QWEN_SPECIAL_TOKENS) == 26
    for offset, token in enumerate(QWEN_SPECIAL_TOKENS):
        assert official.encode(token) == [QWEN_FIRST_SPECIAL_ID + offset]
        assert official.decode([QWEN_FIRST_SPECIAL_ID + offset]) == token
    text = "<|im_start|>user\nhi<|im_end|>\n<think>x</think><|endoftext|>"
    assert official.decode(official.encode(text)) == text
    assert official.stop_ids == [151645, 151643] and official.eot_id == 151643


def test_saved_folder_loads_in_transformers(official, tmp_path):
    official.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS + ["<|im_start|>system\nx<|im_end|>"]:
        assert hf(text)["input_ids"] == official.encode(text)
    assert hf.eos_token == "<|im_end|>" and hf.pad_token == "<|endoftext|>" and hf.bos_token is None
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    for add_generation_prompt in (True, False):
        rendered = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert rendered == official.render_chat(messages, add_generation_prompt)
    assert load_tokenizer(tmp_path).encode(TEXTS[3]) == official.encode(TEXTS[3])
    # As in official folders, thinking, tool-call and code-infilling markers are text, not special tokens:
    # decoding with skip_special_tokens (pipelines, vLLM) keeps them, in tokenizer.json and the config alike.
    ids = official.encode("<think>I</think><tool_call><|fim_prefix|><|im_end|><|endoftext|>")
    assert hf.decode(ids, skip_special_tokens=True) == "<think>I</think><tool_call><|fim_prefix|>"
    flags = json.loads((tmp_path / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    assert [flags[str(QWEN_FIRST_SPECIAL_ID + i)]["special"] for i in range(26)] == [True] * 14 + [False] * 12
    resaved = tmp_path / "resaved"  # and a save of a loaded folder keeps each token's own flag
    resaved.mkdir()
    load_tokenizer(tmp_path).save(resaved)
    assert json.loads((resaved / "tokenizer_config.json").read_text())["added_tokens_decoder"] == flags


@pytest.mark.parametrize("added, settings, words", [
    ({"<|my_tok|>": {"special": True}}, {},
     "adds <|my_tok|> (id ... which tokenizer.json lacks; Transformers adds it as it loads"),
    # (a piece of its vocabulary there: Transformers splits "the cat" around it, as "the c", "at")
    ({"at": {"special": True}}, {}, "adds at (id ... which tokenizer.json has as a vocabulary entry, not an added "
                                    "token; Transformers adds it as it loads"),
    ({"<|im_start|>": {"lstrip": True, "rstrip": False, "special": True}}, {},
     "gives <|im_start|> lstrip true, tokenizer.json false; ... save_pretrained"),
    ({}, {"split_special_tokens": True}, "sets split_special_tokens true, ... set it to false"),
])
def test_a_tokenizer_config_that_splits_text_otherwise_is_refused(tmp_path, added, settings, words):
    # Transformers takes tokenizer_config.json's word over tokenizer.json's: it adds the tokens that file lacks (a
    # hand-edited config), strips around them as the config says, and may read special tokens as plain text. Read
    # otherwise, the same text would give other ids: one line, saying what to do.
    tokenizer = train_bpe(["the cat sat on the mat"] * 20, 300)
    tokenizer.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    for content, flags in added.items():
        config["added_tokens_decoder"][str(tokenizer.token_id(content) or tokenizer.vocab_size)] = {
            "content": content, **flags}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, **settings}))
    with pytest.raises(NanoQwenError) as caught:
        load_tokenizer(tmp_path)
    message = str(caught.value)
    first, fix = words.split(" ... ")
    assert f"tokenizer_config.json {first}" in message and fix in message and "\n" not in message, message


@pytest.mark.parametrize("where", ["tokenizer_config.json", "chat_template.jinja", "both"])
def test_a_folders_own_chat_template_and_eos_survive_a_save(official, tmp_path, where):
    # As official Qwen3 Base folders come: their own template (thinking, tools) and <|endoftext|> as eos.
    template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}THEIRS"
    (tmp_path / "theirs").mkdir()
    (tmp_path / "ours").mkdir()
    official.save(tmp_path / "theirs")
    config = json.loads((tmp_path / "theirs" / "tokenizer_config.json").read_text())
    config["eos_token"], config["model_max_length"] = "<|endoftext|>", 262144
    if where == "tokenizer_config.json":
        config["chat_template"] = template
    else:  # with both, chat_template.jinja wins, as in Transformers
        config["chat_template"] = "NOT THIS" if where == "both" else None
        (tmp_path / "theirs" / "chat_template.jinja").write_text(template)
    (tmp_path / "theirs" / "tokenizer_config.json").write_text(json.dumps(config))
    load_tokenizer(tmp_path / "theirs").save(tmp_path / "ours")  # what prepare and every checkpoint do
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "ours")
    assert hf.eos_token == "<|endoftext|>" and hf.model_max_length == 262144
    rendered = hf.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert rendered == "<|im_start|>user\nHi<|im_end|>\nTHEIRS"
    if where != "both":  # the rest does not depend on where the template is: checked once
        return
    # Into a checkpoint: the model's context, so Transformers truncates where the model must (and a longer
    # context set for a model trained on from this checkpoint is not held to this one's).
    for context in (4096, 10**6):
        (tmp_path / "checkpoint").mkdir(exist_ok=True)
        load_tokenizer(tmp_path / "theirs").save(tmp_path / "checkpoint", context=context)
        assert transformers.AutoTokenizer.from_pretrained(tmp_path / "checkpoint").model_max_length == context


def test_text_bytes_of_a_whole_split_counts_each_token_as_token_bytes_does() -> None:
    # Over as many tokens as the vocabulary holds, text_bytes sums a table of each id's bytes: it must count as
    # token_bytes does, token by token (a mark none, an added word its own, part of a character its bytes).
    from tokenizers import AddedToken

    tok = train_bpe(["Café 🙂 中文 naïve"] * 5, 300)
    tok.hf.add_tokens(["foo_bar"])
    tok.hf.add_special_tokens([AddedToken("<mask>", special=True), "<think>"])
    one_by_one = [0 if i in tok.mark_ids else len(tok.token_bytes(i)) for i in range(tok.vocab_size)]
    assert [one_by_one[tok.token_id(t)] for t in ("foo_bar", "<mask>", "<think>", "<|endoftext|>")] == [7, 0, 0, 0]
    assert [tok.token_bytes(i) for i in tok.encode("🙂")] == [b"\xf0\x9f", b"\x99\x82"]  # a character cut in two
    for token_id, count in enumerate(one_by_one):
        assert tok.text_bytes(np.full(tok.vocab_size, token_id)) == tok.vocab_size * count, token_id
        assert tok.text_bytes([token_id]) == count  # fewer tokens than the vocabulary: counted one by one
    text = "Café 🙂 foo_bar 中文"
    ids = [*tok.encode(text), tok.token_id("<think>"), tok.eot_id] * tok.vocab_size
    assert tok.text_bytes(ids) == tok.text_bytes(np.array(ids, dtype=np.uint16)) == \
        tok.vocab_size * len(unicodedata.normalize("NFC", text).encode())
    assert tok.text_bytes([*ids, tok.vocab_size + 5]) == tok.text_bytes(ids)  # an id past the vocabulary: none


def test_vocabulary_equals_transformers_tiktoken_conversion(official):
    # The regular vocabulary, string for string and id for id, is what Transformers' own converter makes of
    # the same ranks; the 26 specials sit at the official ids (test_added_tokens_round_trip). So an official
    # tokenizer.json has the same fingerprint, and data prepared with `--tokenizer qwen3` suits official weights.
    from tiktoken.load import read_file
    from transformers.convert_slow_tokenizer import TikTokenConverter

    try:
        read_file(str(find_qwen_tiktoken()))
    except ImportError:  # (nanoqwen reads the ranks itself, with no blobfile)
        pytest.skip("this tiktoken reads a local rank file only through blobfile, which is not installed")
    converted = TikTokenConverter(vocab_file=str(find_qwen_tiktoken()), pattern=QWEN_PATTERN,
                                  additional_special_tokens=QWEN_SPECIAL_TOKENS).converted()
    theirs = converted.get_vocab(with_added_tokens=False)
    ours = {k: v for k, v in official.hf.get_vocab(with_added_tokens=True).items() if k not in QWEN_SPECIAL_TOKENS}
    assert len(ours) == QWEN_FIRST_SPECIAL_ID and ours == theirs


CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "<think>\nA greeting.\n</think>\n\nHello!"},
                {"role": "tool", "content": "{}"}, {"role": "user", "content": "Again, ça va?"}]


@pytest.mark.parametrize("template_kwargs", [{}, {"enable_thinking": False}, {"enable_thinking": True}])
def test_a_folders_own_chat_template_renders_as_transformers(official, tmp_path, template_kwargs):
    official.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": THINKING_TEMPLATE}))
    ours, hf = load_tokenizer(tmp_path), transformers.AutoTokenizer.from_pretrained(tmp_path)
    for add_generation_prompt in (True, False):
        expected = hf.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=add_generation_prompt,
                                          **template_kwargs)
        assert ours.render_chat(CONVERSATION, add_generation_prompt, **template_kwargs) == expected
    assert ours.thinking_switch and not official.thinking_switch
    assert ("<think>\n\n</think>" in ours.render_chat(CONVERSATION, **template_kwargs)) == (
        template_kwargs.get("enable_thinking") is False)
    # Tools and an earlier reply's tool calls reach the template as Transformers passes them.
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    calls = [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    expected = hf.apply_chat_template(calls, tools=tools, tokenize=False, add_generation_prompt=True,
                                      **template_kwargs)
    assert ours.render_chat(calls, tools=tools, **template_kwargs) == expected
    assert '# Tools\nget_weather' in expected and '<tool_call>get_weather {"city": "Oslo"}</tool_call>' in expected
    # The template's own refusal is one line, as Transformers raises it.
    with pytest.raises(NanoQwenError, match="chat template refused these messages: the system message must come"):
        ours.render_chat(CONVERSATION[1:2] + CONVERSATION[:1])


def save_with_template(tokenizer: Tokenizer, folder: Path, template: str | list[dict[str, str]]) -> Path:
    """`tokenizer` saved to `folder` with `template` as its chat template, for both libraries to load."""
    tokenizer.save(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_of_two_chat_templates_of_one_name_the_later_renders_as_in_transformers(tmp_path):
    # Transformers reads a list of named templates into a dict: of two of a name, the later one renders.
    save_with_template(train_bpe(["the cat sat"] * 20, 300), tmp_path, [
        {"name": "default", "template": "FIRST"}, {"name": "default", "template": "LATER {{ messages[0].content }}"}])
    messages = [{"role": "user", "content": "hi"}]
    assert load_tokenizer(tmp_path).render_chat(messages, add_generation_prompt=False) == "LATER hi"
    assert transformers.AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(messages, tokenize=False) \
        == "LATER hi"


def test_qwens_text_tokens_stand_for_no_bytes_of_text(official):
    # <think> and </think> are `special: false` in Qwen3 folders, yet only a chat template writes their ids (a text
    # holding "<think>" is encoded as its characters): they count no bytes, as prepare counts a split's.
    think, end, text = official.token_id("<think>"), official.token_id("</think>"), official.encode("hi there")
    assert not official.hf.get_added_tokens_decoder()[think].special
    assert official.text_bytes([think, *text, end]) == len(b"hi there")


def test_a_template_marking_generation_renders_as_transformers(official, tmp_path):
    # {% generation %} marks the reply's tokens for assistant-only losses; Transformers renders its body.
    save_with_template(official, tmp_path, "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}<A>"
                       "{{ m.content }}</A>{% endgeneration %}{% else %}{{ m.content }}{% endif %}{% endfor %}")
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    expected = transformers.AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(messages, tokenize=False)
    assert load_tokenizer(tmp_path).render_chat(messages, add_generation_prompt=False) == expected == "hi<A>yo</A>"


@pytest.mark.parametrize("content", [[{"type": "text", "text": "Hi"}], None, 5])
def test_chatml_refuses_content_that_is_not_text_as_transformers_does(official, tmp_path, content):
    # Callers join text parts first (prepare, the server); written as it came, a list was its Python repr.
    official.save(tmp_path)
    messages = [{"role": "user", "content": content}]
    with pytest.raises(Exception):  # noqa: B017 (a TypeError or jinja's UndefinedError)
        transformers.AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(messages, tokenize=False)
    with pytest.raises(NanoQwenError, match="messages\\[0\\] has no text content"):
        official.render_chat(messages)


def test_a_template_sees_what_transformers_passes_it(official, tmp_path):
    # tools and documents are none when not given (not undefined), and a reply's thinking under any name clients
    # send it (vLLM's newer `reasoning`) is reasoning_content and thinking too, as Transformers 5 renders them.
    save_with_template(official, tmp_path, "{{ tools is none }} {{ documents is none }}{% for m in messages %} "
                       "{{ m.content }}:{{ m.reasoning_content }}/{{ m.thinking }}{% endfor %}")
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "reasoning": "why"},
                {"role": "assistant", "content": "ok", "thinking": "hm", "reasoning_content": "hmm"}]
    rendered = load_tokenizer(tmp_path).render_chat(messages, add_generation_prompt=False)
    assert rendered == "True True hi:/ yo:why/why ok:hmm/hm"
    from transformers.utils import chat_template_utils

    if hasattr(chat_template_utils, "_alias_reasoning_fields"):  # older versions pass the names as given
        assert transformers.AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(messages, tokenize=False) \
            == rendered


def test_a_template_is_trimmed_and_given_the_special_tokens_as_in_transformers(official, tmp_path):
    # Block tags alone on their (indented) lines leave no text, tojson keeps non-ASCII text as it is, and the
    # folder's eos_token and pad_token are variables, as Transformers renders a template.
    save_with_template(official, tmp_path, "{{ eos_token }} {{ pad_token }}\n  {% for m in messages %}\n"
                       "{{ m.content | tojson }}\n  {% endfor %}\n")
    messages = [{"role": "user", "content": "hé"}, {"role": "assistant", "content": "ok"}]
    rendered = load_tokenizer(tmp_path).render_chat(messages, add_generation_prompt=False)
    assert rendered == '<|im_end|> <|endoftext|>\n"hé"\n"ok"\n'
    assert transformers.AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(messages, tokenize=False) \
        == rendered


def test_named_templates_chat_with_the_default_and_the_switch_needs_enable_thinking(official, tmp_path):
    loop = "{% for m in messages %}<{{ m.content }}>{% endfor %}"
    save_with_template(official, tmp_path, [{"name": "tool_use", "template": "TOOLS" + loop},
                                            {"name": "default", "template": loop}])
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.render_chat([{"role": "user", "content": "hi"}], add_generation_prompt=False) == "<hi>"
    assert not tokenizer.thinking_switch  # a template of its own, but nothing that turns thinking off
    save_with_template(official, tmp_path, [{"name": "tool_use", "template": "TOOLS" + loop},
                                            {"name": "default", "template": loop + "{% if enable_thinking is defined %}"
                                             "{% endif %}"}])
    assert load_tokenizer(tmp_path).thinking_switch


def test_named_templates_saved_as_a_mapping_chat_as_in_transformers(official, tmp_path):
    # A tokenizer_config.json whose chat_template maps names to templates, which Transformers reads as it reads a list
    # of {"name", "template"}: nanoqwen read it as no template at all, and chatted in ChatML.
    loop = "{% for m in messages %}<{{ m.content }}>{% endfor %}"
    save_with_template(official, tmp_path, {"default": loop, "tool_use": "TOOLS" + loop})
    tokenizer, reference = load_tokenizer(tmp_path), transformers.AutoTokenizer.from_pretrained(tmp_path)
    messages, tools = [{"role": "user", "content": "hi"}], [{"type": "function", "function": {"name": "f"}}]
    rendered = [tokenizer.render_chat(messages, add_generation_prompt=False, tools=given) for given in (None, tools)]
    assert rendered == ["<hi>", "TOOLS<hi>"] == \
        [reference.apply_chat_template(messages, tools=given, tokenize=False) for given in (None, tools)]


def test_a_broken_chat_template_is_one_line(official, tmp_path):
    official.save(tmp_path)
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }")
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.encode("Hello") == [9707]  # the rest of the tokenizer still works (prepare, training)
    with pytest.raises(NanoQwenError, match="chat template is not valid Jinja"):
        tokenizer.render_chat(CONVERSATION)
    # A template file that is not UTF-8 text: the folder is damaged, said in one line (it was a traceback)
    (tmp_path / "chat_template.jinja").write_bytes(b"{{ messages[0].content }}\xff\xfe")
    with pytest.raises(NanoQwenError, match=r"the tokenizer in .* is damaged \(.*utf-8"):
        load_tokenizer(tmp_path)


def test_a_changed_build_of_the_qwen3_tokenizer_is_not_hidden_by_the_cache(tmp_path):
    # The built tokenizer was cached under a fixed name: a build that changed (here <think> made special again)
    # still read the files an older one had cached, until someone renamed the folder by hand.
    source = Path(nanoqwen.tokenizer.__file__).read_text()
    changed = source.replace("QWEN_TEXT_TOKENS = frozenset(QWEN_SPECIAL_TOKENS[14:])",
                             "QWEN_TEXT_TOKENS = frozenset(QWEN_SPECIAL_TOKENS[14:-2])")
    assert changed != source
    (tmp_path / "changed_tokenizer.py").write_text(changed)
    spec = importlib.util.spec_from_file_location("changed_tokenizer", tmp_path / "changed_tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.qwen3_cache_folder().parent == nanoqwen.tokenizer.qwen3_cache_folder().parent
    assert module.qwen3_cache_folder() != nanoqwen.tokenizer.qwen3_cache_folder()


def test_folders_of_other_qwen3_tokenizer_builds_are_pruned_when_nothing_uses_them(tmp_path):
    # Every upgrade left its ~18 MB folder behind for good. A folder another process holds (this version's readers
    # lock theirs while they live) or read within STALE_AFTER_DAYS (older versions take no lock) stays.
    import fcntl
    import os
    import time

    own = os.open(nanoqwen.tokenizer._qwen3_cached_folder(), os.O_RDONLY)
    with pytest.raises(BlockingIOError):  # this process holds its own folder
        fcntl.flock(own, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(own)
    long_ago = time.time() - (nanoqwen.tokenizer.STALE_AFTER_DAYS + 1) * 86400
    current, held, recent = (f"qwen3-tokenizer-{digit * 16}" for digit in "012")
    for name in ("qwen3-tokenizer", "qwen3-tokenizer-2", current, held, recent, "qwen3-tokenizer-mine",
                 f".{current}.tmp-1-x"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "tokenizer.json").write_text("{}")
        for path in (tmp_path / name / "tokenizer.json", tmp_path / name)[name == recent:]:  # recent: read now
            os.utime(path, (long_ago, long_ago))
    # A link named as a build's is the user's, kept (it was renamed to a hidden name and left there, rmtree
    # refusing links), as is the folder it points at
    linked = f"qwen3-tokenizer-{'3' * 16}"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "tokenizer.json").write_text("{}")
    for path in (tmp_path / "mine" / "tokenizer.json", tmp_path / "mine"):
        os.utime(path, (long_ago, long_ago))
    (tmp_path / linked).symlink_to(tmp_path / "mine")
    reader = os.open(tmp_path / held, os.O_RDONLY)
    fcntl.flock(reader, fcntl.LOCK_SH)
    nanoqwen.tokenizer.prune_stale_qwen3_folders(tmp_path / current)
    os.close(reader)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([
        f".{current}.tmp-1-x", current, held, recent,  # a writer's, this build's, held by a reader, read lately
        linked, "mine", "qwen3-tokenizer-mine",  # a link, and names a build never gives
    ])
    assert (tmp_path / linked / "tokenizer.json").read_text() == "{}"


def test_a_qwen3_tokenizer_reader_waits_for_a_prune_that_holds_the_folder(tmp_path):
    # A prune holds its exclusive lock while it renames a folder away: a reader's shared lock waits for it (then sees
    # whether the folder is still there), where one that gave up at once read on, unlocked, a folder being deleted.
    import fcntl
    import os
    import threading

    pruner = os.open(tmp_path, os.O_RDONLY)
    fcntl.flock(pruner, fcntl.LOCK_EX)
    locked: list[int | None] = []
    reader = threading.Thread(target=lambda: locked.append(nanoqwen.tokenizer._lock(tmp_path, exclusive=False)))
    reader.start()
    reader.join(timeout=0.5)
    waited = reader.is_alive()  # (it waits for as long as the prune holds the folder: no time is right to check)
    os.close(pruner)
    reader.join()
    assert waited and locked[0] is not None
    os.close(locked[0])


def test_a_qwen3_tokenizer_folder_renamed_away_while_its_lock_was_awaited_is_not_held(tmp_path):
    # A reader waits for its shared lock while a prune renames the folder away: it must see the folder it locked is
    # no longer at the name (and close it, then build anew). os.stat raised FileNotFoundError there, the open
    # folder left behind in the process, locked, for good.
    import os

    folder = tmp_path / "qwen3-tokenizer"
    folder.mkdir()
    fd = os.open(folder, os.O_RDONLY)
    try:
        assert nanoqwen.tokenizer._still_named(folder, fd)
        folder.rename(tmp_path / ".qwen3-tokenizer.tmp-1-stale")
        assert not nanoqwen.tokenizer._still_named(folder, fd)
        folder.mkdir()  # built anew at the name: another folder
        assert not nanoqwen.tokenizer._still_named(folder, fd)
    finally:
        os.close(fd)


@pytest.mark.parametrize("finished_before", ["sync_tree", "rename_patiently"])
def test_of_two_processes_building_the_qwen3_tokenizer_cache_at_once_the_later_uses_the_earliers(
        official, tmp_path, monkeypatch, finished_before):
    # torchrun's ranks (or two runs started together) each build the cache the first time it is loaded. One that
    # found the folder missing and was beaten to the rename failed "cannot replace ... (Directory not empty)"; one
    # beaten while it synced its files swapped its copy for the other's, which that other process had just locked.
    # The second to finish keeps the first's folder and uses it silently (the files are the same).
    import os

    import nanoqwen.io

    monkeypatch.setenv("NANOQWEN_CACHE", str(tmp_path))
    monkeypatch.setattr(nanoqwen.tokenizer, "build_qwen3_tokenizer", lambda: official.hf)  # the build: seconds
    monkeypatch.setattr(nanoqwen.tokenizer, "_held_locks", [])
    folder = nanoqwen.tokenizer.qwen3_cache_folder()
    real = getattr(nanoqwen.io, finished_before)
    others: list[int] = []  # the inode of the folder the other process put in place

    def other_process_finishes_first(*args):
        if not others:
            others.append(0)
            with nanoqwen.io.atomic_dir(folder, keep_existing=True) as other:
                Tokenizer(official.hf).save(other)
            others[0] = folder.stat().st_ino
        return real(*args)

    monkeypatch.setattr(nanoqwen.io, finished_before, other_process_finishes_first)
    nanoqwen.tokenizer._qwen3_cached_folder.cache_clear()
    try:
        assert nanoqwen.tokenizer._qwen3_cached_folder() == folder
    finally:
        nanoqwen.tokenizer._qwen3_cached_folder.cache_clear()  # the next test's is the session's cache
        for fd in nanoqwen.tokenizer._held_locks:
            os.close(fd)
    assert folder.stat().st_ino == others[0] and os.listdir(tmp_path) == [folder.name]  # no copy left behind
    assert load_tokenizer(folder).encode(TEXTS[0]) == official.encode(TEXTS[0])


def test_a_folder_with_only_the_slow_tokenizer_files_says_how_to_write_tokenizer_json(tmp_path: Path) -> None:
    # A fine-tune saved with vocab.json + merges.txt alone was pointed at `nanoqwen tokenizer qwen3`, which would
    # swap in another tokenizer than the one its weights were trained with.
    (tmp_path / "vocab.json").write_text("{}")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    # Without tokenizer_config.json (or a model's config.json), Transformers cannot tell which tokenizer reads them
    # (nor its special tokens): the command given failed with its "Unrecognized model" traceback.
    with pytest.raises(NanoQwenError) as refusal:
        load_tokenizer(tmp_path)
    assert str(refusal.value) == (
        f"{tmp_path} has vocab.json and merges.txt but no tokenizer.json, which nanoqwen reads, nor the "
        "tokenizer_config.json that says which tokenizer they are (and its special tokens); copy tokenizer.json, or "
        "tokenizer_config.json, from the folder the model came from")
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "Qwen2Tokenizer"}')
    odd = tmp_path.rename(tmp_path.with_name(tmp_path.name + " it's $HOME"))  # the shell line holds any path
    with pytest.raises(NanoQwenError) as refusal:
        load_tokenizer(odd)
    assert str(refusal.value) == (
        f"{odd} has vocab.json and merges.txt but no tokenizer.json, which nanoqwen reads; write it with "
        "Transformers: python -c \"import sys; from transformers import AutoTokenizer as T; "
        f"T.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[1])\" {shlex.quote(str(odd))}")
    command = str(refusal.value).split("write it with Transformers: ", 1)[1]
    assert shlex.split(command)[-1] == str(odd)


def test_a_tokenizer_json_saved_truncating_or_padding_encodes_prompts_whole(tmp_path: Path) -> None:
    # A folder saved after a call with truncation or padding keeps them in tokenizer.json; Transformers encodes
    # without them unless asked, but chat, serve and sample read the prompt cut to 4 tokens, or padded with
    # <|endoftext|> to the batch's longest.
    tokenizer = train_bpe(["the cat sat on the mat"] * 20, 300)
    tokenizer.hf.enable_truncation(max_length=4)
    tokenizer.hf.enable_padding(pad_id=tokenizer.eot_id, pad_token="<|endoftext|>")
    tokenizer.save(tmp_path)
    hf, ours = transformers.AutoTokenizer.from_pretrained(tmp_path), load_tokenizer(tmp_path)
    texts = ["the", "the cat sat on the mat"]
    assert ours.encode(texts[1]) == hf(texts[1])["input_ids"] and len(ours.encode(texts[1])) > 4
    assert ours.encode_batch(texts) == hf(texts)["input_ids"]


def test_a_tokenizer_json_saved_padding_alone_encodes_prompts_whole(tmp_path: Path) -> None:
    # Padding without truncation is kept in tokenizer.json too: a batch of prompts came back padded with
    # <|endoftext|> to its longest, where Transformers encodes each whole and no longer.
    tokenizer = train_bpe(["the cat sat on the mat"] * 20, 300)
    tokenizer.hf.enable_padding(pad_id=tokenizer.eot_id, pad_token="<|endoftext|>")
    tokenizer.save(tmp_path)
    texts = ["the", "the cat sat on the mat"]
    ours = load_tokenizer(tmp_path).encode_batch(texts)
    assert ours == transformers.AutoTokenizer.from_pretrained(tmp_path)(texts)["input_ids"]
    assert len(ours[0]) < len(ours[1])


def test_a_template_sees_no_field_a_message_gives_as_null(official, tmp_path):
    # Transformers drops a message's null fields before rendering (OpenAI clients send an assistant's tool-call turn
    # with "content": null): a template that writes the content wrote "None", and one asking `is defined` heard yes.
    save_with_template(official, tmp_path, "{% for m in messages %}[{{ m.content }}|{{ m.tool_calls is defined }}|"
                       "{{ m.reasoning_content is defined }}]{% endfor %}")
    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": None, "tool_calls": None, "reasoning_content": None}]
    rendered = load_tokenizer(tmp_path).render_chat(messages, add_generation_prompt=False)
    assert rendered == "[hi|False|False][|False|False]"
    if TRANSFORMERS_5:  # (Transformers 4 renders them: "[None|True|True]")
        assert transformers.AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(messages, tokenize=False) \
            == rendered


def test_tools_render_with_a_folders_tool_use_template_as_in_transformers(official, tmp_path):
    # A folder with named templates chats with its default one and, given tools, with its tool_use one; Transformers
    # saves the latter as additional_chat_templates/tool_use.jinja. Given tools, nanoqwen rendered the default one.
    for folder in ("named", "resaved"):
        (tmp_path / folder).mkdir()
    save_with_template(official, tmp_path / "named", [{"name": "default", "template": "DEFAULT"},
                                                      {"name": "tool_use", "template": "TOOLS {{ tools | length }}"}])
    transformers.AutoTokenizer.from_pretrained(tmp_path / "named").save_pretrained(tmp_path / "saved")
    tool_use = tmp_path / "saved" / "additional_chat_templates" / "tool_use.jinja"
    # (older Transformers 4 releases keep the named templates in tokenizer_config.json, as the first folder does)
    assert tool_use.is_file() or (not TRANSFORMERS_5 and "tool_use" in {
        t["name"] for t in json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())["chat_template"]})
    load_tokenizer(tmp_path / "saved").save(tmp_path / "resaved")  # and a save by nanoqwen keeps both
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    messages = [{"role": "user", "content": "hi"}]
    for folder in ("named", "saved", "resaved"):
        hf, ours = transformers.AutoTokenizer.from_pretrained(tmp_path / folder), load_tokenizer(tmp_path / folder)
        for given in ({"tools": tools}, {}):
            expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **given)
            assert ours.render_chat(messages, **given) == expected == ("TOOLS 1" if given else "DEFAULT"), folder
    from nanoqwen.data.prepare import tokenizer_identity  # data prepared with the folder is redone when it changes

    if tool_use.is_file():
        before = tokenizer_identity(str(tmp_path / "saved"))
        tool_use.write_text("CHANGED")
        assert tokenizer_identity(str(tmp_path / "saved")) != before


def test_a_folder_whose_templates_are_all_named_chats_only_with_tools_as_in_transformers(official, tmp_path):
    # Transformers refuses a chat without tools when none of a folder's named templates is "default"; nanoqwen
    # rendered ChatML, a format the folder never names (prepare trained on it, chat and serve prompted with it).
    save_with_template(official, tmp_path, [{"name": "tool_use", "template": "TOOLS {{ tools | length }}"}])
    hf, ours = transformers.AutoTokenizer.from_pretrained(tmp_path), load_tokenizer(tmp_path)
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(ValueError, match="no default specified"):
        hf.apply_chat_template(messages, tokenize=False)
    with pytest.raises(NanoQwenError, match="^the chat templates of this model are all named \\(tool_use\\), none "
                                            "\"default\", the one a chat without tools renders with"):
        ours.render_chat(messages)
    assert ours.render_chat(messages, tools=[]) == hf.apply_chat_template(messages, tools=[], tokenize=False) \
        == "TOOLS 0"
    assert not ours.thinking_switch  # asked of every model (serve's card), it refuses nothing


def test_transformers_counts_the_chat_marks_among_the_special_tokens(official, tmp_path):
    # Official Qwen3 folders list <|im_start|> and the other control tokens as additional_special_tokens, which
    # Transformers' all_special_ids (get_special_tokens_mask, convert_ids_to_tokens with skip_special_tokens) reads;
    # a folder nanoqwen wrote counted only eos and pad there.
    for tokenizer, folder in ((official, tmp_path / "qwen3"), (train_bpe(["the cat sat"] * 20, 300), tmp_path / "bpe")):
        folder.mkdir()
        tokenizer.save(folder)
        hf = transformers.AutoTokenizer.from_pretrained(folder)
        assert sorted(hf.all_special_ids) == sorted(tokenizer.control_ids)
        ids = tokenizer.encode("<|im_start|>user\nhi<|im_end|>\n<|endoftext|>")
        mask = hf.get_special_tokens_mask(ids, already_has_special_tokens=True)
        assert mask == [1] + [0] * (len(ids) - 4) + [1, 0, 1]
    assert sorted(official.control_ids) == list(range(QWEN_FIRST_SPECIAL_ID, QWEN_FIRST_SPECIAL_ID + 14))


def test_a_folders_own_list_of_control_tokens_survives_a_save(tmp_path):
    # A folder that lists its own additional_special_tokens keeps its list (Transformers counts those alone among
    # all_special_ids): Qwen's list is written only for a folder that names none.
    folder, saved = tmp_path / "own", tmp_path / "saved"
    folder.mkdir()
    saved.mkdir()
    train_bpe(["the cat sat"] * 20, 300).save(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "additional_special_tokens": ["<|im_end|>"]}))
    load_tokenizer(folder).save(saved)
    assert json.loads((saved / "tokenizer_config.json").read_text())["additional_special_tokens"] == ["<|im_end|>"]
    ids = {folder: transformers.AutoTokenizer.from_pretrained(folder).all_special_ids,
           saved: transformers.AutoTokenizer.from_pretrained(saved).all_special_ids}
    assert sorted(ids[saved]) == sorted(ids[folder]) and len(ids[saved]) < 14


def test_a_template_is_given_every_named_special_token_as_in_transformers(official, tmp_path):
    # Transformers passes all seven of its named special tokens; sep_token, cls_token and mask_token were undefined.
    save_with_template(official, tmp_path, "{{ sep_token }}|{{ cls_token }}|{{ mask_token }}|{{ bos_token }}")
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    names = {"sep_token": "<|im_start|>", "cls_token": "<|box_start|>", "mask_token": "<|fim_pad|>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, **names}))
    rendered = load_tokenizer(tmp_path).render_chat([{"role": "user", "content": "hi"}])
    assert rendered == "<|im_start|>|<|box_start|>|<|fim_pad|>|"
    assert transformers.AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True) == rendered


def test_a_folders_own_bos_and_unk_tokens_survive_a_save(tmp_path):
    # A folder written elsewhere (Llama's, Mistral's) names its bos_token, which its chat template opens with; saved by
    # nanoqwen (prepare, every checkpoint) it was null, and every chat prompt lost it, in Transformers and here.
    from tokenizers import AddedToken

    tokenizer = train_bpe(["the cat sat on the mat"] * 20, 300)
    tokenizer.hf.add_special_tokens([AddedToken("<s>", special=True), AddedToken("<unk>", special=True)])
    save_with_template(tokenizer, tmp_path, "{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}")
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "bos_token": "<s>", "unk_token": "<unk>"}))
    (tmp_path / "saved").mkdir()
    load_tokenizer(tmp_path).save(tmp_path / "saved")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert (hf.bos_token, hf.unk_token) == ("<s>", "<unk>")
    messages = [{"role": "user", "content": "the cat"}]
    assert load_tokenizer(tmp_path / "saved").render_chat(messages, add_generation_prompt=False) == "<s>the cat" == \
        hf.apply_chat_template(messages, tokenize=False)


def test_ctrl_c_while_a_bpe_reads_its_texts_stops_the_reading(ctrl_c_raises: None) -> None:
    # The trainer reads the texts in a thread of its own while the main thread waits in Rust, where Python runs no
    # signal handler: a Ctrl-C took effect once every text was read and merged (minutes of a large corpus).
    import os
    import signal

    taken = 0

    def texts() -> Iterator[str]:
        nonlocal taken
        for taken in range(1, 200_001):
            if taken == 100:
                os.kill(os.getpid(), signal.SIGINT)
            yield "the cat sat on the mat"

    with pytest.raises(KeyboardInterrupt):
        train_bpe(texts(), 300)
    assert taken < 100_000  # stopped as it was reading, not after all of it
