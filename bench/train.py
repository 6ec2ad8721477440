"""Training speed and memory: nanoqwen against `transformers.Qwen3ForCausalLM`, the same work on both sides.

    python bench/train.py                  # CPU: throughput at the cpu preset, peak memory at the Qwen3 vocabulary
    python bench/train.py --device cuda    # the same on a GPU (bf16, compile, fused AdamW), plus MFU of
                                           # qwen3-0.6b at seq 2048 and time to a target val loss for demo

Each contender runs in its own process (so peak memory is its own): the same config, weights, batches,
sequence length, dtype and AdamW settings, in a plain loop of forward, backward, clip, step. nanoqwen
uses its own pieces (CausalLMLoss with the chunked loss, build_optimizer, torch.compile on CUDA, and
the allocator setting `nanoqwen train` makes on CPU, reuse_freed_memory); where only nanoqwen is compiled
(CUDA, as each library runs by default) the row says so, and --compiled adds a row with both compiled;
Transformers uses `model(input_ids, labels=...).loss` and torch.optim.AdamW (fused on CUDA, as its Trainer
does; foreach on CPU, as a plain loop gets it, unless --tuned-baseline). Peak memory is the
process's peak resident set on CPU (getrusage) and torch.cuda.max_memory_allocated on CUDA.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

try:
    import resource  # Unix only: Windows has no getrusage, and its rows go without the CPU peak memory
except ImportError:
    resource = None  # type: ignore[assignment]

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nanoqwen.config import ModelConfig, load_preset  # noqa: E402
from nanoqwen.distributed import reuse_freed_memory  # noqa: E402
from nanoqwen.plot import read_metrics  # noqa: E402

if TYPE_CHECKING:
    from nanoqwen.optim import Optimizer

ATTENTION = "sdpa"  # Transformers' attention implementation: the kernel nanoqwen's training attention calls


# -- one contender, in its own process ------------------------------------------------------------
def build(contender: str, config: ModelConfig, device: torch.device, compile_model: bool, tuned: bool = False
          ) -> tuple[torch.nn.Module, Optimizer, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """(model, optimizer, step(inputs, targets) -> loss), both starting from the same weights. `tuned` gives
    Transformers fused AdamW, as its Trainer uses by default (torch >= 2.8), where a plain loop gets foreach."""
    from transformers import Qwen3Config, Qwen3ForCausalLM  # imported by both, so both pay its memory

    from nanoqwen.loss import CausalLMLoss
    from nanoqwen.model import Qwen3
    from nanoqwen.optim import build_optimizer

    torch.manual_seed(0)
    ours = Qwen3(config)
    if contender == "nanoqwen":
        model = ours.to(device)
        objective = CausalLMLoss(model)
        if compile_model:
            objective.compile()
        optimizer = build_optimizer(model, "adamw", 1e-3, 0.1, device)
        return model, optimizer, objective
    # SDPA named, not left to Transformers' default: nanoqwen's attention is SDPA too (its flash kernel)
    model = Qwen3ForCausalLM(Qwen3Config.from_dict(config.to_hf_dict(), attn_implementation=ATTENTION))
    model.load_state_dict(ours.state_dict())  # the same initial weights
    del ours
    model.to(device)
    if compile_model:
        model.compile()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1,
                                  fused=True if tuned or device.type == "cuda" else None)

    def objective(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # shift_labels: the targets are already shifted, so both predict the same T tokens per row
        return model(input_ids=inputs, labels=targets, shift_labels=targets.contiguous()).loss

    return model, optimizer, objective


def worker(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    config = dataclasses.replace(load_preset(args.preset).model, **json.loads(args.model_overrides))
    if config.bos_token_id >= config.vocab_size:  # a preset sized for a small BPE: special ids at its end
        last = config.vocab_size - 1
        config = dataclasses.replace(config, bos_token_id=last, eos_token_id=last, pad_token_id=last)
    amp = torch.bfloat16 if device.type == "cuda" else None
    torch.backends.cuda.matmul.allow_tf32 = True
    if device.type == "cpu" and (args.worker == "nanoqwen" or args.tuned_baseline):
        reuse_freed_memory()  # what `nanoqwen train` does on CPU
    rss_start = peak_rss()
    model, optimizer, objective = build(args.worker, config, device, args.compile, args.tuned_baseline)
    model.train()
    generator = torch.Generator().manual_seed(1)
    steps = args.warmup + args.steps
    data = torch.randint(0, config.vocab_size, (steps, args.batch, args.seq_len + 1), generator=generator)
    losses, times = [], []
    for i in range(steps):
        batch = data[i].to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = objective(batch[:, :-1], batch[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())  # syncs the GPU
        times.append(time.perf_counter() - t0)
    timed = sorted(times[args.warmup:] or times)
    result = {"contender": args.worker, "tokens_per_s": args.batch * args.seq_len / timed[len(timed) // 2],
              "losses": losses, "params": sum(p.numel() for p in model.parameters())}
    if device.type == "cuda":
        result["peak_bytes"] = torch.cuda.max_memory_allocated(device)
    else:
        result["peak_bytes"] = peak_rss()
        result["start_bytes"] = rss_start
    return result


def peak_rss() -> int | None:
    """This process's peak resident set in bytes: getrusage gives KiB on Linux, bytes on macOS; None without it."""
    if resource is None:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def run_worker(contender: str, preset: str, batch: int, seq_len: int, steps: int, warmup: int, device: str,
               compile_model: bool, overrides: dict | None = None, tuned_baseline: bool = False) -> dict:
    command = [sys.executable, __file__, "--worker", contender, "--preset", preset, "--batch", str(batch),
               "--seq-len", str(seq_len), "--steps", str(steps), "--warmup", str(warmup), "--device", device,
               "--model-overrides", json.dumps(overrides or {}), "--compile" if compile_model else "--no-compile",
               *(["--tuned-baseline"] if tuned_baseline else [])]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{contender} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


