"""Generation speed: nanoqwen vs Transformers `generate`, and the server's throughput under load.

    python bench/generate.py                      # two random `tiny`-preset models (see below)
    python bench/generate.py --model runs/NAME/best --new-tokens 256
    python bench/generate.py --device cuda        # on a GPU, both libraries in bfloat16
    python bench/generate.py --preset qwen3-0.6b  # one random model of that preset, Qwen3 vocabulary
    python bench/generate.py --toy                # the two models at a toy size: does it run (the tests)

Models (random weights; greedy speed does not depend on them): the `tiny` preset with the Qwen3 vocabulary, as
`nanoqwen init --preset tiny` writes it (43.6M parameters, most of them the 151936-row embedding), and the
same preset at its own 8192-token vocabulary (7M; with the BPE of that size `nanoqwen tokenizer train` makes
on Shakespeare, which a `tiny` run trains too). Sampling's speed does depend on them: random weights give a
nearly flat distribution, where top-p 0.95 keeps ~138,000 of the 151,936 tokens, unlike a trained model. So the
saved checkpoint's final norm weight is scaled by PEAK (20): the logits 20 times larger, top-p 0.95 keeps a
few tokens (a median of 4 in a check on the prompt, the best holding ~0.85), and both libraries load that same
peaked checkpoint. A --model is used as it is.

Single stream: the same checkpoint, prompt and length in both libraries, each loaded as its users
load it (`nanoqwen sample/chat/serve`'s `load_for_inference`; `AutoModelForCausalLM.from_pretrained`), and
decoding as each does by default: on CUDA nanoqwen through a CUDA graph, Transformers' `generate` in its eager
loop over a dynamic cache (the table's header says so where a graph was used).
Time to first token (prefill + first token) and decode tokens/s (the tokens after the first over their
time), greedy; then sampled decode tokens/s in the same processes, the same length: nanoqwen's
SamplingParams(temperature=1, top_k=0, top_p=0.95) and `generate(do_sample=True, top_p=0.95, top_k=0,
temperature=1)`, which override the checkpoint's generation_config.json. Each library alone in its own
process, --repeats processes per library alternating, --runs generations of each kind in each after a warm-up,
medians over all of them. Both run in the default OpenMP settings, as
`nanoqwen sample` and a Transformers script do. Server: `nanoqwen serve` in a subprocess; total tokens/s
of one streamed greedy request vs --streams concurrent ones.
Prints a markdown table on stdout (progress on stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing; tests/ holds the server fixture

from nanoqwen.checkpoint import config_for_tokenizer, save_checkpoint  # noqa: E402
from nanoqwen.config import load_preset  # noqa: E402
from nanoqwen.generate import SamplingParams, generate_ids, graphs_by_default, load_for_inference  # noqa: E402
from nanoqwen.model import Qwen3  # noqa: E402
from nanoqwen.tokenizer import load_tokenizer, qwen3_tokenizer  # noqa: E402

PROMPT = ("The history of the written word begins with marks pressed into clay, and over centuries those "
          "marks became alphabets that")
Timer = Callable[[list[int], int, bool], list[float]]  # (prompt ids, new tokens, sampled) -> time of each new token
# --toy (tests/test_bench.py): the same two vocabularies around a one-layer model of width 64, the BPE trained on
# Shakespeare's first 200KB (enough for all 8192 ids): every row of the table, in a fraction of the time
TOY_MODEL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2,
             "num_key_value_heads": 1, "head_dim": 32, "max_window_layers": 1}
TOY_BPE_BYTES = "200KB"
PEAK = 20.0  # the random checkpoints' final norm weight is scaled by this: a peaked distribution (see above)
TOP_P = 0.95  # the sampled rows' top-p (temperature 1, no top-k)
MODES = ("greedy", "sampled")  # what each worker times, in this order


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def nanoqwen_timer(model_dir: Path, device: str, dtype: str) -> tuple[Timer, int, bool]:
    """The timer, the model's parameter count, and whether it decodes through a CUDA graph (on CUDA, as
    `nanoqwen sample` does; Transformers' `generate` runs its eager loop over a dynamic cache)."""
    model, _ = load_for_inference(argparse.Namespace(model=str(model_dir), device=device, dtype=dtype))

    def run(prompt_ids: list[int], new_tokens: int, sampled: bool) -> list[float]:
        # no stop ids: always the full length
        params = (SamplingParams(max_new_tokens=new_tokens, temperature=1.0, top_k=0, top_p=TOP_P, seed=0) if sampled
                  else SamplingParams(max_new_tokens=new_tokens, temperature=0))
        start, times = time.perf_counter(), []
        for _ in generate_ids(model, [prompt_ids], params):
            times.append(time.perf_counter() - start)
        return times

    return run, model.num_params(), graphs_by_default(model)


