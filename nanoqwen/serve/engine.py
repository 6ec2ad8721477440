"""The inference engine behind the server: one worker thread owns the model and decodes every request
in flight together (continuous batching); results flow back to asyncio through per-job queues.

Why one thread: the model and its KV cache are never touched by two threads at once, so requests
cannot mix state. Why batching: on CPU and GPU alike one forward pass over B rows costs far less than
B passes (the weights are read once), so total throughput grows with the number of streams.

How rows share one cache: `KVCache` keeps all rows at the same slot count, so a row's tokens always
end at the current slot. A new request is prefilled on its own (exactly as `generate` would), then the
batch cache is rebuilt with every row right-aligned and the slots before a row marked invalid (the
cache's `key_valid` mask, the same mechanism left-padded prompts use). RoPE positions are per row, so
padding never shifts a row's positions. The cache is rebuilt (a copy) only when rows join or leave, or
when it is full: it holds a little room to grow (CACHE_GROWTH), not every token its rows may still sample.

Long prompts are prefilled in chunks of `prefill_chunk` tokens, one chunk per step while other rows
are decoding, so a long prompt arriving delays the running streams by one chunk's time per token
instead of stalling them for its whole prefill. Chunk boundaries depend only on the prompt, so a
greedy request gives the same tokens whatever runs beside it. (A seeded sampled one draws the same
random numbers, but a batched matmul may round a logit differently in its last bits, which can tip a
near-tie in top-p or sampling: the same text alone or batched is promised for greedy decoding only.)

On CUDA, a batch that keeps its rows for a few steps is decoded through a captured CUDA graph
(generate.DecodeStep over the batch cache with fixed shapes); each rebuilt cache gets its own.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import weakref
from dataclasses import dataclass, field

import torch

from nanoqwen.generate import (
    DecodeStep,
    Penalties,
    SamplingParams,
    TextStream,
    check_fits,
    graphs_by_default,
    next_tokens,
    nth_seed,
    sampling_generator,
    token_logprobs,
)
from nanoqwen.model import KVCache, Qwen3
from nanoqwen.tokenizer import Tokenizer

log = logging.getLogger("nanoqwen.serve")
# A batch is captured as a CUDA graph at its 4th decode step: rows join and leave often while requests
# arrive, and a capture costs about two eager steps, so only a batch that has settled is worth one.
CAPTURE_AT = 4
# Slots a rebuilt batch cache holds beyond the tokens in it (or as many as those tokens, if more): a request
# that names no max_tokens may run to the model's context, and reserving all of that up front for every row
# would hold gigabytes per request at Qwen3's 40,960 tokens. Growing by doubling keeps the copies few.
CACHE_GROWTH = 256


@dataclass
class TokenLogprob:
    """One sampled token with its log-probability and the most likely alternatives (see `token_logprobs`)."""
    token: int
    logprob: float | None  # None: the first token of an echoed prompt, which nothing came before
    top: list[tuple[int, float]]  # (token, logprob), best first
    text_offset: int  # characters of the choice's text before this token (at most the whole text's length)


@dataclass
class Delta:
    """New text of choice `index`, with the logprobs (when asked for) of the tokens whose text starts
    in the text sent so far and that no earlier event carried: text held back (a partial character, a
    possible stop string) delays them."""
    index: int
    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class Finished:
    """Choice `index` is complete. completion_tokens counts every sampled token, a stop token included;
    logprobs holds those of tokens not yet sent with a Delta (such as the stop token)."""
    index: int
    finish_reason: str  # "stop" (stop token or stop string) or "length"
    completion_tokens: int
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class Failed:
    """The job ends unanswered: the engine hit an error while working on it (500), or the server is shutting down
    (503, `Engine.end_all`); no more events follow."""
    message: str
    status: int = 500


Event = Delta | Finished | Failed
Score = tuple[float, list[tuple[int, float]]]  # a sampled token's logprob and the top (token, logprob) pairs


class Job:
    """One HTTP request: its choices (sequences) and the asyncio queue their events are delivered to."""

    def __init__(self, loop: asyncio.AbstractEventLoop, choices: int) -> None:
        self.loop = loop
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.choices = choices
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """Stop generating for this job (client gone); the worker drops its rows at the next step."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def emit(self, event: Event) -> None:
        """Called from the worker thread: hand the event to the job's event loop."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancel()


@dataclass(eq=False)  # identity, not field-wise equality (fields hold tensors)
class Sequence:
    """One choice being generated: prompt, sampling state, and the text stream it feeds."""
    job: Job
    index: int
    prompt: list[int]
    params: SamplingParams
    budget: int  # most new tokens it may sample (already capped to the context)
    stream: TextStream
    top_logprobs: int | None = None  # None: no logprobs; k: the sampled token's and the k most likely
    echo: bool = False  # the prompt's text (and, with top_logprobs, its tokens' logprobs) goes out first
    echoed: int = 0  # characters of echoed prompt text before the generated text (where its offsets start)
    prompt_scores: list[Score] = field(default_factory=list)  # of prompt tokens 1.. (when echoed with logprobs)
    generator: torch.Generator | None = None
    penalties: Penalties | None = None  # set at prefill when a penalty is active
    unsent: list[TokenLogprob] = field(default_factory=list)  # logprobs waiting for the next event
    generated: int = 0
    pending: int = -1  # last sampled token, fed to the model at the next step
    finished: bool = False
    cache: KVCache | None = field(default=None, repr=False)  # own prefill cache until merged into the batch
    # Choices of one prompt share its prefill: the first reads the prompt, the others take its cache (only
    # read from then on: copied into the batch) and last logits, instead of reading the prompt n times.
    leader: Sequence | None = field(default=None, repr=False)  # set on the others: the first choice
    prefilled: tuple[KVCache, torch.Tensor] | None = field(default=None, repr=False)  # on the first, for them
    followers: int = 0  # on the first: choices still to take `prefilled`

    @property
    def in_cache(self) -> int:
        """Tokens already in the KV cache: the prompt and every sampled token but the pending one."""
        return len(self.prompt) + self.generated - 1

    @property
    def plain_greedy(self) -> bool:
        """The next token is the raw argmax: greedy, no penalty, and no stop token held off by min_tokens."""
        return self.params.greedy and self.penalties is None and self.generated >= self.params.min_tokens


def answer_failed(seq: Sequence, error: Exception) -> None:
    """Tell the request `seq` belongs to that its generation failed, and stop its work."""
    seq.job.emit(Failed(f"generation failed: {type(error).__name__}: {error}"))
    seq.job.cancel()


class Engine:
    """Runs all model work on one thread. `submit` is called from the event loop."""

    def __init__(self, model: Qwen3, tokenizer: Tokenizer, max_batch_size: int = 32,
                 prefill_chunk: int = 512, fixed_shapes: bool | None = None,
                 cache_growth: int = CACHE_GROWTH) -> None:
        """`fixed_shapes`: decode each batch through a DecodeStep (a CUDA graph on CUDA, once the batch
        has kept its rows for CAPTURE_AT steps). None means `graphs_by_default(model)`."""
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.prefill_chunk = prefill_chunk
        self.cache_growth = cache_growth
        self.device = model.model.embed_tokens.weight.device
        self.fixed_shapes = graphs_by_default(model) if fixed_shapes is None else fixed_shapes
        self._decode_step: DecodeStep | None = None  # over self._cache, when fixed_shapes
        # A Queue, not a SimpleQueue: stats() counts the choices in it (a request may hold many).
        self._inbox: queue.Queue[list[Sequence] | None] = queue.Queue()
        self._waiting: list[Sequence] = []  # submitted, not yet admitted (the batch was full)
        self._active: list[Sequence] = []  # rows of the batch, in cache row order
        self._admitting: list[Sequence] = []  # prefilled this step, joining the batch at its rebuild
        self._cache: KVCache | None = None
        self._thread = threading.Thread(target=self._run, name="nanoqwen-engine", daemon=True)
        self._stopping = False
        self._jobs: weakref.WeakSet[Job] = weakref.WeakSet()  # submitted, on the event loop's side: for `end_all`
        self.tokens_generated = 0  # since start, every sequence; cancelled work shows up as fewer tokens

    # -- called from the event loop ------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._inbox.put(None)
        self._thread.join(timeout=10)

    def end_all(self, message: str) -> None:
        """Called from the event loop: answer every job still running with `message` (a 503) and stop its work, so
        that each client gets an answer that ends as answers do (a stream its error event and [DONE]) rather than a
        connection cut mid-body."""
        for job in list(self._jobs):
            if not job.cancelled:  # (a finished job's answer has gone out: its response cancelled it)
                job.cancel()
                job.events.put_nowait(Failed(message, 503))

    def submit(self, prompts: list[list[int]], params: SamplingParams, n: int, top_logprobs: int | None = None,
               echo: bool = False) -> Job:
        """Queue `n` choices for each prompt; choice i * n + j continues prompt i. With `top_logprobs` set,
        events carry every sampled token's logprob and those of the `top_logprobs` most likely tokens.
        With `echo`, a choice's first Delta is its prompt (and its tokens' logprobs, the first's None), as
        OpenAI's completions echo it; the generated text's offsets then count from the prompt's start.

        Seeded sampling gives choice k the seed `seed + k` (`nth_seed`: wrapped into the seed range), so each
        choice draws the same random numbers whatever else runs beside it, as `nanoqwen sample --num-samples` does.
        """
        job = Job(asyncio.get_running_loop(), len(prompts) * n)
        sequences = []
        for i, prompt in enumerate(prompts):
            for j in range(n):
                index = i * n + j
                sequences.append(seq := self._new_sequence(job, index, prompt, params, nth_seed(params.seed, index),
                                                           top_logprobs, echo))
                if j:  # queued after the first choice, so admitted once it has read the prompt
                    seq.leader = sequences[-1 - j]
                    seq.leader.followers += 1
        self._inbox.put(sequences)
        self._jobs.add(job)
        return job

    def stats(self) -> dict[str, int]:
        """Rows decoding now, choices waiting for a row, tokens generated (read without a lock: approximate)."""
        with self._inbox.mutex:
            submitted = sum(len(item) for item in self._inbox.queue if item)
        return {"active": len(self._active), "waiting": len(self._waiting) + submitted,
                "tokens_generated": self.tokens_generated}

    def _new_sequence(self, job: Job, index: int, prompt: list[int], params: SamplingParams,
                      seed: int | None, top_logprobs: int | None, echo: bool = False) -> Sequence:
        budget = check_fits(self.model, len(prompt), params.max_new_tokens)  # capped to what fits the context
        text = TextStream.for_params(self.tokenizer, params)
        seq = Sequence(job, index, prompt, params, budget, text, top_logprobs=top_logprobs, echo=echo)
        if not params.greedy:
            seq.generator = sampling_generator(self.device, seed)
        return seq

    # -- the worker thread ---------------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            while not self._stopping:
                try:
                    self._collect(block=not self._active and not self._waiting)
                    self._step()
                except Exception as e:  # never let one bad step kill the server: fail what was running
                    log.exception("generation failed")
                    for seq in dict.fromkeys(self._active + self._admitting + self._waiting):  # each once
                        answer_failed(seq, e)
                    self._active, self._admitting, self._waiting = [], [], []
                    self._cache, self._decode_step = None, None

    def _collect(self, block: bool) -> None:
        """Move newly submitted sequences into the waiting list; sleep here when there is no work."""
        try:
            item = self._inbox.get(block=block)
            while True:
                if item is None:
                    return
                self._waiting.extend(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _step(self) -> None:
        """Drop finished and cancelled rows, admit what fits, then decode one token for every row.

        Prompts are prefilled first come, first served. While rows are decoding, a step runs at most
        one prefill chunk, so their streams keep moving; with none decoding, prompts go at full speed.
        """
        alive = [s for s in self._active if not (s.finished or s.job.cancelled)]
        self._waiting = [s for s in self._waiting if not s.job.cancelled]
        self._admitting = admitted = []  # held where a failing step's handler finds them
        while self._waiting and len(alive) + len(admitted) < self.max_batch_size:
            seq = self._waiting[0]
            if seq.job.cancelled:  # a choice of a request that failed in this step: no more work for it
                self._waiting.pop(0)
                continue
            logits = self._prefill_chunk(seq)
            if logits is not None:
                admitted.append(self._waiting.pop(0))
                try:
                    done = self._first_token(seq, logits)
                except Exception as e:  # noqa: BLE001 (this request's failure, not the batch's)
                    self._fail(seq, e)
                    done = True
                if done or seq.job.cancelled:  # finished or failed at its first token: it never joins the batch
                    admitted.pop()
            if alive or (admitted and logits is None):
                break
        full = self._cache is not None and self._cache.length == self._cache.max_len
        if admitted or len(alive) != len(self._active) or full:
            self._rebuild_cache(alive, admitted)
        self._admitting = []
        if self._active:
            self._decode()

    def _prefill_chunk(self, seq: Sequence) -> torch.Tensor | None:
        """Run the next chunk of the prompt through the model, alone, into the sequence's own cache;
        the last position's logits (1, V) once the whole prompt is in, else None."""
        if seq.leader is not None:
            leader, seq.leader = seq.leader, None
            if leader.prefilled is not None:  # (None only if the first choice failed before it was read)
                seq.cache, logits = leader.prefilled
                seq.prompt_scores = leader.prompt_scores
                leader.followers -= 1
                if not leader.followers:
                    leader.prefilled = None
                return logits
        if seq.cache is None:
            seq.cache = self.model.new_cache(1, len(seq.prompt))
        start = seq.cache.length  # prompt tokens already in
        end = min(len(seq.prompt), start + self.prefill_chunk)
        ids = torch.tensor([seq.prompt[start:end]], dtype=torch.long, device=self.device)
        scored = seq.echo and seq.top_logprobs is not None
        logits = self.model(ids, cache=seq.cache, logits_to_keep=end - start if scored else 1)[0]
        if scored:  # position k predicts prompt token k + 1: every chunk's logits, a chunk at a time
            following = seq.prompt[start + 1:end + 1]
            seq.prompt_scores += self._scores(logits[:len(following)], following, seq.top_logprobs or 0)
        if end < len(seq.prompt):
            return None
        last = logits[-1:].float()
        if seq.followers:
            seq.prefilled = (seq.cache, last)
        return last

    def _scores(self, logits: torch.Tensor, tokens: list[int], top: int) -> list[Score]:
        """(logprob, the `top` most likely) of each row's token, from its logits (rows, V)."""
        chosen, values, ids = token_logprobs(logits, torch.tensor(tokens, device=self.device), top)
        return [(c, list(zip(i, v))) for c, v, i in zip(chosen.tolist(), values.tolist(), ids.tolist())]

    def _echo(self, seq: Sequence) -> None:
        """Send the prompt's text as the choice's first Delta, with its tokens' logprobs when asked for."""
        stream, pieces, entries = TextStream(self.tokenizer, [], seq.params.skip_special_tokens), [], []
        for k, token in enumerate(seq.prompt):
            pieces.append(stream.push(token))
            if seq.top_logprobs is not None:
                logprob, top = seq.prompt_scores[k - 1] if k else (None, [])
                entries.append(TokenLogprob(token, logprob, top, stream.token_start))
        text = "".join(pieces) + stream.finish()
        seq.echoed = len(text)
        seq.job.emit(Delta(seq.index, text, entries))

    def _first_token(self, seq: Sequence, logits: torch.Tensor) -> bool:
        """Sample the first token from the prompt's last logits (1, V). True if that already finishes it."""
        if seq.echo:
            self._echo(seq)
        if seq.budget == 0:  # max_tokens 0: the prompt (echoed, scored) is the whole answer
            seq.finished = True
            seq.job.emit(Finished(seq.index, "length", 0))
            return True
        ids = torch.tensor([seq.prompt], dtype=torch.long, device=self.device)
        seq.penalties = Penalties.start(seq.params, ids, self.model.config.vocab_size)
        token = int(next_tokens(logits, seq.params, seq.generator, seq.penalties, seq.generated)[0])
        return self._accept(seq, token, self._logprobs([seq], logits, [token])[0])

    def _decode(self) -> None:
        rows = self._active
        tokens = torch.tensor([s.pending for s in rows], dtype=torch.long, device=self.device)  # (B,)
        if self._decode_step is not None:
            logits = self._decode_step(tokens)[:, -1].float()  # (B, V), read before the next step
        else:
            logits = self.model(tokens[:, None], cache=self._cache)[:, -1].float()
        greedy = logits.argmax(-1).tolist() if any(s.plain_greedy for s in rows) else []
        sampled = []
        for row, seq in enumerate(rows):
            try:
                sampled.append(greedy[row] if seq.plain_greedy else
                               int(next_tokens(logits[row:row + 1], seq.params, seq.generator, seq.penalties,
                                               seq.generated)[0]))
            except Exception as e:  # noqa: BLE001 (this request's failure, not the batch's)
                self._fail(seq, e)
                sampled.append(0)  # a placeholder: the row is dropped at the next step
        scores = self._logprobs(rows, logits, sampled)
        for seq, token, score in zip(rows, sampled, scores):  # finished rows leave the batch at the next step
            if seq.finished or seq.job.cancelled:  # nothing follows a job's Failed (or its client leaving)
                continue
            try:
                self._accept(seq, token, score)
            except Exception as e:  # noqa: BLE001
                self._fail(seq, e)

    def _fail(self, seq: Sequence, error: Exception) -> None:
        """One request failed in its own work (sampling, its text): answer it, and only it, with the error."""
        log.exception("a request failed")
        answer_failed(seq, error)
        seq.finished = True

    def _logprobs(self, rows: list[Sequence], logits: torch.Tensor, sampled: list[int]
                  ) -> list[Score | None]:
        """(logprob, top alternatives) of each row's sampled token; None for rows that did not ask.
        Only the rows that asked go through log_softmax: other requests pay nothing."""
        asked = [row for row, seq in enumerate(rows) if seq.top_logprobs is not None]
        scores: list[Score | None] = [None] * len(rows)
        if not asked:
            return scores
        index = torch.tensor(asked, device=self.device)
        top = max(rows[row].top_logprobs or 0 for row in asked)
        for row, (chosen, best) in zip(asked, self._scores(logits[index], [sampled[row] for row in asked], top)):
            scores[row] = (chosen, best[:rows[row].top_logprobs or 0])
        return scores

    def _accept(self, seq: Sequence, token: int, score: Score | None) -> bool:
        """Record a sampled token (and its logprobs), send its text; True when the sequence is finished."""
        seq.generated += 1
        self.tokens_generated += 1
        if seq.penalties is not None:
            seq.penalties.record(torch.tensor([token], device=self.device))
        delta, reason = seq.stream.accept(token, seq.params.stop_token_ids)
        if score is not None:
            seq.unsent.append(TokenLogprob(token, score[0], score[1], seq.echoed + seq.stream.token_start))
        if reason is None and seq.generated >= seq.budget:  # the held-back tail may still hold a stop string
            delta += seq.stream.finish()
            reason = "stop" if seq.stream.stopped else "length"
        if delta:  # with the logprobs of the tokens whose text starts in the text sent so far
            shown = seq.echoed + seq.stream.emitted
            seq.job.emit(Delta(seq.index, delta, [e for e in seq.unsent if e.text_offset < shown]))
            seq.unsent = [e for e in seq.unsent if e.text_offset >= shown]
        if reason is None:
            seq.pending = token
            return False
        seq.finished = True
        for entry in seq.unsent:  # tokens of a stop string that was cut off start where the text ends
            entry.text_offset = min(entry.text_offset, seq.echoed + seq.stream.emitted)
        seq.job.emit(Finished(seq.index, reason, seq.generated, seq.unsent))
        seq.unsent = []
        return True

    def _rebuild_cache(self, survivors: list[Sequence], admitted: list[Sequence]) -> None:
        """A fresh batch cache holding the surviving rows and the admitted ones, all right-aligned.

        Every row's tokens sit in the last `in_cache` slots before the common write position, so the
        survivors are one slice of the old cache; admitted rows come from their own prefill caches.
        Capacity is what the longest-running row still needs, up to `cache_growth` slots (or the slots in
        use, if more) past the tokens held; `_step` rebuilds a cache that fills up before its rows finish.
        """
        old_row = {id(s): row for row, s in enumerate(self._active)}
        rows = survivors + admitted
        self._active = rows
        self._decode_step = None
        if not rows:
            self._cache = None
            return
        span = max(s.in_cache for s in rows)  # slots the aligned rows occupy
        needed = max(s.budget - s.generated for s in rows)
        capacity = span + min(needed, max(self.cache_growth, span))
        cache = self.model.new_cache(len(rows), capacity)
        if survivors:
            old = self._cache
            assert old is not None
            keep = torch.tensor([old_row[id(s)] for s in survivors], device=self.device)
            width = min(old.length, span)
            src, dst = slice(old.length - width, old.length), slice(span - width, span)
            cache.keys[:, :len(survivors), :, dst] = old.keys[:, keep, :, src]
            cache.values[:, :len(survivors), :, dst] = old.values[:, keep, :, src]
            cache.key_valid[:len(survivors), dst] = old.key_valid[keep, src]
            cache.next_position[:len(survivors)] = old.next_position[keep]
        for row, seq in enumerate(admitted, start=len(survivors)):
            own = seq.cache
            assert own is not None
            n = own.length
            cache.keys[:, row, :, span - n:span] = own.keys[:, 0, :, :n]
            cache.values[:, row, :, span - n:span] = own.values[:, 0, :, :n]
            cache.key_valid[row, span - n:span] = True
            cache.next_position[row] = own.next_position[0]
            seq.cache = None
        cache.length = span
        # Only a batch with invalid slots needs a mask; a lone request decodes exactly as `generate` does.
        cache.padded = not bool(cache.key_valid[:, :span].all())
        self._cache = cache
        if self.fixed_shapes:
            self._decode_step = DecodeStep(self.model, cache, capture_at=CAPTURE_AT)