SPEED_HEADER = ("| setup | Transformers tok/s | nanoqwen tok/s | speed | Transformers peak GiB | nanoqwen peak GiB "
                "| memory | first-loss gap |\n|---|---|---|---|---|---|---|---|")
SPEED_LEGEND = ("\nspeed = nanoqwen / Transformers tokens per second (goal >= 1.3 on CPU, >= 1.5 on GPU); memory = "
                "nanoqwen / Transformers peak (goal <= 0.5 at the Qwen3 vocabulary); first-loss gap = |difference| "
                "of the first step's loss (same weights and data).")


# -- the comparisons ------------------------------------------------------------------------------
def compare(title: str, preset: str, batch: int, seq_len: int, steps: int, warmup: int, device: str,
            rounds: int = 1, tuned_baseline: bool = False,
            both_compiled: bool = False) -> tuple[str, float]:
    """One table row, and nanoqwen's tokens/s. Contenders alternate
    for `rounds` processes each; a busy machine only slows a round, so each side keeps its fastest round
    (median step) and its highest peak. `tuned_baseline` gives Transformers nanoqwen's CPU allocator
    setting (reuse_freed_memory) and fused AdamW too, to show what is left without them; `both_compiled`
    runs both under torch.compile (`nanoqwen train --compile` on CPU)."""
    from nanoqwen.train import default_compile

    # nanoqwen as `nanoqwen train` runs it (compiled where a compiler is found); Transformers in a plain eager loop
    ours_compiled = default_compile(torch.device(device)) or both_compiled
    if ours_compiled and not both_compiled:  # the row says so: not the same work on both sides (on CUDA)
        title += " (nanoqwen compiled, Transformers eager)"
    results: dict[str, list[dict]] = {"transformers": [], "nanoqwen": []}
    for _ in range(rounds):
        for c in results:
            compiled = ours_compiled if c == "nanoqwen" else both_compiled
            results[c].append(run_worker(c, preset, batch, seq_len, steps, warmup, device, compiled,
                                         tuned_baseline=tuned_baseline))
    speed = {c: max(r["tokens_per_s"] for r in rs) for c, rs in results.items()}
    gap = abs(results["nanoqwen"][0]["losses"][0] - results["transformers"][0]["losses"][0])
    ours, theirs = "nanoqwen", "transformers"
    if any(r["peak_bytes"] is None for rs in results.values() for r in rs):  # no getrusage (Windows)
        memory = "n/a | n/a | n/a"
    else:
        peak = {c: max(r["peak_bytes"] for r in rs) for c, rs in results.items()}
        memory = f"{peak[theirs] / (1 << 30):.2f} | {peak[ours] / (1 << 30):.2f} | **{peak[ours] / peak[theirs]:.2f}**"
    return (f"| {title} | {speed[theirs]:,.0f} | {speed[ours]:,.0f} | **{speed[ours] / speed[theirs]:.2f}x** | "
            f"{memory} | {gap:.1e} |", speed[ours])