def transformers_timer(model_dir: Path, device: str, dtype: str) -> Timer:
    import transformers
    from transformers.generation.streamers import BaseStreamer

    # SDPA named, not left to the default of whichever Transformers is installed (nanoqwen attends with SDPA on
    # CUDA; on a CPU a decode step's one query goes through two bmm calls, its prefill through SDPA)
    # Loaded in Transformers' default dtype, then cast: before 4.56 its models refuse `dtype=` (named torch_dtype)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa")
    model = model.to(device=device, dtype=getattr(torch, dtype)).eval()
    # generate() fills what its call leaves unset from the folder's generation_config.json (a repetition_penalty,
    # say); nanoqwen's SamplingParams here take nothing from it: both do exactly what the bench asks
    model.generation_config = transformers.GenerationConfig()

    class Clock(BaseStreamer):
        """generate() calls put() with the prompt first, then with each new token; `forwards`, where given, counts
        the model's forward passes (a hook appends to it), read at each token."""

        def __init__(self, start: float, forwards: list[int] | None = None) -> None:
            self.start, self.times, self.prompt_seen = start, [], False
            self.forwards, self.forwards_at_token = forwards, []

        def put(self, value: torch.Tensor) -> None:
            if self.prompt_seen:
                self.times.append(time.perf_counter() - self.start)
                if self.forwards is not None:
                    self.forwards_at_token.append(len(self.forwards))
            self.prompt_seen = True

        def end(self) -> None:
            pass

    def generate(prompt_ids: list[int], new_tokens: int, sampled: bool, forwards: list[int] | None = None) -> Clock:
        input_ids = torch.tensor([prompt_ids], device=device)
        sampling = (dict(do_sample=True, temperature=1.0, top_p=TOP_P, top_k=0) if sampled
                    else dict(do_sample=False, temperature=None, top_p=None, top_k=None))
        torch.manual_seed(0)
        clock = Clock(time.perf_counter(), forwards)
        with torch.inference_mode():
            # eos_token_id=None: no early stop, exactly new_tokens, like the nanoqwen side.
            model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                           eos_token_id=None, pad_token_id=0, streamer=clock, **sampling)
        return clock

    # The clock reads each token's time at put(): right where generate() hands over token k after k forward passes
    # (the prefill, then k - 1 steps), as nanoqwen yields it. Transformers streams a step late where it defers its
    # stop check (MPS in 5.25, CUDA in its plans), and the time to first token would hold a decode step: checked
    # once, outside the timed runs (the hook costs a call a step).
    forwards: list[int] = []
    hook = model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    try:
        late = generate([0, 1, 2], 4, False, forwards).forwards_at_token
    finally:
        hook.remove()
    # Streamed late, the bench goes on (a GPU lease gives one try) and says so: Transformers' time to first token
    # then holds a decode step (against it), its decode rate one step fewer (for it).
    streams_late = late != [1, 2, 3, 4]
    if streams_late:
        print(f"warning: Transformers {transformers.__version__} streamed tokens 1-4 after {late} forward passes, "
              "not one each: its time to first token includes a decode step", file=sys.stderr)

    def run(prompt_ids: list[int], new_tokens: int, sampled: bool) -> list[float]:
        return generate(prompt_ids, new_tokens, sampled).times

    run.streams_late = streams_late  # type: ignore[attr-defined]
    return run


def worker(library: str, model_dir: Path, prompt_ids: list[int], new_tokens: int, runs: int, device: str,
           dtype: str) -> None:
    """One library alone in this process: a warm-up, then `runs` timed greedy generations and `runs` sampled ones,
    as JSON on stdout. Both sides hand each token to the host as it is made (a device sync), so the clock reads
    real times."""
    if library == "nanoqwen":
        timer, n_params, graph = nanoqwen_timer(model_dir, device, dtype)
    else:
        timer, n_params, graph = transformers_timer(model_dir, device, dtype), 0, False
    late = bool(getattr(timer, "streams_late", False))
    samples: dict[str, list[tuple[float, float]]] = {}
    for mode in MODES:
        timer(prompt_ids, 8, mode == "sampled")  # warm-up: first-call allocations and kernel selection
        samples[mode] = []
        for _ in range(runs):
            times = timer(prompt_ids, new_tokens, mode == "sampled")
            assert len(times) == new_tokens, f"{library} made {len(times)} tokens"
            samples[mode].append((times[0], (len(times) - 1) / (times[-1] - times[0])))
    print(json.dumps({"samples": samples, "params": n_params, "graph": graph, "late": late}))


