"""Sampling over the model's KV cache: greedy or temperature/top-k/top-p/min-p, repetition, presence and
frequency penalties, stop tokens and stop strings (held off for a first `min_tokens`, kept in the text or not),
seeds, batched prompts, token log-probabilities, and text streaming that never splits a character.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from nanoqwen.errors import (
    SEED_LIMIT,
    SEED_RANGE,
    InvalidSetting,
    NanoQwenError,
    decimal_number,
    positive_int,
    seed_int,
    whole_number,
)
from nanoqwen.io import is_json_number
from nanoqwen.model import KVCache, Qwen3
from nanoqwen.tokenizer import Tokenizer

if TYPE_CHECKING:  # checkpoint.py is imported where a model is loaded
    from nanoqwen.checkpoint import GenerationFile

# As vLLM: a temperature this small picks the best token (argmax). One below float32's smallest number (1e-50, say)
# is 0 to the float32 logits: the best one, shifted to 0 by sampled_logits, became 0/0 = nan.
GREEDY_BELOW = 1e-5


@dataclass
class SamplingParams:
    """How `generate` and `stream_text` pick tokens and where they stop (vLLM's names where it has them)."""

    max_new_tokens: int = 128
    """New tokens at most; fewer where the context (max_position_embeddings) fills up first."""
    temperature: float = 1.0
    """0 means greedy (argmax), and so does anything below GREEDY_BELOW."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 keeps all."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability reaches p."""
    min_p: float = 0.0
    """Keep the tokens whose probability is at least min_p times the best one's; 0 keeps all."""
    repetition_penalty: float = 1.0
    """> 1 discourages tokens already in the prompt or the output (CTRL-style, as Transformers does)."""
    presence_penalty: float = 0.0
    """In [-2, 2]: subtracted once from the logit of every token already generated (OpenAI's; the prompt
    does not count). > 0 pushes towards new tokens."""
    frequency_penalty: float = 0.0
    """In [-2, 2]: subtracted from a token's logit once per time it was generated (OpenAI's; the prompt
    does not count). > 0 discourages verbatim repetition."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Tokens that end the text (not part of it): the model's end tokens, and any others asked for."""
    stop_strings: list[str] = field(default_factory=list)
    """Texts that end the text where they first appear (cut off unless include_stop_str_in_output)."""
    min_tokens: int = 0
    """No stop token is sampled, and no stop string ends the text, before this many tokens (vLLM's)."""
    ignored_end_ids: list[int] = field(default_factory=list)
    """The model's end tokens where vLLM's ignore_eos made them tokens like any other: they end nothing, but before
    `min_tokens` they are not sampled either, as vLLM masks the model's EOS then whatever ignore_eos says."""
    include_stop_str_in_output: bool = False
    """The stop string or stop token that ended the text stays in it (vLLM's); by default it is cut off."""
    seed: int | None = None
    """Seeds each row's sampling generator alike (the same prompt and seed draw the same text); None: fresh
    randomness. Unused when greedy."""
    skip_special_tokens: bool = True
    """Leave special tokens (<|im_start|>, <|endoftext|>...) out of the text, as HF pipelines and vLLM do;
    tokens a reply shows (<think>, <tool_call>) are not special and stay."""

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    def validate(self) -> SamplingParams:
        """Self, or InvalidSetting naming the field that is out of its range."""
        if self.max_new_tokens < 0:
            raise InvalidSetting("max_new_tokens", f"must be >= 0, got {self.max_new_tokens}")
        if not 0 <= self.temperature < math.inf:  # written so that nan fails too
            raise InvalidSetting("temperature", f"must be a number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise InvalidSetting("top_k", f"must be >= 0, got {self.top_k}")
        if not 0 <= self.top_p <= 1:  # 0 keeps the most likely token alone
            raise InvalidSetting("top_p", f"must be in [0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:  # 1 keeps the most likely token (and its ties) alone
            raise InvalidSetting("min_p", f"must be in [0, 1], got {self.min_p}")
        if not 0 <= self.min_tokens <= self.max_new_tokens:
            raise InvalidSetting("min_tokens", f"must be >= 0 and no more than max_new_tokens ({self.max_new_tokens}), "
                                               f"got {self.min_tokens}")  # (the server says it in the API's words)
        if not 0 < self.repetition_penalty < math.inf:
            raise InvalidSetting("repetition_penalty", f"must be > 0, got {self.repetition_penalty}")
        if "" in self.stop_strings:  # ignored, it hid a mistake (an unset shell variable); vLLM refuses it too
            raise InvalidSetting("stop", '"" (an empty string) marks no place to stop; give the text to stop at, or '
                                         "leave it out")
        if self.seed is not None and not 0 <= self.seed < SEED_LIMIT:
            raise InvalidSetting("seed", f"must be {SEED_RANGE}, got {self.seed}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise InvalidSetting(name, f"must be in [-2, 2], got {getattr(self, name)}")
        return self


class Penalties:
    """What the penalties remember about a batch of rows: which tokens were seen (prompt and output, for
    `repetition_penalty`) and how often each token was generated (output only, for the presence and
    frequency penalties, as OpenAI and vLLM count). Built by `start`, which gives None when no penalty
    is active, so unpenalized sampling keeps no (B, vocab) state at all.
    """

    def __init__(self, params: SamplingParams, seen: torch.Tensor | None, counts: torch.Tensor | None) -> None:
        self.params = params
        self.seen = seen  # (B, V) bool, or None when repetition_penalty is 1
        self.counts = counts  # (B, V) fp32 generated-token counts, or None when both other penalties are 0

    @classmethod
    def start(cls, params: SamplingParams, prompts: torch.Tensor, vocab_size: int,
              real: torch.Tensor | None = None) -> Penalties | None:
        """State after the prompts: prompts (B, T) ids; real (B, T) is 0 at left padding, which is not seen."""
        repeats = params.repetition_penalty != 1.0
        counts_output = params.presence_penalty != 0.0 or params.frequency_penalty != 0.0
        if not (repeats or counts_output):
            return None
        B, device = prompts.shape[0], prompts.device
        seen = counts = None
        if repeats:  # scatter_add, not scatter: a padding 0 must not clear a real token 0 of the same row
            weight = torch.ones_like(prompts, dtype=torch.float32) if real is None else real.float()
            seen = torch.zeros(B, vocab_size, device=device).scatter_add_(1, prompts, weight) > 0
        if counts_output:
            counts = torch.zeros(B, vocab_size, device=device)
        return cls(params, seen, counts)

    def record(self, tokens: torch.Tensor) -> None:
        """Note one new token per row; tokens (B,)."""
        if self.seen is not None:
            self.seen.scatter_(1, tokens[:, None], True)
        if self.counts is not None:
            self.counts.scatter_add_(1, tokens[:, None], torch.ones(tokens.shape[0], 1, device=tokens.device))

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Penalized logits (B, V), in vLLM's order: repetition first, then frequency and presence."""
        p = self.params
        if self.seen is not None:
            r = p.repetition_penalty
            penalized = torch.where(logits > 0, logits / r, logits * r)
            if r < 1:  # a penalty below 1 favours seen tokens; a tiny one must not overflow them to inf
                penalized = penalized.clamp(max=torch.finfo(logits.dtype).max)
            logits = torch.where(self.seen, penalized, logits)
        if self.counts is not None:
            logits = logits - p.frequency_penalty * self.counts - p.presence_penalty * (self.counts > 0).float()
        return logits


def next_tokens(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
                penalties: Penalties | None = None, generated: int = 0) -> torch.Tensor:
    """Pick one token per row. logits (B, V) fp32; penalties: the rows' history (None: no penalty active);
    generated: tokens the rows have sampled so far (below `min_tokens`, no stop token can be picked)."""
    if penalties is not None:
        logits = penalties.apply(logits)
    if generated < params.min_tokens and (held := params.stop_token_ids + params.ignored_end_ids):
        # as vLLM: the stop tokens (and the model's end tokens, ignored or not) are masked out
        logits = logits.index_fill(-1, torch.tensor(held, dtype=torch.long, device=logits.device), float("-inf"))
    if params.greedy:
        return logits.argmax(dim=-1)
    logits, candidates = sampled_logits(logits, params)
    choice = torch.multinomial(logits.softmax(-1), 1, generator=generator)
    return (choice if candidates is None else candidates.gather(-1, choice)).squeeze(-1)


def sampled_logits(logits: torch.Tensor, params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What a token is drawn from, as Transformers' warpers do it: temperature, then top-k, then top-p, then
    min-p (vLLM applies min-p before top-k/top-p; the two orders differ only where top-p and min-p both cut).
    The logits of the tokens left (-inf where dropped), and the token id of each column (None: column j is
    token j; with top-k or top-p the columns are the best tokens, best first). The ids may stop before the
    logits do: the columns past them are dropped tokens', there so that the draw takes as many random numbers
    as over all of them (as many as the vocabulary, or the top-k with its ties), which keeps seeded samples."""
    # Shifted so that the best logit is 0 before dividing (softmax is unchanged): a tiny temperature then
    # sends the others to -inf rather than overflowing them all to inf, whose softmax would be nan.
    logits = (logits - logits.amax(-1, keepdim=True)) / params.temperature
    candidates = None  # with top-k, sample among the k best only: no full-vocabulary sort or softmax
    width = logits.shape[-1]  # the columns drawn from
    if params.top_k > 0:
        # Tokens tied with the k-th best stay in, as Transformers keeps them: take as many as the most ties
        # need, then drop what falls below each row's k-th value.
        top_k = min(params.top_k, width)
        if params.top_p < 1.0 and top_k > width // NUCLEUS_SORT_BEYOND >= NUCLEUS_FIRST_TRY and logits.is_cpu:
            # A top-k larger than `nucleus` looks through costs about a sort on a CPU: find the k-th value alone,
            # and let `nucleus` look for the tokens top-p keeps among those at or above it.
            kth = torch.kthvalue(logits, width - top_k + 1, dim=-1, keepdim=True).values
            width = int((logits >= kth).sum(-1).max())
            logits = logits.masked_fill(logits < kth, float("-inf"))
        else:
            kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
            logits, candidates = torch.topk(logits, int((logits >= kth).sum(-1).max()), dim=-1)  # sorted
            logits = logits.masked_fill(logits < kth, float("-inf"))
            if params.top_p < 1.0:  # top-p cuts in column order: ties as `nucleus` ranks them, not as topk left them
                ranked = best_first(logits, candidates)
                logits, candidates = logits.gather(-1, ranked), candidates.gather(-1, ranked)
    if params.top_p < 1.0:
        if candidates is None:
            kept, candidates = nucleus(logits, params.top_p)
            kept, candidates = kept[:, :width], candidates[:, :width]  # past a large top-k's, all are dropped
            logits = kept.new_full((kept.shape[0], width), float("-inf"))
            logits[:, :kept.shape[-1]] = kept
        else:
            logits = logits.masked_fill(top_p_drops(logits.softmax(-1), params.top_p), float("-inf"))
    if params.min_p > 0:
        # probability >= min_p * the best's, in logits: the best is 0 here (shifted above; top-k and top-p keep it)
        logits = logits.masked_fill(logits < math.log(params.min_p), float("-inf"))
    return logits, candidates


def top_p_drops(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Where top-p drops a token, given the probabilities (B, K) of columns sorted best first."""
    drop = probs.cumsum(-1) - probs >= top_p  # mass before this token already reaches p
    drop[:, 0] = False  # the best token always stays: a top_p that float32 rounds to 0 dropped it too
    return drop


# On a CPU, `nucleus` looks for the kept tokens among the best NUCLEUS_FIRST_TRY, then among more; once it would need
# more than 1/NUCLEUS_SORT_BEYOND of the vocabulary, sorting all of it costs less (at 151,936 tokens on one core:
# torch.topk of 64 took 0.3 ms, of 19,000 3 ms, the full sort 14 ms).
NUCLEUS_FIRST_TRY = 64
NUCLEUS_SORT_BEYOND = 8
# The mass (float64) of the tokens found must pass top_p by this much, far more than float32 rounds the cumulative
# sums by (1e-7): then the full sort drops every token the search leaves out.
NUCLEUS_MARGIN = 1e-6


def nucleus(logits: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-p over logits (B, V) (-inf: dropped already): each row's best tokens, best first, as logits (-inf where
    top-p drops them) and their ids (B, K). K may be less than V: the tokens past the columns given are all dropped.

    On a GPU, by a sort of the vocabulary, which is cheap there. On a CPU a sort of 151,936 logits cost several times
    the rest of a token's sampling, so the tokens are looked for among the k best (torch.topk), k growing until those
    above the k-th value hold p of the mass, and sorted all only where that would take too many. Either way ties rank
    the higher id first (as Transformers' top-p, which sorts ascending, leaves them on a GPU, whose sort of more than
    32 values is stable; a CPU sort orders ties as it happens to), and the probabilities are the softmax of the whole
    row in token order: the search and the sort keep the same tokens, with the same probabilities.
    """
    probs = logits.softmax(-1)
    vocab = logits.shape[-1]
    if not logits.is_cpu:
        return sorted_nucleus(logits, probs, top_p)

    def at_least(mass: torch.Tensor, most: torch.Tensor) -> int:
        """How many tokens it takes, at most `most` probability each, to hold `mass` (B,) more in every row."""
        return int((mass / most.double().clamp(min=1e-30)).max().clamp(max=vocab))

    p = float(torch.tensor(top_p, dtype=torch.float32)) + NUCLEUS_MARGIN  # top_p as float32 compares it, and more
    k = max(NUCLEUS_FIRST_TRY, 2 * at_least(torch.tensor([p]), probs.amax(-1)))  # a flat row: sort at once
    while k <= vocab // NUCLEUS_SORT_BEYOND:
        values, ids = torch.topk(logits, k, dim=-1, sorted=False)
        # Every token above the k-th value is among these k; of those tied with it, maybe not all are: leave them
        # out (-inf). They would come after all the others.
        values = values.masked_fill(values <= values.amin(-1, keepdim=True), float("-inf"))
        found_probs = probs.gather(-1, ids).masked_fill(values.isinf(), 0.0)
        short = p - found_probs.sum(-1, dtype=torch.float64)  # (B,): > 0 needs more
        if bool((short <= 0).all()):
            ranked = best_first(values, ids)
            values, ids = values.gather(-1, ranked), ids.gather(-1, ranked)
            return values.masked_fill(top_p_drops(found_probs.gather(-1, ranked), top_p), float("-inf")), ids
        k = max(k * 8, 2 * (k + at_least(short, probs.gather(-1, ids).amin(-1))))  # none left is above the k-th
    return sorted_nucleus(logits, probs, top_p)


def sorted_nucleus(logits: torch.Tensor, probs: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`nucleus` by a sort of the whole vocabulary; probs: the softmax of logits (B, V), in token order."""
    # Sorted backwards, a stable sort ranks the higher of tied ids first, on any device (a plain descending sort put
    # the lower first on a GPU, where its sort is stable, and in no set order on a CPU).
    values, backwards = torch.sort(logits.flip(-1), dim=-1, descending=True, stable=True)
    ids = logits.shape[-1] - 1 - backwards
    return values.masked_fill(top_p_drops(probs.gather(-1, ids), top_p), float("-inf")), ids


def best_first(values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The order (B, K) that ranks columns of values (B, K) and their token ids best first, tied values the higher
    id first: as Transformers' top-p ranks ties on a GPU (a stable ascending sort, whose end it keeps)."""
    by_id = ids.argsort(dim=-1, descending=True)  # then a stable sort by value keeps tied ids in that order
    return by_id.gather(-1, values.gather(-1, by_id).argsort(dim=-1, descending=True, stable=True))


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities of the chosen `tokens` (B,), and the `top` most likely tokens per row (values,
    ids; each (B, top), best first), from logits (B, V).

    These are log_softmax of the model's raw logits at that step: before any penalty, temperature,
    top-k or top-p (what vLLM returns by default), so they describe the model, not the sampler.
    """
    logprobs = logits.float().log_softmax(-1)
    values, ids = logprobs.topk(top, dim=-1)
    return logprobs.gather(-1, tokens[:, None]).squeeze(-1), values, ids


def check_fits(model: Qwen3, prompt_len: int, max_new_tokens: int) -> int:
    """How many new tokens fit after the prompt; one clear line when the prompt itself does not fit.

    The model reads the prompt and every new token but the last (which is only predicted), so all of them fit
    while those it reads fit the context: a prompt as long as the context still gets one new token.
    """
    context = model.config.max_position_embeddings
    if prompt_len == 0:
        raise NanoQwenError("the prompt is empty; give at least one token of text")
    if prompt_len > context:
        raise NanoQwenError(f"the prompt is {prompt_len} tokens but the model's context is {context}; "
                            f"shorten it to at most {context} tokens")
    return min(max_new_tokens, context - prompt_len + 1)


class DecodeStep:
    """The one-token steps of a generation, over a cache with fixed shapes (KVCache.fix_shapes).

    With `capture` (CUDA), step number `capture_at` runs for real, the next one is captured as a CUDA
    graph, and later steps replay it: a small model's decode step is hundreds of kernel launches from
    Python, so on a GPU it is launch-bound, and one replay launches them all at once. When the cache
    outgrows the window of slots the graph attends, the step is captured again for the next window.
    Steps before `capture_at`, and every step without `capture`, run eagerly (that is how the tests
    check it on CPU). If capturing fails, it warns and stays eager.
    """

    def __init__(self, model: Qwen3, cache: KVCache, capture: bool | None = None, capture_at: int = 1) -> None:
        """`capture` None means: where the cache is on CUDA."""
        cache.fix_shapes()
        self.model, self.cache = model, cache
        self.capture = cache.keys.device.type == "cuda" if capture is None else capture
        self.eager_steps_left = capture_at - 1
        self.token = torch.zeros(cache.key_valid.shape[0], 1, dtype=torch.long, device=cache.keys.device)
        self.replay: Callable[[], torch.Tensor] | None = None  # runs the captured step, gives its logits
        self.window = 0  # the attention window of the captured step
        self.warmed_up = False

    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        """Logits (B, 1, V) after feeding one token (B,) per row. From a graph they live in one buffer
        that the next call overwrites."""
        self.token.copy_(token[:, None])
        if self.replay is not None and self.window != self.cache.attention_window():
            self.replay = None  # the cache outgrew the graph's window: capture this step again
        if self.replay is None and self.capture and self.eager_steps_left <= 0:
            if not self.warmed_up:  # CUDA graphs want a warm-up first: this step, done for real
                self.warmed_up = True
                logits = self._warm_up()
                self._capture_next()
                return logits
            self._capture_next()
        if self.replay is None:
            self.eager_steps_left -= 1
            return self.model(self.token, cache=self.cache)
        logits = self.replay()
        self.cache.length += 1
        return logits

    def _capture_next(self) -> None:
        """Capture the next step. Capturing records kernels without running them, so the cache's tensors
        do not move; its Python side did run, so the length is put back."""
        if self.cache.length >= self.cache.max_len:
            return  # the warm-up filled the cache: no step is left to capture
        length, window = self.cache.length, self.cache.attention_window()
        try:
            self.replay, self.window = self._record(), window
        except RuntimeError as error:
            self.capture = False
            warnings.warn(f"decoding without a CUDA graph: capturing the decode step failed ({error})", stacklevel=3)
        finally:
            self.cache.length = length

    def _warm_up(self) -> torch.Tensor:
        """One real step on a side stream, so that lazy initializations happen before a capture."""
        device = self.cache.keys.device  # not necessarily the current one (--device cuda:1)
        with torch.cuda.device(device):
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                logits = self.model(self.token, cache=self.cache)
            torch.cuda.current_stream(device).wait_stream(side)
        return logits

    def _record(self) -> Callable[[], torch.Tensor]:
        """The step captured as a CUDA graph: a function that replays it and returns its logits.

        The capture stream is made on the cache's device: torch.cuda.graph's own is made once, on whichever
        device was current then, and the kernels of a model on another device would not be captured on it
        (they would run once, for real, and the graph would replay nothing)."""
        device = self.cache.keys.device
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.device(device), torch.cuda.graph(graph, stream=torch.cuda.Stream(device),
                                                         capture_error_mode="thread_local"):
            logits = self.model(self.token, cache=self.cache)

        def replay() -> torch.Tensor:
            graph.replay()
            return logits

        return replay


def graphs_by_default(model: Qwen3) -> bool:
    """Whether decoding goes through DecodeStep unless told otherwise: on CUDA, for a model prepared for
    decoding (`nanoqwen sample`, `chat`, `serve`), outside autocast; not for the samples taken during
    training, where the model may be sharded or autocast."""
    device = model.model.embed_tokens.weight.device
    return device.type == "cuda" and model.prepared_for_decoding and not torch.is_autocast_enabled(device.type)


@torch.inference_mode()
def generate_ids(model: Qwen3, prompts: list[list[int]], params: SamplingParams,
                 fixed_shapes: bool | None = None) -> Iterator[list[int | None]]:
    """Yield, step by step, the new token of every row (None for rows that have finished).

    Prompts are left-padded into one batch and decoded together over one preallocated KV cache.
    A row finishes at a stop token (which is yielded, so callers can tell why it stopped) or at its own
    token budget (what fits after its prompt), and samples with a generator of its own, seeded alike: a row draws
    the random numbers its prompt draws alone, whatever the other rows (as the server seeds a request's prompts).
    `fixed_shapes` decodes through DecodeStep, captured as a CUDA graph on CUDA; None (the default) means
    `graphs_by_default(model)`.
    """
    params.validate()
    device = model.model.embed_tokens.weight.device
    longest = max(len(p) for p in prompts)
    budgets = [check_fits(model, len(p), params.max_new_tokens) for p in prompts]
    steps = max(budgets)
    if steps == 0:
        return
    # One generator per row, seeded alike: a row's draws do not depend on how many rows are drawn beside it
    generators = None if params.greedy else [sampling_generator(device, params.seed) for _ in prompts]
    B = len(prompts)
    ids = torch.zeros(B, longest, dtype=torch.long)
    real = torch.zeros(B, longest, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt):] = torch.tensor(prompt)
        real[row, longest - len(prompt):] = 1
    ids, real = ids.to(device), real.to(device)
    penalties = Penalties.start(params, ids, model.config.vocab_size, real)
    cache = model.new_cache(B, longest + steps)
    # Dropout is for training alone: training samples from a model in train mode, which is given back as it was.
    was_training = model.training
    model.eval()
    try:
        logits = model(ids, cache=cache, attention_mask=real if bool((real == 0).any()) else None, logits_to_keep=1)
        stop_ids = set(params.stop_token_ids)
        done = [False] * B  # on the host, where the tokens are read each step anyway: no tensor ops to track it
        if fixed_shapes is None:
            fixed_shapes = graphs_by_default(model)
        decode_step = DecodeStep(model, cache) if fixed_shapes else None
        for step in range(steps):
            token = picked_tokens(logits[:, -1].float(), params, generators, penalties, step)
            tokens = token.tolist()
            yield [None if d else t for t, d in zip(tokens, done)]
            done = [d or t in stop_ids or step + 1 == budget for t, d, budget in zip(tokens, done, budgets)]
            if all(done):
                return
            if penalties is not None:
                penalties.record(token)
            logits = model(token[:, None], cache=cache) if decode_step is None else decode_step(token)
    finally:
        model.train(was_training)


def picked_tokens(logits: torch.Tensor, params: SamplingParams, generators: list[torch.Generator] | None,
                  penalties: Penalties | None, generated: int) -> torch.Tensor:
    """`next_tokens` of a batch (B, V) whose rows sample each with its own generator (None: greedy, no draws)."""
    if generators is None or len(generators) == 1:
        return next_tokens(logits, params, None if generators is None else generators[0], penalties, generated)
    if penalties is not None:  # the whole batch at once, as next_tokens would apply them first
        logits = penalties.apply(logits)
    return torch.cat([next_tokens(logits[row:row + 1], params, generator, generated=generated)
                      for row, generator in enumerate(generators)])


def nth_seed(seed: int | None, k: int) -> int | None:
    """The seed of the k-th sample (or chat turn) of a run seeded with `seed`: seed + k, wrapped into the range
    seeds take, so that any valid --seed works however many samples follow it (2**63 - 1 + 1 was refused)."""
    return None if seed is None else (seed + k) % SEED_LIMIT


def sampling_generator(device: torch.device, seed: int | None) -> torch.Generator:
    """A generator of its own for one generation: seeded, or fresh randomness (without reseeding torch's
    global generator, as torch.seed() would)."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


# Prompt tokens a reply's text is decoded after (see TextStream): a character's bytes (4 at most) with room to spare, as
# vLLM's detokenizer starts from the prompt's last 5 to 7 tokens.
PROMPT_CONTEXT_TOKENS = 8


class TextStream:
    """Turns new token ids into new text: holds back an unfinished UTF-8 character and anything
    that may be the start of a stop string, and ends the text at the stop string completed first (once `min_tokens`
    tokens are in; before, a stop string is text), before it or, with `include_stop`, after it.

    The text is what the tokens add to the `prompt`'s (its last tokens decoded before them): a SentencePiece decoder
    drops the leading space of a text, not of a reply ("\u2581b" after "a" is " b"), and a character the prompt ends
    inside of is the reply's, whole once the reply's first bytes finish it (or a U+FFFD where they break it)."""

    def __init__(self, tokenizer: Tokenizer, stop_strings: list[str], skip_special_tokens: bool = True,
                 min_tokens: int = 0, include_stop: bool = False, prompt: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.context = list(prompt[-PROMPT_CONTEXT_TOKENS:])
        self.context_text = tokenizer.decode(self.context, skip_special_tokens=skip_special_tokens)
        # Where the prompt ends inside a character, that character's U+FFFD (for now) is the reply's text
        self.prompt_cut = self.context_text.endswith("\ufffd") and tokenizer.ends_inside_character(
            self.context, skip_special_tokens)
        if self.prompt_cut:
            self.context_text = self.context_text[:-1]
        self.skip_special_tokens = skip_special_tokens
        self.stop_strings = stop_strings
        self.min_tokens, self.include_stop = min_tokens, include_stop
        self.accepted = 0  # tokens taken by `accept`, a stop token included
        self.unchecked = 0  # characters in before min_tokens tokens were: no stop string ends there, sent or not
        self.ids: list[int] = []
        self.text = ""  # the decoded text of all ids so far (what was sent of it stays, see push)
        self.emitted = 0  # characters of the text already handed out
        self.token_start = 0  # where the text of the last token begins (its logprob's text_offset)
        self.stopped = False
        # With a byte-level tokenizer, text that ends in a whole character cannot change: the ids up to there
        # are decoded once, not again with every token (which made a long generation quadratic).
        self.settled_ids = self.settled_chars = 0

    @classmethod
    def for_params(cls, tokenizer: Tokenizer, params: SamplingParams, prompt: Sequence[int] = ()) -> TextStream:
        """The stream of one reply to `prompt` its request's sampling settings ask for (its stop strings, special tokens
        kept or not)."""
        return cls(tokenizer, params.stop_strings, params.skip_special_tokens, params.min_tokens,
                   params.include_stop_str_in_output, prompt)

    def _decoded(self) -> str:
        """The text of the ids so far, after the prompt's."""
        if self.settled_ids:
            fresh = self.tokenizer.decode(self.ids[self.settled_ids:], skip_special_tokens=self.skip_special_tokens)
            return self.text[:self.settled_chars] + fresh
        whole = self.tokenizer.decode(self.context + self.ids, skip_special_tokens=self.skip_special_tokens)
        shared = os.path.commonprefix([whole, self.context_text])  # the prompt's text: decoding on only adds to it
        return whole[len(shared):]

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self._decoded()
        if self.tokenizer.byte_level and not text.endswith("\ufffd"):
            self.settled_ids, self.settled_chars = len(self.ids), len(text)
        # Only the end can change as bytes arrive: a U+FFFD standing for a character whose bytes are still coming (a
        # byte-fallback tokenizer's <0xNN> tokens, Llama's and Mistral's, decode as byte-level ones do: see
        # Tokenizer.decode). A token that changes it, or adds nothing to it, continues that character: it starts
        # where the character does.
        before = self.text
        if before.endswith("\ufffd") and (len(text) == len(before) or not text.startswith(before)):
            self.token_start = len(before) - 1
        else:
            self.token_start = len(before)
        self.text = text
        # Trailing U+FFFDs may still become characters: hold them back, but find stop strings in what precedes
        # them (an undecodable byte is a U+FFFD for good, and must not keep stop strings from being seen).
        return self._release(text.rstrip("\ufffd"), final=False)

    def accept(self, token: int, stop_token_ids: list[int]) -> tuple[str, str | None]:
        """New text for one generated token, and "stop" when the text ends here (stop token or string)."""
        self.accepted += 1
        if token in stop_token_ids:
            if self.include_stop:
                delta = self.push(token)
            else:  # its text is not added: it starts (and ends) where the text ends
                delta, self.token_start = "", len(self.text)
            return delta + self.finish(), "stop"
        delta = self.push(token)
        return delta, "stop" if self.stopped else None

    def finish(self) -> str:
        """Whatever is still held back once generation is over."""
        if not self.ids:  # a reply that ended at once: the character the prompt ends inside of stays unfinished
            self.text = self._decoded()
        return self._release(self.text, final=True) if not self.stopped else ""

    def _release(self, text: str, final: bool) -> str:
        # (start, end) of each stop string that ends in text not yet searched: what was handed out was searched
        # already, and before min_tokens tokens are in a stop string is text that stays text, even one held back
        found = []
        if self.accepted < self.min_tokens:
            self.unchecked = len(text)
        else:
            searched = max(self.emitted, self.unchecked)
            for stop in self.stop_strings:
                if (at := text.find(stop, max(0, searched - len(stop) + 1))) != -1:
                    found.append((at + len(stop), at))
        # The text ends at the stop string completed first (of those completed together, the longer): where it would
        # end had its characters come one at a time, so neither how tokens split it nor the stops' order matters
        # (the one that started first won, and ["a", " ab"] cut " ab" to "" when it came as one token, " " if not).
        if found:
            end, start = min(found)
            text, self.stopped = text[:end if self.include_stop else start], True
        safe = len(text)
        if not (final or self.stopped):  # keep back a tail that could still grow into a stop string
            # Such a tail starts after what was handed out (that text was already checked), so the search
            # covers only the held-back text: per token it costs the held-back text's length, not the reply's.
            for stop in self.stop_strings:
                for n in range(min(len(stop) - 1, len(text) - self.emitted), 0, -1):
                    if text.endswith(stop[:n]):
                        safe = min(safe, len(text) - n)
                        break
        delta = text[self.emitted:safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return delta


@dataclass
class Completion:
    """One prompt's generated text, as `generate` returns it."""

    text: str
    """The new text, without the prompt (and without the stop string or token that ended it, unless asked)."""
    token_ids: list[int]
    """The ids sampled, but for a stop token that ended the text, unless include_stop_str_in_output put its text in
    (vLLM's token_ids always hold it; the server returns no ids, only usage, which counts it as vLLM's). The tokens
    of a stop string that ended it stay, though its text is cut off (as in vLLM's token_ids)."""
    finish_reason: str
    """"stop" (a stop token or string ended it) or "length" (max_new_tokens or the context ran out)."""
    prompt_tokens: int
    """Tokens of the prompt, as the model read it."""


def stream_batch(model: Qwen3, tokenizer: Tokenizer, prompts: list[list[int]], params: SamplingParams
                 ) -> Iterator[tuple[int, str, Completion | None]]:
    """Yield (row, new text, None) as text arrives and (row, "", Completion) once a row is finished."""
    streams = [TextStream.for_params(tokenizer, params, prompt) for prompt in prompts]
    finished: list[Completion | None] = [None] * len(prompts)
    for step_tokens in generate_ids(model, prompts, params):
        for row, token in enumerate(step_tokens):
            if token is None or finished[row] is not None:
                continue
            stream = streams[row]
            delta, reason = stream.accept(token, params.stop_token_ids)
            if reason is not None:
                finished[row] = Completion("", list(stream.ids), reason, len(prompts[row]))
            if delta:
                yield row, delta, None
            if finished[row] is not None:
                yield row, "", finished[row]
        if all(f is not None for f in finished):
            return
    for row, stream in enumerate(streams):
        if finished[row] is None:
            delta = stream.finish()
            if delta:
                yield row, delta, None
            yield row, "", Completion("", list(stream.ids), "stop" if stream.stopped else "length", len(prompts[row]))


# Model text that goes to a terminal (chat, sample): control characters (ESC sequences, carriage returns, ...) are
# shown as their visible Unicode "control pictures" instead of acting on the terminal. Newline and tab pass.
_VISIBLE = {c: 0x2400 + c for c in range(32) if c not in (9, 10)} | {127: 0x2421} | {c: 0xFFFD for c in range(128, 160)}


def printable(text: str) -> str:
    return text.translate(_VISIBLE)


def for_stdout(text: str) -> str:
    """Model text to write to standard output: printable on a terminal; piped or redirected, as generated (None:
    closed, `>&-`)."""
    return printable(text) if sys.stdout is not None and sys.stdout.isatty() else text


def reopen_closed_stdout() -> None:
    """A closed standard output (`>&-`, None in Python) becomes /dev/null for sample and chat: their text goes
    nowhere, as print()'s does, where a stream's write or chat's input() prompt stopped with a traceback."""
    if sys.stdout is None:
        sys.stdout = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 (open as long as the process, as standard output is)


def prompt_ids(tokenizer: Tokenizer, prompt: str | list[int]) -> list[int]:
    """A prompt's ids (text, or ids already). An empty prompt starts a new document (<|endoftext|>, as
    documents start in the training data): an unconditional sample."""
    return (tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)) or [tokenizer.eot_id]


def generate(model: Qwen3, tokenizer: Tokenizer, prompts: list[str], params: SamplingParams) -> list[Completion]:
    """Complete every prompt (batched); each Completion holds the new text only."""
    if isinstance(prompts, str):  # it would be read as one prompt a character
        raise TypeError("generate takes a list of prompts: give [prompt] (stream_text takes one prompt)")
    texts = [""] * len(prompts)
    results: list[Completion | None] = [None] * len(prompts)
    for row, delta, done in stream_batch(model, tokenizer, [prompt_ids(tokenizer, p) for p in prompts], params):
        texts[row] += delta
        if done is not None:
            done.text = texts[row]
            results[row] = done
    return [r for r in results if r is not None]


def stream_text(model: Qwen3, tokenizer: Tokenizer, prompt: str, params: SamplingParams) -> Iterator[str]:
    """Text pieces of one completion as they are generated."""
    for _, delta, _ in stream_batch(model, tokenizer, [prompt_ids(tokenizer, prompt)], params):
        if delta:
            yield delta


# -- `nanoqwen sample` ---------------------------------------------------------------------------
# Used where the checkpoint's generation_config.json does not say (Transformers and vLLM read that file too).
SAMPLING_DEFAULTS: dict[str, float] = {"temperature": 0.8, "top_k": 50, "top_p": 0.95, "min_p": 0.0,
                                       "repetition_penalty": 1.0}
# What a generation_config.json that asks to sample (do_sample true) means by a setting it leaves out: Transformers'
# GenerationConfig defaults, which generate() fills in (and which that file leaves out unless set).
TRANSFORMERS_SAMPLING: dict[str, float] = {"temperature": 1.0, "top_k": 50, "top_p": 1.0, "min_p": 0.0,
                                           "repetition_penalty": 1.0}


# What else Transformers' generate() takes from a generation_config.json (its other logits processors, beam search,
# contrastive search (penalty_alpha with top_k > 1), DoLa, forced words, stop strings), which nanoqwen does not do:
# each setting with the values that leave it off (None and an empty list or object always do), as Transformers'
# defaults. A checkpoint that sets one is told so once at load, rather than sampled unlike Transformers in silence.
# (forced_bos_token_id acts at a first token only, which follows a prompt here. max_length gives way to
# --max-new-tokens and max_tokens, which say the length, as vLLM leaves it alone: Transformers' default of 20 tokens,
# prompt included, written into many files, would cut every reply short. max_new_tokens is the default length, as
# vLLM takes it: see saved_max_new_tokens.)
UNAPPLIED_GENERATION: dict[str, tuple[float, ...]] = {
    "typical_p": (1.0,), "epsilon_cutoff": (0.0,), "eta_cutoff": (0.0,), "top_h": (), "no_repeat_ngram_size": (0,),
    "encoder_repetition_penalty": (1.0,), "bad_words_ids": (), "sequence_bias": (), "suppress_tokens": (),
    "begin_suppress_tokens": (), "min_length": (0,), "min_new_tokens": (0,), "forced_eos_token_id": (),
    "exponential_decay_length_penalty": (), "guidance_scale": (1.0,), "watermarking_config": (), "num_beams": (1,),
    "stop_strings": (), "penalty_alpha": (0.0,), "dola_layers": (), "force_words_ids": (),
}


def unapplied_generation(generation: GenerationFile) -> str | None:
    """One line naming what a checkpoint's generation_config.json sets that Transformers applies and nanoqwen does
    not (UNAPPLIED_GENERATION); None where it sets none of it."""
    names = [name for name, off in UNAPPLIED_GENERATION.items() if generation.get(name) not in (None, [], {}, *off)]
    if not names:
        return None
    return (f"{generation.path} sets {', '.join(names)}, which Transformers' generate() applies and nanoqwen does "
            "not: its text can differ from Transformers'")


def top_k_int(text: str) -> int:
    """--top-k: a whole number >= 0; -1 (vLLM's and the server's "all") is 0 here, as in generation_config.json."""
    value = whole_number(text)
    if value < -1:
        raise argparse.ArgumentTypeError(f"must be 0 or more (0 or -1: all tokens), got {text}")
    return max(value, 0)


# A shell passes "\n" on as a backslash and an n, where a user of --prompt, --system or --stop means the end of a
# line (a stop string is most often one): as llama.cpp's CLI reads its prompts and stop strings, these escapes stand
# for the characters; any other backslash stays. Text typed into the chat is taken as typed.
TEXT_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}
ESCAPES_HELP = r"\n, \t, \r and \\ in it are a newline, a tab, a carriage return and a backslash"


def escaped_text(text: str) -> str:
    """A text flag's value with \\n, \\t, \\r and \\\\ read as a newline, a tab, a carriage return and one
    backslash."""
    return re.sub(r"\\(.)", lambda m: TEXT_ESCAPES.get(m[1], m[0]), text, flags=re.DOTALL)


def add_sampling_arguments(p: argparse.ArgumentParser, max_new_tokens: int = 200) -> None:
    def default(name: str) -> str:
        ours, transformers = SAMPLING_DEFAULTS[name], TRANSFORMERS_SAMPLING[name]
        sampled = "" if ours == transformers else f", or {transformers:g} where it sets do_sample true"
        return f"(default: the checkpoint's generation_config.json, else {ours:g}{sampled})"

    p.add_argument("--max-new-tokens", type=whole_number, default=None, metavar="N",
                   help=f"most tokens to generate (default: the checkpoint's generation_config.json max_new_tokens, "
                        f"else {max_new_tokens}; fewer where the context ends)")
    p.set_defaults(default_max_new_tokens=max_new_tokens)  # (the command's own, where the file gives none)
    p.add_argument("--temperature", type=decimal_number, default=None,
                   help=f"0 = greedy {default('temperature')}; do_sample false in that file means greedy, "
                        "so --top-k and --top-p then need --temperature too")
    p.add_argument("--top-k", type=top_k_int, default=None, help=f"0 (or -1) keeps all tokens {default('top_k')}")
    p.add_argument("--top-p", type=decimal_number, default=None,
                   help=f"keep the most likely tokens whose probabilities add up to this; 1 keeps all "
                        f"{default('top_p')}")
    p.add_argument("--min-p", type=decimal_number, default=None,
                   help=f"keep tokens at least this times as likely as the best one; 0 keeps all {default('min_p')}")
    p.add_argument("--repetition-penalty", type=decimal_number, default=None,
                   help=f"> 1 discourages prompt and output tokens {default('repetition_penalty')}")
    p.add_argument("--presence-penalty", type=decimal_number, default=0.0,
                   help="-2..2, subtracted from the logit of every token generated so far (default 0)")
    p.add_argument("--frequency-penalty", type=decimal_number, default=0.0,
                   help="-2..2, subtracted from a token's logit per time it was generated (default 0)")
    p.add_argument("--stop", action="append", default=[], type=escaped_text, metavar="TEXT",
                   help=f"stop string (repeatable): the text ends before the first one it holds; {ESCAPES_HELP}")
    p.add_argument("--seed", type=seed_int, default=None, help="same seed, same text")


def saved_sampling(generation: GenerationFile) -> dict[str, float]:
    """The sampling values (of SAMPLING_DEFAULTS' names) that a checkpoint's generation_config.json gives, checked:
    top_k a whole number (-1, vLLM's "all", is 0 here). A value of the wrong type or range is refused in one
    line that names the file (it would otherwise read as a bad flag, or fail mid-generation or mid-export)."""
    path = generation.path
    found: dict[str, float] = {}
    for name in SAMPLING_DEFAULTS:
        value = generation.get(name)
        if value is None:
            continue
        if not is_json_number(value) or (name == "top_k" and not (math.isfinite(value) and value == int(value))):
            raise NanoQwenError(f"{path}: {name} is {value!r}, not a {'whole ' if name == 'top_k' else ''}number; "
                                "fix or remove it")
        found[name] = max(int(value), 0) if name == "top_k" else value
    try:
        SamplingParams(**found).validate()
    except NanoQwenError as e:
        raise NanoQwenError(f"{path}: {e}; fix or remove it") from None
    return found


def saved_max_new_tokens(generation: GenerationFile) -> int | None:
    """The default length a checkpoint's generation_config.json gives (max_new_tokens; None where it gives none):
    vLLM's max_tokens for a request that gives none (ModelConfig.get_diff_sampling_param), so serve's for chat
    requests and sample's and chat's --max-new-tokens. A value that is no whole number >= 1 (what Transformers and
    vLLM accept) is refused in one line that names the file."""
    value = generation.get("max_new_tokens")
    if value is None:
        return None
    if not is_json_number(value) or not (math.isfinite(value) and value == int(value) and value >= 1):
        raise NanoQwenError(f"{generation.path}: max_new_tokens is {value!r}, not a whole number >= 1; fix or "
                            "remove it")
    return int(value)


def checkpoint_sampling(generation: GenerationFile, base: dict[str, float] | None = None) -> dict[str, float]:
    """The sampling a checkpoint recommends (`saved_sampling`; official Qwen3 folders carry theirs), over `base`;
    `do_sample: false` there means greedy. With no `base`, as Transformers' generate() reads the file: where it
    asks to sample, what it leaves out is Transformers' default; where it does not, nanoqwen's (SAMPLING_DEFAULTS)."""
    do_sample = generation.get("do_sample")
    if base is None:
        base = TRANSFORMERS_SAMPLING if do_sample is True else SAMPLING_DEFAULTS
    chosen = {**base, **saved_sampling(generation)}
    if do_sample is False:
        chosen["temperature"] = 0.0
    return chosen


def sampling_params(args: argparse.Namespace, generation: GenerationFile) -> SamplingParams:
    """The flags, with those not given taken from the checkpoint's generation_config.json (`checkpoint_sampling`).
    A flag out of its range is one line naming it, given before the model loads (minutes, for a large one): the
    caller adds the tokenizer's end ids (`stop_token_ids`) once it has loaded."""
    recommended = checkpoint_sampling(generation)
    if (unapplied := unapplied_generation(generation)) is not None:
        print(f"nanoqwen: warning: {unapplied}", file=sys.stderr)
    chosen = {name: recommended[name] if getattr(args, name) is None else getattr(args, name) for name in recommended}
    max_new_tokens = args.max_new_tokens
    if max_new_tokens is None:
        max_new_tokens = saved_max_new_tokens(generation) or args.default_max_new_tokens
    params = SamplingParams(max_new_tokens=max_new_tokens, **chosen, presence_penalty=args.presence_penalty,
                            frequency_penalty=args.frequency_penalty, stop_strings=args.stop, seed=args.seed)
    try:
        return params.validate()
    except InvalidSetting as e:  # a flag's value (saved_sampling checked the file's): named as it was typed
        raise NanoQwenError(f"--{e.name.replace('_', '-')} {e.problem}") from None


def load_for_inference(args: argparse.Namespace, generation: GenerationFile | None = None) -> tuple[Qwen3, Tokenizer]:
    """The model and tokenizer of --model on --device; `generation`: its generation_config.json, where the caller
    read it already for its sampling settings (None: read here, for the end ids alone)."""
    from nanoqwen.checkpoint import load_checkpoint
    from nanoqwen.distributed import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    model, tokenizer = load_checkpoint(args.model, device, resolve_dtype(args.dtype, device), generation)
    return model.prepare_for_decoding(), tokenizer


def add_arguments(p: argparse.ArgumentParser) -> None:
    from nanoqwen.distributed import add_device_arguments

    p.add_argument("--model", required=True, help="checkpoint folder (e.g. runs/NAME/best)")
    p.add_argument("--prompt", required=True, type=escaped_text,
                   help=f'text to continue ("": a new document, unconditioned); {ESCAPES_HELP}')
    p.add_argument("--num-samples", type=positive_int, default=1, metavar="N",
                   help="samples from the same prompt, one after another (default 1; with --seed S, sample k "
                        "uses seed S + k)")
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    add_sampling_arguments(p)
    add_device_arguments(p)


def load_for_sampling(args: argparse.Namespace) -> tuple[Qwen3, Tokenizer, SamplingParams]:
    """sample's and chat's model, tokenizer and sampling settings: the flags checked before the weights load, the
    tokenizer's end ids added once they have."""
    from nanoqwen.checkpoint import read_generation_file

    generation = read_generation_file(args.model)  # once: the end ids, sampling defaults and warnings come from it
    params = sampling_params(args, generation)
    model, tokenizer = load_for_inference(args, generation)
    params.stop_token_ids = tokenizer.stop_ids
    return model, tokenizer, params


def run(args: argparse.Namespace) -> int:
    reopen_closed_stdout()
    model, tokenizer, params = load_for_sampling(args)
    fits = check_fits(model, len(prompt_ids(tokenizer, args.prompt)), params.max_new_tokens)  # before it is echoed
    if fits < params.max_new_tokens:
        print(f"(--max-new-tokens {params.max_new_tokens}: at most {fits} fit in the model's context after the "
              "prompt)", file=sys.stderr)
    # On a terminal the model's control characters are shown, as in the chat (an ESC sequence cleared the screen, a
    # carriage return wrote over the line). The prompt is the user's.
    for i in range(args.num_samples):
        if i:
            params.seed = nth_seed(args.seed, i)
            print("\n---")
        print(args.prompt, end="", flush=True)
        try:
            if args.stream:
                for piece in stream_text(model, tokenizer, args.prompt, params):
                    sys.stdout.write(for_stdout(piece))
                    sys.stdout.flush()
            else:
                print(for_stdout(generate(model, tokenizer, [args.prompt], params)[0].text), end="")
        finally:
            print(flush=True)  # the text's line ends, Ctrl-C or not: "interrupted" goes below it, not after it
    return 0