MFU_BATCH = 4  # qwen3-0.6b at seq 2048: the speed row's setup, so its nanoqwen run gives the MFU too


def mfu_row(device: str, tokens_per_s: float | None = None) -> str:
    """Tokens/s and MFU of nanoqwen's qwen3-0.6b at seq 2048 (bf16, compile, fused AdamW); `tokens_per_s`
    from the speed row when it ran (one compile of the 0.6b model less in the device call)."""
    from nanoqwen.tracking import flops_per_token, peak_flops

    config = load_preset("qwen3-0.6b").model
    if tokens_per_s is None:
        tokens_per_s = run_worker("nanoqwen", "qwen3-0.6b", MFU_BATCH, 2048, 10, 3, device, True)["tokens_per_s"]
    peak = peak_flops(torch.device(device))  # the dense bf16 peak (989 TFLOP/s on an H100 SXM)
    # PaLM's count (what `nanoqwen train` shows) takes attention over all T x T scores; a causal kernel computes
    # about half of them, and that count is PaLM's at half the length (its attention term is linear in T)
    mfu, causal = (tokens_per_s * flops_per_token(config, seq) / peak if peak else float("nan")
                   for seq in (2048, 1024))
    name = torch.cuda.get_device_name()
    return (f"| qwen3-0.6b, {MFU_BATCH} x 2048, {name} | {tokens_per_s:,.0f} tok/s | MFU {mfu:.1%} "
            f"(PaLM's count; {causal:.1%} counting causal attention's half) |")