TABLE_NOTES: set[str] = set()  # what a worker found that the figures depend on, printed under the table


def single_stream(model_dir: Path, prompt_ids: list[int], new_tokens: int, repeats: int, runs: int,
                  device: str, dtype: str) -> tuple[dict[tuple[str, str], tuple[float, float]], int, bool]:
    """{(library, greedy or sampled): (median time to first token in s, median decode tokens/s)}, nanoqwen's
    parameter count, and whether it decoded through a CUDA graph.

    Each library runs alone in its own processes (importing and running the other one in the same
    process slows the next by 10-20%: more live Python objects, colder caches), `repeats` processes
    each, alternating, `runs` generations per process."""
    samples: dict[tuple[str, str], list[tuple[float, float]]] = {
        (library, mode): [] for library in ("nanoqwen", "transformers") for mode in MODES}
    n_params, graph = 0, False
    for _ in range(repeats):
        for library in ("nanoqwen", "transformers"):
            done = subprocess.run([sys.executable, __file__, "--worker", library, "--model", str(model_dir),
                                   "--prompt-ids", json.dumps(prompt_ids), "--new-tokens", str(new_tokens),
                                   "--runs", str(runs), "--device", device, "--dtype", dtype],
                                  capture_output=True, text=True)
            if done.returncode != 0:  # its reason, not only its exit status: a GPU lease gives one try
                raise SystemExit(f"the {library} worker failed:\n{done.stderr[-3000:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            for mode in MODES:
                samples[library, mode] += [tuple(sample) for sample in result["samples"][mode]]
            n_params, graph = max(n_params, result["params"]), graph or result["graph"]
            if result.get("late"):  # said under the table: its time to first token holds a decode step
                TABLE_NOTES.add("Transformers streamed each token a forward pass late here: its time to first token "
                                "includes one decode step, and its decode rate counts one step fewer")
    medians = {name: (statistics.median(s[0] for s in runs_), statistics.median(s[1] for s in runs_))
               for name, runs_ in samples.items()}
    for (library, mode), (ttft, rate) in medians.items():
        log(f"  {library}, {mode}: first token {ttft * 1e3:.1f} ms, decode {rate:.1f} tok/s")
    return medians, n_params, graph


# -- server -----------------------------------------------------------------------------------
async def server_throughput(url: str, prompts: list[list[int]], new_tokens: int) -> float:
    """Total completion tokens per second of one streamed greedy request per prompt, all at once."""
    import httpx

    async def one(client: httpx.AsyncClient, prompt: list[int]) -> int:
        body = {"prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        tokens = 0
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {") and (usage := json.loads(line[6:]).get("usage")):
                    tokens = usage["completion_tokens"]
        return tokens

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=len(prompts) + 1)) as client:
        await one(client, prompts[0])  # warm-up
        start = time.perf_counter()
        counts = await asyncio.gather(*(one(client, p) for p in prompts))
        assert all(counts), "a request produced no tokens"
        return sum(counts) / (time.perf_counter() - start)


@contextmanager
def serving(model_dir: Path, device: str, dtype: str, *flags: str) -> Iterator[str]:
    """`nanoqwen serve` of the model in a subprocess (the tests' fixture); yields its base URL."""
    from tests.serve_helpers import run_server

    with tempfile.TemporaryDirectory() as tmp, run_server(model_dir, Path(tmp) / "serve.log", "--device", device,
                                                            "--dtype", dtype, *flags) as url:
        yield url


def bench_server(model_dir: Path, prompt_ids: list[int], streams: int, new_tokens: int, device: str, dtype: str
                 ) -> tuple[float, float]:
    prompts = [prompt_ids[i % len(prompt_ids):] + prompt_ids[:i % len(prompt_ids)] for i in range(streams)]
    with serving(model_dir, device, dtype) as url:
        one = asyncio.run(server_throughput(url, prompts[:1], new_tokens))
        many = asyncio.run(server_throughput(url, prompts, new_tokens))
    log(f"  server: 1 stream {one:.1f} tok/s, {streams} streams {many:.1f} tok/s")
    return one, many


async def longest_pause(url: str, stream_prompt: list[int], long_prompt: list[int]) -> float:
    """The longest gap (s) between two pieces of a running greedy stream while a long prompt arrives."""
    import httpx

    async with httpx.AsyncClient(timeout=600) as client:
        times: list[float] = []  # arrival of each piece of the running stream
        marks: list[tuple[int, int]] = []  # pieces received when the long request was sent, and answered
        arrived = asyncio.Event()

        async def running() -> None:
            body = {"prompt": stream_prompt, "max_tokens": 160, "temperature": 0, "stream": True}
            async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        times.append(time.perf_counter())
                        if len(times) == 20:
                            arrived.set()

        async def long_request() -> None:
            await arrived.wait()
            start = len(times)
            await client.post(f"{url}/v1/completions", json={"prompt": long_prompt, "max_tokens": 1})
            marks.append((start, len(times)))

        await asyncio.gather(running(), long_request())
        first, last = marks[0]
        return max(b - a for a, b in zip(times[first - 1:last + 1], times[first:last + 2]))


def bench_prefill_pause(model_dir: Path, prompt_ids: list[int], long_tokens: int, chunk: int, device: str,
                        dtype: str) -> list[float]:
    """Longest pause of a running stream while a `long_tokens` prompt is read: whole vs in chunks."""
    long_prompt = (prompt_ids * (long_tokens // len(prompt_ids) + 1))[:long_tokens]
    pauses = []
    for prefill_chunk in (long_tokens, chunk):
        with serving(model_dir, device, dtype, "--prefill-chunk", str(prefill_chunk)) as url:
            asyncio.run(longest_pause(url, prompt_ids, long_prompt[:32]))  # warm-up
            pauses.append(min(asyncio.run(longest_pause(url, prompt_ids, long_prompt)) for _ in range(3)))
        log(f"  prefill chunk {prefill_chunk}: longest pause {pauses[-1] * 1e3:.0f} ms")
    return pauses


def nanoqwen_command(*args: str) -> None:
    """`nanoqwen ARGS` in this process, what it prints dropped (its errors said): nothing is timed here, and a
    process of its own was seconds of imports."""
    from nanoqwen.cli import main as nanoqwen_main

    with contextlib.redirect_stdout(io.StringIO()):
        code = nanoqwen_main(list(args))
    if code != 0:
        raise SystemExit(f"nanoqwen {' '.join(args)} failed (exit {code})")


def random_checkpoint(directory: Path, vocab: str, preset: str = "tiny", toy: bool = False) -> Path:
    """A preset with the Qwen3 vocabulary (as `nanoqwen init` writes it), or `tiny` at its own size with the
    8,192-id BPE its runs train (a checkpoint's tokenizer must fit its embedding: nanoqwen refuses one that
    does not, as a model with the Qwen3 tokenizer and 8,192 rows was). `toy`: TOY_MODEL's sizes instead."""
    changes = TOY_MODEL if toy else {}
    if vocab == "qwen3":
        nanoqwen_command("init", "--preset", preset, "--out", str(directory),
                         *(f"--set={field}={value}" for field, value in changes.items()))
        return peaked(directory)
    bpe = directory.with_name(f"{directory.name}-tokenizer")
    nanoqwen_command("tokenizer", "train", "--dataset", "shakespeare", "--vocab-size", vocab, "--out", str(bpe),
                     *(["--max-bytes", TOY_BPE_BYTES] if toy else []))
    tokenizer = load_tokenizer(bpe)
    torch.manual_seed(0)
    config = dataclasses.replace(load_preset(preset).model, **changes)
    return peaked(save_checkpoint(Qwen3(config_for_tokenizer(config, tokenizer, fit_vocab=True)), directory,
                                  tokenizer))


def peaked(directory: Path) -> Path:
    """The checkpoint with its final norm weight scaled by PEAK, in place: the logits PEAK times larger, so that
    top-p keeps a few tokens as it does for a trained model (random weights give a nearly flat distribution)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    weights_file = directory / "model.safetensors"
    with safe_open(weights_file, "pt") as weights:
        metadata = weights.metadata()
    tensors = load_file(weights_file)
    tensors["model.norm.weight"] *= PEAK
    save_file(tensors, weights_file, metadata=metadata)
    return directory


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="checkpoint folder (default: the two random models)")
    p.add_argument("--preset", default=None, help="instead: one random model of this preset, Qwen3 vocabulary")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="processes per library, alternating")
    p.add_argument("--runs", type=int, default=3, help="timed generations per process")
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--server-tokens", type=int, default=64, help="tokens per request in the server test")
    p.add_argument("--no-server", action="store_true")
    p.add_argument("--long-prompt", type=int, default=448,
                   help="tokens of the prompt that arrives while a stream runs (server pause test)")
    p.add_argument("--prefill-chunk", type=int, default=64, help="the chunked setting in the pause test")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="both libraries' weights (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--toy", action="store_true",
                   help="the two random models at a toy size (the tests' quick run; its speeds mean nothing)")
    p.add_argument("--worker", choices=["nanoqwen", "transformers"], help=argparse.SUPPRESS)
    p.add_argument("--prompt-ids", type=json.loads, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if args.worker:
        return worker(args.worker, args.model, args.prompt_ids, args.new_tokens, args.runs, args.device, args.dtype)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible")
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # for the server subprocess
    load_before = os.getloadavg()[0]

    rows: list[str] = []
    graphed = False  # nanoqwen decoded through a CUDA graph: the header says so
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            models = [("given", args.model)]
        elif args.preset:
            models = [("qwen3", random_checkpoint(Path(tmp) / args.preset, "qwen3", args.preset))]
        else:
            models = [("qwen3", random_checkpoint(Path(tmp) / "tiny-qwen3-vocab", "qwen3", toy=args.toy)),
                      ("8192", random_checkpoint(Path(tmp) / "tiny-8k-vocab", "8192", toy=args.toy))]
        for kind, model_dir in models:
            vocab = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))["vocab_size"]
            prompt_ids = [i % vocab for i in qwen3_tokenizer().encode(PROMPT)]  # ids the model can read
            log(f"{model_dir.name}: prompt {len(prompt_ids)} tokens, {args.new_tokens} new, "
                f"{torch.get_num_threads()} threads")
            result, n_params, graph = single_stream(model_dir, prompt_ids, args.new_tokens, args.repeats, args.runs,
                                                    args.device, args.dtype)
            graphed = graphed or graph
            (ttft, ours), (hf_ttft, theirs) = result["nanoqwen", "greedy"], result["transformers", "greedy"]
            sampled_ours, sampled_theirs = result["nanoqwen", "sampled"][1], result["transformers", "sampled"][1]
            label = f"{model_dir.name} ({n_params / 1e6:.1f}M, vocab {vocab})"
            rows.append(f"| {label} | single-stream decode (tok/s) | {ours:.1f} | {theirs:.1f} | "
                        f"{ours / theirs:.2f}x |")
            rows.append(f"| {label} | time to first token (ms) | {ttft * 1e3:.1f} | {hf_ttft * 1e3:.1f} | "
                        f"{hf_ttft / ttft:.2f}x |")
            peak = "" if kind == "given" else f", final norm x{PEAK:g}"
            rows.append(f"| {label} | single-stream sampled decode, top-p {TOP_P} T=1{peak} (tok/s) | "
                        f"{sampled_ours:.1f} | {sampled_theirs:.1f} | {sampled_ours / sampled_theirs:.2f}x |")
            if not args.no_server and kind != "8192":
                one, many = bench_server(model_dir, prompt_ids, args.streams, args.server_tokens, args.device,
                                         args.dtype)
                rows.append(f"| {label} | server, 1 stream (total tok/s) | {one:.1f} | | |")
                rows.append(f"| {label} | server, {args.streams} streams (total tok/s) | {many:.1f} | | "
                            f"{many / one:.2f}x one stream |")
                whole, chunked = bench_prefill_pause(model_dir, prompt_ids, args.long_prompt, args.prefill_chunk,
                                                     args.device, args.dtype)
                rows.append(f"| {label} | server, longest pause of a stream while a {args.long_prompt}-token "
                            f"prompt arrives (ms) | {chunked * 1e3:.0f} (chunks of {args.prefill_chunk}) | | "
                            f"{whole * 1e3:.0f} in one pass |")

    wait_policy = os.environ.get("OMP_WAIT_POLICY", "unset")
    where = (f"CPU, {torch.get_num_threads()} torch threads, OMP_WAIT_POLICY={wait_policy}" if args.device == "cpu"
             else torch.cuda.get_device_name())
    print(f"\n{where}, {args.dtype}, torch {torch.__version__}, greedy and sampled, {args.new_tokens} new tokens "
          "single-stream, "
          f"{args.server_tokens} per server request; load average {load_before:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after"
          f"{'; nanoqwen decodes through a CUDA graph, Transformers generate eagerly' if graphed else ''}\n")
    print("| model | measure | nanoqwen | Transformers | ratio |")
    print("|---|---|---:|---:|---:|")
    print("\n".join(rows))
    for note in sorted(TABLE_NOTES):
        print(f"\nNote: {note}.")


if __name__ == "__main__":
    main()