def time_to_target(target: float, minutes: float) -> str:
    """Train the demo preset on Shakespeare (Qwen3 tokenizer) until the val loss reaches `target`: the run
    is stopped with SIGTERM (it saves and exits) at the first evaluation that reaches it. Two times: the run's
    own elapsed_s at that evaluation (its training loop: compiling included; the process's start, the data and
    model loading, and that evaluation itself not), and the wall time from launch to when this process saw it
    (polled every 2 s: an upper bound), what a seed script's wall clock would be compared with."""
    import signal

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        metrics = out / "metrics.jsonl"
        command = [sys.executable, "-m", "nanoqwen", "train", "--preset", "demo", "--dataset", "shakespeare",
                   "--tokenizer", "qwen3", "--out", str(out), "--max-minutes", str(minutes), "--eval-interval", "50",
                   "--sample-interval", "0", "--device", "cuda"]
        launched = time.perf_counter()
        proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL)
        records: list[dict] = []
        stopped_here, seen_s = False, None
        while proc.poll() is None:
            time.sleep(2)
            lines = metrics.read_text(encoding="utf-8").splitlines() if metrics.exists() else []
            records = [json.loads(line) for line in lines if line.endswith("}")]
            if any(r.get("val_loss", float("inf")) <= target for r in records):
                seen_s = time.perf_counter() - launched
                proc.send_signal(signal.SIGTERM)
                proc.wait()
                stopped_here = True
        # a run stopped by SIGTERM saves and exits 128 + 15 (or 0, where it had just ended by itself)
        if proc.returncode not in ((0, 128 + signal.SIGTERM) if stopped_here else (0,)):
            raise SystemExit(f"the demo run failed with exit code {proc.returncode}")
        records = read_metrics(out)
        seen_s = seen_s if seen_s is not None else time.perf_counter() - launched  # it ended by itself
    hit = next((r for r in records if r.get("val_loss", float("inf")) <= target), None)
    evals = [r["val_loss"] for r in records if "val_loss" in r]
    if hit is None:
        best = f"best {min(evals):.3f}" if evals else "no evaluation"
        return f"| demo to val loss {target} | not reached in {minutes} min ({best}) |"
    return (f"| demo to val loss {target} | {hit['elapsed_s']:.0f} s of training (<= {seen_s:.0f} s from launch), "
            f"step {hit['step']}, {hit['tokens']:,} tokens |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--steps", type=int, default=None, help="timed steps per contender")
    p.add_argument("--target-loss", type=float, default=4.0, help="CUDA: val loss the demo run must reach")
    p.add_argument("--target-minutes", type=float, default=10.0, help="CUDA: time allowed to reach it")
    p.add_argument("--parts", nargs="+", default=["speed", "mfu", "target"], choices=["speed", "mfu", "target"],
                   help="CUDA: which measurements (each fits one 10-minute device call; target takes "
                        "--target-minutes)")
    p.add_argument("--tuned-baseline", action="store_true",
                   help="CPU: also time the cpu preset with Transformers given nanoqwen's allocator setting "
                        "and fused AdamW")
    p.add_argument("--compiled", action="store_true",
                   help="also time the cpu preset (CPU) or qwen3-0.6b (CUDA, with --parts speed) with both "
                        "libraries under torch.compile")
    # worker mode (internal)
    p.add_argument("--worker", choices=["nanoqwen", "transformers"], help=argparse.SUPPRESS)
    p.add_argument("--preset", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--seq-len", type=int, help=argparse.SUPPRESS)
    p.add_argument("--warmup", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--model-overrides", default="{}", help=argparse.SUPPRESS)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible")
    cpu = args.device == "cpu"
    where = "CPU, fp32" if cpu else f"{torch.cuda.get_device_name()}, bf16 autocast"
    print(f"## Training step: nanoqwen vs transformers.Qwen3ForCausalLM ({where}, torch {torch.__version__})\n")
    steps = args.steps
    if cpu:
        print(SPEED_HEADER, flush=True)
        print(compare("cpu preset (3.7M, vocab 2048), 16 x 256", "cpu", 16, 256, steps or 5, 2, "cpu", rounds=3)[0],
              flush=True)
        if args.tuned_baseline:
            print(compare("the same, Transformers with nanoqwen's allocator setting and fused AdamW", "cpu", 16,
                          256, steps or 5, 2, "cpu", rounds=3, tuned_baseline=True)[0], flush=True)
        if args.compiled:  # the first step compiles: three warm-up steps
            print(compare("the same, both under torch.compile", "cpu", 16, 256, steps or 5, 3, "cpu", rounds=2,
                          both_compiled=True)[0], flush=True)
        print(compare("demo preset (Qwen3 vocab 151936), 8 x 256", "demo", 8, 256, steps or 1, 1, "cpu")[0])
        print(SPEED_LEGEND)
    else:
        # One round each: a GPU of its own times steadily, and the stage must fit a short device call. The
        # qwen3-0.6b row, measured first, also gives the MFU, printed at once: a call cut short keeps it.
        first_row, mfu_speed = compare(f"qwen3-0.6b, {MFU_BATCH} x 2048", "qwen3-0.6b", MFU_BATCH, 2048,
                                       steps or 10, 3, "cuda") if "speed" in args.parts else ("", None)
        if "mfu" in args.parts:
            print(f"| MFU | throughput | MFU |\n|---|---|---|\n{mfu_row('cuda', mfu_speed)}\n", flush=True)
        if "speed" in args.parts:
            print(f"{SPEED_HEADER}\n{first_row}", flush=True)
            print(compare("demo preset (Qwen3 vocab), 32 x 512", "demo", 32, 512, steps or 20, 5, "cuda")[0],
                  flush=True)
            if args.compiled:
                print(compare(f"qwen3-0.6b, {MFU_BATCH} x 2048, both under torch.compile", "qwen3-0.6b", MFU_BATCH,
                              2048, steps or 10, 3, "cuda", both_compiled=True)[0])
            print(SPEED_LEGEND)
    if not cpu and "target" in args.parts:
        print("\n| time to target | result |\n|---|---|")
        print(time_to_target(args.target_loss, args.target_minutes))


if __name__ == "__main__":
    main()
